"""Candidate deer for an encounter: the search set-up (exact scoring over the in-memory gallery, or pgvector HNSW with re-query), the eligible deer (sex filter, cannot-links, review constraints), the top candidates, and their exact re-scoring by the ensemble and, when configured, local-feature verification and calibrated fusion."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from deer_pipeline.detections.encounters import (
    Encounter,
)
from deer_pipeline.identity import coarse, store
from deer_pipeline.identity.flanks import opposite_flanks, side_codes
from deer_pipeline.identity.gallery import (
    Gallery,
    SexBook,
    compatible_sex_codes,
    first_best_in_segments,
    per_deer_max,
    sex_compatible,
)
from deer_pipeline.identity.store import MatchingError
from deer_pipeline.settings import MatchingSettings

if TYPE_CHECKING:   # the summary is filled in by matching.decide_partition
    from deer_pipeline.identity.matching import DecisionSummary


HNSW_MAX_EF = store.HNSW_MAX_EF


@dataclass
class _Search:
    """What candidate search needs: the in-memory gallery, the sexes of known deer and, for
    ``hnsw``, the index reader. ``complete``: the gallery holds every stored sighting (exact,
    two_stage), so it can be kept in memory after the decision."""

    mode: str
    gallery: Gallery
    sexes: SexBook
    vers: list[str]
    nearest: store.NearestSightings | None = None
    total_index_rows: int = 0
    loaded: set[int] = field(default_factory=set)
    complete: bool = False
    flanks: object = None            # flanks.SideBook when the cosine decision is flank-aware
    coarse: str = "float32"          # precision of the pass that ranks deer (coarse.py)
    book: object = None              # flanks.SideBook: the flank of every detection being decided
    _codes: tuple | None = None      # (deer ids, their sex codes) of the last chunk

    def sex_codes(self, deer: np.ndarray) -> np.ndarray:
        """Sex code of each deer (``SexBook.codes``), kept from chunk to chunk: only deer whose
        sightings changed since are looked up again."""
        changed = self.sexes.take_changed()
        if self._codes is not None and len(self._codes[0]) == len(deer) and np.array_equal(self._codes[0], deer):
            _, codes, pos = self._codes
            hit = [(pos[d], d) for d in changed if d in pos]
            if hit:
                codes = codes.copy()
                codes[[p for p, _ in hit]] = self.sexes.codes(np.array([d for _, d in hit], np.int64))
        else:
            codes = self.sexes.codes(deer)
            pos = dict(zip(deer.tolist(), range(len(deer))))
        self._codes = (deer.copy(), codes, pos)
        return codes


def _prepare_search(conn, settings: MatchingSettings, models: list[str], weights: Mapping[str, float],
                    vers: list[str], summary: DecisionSummary, cached: Gallery | None = None,
                    withdrawn_ids: Sequence[str] = ()) -> _Search:
    """The search for this decision. ``cached``: the gallery kept in memory, of the store's
    generation before the withdrawal (``withdrawn_ids`` are removed from it here); without it
    the gallery is read from the store (after the withdrawal)."""
    if cached is not None:
        cached.remove(withdrawn_ids)
        cached.grouped()                 # rows added by the last decision join the deer order
        n_static = cached.n
    else:
        n_static = store.gallery_size(conn)
    summary.gallery_size = n_static
    mode = settings.search
    if mode == "auto":
        mode = "exact" if n_static < settings.exact_search_max_gallery else "two_stage"
    summary.search = mode
    if mode == "hnsw":
        store.check_gallery_vectors(conn, vers)
        search = _Search(mode, Gallery(models, weights), SexBook(store.gallery_deer_sex_counts(conn)), vers)
        # the index holds every version's vectors: only a scan as large as the index is complete
        search.total_index_rows = store.embedding_row_count(conn)
        search.nearest = store.NearestSightings(conn, vers[0])
        return search
    gallery = cached
    if gallery is None:
        gallery = Gallery(models, weights)
        store.load_gallery(conn, vers, gallery, headroom=max(4096, n_static // 8))
        gallery.grouped()
        gallery.sides_known = True           # every stored sighting's flank read with it
    summary.coarse_precision = coarse.resolve(settings.coarse_precision, gallery.n)
    return _Search(mode, gallery, SexBook(gallery.sex_counts()), vers, complete=True,
                   coarse=summary.coarse_precision)


def _chunk_scores(search: _Search, q_all: list[np.ndarray], n0: int, conn=None,
                  query_ids: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores of a chunk of query rows, computed once per chunk (one matmul): ``exact`` the best
    score per deer over gallery rows 0..n0; ``two_stage`` the score against each deer's profile
    (free profile rows left out); ``hnsw`` the rows loaded so far, like exact. Flank-aware
    (``search.flanks``): when a query row has a known side, the scores of the other flank's rows
    (exact, hnsw) or profiles (two_stage: a deer has a profile per flank) are masked before the
    per-deer maximum."""
    g = search.gallery
    folded = g.fold(q_all)
    if search.mode != "two_stage":
        if search.flanks is not None and n0 and search.flanks.any_known(conn, query_ids):
            S = g.scores(q_all, 0, n0, folded)
            search.flanks.mask(conn, S, query_ids, g, 0, n0)
            return per_deer_max(S, g.deer[:n0])
        return g.deer_max(q_all, n0, folded)
    return g.profile_scores(folded, query_sides(search, conn, query_ids))


def query_sides(search: _Search, conn, detection_ids: Sequence[str] | None) -> np.ndarray | None:
    """Flank code of each query detection when the decision is flank-aware, else None."""
    if search.flanks is None or not detection_ids:
        return None
    search.flanks.load(conn, detection_ids)
    return side_codes(search.flanks.side(d) for d in detection_ids)


def _scored_candidates(conn, enc: Encounter, q: list[np.ndarray], deer0: np.ndarray, enc_M0: np.ndarray,
                       n0: int, excluded: set[int], search: _Search, settings: MatchingSettings,
                       summary: DecisionSummary) -> list[tuple]:
    """The encounter's candidate deer, re-scored exactly (float64, per deer), best first:
    [(deer, best score, per-detection scores, per-model components)].

    ``two_stage``: the ``profile_candidate_deer`` eligible deer with the best profile score (the
    profile as it is now for deer that gained sightings since the chunk was scored) are re-scored
    exactly on all their sightings; the best ``candidate_deer`` of them are the candidates."""
    gallery, sexes, enc_sex = search.gallery, search.sexes, enc.sex
    if search.mode == "two_stage":
        n1 = gallery.n
        deer_ids, score = deer0, (enc_M0.max(axis=0) if len(deer0) else np.zeros(0, np.float32))
        if n1 > n0:       # deer that gained sightings since the chunk was scored: their profile now
            changed = np.unique(gallery.deer[n0:n1])
            keep = ~np.isin(deer_ids, changed)
            c_ids, c_M = gallery.profile_scores(gallery.fold(q), query_sides(search, conn, enc.detection_ids),
                                                changed.tolist())
            deer_ids = np.concatenate([deer_ids[keep], c_ids])
            score = np.concatenate([score[keep], c_M.max(axis=0)])
        shortlist = _top_candidates(deer_ids, score, settings, sexes, enc_sex, excluded,
                                    want=settings.profile_candidate_deer)
        if not shortlist:
            return []
        ids_a = np.array(sorted(c for c, _ in shortlist), np.int64)
        sims, comps = gallery.best_pair_arrays(q, ids_a)
        best = sims.max(axis=0)
        top = np.lexsort((ids_a, -best))[: settings.candidate_deer]
        return [(int(ids_a[j]), float(best[j]), sims[:, j], comps[:, j, :]) for j in top]
    if search.mode == "hnsw":
        need = min(settings.candidate_deer, sexes.eligible_static_rows(enc_sex, settings.sex_filter, excluded))
        if need > 0:
            sides = ([search.flanks.side(d) for d in enc.detection_ids] if search.flanks is not None
                     else [None] * len(enc.detection_ids))
            found = _hnsw_candidates(search.nearest, q[0], need, settings, sexes, enc_sex,
                                     excluded, search.total_index_rows, summary, sides)
            fresh = [d for d in found if d not in search.loaded]
            if fresh:
                f_deer, f_mats, f_ids = store.gallery_vectors(conn, search.vers, deer_ids=fresh)
                gallery.append(f_deer, f_mats, f_ids)
                search.loaded.update(fresh)
    deer_ids, best = deer0, (enc_M0.max(axis=0) if len(deer0) else np.zeros(0, np.float32))
    n1 = gallery.n
    if n1 > n0:       # rows added since the chunk was scored: decided or loaded since
        new_scores = gallery.scores(q, n0, n1)
        if search.flanks is not None:
            search.flanks.mask(conn, new_scores, enc.detection_ids, gallery, n0, n1)
        dx, Mx = per_deer_max(new_scores, gallery.deer[n0:n1])
        sx = Mx.max(axis=0)
        at = np.searchsorted(deer0, dx)
        known = at < len(deer0)
        known[known] = deer0[at[known]] == dx[known]
        best = best.copy()
        best[at[known]] = np.maximum(best[at[known]], sx[known])
        deer_ids, best = np.concatenate([deer0, dx[~known]]), np.concatenate([best, sx[~known]])
    ranked = _top_candidates(deer_ids, best, settings, sexes, enc_sex, excluded)
    cands = [(cand, float(sims.max()), sims, comp) for (cand, _), (sims, comp)
             in zip(ranked, gallery.best_pairs(q, [c for c, _ in ranked]))]
    cands.sort(key=lambda c: (-c[1], c[0]))
    return cands


def _with_candidate(conn, cands: list[tuple], deer: int, q: list[np.ndarray], search: _Search) -> list[tuple]:
    """``cands`` with ``deer`` among them, scored exactly (a deer a review names need not be
    among the candidates the scores found)."""
    if any(c[0] == deer for c in cands):
        return cands
    if not search.gallery.has(deer):
        d_deer, d_mats, d_ids = store.gallery_vectors(conn, search.vers, deer_ids=[deer])
        search.gallery.append(d_deer, d_mats, d_ids)
        search.loaded.add(deer)
    (sims, comp), = search.gallery.best_pairs(q, [deer])
    return cands + [(deer, float(sims.max()), sims, comp)]


LOCAL_SCORE_SCALE = 20.0   # match_score=local: inliers n -> n / (n + 20), a monotone map into [0, 1)


# Inlier counts and isotonic curves take few distinct values; equal pair scores are ordered by the
# global cosine through this tiny term (1e-4 local, 1e-6 fused: far below any threshold step), so
# the best deer does not depend on how ties are broken.
TIE_BREAK = {"local": 1e-4, "fused": 1e-6}


def pair_scores(match_score: str, G: np.ndarray, L: np.ndarray, calibration=None) -> np.ndarray:
    """Pair scores of ``match_score`` local or fused from global cosines ``G`` and inlier counts
    ``L`` (NaN: no local score): ``local`` n / (n + 20) (0 without a local score); ``fused`` the
    mean of the calibrated probabilities, the global probability alone without a local score.
    Shared by the decision and the evaluation's replay."""
    G = np.asarray(G, np.float64)
    L = np.asarray(L, np.float64)
    if match_score == "local":
        P = np.where(np.isfinite(L), L / (L + LOCAL_SCORE_SCALE), 0.0)
    else:
        P = calibration.fuse(G.ravel(), L.ravel()).reshape(G.shape)
    return P + TIE_BREAK[match_score] * (1.0 + np.clip(G, -1.0, 1.0)) / 2.0


class _Rescorer:
    """Local verification (and, for ``fused``, calibrated fusion and encounter pooling) of an
    encounter's candidates.

    For each detection of the encounter the ``verify_top_k`` gallery sightings of the candidate
    deer with the highest global score are verified (flank-aware: where both flanks are known and
    differ, the pair is neither verified nor scored; a deer known only from the other flank keeps
    its global score alone). Pair score: ``local`` - inliers n mapped to
    n / (n + 20) (0 without a local score); ``fused`` - the mean of the calibrated probabilities
    of the global cosine and of the inliers, the global probability alone where the pair has no
    local score. A deer's score pools the pairs of every detection of the encounter with every
    sighting of the deer (``encounter_pooling``)."""

    def __init__(self, verifier, calibration, settings: MatchingSettings):
        self.verifier, self.calibration, self.settings = verifier, calibration, settings

    @classmethod
    def for_settings(cls, conn, engine, settings: MatchingSettings, verifier, summary) -> "_Rescorer":
        from deer_pipeline.identity import calibration as cal_mod
        from deer_pipeline.identity.verification import Verifier
        from deer_pipeline.settings import CropSettings

        cal = None
        if settings.match_score == "fused":
            try:
                cal = cal_mod.load(conn, settings.calibration_version)
            except cal_mod.CalibrationError as exc:
                raise MatchingError(f"match_score=fused: {exc}; no deer created") from exc
            if cal is None:
                raise MatchingError("match_score=fused needs a stored calibration (match_calibrations is empty): "
                                    "fit one from labelled pairs, or use match_score=cosine; no deer created")
        if verifier is None:
            verifier = Verifier(engine, CropSettings().store_dir, settings.local)
        summary.local_verification = {"match_score": settings.match_score, "feature_version": verifier.version,
                                      "calibration_version": cal.version if cal is not None else None,
                                      "encounter_pooling": settings.encounter_pooling}
        return cls(verifier, cal, settings)

    def pair_scores(self, G: np.ndarray, L: np.ndarray) -> np.ndarray:
        return pair_scores(self.settings.match_score, G, L, self.calibration)

    def rescore(self, enc: Encounter, q: list[np.ndarray], cands: list[tuple], gallery: Gallery) -> list[tuple]:
        from deer_pipeline.identity.pooling import pool_by_deer
        from deer_pipeline.identity.verification import flank_compatible

        if not cands:
            return cands
        s, v = self.settings, self.verifier
        deer_list = [c[0] for c in cands]
        segs = [gallery.rows(d) for d in deer_list]
        idx = np.concatenate(segs)
        col_deer = np.repeat(np.arange(len(segs)), [len(g) for g in segs])
        G, comps = gallery.rescore_rows(q, np.tile(idx, (len(q[0]), 1)))              # k x R (x models)
        qids = [d.detection_id for d in enc.detections]
        gids = [gallery.detection_ids[r] for r in idx]
        v.load_sides(qids + gids)
        compat = np.ones(G.shape, bool)
        if s.flank_aware:
            compat = np.array([[flank_compatible(v.side(a), v.side(b)) for b in gids] for a in qids], bool)
        known = np.array([g is not None for g in gids], bool)
        chosen = []
        for i in range(len(qids)):
            cols = np.flatnonzero(compat[i] & known)
            chosen.append(cols[np.argsort(-G[i, cols], kind="stable")[: s.verify_top_k]])
        v.prepare(qids + [gids[c] for top in chosen for c in top])
        L = np.full(G.shape, np.nan)
        for i, top in enumerate(chosen):
            for c in top:
                n = v.inliers(qids[i], gids[c])
                L[i, c] = np.nan if n is None else n
        P = self.pair_scores(G, L)
        P[~compat] = -np.inf
        pooled = pool_by_deer(P, col_deer, len(segs), s.encounter_pooling)
        out = []
        r = np.arange(len(qids))
        unflanked = None
        for j, d in enumerate(deer_list):
            cols = np.flatnonzero(col_deer == j)
            if not np.isfinite(pooled[j]):
                # only the other flank of this deer is known: its global score stands alone
                if unflanked is None:
                    unflanked = self.pair_scores(G, np.full(G.shape, np.nan))
                P[:, cols] = unflanked[:, cols]
                pooled[j] = float(P[:, cols].max())
            best = cols[P[:, cols].argmax(axis=1)]
            sims = P[r, best]
            comp = np.concatenate([comps[r, best], np.nan_to_num(L[r, best], nan=-1.0)[:, None]], axis=1)
            out.append((d, float(pooled[j]), sims, comp))
        out.sort(key=lambda c: (-c[1], c[0]))
        return out


def _eligible(deer_id: int, settings: MatchingSettings, sexes: SexBook, enc_sex: str,
              excluded: set[int]) -> bool:
    if deer_id in excluded:
        return False
    return not settings.sex_filter or sex_compatible(enc_sex, sexes.sex(deer_id))


def _top_candidates(deer_ids: np.ndarray, enc_scores: np.ndarray, settings: MatchingSettings,
                    sexes: SexBook, enc_sex: str, excluded: set[int], want: int | None = None) -> list[tuple[int, float]]:
    """The best ``want`` (default ``candidate_deer``) eligible deer, best first (ties by deer id)."""
    n = len(deer_ids)
    if n == 0:
        return []
    want = settings.candidate_deer if want is None else want
    t = min(n, want + len(excluded) + 32)
    while True:
        if t < n:
            part = np.argpartition(-enc_scores, t - 1)[:t]
        else:
            part = np.arange(n)
        part = part[np.lexsort((deer_ids[part], -enc_scores[part]))]
        out = []
        for i in part:
            d = int(deer_ids[i])
            if _eligible(d, settings, sexes, enc_sex, excluded):
                out.append((d, float(enc_scores[i])))
                if len(out) == want:
                    return out
        if t >= n:
            return out
        t = min(n, t * 4)


def _hnsw_candidates(nearest: store.NearestSightings, q_primary: np.ndarray, need: int,
                     settings: MatchingSettings, sexes: SexBook, enc_sex: str, excluded: set[int],
                     total_index_rows: int, summary: DecisionSummary,
                     sides: Sequence[str | None] | None = None) -> set[int]:
    """Stored deer near any detection of the encounter by the primary model's HNSW index
    (``sides``: per detection its known flank, whose other flank's sightings are left out).

    A scan must return at least ``need`` eligible gallery rows (right version, decided, sex and
    cannot-link allowed); when the post-scan filters leave fewer, ef_search is doubled (up to
    1000) and the query repeated, then an exact scan is used. The best ``candidate_deer`` deer
    are returned for exact re-scoring on their whole gallery."""
    found: dict[int, float] = {}
    for q, side in zip(q_primary, sides or [None] * len(q_primary)):
        ef = max(settings.hnsw_ef_search, settings.candidate_deer)
        while True:
            rows = nearest.query(q, min(ef, HNSW_MAX_EF), side)
            ok = [(d, sim) for d, sim in rows if _eligible(d, settings, sexes, enc_sex, excluded)]
            if len(ok) >= need or total_index_rows <= ef:
                break
            if ef >= HNSW_MAX_EF:
                ok = [(d, sim) for d, sim in nearest.exact(q, side)
                      if _eligible(d, settings, sexes, enc_sex, excluded)]
                summary.hnsw_exact_fallbacks += 1
                break
            ef = min(ef * 2, HNSW_MAX_EF)
            summary.hnsw_requeries += 1
        for d, sim in ok:
            if sim > found.get(d, -np.inf):
                found[d] = sim
    return set(sorted(found, key=lambda d: (-found[d], d))[: settings.candidate_deer])


PLAN_MARGIN = 8      # candidates kept per encounter beyond those wanted (cannot-links, deer changed in the chunk)


class _ChunkPlan:
    """The candidate deer of a chunk's encounters, found for the whole chunk at once (cosine
    decision, ``exact`` or ``two_stage``): one score matrix per chunk (``coarse.scores``, float32
    or bfloat16 products), the best ``want + PLAN_MARGIN`` eligible deer per encounter by one
    partial sort of every row, and (``exact``) each detection's first best gallery row of each of
    those deer, read from the same matrix; deciding an encounter is then a few lookups and one
    float64 re-scoring of its candidates' best pairs.

    The plan finds what the encounter-by-encounter rule (``_scored_candidates``) finds: deer
    that gained sightings within the chunk (decided by an earlier encounter of it) are scored
    on all their rows as that rule does, cannot-linked deer are left out, and an encounter whose
    list runs short (too many of its deer changed or excluded) is handed back to that rule
    (``candidates`` returns None). With bfloat16 products (``exact``), every row of a candidate
    that could be its best row within the error bound is re-scored in float32, and ``decisive``
    hands an encounter back to float32 scoring when a deer outside its list could reach the
    threshold or its best candidate."""

    def __init__(self, search: _Search, settings: MatchingSettings, enc_sizes: Sequence[int],
                 enc_sexes: Sequence[str], folded: np.ndarray, q_all: list[np.ndarray], n0: int,
                 conn=None, query_ids: Sequence[str] | None = None):
        g, self.mode, self.n0 = search.gallery, search.mode, n0
        self.coarse = search.coarse
        self.eps = coarse.error_bound(g.w) if self.coarse == "bfloat16" else 0.0
        self.folded, self.q_sides = folded, None
        self.want = settings.candidate_deer if self.mode == "exact" else settings.profile_candidate_deer
        starts = np.r_[0, np.cumsum(enc_sizes)[:-1]].astype(np.int64)
        self.rows = [(int(a), int(a) + int(k)) for a, k in zip(starts, enc_sizes)]
        if self.mode == "exact":
            g.grouped()                                  # every row 0..n0 in the deer order
            S = coarse.scores(folded, g.vec[:n0], self.coarse)
            if search.flanks is not None and search.flanks.any_known(conn, query_ids):
                search.flanks.mask(conn, S, query_ids, g, 0, n0)
            self.S_ord = S[:, g._order]
            M = np.maximum.reduceat(self.S_ord, g._starts, axis=1)
            deer = g.seg_deer
        else:
            self.q_sides = query_sides(search, conn, query_ids)
            deer, M = g.profile_scores(folded, self.q_sides, precision=self.coarse)
        self.deer = deer
        self.M_enc = M if len(starts) == M.shape[0] else np.maximum.reduceat(M, starts, axis=0)
        E = self.E = self.M_enc.copy()
        known_sexes = set(enc_sexes) - {"unknown"}
        if settings.sex_filter and len(deer) and known_sexes:
            codes = search.sex_codes(deer)
            for sex in known_sexes:
                bad = ~compatible_sex_codes(sex, codes)
                if bad.any():
                    rows = np.flatnonzero(np.array([s == sex for s in enc_sexes]))
                    E[np.ix_(rows, np.flatnonzero(bad))] = -np.inf
        nd = len(deer)
        T = min(nd, self.want + PLAN_MARGIN)
        self.outside = np.full(len(starts), -np.inf)     # best score of an eligible deer not in the list
        if T == 0:
            self.top = np.zeros((len(starts), 0), np.int64)
        else:
            if T < nd:
                part = np.argpartition(-E, T, axis=1)
                top = part[:, :T]
                self.outside = np.take_along_axis(E, part[:, T:T + 1], axis=1)[:, 0].astype(np.float64)
            else:
                top = np.tile(np.arange(nd), (len(starts), 1))
            vals = np.take_along_axis(E, top, axis=1)
            order = np.lexsort((deer[top], -vals), axis=1)
            self.top = np.take_along_axis(top, order, axis=1)        # encounter x T: columns, best first
        self.n_eligible = np.isfinite(E).sum(axis=1)
        self._seen, self.changed = n0, set()      # deer that gained rows since the chunk was planned
        self._unlisted = {}                       # encounter -> best rank score left off its candidates
        self.QQ = None               # exact: the chunk's detections scored against each other (float32)
        if self.mode == "exact":
            self.QQ = folded @ np.hstack(q_all).T

    def fallback_scores(self, i: int, q: list[np.ndarray], search: _Search, conn=None,
                        detection_ids: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(deer, detections x deer scores) of encounter ``i`` as ``_chunk_scores`` gives them,
        for ``_scored_candidates`` when the plan cannot answer (in float32, flank-aware, when the
        plan's pass was bfloat16)."""
        if self.coarse == "bfloat16" and self.mode == "exact":
            return _chunk_scores(search, q, self.n0, conn, list(detection_ids or []))
        return self.deer, self.M_enc[i: i + 1]

    def candidates(self, i: int, q: list[np.ndarray], detection_ids: Sequence[str], excluded: set[int],
                   search: _Search, settings: MatchingSettings, enc_sex: str, conn=None) -> list[tuple] | None:
        """Encounter ``i``'s candidates, as ``_scored_candidates`` returns them, or None when
        the plan cannot answer (its list ran short)."""
        g = search.gallery
        n1 = g.n
        if n1 > self._seen:
            fresh = set(g.deer[self._seen:n1].tolist())
            self.changed |= fresh
            self._seen = n1
            if self.mode == "two_stage":     # the changed deer's profiles now, against every row of the chunk
                self._profile_columns(g, fresh)
        changed = self.changed
        cols = self.top[i]
        ids = self.deer[cols]
        keep = [j for j, d in enumerate(ids.tolist()) if d not in excluded and d not in changed]
        if len(keep) < self.want and self.n_eligible[i] > len(cols):
            return None
        unlisted = [self.outside[i]]
        if len(keep) > self.want:
            unlisted.append(self.E[i, cols[keep[self.want]]])
        keep = np.array(keep[: self.want], np.int64)
        score = self.E[i, cols[keep]]
        fin = np.isfinite(score)
        if not fin.all():
            keep, score = keep[fin], score[fin]
        extra = [d for d in changed if d not in excluded
                 and (not settings.sex_filter or sex_compatible(enc_sex, search.sexes.sex(d)))]
        e_ids, e_score = np.array(extra, np.int64), np.zeros(len(extra))
        new_scores = None
        if extra:
            if self.mode == "exact":
                a, b = self.rows[i]
                new_scores = (self.QQ[a:b, : n1 - self.n0] if n1 - self.n0 == a   # the rows this chunk added
                              else g.scores(q, self.n0, n1))
                if search.flanks is not None:
                    search.flanks.mask(conn, new_scores, detection_ids, g, self.n0, n1)
                dx, Mx = per_deer_max(new_scores, g.deer[self.n0:n1])
                e_score = Mx.max(axis=0)[np.searchsorted(dx, e_ids)]
                at = self._columns(e_ids)
                known = at >= 0
                e_score[known] = np.maximum(e_score[known], self.E[i, at[known]])
            else:
                a, b = self.rows[i]
                e_score = self._CS[a:b, [self._cs[d] for d in extra]].max(axis=0)
        all_ids = np.concatenate([ids[keep], e_ids])
        all_score = np.concatenate([score, e_score]).astype(np.float64)
        ranked = np.lexsort((all_ids, -all_score))
        pick = ranked[: self.want]
        if len(ranked) > self.want:
            unlisted.append(all_score[ranked[self.want]])
        self._unlisted[i] = max(unlisted)
        chosen = all_ids[pick]
        if not len(chosen):
            return []
        if self.mode == "two_stage":
            a, b = self.rows[i]
            ids_a = np.sort(chosen)
            sims, comps = g.best_pair_arrays(q, ids_a, self.folded[a:b])
            best = sims.max(axis=0)
            top = np.lexsort((ids_a, -best))[: settings.candidate_deer]
            return [(int(ids_a[j]), float(best[j]), sims[:, j], comps[:, j, :]) for j in top]
        a, b = self.rows[i]
        n_static = len(keep)
        rows = np.empty((b - a, len(chosen)), np.int64)
        static = pick < n_static
        rows[:, static] = _first_best_rows(g, self.S_ord, cols[keep[pick[static]]], a, b, self.folded, self.eps)
        for j in np.flatnonzero(~static):
            rows[:, j] = self._best_rows_of(int(chosen[j]), a, b, new_scores, g)
        sims, comps = g.rescore_rows(q, rows)
        best = sims.max(axis=0)
        top = np.lexsort((chosen, -best))
        return [(int(chosen[j]), float(best[j]), sims[:, j], comps[:, j, :]) for j in top]

    def _profile_columns(self, g: Gallery, deer_ids: set[int]) -> None:
        """Two-stage: each of these deer's current profile score against every detection of the
        chunk, kept as one column per deer (a deer's profile changes only when it gains rows):
        the best of its flank profiles compatible with each detection, as ``profile_scores``."""
        if not hasattr(self, "_CS"):
            self._CS = np.full((len(self.folded), 16), -np.inf, np.float32)
            self._cs: dict[int, int] = {}
        g._profiles_ready()
        qs = self.q_sides if self.q_sides is not None and self.q_sides.any() else None
        for d in deer_ids:
            c = self._cs.get(d)
            if c is None:
                c = self._cs[d] = len(self._cs)
                if c >= self._CS.shape[1]:
                    self._CS = np.hstack([self._CS, np.full_like(self._CS, -np.inf)])
            rows = g.profile_rows_of([d])
            if not len(rows):
                self._CS[:, c] = -np.inf
                continue
            M = g.prof[rows] @ self.folded.T                         # profiles x detections
            if qs is not None:
                M[opposite_flanks(g.prof_side[rows], qs)] = -np.inf
            self._CS[:, c] = M.max(axis=0)

    def decisive(self, i: int, cands: list[tuple], threshold: float) -> bool:
        """With bfloat16 products (``exact``): can no deer left off encounter ``i``'s list reach
        the threshold or its best candidate's score (the list then holds float32 search's
        decision)? Always True for float32 products and for ``two_stage`` (a ranking by profile,
        measured against exact search rather than bounded)."""
        if self.coarse != "bfloat16" or self.mode != "exact":
            return True
        best = cands[0][1] if cands else -np.inf
        return self._unlisted.get(i, -np.inf) + self.eps < max(best, threshold)

    def _columns(self, deer_ids: np.ndarray) -> np.ndarray:
        """Column of each deer in the plan's deer order, -1 when it has none."""
        at = np.searchsorted(self.deer, deer_ids)
        ok = at < len(self.deer)
        ok[ok] = self.deer[at[ok]] == deer_ids[ok]
        return np.where(ok, at, -1)

    def _best_rows_of(self, deer: int, a: int, b: int, new_scores: np.ndarray, g: Gallery) -> np.ndarray:
        """Per detection a..b, the first best row of a deer that gained rows in the chunk: its
        rows of the deer order first (from the chunk's matrix), then its new rows in order (the
        order ``Gallery.gather`` gives)."""
        col = self._columns(np.array([deer]))[0]
        vals, rows = [], []
        if col >= 0:
            st, en = g._starts[col], g._ends[col]
            r = g._order[st:en]
            v = self.S_ord[a:b, st:en]
            if self.eps:                     # the bfloat16 pass only ranks: the rows in reach in float32
                v = np.where(v >= v.max(axis=1, keepdims=True) - 2 * self.eps,
                             np.einsum("kd,kjd->kj", self.folded[a:b], g.vec[r][None, :, :]
                                       .repeat(b - a, axis=0)), -np.inf).astype(np.float32)
            vals.append(v)
            rows.append(r)
        new = np.flatnonzero(g.deer[self.n0:g.n] == deer)
        vals.append(new_scores[:, new])
        rows.append(self.n0 + new)
        v, r = np.concatenate(vals, axis=1), np.concatenate(rows)
        return r[v.argmax(axis=1)]


def _first_best_rows(g: Gallery, S_ord: np.ndarray, cols: np.ndarray, a: int, b: int,
                     folded: np.ndarray, eps: float = 0.0) -> np.ndarray:
    """For detections a..b of the chunk and each deer (``cols``: columns of the deer order):
    the first best gallery row of the deer (float32, from the chunk's score matrix in the deer
    order, as ``Gallery.best_pair_arrays`` finds it). With bfloat16 products (``eps`` their
    error bound) the rows within 2 eps of a deer's best are scored again in float32 first.
    Returns detections x deer gallery rows."""
    k, nc = b - a, len(cols)
    if not nc:
        return np.zeros((k, 0), np.int64)
    st, en = g._starts[cols], g._ends[cols]
    lens = np.tile(en - st, k)
    offs = np.cumsum(lens) - lens
    pos = np.repeat(np.tile(st, k) - offs, lens) + np.arange(int(lens.sum()))   # S_ord columns, pair by pair
    val_det = a + np.repeat(np.arange(k), int((en - st).sum()))
    vals = S_ord[val_det, pos]
    if eps:
        near = np.flatnonzero(vals >= np.repeat(np.maximum.reduceat(vals, offs), lens) - 2 * eps)
        exact = np.full(len(vals), -np.inf, np.float32)
        exact[near] = np.einsum("pd,pd->p", folded[val_det[near]], g.vec[g._order[pos[near]]])
        vals = exact
    first = first_best_in_segments(vals, offs, lens)
    return g._order[pos[first]].reshape(k, nc)
