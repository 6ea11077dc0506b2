"""``deer-pipeline demo``: the main job end to end on the embedded default.

Starts the embedded PostgreSQL (or uses DEER_DATABASE_URL), writes the deterministic sample
(unless ``--images`` is given), ingests it, then materialises every asset for every camera x day
partition through Dagster (the same ``identification_job`` the sensor and schedule launch, on a
Dagster instance stored in the same PostgreSQL), then the threshold report, and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from deer_pipeline import db


def run_demo(images: Path | None = None, detections: Path | None = None, seed: int = 7,
             out_dir: Path | None = None) -> dict:
    import dagster as dg

    from deer_pipeline import detection_feed, ingest, sample
    from deer_pipeline.definitions import defs
    from deer_pipeline.defs.partitions import CAMERA_PARTITIONS_NAME, partition_key
    from deer_pipeline.instance import get_instance

    started = time.perf_counter()
    engine = db.get_engine()
    truth_loaded = False
    if images is None:
        out_dir = Path(out_dir or db.data_dir() / "sample").resolve()
        info = sample.write_sample(out_dir, seed=seed)
        report = ingest.ingest(engine, info.detections_json)
        sample.load_truth(engine, out_dir)
        truth_loaded = True
    else:
        report = ingest.ingest(engine, detections or images)
    print(f"ingested: {report.summary()}")

    instance = get_instance()
    partitions = detection_feed.partitions_with_detections(engine)
    cameras = sorted({camera for camera, _ in partitions})
    known = set(instance.get_dynamic_partitions(CAMERA_PARTITIONS_NAME))
    if set(cameras) - known:
        instance.add_dynamic_partitions(CAMERA_PARTITIONS_NAME, sorted(set(cameras) - known))

    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    job = defs.resolve_job_def("identification_job")
    failed = []
    for camera, day in partitions:  # capture-time order: identity decisions follow time
        key = partition_key(camera, day)
        result = job.execute_in_process(instance=instance, partition_key=key, run_config=quiet,
                                        raise_on_error=False)
        print(f"  {str(key):<28} {'ok' if result.success else 'FAILED'}")
        if not result.success:
            failed.append(str(key))
    report_result = defs.resolve_job_def("report_job").execute_in_process(
        instance=instance, run_config=quiet, raise_on_error=False)
    if not report_result.success:
        failed.append("threshold_report")

    from deer_pipeline import status

    summary = status.collect(engine)
    summary["partitions"] = len(partitions)
    summary["failed"] = failed
    summary["seconds"] = round(time.perf_counter() - started, 1)
    if truth_loaded:
        summary["true_deer"] = status.true_identity_count(engine)
    return summary


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="deer-pipeline demo", description=__doc__)
    parser.add_argument("--images", type=Path, help="a folder of images (default: the generated sample)")
    parser.add_argument("--detections", type=Path, help="MegaDetector JSON or CSV for --images")
    parser.add_argument("--seed", type=int, default=7, help="sample generator seed")
    parser.add_argument("--out-dir", type=Path, help="where the sample is written (default .deer/sample)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)

    summary = run_demo(args.images, args.detections, args.seed, args.out_dir)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print()
        print("deer_pipeline demo summary")
        for key, value in summary.items():
            print(f"  {key:<28} {value}")
    return 1 if summary["failed"] else 0
