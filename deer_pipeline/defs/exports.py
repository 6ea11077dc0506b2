"""Daily assets people look at and share: ``deer_roster`` (a table of deer, numbers the UI plots
over time, and pictures) and ``camtrap_dp`` (a Camtrap DP 1.0 package under the data
directory). Thin over ``deer_pipeline.export``."""

from datetime import datetime, timezone
from pathlib import Path

import dagster as dg

from deer_pipeline import settings
from deer_pipeline.defs.resources import DeerDatabase
from deer_pipeline.lazy_modules import lazy

camtrap_lib = lazy("deer_pipeline.export.camtrap_dp")
roster_lib = lazy("deer_pipeline.export.roster")


@dg.asset(
    deps=["deer_profiles"],
    group_name="reports",
    kinds={"postgres", "matplotlib"},
    description="The deer roster: every deer with its sightings, encounters, cameras and first/last "
                "seen; deer total, new deer per day and the 7-day assignment rate as numbers the UI "
                "plots over time; sightings per camera per week and a camera map as pictures.",
)
def deer_roster(context: dg.AssetExecutionContext, database: DeerDatabase) -> dg.MaterializeResult:
    roster = roster_lib.build_roster(database.engine())
    latest = roster.latest
    out_dir = Path(settings.data_dir_setting()) / "reports"
    out_dir.mkdir(parents=True, exist_ok=True)
    pictures = {"over_time": roster_lib.over_time_png(roster),
                "sightings_per_camera_week": roster_lib.sightings_per_camera_week_png(roster)}
    camera_map = roster_lib.camera_map_png(roster)
    if camera_map is not None:
        pictures["camera_map"] = camera_map
    meta: dict = {
        "deer_total": dg.MetadataValue.int(roster.deer_total),
        "new_deer_latest_day": dg.MetadataValue.int(int(latest.get("new_deer", 0))),
        "assignment_rate_7d": dg.MetadataValue.float(round(float(latest["assignment_rate_7d"]), 4))
        if latest.get("assignment_rate_7d") is not None else dg.MetadataValue.float(float("nan")),
        "latest_capture_day": dg.MetadataValue.text(str(latest.get("day", "-"))),
        "roster": dg.MetadataValue.md(roster_lib.roster_markdown(roster)),
    }
    for name, png in pictures.items():
        path = out_dir / f"roster_{name}.png"
        path.write_bytes(png)
        meta[f"{name}_plot"] = dg.MetadataValue.md(
            roster_lib.png_markdown(roster_lib.shrink_png(png), name.replace("_", " ")))
        meta[f"{name}_png"] = dg.MetadataValue.path(str(path))
    if camera_map is None:
        meta["camera_map_plot"] = dg.MetadataValue.md(
            "No camera has coordinates yet: `deer-pipeline cameras import cameras.csv`.")
    context.log.info(f"roster: {roster.deer_total} deer, latest day {latest.get('day')}")
    return dg.MaterializeResult(metadata=meta)


@dg.asset(
    deps=["deer_profiles"],
    group_name="reports",
    kinds={"postgres", "csv"},
    description="A Camtrap DP 1.0 package of every deer, sighting, photo and camera "
                "(<data dir>/exports/camtrap-dp/<UTC time>/), checked offline against the Camtrap "
                "DP 1.0 profile and table schemas. Needs camera coordinates (deer-pipeline cameras import).",
)
def camtrap_dp(context: dg.AssetExecutionContext, database: DeerDatabase) -> dg.MaterializeResult:
    now = datetime.now(timezone.utc)
    out = Path(settings.data_dir_setting()) / "exports" / "camtrap-dp" / now.strftime("%Y-%m-%dT%H%M%SZ")
    try:
        report = camtrap_lib.write_package(database.engine(), out, now=now)
    except camtrap_lib.ExportError as exc:
        raise dg.Failure(description=str(exc)) from exc
    errors = camtrap_lib.validate_package(out)
    for e in errors[:20]:
        context.log.warning(e)
    return dg.MaterializeResult(metadata={
        "package": dg.MetadataValue.path(str(out)),
        "valid_camtrap_dp_1_0": dg.MetadataValue.bool(not errors),
        "problems": dg.MetadataValue.int(len(errors)),
        "deployments": dg.MetadataValue.int(report.deployments),
        "media": dg.MetadataValue.int(report.media),
        "observations": dg.MetadataValue.int(report.observations),
        "individuals": dg.MetadataValue.int(report.individuals),
    })


daily_exports_job = dg.define_asset_job(
    name="daily_exports_job",
    selection=dg.AssetSelection.assets("deer_roster", "camtrap_dp"),
    description="Rebuild the deer roster and write a Camtrap DP package.",
)

daily_exports_schedule = dg.ScheduleDefinition(
    job=daily_exports_job,
    cron_schedule="30 6 * * *",
    name="daily_exports_schedule",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every morning (after the nightly identification): the deer roster and a Camtrap DP package.",
)
