"""Dagster's default run launcher, plus the run worker health check run monitoring needs.

With the ``DefaultRunLauncher`` each run is a process started by the code server. When that
process dies, the code server marks the run failed - as long as the code server itself lives.
When the code server dies too (container restart, ``kill -9`` of ``dagster dev``), nobody does,
and the default launcher cannot tell run monitoring, so the run stays STARTED with its pool
slots forever. ``DeerRunLauncher`` answers run monitoring's question "is this run's worker
alive?":

* runs that carry the process that executes them (``deer/host``, ``deer/pid`` tags: in-process
  runs such as the demo's) are checked by that process, when it is on this machine;
* runs launched through a code server are asked of that server (``GetCurrentRuns``): a server
  that answers without the run has lost it; a server that cannot be reached for longer than
  ``unreachable_grace_seconds`` (default 120) is gone, and so are its run workers.

Run monitoring (``dagster.yaml``) then marks the run failed, ``run_retries`` starts it again from
the failed step, and ``free_slots_after_run_end_seconds`` frees its slots. Configure::

    run_launcher:
      module: deer_pipeline.ops.run_launcher
      class: DeerRunLauncher
      config: {unreachable_grace_seconds: 120}

Only Dagster is imported here (the daemon and webserver image loads it).
"""

from __future__ import annotations

import json
import socket
import time

from dagster import Field, IntSource
from dagster._core.launcher import CheckRunHealthResult, DefaultRunLauncher, WorkerStatus
from dagster._serdes import ConfigurableClassData

from deer_pipeline.ops import recovery

DEFAULT_UNREACHABLE_GRACE_S = 120


class DeerRunLauncher(DefaultRunLauncher):
    def __init__(self, inst_data: ConfigurableClassData | None = None,
                 unreachable_grace_seconds: int = DEFAULT_UNREACHABLE_GRACE_S):
        super().__init__(inst_data=inst_data)
        self.unreachable_grace_seconds = int(unreachable_grace_seconds)
        self._unreachable_since: dict[str, float] = {}

    @classmethod
    def config_type(cls):
        return {"unreachable_grace_seconds": Field(
            IntSource, is_required=False, default_value=DEFAULT_UNREACHABLE_GRACE_S,
            description="a run whose code server cannot be reached this long is taken as dead")}

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        return cls(inst_data=inst_data, **config_value)

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run) -> CheckRunHealthResult:
        tags = run.tags
        if tags.get(recovery.PID_TAG):
            if tags.get(recovery.HOST_TAG) != socket.gethostname():
                return CheckRunHealthResult(WorkerStatus.RUNNING, "run worker on another machine; not checked here")
            pid = int(tags[recovery.PID_TAG])
            if recovery.process_alive(pid, tags.get(recovery.PID_STARTED_TAG) or None):
                return CheckRunHealthResult(WorkerStatus.RUNNING, f"process {pid} is alive")
            return CheckRunHealthResult(WorkerStatus.FAILED, f"the process that ran this run (pid {pid}) is gone")
        info = tags.get(recovery.GRPC_INFO_TAG)
        if not info:
            return CheckRunHealthResult(WorkerStatus.RUNNING, "no worker information; not checked")
        return self._ask_code_server(run.run_id, json.loads(info))

    def _ask_code_server(self, run_id: str, info: dict) -> CheckRunHealthResult:
        from dagster._grpc.client import DagsterGrpcClient
        from dagster._grpc.types import GetCurrentRunsResult
        from dagster._serdes import deserialize_value

        client = DagsterGrpcClient(port=info.get("port"), socket=info.get("socket"), host=info.get("host"),
                                   use_ssl=bool(info.get("use_ssl", False)))
        try:
            current = deserialize_value(client.get_current_runs(), GetCurrentRunsResult).current_runs
        except Exception as exc:
            first = self._unreachable_since.setdefault(run_id, time.monotonic())
            waited = time.monotonic() - first
            if waited < self.unreachable_grace_seconds:
                return CheckRunHealthResult(WorkerStatus.RUNNING, f"code server unreachable for {waited:.0f} s "
                                            f"(grace {self.unreachable_grace_seconds} s): {type(exc).__name__}")
            self._unreachable_since.pop(run_id, None)
            return CheckRunHealthResult(WorkerStatus.NOT_FOUND, f"the code server that started this run has been "
                                        f"unreachable for {waited:.0f} s; its run workers are gone")
        self._unreachable_since.pop(run_id, None)
        if run_id in current:
            return CheckRunHealthResult(WorkerStatus.RUNNING, "the code server runs it")
        return CheckRunHealthResult(WorkerStatus.NOT_FOUND, "the code server that started this run no longer runs it "
                                    "(it was restarted, or the run's process died)")
