"""``deer-pipeline evaluate``: re-identification on labelled photos, every method side by side.

    deer-pipeline evaluate --labels CSV --images-root DIR
        [--calibration-labels CSV --calibration-images-root DIR] [--split-by-identity SEED]
        [--methods NAME ...] --out REPORT.json [--html REPORT.html]

Prints a table of methods x metrics, writes the JSON report and a small HTML report with the
precision/recall curve. See ``deer_pipeline.evaluation.run`` for what is measured and how.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from deer_pipeline.evaluation import methods as reid_methods
from deer_pipeline import settings
from deer_pipeline.settings import EmbeddingSettings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deer-pipeline evaluate",
        description="Evaluate re-identification on labelled photos (CSV with at least image_path, identity; "
                    "optionally encounter_id, camera, timestamp, side, classification, x, y, w, h). Runs the "
                    "pipeline's own ingest, crop, embedding and matching code in a temporary database.")
    p.add_argument("--labels", required=True, help="labels CSV of the evaluated photos")
    p.add_argument("--images-root", help="folder relative image paths are under (default: the CSV's folder)")
    p.add_argument("--calibration-labels", help="labels CSV used only to choose thresholds")
    p.add_argument("--calibration-images-root", help="folder of the calibration photos")
    p.add_argument("--split-by-identity", type=int, metavar="SEED",
                   help="split --labels by identity into a calibration half and an evaluation half")
    p.add_argument("--methods", nargs="+", metavar="NAME",
                   help=f"methods to run (default: all): {', '.join(reid_methods.ALL_METHODS)}")
    p.add_argument("--out", required=True, help="report JSON to write")
    p.add_argument("--html", help="HTML report (default: the JSON path with .html)")
    p.add_argument("--assignments", metavar="FILE.csv",
                   help="write one row per evaluated photo and method (method, image_path, identity, "
                        "encounter_id, predicted_deer, score, decided_against, ...) to recompute every metric")
    p.add_argument("--weights", default="auto", help="embedding weights: auto (default), imagenet or a path")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--zooms", type=float, nargs="+", default=list(settings.CROP_ZOOMS),
                   help="the crop (1) and centred zooms into it whose vectors are averaged, as the pipeline "
                        f"does (default {' '.join(f'{z:g}' for z in settings.CROP_ZOOMS)}; 1 alone: the whole crop)")
    p.add_argument("--legacy-redraws", type=int, default=10,
                   help="extra legacy runs with new projections, to show its spread (default 10)")
    p.add_argument("--model-file", metavar="MODEL_DIR",
                   help="trained model (a `deer-pipeline train` folder) for the method `trained`; it must not "
                        "have been trained on any evaluated individual")
    p.add_argument("--train-split", action="store_true",
                   help="train the method `trained` in this run on the calibration half (--split-by-identity "
                        "or --calibration-labels) and score it on the other half")
    p.add_argument("--train-encounters", action="store_true",
                   help="train the method `trained` in this run without identity labels, each encounter of "
                        "every photo (calibration and evaluated) its own class (train --classes encounter)")
    p.add_argument("--train-mixed", action="store_true",
                   help="train the method `trained` in this run on the calibration individuals by identity and "
                        "the evaluated photos by encounter, their identities not read (train --classes mixed)")
    p.add_argument("--train-epochs", type=int,
                   help="epochs for --train-split / --train-encounters / --train-mixed (default: train's "
                        "default for the classes)")
    p.add_argument("--train-views", type=int,
                   help="augmented views per photo for --train-split / --train-encounters / --train-mixed")
    p.add_argument("--train-loss", choices=settings.TRAIN_LOSSES,
                   help="training loss for --train-split / --train-encounters / --train-mixed (default: "
                        "train's for the classes)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--order-seed", type=int, default=0,
                   help="seed of the encounter order when the labels have no timestamps (default 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from deer_pipeline.ops.progress import set_quiet

    set_quiet(args.quiet)
    from deer_pipeline.evaluation import labels as eval_labels
    from deer_pipeline.evaluation import report as eval_report
    from deer_pipeline.evaluation import run as ev

    if args.calibration_labels and args.split_by_identity is not None:
        print("deer-pipeline evaluate: give either --calibration-labels or --split-by-identity, not both",
              file=sys.stderr)
        return 2
    try:
        methods = reid_methods.resolve_methods(args.methods)
        embedding = EmbeddingSettings(weights=args.weights, device=args.device, batch_size=args.batch_size,
                                      zooms=tuple(args.zooms))
        train_options = None
        if sum(map(bool, (args.model_file, args.train_split, args.train_encounters, args.train_mixed))) > 1:
            print("deer-pipeline evaluate: give one of --model-file, --train-split, --train-encounters and "
                  "--train-mixed", file=sys.stderr)
            return 2
        if args.train_split or args.train_encounters or args.train_mixed:
            from deer_pipeline.embedding.training import options_for

            classes = "encounter" if args.train_encounters else "mixed" if args.train_mixed else "identity"
            train_options = options_for(classes, device=args.device,
                                        epochs=args.train_epochs, views=args.train_views, loss=args.train_loss)
        options = ev.EvaluationOptions(methods=[m.name for m in methods], embedding=embedding,
                                       order_seed=args.order_seed, legacy_redraws=args.legacy_redraws,
                                       model_file=args.model_file, train_split=args.train_split,
                                       train_encounters=args.train_encounters, train_mixed=args.train_mixed,
                                       train_options=train_options, assignments=args.assignments)
        report = ev.evaluate(args.labels, args.images_root, args.calibration_labels,
                             args.calibration_images_root, args.split_by_identity, options)
    except (eval_labels.EvaluationError, ValueError) as exc:
        print(f"deer-pipeline evaluate: {exc}", file=sys.stderr)
        return 2
    out = eval_report.write_json(report, args.out)
    html = eval_report.write_html(report, args.html or Path(args.out).with_suffix(".html"))
    print(eval_report.format_table(report))
    lines = eval_report.verdict_lines(report)
    if lines:
        print("\n" + "\n".join(lines))
    for name, reason in (report.get("skipped_methods") or {}).items():
        print(f"skipped {name}: {reason}")
    tm = report.get("trained_model")
    if tm:
        seen = tm.get("evaluated_photos_trained_on")
        trained_on = (f"{tm['data']['photos_used']} photos of {tm['data']['encounters_used']} encounters "
                      "without identity labels (each encounter a class; "
                      + ("the evaluated photos may be among them)" if seen is None
                         else f"{seen} of the evaluated photos among them)")
                      if tm["data"].get("classes") == "encounter" else
                      f"{tm['data']['photos_used']} photos: {tm['data']['individuals_used']} named individuals, "
                      f"none evaluated, and {tm['data'].get('encounter_classes')} encounters of unnamed photos "
                      f"({'the evaluated photos may be among them' if seen is None else f'{seen} of the evaluated photos among them'}, "
                      "their identities not read)"
                      if tm["data"].get("classes") == "mixed" else
                      f"{tm['data']['photos_used']} photos of {tm['data']['individuals_used']} individuals, none evaluated")
        print(f"\ntrained model: {tm['model_dir']} ({tm['embedding_version']}); trained on {trained_on}; "
              f"held-out top-1 {tm['training']['validation_top1']}; training {tm['training']['seconds']['total']} s"
              + (f"; threshold from {tm['threshold_calibrated_on']}" if tm.get("threshold_calibrated_on") else ""))
    if report.get("substitution_note"):
        print("\nnote: " + report["substitution_note"])
    print("\nthresholds: " + "; ".join(f"{n} {e['threshold']:.3f} ({e['threshold_source']})"
                                      for n, e in report["methods"].items()))
    if report.get("assignments_file"):
        print(f"\nassignments: {report['assignments_file']}")
    print(f"\nreport: {out}\nhtml:   {html}\ntotal {report['timings']['total_s']:.1f}s")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
