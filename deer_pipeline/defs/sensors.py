"""The sensor that turns newly ingested detections into camera x day runs."""

from __future__ import annotations

import datetime as dt

import dagster as dg

from deer_pipeline.defs.jobs import identification_job
from deer_pipeline.defs.partitions import (
    START_DATE,
    camera_partitions,
    partition_key,
    unseen_cameras,
)
from deer_pipeline.defs.resources import DeerDatabase
from deer_pipeline.detections import feed as detection_feed
from deer_pipeline.settings import last_partition_day


def _camera_requests(context: dg.SensorEvaluationContext, work) -> list:
    """Add the cameras of ``work`` that are not partitions yet, so its run requests are valid."""
    new_cameras = unseen_cameras(context.instance, {w.camera_id for w in work})
    return [camera_partitions.build_add_request(new_cameras)] if new_cameras else []


@dg.sensor(
    job=identification_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds unseen cameras as partitions and requests one run per camera x day "
                "that received new detections (cursor: the highest detections.seq handled). "
                "Detections whose day is not a partition (before DEER_START_DATE, or today and later) "
                "are held and skipped; they come back as new work once their day exists.",
)
def new_detections_sensor(context: dg.SensorEvaluationContext, database: DeerDatabase) -> dg.SensorResult:
    cursor = int(context.cursor or 0)
    engine = database.engine()
    held = detection_feed.sync_held(engine, dt.date.fromisoformat(START_DATE), last_partition_day())
    if held.newly_held or held.released:
        context.log.info(f"held {held.newly_held} detection(s) whose day is not a partition; released "
                         f"{held.released} whose day is one now")
    work = detection_feed.new_detections_since(engine, cursor)
    if not work:
        note = (f"; {held.held} held (before {START_DATE}: {held.before_start}, today or later: {held.future})"
                if held.held else "")
        return dg.SensorResult(skip_reason=dg.SkipReason(f"no new detections after seq {cursor}{note}"))

    run_requests = [
        dg.RunRequest(
            # The key names the partition and the newest detection it covers: the same work is
            # never requested twice, and later detections of the same day get a new run.
            run_key=f"{w.camera_id}|{w.day}|seq{w.max_seq}",
            partition_key=partition_key(w.camera_id, w.day),
            tags={"deer/new_detections": str(w.n_detections)},
        )
        for w in work
    ]
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=_camera_requests(context, work),
        cursor=str(max(w.max_seq for w in work)),
    )


@dg.sensor(
    job=identification_job,
    minimum_interval_seconds=3600,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Reprocesses unassigned detections: requests a run for every camera x day that "
                "still holds good detections without a deer (e.g. an embedding failed, or a run "
                "failed). One run per distinct set of unassigned detections, so a detection that "
                "stays unassignable is not retried in a loop.",
)
def unassigned_detections_sensor(context: dg.SensorEvaluationContext, database: DeerDatabase) -> dg.SensorResult:
    work = detection_feed.partitions_with_unassigned(database.engine())
    if not work:
        return dg.SensorResult(skip_reason=dg.SkipReason("every good detection is assigned to a deer"))
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"unassigned|{w.camera_id}|{w.day}|{w.fingerprint}",
                partition_key=partition_key(w.camera_id, w.day),
                tags={"deer/unassigned_detections": str(w.n_unassigned)},
            )
            for w in work
        ],
        dynamic_partitions_requests=_camera_requests(context, work),
    )
