"""Metrics for re-identification: pairwise precision/recall/F1 of a grouping, ARI, threshold
sweeps over scored pairs, threshold recommendation, score summaries.

Plain numpy (sklearn for ARI); no database, no Dagster. Conventions:

* a *pair* is two sightings; a grouping (labels per sighting) predicts "same animal" for every
  pair inside one group;
* ``precision = tp / (tp + fp)``, ``recall = tp / (tp + fn)``, ``f1`` their harmonic mean; a
  ratio with a zero denominator is reported as 0.0 (``zero_division``), never NaN, so the values
  can go into asset metadata and JSON as they are;
* a threshold predicts "same" for every scored pair with ``score >= threshold``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np


@dataclass(frozen=True)
class PRF:
    precision: float
    recall: float
    f1: float
    tp: int
    fp: int
    fn: int

    def as_dict(self) -> dict:
        return asdict(self)


def _ratio(a: float, b: float, zero_division: float = 0.0) -> float:
    return float(a) / float(b) if b else float(zero_division)


def prf(tp: float, fp: float, fn: float, zero_division: float = 0.0) -> PRF:
    p = _ratio(tp, tp + fp, zero_division)
    r = _ratio(tp, tp + fn, zero_division)
    f = _ratio(2 * p * r, p + r, zero_division) if (p + r) else float(zero_division)
    return PRF(p, r, f, int(tp), int(fp), int(fn))


def _pairs(counts: np.ndarray) -> int:
    counts = np.asarray(counts, dtype=np.int64)
    return int((counts * (counts - 1) // 2).sum())


def pairwise_prf(true_labels: Sequence, pred_labels: Sequence, zero_division: float = 0.0) -> PRF:
    """Pairwise precision/recall/F1 of a predicted grouping against the true one.

    tp = pairs together in both, fp = together only in the prediction, fn = together only in the
    truth. Computed from the contingency table in O(n log n), no pair enumeration."""
    t = np.asarray(list(true_labels), dtype=object)
    p = np.asarray(list(pred_labels), dtype=object)
    if len(t) != len(p):
        raise ValueError(f"pairwise_prf: {len(t)} true labels but {len(p)} predicted labels")
    if len(t) == 0:
        return prf(0, 0, 0, zero_division)
    _, ti = np.unique(t.astype(str), return_inverse=True)
    _, pi = np.unique(p.astype(str), return_inverse=True)
    joint = ti.astype(np.int64) * (pi.max() + 1) + pi
    _, n_ij = np.unique(joint, return_counts=True)
    tp = _pairs(n_ij)
    pred_pairs = _pairs(np.bincount(pi))
    true_pairs = _pairs(np.bincount(ti))
    return prf(tp, pred_pairs - tp, true_pairs - tp, zero_division)


def _pair_count(*labelings: Sequence) -> int:
    """Number of pairs of items that agree on every labeling (same group in each)."""
    n = len(labelings[0])
    if n == 0:
        return 0
    codes = np.zeros(n, np.int64)
    for lab in labelings:
        _, inv = np.unique(np.asarray([str(x) for x in lab], dtype=object).astype(str), return_inverse=True)
        _, codes = np.unique(codes * (int(inv.max()) + 1) + inv, return_inverse=True)   # stays < n
    counts = np.bincount(codes.ravel())
    return _pairs(counts)


def cross_encounter_prf(true_labels: Sequence, pred_labels: Sequence, encounters: Sequence,
                        zero_division: float = 0.0) -> PRF:
    """Pairwise precision/recall/F1 over pairs of items from DIFFERENT encounters only.

    Pairs within one encounter are left out of the truth and of the prediction: joining the
    photos of one burst is grouping, not recognition. tp = cross-encounter pairs together in
    both; fp = together only in the prediction; fn = together only in the truth. Computed from
    counts (pairs together in X minus those of them that share an encounter), no enumeration."""
    t, p, e = list(true_labels), list(pred_labels), list(encounters)
    if not (len(t) == len(p) == len(e)):
        raise ValueError(f"cross_encounter_prf: {len(t)} true labels, {len(p)} predicted, {len(e)} encounters")
    if not t:
        return prf(0, 0, 0, zero_division)
    tp = _pair_count(t, p) - _pair_count(t, p, e)
    pred_pairs = _pair_count(p) - _pair_count(p, e)
    true_pairs = _pair_count(t) - _pair_count(t, e)
    return prf(tp, pred_pairs - tp, true_pairs - tp, zero_division)


def adjusted_rand_index(true_labels: Sequence, pred_labels: Sequence) -> float:
    from sklearn.metrics import adjusted_rand_score

    t = [str(x) for x in true_labels]
    p = [str(x) for x in pred_labels]
    return float(adjusted_rand_score(t, p)) if t else 0.0


def default_thresholds(lo: float = 0.30, hi: float = 0.95, step: float = 0.05) -> list[float]:
    n = int(round((hi - lo) / step))
    return [round(lo + i * step, 4) for i in range(n + 1)]


def threshold_sweep(scores: Sequence[float], same: Sequence[bool], thresholds: Iterable[float],
                    weights: Sequence[float] | None = None, zero_division: float = 0.0) -> list[dict]:
    """For each threshold t: pairs predicted same (score >= t) and precision/recall/F1 against
    the ``same`` labels. ``weights`` (optional) counts each pair that many times, for binned or
    sampled pair sets. Returns one dict per threshold, in the given order."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(same, dtype=bool)
    w = np.ones(len(s)) if weights is None else np.asarray(weights, dtype=np.float64)
    if not (len(s) == len(y) == len(w)):
        raise ValueError("threshold_sweep: scores, same and weights must have the same length")
    order = np.argsort(s)
    s, y, w = s[order], y[order], w[order]
    # suffix sums: weight of same / different pairs with score >= s[i]
    pos_suffix = np.concatenate([np.cumsum((w * y)[::-1])[::-1], [0.0]])
    neg_suffix = np.concatenate([np.cumsum((w * ~y)[::-1])[::-1], [0.0]])
    total_pos = pos_suffix[0] if len(s) else 0.0
    total_neg = neg_suffix[0] if len(s) else 0.0
    out = []
    for t in thresholds:
        i = int(np.searchsorted(s, float(t), side="left"))
        tp, fp = pos_suffix[i], neg_suffix[i]
        fn, tn = total_pos - tp, total_neg - fp
        m = prf(tp, fp, fn, zero_division)
        out.append({"threshold": float(t), "predicted_same": float(tp + fp), "tp": float(tp),
                    "fp": float(fp), "fn": float(fn), "tn": float(tn), "precision": m.precision,
                    "recall": m.recall, "f1": m.f1})
    return out


def decision_sweep(best_scores: Sequence[float], best_correct: Sequence[bool],
                   matchable: Sequence[bool], thresholds: Iterable[float],
                   zero_division: float = 0.0) -> list[dict]:
    """Open-set match decisions: each sighting joins its best candidate when its score is at or
    above t. tp = joined the right deer; fp = joined a wrong deer; fn = a right deer was
    available (``matchable``) but the sighting did not join it."""
    s = np.asarray(best_scores, dtype=np.float64)
    ok = np.asarray(best_correct, dtype=bool)
    can = np.asarray(matchable, dtype=bool)
    out = []
    for t in thresholds:
        join = s >= float(t)
        tp = int((join & ok).sum())
        fp = int((join & ~ok).sum())
        fn = int((can & ~(join & ok)).sum())
        m = prf(tp, fp, fn, zero_division)
        out.append({"threshold": float(t), "matched": int(join.sum()), "new": int((~join).sum()),
                    "tp": tp, "fp": fp, "fn": fn, "precision": m.precision, "recall": m.recall,
                    "f1": m.f1})
    return out


def recommend_threshold(sweep: Sequence[dict], min_precision: float | None = None) -> dict:
    """Pick a threshold from a sweep.

    Without ``min_precision``: the threshold with the highest F1 (ties: the higher threshold,
    fewer wrong merges). With it: the lowest threshold whose precision reaches it among
    thresholds that predict at least one pair (most recall at that precision); when none
    reaches it, the highest-F1 rule, and ``rule`` says so."""
    rows = [r for r in sweep if r.get("predicted_same", r.get("matched", 1)) > 0]
    if not rows:
        return {"threshold": None, "f1": 0.0, "precision": 0.0, "recall": 0.0,
                "rule": "no threshold predicts any pair"}
    if min_precision is not None:
        ok = [r for r in rows if r["precision"] >= min_precision]
        if ok:
            r = min(ok, key=lambda r: r["threshold"])
            return {"threshold": r["threshold"], "f1": r["f1"], "precision": r["precision"],
                    "recall": r["recall"], "rule": f"lowest threshold with precision >= {min_precision:g}"}
    r = max(rows, key=lambda r: (r["f1"], r["threshold"]))
    rule = "highest F1"
    if min_precision is not None:
        rule += f" (no threshold reaches precision {min_precision:g})"
    return {"threshold": r["threshold"], "f1": r["f1"], "precision": r["precision"],
            "recall": r["recall"], "rule": rule}


QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def score_summary(scores: Sequence[float]) -> dict:
    """count, min, max, mean and quantiles (q05 ... q95) of a set of scores."""
    s = np.asarray(scores, dtype=np.float64)
    if len(s) == 0:
        return {"count": 0}
    out = {"count": int(len(s)), "min": float(s.min()), "max": float(s.max()),
           "mean": float(s.mean())}
    for q in QUANTILES:
        out[f"q{int(round(q * 100)):02d}"] = float(np.quantile(s, q))
    return out


def bucket_counts(scores: Sequence[float], edges: Sequence[float] | None = None) -> list[dict]:
    """Counts per score bucket [lo, hi) (the last bucket includes hi). Default buckets: below 0,
    then tenths from 0 to 1."""
    s = np.asarray(scores, dtype=np.float64)
    edges = list(edges) if edges is not None else [-1.0] + [round(0.1 * i, 1) for i in range(11)]
    out = []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        last = i == len(edges) - 2
        n = int(((s >= lo) & ((s <= hi) if last else (s < hi))).sum())
        out.append({"bucket": f"[{lo:g}, {hi:g}{']' if last else ')'}", "lo": lo, "hi": hi, "count": n})
    return out
