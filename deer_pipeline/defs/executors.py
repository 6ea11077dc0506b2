"""How the steps of a run are executed: on this machine, or spread over Celery workers.

``DEER_EXECUTOR`` picks the executor of every job when the code location loads:

``multiprocess`` (default)  each step in its own process on the machine that runs the run
``in_process``              every step in the run worker (debugging)
``celery``                  each step is a Celery task; GPU steps go to the ``gpu`` queue, the
                            others to ``dagster`` (see ``deer_pipeline.ops.celery_app`` for the
                            workers and their environment)

What an asset declares so that this works everywhere:

* the GPU step (``embeddings``): ``pool=GPU_POOL, op_tags=GPU_STEP_TAGS,
  retry_policy=STEP_RETRY_POLICY``: the pool caps GPU steps across all runs of the instance
  (set with ``dagster instance concurrency set gpu N``, one per GPU); the tag routes the step to
  the GPU workers when the celery executor is used and is ignored otherwise.
* the identity step (``deer_profiles``): ``pool=IDENTITY_POOL`` (limit 1, never more).
"""

from __future__ import annotations

from typing import Mapping

import dagster as dg

from deer_pipeline import settings

GPU_POOL = "gpu"
IDENTITY_POOL = "identity"

GPU_QUEUE = "gpu"
DEFAULT_QUEUE = "dagster"
CELERY_QUEUE_TAG = "dagster-celery/queue"

# Put on the embeddings asset: @dg.asset(pool=GPU_POOL, op_tags=GPU_STEP_TAGS, ...)
GPU_STEP_TAGS: Mapping[str, str] = {CELERY_QUEUE_TAG: GPU_QUEUE}

# Steps that fail with an exception (a database hiccup, CUDA out of memory because another
# process held the GPU) are tried again in the same run, after 15 s, then 30 s.
STEP_RETRY_POLICY = dg.RetryPolicy(max_retries=2, delay=15, backoff=dg.Backoff.EXPONENTIAL)

EXECUTOR_CHOICES = ("multiprocess", "in_process", "celery")


def pool_limits_from_env() -> dict[str, int]:
    """Pool limits this deployment wants: ``gpu`` from DEER_GPU_SLOTS (default 1), ``identity`` 1."""
    raw = settings.env("DEER_GPU_SLOTS") or "1"
    try:
        gpu = int(raw)
    except ValueError:
        raise ValueError(f"DEER_GPU_SLOTS must be a whole number (GPUs to use at once), got {raw!r}") from None
    if gpu < 1:
        raise ValueError(f"DEER_GPU_SLOTS must be at least 1, got {gpu}")
    return {GPU_POOL: gpu, IDENTITY_POOL: 1}


def apply_pool_limits(instance: dg.DagsterInstance, limits: Mapping[str, int] | None = None) -> dict[str, int]:
    """Store the pool limits in the instance (what ``dagster instance concurrency set`` does)."""
    limits = dict(pool_limits_from_env() if limits is None else limits)
    if limits.get(IDENTITY_POOL, 1) != 1:
        raise ValueError("the identity pool must stay at 1: match-or-create decisions are serial")
    for pool, limit in limits.items():
        instance.event_log_storage.set_concurrency_slots(pool, int(limit))
    return limits


def _celery_executor() -> dg.ExecutorDefinition:
    from dagster_celery import celery_executor

    from deer_pipeline.ops import celery_app

    return celery_executor.configured(
        {
            "broker": celery_app.broker_url(),
            "backend": celery_app.backend_url(),
            "config_source": celery_app.celery_settings(),
            # Dagster's own step retries (RetryPolicy) stay on under celery.
            "retries": {"enabled": {}},
        },
        name="deer_celery_executor",
    )


def deer_celery_executor() -> dg.ExecutorDefinition:
    """The celery executor configured for this deployment (broker etc. from the environment)."""
    return _celery_executor()


def executor_from_env() -> dg.ExecutorDefinition | None:
    """The executor named by DEER_EXECUTOR, for ``dg.Definitions(executor=...)``.

    ``None`` means Dagster's default (multiprocess). A name that is not known fails at load
    with the variable's name, so a misspelt deployment does not quietly run on one machine.
    """
    choice = (settings.env("DEER_EXECUTOR") or "multiprocess").strip().lower()
    if choice == "multiprocess":
        return None
    if choice == "in_process":
        return dg.in_process_executor
    if choice == "celery":
        return _celery_executor()
    raise ValueError(f"DEER_EXECUTOR must be one of {', '.join(EXECUTOR_CHOICES)}, got {choice!r}")
