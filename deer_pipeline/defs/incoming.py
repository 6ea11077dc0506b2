"""The drop folder (``DEER_INCOMING_DIR``): a sensor that requests one ingest run per new
detector file, and the job that ingests it. Thin over ``detections.incoming`` and
``detections.ingest``; the new detections are then picked up by ``new_detections_sensor``."""


from typing import Optional

import dagster as dg
from pydantic import Field

from deer_pipeline import settings
from deer_pipeline.defs.resources import DeerDatabase
from deer_pipeline.lazy_modules import lazy

incoming = lazy("deer_pipeline.detections.incoming")
ingest = lazy("deer_pipeline.detections.ingest")


class IngestFileConfig(dg.Config):
    path: str = Field(description="detector file to ingest (MegaDetector or SpeciesNet JSON)")
    min_confidence: Optional[float] = Field(
        default=None, description="None = the file's typical_detection_threshold, else 0.2; 0 keeps every box")
    all_animals_are_deer: bool = Field(
        default=False, description="a file without a species classifier: take every animal box as a deer")


@dg.op(description="Ingest one detector file (idempotent); rejected records keep their reasons.")
def ingest_detector_file(context: dg.OpExecutionContext, config: IngestFileConfig,
                         database: DeerDatabase) -> dg.Output:
    report = ingest.ingest(database.engine(), config.path, min_confidence=config.min_confidence,
                           all_animals_are_deer=config.all_animals_are_deer, quiet=True)
    context.log.info(report.summary())
    return dg.Output(
        value=report.batch_id,
        metadata={"source": dg.MetadataValue.path(report.source), "batch_id": report.batch_id,
                  "records": report.records, "new_detections": report.new_detections,
                  "rejected": report.rejected, "already_ingested": report.already_ingested,
                  "partitions": len(report.partitions),
                  "summary": dg.MetadataValue.md("```\n" + report.summary() + "\n```")})


@dg.job(description="Ingest one detector file dropped into DEER_INCOMING_DIR.")
def ingest_file_job():
    ingest_detector_file()


@dg.sensor(
    job=ingest_file_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches DEER_INCOMING_DIR for MegaDetector / SpeciesNet JSON files and requests one "
                "ingest run per new (or replaced) file, once it has stopped changing. Cursor: each "
                "file's size and modification time.",
)
def incoming_detector_files_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    folder = settings.incoming_dir()
    if folder is None:
        return dg.SensorResult(skip_reason=dg.SkipReason("DEER_INCOMING_DIR is not set"))
    from pathlib import Path

    if not Path(folder).is_dir():
        return dg.SensorResult(skip_reason=dg.SkipReason(f"DEER_INCOMING_DIR {folder} is not a folder"))
    state = incoming.load_state(context.cursor)
    found, settling = incoming.new_files(folder, state, settle_s=settings.incoming_settle_seconds())
    if not found:
        why = f"{len(settling)} file(s) still changing" if settling else "no new detector files"
        return dg.SensorResult(skip_reason=dg.SkipReason(f"{why} in {folder}"))
    all_deer = settings.incoming_all_animals_are_deer()
    requests = []
    for f in found:
        state[f.name] = f.signature
        requests.append(dg.RunRequest(
            run_key=f"incoming|{f.name}|{f.signature}",
            run_config={"ops": {"ingest_detector_file": {"config": {
                "path": str(f.path), "all_animals_are_deer": all_deer}}}},
            tags={"deer/incoming_file": f.name}))
    return dg.SensorResult(run_requests=requests, cursor=incoming.dump_state(state))
