"""The real Dagster UI and daemon, end to end.

``dagster-webserver`` and ``dagster-daemon`` run as subprocesses on 127.0.0.1 (a free port)
against the session's embedded PostgreSQL, with the repository's ``dagster.yaml`` and
``workspace.yaml`` (code location ``deer_pipeline.definitions``). Dagster's storage is a
database of its own (``dagster_e2e``), so no other test's runs reach this daemon.

The test ingests a small sample, adds the camera partition and launches a partitioned run of
``identification_job`` through GraphQL (the queued run coordinator in the daemon starts it), waits
for success and checks the rows the assets wrote. It also checks that the sensor and the nightly
schedule are registered, that the daemon is healthy, and that ``deer-pipeline ui`` itself starts
``dagster dev`` on a fresh embedded database and stops cleanly.

The helpers here (processes, GraphQL) are also used by test_browser.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

from deer_pipeline_tests.dbutil import empty_pipeline_tables

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKSPACE = REPO_ROOT / "workspace.yaml"
LOCATION = "deer_pipeline"
REPOSITORY = "__repository__"
E2E_DAGSTER_DB = "dagster_e2e"
SENSOR = "new_detections_sensor"
NIGHTLY_SCHEDULE = "nightly_identification_schedule"
JOB = "identification_job"


# ------------------------------------------------------------------------------------------
# Helpers (shared with test_browser.py)
# ------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except AssertionError:
            raise
        except Exception as exc:      # not up yet
            last_error = exc
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}"
                         + (f" (last error: {last_error})" if last_error else ""))


class Service:
    """A process started in a session of its own; ``stop()`` ends it and everything it started."""

    def __init__(self, name: str, argv: list[str], env: dict, log_dir: Path, cwd: Path = REPO_ROOT):
        self.name = name
        self.log = log_dir / f"{name}.log"
        self._log_file = open(self.log, "w")
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 20) -> None:
        try:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
                if self.proc.poll() is not None:
                    break
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    continue
            # Anything left in the group (a code server, a run worker) goes too.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        finally:
            self._log_file.close()


def graphql(port: int, query: str, variables: dict | None = None, timeout: float = 30) -> dict:
    response = requests.post(f"http://127.0.0.1:{port}/graphql",
                             json={"query": query, "variables": variables or {}}, timeout=timeout)
    response.raise_for_status()
    body = response.json()
    if body.get("errors"):
        raise AssertionError(f"GraphQL errors: {body['errors']}")
    return body["data"]


LOCATION_QUERY = """
query {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError { __typename ... on PythonError { message stack } }
      }
    }
  }
}
"""


def wait_for_code_location(port: int, services: list[Service], timeout: float = 180) -> None:
    """Wait until the webserver answers and has loaded the code location (fail on a load error)."""
    def loaded():
        for service in services:
            service.check_alive()
        requests.get(f"http://127.0.0.1:{port}/server_info", timeout=5).raise_for_status()
        data = graphql(port, LOCATION_QUERY)["workspaceOrError"]
        entries = {e["name"]: e for e in data.get("locationEntries", [])}
        entry = entries.get(LOCATION)
        if not entry or entry["loadStatus"] != "LOADED":
            return False
        error = entry["locationOrLoadError"]
        if error and error["__typename"] == "PythonError":
            raise AssertionError(f"code location {LOCATION} failed to load:\n{error['message']}\n"
                                 + "".join(error["stack"][-15:]))
        return True

    wait_for(loaded, timeout, f"the webserver on port {port} to load {LOCATION}", interval=2)


def dagster_home(base: Path) -> Path:
    home = base / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    return home


def service_env(home: Path, dagster_url: str) -> dict:
    """Environment of the Dagster processes: the session's embedded server by its socket URLs."""
    from deer_pipeline import db

    env = {**os.environ,
           "DAGSTER_HOME": str(home),
           "DEER_DATABASE_URL": db.database_url(),
           "DAGSTER_POSTGRES_URL": dagster_url}
    env.pop("DEER_EXECUTOR", None)          # the default executor: steps in processes here
    return env


def start_webserver(env: dict, log_dir: Path, port: int) -> Service:
    return Service("webserver", [_script("dagster-webserver"), "-h", "127.0.0.1",
                                 "-p", str(port), "-w", str(WORKSPACE)], env, log_dir)


def start_daemon(env: dict, log_dir: Path) -> Service:
    return Service("daemon", [_script("dagster-daemon"), "run", "-w", str(WORKSPACE)], env, log_dir)


def _script(name: str) -> str:
    """A console script of this virtualenv (next to its python)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        found = shutil.which(name)
        assert found, f"{name} not found next to {sys.executable} or on PATH"
        return found
    return str(path)


def separate_dagster_database(engine: sa.Engine, name: str) -> str:
    """Create an empty database for Dagster's storage on the session's server; returns its URL."""
    from deer_pipeline import db

    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(db.dagster_storage_url()).set(database=name)
    return url.render_as_string(hide_password=False)


def drop_database(engine: sa.Engine, name: str) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# ------------------------------------------------------------------------------------------
# `deer-pipeline ui` on a fresh embedded database (runs first: nothing else is running yet)
# ------------------------------------------------------------------------------------------

def test_deer_pipeline_ui_starts_dagster_dev_on_the_embedded_database(tmp_path):
    data_dir = Path(tempfile.mkdtemp(prefix="dui-", dir="/tmp"))   # short: pgserver's socket
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("DEER_DATABASE_URL", "DAGSTER_POSTGRES_URL", "DAGSTER_HOME", "DEER_CROP_STORE")}
    env["DEER_DATA_DIR"] = str(data_dir)
    ui = Service("deer-pipeline-ui", [sys.executable, "-m", "deer_pipeline.cli", "ui",
                                      "-p", str(port), "-h", "127.0.0.1"], env, tmp_path)
    try:
        wait_for_code_location(port, [ui], timeout=240)
        info = graphql(port, "query { instance { info } }")["instance"]["info"]
        assert "PostgresRunStorage" in info and "PostgresEventLogStorage" in info
        home = data_dir / "dagster_home"
        assert (home / "dagster.yaml").read_text() == (REPO_ROOT / "dagster.yaml").read_text()
        # SIGTERM to the command (not its group): it passes it on and dagster dev shuts down.
        ui.proc.send_signal(signal.SIGTERM)
        try:
            ui.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"deer-pipeline ui did not stop on SIGTERM:\n{ui.tail()}")
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/server_info", timeout=5)
        # The embedded server it started is stopped with it.
        assert wait_for(lambda: not _processes_using(data_dir), 30, "the embedded server to stop")
    finally:
        ui.stop()
        for proc in _processes_using(data_dir):       # only if the test failed half-way
            proc.kill()
        shutil.rmtree(data_dir, ignore_errors=True)


def _processes_using(path: Path) -> list:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(path) in part for part in (proc.info["cmdline"] or [])):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


# ------------------------------------------------------------------------------------------
# Webserver + daemon on the session's database
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dagster_services(tmp_path_factory, session_engine):
    from dagster_graphql import DagsterGraphQLClient

    work = tmp_path_factory.mktemp("e2e")
    empty_pipeline_tables(session_engine)          # the sensor must find nothing left over
    dagster_url = separate_dagster_database(session_engine, E2E_DAGSTER_DB)
    home = dagster_home(work)
    env = service_env(home, dagster_url)
    port = free_port()
    started: list[Service] = []
    try:
        webserver = start_webserver(env, work, port)
        started.append(webserver)
        daemon = start_daemon(env, work)
        started.append(daemon)
        wait_for_code_location(port, started)
        yield {"port": port, "client": DagsterGraphQLClient("127.0.0.1", port_number=port),
               "services": started, "work": work, "env": env}
    finally:
        for service in reversed(started):
            service.stop()
        drop_database(session_engine, E2E_DAGSTER_DB)


REPOSITORY_QUERY = """
query {
  repositoriesOrError {
    __typename
    ... on RepositoryConnection {
      nodes {
        name
        location { name }
        jobs { name }
        sensors { name sensorState { id status } }
        schedules { name cronSchedule scheduleState { id status } }
      }
    }
  }
}
"""


def _repository(port: int) -> dict:
    nodes = graphql(port, REPOSITORY_QUERY)["repositoriesOrError"]["nodes"]
    [repo] = [n for n in nodes if n["location"]["name"] == LOCATION]
    return repo


def test_sensor_schedule_and_job_are_registered_and_the_daemon_is_healthy(dagster_services):
    port = dagster_services["port"]
    repo = _repository(port)
    sensors = {s["name"]: s for s in repo["sensors"]}
    schedules = {s["name"]: s for s in repo["schedules"]}
    assert SENSOR in sensors, sorted(sensors)
    assert sensors[SENSOR]["sensorState"]["status"] == "RUNNING"
    assert NIGHTLY_SCHEDULE in schedules, sorted(schedules)
    assert schedules[NIGHTLY_SCHEDULE]["scheduleState"]["status"] == "RUNNING"
    assert schedules[NIGHTLY_SCHEDULE]["cronSchedule"].split()[1] == "2"   # 02:xx every night
    assert JOB in {j["name"] for j in repo["jobs"]}

    def healthy():
        for service in dagster_services["services"]:
            service.check_alive()
        statuses = graphql(port, "query { instance { daemonHealth { allDaemonStatuses "
                                 "{ daemonType required healthy } } } }")
        required = {s["daemonType"]: s["healthy"]
                    for s in statuses["instance"]["daemonHealth"]["allDaemonStatuses"] if s["required"]}
        return required if required and all(required.values()) else None

    required = wait_for(healthy, 90, "the daemon's heartbeats", interval=3)
    assert {"SENSOR", "SCHEDULER", "QUEUED_RUN_COORDINATOR"} <= set(required)


def test_partitioned_run_launched_through_graphql_fills_the_database(dagster_services, session_engine,
                                                                    tmp_path):
    from dagster_graphql import DagsterGraphQLClientError

    from deer_pipeline import sample
    from deer_pipeline.detections import ingest

    port = dagster_services["port"]
    client = dagster_services["client"]

    # The sensor would start runs of its own for the new detections: this test launches one.
    state_id = {s["name"]: s for s in _repository(port)["sensors"]}[SENSOR]["sensorState"]["id"]
    stopped = graphql(port, "mutation($id: String) { stopSensor(id: $id) { __typename "
                            "... on StopSensorMutationResult { instigationState { status } } } }",
                      {"id": state_id})["stopSensor"]
    assert stopped["instigationState"]["status"] == "STOPPED", stopped

    info = sample.write_sample(tmp_path / "sample", n_cameras=1, n_days=1, n_deer=3,
                               encounters_per_day=(2, 2))
    report = ingest.ingest(session_engine, info.detections_json)
    assert report.partitions, report.summary()
    camera, day = report.partitions[0]
    key = f"{camera}|{day}"

    added = graphql(port, """
        mutation($repo: RepositorySelector!, $name: String!, $key: String!) {
          addDynamicPartition(repositorySelector: $repo, partitionsDefName: $name, partitionKey: $key) {
            __typename ... on PythonError { message }
          }
        }""", {"repo": {"repositoryName": REPOSITORY, "repositoryLocationName": LOCATION},
               "name": "camera", "key": camera})["addDynamicPartition"]
    assert added["__typename"] == "AddDynamicPartitionSuccess", added

    # The steps run in the run worker's process (one import of the models instead of one per
    # step): the queue, the daemon, the launcher and the assets are the same as in production.
    run_id = client.submit_job_execution(
        JOB, repository_location_name=LOCATION, repository_name=REPOSITORY,
        run_config={"execution": {"config": {"in_process": {}}}},
        tags={"dagster/partition": key, "dagster/partition/camera": camera,
              "dagster/partition/day": day})

    def finished():
        for service in dagster_services["services"]:
            service.check_alive()
        status = client.get_run_status(run_id).value
        return status if status in ("SUCCESS", "FAILURE", "CANCELED") else None

    try:
        status = wait_for(finished, 300, f"run {run_id} of {JOB} for {key}", interval=3)
    except (AssertionError, DagsterGraphQLClientError) as exc:
        raise AssertionError(f"{exc}\n{_run_progress(port, run_id)}\n{_run_errors(port, run_id)}\n"
                             f"daemon log:\n{_daemon_tail(dagster_services)}") from exc
    assert status == "SUCCESS", f"{_run_progress(port, run_id)}\n{_run_errors(port, run_id)}"

    with session_engine.connect() as conn:
        detections = conn.execute(sa.text(
            "SELECT count(*) FROM detections WHERE camera_id = :c AND day = :d AND status = 'ok'"),
            {"c": camera, "d": day}).scalar_one()
        crops = conn.execute(sa.text(
            "SELECT count(*), count(*) FILTER (WHERE c.status = 'ok') FROM crops c "
            "JOIN detections d USING (detection_id) WHERE d.camera_id = :c AND d.day = :d"),
            {"c": camera, "d": day}).one()
        embedded, versions = conn.execute(sa.text(
            "SELECT count(DISTINCT e.detection_id), count(DISTINCT e.embedding_version) "
            "FROM embeddings e JOIN detections d USING (detection_id) "
            "WHERE d.camera_id = :c AND d.day = :d AND e.status = 'ok' AND e.vector IS NOT NULL"),
            {"c": camera, "d": day}).one()
        sightings = conn.execute(sa.text(
            "SELECT count(*), count(DISTINCT s.deer_id) FROM sightings s "
            "JOIN detections d USING (detection_id) WHERE d.camera_id = :c AND d.day = :d"),
            {"c": camera, "d": day}).one()
        deer = conn.execute(sa.text("SELECT count(*) FROM deer")).scalar_one()
    assert detections > 0
    assert crops[0] == detections, f"{crops[0]} crops for {detections} detections"
    assert crops[1] > 0 and embedded == crops[1], (crops, embedded)    # every ok crop has vectors
    assert versions >= 1
    assert 0 < sightings[0] <= embedded
    assert 1 <= sightings[1] <= deer

    # The run is the partitioned run we asked for, visible to Dagster with its partition.
    runs = graphql(port, """query($id: ID!) { runOrError(runId: $id) { __typename
        ... on Run { jobName status tags { key value } } } }""", {"id": run_id})["runOrError"]
    assert runs["jobName"] == JOB and runs["status"] == "SUCCESS"
    assert {"key": "dagster/partition", "value": key} in runs["tags"]


def test_a_day_run_over_two_cameras_launched_through_graphql(dagster_services, session_engine, tmp_path):
    """The run the sensor and the nightly schedule launch: one run for a day, over a range of
    camera x day partitions (Dagster's range tags plus ``deer/cameras``), through the queue, the
    daemon and the launcher; one step per asset decides both cameras."""
    from deer_pipeline import sample
    from deer_pipeline.defs.partitions import range_tags
    from deer_pipeline.detections import ingest

    port = dagster_services["port"]
    client = dagster_services["client"]
    state_id = {s["name"]: s for s in _repository(port)["sensors"]}[SENSOR]["sensorState"]["id"]
    graphql(port, "mutation($id: String) { stopSensor(id: $id) { __typename } }", {"id": state_id})

    info = sample.write_sample(tmp_path / "sample", seed=9, n_cameras=2, n_days=1, n_deer=3,
                               encounters_per_day=(2, 2))
    report = ingest.ingest(session_engine, info.detections_json)
    cameras = sorted({c for c, _ in report.partitions})
    (day,) = {d for _, d in report.partitions}
    assert len(cameras) == 2, report.summary()
    for camera in cameras:
        added = graphql(port, """
            mutation($repo: RepositorySelector!, $name: String!, $key: String!) {
              addDynamicPartition(repositorySelector: $repo, partitionsDefName: $name, partitionKey: $key) {
                __typename ... on PythonError { message } } }""",
                        {"repo": {"repositoryName": REPOSITORY, "repositoryLocationName": LOCATION},
                         "name": "camera", "key": camera})["addDynamicPartition"]
        assert added["__typename"] in ("AddDynamicPartitionSuccess", "DuplicateDynamicPartitionError"), added
    dagster_db = sa.create_engine(dagster_services["env"]["DAGSTER_POSTGRES_URL"])
    with dagster_db.connect() as conn:
        order = list(conn.execute(sa.text("SELECT partition FROM dynamic_partitions "
                                          "WHERE partitions_def_name = 'camera' ORDER BY id")).scalars())
    dagster_db.dispose()
    tags = range_tags(cameras, day, day, order)

    run_id = client.submit_job_execution(
        JOB, repository_location_name=LOCATION, repository_name=REPOSITORY,
        run_config={"execution": {"config": {"in_process": {}}}}, tags=tags)

    def finished():
        for service in dagster_services["services"]:
            service.check_alive()
        status = client.get_run_status(run_id).value
        return status if status in ("SUCCESS", "FAILURE", "CANCELED") else None

    status = wait_for(finished, 300, f"day run {run_id} of {JOB} for {day}", interval=3)
    assert status == "SUCCESS", f"{_run_progress(port, run_id)}\n{_run_errors(port, run_id)}"
    run = graphql(port, """query($id: ID!) { runOrError(runId: $id) { __typename
        ... on Run { stepStats { stepKey status } tags { key value } } } }""", {"id": run_id})["runOrError"]
    assert sorted(s["stepKey"] for s in run["stepStats"]) == ["crops", "deer_profiles", "embeddings",
                                                            "similarity_scores"]
    assert {"key": "deer/cameras", "value": ",".join(cameras)} in run["tags"]
    with session_engine.connect() as conn:
        decided = set(conn.execute(sa.text(
            "SELECT DISTINCT s.partition_key FROM sightings s JOIN detections d USING (detection_id) "
            "WHERE d.day = :d AND d.camera_id = ANY(:c)"), {"d": day, "c": cameras}).scalars())
        undecided = conn.execute(sa.text(
            "SELECT count(*) FROM detections d JOIN crops c USING (detection_id) "
            "LEFT JOIN sightings s USING (detection_id) WHERE d.day = :d AND d.camera_id = ANY(:c) "
            "AND c.status = 'ok' AND s.detection_id IS NULL"), {"d": day, "c": cameras}).scalar_one()
    assert decided == {f"{c}|{day}" for c in cameras} and undecided == 0


def _run_progress(port: int, run_id: str) -> str:
    """Run status and the status of each step, for an assertion message."""
    try:
        run = graphql(port, """query($id: ID!) { runOrError(runId: $id) { __typename
            ... on Run { status stepStats { stepKey status startTime endTime } } } }""",
                      {"id": run_id})["runOrError"]
        steps = ", ".join(f"{s['stepKey']}={s['status']}" for s in run.get("stepStats", []))
        return f"run status {run.get('status')}; steps: {steps or '(none started)'}"
    except Exception as exc:          # the report is best effort
        return f"(could not read the run's progress: {exc})"


def _daemon_tail(services: dict, lines: int = 25) -> str:
    daemon = next((s for s in services["services"] if s.name == "daemon"), None)
    if daemon is None:
        return ""
    interesting = [line for line in daemon.tail(200_000).splitlines()
                   if "Warning" not in line and "warnings.warn" not in line and line.strip()]
    return "\n".join(interesting[-lines:])


def _run_errors(port: int, run_id: str) -> str:
    """The failure messages of a run, for an assertion message."""
    try:
        data = graphql(port, """query($id: ID!) { logsForRun(runId: $id) { __typename
            ... on EventConnection { events { __typename
              ... on MessageEvent { message level stepKey }
              ... on ExecutionStepFailureEvent { error { message stack } }
              ... on RunFailureEvent { error { message } } } } } }""", {"id": run_id})
        events = data["logsForRun"].get("events", [])
        lines = []
        for e in events:
            if e.get("level") in ("ERROR", "CRITICAL") or e["__typename"].endswith("FailureEvent"):
                err = e.get("error") or {}
                lines.append(f"[{e.get('stepKey')}] {e.get('message')} {err.get('message', '')}"
                             + "".join((err.get("stack") or [])[-8:]))
        return "\n".join(lines[-20:]) or "(no error events)"
    except Exception as exc:          # the report is best effort
        return f"(could not read the run's logs: {exc})"
