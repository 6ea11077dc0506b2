"""Match-or-create: decide which deer each sighting of a camera x day partition is.

The decision for partition P runs in ONE transaction holding the identity advisory lock:

1. withdraw P's earlier decisions (its sightings and similarity scores);
2. withdraw every decided encounter, of any partition, that started at or after the earliest
   capture time in P (new or previously decided) - those are replayed;
3. decide all of them (P's encounters and the replayed ones) in capture-time order (ties by
   founding detection id) against the gallery that remains plus what is decided along the way;
4. write sightings, similarity scores and new deer; bring affected deer up to date and delete
   deer left with no sightings.

Because every run leaves the store as if all decided encounters had been decided in capture-time
order, the grouping of sightings into deer does not depend on the order partitions are run in
(serial, parallel, re-runs). Deer are keyed by ``founding_detection_id``; a deer withdrawn and
founded again by the same detection keeps its ``deer_id``.

The unit of decision is the encounter (a burst track, ``encounters.py``): all its detections go
to one deer. Encounters that share a frame never go to the same deer.

Scoring. A deer is its gallery: every stored sighting of it, one vector per component model. For
each model the cosine of two unit vectors is their dot product; the ensemble similarity is the
weighted sum of per-model cosines (``embedding.models.weighted_cosine``, the single place this is computed).
The encounter-to-deer score is the MAXIMUM over (encounter detection x deer sighting) pairs: a
deer photographed from the side and from behind is recognised when the new photo resembles
either; a mean profile would blur poses together and an average over pairs would punish deer with
varied galleries. The price is that a large gallery offers more chances for a chance look-alike,
which the threshold report and the merge-candidate check watch.

Candidate retrieval: ``exact`` scores every gallery vector in batched numpy (the gallery is
loaded once per partition; encounters are scored in chunks against it, and sightings decided
during the run are added as they are decided). ``hnsw`` asks pgvector's HNSW index for the
nearest stored sightings of the primary (highest-weight) model per detection and re-scores the
candidate deer exactly on their whole gallery and all models. pgvector 0.6 applies WHERE filters
(version, gallery membership, sex) after the index scan and returns at most ``hnsw.ef_search``
rows, so when too few eligible deer come back the query is repeated with a doubled ef_search (up
to 1000) and finally replaced by an exact sequential scan. ``auto`` = exact below
``exact_search_max_gallery`` stored sightings, else hnsw.

Plain logic: no Dagster here.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import date
from typing import Mapping, Sequence

import numpy as np
from sqlalchemy.engine import Engine

from deer_pipeline import db
from deer_pipeline.embedding import models as embedders
from deer_pipeline.identity import store
from deer_pipeline.embedding.models import unit_rows, weighted_cosine
from deer_pipeline.detections.encounters import (DetectionBox, Encounter, LinkSettings, build_encounters,
                                      cannot_link, order_key)
from deer_pipeline.identity.store import MatchingError
from deer_pipeline.settings import MatchingSettings

log = logging.getLogger(__name__)

HNSW_MAX_EF = 1000          # pgvector's upper bound for hnsw.ef_search
CHUNK_ENCOUNTERS = 64       # encounters scored together against the gallery (one matmul)
# BLAS threads while deciding. The matrices are small to medium and OpenBLAS threads spin and
# wait for each other: on a 2-core machine that is busy with other work (Dagster, PostgreSQL, a
# second run) one thread is faster, often by 10x for the per-encounter products.
BLAS_THREADS = 1

__all__ = ["MatchingError", "DecisionSummary", "decide_partition",
           "ensemble_version", "sex_compatible", "primary_model"]


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------

def ensemble_version(components: Mapping[str, str], weights: Mapping[str, float]) -> str:
    """The name stored with each decision for the set of component versions in use.

    A single model is its own version; an ensemble is named by ``embedders.ensemble_version``."""
    if len(components) == 1:
        return next(iter(components.values()))
    return str(embedders.ensemble_version(dict(components), dict(weights)))


def primary_model(weights: Mapping[str, float]) -> str:
    return sorted(weights, key=lambda m: (-weights[m], m))[0]


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

    def append(self, deer_ids: np.ndarray, vectors: Sequence[np.ndarray]) -> None:
        k = len(deer_ids)
        if k == 0:
            return
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
        r = np.arange(k)
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


# --------------------------------------------------------------------------------------------
# The decision
# --------------------------------------------------------------------------------------------

@dataclass
class DecisionSummary:
    partition_key: str
    decided: int = 0                 # sightings of this partition decided now
    matched: int = 0
    new_deer: int = 0
    unassigned: int = 0              # detections of this partition left without a deer
    unassigned_reasons: dict[str, int] = field(default_factory=dict)
    unassigned_ids: list[str] = field(default_factory=list)
    encounters: int = 0
    replayed: int = 0                # sightings of other partitions withdrawn and decided again
    replayed_partitions: list[str] = field(default_factory=list)
    threshold: float = 0.0
    thresholds_by_sex: dict[str, float] = field(default_factory=dict)
    embedding_version: str = ""
    components: dict[str, str] = field(default_factory=dict)
    search: str = ""
    gallery_size: int = 0            # stored sightings the run started from (after withdrawal)
    max_similarity: float | None = None
    score_rows: int = 0
    deer_total: int = 0
    deer_removed: int = 0
    deer_ids: list[int] = field(default_factory=list)
    hnsw_requeries: int = 0
    hnsw_exact_fallbacks: int = 0
    seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)   # prepare / decide / write

    @property
    def assignment_rate(self) -> float:
        """Share of decided sightings that joined a known deer."""
        return self.matched / self.decided if self.decided else 0.0

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("unassigned_ids", "deer_ids")}
        d["assignment_rate"] = self.assignment_rate
        return d


def _components_json(models: Sequence[str], values: Sequence[float]) -> str:
    return "{" + ", ".join(f'"{m}": {v:.6f}' for m, v in zip(models, values)) + "}"


def _box(d: store.DetectionRow) -> DetectionBox:
    return DetectionBox(d.detection_id, d.image_id, d.captured_at, d.burst_id,
                        d.x, d.y, d.w, d.h, d.sex)


def _unassigned_reason(d: store.DetectionRow, states: Mapping[str, str], versions: Sequence[str]) -> str:
    if not states:
        if d.crop_status and d.crop_status != "ok":
            return f"crop {d.crop_status}"
        return "not embedded" if d.crop_status else "no crop"
    missing = [v for v in versions if states.get(v) != "ok"]
    if any(states.get(v) == "failed" for v in missing):
        return "embedding failed"
    if any(st == "ok" for st in states.values()):
        return "embedded with another version only" if len(missing) == len(versions) \
            else "missing a component version"
    return "embedding failed"


class _SexBook:
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


def decide_partition(engine: Engine, camera_id: str, day: str | date,
                     settings: MatchingSettings | None = None,
                     versions: Mapping[str, str] | None = None,
                     link: LinkSettings = LinkSettings()) -> DecisionSummary:
    """Decide (or re-decide) every sighting of one camera x day partition; see module doc.

    ``versions`` maps each model of ``settings.ensemble_weights`` to an embedding version; when
    None the newest stored version of each model is used. Raises ``MatchingError`` (nothing is
    written, no deer created) when vectors for the configured versions are missing."""
    settings = settings or MatchingSettings()
    t_start = time.perf_counter()
    day = str(day)
    pkey = store.partition_key_text(camera_id, day)
    weights = dict(settings.ensemble_weights)
    models = sorted(weights, key=lambda m: (-weights[m], m))   # primary model first
    summary = DecisionSummary(partition_key=pkey, threshold=settings.reid_threshold,
                              thresholds_by_sex=dict(settings.thresholds_by_sex))

    with _blas_threads(BLAS_THREADS), engine.begin() as conn, db.advisory_lock(conn, db.IDENTITY_LOCK_KEY):
        comps = store.resolve_versions(conn, models, versions)
        vers = [comps[m] for m in models]
        vkey = ensemble_version(comps, weights)
        summary.components, summary.embedding_version = comps, vkey

        # -- this partition's detections: decidable or reported as unassigned ----------------
        dets = store.partition_detections(conn, camera_id, day)
        states = store.embedding_states(conn, [d.detection_id for d in dets])
        decidable = []
        reasons: Counter = Counter()
        for d in dets:
            st = states.get(d.detection_id, {})
            if all(st.get(v) == "ok" for v in vers):
                decidable.append(d)
            else:
                reasons[_unassigned_reason(d, st, vers)] += 1
                summary.unassigned_ids.append(d.detection_id)
        summary.unassigned = len(dets) - len(decidable)
        summary.unassigned_reasons = dict(reasons)
        if dets and not decidable and any(st == "ok" for s in states.values() for st in s.values()):
            found = sorted({v for s in states.values() for v, st in s.items() if st == "ok"})
            raise MatchingError(
                f"partition {pkey}: its detections are embedded with {found} but none has vectors "
                f"for every configured version {comps}; refusing to decide (no deer created)")

        new_encs = build_encounters([_box(d) for d in decidable], link)

        # -- withdraw this partition's decisions and everything from its first moment on ------
        starts = [e.started_at for e in new_encs if e.started_at is not None]
        prior = store.earliest_decided_time(conn, pkey)
        if prior is not None:
            starts.append(prior)
        since = min(starts) if starts else None
        withdrawn = store.withdraw(conn, pkey, since)
        own_ids = {d.detection_id for d in dets}
        replay_rows = [w for w in withdrawn if w.partition_key != pkey and w.detection_id not in own_ids]
        replay_part = {w.detection_id: w.partition_key for w in replay_rows}
        summary.replayed = len(replay_rows)
        summary.replayed_partitions = sorted(set(replay_part.values()))
        replay_dets = store.detections_by_id(conn, list(replay_part))
        groups: dict[str, list[DetectionBox]] = defaultdict(list)
        for w in replay_rows:
            groups[w.encounter_key].append(_box(replay_dets[w.detection_id]))
        replay_encs = [Encounter(k, sorted(v, key=order_key)) for k, v in groups.items()]

        encounters = sorted(new_encs + replay_encs, key=lambda e: e.sort_key)
        summary.encounters = len(new_encs)
        no_link = cannot_link(encounters)

        # -- gallery, query vectors ----------------------------------------------------------
        store.check_gallery_vectors(conn, vers)
        n_static = store.gallery_size(conn)
        summary.gallery_size = n_static
        mode = settings.search
        if mode == "auto":
            mode = "exact" if n_static < settings.exact_search_max_gallery else "hnsw"
        summary.search = mode
        sexes = _SexBook(store.gallery_deer_sex_counts(conn))
        gallery = Gallery(models, weights)
        if mode == "exact" and n_static:
            g_deer, g_mats, _ = store.gallery_vectors(conn, vers)
            gallery.append(g_deer, [unit_rows(m) for m in g_mats])
        loaded: set[int] = set()

        ids = [d.detection_id for e in encounters for d in e.detections]
        qv = {}
        for m, v in zip(models, vers):
            got = store.load_vectors(conn, ids, v)
            missing = [i for i in ids if i not in got]
            if missing:
                raise MatchingError(f"{len(missing)} detection(s) to decide have no vector for "
                                    f"{v!r} (e.g. {missing[:3]}); no deer created")
            qv[m] = got
        # the index holds every version's vectors: only a scan as large as the index is complete
        total_index_rows = store.embedding_row_count(conn) if mode == "hnsw" else 0
        nearest = store.NearestSightings(conn, vers[0]) if mode == "hnsw" else None

        t_loaded = time.perf_counter()
        summary.phase_seconds["prepare"] = round(t_loaded - t_start, 3)
        # -- decide in capture-time order ------------------------------------------------------
        deer_of: dict[str, int] = {}
        founders: dict[int, tuple[str, str]] = {}
        sighting_rows: list[list] = []
        score_rows: list[list] = []
        next_prov = -1
        max_sim = None
        for c0 in range(0, len(encounters), CHUNK_ENCOUNTERS):
            chunk = encounters[c0: c0 + CHUNK_ENCOUNTERS]
            q_all = [unit_rows(np.vstack([qv[m][d.detection_id] for e in chunk for d in e.detections]))
                     for m in models]
            n0 = gallery.n
            deer0, M0 = per_deer_max(gallery.scores(q_all, 0, n0), gallery.deer[:n0]) if n0 else \
                (np.zeros(0, np.int64), np.zeros((len(q_all[0]), 0), np.float32))
            pos = 0
            for enc in chunk:
                k = len(enc.detections)
                q = [qa[pos: pos + k] for qa in q_all]
                enc_M0 = M0[pos: pos + k]
                pos += k
                enc_sex = enc.sex
                excluded = {deer_of[o] for o in no_link.get(enc.encounter_key, ()) if o in deer_of}

                if mode == "hnsw":
                    need = min(settings.candidate_deer,
                               sexes.eligible_static_rows(enc_sex, settings.sex_filter, excluded))
                    if need > 0:
                        found = _hnsw_candidates(nearest, q[0], need, settings, sexes, enc_sex,
                                                 excluded, total_index_rows, summary)
                        fresh = [d for d in found if d not in loaded]
                        if fresh:
                            f_deer, f_mats, _ = store.gallery_vectors(conn, vers, deer_ids=fresh)
                            gallery.append(f_deer, [unit_rows(m) for m in f_mats])
                            loaded.update(fresh)

                deer_ids, M = deer0, enc_M0
                n1 = gallery.n
                if n1 > n0:       # rows added since the chunk was scored: decided or loaded since
                    dx, Mx = per_deer_max(gallery.scores(q, n0, n1), gallery.deer[n0:n1])
                    at = np.searchsorted(deer0, dx)
                    known = at < len(deer0)
                    known[known] = deer0[at[known]] == dx[known]
                    M = enc_M0.copy()
                    M[:, at[known]] = np.maximum(M[:, at[known]], Mx[:, known])
                    deer_ids = np.concatenate([deer0, dx[~known]])
                    M = np.hstack([M, Mx[:, ~known]])

                ranked = _top_candidates(deer_ids, M.max(axis=0) if len(deer_ids) else np.zeros(0),
                                         settings, sexes, enc_sex, excluded)
                # exact re-score of the candidates (float64, per deer): what is stored and decided
                cands = [(cand, float(sims.max()), sims, comp) for (cand, _), (sims, comp)
                         in zip(ranked, gallery.best_pairs(q, [c for c, _ in ranked]))]
                cands.sort(key=lambda c: (-c[1], c[0]))
                threshold = settings.threshold_for(enc_sex)
                best_deer, best_score = (cands[0][:2] if cands else (None, None))
                own = enc.detections[0].detection_id not in replay_part
                if best_score is not None and own:
                    max_sim = best_score if max_sim is None else max(max_sim, best_score)
                if best_deer is not None and best_score >= threshold:
                    deer, decision = best_deer, "matched"
                else:
                    deer, decision = next_prov, "new"
                    founders[next_prov] = (enc.founding_detection_id, enc_sex)
                    next_prov -= 1

                for cand, _, sims, comp in cands:
                    sm = sex_compatible(enc_sex, sexes.sex(cand))
                    for d, s, cm in zip(enc.detections, sims, comp):
                        score_rows.append([d.detection_id, enc.encounter_key, cand, float(s),
                                           _components_json(models, cm), sm, cand == deer, threshold,
                                           vkey, replay_part.get(d.detection_id, pkey)])
                for d in enc.detections:
                    sighting_rows.append([d.detection_id, deer, enc.encounter_key,
                                          replay_part.get(d.detection_id, pkey), decision,
                                          best_score, threshold, vkey, d.captured_at])
                deer_of[enc.encounter_key] = deer
                gallery.append(np.full(k, deer, np.int64), q)
                sexes.add(deer, [d.sex for d in enc.detections])
                if own:
                    summary.decided += k
                    if decision == "matched":
                        summary.matched += k
                    else:
                        summary.new_deer += 1

        t_decided = time.perf_counter()
        summary.phase_seconds["decide"] = round(t_decided - t_loaded, 3)
        # -- write -----------------------------------------------------------------------------
        real = store.create_deer(conn, founders)

        def _real(x):
            return real.get(x, x)

        for r in sighting_rows:
            r[1] = _real(r[1])
        for r in score_rows:
            r[2] = _real(r[2])
        store.copy_rows(conn, "sightings", store.SIGHTING_COLUMNS, sighting_rows)
        summary.score_rows = store.copy_rows(conn, "similarity_scores", store.SCORE_COLUMNS, score_rows)
        affected = {w.deer_id for w in withdrawn} | {r[1] for r in sighting_rows}
        summary.deer_removed = store.finish_deer(conn, affected, vers)
        summary.deer_total = store.deer_total(conn)
        summary.deer_ids = sorted({r[1] for r in sighting_rows if r[3] == pkey})
        summary.max_similarity = None if max_sim is None else float(max_sim)

    summary.seconds = time.perf_counter() - t_start
    summary.phase_seconds["write"] = round(summary.seconds - (t_decided - t_start), 3)
    log.info("decided %s: %d sightings, %d matched, %d new deer, %d unassigned, %d replayed (%s, %.2fs)",
             pkey, summary.decided, summary.matched, summary.new_deer, summary.unassigned,
             summary.replayed, summary.search, summary.seconds)
    return summary


def _blas_threads(n: int):
    """Limit BLAS threads (threadpoolctl ships with scikit-learn, a pinned dependency)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=n, user_api="blas")


def _eligible(deer_id: int, settings: MatchingSettings, sexes: _SexBook, enc_sex: str,
              excluded: set[int]) -> bool:
    if deer_id in excluded:
        return False
    return not settings.sex_filter or sex_compatible(enc_sex, sexes.sex(deer_id))


def _top_candidates(deer_ids: np.ndarray, enc_scores: np.ndarray, settings: MatchingSettings,
                    sexes: _SexBook, enc_sex: str, excluded: set[int]) -> list[tuple[int, float]]:
    """The best ``candidate_deer`` eligible deer, best first (ties by deer id)."""
    n = len(deer_ids)
    if n == 0:
        return []
    want = settings.candidate_deer
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
                     settings: MatchingSettings, sexes: _SexBook, enc_sex: str, excluded: set[int],
                     total_index_rows: int, summary: DecisionSummary) -> set[int]:
    """Stored deer near any detection of the encounter by the primary model's HNSW index.

    A scan must return at least ``need`` eligible gallery rows (right version, decided, sex and
    cannot-link allowed); when the post-scan filters leave fewer, ef_search is doubled (up to
    1000) and the query repeated, then an exact scan is used. The best ``candidate_deer`` deer
    are returned for exact re-scoring on their whole gallery."""
    found: dict[int, float] = {}
    for q in q_primary:
        ef = max(settings.hnsw_ef_search, settings.candidate_deer)
        while True:
            rows = nearest.query(q, min(ef, HNSW_MAX_EF))
            ok = [(d, sim) for d, sim in rows if _eligible(d, settings, sexes, enc_sex, excluded)]
            if len(ok) >= need or total_index_rows <= ef:
                break
            if ef >= HNSW_MAX_EF:
                ok = [(d, sim) for d, sim in nearest.exact(q)
                      if _eligible(d, settings, sexes, enc_sex, excluded)]
                summary.hnsw_exact_fallbacks += 1
                break
            ef = min(ef * 2, HNSW_MAX_EF)
            summary.hnsw_requeries += 1
        for d, sim in ok:
            if sim > found.get(d, -np.inf):
                found[d] = sim
    return set(sorted(found, key=lambda d: (-found[d], d))[: settings.candidate_deer])
