"""Dagster's own instance on the pipeline's PostgreSQL (dagster-postgres), for the CLI.

In the embedded default the same pgserver that holds the deer also holds Dagster's runs, event
logs and schedules (database ``dagster``). ``DAGSTER_HOME`` defaults to ``<data dir>/dagster_home``
with a copy of the repository's ``dagster.yaml``, which reads ``DAGSTER_POSTGRES_URL``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from deer_pipeline import db, settings

REPO_ROOT = Path(__file__).resolve().parents[2]
DAGSTER_YAML = REPO_ROOT / "dagster.yaml"


def prepare_dagster_home() -> Path:
    """Set DAGSTER_HOME and DAGSTER_POSTGRES_URL (when unset) and return the home directory."""
    if not settings.env("DAGSTER_POSTGRES_URL"):
        os.environ["DAGSTER_POSTGRES_URL"] = db.dagster_storage_url()
    home = Path(settings.env("DAGSTER_HOME") or db.data_dir() / "dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    if DAGSTER_YAML.exists() and (not target.exists() or target.read_text() != DAGSTER_YAML.read_text()):
        shutil.copyfile(DAGSTER_YAML, target)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def get_instance():
    """A DagsterInstance on the configured (or embedded) PostgreSQL."""
    import dagster as dg

    prepare_dagster_home()
    return dg.DagsterInstance.get()
