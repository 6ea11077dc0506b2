"""The deer roster and its pictures: a table of deer (label, sex, sightings, cameras, first and
last seen), daily numbers over time (deer total, new deer per day, 7-day assignment rate),
sightings per camera per week, and a map of the cameras with sightings (when coordinates are
known). Plain logic (SQL + matplotlib), no Dagster; the ``deer_roster`` asset shows it in the UI.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from datetime import date, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from deer_pipeline.export import records

RATE_WINDOW_DAYS = 7


@dataclass
class Roster:
    deer: list[dict] = field(default_factory=list)          # one row per deer with sightings
    daily: list[dict] = field(default_factory=list)         # day, new_deer, deer_total, sightings, matched, rate_7d
    weekly: list[dict] = field(default_factory=list)        # week (Monday), camera_id, sightings
    cameras: list[dict] = field(default_factory=list)       # camera_id, latitude, longitude, sightings, deer

    @property
    def deer_total(self) -> int:
        return len(self.deer)

    @property
    def latest(self) -> dict:
        return self.daily[-1] if self.daily else {}


def build_roster(engine: Engine) -> Roster:
    with engine.connect() as conn:
        labels = records.deer_labels(conn)
        deer = [dict(r._mapping) for r in conn.execute(sa.text(
            "SELECT s.deer_id, max(d.sex) AS sex, count(*) AS sightings, "
            "  count(DISTINCT s.encounter_key) AS encounters, "
            "  array_agg(DISTINCT det.camera_id ORDER BY det.camera_id) AS cameras, "
            "  min(s.captured_at) AS first_seen, max(s.captured_at) AS last_seen, "
            "  count(DISTINCT (s.captured_at AT TIME ZONE 'UTC')::date) AS days_seen "
            "FROM sightings s JOIN deer d ON d.deer_id = s.deer_id "
            "JOIN detections det ON det.detection_id = s.detection_id "
            "GROUP BY s.deer_id ORDER BY min(s.captured_at), s.deer_id"))]
        per_day = {r.day: r for r in conn.execute(sa.text(
            "SELECT (s.captured_at AT TIME ZONE 'UTC')::date AS day, count(*) AS sightings, "
            "  count(*) FILTER (WHERE s.decision = 'matched') AS matched "
            "FROM sightings s WHERE s.captured_at IS NOT NULL GROUP BY 1 ORDER BY 1"))}
        weekly = [dict(r._mapping) for r in conn.execute(sa.text(
            "SELECT date_trunc('week', s.captured_at AT TIME ZONE 'UTC')::date AS week, d.camera_id, "
            "  count(*) AS sightings "
            "FROM sightings s JOIN detections d ON d.detection_id = s.detection_id "
            "WHERE s.captured_at IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 2"))]
        cameras = [dict(r._mapping) for r in conn.execute(sa.text(
            "SELECT c.camera_id, c.latitude, c.longitude, count(s.detection_id) AS sightings, "
            "  count(DISTINCT s.deer_id) AS deer "
            "FROM cameras c LEFT JOIN detections d ON d.camera_id = c.camera_id "
            "LEFT JOIN sightings s ON s.detection_id = d.detection_id "
            "GROUP BY c.camera_id, c.latitude, c.longitude ORDER BY c.camera_id"))]
    for row in deer:
        row["deer"] = labels.get(int(row["deer_id"]), f"deer-{row['deer_id']}")
    first_day: dict[date, int] = {}
    for row in deer:
        if row["first_seen"] is not None:
            d0 = row["first_seen"].date()
            first_day[d0] = first_day.get(d0, 0) + 1
    daily = []
    if per_day or first_day:
        start, end = min([*per_day, *first_day]), max([*per_day, *first_day])
        total = 0
        day = start
        while day <= end:
            total += first_day.get(day, 0)
            window = [per_day[d] for d in per_day if day - timedelta(days=RATE_WINDOW_DAYS - 1) <= d <= day]
            n = sum(r.sightings for r in window)
            m = sum(r.matched for r in window)
            today = per_day.get(day)
            daily.append({"day": day, "new_deer": first_day.get(day, 0), "deer_total": total,
                          "sightings": today.sightings if today else 0,
                          "matched": today.matched if today else 0,
                          "assignment_rate_7d": (m / n) if n else None})
            day += timedelta(days=1)
    return Roster(deer=deer, daily=daily, weekly=weekly, cameras=cameras)


def roster_markdown(roster: Roster, limit: int = 200) -> str:
    lines = ["| deer | sex | sightings | encounters | cameras | first seen | last seen | days seen |",
             "|---|---|---:|---:|---|---|---|---:|"]
    for r in roster.deer[:limit]:
        lines.append(f"| {r['deer']} | {r['sex']} | {r['sightings']} | {r['encounters']} | "
                     f"{', '.join(r['cameras'] or [])} | {r['first_seen']:%Y-%m-%d %H:%M} | "
                     f"{r['last_seen']:%Y-%m-%d %H:%M} | {r['days_seen']} |")
    if len(roster.deer) > limit:
        lines.append(f"| ... {len(roster.deer) - limit} more | | | | | | | |")
    if not roster.deer:
        lines.append("| (no deer yet) | | | | | | | |")
    return "\n".join(lines)


def _figure_png(fig, dpi: int = 90) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def over_time_png(roster: Roster) -> bytes:
    """Deer total, new deer per day and the 7-day assignment rate, day by day."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    days = [r["day"] for r in roster.daily]
    ax1.plot(days, [r["deer_total"] for r in roster.daily], color="#2a6", label="deer total")
    ax1.bar(days, [r["new_deer"] for r in roster.daily], color="#9c6", label="new deer that day")
    ax1.set_ylabel("deer")
    ax1.legend(loc="upper left", fontsize=8)
    rates = [r["assignment_rate_7d"] for r in roster.daily]
    ax2.plot(days, [float("nan") if v is None else v for v in rates], color="#36a", marker=".")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel(f"{RATE_WINDOW_DAYS}-day assignment rate")
    ax2.set_xlabel("capture day (UTC)")
    fig.autofmt_xdate()
    fig.suptitle("Deer over time")
    return _figure_png(fig)


def sightings_per_camera_week_png(roster: Roster) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    weeks = sorted({r["week"] for r in roster.weekly})
    cams = sorted({r["camera_id"] for r in roster.weekly})
    counts = {(r["week"], r["camera_id"]): r["sightings"] for r in roster.weekly}
    width = 0.8 / max(1, len(cams))
    for i, cam in enumerate(cams):
        ax.bar([x - 0.4 + width * (i + 0.5) for x in range(len(weeks))],
               [counts.get((w, cam), 0) for w in weeks], width=width, label=cam)
    ax.set_xticks(range(len(weeks)))
    ax.set_xticklabels([f"{w:%Y-%m-%d}" for w in weeks], rotation=30, ha="right")
    ax.set_xlabel("week starting (Monday)")
    ax.set_ylabel("sightings")
    ax.set_title("Sightings per camera per week")
    if cams:
        ax.legend(fontsize=8, ncol=min(4, len(cams)))
    return _figure_png(fig)


def camera_map_png(roster: Roster) -> bytes | None:
    """Cameras with coordinates, sized by sightings; None when no camera has coordinates."""
    import math

    placed = [c for c in roster.cameras if c["latitude"] is not None and c["longitude"] is not None]
    if not placed:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 6))
    lat0 = sum(c["latitude"] for c in placed) / len(placed)
    biggest = max([c["sightings"] for c in placed] + [1])
    for c in placed:
        size = 40 + 600 * c["sightings"] / biggest
        colour = "#c52" if c["sightings"] else "#999"
        ax.scatter(c["longitude"], c["latitude"], s=size, color=colour, alpha=0.7, edgecolor="k")
        ax.annotate(f"{c['camera_id']}\n{c['sightings']} sightings, {c['deer']} deer",
                    (c["longitude"], c["latitude"]), textcoords="offset points", xytext=(8, 8), fontsize=8)
    ax.set_aspect(1 / max(0.05, math.cos(math.radians(lat0))))
    ax.ticklabel_format(useOffset=False)
    ax.locator_params(axis="x", nbins=4)
    ax.tick_params(axis="x", labelrotation=30)
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.set_title("Cameras (marker size: sightings)")
    ax.margins(0.3)
    return _figure_png(fig)


def png_markdown(png: bytes, alt: str) -> str:
    """Markdown with the PNG inline (a data URI), so the Dagster UI shows the picture itself."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def shrink_png(png: bytes, max_bytes: int = 250_000) -> bytes:
    """The PNG, scaled down until it is at most ``max_bytes`` (metadata stays small)."""
    if len(png) <= max_bytes:
        return png
    from PIL import Image

    img = Image.open(io.BytesIO(png))
    while True:
        img = img.resize((max(1, int(img.width * 0.75)), max(1, int(img.height * 0.75))))
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
        if buf.tell() <= max_bytes or img.width < 200:
            return buf.getvalue()
