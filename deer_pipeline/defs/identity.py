"""Identity assets: ``deer_profiles`` (match-or-create per camera x day) and
``similarity_scores`` (what the decisions looked at). Thin over ``deer_pipeline.matching``.

Decisions are made in capture-time order and never concurrently: the asset runs in the Dagster
pool ``identity`` (limit 1, set by the operator: ``dagster instance concurrency set identity 1``)
AND ``matching.decide_partition`` holds a PostgreSQL advisory lock for the whole decision, so
parallel backfills (other code locations, manual runs) cannot create duplicate deer.
"""


import os
from typing import Optional

import dagster as dg
from pydantic import Field, model_validator
from sqlalchemy.engine import Engine

from deer_pipeline import identity_store, matching, metrics, threshold_report
from deer_pipeline.defs.partitions import camera_and_day, camera_day_partitions
from deer_pipeline.defs.resources import DeerDatabase
from deer_pipeline.settings import MatchingSettings, SettingsError, check_threshold

try:  # the pool name is shared with the executors area
    from deer_pipeline.defs.executors import IDENTITY_POOL
except ImportError:  # pragma: no cover
    IDENTITY_POOL = "identity"

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
            from deer_pipeline import embedders

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


def _summary_markdown(s: matching.DecisionSummary) -> str:
    rows = [("sightings decided", s.decided), ("matched to a known deer", s.matched),
            ("new deer", s.new_deer), ("unassigned (no embedding)", s.unassigned),
            ("assignment rate", f"{s.assignment_rate:.3f}"),
            ("threshold", f"{s.threshold:.3f}" + (f" (by sex: {s.thresholds_by_sex})" if s.thresholds_by_sex else "")),
            ("best score seen", "-" if s.max_similarity is None else f"{s.max_similarity:.3f}"),
            ("replayed sightings (later partitions)", s.replayed), ("search", s.search),
            ("gallery (stored sightings)", s.gallery_size), ("deer in total", s.deer_total),
            ("embedding version", f"`{s.embedding_version}`")]
    out = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    if s.unassigned_reasons:
        out += ["", "| unassigned because | detections |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in sorted(s.unassigned_reasons.items())]
    return "\n".join(out)


@dg.asset(
    partitions_def=camera_day_partitions,
    pool=IDENTITY_POOL,
    deps=["embeddings"],
    # one partition per run: each decision is its own transaction under the identity lock
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=1),
    group_name="identification",
    kinds={"postgres"},
    description="Which deer each sighting of the camera x day is: joins a known deer when its best "
                "ensemble similarity reaches the threshold, else founds a new deer. Decided in capture-time "
                "order under the identity lock; later decisions are replayed so that the grouping does not "
                "depend on the order partitions run in.",
)
def deer_profiles(context: dg.AssetExecutionContext, database: DeerDatabase,
                  identity: IdentitySettings) -> dg.MaterializeResult:
    camera, day = camera_and_day(context)
    engine = database.engine()
    summary = matching.decide_partition(engine, camera, day, identity.matching_settings(), identity.versions())
    if summary.unassigned:
        context.log.warning(f"{summary.unassigned} detection(s) of {summary.partition_key} have no embedding "
                            f"and stay unassigned: {summary.unassigned_reasons}")
    if summary.replayed:
        context.log.info(f"replayed {summary.replayed} later sighting(s) of {summary.replayed_partitions}")
    return dg.MaterializeResult(metadata={
        "sightings_decided": dg.MetadataValue.int(summary.decided),
        "matched": dg.MetadataValue.int(summary.matched),
        "new_deer": dg.MetadataValue.int(summary.new_deer),
        "unassigned": dg.MetadataValue.int(summary.unassigned),
        "unassigned_reasons": dg.MetadataValue.json(summary.unassigned_reasons),
        "assignment_rate": dg.MetadataValue.float(float(summary.assignment_rate)),
        "threshold": dg.MetadataValue.float(float(summary.threshold)),
        "max_similarity": dg.MetadataValue.float(float(summary.max_similarity or 0.0)),
        "embedding_version": dg.MetadataValue.text(summary.embedding_version),
        "embedding_components": dg.MetadataValue.json(summary.components),
        "deer_total": dg.MetadataValue.int(summary.deer_total),
        "replayed": dg.MetadataValue.int(summary.replayed),
        "search": dg.MetadataValue.text(summary.search),
        "seconds": dg.MetadataValue.float(round(summary.seconds, 3)),
        "phase_seconds": dg.MetadataValue.json(summary.phase_seconds),
        "summary": dg.MetadataValue.md(_summary_markdown(summary)),
    })


@dg.asset(
    partitions_def=camera_day_partitions,
    deps=[deer_profiles],
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=1),
    group_name="identification",
    kinds={"postgres"},
    description="Every score the partition's decisions looked at (one row per sighting x candidate deer in "
                "the similarity_scores table, written by the decision itself); this asset summarises them.",
)
def similarity_scores(context: dg.AssetExecutionContext, database: DeerDatabase,
                      identity: IdentitySettings) -> dg.MaterializeResult:
    camera, day = camera_and_day(context)
    key = identity_store.partition_key_text(camera, day)
    with database.engine().connect() as conn:
        scores = identity_store.partition_scores(conn, key)
    best = threshold_report.best_scores(scores)
    summary = metrics.score_summary(scores["similarity"]) if len(scores) else {"count": 0}
    thresholds = metrics.default_thresholds()
    table = threshold_report.would_match_table(best["similarity"] if len(best) else [], thresholds)
    buckets = metrics.bucket_counts(scores["similarity"] if len(scores) else [])
    md = ["| threshold | would match | would be new |", "|---|---|---|"]
    md += [f"| {r['threshold']:.2f}{' (in use)' if abs(r['threshold'] - identity.reid_threshold) < 1e-9 else ''} "
           f"| {r['would_match']} | {r['would_be_new']} |" for r in table]
    md += ["", "| score bucket | rows |", "|---|---|"] + [f"| {b['bucket']} | {b['count']} |" for b in buckets]
    meta = {"rows": dg.MetadataValue.int(int(len(scores))),
            "sightings_with_candidates": dg.MetadataValue.int(int(len(best))),
            "summary": dg.MetadataValue.json(summary),
            "buckets": dg.MetadataValue.json({b["bucket"]: b["count"] for b in buckets}),
            "would_match": dg.MetadataValue.md("\n".join(md))}
    for k in ("max", "q50", "q95"):
        if k in summary:
            meta[f"similarity_{k}"] = dg.MetadataValue.float(float(summary[k]))
    return dg.MaterializeResult(metadata=meta)
