"""Calibrated match probabilities: each pair score -> P(same animal), fused, versioned.

Plain logic (numpy, scikit-learn) plus two small store functions; no Dagster.

A *score* is anything computed for a pair of sightings: the global (ensemble) cosine, or the
local-feature inlier count of :mod:`deer_pipeline.identity.local_features`. Each is mapped to
the probability that the two sightings show the same animal by isotonic regression (monotone: a
higher score never means a lower probability) fitted on labelled pairs - a ground-truth file,
reviewed decisions, or the constraints the data gives for free (two animals in one frame differ;
one burst track is one animal). Calibrated probabilities are fused by their mean (as WildFusion
does); a pair without a local score (no keypoints, a degenerate fit, a corrupt cache entry)
keeps its global probability alone.

A :class:`Calibration` is an artefact: its curves, what they were fitted on and a version (a
hash of both). It is stored in the table ``match_calibrations`` (sql/004) so that a decision
names the calibration it used, and a threshold in probability units means the same thing on
every data set.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

CALIBRATION_FORMAT = 1
GLOBAL = "global_cosine"
LOCAL = "local_inliers"
FUSIONS = ("mean",)


class CalibrationError(ValueError):
    """The labelled pairs cannot calibrate a score (too few, one kind only); says why."""


@dataclass(frozen=True)
class Curve:
    """A monotone curve: breakpoints ``x`` (increasing) and probabilities ``p`` there; linear in
    between, constant outside."""

    x: tuple[float, ...]
    p: tuple[float, ...]

    def __call__(self, scores) -> np.ndarray:
        return np.interp(np.asarray(scores, dtype=np.float64), self.x, self.p)

    def as_dict(self) -> dict:
        return {"x": [float(v) for v in self.x], "p": [float(v) for v in self.p]}   # exact in JSON

    @classmethod
    def from_dict(cls, d: Mapping) -> "Curve":
        x, p = tuple(float(v) for v in d["x"]), tuple(float(v) for v in d["p"])
        if not x or len(x) != len(p) or any(b <= a for a, b in zip(x, x[1:])) \
                or any(b < a for a, b in zip(p, p[1:])) or min(p) < 0 or max(p) > 1:
            raise CalibrationError("a stored calibration curve is not a monotone curve in [0, 1]")
        return cls(x, p)


def fit_isotonic(scores: Sequence[float], same: Sequence[bool], min_pairs: int = 20) -> Curve:
    """Isotonic regression (increasing) of ``same`` on ``scores`` as a :class:`Curve`."""
    from sklearn.isotonic import IsotonicRegression

    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(same, dtype=np.float64)
    if len(s) != len(y):
        raise CalibrationError(f"{len(s)} scores but {len(y)} labels")
    ok = np.isfinite(s)
    s, y = s[ok], y[ok]
    if len(s) < min_pairs:
        raise CalibrationError(f"only {len(s)} labelled pairs; at least {min_pairs} are needed")
    if y.min() == y.max():
        raise CalibrationError("the labelled pairs are all " + ("same-animal" if y[0] else "different-animal")
                               + " pairs; both kinds are needed")
    iso = IsotonicRegression(increasing=True, out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(s, y)
    xs, ps = np.asarray(iso.X_thresholds_, np.float64), np.asarray(iso.y_thresholds_, np.float64)
    keep = np.r_[True, np.diff(xs) > 0]
    xs, ps = xs[keep], np.maximum.accumulate(ps[keep])
    if len(xs) == 1:                       # a constant fit: still a valid curve
        xs, ps = np.r_[xs, xs + 1e-9], np.r_[ps, ps]
    return Curve(tuple(xs.tolist()), tuple(ps.tolist()))


def reliability(prob: Sequence[float], same: Sequence[bool], bins: int = 10) -> list[dict]:
    """Reliability diagram: per probability bin, the mean predicted probability and the
    observed share of same-animal pairs (and how many pairs)."""
    p = np.asarray(prob, dtype=np.float64)
    y = np.asarray(same, dtype=bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = []
    for i in range(bins):
        lo, hi = edges[i], edges[i + 1]
        m = (p >= lo) & ((p <= hi) if i == bins - 1 else (p < hi))
        if m.any():
            out.append({"lo": float(lo), "hi": float(hi), "pairs": int(m.sum()),
                        "predicted": float(p[m].mean()), "observed": float(y[m].mean())})
    return out


@dataclass(frozen=True)
class Calibration:
    """Curves per score, the fusion rule and what they were fitted on; ``version`` hashes all."""

    curves: Mapping[str, Curve]
    fusion: str = "mean"
    fitted_on: Mapping = field(default_factory=dict)
    reliability: Sequence = ()

    @property
    def version(self) -> str:
        doc = json.dumps({"format": CALIBRATION_FORMAT, "fusion": self.fusion,
                          "curves": {k: c.as_dict() for k, c in sorted(self.curves.items())},
                          "fitted_on": self.fitted_on}, sort_keys=True, default=str)
        return f"cal{CALIBRATION_FORMAT}-" + hashlib.sha256(doc.encode()).hexdigest()[:16]

    def probability(self, name: str, scores) -> np.ndarray:
        if name not in self.curves:
            raise CalibrationError(f"the calibration {self.version} has no curve for {name!r}")
        return self.curves[name](scores)

    def fuse(self, global_scores, local_scores=None) -> np.ndarray:
        """Fused probability per pair: the mean of the global and the local probability where
        the pair has a local score (finite), the global probability alone where it has none."""
        pg = self.probability(GLOBAL, global_scores)
        if local_scores is None or LOCAL not in self.curves:
            return pg
        ls = np.asarray(local_scores, dtype=np.float64)
        has = np.isfinite(ls)
        out = pg.copy()
        if has.any():
            out[has] = (pg[has] + self.curves[LOCAL](ls[has])) / 2.0
        return out


def fit_calibration(global_scores: Sequence[float], same: Sequence[bool],
                    local_scores: Sequence[float] | None = None, fitted_on: Mapping | None = None,
                    min_pairs: int = 20) -> Calibration:
    """Fit the global curve on every labelled pair and the local curve on the pairs that have a
    local score (NaN = none); ``fitted_on`` describes the pairs (source, counts, versions)."""
    g = np.asarray(global_scores, dtype=np.float64)
    y = np.asarray(same, dtype=bool)
    curves = {GLOBAL: fit_isotonic(g, y, min_pairs)}
    info = dict(fitted_on or {})
    info.update(pairs=int(len(y)), same_pairs=int(y.sum()))
    if local_scores is not None:
        ls = np.asarray(local_scores, dtype=np.float64)
        has = np.isfinite(ls)
        try:
            curves[LOCAL] = fit_isotonic(ls[has], y[has], min_pairs)
            info.update(local_pairs=int(has.sum()), local_same_pairs=int(y[has].sum()))
        except CalibrationError as exc:
            info["local_not_calibrated"] = str(exc)
    # reliability out of sample: each half of the pairs predicted by curves fitted on the other
    # half (an isotonic fit reproduces its own pairs exactly, which would say nothing)
    ls = None if local_scores is None else np.asarray(local_scores, dtype=np.float64)
    pred = _cross_fitted(g, y, ls, min_pairs)
    if pred is None:
        info["reliability"] = "in sample (too few pairs to cross-fit)"
        pred = Calibration(curves, "mean", info).fuse(g, ls)
    else:
        info["reliability"] = "2-fold cross-fitted"
    return Calibration(curves, "mean", info, tuple(reliability(pred, y)))


def _cross_fitted(g: np.ndarray, y: np.ndarray, ls: np.ndarray | None, min_pairs: int) -> np.ndarray | None:
    fold = np.random.default_rng(0).integers(0, 2, len(y))
    pred = np.empty(len(y))
    for f in (0, 1):
        tr, te = fold != f, fold == f
        try:
            curves = {GLOBAL: fit_isotonic(g[tr], y[tr], min_pairs)}
            if ls is not None:
                has = np.isfinite(ls) & tr
                try:
                    curves[LOCAL] = fit_isotonic(ls[has], y[has], min_pairs)
                except CalibrationError:
                    pass
        except CalibrationError:
            return None
        pred[te] = Calibration(curves).fuse(g[te], None if ls is None else ls[te])
    return pred


# --------------------------------------------------------------------------------------------
# The store (table match_calibrations, sql/004)
# --------------------------------------------------------------------------------------------

def save(conn, cal: Calibration) -> str:
    """Store the calibration (idempotent: the version is its content hash); returns the version."""
    import sqlalchemy as sa

    conn.execute(sa.text(
        "INSERT INTO match_calibrations (calibration_version, scores, fusion, fitted_on, reliability) "
        "VALUES (:v, CAST(:s AS jsonb), :f, CAST(:o AS jsonb), CAST(:r AS jsonb)) "
        "ON CONFLICT (calibration_version) DO NOTHING"),
        {"v": cal.version, "s": json.dumps({k: c.as_dict() for k, c in cal.curves.items()}), "f": cal.fusion,
         "o": json.dumps(cal.fitted_on, default=str), "r": json.dumps(list(cal.reliability))})
    return cal.version


def load(conn, version: str | None = None) -> Calibration | None:
    """The stored calibration ``version`` (None: the newest); None when there is none. A stored
    curve that is not monotone raises :class:`CalibrationError`."""
    import sqlalchemy as sa

    sql = ("SELECT scores, fusion, fitted_on, reliability FROM match_calibrations "
           + ("WHERE calibration_version = :v" if version else "ORDER BY created_at DESC, calibration_version LIMIT 1"))
    row = conn.execute(sa.text(sql), {"v": version} if version else {}).first()
    if row is None:
        if version:
            raise CalibrationError(f"no stored calibration {version!r}")
        return None
    if row.fusion not in FUSIONS:
        raise CalibrationError(f"unknown fusion {row.fusion!r}")
    cal = Calibration({k: Curve.from_dict(v) for k, v in row.scores.items()}, row.fusion, row.fitted_on,
                      tuple(row.reliability or ()))
    if version and cal.version != version:
        raise CalibrationError(f"stored calibration {version!r} does not hash to its version")
    return cal
