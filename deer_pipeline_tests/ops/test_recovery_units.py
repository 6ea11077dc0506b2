"""The pieces of recovery on their own (fast): finding dead runs and freeing their slots, the
run launcher's worker health check, and the embedded server's housekeeping."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.launcher import WorkerStatus

from deer_pipeline import db
from deer_pipeline.ops import recovery
from deer_pipeline.ops.run_launcher import DeerRunLauncher

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def instance(monkeypatch, tmp_path, session_engine):
    """A Dagster instance with the repository's dagster.yaml on the session's PostgreSQL."""
    from deer_pipeline.ops.instance import get_instance

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", db.dagster_storage_url())
    inst = get_instance()
    inst.wipe()
    storage = inst.event_log_storage
    for pool in ("gpu", "identity"):
        storage.set_concurrency_slots(pool, 1)
    yield inst
    for run_id in storage.get_concurrency_run_ids():
        storage.free_concurrency_slots_for_run(run_id)
    inst.wipe()
    inst.dispose()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def started_run(instance, tags: dict) -> str:
    run = instance.add_run(dg.DagsterRun(job_name="identification_job", run_id=str(uuid.uuid4()),
                                         status=dg.DagsterRunStatus.STARTED, tags=tags))
    return run.run_id


def test_recover_fails_runs_whose_process_is_gone_and_frees_their_slots(instance):
    storage = instance.event_log_storage
    dead = started_run(instance, recovery.worker_tags(dead_pid()))
    alive = started_run(instance, recovery.worker_tags())          # this process: alive
    assert storage.claim_concurrency_slot("gpu", dead, "embeddings").is_claimed
    assert storage.claim_concurrency_slot("identity", alive, "deer_profiles").is_claimed
    assert not storage.claim_concurrency_slot("gpu", alive, "embeddings").is_claimed   # the dead run holds it

    report = recovery.recover(instance)
    assert report.failed_runs == [dead] and report.freed_slots == {dead: 1}
    assert instance.get_run_by_id(dead).status == dg.DagsterRunStatus.FAILURE
    assert instance.get_run_by_id(alive).status == dg.DagsterRunStatus.STARTED
    assert recovery.held_slots(instance) == {"gpu": 0, "identity": 1}     # the living run keeps its slot
    assert storage.claim_concurrency_slot("gpu", alive, "embeddings").is_claimed
    assert recovery.recover(instance).summary().startswith("recovery: nothing to do")


def test_recycled_pid_is_not_taken_for_the_runs_process():
    tags = recovery.worker_tags()
    assert recovery.process_alive(int(tags[recovery.PID_TAG]), tags[recovery.PID_STARTED_TAG])
    assert not recovery.process_alive(os.getpid(), "1")                   # same pid, other start time
    assert not recovery.process_alive(dead_pid())


def test_run_launcher_reports_run_worker_health(instance, monkeypatch):
    launcher = DeerRunLauncher(unreachable_grace_seconds=0)
    dead = instance.get_run_by_id(started_run(instance, recovery.worker_tags(dead_pid())))
    alive = instance.get_run_by_id(started_run(instance, recovery.worker_tags()))
    assert launcher.check_run_worker_health(dead).status == WorkerStatus.FAILED
    assert launcher.check_run_worker_health(alive).status == WorkerStatus.RUNNING
    # a run of a code server that is gone (nothing listens on the port)
    lost = instance.get_run_by_id(started_run(instance, {recovery.GRPC_INFO_TAG: json.dumps(
        {"host": "127.0.0.1", "port": 9, "socket": None})}))
    assert launcher.check_run_worker_health(lost).status == WorkerStatus.NOT_FOUND
    patient = DeerRunLauncher(unreachable_grace_seconds=120)
    assert patient.check_run_worker_health(lost).status == WorkerStatus.RUNNING     # within the grace
    # dagster.yaml names this launcher, with the slot freeing of run monitoring
    assert isinstance(instance.run_launcher, DeerRunLauncher)
    assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] > 0


def _start_server_in(data_dir: Path, hold: bool) -> subprocess.Popen:
    code = ("from deer_pipeline import db; import sqlalchemy as sa, time\n"
            "with db.get_engine().connect() as c: c.execute(sa.text('SELECT 1'))\n"
            "print('up', flush=True)\n" + ("time.sleep(600)\n" if hold else ""))
    env = {k: v for k, v in os.environ.items() if k not in ("DEER_DATABASE_URL", "DAGSTER_POSTGRES_URL")}
    env.update(DEER_DATA_DIR=str(data_dir), PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)


def _postmaster_of(data_dir: Path) -> int | None:
    for pid, pgdata in db._postmasters():
        if str(pgdata).startswith(str(data_dir)) or pgdata == (data_dir / "pg").resolve():
            return pid
    return None


def test_embedded_server_of_a_killed_process_is_reused_then_stopped_and_orphans_are_stopped():
    from pgserver.postgres_server import PostgresServer

    base = Path(tempfile.mkdtemp(prefix="deer-orphan-", dir="/tmp"))
    base.chmod(0o755)
    try:
        def killed_user(d: Path) -> int:
            d.mkdir()
            proc = _start_server_in(d, hold=True)
            assert proc.stdout.readline().strip() == "up"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            pid = _postmaster_of(d)
            assert pid is not None                               # SIGKILL leaves the server running
            return pid

        # a server whose data directory was deleted: found and stopped
        gone = killed_user(base / "gone")
        # the live postmaster may remove its own files while they are deleted: retry until gone
        for _ in range(20):
            shutil.rmtree(base / "gone" / "pg", ignore_errors=True)
            if not (base / "gone" / "pg").exists():
                break
            time.sleep(0.1)
        assert not (base / "gone" / "pg").exists()
        with PostgresServer._lock:
            assert str(base / "gone" / "pg") in db.stop_orphan_servers()
        # servers whose users are all dead ('one', 'other'): stopped by the next start of any
        # data directory (reuse by the killed user's own next user: test_recovery.py)
        killed_user(base / "one")
        other = killed_user(base / "other")
        proc = _start_server_in(base / "one", hold=False)
        assert proc.wait(timeout=120) == 0
        for pid in (gone, other):
            for _ in range(50):
                if not db._pid_alive(pid):
                    break
                time.sleep(0.1)
            assert not db._pid_alive(pid)
        assert _postmaster_of(base / "one") is None
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_data_directory_whose_path_contains_a_space_works():
    base = Path(tempfile.mkdtemp(prefix="deer space-", dir="/tmp"))
    base.chmod(0o755)
    try:
        data_dir = base / "my trail cams"
        data_dir.mkdir()
        proc = _start_server_in(data_dir, hold=False)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.strip() == "up"
        assert (data_dir / "pg").is_symlink() and " " not in str((data_dir / "pg").resolve())
        assert _postmaster_of(data_dir) is None and not any(
            pgdata == (data_dir / "pg").resolve() for _, pgdata in db._postmasters())
    finally:
        target = (base / "my trail cams" / "pg").resolve()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
