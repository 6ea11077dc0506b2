"""Encounters: the detections of one burst linked frame to frame into tracks.

A burst (``detections.encounter_id``) is a run of frames from one camera taken within a few
seconds. Inside a burst the same animal appears in consecutive frames at nearly the same place,
so its boxes are linked frame to frame by box overlap (IoU) and centre distance, with a gate;
the assignment per frame pair is optimal (Hungarian, ``scipy.optimize.linear_sum_assignment``).
Two detections of the same frame (same ``image_id``) are never linked: each track takes at most
one box per frame.

One track = one *encounter*: its detections are decided together (they go to the same deer).
Tracks that share a frame are *cannot-link*: two animals visible at the same moment are two
animals, so they may never end in one deer.

Plain logic, no database and no Dagster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterable, Sequence

import numpy as np
import sqlalchemy as sa

SEX_ORDER = ("female", "male")


@dataclass(frozen=True)
class DetectionBox:
    """What linking needs to know about one detection."""

    detection_id: str
    image_id: int
    captured_at: datetime | None
    burst_id: str | None          # detections.encounter_id; None = a burst of its own
    x: float = 0.0
    y: float = 0.0
    w: float = 0.0
    h: float = 0.0
    sex: str = "unknown"

    @property
    def centre(self) -> tuple[float, float]:
        return (self.x + self.w / 2.0, self.y + self.h / 2.0)

    @property
    def diagonal(self) -> float:
        return math.hypot(self.w, self.h)


@dataclass
class Encounter:
    """One burst track: detections of one animal, decided together."""

    encounter_key: str
    detections: list[DetectionBox] = field(default_factory=list)

    @property
    def detection_ids(self) -> list[str]:
        return [d.detection_id for d in self.detections]

    @property
    def image_ids(self) -> set[int]:
        return {d.image_id for d in self.detections}

    @property
    def founding_detection_id(self) -> str:
        """The first detection in capture-time order (ties by detection id)."""
        return min(self.detections, key=order_key).detection_id

    @property
    def started_at(self) -> datetime | None:
        return min(self.detections, key=order_key).captured_at

    @property
    def sort_key(self) -> tuple:
        return order_key(min(self.detections, key=order_key))

    @property
    def sex(self) -> str:
        return consensus_sex(d.sex for d in self.detections)


def order_key(d: DetectionBox) -> tuple:
    """Capture-time order with detection id as tie-break; undated detections sort last."""
    t = d.captured_at
    return (t is None, t.timestamp() if t is not None else 0.0, d.detection_id)


def consensus_sex(sexes: Iterable[str | None]) -> str:
    """The most specific sex among several sightings: female or male when only one of them is
    seen (``unknown`` sightings do not count against it), the majority when both are seen, and
    ``unknown`` on a tie or when nothing specific is seen."""
    counts = {"female": 0, "male": 0}
    for s in sexes:
        if s in counts:
            counts[s] += 1
    if counts["female"] > counts["male"]:
        return "female"
    if counts["male"] > counts["female"]:
        return "male"
    return "unknown"


def iou(a: DetectionBox, b: DetectionBox) -> float:
    ix = max(0.0, min(a.x + a.w, b.x + b.w) - max(a.x, b.x))
    iy = max(0.0, min(a.y + a.h, b.y + b.h) - max(a.y, b.y))
    inter = ix * iy
    union = a.w * a.h + b.w * b.h - inter
    return inter / union if union > 0 else 0.0


def centre_distance(a: DetectionBox, b: DetectionBox) -> float:
    """Centre distance in units of the mean box diagonal (scale-free)."""
    (ax, ay), (bx, by) = a.centre, b.centre
    scale = (a.diagonal + b.diagonal) / 2.0
    d = math.hypot(ax - bx, ay - by)
    if scale <= 0:
        return 0.0 if d == 0 else math.inf
    return d / scale


@dataclass(frozen=True)
class LinkSettings:
    """Gate for linking a box to a track: overlap of at least ``min_iou`` OR centres closer than
    ``max_centre_distance`` mean box diagonals."""

    min_iou: float = 0.1
    max_centre_distance: float = 0.75


def link_cost(a: DetectionBox, b: DetectionBox, settings: LinkSettings) -> float | None:
    """Cost of linking b to a track whose last box is a; None when the gate refuses it."""
    o = iou(a, b)
    dist = centre_distance(a, b)
    if o < settings.min_iou and dist > settings.max_centre_distance:
        return None
    return (1.0 - o) + 0.5 * min(dist, 10.0)


def _frames(detections: Sequence[DetectionBox]) -> list[list[DetectionBox]]:
    by_image: dict[int, list[DetectionBox]] = {}
    for d in detections:
        by_image.setdefault(d.image_id, []).append(d)
    frames = [sorted(v, key=lambda d: d.detection_id) for v in by_image.values()]
    frames.sort(key=lambda f: (min(order_key(d) for d in f)[:2], f[0].image_id))
    return frames


def track_burst(detections: Sequence[DetectionBox], settings: LinkSettings = LinkSettings()) -> list[list[DetectionBox]]:
    """Link the detections of one burst into tracks (lists of detections, one per frame at most).

    Frames are visited in capture order; each open track is represented by its last box and the
    boxes of the next frame are assigned to tracks by minimum total cost under the gate. Boxes
    left over start new tracks. A track may skip a frame (the deer was hidden for one shot).
    """
    tracks: list[list[DetectionBox]] = []
    for frame in _frames(detections):
        if not tracks:
            tracks = [[d] for d in frame]
            continue
        big = 1e6
        cost = np.full((len(tracks), len(frame)), big)
        for i, t in enumerate(tracks):
            last = t[-1]
            if last.image_id == frame[0].image_id:   # cannot happen (one entry per frame) - guard
                continue
            for j, d in enumerate(frame):
                c = link_cost(last, d, settings)
                if c is not None:
                    cost[i, j] = c
        if len(tracks) == 1 or len(frame) == 1:     # trivial: the single cheapest pair
            i, j = np.unravel_index(int(np.argmin(cost)), cost.shape)
            rows, cols = [i], [j]
        else:
            from scipy.optimize import (
                linear_sum_assignment,  # slow import: only when needed
            )

            rows, cols = linear_sum_assignment(cost)
        taken = set()
        for i, j in zip(rows, cols):
            if cost[i, j] < big:
                tracks[i].append(frame[j])
                taken.add(j)
        for j, d in enumerate(frame):
            if j not in taken:
                tracks.append([d])
    return tracks


def build_encounters(detections: Iterable[DetectionBox], settings: LinkSettings = LinkSettings()) -> list[Encounter]:
    """Group detections into encounters (burst tracks), returned in decision order.

    A detection without a burst id is a burst of its own frame. The encounter key is
    ``"<founding detection id>"`` prefixed with ``enc:``: stable across re-runs, unique.
    """
    bursts: dict[str, list[DetectionBox]] = {}
    for d in detections:
        key = d.burst_id if d.burst_id else f"image:{d.image_id}"
        bursts.setdefault(key, []).append(d)
    encounters = []
    for members in bursts.values():
        for track in track_burst(members, settings):
            first = min(track, key=order_key)
            encounters.append(Encounter(encounter_key=f"enc:{first.detection_id}",
                                        detections=sorted(track, key=order_key)))
    encounters.sort(key=lambda e: e.sort_key)
    return encounters


def cannot_link(encounters: Sequence[Encounter]) -> dict[str, set[str]]:
    """encounter_key -> keys of encounters that share a frame with it (two animals at once)."""
    by_image: dict[int, set[str]] = {}
    for e in encounters:
        for image_id in e.image_ids:
            by_image.setdefault(image_id, set()).add(e.encounter_key)
    out: dict[str, set[str]] = {e.encounter_key: set() for e in encounters}
    for keys in by_image.values():
        if len(keys) > 1:
            for k in keys:
                out[k] |= keys - {k}
    return out


# --------------------------------------------------------------------------------------------
# Bursts: encounter ids assigned at ingestion
# --------------------------------------------------------------------------------------------

ENCOUNTER_SQL = """
WITH frames AS (
    SELECT DISTINCT i.image_id, d.camera_id, i.captured_at
    FROM images i JOIN detections d ON d.image_id = i.image_id
    WHERE d.camera_id = ANY(:cams) AND i.captured_at IS NOT NULL AND i.status = 'ok'
), marked AS (
    SELECT image_id, camera_id, captured_at,
           CASE WHEN lag(captured_at) OVER w IS NULL
                  OR captured_at - lag(captured_at) OVER w > make_interval(secs => :win)
                THEN 1 ELSE 0 END AS starts
    FROM frames WINDOW w AS (PARTITION BY camera_id ORDER BY captured_at, image_id)
), grouped AS (
    SELECT image_id, camera_id, captured_at,
           sum(starts) OVER (PARTITION BY camera_id ORDER BY captured_at, image_id) AS burst
    FROM marked
), named AS (
    SELECT image_id, camera_id,
           camera_id || '-' || to_char(min(captured_at) OVER (PARTITION BY camera_id, burst) AT TIME ZONE 'UTC',
                                       'YYYY-MM-DD"T"HH24:MI:SS') ||
           CASE WHEN extract(microseconds FROM min(captured_at) OVER (PARTITION BY camera_id, burst))::bigint % 1000000 <> 0
                THEN to_char(min(captured_at) OVER (PARTITION BY camera_id, burst) AT TIME ZONE 'UTC', '.US')
                ELSE '' END || 'Z' AS encounter_id
    FROM grouped
)
UPDATE detections d SET encounter_id = n.encounter_id
FROM named n
WHERE d.image_id = n.image_id AND d.camera_id = n.camera_id AND d.encounter_id IS DISTINCT FROM n.encounter_id
"""


def recompute_encounters(conn: sa.Connection, cameras: list[str], burst_window_s: float) -> int:
    """(Re)assign encounter ids for every frame of these cameras; returns rows changed."""
    res = conn.execute(sa.text(ENCOUNTER_SQL), {"cams": list(cameras), "win": float(burst_window_s)})
    return res.rowcount
