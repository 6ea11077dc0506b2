"""What the sensor needs to know about newly ingested detections (plain SQL, no Dagster)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

import sqlalchemy as sa
from sqlalchemy.engine import Engine


@dataclass(frozen=True)
class NewWork:
    camera_id: str
    day: str            # YYYY-MM-DD
    max_seq: int        # highest detections.seq of this partition seen in this batch
    n_detections: int


def new_detections_since(engine: Engine, cursor_seq: int, limit_partitions: int = 1000) -> list[NewWork]:
    """Partitions (camera, day) that received detections with ``seq > cursor_seq``, oldest first.

    Rejected detections are not work: they never reach a crop. At most ``limit_partitions`` are
    returned; the caller advances its cursor only to the highest ``max_seq`` it returns, so the
    rest comes on the next tick.
    """
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            """
            SELECT camera_id, day::text AS day, max(seq) AS max_seq, count(*) AS n
            FROM detections
            WHERE seq > :cursor AND status = 'ok' AND camera_id IS NOT NULL AND day IS NOT NULL
            GROUP BY camera_id, day
            ORDER BY max(seq)
            LIMIT :limit
            """), {"cursor": cursor_seq, "limit": limit_partitions}).all()
    return [NewWork(r.camera_id, r.day, int(r.max_seq), int(r.n)) for r in rows]


@dataclass(frozen=True)
class HeldCount:
    held: int            # detections held now (their day is not a partition)
    before_start: int    # of which captured before the first day partition
    future: int          # of which captured today or later (the last partition is yesterday)
    earliest: str | None  # earliest held day (YYYY-MM-DD)
    released: int = 0    # detections whose day became a partition in this call (status ok again)
    newly_held: int = 0  # ok detections found outside the range and held in this call


def sync_held(engine: Engine, first: date, last: date) -> HeldCount:
    """Keep ``status`` in step with the partition range [first, last].

    ``ok`` detections whose day is not a partition (captured before DEER_START_DATE, or after
    today: a camera clock set wrong) become ``held`` with the reason; ``held`` detections whose
    day is a partition now (the start date moved, the day arrived) become ``ok`` again with a new
    ``seq``, so the new-detections sensor sees them as new work. The sensor calls this on every
    tick, so a held detection never blocks the others and is not forgotten."""
    from deer_pipeline.settings import held_reason

    with engine.begin() as conn:
        stray = conn.execute(sa.text(
            "SELECT detection_id, day FROM detections WHERE status = 'ok' AND day IS NOT NULL "
            "AND (day < :first OR day > :last) FOR UPDATE"), {"first": first, "last": last}).all()
        for r in stray:
            conn.execute(sa.text("UPDATE detections SET status = 'held', reason = :why WHERE detection_id = :d"),
                         {"why": held_reason(r.day, first, last), "d": r.detection_id})
        released = conn.execute(sa.text(
            "UPDATE detections SET status = 'ok', reason = NULL, "
            "  seq = nextval(pg_get_serial_sequence('detections', 'seq')) "
            "WHERE status = 'held' AND day BETWEEN :first AND :last"), {"first": first, "last": last}).rowcount
        row = conn.execute(sa.text(
            "SELECT count(*) AS n, count(*) FILTER (WHERE day < :first) AS before, "
            "       count(*) FILTER (WHERE day > :last) AS future, min(day)::text AS earliest "
            "FROM detections WHERE status = 'held'"), {"first": first, "last": last}).one()
    return HeldCount(int(row.n), int(row.before), int(row.future), row.earliest, int(released), len(stray))


def partitions_with_detections(engine: Engine) -> list[tuple[str, str]]:
    """Every (camera, day) that has detections to process, in time order."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT DISTINCT camera_id, day::text FROM detections "
            "WHERE status = 'ok' AND camera_id IS NOT NULL AND day IS NOT NULL ORDER BY 2, 1")).all()
    return [(r[0], r[1]) for r in rows]


def partitions_with_work(engine: Engine, partitions, decided_too: bool = False) -> list[tuple[str, str]]:
    """The (camera, day) partitions of ``partitions`` that hold ``ok`` detections, in the given
    order (one query). With ``decided_too`` also those that hold decisions (deciding such a
    partition again withdraws decisions about detections that are no longer ``ok``). A run over
    a rectangle of partitions skips the rest: there is nothing to crop, embed or decide."""
    partitions = [(str(c), str(d)) for c, d in partitions]
    if not partitions:
        return []
    cams, days = [c for c, _ in partitions], [d for _, d in partitions]
    sql = ("SELECT DISTINCT d.camera_id, d.day::text FROM detections d "
           "JOIN unnest(CAST(:cams AS text[]), CAST(:days AS date[])) AS p(camera_id, day) "
           "  ON d.camera_id = p.camera_id AND d.day = p.day WHERE d.status = 'ok'")
    if decided_too:
        sql += (" UNION SELECT split_part(s.partition_key, '|', 1), split_part(s.partition_key, '|', 2) "
                "FROM sightings s WHERE s.partition_key = ANY(CAST(:keys AS text[]))")
    with engine.connect() as conn:
        found = {(r[0], r[1]) for r in conn.execute(sa.text(sql), {
            "cams": cams, "days": days, "keys": [f"{c}|{d}" for c, d in partitions]})}
    return [p for p in partitions if p in found]


def cameras_with_detections(engine: Engine, day: str | date) -> list[str]:
    """The cameras with ``ok`` detections captured on ``day``."""
    with engine.connect() as conn:
        return list(conn.execute(sa.text(
            "SELECT DISTINCT camera_id FROM detections WHERE day = :d AND status = 'ok' "
            "AND camera_id IS NOT NULL ORDER BY 1"), {"d": str(day)}).scalars())


@dataclass(frozen=True)
class UnassignedWork:
    camera_id: str
    day: str
    n_unassigned: int
    fingerprint: str    # changes whenever the set of unassigned detections changes


def partitions_with_unassigned(engine: Engine, limit_partitions: int = 200) -> list[UnassignedWork]:
    """Partitions holding good detections that no decision has assigned to a deer yet.

    The system we start from could reprocess unassigned detections; here they are detections
    whose embedding failed or was missing when their partition was decided, or partitions never
    decided. Crops that are too small can never be assigned and are left out, so they are not
    retried forever, and so are detections a person marked unidentifiable. Oldest days first.
    """
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            """
            SELECT d.camera_id, d.day::text AS day, count(*) AS n,
                   md5(string_agg(d.detection_id, ',' ORDER BY d.detection_id)) AS fingerprint
            FROM detections d
            LEFT JOIN sightings s ON s.detection_id = d.detection_id
            LEFT JOIN crops c ON c.detection_id = d.detection_id
            WHERE d.status = 'ok' AND d.camera_id IS NOT NULL AND d.day IS NOT NULL
              AND s.detection_id IS NULL
              AND (c.status IS NULL OR c.status <> 'too_small')
              AND NOT EXISTS (SELECT 1 FROM identity_reviews_status r WHERE r.kind = 'unidentifiable'
                              AND r.undone_by IS NULL AND r.detections_a @> ARRAY[d.detection_id])
            GROUP BY d.camera_id, d.day
            ORDER BY d.day, d.camera_id
            LIMIT :limit
            """), {"limit": limit_partitions}).all()
    return [UnassignedWork(r.camera_id, r.day, int(r.n), r.fingerprint) for r in rows]
