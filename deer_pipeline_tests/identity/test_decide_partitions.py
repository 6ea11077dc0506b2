"""Several camera x day partitions decided jointly (``matching.decide_partitions``, one
transaction, one withdrawal, one replay) end exactly as deciding them one by one."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
import sqlalchemy as sa

from deer_pipeline.identity.matching import decide_partition, decide_partitions
from deer_pipeline.settings import MatchingSettings
from deer_pipeline_tests.identity.test_matching import T0, fail_at_append, wandering_world

SETTINGS = MatchingSettings(search="exact")


def _world(engine, seed=5):
    """Five cameras over two days; deer wander between cameras, a burst with two animals, sexes
    mixed so the sex filter matters."""
    w, parts = wandering_world(engine, [f"cam{c}" for c in range(5)], days=2, per_partition=6, n_deer=9,
                               n_female=5, minutes=720, seed=seed)
    w.burst("cam1", T0 + timedelta(minutes=333), [("deer1", "doe"), ("deer6", "mid_buck")])
    return w, parts


def _state(engine):
    """The decisions in terms that do not depend on deer numbering: deer as sets of
    detections, founders, every sighting's decision and score, every stored score by the
    candidate deer's founder."""
    with engine.connect() as conn:
        founder = dict(conn.execute(sa.text("SELECT deer_id, founding_detection_id FROM deer")).all())
        sightings = {r.detection_id: (founder[r.deer_id], r.decision, r.score, r.partition_key)
                     for r in conn.execute(sa.text(
                         "SELECT detection_id, deer_id, decision, score, partition_key FROM sightings"))}
        scores = {(r.detection_id, founder.get(r.candidate_deer_id, r.candidate_deer_id)):
                  (r.similarity, r.matched, r.partition_key, r.components)
                  for r in conn.execute(sa.text(
                      "SELECT detection_id, candidate_deer_id, similarity, matched, partition_key, "
                      "score_components(component_models, component_scores, components) components "
                      "FROM similarity_scores"))}
    groups: dict[str, set[str]] = {}
    for det, (f, *_rest) in sightings.items():
        groups.setdefault(f, set()).add(det)
    return {frozenset(g) for g in groups.values()}, set(founder.values()), sightings, scores


def _reset(engine):
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE similarity_scores, sightings, deer_profile_vectors, deer CASCADE"))


def _same(a, b):
    groups_a, founders_a, sight_a, scores_a = a
    groups_b, founders_b, sight_b, scores_b = b
    assert groups_a == groups_b
    assert founders_a == founders_b
    assert sight_a.keys() == sight_b.keys()
    for det in sight_a:
        fa, da, sa_, pa = sight_a[det]
        fb, db_, sb, pb = sight_b[det]
        assert (fa, da, pa) == (fb, db_, pb)
        assert (sa_ is None) == (sb is None)
        if sa_ is not None:
            assert sa_ == pytest.approx(sb, abs=1e-9)
    assert scores_a.keys() == scores_b.keys()
    for k in scores_a:
        assert scores_a[k][0] == pytest.approx(scores_b[k][0], abs=1e-9)
        assert scores_a[k][1:3] == scores_b[k][1:3]
        for m, v in scores_a[k][3].items():
            assert v == pytest.approx(scores_b[k][3][m], abs=1e-9)


def test_deciding_partitions_jointly_equals_deciding_them_one_by_one(engine):
    w, parts = _world(engine)
    n_dets = len(w.truth)
    day1 = [p for p in parts if p[1] == parts[0][1]]
    day2 = [p for p in parts if p[1] != parts[0][1]]

    # one by one, in an order that makes later partitions replay earlier ones
    shuffled = parts[:]
    random.Random(1).shuffle(shuffled)
    singles = [decide_partition(engine, c, d, SETTINGS) for c, d in shuffled]
    assert sum(s.replayed for s in singles) > 0
    expected = _state(engine)
    assert sum(len(g) for g in expected[0]) == n_dets
    part = {det: v[3] for det, v in expected[2].items()}
    assert any(len({part[d] for d in g}) > 2 for g in expected[0])     # deer seen by several partitions
    assert sum(v[1] == "matched" for v in expected[2].values()) > n_dets / 2

    # every camera of both days in one call
    _reset(engine)
    joint = decide_partitions(engine, parts, SETTINGS)
    assert [s.partition_key for s in joint] == [f"{c}|{d}" for c, d in parts]
    assert all(s.replayed == 0 for s in joint)          # nothing outside the set was decided
    _same(_state(engine), expected)
    # each summary holds its own partition's counts, as the store has them
    with engine.connect() as conn:
        per_part = {r.partition_key: (r.n, r.matched, r.new, r.deer) for r in conn.execute(sa.text(
            "SELECT partition_key, count(*) n, count(*) FILTER (WHERE decision = 'matched') matched, "
            "count(DISTINCT encounter_key) FILTER (WHERE decision = 'new') new, "
            "array_agg(DISTINCT deer_id ORDER BY deer_id) deer FROM sightings GROUP BY 1"))}
        n_scores = dict(conn.execute(sa.text(
            "SELECT partition_key, count(*) FROM similarity_scores GROUP BY 1")).all())
    for s in joint:
        assert (s.decided, s.matched, s.new_deer, s.deer_ids) == tuple(per_part[s.partition_key])
        assert s.score_rows == n_scores.get(s.partition_key, 0)
        assert s.unassigned == 0 and s.encounters > 0
    assert sum(s.decided for s in joint) == n_dets

    # day by day, cameras of a day together, the later day first (it is replayed by the earlier)
    _reset(engine)
    later = decide_partitions(engine, day2, SETTINGS)
    earlier = decide_partitions(engine, day1, SETTINGS)
    assert sum(s.decided for s in later) > 0
    assert all(s.replayed == earlier[0].replayed > 0 for s in earlier)   # the replay is shared
    assert set(earlier[0].replayed_partitions) == {f"{c}|{d}" for c, d in day2}
    _same(_state(engine), expected)

    # deciding the whole set again changes nothing
    again = decide_partitions(engine, list(reversed(parts)), SETTINGS)
    assert [s.partition_key for s in again] == [f"{c}|{d}" for c, d in reversed(parts)]
    _same(_state(engine), expected)


def test_partitions_named_twice_are_refused_and_none_is_nothing(engine):
    assert decide_partitions(engine, [], SETTINGS) == []
    with pytest.raises(ValueError):
        decide_partitions(engine, [("cam1", "2024-05-01"), ("cam1", "2024-05-01")], SETTINGS)


def test_a_failure_in_a_joint_decision_leaves_every_partition_as_it_was(engine, monkeypatch):
    w, parts = _world(engine, seed=8)
    day1 = [p for p in parts if p[1] == parts[0][1]]
    decide_partitions(engine, day1, SETTINGS)
    before = _state(engine)
    fail_at_append(monkeypatch, 10, "simulated crash between partitions")   # while deciding day 2
    with pytest.raises(RuntimeError, match="simulated"):
        decide_partitions(engine, parts, SETTINGS)
    monkeypatch.undo()
    assert _state(engine) == before                  # nothing of the failed call was written
    # the rerun decides everything, as one by one would
    decide_partitions(engine, parts, SETTINGS)
    joint = _state(engine)
    _reset(engine)
    for c, d in parts:
        decide_partition(engine, c, d, SETTINGS)
    _same(joint, _state(engine))


def test_one_refused_camera_does_not_hold_back_the_others_of_its_day(engine):
    """A camera whose detections are embedded only with other versions is refused (no deer
    created); the day's other cameras and the later days are decided exactly as if the refused
    camera were not there, and the refusal names it."""
    from deer_pipeline.identity import daily
    from deer_pipeline_tests.identity.test_matching import SyntheticWorld

    w, parts = _world(engine, seed=11)
    day0 = parts[0][1]
    other = SyntheticWorld(engine, seed=12, models={"multiscale": "ms-test-v2", "efficientnet_b0": "eb0-test-v2"})
    other.sighting("cam-bad", T0 + timedelta(minutes=30), "deer1")
    good = list(parts)

    with pytest.raises(daily.PartitionsRefused) as refused:
        daily.decide_days(engine, good + [("cam-bad", day0)], SETTINGS, versions=dict(w.models))
    assert [k for k, _ in refused.value.refused] == [f"cam-bad|{day0}"]
    assert "none has vectors for every configured version" in refused.value.refused[0][1]
    assert sorted(s.partition_key for s in refused.value.summaries) == sorted(f"{c}|{d}" for c, d in good)
    with_refusal = _state(engine)
    assert not any(det.startswith("cam-bad") for det in with_refusal[2])       # nothing decided for it

    _reset(engine)
    daily.decide_days(engine, good, SETTINGS, versions=dict(w.models))
    _same(with_refusal, _state(engine))
