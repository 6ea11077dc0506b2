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


def test_each_embedding_version_gets_its_own_hnsw_index(engine):
    """Registering a version creates its partial HNSW index (sql/009); there is no index over
    every version's vectors; bulk loads drop them and build them again."""
    from deer_pipeline.embedding import store as vector_store
    from deer_pipeline_tests.embedding.test_embedding_store import version_info

    vector_store.register_version(engine, version_info("v-idx-1"))
    vector_store.register_version(engine, version_info("v-idx-2"))
    vector_store.register_version(engine, version_info("v-idx-1"))          # again: nothing new
    with engine.begin() as conn:
        names = {v: vector_store.vector_index_name(conn, v) for v in ("v-idx-1", "v-idx-2")}
        found = vector_store.vector_indexes(conn)
        assert set(names.values()) <= set(found) and len(set(names.values())) == 2
        for v, name in names.items():
            d = found[name]
            assert "hnsw" in d and "vector_cosine_ops" in d and f"embedding_version = '{v}'::text" in d, d
        assert conn.execute(sa.text("SELECT to_regclass('embeddings_vector_hnsw')")).scalar_one() is None
        dropped = vector_store.drop_vector_indexes(conn)
        assert set(names.values()) <= set(dropped) and not vector_store.vector_indexes(conn)
        rebuilt = vector_store.ensure_vector_indexes(conn)
        assert set(names.values()) <= set(rebuilt) <= set(vector_store.vector_indexes(conn))


def test_camera_id_with_pipe_is_refused_by_the_schema(engine):
    import pytest

    with pytest.raises(sa.exc.IntegrityError):
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO cameras (camera_id) VALUES ('a|b')"))
