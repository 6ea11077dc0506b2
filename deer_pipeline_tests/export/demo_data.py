"""Demo-like stored data for the export tests: the deterministic sample ingested as the demo
ingests it, with deer and sightings as the identity stage writes them (one deer per true
individual: the first sighting founds it, later ones are matched with a score), and cameras
with coordinates. Written with SQL into the real database: no embedding run is needed to test
what the exports read."""

from __future__ import annotations

import sqlalchemy as sa

from deer_pipeline import sample
from deer_pipeline.detections import ingest


def make_demo_like(engine, out_dir, n_cameras: int = 2, decide_fraction: float = 1.0):
    info = sample.write_sample(out_dir, n_cameras=n_cameras, n_days=2, n_deer=4, encounters_per_day=(2, 3))
    report = ingest.ingest(engine, info.detections_json)
    sample.load_truth(engine, out_dir)
    decide_from_truth(engine, decide_fraction)
    return info, report


def decide_from_truth(engine, decide_fraction: float = 1.0) -> None:
    """Deer and sightings as the identity stage writes them, for the first ``decide_fraction`` of
    the good detections in time order (earlier decisions are withdrawn first)."""
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE sightings, deer RESTART IDENTITY CASCADE"))
        rows = conn.execute(sa.text(
            "SELECT d.detection_id, d.camera_id, d.captured_at, d.day, d.sex, d.encounter_id, t.identity "
            "FROM detections d JOIN true_identities t USING (detection_id) "
            "WHERE d.status = 'ok' ORDER BY d.captured_at, d.detection_id")).all()
        n_decide = int(len(rows) * decide_fraction)
        deer_of: dict[str, int] = {}
        for i, r in enumerate(rows[:n_decide]):
            new = r.identity not in deer_of
            if new:
                deer_of[r.identity] = conn.execute(sa.text(
                    "INSERT INTO deer (founding_detection_id, sex, first_seen, last_seen, sighting_count) "
                    "VALUES (:d, :s, :t, :t, 0) RETURNING deer_id"),
                    {"d": r.detection_id, "s": r.sex, "t": r.captured_at}).scalar_one()
            conn.execute(sa.text(
                "INSERT INTO sightings (detection_id, deer_id, encounter_key, partition_key, decision, score, "
                "threshold, embedding_version, captured_at) VALUES (:d, :deer, :e, :p, :dec, :score, 0.6, "
                "'v3_ensemble@test', :t)"),
                {"d": r.detection_id, "deer": deer_of[r.identity], "e": r.encounter_id or r.detection_id,
                 "p": f"{r.camera_id}|{r.day}", "dec": "new" if new else "matched",
                 "score": 0.41 if new and i else (None if new else 0.6 + (i % 7) * 0.05), "t": r.captured_at})
            conn.execute(sa.text("UPDATE deer SET sighting_count = sighting_count + 1, last_seen = :t "
                                 "WHERE deer_id = :deer"), {"t": r.captured_at, "deer": deer_of[r.identity]})


def write_cameras_csv(path, cameras, bad_rows: str = "") -> None:
    lines = ["camera_id,latitude,longitude,deployment_start,deployment_end,camera_model,notes"]
    for i, cam in enumerate(sorted(cameras)):
        lines.append(f"{cam},{44.5 + i * 0.01:.4f},{-72.6 - i * 0.013:.4f},2025-09-28,2025-10-20,"
                     f"Browning BTC-8E,\"site {i + 1}, oak ridge\"")
    path.write_text("\n".join(lines) + "\n" + bad_rows)
