"""``deer-pipeline cameras import cameras.csv``: where and when each camera stood.

Columns (header names, case-insensitive): ``camera_id``, ``latitude``, ``longitude`` (decimal
degrees, WGS84), ``deployment_start``, ``deployment_end`` (ISO 8601 date or date-time; a date
alone is the start / end of that day, UTC), ``camera_model``, ``notes``. Only ``camera_id`` is
required; empty cells leave what is stored unchanged. A bad row (coordinates out of range, an
unparseable date, an end before the start, an unusable camera id) is reported with its line
and nothing of it is stored; the good rows are imported. Plain logic, no Dagster.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass, field
from datetime import date, datetime, time, timezone
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from deer_pipeline.detections.formats import CAMERA_ID_RE

COLUMNS = ("camera_id", "latitude", "longitude", "deployment_start", "deployment_end", "camera_model", "notes")
ALIASES = {"camera": "camera_id", "cameraid": "camera_id", "deploymentid": "camera_id", "lat": "latitude",
           "lon": "longitude", "lng": "longitude", "long": "longitude", "start": "deployment_start",
           "deploymentstart": "deployment_start", "end": "deployment_end", "deploymentend": "deployment_end",
           "model": "camera_model", "cameramodel": "camera_model", "comments": "notes", "note": "notes"}


class CamerasFileError(ValueError):
    """The file as a whole cannot be read (no header, no camera_id column)."""


@dataclass
class CameraRow:
    camera_id: str
    latitude: float | None = None
    longitude: float | None = None
    deployment_start: datetime | None = None
    deployment_end: datetime | None = None
    camera_model: str | None = None
    notes: str | None = None


@dataclass
class CamerasReport:
    source: str
    imported: list[str] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)      # (line, message)

    def summary(self) -> str:
        lines = [f"imported {len(self.imported)} camera(s) from {self.source}"
                 + (f": {', '.join(self.imported[:12])}{' ...' if len(self.imported) > 12 else ''}"
                    if self.imported else "")]
        if self.errors:
            lines.append(f"{len(self.errors)} row(s) not imported:")
            lines += [f"  line {line}: {msg}" for line, msg in self.errors]
        return "\n".join(lines)


def _column(name: str) -> str:
    key = name.strip().lower().replace(" ", "_")
    return ALIASES.get(key.replace("_", ""), key)


def _coordinate(text: str, name: str, limit: float) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not a number (decimal degrees, e.g. 45.123)") from None
    if not math.isfinite(value) or not -limit <= value <= limit:
        raise ValueError(f"{name} {text!r} is outside -{limit:g}..{limit:g}")
    return value


def _when(text: str, name: str, end: bool) -> datetime | None:
    if not text:
        return None
    t = text.strip()
    try:
        if len(t) == 10:
            d = date.fromisoformat(t)
            dt = datetime.combine(d, time(23, 59, 59) if end else time(0, 0, 0))
        else:
            dt = datetime.fromisoformat(t[:-1] + "+00:00" if t.endswith("Z") else t)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not a date (YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS[+HH:MM])") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    if not 1990 <= dt.year <= datetime.now(timezone.utc).year + 1:
        raise ValueError(f"{name} {text!r} is not a plausible camera date")
    return dt.astimezone(timezone.utc)


def parse_row(values: dict[str, str]) -> CameraRow:
    cam = (values.get("camera_id") or "").strip()
    if not cam:
        raise ValueError("no camera_id")
    if not CAMERA_ID_RE.match(cam):
        raise ValueError(f"camera_id {cam!r} is not usable (letters, digits, _ . -; at most 64 characters)")
    lat = _coordinate((values.get("latitude") or "").strip(), "latitude", 90)
    lon = _coordinate((values.get("longitude") or "").strip(), "longitude", 180)
    if (lat is None) != (lon is None):
        raise ValueError("latitude and longitude must be given together")
    if lat == 0 and lon == 0:
        raise ValueError("latitude 0, longitude 0 is a placeholder, not a camera site")
    start = _when(values.get("deployment_start") or "", "deployment_start", end=False)
    end = _when(values.get("deployment_end") or "", "deployment_end", end=True)
    if start and end and end < start:
        raise ValueError(f"deployment_end {end:%Y-%m-%d %H:%M} is before deployment_start {start:%Y-%m-%d %H:%M}")
    return CameraRow(cam, lat, lon, start, end, (values.get("camera_model") or "").strip() or None,
                     (values.get("notes") or "").strip() or None)


def read_cameras_csv(path) -> tuple[list[tuple[int, CameraRow]], list[tuple[int, str]]]:
    """Good rows (with their line) and errors (line, message)."""
    path = Path(path)
    try:
        fh = open(path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise CamerasFileError(f"{path}: cannot read: {exc}") from exc
    good, errors = [], []
    with fh:
        try:
            sample = fh.read(4096)
        except UnicodeDecodeError as exc:
            raise CamerasFileError(f"{path}: not UTF-8 text: {exc}") from exc
        fh.seek(0)
        delimiter = ";" if sample.count(";") > sample.count(",") else ("\t" if sample.count("\t") > sample.count(",") else ",")
        reader = csv.reader(fh, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise CamerasFileError(f"{path}: empty file; expected a header with {', '.join(COLUMNS)}") from None
        cols = [_column(h) for h in header]
        if "camera_id" not in cols:
            raise CamerasFileError(f"{path}, line 1: no camera_id column; have {', '.join(header)}")
        seen: dict[str, int] = {}
        try:
            for row in reader:
                line = reader.line_num
                if not any(v.strip() for v in row):
                    continue
                if len(row) != len(cols):
                    errors.append((line, f"{len(row)} fields where the header has {len(cols)}"))
                    continue
                try:
                    cam = parse_row(dict(zip(cols, row)))
                except ValueError as exc:
                    errors.append((line, str(exc)))
                    continue
                if cam.camera_id in seen:
                    errors.append((line, f"camera {cam.camera_id!r} already given on line {seen[cam.camera_id]}"))
                    continue
                seen[cam.camera_id] = line
                good.append((line, cam))
        except (csv.Error, UnicodeDecodeError) as exc:
            raise CamerasFileError(f"{path}, line {reader.line_num}: malformed CSV: {exc}") from exc
    return good, errors


def import_cameras(engine: Engine, path) -> CamerasReport:
    """Store the good rows (insert or update; empty cells keep the stored value)."""
    good, errors = read_cameras_csv(path)
    report = CamerasReport(source=str(path), errors=errors)
    with engine.begin() as conn:
        for _, cam in good:
            conn.execute(sa.text(
                "INSERT INTO cameras (camera_id, latitude, longitude, deployment_start, deployment_end, "
                "  camera_model, notes, metadata_updated_at) "
                "VALUES (:c, :lat, :lon, :start, :end, :model, :notes, now()) "
                "ON CONFLICT (camera_id) DO UPDATE SET "
                "  latitude = COALESCE(EXCLUDED.latitude, cameras.latitude), "
                "  longitude = COALESCE(EXCLUDED.longitude, cameras.longitude), "
                "  deployment_start = COALESCE(EXCLUDED.deployment_start, cameras.deployment_start), "
                "  deployment_end = COALESCE(EXCLUDED.deployment_end, cameras.deployment_end), "
                "  camera_model = COALESCE(EXCLUDED.camera_model, cameras.camera_model), "
                "  notes = COALESCE(EXCLUDED.notes, cameras.notes), metadata_updated_at = now()"),
                {"c": cam.camera_id, "lat": cam.latitude, "lon": cam.longitude, "start": cam.deployment_start,
                 "end": cam.deployment_end, "model": cam.camera_model, "notes": cam.notes})
            report.imported.append(cam.camera_id)
    return report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="deer-pipeline cameras", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    imp = sub.add_parser("import", help="import camera sites and deployment dates from a CSV")
    imp.add_argument("csv", type=Path)
    sub.add_parser("list", help="list cameras with their coordinates and deployment dates")
    args = parser.parse_args(argv)

    from deer_pipeline import db

    engine = db.get_engine()
    if args.action == "list":
        with engine.connect() as conn:
            rows = conn.execute(sa.text(
                "SELECT camera_id, latitude, longitude, deployment_start, deployment_end, camera_model "
                "FROM cameras ORDER BY camera_id")).all()
        for r in rows:
            print(f"{r.camera_id:<20} {r.latitude if r.latitude is not None else '-':>10} "
                  f"{r.longitude if r.longitude is not None else '-':>11} "
                  f"{r.deployment_start or '-'} .. {r.deployment_end or '-'} {r.camera_model or ''}")
        return 0
    try:
        report = import_cameras(engine, args.csv)
    except CamerasFileError as exc:
        print(f"deer-pipeline cameras import: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 1 if report.errors else 0
