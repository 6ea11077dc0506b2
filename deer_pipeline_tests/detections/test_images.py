import hashlib
from datetime import datetime, timezone

import numpy as np
import pytest
from PIL import Image, ImageDraw

from deer_pipeline.detections import images


def write_photo(path, size=(320, 240), when: str | None = "2025:10:02 06:30:15", offset: str | None = None,
                orientation: int | None = None, seed: int = 0, fmt: str = "JPEG", quality: int = 92):
    """A small structured photo (gradient, shapes, mild noise) with optional EXIF."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([80 + 100 * xx / w, 90 + 80 * yy / h, 60 + 40 * (xx + yy) / (w + h)], -1)
    img = Image.fromarray(np.clip(arr + rng.normal(0, 3, arr.shape), 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(w / 30, w / 8)
        d.ellipse([x0 - r, y0 - r * 0.7, x0 + r, y0 + r * 0.7], fill=tuple(int(c) for c in rng.integers(20, 235, 3)))
    exif = Image.Exif()
    if when:
        ifd = exif.get_ifd(images.EXIF_IFD)
        ifd[images.TAG_DATETIME_ORIGINAL] = when
        if offset:
            ifd[images.TAG_OFFSET_TIME_ORIGINAL] = offset
    if orientation:
        exif[0x0112] = orientation
    kwargs = {"exif": exif.tobytes()} if (when or orientation) else {}
    if fmt == "JPEG":
        kwargs["quality"] = quality
    img.save(path, fmt, **kwargs)
    return path


def test_capture_time_from_exif_is_utc(tmp_path):
    p = write_photo(tmp_path / "a.jpg", when="2025:10:02 06:30:15")
    assert images.read_capture_time(p) == datetime(2025, 10, 2, 6, 30, 15, tzinfo=timezone.utc)
    p2 = write_photo(tmp_path / "b.jpg", when="2025:10:02 06:30:15", offset="-05:00")
    assert images.read_capture_time(p2) == datetime(2025, 10, 2, 11, 30, 15, tzinfo=timezone.utc)
    p3 = write_photo(tmp_path / "c.jpg", when=None)
    assert images.read_capture_time(p3) is None
    p4 = write_photo(tmp_path / "d.jpg", when="0000:00:00 00:00:00")   # what some cameras write
    assert images.read_capture_time(p4) is None


def test_image_info_size_and_checksum(tmp_path):
    p = write_photo(tmp_path / "a.jpg", size=(321, 203))
    info = images.image_info(p)
    assert (info.width, info.height) == (321, 203)
    assert info.sha256 == hashlib.sha256(p.read_bytes()).hexdigest() == images.sha256_file(p)
    png = write_photo(tmp_path / "a.png", size=(50, 40), fmt="PNG", when=None)
    assert images.image_info(png)[:2] == (50, 40)


@pytest.mark.parametrize("case, kind", [
    ("missing", "missing"), ("truncated", "truncated"), ("text_named_jpg", "not_jpeg"),
    ("png_named_jpg", "not_jpeg"), ("empty", "not_jpeg"), ("garbage_tif", "unreadable"),
])
def test_bad_files_raise_clear_errors(tmp_path, case, kind):
    good = write_photo(tmp_path / "good.jpg", size=(400, 300))
    p = tmp_path / "bad.jpg"
    if case == "truncated":
        data = good.read_bytes()
        p.write_bytes(data[: len(data) * 2 // 3])
    elif case == "text_named_jpg":
        p.write_text("<html>404 not found</html>")
    elif case == "png_named_jpg":
        write_photo(tmp_path / "x.png", fmt="PNG", when=None).rename(p)
    elif case == "empty":
        p.write_bytes(b"")
    elif case == "garbage_tif":
        p = tmp_path / "bad.tif"
        p.write_bytes(b"II*\x00garbage")
    with pytest.raises(images.ImageDecodeError) as err:
        images.image_info(p)
    assert err.value.kind == kind
    assert err.value.path == str(p) and err.value.reason
    assert str(p) in str(err.value)
    if case != "missing":
        with pytest.raises(images.ImageDecodeError):
            images.decode_regions(p, [(0, 0, 10, 10)], 224)


def test_crop_box_pads_and_clips():
    # 100x50 box, 10% padding: 10 px left/right, 5 px top/bottom
    assert images.crop_box((200, 100, 100, 50), 640, 480, 0.10) == (190, 95, 310, 155)
    # no padding, fractional box rounds outwards
    assert images.crop_box((10.4, 20.6, 30.2, 40.1), 640, 480, 0.0) == (10, 20, 41, 61)
    # padding past the edges is clipped to the image
    assert images.crop_box((0, 0, 100, 100), 640, 480, 0.2) == (0, 0, 120, 120)
    assert images.crop_box((600, 440, 40, 40), 640, 480, 0.5) == (580, 420, 640, 480)
    # a box wholly outside gives an empty box
    x0, y0, x1, y1 = images.crop_box((700, 10, 20, 20), 640, 480, 0.0)
    assert x1 <= x0
    with pytest.raises(ValueError):
        images.crop_box((0, 0, 0, 10), 640, 480, 0.1)
    with pytest.raises(ValueError):
        images.crop_box((0, float("nan"), 10, 10), 640, 480, 0.1)


def test_choose_draft_scale():
    assert images.choose_draft_scale([(0, 0, 2000, 1800)], 224) == 8      # 1800/8 = 225
    assert images.choose_draft_scale([(0, 0, 2000, 1700)], 224) == 4
    assert images.choose_draft_scale([(0, 0, 2000, 1700), (0, 0, 500, 460)], 224) == 2
    assert images.choose_draft_scale([(0, 0, 200, 300)], 224) == 1        # box smaller than 224: full size
    assert images.choose_draft_scale([(0, 0, 1000, 1000)], 100) == 8


def _mean_abs_diff(a: Image.Image, b: Image.Image, size=(224, 224)) -> float:
    x = np.asarray(a.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    y = np.asarray(b.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    return float(np.abs(x - y).mean())


def test_reduced_decode_matches_full_decode(tmp_path):
    p = write_photo(tmp_path / "big.jpg", size=(2400, 1800), seed=3)
    boxes = [(100, 80, 1300, 1100), (1200, 700, 2300, 1700)]
    decoded = images.decode_regions(p, boxes, min_side=224)
    assert decoded.scale == 0.25 and decoded.size == (2400, 1800)
    full = images.full_decode(p)
    for box, crop in zip(boxes, decoded.crops):
        assert crop.mode == "RGB"
        assert min(crop.size) >= 224
        assert abs(crop.width - (box[2] - box[0]) / 4) <= 1 and abs(crop.height - (box[3] - box[1]) / 4) <= 1
        assert _mean_abs_diff(crop, full.crop(box)) < 4.0
    # a small box forces a full-size decode
    small = images.decode_regions(p, [(10, 10, 150, 130)], min_side=224)
    assert small.scale == 1.0 and small.crops[0].size == (140, 120)


def test_decode_honours_exif_orientation(tmp_path):
    raw = Image.new("RGB", (300, 200), (0, 0, 255))
    ImageDraw.Draw(raw).rectangle([0, 0, 59, 59], fill=(255, 0, 0))      # red at raw top-left
    exif = Image.Exif()
    exif[0x0112] = 6                                                      # display rotated 90 deg clockwise
    p = tmp_path / "rot.jpg"
    raw.save(p, quality=95, exif=exif.tobytes())
    info = images.image_info(p)
    assert (info.width, info.height) == (200, 300)
    crop = images.decode_regions(p, [(140, 0, 200, 60), (0, 240, 60, 300)], min_side=10)
    red_corner, blue_corner = (np.asarray(c, dtype=float).mean((0, 1)) for c in crop.crops)
    assert red_corner[0] > 200 and red_corner[2] < 60
    assert blue_corner[2] > 200 and blue_corner[0] < 60


def test_grayscale_jpeg_decodes_to_rgb(tmp_path):
    p = tmp_path / "ir.jpg"
    Image.fromarray((np.arange(600 * 800) % 251).reshape(600, 800).astype(np.uint8), "L").save(p)
    out = images.decode_regions(p, [(0, 0, 800, 600)], min_side=100)
    assert out.scale == 0.25 and out.crops[0].mode == "RGB" and out.crops[0].size == (200, 150)   # 600/8 < 100


def test_capture_time_from_ifd0_only_with_subseconds_and_offset(tmp_path):
    # What many cameras and tools write: DateTime (306) in IFD0, no Exif sub-IFD at all.
    p = tmp_path / "ifd0.jpg"
    write_photo(p, when=None)
    exif = Image.Exif()
    exif[images.TAG_DATETIME] = "2025:10:02 06:30:15"
    exif[images.TAG_SUBSEC_TIME] = "25"
    exif[images.TAG_OFFSET_TIME] = "+02:00"
    Image.open(p).save(p, "JPEG", exif=exif.tobytes())
    found = images.read_capture_time_and_source(p)
    assert found == (datetime(2025, 10, 2, 4, 30, 15, 250000, tzinfo=timezone.utc), "exif_datetime")
    # DateTimeOriginal written into IFD0 (some tools do) is still the original time
    q = tmp_path / "dto-ifd0.jpg"
    write_photo(q, when=None)
    exif = Image.Exif()
    exif[images.TAG_DATETIME_ORIGINAL] = "2025:10:03 07:00:00"
    exif[images.TAG_DATETIME] = "2025:10:09 00:00:00"          # the file was edited later
    Image.open(q).save(q, "JPEG", exif=exif.tobytes())
    assert images.read_capture_time_and_source(q) == (datetime(2025, 10, 3, 7, tzinfo=timezone.utc), "exif")


def test_unreadable_file_reason_names_no_contents(tmp_path):
    p = tmp_path / "secret.jpg"
    p.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(images.ImageDecodeError) as err:
        images.image_info(p)
    assert "root" not in err.value.reason and "726f" not in err.value.reason
