"""Every Dagster resource of the pipeline: the store, the crop store, the inference resource
(models, weights, device) and the identity settings (matching and the bounds of its checks)."""

from __future__ import annotations

import os
from typing import Optional

import dagster as dg
from pydantic import Field, model_validator
from sqlalchemy.engine import Engine

from deer_pipeline import db
from deer_pipeline.embedding import models as embedders
from deer_pipeline.embedding.inference import DEFAULT_MODELS, InferenceEngine
from deer_pipeline.identity import store as identity_store
from deer_pipeline.settings import MatchingSettings, SettingsError, check_threshold


class DeerDatabase(dg.ConfigurableResource):
    """PostgreSQL + pgvector. ``url`` (or DEER_DATABASE_URL) picks a server; when neither is set
    the embedded server in DEER_DATA_DIR (default .deer/) is started and reused."""

    url: Optional[str] = Field(default=None, description="postgresql:// URL; None = env or embedded")

    def engine(self) -> Engine:
        return db.get_engine(db._sqlalchemy_url(self.url) if self.url else None)


class CropStore(dg.ConfigurableResource):
    """Where crops are written (content-addressed) and the crop rules."""

    root: Optional[str] = Field(default=None, description="directory; None = DEER_CROP_STORE or <data dir>/crops")
    min_crop_px: int = 50
    pad_fraction: float = 0.05

    def settings(self):
        from deer_pipeline.settings import CropSettings

        kwargs = {"min_crop_px": self.min_crop_px, "pad_fraction": self.pad_fraction}
        if self.root:
            kwargs["store_dir"] = self.root
        return CropSettings(**kwargs)


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
    """Models, weights and device for embedding crops (see ``deer_pipeline.embedding.inference``)."""

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


VERSION_SOURCES = ("embedders", "latest")


class IdentitySettings(dg.ConfigurableResource):
    """How sightings are matched to deer (mirrors ``settings.MatchingSettings``), which embedding
    versions are used, and the bounds of the identity checks. Invalid values are rejected when
    the resource is built, with a message naming the setting."""

    reid_threshold: float = Field(default=0.60, description="ensemble similarity needed to join a known deer")
    thresholds_by_sex: dict[str, float] = Field(default={}, description="per-sex thresholds (female/male/unknown)")
    ensemble_weights: dict[str, float] = Field(
        default={"multiscale": 0.6, "efficientnet_b0": 0.4}, description="model -> weight, summing to 1")
    sex_filter: bool = Field(default=True, description="a female sighting never joins a male deer (and back)")
    candidate_deer: int = Field(default=20, description="candidate deer re-scored and recorded per sighting")
    search: str = Field(default="auto", description="auto | exact | hnsw")
    hnsw_ef_search: int = Field(default=200, description="initial hnsw.ef_search (doubled when filters starve it)")
    exact_search_max_gallery: int = Field(default=200_000, description="auto: exact below this many sightings")
    embedding_versions: Optional[dict[str, str]] = Field(
        default=None, description="model -> embedding version; None = ask `version_source`")
    version_source: str = Field(
        default="embedders", description="embedders: the versions the embedding code resolves now for "
        "`embedding_weights`/`pooling` (what the embeddings asset writes); latest: newest stored version")
    embedding_weights: Optional[str] = Field(
        default=None, description="weights for version_source=embedders; None = DEER_EMBEDDING_WEIGHTS or auto")
    pooling: str = Field(default="avg", description="pooling for version_source=embedders")
    # checks
    assignment_rate_min: float = Field(default=0.05, description="WARN below this share of sightings matched")
    assignment_rate_max: float = Field(default=0.98, description="WARN above this share of sightings matched")
    min_sightings_for_rate: int = Field(default=10, description="rate checks need at least this many sightings")
    zero_match_min_sightings: int = Field(default=5, description="zero-match check needs this many sightings")
    new_deer_spike_factor: float = Field(default=2.0, description="WARN when the new-deer rate exceeds "
                                         "this multiple of the trailing average")
    check_window_days: int = Field(default=7, description="trailing window of the rate checks")
    norm_tolerance: float = Field(default=1e-3, description="|norm - 1| allowed for stored vectors")
    merge_candidates_limit: int = Field(default=50, description="merge candidates listed at most")
    report_min_precision: Optional[float] = Field(
        default=None, description="threshold report: recommend the lowest threshold with this precision")

    @model_validator(mode="after")
    def _validate(self):
        self.matching_settings()          # raises SettingsError naming the setting
        if self.version_source not in VERSION_SOURCES:
            raise SettingsError(f"version_source must be one of {VERSION_SOURCES}, not {self.version_source!r}")
        if self.embedding_versions is not None:
            missing = [m for m in self.ensemble_weights if m not in self.embedding_versions]
            if missing:
                raise SettingsError(f"embedding_versions names no version for ensemble model(s) {missing}")
        for name in ("assignment_rate_min", "assignment_rate_max"):
            check_threshold(name, getattr(self, name))
        if self.assignment_rate_min > self.assignment_rate_max:
            raise SettingsError("assignment_rate_min must not exceed assignment_rate_max")
        if self.report_min_precision is not None:
            check_threshold("report_min_precision", self.report_min_precision)
        if self.new_deer_spike_factor <= 1:
            raise SettingsError(f"new_deer_spike_factor must be > 1, got {self.new_deer_spike_factor!r}")
        if self.check_window_days < 1:
            raise SettingsError("check_window_days must be at least 1")
        return self

    def matching_settings(self) -> MatchingSettings:
        return MatchingSettings(
            reid_threshold=self.reid_threshold, thresholds_by_sex=dict(self.thresholds_by_sex),
            ensemble_weights=dict(self.ensemble_weights), sex_filter=self.sex_filter,
            candidate_deer=self.candidate_deer, search=self.search, hnsw_ef_search=self.hnsw_ef_search,
            exact_search_max_gallery=self.exact_search_max_gallery)

    def versions(self) -> Optional[dict[str, str]]:
        """model -> embedding version to decide with; None = the newest stored (``latest``).

        ``embedders``: the versions the embedding code resolves for the configured weights and
        pooling, i.e. what the embeddings asset writes in this deployment. A failure to resolve
        is reported as a ``MatchingError`` that says what to set."""
        if self.embedding_versions:
            return dict(self.embedding_versions)
        if self.version_source == "latest":
            return None
        weights = self.embedding_weights or os.environ.get("DEER_EMBEDDING_WEIGHTS", "").strip() or "auto"
        try:
            from deer_pipeline.embedding import models as embedders

            return {m: embedders.resolve_embedder(m, weights, pooling=self.pooling).version
                    for m in self.ensemble_weights}
        except Exception as exc:
            raise identity_store.MatchingError(
                f"could not resolve the embedding versions of {sorted(self.ensemble_weights)} "
                f"(weights={weights!r}, pooling={self.pooling!r}): {exc}. Set identity.embedding_versions "
                "explicitly or identity.version_source='latest'") from exc

    def resolved_versions(self, engine: Engine) -> dict[str, str]:
        """The versions actually used, checked against the store (clear failure when missing)."""
        with engine.connect() as conn:
            return identity_store.resolve_versions(conn, self.ensemble_weights, self.versions())
