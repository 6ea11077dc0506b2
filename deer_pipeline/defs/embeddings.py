"""The ``embeddings`` asset: every ok crop of a camera x day becomes one vector per model.

Thin Dagster layer over ``deer_pipeline.embedding.inference`` (the models) and
``deer_pipeline.embedding.store`` (the vectors). Vectors are keyed by detection and embedding
version, written idempotently, so:

* re-materialising a partition embeds nothing new;
* a new configured version (other weights, reduction, pooling, crop zooms or models) changes the asset's
  ``code_version``, which marks materialised partitions stale; a backfill then embeds the new
  version next to the old one, never touching the old vectors;
* switching back (rollback) finds the old version's vectors and writes no new rows.

The ``code_version`` is computed when the code location loads from the same environment the
inference resource reads (``DEER_EMBEDDING_MODELS``, ``DEER_EMBEDDING_WEIGHTS``,
``DEER_CROP_ZOOMS``): it hashes the
resolved embedding versions, i.e. model, weights hash, reduction hash and preprocessing.
"""


import hashlib
import json
import warnings
from typing import Sequence

import dagster as dg

from deer_pipeline.defs.executors import GPU_POOL, GPU_STEP_TAGS, STEP_RETRY_POLICY
from deer_pipeline.defs.partitions import (
    camera_day_partitions,
    run_partitions,
    skipped_metadata,
    skipped_partitions,
    split_key,
)
from deer_pipeline.defs.resources import CropStore, DeerDatabase, InferenceResource
from deer_pipeline.lazy_modules import lazy
from deer_pipeline.settings import EmbeddingSettings

db = lazy("deer_pipeline.db")
feed = lazy("deer_pipeline.detections.feed")
embedding_config = lazy("deer_pipeline.embedding.config")
embedding_partitions = lazy("deer_pipeline.embedding.partitions")

# None: a backfill runs as one run per range of partitions (one per day, like the sensor's runs),
# with crops, deer_profiles and similarity_scores in the same run
MAX_PARTITIONS_PER_RUN: int | None = None
CHECK_NAME = "every_crop_embedded"


def _failure_table(failures: list[tuple[str, str, str]], limit: int = 20) -> str:
    lines = ["| detection | model | reason |", "|---|---|---|"]
    for det, model, reason in failures[:limit]:
        lines.append(f"| {det} | {model} | {reason.replace('|', '/')} |")
    if len(failures) > limit:
        lines.append(f"| ... | | {len(failures) - limit} more |")
    return "\n".join(lines)


def embed_partitions(context, database: DeerDatabase, crop_store: CropStore,
                     inference: InferenceResource, partition_keys: Sequence, code_version: str,
                     skipped: dict[str, str] | None = None):
    """The asset body: embed the missing vectors of every partition, return metadata and checks."""
    config = inference.embedding_settings()
    configured_code_version = embedding_config.code_version(config)
    if configured_code_version != code_version:
        context.log.warning(
            "the inference resource is configured for embedding versions %s, which is not what this "
            "asset's code_version (%s) was computed from (DEER_EMBEDDING_MODELS / "
            "DEER_EMBEDDING_WEIGHTS / DEER_CROP_ZOOMS when the code location loaded); staleness will not reflect it",
            embedding_config.versions(config), code_version)
    run = embedding_partitions.embed_partitions(database.engine(), config, crop_store.settings().store_dir,
                                                [split_key(k) for k in partition_keys],
                                                progress_log=context.log.info)
    for line in run.weights_used:
        context.log.info("weights used: %s", line)
    metadata = {**_metadata(run, partition_keys, config, configured_code_version == code_version),
                **skipped_metadata(skipped or {})}
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(_data_version(run, partition_keys)),
                                check_results=[_every_crop_embedded(run)])


def _metadata(run: "embedding_partitions.EmbeddingRun", partition_keys, config, config_matches: bool) -> dict:
    metadata = {
        "partitions": dg.MetadataValue.text(", ".join(str(k) for k in partition_keys)),
        "crops": dg.MetadataValue.int(run.crops),
        "crops_embedded_now": dg.MetadataValue.int(run.crops_embedded_now),
        "new_vectors": dg.MetadataValue.int(run.new_vectors),
        "retried_vectors": dg.MetadataValue.int(sum(c.updated for c in run.written.values())),
        "vectors_per_model": dg.MetadataValue.json(
            {m: {"version": run.versions[m], "written_now": run.written[m].inserted + run.written[m].updated,
                 **run.summary[m]} for m in run.versions}),
        "failures": dg.MetadataValue.int(len({d for d, _, _ in run.failures})),
        "crops_per_s": dg.MetadataValue.float(run.crops_per_s),
        "embedding_versions": dg.MetadataValue.json(run.versions),
        "weights_used": dg.MetadataValue.text("weights used: " + " | ".join(run.weights_used)),
        "device": dg.MetadataValue.text(run.device or config.device),
        "batch_size": dg.MetadataValue.int(config.batch_size),
        "backbone_passes_per_crop": dg.MetadataValue.int(run.backbone_passes_per_crop),
        "config_matches_code_version": dg.MetadataValue.bool(config_matches),
    }
    if run.failures:
        metadata["failed_crops"] = dg.MetadataValue.md(_failure_table(run.failures))
    return metadata


def _data_version(run: "embedding_partitions.EmbeddingRun", partition_keys) -> str:
    return hashlib.sha256(json.dumps(
        {"versions": run.versions, "summary": run.summary, "keys": sorted(str(k) for k in partition_keys)},
        sort_keys=True).encode()).hexdigest()[:16]


def _every_crop_embedded(run: "embedding_partitions.EmbeddingRun") -> dg.AssetCheckResult:
    missing, failed = run.missing, run.failed
    return dg.AssetCheckResult(
        check_name=CHECK_NAME,
        passed=missing == 0 and failed == 0,
        severity=dg.AssetCheckSeverity.ERROR if missing else dg.AssetCheckSeverity.WARN,
        description=("every ok crop has a vector of every configured version" if not (missing or failed)
                     else f"{missing} crop/version pair(s) without any row, {failed} failed to embed"),
        metadata={"missing": dg.MetadataValue.int(missing), "failed": dg.MetadataValue.int(failed),
                  "per_model": dg.MetadataValue.json(run.summary)},
    )


def build_embeddings_asset(config: EmbeddingSettings | None = None,
                           max_partitions_per_run: int | None = MAX_PARTITIONS_PER_RUN) -> dg.AssetsDefinition:
    """The ``embeddings`` asset for an embedding configuration (default: the environment's, the
    one the inference resource is built from). Its code_version hashes the resolved versions."""
    config = embedding_config.check_models(config or EmbeddingSettings.from_environment())
    code_version = embedding_config.code_version(config)
    with warnings.catch_warnings():   # backfill_policy is marked beta in Dagster 1.13
        warnings.simplefilter("ignore", dg.BetaWarning)
        return _define_embeddings_asset(config, max_partitions_per_run, code_version)


def _define_embeddings_asset(config: EmbeddingSettings, max_partitions_per_run: int | None, code_version: str):
    extra = {"retry_policy": STEP_RETRY_POLICY} if STEP_RETRY_POLICY is not None else {}

    @dg.asset(
        name="embeddings",
        partitions_def=camera_day_partitions,
        deps=["crops"],
        pool=GPU_POOL,
        op_tags=dict(GPU_STEP_TAGS),
        group_name="identification",
        code_version=code_version,
        backfill_policy=(dg.BackfillPolicy.single_run() if max_partitions_per_run is None
                         else dg.BackfillPolicy.multi_run(max_partitions_per_run=max_partitions_per_run)),
        kinds={"pytorch", "postgres"},
        check_specs=[dg.AssetCheckSpec(CHECK_NAME, asset="embeddings",
                                       description="every ok crop of the partition has a vector "
                                                   "of every configured embedding version")],
        description=("One L2-normalised 512-d vector per ok crop and model, keyed by detection and "
                     f"embedding version (models: {', '.join(config.models)}; weights: {config.weights}"
                     f"{'; weights files: ' + str(dict(config.weights_files)) if config.weights_files else ''}; "
                     f"pooling: {config.pooling}; crop zooms: {', '.join(f'{z:g}' for z in config.zooms)})."),
        **extra,
    )
    def embeddings(context: dg.AssetExecutionContext, database: DeerDatabase, crop_store: CropStore,
                   inference: InferenceResource) -> dg.MaterializeResult:
        # Vectors are written per batch, keyed by detection and version: when the database drops
        # out, the asset starts again and embeds only what is not stored yet.
        # A run may cover many camera x day partitions: those of the run that hold detections
        # are embedded together (one model load), the other partitions of its range are skipped.
        todo = feed.partitions_with_work(database.engine(), run_partitions(context))
        skipped = skipped_partitions(context, todo, "no detections to embed")
        keys = [f"{c}|{d}" for c, d in todo]
        return db.retry_transient(
            lambda: embed_partitions(context, database, crop_store, inference, keys, code_version, skipped),
            "embeddings", on_retry=context.log.warning)

    return embeddings


embeddings = build_embeddings_asset()
