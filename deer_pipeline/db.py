"""The PostgreSQL + pgvector store: connection, embedded server, migrations, locks.

Plain SQL access, no Dagster here. The database is the URL in ``DEER_DATABASE_URL`` when set,
otherwise an embedded PostgreSQL 16 with pgvector started by ``pgserver`` in a project data
directory (``DEER_DATA_DIR``, default ``.deer/``), reused across runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

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
    """Start (or attach to) the embedded PostgreSQL in ``<data dir>/pg`` and return it.

    The server is shared by every process of the data directory and stopped when the last of
    them exits (pgserver counts them in ``.handle_pids.json``). A process killed with SIGKILL
    never says goodbye, so before attaching, the processes of that list that are gone are
    removed (the server is then reused and stopped by the last living user), and embedded
    servers whose users are all gone or whose data directory was deleted are stopped."""
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
            from pgserver.postgres_server import PostgresServer

            with PostgresServer._lock:              # pgserver's own lock: no user attaches meanwhile
                stopped = stop_orphan_servers(keep=pgdata)
                if stopped:
                    log.info("stopped %d orphaned embedded PostgreSQL server(s): %s", len(stopped),
                             ", ".join(stopped))
                pgdata = _without_spaces(pgdata)
                _forget_dead_users(pgdata)
            log.info("starting embedded PostgreSQL in %s", pgdata)
            _servers[key] = pgserver.get_server(pgdata, cleanup_mode="stop")
        return _servers[key]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _forget_dead_users(pgdata: Path) -> list[int]:
    """Drop the processes that are gone from pgserver's list of the server's users."""
    handles = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text())
    except (OSError, ValueError):
        return []
    alive = [p for p in pids if isinstance(p, int) and _pid_alive(p)]
    if alive != pids:
        handles.write_text(json.dumps(alive))
    return [p for p in pids if p not in alive]


def _without_spaces(pgdata: Path) -> Path:
    """pgserver passes the socket directory to postgres unquoted (``-o "-k DIR"``), so a server
    whose data directory path contains a space does not start. Such a ``pg`` directory becomes
    a link to ``<user data dir>/deer_pipeline/pg-<hash of the path>``, and the server runs there.
    An already initialised directory stays where it is and gets its socket elsewhere: a plain
    file named like the socket makes pgserver choose its runtime directory."""
    if " " not in str(pgdata):
        return pgdata
    if (pgdata / "PG_VERSION").exists():
        marker = pgdata / ".s.PGSQL.5432"
        if not marker.exists():
            marker.write_text("the socket of this server is in pgserver's runtime directory "
                              "(this path contains a space)\n")
        return pgdata
    import platformdirs

    target = platformdirs.user_data_path("deer_pipeline") / (
        "pg-" + hashlib.sha256(str(pgdata).encode()).hexdigest()[:12])
    if " " in str(target):
        raise DatabaseError(f"the data directory {pgdata.parent} contains a space, and so does {target}: "
                            "set DEER_DATA_DIR to a path without spaces")
    if pgdata.exists() and not pgdata.is_symlink():
        if any(pgdata.iterdir()):
            raise DatabaseError(f"{pgdata} contains a space in its path and is not empty; move it or set "
                                "DEER_DATA_DIR to a path without spaces")
        pgdata.rmdir()
    target.mkdir(parents=True, exist_ok=True)
    if not pgdata.is_symlink():
        pgdata.symlink_to(target, target_is_directory=True)
    log.info("the embedded PostgreSQL of %s runs in %s (its path has a space)", pgdata, target)
    return target.resolve()


def _postmasters() -> list[tuple[int, Path]]:
    """(pid, data directory) of every postmaster of pgserver's PostgreSQL (Linux /proc; under
    root pgserver runs them as the user ``pgserver``)."""
    from pgserver._commands import POSTGRES_BIN_PATH

    binary = os.fsencode(str(POSTGRES_BIN_PATH / "postgres"))
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or argv[0] != binary or b"-D" not in argv:
            continue
        i = argv.index(b"-D")
        if i + 1 < len(argv):
            found.append((int(entry.name), Path(os.fsdecode(argv[i + 1]))))
    return found


def stop_orphan_servers(keep: Path | None = None) -> list[str]:
    """Stop embedded (pgserver) servers nobody uses: their data directory was deleted, or every
    process in their ``.handle_pids.json`` is gone. ``keep`` (the server about to be attached)
    is left running, to be reused. Servers of other programs (no handle list) are not touched.
    Call with pgserver's lock held. Returns the data directories stopped."""
    stopped = []
    for pid, pgdata in _postmasters():
        if keep is not None and pgdata == keep:
            continue
        handles = pgdata / ".handle_pids.json"
        if pgdata.exists():
            if not handles.exists():
                continue            # not started by pgserver
            try:
                users = json.loads(handles.read_text())
            except (OSError, ValueError):
                continue
            if any(isinstance(p, int) and _pid_alive(p) for p in users):
                continue
        try:
            os.kill(pid, signal.SIGINT)     # fast shutdown: roll back, close connections, exit
        except (ProcessLookupError, PermissionError):
            continue
        for _ in range(50):
            if not _pid_alive(pid):
                break
            time.sleep(0.1)
        else:
            try:
                os.kill(pid, signal.SIGQUIT)
            except ProcessLookupError:
                pass
        if pgdata.exists():
            _forget_dead_users(pgdata)
        stopped.append(str(pgdata))
    return stopped


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


# --------------------------------------------------------------------------------------------
# Transient faults: a restarted or unreachable server. Decisions and writes are retried as a
# whole (each is one transaction, or idempotent), with a bounded backoff.
# --------------------------------------------------------------------------------------------

T = TypeVar("T")
DEFAULT_RETRY_SECONDS = 300.0
_TRANSIENT_SQLSTATES = ("08", "57P01", "57P02", "57P03", "40001", "40P01", "53300")


def retry_seconds() -> float:
    """How long decisions and writes wait for the database: DEER_DB_RETRY_S, default 300."""
    raw = settings.env("DEER_DB_RETRY_S")
    try:
        return float(raw) if raw else DEFAULT_RETRY_SECONDS
    except ValueError:
        raise DatabaseError(f"DEER_DB_RETRY_S must be a number of seconds, got {raw!r}") from None


def is_transient(exc: BaseException) -> bool:
    """A lost or refused connection, a server shutting down or starting, a serialisation
    failure or deadlock: worth trying again. Errors in the SQL or the data are not."""
    if isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)):
        return True
    if isinstance(exc, sa.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None) or ""
        return any(code.startswith(c) for c in _TRANSIENT_SQLSTATES)
    return False


def retry_transient(fn: Callable[[], T], what: str, budget_s: float | None = None,
                    on_retry: Callable[[str], None] | None = None) -> T:
    """``fn()``, tried again while it fails with a transient database fault, for at most
    ``budget_s`` seconds (DEER_DB_RETRY_S, default 300), waiting 1 s doubling to 15 s between
    tries. ``fn`` must be safe to repeat: one transaction (rolled back by the fault) or
    idempotent writes. The last fault is raised when the budget is spent."""
    budget = retry_seconds() if budget_s is None else float(budget_s)
    deadline = time.monotonic() + budget
    delay, attempt = 1.0, 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            wait = min(delay, left, 15.0)
            message = (f"{what}: database fault (attempt {attempt}), trying again in {wait:.0f} s "
                       f"({left:.0f} s left): {str(exc).splitlines()[0][:200]}")
            log.warning(message)
            if on_retry is not None:
                on_retry(message)
            time.sleep(wait)
            delay = min(delay * 2, 15.0)


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
