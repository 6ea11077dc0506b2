-- Deer, their sightings (the gallery), profile vectors, similarity scores, ground truth, check results.
CREATE TABLE IF NOT EXISTS deer (
    deer_id                bigserial PRIMARY KEY,
    founding_detection_id  text NOT NULL UNIQUE REFERENCES detections(detection_id),
    sex                    text NOT NULL DEFAULT 'unknown',
    first_seen             timestamptz,
    last_seen              timestamptz,
    sighting_count         integer NOT NULL DEFAULT 0,
    created_at             timestamptz NOT NULL DEFAULT now()
);

-- One row per detection that was decided: which deer it is, and how that was decided.
CREATE TABLE IF NOT EXISTS sightings (
    detection_id       text PRIMARY KEY REFERENCES detections(detection_id),
    deer_id            bigint NOT NULL REFERENCES deer(deer_id),
    encounter_key      text NOT NULL,       -- detections of one burst track, decided together
    partition_key      text NOT NULL,
    decision           text NOT NULL CHECK (decision IN ('matched', 'new')),
    score              real,                -- best similarity that led to the decision
    threshold          real,
    embedding_version  text NOT NULL,
    captured_at        timestamptz,
    decided_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS sightings_deer ON sightings (deer_id);
CREATE INDEX IF NOT EXISTS sightings_partition ON sightings (partition_key);
CREATE INDEX IF NOT EXISTS sightings_time ON sightings (captured_at);

CREATE TABLE IF NOT EXISTS deer_profile_vectors (
    deer_id            bigint NOT NULL REFERENCES deer(deer_id) ON DELETE CASCADE,
    embedding_version  text NOT NULL,
    vector             vector(512) NOT NULL,
    n_sightings        integer NOT NULL,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (deer_id, embedding_version)
);

CREATE TABLE IF NOT EXISTS similarity_scores (
    score_id           bigserial PRIMARY KEY,
    detection_id       text NOT NULL REFERENCES detections(detection_id),
    encounter_key      text NOT NULL,
    candidate_deer_id  bigint,              -- not a foreign key: scores outlive withdrawn deer
    similarity         real NOT NULL,
    components         jsonb NOT NULL DEFAULT '{}'::jsonb,   -- per-model cosine
    sex_match          boolean,
    matched            boolean NOT NULL,
    threshold          real NOT NULL,
    embedding_version  text NOT NULL,
    partition_key      text NOT NULL,
    scored_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS similarity_scores_partition ON similarity_scores (partition_key);
CREATE INDEX IF NOT EXISTS similarity_scores_detection ON similarity_scores (detection_id);

-- Known identities (from a labels file or the sample's ground truth).
CREATE TABLE IF NOT EXISTS true_identities (
    detection_id  text PRIMARY KEY REFERENCES detections(detection_id),
    identity      text NOT NULL,
    source        text NOT NULL
);

CREATE TABLE IF NOT EXISTS check_results (
    check_id       bigserial PRIMARY KEY,
    check_name     text NOT NULL,
    partition_key  text,
    passed         boolean NOT NULL,
    severity       text NOT NULL,
    details        jsonb NOT NULL DEFAULT '{}'::jsonb,
    checked_at     timestamptz NOT NULL DEFAULT now()
);
