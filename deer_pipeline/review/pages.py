"""What the roster and the deer page show (plain SQL) and the sightings-per-week plot."""

from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime

import sqlalchemy as sa

from deer_pipeline.identity import reviews

ROSTER_SORTS = {"deer": "k.deer_id", "name": "name", "sex": "k.sex", "first_seen": "k.first_seen",
                "last_seen": "k.last_seen", "sightings": "k.sighting_count", "encounters": "encounters",
                "cameras": "n_cameras"}


@dataclass
class RosterRow:
    deer_id: int
    name: str | None
    sex: str
    first_seen: datetime | None
    last_seen: datetime | None
    cameras: list[str]
    sightings: int
    encounters: int
    thumbnail: str | None          # detection id of the crop shown


def roster(conn: sa.Connection, sort: str = "last_seen", descending: bool = True, camera: str | None = None,
           day_from: date | None = None, day_to: date | None = None) -> list[RosterRow]:
    """One row per deer; ``camera`` / dates keep the deer seen there / then."""
    names = reviews.deer_names(conn)
    where, params = [], {}
    if camera or day_from or day_to:
        cond = ["s2.deer_id = k.deer_id"]
        if camera:
            cond.append("d2.camera_id = :cam")
            params["cam"] = camera
        if day_from:
            cond.append("d2.day >= :a")
            params["a"] = day_from
        if day_to:
            cond.append("d2.day <= :b")
            params["b"] = day_to
        where.append("EXISTS (SELECT 1 FROM sightings s2 JOIN detections d2 USING (detection_id) WHERE "
                     + " AND ".join(cond) + ")")
    rows = conn.execute(sa.text(
        "SELECT k.deer_id, k.sex, k.first_seen, k.last_seen, k.sighting_count, k.founding_detection_id, "
        "  x.encounters, x.cameras, cardinality(x.cameras) n_cameras, "
        "  (SELECT s3.detection_id FROM sightings s3 JOIN crops c ON c.detection_id = s3.detection_id "
        "   AND c.status = 'ok' WHERE s3.deer_id = k.deer_id ORDER BY c.width * c.height DESC NULLS LAST, "
        "   s3.detection_id LIMIT 1) thumb "
        "FROM deer k JOIN (SELECT s.deer_id, count(DISTINCT s.encounter_key) encounters, "
        "  array_agg(DISTINCT d.camera_id ORDER BY d.camera_id) cameras FROM sightings s "
        "  JOIN detections d USING (detection_id) GROUP BY s.deer_id) x ON x.deer_id = k.deer_id "
        + ("WHERE " + " AND ".join(where) if where else "")), params).all()
    out = [RosterRow(r.deer_id, names.get(r.deer_id), r.sex, r.first_seen, r.last_seen, list(r.cameras or []),
                     r.sighting_count, r.encounters, r.thumb) for r in rows]
    key = sort if sort in ROSTER_SORTS else "last_seen"
    attr = {"deer": "deer_id", "sightings": "sightings", "cameras": "cameras"}.get(key, key)

    def sort_key(r: RosterRow):
        v = getattr(r, attr)
        if attr == "cameras":
            v = len(v)
        return (v is None, v if v is not None else 0, r.deer_id)

    present = [r for r in out if getattr(r, attr) is not None]
    missing = [r for r in out if getattr(r, attr) is None]
    present.sort(key=sort_key, reverse=descending)
    return present + sorted(missing, key=lambda r: r.deer_id)


def cameras(conn: sa.Connection) -> list[str]:
    return conn.execute(sa.text("SELECT camera_id FROM cameras ORDER BY 1")).scalars().all()


@dataclass
class EncounterGroup:
    encounter_key: str
    camera_id: str | None
    started_at: datetime | None
    sightings: list[dict] = field(default_factory=list)


@dataclass
class DeerPage:
    deer_id: int
    name: str | None
    sex: str
    first_seen: datetime | None
    last_seen: datetime | None
    founding_detection_id: str
    encounters: list[EncounterGroup]
    sightings: int
    cameras: list[str]
    reviews: list[reviews.Review]


def deer_page(conn: sa.Connection, deer_id: int) -> DeerPage | None:
    k = conn.execute(sa.text("SELECT * FROM deer WHERE deer_id = :d"), {"d": deer_id}).first()
    if k is None:
        return None
    rows = conn.execute(sa.text(
        "SELECT s.detection_id, s.encounter_key, s.decision, s.score, s.threshold, d.camera_id, d.captured_at, "
        "  d.classification, d.sex FROM sightings s JOIN detections d USING (detection_id) "
        "WHERE s.deer_id = :d ORDER BY d.captured_at NULLS LAST, s.detection_id"), {"d": deer_id}).all()
    groups: dict[str, EncounterGroup] = {}
    for r in rows:
        g = groups.get(r.encounter_key)
        if g is None:
            g = groups[r.encounter_key] = EncounterGroup(r.encounter_key, r.camera_id, r.captured_at)
        g.sightings.append(dict(r._mapping))
    ids = [r.detection_id for r in rows]
    related = [rv for rv in reviews.all_reviews(conn) if set(rv.a) & set(ids) or set(rv.b) & set(ids)]
    return DeerPage(k.deer_id, reviews.deer_names(conn).get(deer_id), k.sex, k.first_seen, k.last_seen,
                    k.founding_detection_id, list(groups.values()), len(rows),
                    sorted({r.camera_id for r in rows if r.camera_id}), related[-20:])


def weekly_counts(conn: sa.Connection, deer_id: int) -> dict[str, dict[date, int]]:
    """camera -> ISO week (its Monday) -> sightings."""
    out: dict[str, dict[date, int]] = defaultdict(dict)
    for cam, week, n in conn.execute(sa.text(
            "SELECT d.camera_id, date_trunc('week', d.captured_at)::date wk, count(*) FROM sightings s "
            "JOIN detections d USING (detection_id) WHERE s.deer_id = :d AND d.captured_at IS NOT NULL "
            "GROUP BY 1, 2 ORDER BY 2, 1"), {"d": deer_id}):
        out[cam or "?"][week] = n
    return out


def weekly_plot_png(counts: dict[str, dict[date, int]], title: str) -> bytes:
    """A small bar chart: sightings per week, one colour per camera (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 2.4), dpi=100)
    ax = fig.subplots()
    weeks = sorted({w for per in counts.values() for w in per})
    if weeks:
        x = list(range(len(weeks)))
        width = 0.8 / max(len(counts), 1)
        for i, (cam, per) in enumerate(sorted(counts.items())):
            ax.bar([xi + i * width for xi in x], [per.get(w, 0) for w in weeks], width=width, label=cam)
        ax.set_xticks([xi + 0.4 - width / 2 for xi in x])
        ax.set_xticklabels([w.strftime("%d %b %y") for w in weeks], fontsize=7, rotation=0)
        ax.legend(fontsize=7, title="camera", title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.text(0.5, 0.5, "no dated sightings", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("sightings", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.yaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
