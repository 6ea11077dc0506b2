"""Camera x day partitions. Camera ids come and go (a dynamic partition named ``camera``);
days are calendar days of capture time (UTC), from DEER_START_DATE (``settings``) to the last
complete day (yesterday). Detections captured outside that range (earlier, or today and later)
are held by ingestion and released by the sensor once their day exists (``detections.feed``)."""

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


def camera_and_day(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> tuple[str, str]:
    return split_key(context.partition_key)
