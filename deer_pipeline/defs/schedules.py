"""Nightly schedules: yesterday for every camera, then the threshold report."""

from __future__ import annotations

import dagster as dg

from deer_pipeline.defs.jobs import identification_job, report_job

# One run per camera for the previous day (the last complete day partition), at 02:00.
nightly_identification_schedule = dg.build_schedule_from_partitioned_job(
    identification_job,
    name="nightly_identification_schedule",
    hour_of_day=2,
    minute_of_hour=0,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every night: crop, embed and identify yesterday's detections of every camera.",
)

nightly_report_schedule = dg.ScheduleDefinition(
    job=report_job,
    cron_schedule="0 6 * * *",
    name="nightly_report_schedule",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every morning: rebuild the threshold report.",
)
