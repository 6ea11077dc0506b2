"""The photos behind detections: each record's photo resolved inside the image roots (paths outside them are refused with a reason that never echoes file contents), its camera, and the reading of new photos (decode check, EXIF capture time, hash); stored photos keep their stored rows."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from deer_pipeline.detections import images as imaging
from deer_pipeline.detections.formats import (
    CAMERA_ID_RE,
    _Record,
    sanitise_folder_camera,
)
from deer_pipeline.ops.progress import progress
from deer_pipeline.settings import (
    IngestSettings,
)


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


def _load_or_read_photos(engine: Engine, image_by_path: dict[str, _Image], rec_paths,
                         quiet: bool | None = True) -> None:
    """Stored photos keep their stored rows; new ones are read (decode, EXIF time, hash)."""
    with engine.connect() as conn:
        stored = {r.path: r for r in conn.execute(sa.text(
            "SELECT image_id, path, camera_id, captured_at, captured_at_source, width, height, sha256, "
            "status, reason FROM images WHERE path = ANY(:p)"), {"p": list(image_by_path)})}
    first_time: dict[str, datetime | None] = {}
    for rec, key in rec_paths:
        if key is not None and key not in first_time:
            first_time[key] = rec.input_time
    for key, img in progress(image_by_path.items(), total=len(image_by_path), desc="reading photos",
                             unit="photo", quiet=quiet):
        row = stored.get(key)
        if row is not None:
            img.image_id, img.camera_id, img.captured_at = row.image_id, row.camera_id or img.camera_id, row.captured_at
            img.captured_at_source, img.width, img.height = row.captured_at_source, row.width, row.height
            img.sha256, img.status, img.reason, img.stored = row.sha256, row.status, row.reason, True
            continue
        _read_image(img, first_time.get(key))


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
