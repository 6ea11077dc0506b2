"""Encounter-level scores: how the pair scores between an encounter's photos and a deer's
sightings become one score of the encounter against that deer.

* ``max``: the best pair (one good flank view carries the encounter) - the pipeline's rule so far;
* ``topN`` (``top2``, ``top3``, ...): the mean of the N best pairs (fewer when there are fewer
  pairs), so that one chance look-alike pair weighs less than two agreeing ones.

Plain numpy; used by ``matching`` (the decision) and by the evaluation's in-memory replay, so
both pool the same way.
"""

from __future__ import annotations

import numpy as np

POOLINGS = ("max", "top2", "top3")


def pooling_k(pooling: str) -> int:
    """1 for ``max``, N for ``topN``; raises ValueError for anything else."""
    if pooling == "max":
        return 1
    if pooling.startswith("top") and pooling[3:].isdigit() and int(pooling[3:]) >= 1:
        return int(pooling[3:])
    raise ValueError(f"encounter pooling must be 'max' or 'topN' (e.g. top2), not {pooling!r}")


def pool_by_deer(scores: np.ndarray, deer_of_col: np.ndarray, n_deer: int, pooling: str = "max") -> np.ndarray:
    """(rows x cols) pair scores, the deer of each column -> one pooled score per deer
    (``-inf`` for a deer without columns). Pairs scored ``-inf`` are not compared and do not count."""
    k = pooling_k(pooling)
    s = np.asarray(scores, dtype=np.float64)
    d = np.asarray(deer_of_col, dtype=np.int64)
    out = np.full(n_deer, -np.inf)
    if s.size == 0:
        return out
    if k == 1:
        np.maximum.at(out, d, s.max(axis=0))
        return out
    vals = s.ravel()
    dd = np.broadcast_to(d, s.shape).ravel()
    ok = np.isfinite(vals)                           # -inf: a pair that is not compared (flank-aware)
    vals, dd = vals[ok], dd[ok]
    if len(vals) == 0:
        return out
    order = np.lexsort((-vals, dd))                  # by deer, best first
    vals, dd = vals[order], dd[order]
    starts = np.r_[0, np.flatnonzero(dd[1:] != dd[:-1]) + 1]
    rank = np.arange(len(dd)) - np.repeat(starts, np.diff(np.r_[starts, len(dd)]))
    keep = rank < k
    sums = np.bincount(dd[keep], weights=vals[keep], minlength=n_deer)
    cnts = np.bincount(dd[keep], minlength=n_deer)
    has = cnts > 0
    out[has] = sums[has] / cnts[has]
    return out
