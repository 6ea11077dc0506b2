from datetime import datetime, timedelta, timezone

from deer_pipeline.detections.encounters import (
    DetectionBox,
    LinkSettings,
    build_encounters,
    cannot_link,
    consensus_sex,
    iou,
    track_burst,
)

T0 = datetime(2024, 5, 1, 6, 0, tzinfo=timezone.utc)


def box(det, image, t, x, y, w=100, h=80, burst="b1", sex="unknown"):
    return DetectionBox(det, image, T0 + timedelta(seconds=t), burst, x, y, w, h, sex)


def test_two_deer_walking_through_a_burst_become_two_tracks():
    dets = [
        box("a1", 1, 0, 0, 0), box("b1", 1, 0, 400, 300),
        box("a2", 2, 1, 20, 5), box("b2", 2, 1, 390, 310),
        box("a3", 3, 2, 40, 10), box("b3", 3, 2, 380, 320),
    ]
    encs = build_encounters(dets)
    groups = sorted(sorted(e.detection_ids) for e in encs)
    assert groups == [["a1", "a2", "a3"], ["b1", "b2", "b3"]]
    # keys are the founding detection, stable
    assert {e.encounter_key for e in encs} == {"enc:a1", "enc:b1"}
    # the two tracks share frames: cannot-link both ways
    cl = cannot_link(encs)
    assert cl["enc:a1"] == {"enc:b1"} and cl["enc:b1"] == {"enc:a1"}


def test_detections_of_one_frame_are_never_linked_even_when_boxes_overlap():
    # two deer standing almost on top of each other in every frame
    dets = [box("a1", 1, 0, 0, 0), box("b1", 1, 0, 5, 5), box("a2", 2, 1, 0, 0), box("b2", 2, 1, 5, 5)]
    for track in track_burst(dets):
        images = [d.image_id for d in track]
        assert len(images) == len(set(images))
    encs = build_encounters(dets)
    assert len(encs) == 2 and all(len(e.detections) == 2 for e in encs)
    # Hungarian picks the consistent pairing (a with a, b with b)
    assert sorted(sorted(e.detection_ids) for e in encs) == [["a1", "a2"], ["b1", "b2"]]


def test_gate_refuses_a_jump_across_the_frame():
    dets = [box("a1", 1, 0, 0, 0), box("a2", 2, 1, 1500, 900)]
    assert iou(dets[0], dets[1]) == 0
    assert len(build_encounters(dets)) == 2
    # a generous gate links them
    assert len(build_encounters(dets, LinkSettings(min_iou=0.0, max_centre_distance=100))) == 1


def test_a_track_may_skip_a_frame_and_bursts_never_mix():
    dets = [box("a1", 1, 0, 0, 0), box("a3", 3, 2, 10, 0),          # hidden in frame 2
            box("x1", 2, 1, 900, 600),                              # another deer in frame 2
            box("c1", 10, 0, 0, 0, burst="b2")]                      # same place, other burst
    encs = build_encounters(dets)
    groups = sorted(sorted(e.detection_ids) for e in encs)
    assert groups == [["a1", "a3"], ["c1"], ["x1"]]
    # decision order is capture order, ties by founding detection id
    assert [e.encounter_key for e in encs] == ["enc:a1", "enc:c1", "enc:x1"]


def test_detections_without_a_burst_are_one_encounter_each():
    dets = [box("p", 1, 0, 0, 0, burst=None), box("q", 2, 1, 0, 0, burst=None)]
    assert len(build_encounters(dets)) == 2


def test_consensus_sex_is_the_most_specific_sex_seen():
    assert consensus_sex(["unknown", "female", "unknown"]) == "female"
    assert consensus_sex(["male", "unknown"]) == "male"
    assert consensus_sex(["unknown"]) == "unknown"
    assert consensus_sex(["male", "female"]) == "unknown"
    assert consensus_sex(["male", "female", "male"]) == "male"
