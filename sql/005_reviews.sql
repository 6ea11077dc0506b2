-- People in the loop: review decisions, append-only. Decisions name sightings (detections),
-- never deer ids alone: a replay may renumber deer, the detections stay.
CREATE TABLE IF NOT EXISTS identity_reviews (
    review_id     bigserial PRIMARY KEY,
    kind          text NOT NULL CHECK (kind IN ('same', 'merge', 'different', 'new', 'split',
                                                'unidentifiable', 'name', 'skip', 'undo')),
    detections_a  text[] NOT NULL DEFAULT '{}',   -- the sightings the decision is about
    detections_b  text[] NOT NULL DEFAULT '{}',   -- the other side (candidate deer, rest of a deer)
    deer_a        bigint,                         -- deer ids as shown when decided (informative only)
    deer_b        bigint,
    name          text,                           -- kind = name
    note          text,
    reviewer      text NOT NULL,
    source        text NOT NULL DEFAULT 'web',    -- web | cli | csv
    item_key      text,                           -- the review-queue item answered, if any
    score         real,                           -- the score shown when decided, if any
    undoes        bigint REFERENCES identity_reviews(review_id),   -- kind = undo
    created_at    timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'undo') = (undoes IS NOT NULL)),
    CHECK (kind <> 'name' OR coalesce(name, '') <> '')
);
CREATE INDEX IF NOT EXISTS identity_reviews_item ON identity_reviews (item_key);
CREATE INDEX IF NOT EXISTS identity_reviews_a ON identity_reviews USING gin (detections_a);
CREATE INDEX IF NOT EXISTS identity_reviews_b ON identity_reviews USING gin (detections_b);
CREATE UNIQUE INDEX IF NOT EXISTS identity_reviews_one_undo ON identity_reviews (undoes)
    WHERE undoes IS NOT NULL;

-- Append-only: a decision is withdrawn by a later 'undo' row, never by UPDATE or DELETE.
CREATE OR REPLACE FUNCTION identity_reviews_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION USING MESSAGE = 'identity_reviews is append-only: record an undo instead of ' || TG_OP;
END
$$ LANGUAGE plpgsql;
CREATE OR REPLACE TRIGGER identity_reviews_append_only
    BEFORE UPDATE OR DELETE ON identity_reviews
    FOR EACH ROW EXECUTE FUNCTION identity_reviews_append_only();

-- Every decision with the undo that withdrew it (undone_by is NULL while it stands).
CREATE OR REPLACE VIEW identity_reviews_status AS
SELECT r.*, u.review_id AS undone_by, u.created_at AS undone_at
FROM identity_reviews r
LEFT JOIN identity_reviews u ON u.undoes = r.review_id;

-- The settings the store was last decided with, so that a correction is replayed exactly as
-- the pipeline decides (threshold, weights, sex filter, embedding versions).
CREATE TABLE IF NOT EXISTS identity_decision_settings (
    id          integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    settings    jsonb NOT NULL,
    versions    jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
