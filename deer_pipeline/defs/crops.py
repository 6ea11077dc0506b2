"""The ``crops`` asset: the camera-days of a run, their detections cut out of their photos (thin
layer over ``deer_pipeline.detections.cropping``); metadata per partition."""

import time

import dagster as dg

from deer_pipeline.defs.partitions import (
    camera_day_partitions,
    partition_key,
    run_partitions,
    skipped_metadata,
    skipped_partitions,
)
from deer_pipeline.defs.resources import CropStore, DeerDatabase
from deer_pipeline.lazy_modules import lazy

db = lazy("deer_pipeline.db")
feed = lazy("deer_pipeline.detections.feed")
cropping = lazy("deer_pipeline.detections.cropping")

SKIPPED_TABLE_ROWS = 25


@dg.asset(
    partitions_def=camera_day_partitions,
    group_name="identification",
    kinds={"python", "postgres"},
    # a run may cover many partitions (the sensor's and the schedule's runs are one per day)
    backfill_policy=dg.BackfillPolicy.single_run(),
    description="Each good detection of the camera-day cut out of its photo (padded, clipped), "
                "decoded once per photo at the smallest JPEG scale that keeps crops >= 224 px, stored "
                "content-addressed; one row per detection in table crops (ok | too_small | failed).",
)
def crops(context: dg.AssetExecutionContext, database: DeerDatabase, crop_store: CropStore) -> dg.MaterializeResult:
    settings = crop_store.settings()
    engine = database.engine()
    partitions = run_partitions(context)
    todo = feed.partitions_with_work(engine, partitions)
    totals = {"detections": 0, "cropped": 0, "too_small": 0, "failed": 0}
    t0 = time.perf_counter()
    summaries: list[str] = []
    for camera_id, day in todo:
        # one transaction, content-addressed files: repeated whole when the database drops out
        report = db.retry_transient(lambda: cropping.crop_partition(engine, camera_id, day, settings,
                                                           progress_log=context.log.info),
                                    f"crops {camera_id}|{day}", on_retry=context.log.warning)
        summaries.append(report.summary())
        context.add_asset_metadata(_metadata(report, settings), partition_key=partition_key(camera_id, day))
        for k in totals:
            totals[k] += getattr(report, k)
    if summaries:    # one log line for the step: each line is an event Dagster stores
        context.log.info("\n".join(summaries))
    skipped = skipped_partitions(context, todo, "no detections to crop")
    return dg.MaterializeResult(metadata={
        "run_partitions_cropped": dg.MetadataValue.int(len(todo)),
        **{f"run_{k}": dg.MetadataValue.int(v) for k, v in totals.items()},
        "run_seconds": dg.MetadataValue.float(round(time.perf_counter() - t0, 3)),
        **skipped_metadata(skipped),
    })


def _metadata(report, settings) -> dict:
    skipped = report.skipped[:SKIPPED_TABLE_ROWS]
    metadata = {
        "detections": dg.MetadataValue.int(report.detections),
        "cropped": dg.MetadataValue.int(report.cropped),
        "too_small": dg.MetadataValue.int(report.too_small),
        "failed": dg.MetadataValue.int(report.failed),
        "photos": dg.MetadataValue.int(report.photos),
        "decode_scales": dg.MetadataValue.json(report.decode_scales),
        "seconds": dg.MetadataValue.float(round(report.seconds, 3)),
        "min_crop_px": dg.MetadataValue.int(settings.min_crop_px),
        "pad_fraction": dg.MetadataValue.float(settings.pad_fraction),
        "store": dg.MetadataValue.path(settings.store_dir),
    }
    if skipped:
        metadata["skipped_crops"] = dg.MetadataValue.table(
            records=[dg.TableRecord(r) for r in skipped],
            schema=dg.TableSchema(columns=[
                dg.TableColumn("detection_id", "string"),
                dg.TableColumn("status", "string"),
                dg.TableColumn("reason", "string"),
            ]),
        )
    return metadata


crops_asset = crops
