"""Recovery without a hand, end to end with the real command (``deer-pipeline demo``).

Each demo runs in a process of its own on a data directory of its own (its own embedded
PostgreSQL and Dagster storage, with the repository's dagster.yaml), on a tiny set of photos:
four good detections of one camera-day, one photo dated before DEER_START_DATE, one dated
tomorrow, and photos named by ``../``, by an absolute path and through a symlink that all lie
outside the detections file's folder.

* an uninterrupted demo is the reference;
* a demo killed with SIGKILL while its ``embeddings`` step holds the ``gpu`` pool slot leaves the
  run STARTED and the slot claimed; the next demo marks that run failed, frees the slot, and
  ends in the same state as the reference;
* a demo whose database is stopped for 60 s while ``embeddings`` runs completes once the
  database is back, with no slot held.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from deer_pipeline_tests.detections.test_images import write_photo

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_TIMEOUT_S = 600


# ------------------------------------------------------------------------------------------
# The photos and the demo processes
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photos() -> Path:
    base = Path(tempfile.mkdtemp(prefix="deer-rec-", dir="/tmp"))
    root, outside = base / "survey", base / "outside"
    (root / "cam-r").mkdir(parents=True)
    outside.mkdir()
    tomorrow = (datetime.now(timezone.utc) + timedelta(days=1)).strftime("%Y:%m:%d 12:00:00")
    names = [("a.jpg", "2025:10:02 06:30:00"), ("b.jpg", "2025:10:02 06:30:02"),
             ("c.jpg", "2025:10:02 09:00:00"), ("d.jpg", "2025:10:02 09:00:03"),
             ("old.jpg", "2019:05:01 10:00:00"), ("next.jpg", tomorrow)]
    for i, (name, when) in enumerate(names):
        write_photo(root / "cam-r" / name, size=(320, 240), when=when, seed=40 + i)
    write_photo(outside / "x.jpg", size=(320, 240), when="2025:10:02 07:00:00", seed=50)
    (root / "cam-r" / "link.jpg").symlink_to(outside / "x.jpg")
    box = [{"category": "1", "conf": 0.9, "bbox": [0.05, 0.05, 0.9, 0.9], "classifications": [["0", 0.9]]}]
    files = [f"cam-r/{n}" for n, _ in names] + ["../outside/x.jpg", str(outside / "x.jpg"), "cam-r/link.jpg",
                                                "../../../../../../etc/passwd"]
    doc = {"detection_categories": {"1": "animal"}, "classification_categories": {"0": "white-tailed deer"},
           "images": [{"file": f, "detections": box} for f in files]}
    (root / "detections.json").write_text(json.dumps(doc))
    yield root
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def data_dir_factory():
    """Fresh data directories in /tmp (short socket paths; readable by pgserver's user under root)."""
    made = []

    def make(name: str) -> Path:
        d = Path(tempfile.mkdtemp(prefix=f"deer-{name}-", dir="/tmp"))
        d.chmod(0o755)
        made.append(d)
        return d

    yield make
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


def demo_env(data_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DEER_DATABASE_URL", "DAGSTER_POSTGRES_URL", "DAGSTER_HOME", "DEER_CROP_STORE")}
    env.update(DEER_DATA_DIR=str(data_dir), DEER_START_DATE="2024-01-01", PYTHONPATH=str(REPO_ROOT))
    return env


def start_demo(photos: Path, data_dir: Path, log: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "deer_pipeline.cli", "demo", "--images", str(photos),
            "--detections", str(photos / "detections.json"), "--no-calibrate", "--json"]
    return subprocess.Popen(argv, cwd=REPO_ROOT, env=demo_env(data_dir), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path) -> tuple[dict, str]:
    try:
        proc.wait(timeout=DEMO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the demo did not finish in {DEMO_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    summary, _ = json.JSONDecoder().raw_decode(text[text.rindex("\n{") + 1:])
    return summary, text


def comparable(summary: dict) -> dict:
    """What a run leaves in the store, without timings."""
    return {"detections": summary["detections"], "crops": summary["crops"],
            "embedded": summary["embedded"]["detections"], "assigned": summary["assigned"],
            "decisions": summary["decisions"], "deer": summary["deer"]["total"], "held": summary["held"],
            "failed": summary["failed"]}


def postmaster(data_dir: Path):
    from pgserver.utils import PostmasterInfo

    return PostmasterInfo.read_from_pgdata((data_dir / "pg").resolve())


def running_server(data_dir: Path):
    try:
        info = postmaster(data_dir)
    except (AssertionError, ValueError, OSError):       # postmaster.pid half written: starting
        return None
    return info if info is not None and info.is_running() and info.status == "ready" else None


def dagster_engine(data_dir: Path) -> sa.Engine:
    from deer_pipeline import db

    return sa.create_engine(db._sqlalchemy_url(postmaster(data_dir).get_uri(database="dagster")))


def gpu_slot_claimed_by(engine: sa.Engine) -> str | None:
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(
                "SELECT run_id FROM concurrency_slots WHERE concurrency_key = 'gpu' AND run_id IS NOT NULL "
                "AND NOT deleted LIMIT 1")).scalar()
    except sa.exc.SQLAlchemyError:      # tables not created yet
        return None


def wait_for_embeddings(proc: subprocess.Popen, data_dir: Path, log: Path, timeout: float = 300) -> str:
    """Wait until the demo's embeddings step holds the gpu slot; returns the run id."""
    deadline = time.monotonic() + timeout
    engine = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the demo ended before embeddings:\n{log.read_text()[-3000:]}"
        if engine is None and running_server(data_dir) is not None:
            engine = dagster_engine(data_dir)
        run_id = gpu_slot_claimed_by(engine) if engine is not None else None
        if run_id:
            engine.dispose()
            return run_id
        time.sleep(0.2)
    raise AssertionError(f"embeddings never started:\n{log.read_text()[-3000:]}")


def query(data_dir: Path, database: str, sql: str) -> list[tuple]:
    """Rows from a stopped demo's database (its embedded server is started and stopped here)."""
    import pgserver

    from deer_pipeline import db

    server = pgserver.get_server((data_dir / "pg").resolve(), cleanup_mode="stop")
    try:
        engine = sa.create_engine(db._sqlalchemy_url(server.get_uri(database)))
        with engine.connect() as conn:
            rows = [tuple(r) for r in conn.execute(sa.text(sql))]
        engine.dispose()
        return rows
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def reference(photos) -> dict:
    """An uninterrupted demo: its summary and what its database holds."""
    data_dir = Path(tempfile.mkdtemp(prefix="deer-ref-", dir="/tmp"))
    data_dir.chmod(0o755)
    log = data_dir / "demo.log"
    summary, text = finish(start_demo(photos, data_dir, log), log)
    assert running_server(data_dir) is None, "the embedded server outlived the demo"
    found = {"summary": summary, "text": text,
             "cameras": query(data_dir, "deer", "SELECT camera_id FROM cameras ORDER BY 1"),
             "rejections": [r[0] for r in query(data_dir, "deer", "SELECT reason FROM ingest_rejections")]}
    shutil.rmtree(data_dir, ignore_errors=True)
    return found


# ------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------

def test_reference_demo_decides_good_detections_holds_odd_dates_and_refuses_outside_paths(reference):
    s = reference["summary"]
    assert s["failed"] == []
    assert s["detections"]["by_status"] == {"ok": 4, "held": 2}
    assert s["assigned"] == 4                                  # every good detection decided
    assert s["held"]["before_start"] == 1 and s["held"]["future"] == 1
    assert "held: 2 detection(s)" in reference["text"]          # the demo says how many were held
    # ../, the absolute path, the symlink and /etc/passwd: refused, no camera for them
    assert reference["cameras"] == [("cam-r",)]
    refused = [r for r in reference["rejections"] if r.startswith("photo path is outside the image roots")]
    assert len(refused) == 4
    assert not any("root:" in r or "bytes" in r for r in reference["rejections"])


def test_sigkill_during_embeddings_then_next_demo_completes_like_an_uninterrupted_one(photos, reference,
                                                                                      data_dir_factory):
    data_dir = data_dir_factory("killed")
    log = data_dir / "first.log"
    proc = start_demo(photos, data_dir, log)
    run_id = wait_for_embeddings(proc, data_dir, log)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    # The state the issue describes: the dead run is STARTED and still holds the gpu slot.
    engine = dagster_engine(data_dir)
    with engine.connect() as conn:
        status = conn.execute(sa.text("SELECT status FROM runs WHERE run_id = :r"), {"r": run_id}).scalar()
    assert status == "STARTED"
    assert gpu_slot_claimed_by(engine) == run_id
    engine.dispose()
    assert running_server(data_dir) is not None          # the killed process could not stop it

    # The next demo: no manual action.
    log2 = data_dir / "second.log"
    summary, text = finish(start_demo(photos, data_dir, log2), log2)
    assert "recovery: marked 1 run(s) whose process is gone as failed" in text
    assert comparable(summary) == comparable(reference["summary"])
    assert running_server(data_dir) is None               # reused, then stopped by its last user
    runs = dict(query(data_dir, "dagster", "SELECT run_id, status FROM runs"))
    assert runs[run_id] == "FAILURE"
    assert query(data_dir, "dagster", "SELECT run_id FROM concurrency_slots WHERE run_id IS NOT NULL "
                                      "AND NOT deleted") == []


def test_database_stopped_for_60s_during_embeddings_the_run_completes_when_it_returns(photos, reference,
                                                                                      data_dir_factory):
    from pgserver._commands import pg_ctl

    data_dir = data_dir_factory("outage")
    log = data_dir / "demo.log"
    proc = start_demo(photos, data_dir, log)
    wait_for_embeddings(proc, data_dir, log)
    time.sleep(1.0)
    info = postmaster(data_dir)
    pgdata = (data_dir / "pg").resolve()
    user = "pgserver" if os.geteuid() == 0 else None      # pgserver runs postgres as this user under root
    pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
    assert running_server(data_dir) is None
    time.sleep(60)
    assert proc.poll() is None, f"the demo gave up during the outage:\n{log.read_text()[-3000:]}"
    pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {info.socket_dir}", "-l", str(pgdata / "log"), "start"],
           pgdata=pgdata, user=user, timeout=60)

    summary, text = finish(proc, log)
    assert "database unreachable" in text or "database fault" in text    # it waited, and said so
    assert comparable(summary) == comparable(reference["summary"])
    assert query(data_dir, "dagster", "SELECT run_id FROM concurrency_slots WHERE run_id IS NOT NULL "
                                      "AND NOT deleted") == []
