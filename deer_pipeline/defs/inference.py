"""The inference resource: which models embed crops, with which weights, on which device.

Environment overrides (read when the code location loads; see :func:`inference_resource_from_env`):
``DEER_EMBEDDING_MODELS`` (comma list, default ``multiscale,efficientnet_b0``),
``DEER_EMBEDDING_WEIGHTS`` (``auto`` | ``imagenet`` | path), ``DEER_DEVICE`` (``auto`` | ``cpu`` |
``cuda:N``), ``DEER_GPU_INDEX``, ``DEER_BATCH_SIZE``, ``DEER_NUM_WORKERS``, ``DEER_AMP`` (0/1).
"""

from __future__ import annotations

import os
from typing import Optional

import dagster as dg
from pydantic import Field

from deer_pipeline import embedders
from deer_pipeline.inference import DEFAULT_MODELS, InferenceEngine


def configured_models() -> list[str]:
    raw = os.environ.get("DEER_EMBEDDING_MODELS", "").strip()
    models = [m.strip() for m in raw.split(",") if m.strip()] if raw else list(DEFAULT_MODELS)
    for m in models:
        if m not in embedders.MODELS:
            raise embedders.UnknownModel(
                f"DEER_EMBEDDING_MODELS names unknown model {m!r}; use {', '.join(embedders.MODELS)}")
    return models


def configured_weights() -> str:
    return os.environ.get("DEER_EMBEDDING_WEIGHTS", "").strip() or "auto"


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 0 or 1, got {raw!r}")


class InferenceResource(dg.ConfigurableResource):
    """Models, weights and device for embedding crops (see ``deer_pipeline.inference``)."""

    models: list[str] = Field(default=list(DEFAULT_MODELS),
                              description="models to embed with; default = the ensemble's components")
    weights: str = Field(default="auto", description="auto | imagenet | path to a state-dict file "
                         "(auto: ImageNet when cached, else the offline EfficientNet-Lite0 substitutes)")
    weights_files: dict[str, str] = Field(default={}, description="model -> state-dict file, overrides `weights`")
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    gpu_index: Optional[int] = Field(default=None, description="pin the run to GPU N (device cuda:N)")
    batch_size: int = Field(default=32, description="crops per forward pass (halved on CUDA OOM)")
    amp: bool = Field(default=True, description="float16 autocast on CUDA")
    channels_last: bool = True
    num_workers: Optional[int] = Field(default=None, description="DataLoader decode workers; None = auto")
    pooling: str = Field(default="avg", description="avg | gem (GeM, p=3); part of the version")

    def weights_by_model(self) -> dict[str, str]:
        return {m: self.weights_files.get(m, self.weights) for m in self.models}

    def engine(self, models: Optional[list[str]] = None) -> InferenceEngine:
        """An engine for ``models`` (default: all configured). Networks are cached per process."""
        models = list(models or self.models)
        return InferenceEngine(
            models, weights={m: self.weights_files.get(m, self.weights) for m in models},
            device=self.device, gpu_index=self.gpu_index, batch_size=self.batch_size, amp=self.amp,
            channels_last=self.channels_last, num_workers=self.num_workers, pooling=self.pooling)

    def specs(self) -> dict[str, embedders.EmbedderSpec]:
        """model -> resolved spec (version, weights used) without building any network."""
        weights = self.weights_by_model()
        return {m: embedders.resolve_embedder(m, weights[m], pooling=self.pooling) for m in self.models}


def inference_resource_from_env() -> InferenceResource:
    """The resource as this deployment's environment configures it (``dg.EnvVar`` for scalar
    settings, so the UI shows where a value came from)."""
    kwargs: dict = {"models": configured_models(), "amp": _env_bool("DEER_AMP", True)}
    for field_name, var, is_int in (("weights", "DEER_EMBEDDING_WEIGHTS", False),
                                    ("device", "DEER_DEVICE", False),
                                    ("gpu_index", "DEER_GPU_INDEX", True),
                                    ("batch_size", "DEER_BATCH_SIZE", True),
                                    ("num_workers", "DEER_NUM_WORKERS", True)):
        if os.environ.get(var, "").strip():
            kwargs[field_name] = dg.EnvVar.int(var) if is_int else dg.EnvVar(var)
    return InferenceResource(**kwargs)
