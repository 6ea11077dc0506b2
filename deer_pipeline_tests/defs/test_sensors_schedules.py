"""The new-detections sensor and the nightly schedule, against the real embedded PostgreSQL."""

from __future__ import annotations

import datetime as dt

import dagster as dg
import sqlalchemy as sa

from deer_pipeline.defs.partitions import CAMERA_PARTITIONS_NAME
from deer_pipeline.defs.resources import DeerDatabase


def _add_detections(engine, camera: str, day: str, n: int, status: str = "ok", start: int = 0) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO cameras (camera_id) VALUES (:c) ON CONFLICT DO NOTHING"), {"c": camera})
        for i in range(start, start + n):
            image_id = conn.execute(sa.text(
                "INSERT INTO images (path, camera_id, captured_at, captured_at_source, width, height) "
                "VALUES (:p, :c, :t, 'input', 640, 480) RETURNING image_id"),
                {"p": f"/x/{camera}/{day}/{i}.jpg", "c": camera, "t": f"{day}T12:00:{i:02d}+00:00"}).scalar_one()
            conn.execute(sa.text(
                "INSERT INTO detections (detection_id, image_id, camera_id, captured_at, day, bbox_x, bbox_y,"
                " bbox_w, bbox_h, classification, sex, status) VALUES (:d, :i, :c, :t, :day, 10, 10, 100, 100,"
                " 'doe', 'female', :s)"),
                {"d": f"{camera}-{day}-{i}", "i": image_id, "c": camera, "t": f"{day}T12:00:{i:02d}+00:00",
                 "day": day, "s": status})


def _evaluate(instance, cursor=None) -> dg.SensorResult:
    from deer_pipeline.defs.sensors import new_detections_sensor

    ctx = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"database": DeerDatabase()})
    return new_detections_sensor(ctx)


def _partitions_of(request, instance) -> list[str]:
    """The camera x day partitions a run request is for: its range as Dagster resolves it
    (cameras in the order they were added x days), narrowed to the cameras it names."""
    from deer_pipeline.defs.partitions import CAMERAS_TAG, RANGE_END_TAG, RANGE_START_TAG, camera_day_partitions

    assert request.partition_key is None
    keys = camera_day_partitions.get_partition_keys_in_range(
        dg.PartitionKeyRange(request.tags[RANGE_START_TAG], request.tags[RANGE_END_TAG]),
        dynamic_partitions_store=instance)
    cameras = set(request.tags[CAMERAS_TAG].split(","))
    return sorted(str(k) for k in keys if k.keys_by_dimension["camera"] in cameras)


def test_sensor_adds_cameras_and_requests_one_run_per_day(engine):
    _add_detections(engine, "cam-a", "2025-10-01", 3)
    _add_detections(engine, "cam-a", "2025-10-02", 2)
    _add_detections(engine, "cam-b", "2025-10-01", 1)
    _add_detections(engine, "cam-c", "2025-10-01", 2, status="rejected")  # rejected: no work

    with dg.instance_for_test() as instance:
        result = _evaluate(instance)
        # one run per day, covering every camera of the day with new detections
        assert len(result.run_requests) == 2
        (add,) = result.dynamic_partitions_requests
        assert add.partitions_def_name == CAMERA_PARTITIONS_NAME
        assert sorted(add.partition_keys) == ["cam-a", "cam-b"]
        instance.add_dynamic_partitions(CAMERA_PARTITIONS_NAME, list(add.partition_keys))
        first, second = result.run_requests
        assert _partitions_of(first, instance) == ["cam-a|2025-10-01", "cam-b|2025-10-01"]
        assert _partitions_of(second, instance) == ["cam-a|2025-10-02"]
        assert first.tags["deer/new_detections"] == "4" and second.tags["deer/new_detections"] == "2"
        assert len({r.run_key for r in result.run_requests}) == 2

        # The next tick with the returned cursor has nothing to do.
        again = _evaluate(instance, cursor=result.cursor)
        assert not again.run_requests
        assert again.skip_reason is not None

        # New detections on a known day give one new run with a new run key, no new camera.
        _add_detections(engine, "cam-a", "2025-10-02", 1, start=50)
        later = _evaluate(instance, cursor=result.cursor)
        assert [_partitions_of(r, instance) for r in later.run_requests] == [["cam-a|2025-10-02"]]
        assert later.run_requests[0].run_key not in {r.run_key for r in result.run_requests}
        assert not later.dynamic_partitions_requests
        assert int(later.cursor) > int(result.cursor)


def test_a_day_run_skips_the_cameras_between_those_with_work(engine):
    """Dagster names a run's partitions by a range: a rectangle of the camera order. Cameras
    inside it without new work are in the range but not in the run's ``deer/cameras``."""
    from deer_pipeline.defs.partitions import CAMERAS_TAG, RANGE_END_TAG, RANGE_START_TAG

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(CAMERA_PARTITIONS_NAME, ["cam-a", "cam-b", "cam-c"])
        _add_detections(engine, "cam-a", "2025-10-01", 1)
        _add_detections(engine, "cam-c", "2025-10-01", 1)
        _add_detections(engine, "cam-d", "2025-10-01", 1)          # a new camera, added last
        (request,) = _evaluate(instance).run_requests
        assert (request.tags[RANGE_START_TAG], request.tags[RANGE_END_TAG]) == ("cam-a|2025-10-01",
                                                                               "cam-d|2025-10-01")
        assert request.tags[CAMERAS_TAG] == "cam-a,cam-c,cam-d"
        instance.add_dynamic_partitions(CAMERA_PARTITIONS_NAME, ["cam-d"])
        assert _partitions_of(request, instance) == ["cam-a|2025-10-01", "cam-c|2025-10-01", "cam-d|2025-10-01"]


def test_nightly_schedule_requests_one_run_for_yesterday_with_every_camera_with_detections(engine):
    from deer_pipeline.definitions import defs

    _add_detections(engine, "cam-a", "2025-10-04", 2)
    _add_detections(engine, "cam-b", "2025-10-04", 1)
    _add_detections(engine, "cam-b", "2025-10-03", 1)           # another day: not this night's run
    _add_detections(engine, "cam-new", "2025-10-04", 1)         # not a partition yet: the sensor's
    schedule = defs.get_schedule_def("nightly_identification_schedule")
    assert schedule.cron_schedule == "0 2 * * *"

    def tick(instance, day):
        # as a context manager: the context opens its own instance from the ref, closed on exit
        with dg.build_schedule_context(
                instance=instance, resources={"database": DeerDatabase()},
                scheduled_execution_time=dt.datetime(2025, 10, day, 2, 0, tzinfo=dt.timezone.utc)) as ctx:
            return schedule.evaluate_tick(ctx)

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(CAMERA_PARTITIONS_NAME, ["cam-a", "cam-c", "cam-b"])
        data = tick(instance, 5)
        (request,) = data.run_requests
        assert _partitions_of(request, instance) == ["cam-a|2025-10-04", "cam-b|2025-10-04"]
        assert request.run_key == "nightly|2025-10-04"
        # a night without detections the day before is skipped
        empty = tick(instance, 3)
        assert not empty.run_requests and "no camera has detections on 2025-10-02" in empty.skip_message


def test_definitions_load():
    from deer_pipeline.definitions import defs

    repo = defs.get_repository_def()
    names = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    assert {"crops", "embeddings", "deer_profiles", "similarity_scores", "threshold_report"} <= names
    assert defs.get_sensor_def("new_detections_sensor") is not None
    assert defs.get_sensor_def("unassigned_detections_sensor") is not None
    assert defs.resolve_job_def("identification_job") is not None


def test_unassigned_sensor_requests_partitions_with_unassigned_detections_once_per_state(engine):
    from deer_pipeline.defs.sensors import unassigned_detections_sensor

    _add_detections(engine, "cam-a", "2025-10-01", 2)
    _add_detections(engine, "cam-b", "2025-10-02", 1)
    with engine.begin() as conn:
        # cam-b's detection is assigned to a deer; one of cam-a's has a crop too small to ever match
        conn.execute(sa.text(
            "INSERT INTO deer (founding_detection_id, sex) VALUES ('cam-b-2025-10-02-0', 'female')"))
        conn.execute(sa.text(
            "INSERT INTO sightings (detection_id, deer_id, encounter_key, partition_key, decision,"
            " embedding_version) VALUES ('cam-b-2025-10-02-0', 1, 'e', 'cam-b|2025-10-02', 'new', 'v')"))
        conn.execute(sa.text(
            "INSERT INTO crops (detection_id, status, reason) VALUES ('cam-a-2025-10-01-1', 'too_small', 'x')"))

    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(instance=instance, resources={"database": DeerDatabase()})
        result = unassigned_detections_sensor(ctx)
        instance.add_dynamic_partitions(CAMERA_PARTITIONS_NAME, ["cam-a", "cam-b"])
        assert [_partitions_of(r, instance) for r in result.run_requests] == [["cam-a|2025-10-01"]]
        assert result.run_requests[0].tags["deer/unassigned_detections"] == "1"
        first_key = result.run_requests[0].run_key
        # Same state, same run key: Dagster never launches it twice.
        again = unassigned_detections_sensor(dg.build_sensor_context(
            instance=instance, resources={"database": DeerDatabase()}))
        assert again.run_requests[0].run_key == first_key
        # Once the detection is assigned there is nothing left to do.
        with engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO sightings (detection_id, deer_id, encounter_key, partition_key, decision,"
                " embedding_version) VALUES ('cam-a-2025-10-01-0', 1, 'e2', 'cam-a|2025-10-01', 'matched', 'v')"))
        done = unassigned_detections_sensor(dg.build_sensor_context(
            instance=instance, resources={"database": DeerDatabase()}))
        assert not done.run_requests and done.skip_reason is not None


def test_sensor_skips_detections_outside_the_day_partitions_and_its_cursor_advances(engine):
    """A detection dated before the start date and one dated tomorrow (stored ok by an older
    ingest, or by hand) never block the others: they are held, the sensor requests runs for the
    rest (valid partitions), its cursor moves past them, and they come back once their day is
    a partition."""
    from deer_pipeline.defs.partitions import START_DATE, camera_day_partitions
    from deer_pipeline.detections import feed
    from deer_pipeline.settings import last_partition_day

    tomorrow = (dt.datetime.now(dt.timezone.utc).date() + dt.timedelta(days=1)).isoformat()
    before = (dt.date.fromisoformat(START_DATE) - dt.timedelta(days=1)).isoformat()
    _add_detections(engine, "cam-a", before, 1)
    _add_detections(engine, "cam-a", "2025-10-01", 2)
    _add_detections(engine, "cam-a", tomorrow, 1)
    _add_detections(engine, "cam-b", "2025-10-02", 1)
    with engine.connect() as conn:
        top_seq = conn.execute(sa.text("SELECT max(seq) FROM detections")).scalar()

    with dg.instance_for_test() as instance:
        result = _evaluate(instance)
        instance.add_dynamic_partitions(CAMERA_PARTITIONS_NAME, ["cam-a", "cam-b"])
        keys = sorted(k for r in result.run_requests for k in _partitions_of(r, instance))
        assert keys == ["cam-a|2025-10-01", "cam-b|2025-10-02"]
        valid = set(camera_day_partitions.get_partition_keys(dynamic_partitions_store=instance))
        assert set(keys) <= valid                       # no DagsterUnknownPartitionError
        assert int(result.cursor) >= top_seq             # moved past the odd ones
        with engine.connect() as conn:
            held = dict(conn.execute(sa.text(
                "SELECT day::text, reason FROM detections WHERE status = 'held'")).all())
        assert set(held) == {before, tomorrow}
        assert "before the first day partition" in held[before] and "held until its day is over" in held[tomorrow]
        again = _evaluate(instance, cursor=result.cursor)
        assert not again.run_requests and "2 held" in again.skip_reason.skip_message

        # The day arrives (or DEER_START_DATE moves back): released with a new seq, new work.
        tomorrow_date = dt.date.fromisoformat(tomorrow)
        counts = feed.sync_held(engine, dt.date.fromisoformat(before), tomorrow_date)
        assert (counts.released, counts.held) == (2, 0)
        work = feed.new_detections_since(engine, int(result.cursor))
        assert sorted((w.camera_id, w.day) for w in work) == [("cam-a", before), ("cam-a", tomorrow)]
        # ... and held again at the real range, never lost
        assert feed.sync_held(engine, dt.date.fromisoformat(START_DATE), last_partition_day()).held == 2
