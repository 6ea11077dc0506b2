"""Runs over many camera x day partitions (one run per day of all cameras, as the sensor and the
nightly schedule launch them), through Dagster on the real embedded PostgreSQL: a day of 20
cameras decided in one run ends exactly as 20 separate runs, and a run killed between two days
leaves every day decided or untouched and is finished by running it again."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import dagster as dg
import sqlalchemy as sa

from deer_pipeline.defs import checks as check_defs
from deer_pipeline.defs.identity import deer_profiles, similarity_scores
from deer_pipeline.defs.partitions import CAMERA_PARTITIONS_NAME, partition_key, range_tags
from deer_pipeline.defs.resources import DeerDatabase, IdentitySettings, InferenceResource
from deer_pipeline_tests.identity.test_decide_partitions import _reset, _same, _state
from deer_pipeline_tests.identity.test_matching import MODELS, T0, SyntheticWorld

REPO = Path(__file__).resolve().parents[2]


def _identity() -> IdentitySettings:
    return IdentitySettings(embedding_versions=dict(MODELS), search="exact")


def _resources() -> dict:
    return {"database": DeerDatabase(), "identity": _identity(), "inference": InferenceResource()}


def _world(engine, cameras: list[str], days: int, per_camera: int = 3, seed: int = 3):
    """Deer wander between ``cameras`` over ``days`` days: each camera sees ``per_camera`` deer a
    day at random times, does and bucks mixed (the sex filter matters)."""
    w = SyntheticWorld(engine, seed=seed)
    rnd = random.Random(seed)
    idents = [f"deer{i}" for i in range(12)]
    with w.batch():
        for day in range(days):
            for cam in cameras:
                for _ in range(per_camera):
                    ident = rnd.choice(idents)
                    cls = rnd.choice(["doe", "unknown"]) if int(ident[4:]) < 6 else rnd.choice(["mid_buck", "fawn"])
                    w.sighting(cam, T0 + timedelta(days=day, minutes=rnd.randrange(0, 720)), ident, cls=cls)
    return w


def _materialize(instance, assets, **kw):
    return dg.materialize(assets, instance=instance, resources=_resources(), raise_on_error=False, **kw)


def test_a_day_of_20_cameras_in_one_run_decides_as_20_separate_runs(engine):
    cameras = [f"cam{i:02d}" for i in range(20)]
    day = T0.date().isoformat()
    w = _world(engine, cameras, days=1)
    with dg.instance_for_test() as instance:
        # an idle camera added between the others: inside the run's range, not one of its cameras
        order = cameras[:10] + ["cam-idle"] + cameras[10:]
        instance.add_dynamic_partitions(CAMERA_PARTITIONS_NAME, order)

        # 20 separate single-partition runs, in camera order (later captures are replayed)
        separate = [_materialize(instance, [deer_profiles], partition_key=partition_key(c, day)) for c in cameras]
        assert all(r.success for r in separate)
        replayed = [r.asset_materializations_for_node("deer_profiles")[0].metadata["replayed"].value
                    for r in separate]
        assert sum(replayed) > 0
        expected = _state(engine)
        assert sum(len(g) for g in expected[0]) == len(w.truth) == 60
        assert len(expected[0]) < 30                    # deer were matched across cameras

        # one run over the day's 20 cameras, as the sensor and the schedule request it
        _reset(engine)
        tags = range_tags(cameras, day, day, order)
        one = _materialize(instance, [deer_profiles, similarity_scores], tags=tags)
        assert one.success
        _same(_state(engine), expected)

        # Dagster records one materialization per partition of the range; each decided partition
        # has its own figures, the idle camera says why it was skipped
        mats = {str(m.partition): m.metadata for m in one.asset_materializations_for_node("deer_profiles")}
        assert set(mats) == {f"{c}|{day}" for c in order}
        assert mats[f"cam-idle|{day}"]["run_skipped"].value == {f"cam-idle|{day}": "not one of this run's cameras"}
        with engine.connect() as conn:
            per_part = dict(conn.execute(sa.text("SELECT partition_key, count(*) FROM sightings GROUP BY 1")).all())
        for c in cameras:
            meta = mats[f"{c}|{day}"]
            assert meta["sightings_decided"].value == per_part[f"{c}|{day}"] == 3
            assert meta["replayed"].value == 0          # decided together: nothing to replay
            assert "sightings_decided" in meta
        assert mats[f"cam00|{day}"]["run_partitions_decided"].value == 20
        scores = {str(m.partition): m.metadata for m in one.asset_materializations_for_node("similarity_scores")}
        with engine.connect() as conn:
            n_scores = dict(conn.execute(sa.text(
                "SELECT partition_key, count(*) FROM similarity_scores GROUP BY 1")).all())
        assert all(scores[f"{c}|{day}"]["rows"].value == n_scores.get(f"{c}|{day}", 0) for c in cameras)
        assert sum(n_scores.values()) > 0

        # every check of every camera, evaluated in the step, each named by its partition
        evaluations = one.get_asset_check_evaluations()
        assert len(evaluations) == 20 * len(check_defs.CHECKS)
        assert {(e.check_name, e.partition) for e in evaluations} == \
            {(c.name, f"{cam}|{day}") for c in check_defs.CHECKS for cam in cameras}
        assert {e.step_key for e in one.all_events if e.step_key} == {"deer_profiles", "similarity_scores"}
    with engine.connect() as conn:
        recorded = conn.execute(sa.text("SELECT count(DISTINCT partition_key) FROM check_results")).scalar_one()
    assert recorded == 20


def test_camera_days_without_detections_inside_a_run_s_range_are_skipped(engine):
    """A run over a rectangle (the demo's: every camera x every day between the first and the
    last) decides the camera-days with detections and skips the others, saying why."""
    w = SyntheticWorld(engine, seed=2)
    day1, day2 = T0.date().isoformat(), (T0 + timedelta(days=1)).date().isoformat()
    for i, ident in enumerate("ABA"):
        w.sighting("cam-a", T0 + timedelta(minutes=i), ident)
    for i, ident in enumerate("BAB"):
        w.sighting("cam-b", T0 + timedelta(days=1, minutes=i), ident)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(CAMERA_PARTITIONS_NAME, ["cam-a", "cam-b"])
        tags = range_tags(["cam-a", "cam-b"], day1, day2, ["cam-a", "cam-b"])
        result = _materialize(instance, [deer_profiles, similarity_scores], tags=tags)
        assert result.success
        mats = {str(m.partition): m.metadata for m in result.asset_materializations_for_node("deer_profiles")}
        assert mats[f"cam-a|{day1}"]["sightings_decided"].value == 3
        assert mats[f"cam-b|{day2}"]["sightings_decided"].value == 3
        assert mats[f"cam-b|{day2}"]["matched"].value == 3          # day 2 was decided after day 1
        skipped = {f"cam-b|{day1}": "no detections and no decisions",
                   f"cam-a|{day2}": "no detections and no decisions"}
        for key in skipped:     # their materialization carries the run's figures and the skip list
            assert mats[key]["run_skipped"].value == skipped
            assert "sightings_decided" not in mats[key]
        assert mats[f"cam-a|{day1}"]["run_days"].value == 2
        assert {e.partition for e in result.get_asset_check_evaluations()} == {f"cam-a|{day1}", f"cam-b|{day2}"}
    assert _decided_keys(engine) == {f"cam-a|{day1}", f"cam-b|{day2}"}


_KILLED_RUN = textwrap.dedent("""
    import json, logging, os, signal, sys

    import dagster as dg

    from deer_pipeline.defs.identity import deer_profiles
    from deer_pipeline.defs.partitions import CAMERA_PARTITIONS_NAME, range_tags
    from deer_pipeline.defs.resources import DeerDatabase, IdentitySettings, InferenceResource

    cameras, first, last, kill_after, versions = json.loads(sys.argv[1])

    class KillAfterDay(logging.Handler):
        # the process dies the moment the day is decided: no cleanup, no rollback of anything later
        def emit(self, record):
            if record.getMessage().startswith(f"decided day {kill_after}:"):
                os.kill(os.getpid(), signal.SIGKILL)

    logger = logging.getLogger("deer_pipeline.identity.daily")
    logger.setLevel(logging.INFO)
    logger.addHandler(KillAfterDay())
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(CAMERA_PARTITIONS_NAME, cameras)
    dg.materialize([deer_profiles], instance=instance, tags=range_tags(cameras, first, last, cameras),
                   resources={"database": DeerDatabase(), "inference": InferenceResource(),
                              "identity": IdentitySettings(embedding_versions=versions, search="exact")})
    print("the run was not killed")
""")


def _decided_keys(engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.text("SELECT DISTINCT partition_key FROM sightings")).scalars())


def test_a_run_killed_between_two_days_leaves_each_day_decided_or_not_and_a_rerun_finishes_it(engine):
    cameras = ["cam-a", "cam-b", "cam-c"]
    w = _world(engine, cameras, days=3, per_camera=4, seed=8)
    days = [(T0 + timedelta(days=d)).date().isoformat() for d in range(3)]
    all_keys = {f"{c}|{d}" for c in cameras for d in days}

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(CAMERA_PARTITIONS_NAME, cameras)
        tags = range_tags(cameras, days[0], days[-1], cameras)
        assert _materialize(instance, [deer_profiles], tags=tags).success
        expected = _state(engine)
        assert _decided_keys(engine) == all_keys and sum(len(g) for g in expected[0]) == len(w.truth)

        # the same run in another process, killed (SIGKILL) right after its first day is decided
        _reset(engine)
        env = {**os.environ, "PYTHONPATH": str(REPO),
               "DEER_DATABASE_URL": engine.url.render_as_string(hide_password=False)}
        env.pop("DAGSTER_HOME", None)
        proc = subprocess.run([sys.executable, "-c", _KILLED_RUN,
                               json.dumps([cameras, days[0], days[-1], days[0], dict(MODELS)])],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-4000:]
        # the first day is decided whole, the others not at all; no deer without a sighting
        assert _decided_keys(engine) == {f"{c}|{days[0]}" for c in cameras}
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM deer k WHERE NOT EXISTS "
                                        "(SELECT 1 FROM sightings s WHERE s.deer_id = k.deer_id)")).scalar_one() == 0
            undecided = conn.execute(sa.text(
                "SELECT count(*) FROM detections d LEFT JOIN sightings s USING (detection_id) "
                "WHERE d.day = :d AND s.detection_id IS NULL"), {"d": days[0]}).scalar_one()
        assert undecided == 0

        # running it again finishes it, exactly as the run that was never interrupted
        rerun = _materialize(instance, [deer_profiles], tags=tags)
        assert rerun.success
        assert _decided_keys(engine) == all_keys
        _same(_state(engine), expected)


def test_a_refused_camera_fails_the_step_but_its_day_s_other_cameras_are_decided(engine):
    """One camera of the day embedded only with other versions: the run's deer_profiles step fails
    naming it (no deer created for it), the other cameras are decided and their figures and checks
    recorded; similarity_scores does not run after the failed step."""
    w = SyntheticWorld(engine, seed=4)
    day = T0.date().isoformat()
    for i, ident in enumerate("ABA"):
        w.sighting("cam-a", T0 + timedelta(minutes=i), ident)
    other = SyntheticWorld(engine, seed=5, models={"multiscale": "ms-test-v2", "efficientnet_b0": "eb0-test-v2"})
    other.sighting("cam-b", T0 + timedelta(minutes=5), "B")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(CAMERA_PARTITIONS_NAME, ["cam-a", "cam-b"])
        result = _materialize(instance, [deer_profiles, similarity_scores],
                              tags=range_tags(["cam-a", "cam-b"], day, day, ["cam-a", "cam-b"]))
        assert not result.success
        failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
        assert failure.step_key == "deer_profiles"
        assert f"cam-b|{day}" in failure.event_specific_data.error.message
        assert {e.partition for e in result.get_asset_check_evaluations()} == {f"cam-a|{day}"}
        mats = {str(m.partition): m.metadata for m in result.asset_materializations_for_node("deer_profiles")}
        assert mats[f"cam-a|{day}"]["sightings_decided"].value == 3
        assert "sightings_decided" not in mats.get(f"cam-b|{day}", {})
        assert list(mats[f"cam-a|{day}"]["run_refused"].value) == [f"cam-b|{day}"]
    assert _decided_keys(engine) == {f"cam-a|{day}"}
