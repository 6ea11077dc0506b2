"""Which embedder the pipeline uses: ``deer-pipeline models register MODEL_DIR | NAME | default``.

Plain logic, no Dagster. Registering writes ``<data dir>/models/registered.json`` (temporary
file + rename), which ``settings.EmbeddingSettings.from_environment`` and
``settings.configured_ensemble_weights`` read: the registered model becomes the pipeline's only
embedding model and its matching score (unless ``DEER_EMBEDDING_MODELS`` says otherwise).

Versioning is the pipeline's usual one: the registered model's ``embedding_version`` changes
the ``embeddings`` asset's code version, so every materialised partition turns stale and a
backfill embeds the new version next to the old vectors; ``register default`` (or registering
the previous model again) switches back, and the old version's vectors are found in the store,
so nothing is re-embedded.

Before anything is written the model is checked completely: a trained model's card and weights
checksum, then its network is built and its weights loaded strictly (a downloaded backbone: its
cached file, checksum and architecture). Nothing half-written or broken is ever registered.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from deer_pipeline import settings
from deer_pipeline.embedding import models as embedders

DEFAULT = "default"


class RegistryError(ValueError):
    """A model that cannot be registered; the message says why."""


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".registered.", dir=str(path.parent))
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, path)


def check_loadable(spec: embedders.EmbedderSpec) -> None:
    """Build the network and run one blank crop through it (fails loudly, writes nothing)."""
    import torch

    from deer_pipeline.embedding import networks

    net = networks.load_backbone(spec.weights, spec.pooling, "cpu")
    with torch.inference_mode():
        v = networks.project(spec, net(torch.zeros((1, 3, embedders.INPUT_SIZE, embedders.INPUT_SIZE), dtype=torch.uint8)))
    if tuple(v.shape) != (1, embedders.EMBEDDING_DIM) or not torch.isfinite(v).all():
        raise RegistryError(f"{spec.model}: the network gives {tuple(v.shape)} vectors, not finite (1, 512)")


def register(target: str) -> dict:
    """Register a trained model folder, a downloaded backbone's name, or ``default``; returns
    ``{"model", "weights", "embedding_version", "previous"}`` (``model`` None for default)."""
    path = Path(settings.registered_embedder_file())
    previous = settings.registered_embedder()
    if target == DEFAULT:
        if path.exists():
            path.unlink()
        return {"model": None, "weights": None, "embedding_version": None, "previous": previous,
                "models": list(settings.EMBEDDING_MODELS)}
    from deer_pipeline.embedding import backbones

    if target in backbones.NAMES:
        model, weights = target, "auto"
    elif target == "trained":
        raise RegistryError("give the trained model's folder (written by `deer-pipeline train --out DIR`)")
    else:
        folder = Path(target).expanduser()
        if not folder.is_dir():
            raise RegistryError(f"{target!r} is neither a model folder, 'default', nor one of "
                                f"{', '.join(backbones.NAMES)}")
        model, weights = "trained", str(folder.resolve())
    try:
        spec = embedders.resolve_embedder(model, weights, zooms=settings.EmbeddingSettings.from_environment().zooms)
        check_loadable(spec)
    except (embedders.EmbedderError, embedders.WeightsUnavailable, ValueError) as exc:
        raise RegistryError(f"not registered: {exc}") from exc
    backbones.warn_licence(model) if model in backbones.NAMES else None
    entry = {"model": model, "weights": weights, "embedding_version": spec.version,
             "weights_sha256": spec.weights.sha256, "weights_path": spec.weights.path,
             "registered_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _write(path, entry)
    return {**entry, "previous": previous}


def show() -> dict:
    reg = settings.registered_embedder()
    config = settings.EmbeddingSettings.from_environment()
    return {"registered": reg, "registry_file": settings.registered_embedder_file(),
            "models": list(config.models), "ensemble_weights": settings.configured_ensemble_weights(),
            "overridden_by_DEER_EMBEDDING_MODELS": bool(reg) and settings.env("DEER_EMBEDDING_MODELS") is not None}
