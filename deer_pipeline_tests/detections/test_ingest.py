import json
import math
import os
import shutil
from datetime import date, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from deer_pipeline.detections import encounters, formats, ingest
from deer_pipeline.settings import IngestSettings
from deer_pipeline_tests.detections.test_images import write_photo


def rows(engine, sql, **params):
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.text(sql), params)]


def snapshot(engine):
    """Every stored row that ingestion writes, to prove that nothing changed."""
    return {t: rows(engine, f"SELECT * FROM {t} ORDER BY 1") for t in
            ("cameras", "images", "detections", "ingest_rejections", "ingest_batches")}


def counts(engine):
    return {t: rows(engine, f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in
            ("cameras", "images", "detections", "ingest_rejections", "ingest_batches")}


def md_doc(images, classes=True):
    """A MegaDetector file; with ``classes`` a classifier ran: animal boxes without their own
    classifications are called 'white-tailed deer' (a deer of unknown sex and age)."""
    doc = {"detection_categories": {"1": "animal", "2": "person", "3": "vehicle"}, "images": images}
    if classes:
        doc["classification_categories"] = {"0": "doe", "1": "fawn", "2": "mature_buck", "3": "elk",
                                            "4": "white-tailed deer"}
        for image in images:
            for det in image.get("detections") or []:
                if isinstance(det, dict) and det.get("category") == "1" and "classifications" not in det:
                    det["classifications"] = [["4", 0.8]]
    return doc


@pytest.fixture
def md_input(tmp_path):
    cam = tmp_path / "cam-a"
    cam.mkdir()
    write_photo(cam / "f1.jpg", size=(400, 300), when="2025:10:02 06:30:15", seed=1)
    write_photo(cam / "f2.jpg", size=(400, 300), when="2025:10:02 06:30:18", seed=2)
    write_photo(cam / "f3.jpg", size=(400, 300), when="2025:10:02 09:00:00", seed=3)
    doc = md_doc([
        {"file": "cam-a/f1.jpg", "detections": [
            {"category": "1", "conf": 0.93, "bbox": [0.1, 0.2, 0.3, 0.4], "classifications": [["0", 0.9], ["1", 0.1]]},
            {"category": "1", "conf": 0.81, "bbox": [0.5, 0.3, 0.25, 0.5], "classifications": [["2", 0.7]]},
        ]},
        {"file": "cam-a/f2.jpg", "detections": [
            {"category": "1", "conf": 0.9, "bbox": [0.12, 0.21, 0.3, 0.4]},
            {"category": "2", "conf": 0.95, "bbox": [0.6, 0.1, 0.2, 0.6]},
        ]},
        {"file": "cam-a/f3.jpg", "detections": [
            {"category": "1", "conf": 0.7, "bbox": [0.4, 0.4, 0.2, 0.2], "classifications": [["1", 0.8]]},
        ]},
        {"file": "cam-a/f4.jpg", "detections": []},
    ])
    path = tmp_path / "md.json"
    path.write_text(json.dumps(doc))
    return path


def test_megadetector_round_trip_and_idempotent(engine, md_input):
    report = ingest.ingest(engine, md_input)
    assert (report.records, report.new_detections, report.duplicates_skipped) == (5, 5, 0)
    assert report.rejected == report.rejected_detections == 1          # the person
    assert report.cameras == ["cam-a"]
    assert report.partitions == [("cam-a", "2025-10-02")]
    dets = {(d["bbox_x"], d["bbox_y"]): d for d in rows(engine, "SELECT * FROM detections")}
    doe = dets[(40.0, 60.0)]
    assert doe["bbox_w"] == pytest.approx(120) and doe["bbox_h"] == pytest.approx(120)
    assert (doe["classification"], doe["sex"], doe["status"]) == ("doe", "female", "ok")
    assert doe["captured_at"] == datetime(2025, 10, 2, 6, 30, 15, tzinfo=timezone.utc)
    assert doe["day"] == date(2025, 10, 2) and doe["camera_id"] == "cam-a"
    assert dets[(200.0, 90.0)]["classification"] == "mature_buck" and dets[(200.0, 90.0)]["sex"] == "male"
    assert dets[(48.0, 63.0)]["classification"] == "unknown"          # no classification given
    person = [d for d in dets.values() if d["status"] == "rejected"]
    assert len(person) == 1 and person[0]["reason"] == "category person, not an animal"
    imgs = rows(engine, "SELECT * FROM images ORDER BY path")
    assert [i["captured_at_source"] for i in imgs] == ["exif"] * 3
    assert all(i["status"] == "ok" and i["width"] == 400 and len(i["sha256"]) == 64 for i in imgs)
    batch = rows(engine, "SELECT * FROM ingest_batches")[0]
    assert (batch["n_records"], batch["n_new"], batch["n_rejected"]) == (5, 5, 1)
    # seq comes from the database default and follows insertion order
    seqs = [r["seq"] for r in rows(engine, "SELECT seq FROM detections ORDER BY seq")]
    assert seqs == sorted(set(seqs)) and None not in seqs

    before = snapshot(engine)
    again = ingest.ingest(engine, md_input)
    assert again.already_ingested and again.new_detections == 0 and again.records == 5
    forced = ingest.ingest(engine, md_input, reprocess=True)
    assert (forced.new_detections, forced.duplicates_skipped, forced.rejected) == (0, 5, 0)
    assert snapshot(engine) == before

    # the same photos and file moved to another disk: hashed ids match by photo content
    moved = md_input.parent / "moved"
    shutil.copytree(md_input.parent / "cam-a", moved / "cam-a")
    shutil.copy(md_input, moved / "md.json")
    r3 = ingest.ingest(engine, moved / "md.json", reprocess=True)
    assert (r3.new_detections, r3.duplicates_skipped, r3.rejected) == (0, 5, 0)
    assert counts(engine)["detections"] == 5


def test_csv_round_trip_times_and_ids(engine, tmp_path):
    cam = tmp_path / "photos"
    cam.mkdir()
    write_photo(cam / "exif.jpg", size=(300, 200), when="2025:10:05 12:00:00", seed=4)
    write_photo(cam / "noexif.png", size=(300, 200), when=None, fmt="PNG", seed=5)
    write_photo(cam / "mtime.jpg", size=(300, 200), when=None, seed=6)
    mtime = datetime(2025, 10, 6, 23, 59, 30, tzinfo=timezone.utc).timestamp()
    os.utime(cam / "mtime.jpg", (mtime, mtime))
    csv_path = tmp_path / "dets.csv"
    csv_path.write_text(
        "image_path,x,y,w,h,detection_id,camera_id,captured_at,classification,confidence\n"
        "photos/exif.jpg,10,20,100,80,det-1,cam-b,2024-01-01T00:00:00Z,Doe,0.9\n"
        "photos/noexif.png,30,40,50,60,det-2,cam-b,2025-10-05T23:30:00-02:00,young buck,\n"
        "photos/mtime.jpg,5,5,40,40,,,,,\n")
    report = ingest.ingest(engine, csv_path)
    assert (report.records, report.new_detections, report.rejected) == (3, 3, 0)
    got = {d["detection_id"]: d for d in rows(engine, "SELECT d.*, i.captured_at_source AS src FROM detections d "
                                                      "JOIN images i USING (image_id)")}
    assert got["det-1"]["src"] == "exif"                      # EXIF wins over the input's time
    assert got["det-1"]["captured_at"] == datetime(2025, 10, 5, 12, tzinfo=timezone.utc)
    assert got["det-2"]["src"] == "input" and got["det-2"]["day"] == date(2025, 10, 6)   # 01:30 UTC next day
    assert got["det-2"]["classification"] == "young_buck" and got["det-2"]["confidence"] is None
    hashed = [d for k, d in got.items() if k not in ("det-1", "det-2")][0]
    assert hashed["src"] == "file_mtime" and hashed["camera_id"] == "photos"   # camera from the folder
    assert hashed["captured_at"] == datetime(2025, 10, 6, 23, 59, 30, tzinfo=timezone.utc)
    assert hashed["bbox_w"] == 40 and hashed["classification"] == "unknown"
    before = snapshot(engine)
    assert ingest.ingest(engine, csv_path, reprocess=True).new_detections == 0
    assert snapshot(engine) == before
    # the hashed id is stable: the same row in another CSV file is a duplicate, not a new detection
    other = tmp_path / "again.csv"
    other.write_text("image_path,x,y,w,h\nphotos/mtime.jpg,5,5,40,40\n")
    r2 = ingest.ingest(engine, other)
    assert (r2.new_detections, r2.duplicates_skipped, r2.rejected) == (0, 1, 0)


def test_folder_ingest_whole_frame(engine, tmp_path):
    root = tmp_path / "cam-c"
    (root / "sub").mkdir(parents=True)
    write_photo(root / "a.jpg", size=(320, 240), when="2025:10:03 05:00:00", seed=7)
    write_photo(root / "sub" / "b.JPG", size=(160, 120), when="2025:10:03 05:00:02", seed=8)
    (root / "notes.txt").write_text("not a photo")
    report = ingest.ingest(engine, root, camera="cam-c")
    assert (report.format, report.records, report.new_detections) == ("folder", 2, 2)
    dets = rows(engine, "SELECT d.*, i.width FROM detections d JOIN images i USING (image_id) ORDER BY i.width")
    assert [(d["bbox_x"], d["bbox_y"], d["bbox_w"], d["bbox_h"]) for d in dets] == [(0, 0, 160, 120), (0, 0, 320, 240)]
    assert {d["classification"] for d in dets} == {"unknown"} and {d["camera_id"] for d in dets} == {"cam-c"}
    assert len({d["encounter_id"] for d in dets}) == 1             # 2 s apart: one burst
    assert ingest.ingest(engine, root, camera="cam-c").already_ingested
    assert counts(engine)["detections"] == 2


def test_bad_input_is_recorded_and_the_batch_goes_on(engine, tmp_path):
    cam = tmp_path / "cam-d"
    cam.mkdir()
    write_photo(cam / "good.jpg", size=(400, 300), seed=9)
    good_bytes = (cam / "good.jpg").read_bytes()
    (cam / "trunc.jpg").write_bytes(good_bytes[: len(good_bytes) // 2])
    (cam / "fake.jpg").write_text("this is not a jpeg")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    write_photo(outside / "o.jpg", size=(400, 300), seed=10)
    doc = md_doc([
        {"file": "cam-d/good.jpg", "detections": [
            {"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.2], "id": "ok-1"},
            {"category": "1", "conf": 0.9, "bbox": [0.9, 0.8, 0.3, 0.4], "id": "clipped"},
            {"category": "1", "conf": 0.9, "bbox": [1.2, 0.1, 0.1, 0.1], "id": "outside"},
            {"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.0, 0.1], "id": "zero"},
            {"category": "1", "conf": 0.9, "bbox": [0.1, None, 0.1, 0.1], "id": "nan"},
            {"category": "1", "conf": 0.9, "bbox": [0.3, 0.3, 0.1, 0.1], "id": "elk", "classifications": [["3", 0.9]]},
            {"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.2], "id": "ok-1"},       # same again
            {"category": "1", "conf": 0.9, "bbox": [0.5, 0.5, 0.2, 0.2], "id": "ok-1"},       # same id, other box
            {"category": "1", "conf": 0.9, "bbox": [0.2, 0.2, 0.2, 0.2], "id": "piped", "camera_id": None},
        ]},
        {"file": "cam-d/good.jpg", "camera_id": "cam|d", "detections": [
            {"category": "1", "conf": 0.9, "bbox": [0.2, 0.2, 0.2, 0.2], "id": "bad-camera"}]},
        {"file": "cam-d/missing.jpg", "datetime": "2025-10-04 10:00:00", "detections": [
            {"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.2], "id": "m"}]},
        {"file": "cam-d/trunc.jpg", "detections": [{"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.2], "id": "t"}]},
        {"file": "cam-d/fake.jpg", "detections": [{"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.2], "id": "f"}]},
        {"file": str(outside / "o.jpg"), "detections": [{"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.2], "id": "o"}]},
        {"file": "cam-d/good.jpg", "failure": "Failure image access"},
    ])
    src = tmp_path / "bad.json"
    src.write_text(json.dumps(doc))
    settings = IngestSettings(image_roots=(str(tmp_path / "cam-d"),))
    report = ingest.ingest(engine, src, settings=settings)

    dets = {d["detection_id"]: d for d in rows(engine, "SELECT * FROM detections")}
    assert dets["ok-1"]["status"] == "ok" and dets["ok-1"]["bbox_x"] == pytest.approx(40)
    c = dets["clipped"]
    assert c["status"] == "ok" and (c["bbox_x"], c["bbox_y"]) == pytest.approx((360, 240))
    assert (c["bbox_w"], c["bbox_h"]) == pytest.approx((40, 60))                      # clipped at 400x300
    assert dets["piped"]["status"] == "ok" and dets["piped"]["camera_id"] == "cam-d"
    expected = {
        "outside": "box lies outside the 400x300 image",
        "zero": "box has zero or negative size",
        "nan": "box has a missing or non-numeric value",
        "elk": "not a deer: elk",
        "m": "image missing",
        "t": "image unreadable: truncated",
        "f": "image unreadable: named like a JPEG but is not an image",
    }
    for did, reason in expected.items():
        assert dets[did]["status"] == "rejected", did
        assert dets[did]["reason"].startswith(reason), (did, dets[did]["reason"])
    assert dets["m"]["captured_at"] == datetime(2025, 10, 4, 10, tzinfo=timezone.utc)   # input time kept
    imgs = {os.path.basename(i["path"]): i for i in rows(engine, "SELECT * FROM images")}
    assert imgs["missing.jpg"]["status"] == "missing" and imgs["missing.jpg"]["reason"] == "file not found"
    assert imgs["trunc.jpg"]["status"] == "unreadable" and "truncated" in imgs["trunc.jpg"]["reason"]
    assert imgs["fake.jpg"]["status"] == "unreadable"
    assert "o.jpg" not in imgs and "o" not in dets        # outside the roots: refused, never opened
    rejections = rows(engine, "SELECT * FROM ingest_rejections ORDER BY rejection_id")
    reasons = [r["reason"] for r in rejections]
    assert any(r.startswith("camera id 'cam|d' is not usable") for r in reasons)
    assert any(r.startswith("duplicate detection id 'ok-1' with different content") for r in reasons)
    assert any(r.startswith("detector failed on this image") for r in reasons)
    assert any(r.startswith("photo path is outside the image roots") for r in reasons)
    assert [c["camera_id"] for c in rows(engine, "SELECT camera_id FROM cameras")] == ["cam-d"]
    assert all(r["line"] is not None and r["source_path"] == str(src) for r in rejections)
    assert [r["line"] for r in rejections if "cam|d" in r["reason"]] == [2]
    assert report.duplicates_skipped == 1
    assert report.records == report.new_detections + report.duplicates_skipped + report.rejected_records
    assert report.rejected_detections == 7 and report.rejected_records == 4

    # a second file reusing ids with other content: recorded, stored rows unchanged
    before = snapshot(engine)
    src2 = tmp_path / "bad2.json"
    src2.write_text(json.dumps(md_doc([{"file": "cam-d/good.jpg", "detections": [
        {"category": "1", "conf": 0.5, "bbox": [0.6, 0.6, 0.1, 0.1], "id": "ok-1"},
        {"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.2], "id": "ok-1-copy"}]}])))
    r2 = ingest.ingest(engine, src2, settings=settings)
    assert (r2.new_detections, r2.rejected_records) == (1, 1)
    after = snapshot(engine)
    assert [d for d in after["detections"] if d["detection_id"] != "ok-1-copy"] == before["detections"]
    assert after["images"] == before["images"]
    new_rej = after["ingest_rejections"][-1]
    assert new_rej["reason"].startswith("duplicate detection id 'ok-1' with different content (stored from batch")
    assert new_rej["line"] == 1 and new_rej["record"]["detection"]["id"] == "ok-1"


@pytest.mark.parametrize("name, text, line, words", [
    ("broken.json", '{"images": [\n  {"file": "a.jpg",\n  }\n]}', 3, "invalid JSON"),
    ("nope.json", '{"results": []}', 1, "no top-level \"images\" list"),
    ("cols.csv", "image_path,x,y\na.jpg,1,2\n", 1, "missing required column(s) w, h"),
    ("ragged.csv", "image_path,x,y,w,h\na.jpg,1,2,3,4\nb.jpg,1,2\n", 3, "fields where the header has"),
])
def test_malformed_file_raises_naming_file_and_line(engine, tmp_path, name, text, line, words):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(formats.IngestFileError) as err:
        ingest.ingest(engine, p)
    assert err.value.line == line and str(p) in str(err.value) and words in str(err.value)
    assert counts(engine)["detections"] == 0 and counts(engine)["ingest_batches"] == 0


def test_bursts_group_frames_and_keep_two_deer_apart(engine, tmp_path):
    cam = tmp_path / "cam-e"
    cam.mkdir()
    times = ["06:00:00", "06:00:03", "06:00:07", "06:00:20", "06:00:22"]
    for i, t in enumerate(times):
        write_photo(cam / f"f{i}.jpg", size=(200, 150), when=f"2025:10:02 {t}", seed=20 + i)
    images_ = [{"file": f"cam-e/f{i}.jpg", "detections": [
        {"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.3, 0.3]}]} for i in (0, 1, 2, 4)]
    images_[1]["detections"].append({"category": "1", "conf": 0.8, "bbox": [0.6, 0.5, 0.3, 0.3]})   # two deer
    p = tmp_path / "bursts.json"
    p.write_text(json.dumps(md_doc(images_)))
    ingest.ingest(engine, p)
    got = rows(engine, "SELECT d.detection_id, d.encounter_id, d.image_id, i.path FROM detections d "
                       "JOIN images i USING (image_id) ORDER BY i.path, d.bbox_x")
    enc = {os.path.basename(g["path"]): g["encounter_id"] for g in got}
    assert enc["f0.jpg"] == enc["f1.jpg"] == enc["f2.jpg"] == "cam-e-2025-10-02T06:00:00Z"
    assert enc["f4.jpg"] == "cam-e-2025-10-02T06:00:22Z"
    pair = [g for g in got if g["path"].endswith("f1.jpg")]
    assert len(pair) == 2 and pair[0]["detection_id"] != pair[1]["detection_id"]
    assert pair[0]["image_id"] == pair[1]["image_id"] and pair[0]["encounter_id"] == pair[1]["encounter_id"]
    # a later file bridges the gap (06:00:20 is within 5 s of 06:00:22 but 13 s after 06:00:07)
    p2 = tmp_path / "late.json"
    p2.write_text(json.dumps(md_doc([{"file": "cam-e/f3.jpg", "detections": [
        {"category": "1", "conf": 0.9, "bbox": [0.2, 0.2, 0.3, 0.3]}]}])))
    ingest.ingest(engine, p2)
    enc2 = {os.path.basename(g["path"]): g["encounter_id"] for g in rows(
        engine, "SELECT d.encounter_id, i.path FROM detections d JOIN images i USING (image_id)")}
    assert enc2["f3.jpg"] == enc2["f4.jpg"] == "cam-e-2025-10-02T06:00:20Z"
    assert enc2["f0.jpg"] == "cam-e-2025-10-02T06:00:00Z"
    # a wider window chains everything
    with engine.begin() as conn:
        encounters.recompute_encounters(conn, ["cam-e"], 15)
    assert {r["encounter_id"] for r in rows(engine, "SELECT encounter_id FROM detections")} == {"cam-e-2025-10-02T06:00:00Z"}


def test_cli_prints_report(engine, md_input, capsys):
    assert ingest.main([str(md_input), "--burst-window-s", "5"]) == 0
    out = capsys.readouterr().out
    assert "new detections     5 (4 ok, 1 rejected)" in out and "cam-a|2025-10-02" in out
    assert ingest.main([str(md_input)]) == 0
    assert "already ingested" in capsys.readouterr().out
    assert ingest.main([str(md_input), "--camera", "bad|cam"]) == 2


def test_helpers():
    assert formats.sanitise_folder_camera("Camera 01") == "Camera-01"
    assert formats.sanitise_folder_camera("___") is None
    assert formats.parse_time("2025:10:02 06:30:15") == datetime(2025, 10, 2, 6, 30, 15, tzinfo=timezone.utc)
    assert formats.parse_time("not a time") is None and formats.parse_time(float("nan")) is None
    a = ingest.detection_id_for("megadetector", "abc", "0.1000,0.2000,0.3000,0.4000")
    assert a == ingest.detection_id_for("megadetector", "abc", "0.1000,0.2000,0.3000,0.4000") and a.startswith("d")
    assert not math.isnan(len(a))


# ---------------------------------------------------------------------------------------------
# Odd inputs (issue 14): image roots, odd dates, confidences, collisions, camera ids


def test_paths_outside_the_image_roots_are_refused_unopened_with_no_camera(engine, tmp_path, capsys):
    survey, outside = tmp_path / "survey", tmp_path / "outside"
    (survey / "cam-a").mkdir(parents=True)
    outside.mkdir()
    write_photo(survey / "cam-a" / "ok.jpg", seed=1)
    write_photo(outside / "x.jpg", seed=2)
    (survey / "cam-a" / "link.jpg").symlink_to(outside / "x.jpg")
    box = [{"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.5, 0.5]}]
    files = ["cam-a/ok.jpg", "../outside/x.jpg", str(outside / "x.jpg"), "cam-a/link.jpg",
             "../../../../../../../../etc/passwd", "cam-a/../../outside/x.jpg"]
    src = survey / "dets.json"
    src.write_text(json.dumps(md_doc([{"file": f, "detections": box} for f in files])))

    assert ingest.main([str(src)]) == 0                       # the command, with its defaults
    out = capsys.readouterr().out
    assert "rejected records   5" in out
    reasons = [r["reason"] for r in rows(engine, "SELECT reason FROM ingest_rejections")]
    assert len(reasons) == 5 and all(r.startswith("photo path is outside the image roots") for r in reasons)
    assert not any("root:" in r for r in reasons)
    assert [r["camera_id"] for r in rows(engine, "SELECT camera_id FROM cameras")] == ["cam-a"]
    assert [os.path.basename(r["path"]) for r in rows(engine, "SELECT path FROM images")] == ["ok.jpg"]

    # --image-root names the folders photos may come from; the symlink's target is inside now
    src2 = survey / "dets2.json"
    src2.write_text(json.dumps(md_doc([{"file": "cam-a/link.jpg", "detections": box}])))
    report = ingest.ingest(engine, src2, settings=IngestSettings(image_roots=(str(survey), str(outside))))
    assert report.new_detections == 1 and report.rejected == 0


def test_detections_outside_the_day_partitions_are_held_with_the_reason(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("DEER_START_DATE", "2024-01-01")
    cam = tmp_path / "cam-h"
    cam.mkdir()
    for name in ("old", "good", "soon"):
        write_photo(cam / f"{name}.jpg", when=None, seed=len(name))
    tomorrow = (datetime.now(timezone.utc).date() + timedelta(days=1)).isoformat()
    csv_path = tmp_path / "dets.csv"
    csv_path.write_text("image_path,x,y,w,h,detection_id,captured_at\n"
                        "cam-h/old.jpg,10,10,100,100,old,2019-05-01T10:00:00Z\n"
                        "cam-h/good.jpg,10,10,100,100,good,2025-10-02T10:00:00Z\n"
                        f"cam-h/soon.jpg,10,10,100,100,soon,{tomorrow}T10:00:00Z\n")
    report = ingest.ingest(engine, csv_path)
    assert report.held == 2 and report.partitions == [("cam-h", "2025-10-02")]
    dets = {d["detection_id"]: d for d in rows(engine, "SELECT * FROM detections")}
    assert dets["good"]["status"] == "ok"
    assert dets["old"]["status"] == "held" and "before the first day partition 2024-01-01" in dets["old"]["reason"]
    assert dets["soon"]["status"] == "held" and "held until its day is over" in dets["soon"]["reason"]


def test_confidence_outside_0_1_is_rejected(engine, tmp_path):
    cam = tmp_path / "cam-c"
    cam.mkdir()
    write_photo(cam / "f.jpg", seed=3)
    dets = [{"category": "1", "conf": c, "bbox": [0.1 * i, 0.1, 0.2, 0.2], "id": f"c{i}"}
            for i, c in enumerate([1.5, -0.1, 1.0, 0.0])]
    src = tmp_path / "conf.json"
    src.write_text(json.dumps(md_doc([{"file": "cam-c/f.jpg", "detections": dets}])))
    ingest.ingest(engine, src, min_confidence=0)      # 0 keeps every box: only the bounds decide
    got = {d["detection_id"]: d for d in rows(engine, "SELECT detection_id, status, reason FROM detections")}
    assert got["c0"]["status"] == got["c1"]["status"] == "rejected"
    assert got["c0"]["reason"] == "confidence 1.5 outside [0, 1]"
    assert got["c2"]["status"] == got["c3"]["status"] == "ok"


def test_a_collision_keeps_the_records_own_reason(engine, tmp_path):
    cam = tmp_path / "cam-d"
    cam.mkdir()
    write_photo(cam / "f.jpg", seed=4)
    src = tmp_path / "dup.json"
    src.write_text(json.dumps(md_doc([{"file": "cam-d/f.jpg", "detections": [
        {"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.2], "id": "same"},
        {"category": "2", "conf": 0.9, "bbox": [0.5, 0.5, 0.2, 0.2], "id": "same"}]}])))
    ingest.ingest(engine, src)
    (reason,) = [r["reason"] for r in rows(engine, "SELECT reason FROM ingest_rejections")]
    assert reason.startswith("category person, not an animal; also duplicate detection id 'same'")


def test_explicit_camera_ids_are_kept_and_unicode_names_get_readable_ids(engine, tmp_path):
    kam = tmp_path / "Kamera Süd"
    kam.mkdir()
    write_photo(kam / "f.jpg", seed=5)
    write_photo(kam / "g.jpg", seed=6)
    ingest.ingest(engine, kam)                                  # folder: camera from the folder name
    csv_path = tmp_path / "dets.csv"
    csv_path.write_text("image_path,x,y,w,h,detection_id,camera_id\n"
                        "Kamera Süd/f.jpg,10,10,100,100,explicit,cam-x\n"
                        "Kamera Süd/g.jpg,10,10,100,100,nord,Kamera Nord-Ö\n")
    ingest.ingest(engine, csv_path)
    cams = {r["camera_id"]: r["original_name"] for r in rows(engine, "SELECT * FROM cameras")}
    assert cams == {"Kamera-Sud": "Kamera Süd", "cam-x": None, "Kamera-Nord-O": "Kamera Nord-Ö"}
    got = {d["detection_id"]: d["camera_id"] for d in rows(engine, "SELECT detection_id, camera_id FROM detections")}
    assert got["explicit"] == "cam-x"                           # not the camera stored for the photo
    assert got["nord"] == "Kamera-Nord-O"
