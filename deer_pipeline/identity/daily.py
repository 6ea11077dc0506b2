"""Deciding a run's camera x day partitions: one day at a time, in capture order.

A run (the nightly one, the sensor's, a backfill) covers many partitions. Each day's partitions
are decided jointly by :func:`matching.decide_partitions`: one transaction under the identity
lock and one replay for the whole day, instead of one per camera. Days are decided one after the
other, each in its own transaction, so a run that dies between two days leaves every day either
decided or untouched, and running it again finishes the rest with the same result.

One camera's refusal (``MatchingError``: its detections have no vectors of the configured
versions, and so on) does not hold back the other cameras: the day's cameras are then decided
one at a time (the same decisions, since they do not depend on the order partitions are decided
in), the later days go on, and :class:`PartitionsRefused` names the refused partitions at the end,
carrying the summaries of every partition that was decided. No deer is created by a refusal.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Callable, Iterable, Mapping

from sqlalchemy.engine import Engine

from deer_pipeline import db
from deer_pipeline.identity import matching, store
from deer_pipeline.settings import MatchingSettings

log = logging.getLogger(__name__)


def by_day(partitions: Iterable[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """[(day, [camera, ...]), ...]: the partitions grouped by day, days and cameras sorted."""
    days: dict[str, set[str]] = defaultdict(set)
    for camera, day in partitions:
        days[str(day)].add(str(camera))
    return [(day, sorted(days[day])) for day in sorted(days)]


class PartitionsRefused(matching.MatchingError):
    """Some partitions of a run were refused; the others were decided (``summaries``)."""

    def __init__(self, refused: list[tuple[str, str]], summaries: list[matching.DecisionSummary]):
        self.refused, self.summaries = refused, summaries
        super().__init__(f"{len(refused)} partition(s) not decided (no deer created), "
                         f"{len(summaries)} decided: " + "; ".join(f"{k}: {m}" for k, m in refused))


def decide_days(engine: Engine, partitions: Iterable[tuple[str, str]], settings: MatchingSettings,
                versions: Mapping[str, str] | None = None,
                on_retry: Callable[[str], None] | None = None) -> list[matching.DecisionSummary]:
    """Decide every (camera, day) of ``partitions``, day by day in capture order; the summaries
    come back in that order (day, then camera). A lost database connection repeats the day it
    interrupted (its transaction was rolled back whole); any other error stops the run there,
    with the days before it decided. Refused partitions: see the module doc."""
    summaries: list[matching.DecisionSummary] = []
    refused: list[tuple[str, str]] = []

    def decide(keys):
        return db.retry_transient(lambda: matching.decide_partitions(engine, keys, settings, versions),
                                  f"deciding {keys[0][1]} ({len(keys)} camera(s))", on_retry=on_retry)

    for day, cameras in by_day(partitions):
        keys = [(camera, day) for camera in cameras]
        t0 = time.perf_counter()
        try:
            done = decide(keys)
        except matching.MatchingError as e:
            if len(keys) == 1:
                refused.append((store.partition_key_text(keys[0][0], day), str(e)))
                continue
            log.warning("deciding %s jointly was refused (%s); deciding its %d cameras one at a time",
                        day, e, len(keys))
            done = []
            for key in keys:
                try:
                    done += decide([key])
                except matching.MatchingError as e1:
                    refused.append((store.partition_key_text(key[0], day), str(e1)))
        summaries += done
        # logged after the day's transaction committed: the day is decided whatever happens next
        log.info("decided day %s: %d camera(s), %d sightings, %d new deer (%.2fs)", day, len(done),
                 sum(s.decided for s in done), sum(s.new_deer for s in done), time.perf_counter() - t0)
    if refused:
        raise PartitionsRefused(refused, summaries)
    return summaries
