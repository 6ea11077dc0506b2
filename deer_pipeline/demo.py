"""``deer-pipeline demo``: the main job end to end on the embedded default.

Starts the embedded PostgreSQL (or uses DEER_DATABASE_URL), writes the deterministic sample
(unless ``--images`` is given), ingests it, then materialises every asset for every camera x day
partition through Dagster in ONE run per pass (the same ``identification_job`` the sensor and
schedule launch, over a range of partitions, on a Dagster instance stored in the same
PostgreSQL), then the threshold report, and prints a summary, with Dagster's share of its runs'
time measured from the runs' events.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from deer_pipeline import db


def _start_date_from_data(engine) -> None:
    """When DEER_START_DATE is not set, the day partitions start at the earliest detection (if
    that is before the default), so the demo's partitions follow its data. Must run before the
    definitions are imported (they read the start date once)."""
    import os

    import sqlalchemy as sa

    from deer_pipeline.settings import env, partition_start_date

    if env("DEER_START_DATE"):
        return
    with engine.connect() as conn:
        earliest = conn.execute(sa.text(
            "SELECT min(day) FROM detections WHERE status IN ('ok', 'held') AND day IS NOT NULL")).scalar()
    if earliest is not None and earliest < partition_start_date():
        os.environ["DEER_START_DATE"] = earliest.isoformat()
        print(f"day partitions start at the earliest detection, {earliest.isoformat()} "
              "(DEER_START_DATE is not set)")


def run_demo(images: Path | None = None, detections: Path | None = None, seed: int = 7,
             out_dir: Path | None = None, calibrate: bool = True,
             image_roots: list[Path] | None = None, all_animals_are_deer: bool = False) -> dict:
    import datetime as dt

    import dagster as dg

    from deer_pipeline import sample
    from deer_pipeline.detections import feed as detection_feed
    from deer_pipeline.detections import ingest
    from deer_pipeline.ops import recovery, run_timing, status
    from deer_pipeline.ops.instance import get_instance
    from deer_pipeline.ops.progress import write
    from deer_pipeline.settings import IngestSettings, last_partition_day

    started = time.perf_counter()
    engine = db.get_engine()
    # Runs of an earlier demo whose process is gone (kill -9) hold pool slots: free them first.
    instance = get_instance()
    print(recovery.recover(instance).summary())
    truth_dir: Path | None = None
    # photos only from the image roots (default: the folder of the detections, or of the images)
    roots = list(image_roots or ([images] if images is not None and detections is not None else []))
    settings = IngestSettings(image_roots=tuple(str(r) for r in roots))
    if images is None:
        out_dir = Path(out_dir or db.data_dir() / "sample").resolve()
        info = sample.write_sample(out_dir, seed=seed)
        report = ingest.ingest(engine, info.detections_json, settings=settings, quiet=None)
        truth_dir = out_dir   # loaded after calibration, so the threshold never sees the truth
    else:
        report = ingest.ingest(engine, detections or images, settings=settings, quiet=None,
                               all_animals_are_deer=all_animals_are_deer)
    print(f"ingested: {report.summary()}")
    _start_date_from_data(engine)

    # The definitions read the start date once: imported only now that it follows the data.
    from deer_pipeline.definitions import defs
    from deer_pipeline.defs.partitions import (
        CAMERA_PARTITIONS_NAME,
        START_DATE,
        camera_order,
        range_tags,
        unseen_cameras,
    )
    from deer_pipeline.defs.resources import IdentitySettings

    held = detection_feed.sync_held(engine, dt.date.fromisoformat(START_DATE), last_partition_day())
    if held.held:
        print(f"held: {held.held} detection(s) whose day is not a partition (before {START_DATE}: "
              f"{held.before_start}, today or later: {held.future}; earliest {held.earliest}); "
              "they are processed once their day exists")
    partitions = detection_feed.partitions_with_detections(engine)
    new_cameras = unseen_cameras(instance, {camera for camera, _ in partitions})
    if new_cameras:
        instance.add_dynamic_partitions(CAMERA_PARTITIONS_NAME, new_cameras)

    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    job = defs.resolve_job_def("identification_job")
    report_job = defs.resolve_job_def("report_job")
    failed: list[str] = []
    timings: list[run_timing.RunTiming] = []
    cameras = sorted({camera for camera, _ in partitions})
    days = sorted({day for _, day in partitions})

    def timed(result):
        timings.append(run_timing.run_timing(instance, result.run_id))
        return result

    def run_all(label: str, run_config: dict, assets=None) -> None:
        # ONE run over every camera x day partition (the rectangle of the cameras and days; the
        # assets skip the camera-days without detections), decided day by day in capture order
        print(f"{label}: one run over {len(partitions)} camera x day partitions "
              f"({len(cameras)} cameras, {len(days)} days)")
        if not partitions:
            return
        tags = {**range_tags(cameras, days[0], days[-1], camera_order(instance)), **recovery.worker_tags()}
        result = timed(job.execute_in_process(instance=instance, run_config=run_config, asset_selection=assets,
                                              raise_on_error=False, tags=tags))
        t = timings[-1]
        write(f"  {label.split(',')[0]}: {'ok' if result.success else 'FAILED'} in {t.wall_s:.1f} s "
              f"(steps {t.steps_s:.1f} s)")
        if not result.success:
            steps = sorted({e.step_key for e in result.all_events if e.is_step_failure})
            failed.append(f"{label.split(',')[0]}: run {result.run_id[:8]} (failed steps: {', '.join(steps)})")

    def run_report() -> dict:
        result = timed(report_job.execute_in_process(instance=instance, run_config=quiet, raise_on_error=False,
                                                     tags=recovery.worker_tags()))
        if not result.success:
            failed.append("threshold_report")
            return {}
        return json.loads((db.data_dir() / "reports" / "threshold_report.json").read_text())

    configured = IdentitySettings().reid_threshold
    run_all(f"pass 1, configured threshold {configured:.2f}", quiet)
    deer_at_configured = status.collect(engine)["deer"]["total"]
    calibration = run_report().get("recommended") or {}
    threshold = calibration.get("threshold")
    if calibrate and threshold is not None and abs(threshold - configured) > 1e-9:
        print(f"threshold report recommends {threshold:.2f} ({calibration.get('rule')}, truth: "
              f"{calibration.get('truth_source')}, {calibration.get('pairs')} pairs); deciding again")
        run_all(f"pass 2, calibrated threshold {threshold:.2f}",
                {**quiet, "resources": {"identity": {"config": {"reid_threshold": threshold}}}},
                assets=[dg.AssetKey("deer_profiles"), dg.AssetKey("similarity_scores")])
    if truth_dir is not None:
        sample.load_truth(engine, truth_dir)
    final_report = run_report()
    # The evaluation asset measures re-identification on labelled photos when DEER_EVAL_LABELS
    # (or its run config) names them; otherwise it records that no labels are configured.
    evaluation = timed(defs.resolve_job_def("evaluation_job").execute_in_process(
        instance=instance, run_config=quiet, raise_on_error=False, tags=recovery.worker_tags()))
    if not evaluation.success:
        failed.append("reid_evaluation")
    # The deer roster (table, numbers over time, pictures) for the UI; the camtrap_dp asset needs
    # camera coordinates (deer-pipeline cameras import), so the demo leaves it to the schedule.
    roster = timed(defs.resolve_job_def("daily_exports_job").execute_in_process(
        instance=instance, run_config=quiet, asset_selection=[dg.AssetKey("deer_roster")],
        raise_on_error=False, tags=recovery.worker_tags()))
    if not roster.success:
        failed.append("deer_roster")

    summary = status.collect(engine)
    summary["partitions"] = len(partitions)
    summary["held"] = {"detections": held.held, "before_start": held.before_start, "future": held.future,
                       "earliest": held.earliest, "start_date": START_DATE}
    summary["deer_at_configured_threshold"] = {"threshold": configured, "deer": deer_at_configured}
    summary["calibration"] = calibration
    summary["recommended_threshold_with_truth"] = (final_report.get("recommended") or {}).get("threshold")
    summary["failed"] = failed
    summary["seconds"] = round(time.perf_counter() - started, 1)
    # Dagster's share of its runs' time, from the runs' events (RUN_START to the end, against the
    # time steps spent computing)
    summary["dagster"] = {**run_timing.summarise(timings), "per_run": [
        {"job": t.job, "run_id": t.run_id, "wall_s": t.wall_s, "steps_s": t.steps_s} for t in timings]}
    if truth_dir is not None:
        summary["true_deer"] = status.true_identity_count(engine)
    return summary


def render_summary(s: dict) -> str:
    deer = s["deer"]["total"]
    lines = ["deer_pipeline demo summary",
             f"  detections            {s['detections']['total']} ({s['detections']['by_status']})",
             f"  crops                 {s['crops']['total']} ({s['crops']['by_status']})",
             f"  embedded detections   {s['embedded']['detections']}",
             f"  sightings assigned    {s['assigned']} (matched {s['decisions'].get('matched', 0)}, "
             f"founding a new deer {s['decisions'].get('new', 0)})"]
    if "true_deer" in s:
        true = s["true_deer"]
        err = (deer - true) / true if true else float("nan")
        lines.append(f"  deer found            {deer}   true number in the sample: {true} "
                     f"(error {err:+.0%})")
    else:
        lines.append(f"  deer found            {deer}")
    at = s["deer_at_configured_threshold"]
    lines.append(f"  configured threshold  {at['threshold']:.2f} -> {at['deer']} deer")
    cal = s.get("calibration") or {}
    if cal:
        lines.append(f"  threshold in use      {s['threshold']['in_use']} (recommended by the threshold "
                     f"report from {cal.get('truth_source')}, {cal.get('pairs')} pairs, {cal.get('rule')})")
    lines.append(f"  recommended threshold {s.get('recommended_threshold_with_truth')} "
                 "(threshold report after loading the sample's true identities)")
    lines.append(f"  partitions            {s['partitions']}, failed: {s['failed'] or 'none'}")
    held = s.get("held") or {}
    lines.append(f"  held detections       {held.get('detections', 0)} (day not a partition: before "
                 f"{held.get('start_date')} {held.get('before_start', 0)}, today or later {held.get('future', 0)})")
    dagster = s.get("dagster") or {}
    share = dagster.get("dagster_share")
    lines.append(f"  seconds               {s['seconds']}" + (
        f" (Dagster runs {dagster['run_seconds']} s in {dagster['runs']} runs, steps computing "
        f"{dagster['step_seconds']} s: Dagster's share {share:.0%})" if share is not None else ""))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="deer-pipeline demo", description=__doc__)
    parser.add_argument("--images", type=Path, help="a folder of images (default: the generated sample)")
    parser.add_argument("--detections", type=Path, help="MegaDetector JSON or CSV for --images")
    parser.add_argument("--image-root", action="append", type=Path, default=[], metavar="DIR",
                        help="folder photos may come from (repeatable); default: --images (or, for the "
                             "sample, its folder). Photos outside it (symlinks resolved) are refused unopened")
    parser.add_argument("--seed", type=int, default=7, help="sample generator seed")
    parser.add_argument("--out-dir", type=Path, help="where the sample is written (default .deer/sample)")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="keep the configured threshold instead of deciding again at the one the "
                             "threshold report recommends from the data's own constraints")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--all-animals-are-deer", action="store_true",
                        help="--detections without species classifications: take every animal box as a deer")
    args = parser.parse_args(argv)
    from deer_pipeline.ops.progress import set_quiet

    set_quiet(args.quiet)

    summary = run_demo(args.images, args.detections, args.seed, args.out_dir, calibrate=not args.no_calibrate,
                       image_roots=args.image_root, all_animals_are_deer=args.all_animals_are_deer)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print()
        print(render_summary(summary))
    return 1 if summary["failed"] else 0
