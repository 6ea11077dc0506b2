"""Runs that died, and the pool slots they held: found and healed without a hand.

A run whose process is killed (``kill -9``, the out-of-memory killer, a lost container) cannot
write its own end: Dagster keeps it STARTED, and the ``gpu`` / ``identity`` pool slot its step
held stays claimed, so every later run waits at that step forever. Three things heal this:

* **``recover(instance)``**, called by ``deer-pipeline demo`` and ``deer-pipeline ui`` before they
  start anything, and by ``deer-pipeline recover``: every unfinished run whose process is known
  to be on this machine and is gone is marked FAILED (with the reason in its event log), and the
  slots of every finished run are freed at once.
* **run monitoring** in the daemon (``dagster.yaml``): ``free_slots_after_run_end_seconds`` frees
  the slots of runs that ended, and the run launcher ``DeerRunLauncher`` reports the health of run
  workers, so a STARTED run whose worker is gone is marked failed (and retried by ``run_retries``).
* runs started by this package carry the machine and process that run them (``worker_tags``), so
  "its process is gone" is a fact, not a guess; a process id that was reused by another program
  is told apart by its start time.

Plain Dagster instance calls; no asset code here.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

HOST_TAG = "deer/host"
PID_TAG = "deer/pid"
PID_STARTED_TAG = "deer/pid_started"
GRPC_INFO_TAG = ".dagster/grpc_info"
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], fields[19]


def _started(pid: int) -> str | None:
    stat = _proc_stat(pid)
    if stat is not None:
        return stat[1]
    try:
        import psutil

        return f"{psutil.Process(pid).create_time():.2f}"
    except Exception:
        return None


def worker_tags(pid: int | None = None) -> dict[str, str]:
    """Tags naming the machine and process that execute a run (put on in-process runs)."""
    pid = pid or os.getpid()
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(pid), PID_STARTED_TAG: _started(pid) or ""}


def process_alive(pid: int, started: str | None = None) -> bool:
    """Whether process ``pid`` runs on this machine (and, when ``started`` is known, is the same
    process: a recycled pid belongs to a process started later)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                                   # exists, another user's
    stat = _proc_stat(pid)
    if stat is not None and stat[0] in ("Z", "X"):
        return False                           # a zombie: exited, not yet reaped
    return not started or _started(pid) == started


@dataclass(frozen=True)
class Worker:
    pid: int
    started: str | None
    local: bool          # the process lives on this machine (its pid can be checked here)
    source: str          # "tags" | "engine event"


def run_worker(instance, run) -> Worker | None:
    """The process that executes ``run``, when known: our tags, or Dagster's "Started process
    for run (pid: N)" engine event for runs launched through a code server on this machine."""
    tags = run.tags
    if tags.get(PID_TAG):
        started = tags.get(PID_STARTED_TAG) or None
        return Worker(int(tags[PID_TAG]), started, tags.get(HOST_TAG) == socket.gethostname(), "tags")
    grpc = tags.get(GRPC_INFO_TAG)
    if not grpc:
        return None
    try:
        info = json.loads(grpc)
    except ValueError:
        return None
    local = bool(info.get("socket")) or str(info.get("host") or "").lower() in LOCAL_HOSTS | {socket.gethostname().lower()}
    from dagster import DagsterEventType

    for record in instance.all_logs(run.run_id, of_type=DagsterEventType.ENGINE_EVENT):
        message = record.user_message or ""
        if message.startswith("Started process for run (pid:"):
            pid = int(message.split("pid:")[1].split(")")[0])
            return Worker(pid, None, local, "engine event")
    return None


@dataclass
class RecoveryReport:
    failed_runs: list[str] = field(default_factory=list)      # unfinished runs whose process is gone
    freed_slots: dict[str, int] = field(default_factory=dict)  # run id -> slots freed (finished runs)

    def summary(self) -> str:
        if not self.failed_runs and not self.freed_slots:
            return "recovery: nothing to do (no dead runs, no slots held by finished runs)"
        parts = []
        if self.failed_runs:
            parts.append(f"marked {len(self.failed_runs)} run(s) whose process is gone as failed: "
                         + ", ".join(r[:8] for r in self.failed_runs))
        if self.freed_slots:
            parts.append(f"freed the pool slots of {len(self.freed_slots)} finished run(s): "
                         + ", ".join(r[:8] for r in self.freed_slots))
        return "recovery: " + "; ".join(parts)


def dead_runs(instance) -> list[tuple[object, Worker]]:
    """Unfinished runs (queued runs excepted) whose process is on this machine and gone."""
    from dagster import DagsterRunStatus, RunsFilter

    statuses = [DagsterRunStatus.STARTING, DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]
    found = []
    for run in instance.get_runs(filters=RunsFilter(statuses=statuses)):
        worker = run_worker(instance, run)
        if worker is not None and worker.local and not process_alive(worker.pid, worker.started):
            found.append((run, worker))
    return found


def free_finished_runs_slots(instance) -> dict[str, int]:
    """Free the pool slots (claimed and pending) of every run that has finished or is gone."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return {}
    freed = {}
    run_ids = sorted(storage.get_concurrency_run_ids())
    if not run_ids:
        return freed
    claimed: dict[str, int] = {}
    for key in storage.get_concurrency_keys():
        for slot in storage.get_concurrency_info(key).claimed_slots:
            claimed[slot.run_id] = claimed.get(slot.run_id, 0) + 1
    for run_id in run_ids:
        run = instance.get_run_by_id(run_id)
        if run is not None and not run.is_finished:
            continue
        storage.free_concurrency_slots_for_run(run_id)
        freed[run_id] = claimed.get(run_id, 0)
    return freed


def recover(instance) -> RecoveryReport:
    """Mark the dead runs of this machine failed and free every slot held by a finished run."""
    report = RecoveryReport()
    for run, worker in dead_runs(instance):
        message = (f"deer_pipeline recovery: the process that ran this run (pid {worker.pid}, from the "
                   f"{worker.source}) is gone; the run is marked failed and its pool slots are freed")
        log.warning("run %s: %s", run.run_id, message)
        instance.report_run_failed(run, message)
        report.failed_runs.append(run.run_id)
    report.freed_slots = free_finished_runs_slots(instance)
    if report.failed_runs or report.freed_slots:
        log.info(report.summary())
    return report


def held_slots(instance, pools=("gpu", "identity")) -> dict[str, int]:
    """Slots claimed now per pool (what an operator checks with ``dagster instance concurrency get``)."""
    storage = instance.event_log_storage
    out = {}
    for pool in pools:
        info = storage.get_concurrency_info(pool)
        out[pool] = len(info.claimed_slots)
    return out


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="deer-pipeline recover",
        description="Mark runs whose process is gone as failed and free the pool slots of finished "
                    "runs (what the demo and `deer-pipeline ui` do before they start).")
    parser.parse_args(argv)
    from deer_pipeline.ops.instance import get_instance

    instance = get_instance()
    print(recover(instance).summary())
    print("slots held now: " + ", ".join(f"{p} {n}" for p, n in held_slots(instance).items()))
    return 0
