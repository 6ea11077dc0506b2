"""Asset checks on ``deer_profiles``, one evaluation per camera x day partition. Thin over the
health checks in ``deer_pipeline.identity.store``; every result is also recorded in the
``check_results`` table (which the alert sensor in ``defs/alerts.py`` reads).

* ``assignment_rate_in_bounds`` (WARN): partition and trailing-window assignment rate.
* ``matches_happen`` (ERROR, blocking): zero matches while deer exist and the best observed
  similarity is below the threshold - the failure the old system lived with for weeks. Blocking:
  ``similarity_scores`` (and what depends on it) does not run after it fails.
* ``new_deer_rate_normal`` (WARN): new-deer rate spike against the trailing average.
* ``embeddings_consistent`` (ERROR): unit-norm vectors, one embedding version per decision.
* ``no_merge_candidates`` (WARN): pairs of deer whose profiles are closer than the threshold.
* ``review_queue_short`` (WARN): the review queue is long or an item has waited long.
"""

import dagster as dg

from deer_pipeline.defs.partitions import camera_and_day, camera_day_partitions
from deer_pipeline.defs.resources import DeerDatabase, IdentitySettings
from deer_pipeline.identity import health, store
from deer_pipeline.review import queue as review_queue

DEER_PROFILES = dg.AssetKey("deer_profiles")


def _metadata(outcome: health.CheckOutcome) -> dict:
    meta = {}
    for k, v in outcome.metadata.items():
        if v is None:
            continue
        if isinstance(v, bool):
            meta[k] = dg.MetadataValue.bool(v)
        elif isinstance(v, int):
            meta[k] = dg.MetadataValue.int(v)
        elif isinstance(v, float):
            meta[k] = dg.MetadataValue.float(v)
        elif isinstance(v, (dict, list)):
            meta[k] = dg.MetadataValue.json(v)
        else:
            meta[k] = dg.MetadataValue.text(str(v))
    if outcome.table:
        cols = list(outcome.table[0])
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in outcome.table]
        meta["table"] = dg.MetadataValue.md("\n".join(lines))
    return meta


def evaluate(context, database: DeerDatabase, compute) -> dg.AssetCheckResult:
    """Run one health check for the context's partition, record it, return the Dagster result."""
    camera, day = camera_and_day(context)
    key = store.partition_key_text(camera, day)
    with database.engine().begin() as conn:
        outcome: health.CheckOutcome = compute(conn, camera, day)
        health.record_check(conn, outcome.name, key, outcome.passed, outcome.severity,
                           {"description": outcome.description, **outcome.metadata,
                            **({"table": outcome.table} if outcome.table else {})})
    if not outcome.passed:
        context.log.warning(f"{outcome.name} ({outcome.severity}) on {key}: {outcome.description}")
    return dg.AssetCheckResult(
        passed=outcome.passed, severity=getattr(dg.AssetCheckSeverity, outcome.severity),
        description=outcome.description, metadata=_metadata(outcome))


@dg.asset_check(asset=DEER_PROFILES, partitions_def=camera_day_partitions,
                description="Share of sightings matched to a known deer, for the partition and the "
                            "trailing window, within the configured bounds (WARN).")
def assignment_rate_in_bounds(context: dg.AssetCheckExecutionContext, database: DeerDatabase,
                              identity: IdentitySettings) -> dg.AssetCheckResult:
    return evaluate(context, database, lambda conn, cam, day: health.check_assignment_rate(
        conn, cam, day, identity.assignment_rate_min, identity.assignment_rate_max,
        identity.min_sightings_for_rate, identity.check_window_days))


@dg.asset_check(asset=DEER_PROFILES, partitions_def=camera_day_partitions, blocking=True,
                description="Zero matches while deer exist and the best observed similarity is below the "
                            "threshold: the threshold is above every score (ERROR, blocks downstream).")
def matches_happen(context: dg.AssetCheckExecutionContext, database: DeerDatabase,
                   identity: IdentitySettings) -> dg.AssetCheckResult:
    return evaluate(context, database, lambda conn, cam, day: health.check_zero_matches(
        conn, cam, day, identity.zero_match_min_sightings, identity.check_window_days))


@dg.asset_check(asset=DEER_PROFILES, partitions_def=camera_day_partitions,
                description="New-deer rate of the partition against the trailing average (WARN on a spike).")
def new_deer_rate_normal(context: dg.AssetCheckExecutionContext, database: DeerDatabase,
                         identity: IdentitySettings) -> dg.AssetCheckResult:
    return evaluate(context, database, lambda conn, cam, day: health.check_new_deer_spike(
        conn, cam, day, identity.new_deer_spike_factor, identity.min_sightings_for_rate,
        identity.check_window_days))


@dg.asset_check(asset=DEER_PROFILES, partitions_def=camera_day_partitions,
                description="Vectors behind the decisions have norm 1 and one embedding version was used (ERROR).")
def embeddings_consistent(context: dg.AssetCheckExecutionContext, database: DeerDatabase,
                          identity: IdentitySettings) -> dg.AssetCheckResult:
    return evaluate(context, database, lambda conn, cam, day: health.check_embeddings_consistent(
        conn, cam, day, identity.norm_tolerance))


@dg.asset_check(asset=DEER_PROFILES, partitions_def=camera_day_partitions,
                description="Pairs of deer whose profiles are closer than the threshold: merge candidates (WARN).")
def no_merge_candidates(context: dg.AssetCheckExecutionContext, database: DeerDatabase,
                        identity: IdentitySettings) -> dg.AssetCheckResult:
    return evaluate(context, database, lambda conn, cam, day: health.check_merge_candidates(
        conn, cam, day, identity.ensemble_weights, identity.reid_threshold, identity.merge_candidates_limit))


@dg.asset_check(asset=DEER_PROFILES, partitions_def=camera_day_partitions,
                description="The review queue (decisions near the threshold, merge candidates) is short and "
                            "nothing has waited long for a person (WARN).")
def review_queue_short(context: dg.AssetCheckExecutionContext, database: DeerDatabase,
                       identity: IdentitySettings) -> dg.AssetCheckResult:
    return evaluate(context, database, lambda conn, cam, day: review_queue.check_review_queue(
        conn, identity.review_margin, identity.review_queue_max_items, identity.review_queue_max_age_days))
