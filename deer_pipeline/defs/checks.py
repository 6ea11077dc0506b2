"""Asset checks on ``deer_profiles``, evaluated in the asset's own step for every camera x day
partition the step decided (no separate check steps; one evaluation per check and partition, so
a run over a day of many cameras reports each camera's checks). Thin over the health checks in
``deer_pipeline.identity.health``; every result is also recorded in the ``check_results`` table
(which the alert sensor in ``defs/alerts.py`` reads).

* ``assignment_rate_in_bounds`` (WARN): partition and trailing-window assignment rate.
* ``matches_happen`` (ERROR, blocking): zero matches while deer exist and the best observed
  similarity is below the threshold - the failure the old system lived with for weeks. Blocking:
  ``similarity_scores`` (and what depends on it) does not run after it fails.
* ``new_deer_rate_normal`` (WARN): new-deer rate spike against the trailing average.
* ``embeddings_consistent`` (ERROR): unit-norm vectors, one embedding version per decision.
* ``no_merge_candidates`` (WARN): pairs of deer whose profiles are closer than the threshold.
* ``review_queue_short`` (WARN): the review queue is long or an item has waited long.
"""

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import dagster as dg

from deer_pipeline.defs.partitions import camera_day_partitions, partition_key
from deer_pipeline.defs.resources import IdentitySettings
from deer_pipeline.lazy_modules import lazy

sa = lazy("sqlalchemy")
health = lazy("deer_pipeline.identity.health")
store = lazy("deer_pipeline.identity.store")
review_queue = lazy("deer_pipeline.review.queue")

DEER_PROFILES = dg.AssetKey("deer_profiles")


def _metadata(outcome: "health.CheckOutcome") -> dict:
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


def evaluate(engine: "sa.Engine", camera: str, day: str, check: "ProfilesCheck", identity: IdentitySettings,
             outcome: "health.CheckOutcome | None" = None) -> tuple[dg.AssetCheckEvaluation, str | None]:
    """Run one health check for the partition (or take ``outcome``, computed once for the run by
    a check that does not depend on the partition), record it; returns Dagster's evaluation and,
    when it failed, a line for the log."""
    key = store.partition_key_text(camera, day)
    with engine.begin() as conn:
        if outcome is None:
            outcome = check.compute(conn, camera, day, identity)
        health.record_check(conn, outcome.name, key, outcome.passed, outcome.severity,
                           {"description": outcome.description, **outcome.metadata,
                            **({"table": outcome.table} if outcome.table else {})})
    warning = None if outcome.passed else f"{outcome.name} ({outcome.severity}) on {key}: {outcome.description}"
    return dg.AssetCheckEvaluation(
        asset_key=DEER_PROFILES, check_name=check.name, passed=outcome.passed,
        severity=getattr(dg.AssetCheckSeverity, outcome.severity), description=outcome.description,
        metadata=_metadata(outcome), blocking=check.blocking, partition=str(partition_key(camera, day))), warning


@dataclass(frozen=True)
class ProfilesCheck:
    """One check of ``deer_profiles``: evaluated in the asset's own step, right after the decision."""

    name: str
    description: str
    compute: "Callable[[sa.Connection, str, str, IdentitySettings], health.CheckOutcome]"
    blocking: bool = False
    per_partition: bool = True     # False: the outcome does not depend on the partition (once per run)


CHECKS = (
    ProfilesCheck(
        "assignment_rate_in_bounds",
        "Share of sightings matched to a known deer, for the partition and the trailing window, within "
        "the configured bounds (WARN).",
        lambda conn, cam, day, i: health.check_assignment_rate(
            conn, cam, day, i.assignment_rate_min, i.assignment_rate_max, i.min_sightings_for_rate,
            i.check_window_days)),
    ProfilesCheck(
        "matches_happen",
        "Zero matches while deer exist and the best observed similarity is below the threshold: the "
        "threshold is above every score (ERROR, blocks downstream).",
        lambda conn, cam, day, i: health.check_zero_matches(
            conn, cam, day, i.zero_match_min_sightings, i.check_window_days),
        blocking=True),
    ProfilesCheck(
        "new_deer_rate_normal",
        "New-deer rate of the partition against the trailing average (WARN on a spike).",
        lambda conn, cam, day, i: health.check_new_deer_spike(
            conn, cam, day, i.new_deer_spike_factor, i.min_sightings_for_rate, i.check_window_days)),
    ProfilesCheck(
        "embeddings_consistent",
        "Vectors behind the decisions have norm 1 and one embedding version was used (ERROR).",
        lambda conn, cam, day, i: health.check_embeddings_consistent(conn, cam, day, i.norm_tolerance)),
    ProfilesCheck(
        "no_merge_candidates",
        "Pairs of deer whose profiles are closer than the threshold: merge candidates (WARN).",
        lambda conn, cam, day, i: health.check_merge_candidates(
            conn, cam, day, i.ensemble_weights, i.reid_threshold, i.merge_candidates_limit)),
    ProfilesCheck(
        "review_queue_short",
        "The review queue (decisions near the threshold, merge candidates) is short and nothing has "
        "waited long for a person (WARN).",
        lambda conn, cam, day, i: review_queue.check_review_queue(
            conn, i.review_margin, i.review_queue_max_items, i.review_queue_max_age_days),
        per_partition=False),
)
CHECK_NAMES = tuple(c.name for c in CHECKS)
# partitioned like the asset, so that each evaluation names its camera x day (a Dagster preview feature)
CHECK_SPECS = [dg.AssetCheckSpec(c.name, asset=DEER_PROFILES, description=c.description, blocking=c.blocking,
                                 partitions_def=camera_day_partitions) for c in CHECKS]


def evaluate_partitions(context: dg.AssetExecutionContext, engine: "sa.Engine", identity: IdentitySettings,
                        partitions: Sequence[tuple[str, str]]) -> dict[str, list[dg.AssetCheckEvaluation]]:
    """Every selected check of every partition (recorded in ``check_results``): check name ->
    one evaluation per partition, named by its partition. (``AssetCheckResult`` cannot name a
    partition: in a run over a range of partitions it would give one evaluation per check for the
    whole range.) The failed ones are logged in one warning (each log line is a stored event)."""
    selected = {k.name for k in context.selected_asset_check_keys if k.asset_key == DEER_PROFILES}
    chosen = [c for c in CHECKS if c.name in selected]
    once: dict[str, health.CheckOutcome] = {}
    evaluations: dict[str, list[dg.AssetCheckEvaluation]] = {c.name: [] for c in chosen}
    warnings: list[str] = []
    for camera, day in partitions:
        for c in chosen:
            if not c.per_partition and c.name not in once:
                with engine.connect() as conn:
                    once[c.name] = c.compute(conn, camera, day, identity)
            evaluation, warning = evaluate(engine, camera, day, c, identity, once.get(c.name))
            evaluations[c.name].append(evaluation)
            if warning:
                warnings.append(warning)
    if warnings:
        context.log.warning(f"{len(warnings)} check(s) failed:\n" + "\n".join(warnings))
    return evaluations


def check_events(context: dg.AssetExecutionContext, evaluations: dict[str, list[dg.AssetCheckEvaluation]]
                 ) -> Iterator[dg.Output | dg.AssetCheckEvaluation]:
    """What the ``deer_profiles`` step yields for its checks, after its materialization: for each
    check its (empty) output, once per step, then its evaluations. A failed blocking check fails
    the step once every evaluation has been recorded."""
    for name, found in evaluations.items():
        output = context.assets_def.get_output_name_for_asset_check_key(dg.AssetCheckKey(DEER_PROFILES, name))
        yield dg.Output(None, output_name=output)
        yield from found
