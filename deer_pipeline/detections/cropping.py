"""Crops: cut every good detection of one camera-day out of its photo and keep it in a
content-addressed store (``<store>/<sha[:2]>/<sha>.jpg``), one ``crops`` row per detection.

Each photo is decoded once for all its detections, in JPEG draft mode at the largest reduction
that keeps every crop at least ``target_size`` pixels on its shorter side (or the box's own
size when that is smaller). Re-cropping a partition writes the same files and the same rows.

Plain logic, no Dagster.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import sqlalchemy as sa
from PIL import Image
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.engine import Engine

from deer_pipeline.detections import images as imaging
from deer_pipeline.settings import CropSettings

log = logging.getLogger(__name__)

JPEG_QUALITY = 95

_crops = sa.table("crops", *(sa.column(c) for c in (
    "detection_id", "crop_path", "crop_sha256", "x0", "y0", "x1", "y1", "width", "height",
    "decode_scale", "status", "reason")))


@dataclass
class CropReport:
    camera_id: str
    day: str
    detections: int = 0
    cropped: int = 0
    too_small: int = 0
    failed: int = 0
    photos: int = 0
    decode_scales: dict[str, int] = field(default_factory=dict)   # "1/4" -> photos decoded at that scale
    seconds: float = 0.0
    skipped: list[dict] = field(default_factory=list)             # detection_id, status, reason

    def summary(self) -> str:
        scales = ", ".join(f"{k}: {v}" for k, v in sorted(self.decode_scales.items())) or "-"
        return (f"{self.camera_id} {self.day}: {self.cropped} cropped, {self.too_small} too small, "
                f"{self.failed} failed from {self.photos} photos in {self.seconds:.2f}s (decode scales {scales})")


def scale_label(scale: float) -> str:
    return "1" if scale >= 1 else f"1/{round(1 / scale)}"


def crop_store_path(store_dir, sha: str) -> Path:
    return Path(store_dir) / sha[:2] / f"{sha}.jpg"


def encode_crop(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def store_crop(store_dir, data: bytes) -> tuple[str, str]:
    """Write JPEG bytes into the content-addressed store (atomically: temp file + rename).
    Returns (relative path, sha256); an existing identical file is left alone."""
    sha = hashlib.sha256(data).hexdigest()
    path = crop_store_path(store_dir, sha)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".jpg")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    return f"{sha[:2]}/{sha}.jpg", sha


def load_crop(store_dir, crop_path: str) -> Image.Image:
    """A stored crop as an RGB image (fully loaded, file closed)."""
    path = Path(store_dir) / crop_path
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


def _photo_rows(photo, dets, settings: CropSettings, target_size: int) -> tuple[list[dict], float | None]:
    """Crop rows for the detections of one photo (decodes the photo at most once)."""
    rows, wanted = [], []
    for d in dets:
        base = {"detection_id": d.detection_id, "crop_path": None, "crop_sha256": None, "x0": None, "y0": None,
                "x1": None, "y1": None, "width": None, "height": None, "decode_scale": None}
        try:
            box = imaging.crop_box((d.bbox_x, d.bbox_y, d.bbox_w, d.bbox_h), photo["width"], photo["height"],
                                   settings.pad_fraction)
        except (TypeError, ValueError) as exc:
            rows.append(base | {"status": "failed", "reason": f"bad box: {exc}"})
            continue
        x0, y0, x1, y1 = box
        base.update(x0=x0, y0=y0, x1=x1, y1=y1, width=x1 - x0, height=y1 - y0)
        if min(x1 - x0, y1 - y0) < settings.min_crop_px:
            rows.append(base | {"status": "too_small",
                                "reason": f"padded box {x1 - x0}x{y1 - y0} px is under min_crop_px="
                                          f"{settings.min_crop_px} on its shorter side"})
            continue
        wanted.append((base, box))
    if not wanted:
        return rows, None
    try:
        decoded = imaging.decode_regions(photo["path"], [b for _, b in wanted], min_side=target_size)
        if decoded.size != (photo["width"], photo["height"]):
            raise imaging.ImageDecodeError(
                photo["path"], f"photo changed since ingestion: now {decoded.size[0]}x{decoded.size[1]}, "
                               f"stored {photo['width']}x{photo['height']}")
    except (imaging.ImageDecodeError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, imaging.ImageDecodeError) else str(exc)
        rows += [base | {"status": "failed", "reason": f"cannot decode photo: {reason}"} for base, _ in wanted]
        return rows, None
    for (base, _), crop in zip(wanted, decoded.crops):
        rel, sha = store_crop(photo["store_dir"], encode_crop(crop))
        rows.append(base | {"crop_path": rel, "crop_sha256": sha, "width": crop.width, "height": crop.height,
                            "decode_scale": decoded.scale, "status": "ok", "reason": None})
    return rows, decoded.scale


def _with_progress(results, n_photos: int, camera_id: str, day, progress_log, quiet) -> list:
    """Collect the per-photo results, showing a bar (command line) and logging rate and ETA
    every few batches of photos (``progress_log``, e.g. the asset's logger)."""
    from deer_pipeline.ops.progress import ProgressBar, ProgressLog
    from deer_pipeline.settings import progress_log_every

    out = []
    plog = ProgressLog(progress_log, n_photos, f"crops {camera_id}|{day}: photos",
                       every=progress_log_every() * 10) if progress_log else None
    with ProgressBar(n_photos, desc=f"cropping {camera_id}|{day}", unit="photo", quiet=quiet) as bar:
        for r in results:
            out.append(r)
            bar.update(1)
            if plog:
                plog.batch_done(1)
    return out


def crop_partition(engine: Engine, camera_id: str, day, settings: CropSettings | None = None,
                   target_size: int = 224, workers: int | None = None, progress_log=None,
                   quiet: bool | None = True) -> CropReport:
    """Crop every ``status='ok'`` detection of one camera-day; upsert one ``crops`` row each.

    ``crops.width/height`` are the stored crop's pixel size (after any draft reduction);
    ``x0..y1`` the padded, clipped box in full-size pixels. A photo that cannot be decoded gives
    'failed' rows with the reason; the rest of the partition goes on."""
    settings = settings or CropSettings()
    day = date.fromisoformat(day) if isinstance(day, str) else day
    started = time.perf_counter()
    report = CropReport(camera_id=camera_id, day=day.isoformat())
    with engine.connect() as conn:
        dets = conn.execute(sa.text(
            "SELECT d.detection_id, d.image_id, d.bbox_x, d.bbox_y, d.bbox_w, d.bbox_h, "
            "       i.path, i.width, i.height "
            "FROM detections d JOIN images i ON i.image_id = d.image_id "
            "WHERE d.camera_id = :c AND d.day = :d AND d.status = 'ok' "
            "ORDER BY i.path, d.detection_id"), {"c": camera_id, "d": day}).all()
    report.detections = len(dets)
    by_photo: dict[int, list] = defaultdict(list)
    photos: dict[int, dict] = {}
    for d in dets:
        by_photo[d.image_id].append(d)
        photos[d.image_id] = {"path": d.path, "width": d.width, "height": d.height, "store_dir": settings.store_dir}
    report.photos = len(photos)
    Path(settings.store_dir).mkdir(parents=True, exist_ok=True)

    workers = workers or min(4, os.cpu_count() or 1)
    jobs = list(by_photo.items())
    rows: list[dict] = []
    scales: Counter = Counter()
    run = lambda item: _photo_rows(photos[item[0]], item[1], settings, target_size)  # noqa: E731
    if workers > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:   # Pillow decodes without the GIL
            results = _with_progress(pool.map(run, jobs), len(jobs), camera_id, day, progress_log, quiet)
    else:
        results = _with_progress(map(run, jobs), len(jobs), camera_id, day, progress_log, quiet)
    for photo_rows, scale in results:
        rows += photo_rows
        if scale is not None:
            scales[scale_label(scale)] += 1

    with engine.begin() as conn:
        for i in range(0, len(rows), 500):
            chunk = rows[i:i + 500]
            stmt = pg.insert(_crops).values(chunk)
            stmt = stmt.on_conflict_do_update(
                index_elements=["detection_id"],
                set_={c: stmt.excluded[c] for c in ("crop_path", "crop_sha256", "x0", "y0", "x1", "y1", "width",
                                                     "height", "decode_scale", "status", "reason")})
            conn.execute(stmt)
    for r in rows:
        if r["status"] == "ok":
            report.cropped += 1
        else:
            report.too_small += r["status"] == "too_small"
            report.failed += r["status"] == "failed"
            report.skipped.append({"detection_id": r["detection_id"], "status": r["status"], "reason": r["reason"]})
    report.decode_scales = dict(scales)
    report.seconds = time.perf_counter() - started
    log.info("crops %s", report.summary())
    return report
