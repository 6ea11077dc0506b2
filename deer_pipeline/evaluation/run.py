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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from sqlalchemy.engine import Engine

from deer_pipeline.evaluation import methods as rm
from deer_pipeline.evaluation.isolated import isolated_database
from deer_pipeline.evaluation.labels import (
    EvaluationError,
    LabelledPhoto,
    dataset_summary,
    read_labels,
    split_by_identity,
    without_identities,
)
from deer_pipeline.evaluation.openset import (
    _legacy_open_set,
    _pipeline_open_set,
    _verified_open_set,
    method_similarity,
    reset_identities,
    write_assignments,
)
from deer_pipeline.evaluation.prepare import PreparedSet, embed_sets, prepare_set
from deer_pipeline.evaluation.report import verdict
from deer_pipeline.evaluation.scoring import (
    _pair_curve,
    closed_set_metrics,
)
from deer_pipeline.evaluation.verified import VerifiedScores
from deer_pipeline.settings import EmbeddingSettings

log = logging.getLogger(__name__)


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
    train_options: object | None = None  # embedding.training.TrainOptions for train_split / train_encounters
    train_encounters: bool = False       # train `trained` in the run on the encounters of every photo, no identity
    train_mixed: bool = False            # train `trained` in the run: calibration identities + evaluated encounters


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
    (``options.train_split``); it may never have been trained on an evaluated individual's
    identity. ``options.train_encounters`` trains it here on the encounters of every photo,
    calibration and evaluated, with no identity read (``training.encounter_classes``). A
    method whose weights are absent is skipped with the reason (``report["skipped_methods"]``).
    Returns (methods to run, options with the trained model's folder in the embedding settings)."""
    import dataclasses

    from deer_pipeline.embedding import models as embedders
    from deer_pipeline.embedding import training
    from deer_pipeline.embedding import trained_model

    model_file = options.model_file
    wanted = {m.name for m in methods}
    if options.train_encounters and "trained" in wanted:
        t0 = time.perf_counter()
        result = training.train(            # encounter classes read no identity (training.encounter_classes)
            list(cal_photos or []) + list(photos), workdir / "trained-model",
            options.train_options or training.options_for("encounter", device=options.embedding.device),
            source="encounters of every photo of this evaluation (no identities read)", classes="encounter")
        timings["training_s"] = round(time.perf_counter() - t0, 2)
        model_file = str(result.out_dir)
    elif options.train_mixed and "trained" in wanted:
        if not cal_photos:
            raise EvaluationError("--train-mixed names the calibration individuals: give --split-by-identity SEED "
                                  "or --calibration-labels")
        t0 = time.perf_counter()
        result = training.train(            # the evaluated photos' identities are not read (without_identities)
            list(cal_photos) + without_identities(photos), workdir / "trained-model",
            options.train_options or training.options_for("mixed", device=options.embedding.device),
            source="calibration individuals by identity and the evaluated photos by encounter (their "
                   "identities not read)", classes="mixed")
        timings["training_s"] = round(time.perf_counter() - t0, 2)
        model_file = str(result.out_dir)
    elif options.train_split and "trained" in wanted:
        if not cal_photos:
            raise EvaluationError("--train-split trains on the calibration half: give --split-by-identity SEED "
                                  "or --calibration-labels")
        t0 = time.perf_counter()
        result = training.train(cal_photos, workdir / "trained-model",
                                options.train_options or training.options_for("identity",
                                                                              device=options.embedding.device),
                                source="calibration photos of this evaluation")
        timings["training_s"] = round(time.perf_counter() - t0, 2)
        model_file = str(result.out_dir)
    if model_file:
        card = trained_model.read_card(model_file)
        trained_on = set(card["data"].get("identities") or [])
        overlap = sorted(trained_on & {p.identity for p in photos})
        if overlap:
            raise EvaluationError(
                f"the model in {model_file} was trained on {len(overlap)} of the evaluated individuals "
                f"(e.g. {', '.join(overlap[:5])}); evaluate it on other individuals (train with "
                f"`deer-pipeline train --split-by-identity SEED` and evaluate with the same SEED)")
        report["trained_model"] = {
            # the version this evaluation writes: the model's own, with the configured crop zooms
            "model_dir": card["_model_dir"],
            "embedding_version": card["embedding_version"] + embedders.zoom_label(options.embedding.zooms),
            "trained_in_this_run": bool(options.train_split or options.train_encounters or options.train_mixed),
            "data": {**{k: card["data"][k] for k in ("source", "sha256", "photos_used", "individuals_used",
                                                     "train_individuals", "validation_individuals", "skipped")},
                     "classes": card["data"].get("classes", "identity"),
                     "encounters_used": card["data"].get("encounters_used"),
                     **{k: card["data"][k] for k in ("encounter_classes", "unnamed_photos") if k in card["data"]}},
            "training": {k: card["training"][k] for k in ("epochs_run", "best_epoch", "validation_top1", "seconds",
                                                          "device", "seed")},
            "validation_identities": card["data"].get("validation_identities") or [],
            "evaluated_photos_trained_on": _photos_trained_on(card, photos)}
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
    on individuals it learnt, its scores are higher than on new ones. Those are a fifth of the
    calibration individuals, so the F1 that chooses the threshold weights wrong joins for the
    whole calibration half's number of individuals (``population``; see
    ``scoring.calibrate_threshold``): on 18 individuals alone, joining nearly everything wins."""
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
        population=len(set(cal.identities())),
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


def _photos_trained_on(card: dict, photos) -> int | None:
    """How many of the evaluated photos the model trained on (by file sha256; an encounter model
    reads no identity, so it may have); None for a model card that does not list its photos."""
    from deer_pipeline.embedding.models import read_sha256

    seen = card["data"].get("photo_sha256")
    if seen is None:
        return None
    seen = set(seen)
    return sum(read_sha256(p.image_path) in seen for p in photos)
