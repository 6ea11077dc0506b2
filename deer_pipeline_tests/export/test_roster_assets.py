"""The daily deer_roster and camtrap_dp assets, and the threshold-report plot as an inline image."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import dagster as dg
from PIL import Image

from deer_pipeline.defs.resources import DeerDatabase
from deer_pipeline.export import camtrap_dp, cameras, roster
from deer_pipeline_tests.export.demo_data import make_demo_like, write_cameras_csv


def _inline_image(md: str) -> Image.Image:
    assert md.startswith("![") and "(data:image/png;base64," in md
    data = md.split("(data:image/png;base64,", 1)[1].rstrip(")")
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_deer_roster_asset_and_camtrap_dp_asset(engine, tmp_path):
    from deer_pipeline.defs.exports import camtrap_dp as camtrap_asset
    from deer_pipeline.defs.exports import deer_roster

    info, _ = make_demo_like(engine, tmp_path / "sample")
    resources = {"database": DeerDatabase()}
    built = roster.build_roster(engine)
    assert built.deer_total == 4 and sum(r["sightings"] for r in built.deer) > 0
    assert built.daily[-1]["deer_total"] == 4 and sum(r["new_deer"] for r in built.daily) == 4
    assert all(r["assignment_rate_7d"] is None or 0 <= r["assignment_rate_7d"] <= 1 for r in built.daily)

    result = dg.materialize([deer_roster], resources=resources)
    assert result.success
    md = result.asset_materializations_for_node("deer_roster")[0].metadata
    assert md["deer_total"].value == 4
    assert 0 <= md["assignment_rate_7d"].value <= 1
    assert "| deer | sex | sightings |" in md["roster"].value
    for label in {r["deer"] for r in built.deer}:
        assert label in md["roster"].value
    assert _inline_image(md["over_time_plot"].value).size[0] > 100
    assert _inline_image(md["sightings_per_camera_week_plot"].value).size[0] > 100
    assert "No camera has coordinates" in md["camera_map_plot"].value      # no coordinates yet

    # without coordinates the Camtrap DP asset fails with the reason; with them it writes a valid package
    failed = dg.materialize([camtrap_asset], resources=resources, raise_on_error=False)
    assert not failed.success
    write_cameras_csv(tmp_path / "cameras.csv", info.cameras)
    cameras.import_cameras(engine, tmp_path / "cameras.csv")
    ok = dg.materialize([camtrap_asset], resources=resources)
    meta = ok.asset_materializations_for_node("camtrap_dp")[0].metadata
    assert meta["valid_camtrap_dp_1_0"].value is True and meta["individuals"].value == 4
    assert (Path(meta["package"].value) / "datapackage.json").exists()
    assert camtrap_dp.validate_package(meta["package"].value) == []

    again = dg.materialize([deer_roster], resources=resources)
    md2 = again.asset_materializations_for_node("deer_roster")[0].metadata
    assert _inline_image(md2["camera_map_plot"].value).size[0] > 100


def test_roster_definitions_are_loaded():
    from deer_pipeline.definitions import defs

    assert defs.resolve_job_def("daily_exports_job") is not None
    assert defs.get_schedule_def("daily_exports_schedule").cron_schedule == "30 6 * * *"
    assert defs.get_sensor_def("incoming_detector_files_sensor") is not None
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"deer_roster", "camtrap_dp", "threshold_report"} <= keys
