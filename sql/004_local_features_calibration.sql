-- Local-feature cache (one row per detection and feature version) and versioned match
-- calibrations (isotonic curves score -> probability of the same animal). Idempotent.
CREATE TABLE IF NOT EXISTS local_features (
    detection_id     text NOT NULL REFERENCES detections(detection_id) ON DELETE CASCADE,
    feature_version  text NOT NULL,          -- extractor, resolution, keypoint budget, OpenCV version
    status           text NOT NULL,          -- ok | failed
    reason           text,
    n_keypoints      integer NOT NULL DEFAULT 0,
    features         bytea,                  -- keypoints float32 + RootSIFT descriptors float16
    sha256           text,                   -- checksum of features: a corrupt entry is recomputed
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (detection_id, feature_version)
);

CREATE TABLE IF NOT EXISTS match_calibrations (
    calibration_version  text PRIMARY KEY,   -- hash of the curves and what they were fitted on
    scores               jsonb NOT NULL,     -- score name -> {"x": [...], "p": [...]}
    fusion               text NOT NULL,      -- how calibrated probabilities are combined (mean)
    fitted_on            jsonb NOT NULL DEFAULT '{}'::jsonb,   -- pair source, counts, versions
    reliability          jsonb NOT NULL DEFAULT '[]'::jsonb,   -- bins: mean predicted vs observed
    created_at           timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE detections ADD COLUMN IF NOT EXISTS side text;   -- flank seen: left | right | NULL (unknown)
