"""The open set as the pipeline runs it: each method's similarity, match-or-create through the pipeline's own decision at a threshold (or the legacy greedy rule and its projection redraws), and the open-set entry of the report for the global, verified and legacy methods."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from deer_pipeline.evaluation import methods as rm
from deer_pipeline.evaluation.labels import (
    EvaluationError,
)
from deer_pipeline.evaluation.prepare import PreparedSet
from deer_pipeline.evaluation.scoring import (
    calibrate_threshold,
    closed_set_metrics,
    open_set_metrics,
    simulate_open_set,
)
from deer_pipeline.evaluation.verified import (
    CLOSED_SET_VERIFY,
    VerifiedScores,
    reliability_on,
)
from deer_pipeline.identity import calibration as calib
from deer_pipeline.identity import metrics

if TYPE_CHECKING:
    from deer_pipeline.evaluation.run import EvaluationOptions


def method_similarity(ps: PreparedSet, method: rm.Method, legacy: rm.LegacyMatcher | None = None) -> np.ndarray:
    """(n x n) similarity of the set's ok photos under ``method`` (ensemble cosine; legacy: the
    cosine of its projected vectors)."""
    if method.kind == "legacy":
        v = legacy.embed(ps.legacy_features)
        return v @ v.T
    from deer_pipeline.embedding.models import unit_rows, weighted_cosine

    vs = {m: unit_rows(ps.vectors[m]) for m in method.models}
    return np.asarray(weighted_cosine(vs, vs, dict(method.ensemble_weights)), np.float64)


def flank_masked(S: np.ndarray, ps: PreparedSet) -> np.ndarray:
    """``S`` with the pairs of opposite known flanks at -inf: the pipeline's cosine decision does
    not compare them (``identity/flanks.py``), so the in-memory replay of the open set must not
    either. Unchanged when no photo has a known side or flank awareness is off."""
    from deer_pipeline.identity.flanks import opposite_flanks, side_codes
    from deer_pipeline.settings import MatchingSettings

    code = side_codes((ps.photos[i].side or "").strip().lower() for i in ps.ok)
    if not MatchingSettings().flank_aware or not code.any():
        return S
    out = np.array(S, dtype=np.float64, copy=True)
    out[opposite_flanks(code, code)] = -np.inf
    return out


def reset_identities(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE sightings, similarity_scores, deer_profile_vectors, deer "
                             "RESTART IDENTITY CASCADE"))


def run_pipeline_open_set(engine: Engine, ps: PreparedSet, method: rm.Method, threshold: float,
                          versions: Mapping[str, str], details: dict | None = None, *,
                          verified=None, calibration_version: str | None = None,
                          ) -> tuple[list[int], list[tuple[str, object, bool]], float]:
    """Decide the set's partitions in time order with ``matching.decide_partition`` at
    ``threshold`` (from an empty identity store); returns (deer per ok photo, feed, seconds).
    ``details`` (optional) receives per row ``(decision, score, decided_against)``: the best
    candidate deer the decision compared with the threshold (None when there was none)."""
    from deer_pipeline.identity.matching import decide_partition
    from deer_pipeline.settings import MatchingSettings

    t0 = time.perf_counter()
    reset_identities(engine)
    settings = MatchingSettings(reid_threshold=float(min(1.0, max(0.0, threshold))),
                                ensemble_weights=dict(method.ensemble_weights), search="exact",
                                match_score=method.match_score, encounter_pooling=method.encounter_pooling,
                                calibration_version=calibration_version)
    vers = {m: versions[m] for m in method.models}
    verifier = verified.verifier if verified is not None else None
    for cam, day in ps.partitions:
        decide_partition(engine, cam, day, settings, vers, verifier=verifier)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT detection_id, deer_id, decision FROM sightings WHERE detection_id = ANY(:ids)"),
            {"ids": ps.ok_ids}).all()
    got = {r.detection_id: (int(r.deer_id), r.decision) for r in rows}
    missing = [d for d in ps.ok_ids if d not in got]
    if missing:
        raise EvaluationError(f"the pipeline left {len(missing)} embedded photo(s) without a deer "
                              f"(e.g. {missing[:3]})")
    ids = ps.ok_ids
    deer = [got[d][0] for d in ids]
    if details is not None:
        _pipeline_details(engine, ids, got, details)
    feed = []
    truth = ps.identities()
    for rows_ in ps.feed_encounters():
        d = Counter(deer[r] for r in rows_).most_common(1)[0][0]
        new = any(got[ids[r]][1] == "new" for r in rows_)
        feed.append((Counter(truth[r] for r in rows_).most_common(1)[0][0], d, new))
    return deer, feed, time.perf_counter() - t0


def _pipeline_details(engine: Engine, ids: Sequence[str], got: Mapping[str, tuple[int, str]], details: dict) -> None:
    """Per row: the decision, the score it was taken on and the best candidate deer (from
    ``sightings`` and ``similarity_scores``)."""
    with engine.connect() as conn:
        scores = {r.detection_id: r.score for r in conn.execute(sa.text(
            "SELECT detection_id, score FROM sightings WHERE detection_id = ANY(:ids)"), {"ids": list(ids)})}
        best = {r.detection_id: int(r.candidate_deer_id) for r in conn.execute(sa.text(
            "SELECT DISTINCT ON (detection_id) detection_id, candidate_deer_id FROM similarity_scores "
            "WHERE detection_id = ANY(:ids) ORDER BY detection_id, similarity DESC, candidate_deer_id"),
            {"ids": list(ids)})}
    for r, d in enumerate(ids):
        deer, decision = got[d]
        against = deer if decision == "matched" else best.get(d)
        details[r] = (decision, scores.get(d), against)


def run_legacy_open_set(ps: PreparedSet, legacy: rm.LegacyMatcher,
                        details: dict | None = None) -> tuple[list[int], list[tuple[str, object, bool]]]:
    """The legacy method sighting by sighting in capture-time order (it had no encounters).
    ``details`` (optional) receives per row ``(decision, score, decided_against)``."""
    legacy.frozen.clear()
    order = [r for rows in ps.feed_encounters() for r in rows]
    vecs = legacy.embed(ps.legacy_features)
    deer = [0] * len(order)
    new_row = {}
    for r in order:
        against = int(np.argmax(np.asarray(legacy.frozen) @ vecs[r])) if legacy.frozen else None
        d, matched, score = legacy.decide(vecs[r])
        deer[r] = d
        new_row[r] = not matched
        if details is not None:
            details[r] = ("matched" if matched else "new", score, against)
    truth = ps.identities()
    feed = []
    for rows_ in ps.feed_encounters():
        d = Counter(deer[r] for r in rows_).most_common(1)[0][0]
        feed.append((Counter(truth[r] for r in rows_).most_common(1)[0][0], d, new_row[rows_[0]]))
    return deer, feed


def legacy_redraws(ps: PreparedSet, d_in: int, n: int) -> dict:
    """The legacy method's result depends on its projection, drawn anew in every process: run it
    ``n`` more times, each with a fresh projection, and report the spread of its open-set F1 and
    of the error of its number of deer (the headline legacy row is one such draw)."""
    if n <= 0:
        return {"n": 0}
    f1, xf1, err, npred = [], [], [], []
    truth = ps.identities()
    for _ in range(n):
        deer, feed = run_legacy_open_set(ps, rm.LegacyMatcher(d_in))
        m = open_set_metrics(truth, deer, feed, ps.label_encounters())
        f1.append(m["pairwise_f1"])
        xf1.append(m["cross_encounter_f1"])
        err.append(m["count_error_abs"])
        npred.append(m["n_pred"])

    def spread(v):
        return {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))}

    return {"n": n, "cross_encounter_f1": spread(xf1), "pairwise_f1": spread(f1),
            "count_error_abs": spread(err), "n_pred": spread(npred)}


def _cannot_link(ps: PreparedSet, feed: Sequence[Sequence[int]]) -> dict[int, set[int]]:
    """Encounters (by feed position) that share a photo: two animals at once."""
    by_image: dict[str, set[int]] = defaultdict(set)
    for e, rows in enumerate(feed):
        for r in rows:
            by_image[ps.photos[ps.ok[r]].image_path].add(e)
    out: dict[int, set[int]] = defaultdict(set)
    for es in by_image.values():
        if len(es) > 1:
            for e in es:
                out[e] |= es - {e}
    return dict(out)


def _legacy_open_set(entry: dict, ev: PreparedSet, emb: dict, legacy: rm.LegacyMatcher,
                     options: EvaluationOptions) -> None:
    entry["threshold"] = rm.LEGACY_THRESHOLD
    entry["threshold_source"] = "fixed at 0.60 in the legacy code (not calibrated)"
    details: dict = {}
    deer, feed = run_legacy_open_set(ev, legacy, details)
    entry["open_set"] = open_set_metrics(ev.identities(), deer, feed, ev.label_encounters())
    entry["assignments"] = assignment_rows("legacy", ev, deer, details, entry["threshold"])
    entry["backbone"] = emb["weights_used"].get("legacy")
    entry["projection"] = {"kind": "torch.nn.Linear default init, unseeded, drawn per process",
                           "d_in": legacy.d_in, "sha256": legacy.projection_sha256}
    entry["redraws"] = legacy_redraws(ev, legacy.d_in, options.legacy_redraws)


def _count_operating_point(engine: Engine, ev: PreparedSet, method: rm.Method, count_rule: dict, emb: dict,
                           **decide) -> dict:
    """The pipeline's open set at the threshold whose deer count on the calibration set came
    closest to the truth (the operating point for population counts)."""
    d2, f2, _ = run_pipeline_open_set(engine, ev, method, count_rule["threshold"], emb["versions"], **decide)
    return {"threshold": count_rule["threshold"],
            "threshold_source": "calibration labels: " + count_rule["rule"],
            "calibration": {k: count_rule[k] for k in ("f1", "precision", "recall", "n_pred", "n_true")},
            "open_set": open_set_metrics(ev.identities(), d2, f2, ev.label_encounters())}


def _embedding_details(entry: dict, method: rm.Method, emb: dict) -> None:
    entry["embedding_versions"] = {m: emb["versions"][m] for m in method.models}
    entry["backbone"] = [emb["weights_used"][m] for m in method.models]


def _calibrated_threshold(entry: dict, method: rm.Method, S_cal: np.ndarray, cal: PreparedSet,
                          cal_feed: list, curves: dict, units: str = "") -> tuple[float, dict]:
    """(threshold, count rule) chosen on the calibration labels by replaying the open set with
    the scores ``S_cal`` (``calibrate_threshold``; wrong joins weighted for ``cal.population``
    when the set holds only some of the individuals); recorded in ``entry`` and ``curves``."""
    rec = calibrate_threshold(S_cal, cal.identities(), cal_feed, _cannot_link(cal, cal_feed),
                              method.encounter_pooling, population=cal.population)
    entry["threshold_source"] = (f"calibration labels ({len(cal.ok)} photos, {len(set(cal.identities()))} "
                                 f"individuals): {rec['rule']} of the replayed open set{units}")
    if cal.population:
        entry["threshold_source"] += (f"; wrong joins weighted x{rec['fp_weight']:.2f} for a population of "
                                      f"{cal.population} individuals (prevalence correction)")
    entry["calibration"] = {k: rec[k] for k in ("f1", "precision", "recall", "n_pred", "n_true", "fp_weight")}
    curves.setdefault("calibration_f1", {})[method.name] = rec["sweep"]
    return float(rec["threshold"]), rec["count_rule"]


def _pipeline_open_set(entry: dict, engine: Engine, method: rm.Method, S: np.ndarray, ev: PreparedSet,
                       cal: PreparedSet | None, emb: dict, legacy, curves: dict) -> None:
    """The threshold (calibrated on the calibration set, else the configured one), then the
    pipeline's own match-or-create on the evaluated set at it (and at the count-calibrated and
    the configured thresholds)."""
    cal_feed = cal.feed_encounters() if cal is not None and cal.ok else None
    if cal_feed:
        Sc = flank_masked(method_similarity(cal, method, legacy), cal)
        threshold, count_rule = _calibrated_threshold(entry, method, Sc, cal, cal_feed, curves)
    else:
        threshold = rm.default_threshold()
        entry["threshold_source"] = "the pipeline's configured reid_threshold (no calibration labels)"
    entry["threshold"] = threshold
    details: dict = {}
    deer, feed, secs = run_pipeline_open_set(engine, ev, method, threshold, emb["versions"], details)
    entry["open_set"] = open_set_metrics(ev.identities(), deer, feed, ev.label_encounters())
    entry["assignments"] = assignment_rows(method.name, ev, deer, details, threshold)
    entry["open_set_seconds"] = round(secs, 2)
    ev_feed = ev.feed_encounters()
    sim_deer, _ = simulate_open_set(flank_masked(S, ev), ev_feed, threshold, _cannot_link(ev, ev_feed),
                                    method.encounter_pooling)
    entry["replay_agreement_ari"] = metrics.adjusted_rand_index(deer, sim_deer)
    if cal_feed:
        entry["count_operating_point"] = _count_operating_point(engine, ev, method, count_rule, emb)
    _embedding_details(entry, method, emb)
    if method.name == rm.DEFAULT_METHOD and cal_feed:
        t_conf = rm.default_threshold()
        d2, f2, _ = run_pipeline_open_set(engine, ev, method, t_conf, emb["versions"])
        entry["as_configured"] = {"threshold": t_conf, "open_set": open_set_metrics(ev.identities(), d2, f2, ev.label_encounters())}


def _verified_open_set(entry: dict, engine: Engine, method: rm.Method, S: np.ndarray, ev: PreparedSet,
                       cal: PreparedSet | None, emb: dict, curves: dict, verified: VerifiedScores) -> None:
    """A method that verifies candidates with local features: the calibration of match
    probabilities (``fused``) and the threshold are fitted on the calibration labels only; the
    pipeline then decides the evaluated photos with them (the same verifier, so every pair is
    verified once per evaluation)."""
    ms = method.match_score
    cal_feed = cal.feed_encounters() if cal is not None and cal.ok else None
    calibration = None
    if ms == "fused":
        if not cal_feed:
            raise EvaluationError(f"method {method.name}: fused scores need calibration labels "
                                  "(--calibration-labels or --split-by-identity)")
        Sc = method_similarity(cal, method)
        calibration = verified.fit_calibration(cal, Sc, f"calibration labels ({len(cal.ok)} photos)")
        with engine.begin() as conn:
            calib.save(conn, calibration)
        entry["calibration_artefact"] = {"version": calibration.version, "fitted_on": dict(calibration.fitted_on),
                                         "curves": {k: c.as_dict() for k, c in calibration.curves.items()},
                                         "reliability_calibration": list(calibration.reliability)}
    L, compat = verified.closed_set_local(ev, S)
    C = verified.pair_scores(ms, S, L, compat, calibration)
    entry["closed_set"] = closed_set_metrics(np.where(np.isfinite(C), C, -1.0), ev.identities(),
                                             ev.label_encounters())
    entry["closed_set"]["note"] = (f"global top {CLOSED_SET_VERIFY} of each query verified and re-ranked")
    if cal_feed:
        Sc = method_similarity(cal, method)
        Lc, cc = verified.open_set_local(cal, Sc)
        Pc = verified.pair_scores(ms, Sc, Lc, cc, calibration)
        threshold, count_rule = _calibrated_threshold(
            entry, method, Pc, cal, cal_feed, curves, " (threshold in probability units)" if ms == "fused" else "")
    else:
        threshold, count_rule = rm.default_threshold(), None
        entry["threshold_source"] = "the pipeline's configured reid_threshold (no calibration labels)"
    entry["threshold"] = threshold
    cal_version = calibration.version if calibration is not None else None
    details: dict = {}
    deer, feed, secs = run_pipeline_open_set(engine, ev, method, threshold, emb["versions"], details,
                                             verified=verified, calibration_version=cal_version)
    entry["open_set"] = open_set_metrics(ev.identities(), deer, feed, ev.label_encounters())
    entry["assignments"] = assignment_rows(method.name, ev, deer, details, threshold)
    entry["open_set_seconds"] = round(secs, 2)
    Le, ce = verified.open_set_local(ev, S)
    Pe = verified.pair_scores(ms, S, Le, ce, calibration)
    ev_feed = ev.feed_encounters()
    sim_deer, _ = simulate_open_set(Pe, ev_feed, threshold, _cannot_link(ev, ev_feed), method.encounter_pooling)
    entry["replay_agreement_ari"] = metrics.adjusted_rand_index(deer, sim_deer)
    if calibration is not None:
        entry["calibration_artefact"]["reliability_evaluated"] = reliability_on(ev, S, Le, ce, calibration)
    if count_rule is not None:
        entry["count_operating_point"] = _count_operating_point(
            engine, ev, method, count_rule, emb, verified=verified, calibration_version=cal_version)
    _embedding_details(entry, method, emb)
    entry["pair_curve_score"] = "global cosine (the candidates' order before verification)"


ASSIGNMENT_COLUMNS = ("method", "image_path", "identity", "encounter_id", "side", "predicted_deer", "decision",
                      "score", "decided_against", "threshold")


def assignment_rows(method: str, ps: PreparedSet, deer: Sequence, details: Mapping[int, tuple],
                    threshold: float) -> list[dict]:
    """One row per evaluated photo: what the method decided for it (``ASSIGNMENT_COLUMNS``).
    ``decided_against`` is the deer (or candidate) the decision compared with last: the deer
    joined, or the best candidate that was not similar enough; empty for the very first."""
    rows = []
    for r, i in enumerate(ps.ok):
        p = ps.photos[i]
        decision, score, against = details.get(r, ("", None, None))
        rows.append({"method": method, "image_path": p.image_path, "identity": p.identity,
                     "encounter_id": p.encounter, "side": p.side or "", "predicted_deer": deer[r],
                     "decision": decision, "score": "" if score is None else f"{float(score):.6f}",
                     "decided_against": "" if against is None else against, "threshold": f"{float(threshold):.6f}"})
    return rows


def write_assignments(path, report: dict) -> Path:
    """The per-photo assignments of every method as CSV (and removed from the report's entries)."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(ASSIGNMENT_COLUMNS))
        w.writeheader()
        for entry in report["methods"].values():
            w.writerows(entry.get("assignments", []))
    return path
