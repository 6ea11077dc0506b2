"""An isolated database for one evaluation run: created empty with the pipeline's migrations and dropped afterwards, so an evaluation never touches the pipeline's own data."""

from __future__ import annotations

import logging
import secrets
from contextlib import contextmanager
from typing import Iterator

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from deer_pipeline import db, settings

log = logging.getLogger(__name__)


@contextmanager
def isolated_database(prefix: str = "deer_eval", base_url: str | None = None) -> Iterator[Engine]:
    """A fresh, migrated database for one evaluation, dropped afterwards.

    Embedded server (no ``DEER_DATABASE_URL``): ``CREATE DATABASE <prefix>_<random>`` on it.
    With ``DEER_DATABASE_URL``: a new database on that server when the role may create one,
    otherwise a new schema ``<prefix>_<random>`` in that database (search_path set to it, then
    public for the vector type), dropped with CASCADE afterwards. ``base_url`` overrides
    ``DEER_DATABASE_URL``."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    name = f"{prefix}_{secrets.token_hex(5)}"
    url = base_url or settings.env("DEER_DATABASE_URL")
    cleanup = None
    if url:
        base = make_url(db._sqlalchemy_url(url))
        admin = sa.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        try:
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
            eng_url = base.set(database=name)
            connect_args = {}

            def cleanup():
                with admin.connect() as conn:
                    conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        except sa.exc.DBAPIError:
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE SCHEMA "{name}"'))
            eng_url = base
            connect_args = {"options": f"-csearch_path={name},public"}

            def cleanup():
                with admin.connect() as conn:
                    conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
    else:
        server = db.embedded_server()
        server.psql(f'CREATE DATABASE "{name}";')
        eng_url = db._sqlalchemy_url(server.get_uri(name))
        connect_args = {}

        def cleanup():
            server.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE);')
    engine = sa.create_engine(eng_url, poolclass=NullPool, connect_args=connect_args)
    try:
        db.apply_migrations(engine)
        yield engine
    finally:
        engine.dispose()
        try:
            cleanup()
        except Exception as exc:  # never hide the real error behind a cleanup failure
            log.warning("could not drop the evaluation database %s: %s", name, exc)
