"""What the exports read from the store: readable deer labels and one row per detection with
its photo, camera, encounter and (when decided) deer. Plain SQL, no Dagster."""

from __future__ import annotations

import hashlib
from datetime import datetime

import sqlalchemy as sa

# A deer's name, when the review feature has given it one, is read from the first of these
# columns of ``deer`` that exists; until then a stable label is made from the founding detection.
NAME_COLUMNS = ("name", "deer_name", "display_name")


def _name_column(conn: sa.Connection) -> str | None:
    found = set(conn.execute(sa.text(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
        "AND table_name = 'deer' AND column_name = ANY(:c)"), {"c": list(NAME_COLUMNS)}).scalars())
    return next((c for c in NAME_COLUMNS if c in found), None)


def founding_label(camera_id: str | None, captured_at: datetime | None, founding_detection_id: str) -> str:
    """``deer-<camera>-<YYYYMMDD>-<6 hex>``: where and when the deer was first seen, and a short
    hash of its founding detection. It never changes while the deer exists."""
    digest = hashlib.sha256(founding_detection_id.encode()).hexdigest()[:6]
    day = captured_at.strftime("%Y%m%d") if captured_at else "nodate"
    return f"deer-{camera_id or 'nocamera'}-{day}-{digest}"


def deer_labels(conn: sa.Connection) -> dict[int, str]:
    """deer_id -> the deer's name when reviewed, else its stable founding label."""
    name_col = _name_column(conn)
    name_sql = f"NULLIF(btrim(d.{name_col}::text), '')" if name_col else "NULL"
    rows = conn.execute(sa.text(
        f"SELECT d.deer_id, d.founding_detection_id, {name_sql} AS name, fd.camera_id, fd.captured_at "
        "FROM deer d LEFT JOIN detections fd ON fd.detection_id = d.founding_detection_id")).all()
    labels = {}
    for r in rows:
        labels[int(r.deer_id)] = r.name or founding_label(r.camera_id, r.captured_at, r.founding_detection_id)
    return labels


DETECTIONS_SQL = """
SELECT d.detection_id, d.camera_id, d.captured_at, d.encounter_id, d.classification, d.sex,
       d.bbox_x, d.bbox_y, d.bbox_w, d.bbox_h, d.confidence,
       i.image_id, i.path, i.width, i.height,
       s.deer_id, s.decision, s.score, s.threshold, s.embedding_version, s.decided_at, s.encounter_key
FROM detections d
JOIN images i ON i.image_id = d.image_id
LEFT JOIN sightings s ON s.detection_id = d.detection_id
WHERE d.status = 'ok' AND i.status = 'ok' AND d.captured_at IS NOT NULL AND d.camera_id IS NOT NULL
  AND (:decided_only = false OR s.deer_id IS NOT NULL)
ORDER BY d.captured_at, d.camera_id, d.detection_id
"""


def detection_rows(conn: sa.Connection, decided_only: bool = False) -> list[dict]:
    """Every good detection (or only those decided), with photo, camera and deer."""
    return [dict(r._mapping) for r in conn.execute(sa.text(DETECTIONS_SQL), {"decided_only": decided_only})]


def is_human_decision(decision: str | None) -> bool:
    """Decisions the pipeline makes are ``matched`` / ``new``; anything else was made by a person."""
    return decision is not None and decision not in ("matched", "new")
