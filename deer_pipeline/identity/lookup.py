"""Which deer is this photo? An interactive look-up for one sighting (the review app's sighting
page, ``deer-pipeline review lookup``): the known deer that look most like it.

pgvector's HNSW index of the ensemble's primary model (one partial index per embedding
version, sql/009) finds the nearest stored sightings in milliseconds at any gallery size; the
deer they belong to are then scored exactly, as a decision scores them: the best pair of the
photo with each deer's sightings, float64 ensemble similarity over every model (flank-aware:
a known left flank is never compared with a known right flank). When the index returns too few
deer (pgvector 0.6 applies the gallery and flank filters after the scan) ``ef_search`` is
doubled up to pgvector's limit; an index scan that still finds fewer falls back to an exact
scan of the primary model. Its recall against exact search is measured in bench/matching.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import sqlalchemy as sa

from deer_pipeline.identity import store


class PhotoLookupError(store.MatchingError):
    """The photo cannot be looked up (no vector of a model yet)."""


class UnknownDetection(PhotoLookupError):
    """No detection has this id."""


@dataclass
class LookAlike:
    deer_id: int
    similarity: float                 # float64 ensemble similarity of the best pair
    detection_id: str                 # that deer's sighting closest to the photo
    components: dict[str, float]      # model -> cosine of that pair


@dataclass
class Lookup:
    detection_id: str
    deer_id: int | None               # the deer it is assigned to now (None: not decided)
    side: str | None
    versions: dict[str, str]
    look_alikes: list[LookAlike] = field(default_factory=list)
    ef_search: int = 0                # the widest scan used (0: exact scan)
    found_by: str = "hnsw"            # hnsw | exact (the index found too few deer)


def look_alikes(conn: sa.Connection, detection_id: str, weights: Mapping[str, float],
                versions: Mapping[str, str] | None = None, k: int = 10, ef_search: int = 200,
                flank_aware: bool = True, search: str = "hnsw") -> Lookup:
    """The ``k`` known deer most like sighting ``detection_id`` (its own deer included, ranked
    like the others), best first. ``versions``: model -> embedding version (default: the newest
    stored version of each model of ``weights``). ``search``: ``hnsw`` (the index), or
    ``exact`` (a sequential scan of the primary model picks the ``max(ef_search, k)`` deer to
    score: the reference the index's shortlist is measured against)."""
    if k < 1:
        raise ValueError("k must be at least 1")
    if search not in ("hnsw", "exact"):
        raise ValueError(f"search must be hnsw or exact, not {search!r}")
    models = [m for m, w in weights.items() if w > 0]
    vers = store.resolve_versions(conn, models, versions)
    row = conn.execute(sa.text(
        "SELECT d.side, s.deer_id FROM detections d LEFT JOIN sightings s USING (detection_id) "
        "WHERE d.detection_id = :d"), {"d": detection_id}).first()
    if row is None:
        raise UnknownDetection(f"detection {detection_id!r}")
    side = row.side if flank_aware else None
    query = {}
    for m in models:
        got = store.load_vectors(conn, [detection_id], vers[m])
        if detection_id not in got:
            raise PhotoLookupError(f"detection {detection_id!r} has no vector of {m} ({vers[m]}): "
                                   "embed its partition first")
        query[m] = np.asarray(got[detection_id], np.float64)
    primary = max(models, key=lambda m: weights[m])
    out = Lookup(detection_id, row.deer_id, side, dict(vers))
    nearest = store.NearestSightings(conn, vers[primary])
    q_primary = query[primary].astype(np.float32)
    ef = min(max(ef_search, k), store.HNSW_MAX_EF)
    deer: set[int] = set()
    while search == "hnsw":
        deer = {d for det, d, _ in nearest.query_rows(q_primary, ef, side) if det != detection_id}
        out.ef_search = ef
        if len(deer) >= k or ef >= store.HNSW_MAX_EF:
            break
        ef = min(2 * ef, store.HNSW_MAX_EF)
    if len(deer) < k:          # exact asked for, or the filters after the scan left too few deer
        best = sorted(nearest.exact(q_primary, side), key=lambda t: (-t[1], t[0]))
        deer = {d for d, _ in best[: max(ef_search, k)]}
        out.found_by, out.ef_search = "exact", 0
    out.look_alikes = _rescored(conn, detection_id, sorted(deer), query, weights, vers, side)[:k]
    return out


def _rescored(conn, detection_id: str, deer_ids: list[int], query: Mapping[str, np.ndarray],
              weights: Mapping[str, float], vers: Mapping[str, str], side: str | None) -> list[LookAlike]:
    """Every sighting of these deer scored against the photo (float64, all models); the best
    sighting per deer, best deer first (ties: lower deer id)."""
    if not deer_ids:
        return []
    per_model: dict[str, dict[str, np.ndarray]] = {}
    owner: dict[str, int] = {}
    for m in query:
        vecs = {}
        for det, d, v in store.deer_sighting_vectors(conn, deer_ids, vers[m], side, exclude=detection_id):
            vecs[det] = v
            owner[det] = d
        per_model[m] = vecs
    common = sorted(set.intersection(*(set(v) for v in per_model.values())))
    if not common:
        return []
    comps = {m: np.asarray([per_model[m][d] for d in common], np.float64) @ query[m] for m in query}
    total = sum(weights[m] * comps[m] for m in query)
    best: dict[int, int] = {}
    for i, det in enumerate(common):
        d = owner[det]
        if d not in best or total[i] > total[best[d]]:
            best[d] = i
    ranked = sorted(best.items(), key=lambda kv: (-total[kv[1]], kv[0]))
    return [LookAlike(d, float(total[i]), common[i], {m: float(comps[m][i]) for m in query}) for d, i in ranked]
