"""Flank-aware galleries: a sighting is not compared with the other flank of a deer.

The two flanks of a deer carry different marks, so a photo of the left flank says nothing about
a photo of the right flank; comparing them only adds chance look-alikes. Where the side is known
(``detections.side``: left | right, read at ingestion from a side / flank / viewpoint field), a
pair of sightings with opposite known sides is not compared; a sighting whose side is unknown is
compared with both flanks.

For the cosine decision (``match_score=cosine``) the scores of opposite flanks are removed before
the candidate deer are ranked (exact search; two-stage ranks deer by a profile per flank; the
``hnsw`` look-up leaves the other flank's sightings out of what it returns), and each candidate
is then scored on its sightings whose flank is compatible
with each detection of the encounter; a deer known only from the other flank is not a candidate
(unless a person said this is that deer). The local and fused scores keep their own rule in
their re-scoring (``candidates._Rescorer``).

Plain logic; no Dagster.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

SIDES = ("left", "right")
SIDE_CODE = {"left": 1, "right": 2}          # 0 unknown: code(a) * code(b) == 2 exactly for opposite flanks


def flank_compatible(a: str | None, b: str | None) -> bool:
    """Two sightings may show the same flank unless both sides are known and differ."""
    return a is None or b is None or a == b


def other_flank(side: str | None) -> str | None:
    """The opposite flank of a known side, None for an unknown one."""
    return {"left": "right", "right": "left"}.get(side or "")


def side_codes(sides: Iterable[str | None]) -> np.ndarray:
    """0 unknown, 1 left, 2 right per side (anything else counts as unknown)."""
    return np.array([SIDE_CODE.get(s, 0) for s in sides], np.int16)


def opposite_flanks(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a) x len(b)) True where both sides are known and differ (codes of :func:`side_codes`)."""
    return (np.asarray(a, np.int16)[:, None] * np.asarray(b, np.int16)[None, :]) == 2


class SideBook:
    """The known sides of detections, read from the database once per detection, and a side
    code per gallery row (kept up to date as the gallery grows)."""

    def __init__(self):
        self._side: dict[str, str | None] = {}
        self._rows = np.zeros(0, np.int16)

    def load(self, conn, detection_ids: Iterable[str | None]) -> None:
        import sqlalchemy as sa

        want = [d for d in dict.fromkeys(detection_ids) if d is not None and d not in self._side]
        if not want:
            return
        got = dict(conn.execute(sa.text("SELECT detection_id, side FROM detections WHERE detection_id = ANY(:i) "
                                        "AND side IN ('left', 'right')"), {"i": want}).all())
        for d in want:
            self._side[d] = got.get(d)

    def side(self, detection_id: str | None) -> str | None:
        return self._side.get(detection_id) if detection_id is not None else None

    def row_codes(self, conn, gallery) -> np.ndarray:
        """Side code (0 unknown, 1 left, 2 right) of every gallery row: the gallery's own when
        it holds every row's flank (exact, two_stage), else read from the store once per row."""
        n = gallery.n
        if getattr(gallery, "sides_known", False):
            return gallery.side[:n].astype(np.int16)
        if len(self._rows) < n:
            ids = gallery.detection_ids[len(self._rows):n]
            self.load(conn, ids)
            self._rows = np.concatenate([self._rows, side_codes(self.side(d) for d in ids)])
        return self._rows[:n]

    def any_known(self, conn, query_ids: Sequence[str] | None) -> bool:
        """Has any of these detections a known side (then scores need masking)?"""
        if not query_ids:
            return False
        self.load(conn, query_ids)
        return any(self.side(d) is not None for d in query_ids)

    def mask(self, conn, scores: np.ndarray, query_ids: Sequence[str], gallery, lo: int, hi: int) -> None:
        """Set the scores (query rows x gallery rows ``lo:hi``) of opposite known flanks to -inf."""
        self.load(conn, query_ids)
        qc = side_codes(self.side(d) for d in query_ids)
        if not qc.any() or hi <= lo:
            return
        scores[opposite_flanks(qc, self.row_codes(conn, gallery)[lo:hi])] = -np.inf


def flank_filtered(conn, detection_ids: Sequence[str], q: list[np.ndarray], cands: list[tuple], gallery,
                   book: SideBook, keep: int | None = None) -> tuple[list[tuple], int]:
    """``cands`` ([(deer, score, per-detection scores, per-model components)], best first)
    re-scored on flank-compatible sightings only; returns (candidates, deer dropped because
    only their other flank is known). Unchanged when no detection of the encounter has a known
    side. A detection not compared with a deer gets score -inf there (no score row is written);
    ``keep`` (a deer a person named) stays a candidate as it was."""
    book.load(conn, detection_ids)
    q_sides = [book.side(d) for d in detection_ids]
    if not cands or all(s is None for s in q_sides):
        return cands, 0
    known = getattr(gallery, "sides_known", False)      # the gallery holds every row's flank
    if not known:
        book.load(conn, [gallery.detection_ids[r] for c in cands for r in gallery.rows(c[0])])
    q_codes = side_codes(q_sides)
    out, dropped = [], 0
    rows_k = np.arange(len(detection_ids))
    for cand in cands:
        deer = cand[0]
        rows = np.asarray(gallery.rows(deer), np.int64)
        row_codes = gallery.side[rows] if known else side_codes(book.side(gallery.detection_ids[r]) for r in rows)
        compat = ~opposite_flanks(q_codes, row_codes)
        if compat.all():
            out.append(cand)
            continue
        if not compat.any():
            if deer == keep:
                out.append(cand)
            else:
                dropped += 1
            continue
        G, comps = gallery.rescore_rows(q, np.tile(rows, (len(detection_ids), 1)))   # k x rows (x models)
        G[~compat] = -np.inf
        best = G.argmax(axis=1)
        sims = G[rows_k, best]
        comp = comps[rows_k, best]
        out.append((deer, float(sims.max()), sims, comp))
    out.sort(key=lambda c: (-c[1], c[0]))
    return out, dropped
