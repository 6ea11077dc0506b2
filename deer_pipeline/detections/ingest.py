"""Ingestion: detections from the upstream detector into the store.

Three inputs are understood: a MegaDetector batch-output JSON, a CSV of pixel boxes, and a bare
folder of photos (one whole-frame detection per photo). Ingesting is idempotent: each input
file is recorded in ``ingest_batches`` by its SHA-256, a detection's id is the input's id or a
hash of (photo SHA-256 or path, rounded box, input format), and every insert is
``ON CONFLICT DO NOTHING``. Bad input never stops a batch and never changes stored rows: a bad
photo becomes an ``images`` row with its status and reason and its detections are stored as
``rejected``; a record that cannot become a detection at all goes to ``ingest_rejections``.

After inserting, the bursts (``encounter_id``) of the cameras touched are recomputed: frames
of one camera whose capture times are within ``burst_window_s`` of the previous frame share
an encounter ``<camera>-<first frame time, UTC ISO>``.

Plain logic, no Dagster; ``main(argv)`` is the ``deer-pipeline ingest`` command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.engine import Engine

from deer_pipeline.detections import images as imaging
from deer_pipeline.detections.encounters import recompute_encounters
from deer_pipeline.detections.formats import (
    CAMERA_ID_RE,
    FORMATS,
    MD_ANIMAL,
    IngestFileError,
    _json_safe,
    _Record,
    detect_format,
    list_folder_images,
    parse_csv,
    parse_folder,
    parse_megadetector,
    sanitise_folder_camera,
)
from deer_pipeline.settings import (
    IngestSettings,
    held_reason,
    normalise_classification,
    partition_day_range,
    sex_of,
)

log = logging.getLogger(__name__)


INGEST_LOCK_KEY = 0x0DEE_0003


CHUNK = 1000


_detections = sa.table(
    "detections",
    *(sa.column(c) for c in (
        "detection_id", "image_id", "camera_id", "captured_at", "day", "bbox_x", "bbox_y",
        "bbox_w", "bbox_h", "confidence", "classification", "sex", "status", "reason",
        "source_format", "batch_id")),
)


_images = sa.table(
    "images",
    *(sa.column(c) for c in (
        "path", "camera_id", "captured_at", "captured_at_source", "width", "height", "sha256",
        "status", "reason")),
)


_rejections = sa.table(
    "ingest_rejections", sa.column("batch_id"), sa.column("source_path"), sa.column("line"),
    sa.column("record", pg.JSONB), sa.column("reason"),
)


@dataclass
class IngestReport:
    source: str
    format: str
    batch_id: int | None = None
    records: int = 0                 # detection records read from the input
    new_detections: int = 0          # rows added to detections (ok or rejected)
    duplicates_skipped: int = 0      # already stored with the same content (or repeated)
    rejected: int = 0                # new rejected detections + new ingest_rejections rows
    rejected_detections: int = 0
    rejected_records: int = 0
    held: int = 0                    # new detections held: their day is not a partition (yet)
    already_ingested: bool = False   # the same file (same SHA-256) was ingested before
    cameras: list[str] = field(default_factory=list)
    partitions: list[tuple[str, str]] = field(default_factory=list)   # (camera, day) with new ok detections
    reasons: dict[str, int] = field(default_factory=dict)             # rejection reason -> count

    def summary(self) -> str:
        lines = [
            f"ingested {self.source} ({self.format}) as batch {self.batch_id}"
            + (" - already ingested before; nothing new" if self.already_ingested and not self.new_detections else ""),
            f"  records            {self.records}",
            f"  new detections     {self.new_detections} ({self.new_detections - self.rejected_detections} ok, "
            f"{self.rejected_detections} rejected)",
            f"  duplicates skipped {self.duplicates_skipped}",
            f"  rejected records   {self.rejected_records}",
            f"  held (day not a partition yet) {self.held}",
            f"  cameras touched    {', '.join(self.cameras) or '-'}",
            f"  partitions touched {len(self.partitions)}"
            + (": " + ", ".join(f"{c}|{d}" for c, d in self.partitions[:12]) if self.partitions else "")
            + (" ..." if len(self.partitions) > 12 else ""),
        ]
        if self.reasons:
            lines.append("  rejection reasons:")
            for reason, n in sorted(self.reasons.items(), key=lambda kv: -kv[1])[:15]:
                lines.append(f"    {n:5d}  {reason}")
        return "\n".join(lines)


@dataclass
class _Image:
    path: str
    camera_id: str
    image_id: int | None = None
    status: str = "ok"
    reason: str | None = None
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    captured_at: datetime | None = None
    captured_at_source: str | None = None
    stored: bool = False


def detection_id_for(source_format: str, image_key: str, box_key: str) -> str:
    """Stable id of a detection the input gave no id for."""
    return "d" + hashlib.sha256(f"{source_format}|{image_key}|{box_key}".encode()).hexdigest()[:31]


def _box_key(rec: _Record) -> str:
    if rec.whole_frame:
        return "frame"
    if rec.box is None:
        return "none"
    digits = 4 if rec.normalised else 1
    return ",".join("nan" if not math.isfinite(v) else f"{round(v, digits):.{digits}f}" for v in rec.box)


def _file_sha(path: Path) -> str:
    return imaging.sha256_file(path)


def _folder_fingerprint(folder: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest.update(f"{f.relative_to(folder)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _resolve(image_path: str, base: Path, roots: list[Path]) -> Path:
    """Where a photo named by the input is: absolute paths as they are, relative paths against
    the input's folder, then each image root (the first where it exists). Never expands '~'."""
    p = Path(image_path)
    if p.is_absolute():
        return Path(os.path.abspath(p))
    for folder in (base, *roots):
        if (folder / p).exists():
            return Path(os.path.abspath(folder / p))
    return Path(os.path.abspath(base / p))


def _inside(path: Path, roots: list[Path]) -> bool:
    """Whether ``path``, symlinks resolved, lies inside one of ``roots`` (already resolved)."""
    real = Path(os.path.realpath(path))
    return any(real == r or real.is_relative_to(r) for r in roots)


def image_roots_for(settings: IngestSettings, base: Path) -> list[Path]:
    """The folders photos may come from: the configured image roots, or else the folder of the
    detections file (the image folder itself for the folder format). Symlinks resolved."""
    roots = settings.image_roots or (str(base),)
    return [Path(os.path.realpath(os.path.expanduser(r))) for r in roots]


def outside_roots_reason(roots: list[Path]) -> str:
    return ("photo path is outside the image roots (" + ", ".join(map(str, roots)) + "); give "
            "--image-root to allow another folder")


def ingest(
    engine: Engine,
    path,
    format: str | None = None,
    camera: str | None = None,
    settings: IngestSettings | None = None,
    reprocess: bool = False,
    min_confidence: float | None = None,
    hold_outside_partitions: bool = True,
) -> IngestReport:
    """Ingest one input (MegaDetector JSON, CSV or image folder) and return what happened.

    A file whose SHA-256 was ingested before in the same format is not read again unless
    ``reprocess`` (which is still idempotent). ``camera`` is used for records without their
    own camera id; otherwise the photo's parent folder name is the camera.

    Photos must lie inside ``settings.image_roots`` (default: the folder of the detections file,
    or the image folder itself); others are refused unopened, with no photo or camera stored.
    Good detections whose capture day is not a day partition are stored ``held`` (unless
    ``hold_outside_partitions`` is False, for databases that are not behind Dagster, such as
    the evaluation's)."""
    settings = settings or IngestSettings()
    src, fmt = _check_input(path, format, camera)
    records, source_sha, base = _read_records(src, fmt)
    roots = image_roots_for(settings, base)
    day_range = partition_day_range() if hold_outside_partitions else None
    report = IngestReport(source=str(src), format=fmt, records=len(records))
    if _seen_before(engine, report, source_sha, fmt) and not reprocess:
        report.duplicates_skipped = len(records)
        return report
    rejections: list[tuple[_Record, str]] = []
    image_by_path, rec_paths = _photos_of(records, base, roots, camera, rejections)
    _load_or_read_photos(engine, image_by_path, rec_paths)    # outside any transaction
    candidates = [(rec, _detection_row(rec, image_by_path[key], fmt, min_confidence, day_range))
                  for rec, key in rec_paths if key is not None]
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": INGEST_LOCK_KEY})
        batch_id = _open_batch(conn, report, src, fmt, source_sha)
        _write_cameras_and_photos(conn, image_by_path, candidates)
        fresh = _first_of_each_id(candidates, image_by_path, report, rejections)
        to_insert = _not_yet_stored(conn, fresh, report, rejections)
        inserted, partitions = _insert_detections(conn, to_insert, batch_id, report)
        _record_rejections(conn, rejections, batch_id, src, report)
        touched = sorted({row["camera_id"] for row in to_insert if row["detection_id"] in inserted})
        if touched:
            recompute_encounters(conn, touched, settings.burst_window_s)
        _close_batch(conn, report, batch_id)
    report.cameras = touched
    report.partitions = sorted(partitions)
    log.info("ingest %s: %d records, %d new, %d duplicates, %d rejected", src, report.records,
             report.new_detections, report.duplicates_skipped, report.rejected)
    return report


def _check_input(path, format: str | None, camera: str | None) -> tuple[Path, str]:
    """The input's absolute path and format, or a clear error."""
    src = Path(path).expanduser()
    if not src.exists():
        raise IngestFileError(src, None, "no such file or folder")
    src = Path(os.path.abspath(src))
    fmt = format or detect_format(src)
    if fmt not in FORMATS:
        raise IngestFileError(src, None, f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if camera is not None and not CAMERA_ID_RE.match(camera):
        raise ValueError(f"--camera {camera!r} is not a valid camera id (letters, digits, _ . -; "
                         "must start with a letter or digit; at most 64 characters)")
    return src, fmt


def _read_records(src: Path, fmt: str) -> tuple[list[_Record], str, Path]:
    """(records, the input's fingerprint, the folder relative photo paths start from)."""
    if fmt == "folder":
        if not src.is_dir():
            raise IngestFileError(src, None, "format folder needs a directory")
        files = list_folder_images(src)
        return parse_folder(src, files), _folder_fingerprint(src, files), src
    if src.is_dir():
        raise IngestFileError(src, None, f"format {fmt} needs a file, got a directory")
    records = parse_megadetector(src) if fmt == "megadetector" else parse_csv(src)
    return records, _file_sha(src), src.parent


def _seen_before(engine: Engine, report: IngestReport, source_sha: str, fmt: str) -> bool:
    """Was this input ingested before? (then ``report`` names its batch)"""
    with engine.connect() as conn:
        prior = conn.execute(sa.text(
            "SELECT batch_id FROM ingest_batches WHERE source_sha256 = :s AND source_format = :f "
            "ORDER BY batch_id LIMIT 1"), {"s": source_sha, "f": fmt}).scalar()
    if prior is None:
        return False
    report.batch_id, report.already_ingested = prior, True
    return True


def _photos_of(records, base: Path, roots: list[Path], camera: str | None,
               rejections: list) -> tuple[dict[str, _Image], list[tuple[_Record, str | None]]]:
    """Each record's photo (resolved path and camera); records that cannot have one are rejected."""
    image_by_path: dict[str, _Image] = {}
    rec_paths: list[tuple[_Record, str | None]] = []
    for rec in records:
        if rec.reject_record:
            rejections.append((rec, rec.reject_record))
            rec_paths.append((rec, None))
            continue
        resolved = _resolve(rec.image_path, base, roots)
        if not _inside(resolved, roots):
            # refused before anything is opened or stored: no photo row, no camera
            rejections.append((rec, outside_roots_reason(roots)))
            rec_paths.append((rec, None))
            continue
        cam, cam_name = _camera_of(rec, resolved, camera)
        if cam is None:
            rejections.append((rec, cam_name))
            rec_paths.append((rec, None))
            continue
        rec.camera_id, rec.camera_name = cam, cam_name   # this record's camera, even when its photo has another
        key = str(resolved)
        if key not in image_by_path:
            image_by_path[key] = _Image(path=key, camera_id=cam)
        rec_paths.append((rec, key))
    return image_by_path, rec_paths


def _camera_of(rec: _Record, resolved: Path, camera: str | None) -> tuple[str | None, str | None]:
    """(camera id, original name when the id had to be made readable), or (None, why not).
    An explicit camera id is kept as given; a name with letters beyond ASCII ('Kamera Süd')
    gets a readable id ('Kamera-Sud'); without one, ``camera`` or the photo's folder name."""
    cam = rec.camera_id
    if cam is not None:
        if CAMERA_ID_RE.match(cam):
            return cam, None
        readable = sanitise_folder_camera(cam) if any(ord(ch) > 127 for ch in cam) and "|" not in cam else None
        if readable is None:
            return None, (f"camera id {cam!r} is not usable as a partition key "
                          "(letters, digits, _ . -; no '|'; at most 64 characters)")
        return readable, cam
    folder_name = resolved.parent.name
    if camera is not None:
        return camera, None
    cam = sanitise_folder_camera(folder_name)
    if cam is None:
        return None, f"no camera id: give --camera or a camera_id; folder name {folder_name!r} cannot be one"
    return cam, (folder_name if cam != folder_name else None)


def _load_or_read_photos(engine: Engine, image_by_path: dict[str, _Image], rec_paths) -> None:
    """Stored photos keep their stored rows; new ones are read (decode, EXIF time, hash)."""
    with engine.connect() as conn:
        stored = {r.path: r for r in conn.execute(sa.text(
            "SELECT image_id, path, camera_id, captured_at, captured_at_source, width, height, sha256, "
            "status, reason FROM images WHERE path = ANY(:p)"), {"p": list(image_by_path)})}
    first_time: dict[str, datetime | None] = {}
    for rec, key in rec_paths:
        if key is not None and key not in first_time:
            first_time[key] = rec.input_time
    for key, img in image_by_path.items():
        row = stored.get(key)
        if row is not None:
            img.image_id, img.camera_id, img.captured_at = row.image_id, row.camera_id or img.camera_id, row.captured_at
            img.captured_at_source, img.width, img.height = row.captured_at_source, row.width, row.height
            img.sha256, img.status, img.reason, img.stored = row.sha256, row.status, row.reason, True
            continue
        _read_image(img, first_time.get(key))


def _open_batch(conn: sa.Connection, report: IngestReport, src: Path, fmt: str, source_sha: str) -> int:
    if report.batch_id is None:
        report.batch_id = conn.execute(sa.text(
            "INSERT INTO ingest_batches (source_path, source_format, source_sha256) "
            "VALUES (:p, :f, :s) RETURNING batch_id"), {"p": str(src), "f": fmt, "s": source_sha}).scalar_one()
    return report.batch_id


def _write_cameras_and_photos(conn: sa.Connection, image_by_path: dict[str, _Image], candidates) -> None:
    names: dict[str, str | None] = {img.camera_id: None for img in image_by_path.values()}
    for rec, row in candidates:      # camera id -> original name (when it had to be made readable)
        names[row["camera_id"]] = names.get(row["camera_id"]) or rec.camera_name
    if names:
        conn.execute(pg.insert(sa.table("cameras", sa.column("camera_id"), sa.column("original_name")))
                     .values([{"camera_id": c, "original_name": n} for c, n in sorted(names.items())])
                     .on_conflict_do_nothing())
    new_imgs = [img for img in image_by_path.values() if not img.stored]
    for chunk in _chunks(new_imgs):
        conn.execute(pg.insert(_images).values([{
            "path": i.path, "camera_id": i.camera_id, "captured_at": i.captured_at,
            "captured_at_source": i.captured_at_source, "width": i.width, "height": i.height,
            "sha256": i.sha256, "status": i.status, "reason": i.reason} for i in chunk])
            .on_conflict_do_nothing(index_elements=["path"]))
    if new_imgs:
        ids = dict(conn.execute(sa.text("SELECT path, image_id FROM images WHERE path = ANY(:p)"),
                                {"p": [i.path for i in new_imgs]}).all())
        for i in new_imgs:
            i.image_id = ids[i.path]


def _first_of_each_id(candidates, image_by_path: dict[str, _Image], report: IngestReport,
                      rejections: list) -> list[dict]:
    """Duplicates within this input: the same content is skipped, other content rejected."""
    seen: dict[str, tuple[tuple, _Record]] = {}
    fresh: list[dict] = []
    for rec, row in candidates:
        img = image_by_path[_path_of(row)]
        row["image_id"] = img.image_id
        row["_image_key"] = img.sha256 if img.status == "ok" and img.sha256 else img.path
        sig = _signature(row)
        did = row["detection_id"]
        if did in seen:
            first_sig, first_rec = seen[did]
            if first_sig == sig:
                report.duplicates_skipped += 1
            else:
                rejections.append((rec, _own_reason(row) + f"duplicate detection id {did!r} with different "
                                        f"content (first at line {first_rec.line} of this input)"))
            continue
        seen[did] = (sig, rec)
        fresh.append(row)
    return fresh


def _not_yet_stored(conn: sa.Connection, fresh: list[dict], report: IngestReport, rejections: list) -> list[dict]:
    """Duplicates against what is stored: the stored row is always kept."""
    existing = {}
    for chunk in _chunks([r["detection_id"] for r in fresh]):
        for r in conn.execute(sa.text(
                "SELECT d.detection_id, d.bbox_x, d.bbox_y, d.bbox_w, d.bbox_h, d.classification, d.status, "
                "       d.batch_id, CASE WHEN i.status = 'ok' AND i.sha256 IS NOT NULL THEN i.sha256 "
                "                        ELSE i.path END AS _image_key "
                "FROM detections d JOIN images i ON i.image_id = d.image_id "
                "WHERE d.detection_id = ANY(:ids)"), {"ids": chunk}):
            existing[r.detection_id] = r
    to_insert = []
    for row in fresh:
        old = existing.get(row["detection_id"])
        if old is None:
            to_insert.append(row)
        elif _signature(old._mapping) == _signature(row):
            report.duplicates_skipped += 1
        else:
            rejections.append((row["_rec"], _own_reason(row) + f"duplicate detection id {row['detection_id']!r} "
                                            f"with different content (stored from batch {old.batch_id}; "
                                            "stored row kept)"))
    return to_insert


def _insert_detections(conn: sa.Connection, to_insert: list[dict], batch_id: int,
                       report: IngestReport) -> tuple[set[str], set[tuple[str, str]]]:
    """Insert (ON CONFLICT DO NOTHING); returns (inserted ids, camera x day partitions touched)."""
    inserted: set[str] = set()
    for chunk in _chunks(to_insert):
        res = conn.execute(
            pg.insert(_detections).values([{k: v for k, v in r.items() if not k.startswith("_")}
                                           | {"batch_id": batch_id} for r in chunk])
            .on_conflict_do_nothing(index_elements=["detection_id"])
            .returning(_detections.c.detection_id))
        inserted.update(x[0] for x in res)
    partitions = set()
    for row in to_insert:
        if row["detection_id"] not in inserted:
            report.duplicates_skipped += 1       # raced with another writer; theirs is kept
            continue
        report.new_detections += 1
        if row["status"] == "rejected":
            report.rejected_detections += 1
            report.reasons[_reason_kind(row["reason"])] = report.reasons.get(_reason_kind(row["reason"]), 0) + 1
        elif row["status"] == "held":
            report.held += 1
        elif row["day"] is not None:
            partitions.add((row["camera_id"], row["day"].isoformat()))
    return inserted, partitions


def _record_rejections(conn: sa.Connection, rejections: list, batch_id: int, src: Path,
                       report: IngestReport) -> None:
    """Records that could not become detections, once each (``ingest_rejections``)."""
    for rec, reason in rejections:
        res = conn.execute(sa.text(
            "INSERT INTO ingest_rejections (batch_id, source_path, line, record, reason) "
            "SELECT CAST(:b AS bigint), CAST(:p AS text), CAST(:l AS integer), CAST(:r AS jsonb), "
            "CAST(:why AS text) WHERE NOT EXISTS ("
            " SELECT 1 FROM ingest_rejections WHERE source_path = CAST(:p AS text)"
            " AND line IS NOT DISTINCT FROM CAST(:l AS integer)"
            " AND reason = CAST(:why AS text) AND record = CAST(:r AS jsonb))"),
            {"b": batch_id, "p": str(src), "l": rec.line, "r": json.dumps(_json_safe(rec.raw)), "why": reason})
        if res.rowcount:
            report.rejected_records += 1
            report.reasons[_reason_kind(reason)] = report.reasons.get(_reason_kind(reason), 0) + 1
        else:
            report.duplicates_skipped += 1
    report.rejected = report.rejected_detections + report.rejected_records


def _close_batch(conn: sa.Connection, report: IngestReport, batch_id: int) -> None:
    if not report.already_ingested:
        conn.execute(sa.text(
            "UPDATE ingest_batches SET n_records = :r, n_new = :n, n_rejected = :j WHERE batch_id = :b"),
            {"r": report.records, "n": report.new_detections, "j": report.rejected, "b": batch_id})


def _chunks(items: list, size: int = CHUNK) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _path_of(row: dict) -> str:
    return row["_path"]


def _own_reason(row: dict) -> str:
    """The record's own rejection reason, kept when it also collides on a detection id."""
    return f"{row['reason']}; also " if row.get("status") == "rejected" and row.get("reason") else ""


def _reason_kind(reason: str) -> str:
    """Group rejection reasons for the summary: drop the per-record details."""
    reason = re.sub(r"'[^']*'|\"[^\"]*\"", "'...'", reason)
    reason = re.sub(r":\s.*$", "", reason)
    return re.sub(r"\d+(\.\d+)?", "N", reason)[:80]


def _signature(row) -> tuple:
    """What makes two records with one detection id the same detection: the photo (by content,
    so moved photos match), the box, the class and the status."""
    def r(v):
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 1)

    return (row["_image_key"], r(row["bbox_x"]), r(row["bbox_y"]), r(row["bbox_w"]), r(row["bbox_h"]),
            row["classification"], row["status"])


def _read_image(img: _Image, input_time: datetime | None) -> None:
    p = Path(img.path)
    try:
        info, exif_time = imaging.read_image_facts(p)
    except imaging.ImageDecodeError as exc:
        img.status = "missing" if exc.kind == "missing" else "unreadable"
        img.reason = exc.reason
    else:
        img.width, img.height, img.sha256 = info
        if exif_time is not None:
            img.captured_at, img.captured_at_source = exif_time.time, exif_time.source
    if img.captured_at is None and input_time is not None:
        img.captured_at, img.captured_at_source = input_time, "input"
    if img.captured_at is None and img.status == "ok":
        img.captured_at, img.captured_at_source = imaging.file_mtime_utc(p), "file_mtime"


def _detection_row(rec: _Record, img: _Image, fmt: str, min_confidence: float | None,
                   day_range: tuple | None = None) -> dict:
    """The detections row for one record: box in pixels (clipped), class, status and reason.
    A good detection whose day is not a partition (``day_range``) is ``held`` with the reason."""
    reason = None
    box = rec.box
    if img.status != "ok":
        what = {"missing": "image missing", "outside_roots": "image outside the image roots"}.get(img.status, "image unreadable")
        reason = f"{what}: {img.reason}"
        if rec.normalised or rec.whole_frame:
            box = None          # no size to turn a normalised box into pixels
    elif rec.whole_frame:
        box = (0.0, 0.0, float(img.width), float(img.height))
    elif box is not None and rec.normalised:
        box = (box[0] * img.width, box[1] * img.height, box[2] * img.width, box[3] * img.height)

    if reason is None and rec.category is not None and rec.category != MD_ANIMAL:
        name = rec.category
        reason = f"category {name}, not an animal"
    if reason is None:
        if box is None:
            reason = "no box (bbox must be 4 numbers)"
        elif not all(math.isfinite(v) for v in box):
            reason = "box has a missing or non-numeric value"
        elif box[2] <= 0 or box[3] <= 0:
            reason = f"box has zero or negative size ({box[2]:g} x {box[3]:g})"
        else:
            x0, y0 = max(0.0, box[0]), max(0.0, box[1])
            x1, y1 = min(float(img.width), box[0] + box[2]), min(float(img.height), box[1] + box[3])
            if x1 <= x0 or y1 <= y0:
                reason = f"box lies outside the {img.width}x{img.height} image"
            else:
                box = (x0, y0, x1 - x0, y1 - y0)     # partly outside: clipped
    classification = normalise_classification(rec.classification)
    if classification is None:
        if reason is None:
            reason = f"unknown classification {rec.classification!r}"
    if reason is None and rec.confidence is not None and math.isfinite(rec.confidence) \
            and not 0.0 <= rec.confidence <= 1.0:
        reason = f"confidence {rec.confidence:g} outside [0, 1]"
    if reason is None and min_confidence is not None and rec.confidence is not None \
            and math.isfinite(rec.confidence) and rec.confidence < min_confidence:
        reason = f"confidence {rec.confidence:.3f} below {min_confidence:g}"

    image_key = img.sha256 if img.status == "ok" and img.sha256 else img.path
    did = rec.input_id or detection_id_for(fmt, image_key, _box_key(rec))
    safe_box = [None if v is None or not math.isfinite(v) else float(v) for v in (box or (None,) * 4)]
    conf = rec.confidence if rec.confidence is not None and math.isfinite(rec.confidence) else None
    captured = img.captured_at
    day = captured.astimezone(timezone.utc).date() if captured is not None else None
    status = "rejected" if reason else "ok"
    if status == "ok" and day is not None and day_range is not None:
        why = held_reason(day, *day_range)
        if why:
            status, reason = "held", why
    return {
        "detection_id": did, "camera_id": rec.camera_id or img.camera_id, "captured_at": captured,
        "day": day,
        "bbox_x": safe_box[0], "bbox_y": safe_box[1], "bbox_w": safe_box[2], "bbox_h": safe_box[3],
        "confidence": conf, "classification": classification,
        "sex": sex_of(classification) if classification else "unknown",
        "status": status, "reason": reason, "source_format": fmt,
        "_path": img.path, "_rec": rec,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="deer-pipeline ingest",
        description="Ingest detections: a MegaDetector batch-output JSON, a CSV (image_path,x,y,w,h "
                    "[,detection_id,camera_id,captured_at,classification,confidence]) or a folder of photos.")
    parser.add_argument("path", help="input file or folder")
    parser.add_argument("--format", choices=FORMATS, help="default: from the name (.json, .csv, folder)")
    parser.add_argument("--camera", help="camera id for records without one (default: the photo's folder name)")
    parser.add_argument("--image-root", action="extend", nargs="+", default=[], metavar="DIR",
                        help="where photos may come from and relative paths are found (repeatable); default: "
                             "the folder of the detections file. Photos outside every root (after resolving "
                             "symlinks) are refused and never opened")
    parser.add_argument("--burst-window-s", type=float, default=IngestSettings.burst_window_s,
                        help="frames of one camera this close (seconds) form one encounter (default 5)")
    parser.add_argument("--min-confidence", type=float, default=None,
                        help="reject detections below this detector confidence (default: keep all)")
    parser.add_argument("--reprocess", action="store_true",
                        help="go through a file that was ingested before (still adds nothing twice)")
    args = parser.parse_args(argv)

    from deer_pipeline import db
    from deer_pipeline.settings import SettingsError

    try:
        settings = IngestSettings(burst_window_s=args.burst_window_s, image_roots=tuple(args.image_root))
        # one transaction, idempotent: tried again as a whole when the database drops out
        report = db.retry_transient(
            lambda: ingest(db.get_engine(), args.path, format=args.format, camera=args.camera,
                           settings=settings, reprocess=args.reprocess, min_confidence=args.min_confidence),
            "ingest")
    except (IngestFileError, SettingsError, ValueError) as exc:
        print(f"deer-pipeline ingest: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0
