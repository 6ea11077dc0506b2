"""The code location: every asset, check, job, sensor, schedule and resource of deer_pipeline.

Loaded by ``workspace.yaml`` (``dagster dev``), the code server in docker-compose, and the tests.
"""

from __future__ import annotations

import types

import dagster as dg

from deer_pipeline import settings
from deer_pipeline.defs import (
    alerts,
    crops,
    embeddings,
    evaluation,
    executors,
    exports,
    identity,
    incoming,
    jobs,
    reid_model,
    reports,
    schedules,
    sensors,
)
from deer_pipeline.defs.resources import (
    CropStore,
    DeerDatabase,
    IdentitySettings,
    inference_resource_from_env,
)

ASSET_MODULES = [crops, embeddings, identity, reports, evaluation, exports, reid_model]


def _of_type(modules, kind) -> list:
    """The definitions of type ``kind`` in ``modules``. Module objects are skipped before any
    ``isinstance`` (which reads ``__class__``): the library modules the Dagster layer names load
    on first use (``lazy_modules``), and reading them here would import them all."""
    found = []
    for module in modules:
        for value in vars(module).values():
            if issubclass(type(value), types.ModuleType):
                continue
            if isinstance(value, kind) and value not in found:
                found.append(value)
    return found


def resources() -> dict:
    return {
        "database": DeerDatabase(),
        "crop_store": CropStore(),
        "inference": inference_resource_from_env(),
        "identity": IdentitySettings(ensemble_weights=settings.configured_ensemble_weights()),
    }


defs = dg.Definitions(
    assets=_of_type(ASSET_MODULES, (dg.AssetsDefinition, dg.AssetSpec, dg.SourceAsset)),
    jobs=[jobs.identification_job, jobs.report_job, jobs.evaluation_job, incoming.ingest_file_job,
          jobs.training_job,
          exports.daily_exports_job],
    sensors=_of_type([sensors, alerts, incoming], dg.SensorDefinition),
    schedules=[schedules.nightly_identification_schedule, schedules.nightly_report_schedule,
               exports.daily_exports_schedule],
    resources=resources(),
    # DEER_EXECUTOR=celery runs steps on celery workers (gpu queue for inference); default: multiprocess
    executor=executors.executor_from_env(),
)
