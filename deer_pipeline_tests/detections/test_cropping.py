import hashlib

import dagster as dg
import numpy as np
import pytest
import sqlalchemy as sa

from deer_pipeline import sample
from deer_pipeline.detections import cropping, images, ingest
from deer_pipeline.settings import CropSettings
from deer_pipeline_tests.detections.test_images import write_photo


def crop_rows(engine):
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.text(
            "SELECT detection_id, crop_path, crop_sha256, x0, y0, x1, y1, width, height, decode_scale, status, reason "
            "FROM crops ORDER BY detection_id"))]


@pytest.fixture
def mixed_partition(engine, tmp_path):
    """One camera-day: a large photo (draft decode), a small photo with a tiny box, a photo that
    disappears after ingestion."""
    cam = tmp_path / "cam-x"
    cam.mkdir()
    write_photo(cam / "big.jpg", size=(2400, 1800), when="2025:10:03 07:00:00", seed=31)
    write_photo(cam / "small.jpg", size=(640, 480), when="2025:10:03 07:00:02", seed=32)
    write_photo(cam / "gone.jpg", size=(640, 480), when="2025:10:03 07:00:04", seed=33)
    write_photo(cam / "other-day.jpg", size=(640, 480), when="2025:10:04 07:00:00", seed=34)
    csv_path = tmp_path / "dets.csv"
    csv_path.write_text(
        "image_path,x,y,w,h,detection_id\n"
        "cam-x/big.jpg,100,100,1200,1000,big-1\n"
        "cam-x/big.jpg,1300,800,1000,900,big-2\n"
        "cam-x/small.jpg,600,440,80,80,edge\n"          # clipped to 40x40 at the corner (42x42 padded): too small
        "cam-x/small.jpg,100,100,200,150,small-ok\n"
        "cam-x/gone.jpg,10,10,100,100,gone\n"
        "cam-x/other-day.jpg,10,10,100,100,other-day\n")
    ingest.ingest(engine, csv_path)
    (cam / "gone.jpg").unlink()
    return cam


def test_crop_partition_rows_files_and_rerun(engine, mixed_partition, crop_dir):
    settings = CropSettings(store_dir=str(crop_dir), min_crop_px=50, pad_fraction=0.05)
    report = cropping.crop_partition(engine, "cam-x", "2025-10-03", settings, workers=2)
    assert (report.detections, report.cropped, report.too_small, report.failed) == (5, 3, 1, 1)
    assert report.photos == 3
    assert report.decode_scales == {"1/4": 1, "1": 1}
    rows = {r["detection_id"]: r for r in crop_rows(engine)}
    assert set(rows) == {"big-1", "big-2", "edge", "small-ok", "gone"}        # not the other day
    big = rows["big-1"]
    assert (big["x0"], big["y0"], big["x1"], big["y1"]) == (40, 50, 1360, 1150)   # 5% padding
    assert big["decode_scale"] == 0.25 and big["status"] == "ok"
    assert (big["width"], big["height"]) == (330, 276)      # 12.5..287.5 at 1/4, rounded outwards
    assert rows["big-2"]["x1"] == 2350 and rows["big-2"]["y1"] == 1745
    edge = rows["edge"]
    assert edge["status"] == "too_small" and "42x42" in edge["reason"] and "min_crop_px=50" in edge["reason"]
    assert edge["crop_path"] is None
    gone = rows["gone"]
    assert gone["status"] == "failed" and "file not found" in gone["reason"]
    ok = rows["small-ok"]
    assert ok["decode_scale"] == 1.0 and (ok["width"], ok["height"]) == (220, 166)
    for r in (big, rows["big-2"], ok):
        path = crop_dir / r["crop_path"]
        assert path.exists() and r["crop_path"] == f"{r['crop_sha256'][:2]}/{r['crop_sha256']}.jpg"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == r["crop_sha256"]
        img = cropping.load_crop(crop_dir, r["crop_path"])
        assert img.mode == "RGB" and img.size == (r["width"], r["height"])
    assert not list(crop_dir.rglob(".tmp-*"))
    # the stored crop matches the full-size decode of the same region
    full = images.full_decode(mixed_partition / "big.jpg").crop((40, 48, 1360, 1152)).resize((330, 276))
    diff = np.abs(np.asarray(full, float) - np.asarray(cropping.load_crop(crop_dir, big["crop_path"]), float)).mean()
    assert diff < 5
    # re-cropping gives the same rows and files, never duplicates
    files = sorted(p.name for p in crop_dir.rglob("*.jpg"))
    again = cropping.crop_partition(engine, "cam-x", "2025-10-03", settings, workers=1)
    assert (again.cropped, again.too_small, again.failed) == (3, 1, 1)
    assert crop_rows(engine) == list(rows.values())
    assert sorted(p.name for p in crop_dir.rglob("*.jpg")) == files
    # an empty partition is fine
    assert cropping.crop_partition(engine, "cam-x", "2025-01-01", settings).detections == 0


def test_store_crop_is_content_addressed(tmp_path):
    rel, sha = cropping.store_crop(tmp_path, b"abc")
    assert rel == f"{sha[:2]}/{sha}.jpg" and (tmp_path / rel).read_bytes() == b"abc"
    assert cropping.store_crop(tmp_path, b"abc") == (rel, sha)
    assert len(list(tmp_path.rglob("*"))) == 2          # one folder, one file


def test_crops_asset_materialises_a_partition(engine, tmp_path, crop_dir):
    from deer_pipeline.defs.crops import crops_asset
    from deer_pipeline.defs.partitions import partition_key
    from deer_pipeline.defs.resources import CropStore, DeerDatabase

    info = sample.write_sample(tmp_path / "s", n_cameras=1, n_days=1, n_deer=3, encounters_per_day=(2, 2))
    report = ingest.ingest(engine, info.detections_json)
    camera, day = report.partitions[0]
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("camera", [camera])
    resources = {"database": DeerDatabase(), "crop_store": CropStore(root=str(crop_dir))}
    result = dg.materialize([crops_asset], partition_key=partition_key(camera, day), resources=resources,
                            instance=instance)
    assert result.success
    mat = result.asset_materializations_for_node("crops")[0]
    md = mat.metadata
    assert md["cropped"].value == info.n_detections and md["failed"].value == 0
    assert md["decode_scales"].value == {"1": info.n_images}
    first = crop_rows(engine)
    assert len(first) == info.n_detections and {r["status"] for r in first} == {"ok"}
    # second materialisation: same rows
    result2 = dg.materialize([crops_asset], partition_key=partition_key(camera, day), resources=resources,
                             instance=instance)
    assert result2.success and crop_rows(engine) == first


def test_crops_asset_reports_skipped_crops(engine, mixed_partition, crop_dir):
    from deer_pipeline.defs.crops import crops_asset
    from deer_pipeline.defs.resources import CropStore, DeerDatabase

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("camera", ["cam-x"])
    result = dg.materialize([crops_asset], partition_key="cam-x|2025-10-03", instance=instance,
                            resources={"database": DeerDatabase(), "crop_store": CropStore(root=str(crop_dir))})
    md = result.asset_materializations_for_node("crops")[0].metadata
    assert (md["cropped"].value, md["too_small"].value, md["failed"].value) == (3, 1, 1)
    table = md["skipped_crops"].value
    assert {r.data["detection_id"]: r.data["status"] for r in table.records} == {"edge": "too_small", "gone": "failed"}
