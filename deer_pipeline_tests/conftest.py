"""Shared fixtures. Every test that touches the database uses a real embedded PostgreSQL with
pgvector (pgserver), started once per session in a short temporary directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# One short data directory per test session: pgserver puts its socket there (path < ~100 chars).
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="deer-", dir="/tmp"))
os.environ["DEER_DATA_DIR"] = str(_SESSION_DIR)
os.environ.pop("DEER_DATABASE_URL", None)
os.environ.pop("DAGSTER_POSTGRES_URL", None)
os.environ.setdefault("DEER_CROP_STORE", str(_SESSION_DIR / "crops"))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NYALA_DIR = SHARED_DATA / "nyala-dev"


def pytest_sessionfinish(session, exitstatus):
    from deer_pipeline import db

    db.dispose_engines()
    for server in list(db._servers.values()):
        try:
            server.cleanup()
        except Exception:
            pass
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture(scope="session")
def session_engine():
    from deer_pipeline import db

    return db.get_engine()


@pytest.fixture
def engine(session_engine):
    """The pipeline database, emptied before the test (schema kept)."""
    from deer_pipeline_tests.dbutil import empty_pipeline_tables

    empty_pipeline_tables(session_engine)
    return session_engine


@pytest.fixture
def crop_dir(tmp_path) -> Path:
    d = tmp_path / "crops"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def nyala_dir() -> Path:
    if not (NYALA_DIR / "labels.csv").exists():
        pytest.skip(f"labelled nyala photos not found at {NYALA_DIR} (../shared/data/nyala-dev)")
    return NYALA_DIR
