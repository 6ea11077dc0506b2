-- Cameras, images, detections, crops and ingestion bookkeeping.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE IF NOT EXISTS cameras (
    camera_id   text PRIMARY KEY
                CHECK (camera_id ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per input file that was ingested (MegaDetector JSON, CSV, image folder).
CREATE TABLE IF NOT EXISTS ingest_batches (
    batch_id       bigserial PRIMARY KEY,
    source_path    text NOT NULL,
    source_format  text NOT NULL,
    source_sha256  text NOT NULL,
    n_records      integer NOT NULL DEFAULT 0,
    n_new          integer NOT NULL DEFAULT 0,
    n_rejected     integer NOT NULL DEFAULT 0,
    ingested_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS images (
    image_id            bigserial PRIMARY KEY,
    path                text NOT NULL UNIQUE,
    camera_id           text REFERENCES cameras(camera_id),
    captured_at         timestamptz,
    captured_at_source  text CHECK (captured_at_source IN ('exif', 'input', 'file_mtime')),
    width               integer,
    height              integer,
    sha256              text,
    status              text NOT NULL DEFAULT 'ok',   -- ok | missing | unreadable | outside_roots
    reason              text,
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS images_camera_time ON images (camera_id, captured_at);

-- A detection is one box around one animal in one frame, as the upstream detector gave it.
CREATE TABLE IF NOT EXISTS detections (
    detection_id    text PRIMARY KEY,
    image_id        bigint NOT NULL REFERENCES images(image_id),
    camera_id       text REFERENCES cameras(camera_id),
    captured_at     timestamptz,
    day             date,                 -- partition day (capture date, UTC)
    bbox_x          double precision,     -- pixels, top-left origin
    bbox_y          double precision,
    bbox_w          double precision,
    bbox_h          double precision,
    confidence      real,
    classification  text,                 -- doe | fawn | young_buck | mid_buck | mature_buck | unknown
    sex             text CHECK (sex IN ('female', 'male', 'unknown')),
    encounter_id    text,                 -- burst: frames of one camera within burst_window_s
    status          text NOT NULL DEFAULT 'ok',   -- ok | rejected
    reason          text,
    source_format   text,
    batch_id        bigint REFERENCES ingest_batches(batch_id),
    created_at      timestamptz NOT NULL DEFAULT now(),
    seq             bigserial             -- monotone insertion order: the sensor's cursor
);
CREATE INDEX IF NOT EXISTS detections_partition ON detections (camera_id, day);
CREATE INDEX IF NOT EXISTS detections_image ON detections (image_id);
CREATE UNIQUE INDEX IF NOT EXISTS detections_seq ON detections (seq);

-- Input records that could not become a detection row at all (duplicate id, bad camera id, ...).
CREATE TABLE IF NOT EXISTS ingest_rejections (
    rejection_id  bigserial PRIMARY KEY,
    batch_id      bigint REFERENCES ingest_batches(batch_id),
    source_path   text NOT NULL,
    line          integer,
    record        jsonb,
    reason        text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS crops (
    detection_id  text PRIMARY KEY REFERENCES detections(detection_id),
    crop_path     text,                   -- relative to the crop store root (content-addressed)
    crop_sha256   text,
    x0            integer, y0 integer, x1 integer, y1 integer,   -- padded, clipped box in pixels
    width         integer,
    height        integer,
    decode_scale  real,                   -- 1.0 = full decode, 0.5 = JPEG draft at half size, ...
    status        text NOT NULL,          -- ok | too_small | failed
    reason        text,
    created_at    timestamptz NOT NULL DEFAULT now()
);
