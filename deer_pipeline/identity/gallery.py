"""The in-memory gallery of decided sightings that match-or-create scores against.

One float32 matrix holds every sighting's vectors, the component models side by side
(``[v_model1, v_model2]``, each a stored unit vector, never re-normalised), with a deer id, a
sex code and a detection id per row. The ensemble score of queries against rows is ONE matmul:
the weights are folded into the query (``[w1*q1, w2*q2] @ [g1, g2]^T``). Rows are kept grouped
by deer through a precomputed order (rebuilt once per decision, not per chunk), so the best
score per deer is a gather and a ``maximum.reduceat``; rows added during a decision (the
"tail") are reduced on their own and merged. Each row also carries its flank (left, right or
unknown). Each deer has a running sum of its vectors per model and flank, so its profiles (the
unit mean per model of the rows of one flank) are known without reading the store: the two-stage
search ranks deer by profile first (``profile_scores``: a known flank against its own flank's
profile and the unknown-side one; ``candidates.py``). The profile stored in
``deer_profile_vectors`` is the unit mean over all of a deer's rows (``exact_profiles``).

``gallery_cache.py`` keeps one gallery per database and embedding versions across decisions of
a process, invalidated by the generation counter the store keeps.
"""

from __future__ import annotations

from collections import Counter
from typing import Mapping, Sequence

import numpy as np

from deer_pipeline.identity.flanks import SIDE_CODE, opposite_flanks

SEX_CODE = {"unknown": 0, "female": 1, "male": 2}
FREE = np.iinfo(np.int64).min      # a profile row that belongs to no deer (new deer have negative ids)


def sex_compatible(sighting_sex: str, deer_sex: str) -> bool:
    """May a sighting of this sex join a deer of that sex? Unknown matches every sex."""
    return sighting_sex == "unknown" or deer_sex == "unknown" or sighting_sex == deer_sex


def compatible_sex_codes(sex: str, codes: np.ndarray) -> np.ndarray:
    """``sex_compatible`` for many deer at once: may a sighting of ``sex`` join deer whose sexes
    are ``codes`` (``SEX_CODE``)?"""
    c = SEX_CODE.get(sex, 0)
    codes = np.asarray(codes)
    return np.ones(len(codes), bool) if c == 0 else (codes == 0) | (codes == c)


def first_best_in_segments(vals: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Along the last axis, cut into segments (``starts``, ``lens``): the position of each
    segment's first maximum (ties go to the earlier position)."""
    n = vals.shape[-1]
    mx = np.maximum.reduceat(vals, starts, axis=-1)
    pos = np.where(vals == np.repeat(mx, lens, axis=-1), np.arange(n), n)
    return np.minimum.reduceat(pos, starts, axis=-1)


def per_deer_max(scores: np.ndarray, row_deer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reduce a (k x n) score matrix over gallery rows to (sorted deer ids, k x n_deer) maxima."""
    if scores.shape[1] == 0:
        return np.zeros(0, np.int64), np.zeros((scores.shape[0], 0), np.float32)
    order = np.argsort(row_deer, kind="stable")
    sd = row_deer[order]
    cut = np.ones(len(sd), bool)
    cut[1:] = sd[1:] != sd[:-1]
    starts = np.flatnonzero(cut)
    return sd[starts], np.maximum.reduceat(scores[:, order], starts, axis=1)


def merge_max(deer_a: np.ndarray, M_a: np.ndarray, deer_b: np.ndarray, M_b: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """Per-deer maxima of two (sorted deer ids, k x deer) results, as one sorted result."""
    if len(deer_b) == 0:
        return deer_a, M_a
    if len(deer_a) == 0:
        return deer_b, M_b
    deer = np.union1d(deer_a, deer_b)
    M = np.full((M_a.shape[0], len(deer)), -np.inf, np.float32)
    M[:, np.searchsorted(deer, deer_a)] = M_a
    ib = np.searchsorted(deer, deer_b)
    M[:, ib] = np.maximum(M[:, ib], M_b)
    return deer, M


class Gallery:
    """Gallery vectors held in memory: one growing matrix (models side by side), a deer id, a
    sex code and a detection id per row, rows grouped by deer through a precomputed order."""

    def __init__(self, models: Sequence[str], weights: Mapping[str, float]):
        self.models = list(models)
        self.weights = dict(weights)
        self.w = np.array([self.weights[m] for m in self.models], np.float64)
        self.dim = 0                      # per model
        self.n = 0
        self._cap = 0
        self.vec = np.zeros((0, 0), np.float32)
        self.deer = np.zeros(0, np.int64)
        self.sex = np.zeros(0, np.int8)
        self.side = np.zeros(0, np.int8)  # flank per row (SIDE_CODE), 0 unknown
        self.sides_known = False          # every row's flank is in ``side`` (complete galleries)
        self.detection_ids: list[str | None] = []
        self._row_of: dict[str, int] | None = None       # detection id -> row (built when needed)
        self._sums_ok = False                            # profiles built (see _init_profiles)
        self.reindex()

    # -- storage ------------------------------------------------------------------------------
    def reserve(self, rows: int, dim: int) -> None:
        """Capacity for ``rows`` rows of ``dim`` per model (one allocation, no regrowth copies)."""
        self.dim = self.dim or dim
        if rows <= self._cap:
            return
        vec = np.empty((rows, self.dim * len(self.models)), np.float32)
        if self.n:
            vec[: self.n] = self.vec[: self.n]
        deer = np.zeros(rows, np.int64)
        deer[: self.n] = self.deer[: self.n]
        sex = np.zeros(rows, np.int8)
        sex[: self.n] = self.sex[: self.n]
        side = np.zeros(rows, np.int8)
        side[: self.n] = self.side[: self.n]
        self.vec, self.deer, self.sex, self.side, self._cap = vec, deer, sex, side, rows

    @property
    def mats(self) -> list[np.ndarray]:
        """One (rows x dim) view per model."""
        d = self.dim
        return [self.vec[:, i * d:(i + 1) * d] for i in range(len(self.models))]

    def append(self, deer_ids: np.ndarray, vectors: Sequence[np.ndarray] | np.ndarray,
               detection_ids: Sequence[str] | None = None, sexes: Sequence[str] | None = None,
               sides: Sequence[str | None] | None = None) -> None:
        """Add rows: ``vectors`` one (k x dim) matrix per model, or (k x dim*models); ``sides``
        the flank of each row (left | right | None)."""
        k = len(deer_ids)
        if k == 0:
            return
        v = np.hstack(list(vectors)) if not isinstance(vectors, np.ndarray) else vectors
        if self.n + k > self._cap:
            self.reserve(max(1024, self.n + k, int(1.5 * self._cap)), v.shape[1] // len(self.models))
        lo = self.n
        self.vec[lo: lo + k] = v
        self.deer[lo: lo + k] = deer_ids
        self.sex[lo: lo + k] = [SEX_CODE.get(s, 0) for s in sexes] if sexes is not None else 0
        self.side[lo: lo + k] = [SIDE_CODE.get(s, 0) for s in sides] if sides is not None else 0
        ids = list(detection_ids) if detection_ids is not None else [None] * k
        self.detection_ids += ids
        if self._row_of is not None:
            self._row_of.update((d, lo + i) for i, d in enumerate(ids) if d is not None)
        self.n += k
        for i, d in enumerate(np.asarray(deer_ids).tolist()):
            self._tail.setdefault(d, []).append(lo + i)
        if self._sums_ok:
            for key, rows in _group(self._keys(np.arange(lo, lo + k)), np.arange(lo, lo + k)):
                self._profile_add(key, rows, +1)

    def remove(self, detection_ids: Sequence[str]) -> int:
        """Remove the rows of these detections (those present); the last rows move into the holes.
        Returns how many rows were removed."""
        if self._row_of is None:
            self._row_of = {d: i for i, d in enumerate(self.detection_ids) if d is not None}
        rows = sorted((self._row_of.pop(d) for d in set(detection_ids) if d in self._row_of), reverse=True)
        if self._sums_ok and rows:
            rr = np.array(rows, np.int64)
            for key, grp in _group(self._keys(rr), rr):
                self._profile_add(key, grp, -1)
        for r in rows:                          # highest first: a moved row is never a hole
            last = self.n - 1
            if r != last:
                self.vec[r] = self.vec[last]
                self.deer[r] = self.deer[last]
                self.sex[r] = self.sex[last]
                self.side[r] = self.side[last]
                moved = self.detection_ids[last]
                self.detection_ids[r] = moved
                if moved is not None:
                    self._row_of[moved] = r
            self.detection_ids.pop()
            self.n -= 1
        if rows:
            self.reindex()
        return len(rows)

    def relabel(self, mapping: Mapping[int, int]) -> None:
        """Rename deer (provisional ids of new deer -> their real ids)."""
        if not mapping:
            return
        d = self.deer[: self.n]
        hit = np.isin(d, np.fromiter(mapping, np.int64))
        d[hit] = [mapping[x] for x in d[hit].tolist()]
        if self._sums_ok:
            for (a, b), side in ((ab, sd) for ab in mapping.items() for sd in range(3)):
                r = self._prow.pop(4 * a + side, None)
                if r is None:
                    continue
                kb = 4 * b + side
                if kb in self._prow:         # the id of a deer with rows already: merge the sums
                    t = self._prow[kb]
                    self._psum[t] += self._psum[r]
                    self._pcount[t] += self._pcount[r]
                    self._psum[r], self.prof[r], self._pcount[r], self.prof_deer[r] = 0, 0, 0, FREE
                    self._stale.discard(r)
                    self._stale.add(t)
                    continue
                self._prow[kb] = r
                self.prof_deer[r] = b
        self.reindex()

    # -- grouping by deer -----------------------------------------------------------------------
    def reindex(self) -> None:
        """Group the rows by deer (the precomputed order); later rows form the tail."""
        d = self.deer[: self.n]
        self._order = np.argsort(d, kind="stable")
        sd = d[self._order]
        self._starts = np.flatnonzero(np.r_[True, sd[1:] != sd[:-1]]) if self.n else np.zeros(0, np.int64)
        self.seg_deer = sd[self._starts] if self.n else np.zeros(0, np.int64)
        self._ends = np.r_[self._starts[1:], self.n].astype(np.int64)
        self._seg_of = dict(zip(self.seg_deer.tolist(), range(len(self.seg_deer))))
        self._sorted_n = self.n
        self._tail: dict[int, list[int]] = {}

    def grouped(self) -> None:
        """Every row in the precomputed deer order (reindex only when rows were added since)."""
        if self._sorted_n != self.n:
            self.reindex()

    def rows(self, deer_id: int) -> np.ndarray:
        """Row indices of one deer."""
        j = self._seg_of.get(deer_id)
        base = self._order[self._starts[j]: self._ends[j]] if j is not None else np.zeros(0, np.int64)
        tail = self._tail.get(deer_id)
        return np.concatenate([base, np.asarray(tail, np.int64)]) if tail else base

    def has(self, deer_id: int) -> bool:
        return deer_id in self._seg_of or deer_id in self._tail

    # -- scoring --------------------------------------------------------------------------------
    def fold(self, query: Sequence[np.ndarray]) -> np.ndarray:
        """The query rows with the ensemble weights folded in: ``[w1*q1, w2*q2]`` (float32)."""
        return np.hstack([np.asarray(q, np.float32) * np.float32(w) for q, w in zip(query, self.w)])

    def scores(self, query: Sequence[np.ndarray], lo: int, hi: int, folded: np.ndarray | None = None) -> np.ndarray:
        """Ensemble similarity (float32) of the query rows to gallery rows lo..hi: one matmul."""
        f = self.fold(query) if folded is None else folded
        return f @ self.vec[lo:hi].T

    def deer_max(self, query: Sequence[np.ndarray], n0: int, folded: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(sorted deer ids, query rows x deer) best ensemble score per deer over rows 0..n0."""
        k = len(query[0])
        if n0 == 0:
            return np.zeros(0, np.int64), np.zeros((k, 0), np.float32)
        f = self.fold(query) if folded is None else folded
        ns = min(self._sorted_n, n0)
        deer, M = np.zeros(0, np.int64), np.zeros((k, 0), np.float32)
        if ns:
            S = f @ self.vec[:ns].T
            deer, M = self.seg_deer, np.maximum.reduceat(S[:, self._order], self._starts, axis=1)
        if n0 > ns:
            deer, M = merge_max(deer, M, *per_deer_max(f @ self.vec[ns:n0].T, self.deer[ns:n0]))
        return deer, M

    def gather(self, deer_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(row indices of these deer one deer after the other, rows per deer)."""
        nd = len(deer_ids)
        d = np.asarray(deer_ids, np.int64)
        if len(self.seg_deer):                           # seg_deer is sorted
            js = np.minimum(np.searchsorted(self.seg_deer, d), len(self.seg_deer) - 1)
            js = np.where(self.seg_deer[js] == d, js, -1)
        else:
            js = np.full(nd, -1, np.int64)
        ok = js >= 0
        st = np.where(ok, self._starts[np.maximum(js, 0)] if len(self._starts) else 0, 0)
        lens = np.where(ok, (self._ends[np.maximum(js, 0)] if len(self._ends) else 0) - st, 0)
        offs = np.cumsum(lens) - lens
        idx = self._order[np.repeat(st - offs, lens) + np.arange(int(lens.sum()))]
        if not self._tail:
            return idx, lens
        tails = [(j, self._tail[d]) for j, d in enumerate(deer_ids) if d in self._tail]
        if not tails:
            return idx, lens
        t_rows = np.concatenate([np.asarray(r, np.int64) for _, r in tails])
        t_seg = np.repeat([j for j, _ in tails], [len(r) for _, r in tails])
        seg = np.concatenate([np.repeat(np.arange(nd), lens), t_seg])
        order = np.argsort(seg, kind="stable")
        lens = lens + np.bincount(t_seg, minlength=nd)
        return np.concatenate([idx, t_rows])[order], lens

    def best_pair_arrays(self, query: Sequence[np.ndarray], deer_ids: Sequence[int],
                         folded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(sims: query rows x deer, comps: query rows x deer x models): per query row and deer
        the best ensemble similarity to the deer's rows and the per-model cosines of that pair.

        The best row is found in float32; its similarity is then recomputed in float64 from the
        two vectors alone, so the value stored and compared with the threshold does not depend
        on what else is in the gallery or on BLAS blocking (a re-run reproduces it exactly)."""
        idx, lens = self.gather(deer_ids)
        if (lens == 0).any():
            raise KeyError(f"deer without sightings in the gallery: {[d for d, n in zip(deer_ids, lens) if not n]}")
        f = self.fold(query) if folded is None else folded
        X = self.vec[idx]                                                            # rows x dim*models
        ens = f @ X.T                                                                # k x rows
        first = first_best_in_segments(ens, np.cumsum(lens) - lens, lens)           # k x deer: first best row
        return self.rescore_rows(query, idx[first], X[first.ravel()])

    def rescore_rows(self, query: Sequence[np.ndarray], rows: np.ndarray,
                     vectors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """float64 per-model cosines of each query row with the gallery row in each column of
        ``rows`` (query rows x pairs) and their weighted sum: (sims query rows x pairs, comps
        query rows x pairs x models). ``vectors``: those rows' vectors when already gathered
        (pairs in row-major order). The one place a decision's score is computed."""
        d = self.dim
        k, c = rows.shape
        V = (self.vec[rows.ravel()] if vectors is None else vectors).reshape(k, c, -1)
        comps = np.empty((k, c, len(query)), np.float64)
        for m, qm in enumerate(query):
            comps[:, :, m] = np.einsum("kd,kcd->kc", np.asarray(qm, np.float32), V[:, :, m * d:(m + 1) * d],
                                       dtype=np.float64)
        return comps @ self.w, comps

    def best_pairs(self, query: Sequence[np.ndarray], deer_ids: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each deer: per query row, the best ensemble similarity to the deer's rows and the
        per-model cosines of that best pair (query rows x models); see ``best_pair_arrays``."""
        if not len(deer_ids):
            return []
        sims, comps = self.best_pair_arrays(query, deer_ids)
        return [(sims[:, j], comps[:, j, :]) for j in range(len(deer_ids))]

    # -- per deer -------------------------------------------------------------------------------
    def sex_counts(self) -> dict[int, tuple[int, int, int]]:
        """deer -> (female rows, male rows, rows), from the rows themselves."""
        d = self.deer[: self.n]
        if not self.n:
            return {}
        if self._sorted_n == self.n:              # grouped by deer: sums over the segments
            s = self.sex[: self.n][self._order]
            f = np.add.reduceat((s == 1).astype(np.int64), self._starts)
            m = np.add.reduceat((s == 2).astype(np.int64), self._starts)
            n = self._ends - self._starts
            return dict(zip(self.seg_deer.tolist(), zip(f.tolist(), m.tolist(), n.tolist())))
        ids, inv = np.unique(d, return_inverse=True)
        s = self.sex[: self.n]
        f = np.bincount(inv, weights=(s == 1), minlength=len(ids)).astype(np.int64)
        m = np.bincount(inv, weights=(s == 2), minlength=len(ids)).astype(np.int64)
        n = np.bincount(inv, minlength=len(ids))
        return dict(zip(ids.tolist(), zip(f.tolist(), m.tolist(), n.tolist())))

    def _keys(self, rows: np.ndarray) -> np.ndarray:
        """Profile key of each row: 4 x deer + flank (one profile per deer and flank)."""
        return self.deer[rows] * 4 + self.side[rows].astype(np.int64)

    def _init_profiles(self) -> None:
        """Per deer and flank (left, right, unknown): the sum of its rows and the profile (per
        model the unit mean), kept up to date by append/remove/relabel from now on. A deer seen
        from one side only, or where flanks are unknown, has one profile."""
        n = self.n
        o = np.lexsort((self.side[:n], self.deer[:n])) if n else np.zeros(0, np.int64)
        kd, ks = self.deer[:n][o], self.side[:n][o]
        cut = np.ones(n, bool)
        cut[1:] = (kd[1:] != kd[:-1]) | (ks[1:] != ks[:-1])
        st = np.flatnonzero(cut)
        en = np.r_[st[1:], n].astype(np.int64)
        npf = len(st)
        D = self.dim * len(self.models)
        cap = max(1024, int(npf * 1.25))
        self._psum = np.zeros((cap, D), np.float32)
        self.prof = np.zeros((cap, D), np.float32)
        self.prof_deer = np.full(cap, FREE, np.int64)     # profile row -> deer (FREE: none)
        self.prof_side = np.zeros(cap, np.int8)           # profile row -> flank
        self._pcount = np.zeros(cap, np.int64)
        self._pn = npf
        step = 65536                                      # rows per block: no copy of the gallery
        j = 0
        while j < npf:
            k = max(int(np.searchsorted(st, st[j] + step, side="left")), j + 1)
            lo, hi = st[j], en[k - 1]
            self._psum[j:k] = np.add.reduceat(self.vec[o[lo:hi]], st[j:k] - lo, axis=0)
            j = k
        self._pcount[:npf] = en - st
        self.prof_deer[:npf] = kd[st]
        self.prof_side[:npf] = ks[st]
        self._prow: dict[int, int] = dict(zip((kd[st] * 4 + ks[st]).tolist(), range(npf)))
        self._normalise(np.arange(npf))
        self._stale: set[int] = set()
        self._sums_ok = True

    def _normalise(self, prow: np.ndarray) -> None:
        d = self.dim
        for i in range(len(self.models)):
            blk = self._psum[prow, i * d:(i + 1) * d]
            self.prof[prow, i * d:(i + 1) * d] = blk / np.maximum(
                np.linalg.norm(blk, axis=1, keepdims=True), np.float32(1e-12))

    def _profile_add(self, key: int, rows: np.ndarray, sign: int) -> None:
        r = self._prow.get(key)
        if r is None:
            if self._pn == len(self.prof_deer):
                self._grow_profiles()
            r = self._prow[key] = self._pn
            self._pn += 1
            self.prof_deer[r], self.prof_side[r] = key // 4, key % 4
        v = self.vec[rows].sum(axis=0)
        self._psum[r] += v if sign > 0 else -v
        self._pcount[r] += sign * len(rows)
        if self._pcount[r] <= 0:
            self._psum[r] = 0
            self.prof[r] = 0
            self._pcount[r] = 0
            self.prof_deer[r] = FREE
            del self._prow[key]
            self._stale.discard(r)
        else:
            self._stale.add(r)           # normalised when profiles are next read (_fresh)

    def _fresh(self) -> None:
        """Normalise the profile rows whose sums changed since they were last read."""
        if self._stale:
            self._normalise(np.fromiter(self._stale, np.int64, len(self._stale)))
            self._stale = set()

    def _grow_profiles(self) -> None:
        cap = 2 * len(self.prof_deer)
        for name in ("_psum", "prof"):
            a = getattr(self, name)
            b = np.zeros((cap, a.shape[1]), np.float32)
            b[: len(a)] = a
            setattr(self, name, b)
        self.prof_side = np.r_[self.prof_side, np.zeros(cap - len(self.prof_deer), np.int8)]
        self.prof_deer = np.r_[self.prof_deer, np.full(cap - len(self.prof_deer), FREE, np.int64)]
        self._pcount = np.r_[self._pcount, np.zeros(cap - len(self._pcount), np.int64)]

    def _profiles_ready(self) -> bool:
        if not self._sums_ok:
            if not self.dim:                 # nothing stored yet
                return False
            self._init_profiles()
        self._fresh()
        return True

    def profiles(self, deer_ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(deer id per profile row, profile matrix rows x dim*models: per model the unit mean of
        the rows of one deer and flank, float32, row counts) for these deer (default: every deer);
        a deer has one profile per flank it was seen from (one where flanks are unknown)."""
        if not self._profiles_ready():
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
        rows = np.array(sorted(self._prow.values()), np.int64) if deer_ids is None else self.profile_rows_of(deer_ids)
        return self.prof_deer[rows], self.prof[rows], self._pcount[rows]

    def profile_rows_of(self, deer_ids: Sequence[int]) -> np.ndarray:
        """The profile rows (one per flank seen) of these deer."""
        return np.array([r for d in deer_ids for sd in range(3) if (r := self._prow.get(4 * d + sd)) is not None],
                        np.int64)

    def profile_scores(self, folded: np.ndarray, query_sides: np.ndarray | None = None,
                       deer_ids: Sequence[int] | None = None, precision: str = "float32"
                       ) -> tuple[np.ndarray, np.ndarray]:
        """(sorted deer ids, query rows x deer): each deer's best profile score, over its profiles
        of flanks compatible with each query row (``query_sides``: SIDE_CODE per row; a known
        flank is not compared with the other flank's profile; None: every profile). For the
        two-stage search's ranking; ``precision`` of the product (``coarse.scores``)."""
        from deer_pipeline.identity import coarse

        k = len(folded)
        if not self._profiles_ready():
            return np.zeros(0, np.int64), np.zeros((k, 0), np.float32)
        if deer_ids is None:
            P, pd, ps = self.prof[: self._pn], self.prof_deer[: self._pn], self.prof_side[: self._pn]
        else:
            rows = self.profile_rows_of(deer_ids)
            P, pd, ps = self.prof[rows], self.prof_deer[rows], self.prof_side[rows]
        if not len(pd):
            return np.zeros(0, np.int64), np.zeros((k, 0), np.float32)
        M = coarse.scores(folded, P, precision)
        if query_sides is not None and ps.any():
            M[opposite_flanks(query_sides, ps)] = -np.inf
        deer, S = per_deer_max(M, pd)
        if len(deer) and deer[0] == FREE:      # rows of deer whose sightings were all withdrawn
            deer, S = deer[1:], S[:, 1:]
        return deer, S

    def exact_profiles(self, deer_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Like ``profiles`` but summed afresh in float64 from each deer's rows in detection-id
        order, so the stored profile does not depend on the order rows came and went."""
        ids = [d for d in deer_ids if self.has(d)]
        P = np.zeros((len(ids), self.dim * len(self.models)), np.float32)
        counts = np.zeros(len(ids), np.int64)
        d = self.dim
        for j, deer in enumerate(ids):
            rows = self.rows(deer)
            rows = rows[np.argsort([self.detection_ids[r] or "" for r in rows.tolist()], kind="stable")]
            total = self.vec[rows].astype(np.float64).sum(axis=0)
            for i in range(len(self.models)):
                blk = total[i * d:(i + 1) * d]
                P[j, i * d:(i + 1) * d] = blk / max(np.linalg.norm(blk), 1e-12)
            counts[j] = len(rows)
        return np.asarray(ids, np.int64), P, counts


def _group(deer: np.ndarray, rows: np.ndarray):
    """(deer, its rows) for rows given with their deer."""
    order = np.argsort(deer, kind="stable")
    sd, sr = deer[order], rows[order]
    if len(sd) == 1:
        yield int(sd[0]), sr
        return
    cut = np.ones(len(sd), bool)
    cut[1:] = sd[1:] != sd[:-1]
    cuts = np.flatnonzero(cut).tolist() + [len(sd)]
    for a, b in zip(cuts[:-1], cuts[1:]):
        yield int(sd[a]), sr[a:b]


class SexBook:
    """Deer sex as the consensus of its sightings, kept current as sightings are added, with
    counts of stored (static) gallery rows per deer sex for the HNSW candidate budget."""

    def __init__(self, counts: Mapping[int, tuple[int, int, int]]):
        self.counts = {d: [f, m] for d, (f, m, _) in counts.items()}
        self._code = {d: (1 if f > m else 2 if m > f else 0) for d, (f, m) in self.counts.items()}
        self._changed: set[int] = set()                  # deer whose sightings changed (take_changed)
        self.static_rows = {d: n for d, (_, _, n) in counts.items()}
        self.rows_by_sex: Counter = Counter()
        for d, n in self.static_rows.items():
            self.rows_by_sex[self.sex(d)] += n

    def sex(self, deer_id: int) -> str:
        f, m = self.counts.get(deer_id, (0, 0))
        return "female" if f > m else "male" if m > f else "unknown"

    def take_changed(self) -> set[int]:
        """The deer that gained sightings since the last call."""
        out, self._changed = self._changed, set()
        return out

    def codes(self, deer_ids: np.ndarray) -> np.ndarray:
        """``SEX_CODE`` of each deer's current sex."""
        get = self._code.get
        return np.fromiter((get(d, 0) for d in np.asarray(deer_ids).tolist()), np.int8, len(deer_ids))

    def add(self, deer_id: int, sexes: Sequence[str]) -> None:
        before = self.sex(deer_id)
        c = self.counts.setdefault(deer_id, [0, 0])
        c[0] += sum(s == "female" for s in sexes)
        c[1] += sum(s == "male" for s in sexes)
        after = self.sex(deer_id)
        self._code[deer_id] = SEX_CODE[after]
        self._changed.add(deer_id)
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
