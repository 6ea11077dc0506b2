"""Deciding a run's camera x day partitions: one day at a time, in capture order.

A run (the nightly one, the sensor's, a backfill) covers many partitions. Each day's partitions
are decided jointly by :func:`matching.decide_partitions`: one transaction under the identity
lock and one replay for the whole day, instead of one per camera. Days are decided one after the
other, each in its own transaction, so a run that dies between two days leaves every day either
decided or untouched, and running it again finishes the rest with the same result.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Callable, Iterable, Mapping

from sqlalchemy.engine import Engine

from deer_pipeline import db
from deer_pipeline.identity import matching
from deer_pipeline.settings import MatchingSettings

log = logging.getLogger(__name__)


def by_day(partitions: Iterable[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """[(day, [camera, ...]), ...]: the partitions grouped by day, days and cameras sorted."""
    days: dict[str, set[str]] = defaultdict(set)
    for camera, day in partitions:
        days[str(day)].add(str(camera))
    return [(day, sorted(days[day])) for day in sorted(days)]


def decide_days(engine: Engine, partitions: Iterable[tuple[str, str]], settings: MatchingSettings,
                versions: Mapping[str, str] | None = None,
                on_retry: Callable[[str], None] | None = None) -> list[matching.DecisionSummary]:
    """Decide every (camera, day) of ``partitions``, day by day in capture order; the summaries
    come back in that order (day, then camera). A lost database connection repeats the day it
    interrupted (its transaction was rolled back whole); any other error stops the run there,
    with the days before it decided."""
    summaries: list[matching.DecisionSummary] = []
    for day, cameras in by_day(partitions):
        keys = [(camera, day) for camera in cameras]
        t0 = time.perf_counter()
        done = db.retry_transient(lambda: matching.decide_partitions(engine, keys, settings, versions),
                                  f"deciding {day} ({len(keys)} camera(s))", on_retry=on_retry)
        summaries += done
        # logged after the day's transaction committed: the day is decided whatever happens next
        log.info("decided day %s: %d camera(s), %d sightings, %d new deer (%.2fs)", day, len(keys),
                 sum(s.decided for s in done), sum(s.new_deer for s in done), time.perf_counter() - t0)
    return summaries
