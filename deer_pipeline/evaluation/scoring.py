"""Scores of re-identification: closed-set ranking (top-1, top-5, mAP), open-set grouping
(cross-encounter pairwise P/R/F1 - the headline -, all-pairs P/R/F1, ARI, deer found), BAKS/BAUS
and their geometric mean, the in-memory replay of the decision rule and the threshold chosen on
calibration data.

Cross-encounter metrics count only pairs of photos from DIFFERENT encounters: the photos of one
encounter are decided together, so "never match across encounters" earns all-pairs precision 1
and the recall of the within-encounter pairs, while its cross-encounter recall and F1 are 0."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Mapping, Sequence

import numpy as np

from deer_pipeline.identity import metrics
from deer_pipeline.identity.pooling import pool_by_deer


def closed_set_metrics(similarity: np.ndarray, identities: Sequence, encounters: Sequence,
                       ks: Sequence[int] = (1, 5)) -> dict:
    """Leave-one-out retrieval: each photo queries all the others, except the photos of its own
    encounter, which are removed from its gallery. Queries without any other-encounter photo of
    their individual are skipped (counted in ``skipped_queries``). Ties in the ranking are broken
    against the query (a wrong item ranks first), so a constant score earns nothing."""
    S = np.asarray(similarity, dtype=np.float64)
    ids = np.asarray([str(i) for i in identities], dtype=object)
    enc = np.asarray([str(e) for e in encounters], dtype=object)
    n = len(ids)
    if S.shape != (n, n):
        raise ValueError(f"similarity is {S.shape}, expected ({n}, {n})")
    hits = {k: 0 for k in ks}
    aps = []
    skipped = 0
    for q in range(n):
        keep = enc != enc[q]
        rel = (ids == ids[q]) & keep
        if not rel.any():
            skipped += 1
            continue
        cand = np.flatnonzero(keep)
        # sort by score desc; among equal scores irrelevant items first (pessimistic ties)
        order = cand[np.lexsort((rel[cand].astype(int), -S[q, cand]))]
        r = rel[order]
        for k in ks:
            hits[k] += bool(r[:k].any())
        cum = np.cumsum(r)
        ranks = np.flatnonzero(r) + 1
        aps.append(float(np.mean(cum[r] / ranks)))
    nq = n - skipped
    out = {f"top{k}": (hits[k] / nq if nq else 0.0) for k in ks}
    out["mAP"] = float(np.mean(aps)) if aps else 0.0
    out["queries"] = nq
    out["skipped_queries"] = skipped
    return out


def known_unknown_accuracy(feed: Sequence[tuple[str, object, bool]]) -> dict:
    """BAKS / BAUS from decisions in feed order.

    ``feed`` is one ``(true identity, predicted deer, founded_new_deer)`` per encounter, in the
    order they were decided. See the module doc for the definitions."""
    seen: set[str] = set()
    members: dict[object, Counter] = defaultdict(Counter)   # predicted deer -> identities so far
    known_right: dict[str, list[bool]] = defaultdict(list)
    unknown_right: list[bool] = []
    for identity, deer, new in feed:
        identity = str(identity)
        if identity in seen:
            ok = False
            if not new and members[deer]:
                top = members[deer].most_common()
                ok = top[0][0] == identity and (len(top) == 1 or top[1][1] < top[0][1])
            known_right[identity].append(ok)
        else:
            unknown_right.append(bool(new))
            seen.add(identity)
        members[deer][identity] += 1
    per_id = [float(np.mean(v)) for v in known_right.values()]
    baks = float(np.mean(per_id)) if per_id else 0.0
    baus = float(np.mean(unknown_right)) if unknown_right else 0.0
    return {"baks": baks, "baus": baus, "balanced_accuracy": (baks + baus) / 2,
            "known_encounters": int(sum(len(v) for v in known_right.values())),
            "known_individuals": len(known_right), "unknown_encounters": len(unknown_right),
            "known_accuracy_pooled": (float(np.mean([x for v in known_right.values() for x in v]))
                                      if known_right else 0.0)}


def open_set_metrics(true_ids: Sequence, pred_deer: Sequence, feed: Sequence[tuple[str, object, bool]],
                     encounters: Sequence | None = None) -> dict:
    """Cross-encounter and all-pairs pairwise precision/recall/F1, ARI, deer counts and
    BAKS/BAUS (with their geometric mean) of one open-set run. ``encounters``: the encounter of
    each photo (None: every photo is its own encounter, so both pair sets coincide)."""
    p = metrics.pairwise_prf(true_ids, pred_deer)
    enc = list(encounters) if encounters is not None else list(range(len(true_ids)))
    x = metrics.cross_encounter_prf(true_ids, pred_deer, enc)
    n_pred, n_true = len(set(map(str, pred_deer))), len(set(map(str, true_ids)))
    out = {"cross_encounter_precision": x.precision, "cross_encounter_recall": x.recall,
           "cross_encounter_f1": x.f1, "cross_encounter_tp": x.tp, "cross_encounter_fp": x.fp,
           "cross_encounter_fn": x.fn,
           "pairwise_precision": p.precision, "pairwise_recall": p.recall, "pairwise_f1": p.f1,
           "ari": metrics.adjusted_rand_index(true_ids, pred_deer), "n_pred": n_pred, "n_true": n_true,
           "count_error": n_pred - n_true, "count_error_abs": abs(n_pred - n_true)}
    out.update(known_unknown_accuracy(feed))
    out["baks_baus_gmean"] = float(np.sqrt(out["baks"] * out["baus"]))
    return out


def feed_encounter_labels(n_rows: int, encounters: Sequence[Sequence[int]]) -> list[int]:
    """The encounter (its position in ``encounters``) of each of ``n_rows`` rows."""
    lab = list(range(-1, -n_rows - 1, -1))          # rows in no encounter: each on its own
    for e, rows in enumerate(encounters):
        for r in rows:
            lab[r] = e
    return lab


def simulate_open_set(similarity: np.ndarray, encounters: Sequence[Sequence[int]], threshold: float,
                      cannot_link: Mapping[int, set[int]] | None = None,
                      pooling: str = "max") -> tuple[np.ndarray, list[bool]]:
    """The pipeline's match-or-create (``matching.decide_partition``) on a precomputed
    similarity matrix: encounters (lists of row indices) in the order given; the score of an
    encounter against a deer pools its (encounter row x deer row) pairs (``pooling``: the maximum,
    or the mean of the best N, :mod:`deer_pipeline.identity.pooling`); the encounter
    joins the best deer when that score is at least ``threshold``, otherwise it founds a deer.
    ``cannot_link[e]`` are encounters (by position) that may not share e's deer.

    Returns (deer index per row, founded-new flag per encounter)."""
    S = np.asarray(similarity, dtype=np.float32)
    n = S.shape[0]
    deer_of_row = np.full(n, -1, np.int64)
    deer_of_enc: list[int] = []
    gallery_rows: list[int] = []
    new_flags: list[bool] = []
    n_deer = 0
    for e, rows in enumerate(encounters):
        rows = list(rows)
        best_deer, best = -1, -np.inf
        if gallery_rows:
            g = np.asarray(gallery_rows)
            if pooling == "max":
                s = S[np.ix_(rows, g)].max(axis=0)
                per_deer = np.full(n_deer, -np.inf, np.float32)
                np.maximum.at(per_deer, deer_of_row[g], s)
            else:
                per_deer = pool_by_deer(S[np.ix_(rows, g)], deer_of_row[g], n_deer, pooling)
            if cannot_link and cannot_link.get(e):
                for o in cannot_link[e]:
                    if o < e:
                        per_deer[deer_of_enc[o]] = -np.inf
            best_deer = int(np.argmax(per_deer))
            best = float(per_deer[best_deer])
        if best_deer >= 0 and best >= threshold:
            deer, new = best_deer, False
        else:
            deer, new = n_deer, True
            n_deer += 1
        deer_of_row[rows] = deer
        deer_of_enc.append(deer)
        gallery_rows += rows
        new_flags.append(new)
    return deer_of_row, new_flags


def threshold_grid(lo: float = 0.0, hi: float = 1.0, step: float = 0.01) -> list[float]:
    n = int(round((hi - lo) / step))
    return [round(lo + i * step, 6) for i in range(n + 1)]


def _count_key(r: dict, n_true: int) -> tuple:
    return (abs(r["n_pred"] - n_true), -r["f1"], -r["threshold"])


def calibrate_threshold(similarity: np.ndarray, identities: Sequence, encounters: Sequence[Sequence[int]],
                        cannot_link: Mapping[int, set[int]] | None = None, pooling: str = "max",
                        population: int | None = None) -> dict:
    """Thresholds chosen on a labelled (calibration) set by replaying the pipeline's decisions
    (:func:`simulate_open_set`) over a 0.01 grid on [0, 1], refined on a 0.001 grid around each
    optimum. Two rules:

    * ``threshold`` (the main one): the highest open-set CROSS-ENCOUNTER pairwise F1
      (``metrics.cross_encounter_prf``, picked by ``metrics.recommend_threshold``: ties to the
      higher threshold); the all-pairs F1 is kept in each row as ``all_pairs_f1``;
    * ``count_rule["threshold"]``: the number of deer found closest to the true number (ties:
      higher F1, then the higher threshold) - the operating point for population counts.

    ``population``: the number of individuals the threshold is meant for, when the labelled set
    holds only some of them (the trained model's threshold is chosen on the few calibration
    individuals it did not train on). A photo meets about ``population - 1`` other individuals
    there instead of ``n_true - 1`` here, so every wrong join counts ``(population - 1) /
    (n_true - 1)`` times in precision and F1 (the same-animal pairs stay as they are): the
    prevalence correction of precision. Without it, F1 on a handful of individuals rewards
    joining nearly everything (a quarter of the pairs are right when 4 individuals are merged,
    one in 90 in the field). The count rule is not reweighted.

    Returns ``{"threshold", "f1", "precision", "recall", "rule", "n_pred", "n_true",
    "fp_weight", "count_rule": {...}, "sweep": [coarse grid rows]}``."""
    n_true = len(set(map(str, identities)))
    enc_labels = feed_encounter_labels(len(identities), encounters)
    fp_weight = 1.0
    if population is not None and population > n_true > 1:
        fp_weight = (population - 1) / (n_true - 1)

    def run(ts):
        rows = []
        for t in ts:
            pred, _ = simulate_open_set(similarity, encounters, t, cannot_link, pooling)
            m = metrics.cross_encounter_prf(identities, pred, enc_labels)
            if fp_weight != 1.0:
                m = metrics.prf(m.tp, fp_weight * m.fp, m.fn)
            rows.append({"threshold": float(t), "precision": m.precision, "recall": m.recall, "f1": m.f1,
                         "all_pairs_f1": metrics.pairwise_prf(identities, pred).f1,
                         "predicted_same": m.tp + m.fp, "n_pred": int(len(set(pred.tolist())))})
        return rows

    def around(t):
        return threshold_grid(max(0.0, round(t - 0.01, 6)), min(1.0, round(t + 0.01, 6)), 0.001)

    coarse = run(threshold_grid())
    best = metrics.recommend_threshold(coarse)
    t_f1 = best["threshold"] if best["threshold"] is not None else 1.0
    t_count = min(coarse, key=lambda r: _count_key(r, n_true))["threshold"]
    fine = run(sorted(set(around(t_f1)) | set(around(t_count))))
    sweep = sorted({r["threshold"]: r for r in coarse + fine}.values(), key=lambda r: r["threshold"])
    rec = metrics.recommend_threshold(sweep)
    chosen = next(r for r in sweep if r["threshold"] == rec["threshold"])
    rec.update(n_pred=chosen["n_pred"], n_true=n_true, fp_weight=round(fp_weight, 4), sweep=coarse)
    c = min(sweep, key=lambda r: _count_key(r, n_true))
    rec["count_rule"] = {"threshold": c["threshold"], "f1": c["f1"], "precision": c["precision"],
                         "recall": c["recall"], "n_pred": c["n_pred"], "n_true": n_true,
                         "rule": "number of deer closest to the true number (ties: higher F1)"}
    return rec


def _pair_curve(S: np.ndarray, identities: Sequence, encounters: Sequence) -> list[dict]:
    """Precision/recall over photo pairs from different encounters, per threshold."""
    ids = np.asarray([str(i) for i in identities], dtype=object)
    enc = np.asarray([str(e) for e in encounters], dtype=object)
    iu = np.triu_indices(len(ids), 1)
    keep = enc[iu[0]] != enc[iu[1]]
    scores = np.asarray(S)[iu][keep]
    same = (ids[iu[0]] == ids[iu[1]])[keep]
    if len(scores) == 0:
        return []
    lo, hi = float(np.quantile(scores, 0.5)), float(scores.max())
    ts = np.linspace(lo, hi, 60)
    return [{k: r[k] for k in ("threshold", "precision", "recall", "f1", "tp", "fp")}
            for r in metrics.threshold_sweep(scores, same, ts)]
