"""The ``embeddings`` asset: every ok crop of a camera x day becomes one vector per model.

Thin Dagster layer over ``deer_pipeline.embedding.inference`` (the models) and
``deer_pipeline.embedding.store`` (the vectors). Vectors are keyed by detection and embedding
version, written idempotently, so:

* re-materialising a partition embeds nothing new;
* a new configured version (other weights, reduction, pooling or models) changes the asset's
  ``code_version``, which marks materialised partitions stale; a backfill then embeds the new
  version next to the old one, never touching the old vectors;
* switching back (rollback) finds the old version's vectors and writes no new rows.

The ``code_version`` is computed when the code location loads from the same environment the
inference resource reads (``DEER_EMBEDDING_MODELS``, ``DEER_EMBEDDING_WEIGHTS``): it hashes the
resolved embedding versions, i.e. model, weights hash, reduction hash and preprocessing.
"""


import hashlib
import json
import time
import warnings
from typing import Mapping, Sequence

import dagster as dg

from deer_pipeline.embedding import models as embedders
from deer_pipeline.embedding import store as embedding_store
from deer_pipeline.defs.resources import InferenceResource, configured_models, configured_weights
from deer_pipeline.defs.partitions import camera_day_partitions, split_key
from deer_pipeline.defs.resources import CropStore, DeerDatabase
from deer_pipeline.embedding.inference import CropItem

from deer_pipeline.defs.executors import GPU_POOL, GPU_STEP_TAGS, STEP_RETRY_POLICY

# Bump when the asset's own logic changes what it writes (not for model changes: those are in
# the embedding versions, hashed into the code version below).
ASSET_LOGIC_VERSION = "1"
MAX_PARTITIONS_PER_RUN = 7
CHECK_NAME = "every_crop_embedded"


def embeddings_code_version(models: Sequence[str], weights: str | Mapping[str, str] = "auto",
                            pooling: str = "avg") -> str:
    """``emb-<12 hex>``: a hash of the resolved embedding versions of ``models``."""
    try:
        versions = {m: embedders.resolve_embedder(
            m, weights.get(m, "auto") if isinstance(weights, Mapping) else weights, pooling).version
            for m in models}
        payload = {"logic": ASSET_LOGIC_VERSION, "versions": versions}
    except Exception as exc:   # e.g. weights='imagenet' not cached: the run will say what to do
        payload = {"logic": ASSET_LOGIC_VERSION, "unresolved": [list(models), str(weights), pooling],
                   "error": type(exc).__name__}
    return "emb-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _failure_table(failures: list[tuple[str, str, str]], limit: int = 20) -> str:
    lines = ["| detection | model | reason |", "|---|---|---|"]
    for det, model, reason in failures[:limit]:
        lines.append(f"| {det} | {model} | {reason.replace('|', '/')} |")
    if len(failures) > limit:
        lines.append(f"| ... | | {len(failures) - limit} more |")
    return "\n".join(lines)


def embed_partitions(context, database: DeerDatabase, crop_store: CropStore,
                     inference: InferenceResource, partition_keys: Sequence, code_version: str):
    """The asset body: embed the missing vectors of every partition, return metadata and checks."""
    engine = database.engine()
    specs = inference.specs()
    versions = {m: s.version for m, s in specs.items()}
    for spec in specs.values():
        embedding_store.register_version(engine, spec)
    weights_used = [s.weights_used for s in specs.values()]
    for line in weights_used:
        context.log.info("weights used: %s", line)
    configured_code_version = embeddings_code_version(list(specs), inference.weights_by_model(), inference.pooling)
    if configured_code_version != code_version:
        context.log.warning(
            "the inference resource is configured for embedding versions %s, which is not what this "
            "asset's code_version (%s) was computed from (DEER_EMBEDDING_MODELS / "
            "DEER_EMBEDDING_WEIGHTS when the code location loaded); staleness will not reflect it",
            versions, code_version)
    store_dir = crop_store.settings().store_dir

    written = {m: embedding_store.WriteCounts() for m in specs}
    failures: list[tuple[str, str, str]] = []
    n_crops = n_embedded_crops = 0
    infer_seconds = 0.0
    run_engine = None
    for key in partition_keys:
        camera, day = split_key(key)
        crops = embedding_store.partition_crops(engine, camera, day)
        n_crops += len(crops)
        needed = {m: {c.detection_id for c in embedding_store.crops_to_embed(engine, camera, day, v)}
                  for m, v in versions.items()}
        models = [m for m in specs if needed[m]]
        todo = [c for c in crops if any(c.detection_id in needed[m] for m in models)]
        context.log.info("%s|%s: %d ok crops, to embed: %s", camera, day, len(crops),
                         {m: len(n) for m, n in needed.items()})
        if not todo:
            continue
        run_engine = inference.engine(models)
        t0 = time.perf_counter()
        for batch in run_engine.iter_embed(CropItem(c.detection_id, c.crop_path, store_dir) for c in todo):
            n_embedded_crops += len(batch.detection_ids) + len(batch.failures)
            for m in models:
                rows = [(d, vec, "ok", None) for d, vec in zip(batch.detection_ids, batch.vectors[m])
                        if d in needed[m]]
                rows += [(d, None, "failed", reason) for d, reason in batch.failures if d in needed[m]]
                written[m] = written[m] + embedding_store.write_embeddings(engine, versions[m], rows)
            failures += [(d, m, reason) for d, reason in batch.failures for m in models]
        infer_seconds += time.perf_counter() - t0

    summary = {m: {"crops": 0, "ok": 0, "failed": 0, "missing": 0} for m in specs}
    for key in partition_keys:
        camera, day = split_key(key)
        per_version = embedding_store.partition_embedding_counts(engine, camera, day, list(versions.values()))
        for m, v in versions.items():
            for k, n in per_version[v].items():
                summary[m][k] += int(n)

    data_version = hashlib.sha256(json.dumps(
        {"versions": versions, "summary": summary, "keys": sorted(str(k) for k in partition_keys)},
        sort_keys=True).encode()).hexdigest()[:16]
    new_vectors = sum(c.inserted for c in written.values())
    metadata = {
        "partitions": dg.MetadataValue.text(", ".join(str(k) for k in partition_keys)),
        "crops": dg.MetadataValue.int(n_crops),
        "crops_embedded_now": dg.MetadataValue.int(n_embedded_crops),
        "new_vectors": dg.MetadataValue.int(new_vectors),
        "retried_vectors": dg.MetadataValue.int(sum(c.updated for c in written.values())),
        "vectors_per_model": dg.MetadataValue.json(
            {m: {"version": versions[m], "written_now": written[m].inserted + written[m].updated,
                 **summary[m]} for m in specs}),
        "failures": dg.MetadataValue.int(len({d for d, _, _ in failures})),
        "crops_per_s": dg.MetadataValue.float(round(n_embedded_crops / infer_seconds, 2) if infer_seconds > 0 else 0.0),
        "embedding_versions": dg.MetadataValue.json(versions),
        "weights_used": dg.MetadataValue.text("weights used: " + " | ".join(weights_used)),
        "device": dg.MetadataValue.text(run_engine.device if run_engine else inference.device),
        "batch_size": dg.MetadataValue.int(inference.batch_size),
        "backbone_passes_per_crop": dg.MetadataValue.int(run_engine.n_backbone_passes if run_engine else 0),
        "config_matches_code_version": dg.MetadataValue.bool(configured_code_version == code_version),
    }
    if failures:
        metadata["failed_crops"] = dg.MetadataValue.md(_failure_table(failures))

    missing = sum(s["missing"] for s in summary.values())
    failed = sum(s["failed"] for s in summary.values())
    check = dg.AssetCheckResult(
        check_name=CHECK_NAME,
        passed=missing == 0 and failed == 0,
        severity=dg.AssetCheckSeverity.ERROR if missing else dg.AssetCheckSeverity.WARN,
        description=("every ok crop has a vector of every configured version" if not (missing or failed)
                     else f"{missing} crop/version pair(s) without any row, {failed} failed to embed"),
        metadata={"missing": dg.MetadataValue.int(missing), "failed": dg.MetadataValue.int(failed),
                  "per_model": dg.MetadataValue.json(summary)},
    )
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(data_version),
                                check_results=[check])


def build_embeddings_asset(models: Sequence[str] | None = None, weights: str | Mapping[str, str] | None = None,
                           pooling: str = "avg",
                           max_partitions_per_run: int = MAX_PARTITIONS_PER_RUN) -> dg.AssetsDefinition:
    """The ``embeddings`` asset for a model configuration (default: the environment's, the same
    the inference resource reads). Its code_version hashes the resolved embedding versions."""
    models = list(models or configured_models())
    weights = weights if weights is not None else configured_weights()
    code_version = embeddings_code_version(models, weights, pooling)
    with warnings.catch_warnings():   # backfill_policy is marked beta in Dagster 1.13
        warnings.simplefilter("ignore", dg.BetaWarning)
        return _define_embeddings_asset(models, weights, pooling, max_partitions_per_run, code_version)


def _define_embeddings_asset(models, weights, pooling, max_partitions_per_run, code_version):
    extra = {"retry_policy": STEP_RETRY_POLICY} if STEP_RETRY_POLICY is not None else {}

    @dg.asset(
        name="embeddings",
        partitions_def=camera_day_partitions,
        deps=["crops"],
        pool=GPU_POOL,
        op_tags=dict(GPU_STEP_TAGS),
        group_name="identification",
        code_version=code_version,
        backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=max_partitions_per_run),
        kinds={"pytorch", "postgres"},
        check_specs=[dg.AssetCheckSpec(CHECK_NAME, asset="embeddings",
                                       description="every ok crop of the partition has a vector "
                                                   "of every configured embedding version")],
        description=("One L2-normalised 512-d vector per ok crop and model, keyed by detection and "
                     f"embedding version (models: {', '.join(models)}; weights: {weights}; "
                     f"pooling: {pooling})."),
        **extra,
    )
    def embeddings(context: dg.AssetExecutionContext, database: DeerDatabase, crop_store: CropStore,
                   inference: InferenceResource) -> dg.MaterializeResult:
        return embed_partitions(context, database, crop_store, inference, context.partition_keys,
                                code_version)

    return embeddings


embeddings = build_embeddings_asset()
