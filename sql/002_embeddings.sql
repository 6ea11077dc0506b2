-- Embedding versions and vectors (512-d, L2-normalised) keyed by detection and version.
CREATE TABLE IF NOT EXISTS embedding_versions (
    embedding_version  text PRIMARY KEY,
    model              text NOT NULL,       -- resnet50 | multiscale | efficientnet_b0 | efficientnet_lite0
    backbone           text NOT NULL,
    weights_sha256     text NOT NULL,
    reduction_sha256   text NOT NULL,
    preprocessing      text NOT NULL,
    dim                integer NOT NULL,
    details            jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS embeddings (
    detection_id       text NOT NULL REFERENCES detections(detection_id),
    embedding_version  text NOT NULL REFERENCES embedding_versions(embedding_version),
    vector             vector(512),         -- NULL when status = 'failed'
    status             text NOT NULL DEFAULT 'ok',   -- ok | failed
    reason             text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (detection_id, embedding_version)
);
CREATE INDEX IF NOT EXISTS embeddings_vector_hnsw
    ON embeddings USING hnsw (vector vector_cosine_ops) WITH (m = 16, ef_construction = 64);
