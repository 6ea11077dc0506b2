"""Flank-aware galleries against the real embedded PostgreSQL: ingestion reads a side / flank /
viewpoint field into ``detections.side``, and matching never compares a sighting with the other
flank of a deer (a sighting whose side is unknown is compared with both)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import sqlalchemy as sa

from deer_pipeline.detections import formats, ingest
from deer_pipeline.identity.matching import decide_partition
from deer_pipeline.settings import MatchingSettings
from deer_pipeline_tests.detections.test_images import write_photo
from deer_pipeline_tests.detections.test_ingest import md_doc, rows
from deer_pipeline_tests.identity.test_matching import T0, SyntheticWorld, deer_of


def test_side_values_are_read_as_left_right_or_unknown():
    assert formats.parse_side("Left") == ("left", True) and formats.parse_side("R") == ("right", True)
    assert formats.parse_side("frontleft") == ("left", True)          # Wildbook viewpoints
    assert formats.parse_side("back_right") == ("right", True)
    for unknown in (None, "", "unknown", "front", "up"):
        assert formats.parse_side(unknown) == (None, True)
    assert formats.parse_side("sideways") == (None, False)


def test_ingest_stores_the_side_of_csv_and_megadetector_boxes(engine, tmp_path):
    cam = tmp_path / "cam-a"
    cam.mkdir()
    for i in range(5):
        write_photo(cam / f"f{i}.jpg", size=(300, 200), when=f"2025:10:02 0{i}:00:00", seed=i)
    csv_path = tmp_path / "dets.csv"
    csv_path.write_text("image_path,x,y,w,h,detection_id,side\n"
                        "cam-a/f0.jpg,10,20,100,80,c-left,left\n"
                        "cam-a/f1.jpg,10,20,100,80,c-right,R\n"
                        "cam-a/f2.jpg,10,20,100,80,c-unknown,unknown\n"
                        "cam-a/f3.jpg,10,20,100,80,c-odd,sideways\n"
                        "cam-a/f4.jpg,10,20,100,80,c-blank,\n")
    report = ingest.ingest(engine, csv_path)
    assert report.new_detections == 5 and report.rejected == 0
    assert any("1 box(es) with a side value that is not left or right ('sideways'" in n for n in report.notes)
    assert "sideways" in report.summary()
    side = {r["detection_id"]: r["side"] for r in rows(engine, "SELECT detection_id, side FROM detections")}
    assert side == {"c-left": "left", "c-right": "right", "c-unknown": None, "c-odd": None, "c-blank": None}

    flank_col = tmp_path / "flank.csv"                        # the column may be called flank
    flank_col.write_text("image_path,x,y,w,h,detection_id,flank\ncam-a/f0.jpg,150,20,100,80,c-flank,right\n")
    ingest.ingest(engine, flank_col)
    doc = md_doc([{"file": "cam-a/f1.jpg", "detections": [
        {"id": "m-left", "category": "1", "conf": 0.9, "bbox": [0.5, 0.5, 0.3, 0.3], "side": "left"},
        {"id": "m-view", "category": "1", "conf": 0.9, "bbox": [0.1, 0.5, 0.3, 0.3], "viewpoint": "backright"},
        {"id": "m-none", "category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.2, 0.2]}]}])
    (tmp_path / "md.json").write_text(json.dumps(doc))
    ingest.ingest(engine, tmp_path / "md.json")
    side = {r["detection_id"]: r["side"] for r in rows(engine, "SELECT detection_id, side FROM detections")}
    assert (side["c-flank"], side["m-left"], side["m-view"], side["m-none"]) == ("right", "left", "right", None)


def _set_side(engine, detection_id, side):
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE detections SET side = :s WHERE detection_id = :d"), {"s": side, "d": detection_id})


def _scores_against(engine, detection_id, deer):
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM similarity_scores WHERE detection_id = :d "
                                    "AND candidate_deer_id = :c"), {"d": detection_id, "c": deer}).scalar_one()


def _decision(engine, detection_id):
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT decision FROM sightings WHERE detection_id = :d"),
                            {"d": detection_id}).scalar_one()


@pytest.mark.parametrize("search", ["exact", "two_stage", "hnsw"])
def test_a_left_flank_sighting_is_not_matched_by_a_right_flank_gallery_sighting_and_an_unknown_one_is(
        engine, search):
    settings = MatchingSettings(search=search)
    w = SyntheticWorld(engine, noise=0.3)
    right = w.sighting("cam1", T0, "A")                                   # the gallery: A's right flank
    left = w.sighting("cam1", T0 + timedelta(minutes=10), "A")           # A again, left flank
    left2 = w.sighting("cam1", T0 + timedelta(minutes=20), "A")          # A's left flank once more
    unknown = w.sighting("cam1", T0 + timedelta(minutes=30), "A")        # A again, side unknown
    for d, s in ((right, "right"), (left, "left"), (left2, "left")):
        _set_side(engine, d, s)
    summary = decide_partition(engine, "cam1", T0.date(), settings)
    d = deer_of(engine)
    assert _decision(engine, left) == "new" and d[left] != d[right]       # not compared with the right flank
    assert _scores_against(engine, left, d[right]) == 0
    assert _decision(engine, left2) == "matched" and d[left2] == d[left]  # the same flank matches
    assert _scores_against(engine, left2, d[right]) == 0
    assert summary.other_flank_only == 2
    assert _decision(engine, unknown) == "matched"                         # unknown: compared with both
    assert _scores_against(engine, unknown, d[right]) == 1 and _scores_against(engine, unknown, d[left]) == 1

    # the control: without flank awareness the same vectors make one deer of all four
    decide_partition(engine, "cam1", T0.date(), MatchingSettings(search=search, flank_aware=False))
    d = deer_of(engine)
    assert len({d[x] for x in (right, left, unknown, left2)}) == 1


@pytest.mark.parametrize("search,gallery", [("exact", "in run"), ("two_stage", "in run"),
                                            ("two_stage", "kept in memory"), ("two_stage", "read from the store"),
                                            ("hnsw", "read from the store")])
def test_the_other_flank_cannot_crowd_the_same_flank_out_of_the_candidates(engine, search, gallery):
    # deer B's right flank looks exactly like A's new left-flank photo; with one candidate deer
    # re-scored, ranking by the unmasked score would offer only B (then refused: other flank).
    # Two-stage ranks deer by a profile per flank, so B's right-flank profile is not compared;
    # the HNSW look-up leaves the other flank's sightings out of what it returns.
    from deer_pipeline.identity import gallery_cache

    w = SyntheticWorld(engine, noise=0.3)
    look = {m: w.vector("A", m) for m in w.models}
    b_right = w.frame("cam1", T0, [("B", "doe")], vectors={0: look})[0]
    a_left = w.sighting("cam1", T0 + timedelta(minutes=10), "A")
    later = T0 + (timedelta(days=1) if gallery != "in run" else timedelta(minutes=20))
    query = w.frame("cam1", later, [("A", "doe")], vectors={0: look})[0]
    for d, s in ((b_right, "right"), (a_left, "left"), (query, "left")):
        _set_side(engine, d, s)
    settings = MatchingSettings(search=search, candidate_deer=1, profile_candidate_deer=1, hnsw_ef_search=1)
    decide_partition(engine, "cam1", T0.date(), settings)
    if gallery != "in run":      # the gallery decided the day before: kept, or read with its flanks
        if gallery == "read from the store":
            gallery_cache.clear()
        s2 = decide_partition(engine, "cam1", later.date(), settings)
        if search != "hnsw":
            assert s2.gallery_cache == ("hit" if gallery == "kept in memory" else "none")
    d = deer_of(engine)
    assert d[a_left] != d[b_right] and d[query] == d[a_left] and _decision(engine, query) == "matched"
    assert _scores_against(engine, query, d[b_right]) == 0
