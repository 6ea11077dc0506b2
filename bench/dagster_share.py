"""Dagster's share of the demo's run time, two ways, on a fresh data directory.

    DEER_DATA_DIR=/tmp/dshare PYTHONPATH=. .venv/bin/python bench/dagster_share.py

Runs ``deer-pipeline demo`` in this process with Dagster's event storage timed, then reads every
run the demo launched from the instance:

* **from the runs' events** (what the demo's summary prints): each run from RUN_START to its end,
  against the time its steps took (STEP_START to STEP_SUCCESS / STEP_FAILURE). Events written
  while a step runs (its materializations, check evaluations, log lines) count as the step's;
* **strict**: every ``execute_in_process`` call from its start to its return (creating the run and
  its plan included), against the steps' time less the time Dagster spent inside the steps
  storing events and reloading the run's partition keys (``add_asset_metadata``).

Self-contained (it does not need ``deer_pipeline.ops.run_timing``), so the same file measures an
older checkout: ``PYTHONPATH=<checkout> python bench/dagster_share.py``.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections import Counter


def main() -> int:
    import dagster as dg
    from dagster._core.execution.context.asset_execution_context import AssetExecutionContext
    from dagster._core.instance import DagsterInstance

    spent: Counter = Counter()
    state = {"in_step": 0}
    step_start, step_end = dg.DagsterEventType.STEP_START, {dg.DagsterEventType.STEP_SUCCESS,
                                                           dg.DagsterEventType.STEP_FAILURE}

    orig_event = DagsterInstance.handle_new_event

    def handle_new_event(self, event, *a, **k):
        kind = event.dagster_event.event_type if event.dagster_event is not None else None
        if kind == step_start:
            state["in_step"] += 1
        t = time.perf_counter()
        try:
            return orig_event(self, event, *a, **k)
        finally:
            dt_ = time.perf_counter() - t
            spent["event_writes"] += dt_
            spent["events"] += 1
            if state["in_step"] and kind != step_start:
                spent["event_writes_in_steps"] += dt_
            if kind in step_end:
                state["in_step"] -= 1

    def timed(fn, key: str):
        """``fn`` with its wall time added to ``spent[key]``."""
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t
        return wrapper

    DagsterInstance.handle_new_event = handle_new_event
    AssetExecutionContext.add_asset_metadata = timed(AssetExecutionContext.add_asset_metadata, "add_asset_metadata")
    dg.JobDefinition.execute_in_process = timed(dg.JobDefinition.execute_in_process, "execute_in_process")

    from deer_pipeline import demo

    t0 = time.perf_counter()
    rc = demo.main(["--quiet"])
    total = time.perf_counter() - t0

    from deer_pipeline.ops.instance import get_instance

    instance = get_instance()
    wall = steps = 0.0
    runs = 0
    kinds = {dg.DagsterEventType.RUN_START, dg.DagsterEventType.RUN_SUCCESS, dg.DagsterEventType.RUN_FAILURE,
             step_start, *step_end}
    for run in instance.get_runs():
        runs += 1
        started: dict[str, float] = {}
        start = end = None
        for e in instance.all_logs(run.run_id):
            kind = e.dagster_event.event_type if e.dagster_event is not None else None
            if kind not in kinds:
                continue
            if kind == dg.DagsterEventType.RUN_START:
                start = e.timestamp
            elif kind in (dg.DagsterEventType.RUN_SUCCESS, dg.DagsterEventType.RUN_FAILURE):
                end = e.timestamp
            elif kind == step_start:
                started[e.step_key] = e.timestamp
            elif e.step_key in started:
                steps += e.timestamp - started.pop(e.step_key)
        if start is not None and end is not None:
            wall += end - start
    work = steps - spent["event_writes_in_steps"] - spent["add_asset_metadata"]
    calls = spent["execute_in_process"]
    print()
    print(f"machine: {platform.node()} {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
          f"demo {total:.1f} s, exit code {rc}")
    print(f"runs: {runs}; Dagster events stored: {int(spent['events'])} in {spent['event_writes']:.1f} s "
          f"({spent['event_writes_in_steps']:.1f} s of them inside steps); add_asset_metadata "
          f"{spent['add_asset_metadata']:.1f} s")
    print(f"from the runs' events: runs {wall:.1f} s, steps {steps:.1f} s: Dagster's share {(wall - steps) / wall:.0%}")
    print(f"strict: execute_in_process {calls:.1f} s, pipeline work in steps {work:.1f} s: "
          f"Dagster's share {(calls - work) / calls:.0%}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
