"""Every Dagster resource of the pipeline: the store, the crop store, the inference resource
(models, weights, device) and the identity settings (matching and the bounds of its checks)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import dagster as dg
from pydantic import Field, model_validator

from deer_pipeline import settings
from deer_pipeline.lazy_modules import lazy
from deer_pipeline.settings import MatchingSettings, SettingsError, check_threshold

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

db = lazy("deer_pipeline.db")
embedding_config = lazy("deer_pipeline.embedding.config")
embedders = lazy("deer_pipeline.embedding.models")
identity_store = lazy("deer_pipeline.identity.store")


class DeerDatabase(dg.ConfigurableResource):
    """PostgreSQL + pgvector. ``url`` (or DEER_DATABASE_URL) picks a server; when neither is set
    the embedded server in DEER_DATA_DIR (default .deer/) is started and reused."""

    url: Optional[str] = Field(default=None, description="postgresql:// URL; None = env or embedded")

    def engine(self) -> Engine:
        return db.get_engine(db._sqlalchemy_url(self.url) if self.url else None)


class CropStore(dg.ConfigurableResource):
    """Where crops are written (content-addressed) and the crop rules."""

    root: Optional[str] = Field(default=None, description="directory; None = DEER_CROP_STORE or <data dir>/crops")
    min_crop_px: int = settings.MIN_CROP_PX
    pad_fraction: float = settings.PAD_FRACTION

    def settings(self):
        from deer_pipeline.settings import CropSettings

        kwargs = {"min_crop_px": self.min_crop_px, "pad_fraction": self.pad_fraction}
        if self.root:
            kwargs["store_dir"] = self.root
        return CropSettings(**kwargs)


class InferenceResource(dg.ConfigurableResource):
    """Models, weights and device for embedding crops: the Dagster face of the one embedding
    configuration (``settings.EmbeddingSettings``, resolved in ``embedding.config``)."""

    models: list[str] = Field(default=list(settings.EMBEDDING_MODELS),
                              description="models to embed with; default = the ensemble's components")
    weights: str = Field(default=settings.EMBEDDING_WEIGHTS, description="auto | imagenet | path to a "
                         "state-dict file (auto: ImageNet when cached, else the offline EfficientNet-Lite0 substitutes)")
    weights_files: dict[str, str] = Field(default={}, description="model -> state-dict file, overrides `weights`")
    device: str = Field(default=settings.DEVICE, description="auto | cpu | cuda | cuda:N")
    gpu_index: Optional[int] = Field(default=None, description="pin the run to GPU N (device cuda:N)")
    batch_size: int = Field(default=settings.BATCH_SIZE, description="crops per forward pass (halved on CUDA OOM)")
    amp: bool = Field(default=settings.AMP, description="float16 autocast on CUDA")
    channels_last: bool = settings.CHANNELS_LAST
    num_workers: Optional[int] = Field(default=None, description="DataLoader decode workers; None = auto")
    pooling: str = Field(default=settings.POOLING, description="avg | gem (GeM, p=3) | centre (centred Gaussian weight, sigma 0.4); part of the version")
    zooms: list[float] = Field(default=list(settings.CROP_ZOOMS), description="the crop (1) and centred "
                               "zooms into it (fractions of its width and height), embedded and averaged; part of the version")
    backend: str = Field(default=settings.BACKEND, description="auto | eager | onnxruntime (auto: ONNX "
                         "Runtime when there is no GPU); part of the version")

    def embedding_settings(self) -> settings.EmbeddingSettings:
        """The one embedding configuration this resource stands for."""
        return embedding_config.check_models(settings.EmbeddingSettings(
            models=tuple(self.models), weights=self.weights, weights_files=tuple(self.weights_files.items()),
            pooling=self.pooling, zooms=tuple(self.zooms), device=self.device, gpu_index=self.gpu_index,
            batch_size=self.batch_size,
            amp=self.amp, channels_last=self.channels_last, num_workers=self.num_workers,
            backend=self.backend))

    def engine(self, models: Optional[list[str]] = None):
        """An engine for ``models`` (default: all configured). Networks are cached per process."""
        return embedding_config.engine(self.embedding_settings(), models)

    def specs(self) -> dict[str, embedders.EmbedderSpec]:
        """model -> resolved spec (version, weights used) without building any network."""
        return embedding_config.specs(self.embedding_settings())


def inference_resource_from_env() -> InferenceResource:
    """The resource as this deployment's environment configures it (``settings.EmbeddingSettings.
    from_environment``; ``dg.EnvVar`` for the scalar settings that are set, so the UI shows where
    a value came from)."""
    config = embedding_config.check_models(settings.EmbeddingSettings.from_environment())
    kwargs: dict = {"models": list(config.models), "amp": config.amp, "zooms": list(config.zooms)}
    for field_name, var, is_int in (("weights", "DEER_EMBEDDING_WEIGHTS", False),
                                    ("backend", "DEER_INFERENCE_BACKEND", False),
                                    ("device", "DEER_DEVICE", False),
                                    ("gpu_index", "DEER_GPU_INDEX", True),
                                    ("batch_size", "DEER_BATCH_SIZE", True),
                                    ("num_workers", "DEER_NUM_WORKERS", True)):
        if settings.env(var) is not None:
            kwargs[field_name] = dg.EnvVar.int(var) if is_int else dg.EnvVar(var)
    return InferenceResource(**kwargs)


VERSION_SOURCES = ("embedders", "latest")


class IdentitySettings(dg.ConfigurableResource):
    """How sightings are matched to deer (mirrors ``settings.MatchingSettings``), which embedding
    versions are used, and the bounds of the identity checks. Invalid values are rejected when
    the resource is built, with a message naming the setting."""

    reid_threshold: float = Field(default=settings.REID_THRESHOLD, description="ensemble similarity needed to join a known deer")
    thresholds_by_sex: dict[str, float] = Field(default={}, description="per-sex thresholds (female/male/unknown)")
    ensemble_weights: dict[str, float] = Field(
        default=dict(settings.ENSEMBLE_WEIGHTS), description="model -> weight, summing to 1")
    sex_filter: bool = Field(default=settings.SEX_FILTER, description="a female sighting never joins a male deer (and back)")
    candidate_deer: int = Field(default=settings.CANDIDATE_DEER, description="candidate deer re-scored and recorded per sighting")
    search: str = Field(default=settings.SEARCH, description="auto | exact | two_stage | hnsw (auto: exact below "
                        "exact_search_max_gallery stored sightings, two_stage above)")
    hnsw_ef_search: int = Field(default=settings.HNSW_EF_SEARCH, description="initial hnsw.ef_search (doubled when filters starve it)")
    exact_search_max_gallery: int = Field(default=settings.EXACT_SEARCH_MAX_GALLERY, description="auto: exact below this many sightings")
    profile_candidate_deer: int = Field(default=settings.PROFILE_CANDIDATE_DEER,
                                        description="two_stage: deer ranked best by profile vector, then re-scored exactly")
    coarse_precision: str = Field(default=settings.COARSE_PRECISION,
                                  description="auto | float32 | bfloat16: the pass that ranks deer (auto: bfloat16 "
                                              "from 5,000 gallery rows on CPUs with bfloat16 units; scores stay float64)")
    gallery_cache: bool = Field(default=settings.GALLERY_CACHE,
                                description="keep the gallery in memory across the decisions of a process "
                                            "(a generation counter in the store makes a stale copy reload)")
    match_score: str = Field(default=settings.MATCH_SCORE, description="cosine | local (local-feature inliers) | "
                             "fused (mean of calibrated probabilities; the threshold is a probability)")
    verify_top_k: int = Field(default=settings.VERIFY_TOP_K, description="candidate sightings verified per sighting")
    encounter_pooling: str = Field(default=settings.ENCOUNTER_POOLING, description="max | topN: encounter vs deer score")
    flank_aware: bool = Field(default=settings.FLANK_AWARE, description="known opposite flanks are not compared")
    calibration_version: Optional[str] = Field(default=None, description="fused: stored calibration (None: newest)")
    embedding_versions: Optional[dict[str, str]] = Field(
        default=None, description="model -> embedding version; None = ask `version_source`")
    version_source: str = Field(
        default="embedders", description="embedders: the versions the embedding configuration (the "
        "inference resource) writes; latest: newest stored version")
    # checks
    assignment_rate_min: float = Field(default=settings.ASSIGNMENT_RATE_MIN, description="WARN below this share of sightings matched")
    assignment_rate_max: float = Field(default=settings.ASSIGNMENT_RATE_MAX, description="WARN above this share of sightings matched")
    min_sightings_for_rate: int = Field(default=settings.MIN_SIGHTINGS_FOR_RATE, description="rate checks need at least this many sightings")
    zero_match_min_sightings: int = Field(default=settings.ZERO_MATCH_MIN_SIGHTINGS, description="zero-match check needs this many sightings")
    new_deer_spike_factor: float = Field(default=settings.NEW_DEER_SPIKE_FACTOR, description="WARN when the new-deer rate exceeds "
                                         "this multiple of the trailing average")
    check_window_days: int = Field(default=settings.CHECK_WINDOW_DAYS, description="trailing window of the rate checks")
    norm_tolerance: float = Field(default=settings.NORM_TOLERANCE, description="|norm - 1| allowed for stored vectors")
    merge_candidates_limit: int = Field(default=settings.MERGE_CANDIDATES_LIMIT, description="merge candidates listed at most")
    review_margin: float = Field(default=settings.REVIEW_MARGIN, description="review queue: decisions whose "
                                 "score lies this close to the threshold")
    review_queue_max_items: int = Field(default=settings.REVIEW_QUEUE_MAX_ITEMS,
                                        description="WARN when more items wait in the review queue")
    review_queue_max_age_days: float = Field(default=settings.REVIEW_QUEUE_MAX_AGE_DAYS,
                                             description="WARN when a review item waits longer (days)")
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
            exact_search_max_gallery=self.exact_search_max_gallery, match_score=self.match_score,
            profile_candidate_deer=self.profile_candidate_deer, coarse_precision=self.coarse_precision,
            gallery_cache=self.gallery_cache,
            verify_top_k=self.verify_top_k, encounter_pooling=self.encounter_pooling, flank_aware=self.flank_aware,
            calibration_version=self.calibration_version)

    def versions(self, embedding: Optional[settings.EmbeddingSettings] = None) -> Optional[dict[str, str]]:
        """model -> embedding version to decide with; None = the newest stored (``latest``).

        ``embedders``: the versions the embedding configuration ``embedding`` (the inference
        resource's; default: the environment's) writes, i.e. what the embeddings asset writes.
        A failure to resolve is reported as a ``MatchingError`` that says what to set."""
        if self.embedding_versions:
            return dict(self.embedding_versions)
        if self.version_source == "latest":
            return None
        embedding = embedding or settings.EmbeddingSettings.from_environment()
        try:
            return embedding_config.versions(embedding, list(self.ensemble_weights))
        except Exception as exc:
            raise identity_store.MatchingError(
                f"could not resolve the embedding versions of {sorted(self.ensemble_weights)} "
                f"(weights={embedding.weights!r}, weights files={dict(embedding.weights_files)}, "
                f"pooling={embedding.pooling!r}): {exc}. Set identity.embedding_versions "
                "explicitly or identity.version_source='latest'") from exc

    def resolved_versions(self, engine: Engine, embedding: Optional[settings.EmbeddingSettings] = None) -> dict[str, str]:
        """The versions actually used, checked against the store (clear failure when missing)."""
        with engine.connect() as conn:
            return identity_store.resolve_versions(conn, self.ensemble_weights, self.versions(embedding))
