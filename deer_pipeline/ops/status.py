"""``deer-pipeline status [--json]``: where the pipeline stands.

Counts of detections (by status), crops, embedded detections (per version), assigned sightings,
deer (per sex), the assignment rate, the threshold in use, the embedding versions present and
the last result of every check. Plain SQL, no Dagster.

Invariants (tested): assigned <= embedded <= crops (ok) <= detections (ok); deer per sex sums to
the deer total.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from deer_pipeline import db


def _one(conn, sql: str, **params):
    return conn.execute(sa.text(sql), params).scalar_one()


def collect(engine: Engine) -> dict:
    """Everything ``status`` reports, as a JSON-ready dict."""
    with engine.connect() as conn:
        det_by_status = dict(conn.execute(sa.text(
            "SELECT status, count(*) FROM detections GROUP BY 1 ORDER BY 1")).all())
        crops_by_status = dict(conn.execute(sa.text(
            "SELECT status, count(*) FROM crops GROUP BY 1 ORDER BY 1")).all())
        per_version = [dict(r._mapping) for r in conn.execute(sa.text(
            "SELECT v.embedding_version, v.model, "
            "  count(e.detection_id) FILTER (WHERE e.status = 'ok' AND e.vector IS NOT NULL) AS ok, "
            "  count(e.detection_id) FILTER (WHERE e.status <> 'ok') AS failed, v.created_at "
            "FROM embedding_versions v LEFT JOIN embeddings e ON e.embedding_version = v.embedding_version "
            "GROUP BY v.embedding_version, v.model, v.created_at ORDER BY v.created_at, v.embedding_version"))]
        embedded = _one(conn, "SELECT count(DISTINCT detection_id) FROM embeddings "
                              "WHERE status = 'ok' AND vector IS NOT NULL")
        decisions = dict(conn.execute(sa.text(
            "SELECT decision, count(*) FROM sightings GROUP BY 1")).all())
        assigned = sum(decisions.values())
        deer_by_sex = dict(conn.execute(sa.text("SELECT sex, count(*) FROM deer GROUP BY 1 ORDER BY 1")).all())
        deer_total = _one(conn, "SELECT count(*) FROM deer")
        latest = conn.execute(sa.text(
            "SELECT threshold, embedding_version, decided_at FROM sightings "
            "ORDER BY decided_at DESC, detection_id DESC LIMIT 1")).first()
        thresholds = [float(t) for t in conn.execute(sa.text(
            "SELECT DISTINCT threshold FROM sightings WHERE threshold IS NOT NULL ORDER BY 1")).scalars()]
        decision_versions = dict(conn.execute(sa.text(
            "SELECT embedding_version, count(*) FROM sightings GROUP BY 1 ORDER BY 2 DESC")).all())
        checks = [dict(r._mapping) for r in conn.execute(sa.text(
            "SELECT DISTINCT ON (check_name) check_name, partition_key, passed, severity, checked_at, "
            "  details->>'description' AS description "
            "FROM check_results ORDER BY check_name, check_id DESC"))]
        failed_7d = _one(conn, "SELECT count(*) FROM check_results WHERE NOT passed "
                               "AND checked_at > now() - interval '7 days'")
        partitions = _one(conn, "SELECT count(DISTINCT partition_key) FROM sightings")

    ok_detections = det_by_status.get("ok", 0)
    matched = decisions.get("matched", 0)
    for v in per_version:
        v["created_at"] = v["created_at"].isoformat() if v["created_at"] else None
    for c in checks:
        c["checked_at"] = c["checked_at"].isoformat() if isinstance(c["checked_at"], datetime) else c["checked_at"]
    from deer_pipeline.settings import MatchingSettings

    return {
        "detections": {"total": sum(det_by_status.values()), "ok": ok_detections, "by_status": det_by_status},
        "crops": {"total": sum(crops_by_status.values()), "ok": crops_by_status.get("ok", 0),
                  "by_status": crops_by_status},
        "embedded": {"detections": embedded,
                     "per_version": {v["embedding_version"]: v["ok"] for v in per_version}},
        "assigned": assigned,
        "unassigned_ok_detections": max(ok_detections - assigned, 0),
        "decisions": {"matched": matched, "new": decisions.get("new", 0)},
        "assignment_rate": (matched / assigned) if assigned else 0.0,
        "assigned_share_of_detections": (assigned / ok_detections) if ok_detections else 0.0,
        "deer": {"total": deer_total, "by_sex": deer_by_sex},
        "partitions_decided": partitions,
        "threshold": {"in_use": float(latest.threshold) if latest and latest.threshold is not None else None,
                      "seen_in_decisions": thresholds,
                      "default_setting": MatchingSettings().reid_threshold},
        "embedding_versions": per_version,
        "decision_versions": decision_versions,
        "last_decision_at": latest.decided_at.isoformat() if latest else None,
        "checks": {"last": checks, "failed_last_7_days": failed_7d},
    }


def true_identity_count(engine: Engine) -> int:
    """How many distinct true animals the labels (``true_identities``) name."""
    with engine.connect() as conn:
        return int(_one(conn, "SELECT count(DISTINCT identity) FROM true_identities"))


def render(s: dict) -> str:
    lines = [
        f"detections      {s['detections']['total']:>8}  "
        + ", ".join(f"{k} {v}" for k, v in s["detections"]["by_status"].items()),
        f"crops           {s['crops']['total']:>8}  "
        + ", ".join(f"{k} {v}" for k, v in s["crops"]["by_status"].items()),
        f"embedded        {s['embedded']['detections']:>8}  detections with a vector",
    ]
    for v in s["embedding_versions"]:
        lines.append(f"  {v['model']:<16} {v['ok']:>8}  {v['embedding_version']}"
                     + (f"  ({v['failed']} failed)" if v["failed"] else ""))
    lines += [
        f"assigned        {s['assigned']:>8}  sightings ({s['decisions']['matched']} matched, "
        f"{s['decisions']['new']} founded a deer; {s['unassigned_ok_detections']} ok detections unassigned)",
        f"deer            {s['deer']['total']:>8}  "
        + ", ".join(f"{k} {v}" for k, v in s["deer"]["by_sex"].items()),
        f"assignment rate {s['assignment_rate']:>8.3f}  (share of decided sightings that joined a known deer)",
        f"threshold       {s['threshold']['in_use'] if s['threshold']['in_use'] is not None else '-':>8}  "
        f"in use (default setting {s['threshold']['default_setting']})",
    ]
    if s["checks"]["last"]:
        lines.append("checks (last result):")
        for c in s["checks"]["last"]:
            lines.append(f"  {'ok  ' if c['passed'] else 'FAIL'} {c['check_name']:<28} {c['severity']:<5} "
                         f"{c['partition_key'] or '':<24} {c['description'] or ''}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="deer-pipeline status", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        s = collect(db.get_engine())
    except db.DatabaseError as exc:
        print(f"deer-pipeline status: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(s, indent=2, default=str) if args.json else render(s))
    return 0
