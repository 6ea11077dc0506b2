"""Dagster's share of a run, read from the run's own events (what the demo's summary prints)."""

from __future__ import annotations

import dagster as dg

from deer_pipeline.ops import run_timing


@dg.asset
def first_step() -> int:
    return sum(range(100_000))


@dg.asset
def second_step(first_step: int) -> int:
    return first_step + 1


@dg.asset
def broken_step() -> int:
    raise ValueError("a step that fails")


def test_run_timing_splits_a_run_into_steps_and_dagster():
    with dg.instance_for_test() as instance:
        result = dg.materialize([first_step, second_step], instance=instance)
        timing = run_timing.run_timing(instance, result.run_id)
        failed = dg.materialize([first_step, broken_step], instance=instance, raise_on_error=False)
        failed_timing = run_timing.run_timing(instance, failed.run_id)
    assert timing.run_id == result.run_id and timing.job == result.job_def.name
    assert set(timing.steps) == {"first_step", "second_step"}
    assert 0 < timing.steps_s <= timing.wall_s
    assert timing.dagster_s == timing.wall_s - timing.steps_s
    total = run_timing.summarise([timing, timing])
    assert total["runs"] == 2 and total["run_seconds"] == round(2 * timing.wall_s, 1)
    assert total["dagster_share"] == round((2 * timing.wall_s - 2 * timing.steps_s) / (2 * timing.wall_s), 3)
    assert run_timing.summarise([])["dagster_share"] is None
    # a failed run: ended by RUN_FAILURE, the failed step counted up to its STEP_FAILURE
    assert not failed.success
    assert set(failed_timing.steps) == {"first_step", "broken_step"}
    assert 0 < failed_timing.steps_s <= failed_timing.wall_s
