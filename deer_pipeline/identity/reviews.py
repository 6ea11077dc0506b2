"""Human review decisions: recorded append-only, applied by matching as constraints.

A decision names *sightings* (detection ids), never a deer id alone, because a replay may
renumber deer while detections stay. Kinds (``identity_reviews.kind``):

* ``same`` / ``merge``: every sighting of side A and side B is one animal (must-link);
* ``different`` / ``new``: no sighting of side A is the same animal as a sighting of side B
  (cannot-link; ``new``: A is none of the candidate deer shown, B = their sightings);
* ``split``: side A (sightings chosen off a deer) is one animal, the rest of that deer (side B)
  another: must-link inside A, must-link inside B, cannot-link A x B;
* ``unidentifiable``: the sightings of side A are excluded from matching;
* ``name``: the deer holding (most of) the sightings of side A is called ``name``;
* ``skip``: recorded, no constraint (the queue shows the item last);
* ``undo``: withdraws the decision ``undoes`` (rows are never updated or deleted).

Later decisions win over earlier ones where they contradict: a must-link target is dropped when
a *later* cannot-link forbids it, and a later ``same`` re-admits a sighting an earlier
``unidentifiable`` excluded. ``ReviewTracker`` applies this inside ``matching.decide_partition``
(the hook there is small on purpose).

A recorded decision takes effect at once by a replay (``apply``): the partition holding the
earliest involved encounter is decided again with the settings the store was last decided with
(``identity_decision_settings``), which withdraws and re-decides everything from that moment on,
under the identity lock. Every later replay, re-embedding or backfill keeps the decision.

Plain logic, no Dagster.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

KINDS = ("same", "merge", "different", "new", "split", "unidentifiable", "name", "skip", "undo")
MUST_KINDS = ("same", "merge")
CANNOT_KINDS = ("different", "new", "split")
CSV_COLUMNS = ("review_id", "kind", "detections_a", "detections_b", "deer_a", "deer_b", "name",
               "note", "reviewer", "source", "item_key", "score", "undoes", "created_at", "undone_by")


class ReviewError(ValueError):
    """A decision that cannot be recorded (unknown sightings, nothing to undo, ...)."""


@dataclass(frozen=True)
class Review:
    review_id: int
    kind: str
    a: tuple[str, ...]
    b: tuple[str, ...] = ()
    name: str | None = None
    reviewer: str = ""
    created_at: datetime | None = None
    undone_by: int | None = None
    deer_a: int | None = None
    deer_b: int | None = None
    note: str | None = None
    source: str = ""
    item_key: str | None = None
    score: float | None = None
    undoes: int | None = None


_SELECT = ("SELECT review_id, kind, detections_a, detections_b, name, reviewer, created_at, undone_by, "
           "deer_a, deer_b, note, source, item_key, score, undoes FROM identity_reviews_status")


def _review(r) -> Review:
    return Review(r.review_id, r.kind, tuple(r.detections_a or ()), tuple(r.detections_b or ()), r.name,
                  r.reviewer, r.created_at, r.undone_by, r.deer_a, r.deer_b, r.note, r.source, r.item_key,
                  r.score, r.undoes)


def all_reviews(conn: sa.Connection) -> list[Review]:
    return [_review(r) for r in conn.execute(sa.text(_SELECT + " ORDER BY review_id"))]


def active_reviews(conn: sa.Connection) -> list[Review]:
    """Decisions that stand (not undone, not undo rows), oldest first."""
    return [_review(r) for r in conn.execute(sa.text(
        _SELECT + " WHERE undone_by IS NULL AND kind <> 'undo' ORDER BY review_id"))]


# --------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------

def _check_detections(conn: sa.Connection, ids: Iterable[str]) -> None:
    ids = sorted(set(ids))
    if not ids:
        return
    found = set(conn.execute(sa.text("SELECT detection_id FROM detections WHERE detection_id = ANY(:i)"),
                             {"i": ids}).scalars())
    missing = [i for i in ids if i not in found]
    if missing:
        raise ReviewError(f"unknown detection id(s): {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def record(conn: sa.Connection, kind: str, a: Sequence[str], b: Sequence[str] = (), *, reviewer: str,
           name: str | None = None, note: str | None = None, deer_a: int | None = None,
           deer_b: int | None = None, item_key: str | None = None, score: float | None = None,
           source: str = "web", created_at: datetime | None = None) -> int:
    """Append one decision (in the caller's transaction); returns its review id."""
    if kind not in KINDS or kind == "undo":
        raise ReviewError(f"unknown decision kind {kind!r}; use one of {[k for k in KINDS if k != 'undo']}")
    a, b = list(dict.fromkeys(a)), list(dict.fromkeys(b))
    if not a:
        raise ReviewError(f"a {kind!r} decision needs at least one sighting")
    if kind in MUST_KINDS + CANNOT_KINDS and kind != "new" and not b:
        raise ReviewError(f"a {kind!r} decision needs sightings on both sides")
    if set(a) & set(b):
        raise ReviewError(f"a sighting cannot be on both sides of a decision: {sorted(set(a) & set(b))[:5]}")
    if kind == "name" and not (name or "").strip():
        raise ReviewError("a name decision needs a name")
    if not (reviewer or "").strip():
        raise ReviewError("every decision needs a reviewer")
    _check_detections(conn, a + b)
    return conn.execute(sa.text(
        "INSERT INTO identity_reviews (kind, detections_a, detections_b, deer_a, deer_b, name, note, "
        "reviewer, source, item_key, score, created_at) VALUES (:k, :a, :b, :da, :db, :n, :note, :r, :src, "
        ":item, :score, coalesce(:t, now())) RETURNING review_id"),
        {"k": kind, "a": a, "b": b, "da": deer_a, "db": deer_b, "n": name.strip() if name else None,
         "note": note, "r": reviewer.strip(), "src": source, "item": item_key, "score": score,
         "t": created_at}).scalar_one()


def undo(conn: sa.Connection, review_id: int, *, reviewer: str, source: str = "web",
         note: str | None = None, created_at: datetime | None = None) -> Review:
    """Withdraw decision ``review_id`` by appending an undo row; returns the decision undone."""
    row = conn.execute(sa.text(_SELECT + " WHERE review_id = :i"), {"i": review_id}).first()
    if row is None:
        raise ReviewError(f"no decision {review_id}")
    r = _review(row)
    if r.kind == "undo":
        raise ReviewError(f"decision {review_id} is itself an undo; record the decision again instead")
    if r.undone_by is not None:
        raise ReviewError(f"decision {review_id} was already undone by {r.undone_by}")
    try:
        with conn.begin_nested():
            conn.execute(sa.text(
                "INSERT INTO identity_reviews (kind, undoes, reviewer, source, note, detections_a, "
                "detections_b, created_at) VALUES ('undo', :u, :r, :s, :n, :a, :b, coalesce(:t, now()))"),
                {"u": review_id, "r": reviewer, "s": source, "n": note, "a": list(r.a), "b": list(r.b),
                 "t": created_at})
    except sa.exc.IntegrityError:
        raise ReviewError(f"decision {review_id} was already undone") from None
    return r


def last_undoable(conn: sa.Connection, reviewer: str) -> int | None:
    """The reviewer's latest decision that stands (what the undo key withdraws)."""
    return conn.execute(sa.text(
        "SELECT review_id FROM identity_reviews_status WHERE reviewer = :r AND kind <> 'undo' "
        "AND undone_by IS NULL ORDER BY review_id DESC LIMIT 1"), {"r": reviewer}).scalar()


# --------------------------------------------------------------------------------------------
# Constraints for matching
# --------------------------------------------------------------------------------------------

@dataclass
class Constraints:
    """What the standing decisions ask of matching."""

    groups: list[tuple[int, frozenset[str]]] = field(default_factory=list)     # must-link
    cannot: list[tuple[int, frozenset[str], frozenset[str]]] = field(default_factory=list)
    excluded: dict[str, int] = field(default_factory=dict)                     # detection -> review

    def __bool__(self) -> bool:
        return bool(self.groups or self.cannot or self.excluded)

    def involved(self) -> set[str]:
        out = set(self.excluded)
        for _, g in self.groups:
            out |= g
        for _, x, y in self.cannot:
            out |= x | y
        return out


def constraints_from(reviews: Iterable[Review]) -> Constraints:
    """Standing decisions (oldest first) -> constraints; a later ``same`` re-admits a sighting an
    earlier ``unidentifiable`` excluded, a later ``unidentifiable`` excludes it again."""
    c = Constraints()
    for r in reviews:
        if r.undone_by is not None or r.kind == "undo":
            continue
        a, b = frozenset(r.a), frozenset(r.b)
        if r.kind in MUST_KINDS:
            c.groups.append((r.review_id, a | b))
            for d in a | b:
                c.excluded.pop(d, None)
        elif r.kind == "split":
            c.groups.append((r.review_id, a))
            if b:
                c.groups.append((r.review_id, b))
            c.cannot.append((r.review_id, a, b))
        elif r.kind in ("different", "new"):
            if b:
                c.cannot.append((r.review_id, a, b))
        elif r.kind == "unidentifiable":
            for d in a:
                c.excluded[d] = r.review_id
    return c


def load_constraints(conn: sa.Connection) -> Constraints:
    """The constraints of every standing decision (empty when nobody reviewed anything)."""
    if not conn.execute(sa.text("SELECT to_regclass('identity_reviews') IS NOT NULL")).scalar_one():
        return Constraints()
    return constraints_from(active_reviews(conn))


class ReviewTracker:
    """Applies constraints while ``decide_partition`` decides encounters in time order.

    ``deer_of`` starts with the stored (not withdrawn) sightings of every involved detection
    and learns each decision as it is made. For an encounter, ``verdict`` returns the deer it
    must join (or None) and the deer it must not join."""

    def __init__(self, constraints: Constraints, stored_deer: Mapping[str, int]):
        self.c = constraints
        self.deer_of: dict[str, int] = dict(stored_deer)
        self.groups_of: dict[str, list[int]] = defaultdict(list)
        self.cannot_of: dict[str, list[int]] = defaultdict(list)
        for i, (_, g) in enumerate(constraints.groups):
            for d in g:
                self.groups_of[d].append(i)
        for i, (_, x, y) in enumerate(constraints.cannot):
            for d in x | y:
                self.cannot_of[d].append(i)

    def excluded(self, detection_id: str) -> bool:
        return detection_id in self.c.excluded

    def constrained(self, detection_ids: Iterable[str]) -> bool:
        return any(d in self.groups_of or d in self.cannot_of for d in detection_ids)

    def verdict(self, detection_ids: Sequence[str]) -> tuple[int | None, set[int]]:
        ds = set(detection_ids)
        cannot: dict[int, int] = {}
        for i in sorted({i for d in ds for i in self.cannot_of.get(d, ())}):
            rid, x, y = self.c.cannot[i]
            for mine, other in ((x, y), (y, x)):
                if ds & mine:
                    for o in other:
                        deer = self.deer_of.get(o)
                        if deer is not None and o not in ds:
                            cannot[deer] = max(cannot.get(deer, -1), rid)
        must: dict[int, tuple] = {}
        for i in sorted({i for d in ds for i in self.groups_of.get(d, ())}):
            rid, g = self.c.groups[i]
            members: dict[int, list[str]] = defaultdict(list)
            for o in g - ds:
                if o in self.deer_of:
                    members[self.deer_of[o]].append(o)
            for deer, ms in members.items():
                # the latest decision wins; within one decision the deer holding most of it,
                # then the one holding its smallest detection id (independent of deer numbering)
                key = (rid, len(ms), _neg(min(ms)))
                if deer not in must or key > must[deer]:
                    must[deer] = key
        for deer in list(must):
            if cannot.get(deer, -1) > must[deer][0]:
                del must[deer]
        forced = max(must, key=lambda d: must[d]) if must else None
        return forced, set(cannot)

    def decided(self, detection_ids: Iterable[str], deer: int) -> None:
        for d in detection_ids:
            self.deer_of[d] = deer


class _neg:
    """Reverses the order of a string inside a sort key (smaller string = larger key)."""

    __slots__ = ("s",)

    def __init__(self, s: str):
        self.s = s

    def __lt__(self, other: "_neg") -> bool:
        return self.s > other.s

    def __gt__(self, other: "_neg") -> bool:
        return self.s < other.s

    def __eq__(self, other) -> bool:
        return isinstance(other, _neg) and self.s == other.s


def stored_deer(conn: sa.Connection, detection_ids: Iterable[str]) -> dict[str, int]:
    ids = sorted(set(detection_ids))
    if not ids:
        return {}
    return dict(conn.execute(sa.text("SELECT detection_id, deer_id FROM sightings "
                                     "WHERE detection_id = ANY(:i)"), {"i": ids}).all())


# --------------------------------------------------------------------------------------------
# The settings the store was decided with
# --------------------------------------------------------------------------------------------

def record_decision_settings(conn: sa.Connection, settings, versions: Mapping[str, str]) -> None:
    """Remember the matching settings and embedding versions of the latest decision."""
    conn.execute(sa.text(
        "INSERT INTO identity_decision_settings (id, settings, versions, updated_at) "
        "VALUES (1, CAST(:s AS jsonb), CAST(:v AS jsonb), now()) ON CONFLICT (id) DO UPDATE "
        "SET settings = EXCLUDED.settings, versions = EXCLUDED.versions, updated_at = now()"),
        {"s": json.dumps(dataclasses.asdict(settings)), "v": json.dumps(dict(versions))})


def decision_settings(conn: sa.Connection):
    """(MatchingSettings, versions) of the latest decision, or None when nothing was decided."""
    from deer_pipeline.settings import MatchingSettings

    row = conn.execute(sa.text("SELECT settings, versions FROM identity_decision_settings WHERE id = 1")).first()
    if row is None:
        return None
    names = {f.name for f in dataclasses.fields(MatchingSettings)}
    return MatchingSettings(**{k: v for k, v in row.settings.items() if k in names}), dict(row.versions)


# --------------------------------------------------------------------------------------------
# Applying: replay from the earliest involved encounter
# --------------------------------------------------------------------------------------------

def replay_start(conn: sa.Connection, detection_ids: Iterable[str]) -> tuple[str, str] | None:
    """(camera, day) of the partition holding the earliest encounter that involves any of the
    detections (the encounter as decided now, or the detection itself when undecided)."""
    ids = sorted(set(detection_ids))
    if not ids:
        return None
    row = conn.execute(sa.text(
        "WITH inv AS (SELECT d.detection_id, s.encounter_key FROM detections d "
        "  LEFT JOIN sightings s ON s.detection_id = d.detection_id WHERE d.detection_id = ANY(:i)), "
        "members AS (SELECT detection_id FROM inv UNION "
        "  SELECT s.detection_id FROM sightings s JOIN inv ON inv.encounter_key = s.encounter_key) "
        "SELECT d.camera_id, d.day::text FROM detections d JOIN members m USING (detection_id) "
        "WHERE d.camera_id IS NOT NULL AND d.day IS NOT NULL "
        "ORDER BY d.captured_at NULLS LAST, d.detection_id LIMIT 1"), {"i": ids}).first()
    return (row[0], row[1]) if row else None


def apply(engine: Engine, detection_ids: Iterable[str], settings=None, versions=None):
    """Make decisions about these detections take effect now: decide again, from the earliest
    involved encounter on, with the settings of the latest decision. Returns the
    ``DecisionSummary`` (None when nothing was ever decided, so there is nothing to redo)."""
    from deer_pipeline.identity.matching import decide_partition

    with engine.connect() as conn:
        start = replay_start(conn, detection_ids)
        recorded = decision_settings(conn)
    if start is None or (recorded is None and settings is None):
        return None
    if settings is None:
        settings, rec_versions = recorded
        versions = versions or rec_versions
    return decide_partition(engine, start[0], start[1], settings, versions)


def involved_detections(reviews: Iterable[Review]) -> set[str]:
    out: set[str] = set()
    for r in reviews:
        out |= set(r.a) | set(r.b)
    return out


# --------------------------------------------------------------------------------------------
# Names, counts, reviewed pairs
# --------------------------------------------------------------------------------------------

def deer_names(conn: sa.Connection) -> dict[int, str]:
    """deer_id -> name. A name belongs to the deer holding most of the sightings it was given
    to (ties: the deer holding the smallest detection id); a later name wins."""
    names: dict[int, str] = {}
    for r in conn.execute(sa.text(
            "SELECT review_id, name, detections_a FROM identity_reviews_status "
            "WHERE kind = 'name' AND undone_by IS NULL ORDER BY review_id")).all():
        held = conn.execute(sa.text(
            "SELECT deer_id, count(*) n, min(detection_id) first FROM sightings "
            "WHERE detection_id = ANY(:a) GROUP BY deer_id ORDER BY n DESC, first LIMIT 1"),
            {"a": list(r.detections_a)}).first()
        if held is not None:
            names[held.deer_id] = r.name
    return names


def human_confirmed(conn: sa.Connection, partition_key: str | None = None) -> int:
    """Sightings (of one partition, or all) whose deer a standing decision confirms: named in a
    same / merge / split decision, or the query side of a different / new decision."""
    part = "AND s.partition_key = :p" if partition_key else ""
    return conn.execute(sa.text(
        "SELECT count(*) FROM sightings s WHERE EXISTS (SELECT 1 FROM identity_reviews_status r "
        "WHERE r.undone_by IS NULL AND ((r.kind IN ('same', 'merge', 'split') AND "
        "(r.detections_a @> ARRAY[s.detection_id] OR r.detections_b @> ARRAY[s.detection_id])) OR "
        f"(r.kind IN ('different', 'new') AND r.detections_a @> ARRAY[s.detection_id]))) {part}"),
        {"p": partition_key}).scalar_one()


def reviewed_pairs(conn: sa.Connection, max_pairs: int = 200_000) -> list[tuple[str, str, bool]]:
    """Pairs of sightings a person labelled: (a, b, same). same/merge: A x B are the same animal;
    different/new/split: A x B are different. A later decision about a pair wins; excluded
    (unidentifiable) sightings are left out."""
    reviews = active_reviews(conn)
    excluded = constraints_from(reviews).excluded
    label: dict[tuple[str, str], bool] = {}
    for r in reviews:
        if r.kind in MUST_KINDS:
            same = True
        elif r.kind in CANNOT_KINDS:
            same = False
        else:
            continue
        for x in r.a:
            for y in r.b:
                if x != y and x not in excluded and y not in excluded:
                    label[(min(x, y), max(x, y))] = same
                    if len(label) >= max_pairs:
                        break
    return [(a, b, s) for (a, b), s in sorted(label.items())]


# --------------------------------------------------------------------------------------------
# CSV export / apply
# --------------------------------------------------------------------------------------------

def export_csv(conn: sa.Connection, path: Path) -> int:
    """Every decision (undo rows and undone ones included), oldest first."""
    rows = all_reviews(conn)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow([r.review_id, r.kind, " ".join(r.a), " ".join(r.b), _blank(r.deer_a), _blank(r.deer_b),
                        r.name or "", r.note or "", r.reviewer, r.source, r.item_key or "",
                        _blank(r.score), _blank(r.undoes),
                        r.created_at.isoformat() if r.created_at else "", _blank(r.undone_by)])
    return len(rows)


def _blank(v) -> str:
    return "" if v is None else str(v)


def import_csv(conn: sa.Connection, path: Path, reviewer: str | None = None) -> tuple[list[int], set[str]]:
    """Append the decisions of a CSV (as written by ``export_csv``, or by hand with at least
    ``kind`` and ``detections_a``). Rows already present (same kind, sightings, name, reviewer
    and time) are skipped, so applying a file twice changes nothing. Undo rows refer to the
    file's review ids. Returns (new review ids, detections involved)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and not {"kind", "detections_a"} <= set(rows[0]):
        raise ReviewError(f"{path}: needs at least the columns kind and detections_a; "
                          f"found {list(rows[0])}")
    existing = {(r.kind, r.a, r.b, r.name or "", r.reviewer, r.created_at.isoformat() if r.created_at else ""):
                r.review_id for r in all_reviews(conn)}
    by_file_id: dict[str, int] = {}
    new_ids: list[int] = []
    involved: set[str] = set()
    for n, row in enumerate(rows, start=2):
        kind = (row.get("kind") or "").strip()
        a = tuple((row.get("detections_a") or "").split())
        b = tuple((row.get("detections_b") or "").split())
        who = (row.get("reviewer") or "").strip() or reviewer
        if not who:
            raise ReviewError(f"{path}:{n}: no reviewer (give --reviewer)")
        created = (row.get("created_at") or "").strip()
        key = (kind, a, b, (row.get("name") or "").strip(), who, created)
        file_id = (row.get("review_id") or "").strip()
        if created and key in existing:
            by_file_id[file_id] = existing[key]
            continue
        when = datetime.fromisoformat(created) if created else None
        try:
            with conn.begin_nested():
                if kind == "undo":
                    target = by_file_id.get((row.get("undoes") or "").strip())
                    if target is None:
                        raise ReviewError(f"undo of {row.get('undoes')!r}, which the file does not hold "
                                          "before this row")
                    done = conn.execute(sa.text("SELECT review_id FROM identity_reviews WHERE undoes = :u"),
                                        {"u": target}).scalar()
                    if done is not None:              # undone already (this file applied before)
                        by_file_id[file_id] = done
                        continue
                    undone = undo(conn, target, reviewer=who, source="csv", note=row.get("note") or None,
                                  created_at=when)
                    rid = conn.execute(sa.text("SELECT review_id FROM identity_reviews WHERE undoes = :u"),
                                       {"u": target}).scalar_one()
                    involved |= set(undone.a) | set(undone.b)
                else:
                    score = (row.get("score") or "").strip()
                    rid = record(conn, kind, a, b, reviewer=who, name=(row.get("name") or "").strip() or None,
                                 note=row.get("note") or None, source="csv",
                                 item_key=(row.get("item_key") or "").strip() or None,
                                 score=float(score) if score else None, created_at=when)
                    involved |= set(a) | set(b)
        except ReviewError as exc:
            raise ReviewError(f"{path}:{n}: {exc}") from None
        by_file_id[file_id] = rid
        new_ids.append(rid)
    return new_ids, involved
