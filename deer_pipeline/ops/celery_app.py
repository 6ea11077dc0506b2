"""The Celery app of the scale-out workers (``dagster-celery``; Redis is the broker).

A GPU box runs one worker per GPU on the ``gpu`` queue; any box may run workers on the default
``dagster`` queue for the CPU steps::

    CUDA_VISIBLE_DEVICES=0 celery -A deer_pipeline.ops.celery_app worker -Q gpu -c 1 -n gpu0@%h
    celery -A deer_pipeline.ops.celery_app worker -Q dagster -c 2 -n cpu@%h

The run worker (the Dagster side, ``deer_pipeline.defs.executors.deer_celery_executor``) and
these workers build their Celery configuration from the same function, ``celery_settings()``,
from these environment variables:

``DEER_CELERY_BROKER_URL``           broker, default ``redis://localhost:6379/0``
``DEER_CELERY_BACKEND_URL``          where step results go, default: the broker
``DEER_CELERY_VISIBILITY_TIMEOUT_S`` how long a step may run before the broker hands it to
                                     another worker as lost (default 7200: longer than any step)
``DEER_CELERY_RESTORE_INTERVAL_S``   how often workers look for lost steps (default 10)
``DEER_CELERY_LOST_STEP_RETRIES``    how often a step whose process was killed is sent again
                                     (default 2; then the step, and so the run, fails)
``DEER_CELERY_LOST_STEP_DELAY_S``    seconds before such a step is sent again (default 5)

A worker that dies during a step (killed, out of memory, the machine gone) does not lose the
step: messages are acknowledged only when the step has finished (``task_acks_late``); a step
whose process was killed is sent again after a few seconds (``task_retry_on_worker_lost``, at
most DEER_CELERY_LOST_STEP_RETRIES times, so a step that kills its process every time cannot
loop forever); a step whose whole worker vanished is handed to another worker after the
visibility timeout. The step then runs again from the start, so every step must be idempotent
(this pipeline's writes are keyed by detection and partition).

Importing this module needs the ``celery`` extra (dagster-celery, redis); it connects to nothing.
"""

from __future__ import annotations

from dagster_celery.config import DEFAULT_CONFIG, dict_wrapper
from dagster_celery.make_app import make_app
from dagster_celery.tasks import (
    create_execute_job_task,
    create_resume_job_task,
    create_task,
)

from deer_pipeline import settings

DEFAULT_QUEUE = "dagster"
GPU_QUEUE = "gpu"
DEFAULT_BROKER_URL = "redis://localhost:6379/0"


def broker_url() -> str:
    return settings.env("DEER_CELERY_BROKER_URL") or DEFAULT_BROKER_URL


def backend_url() -> str:
    return settings.env("DEER_CELERY_BACKEND_URL") or broker_url()


def _int_env(name: str, default: int, minimum: int = 1) -> int:
    raw = settings.env(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number of seconds, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def celery_settings() -> dict:
    """Celery settings shared by the run worker and the workers (lowercase Celery names)."""
    transport = dict(DEFAULT_CONFIG["broker_transport_options"])
    transport.update({
        "visibility_timeout": _int_env("DEER_CELERY_VISIBILITY_TIMEOUT_S", 7200),
        "unacked_restore_interval": _int_env("DEER_CELERY_RESTORE_INTERVAL_S", 10),
        "unacked_restore_throttle": 1,
    })
    settings = dict(DEFAULT_CONFIG)
    settings.update({
        "task_default_queue": DEFAULT_QUEUE,
        # A step is acknowledged when it has finished, not when it was received: a worker that
        # dies mid-step leaves it on the broker for another worker.
        "task_acks_late": True,
        "task_retry_on_worker_lost": True,
        "task_reject_on_worker_lost": True,
        # One step per worker process at a time, none held back in a worker's prefetch buffer:
        # steps spread over idle workers and a dead worker strands nothing else.
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "result_expires": 7 * 24 * 3600,
    })
    return settings


def app_args() -> dict:
    """Arguments of ``celery.Celery`` for this deployment (what dagster-celery's ``make_app`` takes)."""
    return {
        "broker": broker_url(),
        "backend": backend_url(),
        "include": [],
        "config_source": dict_wrapper(celery_settings()),
    }


app = make_app(app_args())

# The tasks dagster-celery sends: one step (execute_plan), and whole runs for the celery run
# launcher (execute_job / resume_job).
execute_plan = create_task(
    app,
    max_retries=_int_env("DEER_CELERY_LOST_STEP_RETRIES", 2, minimum=0),
    default_retry_delay=_int_env("DEER_CELERY_LOST_STEP_DELAY_S", 5, minimum=0),
)
execute_job = create_execute_job_task(app)
resume_job = create_resume_job_task(app)
