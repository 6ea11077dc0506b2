"""``deer-pipeline export sightings OUT.csv``: one flat row per sighting (a detection decided to
be a deer), for spreadsheets and R: deer, camera, time, photo, box (pixels and normalised),
class, sex, decision, score and threshold."""

from __future__ import annotations

import csv
from pathlib import Path

from sqlalchemy.engine import Engine

from deer_pipeline.export import records

COLUMNS = ("deer", "deer_id", "camera_id", "captured_at", "encounter_id", "detection_id", "photo",
           "bbox_x", "bbox_y", "bbox_w", "bbox_h", "bbox_x_norm", "bbox_y_norm", "bbox_w_norm", "bbox_h_norm",
           "classification", "sex", "detector_confidence", "decision", "score", "threshold",
           "embedding_version", "decided_at")


def write_sightings(engine: Engine, out_csv, overwrite: bool = False) -> int:
    """Write the CSV; returns the number of sightings. Refuses to overwrite unless asked."""
    out_csv = Path(out_csv)
    if out_csv.exists() and not overwrite:
        raise FileExistsError(f"{out_csv} exists; choose another name (or --overwrite)")
    with engine.connect() as conn:
        labels = records.deer_labels(conn)
        rows = records.detection_rows(conn, decided_only=True)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_csv.with_name(out_csv.name + ".part")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        for r in rows:
            wd, ht = r["width"] or 0, r["height"] or 0

            def norm(v, size):
                return "" if v is None or not size else f"{v / size:.4f}"

            w.writerow([
                labels.get(int(r["deer_id"]), ""), r["deer_id"], r["camera_id"],
                r["captured_at"].isoformat(), r["encounter_id"] or "", r["detection_id"], r["path"],
                *("" if r[k] is None else f"{r[k]:.1f}" for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h")),
                norm(r["bbox_x"], wd), norm(r["bbox_y"], ht), norm(r["bbox_w"], wd), norm(r["bbox_h"], ht),
                r["classification"] or "", r["sex"] or "",
                "" if r["confidence"] is None else f"{r['confidence']:.3f}", r["decision"],
                "" if r["score"] is None else f"{r['score']:.4f}",
                "" if r["threshold"] is None else f"{r['threshold']:.4f}", r["embedding_version"],
                r["decided_at"].isoformat() if r["decided_at"] else ""])
    tmp.replace(out_csv)
    return len(rows)
