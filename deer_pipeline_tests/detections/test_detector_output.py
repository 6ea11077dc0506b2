"""Real detector output: MegaDetector 1.x batch files with low-confidence boxes, persons,
vehicles, other species, failures, video, bad names; SpeciesNet predictions.json. Each record
that is not a deer gets its reason; the deer are kept; nothing stored is lost or changed."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from deer_pipeline.detections import feed, formats, ingest
from deer_pipeline.settings import species_decision
from deer_pipeline_tests.detections.test_images import write_photo


def rows(engine, sql, **params):
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.text(sql), params)]


def md14(images, info=True, classifier=True):
    """A MegaDetector 1.4 batch file with a species classifier's categories."""
    doc = {"detection_categories": {"1": "animal", "2": "person", "3": "vehicle"}, "images": images}
    if info:
        doc["info"] = {"format_version": "1.4", "detector": "md_v5a.0.0.pt",
                       "detection_completion_time": "2025-10-03 10:00:00",
                       "detector_metadata": {"megadetector_version": "v5a.0.0",
                                             "typical_detection_threshold": 0.2,
                                             "conservative_detection_threshold": 0.05}}
    if classifier:
        doc["classification_categories"] = {"0": "white-tailed deer", "1": "raccoon", "2": "doe",
                                            "3": "wild turkey"}
    return doc


@pytest.fixture
def photos(tmp_path):
    cam = tmp_path / "cam-w"
    cam.mkdir()
    for i in range(5):
        write_photo(cam / f"p{i}.jpg", size=(400, 300), when=f"2025:10:03 06:0{i}:00", seed=40 + i)
    return tmp_path


def test_megadetector_14_keeps_the_deer_and_rejects_the_rest_with_reasons(engine, photos):
    doc = md14([
        {"file": "cam-w/p0.jpg", "detections": [
            {"category": "1", "conf": 0.93, "bbox": [0.1, 0.2, 0.3, 0.4], "classifications": [["0", 0.91]]},
            {"category": "1", "conf": 0.88, "bbox": [0.55, 0.3, 0.3, 0.4], "classifications": [["2", 0.8]]},
            {"category": "1", "conf": 0.01, "bbox": [0.0, 0.0, 0.05, 0.05], "classifications": [["0", 0.4]]},
            {"category": "1", "conf": 0.01, "bbox": [0.8, 0.8, 0.1, 0.1]},
        ]},
        {"file": "cam-w/p1.jpg", "detections": [
            {"category": "2", "conf": 0.95, "bbox": [0.1, 0.1, 0.2, 0.6]},                   # person
            {"category": "3", "conf": 0.9, "bbox": [0.5, 0.5, 0.4, 0.3]},                    # vehicle
        ]},
        {"file": "cam-w/p2.jpg", "detections": [
            {"category": "1", "conf": 0.9, "bbox": [0.2, 0.2, 0.3, 0.3], "classifications": [["1", 0.97]]},
            {"category": "1", "conf": 0.7, "bbox": [0.6, 0.1, 0.2, 0.2], "classifications": [["3", 0.8]]},
            {"category": "1", "conf": 0.8, "bbox": [0.1, 0.6, 0.2, 0.2]},                   # not classified
            {"category": "7", "conf": 0.9, "bbox": [0.4, 0.4, 0.1, 0.1]},                   # unknown category
            {"category": "1", "conf": 0.9, "bbox": [0.4, float("nan"), 0.1, 0.1], "classifications": [["0", 0.9]]},
        ]},
        {"file": "cam-w/p3.jpg", "failure": "Failure image access"},
        {"file": "cam-w/p0.jpg", "detections": [                                            # listed twice
            {"category": "1", "conf": 0.93, "bbox": [0.1, 0.2, 0.3, 0.4], "classifications": [["0", 0.91]]}]},
        {"file": "cam-w/clip.mp4", "frame_rate": 30, "detections": [
            {"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.2], "frame_number": 12}]},
        {"file": "cam-w/BAD_NAME", "detections": [
            {"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.2], "classifications": [["0", 0.9]]}]},
    ])
    text = json.dumps(doc)                      # json writes NaN, as MegaDetector's Python does
    raw = text.encode("utf-8").replace(b"BAD_NAME", b"caf\xe9.jpg")     # a Latin-1 byte: not UTF-8
    src = photos / "md.json"
    src.write_bytes(raw)

    report = ingest.ingest(engine, src)
    assert report.min_confidence == 0.2 and "typical_detection_threshold" in report.min_confidence_source
    dets = rows(engine, "SELECT d.*, i.path FROM detections d JOIN images i USING (image_id) "
                        "ORDER BY i.path, d.bbox_x, d.bbox_y")
    ok = [d for d in dets if d["status"] == "ok"]
    assert [(d["classification"], d["sex"]) for d in ok] == [("unknown", "unknown"), ("doe", "female")]
    reasons = sorted(d["reason"] for d in dets if d["status"] == "rejected")
    assert reasons == sorted([
        "confidence 0.010 below 0.2", "confidence 0.010 below 0.2",
        "category person, not an animal", "category vehicle, not an animal",
        "not a deer: raccoon", "not a deer: wild turkey",
        "animal without a species classification (pass --all-animals-are-deer to keep it)",
        "unknown category '7': not in the file's detection_categories",
        "box has a missing or non-numeric value"])
    rejected_records = {r["reason"] for r in rows(engine, "SELECT reason FROM ingest_rejections")}
    assert rejected_records == {"detector failed on this image: Failure image access",
                                "video: frames (frame_number) are not supported yet",
                                "file name is not valid UTF-8 ('cam-w/caf\\\\xe9.jpg')"}
    assert report.duplicates_skipped == 1                  # p0's repeated entry: the same box again
    assert any("listed more than once" in n for n in report.notes)
    # only the deer are work for the identity stage: no sightings can come from the rest
    work = feed.new_detections_since(engine, 0)
    assert [(w.camera_id, w.day, w.n_detections) for w in work] == [("cam-w", "2025-10-03", 2)]
    # the detector's info block is stored with the batch, with the rules applied
    (batch,) = rows(engine, "SELECT detector_info FROM ingest_batches")
    info = batch["detector_info"]
    assert info["info"]["detector_metadata"]["typical_detection_threshold"] == 0.2
    assert info["min_confidence"] == 0.2 and info["has_classifier"] is True
    summary = report.summary()
    assert "minimum confidence 0.2 (the file's typical_detection_threshold)" in summary
    assert "not a deer: raccoon" in summary and "not a deer: wild turkey" in summary
    assert "confidence N below N" in summary                # 2 boxes, one line

    # nothing stored is lost or changed by ingesting again, even with other rules
    before = rows(engine, "SELECT * FROM detections ORDER BY detection_id")
    again = ingest.ingest(engine, src, reprocess=True, min_confidence=0)
    assert again.new_detections == 0
    assert rows(engine, "SELECT * FROM detections ORDER BY detection_id") == before


def test_min_confidence_override_and_missing_info(engine, photos):
    doc = md14([{"file": "cam-w/p4.jpg", "detections": [
        {"category": "1", "conf": 0.01, "bbox": [0.1, 0.1, 0.2, 0.2], "classifications": [["0", 0.6]]},
        {"category": "1", "conf": 0.15, "bbox": [0.5, 0.5, 0.2, 0.2], "classifications": [["0", 0.6]]}]}],
        info=False)
    src = photos / "noinfo.json"
    src.write_text(json.dumps(doc))
    recs = formats.parse_megadetector(src)
    assert recs.info is None and any("no \"info\" block" in n for n in recs.notes)
    assert formats.default_min_confidence(recs) == (0.2, "default")
    # 0 keeps everything (stated in the summary)
    report = ingest.ingest(engine, src, min_confidence=0)
    assert report.rejected == 0 and report.new_detections == 2
    assert "every box kept" in report.summary()


def test_a_file_without_a_classifier_needs_all_animals_are_deer(engine, photos, capsys):
    doc = md14([{"file": "cam-w/p4.jpg", "detections": [
        {"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.2]},
        {"category": "2", "conf": 0.9, "bbox": [0.5, 0.1, 0.2, 0.5]}]}], classifier=False)
    src = photos / "noclass.json"
    src.write_text(json.dumps(doc))
    with pytest.raises(formats.IngestFileError, match="no species classifications"):
        ingest.ingest(engine, src)
    assert rows(engine, "SELECT count(*) AS n FROM ingest_batches")[0]["n"] == 0      # nothing stored
    assert ingest.main([str(src), "--quiet"]) == 2
    assert "--all-animals-are-deer" in capsys.readouterr().err
    assert ingest.main([str(src), "--all-animals-are-deer", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "every animal box taken as a deer (--all-animals-are-deer)" in out
    got = {d["status"]: d for d in rows(engine, "SELECT * FROM detections")}
    assert got["ok"]["classification"] == "unknown" and got["rejected"]["reason"] == "category person, not an animal"


def test_speciesnet_predictions_are_read_directly(engine, photos):
    deer = "5c7ce479-8a45-40b3-ae21-7c97dfae22f5;mammalia;cetartiodactyla;cervidae;odocoileus;virginianus;white-tailed deer"
    raccoon = "0c7c1bbc-f9ac-4ee9-b0f3-ad8f4e7cb9e4;mammalia;carnivora;procyonidae;procyon;lotor;raccoon"
    blank = "f1856211-cfb7-4a5b-9158-c0f72fd09ee6;;;;;;blank"
    doc = {"predictions": [
        {"filepath": str(photos / "cam-w" / "p0.jpg"), "prediction": deer, "prediction_score": 0.93,
         "prediction_source": "classifier", "model_version": "4.0.1a",
         "classifications": {"classes": [deer, raccoon], "scores": [0.93, 0.02]},
         "detections": [{"category": "1", "label": "animal", "conf": 0.91, "bbox": [0.1, 0.2, 0.3, 0.4]},
                        {"category": "1", "label": "animal", "conf": 0.03, "bbox": [0.7, 0.7, 0.1, 0.1]}]},
        {"filepath": str(photos / "cam-w" / "p1.jpg"), "prediction": raccoon, "prediction_score": 0.88,
         "model_version": "4.0.1a",
         "detections": [{"category": "1", "label": "animal", "conf": 0.8, "bbox": [0.3, 0.3, 0.3, 0.3]}]},
        {"filepath": str(photos / "cam-w" / "p2.jpg"), "prediction": blank, "prediction_score": 0.9,
         "detections": []},
        {"filepath": str(photos / "cam-w" / "p3.jpg"), "failures": ["DETECTOR", "CLASSIFIER"]},
    ]}
    src = photos / "predictions.json"
    src.write_text(json.dumps(doc))
    assert formats.detect_format(src) == "speciesnet"
    report = ingest.ingest(engine, src)
    assert report.format == "speciesnet"
    dets = {d["reason"] or "ok": d for d in rows(engine, "SELECT * FROM detections")}
    assert set(dets) == {"ok", "not a deer: raccoon", "confidence 0.030 below 0.2"}
    assert dets["ok"]["classification"] == "unknown" and dets["ok"]["source_format"] == "speciesnet"
    assert dets["ok"]["bbox_x"] == pytest.approx(40) and dets["ok"]["bbox_w"] == pytest.approx(120)
    assert [r["reason"] for r in rows(engine, "SELECT reason FROM ingest_rejections")] == [
        "detector failed on this image: DETECTOR, CLASSIFIER"]
    (batch,) = rows(engine, "SELECT detector_info FROM ingest_batches")
    assert batch["detector_info"]["info"]["model_versions"] == ["4.0.1a"]


@pytest.mark.parametrize("name, expected", [
    ("white-tailed deer", ("unknown", None)), ("Odocoileus virginianus", ("unknown", None)),
    ("Odocoileus spp.", ("unknown", None)), ("mule deer", ("unknown", None)), ("deer", ("unknown", None)),
    ("doe", ("doe", None)), ("mature buck", ("mature_buck", None)), ("fawn", ("fawn", None)),
    ("raccoon", (None, "not a deer: raccoon")), ("Wild Turkey", (None, "not a deer: wild turkey")),
    ("person", (None, "person, not an animal")), ("animal", (None, "not a deer: animal")),
    ("x;mammalia;cetartiodactyla;cervidae;odocoileus;;odocoileus species", ("unknown", None)),
    ("x;mammalia;cetartiodactyla;cervidae;cervus;canadensis;elk", (None, "not a deer: elk")),
])
def test_species_map(name, expected):
    assert species_decision(name) == expected
