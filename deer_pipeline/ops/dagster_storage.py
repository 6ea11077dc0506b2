"""Dagster's own storage on PostgreSQL, riding out database outages of a few minutes.

dagster-postgres retries a failed connection 5 times within about 6 s, then the run worker,
the daemon or the webserver raises: a PostgreSQL restart (an upgrade, a failover, the embedded
server stopped by hand) in the middle of a run crashed the run and left it STARTED holding its
pool slots. These classes are dagster-postgres's storages whose connections are retried for
``outage_retry_seconds`` (default 300) with a bounded backoff (1 s doubling to 15 s). They open
a connection for every operation, so an operation that starts during an outage waits for the
database and then goes on.

Connections are pooled (one kept idle per storage, a few more while threads need them), not
opened afresh for every operation as dagster-postgres's NullPool does: storing one event takes
about four connections, and opening them was most of the time a run spent writing its events
(BENCHMARKS.md, the demo's Dagster share). A pooled connection is pinged when it is taken, so one
that died in an outage is replaced; a reconnect that fails is retried as above. ``dispose()``
closes the pool's connections.

Configured in ``dagster.yaml``::

    storage:
      custom:
        module: deer_pipeline.ops.dagster_storage
        class: ResilientPostgresStorage
        config:
          postgres_url: {env: DAGSTER_POSTGRES_URL}
          outage_retry_seconds: 300

Only Dagster and dagster-postgres are imported here (the daemon and webserver image loads it).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import sqlalchemy
import sqlalchemy.pool
from dagster import Field, IntSource
from dagster._core.storage.config import pg_config
from dagster._serdes import ConfigurableClassData
from dagster_postgres import (DagsterPostgresStorage, PostgresEventLogStorage, PostgresRunStorage,
                              PostgresScheduleStorage)
from dagster_postgres.utils import create_pg_engine, get_token_provider_from_config, pg_url_from_config

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_OUTAGE_RETRY_SECONDS = 300
MAX_DELAY_S = 15.0
POOL_SIZE = 1          # connections kept open per storage
POOL_OVERFLOW = 4      # more, closed when returned, while several threads write at once
MODULE = __name__


def connect_with_retry(connect: Callable[[], T], budget_s: float, what: str = "Dagster storage") -> T:
    """``connect()``, retried on connection errors until ``budget_s`` seconds have passed."""
    deadline = time.monotonic() + budget_s
    delay = 1.0
    attempt = 0
    while True:
        attempt += 1
        try:
            return connect()
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                sqlalchemy.exc.TimeoutError) as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            wait = min(delay, left, MAX_DELAY_S)
            log.warning("%s: database unreachable (attempt %d, %.0f s of %.0f s left), retrying in %.0f s: %s",
                        what, attempt, left, budget_s, wait, str(exc).splitlines()[0])
            time.sleep(wait)
            delay = min(delay * 2, MAX_DELAY_S)


@contextmanager
def _retrying_connection(engine: sqlalchemy.Engine, budget_s: float) -> Iterator[sqlalchemy.Connection]:
    conn = connect_with_retry(engine.connect, budget_s)
    try:
        yield conn
    finally:
        conn.close()


def _config_type() -> dict:
    return {**pg_config(), "outage_retry_seconds": Field(
        IntSource, is_required=False, default_value=DEFAULT_OUTAGE_RETRY_SECONDS,
        description="how long a connection to Dagster's storage is retried before giving up")}


def _kwargs(config_value: dict) -> dict:
    return {"postgres_url": pg_url_from_config(config_value),
            "should_autocreate_tables": config_value.get("should_autocreate_tables", True),
            "token_provider": get_token_provider_from_config(config_value),
            "outage_retry_seconds": int(config_value.get("outage_retry_seconds", DEFAULT_OUTAGE_RETRY_SECONDS))}


class _FromConfig:
    """The configuration schema and construction shared by the storages below (dagster.yaml)."""

    @classmethod
    def config_type(cls):
        return _config_type()

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        return cls(inst_data=inst_data, **_kwargs(config_value))


class _Resilient(_FromConfig):
    """Mixed into each of Dagster's postgres storages: connections retried through outages."""

    outage_retry_seconds: float = DEFAULT_OUTAGE_RETRY_SECONDS
    _engine: sqlalchemy.Engine

    def __init__(self, postgres_url: str, should_autocreate_tables: bool = True, inst_data=None,
                 token_provider=None, outage_retry_seconds: int = DEFAULT_OUTAGE_RETRY_SECONDS):
        self.outage_retry_seconds = outage_retry_seconds
        super().__init__(postgres_url, should_autocreate_tables, inst_data, token_provider)
        self._engine.dispose()
        self._engine = create_pg_engine(postgres_url, token_provider, isolation_level="AUTOCOMMIT",
                                        poolclass=sqlalchemy.pool.QueuePool, pool_size=POOL_SIZE,
                                        max_overflow=POOL_OVERFLOW, pool_pre_ping=True)

    def dispose(self) -> None:
        super().dispose()
        self._engine.dispose()

    def _connect(self):
        return _retrying_connection(self._engine, self.outage_retry_seconds)


class ResilientPostgresRunStorage(_Resilient, PostgresRunStorage):
    pass


class ResilientPostgresEventLogStorage(_Resilient, PostgresEventLogStorage):
    pass


class ResilientPostgresScheduleStorage(_Resilient, PostgresScheduleStorage):
    pass


class ResilientPostgresStorage(_FromConfig, DagsterPostgresStorage):
    """``storage: postgres`` with connections retried through outages of a few minutes."""

    def __init__(self, postgres_url: str, should_autocreate_tables: bool = True, inst_data=None,
                 token_provider=None, outage_retry_seconds: int = DEFAULT_OUTAGE_RETRY_SECONDS):
        self.postgres_url = postgres_url
        self.should_autocreate_tables = bool(should_autocreate_tables)
        self.outage_retry_seconds = int(outage_retry_seconds)
        self._inst_data = inst_data
        args: dict[str, Any] = {"token_provider": token_provider, "outage_retry_seconds": self.outage_retry_seconds}
        self._run_storage = ResilientPostgresRunStorage(postgres_url, should_autocreate_tables, **args)
        self._event_log_storage = ResilientPostgresEventLogStorage(postgres_url, should_autocreate_tables, **args)
        self._schedule_storage = ResilientPostgresScheduleStorage(postgres_url, should_autocreate_tables, **args)
        # DagsterStorage.__init__ (not DagsterPostgresStorage's, which builds plain storages)
        super(DagsterPostgresStorage, self).__init__()

    def _data(self, cls_name: str) -> ConfigurableClassData | None:
        return ConfigurableClassData(MODULE, cls_name, self.inst_data.config_yaml) if self.inst_data else None

    @property
    def event_storage_data(self):
        return self._data("ResilientPostgresEventLogStorage")

    @property
    def run_storage_data(self):
        return self._data("ResilientPostgresRunStorage")

    @property
    def schedule_storage_data(self):
        return self._data("ResilientPostgresScheduleStorage")
