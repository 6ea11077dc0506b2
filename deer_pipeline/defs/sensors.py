"""The sensors that turn newly ingested (or still unassigned) detections into runs: one run per
day, over every camera of that day with work (a run over a range of camera x day partitions,
named by Dagster's partition-range tags; the cameras themselves in ``deer/cameras``)."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import defaultdict
from typing import Callable

import dagster as dg

from deer_pipeline.defs.jobs import identification_job
from deer_pipeline.defs.partitions import (
    START_DATE,
    camera_order,
    camera_partitions,
    range_tags,
    unseen_cameras,
)
from deer_pipeline.defs.resources import DeerDatabase
from deer_pipeline.lazy_modules import lazy
from deer_pipeline.settings import last_partition_day

detection_feed = lazy("deer_pipeline.detections.feed")


def _camera_requests(context: dg.SensorEvaluationContext, work) -> tuple[list, list[str]]:
    """Add the cameras of ``work`` that are not partitions yet, so its run requests are valid;
    returns the requests and the camera dimension's order once they are applied."""
    new_cameras = unseen_cameras(context.instance, {w.camera_id for w in work})
    requests = [camera_partitions.build_add_request(new_cameras)] if new_cameras else []
    return requests, camera_order(context.instance, new_cameras)


def day_run_requests(work, order: list[str], run_key: Callable[[str, list], str],
                     tags: Callable[[list], dict[str, str]]) -> list[dg.RunRequest]:
    """One run request per day of ``work`` (items with ``camera_id`` and ``day``), oldest day
    first, covering that day's cameras."""
    days: dict[str, list] = defaultdict(list)
    for w in work:
        days[w.day].append(w)
    return [dg.RunRequest(run_key=run_key(day, items),
                          tags={**range_tags({w.camera_id for w in items}, day, day, order), **tags(items)})
            for day, items in sorted(days.items())]


@dg.sensor(
    job=identification_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds unseen cameras as partitions and requests one run per day that received new "
                "detections, covering every camera of that day with new detections (cursor: the highest "
                "detections.seq handled). Detections whose day is not a partition (before "
                "DEER_START_DATE, or today and later) are held and skipped; they come back as new work "
                "once their day exists.",
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

    add, order = _camera_requests(context, work)
    run_requests = day_run_requests(
        work, order,
        # The key names the day and the newest detection it covers: the same work is never
        # requested twice, and later detections of the same day get a new run.
        run_key=lambda day, items: f"{day}|seq{max(w.max_seq for w in items)}",
        tags=lambda items: {"deer/new_detections": str(sum(w.n_detections for w in items))})
    return dg.SensorResult(run_requests=run_requests, dynamic_partitions_requests=add,
                           cursor=str(max(w.max_seq for w in work)))


@dg.sensor(
    job=identification_job,
    minimum_interval_seconds=3600,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Reprocesses unassigned detections: requests one run per day for every camera that "
                "still holds good detections without a deer that day (e.g. an embedding failed, or a run "
                "failed). One run per distinct set of unassigned detections of the day, so a detection "
                "that stays unassignable is not retried in a loop.",
)
def unassigned_detections_sensor(context: dg.SensorEvaluationContext, database: DeerDatabase) -> dg.SensorResult:
    work = detection_feed.partitions_with_unassigned(database.engine())
    if not work:
        return dg.SensorResult(skip_reason=dg.SkipReason("every good detection is assigned to a deer"))
    add, order = _camera_requests(context, work)
    run_requests = day_run_requests(
        work, order,
        run_key=lambda day, items: "unassigned|{}|{}".format(day, hashlib.md5(
            ",".join(f"{w.camera_id}:{w.fingerprint}" for w in sorted(items, key=lambda w: w.camera_id))
            .encode()).hexdigest()),
        tags=lambda items: {"deer/unassigned_detections": str(sum(w.n_unassigned for w in items))})
    return dg.SensorResult(run_requests=run_requests, dynamic_partitions_requests=add)
