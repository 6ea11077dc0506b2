"""Nightly schedules: yesterday for every camera with detections (one run), then the threshold report."""

from __future__ import annotations

import datetime as dt

import dagster as dg

from deer_pipeline.defs.jobs import identification_job, report_job
from deer_pipeline.defs.partitions import START_DATE, camera_order, range_tags
from deer_pipeline.defs.resources import DeerDatabase
from deer_pipeline.lazy_modules import lazy

detection_feed = lazy("deer_pipeline.detections.feed")


@dg.schedule(
    job=identification_job,
    cron_schedule="0 2 * * *",
    execution_timezone="UTC",
    name="nightly_identification_schedule",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every night at 02:00 UTC: crop, embed and identify yesterday's detections, in one run "
                "covering every camera with detections that day (the day's decisions made together: "
                "one replay for the day, not one per camera).",
)
def nightly_identification_schedule(context: dg.ScheduleEvaluationContext,
                                    database: DeerDatabase) -> dg.RunRequest | dg.SkipReason:
    # the last complete day (the last day partition) at the scheduled time
    day = (context.scheduled_execution_time.astimezone(dt.timezone.utc).date() - dt.timedelta(days=1)).isoformat()
    if day < START_DATE:
        return dg.SkipReason(f"{day} is before the first day partition {START_DATE}")
    order = camera_order(context.instance)
    with_detections = detection_feed.cameras_with_detections(database.engine(), day)
    cameras = [c for c in with_detections if c in set(order)]
    unknown = sorted(set(with_detections) - set(cameras))
    if unknown:   # the new-detections sensor adds them as partitions and runs them
        context.log.info(f"{day}: camera(s) {unknown} are not partitions yet; the new-detections sensor adds them")
    if not cameras:
        return dg.SkipReason(f"no camera has detections on {day}")
    return dg.RunRequest(run_key=f"nightly|{day}", tags=range_tags(cameras, day, day, order))


nightly_report_schedule = dg.ScheduleDefinition(
    job=report_job,
    cron_schedule="0 6 * * *",
    name="nightly_report_schedule",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every morning: rebuild the threshold report.",
)
