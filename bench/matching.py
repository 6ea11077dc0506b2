"""Match-or-create throughput: assignments per second for partitions of 1k / 10k sightings
against galleries of 1k / 10k / 100k stored sightings, exact (batched numpy) and HNSW search,
next to a one-query-per-detection loop like the system we start from; and HNSW recall@10
against exact search at the largest gallery.

    DEER_DATA_DIR=/tmp/dbench .venv/bin/python bench/matching.py --quick   # 1k + 10k galleries
    DEER_DATA_DIR=/tmp/dbench .venv/bin/python bench/matching.py           # + 100k, 10k partitions

Synthetic clustered unit vectors (two models, 512-d: one random centre per deer and model, each
sighting = centre + noise, re-normalised; same-deer cosine ~0.8, different deer ~0). Galleries
are stored as decided sightings (deer + sightings + embeddings rows, COPY); the HNSW index is
dropped before the bulk load and rebuilt after (much faster than maintaining it row by row).
Each gallery size has its own database (``bench_g<size>``) in the embedded server in
DEER_DATA_DIR, reused by the next run (nothing is rebuilt). Each measured partition is the
newest one, so deciding it again withdraws only its own earlier decision (no replay). 70% of a
partition's sightings are deer of the gallery, 30% new animals.

The 'old loop' column is one SQL nearest-neighbour query per detection (primary model, HNSW,
LIMIT 1) and nothing else: a lower bound for the old system's per-detection cost, which also
inserted and re-read rows per detection. It is timed on the first 300 detections.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DEER_DATA_DIR", "/tmp/dbench")

import numpy as np  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from deer_pipeline import db  # noqa: E402
from deer_pipeline.embedding.models import unit_rows as unit  # noqa: E402
from deer_pipeline.identity import store  # noqa: E402
from deer_pipeline.identity.matching import decide_partition  # noqa: E402
from deer_pipeline.settings import MatchingSettings  # noqa: E402

DIM = 512
VERSIONS = {"multiscale": "bench-ms", "efficientnet_b0": "bench-eb0"}
SIGHTINGS_PER_DEER = 10
GALLERY_IMAGE_ID0 = 10_000_000      # gallery images; partitions' images count up from 1
NOISE = 0.5
T_GALLERY = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
INDEX_SQL = ("CREATE INDEX IF NOT EXISTS embeddings_vector_hnsw ON embeddings "
             "USING hnsw (vector vector_cosine_ops) WITH (m = 16, ef_construction = 64)")


def centres(n_deer: int) -> dict[str, np.ndarray]:
    """Deterministic centres for deer 0..n_deer-1 (the same deer has the same centre in every run)."""
    rng = np.random.default_rng(12345)
    return {m: unit(rng.standard_normal((n_deer, DIM))) for m in VERSIONS}


def noisy(c: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return unit(c + NOISE * rng.standard_normal(c.shape) / np.sqrt(DIM))


def vec_text(v: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.6g}" for x in v) + "]"


def engine_for(gallery: int):
    """One database per gallery size in the embedded server (cached between runs)."""
    if os.environ.get("DEER_DATABASE_URL"):
        raise SystemExit("bench/matching.py uses the embedded server: unset DEER_DATABASE_URL")
    server = db.embedded_server()
    name = f"bench_g{gallery}"
    db._ensure_database(server, name)
    return db.get_engine(db._sqlalchemy_url(server.get_uri(name)))


def setup(engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE IF NOT EXISTS bench_meta (key text PRIMARY KEY, value bigint)"))
        conn.execute(sa.text("INSERT INTO cameras (camera_id) VALUES ('gallery') ON CONFLICT DO NOTHING"))
        for m, v in VERSIONS.items():
            conn.execute(sa.text(
                "INSERT INTO embedding_versions (embedding_version, model, backbone, weights_sha256, "
                "reduction_sha256, preprocessing, dim) VALUES (:v, :m, 'synthetic', 'x', 'x', 'none', 512) "
                "ON CONFLICT DO NOTHING"), {"v": v, "m": m})


def meta(engine, key: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT coalesce(max(value), 0) FROM bench_meta WHERE key = :k"),
                                {"k": key}).scalar_one())


def set_meta(conn, key: str, value: int) -> None:
    conn.execute(sa.text("INSERT INTO bench_meta VALUES (:k, :v) ON CONFLICT (key) DO UPDATE SET value = :v"),
                 {"k": key, "v": value})


def bulk_load(engine, rows_fn, label: str, drop_index: bool = True) -> float:
    """Run rows_fn(conn) (COPYs), by default with the HNSW index dropped and rebuilt after;
    seconds spent."""
    t = time.perf_counter()
    with engine.begin() as conn:
        if drop_index:
            conn.execute(sa.text("DROP INDEX IF EXISTS embeddings_vector_hnsw"))
        rows_fn(conn)
    t_copy = time.perf_counter() - t
    if not drop_index:
        print(f"  {label}: COPY with index maintenance {t_copy:.1f} s", flush=True)
        return t_copy
    t = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(sa.text("SET LOCAL maintenance_work_mem = '1GB'"))
        conn.execute(sa.text("SET LOCAL max_parallel_maintenance_workers = 2"))
        conn.execute(sa.text(INDEX_SQL))
        n = conn.execute(sa.text("SELECT count(*) FROM embeddings")).scalar_one()
    t_index = time.perf_counter() - t
    print(f"  {label}: COPY {t_copy:.1f} s, HNSW index over {n} vectors {t_index:.1f} s", flush=True)
    return t_copy + t_index


def grow_gallery(engine, size: int) -> None:
    have = meta(engine, "gallery")
    if have >= size:
        return
    n_deer_total = size // SIGHTINGS_PER_DEER
    c = centres(n_deer_total)

    def rows(conn):
        deer_from, deer_to = have // SIGHTINGS_PER_DEER, n_deer_total
        # images: one per sighting; detections; deer; sightings; embeddings
        img_rows, det_rows, deer_rows, sight_rows, emb_rows = [], [], [], [], []
        for k in range(deer_from, deer_to):
            for j in range(SIGHTINGS_PER_DEER):
                i = k * SIGHTINGS_PER_DEER + j
                t = T_GALLERY + dt.timedelta(seconds=37 * i)
                det = f"g{i:07d}"
                img_rows.append((GALLERY_IMAGE_ID0 + i, f"/bench/gallery/{i}.jpg", "gallery", t))
                det_rows.append((det, GALLERY_IMAGE_ID0 + i, "gallery", t, t.date(), 10.0, 10.0, 200.0, 150.0, 0.9, "unknown",
                                 "unknown", None))
                sight_rows.append((det, k + 1, f"enc:{det}", f"gallery|{t.date()}",
                                   "new" if j == 0 else "matched", 0.8, 0.6, "bench", t))
            deer_rows.append((k + 1, f"g{k * SIGHTINGS_PER_DEER:07d}", "unknown", SIGHTINGS_PER_DEER))
        for m, v in VERSIONS.items():
            for k in range(deer_from, deer_to):
                vecs = noisy(np.repeat(c[m][k:k + 1], SIGHTINGS_PER_DEER, axis=0),
                             seed=2 * k + (m == "multiscale"))
                for j in range(SIGHTINGS_PER_DEER):
                    emb_rows.append((f"g{k * SIGHTINGS_PER_DEER + j:07d}", v, vec_text(vecs[j])))
        store.copy_rows(conn, "images", ("image_id", "path", "camera_id", "captured_at"), img_rows)
        store.copy_rows(conn, "detections", ("detection_id", "image_id", "camera_id", "captured_at", "day",
                                             "bbox_x", "bbox_y", "bbox_w", "bbox_h", "confidence",
                                             "classification", "sex", "encounter_id"), det_rows)
        store.copy_rows(conn, "crops", ("detection_id", "status"), [(d[0], "ok") for d in det_rows])
        store.copy_rows(conn, "deer", ("deer_id", "founding_detection_id", "sex", "sighting_count"), deer_rows)
        store.copy_rows(conn, "sightings", store.SIGHTING_COLUMNS, sight_rows)
        store.copy_rows(conn, "embeddings", ("detection_id", "embedding_version", "vector"), emb_rows)
        conn.execute(sa.text("SELECT setval('deer_deer_id_seq', (SELECT max(deer_id) FROM deer))"))
        set_meta(conn, "gallery", size)

    print(f"building gallery {have} -> {size} sightings", flush=True)
    bulk_load(engine, rows, f"gallery {size}")
    with engine.begin() as conn:
        conn.execute(sa.text("ANALYZE"))


def ensure_partition(engine, n: int, gallery_size: int) -> tuple[str, str]:
    """A partition of n sightings (70% of gallery deer, 30% new), on a day after the gallery."""
    camera = f"p{n}"
    day_date = dt.date(2025, 1, 1)
    key = f"partition_{n}"
    if meta(engine, key) == n:
        return camera, str(day_date)
    n_gallery_deer = gallery_size // SIGHTINGS_PER_DEER
    rng = np.random.default_rng(n)
    known = rng.random(n) < 0.7
    who = np.where(known, rng.integers(0, max(n_gallery_deer, 1), n), -1)
    n_new = int((~known).sum())
    new_c = {m: unit(np.random.default_rng(999 + n).standard_normal((max(n_new // 3, 1), DIM))) for m in VERSIONS}
    new_ids = rng.integers(0, max(n_new // 3, 1), n)
    c = centres(max(n_gallery_deer, 1))

    def rows(conn):
        start = conn.execute(sa.text("SELECT coalesce(max(image_id), 0) FROM images "
                                     "WHERE image_id < :g"), {"g": GALLERY_IMAGE_ID0}).scalar_one() + 1
        img_rows, det_rows, emb_rows = [], [], []
        for i in range(n):
            t = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=8 * i)
            det = f"{camera}-{i:06d}"
            img_rows.append((start + i, f"/bench/{camera}/{i}.jpg", camera, t))
            det_rows.append((det, start + i, camera, t, day_date, 10.0, 10.0, 200.0, 150.0, 0.9, "unknown",
                             "unknown", None))
            for m, v in VERSIONS.items():
                centre = c[m][who[i]] if who[i] >= 0 else new_c[m][new_ids[i]]
                emb_rows.append((det, v, vec_text(noisy(centre[None, :], seed=7 * i + len(m))[0])))
        conn.execute(sa.text("INSERT INTO cameras (camera_id) VALUES (:c) ON CONFLICT DO NOTHING"), {"c": camera})
        conn.execute(sa.text("DELETE FROM similarity_scores WHERE partition_key LIKE :p"), {"p": f"{camera}|%"})
        conn.execute(sa.text("DELETE FROM sightings WHERE partition_key LIKE :p"), {"p": f"{camera}|%"})
        conn.execute(sa.text("DELETE FROM embeddings WHERE detection_id LIKE :p"), {"p": f"{camera}-%"})
        conn.execute(sa.text("DELETE FROM crops WHERE detection_id LIKE :p"), {"p": f"{camera}-%"})
        conn.execute(sa.text("DELETE FROM detections WHERE camera_id = :c"), {"c": camera})
        store.copy_rows(conn, "images", ("image_id", "path", "camera_id", "captured_at"), img_rows)
        store.copy_rows(conn, "detections", ("detection_id", "image_id", "camera_id", "captured_at", "day",
                                             "bbox_x", "bbox_y", "bbox_w", "bbox_h", "confidence",
                                             "classification", "sex", "encounter_id"), det_rows)
        store.copy_rows(conn, "crops", ("detection_id", "status"), [(d[0], "ok") for d in det_rows])
        store.copy_rows(conn, "embeddings", ("detection_id", "embedding_version", "vector"), emb_rows)
        set_meta(conn, key, n)

    # small next to the gallery: insert through the index instead of rebuilding it
    bulk_load(engine, rows, f"partition {n}", drop_index=meta(engine, "gallery") < 5 * n)
    return camera, str(day_date)


def withdraw_partitions(engine) -> None:
    """Undo every measured partition's decisions so the gallery is back to its stored size."""
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM similarity_scores WHERE partition_key NOT LIKE 'gallery|%'"))
        gone = conn.execute(sa.text("DELETE FROM sightings WHERE partition_key NOT LIKE 'gallery|%' "
                                    "RETURNING deer_id")).scalars().all()
        store.finish_deer(conn, set(gone), list(VERSIONS.values()))


def old_loop(engine, camera: str, day: str, limit: int = 300) -> float:
    """Detections per second of one HNSW query per detection (primary model, LIMIT 1)."""
    with engine.connect() as conn:
        ids = conn.execute(sa.text("SELECT detection_id FROM detections WHERE camera_id = :c AND day = :d "
                                   "ORDER BY captured_at LIMIT :n"), {"c": camera, "d": day, "n": limit}).scalars().all()
        vecs = store.load_vectors(conn, ids, VERSIONS["multiscale"])
    t = time.perf_counter()
    with engine.connect() as conn:
        for i in ids:
            conn.execute(sa.text(
                "WITH nn AS MATERIALIZED (SELECT detection_id, vector <=> CAST(:q AS vector) d "
                "  FROM embeddings WHERE embedding_version = :v ORDER BY vector <=> CAST(:q AS vector) LIMIT 40) "
                "SELECT s.deer_id, nn.d FROM nn JOIN sightings s USING (detection_id) ORDER BY nn.d LIMIT 1"),
                {"q": db.vector_literal(vecs[i]), "v": VERSIONS["multiscale"]}).all()
    return len(ids) / (time.perf_counter() - t)


def recall_at_10(engine, n_queries: int = 100, ef_values=(40, 100, 200)) -> dict[int, float]:
    """Recall@10 of the HNSW index (primary version rows) against exact search on the same rows."""
    v = VERSIONS["multiscale"]
    with engine.connect() as conn:
        cur = store.vector_cursor(conn)
        cur.execute("SELECT detection_id, vector FROM embeddings WHERE embedding_version = %s", (v,))
        rows = cur.fetchall()
    ids = np.array([r[0] for r in rows])
    mat = np.vstack([r[1] for r in rows])
    rng = np.random.default_rng(1)
    qi = rng.choice(len(ids), size=min(n_queries, len(ids)), replace=False)
    queries = unit(mat[qi] + 0.3 * rng.standard_normal((len(qi), DIM)) / np.sqrt(DIM))
    exact = np.argsort(-(queries @ mat.T), axis=1)[:, :10]
    out = {}
    for ef in ef_values:
        hits = 0
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT set_config('hnsw.ef_search', :e, true)"), {"e": str(ef)})
            for q, ex in zip(queries, exact):
                got = conn.execute(sa.text(
                    "SELECT detection_id FROM embeddings WHERE embedding_version = :v "
                    "ORDER BY vector <=> CAST(:q AS vector) LIMIT 10"),
                    {"q": db.vector_literal(q), "v": v}).scalars().all()
                hits += len(set(got) & set(ids[ex]))
        out[ef] = hits / (10 * len(queries))
    return out


def uses_index(engine) -> bool:
    with engine.connect() as conn:
        plan = "\n".join(conn.execute(sa.text(
            "EXPLAIN SELECT detection_id FROM embeddings WHERE embedding_version = 'bench-ms' "
            "ORDER BY vector <=> CAST(:q AS vector) LIMIT 10"), {"q": vec_text(np.ones(DIM) / np.sqrt(DIM))}).scalars())
    return "embeddings_vector_hnsw" in plan


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="galleries 1k and 10k, partitions of 1k only")
    ap.add_argument("--galleries", type=int, nargs="*", help="gallery sizes (default 1000 10000 100000)")
    ap.add_argument("--partitions", type=int, nargs="*", help="partition sizes (default 1000 10000)")
    args = ap.parse_args()
    galleries = args.galleries or ([1000, 10000] if args.quick else [1000, 10000, 100000])
    partitions = args.partitions or ([1000] if args.quick else [1000, 10000])

    started = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# bench/matching.py {'--quick ' if args.quick else ''}on {platform.node()} "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} cpu, load average {load:.1f}), "
          f"{dt.datetime.now().isoformat(timespec='minutes')}, data dir {db.data_dir()}", flush=True)
    results = []
    for g in sorted(galleries):
        engine = engine_for(g)
        setup(engine)
        grow_gallery(engine, g)
        withdraw_partitions(engine)
        for n in partitions:
            camera, day = ensure_partition(engine, n, g)
            row = {"gallery": g, "partition": n}
            for mode, search, ef in (("exact", "exact", 200), ("hnsw", "hnsw", 200), ("hnsw40", "hnsw", 40)):
                withdraw_partitions(engine)
                cpu = time.process_time()
                s = decide_partition(engine, camera, day,
                                     MatchingSettings(search=search, hnsw_ef_search=ef),
                                     versions=VERSIONS)
                row[f"{mode}_cpu"] = time.process_time() - cpu
                row[mode] = s.decided / s.seconds
                row[f"{mode}_matched"] = s.matched / max(s.decided, 1)
                row[f"{mode}_s"] = s.seconds
                if mode.startswith("hnsw"):
                    row[f"{mode}_requeries"] = s.hnsw_requeries
                    row[f"{mode}_fallbacks"] = s.hnsw_exact_fallbacks
            row["old_loop"] = old_loop(engine, camera, day)
            withdraw_partitions(engine)
            results.append(row)
            print(f"  gallery {g:>7} partition {n:>6}: exact {row['exact']:8.0f}/s ({row['exact_s']:.1f} s) "
                  f"hnsw {row['hnsw']:8.0f}/s ({row['hnsw_s']:.1f} s) hnsw ef40 {row['hnsw40']:8.0f}/s "
                  f"old loop {row['old_loop']:6.0f}/s", flush=True)
    recall = recall_at_10(engine)
    print()
    print("| gallery sightings | partition sightings | exact assign/s (wall s, client cpu s) | "
          "hnsw ef_search 200 assign/s (wall s, client cpu s) | hnsw ef_search 40 assign/s (wall s) | "
          "old 1-query loop det/s (query only) | matched share exact / hnsw / hnsw40 | "
          "re-queries / exact fallbacks (ef 200; ef 40) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['gallery']:,} | {r['partition']:,} | {r['exact']:,.0f} ({r['exact_s']:.1f}, {r['exact_cpu']:.1f}) | "
              f"{r['hnsw']:,.0f} ({r['hnsw_s']:.1f}, {r['hnsw_cpu']:.1f}) | {r['hnsw40']:,.0f} ({r['hnsw40_s']:.1f}) | "
              f"{r['old_loop']:,.0f} | {r['exact_matched']:.3f} / {r['hnsw_matched']:.3f} / {r['hnsw40_matched']:.3f} | "
              f"{r['hnsw_requeries']} / {r['hnsw_fallbacks']}; {r['hnsw40_requeries']} / {r['hnsw40_fallbacks']} |")
    g = max(galleries)
    print(f"\nHNSW recall@10 vs exact at {g:,} gallery sightings (+ partition rows; primary model, "
          f"planner uses the index: {uses_index(engine)}): "
          + ", ".join(f"ef_search={ef}: {r:.3f}" for ef, r in recall.items()))
    print(f"total bench time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
