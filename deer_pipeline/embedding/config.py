"""The one embedding configuration, resolved: which embedding versions a configuration writes,
the ``embeddings`` asset's code version, and an inference engine for it.

``settings.EmbeddingSettings`` holds the configuration (models, weights, per-model weights files,
pooling, crop zooms, device, batch size); every consumer resolves it here, so the inference resource, the
identity settings, the code version of the ``embeddings`` asset and the evaluation cannot
disagree (for example about a per-model weights file).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

from deer_pipeline.embedding import backends
from deer_pipeline.embedding import models as embedders
from deer_pipeline.settings import EmbeddingSettings

# Bump when the embeddings asset's own logic changes what it writes (not for model changes:
# those are in the embedding versions, hashed into the code version).
ASSET_LOGIC_VERSION = "1"


def check_models(config: EmbeddingSettings) -> EmbeddingSettings:
    """``config``, or :class:`embedders.UnknownModel` naming a model that does not exist."""
    for m in config.models:
        if m not in embedders.ALL_MODELS:
            raise embedders.UnknownModel(
                f"unknown embedding model {m!r} (DEER_EMBEDDING_MODELS / inference.models); "
                f"use {', '.join(embedders.ALL_MODELS)}")
    return config


def gpu_present() -> bool:
    """Does this machine show an NVIDIA GPU? (the driver's /proc entries; no torch import)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def resolve_backend(config: EmbeddingSettings) -> str:
    """The inference backend this configuration runs: ``auto`` is ``onnxruntime`` on a machine
    without a GPU (or with device cpu) when the package is installed, else ``eager``."""
    if config.backend != "auto":
        return config.backend
    on_cpu = config.device == "cpu" or (config.device == "auto" and not gpu_present())
    return "onnxruntime" if on_cpu and backends.onnxruntime_installed() else "eager"


def specs(config: EmbeddingSettings, models: Sequence[str] | None = None) -> dict[str, embedders.EmbedderSpec]:
    """model -> resolved spec (version, weights used) without building any network."""
    backend = resolve_backend(config)
    return {m: embedders.resolve_embedder(m, config.weights_for(m), pooling=config.pooling, backend=backend,
                                          zooms=config.zooms)
            for m in (models or config.models)}


def versions(config: EmbeddingSettings, models: Sequence[str] | None = None) -> dict[str, str]:
    """model -> the embedding version this configuration writes."""
    return {m: s.version for m, s in specs(config, models).items()}


def code_version(config: EmbeddingSettings) -> str:
    """``emb-<12 hex>``: a hash of the resolved embedding versions of the configured models."""
    try:
        payload = {"logic": ASSET_LOGIC_VERSION, "versions": versions(config)}
    except Exception as exc:   # e.g. weights='imagenet' not cached: the run will say what to do
        payload = {"logic": ASSET_LOGIC_VERSION, "error": type(exc).__name__,
                   "unresolved": [list(config.models), config.weights, list(config.weights_files),
                                  config.pooling, list(config.zooms)]}
    return "emb-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def engine(config: EmbeddingSettings, models: Sequence[str] | None = None):
    """An inference engine for ``models`` (default: all configured). Networks are cached per process."""
    from deer_pipeline.embedding.inference import InferenceEngine

    models = list(models or config.models)
    return InferenceEngine(
        models, weights={m: config.weights_for(m) for m in models}, device=config.device,
        gpu_index=config.gpu_index, batch_size=config.batch_size, amp=config.amp,
        channels_last=config.channels_last, num_workers=config.num_workers, pooling=config.pooling,
        backend=resolve_backend(config), zooms=config.zooms)
