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
    p.add_argument("--weights", default="auto", help="embedding weights: auto (default), imagenet or a path")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--legacy-redraws", type=int, default=10,
                   help="extra legacy runs with new projections, to show its spread (default 10)")
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
        embedding = EmbeddingSettings(weights=args.weights, device=args.device, batch_size=args.batch_size)
        options = ev.EvaluationOptions(methods=[m.name for m in methods], embedding=embedding,
                                       order_seed=args.order_seed, legacy_redraws=args.legacy_redraws)
        report = ev.evaluate(args.labels, args.images_root, args.calibration_labels,
                             args.calibration_images_root, args.split_by_identity, options)
    except (eval_labels.EvaluationError, ValueError) as exc:
        print(f"deer-pipeline evaluate: {exc}", file=sys.stderr)
        return 2
    out = eval_report.write_json(report, args.out)
    html = eval_report.write_html(report, args.html or Path(args.out).with_suffix(".html"))
    print(eval_report.format_table(report))
    v = report.get("verdict", {})
    if v.get("compared"):
        print(f"\ndefault vs legacy: open-set F1 {v['default_f1']:.3f} vs {v['legacy_f1']:.3f} "
              f"({'better' if v['default_beats_legacy_f1'] else 'NOT better'}); |deer found - true| "
              f"{v['default_count_error']} vs {v['legacy_count_error']} "
              f"({'better' if v['default_beats_legacy_count_error'] else 'NOT better'})")
        c = v.get("count_operating_point")
        if c:
            print(f"default at the count operating point (threshold {c['threshold']:.3f}): F1 {c['default_f1']:.3f} "
                  f"({'better' if c['beats_legacy_f1'] else 'NOT better'}); |deer found - true| "
                  f"{c['default_count_error']} ({'better' if c['beats_legacy_count_error'] else 'NOT better'})")
    rd = report.get("methods", {}).get("legacy", {}).get("redraws", {})
    if rd.get("n"):
        print(f"legacy over {rd['n']} more projection draws: F1 {rd['pairwise_f1']['min']:.3f}-"
              f"{rd['pairwise_f1']['max']:.3f} (mean {rd['pairwise_f1']['mean']:.3f}); |deer found - true| "
              f"{rd['count_error_abs']['min']:.0f}-{rd['count_error_abs']['max']:.0f} "
              f"(mean {rd['count_error_abs']['mean']:.1f})")
    if report.get("substitution_note"):
        print("\nnote: " + report["substitution_note"])
    print(f"\nthresholds: " + "; ".join(f"{n} {e['threshold']:.3f} ({e['threshold_source']})"
                                      for n, e in report["methods"].items()))
    print(f"\nreport: {out}\nhtml:   {html}\ntotal {report['timings']['total_s']:.1f}s")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
