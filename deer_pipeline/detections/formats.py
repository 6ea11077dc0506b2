"""The detector formats ingestion reads: MegaDetector batch-output JSON (1.x), SpeciesNet
``predictions.json``, a CSV of pixel boxes, and a bare folder of photos (one whole-frame
detection per photo). Each parser turns a file into records; nothing here touches the database.

What may become a deer sighting is decided here too (``pre_box_reason`` and
``species_reason``): boxes under the minimum confidence, persons, vehicles, unknown detector
categories and every species the classifier calls something other than a deer are rejected
with a reason (the species map is ``settings.species_decision``)."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from deer_pipeline.detections import images as imaging
from deer_pipeline.settings import DEFAULT_MIN_CONFIDENCE, normalise_classification, species_decision

FORMATS = ("megadetector", "speciesnet", "csv", "folder")


CAMERA_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


CSV_REQUIRED = ("image_path", "x", "y", "w", "h")


CSV_OPTIONAL = ("detection_id", "camera_id", "captured_at", "classification", "confidence", "side")


SIDE_FIELDS = ("side", "flank", "viewpoint", "orientation")   # CSV columns / detection keys naming the flank seen


MD_ANIMAL = "animal"


MD_DEFAULT_CATEGORIES = {"1": "animal", "2": "person", "3": "vehicle"}


VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".wmv", ".mts", ".3gp", ".webm")


NO_CLASSIFIER_HELP = ("this file has no species classifications, so every animal box would become a deer "
                      "sighting (raccoons, turkeys, ...). Run a species classifier (e.g. SpeciesNet) first, "
                      "or pass --all-animals-are-deer if every animal in these photos is a deer")


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
    classified: bool = False              # ``classification`` comes from a species classifier
    side: str | None = None               # flank seen: left | right | None (unknown)
    side_raw: str | None = None           # the input's side value when it could not be read (stored as unknown)


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


_SIDE_UNKNOWN = {"", "unknown", "u", "?", "none", "na", "n/a", "null", "both", "front", "back", "rear", "up",
                 "down", "top", "bottom", "frontal", "head"}


def parse_side(value) -> tuple[str | None, bool]:
    """``(side, understood)``: the flank of a side / flank / viewpoint value. ``left`` / ``l`` /
    viewpoints on the left (Wildbook's ``frontleft``, ``backleft``) -> ``left``, likewise right;
    ``unknown``, empty, ``front``, ``back``, ... -> None (unknown: matched with both flanks);
    anything else -> ``(None, False)`` (stored as unknown, counted in a note)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, True
    t = re.sub(r"[\s_-]+", "", str(value).strip().lower())
    if t in _SIDE_UNKNOWN:
        return None, True
    if t in ("l", "left", "leftside", "leftflank") or (t.endswith("left") and "right" not in t):
        return "left", True
    if t in ("r", "right", "rightside", "rightflank") or (t.endswith("right") and "left" not in t):
        return "right", True
    return None, False


def _with_side(rec: "_Record", value) -> "_Record":
    side, understood = parse_side(value)
    rec.side = side
    if not understood:
        rec.side_raw = _readable(str(value))[:40]
    return rec


def _side_value(fields: dict):
    """The first side / flank / viewpoint value a record has (None when it has none)."""
    for k in SIDE_FIELDS:
        v = fields.get(k)
        if v not in (None, ""):
            return v
    return None


def side_note(records) -> str | None:
    """A note for the summary when some side values could not be read."""
    bad = Counter(r.side_raw for r in records if getattr(r, "side_raw", None))
    if not bad:
        return None
    shown = ", ".join(f"{v!r}" for v, _ in bad.most_common(5))
    return (f"{sum(bad.values())} box(es) with a side value that is not left or right ({shown}"
            f"{', ...' if len(bad) > 5 else ''}): stored as unknown (matched with both flanks)")


def _float(value) -> float:
    if value is None:
        return math.nan
    try:
        return float(str(value).strip()) if not isinstance(value, (int, float)) else float(value)
    except ValueError:
        return math.nan


class ParsedFile(list):
    """The records of one input file, with what the file says about itself: the detector's
    ``info`` block, its ``typical_detection_threshold``, whether a species classifier ran, and
    notes for the summary (missing info, unknown format version, ...)."""

    def __init__(self, records=(), info: dict | None = None, typical_threshold: float | None = None,
                 has_classifier: bool = False, notes: list[str] | None = None):
        super().__init__(records)
        self.info = info
        self.typical_threshold = typical_threshold
        self.has_classifier = has_classifier
        self.notes = list(notes or [])


def default_min_confidence(records) -> tuple[float, str]:
    """The minimum detector confidence to use when none is given, and where it comes from."""
    t = getattr(records, "typical_threshold", None)
    if t is not None:
        return t, "the file's typical_detection_threshold"
    return DEFAULT_MIN_CONFIDENCE, "default"


def needs_species_decision(records) -> bool:
    """True when the file has animal boxes but no species classifier ran over them."""
    return (isinstance(records, ParsedFile) and not records.has_classifier
            and any(r.category == MD_ANIMAL and not r.reject_record for r in records))


def pre_box_reason(rec: _Record, min_confidence: float | None) -> str | None:
    reason = _pre_box_reason(rec, min_confidence)
    return _readable(reason) if reason else None


def _pre_box_reason(rec: _Record, min_confidence: float | None) -> str | None:
    """Why a record is not a candidate before its box is looked at: low detector confidence,
    or a category that is not an animal (person, vehicle, unknown)."""
    if min_confidence is not None and min_confidence > 0 and rec.confidence is not None \
            and math.isfinite(rec.confidence) and rec.confidence < min_confidence:
        return f"confidence {rec.confidence:.3f} below {min_confidence:g}"
    if rec.category is not None and rec.category != MD_ANIMAL:
        if rec.category.startswith("unknown category"):
            return f"{rec.category}: not in the file's detection_categories"
        return f"category {rec.category}, not an animal"
    return None


def species_reason(rec: _Record, all_animals_are_deer: bool = False) -> tuple[str | None, str | None]:
    """``(classification, reason)`` of a record: the canonical class (doe, fawn, ..., unknown)
    of a candidate, or ``None`` and the reason it is not a deer."""
    cls, reason = _species_reason(rec, all_animals_are_deer)
    return cls, (_readable(reason) if reason else None)


def _species_reason(rec: _Record, all_animals_are_deer: bool) -> tuple[str | None, str | None]:
    if rec.classified:
        if rec.classification is None:
            if all_animals_are_deer:
                return "unknown", None
            return None, "animal without a species classification (pass --all-animals-are-deer to keep it)"
        return species_decision(rec.classification)
    if rec.classification is None:
        return "unknown", None
    cls = normalise_classification(rec.classification)
    if cls is not None:
        return cls, None
    return species_decision(rec.classification)


def _readable(text: str) -> str:
    """``text`` with undecodable bytes (surrogate escapes) shown as \\xNN, safe to store."""
    if not _has_surrogates(text):
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") \
        .encode("utf-8", "backslashreplace").decode("utf-8")


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, str):
        return _readable(obj)
    if isinstance(obj, dict):
        return {_readable(str(k)): _json_safe(v) for k, v in obj.items()}
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
        return sniff_json_format(path)
    if suffix in (".csv", ".tsv", ".txt"):
        return "csv"
    raise IngestFileError(path, None, "cannot tell the format from the name; pass --format "
                          + "|".join(FORMATS))


def sniff_json_format(path: Path) -> str:
    """``speciesnet`` when the file's first top-level key is ``predictions`` (SpeciesNet's
    predictions.json), else ``megadetector``. Reads only the start of the file."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(65536).decode("utf-8", "replace")
    except OSError:
        return "megadetector"
    m = re.search(r'"(predictions|images|info|detection_categories|classification_categories)"\s*:', head)
    return "speciesnet" if m and m.group(1) == "predictions" else "megadetector"


def _read_json(path: Path):
    """The JSON document; undecodable bytes in names are kept as surrogate escapes so that the
    record that holds them can be rejected on its own (the rest of the file goes on)."""
    try:
        text = path.read_bytes().decode("utf-8", "surrogateescape")
    except OSError as exc:
        raise IngestFileError(path, None, f"cannot read: {exc}") from exc
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise IngestFileError(path, exc.lineno, f"invalid JSON at column {exc.colno}: {exc.msg}") from exc


def _is_video(file_: str, entry: dict) -> bool:
    return (file_.lower().endswith(VIDEO_SUFFIXES) or "frame_rate" in entry or "frames_processed" in entry
            or any(isinstance(d, dict) and "frame_number" in d for d in entry.get("detections") or []))


def _file_problem(file_: str) -> str | None:
    if _has_surrogates(file_):
        return f"file name is not valid UTF-8 ({_readable(file_)!r})"
    if "\x00" in file_:
        return "file name contains a NUL character"
    return None


def _note_repeats(repeated: set[str], notes: list[str]) -> None:
    """Images listed more than once: their boxes are matched by detection id (a repeat with the
    same box is a duplicate, one with other content a stored rejection), so none is lost."""
    if repeated:
        names = ", ".join(sorted(_readable(r) for r in repeated)[:5])
        notes.append(f"{len(repeated)} image(s) listed more than once ({names}{', ...' if len(repeated) > 5 else ''}); "
                     "repeated boxes are duplicates, differing ones are stored as rejections")


def _typical_threshold(info: dict, path: Path, notes: list[str]) -> float | None:
    meta = info.get("detector_metadata") if isinstance(info, dict) else None
    if not isinstance(meta, dict) or "typical_detection_threshold" not in meta:
        return None
    t = _float(meta.get("typical_detection_threshold"))
    if not (math.isfinite(t) and 0 <= t <= 1):
        notes.append(f"ignored typical_detection_threshold {meta.get('typical_detection_threshold')!r} "
                     "(not a number in [0, 1])")
        return None
    return t


def parse_megadetector(path: Path) -> ParsedFile:
    """MegaDetector batch output 1.x: ``info`` (stored with the batch; its
    ``detector_metadata.typical_detection_threshold`` is the default minimum confidence),
    ``detection_categories``, ``classification_categories`` (+ ``_descriptions``, SpeciesNet
    taxonomy strings when present), per-image ``failure`` and ``detections`` with
    ``classifications``. Video entries are rejected by name until video is supported."""
    doc = _read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise IngestFileError(path, 1, "not a MegaDetector batch output: no top-level \"images\" list")
    notes: list[str] = []
    info = doc.get("info")
    if not isinstance(info, dict):
        notes.append("no \"info\" block: detector and format version unknown")
        info = None
    else:
        version = str(info.get("format_version", ""))
        if version and not version.startswith("1."):
            notes.append(f"format_version {version!r}: read as 1.x")
    typical = _typical_threshold(info or {}, path, notes)
    det_cats = doc.get("detection_categories")
    if not isinstance(det_cats, dict) or not det_cats:
        notes.append("no detection_categories: MegaDetector's 1=animal, 2=person, 3=vehicle assumed")
        det_cats = MD_DEFAULT_CATEGORIES
    det_cats = {str(k): str(v).strip().lower() for k, v in det_cats.items()}
    cls_cats = doc.get("classification_categories") if isinstance(doc.get("classification_categories"), dict) else {}
    descriptions = doc.get("classification_category_descriptions")
    descriptions = descriptions if isinstance(descriptions, dict) else {}
    # a taxonomy string (SpeciesNet -> MegaDetector conversion) says more than the short name
    cls_names = {str(k): str(descriptions.get(k) or v) for k, v in cls_cats.items()}
    has_classifier = bool(cls_cats)
    records: list[_Record] = []
    first_entry: dict[str, int] = {}
    repeated: set[str] = set()
    for i, entry in enumerate(doc["images"], start=1):
        if not isinstance(entry, dict) or not entry.get("file"):
            records.append(_Record(i, {"images_index": i - 1, "entry": entry}, None,
                                   reject_record="image entry has no \"file\""))
            continue
        file_ = str(entry["file"])
        problem = _file_problem(file_)
        if problem:
            records.append(_Record(i, {"images_index": i - 1, "file": file_}, None, reject_record=problem))
            continue
        if file_ in first_entry:
            repeated.add(file_)
        first_entry.setdefault(file_, i)
        input_time = parse_time(entry.get("datetime"))
        camera = entry.get("camera_id") or entry.get("location")
        if entry.get("failure") or entry.get("detections") is None:
            records.append(_Record(i, {"file": file_, "failure": entry.get("failure")}, file_,
                                   reject_record=f"detector failed on this image: {entry.get('failure') or 'no detections list'}"))
            continue
        if not isinstance(entry["detections"], list):
            records.append(_Record(i, {"file": file_, "detections": entry["detections"]}, file_,
                                   reject_record="\"detections\" is not a list"))
            continue
        if _is_video(file_, entry):
            frames = sorted({d.get("frame_number") for d in entry["detections"] if isinstance(d, dict)
                             and d.get("frame_number") is not None}, key=str)
            records.append(_Record(i, {"file": file_, "detections": len(entry["detections"]),
                                       "frame_numbers": frames[:20]}, file_,
                                   reject_record="video: frames (frame_number) are not supported yet"))
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
            classified = classification is not None
            if classification is None and det.get("classifications"):
                classified = True
                try:
                    top = max(det["classifications"], key=lambda c: float(c[1]))
                    classification = cls_names.get(str(top[0]), f"unknown classification category {top[0]!r}")
                except (TypeError, ValueError, IndexError):
                    classification = "<malformed classifications>"
            records.append(_with_side(_Record(
                line=i, raw=raw, image_path=file_, box=box, normalised=True,
                input_id=str(det["id"]) if det.get("id") not in (None, "") else None,
                camera_id=str(camera) if camera else None, input_time=input_time,
                classification=None if classification is None else str(classification),
                confidence=_float(det.get("conf")), category=category,
                classified=has_classifier or classified,
            ), _side_value(det)))
            has_classifier = has_classifier or classified
    _note_repeats(repeated, notes)
    if has_classifier:          # a classifier ran: an unclassified animal box is not a deer yet
        for r in records:
            if r.category == MD_ANIMAL:
                r.classified = True
    return ParsedFile(records, info=info, typical_threshold=typical, has_classifier=has_classifier, notes=notes)


def parse_speciesnet(path: Path) -> ParsedFile:
    """SpeciesNet ``predictions.json``: ``{"predictions": [{"filepath", "detections": [{"category",
    "label", "conf", "bbox"}], "prediction", "prediction_score", "classifications", "failures"}]}``.
    The image's ensemble ``prediction`` is the species of its animal boxes."""
    doc = _read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("predictions"), list):
        raise IngestFileError(path, 1, "not a SpeciesNet predictions file: no top-level \"predictions\" list")
    info = {k: v for k, v in doc.items() if k != "predictions"} or None
    records: list[_Record] = []
    first_entry: dict[str, int] = {}
    repeated: set[str] = set()
    versions = set()
    for i, entry in enumerate(doc["predictions"], start=1):
        if not isinstance(entry, dict) or not entry.get("filepath"):
            records.append(_Record(i, {"predictions_index": i - 1, "entry": entry}, None,
                                   reject_record="prediction has no \"filepath\""))
            continue
        file_ = str(entry["filepath"])
        if entry.get("model_version"):
            versions.add(str(entry["model_version"]))
        problem = _file_problem(file_)
        if problem:
            records.append(_Record(i, {"predictions_index": i - 1, "filepath": file_}, None, reject_record=problem))
            continue
        if file_ in first_entry:
            repeated.add(file_)
        first_entry.setdefault(file_, i)
        dets = entry.get("detections")
        if not isinstance(dets, list):
            why = ", ".join(map(str, entry.get("failures") or [])) or "no detections list"
            records.append(_Record(i, {"filepath": file_, "failures": entry.get("failures")}, file_,
                                   reject_record=f"detector failed on this image: {why}"))
            continue
        if _is_video(file_, entry):
            records.append(_Record(i, {"filepath": file_}, file_,
                                   reject_record="video: frames (frame_number) are not supported yet"))
            continue
        prediction = entry.get("prediction")
        if not prediction and entry.get("failures"):
            prediction = None
        for j, det in enumerate(dets):
            raw = {"filepath": file_, "detection_index": j, "detection": det, "prediction": prediction,
                   "prediction_score": entry.get("prediction_score")}
            if not isinstance(det, dict):
                records.append(_Record(i, raw, file_, reject_record="detection is not an object"))
                continue
            bbox = det.get("bbox")
            box = tuple(_float(v) for v in bbox) if isinstance(bbox, (list, tuple)) and len(bbox) == 4 else None
            label = str(det.get("label") or MD_DEFAULT_CATEGORIES.get(str(det.get("category")),
                                                                     f"unknown category {det.get('category')!r}"))
            records.append(_with_side(_Record(
                line=i, raw=raw, image_path=file_, box=box, normalised=True,
                input_time=parse_time(entry.get("datetime")),
                classification=str(prediction) if prediction else None,
                confidence=_float(det.get("conf")), category=label.strip().lower(), classified=True,
            ), _side_value(det)))
    notes: list[str] = []
    _note_repeats(repeated, notes)
    info = dict(info or {})
    if versions:
        info["model_versions"] = sorted(versions)
    return ParsedFile(records, info=info or None, typical_threshold=None, has_classifier=True, notes=notes)


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
                _with_side(rec, _side_value(r))
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
