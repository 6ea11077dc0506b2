"""Identity assets: ``deer_profiles`` (match-or-create per camera x day) and
``similarity_scores`` (what the decisions looked at). Thin over ``deer_pipeline.identity.daily``
and ``matching``.

A run covers many partitions (one run per day of all cameras with work, from the sensor and the
schedule); its partitions are decided one day at a time in capture order, each day jointly
(``matching.decide_partitions``: one transaction, one replay). Metadata and check evaluations are
per partition. Decisions are never concurrent: the asset runs in the Dagster pool ``identity``
(limit 1, set by the operator: ``dagster instance concurrency set identity 1``) AND every
decision holds a PostgreSQL advisory lock, so parallel backfills (other code locations, manual
runs) cannot create duplicate deer.
"""

import time

import dagster as dg

from deer_pipeline.defs import checks
from deer_pipeline.defs.executors import IDENTITY_POOL
from deer_pipeline.defs.partitions import (
    camera_day_partitions,
    run_partitions,
    skipped_metadata,
    skipped_partitions,
)
from deer_pipeline.defs.resources import (
    DeerDatabase,
    IdentitySettings,
    InferenceResource,
)
from deer_pipeline.lazy_modules import lazy

db = lazy("deer_pipeline.db")
feed = lazy("deer_pipeline.detections.feed")
daily = lazy("deer_pipeline.identity.daily")
matching = lazy("deer_pipeline.identity.matching")
metrics = lazy("deer_pipeline.identity.metrics")
reviews = lazy("deer_pipeline.identity.reviews")
threshold_report = lazy("deer_pipeline.identity.threshold_report")
identity_store = lazy("deer_pipeline.identity.store")


def _summary_markdown(s: "matching.DecisionSummary") -> str:
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
    # a run covers many partitions (the sensor's and the schedule's: one run per day); each day is
    # decided jointly, in its own transaction under the identity lock, days in capture order
    backfill_policy=dg.BackfillPolicy.single_run(),
    group_name="identification",
    kinds={"postgres"},
    check_specs=checks.CHECK_SPECS,
    description="Which deer each sighting of the camera x day is: joins a known deer when its best "
                "ensemble similarity reaches the threshold, else founds a new deer. Decided in capture-time "
                "order under the identity lock, one day of all cameras at a time; later decisions are "
                "replayed so that the grouping does not depend on the order partitions run in.",
)
def deer_profiles(context: dg.AssetExecutionContext, database: DeerDatabase,
                  identity: IdentitySettings, inference: InferenceResource):
    engine = database.engine()
    settings, versions = identity.matching_settings(), identity.versions(inference.embedding_settings())
    partitions = run_partitions(context)
    todo = feed.partitions_with_work(engine, partitions, decided_too=True)
    # Each day is one transaction under the identity lock: a lost connection rolls the day back
    # whole (no half-decided partition) and it is decided again when the database is back.
    t0 = time.perf_counter()
    refused = None
    try:
        summaries = daily.decide_days(engine, todo, settings, versions, on_retry=context.log.warning)
    except daily.PartitionsRefused as e:   # the others are decided: record them, then fail the step
        summaries, refused = e.summaries, e
    seconds = time.perf_counter() - t0
    _log(context, summaries)
    with engine.connect() as conn:
        for summary in summaries:
            context.add_asset_metadata(_metadata(summary, reviews.human_confirmed(conn, summary.partition_key)),
                                       partition_key=summary.partition_key)
    skipped = skipped_partitions(context, todo, "no detections and no decisions")
    t0 = time.perf_counter()
    refused_keys = set() if refused is None else {k for k, _ in refused.refused}
    decided = [p for p in todo if identity_store.partition_key_text(*p) not in refused_keys]
    evaluations = checks.evaluate_partitions(context, engine, identity, decided)
    yield dg.MaterializeResult(metadata={
        "run_partitions_decided": dg.MetadataValue.int(len(summaries)),
        "run_days": dg.MetadataValue.int(len(daily.by_day(todo))),
        "run_seconds": dg.MetadataValue.float(round(seconds, 3)),
        "run_check_seconds": dg.MetadataValue.float(round(time.perf_counter() - t0, 3)),
        **skipped_metadata(skipped),
        # partitions refused (MatchingError, no deer created): materialised with the run's range
        # but not decided; the step fails after this, naming them
        **({"run_refused": dg.MetadataValue.json(dict(refused.refused))} if refused is not None else {}),
    })
    yield from checks.check_events(context, evaluations)
    if refused is not None:
        raise dg.Failure(description=str(refused), metadata={
            "refused_partitions": dg.MetadataValue.json(dict(refused.refused)),
            "decided_partitions": dg.MetadataValue.int(len(summaries))})


def _log(context, summaries: "list[matching.DecisionSummary]") -> None:
    """One log line for the step (each line is an event Dagster stores), not one per partition."""
    unassigned = [f"{s.partition_key}: {s.unassigned} {s.unassigned_reasons}" for s in summaries if s.unassigned]
    if unassigned:
        context.log.warning("detections without an embedding stay unassigned: " + "; ".join(unassigned))
    replays = {}   # a day's partitions share one replay
    for s in summaries:
        if s.replayed:
            replays[s.partition_key.split("|")[1]] = (s.replayed, s.replayed_partitions)
    if replays:
        context.log.info("replayed later sightings: " + "; ".join(
            f"deciding {day}: {n} of {parts}" for day, (n, parts) in sorted(replays.items())))


def _metadata(summary: "matching.DecisionSummary", confirmed: int) -> dict:
    return {
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
        # match_score local/fused: features computed vs cached, pairs verified, and why pairs had no
        # local score (no keypoints, degenerate fit, corrupt cache entry, unreadable crop)
        "local_verification": dg.MetadataValue.json(summary.local_verification),
        "summary": dg.MetadataValue.md(_summary_markdown(summary)),
        # people in the loop: decisions a review fixed now, and sightings people confirmed
        "review_decided": dg.MetadataValue.int(summary.reviewed),
        "review_excluded": dg.MetadataValue.int(summary.excluded_by_review),
        "human_confirmed": dg.MetadataValue.int(confirmed),
    }


@dg.asset(
    partitions_def=camera_day_partitions,
    deps=[deer_profiles],
    backfill_policy=dg.BackfillPolicy.single_run(),
    group_name="identification",
    kinds={"postgres"},
    description="Every score the partition's decisions looked at (one row per sighting x candidate deer in "
                "the similarity_scores table, written by the decision itself); this asset summarises them.",
)
def similarity_scores(context: dg.AssetExecutionContext, database: DeerDatabase,
                      identity: IdentitySettings) -> dg.MaterializeResult:
    partitions = run_partitions(context)
    engine = database.engine()
    todo = feed.partitions_with_work(engine, partitions, decided_too=True)
    rows = 0
    for camera, day in todo:
        key = identity_store.partition_key_text(camera, day)
        meta = _scores_metadata(context, engine, identity, key)
        rows += meta["rows"].value
        context.add_asset_metadata(meta, partition_key=key)
    skipped = skipped_partitions(context, todo, "no detections and no decisions")
    return dg.MaterializeResult(metadata={"run_rows": dg.MetadataValue.int(rows), **skipped_metadata(skipped)})


def _scores_metadata(context, engine, identity: IdentitySettings, key: str) -> dict:
    def read_scores():
        with engine.connect() as conn:
            return identity_store.partition_scores(conn, key)

    scores = db.retry_transient(read_scores, f"similarity scores {key}", on_retry=context.log.warning)
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
    return meta
