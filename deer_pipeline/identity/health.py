"""Health checks of the identity decisions (evaluated by defs/checks.py and recorded in check_results): assignment rate, zero matches, new-deer spikes, embedding consistency and merge candidates. Each returns a CheckOutcome with plain values."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Mapping

import numpy as np
import sqlalchemy as sa

from deer_pipeline.identity.store import (
    as_date,
    deer_total,
    partition_decisions,
    partition_key_text,
    vector_cursor,
)


def window_decisions(conn: sa.Connection, day_from: date, day_to: date, camera_id: str | None = None) -> dict:
    """Decisions of partitions whose day lies in [day_from, day_to] (all cameras unless given)."""
    cam = "AND d.camera_id = :c" if camera_id else ""
    r = conn.execute(sa.text(
        "SELECT count(*) n, count(*) FILTER (WHERE s.decision = 'matched') matched, "
        "count(*) FILTER (WHERE s.decision = 'new') new, max(s.score) max_score, "
        "count(DISTINCT d.day) days "
        "FROM sightings s JOIN detections d ON d.detection_id = s.detection_id "
        f"WHERE d.day BETWEEN :a AND :b {cam}"), {"a": day_from, "b": day_to, "c": camera_id}).one()
    return dict(r._mapping)


def daily_decisions(conn: sa.Connection, day_from: date, day_to: date) -> list[dict]:
    rows = conn.execute(sa.text(
        "SELECT d.day, count(*) n, count(*) FILTER (WHERE s.decision = 'new') new "
        "FROM sightings s JOIN detections d ON d.detection_id = s.detection_id "
        "WHERE d.day BETWEEN :a AND :b GROUP BY d.day ORDER BY d.day"), {"a": day_from, "b": day_to})
    return [dict(r._mapping) for r in rows]


def record_check(conn: sa.Connection, name: str, partition_key: str | None, passed: bool,
                 severity: str, details: Mapping) -> int:
    return conn.execute(sa.text(
        "INSERT INTO check_results (check_name, partition_key, passed, severity, details) "
        "VALUES (:n, :p, :ok, :s, CAST(:d AS jsonb)) RETURNING check_id"),
        {"n": name, "p": partition_key, "ok": bool(passed), "s": severity,
         "d": json.dumps(details, default=_json_default)}).scalar_one()


def _json_default(o):
    if isinstance(o, (datetime, date)):
        return o.isoformat()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def day_bounds(day: str | date) -> tuple[datetime, datetime]:
    d = as_date(day)
    start = datetime(d.year, d.month, d.day, tzinfo=timezone.utc)
    return start, start + timedelta(days=1)


@dataclass
class CheckOutcome:
    name: str
    passed: bool
    severity: str                      # WARN | ERROR (the severity when it fails)
    description: str
    metadata: dict = field(default_factory=dict)
    table: list[dict] = field(default_factory=list)


def _rate(a: int, n: int) -> float | None:
    return (a / n) if n else None


def check_assignment_rate(conn: sa.Connection, camera_id: str, day: str | date, low: float, high: float,
                          min_sightings: int = 10, window_days: int = 7) -> CheckOutcome:
    """Share of sightings matched to a known deer, for the partition and for the trailing
    window (all cameras, ``window_days`` days ending with this day), within [low, high]."""
    key = partition_key_text(camera_id, day)
    d = as_date(day)
    part = partition_decisions(conn, key)
    win = window_decisions(conn, d - timedelta(days=window_days - 1), d)
    problems = []
    for label, r in (("partition", part), (f"last {window_days} days", win)):
        rate = _rate(r["matched"], r["n"])
        if r["n"] >= min_sightings and rate is not None and not low <= rate <= high:
            problems.append(f"{label}: {rate:.3f} of {r['n']} sightings matched, outside [{low:g}, {high:g}]")
    return CheckOutcome(
        "assignment_rate_in_bounds", not problems, "WARN",
        "; ".join(problems) or f"assignment rate within [{low:g}, {high:g}] (or too few sightings to judge)",
        {"partition_rate": _rate(part["matched"], part["n"]), "partition_sightings": part["n"],
         "window_rate": _rate(win["matched"], win["n"]), "window_sightings": win["n"],
         "window_days": window_days, "low": low, "high": high, "min_sightings": min_sightings})


def check_zero_matches(conn: sa.Connection, camera_id: str, day: str | date, min_sightings: int = 5,
                       window_days: int = 7) -> CheckOutcome:
    """The failure the old system lived with for weeks: deer exist, yet nothing ever matches
    because the threshold sits above every score observed.

    Fails when the partition decided at least ``min_sightings`` sightings, none matched, there
    were known deer to compare with (scores were recorded), the best observed similarity is below
    the threshold, AND no sighting of the trailing window decided with the same threshold
    matched either (a genuinely new herd on one camera does not trip it)."""
    key = partition_key_text(camera_id, day)
    d = as_date(day)
    part = partition_decisions(conn, key)
    sc = conn.execute(sa.text(
        "SELECT count(*) n, max(similarity) mx, min(threshold) thr FROM similarity_scores "
        "WHERE partition_key = :p"), {"p": key}).one()
    deer = deer_total(conn)
    threshold = part["min_threshold"] if part["min_threshold"] is not None else sc.thr
    win = conn.execute(sa.text(
        "SELECT count(*) n, count(*) FILTER (WHERE s.decision = 'matched') matched "
        "FROM sightings s JOIN detections d ON d.detection_id = s.detection_id "
        "WHERE d.day BETWEEN :a AND :b AND abs(s.threshold - :t) < 1e-6"),
        {"a": d - timedelta(days=window_days - 1), "b": d, "t": threshold}).one()
    meta = {"sightings": part["n"], "matched": part["matched"], "deer_total": deer,
            "score_rows": sc.n, "max_similarity": sc.mx, "threshold": threshold,
            "window_sightings_same_threshold": win.n, "window_matched_same_threshold": win.matched,
            "gap": (threshold - sc.mx) if (threshold is not None and sc.mx is not None) else None}
    failing = (part["n"] >= min_sightings and part["matched"] == 0 and deer > 0 and sc.n > 0
               and sc.mx is not None and threshold is not None and sc.mx < threshold
               and win.matched == 0)
    desc = (f"no sighting matched although {deer} deer exist: the best similarity observed "
            f"({sc.mx:.3f}) is below the threshold ({threshold:.3f}) and nothing matched in "
            f"{window_days} days at this threshold - the threshold is likely too high"
            if failing else "matches happen (or too few sightings / no known deer to judge)")
    return CheckOutcome("matches_happen", not failing, "ERROR", desc, meta)


def check_new_deer_spike(conn: sa.Connection, camera_id: str, day: str | date, factor: float = 2.0,
                         min_sightings: int = 10, window_days: int = 7) -> CheckOutcome:
    """Share of the partition's sightings that founded a new deer vs the trailing average of the
    previous ``window_days`` days (all cameras): a spike is a rate above ``factor`` times the
    trailing rate and at least 0.1 above it, with ``min_sightings`` on both sides."""
    key = partition_key_text(camera_id, day)
    d = as_date(day)
    part = partition_decisions(conn, key)
    prev = window_decisions(conn, d - timedelta(days=window_days), d - timedelta(days=1))
    rate = _rate(part["new"], part["n"])
    trailing = _rate(prev["new"], prev["n"])
    spike = (part["n"] >= min_sightings and prev["n"] >= min_sightings and rate is not None
             and trailing is not None and rate > factor * trailing and rate - trailing > 0.1)
    desc = (f"new-deer rate {rate:.3f} is more than {factor:g}x the trailing {window_days}-day average "
            f"{trailing:.3f}" if spike else "new-deer rate in line with the trailing average (or too few sightings)")
    return CheckOutcome("new_deer_rate_normal", not spike, "WARN", desc,
                        {"new_deer_rate": rate, "trailing_rate": trailing, "sightings": part["n"],
                         "trailing_sightings": prev["n"], "factor": factor, "window_days": window_days})


def check_embeddings_consistent(conn: sa.Connection, camera_id: str, day: str | date,
                                tolerance: float = 1e-3) -> CheckOutcome:
    """Vectors behind the partition's decisions have norm ~1, and one embedding version was
    used by the partition's decisions and by the whole gallery."""
    key = partition_key_text(camera_id, day)
    norms = conn.execute(sa.text(
        "SELECT e.embedding_version, count(*) n, min(vector_norm(e.vector)) lo, max(vector_norm(e.vector)) hi "
        "FROM sightings s JOIN embeddings e ON e.detection_id = s.detection_id AND e.vector IS NOT NULL "
        "WHERE s.partition_key = :p GROUP BY 1 ORDER BY 1"), {"p": key}).all()
    part_versions = conn.execute(sa.text(
        "SELECT DISTINCT embedding_version FROM sightings WHERE partition_key = :p"), {"p": key}).scalars().all()
    all_versions = conn.execute(sa.text(
        "SELECT embedding_version, count(*) FROM sightings GROUP BY 1 ORDER BY 2 DESC")).all()
    problems = []
    bad_norm = [r for r in norms if abs(r.lo - 1) > tolerance or abs(r.hi - 1) > tolerance]
    for r in bad_norm:
        problems.append(f"{r.embedding_version}: vector norms in [{r.lo:.4f}, {r.hi:.4f}], not 1 +- {tolerance:g}")
    if len(part_versions) > 1:
        problems.append(f"the partition's decisions used {len(part_versions)} embedding versions: {part_versions}")
    if len(all_versions) > 1:
        problems.append(f"the gallery mixes {len(all_versions)} embedding versions: "
                        + ", ".join(f"{v} ({n})" for v, n in all_versions))
    return CheckOutcome(
        "embeddings_consistent", not problems, "ERROR",
        "; ".join(problems) or "unit-norm vectors and a single embedding version",
        {"partition_versions": list(part_versions), "gallery_versions": {v: n for v, n in all_versions},
         "norms": {r.embedding_version: {"n": r.n, "min": r.lo, "max": r.hi} for r in norms},
         "tolerance": tolerance},
        [{"embedding_version": r.embedding_version, "vectors": r.n, "min_norm": round(r.lo, 6),
          "max_norm": round(r.hi, 6)} for r in norms])


def check_merge_candidates(conn: sa.Connection, camera_id: str, day: str | date,
                           weights: Mapping[str, float], threshold: float, limit: int = 50) -> CheckOutcome:
    """Pairs of deer (one of them seen in this partition) whose profile vectors are as similar
    as the threshold: maybe one animal split in two. Deer seen together in one frame are
    different animals and are not listed."""
    key = partition_key_text(camera_id, day)
    touched = conn.execute(sa.text("SELECT DISTINCT deer_id FROM sightings WHERE partition_key = :p"),
                           {"p": key}).scalars().all()
    pairs = merge_candidate_pairs(conn, touched, weights, threshold)
    return CheckOutcome(
        "no_merge_candidates", not pairs, "WARN",
        (f"{len(pairs)} pair(s) of deer have profiles at least as similar as the threshold "
         f"{threshold:g}: candidates for a merge review") if pairs else "no two deer look alike above the threshold",
        {"pairs": len(pairs), "threshold": threshold, "deer_checked": len(touched)}, pairs[:limit])


def merge_candidate_pairs(conn: sa.Connection, touched, weights: Mapping[str, float],
                          threshold: float) -> list[dict]:
    """Pairs of deer, one of them in ``touched``, whose profiles are at least ``threshold``
    similar (never two deer seen together in one frame), most similar first. Used by the
    check and by the review queue."""
    touched = list(touched)
    model_of = dict(conn.execute(sa.text("SELECT embedding_version, model FROM embedding_versions")).all())
    cur = vector_cursor(conn)
    cur.execute("SELECT deer_id, embedding_version, vector FROM deer_profile_vectors ORDER BY deer_id")
    per_model: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    for deer_id, version, vec in cur.fetchall():
        m = model_of.get(version)
        if m in weights:
            per_model[m][deer_id] = vec
    models = [m for m in weights if per_model.get(m)]
    pairs: list[dict] = []
    if touched and models and len(models) == len(weights):
        ids = sorted(set.intersection(*(set(per_model[m]) for m in models)))
        pos = {d: i for i, d in enumerate(ids)}
        t_idx = [pos[d] for d in touched if d in pos]
        sim = None
        for m in models:
            mat = np.vstack([per_model[m][d] for d in ids])
            s = mat[t_idx] @ mat.T
            sim = weights[m] * s if sim is None else sim + weights[m] * s
        together = {tuple(sorted(r)) for r in conn.execute(sa.text(
            "SELECT DISTINCT sa.deer_id, sb.deer_id FROM sightings sa "
            "JOIN detections da ON da.detection_id = sa.detection_id "
            "JOIN detections db ON db.image_id = da.image_id AND db.detection_id <> da.detection_id "
            "JOIN sightings sb ON sb.detection_id = db.detection_id "
            "WHERE sa.deer_id = ANY(:t)"), {"t": list(touched)}).all()}
        seen = set()
        for row, ti in enumerate(t_idx):
            a = ids[ti]
            for j in np.flatnonzero(sim[row] >= threshold):
                b = ids[j]
                pair = tuple(sorted((a, b)))
                if a == b or pair in seen or pair in together:
                    continue
                seen.add(pair)
                pairs.append({"deer_a": pair[0], "deer_b": pair[1], "profile_similarity": round(float(sim[row, j]), 4)})
        pairs.sort(key=lambda p: (-p["profile_similarity"], p["deer_a"], p["deer_b"]))
    return pairs
