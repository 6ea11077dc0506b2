"""Database helpers shared by the fixtures and the end-to-end tests."""

from __future__ import annotations

import sqlalchemy as sa


def empty_pipeline_tables(engine: sa.Engine) -> None:
    """Empty every pipeline table (schema and migration records kept)."""
    with engine.begin() as conn:
        tables = [r[0] for r in conn.execute(sa.text(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
            "AND tablename <> 'schema_migrations'"))]
        if tables:
            conn.execute(sa.text("TRUNCATE " + ", ".join(f'"{t}"' for t in tables)
                                 + " RESTART IDENTITY CASCADE"))
