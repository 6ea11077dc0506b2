"""The deterministic trail-camera sample: synthetic photos of known individual deer.

``write_sample(out_dir)`` draws a small, reproducible set of 640x480 JPEG frames as a set of
fixed trail cameras would take them: several cameras (each with its own background), several
days in early October 2025, bursts of 3-5 frames a few seconds apart, some frames with two
deer, some infrared night frames (grayscale). Each deer has an appearance that stays the same
across sightings - coat colour, a pattern of white and dark patches, a collar or ear tag on
some, antlers of its own shape on bucks, body size - while pose, distance, position, facing
direction and lighting change from sighting to sighting, and the deer walks a little between
frames of a burst.

Written next to the photos: ``detections.json`` (MegaDetector batch-output format, with
per-detection classifications) and ``truth.csv`` (which individual each box shows).
``load_truth`` stores that truth in ``true_identities`` after the sample is ingested.

Plain logic, no Dagster; ``main(argv)`` is the ``deer-pipeline sample`` command.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from deer_pipeline.detections import images as imaging
from deer_pipeline.detections.ingest import detection_id_for
from deer_pipeline.sample_drawing import (
    FRAME_H,
    FRAME_W,
    _Placement,
    camera_background,
    compose_frame,
    make_deer,
)

CAMERA_NAMES = ("cam-north", "cam-creek", "cam-ridge", "cam-field", "cam-oak", "cam-bottom",
                "cam-pine", "cam-saddle")

CLASS_IDS = {"doe": "0", "fawn": "1", "young_buck": "2", "mid_buck": "3", "mature_buck": "4",
             "deer": "5"}     # 'deer': the classifier saw a deer but no age/sex class (-> unknown)
FIRST_DAY = date(2025, 10, 1)
LAST_DAY = date(2025, 10, 10)


@dataclass
class SampleInfo:
    out_dir: Path
    detections_json: Path
    truth_csv: Path
    n_images: int
    n_detections: int
    cameras: list[str]
    days: list[str]
    identities: list[str]
    night_frames: int = 0
    two_deer_frames: int = 0
    files: list[str] = field(default_factory=list)


def _exif(captured: datetime, camera: str) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "DeerCam"
    exif[0x0110] = f"TC-640 {camera}"
    exif[0x0132] = captured.strftime("%Y:%m:%d %H:%M:%S")
    ifd = exif.get_ifd(imaging.EXIF_IFD)
    ifd[imaging.TAG_DATETIME_ORIGINAL] = captured.strftime("%Y:%m:%d %H:%M:%S")
    return exif.tobytes()


def sample_days(n_days: int) -> list[date]:
    span = (LAST_DAY - FIRST_DAY).days + 1
    if not 1 <= n_days <= span:
        raise ValueError(f"n_days must be in 1..{span}")
    step = span // n_days
    return [FIRST_DAY + timedelta(days=i * step) for i in range(n_days)]


def write_sample(out_dir, seed: int = 7, n_cameras: int = 3, n_days: int = 3, n_deer: int = 12,
                 encounters_per_day: tuple[int, int] = (4, 6), two_deer_rate: float = 0.15,
                 night_rate: float = 0.06, quality: int = 90) -> SampleInfo:
    """Write the sample photos, ``detections.json`` and ``truth.csv`` into ``out_dir``.

    Same arguments, same bytes. Defaults give ~200 detections over 3 cameras x 3 days."""
    if not 1 <= n_cameras <= len(CAMERA_NAMES):
        raise ValueError(f"n_cameras must be in 1..{len(CAMERA_NAMES)}")
    if n_deer < 2:
        raise ValueError("n_deer must be at least 2")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    herd = make_deer(n_deer, rng)
    cameras = list(CAMERA_NAMES[:n_cameras])
    days = sample_days(n_days)
    backgrounds = [camera_background(i, seed) for i in range(n_cameras)]
    homes = _home_ranges(herd, cameras, rng)
    acc = _Written()
    seen_count = {d.identity: 0 for d in herd}
    for ci, cam in enumerate(cameras):
        (out / cam).mkdir(exist_ok=True)
        bg, horizon = backgrounds[ci]
        locals_ = [d for d in herd if cam in homes[d.identity]] or herd
        for day in days:
            n_enc = int(rng.integers(encounters_per_day[0], encounters_per_day[1] + 1))
            starts = sorted(rng.choice(np.arange(5 * 60, 23 * 60, 20), size=n_enc, replace=False))
            for minute in starts:
                group = _encounter_group(locals_, seen_count, two_deer_rate, rng)
                hour = minute // 60
                night = bool(hour < 7 or hour >= 19) and rng.random() < min(1.0, night_rate * 3)
                light = float(rng.uniform(0.8, 1.15))
                start = datetime.combine(day, time(hour, minute % 60, int(rng.integers(0, 60))))
                placements = _placements(group, horizon, rng)
                _write_burst(out, cam, start, placements, bg, night, light, quality, rng, acc)
    det_path = _write_detector_file(out, acc.md_images, seed)
    truth_path = _write_truth(out, acc.truth_rows)
    return SampleInfo(out, det_path, truth_path, len(acc.files), acc.n_det, cameras, [d.isoformat() for d in days],
                      sorted({r["identity"] for r in acc.truth_rows}), acc.night_frames, acc.two_frames, acc.files)


@dataclass
class _Written:
    """What write_sample has written so far."""

    md_images: list = field(default_factory=list)
    truth_rows: list = field(default_factory=list)
    files: list = field(default_factory=list)
    n_det: int = 0
    night_frames: int = 0
    two_frames: int = 0


def _home_ranges(herd, cameras: list[str], rng) -> dict[str, list[str]]:
    """Each deer is seen at its home camera and sometimes at one more."""
    homes = {}
    for i, deer in enumerate(herd):
        home = {cameras[i % len(cameras)]}
        if len(cameras) > 1 and rng.random() < 0.5:
            home.add(cameras[int(rng.integers(0, len(cameras)))])
        homes[deer.identity] = sorted(home)
    return homes


def _encounter_group(locals_, seen_count: dict, two_deer_rate: float, rng) -> list:
    """One deer (preferring those seen least so far, so everyone is seen more than once),
    sometimes with a second one in the same frames."""
    weights = np.array([1.0 / (1 + seen_count[d.identity]) ** 3 for d in locals_])
    first = locals_[int(rng.choice(len(locals_), p=weights / weights.sum()))]
    group = [first]
    if rng.random() < two_deer_rate and len(locals_) > 1:
        others = [d for d in locals_ if d is not first]
        group.append(others[int(rng.integers(0, len(others)))])
    for d in group:
        seen_count[d.identity] += 1
    return group


def _placements(group, horizon: float, rng) -> list:
    placements = []
    for k, d in enumerate(group):
        scale = float(rng.uniform(0.62, 0.9)) * d.size
        ground = float(rng.uniform(horizon + 150, FRAME_H - 8))
        if len(group) == 2:
            x = FRAME_W * (0.3 if k == 0 else 0.72) + float(rng.uniform(-30, 30))
        else:
            x = float(rng.uniform(180, FRAME_W - 180))
        placements.append(_Placement(d, x, ground, scale, bool(rng.random() < 0.5),
                                     bool(rng.random() < 0.1), bool(rng.random() < 0.1),
                                     float(rng.uniform(0, 2 * math.pi))))
    return placements


def _write_burst(out: Path, cam: str, start: datetime, placements, bg, night: bool, light: float,
                 quality: int, rng, acc: _Written) -> None:
    """3-5 frames of the deer walking, each a photo with EXIF time and its detections."""
    n_frames = int(rng.integers(3, 6))
    t = start
    for f in range(n_frames):
        if f:
            t = t + timedelta(seconds=int(rng.integers(1, 4)))
            for p in placements:
                p.x += (1 if p.facing_right else -1) * float(rng.uniform(4, 16)) * p.scale
                p.x = min(max(p.x, 90), FRAME_W - 90)
                p.leg_phase += float(rng.uniform(0.6, 1.4))
                if rng.random() < 0.05:
                    p.head_down = not p.head_down
        frame, boxes = compose_frame(bg, placements, rng, night, light * float(rng.uniform(0.97, 1.03)))
        name = f"{cam}/{cam}_{t:%Y%m%d_%H%M%S}_{f + 1}.jpg"
        path = out / name
        frame.save(path, quality=quality, exif=_exif(t, cam))
        ts = t.replace(tzinfo=timezone.utc).timestamp()
        os.utime(path, (ts, ts))
        acc.files.append(name)
        acc.night_frames += int(night)
        acc.two_frames += int(len(placements) > 1)
        sha = imaging.sha256_file(path)
        dets = []
        for bi, (p, box) in enumerate(zip(placements, boxes)):
            nb = [round(box[0] / FRAME_W, 4), round(box[1] / FRAME_H, 4),
                  round(box[2] / FRAME_W, 4), round(box[3] / FRAME_H, 4)]
            det = {"category": "1", "conf": round(float(rng.uniform(0.72, 0.99)), 3), "bbox": nb}
            if rng.random() > 0.1:   # ~10% are only 'deer' to the classifier (-> unknown)
                det["classifications"] = [[CLASS_IDS[p.deer.classification],
                                           round(float(rng.uniform(0.6, 0.97)), 3)]]
            else:                    # no random draw here: the sample stays as it was
                det["classifications"] = [[CLASS_IDS["deer"], 0.5]]
            dets.append(det)
            did = detection_id_for("megadetector", sha, ",".join(f"{v:.4f}" for v in nb))
            acc.truth_rows.append({"detection_id": did, "file": name, "box_index": bi,
                                   "identity": p.deer.identity, "classification": p.deer.classification,
                                   "facing": "right" if p.facing_right else "left",
                                   "night": int(night), "x": nb[0], "y": nb[1], "w": nb[2], "h": nb[3]})
            acc.n_det += 1
        acc.md_images.append({"file": name, "max_detection_conf": max(x["conf"] for x in dets),
                              "detections": dets})


def _write_detector_file(out: Path, md_images: list, seed: int) -> Path:
    """``detections.json`` in MegaDetector batch-output format."""
    doc = {
        "info": {"detector": "synthetic sample (deer_pipeline.sample)", "format_version": "1.4",
                 "seed": seed},
        "detection_categories": {"1": "animal", "2": "person", "3": "vehicle"},
        "classification_categories": {v: k for k, v in CLASS_IDS.items()},
        "images": md_images,
    }
    det_path = out / "detections.json"
    det_path.write_text(json.dumps(doc, indent=1))
    return det_path


def _write_truth(out: Path, truth_rows: list) -> Path:
    truth_path = out / "truth.csv"
    with open(truth_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["detection_id", "file", "box_index", "identity", "classification",
                                           "facing", "night", "x", "y", "w", "h"])
        w.writeheader()
        w.writerows(truth_rows)
    return truth_path


def read_truth(sample_dir) -> list[dict]:
    with open(Path(sample_dir) / "truth.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def load_truth(engine, sample_dir, source: str = "sample") -> int:
    """Write ``true_identities`` for the ingested sample detections; returns rows written.

    Detections are found by id (as MegaDetector ingestion names them) or, failing that, by
    photo path and the best-overlapping box (any ingestion format)."""
    import sqlalchemy as sa

    sample_dir = Path(sample_dir).resolve()
    rows = read_truth(sample_dir)
    written = 0
    with engine.begin() as conn:
        known = {r[0] for r in conn.execute(sa.text("SELECT detection_id FROM detections WHERE detection_id = ANY(:i)"),
                                            {"i": [r["detection_id"] for r in rows]})}
        by_path: dict[str, list] = {}
        missing = [r for r in rows if r["detection_id"] not in known]
        if missing:
            paths = sorted({str(sample_dir / r["file"]) for r in missing})
            for d in conn.execute(sa.text(
                    "SELECT d.detection_id, i.path, i.width, i.height, d.bbox_x, d.bbox_y, d.bbox_w, d.bbox_h "
                    "FROM detections d JOIN images i ON i.image_id = d.image_id WHERE i.path = ANY(:p)"), {"p": paths}):
                by_path.setdefault(d.path, []).append(d)
        pairs = []
        for r in rows:
            if r["detection_id"] in known:
                pairs.append((r["detection_id"], r["identity"]))
                continue
            best, best_iou = None, 0.3
            for d in by_path.get(str(sample_dir / r["file"]), []):
                if d.bbox_w is None or not d.width:
                    continue
                iou = _iou((float(r["x"]) * d.width, float(r["y"]) * d.height, float(r["w"]) * d.width,
                            float(r["h"]) * d.height), (d.bbox_x, d.bbox_y, d.bbox_w, d.bbox_h))
                if iou > best_iou:
                    best, best_iou = d.detection_id, iou
            if best is not None:
                pairs.append((best, r["identity"]))
        for did, identity in pairs:
            res = conn.execute(sa.text(
                "INSERT INTO true_identities (detection_id, identity, source) VALUES (:d, :i, :s) "
                "ON CONFLICT (detection_id) DO UPDATE SET identity = EXCLUDED.identity, source = EXCLUDED.source "
                "WHERE true_identities.identity IS DISTINCT FROM EXCLUDED.identity "
                "OR true_identities.source IS DISTINCT FROM EXCLUDED.source"),
                {"d": did, "i": identity, "s": source})
            written += res.rowcount
    return written


def _iou(a, b) -> float:
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax1, bx1) - max(a[0], b[0]))
    ih = max(0.0, min(ay1, by1) - max(a[1], b[1]))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="deer-pipeline sample",
                                     description="write the deterministic trail-camera sample")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--cameras", type=int, default=3)
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--deer", type=int, default=12)
    args = parser.parse_args(argv)
    info = write_sample(args.out_dir, seed=args.seed, n_cameras=args.cameras, n_days=args.days, n_deer=args.deer)
    print(f"wrote {info.n_images} photos with {info.n_detections} detections of {len(info.identities)} deer "
          f"({info.two_deer_frames} two-deer frames, {info.night_frames} night frames) "
          f"from {len(info.cameras)} cameras over {len(info.days)} days to {info.out_dir}\n"
          f"  detections: {info.detections_json}\n  truth:      {info.truth_csv}\n"
          f"ingest with: deer-pipeline ingest {info.detections_json}")
    return 0
