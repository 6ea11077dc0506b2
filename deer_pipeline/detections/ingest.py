"""Ingestion: detections from the upstream detector into the store.

Four inputs are understood: a MegaDetector batch-output JSON, a SpeciesNet predictions.json, a
CSV of pixel boxes, and a bare folder of photos (one whole-frame detection per photo). Boxes
under the minimum confidence (the file's ``typical_detection_threshold``, else 0.2), persons,
vehicles and other species are stored as ``rejected`` with the reason (see ``formats``). Ingesting is idempotent: each input
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
from datetime import timezone
from pathlib import Path
from typing import Iterable

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.engine import Engine

from deer_pipeline.detections import formats
from deer_pipeline.detections.encounters import recompute_encounters
from deer_pipeline.detections.formats import (
    CAMERA_ID_RE,
    FORMATS,
    IngestFileError,
    _json_safe,
    _Record,
    detect_format,
    list_folder_images,
    parse_csv,
    parse_folder,
    parse_megadetector,
)
from deer_pipeline.detections.photos import (
    _file_sha,
    _folder_fingerprint,
    _Image,
    _load_or_read_photos,
    _photos_of,
    image_roots_for,
)
from deer_pipeline.settings import (
    IngestSettings,
    held_reason,
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
        "source_format", "batch_id", "side")),
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
    min_confidence: float | None = None
    min_confidence_source: str = ""
    all_animals_are_deer: bool = False
    notes: list[str] = field(default_factory=list)                   # what the file said about itself

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
        if self.min_confidence is not None:
            lines.append(f"  minimum confidence {self.min_confidence:g} ({self.min_confidence_source})")
        if self.all_animals_are_deer:
            lines.append("  species            no classifier: every animal box taken as a deer "
                         "(--all-animals-are-deer)")
        for note in self.notes:
            lines.append(f"  note               {note}")
        if self.reasons:
            lines.append("  rejection reasons:")
            for reason, n in sorted(self.reasons.items(), key=lambda kv: -kv[1])[:15]:
                lines.append(f"    {n:5d}  {reason}")
        return "\n".join(lines)


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


def ingest(
    engine: Engine,
    path,
    format: str | None = None,
    camera: str | None = None,
    settings: IngestSettings | None = None,
    reprocess: bool = False,
    min_confidence: float | None = None,
    hold_outside_partitions: bool = True,
    all_animals_are_deer: bool = False,
    quiet: bool | None = True,
) -> IngestReport:
    """Ingest one input (MegaDetector JSON, CSV or image folder) and return what happened.

    A file whose SHA-256 was ingested before in the same format is not read again unless
    ``reprocess`` (which is still idempotent). ``camera`` is used for records without their
    own camera id; otherwise the photo's parent folder name is the camera.

    Photos must lie inside ``settings.image_roots`` (default: the folder of the detections file,
    or the image folder itself); others are refused unopened, with no photo or camera stored.
    Good detections whose capture day is not a day partition are stored ``held`` (unless
    ``hold_outside_partitions`` is False, for databases that are not behind Dagster, such as
    the evaluation's).

    ``min_confidence``: None = the file's typical_detection_threshold, else 0.2; 0 keeps every
    box. A detector file without a species classifier is refused unless ``all_animals_are_deer``."""
    settings = settings or IngestSettings()
    src, fmt = _check_input(path, format, camera)
    records, source_sha, base = _read_records(src, fmt)
    roots = image_roots_for(settings, base)
    day_range = partition_day_range() if hold_outside_partitions else None
    report = IngestReport(source=str(src), format=fmt, records=len(records))
    min_confidence = _species_and_confidence_rules(src, records, report, min_confidence, all_animals_are_deer)
    if _seen_before(engine, report, source_sha, fmt) and not reprocess:
        report.duplicates_skipped = len(records)
        return report
    rejections: list[tuple[_Record, str]] = []
    image_by_path, rec_paths = _photos_of(records, base, roots, camera, rejections)
    _load_or_read_photos(engine, image_by_path, rec_paths, quiet)    # outside any transaction
    candidates = [(rec, _detection_row(rec, image_by_path[key], fmt, min_confidence, day_range,
                                       all_animals_are_deer))
                  for rec, key in rec_paths if key is not None]
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": INGEST_LOCK_KEY})
        batch_id = _open_batch(conn, report, src, fmt, source_sha, _batch_info(records, report))
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
    parse = {"megadetector": parse_megadetector, "speciesnet": formats.parse_speciesnet}.get(fmt, parse_csv)
    return parse(src), _file_sha(src), src.parent


def _species_and_confidence_rules(src: Path, records, report: IngestReport, min_confidence: float | None,
                                  all_animals_are_deer: bool) -> float:
    """Refuse a detector file without a species classifier (unless every animal is a deer), and
    settle the minimum confidence: given, else the file's typical_detection_threshold, else 0.2."""
    unclassified = formats.needs_species_decision(records)
    if unclassified and not all_animals_are_deer:
        raise IngestFileError(src, None, formats.NO_CLASSIFIER_HELP)
    if min_confidence is None:
        min_confidence, source = formats.default_min_confidence(records)
    else:
        source = "--min-confidence" if min_confidence > 0 else "--min-confidence 0: every box kept"
    report.min_confidence, report.min_confidence_source = min_confidence, source
    report.all_animals_are_deer = bool(unclassified and all_animals_are_deer)
    report.notes = list(getattr(records, "notes", []))
    note = formats.side_note(records)
    if note:
        report.notes.append(note)
    return min_confidence


def _batch_info(records, report: IngestReport) -> str:
    """What is stored with the batch: the detector's own ``info`` block and the rules applied."""
    return json.dumps(_json_safe({
        "info": getattr(records, "info", None),
        "min_confidence": report.min_confidence, "min_confidence_source": report.min_confidence_source,
        "has_classifier": getattr(records, "has_classifier", None),
        "all_animals_are_deer": report.all_animals_are_deer, "notes": report.notes,
    }))


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


def _open_batch(conn: sa.Connection, report: IngestReport, src: Path, fmt: str, source_sha: str,
                info: str | None = None) -> int:
    if report.batch_id is None:
        report.batch_id = conn.execute(sa.text(
            "INSERT INTO ingest_batches (source_path, source_format, source_sha256, detector_info) "
            "VALUES (:p, :f, :s, CAST(:info AS jsonb)) RETURNING batch_id"),
            {"p": str(src), "f": fmt, "s": source_sha, "info": info}).scalar_one()
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
    """Group rejection reasons for the summary: drop the per-record details (the species of
    "not a deer: raccoon" is kept: it is the detail people look for)."""
    if reason.startswith("not a deer: "):
        return reason[:80]
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


def _detection_row(rec: _Record, img: _Image, fmt: str, min_confidence: float | None,
                   day_range: tuple | None = None, all_animals_are_deer: bool = False) -> dict:
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

    if reason is None and rec.confidence is not None and math.isfinite(rec.confidence) \
            and not 0.0 <= rec.confidence <= 1.0:
        reason = f"confidence {rec.confidence:g} outside [0, 1]"
    if reason is None:
        reason = formats.pre_box_reason(rec, min_confidence)     # confidence, person, vehicle
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
    classification, not_deer = formats.species_reason(rec, all_animals_are_deer)
    if reason is None:
        reason = not_deer                                          # "not a deer: raccoon"

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
        "status": status, "reason": reason, "source_format": fmt, "side": rec.side,
        "_path": img.path, "_rec": rec,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="deer-pipeline ingest",
        description="Ingest detections: a MegaDetector batch-output JSON, a SpeciesNet predictions.json, "
                    "a CSV (image_path,x,y,w,h [,detection_id,camera_id,captured_at,classification,"
                    "confidence,side]) or a folder of photos.")
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
                        help="reject boxes below this detector confidence (default: the file's "
                             "typical_detection_threshold, else 0.2; 0 keeps every box)")
    parser.add_argument("--all-animals-are-deer", action="store_true",
                        help="a detector file without species classifications: take every animal box as "
                             "a deer (without this such a file is refused)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--reprocess", action="store_true",
                        help="go through a file that was ingested before (still adds nothing twice)")
    args = parser.parse_args(argv)
    from deer_pipeline.ops.progress import set_quiet

    set_quiet(args.quiet)

    from deer_pipeline import db
    from deer_pipeline.settings import SettingsError

    try:
        settings = IngestSettings(burst_window_s=args.burst_window_s, image_roots=tuple(args.image_root))
        if args.min_confidence is not None and not 0 <= args.min_confidence <= 1:
            raise ValueError(f"--min-confidence must be in [0, 1], got {args.min_confidence}")
        # one transaction, idempotent: tried again as a whole when the database drops out
        report = db.retry_transient(
            lambda: ingest(db.get_engine(), args.path, format=args.format, camera=args.camera,
                           settings=settings, reprocess=args.reprocess, min_confidence=args.min_confidence,
                           all_animals_are_deer=args.all_animals_are_deer, quiet=None),
            "ingest")
    except (IngestFileError, SettingsError, ValueError) as exc:
        print(f"deer-pipeline ingest: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0
