"""The in-memory gallery of decided sightings that match-or-create scores against: unit vectors per model with their deer, the ensemble score of queries against row ranges, the best pair per candidate deer, and the sexes of known deer."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Mapping, Sequence
import numpy as np
from deer_pipeline.embedding.models import weighted_cosine


def sex_compatible(sighting_sex: str, deer_sex: str) -> bool:
    """May a sighting of this sex join a deer of that sex? Unknown matches every sex."""
    return sighting_sex == "unknown" or deer_sex == "unknown" or sighting_sex == deer_sex


def per_deer_max(scores: np.ndarray, row_deer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reduce a (k x n) score matrix over gallery rows to (deer ids, k x n_deer) maxima."""
    if scores.shape[1] == 0:
        return np.zeros(0, np.int64), np.zeros((scores.shape[0], 0), np.float32)
    order = np.argsort(row_deer, kind="stable")
    sd = row_deer[order]
    starts = np.flatnonzero(np.r_[True, sd[1:] != sd[:-1]])
    return sd[starts], np.maximum.reduceat(scores[:, order], starts, axis=1)


class Gallery:
    """Gallery vectors held in memory: one growing matrix per model, a deer id per row."""

    def __init__(self, models: Sequence[str], weights: Mapping[str, float]):
        self.models = list(models)
        self.weights = dict(weights)
        self.n = 0
        self._cap = 0
        self.mats: list[np.ndarray] = []
        self.deer = np.zeros(0, np.int64)
        self.rows_of: dict[int, list[int]] = defaultdict(list)
        self.detection_ids: list[str | None] = []       # per row (None when not given)

    def _grow(self, need: int, dim: int) -> None:
        if self.n + need <= self._cap:
            return
        cap = max(1024, 2 * self._cap, self.n + need)
        mats = [np.zeros((cap, dim), np.float32) for _ in self.models]
        for new, old in zip(mats, self.mats):
            new[: self.n] = old[: self.n]
        deer = np.zeros(cap, np.int64)
        deer[: self.n] = self.deer[: self.n]
        self.mats, self.deer, self._cap = mats, deer, cap

    def append(self, deer_ids: np.ndarray, vectors: Sequence[np.ndarray],
               detection_ids: Sequence[str] | None = None) -> None:
        k = len(deer_ids)
        if k == 0:
            return
        self.detection_ids += list(detection_ids) if detection_ids is not None else [None] * k
        self._grow(k, vectors[0].shape[1])
        for mat, v in zip(self.mats, vectors):
            mat[self.n: self.n + k] = v
        self.deer[self.n: self.n + k] = deer_ids
        for i, d in enumerate(np.asarray(deer_ids).tolist()):
            self.rows_of[d].append(self.n + i)
        self.n += k

    def scores(self, query: Sequence[np.ndarray], lo: int, hi: int) -> np.ndarray:
        w = self.weights
        return weighted_cosine({m: q for m, q in zip(self.models, query)},
                                   {m: mat[lo:hi] for m, mat in zip(self.models, self.mats)},
                                   {m: w[m] for m in self.models})

    def best_pairs(self, query: Sequence[np.ndarray], deer_ids: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each deer: per query row, the best ensemble similarity to the deer's rows and the
        per-model cosines of that best pair (query rows x models).

        The best row is found in float32; its similarity is then recomputed in float64 from the
        two vectors alone, so the value stored and compared with the threshold does not depend
        on what else is in the gallery or on BLAS blocking (a re-run reproduces it exactly)."""
        segs = [np.asarray(self.rows_of[d]) for d in deer_ids]
        if not segs:
            return []
        idx = np.concatenate(segs)
        w32 = [np.float32(self.weights[m]) for m in self.models]
        ens = sum(w * (q @ mat[idx].T) for w, q, mat in zip(w32, query, self.mats))   # k x rows
        k = ens.shape[0]
        bounds = np.cumsum([0] + [len(g) for g in segs])
        best_rows = np.stack([idx[lo + ens[:, lo:hi].argmax(axis=1)]
                              for lo, hi in zip(bounds[:-1], bounds[1:])], axis=1)  # k x deer
        flat = best_rows.ravel()
        comps = np.stack([np.einsum("kd,kjd->kj", np.asarray(q, np.float64),
                                    mat[flat].astype(np.float64).reshape(k, len(segs), -1))
                          for q, mat in zip(query, self.mats)], axis=-1)          # k x deer x models
        w64 = np.array([self.weights[m] for m in self.models])
        sims = comps @ w64                                                        # k x deer
        return [(sims[:, j], comps[:, j, :]) for j in range(len(segs))]


class SexBook:
    """Deer sex as the consensus of its sightings, kept current as sightings are added, with
    counts of stored (static) gallery rows per deer sex for the HNSW candidate budget."""

    def __init__(self, counts: Mapping[int, tuple[int, int, int]]):
        self.counts = {d: [f, m] for d, (f, m, _) in counts.items()}
        self.static_rows = {d: n for d, (_, _, n) in counts.items()}
        self.rows_by_sex: Counter = Counter()
        for d, n in self.static_rows.items():
            self.rows_by_sex[self.sex(d)] += n

    def sex(self, deer_id: int) -> str:
        f, m = self.counts.get(deer_id, (0, 0))
        return "female" if f > m else "male" if m > f else "unknown"

    def add(self, deer_id: int, sexes: Sequence[str]) -> None:
        before = self.sex(deer_id)
        c = self.counts.setdefault(deer_id, [0, 0])
        c[0] += sum(s == "female" for s in sexes)
        c[1] += sum(s == "male" for s in sexes)
        after = self.sex(deer_id)
        if deer_id in self.static_rows and before != after:
            self.rows_by_sex[before] -= self.static_rows[deer_id]
            self.rows_by_sex[after] += self.static_rows[deer_id]

    def eligible_static_rows(self, sex: str, sex_filter: bool, excluded: set[int]) -> int:
        """Stored gallery rows an encounter of this sex may be matched with."""
        if sex_filter:
            n = sum(c for s, c in self.rows_by_sex.items() if sex_compatible(sex, s))
            n -= sum(self.static_rows[d] for d in excluded
                     if d in self.static_rows and sex_compatible(sex, self.sex(d)))
        else:
            n = sum(self.rows_by_sex.values()) - sum(self.static_rows.get(d, 0) for d in excluded)
        return max(n, 0)
