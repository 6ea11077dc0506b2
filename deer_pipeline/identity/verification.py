"""Local-feature verification of candidate sightings, with the features cached per crop.

:class:`Verifier` gives the geometric score (inlier count, :mod:`local_features`) of pairs of
detections. Features are computed once per crop and feature version and kept in the table
``local_features`` (sql/004), so a nightly run never recomputes them; pair scores are kept in
memory for the life of the verifier (one decision run, or one evaluation).

Bad input never stops a decision and never creates a deer by itself: a crop that cannot be read,
has no keypoints, gives a degenerate fit, or whose cache entry is corrupt (checksum) yields no
local score for that pair (the global score stands alone) and the reason is counted in
:attr:`Verifier.reasons` (the step's metadata). A corrupt cache entry is recomputed and
replaced.

Background control: trail cameras are fixed, so a still background matches itself across
different animals. With ``background_control`` the keypoints of a crop that also match a crop of
another animal in the same frame (two detections of one frame are two animals) are discarded
before verification: what both animals share is the place, not the animal.

Plain logic; no Dagster.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from typing import Iterable, Mapping, Sequence

import numpy as np
import sqlalchemy as sa

from deer_pipeline.identity import local_features as lf
from deer_pipeline.identity.flanks import flank_compatible  # noqa: F401  (re-exported: one definition)
from deer_pipeline.settings import LocalFeatureSettings

log = logging.getLogger(__name__)


class Verifier:
    """Pair verification for one run. ``engine`` holds the cache table and the crops table;
    ``crop_store`` is the crop store directory the crops' relative paths are under."""

    def __init__(self, engine, crop_store: str, settings: LocalFeatureSettings | None = None):
        self.engine = engine
        self.crop_store = crop_store
        self.settings = settings or LocalFeatureSettings()
        self.version = lf.feature_version(self.settings.long_side, self.settings.max_keypoints)
        self._features: dict[str, lf.LocalFeatures | None] = {}
        self._pairs: dict[tuple[str, str], int | None] = {}
        self._sides: dict[str, str | None] = {}
        self.reasons: Counter = Counter()          # why a pair or a crop has no local score
        self.computed = 0                          # crops whose features were computed (cache misses)
        self.cached = 0                            # crops whose features came from the cache
        self.pairs_verified = 0
        self.background_keypoints_removed = 0

    # -- features ------------------------------------------------------------------------------

    def prepare(self, detection_ids: Iterable[str], background: bool = True) -> None:
        """Load (or compute and cache) the features of these detections (and, with background
        control, remove what they share with other animals of their frames)."""
        want = [d for d in dict.fromkeys(detection_ids) if d not in self._features]
        if not want:
            return
        with self.engine.begin() as conn:
            rows = {r.detection_id: r for r in conn.execute(sa.text(
                "SELECT detection_id, status, reason, features, sha256 FROM local_features "
                "WHERE feature_version = :v AND detection_id = ANY(:ids)"), {"v": self.version, "ids": want})}
            info = {r.detection_id: r for r in conn.execute(sa.text(
                "SELECT d.detection_id, d.image_id, d.side, c.crop_path, c.status FROM detections d "
                "LEFT JOIN crops c ON c.detection_id = d.detection_id WHERE d.detection_id = ANY(:ids)"),
                {"ids": want})}
            todo = []
            for d in want:
                i = info.get(d)
                self._sides[d] = (i.side if i is not None else None) or None
                r = rows.get(d)
                if r is not None and r.status == "ok":
                    try:
                        self._features[d] = lf.unpack(r.features, r.sha256)
                        self.cached += 1
                        continue
                    except lf.CorruptFeatures as exc:
                        self.reasons["corrupt cache entry (recomputed)"] += 1
                        log.warning("local features of %s: corrupt cache entry (%s); recomputing", d, exc)
                elif r is not None:
                    self._features[d] = None
                    self.cached += 1
                    continue
                todo.append(d)
            new_rows = []
            for d in todo:
                i = info.get(d)
                feats, reason = self._compute(i)
                self._features[d] = feats
                self.computed += 1
                if feats is None:
                    self.reasons[reason] += 1
                    new_rows.append({"d": d, "v": self.version, "st": "failed", "r": reason, "n": 0,
                                     "f": None, "h": None})
                else:
                    blob, sha = lf.pack(feats)
                    new_rows.append({"d": d, "v": self.version, "st": "ok", "r": None, "n": len(feats),
                                     "f": blob, "h": sha})
            if new_rows:
                conn.execute(sa.text(
                    "INSERT INTO local_features (detection_id, feature_version, status, reason, n_keypoints, "
                    "features, sha256) VALUES (:d, :v, :st, :r, :n, :f, :h) "
                    "ON CONFLICT (detection_id, feature_version) DO UPDATE SET status = EXCLUDED.status, "
                    "reason = EXCLUDED.reason, n_keypoints = EXCLUDED.n_keypoints, features = EXCLUDED.features, "
                    "sha256 = EXCLUDED.sha256, created_at = now()"), new_rows)
        if background and self.settings.background_control:
            self._suppress_background(want, {d: info[d].image_id for d in want if d in info})

    def _compute(self, info) -> tuple[lf.LocalFeatures | None, str]:
        if info is None or info.crop_path is None or info.status != "ok":
            return None, "no crop"
        try:
            from deer_pipeline.detections.cropping import load_crop

            img = np.asarray(load_crop(self.crop_store, info.crop_path).convert("L"))
        except Exception as exc:   # an unreadable crop costs its local score, never the decision
            return None, f"crop unreadable ({type(exc).__name__})"
        feats = lf.extract(img, self.settings.long_side, self.settings.max_keypoints)
        if len(feats) < 2:
            return None, "no keypoints"
        return feats, ""

    def _suppress_background(self, ids: Sequence[str], image_of: Mapping[str, int]) -> None:
        """Drop keypoints that also match another animal of the same frame."""
        if not image_of:
            return
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text(
                "SELECT detection_id, image_id FROM detections WHERE image_id = ANY(:imgs) AND status = 'ok'"),
                {"imgs": sorted(set(image_of.values()))}).all()
        in_frame: dict[int, list[str]] = defaultdict(list)
        for r in rows:
            in_frame[r.image_id].append(r.detection_id)
        others = {d: [o for o in in_frame[image_of[d]] if o != d] for d in ids if d in image_of}
        need = {o for os_ in others.values() for o in os_}
        missing = [o for o in need if o not in self._features]
        if missing:
            self.prepare(missing, background=False)
        for d, os_ in others.items():
            f = self._features.get(d)
            if f is None or not os_:
                continue
            drop = np.zeros(len(f), bool)
            for o in os_:
                g = self._features.get(o)
                if g is not None:
                    qi, _ = lf.ratio_matches(f, g, self.settings.ratio)
                    drop[qi] = True
            if drop.any():
                self.background_keypoints_removed += int(drop.sum())
                self._features[d] = lf.LocalFeatures(f.keypoints[~drop], f.descriptors[~drop])

    # -- pairs ---------------------------------------------------------------------------------

    def load_sides(self, detection_ids: Iterable[str]) -> None:
        """The flank (``detections.side``: left | right | NULL) of these detections."""
        want = [d for d in dict.fromkeys(detection_ids) if d is not None and d not in self._sides]
        if not want:
            return
        with self.engine.connect() as conn:
            got = {r.detection_id: r.side for r in conn.execute(sa.text(
                "SELECT detection_id, side FROM detections WHERE detection_id = ANY(:ids)"), {"ids": want})}
        for d in want:
            self._sides[d] = got.get(d) or None

    def side(self, detection_id: str) -> str | None:
        return self._sides.get(detection_id)

    def inliers(self, a: str, b: str) -> int | None:
        """Inlier count of the pair (None: no local score; the reason is counted)."""
        key = (a, b) if a <= b else (b, a)
        if key in self._pairs:
            return self._pairs[key]
        fa, fb = self._features.get(key[0]), self._features.get(key[1])
        if fa is None or fb is None:
            self.reasons["no local features for a crop of the pair"] += 1
            self._pairs[key] = None
            return None
        s = self.settings
        v = lf.verify(fa, fb, s.ratio, s.model, s.reproj_px)
        self.pairs_verified += 1
        if v.inliers is None:
            self.reasons[v.reason.split(" (")[0]] += 1
        self._pairs[key] = v.inliers
        return v.inliers

    def metadata(self) -> dict:
        return {"feature_version": self.version, "crops_computed": self.computed, "crops_cached": self.cached,
                "pairs_verified": self.pairs_verified, "no_local_score": dict(self.reasons),
                "background_keypoints_removed": self.background_keypoints_removed}
