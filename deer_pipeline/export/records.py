"""What the exports read from the store: readable deer labels and one row per detection with
its photo, camera, encounter and (when decided) deer. Plain SQL, no Dagster."""

from __future__ import annotations

import hashlib
from datetime import datetime

import sqlalchemy as sa

# A deer's name is the one people gave it in the review app (``identity.reviews.deer_names``: a
# name belongs to the deer holding most of the sightings it was given to); until it has one, a
# stable label is made from its founding detection.


def founding_label(camera_id: str | None, captured_at: datetime | None, founding_detection_id: str) -> str:
    """``deer-<camera>-<YYYYMMDD>-<6 hex>``: where and when the deer was first seen, and a short
    hash of its founding detection. It never changes while the deer exists."""
    digest = hashlib.sha256(founding_detection_id.encode()).hexdigest()[:6]
    day = captured_at.strftime("%Y%m%d") if captured_at else "nodate"
    return f"deer-{camera_id or 'nocamera'}-{day}-{digest}"


def deer_labels(conn: sa.Connection) -> dict[int, str]:
    """deer_id -> the deer's name when reviewed, else its stable founding label. Labels are
    unique: a name given to two deer gets the founding label in brackets on the second."""
    from deer_pipeline.identity.reviews import deer_names

    names = {int(k): str(v).strip() for k, v in deer_names(conn).items() if v and str(v).strip()}
    rows = conn.execute(sa.text(
        "SELECT d.deer_id, d.founding_detection_id, fd.camera_id, fd.captured_at "
        "FROM deer d LEFT JOIN detections fd ON fd.detection_id = d.founding_detection_id "
        "ORDER BY d.deer_id")).all()
    labels, used = {}, set()
    for r in rows:
        founding = founding_label(r.camera_id, r.captured_at, r.founding_detection_id)
        label = names.get(int(r.deer_id)) or founding
        if label in used:
            label = f"{label} ({founding})"
        used.add(label)
        labels[int(r.deer_id)] = label
    return labels


def human_confirmed_ids(conn: sa.Connection) -> set[str]:
    """Sightings whose deer a standing review decision confirms (as ``identity.reviews.
    human_confirmed`` counts them): named in a same / merge / split decision, or the query side
    of a different / new decision."""
    return set(conn.execute(sa.text(
        "SELECT s.detection_id FROM sightings s WHERE EXISTS (SELECT 1 FROM identity_reviews_status r "
        "WHERE r.undone_by IS NULL AND ((r.kind IN ('same', 'merge', 'split') AND "
        "(r.detections_a @> ARRAY[s.detection_id] OR r.detections_b @> ARRAY[s.detection_id])) OR "
        "(r.kind IN ('different', 'new') AND r.detections_a @> ARRAY[s.detection_id])))")).scalars())


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


def is_human_decision(decision: str | None, detection_id: str, confirmed: set[str]) -> bool:
    """A person decided (or confirmed) this sighting's deer: a review decision stands on it."""
    return detection_id in confirmed or (decision is not None and decision not in ("matched", "new"))
