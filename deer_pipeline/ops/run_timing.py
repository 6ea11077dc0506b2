"""How a Dagster run's time splits between the pipeline's work and Dagster itself, from the
run's own events: the run's wall time is RUN_START to its end (RUN_SUCCESS / RUN_FAILURE), the
work is the time steps spent computing (STEP_START to STEP_SUCCESS / STEP_FAILURE, summed; the
steps of an in-process run do not overlap). What is left is Dagster's share: planning, resource
set-up, writing events, launching steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

RUN_EVENTS = ("RUN_START", "RUN_SUCCESS", "RUN_FAILURE")
STEP_EVENTS = ("STEP_START", "STEP_SUCCESS", "STEP_FAILURE")


@dataclass
class RunTiming:
    run_id: str
    job: str
    wall_s: float                      # RUN_START -> RUN_SUCCESS / RUN_FAILURE
    steps_s: float                     # sum over steps of STEP_START -> STEP_SUCCESS / STEP_FAILURE
    steps: dict[str, float] = field(default_factory=dict)

    @property
    def dagster_s(self) -> float:
        return max(0.0, self.wall_s - self.steps_s)


def run_timing(instance, run_id: str) -> RunTiming:
    """The timing of one run, read from the instance's event log."""
    import dagster as dg

    kinds = {getattr(dg.DagsterEventType, k): k for k in RUN_EVENTS + STEP_EVENTS}
    run = instance.get_run_by_id(run_id)
    entries = [e for e in instance.all_logs(run_id) if e.dagster_event is not None
               and e.dagster_event.event_type in kinds]
    start = end = None
    step_start: dict[str, float] = {}
    steps: dict[str, float] = {}
    for e in entries:
        kind = kinds[e.dagster_event.event_type]   # (the stored names are PIPELINE_START etc.)
        if kind == "RUN_START":
            start = e.timestamp
        elif kind in ("RUN_SUCCESS", "RUN_FAILURE"):
            end = e.timestamp
        elif kind == "STEP_START":
            step_start[e.step_key] = e.timestamp
        elif e.step_key in step_start:
            steps[e.step_key] = steps.get(e.step_key, 0.0) + e.timestamp - step_start.pop(e.step_key)
    wall = (end - start) if start is not None and end is not None else 0.0
    return RunTiming(run_id, run.job_name if run else "?", round(wall, 3), round(sum(steps.values()), 3),
                     {k: round(v, 3) for k, v in steps.items()})


def summarise(timings: Iterable[RunTiming]) -> dict:
    """Totals over runs: runs, wall seconds, step seconds, Dagster's seconds and share."""
    timings = list(timings)
    wall = sum(t.wall_s for t in timings)
    steps = sum(t.steps_s for t in timings)
    return {"runs": len(timings), "run_seconds": round(wall, 1), "step_seconds": round(steps, 1),
            "dagster_seconds": round(wall - steps, 1),
            "dagster_share": round((wall - steps) / wall, 3) if wall > 0 else None}
