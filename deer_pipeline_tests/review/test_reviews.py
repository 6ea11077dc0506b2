"""Review decisions as constraints of matching, against the real embedded PostgreSQL: they take
effect at once, survive every replay (serial and parallel backfills alike), names follow their
sightings, partitions nobody reviewed decide exactly as before; the CLI and CSV round trip."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from deer_pipeline.identity import reviews
from deer_pipeline.identity.matching import decide_partition
from deer_pipeline.identity.reviews import Review, constraints_from
from deer_pipeline.review import id_cli
from deer_pipeline.settings import MatchingSettings
from deer_pipeline_tests.identity.test_matching import (
    SETTINGS,
    T0,
    SyntheticWorld,
    _reset_decisions,
    _world_for_backfill,
    decide_in_parallel,
    deer_of,
    grouping,
)


def _serial(engine, parts):
    for cam, day in sorted(parts, key=lambda p: (p[1], p[0])):
        decide_partition(engine, cam, day, SETTINGS)


def _parallel(engine, parts, seed):
    return decide_in_parallel(engine, parts, seed, SETTINGS)


def _named(engine) -> dict[str, frozenset[str]]:
    """name -> the sightings of the deer carrying it."""
    with engine.connect() as conn:
        names = reviews.deer_names(conn)
        out = {}
        for deer, name in names.items():
            out[name] = frozenset(conn.execute(sa.text("SELECT detection_id FROM sightings WHERE deer_id = :d"),
                                               {"d": deer}).scalars())
    return out


def _members(engine, deer) -> list[str]:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT detection_id FROM sightings WHERE deer_id = :d ORDER BY "
                                    "captured_at, detection_id"), {"d": deer}).scalars().all()


# ---------------------------------------------------------------------------------------------

def test_later_decisions_win_and_unidentifiable_can_be_taken_back():
    r = [Review(1, "merge", ("a1", "a2"), ("b1", "b2")),
         Review(2, "split", ("b2",), ("a1", "a2", "b1")),
         Review(3, "unidentifiable", ("x",)),
         Review(4, "same", ("x",), ("a1",)),
         Review(5, "different", ("y",), ("a1",), undone_by=6),
         Review(6, "undo", ("y",), ("a1",), undoes=5)]
    c = constraints_from(r)
    assert c.excluded == {}                                   # the later 'same' re-admitted x
    assert [g for _, g in c.groups] == [{"a1", "a2", "b1", "b2"}, {"b2"}, {"a1", "a2", "b1"}, {"x", "a1"}]
    assert [(x, y) for _, x, y in c.cannot] == [({"b2"}, {"a1", "a2", "b1"})]   # the undone one is gone
    t = reviews.ReviewTracker(c, {"a1": 10, "a2": 10, "b1": 10})
    forced, refused = t.verdict(["b2"])
    # merge (1) says b2 joins deer 10, the later split (2) forbids it: the split wins
    assert forced is None and refused == {10}
    assert t.verdict(["x"]) == (10, set())


@pytest.mark.parametrize("search", ["exact", "hnsw"])
def test_a_same_decision_joins_two_sightings_that_matching_kept_apart_and_survives_replay(engine, search):
    SETTINGS = MatchingSettings(search=search)
    w = SyntheticWorld(engine)
    a = w.sighting("cam1", T0, "A")
    b = w.sighting("cam1", T0 + timedelta(minutes=5), "B")       # unlike A: a new deer
    a2 = w.sighting("cam1", T0 + timedelta(minutes=9), "A")
    decide_partition(engine, "cam1", "2024-05-01", SETTINGS)
    d = deer_of(engine)
    assert d[a] != d[b] and d[a2] == d[a]
    with engine.begin() as conn:
        rid = reviews.record(conn, "same", [b], [a], reviewer="ann")
    s = reviews.apply(engine, [a, b])
    assert s.reviewed == 1
    d = deer_of(engine)
    assert d[a] == d[b] == d[a2]
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT decision, score FROM sightings WHERE detection_id = :b"), {"b": b}).one()
    assert row.decision == "matched" and row.score < SETTINGS.reid_threshold   # forced, score kept honest
    for _ in range(2):                                                          # replays keep it
        decide_partition(engine, "cam1", "2024-05-01", SETTINGS)
        assert deer_of(engine) == d
    # undo: decided by the scores again
    with engine.begin() as conn:
        reviews.undo(conn, rid, reviewer="ann")
    reviews.apply(engine, [a, b])
    d = deer_of(engine)
    assert d[a] != d[b] and d[a2] == d[a]


def test_a_different_decision_is_a_cannot_link_next_to_the_same_frame_rule(engine):
    w = SyntheticWorld(engine)
    a = w.sighting("cam1", T0, "A")
    a2 = w.sighting("cam1", T0 + timedelta(minutes=5), "A")
    a3 = w.sighting("cam1", T0 + timedelta(minutes=9), "A")
    decide_partition(engine, "cam1", "2024-05-01", SETTINGS)
    assert len({deer_of(engine)[x] for x in (a, a2, a3)}) == 1
    with engine.begin() as conn:
        reviews.record(conn, "different", [a2], [a], reviewer="ann")
    reviews.apply(engine, [a, a2])
    d = deer_of(engine)
    assert d[a2] != d[a] and d[a3] in (d[a], d[a2])
    with engine.connect() as conn:
        refused = conn.execute(sa.text("SELECT count(*) FROM similarity_scores WHERE detection_id = :x "
                                       "AND candidate_deer_id = :d"), {"x": a2, "d": d[a]}).scalar_one()
    assert refused == 0                     # the refused deer is not even a candidate


def test_unidentifiable_sightings_leave_matching_and_the_unassigned_sensor_alone(engine):
    from deer_pipeline.detections import feed

    w = SyntheticWorld(engine)
    ids = [w.sighting("cam1", T0 + timedelta(minutes=i), "A") for i in range(3)]
    decide_partition(engine, "cam1", "2024-05-01", SETTINGS)
    with engine.begin() as conn:
        rid = reviews.record(conn, "unidentifiable", [ids[1]], reviewer="ann")
    s = reviews.apply(engine, [ids[1]])
    assert s.excluded_by_review == 1 and s.unassigned == 0
    assert set(deer_of(engine)) == {ids[0], ids[2]}
    assert feed.partitions_with_unassigned(engine) == []      # not retried forever
    with engine.begin() as conn:
        reviews.undo(conn, rid, reviewer="ann")
    reviews.apply(engine, [ids[1]])
    assert set(deer_of(engine)) == set(ids)


def test_the_review_table_is_append_only(engine):
    w = SyntheticWorld(engine)
    a = w.sighting("cam1", T0, "A")
    with engine.begin() as conn:
        rid = reviews.record(conn, "unidentifiable", [a], reviewer="ann")
    for sql in ("UPDATE identity_reviews SET reviewer = 'eve'", "DELETE FROM identity_reviews"):
        with pytest.raises(sa.exc.DBAPIError, match="append-only"):
            with engine.begin() as conn:
                conn.execute(sa.text(sql))
    with engine.begin() as conn:
        reviews.undo(conn, rid, reviewer="ann")
        with pytest.raises(reviews.ReviewError, match="already undone"):
            reviews.undo(conn, rid, reviewer="bob")
        with pytest.raises(reviews.ReviewError, match="unknown detection"):
            reviews.record(conn, "same", ["nope"], [a], reviewer="ann")


def test_merge_split_and_name_survive_serial_and_parallel_backfills(engine):
    w, parts = _world_for_backfill(engine, seed=3)
    _serial(engine, parts)
    before = grouping(engine)
    untouched_before = _snapshot(engine)
    # the two largest deer are one animal; then one sighting of it is another; then name it
    with engine.connect() as conn:
        big = conn.execute(sa.text("SELECT deer_id FROM deer ORDER BY sighting_count DESC, deer_id LIMIT 2")).scalars().all()
    x, y = big
    merged = set(_members(engine, x)) | set(_members(engine, y))
    print(id_cli.run(engine, "merge", [str(x), str(y)], reviewer="ann"))
    d = deer_of(engine)
    assert len({d[m] for m in merged}) == 1
    deer_xy = d[next(iter(merged))]
    stray = sorted(merged)[len(merged) // 2]
    print(id_cli.run(engine, "split", [str(deer_xy), stray], reviewer="bob"))
    d = deer_of(engine)
    rest = merged - {stray}
    assert len({d[m] for m in rest}) == 1 and d[stray] not in {d[m] for m in rest}
    print(id_cli.run(engine, "name", [str(d[next(iter(rest))]), "Old", "Nick"], reviewer="ann"))
    expected, expected_names = grouping(engine), _named(engine)
    assert expected != before
    assert expected_names == {"Old Nick": next(g for g in expected if rest <= g)}
    # partitions before the first reviewed moment were not touched
    first = _first_moment(engine, merged)
    assert _before(_snapshot(engine), first) == _before(untouched_before, first)

    _reset_decisions(engine)
    _serial(engine, parts)
    assert grouping(engine) == expected and _named(engine) == expected_names
    for seed in (21, 22):
        _reset_decisions(engine)
        results = _parallel(engine, parts, seed)
        assert sum(r.replayed for r in results) > 0
        assert grouping(engine) == expected and _named(engine) == expected_names
        assert sum(r.reviewed for r in results) > 0
    # separate processes (only the advisory lock keeps them apart), latest partition first
    import multiprocessing as mp

    from deer_pipeline_tests.identity.test_matching import _decide_in_process

    _reset_decisions(engine)
    url = engine.url.render_as_string(hide_password=False)
    with mp.get_context("spawn").Pool(2) as pool:
        pool.starmap(_decide_in_process, [(url, cam, day) for cam, day in parts[::-1]])
    assert grouping(engine) == expected and _named(engine) == expected_names


def test_partitions_nobody_reviewed_decide_exactly_as_before(engine):
    w, parts = _world_for_backfill(engine, seed=4)
    _serial(engine, parts)
    plain = _snapshot(engine)
    # a decision about the last day only
    last_day = max(day for _, day in parts)
    with engine.connect() as conn:
        late = conn.execute(sa.text(
            "SELECT s.detection_id FROM sightings s JOIN detections d USING (detection_id) WHERE d.day = :d "
            "ORDER BY d.captured_at LIMIT 2"), {"d": last_day}).scalars().all()
    with engine.begin() as conn:
        reviews.record(conn, "unidentifiable", late[:1], reviewer="ann")
        reviews.record(conn, "different", late[1:2], [late[0]], reviewer="ann")
    reviews.apply(engine, late)
    _reset_decisions(engine)
    _serial(engine, parts)
    now = _snapshot(engine)
    assert _before(now, last_day) == _before(plain, last_day)
    assert len(_before(plain, last_day)) > 0
    assert late[0] not in {r[0] for r in now}


def _snapshot(engine) -> list[tuple]:
    """Every decision with its day, deer (by founding detection: stable across renumbering)
    and scores."""
    with engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT s.detection_id, d.day::text, k.founding_detection_id, s.decision, round(s.score::numeric, 5), "
            "  (SELECT string_agg(round(sc.similarity::numeric, 5)::text || '@' || k2.founding_detection_id, ',' "
            "     ORDER BY sc.similarity DESC, k2.founding_detection_id) FROM similarity_scores sc "
            "     JOIN deer k2 ON k2.deer_id = sc.candidate_deer_id WHERE sc.detection_id = s.detection_id) "
            "FROM sightings s JOIN detections d USING (detection_id) JOIN deer k ON k.deer_id = s.deer_id "
            "ORDER BY 1")).all()


def _before(snapshot, day: str) -> list[tuple]:
    return [r for r in snapshot if r[1] < str(day)]


def _first_moment(engine, ids) -> str:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT min(day)::text FROM detections WHERE detection_id = ANY(:i)"),
                            {"i": list(ids)}).scalar_one()


def test_cli_and_csv_round_trip(engine, tmp_path, capsys):
    from deer_pipeline.review import cli as review_cli

    w = SyntheticWorld(engine)
    a = w.sighting("cam1", T0, "A")
    b = w.sighting("cam1", T0 + timedelta(minutes=5), "B")
    c = w.sighting("cam1", T0 + timedelta(minutes=9), "C")
    decide_partition(engine, "cam1", "2024-05-01", SETTINGS)
    d = deer_of(engine)
    assert id_cli.main(["merge", str(d[a]), str(d[b]), "--reviewer", "ann"]) == 0
    assert id_cli.main(["unidentifiable", c, "--reviewer", "ann", "--note", "blurred"]) == 0
    assert id_cli.main(["undo", "2", "--reviewer", "ann"]) == 0
    assert id_cli.main(["name", str(deer_of(engine)[a]), "Daisy", "--reviewer", "ann"]) == 0
    assert id_cli.main(["merge", "999999", str(d[a])]) == 2                  # refused, says why
    assert "does not exist" in capsys.readouterr().err
    grouped, names = grouping(engine), _named(engine)
    assert frozenset({a, b}) in grouped and names == {"Daisy": frozenset({a, b})}
    out = tmp_path / "decisions.csv"
    assert review_cli.main(["export", str(out)]) == 0
    text = out.read_text()
    assert text.splitlines()[0].startswith("review_id,kind,detections_a") and "blurred" in text

    # a fresh store: the file brings every decision back, twice changes nothing
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE identity_reviews RESTART IDENTITY CASCADE"))
    _reset_decisions(engine)
    decide_partition(engine, "cam1", "2024-05-01", SETTINGS)
    assert frozenset({a, b}) not in grouping(engine)
    assert review_cli.main(["apply", str(out)]) == 0
    assert grouping(engine) == grouped and _named(engine) == names
    assert review_cli.main(["apply", str(out)]) == 0
    with engine.connect() as conn:
        kinds = conn.execute(sa.text("SELECT kind FROM identity_reviews ORDER BY review_id")).scalars().all()
        undone = conn.execute(sa.text("SELECT count(*) FROM identity_reviews_status WHERE undone_by IS NOT NULL")).scalar_one()
    assert kinds == ["merge", "unidentifiable", "undo", "name"] and undone == 1


def test_reviewed_pairs_are_the_threshold_reports_truth(engine, tmp_path):
    from deer_pipeline.identity import threshold_report
    from deer_pipeline_tests.identity.test_matching import MODELS

    w = SyntheticWorld(engine)
    ids = [w.sighting("cam1", T0 + timedelta(minutes=i), ident) for i, ident in enumerate("ABAB")]
    decide_partition(engine, "cam1", "2024-05-01", SETTINGS)
    with engine.begin() as conn:
        reviews.record(conn, "same", [ids[2]], [ids[0]], reviewer="ann")
        reviews.record(conn, "different", [ids[1]], [ids[0], ids[2]], reviewer="ann")
        reviews.record(conn, "same", [ids[3]], [ids[1]], reviewer="bob")
        pairs = reviews.reviewed_pairs(conn)
    assert sorted(p[2] for p in pairs) == [False, False, True, True]
    rep = threshold_report.build_report(engine, components=MODELS, out_dir=tmp_path)
    assert rep.truth_source == "reviewed" and rep.pairs["n_pairs"] == 4
    assert rep.pairs["same"] == 2 and rep.recommended["truth_source"] == "reviewed"


def test_deer_profiles_metadata_counts_human_decisions_and_the_queue_check_warns(engine):
    import dagster as dg

    from deer_pipeline.defs.identity import deer_profiles
    from deer_pipeline.defs.partitions import CAMERA_PARTITIONS_NAME, partition_key
    from deer_pipeline.defs.resources import DeerDatabase, IdentitySettings, InferenceResource
    from deer_pipeline_tests.identity.test_matching import MODELS

    w = SyntheticWorld(engine, noise=0.9)          # noisy: scores spread around the threshold
    ids = [w.sighting("cam1", T0 + timedelta(minutes=i), ident) for i, ident in enumerate("ABABCAB")]
    decide_partition(engine, "cam1", "2024-05-01", SETTINGS)
    with engine.begin() as conn:
        reviews.record(conn, "different", [ids[2]], [ids[0]], reviewer="ann")

    def run(ident):
        return dg.materialize([deer_profiles], partition_key=partition_key("cam1", "2024-05-01"),
                              instance=instance, raise_on_error=False,
                              resources={"database": DeerDatabase(), "inference": InferenceResource(),
                                         "identity": ident})

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(CAMERA_PARTITIONS_NAME, ["cam1"])
        r = run(IdentitySettings(embedding_versions=dict(MODELS), search="exact", review_margin=1.0,
                                 review_queue_max_items=0))
        # the decision is recorded; (at this noise the blocking matches_happen check fails the
        # step, which is its job: nothing matched at 0.60)
        checks = {e.check_name: e for e in r.get_asset_check_evaluations()}
        assert checks["matches_happen"].passed or checks["matches_happen"].severity == dg.AssetCheckSeverity.ERROR
        meta = r.asset_materializations_for_node("deer_profiles")[0].metadata
        assert meta["review_decided"].value == 1 and meta["human_confirmed"].value == 1
        check = {e.check_name: e for e in r.get_asset_check_evaluations()}["review_queue_short"]
        assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
        assert check.metadata["open_items"].value > 0 and "wait for review" in check.description
        r2 = run(IdentitySettings(embedding_versions=dict(MODELS), search="exact", review_margin=1.0))
        assert {e.check_name: e for e in r2.get_asset_check_evaluations()}["review_queue_short"].passed
    assert deer_of(engine)[ids[2]] != deer_of(engine)[ids[0]]
