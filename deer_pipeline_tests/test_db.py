import sqlalchemy as sa

from deer_pipeline import db


def test_migrations_apply_twice_cleanly(session_engine):
    # First application happened when the engine was created; a second applies nothing.
    assert db.apply_migrations(session_engine) == []
    assert db.apply_migrations(session_engine) == []
    versions = [m.version for m in db.migrations()]
    with session_engine.connect() as conn:
        recorded = [r[0] for r in conn.execute(sa.text("SELECT version FROM schema_migrations ORDER BY 1"))]
        assert recorded == versions
        ext = conn.execute(sa.text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")).scalar_one()
        assert ext.startswith("0.")


def test_each_migration_file_is_idempotent_on_its_own(session_engine):
    # Re-running the raw SQL of every migration must not fail (IF NOT EXISTS everywhere).
    with session_engine.begin() as conn:
        for m in db.migrations():
            conn.exec_driver_sql(m.sql)


def test_hnsw_index_exists(session_engine):
    with session_engine.connect() as conn:
        idx = conn.execute(sa.text(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'embeddings_vector_hnsw'")).scalar_one()
    assert "hnsw" in idx and "vector_cosine_ops" in idx


def test_camera_id_with_pipe_is_refused_by_the_schema(engine):
    import pytest

    with pytest.raises(sa.exc.IntegrityError):
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO cameras (camera_id) VALUES ('a|b')"))
