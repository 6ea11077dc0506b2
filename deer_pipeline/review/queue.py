"""The review queue: decisions a person should look at, most uncertain first.

Two kinds of item:

* ``decision``: an encounter whose best score lies nearest the threshold it was decided with
  (``|score - threshold|`` within ``margin``), with its top candidate deer;
* ``merge``: a pair of deer whose profiles are as similar as the threshold (the pairs the
  ``no_merge_candidates`` check finds, ``health.merge_candidate_pairs``).

Each item carries the query sightings and, per candidate deer, the candidate's sightings that
best match them (ensemble similarity of the stored vectors), with the scores. Items already
answered by a standing decision leave the queue; skipped items come last.

Plain logic: SQL and numpy, no web framework.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Sequence

import numpy as np
import sqlalchemy as sa

from deer_pipeline.identity import health, reviews, store
from deer_pipeline.settings import MatchingSettings

SHOWN_QUERY = 6          # query sightings shown per item
SHOWN_PER_CANDIDATE = 3  # best-matching sightings shown per candidate deer
CANDIDATES = 3           # candidate deer shown per decision item


@dataclass
class Sighting:
    detection_id: str
    camera_id: str | None
    captured_at: datetime | None
    similarity: float | None = None     # to the item's query (candidates' sightings)


@dataclass
class Candidate:
    deer_id: int
    score: float
    sightings: list[Sighting] = field(default_factory=list)
    name: str | None = None


@dataclass
class Item:
    key: str                      # decision|<encounter key>  or  merge|<founder a>|<founder b>
    kind: str                     # decision | merge
    margin: float                 # |score - threshold|: smaller = more uncertain
    score: float
    threshold: float
    query: list[Sighting]
    query_deer: int | None
    candidates: list[Candidate]
    decided_at: datetime | None = None
    decision: str | None = None   # matched | new (decision items)
    skipped: bool = False
    query_ids: list[str] = field(default_factory=list)   # every sighting of the query side

    @property
    def title(self) -> str:
        if self.kind == "merge":
            return f"Are deer #{self.query_deer} and deer #{self.candidates[0].deer_id} one animal?"
        return f"Which deer is this encounter? (decided: {self.decision}, deer #{self.query_deer})"


def _settings(conn: sa.Connection) -> tuple[MatchingSettings, dict[str, str] | None]:
    got = reviews.decision_settings(conn)
    return (got[0], got[1]) if got else (MatchingSettings(), None)


def _answered(conn: sa.Connection) -> tuple[set[str], set[str], list[reviews.Review]]:
    """(sightings whose decision a person confirmed, skipped sightings, standing decisions)."""
    done: set[str] = set()
    skipped: set[str] = set()
    standing = reviews.active_reviews(conn)
    for r in standing:
        if r.kind in ("same", "merge", "split"):
            done |= set(r.a) | set(r.b)
        elif r.kind in ("different", "new", "unidentifiable"):
            done |= set(r.a)
        elif r.kind == "skip":
            skipped |= set(r.a)
    return done, skipped, standing


def _decision_rows(conn: sa.Connection, margin: float):
    return conn.execute(sa.text(
        "SELECT s.encounter_key, min(s.deer_id) deer_id, max(s.score) score, max(s.threshold) threshold, "
        "  min(s.decision) decision, max(s.decided_at) decided_at, "
        "  array_agg(s.detection_id ORDER BY s.captured_at, s.detection_id) dets "
        "FROM sightings s WHERE s.score IS NOT NULL GROUP BY s.encounter_key "
        "HAVING abs(max(s.score) - max(s.threshold)) <= :m"), {"m": margin}).all()


def _merge_pairs(conn: sa.Connection, settings: MatchingSettings) -> list[dict]:
    deer = conn.execute(sa.text("SELECT deer_id FROM deer")).scalars().all()
    return health.merge_candidate_pairs(conn, deer, settings.ensemble_weights, settings.reid_threshold)


def _pair_refused(standing: list[reviews.Review], a: set[str], b: set[str]) -> bool:
    """Did a person already say these two sets are different animals (or one animal)?"""
    for r in standing:
        if r.kind in ("different", "new", "split", "same", "merge"):
            ra, rb = set(r.a), set(r.b)
            if (ra & a and rb & b) or (ra & b and rb & a):
                return True
    return False


def queue_keys(conn: sa.Connection, margin: float, pairs: list[dict] | None = None) -> list[tuple[float, bool, str]]:
    """(margin, skipped, key) of every open item, most uncertain first (skipped last)."""
    settings, _ = _settings(conn)
    pairs = _merge_pairs(conn, settings) if pairs is None else pairs
    done, skipped, standing = _answered(conn)
    out = []
    for r in _decision_rows(conn, margin):
        dets = set(r.dets)
        if dets & done:
            continue
        out.append((abs(float(r.score) - float(r.threshold)), bool(dets & skipped), f"decision|{r.encounter_key}"))
    members = _deer_members(conn)
    founders = dict(conn.execute(sa.text("SELECT deer_id, founding_detection_id FROM deer")).all())
    for p in pairs:
        a, b = set(members.get(p["deer_a"], ())), set(members.get(p["deer_b"], ()))
        if not a or not b or _pair_refused(standing, a, b):
            continue
        key = f"merge|{founders[p['deer_a']]}|{founders[p['deer_b']]}"
        out.append((abs(p["profile_similarity"] - settings.reid_threshold), bool(a & skipped), key))
    out.sort(key=lambda x: (x[1], x[0], x[2]))
    return out


def _deer_members(conn: sa.Connection, deer_ids: Sequence[int] | None = None) -> dict[int, list[str]]:
    where = "WHERE deer_id = ANY(:d)" if deer_ids is not None else ""
    out: dict[int, list[str]] = defaultdict(list)
    for deer, det in conn.execute(sa.text(
            f"SELECT deer_id, detection_id FROM sightings {where} ORDER BY captured_at, detection_id"),
            {"d": list(deer_ids or [])}):
        out[deer].append(det)
    return out


def _sightings(conn: sa.Connection, ids: Sequence[str]) -> dict[str, Sighting]:
    rows = conn.execute(sa.text("SELECT detection_id, camera_id, captured_at FROM detections "
                                "WHERE detection_id = ANY(:i)"), {"i": list(ids)}).all()
    return {r.detection_id: Sighting(r.detection_id, r.camera_id, r.captured_at) for r in rows}


def _best_matching(conn: sa.Connection, query: Sequence[str], gallery: Sequence[str],
                   settings: MatchingSettings, versions: dict[str, str] | None, top: int) -> list[tuple[str, float]]:
    """The gallery sightings most similar (ensemble) to any query sighting, best first."""
    if not query or not gallery:
        return []
    from deer_pipeline.embedding.models import unit_rows, weighted_cosine

    weights = dict(settings.ensemble_weights)
    try:
        comps = store.resolve_versions(conn, weights, versions)
    except store.MatchingError:
        return [(g, float("nan")) for g in list(gallery)[:top]]
    qv, gv = {}, {}
    for m, v in comps.items():
        qd = store.load_vectors(conn, list(query), v)
        gd = store.load_vectors(conn, list(gallery), v)
        qv[m], gv[m] = qd, gd
    q_ids = [q for q in query if all(q in qv[m] for m in comps)]
    g_ids = [g for g in gallery if all(g in gv[m] for m in comps)]
    if not q_ids or not g_ids:
        return [(g, float("nan")) for g in list(gallery)[:top]]
    sim = weighted_cosine({m: unit_rows(np.vstack([qv[m][q] for q in q_ids])) for m in comps},
                          {m: unit_rows(np.vstack([gv[m][g] for g in g_ids])) for m in comps}, weights)
    best = np.asarray(sim).max(axis=0)
    order = sorted(range(len(g_ids)), key=lambda i: (-best[i], g_ids[i]))[:top]
    return [(g_ids[i], float(best[i])) for i in order]


def load_item(conn: sa.Connection, key: str, pairs: list[dict] | None = None) -> Item | None:
    """The item of a queue key, as it stands now (None when it no longer exists). ``pairs``:
    the merge candidates, when the caller has them already."""
    settings, versions = _settings(conn)
    names = reviews.deer_names(conn)
    kind, _, rest = key.partition("|")
    if kind == "decision":
        rows = conn.execute(sa.text(
            "SELECT detection_id, deer_id, score, threshold, decision, decided_at FROM sightings "
            "WHERE encounter_key = :e ORDER BY captured_at, detection_id"), {"e": rest}).all()
        if not rows or rows[0].score is None:
            return None
        q_ids = [r.detection_id for r in rows]
        cand_rows = conn.execute(sa.text(
            "SELECT candidate_deer_id, max(similarity) sim FROM similarity_scores sc "
            "WHERE encounter_key = :e AND EXISTS (SELECT 1 FROM deer k WHERE k.deer_id = sc.candidate_deer_id) "
            "GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT :n"), {"e": rest, "n": CANDIDATES}).all()
        members = _deer_members(conn, [c.candidate_deer_id for c in cand_rows])
        cands = []
        for c in cand_rows:
            gallery = [d for d in members.get(c.candidate_deer_id, []) if d not in q_ids]
            cands.append(_candidate(conn, c.candidate_deer_id, float(c.sim), q_ids, gallery, settings,
                                    versions, names))
        if not cands:
            return None
        score, thr = float(rows[0].score), float(rows[0].threshold)
        return Item(key, "decision", abs(score - thr), score, thr, _shown(conn, q_ids[:SHOWN_QUERY]),
                    rows[0].deer_id, cands, rows[0].decided_at, rows[0].decision, query_ids=q_ids)
    if kind == "merge":
        fa, _, fb = rest.partition("|")
        ids = dict(conn.execute(sa.text("SELECT founding_detection_id, deer_id FROM deer "
                                        "WHERE founding_detection_id = ANY(:f)"), {"f": [fa, fb]}).all())
        if fa not in ids or fb not in ids:
            return None
        da, db_ = ids[fa], ids[fb]
        members = _deer_members(conn, [da, db_])
        a, b = members.get(da, []), members.get(db_, [])
        if not a or not b:
            return None
        pairs = _merge_pairs(conn, settings) if pairs is None else pairs
        pair = [p for p in pairs if {p["deer_a"], p["deer_b"]} == {da, db_}]
        sim = pair[0]["profile_similarity"] if pair else float("nan")
        shown_a = [d for d, _ in _best_matching(conn, b, a, settings, versions, SHOWN_QUERY)] or a[:SHOWN_QUERY]
        cand = _candidate(conn, db_, sim, a, b, settings, versions, names)
        decided_at = conn.execute(sa.text("SELECT max(decided_at) FROM sightings WHERE deer_id = ANY(:d)"),
                                  {"d": [da, db_]}).scalar()
        return Item(key, "merge", abs(sim - settings.reid_threshold), sim, settings.reid_threshold,
                    _shown(conn, shown_a), da, [cand], decided_at, None, query_ids=a)
    return None


def _shown(conn: sa.Connection, ids: Sequence[str]) -> list[Sighting]:
    info = _sightings(conn, ids)
    return [info[i] for i in ids if i in info]


def _candidate(conn, deer_id, score, query, gallery, settings, versions, names) -> Candidate:
    best = _best_matching(conn, query, gallery, settings, versions, SHOWN_PER_CANDIDATE)
    info = _sightings(conn, [d for d, _ in best])
    shown = [Sighting(d, info[d].camera_id, info[d].captured_at, s) for d, s in best if d in info]
    return Candidate(deer_id, score, shown, names.get(deer_id))


@dataclass
class Queue:
    items: list[Item]
    total: int
    skipped: int
    margin: float


def build_queue(conn: sa.Connection, margin: float, limit: int = 20) -> Queue:
    """The open items, most uncertain first; the first ``limit`` loaded in full."""
    pairs = _merge_pairs(conn, _settings(conn)[0])
    keys = queue_keys(conn, margin, pairs)
    items = []
    for _, _, key in keys:
        if len(items) >= limit:
            break
        item = load_item(conn, key, pairs)
        if item is not None:
            items.append(item)
    skipped_keys = {k for _, s, k in keys if s}
    for it in items:
        it.skipped = it.key in skipped_keys
    return Queue(items, len(keys), len(skipped_keys), margin)


def queue_summary(conn: sa.Connection, margin: float) -> dict:
    """Length of the queue and the age of its oldest item (for the Dagster check)."""
    keys = queue_keys(conn, margin)
    open_keys = [k for _, s, k in keys if not s]
    oldest = None
    enc = [k.partition("|")[2] for k in open_keys if k.startswith("decision|")]
    if enc:
        # waiting since the detection arrived (a replay re-decides, it does not review)
        oldest = conn.execute(sa.text(
            "SELECT min(d.created_at) FROM sightings s JOIN detections d USING (detection_id) "
            "WHERE s.encounter_key = ANY(:e)"), {"e": enc}).scalar()
    return {"open_items": len(open_keys), "skipped_items": len(keys) - len(open_keys),
            "decision_items": len(enc), "merge_items": sum(k.startswith("merge|") for k in open_keys),
            "oldest_waiting_since": oldest, "margin": margin}


def check_review_queue(conn: sa.Connection, margin: float, max_items: int, max_age_days: float) -> "health.CheckOutcome":
    """WARN when more than ``max_items`` wait in the review queue, or one has waited longer
    than ``max_age_days`` (since its detection arrived)."""
    from datetime import timezone

    s = queue_summary(conn, margin)
    now = datetime.now(timezone.utc)
    age = (now - s["oldest_waiting_since"]).total_seconds() / 86400 if s["oldest_waiting_since"] else None
    problems = []
    if s["open_items"] > max_items:
        problems.append(f"{s['open_items']} items wait for review (more than {max_items})")
    if age is not None and age > max_age_days:
        problems.append(f"the oldest item has waited {age:.1f} days (more than {max_age_days:g})")
    confirmed = reviews.human_confirmed(conn)
    return health.CheckOutcome(
        "review_queue_short", not problems, "WARN",
        "; ".join(problems) + " - open `deer-pipeline review`" if problems else
        f"{s['open_items']} item(s) wait for review, none for long",
        {"open_items": s["open_items"], "decision_items": s["decision_items"], "merge_items": s["merge_items"],
         "skipped_items": s["skipped_items"], "oldest_age_days": None if age is None else round(age, 2),
         "max_items": max_items, "max_age_days": float(max_age_days), "margin": margin,
         "human_confirmed_sightings": confirmed})
