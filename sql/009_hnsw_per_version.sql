-- One HNSW index per embedding version (a partial index) instead of one over every version.
--
-- pgvector 0.6 applies WHERE filters after the index scan: with one index over all versions
-- (two per ensemble, more after re-embedding), a look-up "nearest sightings of version V"
-- walked a graph mixed with the other versions' vectors and threw away their rows, so recall
-- fell with the number of versions (recall@10 0.79 at ef_search 200 for 500k sightings x 2
-- models). A partial index per version holds only that version's vectors; a query whose WHERE
-- names the version as a constant uses it (identity.store.NearestSightings inlines it).
--
-- A version gets its index when it is registered (trigger below); bulk loads drop the
-- indexes and build them afterwards (embedding.store.drop_vector_indexes /
-- ensure_vector_indexes). Idempotent: CREATE ... IF NOT EXISTS / OR REPLACE.

CREATE OR REPLACE FUNCTION deer_vector_index_name(version text) RETURNS text
    LANGUAGE sql IMMUTABLE AS
$$ SELECT 'embeddings_hnsw_' || substr(md5(version), 1, 16) $$;

CREATE OR REPLACE FUNCTION deer_ensure_vector_index(version text) RETURNS text
    LANGUAGE plpgsql AS
$$
BEGIN
    -- quote_ident / quote_literal, not format(): the migration runner passes this file
    -- through a driver that reads percent signs as placeholders
    EXECUTE 'CREATE INDEX IF NOT EXISTS ' || quote_ident(deer_vector_index_name(version))
         || ' ON embeddings USING hnsw (vector vector_cosine_ops) WITH (m = 16, ef_construction = 64)'
         || ' WHERE embedding_version = ' || quote_literal(version);
    RETURN deer_vector_index_name(version);
END
$$;

CREATE OR REPLACE FUNCTION deer_embedding_version_added() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    PERFORM deer_ensure_vector_index(NEW.embedding_version);
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS embedding_version_vector_index ON embedding_versions;
CREATE TRIGGER embedding_version_vector_index AFTER INSERT ON embedding_versions
    FOR EACH ROW EXECUTE FUNCTION deer_embedding_version_added();

-- Versions already stored get their index where the shared one was in place (a database left
-- without it on purpose, mid bulk load, stays without until ensure_vector_indexes).
DO $$
BEGIN
    IF to_regclass('embeddings_vector_hnsw') IS NOT NULL THEN
        PERFORM deer_ensure_vector_index(embedding_version) FROM embedding_versions;
    END IF;
END
$$;

DROP INDEX IF EXISTS embeddings_vector_hnsw;
