"""Embedding camera x day partitions: every ok crop gets one vector per configured model,
written idempotently next to other versions (plain logic; the ``embeddings`` asset is thin
over :func:`embed_partitions`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

from sqlalchemy.engine import Engine

from deer_pipeline.embedding import config as embedding_config
from deer_pipeline.embedding import store as embedding_store
from deer_pipeline.embedding.inference import CropItem
from deer_pipeline.ops.progress import ProgressLog
from deer_pipeline.settings import EmbeddingSettings, progress_log_every

log = logging.getLogger(__name__)


@dataclass
class EmbeddingRun:
    """What one embedding run did, per model and in total."""

    versions: dict[str, str]
    weights_used: list[str]
    written: dict[str, embedding_store.WriteCounts]
    failures: list[tuple[str, str, str]] = field(default_factory=list)   # (detection, model, reason)
    crops: int = 0                   # ok crops of the partitions
    crops_embedded_now: int = 0
    infer_seconds: float = 0.0
    device: str | None = None
    backbone_passes_per_crop: int = 0
    summary: dict[str, dict[str, int]] = field(default_factory=dict)   # model -> ok/failed/missing

    @property
    def new_vectors(self) -> int:
        return sum(c.inserted for c in self.written.values())

    @property
    def crops_per_s(self) -> float:
        return round(self.crops_embedded_now / self.infer_seconds, 2) if self.infer_seconds > 0 else 0.0

    @property
    def missing(self) -> int:
        return sum(s["missing"] for s in self.summary.values())

    @property
    def failed(self) -> int:
        return sum(s["failed"] for s in self.summary.values())


def embed_partitions(engine: Engine, config: EmbeddingSettings, store_dir: str,
                     partitions: Sequence[tuple[str, str]], progress_log=None) -> EmbeddingRun:
    """Embed the missing vectors of every (camera, day) partition with ``config``'s models.
    ``progress_log`` (e.g. the asset's logger) gets crops done, rate and ETA every few batches."""
    run = _start_run(engine, config)
    for camera, day in partitions:
        _embed_partition(engine, config, store_dir, camera, day, run, progress_log)
    run.summary = _partition_counts(engine, partitions, run.versions)
    return run


def _start_run(engine: Engine, config: EmbeddingSettings) -> EmbeddingRun:
    """Resolve and register the versions this configuration writes."""
    specs = embedding_config.specs(config)
    for spec in specs.values():
        embedding_store.register_version(engine, spec)
    run = EmbeddingRun(versions={m: s.version for m, s in specs.items()},
                       weights_used=[s.weights_used for s in specs.values()],
                       written={m: embedding_store.WriteCounts() for m in specs}, device=config.device)
    return run


def _embed_partition(engine: Engine, config: EmbeddingSettings, store_dir: str, camera: str, day: str,
                     run: EmbeddingRun, progress_log=None) -> None:
    crops = embedding_store.partition_crops(engine, camera, day)
    run.crops += len(crops)
    needed = {m: {c.detection_id for c in embedding_store.crops_to_embed(engine, camera, day, v)}
              for m, v in run.versions.items()}
    models = [m for m in run.versions if needed[m]]
    todo = [c for c in crops if any(c.detection_id in needed[m] for m in models)]
    log.info("%s|%s: %d ok crops, to embed: %s", camera, day, len(crops), {m: len(n) for m, n in needed.items()})
    if not todo:
        return
    engine_ = embedding_config.engine(config, models)
    run.device, run.backbone_passes_per_crop = engine_.device, engine_.n_backbone_passes
    t0 = time.perf_counter()
    plog = ProgressLog(progress_log or log.info, len(todo), f"embeddings {camera}|{day}: crops",
                       every=progress_log_every())
    for batch in engine_.iter_embed(CropItem(c.detection_id, c.crop_path, store_dir) for c in todo):
        run.crops_embedded_now += len(batch.detection_ids) + len(batch.failures)
        for m in models:
            rows = [(d, vec, "ok", None) for d, vec in zip(batch.detection_ids, batch.vectors[m])
                    if d in needed[m]]
            rows += [(d, None, "failed", reason) for d, reason in batch.failures if d in needed[m]]
            run.written[m] = run.written[m] + embedding_store.write_embeddings(engine, run.versions[m], rows)
        run.failures += [(d, m, reason) for d, reason in batch.failures for m in models]
        plog.batch_done(len(batch.detection_ids) + len(batch.failures))
    run.infer_seconds += time.perf_counter() - t0


def _partition_counts(engine: Engine, partitions, versions: dict[str, str]) -> dict[str, dict[str, int]]:
    """model -> crops / ok / failed / missing over the partitions (what the check reads)."""
    summary = {m: {"crops": 0, "ok": 0, "failed": 0, "missing": 0} for m in versions}
    for camera, day in partitions:
        per_version = embedding_store.partition_embedding_counts(engine, camera, day, list(versions.values()))
        for m, v in versions.items():
            for k, n in per_version[v].items():
                summary[m][k] += int(n)
    return summary
