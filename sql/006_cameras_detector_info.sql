-- Camera deployments (deer-pipeline cameras import) and the detector's own description of a batch.
-- Idempotent: every statement can run again.

-- Where and when a camera stood: one deployment per camera (Camtrap DP deployments.csv).
ALTER TABLE cameras ADD COLUMN IF NOT EXISTS latitude double precision
    CHECK (latitude IS NULL OR latitude BETWEEN -90 AND 90);
ALTER TABLE cameras ADD COLUMN IF NOT EXISTS longitude double precision
    CHECK (longitude IS NULL OR longitude BETWEEN -180 AND 180);
ALTER TABLE cameras ADD COLUMN IF NOT EXISTS deployment_start timestamptz;
ALTER TABLE cameras ADD COLUMN IF NOT EXISTS deployment_end timestamptz;
ALTER TABLE cameras ADD COLUMN IF NOT EXISTS camera_model text;
ALTER TABLE cameras ADD COLUMN IF NOT EXISTS notes text;
ALTER TABLE cameras ADD COLUMN IF NOT EXISTS metadata_updated_at timestamptz;

-- MegaDetector's "info" block (detector, format version, typical_detection_threshold, ...) or
-- SpeciesNet's model versions, with the minimum confidence and species rule the batch used.
ALTER TABLE ingest_batches ADD COLUMN IF NOT EXISTS detector_info jsonb;
