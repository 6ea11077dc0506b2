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
(serial, parallel, re-runs). ``decide_partitions`` decides several partitions (for example every
camera of a day) jointly in one such transaction: one withdrawal from the earliest moment of any
of them, one replay; ``decide_partition`` is its one-partition case. Deer are keyed by ``founding_detection_id``; a deer withdrawn and
founded again by the same detection keeps its ``deer_id``.

The unit of decision is the encounter (a burst track, ``encounters.py``): all its detections go
to one deer. Encounters that share a frame never go to the same deer.

People's decisions (``identity/reviews.py``) are constraints applied at one hook in
``_decide_in_time_order``: a must-link ("same", "merge") makes the encounter join the deer that
holds the other sightings, a cannot-link ("different", "new", "split") excludes deer like the
same-frame rule, and sightings marked unidentifiable are not decided at all.

Scoring. A deer is its gallery: every stored sighting of it, one vector per component model. For
each model the cosine of two unit vectors is their dot product; the ensemble similarity is the
weighted sum of per-model cosines (``embedding.models.weighted_cosine``, the single place this is computed).
The encounter-to-deer score is the MAXIMUM over (encounter detection x deer sighting) pairs: a
deer photographed from the side and from behind is recognised when the new photo resembles
either; a mean profile would blur poses together and an average over pairs would punish deer with
varied galleries. The price is that a large gallery offers more chances for a chance look-alike,
which the threshold report and the merge-candidate check watch.

Candidate retrieval. The gallery is held in memory (``gallery.py``: every stored sighting's
vectors in one matrix, the models side by side, rows grouped by deer) and kept across decisions
of a process (``gallery_cache.py``): each decision applies its own changes to it, and a gallery
whose generation differs from the store's (``gallery_generation``, bumped by triggers on every
write to sightings) is reloaded with one binary COPY, never used. ``exact`` scores every gallery
row (one matmul per chunk of encounters, the ensemble weights folded into the query; sightings
decided during the run are added as they are decided). ``two_stage`` ranks deer by their profile
vectors (per model and flank the unit mean of the deer's sightings, kept up to date in memory; a
known flank is ranked against its own flank's profile) and re-scores the best
``profile_candidate_deer`` exactly on all their sightings (bench/matching.py and
bench/two_stage_real.py measure its agreement with ``exact``). A chunk's candidates are planned
together (``candidates._ChunkPlan``: the same candidates as encounter by encounter, tested), and
the chunk's product may use bfloat16 inputs where the CPU has bfloat16 units (``coarse.py``:
ranking only; every stored score is float64, and close calls go back to float32). In every mode the score kept and compared with the threshold is the
float64 weighted sum of the best pair's per-model cosines. ``hnsw`` asks pgvector's HNSW index
for the nearest stored sightings of the primary (highest-weight) model per detection and
re-scores the candidate deer exactly on their whole gallery and all models. pgvector 0.6 applies
WHERE filters (version, gallery membership, sex) after the index scan and returns at most
``hnsw.ef_search`` rows, so when too few eligible deer come back the query is repeated with a
doubled ef_search (up to 1000) and finally replaced by an exact sequential scan. ``auto`` =
exact below ``exact_search_max_gallery`` stored sightings, else two_stage.

Plain logic: no Dagster here.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import date
from typing import Mapping, Sequence

import numpy as np
from sqlalchemy.engine import Engine

from deer_pipeline import db
from deer_pipeline.detections.encounters import (
    DetectionBox,
    Encounter,
    LinkSettings,
    build_encounters,
    cannot_link,
    order_key,
)
from deer_pipeline.embedding import models as embedders
from deer_pipeline.identity import gallery_cache, reviews, store
from deer_pipeline.identity.flanks import SideBook, flank_filtered
from deer_pipeline.identity.candidates import (
    _ChunkPlan,
    _chunk_scores,
    _prepare_search,
    _Rescorer,
    _scored_candidates,
    _Search,
    _with_candidate,
)
from deer_pipeline.identity.gallery import compatible_sex_codes, sex_compatible
from deer_pipeline.identity.store import MatchingError
from deer_pipeline.settings import MatchingSettings

log = logging.getLogger(__name__)


CHUNK_ENCOUNTERS = 64       # encounters scored together against the gallery (one matmul)
PLAN_CHUNKS = True          # cosine, exact / two_stage: plan a chunk's candidates together (candidates._ChunkPlan)


# BLAS threads while deciding. The matrices are small to medium and OpenBLAS threads spin and
# wait for each other: on a 2-core machine that is busy with other work (Dagster, PostgreSQL, a
# second run) one thread is faster, often by 10x for the per-encounter products.
BLAS_THREADS = 1


__all__ = ["MatchingError", "DecisionSummary", "decide_partition", "decide_partitions",
           "ensemble_version", "sex_compatible", "primary_model"]


def ensemble_version(components: Mapping[str, str], weights: Mapping[str, float]) -> str:
    """The name stored with each decision for the set of component versions in use.

    A single model is its own version; an ensemble is named by ``embedders.ensemble_version``."""
    if len(components) == 1:
        return next(iter(components.values()))
    return str(embedders.ensemble_version(dict(components), dict(weights)))


def primary_model(weights: Mapping[str, float]) -> str:
    return sorted(weights, key=lambda m: (-weights[m], m))[0]


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
    gallery_cache: str = ""          # hit (kept in memory) | none / stale (read from the store) | off
    reviewed: int = 0                # sightings of this partition whose decision a review fixed
    excluded_by_review: int = 0      # detections of this partition a review made unidentifiable
    local_verification: dict = field(default_factory=dict)   # local/fused: verifier counts and reasons
    coarse_precision: str = ""       # the pass that ranks deer: float32 | bfloat16 (identity/coarse.py)
    plan_fallbacks: int = 0          # encounters the chunk's plan handed back to the one-by-one rule
    other_flank_only: int = 0        # cosine, flank-aware: candidate deer not compared (only their other flank known)
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


def decide_partition(engine: Engine, camera_id: str, day: str | date,
                     settings: MatchingSettings | None = None,
                     versions: Mapping[str, str] | None = None,
                     link: LinkSettings = LinkSettings(), verifier=None) -> DecisionSummary:
    """Decide (or re-decide) every sighting of one camera x day partition; see module doc. The
    one-partition case of :func:`decide_partitions`."""
    return decide_partitions(engine, [(camera_id, day)], settings, versions, link, verifier)[0]


def decide_partitions(engine: Engine, partitions: Sequence[tuple[str, str | date]],
                      settings: MatchingSettings | None = None,
                      versions: Mapping[str, str] | None = None,
                      link: LinkSettings = LinkSettings(), verifier=None) -> list[DecisionSummary]:
    """Decide several camera x day partitions jointly, in ONE transaction under the identity
    lock: one withdrawal from the earliest moment of any of them, one replay, all their
    encounters decided in capture-time order. Returns one summary per partition, in the given
    order, with that partition's own counts; what the call shares (``replayed``, the search,
    the gallery size, ``deer_total``, ``deer_removed``, timings) is the same in every summary.
    ``replayed`` counts sightings of partitions NOT in ``partitions`` that were decided again.

    Decisions do not depend on the order partitions are decided in, so the store ends exactly as
    if the partitions had been decided one by one with :func:`decide_partition` (tested).

    ``versions`` maps each model of ``settings.ensemble_weights`` to an embedding version; when
    None the newest stored version of each model is used. Raises ``MatchingError`` (nothing is
    written, no deer created, for any of the partitions) when vectors for the configured versions
    are missing.

    ``settings.match_score`` ``local`` or ``fused``: the best candidate sightings are verified
    with local features (``verifier``, a :class:`verification.Verifier`; by default one on the
    configured crop store) and, for ``fused``, scored by the stored calibration (see
    :class:`_Rescorer`)."""
    parts = [(str(c), str(d)) for c, d in partitions]
    keys = [store.partition_key_text(c, d) for c, d in parts]
    if len(set(keys)) != len(keys):
        raise ValueError(f"decide_partitions: a partition is named twice in {keys}")
    if not keys:
        return []
    settings = settings or MatchingSettings()
    if settings.match_score != "cosine":
        settings = dataclasses.replace(settings, candidate_deer=max(settings.candidate_deer, settings.verify_top_k))
    t_start = time.perf_counter()
    weights = dict(settings.ensemble_weights)
    models = sorted(weights, key=lambda m: (-weights[m], m))   # primary model first
    summaries = {k: DecisionSummary(partition_key=k, threshold=settings.reid_threshold,
                                    thresholds_by_sex=dict(settings.thresholds_by_sex)) for k in keys}
    run = DecisionSummary(partition_key=",".join(keys))        # what the partitions share
    keep = None                  # (cache key, generation, gallery) to keep once committed
    with _blas_threads(BLAS_THREADS), engine.begin() as conn, db.advisory_lock(conn, db.IDENTITY_LOCK_KEY):
        generation = store.lock_gallery_generation(conn)
        comps = store.resolve_versions(conn, models, versions)
        vers = [comps[m] for m in models]
        run.components, run.embedding_version = comps, ensemble_version(comps, weights)
        key = gallery_cache.cache_key(engine, vers, weights)
        cached, run.gallery_cache = gallery_cache.checkout(key, generation) if settings.gallery_cache \
            else (None, "off")
        # -- people in the loop: standing review decisions (identity/reviews.py) --------------
        constraints = reviews.load_constraints(conn)
        own_dets, new_encs, part_of = [], [], {}
        for (camera_id, day), k in zip(parts, keys):
            sm = summaries[k]
            dets, decidable = _decidable_detections(conn, camera_id, day, comps, vers, sm)
            if constraints.excluded:
                sm.excluded_by_review = sum(d.detection_id in constraints.excluded for d in decidable)
                decidable = [d for d in decidable if d.detection_id not in constraints.excluded]
            encs = build_encounters([_box(d) for d in decidable], link)
            sm.encounters = len(encs)
            own_dets += dets
            new_encs += encs
            part_of.update((d.detection_id, k) for d in decidable)
        encounters, withdrawn = _withdraw_for_replay(conn, keys, own_dets, new_encs, part_of, run,
                                                     constraints.excluded)
        review = reviews.ReviewTracker(constraints, reviews.stored_deer(conn, constraints.involved())) \
            if constraints else None
        search = _prepare_search(conn, settings, models, weights, vers, run, cached,
                                 [w.detection_id for w in withdrawn])
        qv = _query_vectors(conn, encounters, models, vers)
        rescorer = _Rescorer.for_settings(conn, engine, settings, verifier, run) \
            if settings.match_score != "cosine" else None
        book = SideBook()            # the flank of every detection to decide, read once
        book.load(conn, [d.detection_id for e in encounters for d in e.detections])
        search.book = book
        search.flanks = book if settings.flank_aware and rescorer is None else None   # cosine: flank-aware
        t_loaded = time.perf_counter()
        run.phase_seconds["prepare"] = round(t_loaded - t_start, 3)
        out = _decide_in_time_order(conn, encounters, qv, search, settings, models, part_of, summaries, run,
                                    review, rescorer)
        if rescorer is not None:
            run.local_verification.update(rescorer.verifier.metadata())
        t_decided = time.perf_counter()
        run.phase_seconds["decide"] = round(t_decided - t_loaded, 3)
        _write_decisions(conn, out, withdrawn, vers, summaries, run, search)
        reviews.record_decision_settings(conn, settings, comps)
        if settings.gallery_cache and search.complete:
            keep = (key, store.gallery_generation(conn), search.gallery)
    if keep is not None:
        gallery_cache.checkin(*keep)
    run.seconds = time.perf_counter() - t_start
    run.phase_seconds["write"] = round(run.seconds - (t_decided - t_start), 3)
    for sm in summaries.values():
        for name in SHARED_FIELDS:
            setattr(sm, name, copy.deepcopy(getattr(run, name)))
        sm.score_rows += run.score_rows
        log.info("decided %s: %d sightings, %d matched, %d new deer, %d unassigned, %d replayed (%s, %.2fs)",
                 sm.partition_key, sm.decided, sm.matched, sm.new_deer, sm.unassigned,
                 sm.replayed, sm.search, sm.seconds)
    return [summaries[k] for k in keys]


# Summary fields that describe the whole call, copied into every partition's summary.
SHARED_FIELDS = ("replayed", "replayed_partitions", "embedding_version", "components", "search",
                 "gallery_size", "gallery_cache", "deer_total", "deer_removed", "hnsw_requeries",
                 "hnsw_exact_fallbacks", "coarse_precision", "plan_fallbacks", "local_verification", "other_flank_only", "seconds", "phase_seconds")


def _decidable_detections(conn, camera_id: str, day: str, comps: Mapping[str, str], vers: list[str],
                          summary: DecisionSummary) -> tuple[list, list]:
    """This partition's detections, and those with a vector of every version (the others are
    reported as unassigned). Refuses when vectors exist only for other versions."""
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
            f"partition {summary.partition_key}: its detections are embedded with {found} but none has "
            f"vectors for every configured version {dict(comps)}; refusing to decide (no deer created)")
    return dets, decidable


def _withdraw_for_replay(conn, keys: list[str], dets, new_encs: list[Encounter], part_of: dict[str, str],
                         run: DecisionSummary, excluded: Mapping[str, int] = {}) -> tuple[list[Encounter], list]:
    """Withdraw the partitions' decisions and every decision from their first moment on; returns
    (every encounter to decide, in capture-time order; the withdrawn rows) and adds each replayed
    detection's partition to ``part_of``. Detections a review made unidentifiable are withdrawn,
    not replayed."""
    starts = [e.started_at for e in new_encs if e.started_at is not None]
    prior = store.earliest_decided_time(conn, keys)
    if prior is not None:
        starts.append(prior)
    since = min(starts) if starts else None
    withdrawn = store.withdraw(conn, keys, since)
    own_keys, own_ids = set(keys), {d.detection_id for d in dets}
    replay_rows = [w for w in withdrawn if w.partition_key not in own_keys and w.detection_id not in own_ids
                   and w.detection_id not in excluded]
    part_of.update((w.detection_id, w.partition_key) for w in replay_rows)
    run.replayed = len(replay_rows)
    run.replayed_partitions = sorted({w.partition_key for w in replay_rows})
    replay_dets = store.detections_by_id(conn, [w.detection_id for w in replay_rows])
    groups: dict[str, list[DetectionBox]] = defaultdict(list)
    for w in replay_rows:
        groups[w.encounter_key].append(_box(replay_dets[w.detection_id]))
    replay_encs = [Encounter(k, sorted(v, key=order_key)) for k, v in groups.items()]
    return sorted(new_encs + replay_encs, key=lambda e: e.sort_key), withdrawn


def _query_vectors(conn, encounters: list[Encounter], models: list[str], vers: list[str]) -> dict:
    """model -> detection id -> vector of every detection to decide (or ``MatchingError``)."""
    ids = [d.detection_id for e in encounters for d in e.detections]
    qv = {}
    for m, v in zip(models, vers):
        got = store.load_vectors(conn, ids, v)
        missing = [i for i in ids if i not in got]
        if missing:
            raise MatchingError(f"{len(missing)} detection(s) to decide have no vector for "
                                f"{v!r} (e.g. {missing[:3]}); no deer created")
        qv[m] = got
    return qv


@dataclass
class _Outcome:
    """The decisions of one run of the rule, before they are written."""

    deer_of: dict[str, int] = field(default_factory=dict)            # encounter -> deer
    founders: dict[int, tuple[str, str]] = field(default_factory=dict)
    sighting_rows: list[list] = field(default_factory=list)
    score_blocks: list[store.ScoreBlock] = field(default_factory=list)
    next_prov: int = -1                                              # provisional ids of new deer
    max_sim: dict[str, float] = field(default_factory=dict)          # partition -> best score seen
    score_models: list[str] = field(default_factory=list)            # the components of each score row


def _decide_in_time_order(conn, encounters: list[Encounter], qv: dict, search: _Search,
                          settings: MatchingSettings, models: list[str], part_of: Mapping[str, str],
                          summaries: Mapping[str, DecisionSummary], run: DecisionSummary,
                          review: reviews.ReviewTracker | None = None,
                          rescorer: "_Rescorer | None" = None) -> _Outcome:
    """Match-or-create for every encounter in capture-time order; each decided encounter joins
    the gallery before the next one is decided. Encounters are scored in chunks (one matmul).
    ``part_of``: detection -> its partition; ``summaries``: the partitions being decided (the
    others' encounters are replayed). ``review`` applies people's decisions: must-link forces
    the deer, cannot-link excludes deer."""
    out = _Outcome()
    no_link = cannot_link(encounters)
    gallery = search.gallery
    planned = PLAN_CHUNKS and rescorer is None and search.mode in ("exact", "two_stage")
    for c0 in range(0, len(encounters), CHUNK_ENCOUNTERS):
        chunk = encounters[c0: c0 + CHUNK_ENCOUNTERS]
        q_all = [np.vstack([qv[m][d.detection_id] for e in chunk for d in e.detections]).astype(np.float32)
                 for m in models]
        n0 = gallery.n
        chunk_ids = [d.detection_id for e in chunk for d in e.detections]
        plan = None
        if planned and n0:
            plan = _ChunkPlan(search, settings, [len(e.detections) for e in chunk], [e.sex for e in chunk],
                              gallery.fold(q_all), q_all, n0, conn, chunk_ids)
        else:
            deer0, M0 = _chunk_scores(search, q_all, n0, conn, chunk_ids)
        pos = 0
        for i_enc, enc in enumerate(chunk):
            k = len(enc.detections)
            q = [qa[pos: pos + k] for qa in q_all]
            if plan is None:
                enc_M0 = M0[pos: pos + k]
            pos += k
            own = summaries.get(part_of[enc.detections[0].detection_id])
            excluded = {out.deer_of[o] for o in no_link.get(enc.encounter_key, ()) if o in out.deer_of}
            forced = None                # review hook: must-link -> forced deer, cannot-link -> excluded
            if review is not None and review.constrained(enc.detection_ids):
                forced, refused = review.verdict(enc.detection_ids)
                excluded |= refused
                if (forced is not None or refused) and own is not None:
                    own.reviewed += k
            cands = None
            if plan is not None:
                cands = plan.candidates(i_enc, q, enc.detection_ids, excluded, search, settings, enc.sex, conn)
                if cands is not None:
                    cands, n_other = _completed(conn, enc, q, cands, search, forced)
                    if forced is None and not plan.decisive(i_enc, cands, settings.threshold_for(enc.sex)):
                        cands = None
                if cands is None:
                    run.plan_fallbacks += 1
                    deer0, enc_M0 = plan.fallback_scores(i_enc, q, search, conn, enc.detection_ids)
            if cands is None:
                cands = _scored_candidates(conn, enc, q, deer0, enc_M0, n0, excluded, search, settings, run)
                cands, n_other = _completed(conn, enc, q, cands, search, forced)
            run.other_flank_only += n_other
            names = models
            if rescorer is not None:
                cands = rescorer.rescore(enc, q, cands, search.gallery)
                names = models + ["local_inliers"]
            _decide_encounter(enc, q, cands, out, search, settings, names, part_of, own, run, forced)
            if review is not None:
                review.decided(enc.detection_ids, out.deer_of[enc.encounter_key])
    return out


def _completed(conn, enc: Encounter, q: list[np.ndarray], cands: list[tuple], search: _Search,
               forced: int | None) -> tuple[list[tuple], int]:
    """The candidates with the deer a person named (``forced``) among them, and flank-aware:
    the other flank of a deer not compared (``flanks.flank_filtered``); returns (candidates,
    deer dropped because only their other flank is known)."""
    if forced is not None:
        cands = _with_candidate(conn, cands, forced, q, search)
    if search.flanks is None:
        return cands, 0
    return flank_filtered(conn, enc.detection_ids, q, cands, search.gallery, search.flanks, forced)


def _decide_encounter(enc: Encounter, q: list[np.ndarray], cands: list[tuple], out: _Outcome,
                      search: _Search, settings: MatchingSettings, models: list[str],
                      part_of: Mapping[str, str], own: DecisionSummary | None, run: DecisionSummary,
                      forced: int | None = None) -> None:
    """Join the best candidate at or above the threshold, else found a new deer; record the
    sightings and every score looked at; the encounter joins the gallery. ``own``: the summary
    of the encounter's partition when it is one being decided (None: replayed). ``forced``: the
    deer a person said this is (joined whatever the score; the score is recorded as it is)."""
    vkey, enc_sex, k = run.embedding_version, enc.sex, len(enc.detections)
    pkey = part_of[enc.detections[0].detection_id]
    threshold = settings.threshold_for(enc_sex)
    out.score_models = models
    best_deer, best_score = (cands[0][:2] if cands else (None, None))
    if forced is not None:
        best_deer, best_score = forced, next(c[1] for c in cands if c[0] == forced)
    if best_score is not None and own is not None:
        out.max_sim[pkey] = max(out.max_sim.get(pkey, best_score), best_score)
    if best_deer is not None and (best_score >= threshold or best_deer == forced):
        deer, decision = best_deer, "matched"
    else:
        deer, decision = out.next_prov, "new"
        out.founders[out.next_prov] = (enc.founding_detection_id, enc_sex)
        out.next_prov -= 1
    det_ids = enc.detection_ids
    if cands:
        ids = np.fromiter((c[0] for c in cands), np.int64, len(cands))
        sims = np.stack([c[2] for c in cands], axis=1)                   # detections x candidates
        comps = np.stack([c[3] for c in cands], axis=1)                  # detections x candidates x models
        sexm = compatible_sex_codes(enc_sex, search.sexes.codes(ids))
    else:
        ids, sims, comps, sexm = np.zeros(0, np.int64), np.zeros((k, 0)), np.zeros((k, 0, len(models))), np.zeros(0, bool)
    out.score_blocks.append(store.ScoreBlock(det_ids, enc.encounter_key, [part_of[d] for d in det_ids],
                                             ids, sims, comps, sexm, deer, threshold))
    for d in enc.detections:
        out.sighting_rows.append([d.detection_id, deer, enc.encounter_key, part_of[d.detection_id],
                                  decision, best_score, threshold, vkey, d.captured_at])
    out.deer_of[enc.encounter_key] = deer
    search.gallery.append(np.full(k, deer, np.int64), q, det_ids, [d.sex for d in enc.detections],
                          [search.book.side(d) if search.book is not None else None for d in det_ids])
    search.sexes.add(deer, [d.sex for d in enc.detections])
    if own is not None:
        own.decided += k
        if decision == "matched":
            own.matched += k
        else:
            own.new_deer += 1


def _write_decisions(conn, out: _Outcome, withdrawn: list, vers: list[str],
                     summaries: Mapping[str, DecisionSummary], run: DecisionSummary, search: _Search) -> None:
    """New deer get real ids (in the in-memory gallery too); sightings and scores are written
    with COPY; the deer touched get their counts and profile vectors (from the gallery when it
    holds every sighting). Score rows of replayed partitions count in ``run``."""
    real = store.create_deer(conn, out.founders)
    search.gallery.relabel(real)
    for r in out.sighting_rows:
        r[1] = real.get(r[1], r[1])
    store.copy_rows(conn, "sightings", store.SIGHTING_COLUMNS, out.sighting_rows)
    scores = store.score_arrays(out.score_blocks, real)
    store.copy_scores(conn, scores, out.score_models, run.embedding_version)
    per_det = np.bincount(scores["det"], minlength=len(scores["detection_ids"]))
    rows_by_part: Counter = Counter()
    for p, c in zip(scores["partition_keys"], per_det.tolist()):
        rows_by_part[p] += c
    deer_by_part: dict[str, set[int]] = defaultdict(set)
    for r in out.sighting_rows:
        deer_by_part[r[3]].add(r[1])
    for k, sm in summaries.items():
        sm.score_rows = rows_by_part.pop(k, 0)
        sm.deer_ids = sorted(deer_by_part.get(k, ()))
        sm.max_similarity = None if k not in out.max_sim else float(out.max_sim[k])
    run.score_rows = sum(rows_by_part.values())
    affected = {w.deer_id for w in withdrawn} | {r[1] for r in out.sighting_rows}
    run.deer_removed = store.finish_deer(conn, affected, vers, search.gallery if search.complete else None)
    run.deer_total = store.deer_total(conn)


def _blas_threads(n: int):
    """Limit BLAS threads (threadpoolctl ships with scikit-learn, a pinned dependency)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=n, user_api="blas")
