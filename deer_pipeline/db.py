"""The PostgreSQL + pgvector store: connection, embedded server, migrations, locks.

Plain SQL access, no Dagster here. The database is the URL in ``DEER_DATABASE_URL`` when set,
otherwise an embedded PostgreSQL 16 with pgvector started by ``pgserver`` in a project data
directory (``DEER_DATA_DIR``, default ``.deer/``), reused across runs.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from deer_pipeline import settings

log = logging.getLogger(__name__)

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
DEFAULT_DATA_DIR = settings.DATA_DIR
DEER_DATABASE = "deer"
DAGSTER_DATABASE = "dagster"

_servers: dict[str, object] = {}
_engines: dict[str, Engine] = {}
_lock = threading.Lock()


class DatabaseError(RuntimeError):
    """The store could not be reached or prepared; the message says what to do."""


def data_dir() -> Path:
    return Path(settings.data_dir_setting()).resolve()


def _sqlalchemy_url(url: str, driver: str = "psycopg") -> str:
    """Normalise a PostgreSQL URL to an explicit SQLAlchemy driver."""
    url = re.sub(r"^postgres(ql)?(\+[a-z0-9_]+)?://", f"postgresql+{driver}://", url)
    return url


def embedded_server(pgdata: Path | None = None):
    """Start (or attach to) the embedded PostgreSQL in ``<data dir>/pg`` and return it."""
    pgdata = (pgdata or data_dir() / "pg").resolve()
    key = str(pgdata)
    with _lock:
        if key not in _servers:
            try:
                import pgserver
            except ImportError as exc:  # pragma: no cover - dependency is pinned
                raise DatabaseError(
                    "DEER_DATABASE_URL is not set and the embedded server needs the 'pgserver' "
                    "package: pip install -e . (or set DEER_DATABASE_URL=postgresql://...)"
                ) from exc
            pgdata.mkdir(parents=True, exist_ok=True)
            log.info("starting embedded PostgreSQL in %s", pgdata)
            _servers[key] = pgserver.get_server(pgdata, cleanup_mode="stop")
        return _servers[key]


def _ensure_database(server, name: str) -> None:
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}';")
    if "(1 row)" not in exists:
        server.psql(f'CREATE DATABASE "{name}";')


def database_url(driver: str = "psycopg") -> str:
    """SQLAlchemy URL of the pipeline's database (starting the embedded server if needed)."""
    url = settings.env("DEER_DATABASE_URL")
    if url:
        return _sqlalchemy_url(url, driver)
    server = embedded_server()
    _ensure_database(server, DEER_DATABASE)
    return _sqlalchemy_url(server.get_uri(DEER_DATABASE), driver)


def dagster_storage_url() -> str:
    """URL for Dagster's own instance storage (dagster-postgres needs psycopg2)."""
    url = settings.env("DAGSTER_POSTGRES_URL")
    if url:
        return _sqlalchemy_url(url, "psycopg2")
    if settings.env("DEER_DATABASE_URL"):
        raise DatabaseError(
            "DEER_DATABASE_URL is set but DAGSTER_POSTGRES_URL is not: set DAGSTER_POSTGRES_URL "
            "to a postgresql+psycopg2:// URL for Dagster's run/event storage"
        )
    server = embedded_server()
    _ensure_database(server, DAGSTER_DATABASE)
    return _sqlalchemy_url(server.get_uri(DAGSTER_DATABASE), "psycopg2")


def get_engine(url: str | None = None, migrate: bool = True) -> Engine:
    """A pooled engine for the pipeline's database; migrations are applied on first use."""
    url = url or database_url()
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
            _engines[url] = engine
            fresh = True
        else:
            fresh = False
    if fresh and migrate:
        apply_migrations(engine)
    return engine


def dispose_engines() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


# --------------------------------------------------------------------------------------------
# Migrations: sql/NNN_name.sql, applied in order, each once, recorded in schema_migrations.
# Each file is itself idempotent (IF NOT EXISTS), so a partially applied one can be re-run.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text()

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations(sql_dir: Path = SQL_DIR) -> list[Migration]:
    found = []
    for path in sorted(sql_dir.glob("*.sql")):
        m = re.match(r"^(\d+)_([a-z0-9_]+)\.sql$", path.name)
        if not m:
            raise DatabaseError(f"migration file {path} is not named NNN_name.sql")
        found.append(Migration(int(m.group(1)), m.group(2), path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise DatabaseError(f"duplicate migration numbers in {sql_dir}: {versions}")
    return found


MIGRATION_LOCK_KEY = 0x0DEE_0001


def apply_migrations(engine: Engine, sql_dir: Path = SQL_DIR) -> list[int]:
    """Apply every migration not yet recorded; returns the versions applied now."""
    applied_now = []
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
        conn.execute(sa.text(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        ))
        done = {r.version: r.checksum for r in conn.execute(
            sa.text("SELECT version, checksum FROM schema_migrations"))}
        for m in migrations(sql_dir):
            if m.version in done:
                if done[m.version] != m.checksum:
                    log.warning("migration %s changed after it was applied (checksum differs); "
                                "write a new migration instead of editing %s", m.version, m.path)
                continue
            conn.exec_driver_sql(m.sql)
            conn.execute(
                sa.text("INSERT INTO schema_migrations (version, name, checksum) "
                        "VALUES (:v, :n, :c)"),
                {"v": m.version, "n": m.name, "c": m.checksum},
            )
            applied_now.append(m.version)
    if applied_now:
        log.info("applied migrations %s", applied_now)
    return applied_now


def schema_version(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT coalesce(max(version), 0) FROM schema_migrations")).scalar_one()


# --------------------------------------------------------------------------------------------
# Locks
# --------------------------------------------------------------------------------------------

IDENTITY_LOCK_KEY = 0x0DEE_0002


@contextmanager
def advisory_lock(conn: sa.Connection, key: int) -> Iterator[None]:
    """Hold a transaction-scoped PostgreSQL advisory lock on ``conn`` (blocks until free)."""
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
    yield


def vector_literal(values) -> str:
    """pgvector text form of a 1-d sequence of floats: '[0.1,0.2,...]'."""
    return "[" + ",".join(f"{float(v):.8g}" for v in values) + "]"


def parse_vector(text: str):
    import numpy as np

    return np.array([float(x) for x in text.strip("[]").split(",")], dtype=np.float32)
