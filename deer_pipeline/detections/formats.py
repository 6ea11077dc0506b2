"""The detector formats ingestion reads: MegaDetector batch-output JSON, a CSV of pixel boxes, and a bare folder of photos (one whole-frame detection per photo). Each parser turns a file into records; nothing here touches the database."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from deer_pipeline.detections import images as imaging

FORMATS = ("megadetector", "csv", "folder")


CAMERA_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


CSV_REQUIRED = ("image_path", "x", "y", "w", "h")


CSV_OPTIONAL = ("detection_id", "camera_id", "captured_at", "classification", "confidence")


MD_ANIMAL = "animal"


class IngestFileError(ValueError):
    """The input file as a whole is malformed; the message names the file and line."""

    def __init__(self, path, line: int | None, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        where = f"{path}, line {line}" if line is not None else str(path)
        super().__init__(f"{where}: {reason}")


@dataclass
class _Record:
    """One detection as read from the input, before any photo is opened."""

    line: int | None
    raw: dict
    image_path: str | None
    box: tuple[float, float, float, float] | None = None
    normalised: bool = False
    whole_frame: bool = False
    input_id: str | None = None
    camera_id: str | None = None
    camera_name: str | None = None        # the original name when camera_id had to be made readable
    input_time: datetime | None = None
    classification: str | None = None     # raw class name (None = not given)
    confidence: float | None = None
    category: str | None = None           # MegaDetector category name
    reject_record: str | None = None      # cannot become a detection at all


def parse_time(value) -> datetime | None:
    """ISO 8601 or EXIF-style time; tz-naive values are UTC. None when absent or unparseable."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, datetime):
        dt = value
    else:
        text = str(value).strip()
        if not text:
            return None
        text = re.sub(r"^(\d{4}):(\d{2}):(\d{2})", r"\1-\2-\3", text)
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)


def _float(value) -> float:
    if value is None:
        return math.nan
    try:
        return float(str(value).strip()) if not isinstance(value, (int, float)) else float(value)
    except ValueError:
        return math.nan


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


# Letters without a Unicode decomposition to ASCII, spelled the way people write them without accents.
_NO_DECOMPOSITION = str.maketrans({"ı": "i", "ß": "ss", "ø": "o", "Ø": "O", "æ": "ae", "Æ": "AE", "œ": "oe",
                                   "Œ": "OE", "ł": "l", "Ł": "L", "đ": "d", "Đ": "D", "þ": "th", "Þ": "Th"})


def sanitise_folder_camera(name: str) -> str | None:
    """A readable camera id from a folder or camera name: 'Camera 01' -> 'Camera-01',
    'Kamera Süd' -> 'Kamera-Sud' (accents dropped, not the letters). A name with letters or
    digits none of which has an ASCII form ('カメラ') becomes 'cam-<8 hex of the name>'. None when
    the name has no letter or digit at all. The original name is kept in ``cameras.original_name``."""
    name = unicodedata.normalize("NFKC", str(name))
    ascii_ = unicodedata.normalize("NFKD", name.translate(_NO_DECOMPOSITION)).encode("ascii", "ignore").decode("ascii")
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", ascii_).strip("-_.")[:64]
    if cleaned and CAMERA_ID_RE.match(cleaned):
        return cleaned
    if any(ch.isalnum() for ch in name):
        return "cam-" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
    return None


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "megadetector"
    if suffix in (".csv", ".tsv", ".txt"):
        return "csv"
    raise IngestFileError(path, None, "cannot tell the format from the name; pass --format megadetector|csv|folder")


def parse_megadetector(path: Path) -> list[_Record]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise IngestFileError(path, None, f"not UTF-8 text: {exc}") from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise IngestFileError(path, exc.lineno, f"invalid JSON at column {exc.colno}: {exc.msg}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise IngestFileError(path, 1, "not a MegaDetector batch output: no top-level \"images\" list")
    det_cats = doc.get("detection_categories") or {"1": "animal", "2": "person", "3": "vehicle"}
    cls_cats = doc.get("classification_categories") or {}
    records: list[_Record] = []
    for i, entry in enumerate(doc["images"], start=1):
        if not isinstance(entry, dict) or not entry.get("file"):
            records.append(_Record(i, {"images_index": i - 1, "entry": entry}, None,
                                   reject_record="image entry has no \"file\""))
            continue
        file_ = str(entry["file"])
        input_time = parse_time(entry.get("datetime"))
        camera = entry.get("camera_id") or entry.get("location")
        if entry.get("failure") or entry.get("detections") is None:
            records.append(_Record(i, {"file": file_, "failure": entry.get("failure")}, file_,
                                   reject_record=f"detector failed on this image: {entry.get('failure') or 'no detections list'}"))
            continue
        for j, det in enumerate(entry["detections"]):
            raw = {"file": file_, "detection_index": j, "detection": det}
            if not isinstance(det, dict):
                records.append(_Record(i, raw, file_, reject_record="detection is not an object"))
                continue
            bbox = det.get("bbox")
            box = tuple(_float(v) for v in bbox) if isinstance(bbox, (list, tuple)) and len(bbox) == 4 else None
            cat_id = str(det.get("category"))
            category = det_cats.get(cat_id, f"unknown category {cat_id!r}")
            classification = det.get("classification")
            if classification is None and det.get("classifications"):
                try:
                    top = max(det["classifications"], key=lambda c: float(c[1]))
                    classification = cls_cats.get(str(top[0]), str(top[0]))
                except (TypeError, ValueError, IndexError):
                    classification = "<malformed classifications>"
            records.append(_Record(
                line=i, raw=raw, image_path=file_, box=box, normalised=True,
                input_id=str(det["id"]) if det.get("id") not in (None, "") else None,
                camera_id=str(camera) if camera else None, input_time=input_time,
                classification=classification, confidence=_float(det.get("conf")),
                category=category,
            ))
    return records


def parse_csv(path: Path) -> list[_Record]:
    try:
        fh = open(path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise IngestFileError(path, None, f"cannot read: {exc}") from exc
    with fh:
        sample = fh.read(4096)
        fh.seek(0)
        delimiter = "\t" if sample.count("\t") > sample.count(",") else ","
        reader = csv.reader(fh, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise IngestFileError(path, 1, "empty file: expected a header with " + ", ".join(CSV_REQUIRED))
        except csv.Error as exc:
            raise IngestFileError(path, 1, f"malformed CSV: {exc}") from exc
        cols = [h.strip().lower() for h in header]
        missing = [c for c in CSV_REQUIRED if c not in cols]
        if missing:
            raise IngestFileError(path, 1, f"missing required column(s) {', '.join(missing)}; "
                                           f"have {', '.join(cols)}")
        records = []
        try:
            for row in reader:
                line = reader.line_num
                if not any(v.strip() for v in row):
                    continue
                if len(row) != len(cols):
                    raise IngestFileError(path, line, f"{len(row)} fields where the header has {len(cols)}")
                r = dict(zip(cols, (v.strip() for v in row)))
                rec = _Record(
                    line=line, raw=r, image_path=r["image_path"] or None,
                    box=tuple(_float(r[k]) for k in ("x", "y", "w", "h")),
                    input_id=r.get("detection_id") or None, camera_id=r.get("camera_id") or None,
                    input_time=parse_time(r.get("captured_at")),
                    classification=r.get("classification") or None,
                    confidence=_float(r["confidence"]) if r.get("confidence") else None,
                )
                if rec.image_path is None:
                    rec.reject_record = "no image_path"
                records.append(rec)
        except csv.Error as exc:
            raise IngestFileError(path, reader.line_num, f"malformed CSV: {exc}") from exc
    return records


def list_folder_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and imaging.is_image_file(p))


def parse_folder(folder: Path, files: list[Path]) -> list[_Record]:
    return [_Record(line=None, raw={"file": str(f.relative_to(folder))}, image_path=str(f), whole_frame=True)
            for f in files]
