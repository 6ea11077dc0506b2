"""Detections as they arrive: the detector formats, the writing of detections, images (decode, EXIF), encounters (bursts), cropping, and the feed the sensors read."""
