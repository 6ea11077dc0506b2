"""The ``crops`` asset: one camera-day of detections cut out of their photos (thin layer over
``deer_pipeline.detections.cropping``)."""

import dagster as dg

from deer_pipeline import db
from deer_pipeline.defs.partitions import camera_and_day, camera_day_partitions
from deer_pipeline.defs.resources import CropStore, DeerDatabase
from deer_pipeline.detections.cropping import crop_partition

SKIPPED_TABLE_ROWS = 25


@dg.asset(
    partitions_def=camera_day_partitions,
    group_name="identification",
    kinds={"python", "postgres"},
    description="Each good detection of the camera-day cut out of its photo (padded, clipped), "
                "decoded once per photo at the smallest JPEG scale that keeps crops >= 224 px, stored "
                "content-addressed; one row per detection in table crops (ok | too_small | failed).",
)
def crops(context: dg.AssetExecutionContext, database: DeerDatabase, crop_store: CropStore) -> dg.MaterializeResult:
    camera_id, day = camera_and_day(context)
    settings = crop_store.settings()
    # one transaction, content-addressed files: repeated whole when the database drops out
    report = db.retry_transient(lambda: crop_partition(database.engine(), camera_id, day, settings,
                                                               progress_log=context.log.info),
                                f"crops {camera_id}|{day}", on_retry=context.log.warning)
    context.log.info(report.summary())
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
    return dg.MaterializeResult(metadata=metadata)


crops_asset = crops
