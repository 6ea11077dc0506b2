"""Reading trail-camera photos: capture time, size and checksum, crop geometry, and decoding
only as much of a JPEG as the crops need (Pillow draft mode).

Plain logic, no Dagster. Boxes are in pixels of the image as it is displayed (EXIF orientation
applied), which is how MegaDetector reports them.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import NamedTuple, Sequence

from PIL import Image, ImageOps, UnidentifiedImageError

EXIF_IFD = 0x8769
TAG_DATETIME = 306                  # IFD0: "date and time of file change", what many cameras and tools write
TAG_DATETIME_ORIGINAL = 36867       # Exif IFD: when the shutter fired
TAG_DATETIME_DIGITIZED = 36868
TAG_OFFSET_TIME = 36880
TAG_OFFSET_TIME_ORIGINAL = 36881
TAG_OFFSET_TIME_DIGITIZED = 36882
TAG_SUBSEC_TIME = 37520
TAG_SUBSEC_TIME_ORIGINAL = 37521
TAG_SUBSEC_TIME_DIGITIZED = 37522
# (time tag, sub-second tag, offset tag, source stored in images.captured_at_source), in the
# order they are trusted. Each is looked for in the Exif IFD, then in IFD0 (where some cameras
# and tools put every tag).
CAPTURE_TIME_TAGS = (
    (TAG_DATETIME_ORIGINAL, TAG_SUBSEC_TIME_ORIGINAL, TAG_OFFSET_TIME_ORIGINAL, "exif"),
    (TAG_DATETIME_DIGITIZED, TAG_SUBSEC_TIME_DIGITIZED, TAG_OFFSET_TIME_DIGITIZED, "exif_digitized"),
    (TAG_DATETIME, TAG_SUBSEC_TIME, TAG_OFFSET_TIME, "exif_datetime"),
)
DRAFT_SCALES = (8, 4, 2)          # JPEG DCT scaling: 1/8, 1/4, 1/2 (then full size)
JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")
IMAGE_SUFFIXES = JPEG_SUFFIXES + (".png", ".tif", ".tiff", ".bmp", ".webp")


class ImageDecodeError(Exception):
    """A photo could not be read. ``kind`` is missing | unreadable | truncated | not_jpeg."""

    def __init__(self, path, reason: str, kind: str = "unreadable"):
        self.path = str(path)
        self.reason = reason
        self.kind = kind
        super().__init__(f"{path}: {reason}")


def sha256_file(path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(chunk_size), b""):
                digest.update(chunk)
    except FileNotFoundError as exc:
        raise ImageDecodeError(path, "file not found", "missing") from exc
    except IsADirectoryError as exc:
        raise ImageDecodeError(path, "is a directory, not an image file", "unreadable") from exc
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot read file: {exc.strerror or exc}", "unreadable") from exc
    return digest.hexdigest()


def _open(path) -> Image.Image:
    """Open (header only) with clear errors; the caller closes the image."""
    p = Path(path)
    if not p.exists():
        raise ImageDecodeError(path, "file not found", "missing")
    if not p.is_file():
        raise ImageDecodeError(path, "not a regular file", "unreadable")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(p)
    except UnidentifiedImageError as exc:
        kind = "not_jpeg" if p.suffix.lower() in JPEG_SUFFIXES else "unreadable"
        what = "named like a JPEG but is not an image" if kind == "not_jpeg" else "not an image Pillow can read"
        raise ImageDecodeError(path, f"{what} ({_magic(p)})", kind) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(path, f"image too large to decode safely: {exc}", "unreadable") from exc
    except OSError as exc:
        if "truncated" in str(exc).lower():
            raise ImageDecodeError(path, f"truncated file: {exc}", "truncated") from exc
        raise ImageDecodeError(path, f"cannot open: {exc}", "unreadable") from exc
    if p.suffix.lower() in JPEG_SUFFIXES and img.format != "JPEG":
        fmt = img.format
        img.close()
        raise ImageDecodeError(path, f"named like a JPEG but contains {fmt} data", "not_jpeg")
    return img


def _magic(p: Path) -> str:
    try:
        with open(p, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return "unreadable"
    if not head:
        return "empty file"
    # Named by kind only: a rejection reason never repeats what a file contains.
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return f"{kind} data"
    return "unrecognised content"


_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG", "PNG"), (b"GIF8", "GIF"), (b"II*\x00", "TIFF"),
          (b"MM\x00*", "TIFF"), (b"RIFF", "RIFF/WebP"), (b"BM", "BMP"), (b"%PDF", "PDF"), (b"PK\x03\x04", "ZIP"),
          (b"\x1f\x8b", "gzip"))


def _load(img: Image.Image, path) -> None:
    """Decode pixels, turning Pillow's errors into ImageDecodeError."""
    try:
        img.load()
    except OSError as exc:
        msg = str(exc)
        if "truncated" in msg.lower() or "premature end" in msg.lower():
            raise ImageDecodeError(path, f"truncated file: {msg}", "truncated") from exc
        raise ImageDecodeError(path, f"cannot decode: {msg}", "unreadable") from exc
    except (SyntaxError, ValueError) as exc:  # Pillow raises these for some corrupt headers
        raise ImageDecodeError(path, f"corrupt image: {exc}", "unreadable") from exc


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block must not stop size reading
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _text(value) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "ignore")
    return str(value).strip().strip("\x00").strip()


def _parse_exif_time(raw, offset=None, subsec=None) -> datetime | None:
    if raw is None:
        return None
    raw = _text(raw)
    for fmt in ("%Y:%m:%d %H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y:%m:%d %H:%M:%S.%f", "%Y-%m-%dT%H:%M:%S"):
        try:
            value = datetime.strptime(raw, fmt)
            break
        except ValueError:
            continue
    else:
        return None
    digits = re.sub(r"\D", "", _text(subsec)) if subsec is not None else ""
    if digits and not value.microsecond:
        value = value.replace(microsecond=int(digits[:6].ljust(6, "0")))
    tz = timezone.utc
    if offset:
        off = _text(offset)
        try:
            sign = -1 if off.startswith("-") else 1
            hh, mm = off.lstrip("+-").split(":")
            tz = timezone(sign * timedelta(hours=int(hh), minutes=int(mm)))
        except ValueError:
            tz = timezone.utc
    return value.replace(tzinfo=tz).astimezone(timezone.utc)


class CaptureTime(NamedTuple):
    time: datetime      # aware, UTC
    source: str         # exif | exif_digitized | exif_datetime (images.captured_at_source)


def capture_time_from_exif(exif) -> CaptureTime | None:
    """The capture time as cameras write it: DateTimeOriginal, then DateTimeDigitized, then
    IFD0 DateTime; each from the Exif IFD or IFD0, with its sub-second and offset tags when
    present (tz-naive times are taken as UTC). Unparseable or zero dates are skipped."""
    try:
        ifd0 = dict(exif)
    except Exception:
        return None
    try:
        sub = dict(exif.get_ifd(EXIF_IFD))
    except Exception:
        sub = {}

    def tag(t):
        return sub.get(t) if sub.get(t) is not None else ifd0.get(t)

    for time_tag, subsec_tag, offset_tag, source in CAPTURE_TIME_TAGS:
        when = _parse_exif_time(tag(time_tag), tag(offset_tag), tag(subsec_tag))
        if when is not None:
            return CaptureTime(when, source)
    return None


def read_capture_time_and_source(path) -> CaptureTime | None:
    img = _open(path)
    try:
        try:
            exif = img.getexif()
        except Exception:   # a broken EXIF block: no capture time, the caller falls back
            return None
        return capture_time_from_exif(exif)
    finally:
        img.close()


def read_capture_time(path) -> datetime | None:
    """The photo's capture time as an aware UTC datetime (see ``capture_time_from_exif``);
    None when the photo has no usable capture time."""
    found = read_capture_time_and_source(path)
    return found.time if found else None


class ImageInfo(NamedTuple):
    width: int
    height: int
    sha256: str


def image_info(path, verify: bool = True) -> ImageInfo:
    """(width, height, sha256) of a photo, width/height as displayed (EXIF orientation applied).

    With ``verify`` the whole file is decoded (JPEGs at 1/8 scale, which still reads every
    byte), so missing, unreadable, truncated and misnamed files raise ImageDecodeError here
    rather than later."""
    img = _open(path)
    try:
        size = _oriented_size(img)
        if verify:
            if img.format == "JPEG":
                w, h = img.size
                img.draft(img.mode if img.mode in ("L", "RGB") else "RGB", (max(1, w // 8), max(1, h // 8)))
            _load(img, path)
    finally:
        img.close()
    return ImageInfo(size[0], size[1], sha256_file(path))


def read_image_facts(path) -> tuple[ImageInfo, CaptureTime | None]:
    """image_info and the capture time with its source (what ingestion needs per photo)."""
    info = image_info(path)
    return info, read_capture_time_and_source(path)


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------

def crop_box(bbox_xywh, img_w: int, img_h: int, pad_fraction: float) -> tuple[int, int, int, int]:
    """Pad a box by ``pad_fraction`` of its width (left/right) and height (top/bottom), round
    outwards to whole pixels and clip to the image. Returns (x0, y0, x1, y1), x1/y1 exclusive;
    an empty result (x1 <= x0) means the box lies outside the image."""
    x, y, w, h = (float(v) for v in bbox_xywh)
    if any(math.isnan(v) or math.isinf(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise ValueError(f"box {bbox_xywh!r} is not a positive finite box")
    px, py = w * pad_fraction, h * pad_fraction
    # round first so 99.9999999 does not become 100 -> 101 after ceil
    x0 = math.floor(round(x - px, 6))
    y0 = math.floor(round(y - py, 6))
    x1 = math.ceil(round(x + w + px, 6))
    y1 = math.ceil(round(y + h + py, 6))
    x0, x1 = max(0, min(x0, img_w)), max(0, min(x1, img_w))
    y0, y1 = max(0, min(y0, img_h)), max(0, min(y1, img_h))
    return x0, y0, max(x0, x1), max(y0, y1)


def choose_draft_scale(boxes: Sequence[tuple[int, int, int, int]], min_side: int) -> int:
    """Largest JPEG reduction k in (8, 4, 2, 1) that keeps every crop's shorter side at least
    min(min_side, its full-size shorter side) pixels."""
    if not boxes:
        return 8
    for k in DRAFT_SCALES:
        if all(min(x1 - x0, y1 - y0) / k >= min(min_side, min(x1 - x0, y1 - y0)) for x0, y0, x1, y1 in boxes):
            return k
    return 1


class DecodedRegions(NamedTuple):
    crops: list            # list[PIL.Image.Image], RGB
    scale: float           # decoded size / full size: 1.0, 0.5, 0.25 or 0.125
    size: tuple[int, int]  # full (displayed) size of the photo


def decode_regions(path, boxes: Sequence[tuple[int, int, int, int]], min_side: int = 224) -> DecodedRegions:
    """Decode a photo once and cut out every box (x0, y0, x1, y1 in full-size pixels).

    JPEGs are decoded in draft mode at the largest reduction (1/2, 1/4, 1/8) that keeps each
    crop's shorter side >= min(min_side, the box's shorter side), so a 12 MP frame with a
    large deer decodes at 1/4 or 1/8 of the work; other formats are decoded in full."""
    img = _open(path)
    try:
        full_w, full_h = _oriented_size(img)
        k = choose_draft_scale(boxes, min_side) if img.format == "JPEG" else 1
        if k > 1:
            raw_w, raw_h = img.size
            img.draft("RGB", (max(1, raw_w // k), max(1, raw_h // k)))
        _load(img, path)
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # broken EXIF: keep stored orientation
            pass
        if img.mode != "RGB":
            img = img.convert("RGB")
        dec_w, dec_h = img.size
        sx, sy = dec_w / full_w, dec_h / full_h
        # nominal DCT scale actually used (the decoded size is ceil(full / k))
        k_used = min((1, 2, 4, 8), key=lambda c: abs(full_w / c - dec_w))
        crops = []
        for x0, y0, x1, y1 in boxes:
            box = (
                max(0, min(dec_w, int(math.floor(x0 * sx + 1e-6)))),
                max(0, min(dec_h, int(math.floor(y0 * sy + 1e-6)))),
                max(0, min(dec_w, int(math.ceil(x1 * sx - 1e-6)))),
                max(0, min(dec_h, int(math.ceil(y1 * sy - 1e-6)))),
            )
            if box[2] <= box[0] or box[3] <= box[1]:
                raise ValueError(f"box {(x0, y0, x1, y1)} is empty inside a {full_w}x{full_h} image")
            crops.append(img.crop(box))
        return DecodedRegions(crops, 1.0 / k_used, (full_w, full_h))
    finally:
        img.close()


def full_decode(path) -> Image.Image:
    """The whole photo at full size, RGB, orientation applied (for checks and tests)."""
    img = _open(path)
    try:
        _load(img, path)
        out = ImageOps.exif_transpose(img).convert("RGB")
        return out
    finally:
        img.close()


def is_image_file(path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES and not Path(path).name.startswith(".")


def file_mtime_utc(path) -> datetime:
    return datetime.fromtimestamp(os.stat(path).st_mtime, tz=timezone.utc)
