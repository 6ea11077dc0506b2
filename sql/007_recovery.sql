-- Recovery and odd inputs (issue 14): idempotent.
-- The original name of a camera whose id had to be made readable ('Kamera Süd' -> 'Kamera-Sud').
ALTER TABLE cameras ADD COLUMN IF NOT EXISTS original_name text;

-- Where a capture time came from: EXIF DateTimeOriginal ('exif'), EXIF DateTimeDigitized
-- ('exif_digitized'), IFD0 DateTime ('exif_datetime'), the detections input, or the file's time.
ALTER TABLE images DROP CONSTRAINT IF EXISTS images_captured_at_source_check;
ALTER TABLE images ADD CONSTRAINT images_captured_at_source_check
    CHECK (captured_at_source IN ('exif', 'exif_digitized', 'exif_datetime', 'input', 'file_mtime'));

-- Detections whose capture day is not a partition (before DEER_START_DATE, or after today) are
-- 'held'; the new-detections sensor releases them when their day exists.
CREATE INDEX IF NOT EXISTS detections_held ON detections (day) WHERE status = 'held';
