"""The ``reid_evaluation`` asset: does nothing heavy without labels; with labels it runs the
evaluation and puts the numbers in the asset's metadata."""

from __future__ import annotations

import csv
from pathlib import Path

import dagster as dg
import pytest

from deer_pipeline.defs.evaluation import ENV, reid_evaluation
from deer_pipeline.defs.resources import DeerDatabase


def _metadata(result) -> dict:
    mats = result.asset_materializations_for_node("reid_evaluation")
    assert len(mats) == 1
    return mats[0].metadata


def test_reid_evaluation_without_labels_reports_and_does_nothing(monkeypatch, session_engine):
    for var in ENV.values():
        monkeypatch.delenv(var, raising=False)
    result = dg.materialize([reid_evaluation], resources={"database": DeerDatabase()})
    assert result.success
    md = _metadata(result)
    assert md["status"].value == "no labels configured"
    assert not any(k.endswith("_open_set_f1") for k in md)


def test_reid_evaluation_with_labels_puts_numbers_in_metadata(nyala_dir, tmp_path, session_engine):
    with open(nyala_dir / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    chosen = sorted({r["identity"] for r in rows})[:4]
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image_path", "identity", "encounter_id"])
        w.writeheader()
        for i in chosen:
            for r in [r for r in rows if r["identity"] == i][:4]:
                w.writerow({k: r[k] for k in ("image_path", "identity", "encounter_id")})
    config = {"labels_csv": str(labels), "images_root": str(nyala_dir), "split_by_identity_seed": 1,
              "methods": ["default", "legacy"]}
    result = dg.materialize([reid_evaluation], resources={"database": DeerDatabase()},
                            run_config={"ops": {"reid_evaluation": {"config": config}}})
    assert result.success
    md = _metadata(result)
    assert md["status"].value == "evaluated"
    for key in ("default_open_set_f1", "legacy_open_set_f1", "default_cross_encounter_f1", "default_top1", "default_mAP",
                "legacy_count_error", "default_threshold"):
        assert isinstance(md[key].value, float), key
    assert 0.0 <= md["default_open_set_f1"].value <= 1.0
    assert md["legacy_threshold"].value == pytest.approx(0.60)
    assert "| default * |" in md["results"].value and "| legacy |" in md["results"].value
    assert Path(md["report_json"].value).is_file() and Path(md["report_html"].value).is_file()
    assert md["evaluated_photos"].value == 8
