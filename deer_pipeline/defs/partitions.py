"""Camera x day partitions. Camera ids come and go (a dynamic partition named ``camera``);
days are calendar days of capture time (UTC), from DEER_START_DATE (``settings``) to the last
complete day (yesterday). Detections captured outside that range (earlier, or today and later)
are held by ingestion and released by the sensor once their day exists (``detections.feed``).

A run covers many partitions at once: Dagster names them by a key range (run tags
``dagster/asset_partition_range_start`` / ``_end``), which on camera x day is a rectangle: the
cameras from the first to the last in the order they were added, times the days from the first to
the last. The sensor and the schedule launch one run per day for the cameras with work and name
those cameras in the tag ``deer/cameras``; the assets process exactly the run's partitions
(``run_partitions``) that hold detections and skip the others in the rectangle.
"""

from __future__ import annotations

import re

import dagster as dg

from deer_pipeline import settings

CAMERA_PARTITIONS_NAME = "camera"
START_DATE = settings.partition_start_date().isoformat()

camera_partitions = dg.DynamicPartitionsDefinition(name=CAMERA_PARTITIONS_NAME)
day_partitions = dg.DailyPartitionsDefinition(start_date=START_DATE)
camera_day_partitions = dg.MultiPartitionsDefinition(
    {"camera": camera_partitions, "day": day_partitions}
)

CAMERA_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def partition_key(camera_id: str, day: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"camera": camera_id, "day": day})


def unseen_cameras(instance: dg.DagsterInstance, cameras) -> list[str]:
    """The cameras of ``cameras`` that are not yet partitions of the ``camera`` dimension."""
    return sorted(set(cameras) - set(instance.get_dynamic_partitions(CAMERA_PARTITIONS_NAME)))


def split_key(key) -> tuple[str, str]:
    """(camera, day) of a camera x day partition key: a ``MultiPartitionKey`` or its text form
    ``camera|day`` (multi-partition keys sort their dimensions by name). The one parser."""
    if isinstance(key, dg.MultiPartitionKey):
        dims = key.keys_by_dimension
        return dims["camera"], dims["day"]
    camera, day = str(key).split("|")
    return camera, day


# Dagster's run tags for a run over a range of partitions (what a single-run backfill sets)
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
# The cameras a day run is for (comma-separated); the other cameras inside its range are skipped
CAMERAS_TAG = "deer/cameras"


def run_partitions(context: dg.AssetExecutionContext) -> list[tuple[str, str]]:
    """The (camera, day) partitions this run is for, in capture order (day, then camera): every
    key of the run's range, narrowed to the cameras of the run's ``deer/cameras`` tag when set."""
    keys = [split_key(k) for k in context.partition_keys]
    only = context.run.tags.get(CAMERAS_TAG)
    if only:
        cameras = set(only.split(","))
        keys = [k for k in keys if k[0] in cameras]
    return sorted(set(keys), key=lambda k: (k[1], k[0]))


def skipped_partitions(context: dg.AssetExecutionContext, done, nothing_to_do: str) -> dict[str, str]:
    """The partitions of the run's range that the step did not process, with why: the cameras
    inside the range that the run is not for, and partitions with nothing to do (``nothing_to_do``
    says what). Assets put this in their run-wide metadata (``run_skipped``), which every
    partition's materialization carries: one call instead of one per partition (each
    ``add_asset_metadata`` call reloads the run's partition keys from the instance)."""
    only = context.run.tags.get(CAMERAS_TAG)
    cameras = set(only.split(",")) if only else None
    skipped = sorted({split_key(k) for k in context.partition_keys} - set(done), key=lambda k: (k[1], k[0]))
    return {f"{camera}|{day}": (nothing_to_do if cameras is None or camera in cameras
                                else "not one of this run's cameras") for camera, day in skipped}


def skipped_metadata(skipped: dict[str, str]) -> dict:
    """``run_skipped`` metadata: partition -> why it was skipped (only when some were)."""
    return {"run_skipped": dg.MetadataValue.json(skipped)} if skipped else {}


def camera_order(instance: dg.DagsterInstance, new_cameras=()) -> list[str]:
    """The ``camera`` dimension in Dagster's order (the order cameras were added), with
    ``new_cameras`` appended as a dynamic-partitions request of the same tick adds them."""
    known = list(instance.get_dynamic_partitions(CAMERA_PARTITIONS_NAME))
    seen = set(known)
    return known + [c for c in new_cameras if c not in seen]


def range_tags(cameras, first_day: str, last_day: str, order: list[str]) -> dict[str, str]:
    """Run tags for one run over ``cameras`` x [first_day, last_day]: the smallest rectangle of
    the camera order that holds them, and the cameras themselves in ``deer/cameras``."""
    position = {c: i for i, c in enumerate(order)}
    missing = sorted(c for c in cameras if c not in position)
    if missing:
        raise ValueError(f"camera(s) {missing} are not partitions of the camera dimension")
    ranked = sorted(set(cameras), key=position.__getitem__)
    return {RANGE_START_TAG: str(partition_key(ranked[0], first_day)),
            RANGE_END_TAG: str(partition_key(ranked[-1], last_day)),
            CAMERAS_TAG: ",".join(sorted(ranked))}
