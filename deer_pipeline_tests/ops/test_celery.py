"""Scale-out on Celery, for real on loopback: a redis-server, two Celery workers
(``celery -A deer_pipeline.ops.celery_app worker``) and partitioned runs with the project's celery
executor (``deer_pipeline.defs.executors``, DEER_EXECUTOR=celery) against the embedded
PostgreSQL (Dagster's storage and the pipeline's database).

* steps of one run spread over both workers, and a step tagged for the ``gpu`` queue runs only
  on the worker that listens to it;
* a step whose process is killed (out-of-memory killer) and a worker killed whole (machine
  lost) during a step: the step runs again on a live worker, the run succeeds, and its writes
  are not duplicated.

The jobs are purpose-built (independent steps that record where they ran); the workers import
them from this module. Everything started here is stopped by the fixtures' finalizers.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from deer_pipeline.defs.executors import CELERY_QUEUE_TAG, GPU_QUEUE, executor_from_env
from deer_pipeline.defs.partitions import CAMERA_PARTITIONS_NAME, camera_day_partitions

REPO_ROOT = Path(__file__).resolve().parents[2]
PROBE_SCHEMA = "celery_probe"
PROBE_CAMERA = "CELERYCAM"
ROWS_PER_STEP = 5
VISIBILITY_TIMEOUT_S = 12     # a vanished worker's step is handed on after this long
LOST_STEP_RETRIES = 1         # a step whose process is killed is sent again this often
WORKER_ENV_NAME = "DEER_PROBE_WORKER"

redis_server = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(
    redis_server is None,
    reason="redis-server is not installed (scripts/system-deps.sh installs it)")


# ------------------------------------------------------------------------------------------
# The probe jobs (imported by the Celery workers through dg.reconstructable)
# ------------------------------------------------------------------------------------------

def _probe_engine() -> sa.Engine:
    from deer_pipeline import db

    return db.get_engine()


def _record_attempt(context: dg.OpExecutionContext, step: str) -> int:
    """Note that this step started here; returns the attempt number (1 = first)."""
    with _probe_engine().begin() as conn:
        conn.execute(sa.text(
            f"INSERT INTO {PROBE_SCHEMA}.attempts (run_id, step, worker, pid) "
            "VALUES (:r, :s, :w, :p)"),
            {"r": context.run_id, "s": step, "w": os.environ.get(WORKER_ENV_NAME, "?"),
             "p": os.getpid()})
        return conn.execute(sa.text(
            f"SELECT count(*) FROM {PROBE_SCHEMA}.attempts WHERE run_id = :r AND step = :s"),
            {"r": context.run_id, "s": step}).scalar_one()


def _write_rows(context: dg.OpExecutionContext, step: str) -> None:
    """The step's output, written the way the pipeline writes: replace this partition's rows."""
    with _probe_engine().begin() as conn:
        conn.execute(sa.text(
            f"DELETE FROM {PROBE_SCHEMA}.rows WHERE partition_key = :k AND step = :s"),
            {"k": context.partition_key, "s": step})
        conn.execute(sa.text(
            f"INSERT INTO {PROBE_SCHEMA}.rows (partition_key, step, item) "
            "SELECT :k, :s, g FROM generate_series(1, :n) AS g"),
            {"k": context.partition_key, "s": step, "n": ROWS_PER_STEP})


def _spread_op(name: str, tags: dict | None = None) -> dg.OpDefinition:
    @dg.op(name=name, tags=tags or {},
           config_schema={"seconds": dg.Field(float, default_value=2.0)})
    def _op(context: dg.OpExecutionContext) -> None:
        _record_attempt(context, name)
        time.sleep(context.op_config["seconds"])
        _write_rows(context, name)

    return _op


crop_ops = [_spread_op(f"crop_batch_{i}") for i in range(4)]
embed_on_gpu = _spread_op("embed_on_gpu", {CELERY_QUEUE_TAG: GPU_QUEUE})


@dg.graph
def spread_graph():
    for op_def in crop_ops:
        op_def()
    embed_on_gpu()


def spread_job() -> dg.JobDefinition:
    return spread_graph.to_job(name="celery_spread_probe", partitions_def=camera_day_partitions,
                               executor_def=executor_from_env())


@dg.op(out=dg.Out(dg.Nothing))
def slow_step(context: dg.OpExecutionContext) -> None:
    attempt = _record_attempt(context, "slow_step")
    _write_rows(context, "slow_step")
    if attempt == 1:
        # The first attempt writes its rows, then hangs until the test kills it (bounded).
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            time.sleep(0.2)


@dg.op(ins={"after": dg.In(dg.Nothing)})
def after_slow(context: dg.OpExecutionContext) -> None:
    _record_attempt(context, "after_slow")
    _write_rows(context, "after_slow")


@dg.graph
def fault_graph():
    after_slow(after=slow_step())


def fault_job() -> dg.JobDefinition:
    return fault_graph.to_job(name="celery_fault_probe", partitions_def=camera_day_partitions,
                              executor_def=executor_from_env())


@dg.op
def kills_its_process(context: dg.OpExecutionContext) -> None:
    """A step that takes its process down every time (a poison step)."""
    _record_attempt(context, "kills_its_process")
    os.kill(os.getpid(), signal.SIGKILL)


@dg.graph
def poison_graph():
    kills_its_process()


def poison_job() -> dg.JobDefinition:
    return poison_graph.to_job(name="celery_poison_probe", partitions_def=camera_day_partitions,
                               executor_def=executor_from_env())


def identification_on_celery() -> dg.JobDefinition:
    """The real identification job (every asset and check of the code location) on the
    deployment's celery executor: what DEER_EXECUTOR=celery gives in production."""
    from deer_pipeline.definitions import defs

    on_celery = dg.Definitions(assets=defs.assets, asset_checks=defs.asset_checks, jobs=defs.jobs,
                               resources=defs.resources, executor=executor_from_env())
    return on_celery.resolve_job_def("identification_job")


# The run worker (orchestrator) runs in a subprocess so that a lost step cannot hang the test.
ORCHESTRATOR = """
import json, sys
import dagster as dg
from deer_pipeline_tests.ops import test_celery as probes
job_fn = getattr(probes, sys.argv[1])
camera, day = sys.argv[2].split("|")
tags = {"dagster/partition": sys.argv[2], "dagster/partition/camera": camera,
        "dagster/partition/day": day}
with dg.DagsterInstance.get() as instance:
    with dg.execute_job(dg.reconstructable(job_fn), instance=instance, tags=tags,
                        run_config=json.loads(sys.argv[3]), raise_on_error=False) as result:
        print("RESULT " + json.dumps({"run_id": result.run_id, "success": result.success}))
"""


# ------------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Stop a process started with start_new_session=True, and everything it started."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Worker:
    def __init__(self, name: str, queues: list[str], env: dict, log_dir: Path):
        self.name = name
        self.queues = queues
        self.log = log_dir / f"worker-{name}.log"
        self._log_file = open(self.log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "deer_pipeline.ops.celery_app", "worker",
             "-Q", ",".join(queues), "--concurrency", "1", "-n", f"{name}@%h",
             "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO"],
            cwd=REPO_ROOT, env={**env, WORKER_ENV_NAME: name},
            stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"celery worker {self.name} exited:\n{self.log.read_text()[-3000:]}")
        return " ready." in self.log.read_text()

    def kill(self) -> None:
        """The machine is gone: the worker and its pool processes die at once."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        _stop(self.proc)
        self._log_file.close()


@pytest.fixture(scope="module")
def celery_cluster(tmp_path_factory, session_engine):
    from deer_pipeline import db

    work = tmp_path_factory.mktemp("celery")
    home = work / "dagster_home"
    home.mkdir()
    shutil.copyfile(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")

    with session_engine.begin() as conn:
        conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {PROBE_SCHEMA} CASCADE"))
        conn.execute(sa.text(f"CREATE SCHEMA {PROBE_SCHEMA}"))
        conn.execute(sa.text(
            f"CREATE TABLE {PROBE_SCHEMA}.attempts (attempt_id bigserial PRIMARY KEY, run_id text, "
            "step text, worker text, pid integer, started_at timestamptz DEFAULT clock_timestamp())"))
        conn.execute(sa.text(
            f"CREATE TABLE {PROBE_SCHEMA}.rows (partition_key text, step text, item integer)"))

    port = _free_port()
    redis_log = open(work / "redis.log", "w")
    redis = subprocess.Popen(
        [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(work)],
        stdout=redis_log, stderr=subprocess.STDOUT, start_new_session=True)
    started: list = []
    try:
        import redis as redis_client

        _wait_for(lambda: _redis_ping(redis_client, port), 20, "redis-server")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            "DAGSTER_HOME": str(home),
            # Every process reaches the session's embedded server through its socket directly.
            "DEER_DATABASE_URL": db.database_url(),
            "DAGSTER_POSTGRES_URL": db.dagster_storage_url(),
            "DEER_EXECUTOR": "celery",
            "DEER_CELERY_BROKER_URL": f"redis://127.0.0.1:{port}/0",
            "DEER_CELERY_BACKEND_URL": f"redis://127.0.0.1:{port}/1",
            "DEER_CELERY_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
            "DEER_CELERY_RESTORE_INTERVAL_S": "2",
            "DEER_CELERY_LOST_STEP_RETRIES": str(LOST_STEP_RETRIES),
            "DEER_CELERY_LOST_STEP_DELAY_S": "1",
        }
        # A: one GPU worker (gpu + default queue); B: a CPU worker (default queue only).
        workers = {"A": Worker("A", [GPU_QUEUE, "dagster"], env, work),
                   "B": Worker("B", ["dagster"], env, work)}
        started.extend(workers.values())
        _wait_for(lambda: all(w.ready() for w in workers.values()), 90, "both celery workers")

        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DAGSTER_POSTGRES_URL", env["DAGSTER_POSTGRES_URL"])
            instance = dg.DagsterInstance.from_config(str(home))
            instance.add_dynamic_partitions(CAMERA_PARTITIONS_NAME, [PROBE_CAMERA])
            yield {"env": env, "home": home, "workers": workers, "instance": instance, "work": work}
            instance.dispose()
    finally:
        for proc in started:
            proc.stop()
        _stop(redis)
        redis_log.close()
        with session_engine.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {PROBE_SCHEMA} CASCADE"))


def _redis_ping(redis_client, port: int) -> bool:
    try:
        return bool(redis_client.Redis(host="127.0.0.1", port=port, socket_timeout=1).ping())
    except Exception:
        return False


def _launch(cluster, job_name: str, partition: str, run_config: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", ORCHESTRATOR, job_name, partition, json.dumps(run_config or {})],
        cwd=REPO_ROOT, env=cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)


def _result(proc: subprocess.Popen, timeout: float) -> dict:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        out, _ = proc.communicate()
        raise AssertionError(f"run did not finish in {timeout:.0f}s:\n{out[-4000:]}")
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, f"orchestrator printed no result (exit {proc.returncode}):\n{out[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _attempts(engine, run_id: str) -> list:
    with engine.connect() as conn:
        return conn.execute(sa.text(
            f"SELECT step, worker, pid FROM {PROBE_SCHEMA}.attempts WHERE run_id = :r "
            "ORDER BY attempt_id"), {"r": run_id}).all()


def _row_counts(engine, partition: str) -> dict[str, tuple[int, int]]:
    with engine.connect() as conn:
        return {r.step: (r.n, r.n_distinct) for r in conn.execute(sa.text(
            f"SELECT step, count(*) AS n, count(DISTINCT item) AS n_distinct FROM {PROBE_SCHEMA}.rows "
            "WHERE partition_key = :k GROUP BY step"), {"k": partition})}


def _celery_hosts_by_step(instance: dg.DagsterInstance, run_id: str) -> dict[str, list[str]]:
    """From Dagster's event log: the Celery worker that reported executing each step."""
    hosts: dict[str, list[str]] = {}
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        event = record.dagster_event
        metadata = event.engine_event_data.metadata if event.engine_event_data else {}
        if "Celery worker" in metadata:
            hosts.setdefault(event.step_key, []).append(metadata["Celery worker"].value)
    return hosts


# ------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------

def test_steps_of_a_partitioned_run_spread_over_both_workers(celery_cluster, session_engine):
    partition = f"{PROBE_CAMERA}|2024-06-01"
    ops = {f"crop_batch_{i}": {"config": {"seconds": 2.0}} for i in range(4)}
    ops["embed_on_gpu"] = {"config": {"seconds": 1.0}}
    result = _result(_launch(celery_cluster, "spread_job", partition, {"ops": ops}), timeout=150)
    assert result["success"], result

    attempts = _attempts(session_engine, result["run_id"])
    worker_of = {step: worker for step, worker, _ in attempts}
    assert sorted(worker_of) == sorted([*(f"crop_batch_{i}" for i in range(4)), "embed_on_gpu"])
    assert len(attempts) == 5, attempts                     # every step ran once
    assert worker_of["embed_on_gpu"] == "A", "the gpu-queue step ran on a worker without the gpu queue"
    assert set(worker_of.values()) == {"A", "B"}, f"steps did not spread: {worker_of}"

    hosts = _celery_hosts_by_step(celery_cluster["instance"], result["run_id"])
    assert set(hosts) == set(worker_of)
    assert hosts["embed_on_gpu"][0].startswith("A@")
    assert {h[0].split("@")[0] for h in hosts.values()} == {"A", "B"}

    run = celery_cluster["instance"].get_run_by_id(result["run_id"])
    assert run.tags["dagster/partition"] == partition
    assert _row_counts(session_engine, partition) == {s: (ROWS_PER_STEP, ROWS_PER_STEP) for s in worker_of}


def test_real_identification_job_sends_embeddings_to_the_gpu_worker(celery_cluster, engine, tmp_path):
    from deer_pipeline import sample
    from deer_pipeline.detections import ingest

    info = sample.write_sample(tmp_path / "sample", n_cameras=1, n_days=1, n_deer=3,
                               encounters_per_day=(2, 2))
    report = ingest.ingest(engine, info.detections_json)
    camera, day = report.partitions[0]
    celery_cluster["instance"].add_dynamic_partitions(CAMERA_PARTITIONS_NAME, [camera])

    result = _result(_launch(celery_cluster, "identification_on_celery", f"{camera}|{day}"), timeout=240)
    assert result["success"], result
    hosts = _celery_hosts_by_step(celery_cluster["instance"], result["run_id"])
    assert {"crops", "embeddings", "deer_profiles", "similarity_scores"} <= set(hosts)
    # Only worker A listens to the gpu queue: the embeddings step (tag dagster-celery/queue=gpu)
    # can have run nowhere else.
    assert [h.split("@")[0] for h in hosts["embeddings"]] == ["A"]
    with engine.connect() as conn:
        counts = conn.execute(sa.text(
            "SELECT (SELECT count(*) FROM crops), (SELECT count(DISTINCT detection_id) FROM embeddings"
            " WHERE status = 'ok'), (SELECT count(*) FROM sightings)")).one()
    assert all(n > 0 for n in counts), counts


def _kill_during_slow_step(cluster, engine, partition: str, kill) -> tuple[dict, list]:
    with engine.connect() as conn:
        before = conn.execute(sa.text(
            f"SELECT coalesce(max(attempt_id), 0) FROM {PROBE_SCHEMA}.attempts")).scalar_one()
    proc = _launch(cluster, "fault_job", partition)
    try:
        def first_attempt():
            # The slow step of this run has started and committed its rows.
            with engine.connect() as conn:
                return conn.execute(sa.text(
                    f"SELECT a.run_id, a.worker, a.pid FROM {PROBE_SCHEMA}.attempts a "
                    f"WHERE a.attempt_id > :before AND a.step = 'slow_step' AND EXISTS ("
                    f"  SELECT 1 FROM {PROBE_SCHEMA}.rows r"
                    "   WHERE r.step = 'slow_step' AND r.partition_key = :k) "
                    "ORDER BY a.attempt_id LIMIT 1"), {"k": partition, "before": before}).first()

        run_id, worker, pid = _wait_for(first_attempt, 120, "the slow step to start")
        kill(cluster["workers"][worker], pid)
        result = _result(proc, timeout=150)
    finally:
        _stop(proc)
    assert result["run_id"] == run_id
    return result, _attempts(engine, run_id)


def _check_recovered(cluster, engine, partition, result, attempts, killed_worker: str | None):
    assert result["success"], f"the run did not recover: {result}"
    slow = [(w, p) for s, w, p in attempts if s == "slow_step"]
    assert len(slow) == 2, f"slow_step should have run twice (killed, then again): {attempts}"
    assert slow[0][1] != slow[1][1], "the second attempt ran in the killed process"
    if killed_worker:
        assert slow[1][0] != killed_worker, "the step was given back to the dead worker"
    assert [s for s, _, _ in attempts].count("after_slow") == 1
    # The first attempt's rows were committed before it was killed; the second attempt
    # replaced them: no duplicates.
    assert _row_counts(engine, partition) == {
        "slow_step": (ROWS_PER_STEP, ROWS_PER_STEP), "after_slow": (ROWS_PER_STEP, ROWS_PER_STEP)}
    instance = cluster["instance"]
    run = instance.get_run_by_id(result["run_id"])
    assert run.status == dg.DagsterRunStatus.SUCCESS
    hosts = _celery_hosts_by_step(instance, result["run_id"])
    assert len(hosts["slow_step"]) == 2, hosts


def test_step_process_killed_runs_again_and_run_succeeds(celery_cluster, session_engine):
    """The out-of-memory killer takes the step's process; its worker lives on."""
    partition = f"{PROBE_CAMERA}|2024-06-02"
    killed = []

    def kill_step_process(worker: Worker, pid: int):
        killed.append(worker.name)
        os.kill(pid, signal.SIGKILL)

    result, attempts = _kill_during_slow_step(celery_cluster, session_engine, partition, kill_step_process)
    _check_recovered(celery_cluster, session_engine, partition, result, attempts, killed_worker=None)
    assert celery_cluster["workers"][killed[0]].proc.poll() is None, "the worker itself should survive"


def test_a_step_that_always_kills_its_process_fails_the_run_instead_of_looping(
        celery_cluster, session_engine):
    partition = f"{PROBE_CAMERA}|2024-06-04"
    result = _result(_launch(celery_cluster, "poison_job", partition), timeout=120)
    assert not result["success"]
    attempts = _attempts(session_engine, result["run_id"])
    assert [s for s, _, _ in attempts] == ["kills_its_process"] * (1 + LOST_STEP_RETRIES)
    run = celery_cluster["instance"].get_run_by_id(result["run_id"])
    assert run.status == dg.DagsterRunStatus.FAILURE
    failures = celery_cluster["instance"].all_logs(result["run_id"], of_type=dg.DagsterEventType.RUN_FAILURE)
    assert failures and "WorkerLostError" in str(failures[-1].dagster_event.event_specific_data)
    for worker in celery_cluster["workers"].values():
        assert worker.proc.poll() is None, "a worker died with its step process"


def test_worker_killed_mid_step_is_replaced_by_the_other(celery_cluster, session_engine):
    """A whole worker dies (machine lost): after the visibility timeout the other worker takes
    the step over; the run completes with no duplicate rows."""
    partition = f"{PROBE_CAMERA}|2024-06-03"
    killed = []

    def kill_worker(worker: Worker, _pid: int):
        killed.append(worker.name)
        worker.kill()

    result, attempts = _kill_during_slow_step(celery_cluster, session_engine, partition, kill_worker)
    _check_recovered(celery_cluster, session_engine, partition, result, attempts, killed_worker=killed[0])
