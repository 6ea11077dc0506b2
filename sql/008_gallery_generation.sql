-- The generation of the gallery (the decided sightings), so that a process keeping the gallery
-- in memory (identity/gallery_cache.py) can tell whether it is still what the store holds.
-- Every statement that writes sightings (decisions, withdrawals, reviews' replays, rollbacks,
-- evaluation resets, anything else, even TRUNCATE) bumps it in its own transaction through
-- statement triggers, and so does a statement that deletes embeddings or changes a detection's
-- sex (both change what the in-memory gallery holds). ``epoch`` is new whenever the row is
-- created again (for example after the table was truncated), so counters never collide.
CREATE TABLE IF NOT EXISTS gallery_generation (
    id          integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    epoch       uuid NOT NULL DEFAULT gen_random_uuid(),
    generation  bigint NOT NULL DEFAULT 0
);
INSERT INTO gallery_generation (id) VALUES (1) ON CONFLICT DO NOTHING;

CREATE OR REPLACE FUNCTION bump_gallery_generation() RETURNS trigger AS $$
BEGIN
    INSERT INTO gallery_generation (id, generation) VALUES (1, 1)
    ON CONFLICT (id) DO UPDATE SET generation = gallery_generation.generation + 1;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE OR REPLACE TRIGGER sightings_bump_gallery_generation
    AFTER INSERT OR UPDATE OR DELETE ON sightings
    FOR EACH STATEMENT EXECUTE FUNCTION bump_gallery_generation();
CREATE OR REPLACE TRIGGER sightings_truncate_bumps_gallery_generation
    AFTER TRUNCATE ON sightings
    FOR EACH STATEMENT EXECUTE FUNCTION bump_gallery_generation();
CREATE OR REPLACE TRIGGER embeddings_delete_bumps_gallery_generation
    AFTER DELETE ON embeddings
    FOR EACH STATEMENT EXECUTE FUNCTION bump_gallery_generation();
CREATE OR REPLACE TRIGGER embeddings_truncate_bumps_gallery_generation
    AFTER TRUNCATE ON embeddings
    FOR EACH STATEMENT EXECUTE FUNCTION bump_gallery_generation();
CREATE OR REPLACE TRIGGER detections_sex_bumps_gallery_generation
    AFTER UPDATE OF sex ON detections
    FOR EACH STATEMENT EXECUTE FUNCTION bump_gallery_generation();

-- Similarity scores written with binary COPY: the per-model cosines in real columns (the models
-- named once per row in ``component_models``, their cosines in the same order in
-- ``component_scores``) instead of JSON text. ``components`` (jsonb) stays for rows written
-- before; read both through ``score_components(component_models, component_scores, components)``.
ALTER TABLE similarity_scores ADD COLUMN IF NOT EXISTS component_models text[];
ALTER TABLE similarity_scores ADD COLUMN IF NOT EXISTS component_scores real[];

CREATE OR REPLACE FUNCTION score_components(models text[], scores real[], legacy jsonb DEFAULT '{}'::jsonb)
RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN models IS NULL THEN coalesce(legacy, '{}'::jsonb)
                ELSE (SELECT coalesce(jsonb_object_agg(m, s), '{}'::jsonb) FROM unnest(models, scores) AS t(m, s))
           END
$$;

-- Withdrawal for replay finds the encounters that began at or after a moment through this index
-- (and sightings_time) instead of grouping every sighting.
CREATE INDEX IF NOT EXISTS sightings_encounter ON sightings (encounter_key);
