"""Evaluation of re-identification on labelled photos, every method side by side.

Plain logic, no Dagster. :func:`evaluate` takes a labels file (``image_path, identity`` and
optionally ``encounter_id, camera, timestamp, side, classification`` and a box ``x, y, w, h``;
without a box the whole photo is the crop) and runs the pipeline's OWN code on it, inside an
isolated database that is created for the run and dropped afterwards:

1. ingestion (``ingest.ingest`` of a detections CSV written from the labels),
2. cropping (``cropping.crop_partition``),
3. embedding (``inference.InferenceEngine`` + ``embedding_store``), plus one extra backbone pass
   for the legacy method and the feature methods of :mod:`deer_pipeline.evaluation.methods`,
4. match-or-create (``matching.decide_partition``) at the method's threshold.

Per method it reports

* closed set: top-1, top-5 and mAP, leave-one-out over the evaluated photos, where the other
  photos of the query's own encounter are removed from the gallery (they are neither counted as
  matches nor as misses);
* open set, the way the pipeline runs: sightings in capture-time order (the labels' timestamps,
  or a fixed seeded order of encounters when there are none) through match-or-create; pairwise
  precision / recall / F1 over pairs of photos from DIFFERENT encounters (the headline: pairs
  within one encounter are grouping, not recognition), the same over all pairs (secondary), the
  adjusted Rand index of the resulting deer, number of deer found vs the true number, and BAKS /
  BAUS with their geometric mean (below);
* optionally (``assignments``) a CSV with one row per evaluated photo and method, from which
  every metric can be recomputed;
* the threshold, where it came from, and the fusion weights.

BAKS / BAUS (balanced accuracy on known / unknown samples), on encounters (the unit the
pipeline decides) in feed order:

* an encounter whose individual was seen in an earlier encounter is *known*; it is right when it
  joined an existing deer whose earlier sightings are mostly (strict plurality) that individual;
  BAKS = mean over individuals of the share of their known encounters that were right;
* the first encounter of an individual is *unknown*; it is right when it founded a new deer;
  BAUS = the share of first encounters that founded a new deer (one per individual, so the
  per-individual average is the plain share).

Threshold. With calibration labels, each calibrated method's threshold is the one that maximises
open-set cross-encounter pairwise F1 on the calibration set (``metrics.cross_encounter_prf`` +
``metrics.recommend_threshold``, ties to the higher threshold), found by replaying the pipeline's
decision rule in memory (:func:`simulate_open_set`) over a threshold grid; the evaluated set's
labels are used only for scoring. Without calibration labels the pipeline's configured threshold
is used. The legacy method's threshold is fixed at 0.60, as it was. The in-memory replay is
checked against the database run at the chosen threshold (``replay_agreement_ari``).
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from deer_pipeline.evaluation import methods as rm
from deer_pipeline.evaluation.isolated import isolated_database
from deer_pipeline.evaluation.labels import (
    EvaluationError,
    LabelledPhoto,
    dataset_summary,
    read_labels,
    split_by_identity,
)
from deer_pipeline.evaluation.prepare import PreparedSet, embed_sets, prepare_set
from deer_pipeline.evaluation.verified import CLOSED_SET_VERIFY, VerifiedScores, reliability_on
from deer_pipeline.identity import calibration as calib
from deer_pipeline.evaluation.report import verdict
from deer_pipeline.evaluation.scoring import (
    _pair_curve,
    calibrate_threshold,
    closed_set_metrics,
    open_set_metrics,
    simulate_open_set,
)
from deer_pipeline.identity import metrics
from deer_pipeline.settings import EmbeddingSettings

log = logging.getLogger(__name__)


def method_similarity(ps: PreparedSet, method: rm.Method, legacy: rm.LegacyMatcher | None = None) -> np.ndarray:
    """(n x n) similarity of the set's ok photos under ``method`` (ensemble cosine; legacy: the
    cosine of its projected vectors)."""
    if method.kind == "legacy":
        v = legacy.embed(ps.legacy_features)
        return v @ v.T
    from deer_pipeline.embedding.models import unit_rows, weighted_cosine

    vs = {m: unit_rows(ps.vectors[m]) for m in method.models}
    return np.asarray(weighted_cosine(vs, vs, dict(method.ensemble_weights)), np.float64)


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


@dataclass
class EvaluationOptions:
    methods: Sequence[str] | None = None
    # the one embedding configuration (weights, device, batch size ...), as the pipeline uses it
    embedding: EmbeddingSettings = field(default_factory=EmbeddingSettings)
    order_seed: int = 0
    database_url: str | None = None      # None: DEER_DATABASE_URL, else the embedded server
    legacy_redraws: int = 10             # extra legacy runs, each with a new projection (its spread)
    assignments: str | None = None       # CSV path: one row per evaluated photo and method
    model_file: str | None = None        # trained model folder for the method `trained`
    train_split: bool = False            # train `trained` in the run on the calibration photos
    train_options: object | None = None  # embedding.training.TrainOptions for train_split


def evaluate(labels_csv, images_root=None, calibration_labels_csv=None, calibration_images_root=None,
             split_by_identity_seed: int | None = None, options: EvaluationOptions | None = None,
             photos: Sequence[LabelledPhoto] | None = None,
             calibration_photos: Sequence[LabelledPhoto] | None = None) -> dict:
    """Run every method on the labelled photos and return the report (a JSON-able dict).

    ``split_by_identity_seed``: split ``labels_csv`` by identity into a calibration half and an
    evaluation half (only when no calibration labels are given). ``photos`` /
    ``calibration_photos`` may be passed instead of files (tests, subsets)."""
    options = options or EvaluationOptions()
    t_start = time.perf_counter()
    methods = rm.resolve_methods(options.methods)
    photos, cal_photos, split_note = _labelled_sets(
        labels_csv, images_root, calibration_labels_csv, calibration_images_root, split_by_identity_seed,
        photos, calibration_photos)
    report = _new_report(labels_csv, images_root, calibration_labels_csv, split_note, photos, cal_photos)
    timings: dict = {}
    curves: dict = {}
    with tempfile.TemporaryDirectory(prefix="deer-eval-") as tmp, \
            isolated_database(base_url=options.database_url) as engine:
        methods, options = _reid_models(methods, options, photos, cal_photos, Path(tmp), report, timings)
        ev, cal, emb = _prepare_and_embed(engine, photos, cal_photos, methods, options, Path(tmp), timings, report)
        legacy = rm.LegacyMatcher(emb["legacy_d_in"]) if "legacy_d_in" in emb else None
        verified = VerifiedScores(engine, str(Path(tmp) / "crops")) if any(m.verified for m in methods) else None
        for method in methods:
            mcal = _trained_calibration(cal, report) if method.name == "trained" else cal
            report["methods"][method.name] = _evaluate_method(engine, method, ev, mcal, emb, legacy, options, curves,
                                                              verified)
        reset_identities(engine)
        if verified is not None:
            report["local_verification"] = verified.verifier.metadata()
    if options.assignments:
        report["assignments_file"] = str(write_assignments(options.assignments, report))
    for entry in report["methods"].values():
        entry.pop("assignments", None)
    timings["total_s"] = round(time.perf_counter() - t_start, 2)
    _finish_report(report, emb, timings, curves)
    return report


def _reid_models(methods, options: EvaluationOptions, photos, cal_photos, workdir: Path, report: dict,
                 timings: dict):
    """Methods whose models have networks of their own (``trained``, downloaded backbones): the
    trained model comes from ``options.model_file`` or is trained here on the calibration photos
    (``options.train_split``); it may never have been trained on an evaluated individual. A
    method whose weights are absent is skipped with the reason (``report["skipped_methods"]``).
    Returns (methods to run, options with the trained model's folder in the embedding settings)."""
    import dataclasses

    from deer_pipeline.embedding import models as embedders
    from deer_pipeline.embedding import training

    model_file = options.model_file
    wanted = {m.name for m in methods}
    if options.train_split and "trained" in wanted:
        if not cal_photos:
            raise EvaluationError("--train-split trains on the calibration half: give --split-by-identity SEED "
                                  "or --calibration-labels")
        t0 = time.perf_counter()
        result = training.train(cal_photos, workdir / "trained-model",
                                options.train_options or training.TrainOptions(device=options.embedding.device),
                                source="calibration photos of this evaluation")
        timings["training_s"] = round(time.perf_counter() - t0, 2)
        model_file = str(result.out_dir)
    if model_file:
        card = training.read_card(model_file)
        trained_on = set(card["data"].get("identities") or [])
        overlap = sorted(trained_on & {p.identity for p in photos})
        if overlap:
            raise EvaluationError(
                f"the model in {model_file} was trained on {len(overlap)} of the evaluated individuals "
                f"(e.g. {', '.join(overlap[:5])}); evaluate it on other individuals (train with "
                f"`deer-pipeline train --split-by-identity SEED` and evaluate with the same SEED)")
        report["trained_model"] = {
            "model_dir": card["_model_dir"], "embedding_version": card["embedding_version"],
            "trained_in_this_run": bool(options.train_split),
            "data": {k: card["data"][k] for k in ("source", "sha256", "photos_used", "individuals_used",
                                                  "train_individuals", "validation_individuals", "skipped")},
            "training": {k: card["training"][k] for k in ("epochs_run", "best_epoch", "validation_top1", "seconds",
                                                          "device", "seed")},
            "validation_identities": card["data"].get("validation_identities") or []}
        files = dict(options.embedding.weights_files)
        files["trained"] = card["_model_dir"]
        options = dataclasses.replace(options, embedding=dataclasses.replace(
            options.embedding, weights_files=tuple(files.items())))
    kept, skipped = [], {}
    for m in methods:
        reid = [x for x in m.models if x in embedders.REID_MODELS]
        try:
            for x in reid:
                if x == "trained" and not model_file:
                    raise EvaluationError("no trained model: give --model-file MODEL_DIR or --train-split")
                embedders.resolve_embedder(x, options.embedding.weights_for(x))
        except (EvaluationError, embedders.EmbedderError, embedders.WeightsUnavailable, ValueError) as exc:
            skipped[m.name] = str(exc)
            log.warning("method %s skipped: %s", m.name, exc)
            continue
        kept.append(m)
    report["skipped_methods"] = skipped
    if not kept:
        raise EvaluationError(f"no method can run: {skipped}")
    return kept, options


def _trained_calibration(cal: PreparedSet | None, report: dict) -> PreparedSet | None:
    """The trained model's threshold is chosen on the calibration individuals it did NOT train on
    (its held-out validation individuals), when at least two of them are in the calibration set:
    on individuals it learnt, its scores are higher than on new ones."""
    import dataclasses

    held_out = set((report.get("trained_model") or {}).get("validation_identities") or [])
    if cal is None or not held_out:
        return cal
    pos = [k for k, i in enumerate(cal.ok) if cal.photos[i].identity in held_out]
    if len({cal.photos[cal.ok[k]].identity for k in pos}) < 2:
        return cal
    report["trained_model"]["threshold_calibrated_on"] = (
        f"{len(pos)} calibration photos of {len({cal.photos[cal.ok[k]].identity for k in pos})} individuals "
        "held out from its training")
    return dataclasses.replace(
        cal, ok=[cal.ok[k] for k in pos], vectors={m: v[pos] for m, v in cal.vectors.items()},
        legacy_features=None if cal.legacy_features is None else cal.legacy_features[pos])


def _labelled_sets(labels_csv, images_root, calibration_labels_csv, calibration_images_root,
                   split_by_identity_seed, photos, calibration_photos):
    """(evaluated photos, calibration photos or None, a note on how they were split)."""
    if photos is None:
        photos = read_labels(labels_csv, images_root)
    cal_photos = None
    split_note = None
    if calibration_photos is not None:
        cal_photos = list(calibration_photos)
    elif calibration_labels_csv:
        cal_photos = read_labels(calibration_labels_csv, calibration_images_root)
    elif split_by_identity_seed is not None:
        cal_photos, photos = split_by_identity(photos, split_by_identity_seed)
        split_note = f"labels split by identity with seed {split_by_identity_seed}: first half calibration"
    if cal_photos is not None:
        overlap = {p.identity for p in cal_photos} & {p.identity for p in photos}
        if overlap and split_by_identity_seed is None:
            log.warning("%d individual(s) appear in both the calibration and the evaluated labels", len(overlap))
    return photos, cal_photos, split_note


def _new_report(labels_csv, images_root, calibration_labels_csv, split_note, photos, cal_photos) -> dict:
    return {
        "default_method": rm.DEFAULT_METHOD,
        "methods": {},
        "dataset": {
            "labels": str(labels_csv) if labels_csv else None,
            "images_root": str(images_root) if images_root else None,
            "calibration_labels": str(calibration_labels_csv) if calibration_labels_csv else None,
            "split": split_note,
            "evaluation": dataset_summary(photos),
            "calibration": dataset_summary(cal_photos) if cal_photos else None,
        },
        "definitions": {
            "closed_set": "leave-one-out over the evaluated photos; photos of the query's own encounter "
                          "are removed from its gallery; ties ranked pessimistically",
            "open_set": "pipeline match-or-create (matching.decide_partition) in capture-time order, "
                        "encounters decided together; pairwise metrics over photos: cross_encounter_* over "
                        "pairs from different encounters (headline), pairwise_* over all pairs",
            "baks": "per individual, share of its non-first encounters that joined the deer holding "
                    "most of its earlier sightings; averaged over individuals",
            "baus": "share of individuals' first encounters that founded a new deer",
            "baks_baus_gmean": "geometric mean of BAKS and BAUS",
            "threshold": "calibrated: max open-set cross-encounter pairwise F1 on the calibration labels (in-memory "
                         "replay of the pipeline rule, 0.01 then 0.001 grid, ties to the higher threshold)",
        },
    }


def _prepare_and_embed(engine: Engine, photos, cal_photos, methods, options: EvaluationOptions,
                       workdir: Path, timings: dict, report: dict):
    """Ingest, crop and embed both sets with the pipeline's code; returns (evaluated set,
    calibration set or None, the embedding pass's vectors and notes)."""
    from deer_pipeline.settings import CropSettings

    crop_settings = CropSettings(store_dir=str(workdir / "crops"))
    t0 = time.perf_counter()
    ev = prepare_set(engine, photos, "evaluation", workdir, crop_settings, options.order_seed)
    sets = [ev]
    cal = None
    if cal_photos:
        cal = prepare_set(engine, cal_photos, "calibration", workdir, crop_settings, options.order_seed)
        sets.append(cal)
    timings["ingest_and_crop_s"] = round(time.perf_counter() - t0, 2)
    emb = embed_sets(engine, sets, methods, crop_settings.store_dir, options.embedding)
    timings.update({f"{k}_s": v for k, v in emb["seconds"].items()})
    report["dataset"]["evaluation"]["order"] = ev.order_source
    report["dataset"]["evaluation"]["evaluated_photos"] = len(ev.ok)
    report["dataset"]["evaluation"]["skipped"] = dict(list(ev.skipped.items())[:50])
    report["dataset"]["evaluation"]["skipped_count"] = len(ev.skipped)
    if cal is not None:
        report["dataset"]["calibration"]["evaluated_photos"] = len(cal.ok)
        report["dataset"]["calibration"]["skipped_count"] = len(cal.skipped)
    if len(ev.ok) < 2:
        raise EvaluationError(f"only {len(ev.ok)} evaluated photo(s) could be embedded; "
                              f"skipped: {dict(list(ev.skipped.items())[:5])}")
    return ev, cal, emb


def _evaluate_method(engine: Engine, method: rm.Method, ev: PreparedSet, cal: PreparedSet | None, emb: dict,
                     legacy: rm.LegacyMatcher | None, options: EvaluationOptions, curves: dict,
                     verified: VerifiedScores | None = None) -> dict:
    """One method's entry of the report: closed set, then the open set at its threshold."""
    tm = time.perf_counter()
    entry: dict = {"kind": method.kind, "description": method.description,
                   "weights": dict(method.ensemble_weights) or None}
    if method.verified:
        entry.update(match_score=method.match_score, encounter_pooling=method.encounter_pooling)
    S = method_similarity(ev, method, legacy)
    if method.kind == "legacy":
        entry["closed_set"] = closed_set_metrics(S, ev.identities(), ev.label_encounters())
        _legacy_open_set(entry, ev, emb, legacy, options)
    elif method.verified:
        _verified_open_set(entry, engine, method, S, ev, cal, emb, curves, verified)
    else:
        entry["closed_set"] = closed_set_metrics(S, ev.identities(), ev.label_encounters())
        _pipeline_open_set(entry, engine, method, S, ev, cal, emb, legacy, curves)
    curves.setdefault("pairs", {})[method.name] = _pair_curve(S, ev.identities(), ev.label_encounters())
    entry["seconds"] = round(time.perf_counter() - tm, 2)
    return entry


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


def _pipeline_open_set(entry: dict, engine: Engine, method: rm.Method, S: np.ndarray, ev: PreparedSet,
                       cal: PreparedSet | None, emb: dict, legacy, curves: dict) -> None:
    """The threshold (calibrated on the calibration set, else the configured one), then the
    pipeline's own match-or-create on the evaluated set at it (and at the count-calibrated and
    the configured thresholds)."""
    cal_feed = cal.feed_encounters() if cal is not None and cal.ok else None
    if cal_feed:
        Sc = method_similarity(cal, method, legacy)
        rec = calibrate_threshold(Sc, cal.identities(), cal_feed, _cannot_link(cal, cal_feed),
                                  method.encounter_pooling)
        threshold = float(rec["threshold"])
        entry["threshold_source"] = (f"calibration labels ({len(cal.ok)} photos, "
                                     f"{len(set(cal.identities()))} individuals): {rec['rule']} of "
                                     "the replayed open set")
        entry["calibration"] = {k: rec[k] for k in ("f1", "precision", "recall", "n_pred", "n_true")}
        count_rule = rec["count_rule"]
        curves.setdefault("calibration_f1", {})[method.name] = rec["sweep"]
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
    sim_deer, _ = simulate_open_set(S, ev_feed, threshold, _cannot_link(ev, ev_feed), method.encounter_pooling)
    entry["replay_agreement_ari"] = metrics.adjusted_rand_index(deer, sim_deer)
    if cal_feed:
        d2, f2, _ = run_pipeline_open_set(engine, ev, method, count_rule["threshold"], emb["versions"])
        entry["count_operating_point"] = {
            "threshold": count_rule["threshold"],
            "threshold_source": "calibration labels: " + count_rule["rule"],
            "calibration": {k: count_rule[k] for k in ("f1", "precision", "recall", "n_pred", "n_true")},
            "open_set": open_set_metrics(ev.identities(), d2, f2, ev.label_encounters())}
    entry["embedding_versions"] = {m: emb["versions"][m] for m in method.models}
    entry["backbone"] = [emb["weights_used"][m] for m in method.models]
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
        rec = calibrate_threshold(Pc, cal.identities(), cal_feed, _cannot_link(cal, cal_feed), method.encounter_pooling)
        threshold = float(rec["threshold"])
        entry["threshold_source"] = (f"calibration labels ({len(cal.ok)} photos, {len(set(cal.identities()))} "
                                     f"individuals): {rec['rule']} of the replayed open set"
                                     + (" (threshold in probability units)" if ms == "fused" else ""))
        entry["calibration"] = {k: rec[k] for k in ("f1", "precision", "recall", "n_pred", "n_true")}
        count_rule = rec["count_rule"]
        curves.setdefault("calibration_f1", {})[method.name] = rec["sweep"]
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
        d2, f2, _ = run_pipeline_open_set(engine, ev, method, count_rule["threshold"], emb["versions"],
                                          verified=verified, calibration_version=cal_version)
        entry["count_operating_point"] = {
            "threshold": count_rule["threshold"],
            "threshold_source": "calibration labels: " + count_rule["rule"],
            "calibration": {k: count_rule[k] for k in ("f1", "precision", "recall", "n_pred", "n_true")},
            "open_set": open_set_metrics(ev.identities(), d2, f2, ev.label_encounters())}
    entry["embedding_versions"] = {m: emb["versions"][m] for m in method.models}
    entry["backbone"] = [emb["weights_used"][m] for m in method.models]
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


def _finish_report(report: dict, emb: dict, timings: dict, curves: dict) -> None:
    report["timings"] = timings
    report["embedding"] = {k: emb[k] for k in ("versions", "weights_used", "feature_source",
                                               "backbone_passes_per_crop") if k in emb}
    report["embedding"]["device"] = emb.get("device")
    report["embedding"]["failures"] = emb["failures"][:20]
    report["environment"] = _environment()
    report["curves"] = curves
    report["substitution_note"] = _substitution_note(emb)
    report["verdict"] = verdict(report)


def _substitution_note(emb: dict) -> str | None:
    subs = [w for w in emb.get("weights_used", {}).values() if "substitutes for" in w]
    if not subs:
        return None
    return ("No ImageNet ResNet50 / EfficientNet-B0 weights exist on this machine: with weights='auto' "
            "the offline EfficientNet-Lite0 backbone substitutes for them (v1_resnet50, efficientnet_b0 and "
            "legacy run on the Lite0 head, multiscale pools three Lite0 stages); the version strings say "
            "'-for-<backbone>'.")


def _environment() -> dict:
    import torch

    from deer_pipeline import __version__ as pkg_version  # type: ignore[attr-defined]

    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "deer_pipeline": pkg_version,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
