"""Match-or-create throughput: assignments per second for a partition of 1k sightings against
galleries of 1k / 10k / 100k (/ 1M) stored sightings, with exhaustive exact scoring, the two-stage
search (deer ranked by profile vector, the best ``profile_candidate_deer`` re-scored exactly) and
pgvector HNSW, all in the same run; the two-stage search's recall and agreement with exhaustive
exact; HNSW recall@10 for interactive look-ups; the HNSW index's build and insert cost.

    DEER_DATA_DIR=/tmp/dbench .venv/bin/python bench/matching.py --quick   # 1k + 10k galleries
    DEER_DATA_DIR=/tmp/dbench .venv/bin/python bench/matching.py           # 1k, 10k, 100k
    DEER_DATA_DIR=/tmp/dbench nice .venv/bin/python bench/matching.py --galleries 1000000 --no-hnsw
    DEER_DATA_DIR=/tmp/dbench .venv/bin/python bench/matching.py --no-hnsw --burst 3   # bursts of 3 photos

Synthetic clustered unit vectors (two models, 512-d: one random centre per deer and model, each
sighting = centre + noise, re-normalised; same-deer cosine ~0.8, different deer ~0). Galleries
are stored as decided sightings (deer + sightings + embeddings rows, binary COPY in blocks); the
HNSW index is dropped before the bulk load and built after. Each gallery size has its own
database (``bench_g<size>``) in the embedded server in DEER_DATA_DIR, reused by the next run.
The measured partition is the newest one, so deciding it again withdraws only its own earlier
decision (no replay). 70% of its sightings are deer of the gallery, 30% new animals.

Modes, in this order on one partition: ``exact cold`` (nothing in memory: the gallery is read
from the store), ``exact`` (the gallery kept in memory by the previous decision; its first pass
in the precision ``coarse_precision=auto`` takes: bfloat16 from 5,000 rows on CPUs with bfloat16
units), ``exact float32`` (the reference every agreement is measured against: exhaustive, float32
first pass), ``two_stage`` (second run; the first builds the profiles), ``hnsw`` (ef_search 200).
Assignments/s = decided sightings / wall seconds of the whole decision (withdrawal, search,
scoring, writes).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import resource
import struct
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DEER_DATA_DIR", "/tmp/dbench")

import numpy as np  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from deer_pipeline import db  # noqa: E402
from deer_pipeline.embedding import store as vector_store  # noqa: E402
from deer_pipeline.embedding.models import unit_rows as unit  # noqa: E402
from deer_pipeline.identity import gallery_cache, store  # noqa: E402
from deer_pipeline.identity.matching import decide_partition  # noqa: E402
from deer_pipeline.settings import MatchingSettings  # noqa: E402

DIM = 512
VERSIONS = {"multiscale": "bench-ms", "efficientnet_b0": "bench-eb0"}
SIGHTINGS_PER_DEER = 10
GALLERY_IMAGE_ID0 = 10_000_000      # gallery images; partitions' images count up from 1
NOISE = 0.5
BLOCK_DEER = 5000                   # deer written per COPY block while building a gallery
T_GALLERY = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def centres(first: int, last: int, model: str) -> np.ndarray:
    """Deterministic centres of deer first..last-1 (each deer's own seed: any block size)."""
    out = np.empty((last - first, DIM), np.float32)
    salt = 1 if model == "multiscale" else 2
    for k in range(first, last):
        out[k - first] = np.random.default_rng((salt, k)).standard_normal(DIM)
    return unit(out)


def noisy(c: np.ndarray, seed) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return unit(c + NOISE * rng.standard_normal(c.shape).astype(np.float32) / np.sqrt(DIM))


def vec_text(v: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.6g}" for x in v) + "]"


def engine_for(gallery: int, burst: int = 1):
    """One database per gallery size (and burst length, so that partitions of different burst
    lengths never replay one another) in the embedded server (cached between runs)."""
    if os.environ.get("DEER_DATABASE_URL"):
        raise SystemExit("bench/matching.py uses the embedded server: unset DEER_DATABASE_URL")
    server = db.embedded_server()
    name = f"bench_g{gallery}" if burst == 1 else f"bench_g{gallery}_b{burst}"
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


def copy_embeddings(conn, ids: list[str], version: str, mat: np.ndarray) -> None:
    """Embeddings rows (detection_id, embedding_version, vector) with one binary COPY built by numpy
    (ids of one length)."""
    n, L, vb = len(ids), len(ids[0]), version.encode()
    dt_ = np.dtype([("nf", ">i2"), ("l_id", ">i4"), ("id", f"S{L}"), ("l_v", ">i4"), ("v", f"S{len(vb)}"),
                    ("l_vec", ">i4"), ("dim", ">i2"), ("u", ">i2"), ("vec", ">f4", (DIM,))])
    rec = np.zeros(n, dt_)
    rec["nf"], rec["l_id"], rec["id"], rec["l_v"], rec["v"] = 3, L, ids, len(vb), vb
    rec["l_vec"], rec["dim"], rec["vec"] = 4 + 4 * DIM, DIM, mat
    raw = conn.connection.driver_connection
    with raw.cursor() as cur, cur.copy("COPY embeddings (detection_id, embedding_version, vector) "
                                       "FROM STDIN (FORMAT BINARY)") as cp:
        cp.write(b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0))
        cp.write(rec.tobytes())
        cp.write(struct.pack(">h", -1))


def build_index(engine, label: str, work_mem: str = "2GB") -> float:
    t = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(sa.text(f"SET LOCAL maintenance_work_mem = '{work_mem}'"))
        conn.execute(sa.text("SET LOCAL max_parallel_maintenance_workers = 2"))
        names = vector_store.ensure_vector_indexes(conn)    # one partial index per version
        n = conn.execute(sa.text("SELECT count(*) FROM embeddings")).scalar_one()
    t_index = time.perf_counter() - t
    print(f"  {label}: HNSW indexes ({len(names)}, one per version) built after the bulk load over {n} vectors: {t_index:.1f} s "
          f"({n / t_index:,.0f} vectors/s, maintenance_work_mem {work_mem})", flush=True)
    return t_index


def grow_gallery(engine, size: int, index: bool, work_mem: str = "2GB") -> None:
    have = meta(engine, "gallery")
    if have < size:
        print(f"building gallery {have} -> {size} sightings", flush=True)
        t = time.perf_counter()
        with engine.begin() as conn:
            vector_store.drop_vector_indexes(conn)
        for b0 in range(have // SIGHTINGS_PER_DEER, size // SIGHTINGS_PER_DEER, BLOCK_DEER):
            b1 = min(b0 + BLOCK_DEER, size // SIGHTINGS_PER_DEER)
            with engine.begin() as conn:
                _gallery_block(conn, b0, b1)
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT setval('deer_deer_id_seq', (SELECT max(deer_id) FROM deer))"))
            set_meta(conn, "gallery", size)
        print(f"  gallery {size}: COPY {time.perf_counter() - t:.1f} s (index dropped)", flush=True)
        with engine.begin() as conn:
            conn.execute(sa.text("ANALYZE"))
    with engine.connect() as conn:
        has_index = len(vector_store.vector_indexes(conn)) >= len(VERSIONS)
    if index and not has_index:
        build_index(engine, f"gallery {size}", work_mem)
    elif not index and has_index:
        with engine.begin() as conn:
            vector_store.drop_vector_indexes(conn)


def _gallery_block(conn, deer_from: int, deer_to: int) -> None:
    img, det, deer, sight, ids = [], [], [], [], []
    for k in range(deer_from, deer_to):
        for j in range(SIGHTINGS_PER_DEER):
            i = k * SIGHTINGS_PER_DEER + j
            t = T_GALLERY + dt.timedelta(seconds=37 * i)
            d = f"g{i:07d}"
            ids.append(d)
            img.append((GALLERY_IMAGE_ID0 + i, f"/bench/gallery/{i}.jpg", "gallery", t))
            det.append((d, GALLERY_IMAGE_ID0 + i, "gallery", t, t.date(), 10.0, 10.0, 200.0, 150.0, 0.9,
                        "unknown", "unknown", None))
            sight.append((d, k + 1, f"enc:{d}", f"gallery|{t.date()}", "new" if j == 0 else "matched",
                          0.8, 0.6, "bench", t))
        deer.append((k + 1, f"g{k * SIGHTINGS_PER_DEER:07d}", "unknown", SIGHTINGS_PER_DEER))
    store.copy_rows(conn, "images", ("image_id", "path", "camera_id", "captured_at"), img)
    store.copy_rows(conn, "detections", ("detection_id", "image_id", "camera_id", "captured_at", "day",
                                         "bbox_x", "bbox_y", "bbox_w", "bbox_h", "confidence",
                                         "classification", "sex", "encounter_id"), det)
    store.copy_rows(conn, "crops", ("detection_id", "status"), [(d[0], "ok") for d in det])
    store.copy_rows(conn, "deer", ("deer_id", "founding_detection_id", "sex", "sighting_count"), deer)
    store.copy_rows(conn, "sightings", store.SIGHTING_COLUMNS, sight)
    for m, v in VERSIONS.items():
        c = np.repeat(centres(deer_from, deer_to, m), SIGHTINGS_PER_DEER, axis=0)
        copy_embeddings(conn, ids, v, noisy(c, (deer_from, m == "multiscale")))


def ensure_partition(engine, n: int, gallery_size: int, burst: int = 1) -> tuple[str, str, float]:
    """A partition of n sightings (70% of gallery deer, 30% new), on a day after the gallery;
    returns (camera, day, seconds per vector written through the HNSW index, 0 when none).
    ``burst`` > 1: encounters of ``burst`` photos of one animal, 1 s apart (one burst id, the
    same box: one track), 8 s between bursts; 1: every photo its own encounter (the worst case)."""
    # the day after the gallery's last sighting (37 s apart from 2024-01-01), so that deciding
    # the partition replays nothing; 2025-01-01 for galleries up to ~850k sightings
    gallery_end = (T_GALLERY + dt.timedelta(seconds=37 * gallery_size)).date()
    day_date = max(dt.date(2025, 1, 1), gallery_end + dt.timedelta(days=1))
    tag = f"{n}" if burst == 1 else f"{n}b{burst}"
    camera, key = f"p{tag}", f"partition_{tag}_{day_date:%Y%m%d}"
    if meta(engine, key) == n:
        return camera, str(day_date), 0.0
    n_gallery_deer = gallery_size // SIGHTINGS_PER_DEER
    n_enc = -(-n // burst)
    rng = np.random.default_rng(n if burst == 1 else (n, burst))
    known = rng.random(n_enc) < 0.7
    who = np.where(known, rng.integers(0, max(n_gallery_deer, 1), n_enc), -1)
    n_new = max(int((~known).sum()) // 3, 1)
    new_ids = rng.integers(0, n_new, n_enc)
    img_rows, det_rows, emb_rows = [], [], []
    for i in range(n):
        e = i // burst
        t = dt.datetime.combine(day_date, dt.time(), dt.timezone.utc) + dt.timedelta(
            seconds=8 * i if burst == 1 else (burst + 8) * e + i % burst)
        det = f"{camera}-{i:06d}"
        img_rows.append((1 + i, f"/bench/{camera}/{i}.jpg", camera, t))
        det_rows.append((det, 1 + i, camera, t, day_date, 10.0, 10.0, 200.0, 150.0, 0.9, "unknown",
                         "unknown", None if burst == 1 else f"{camera}-burst-{e:06d}"))
        for m, v in VERSIONS.items():
            centre = centres(int(who[e]), int(who[e]) + 1, m)[0] if who[e] >= 0 else \
                centres(10**8 + int(new_ids[e]), 10**8 + int(new_ids[e]) + 1, m)[0]
            emb_rows.append((det, v, vec_text(noisy(centre[None, :], (7, i, len(m)))[0])))
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO cameras (camera_id) VALUES (:c) ON CONFLICT DO NOTHING"), {"c": camera})
        for sql in ("DELETE FROM similarity_scores WHERE partition_key LIKE :p",
                    "DELETE FROM sightings WHERE partition_key LIKE :p"):
            conn.execute(sa.text(sql), {"p": f"{camera}|%"})
        for sql in ("DELETE FROM deer WHERE founding_detection_id LIKE :p",
                    "DELETE FROM embeddings WHERE detection_id LIKE :p", "DELETE FROM crops WHERE detection_id LIKE :p",
                    "DELETE FROM detections WHERE detection_id LIKE :p", "DELETE FROM images WHERE path LIKE :q"):
            conn.execute(sa.text(sql), {"p": f"{camera}-%", "q": f"/bench/{camera}/%"})
        store.copy_rows(conn, "images", ("image_id", "path", "camera_id", "captured_at"), img_rows)
        store.copy_rows(conn, "detections", ("detection_id", "image_id", "camera_id", "captured_at", "day",
                                             "bbox_x", "bbox_y", "bbox_w", "bbox_h", "confidence",
                                             "classification", "sex", "encounter_id"), det_rows)
        store.copy_rows(conn, "crops", ("detection_id", "status"), [(d[0], "ok") for d in det_rows])
        has_index = bool(vector_store.vector_indexes(conn))
        t = time.perf_counter()
        store.copy_rows(conn, "embeddings", ("detection_id", "embedding_version", "vector"), emb_rows)
        per_vector = (time.perf_counter() - t) / len(emb_rows) if has_index else 0.0
        conn.execute(sa.text("DELETE FROM bench_meta WHERE key LIKE :k"), {"k": f"partition_{tag}_%"})
        set_meta(conn, key, n)
    return camera, str(day_date), per_vector


def partition_state(engine, camera: str) -> tuple[dict, dict]:
    """(detection -> (founding detection of its deer, decision), detection -> candidate founders)."""
    with engine.connect() as conn:
        founder = dict(conn.execute(sa.text("SELECT deer_id, founding_detection_id FROM deer")).all())
        dec = {r[0]: (founder[r[1]], r[2]) for r in conn.execute(sa.text(
            "SELECT detection_id, deer_id, decision FROM sightings WHERE partition_key LIKE :p"), {"p": f"{camera}|%"})}
        cands: dict[str, set] = {}
        for d, c in conn.execute(sa.text("SELECT detection_id, candidate_deer_id FROM similarity_scores "
                                         "WHERE partition_key LIKE :p"), {"p": f"{camera}|%"}):
            cands.setdefault(d, set()).add(founder.get(c, c))
    return dec, cands


def run_mode(engine, camera: str, day: str, search: str, ef: int = 200, precision: str = "auto"):
    cpu = time.process_time()
    s = decide_partition(engine, camera, day, MatchingSettings(search=search, hnsw_ef_search=ef,
                                                               coarse_precision=precision), versions=VERSIONS)
    return {"rate": s.decided / s.seconds, "s": s.seconds, "cpu": time.process_time() - cpu,
            "matched": s.matched / max(s.decided, 1), "cache": s.gallery_cache, "phases": s.phase_seconds,
            "decided": s.decided, "replayed": s.replayed, "coarse": s.coarse_precision,
            "fallbacks": s.plan_fallbacks, "state": partition_state(engine, camera)}


def hnsw_recall_at_10(engine, n_queries: int = 100, ef_values=(40, 100, 200)) -> dict[int, float]:
    """Recall@10 of the HNSW index for interactive look-ups ("which deer is this photo?": one
    query vector, primary model) against exact search over the same rows."""
    v = VERSIONS["multiscale"]
    with engine.connect() as conn:
        ids = np.array(conn.execute(sa.text("SELECT detection_id FROM embeddings WHERE embedding_version = :v "
                                            "ORDER BY detection_id"), {"v": v}).scalars().all())
        rng = np.random.default_rng(1)
        probe = rng.choice(len(ids), size=min(n_queries, len(ids)), replace=False)
        base = store.load_vectors(conn, list(ids[probe]), v)
    queries = unit(np.vstack([base[i] for i in ids[probe]]) + 0.3 * rng.standard_normal((len(probe), DIM)) / np.sqrt(DIM))
    scores = np.full((len(queries), 0), 0.0, np.float32)
    top_ids = np.empty((len(queries), 0), object)
    with engine.connect() as conn:       # exact top 10 by streaming the primary vectors in blocks
        cur = store.vector_cursor(conn)
        cur.execute("SELECT detection_id, vector FROM embeddings WHERE embedding_version = %s", (v,))
        while True:
            rows = cur.fetchmany(50_000)
            if not rows:
                break
            mat = np.vstack([r[1] for r in rows])
            s = np.hstack([scores, queries @ mat.T])
            i = np.hstack([top_ids, np.tile(np.array([r[0] for r in rows], object), (len(queries), 1))])
            keep = np.argsort(-s, axis=1)[:, :10]
            scores, top_ids = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
    out = {}
    for ef in ef_values:
        hits = 0
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT set_config('hnsw.ef_search', :e, true)"), {"e": str(ef)})
            for q, ex in zip(queries, top_ids):
                # the version as a literal, as the store's look-up writes it (its partial index)
                got = conn.execute(sa.text(
                    f"SELECT detection_id FROM embeddings WHERE embedding_version = {store.sql_literal(v)} "
                    "ORDER BY vector <=> CAST(:q AS vector) LIMIT 10"),
                    {"q": db.vector_literal(q)}).scalars().all()
                hits += len(set(got) & set(ex))
        out[ef] = hits / (10 * len(queries))
    return out


def compare(exact_state, other_state) -> tuple[float, float, float]:
    """(decision agreement, recall of exact's best candidate, recall of exact's candidate set)."""
    (dec_e, cand_e), (dec_o, cand_o) = exact_state, other_state
    agree = sum(dec_o.get(d) == v for d, v in dec_e.items()) / max(len(dec_e), 1)
    best_hits, set_hits, set_total, n = 0, 0, 0, 0
    for d, (founder, decision) in dec_e.items():
        ce, co = cand_e.get(d, set()), cand_o.get(d, set())
        set_hits += len(ce & co)
        set_total += len(ce)
        if decision == "matched":
            n += 1
            best_hits += founder in co
    return agree, best_hits / max(n, 1), set_hits / max(set_total, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="galleries 1k and 10k")
    ap.add_argument("--galleries", type=int, nargs="*", help="gallery sizes (default 1000 10000 100000)")
    ap.add_argument("--partition", type=int, default=1000, help="sightings per partition (default 1000)")
    ap.add_argument("--burst", type=int, default=1,
                    help="photos per encounter in the partition (default 1: every photo its own encounter, "
                         "the worst case; trail cameras shoot bursts of 3-10)")
    ap.add_argument("--no-hnsw", action="store_true", help="no HNSW index, mode or recall (large galleries)")
    ap.add_argument("--index-cost-only", action="store_true",
                    help="only the HNSW index: build it after the bulk load, insert a partition's vectors "
                         "through it, recall@10 (no decisions)")
    ap.add_argument("--maintenance-work-mem", default="2GB",
                    help="PostgreSQL maintenance_work_mem for the index build (the graph of 1M 512-d vectors "
                         "needs ~2.5 GB to be built in memory)")
    args = ap.parse_args()
    if args.index_cost_only:
        return index_cost_only(args)
    galleries = args.galleries or ([1000, 10000] if args.quick else [1000, 10000, 100000])
    started = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# bench/matching.py {' '.join(sys.argv[1:])} on {platform.node()} "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} cpu, load average {load:.1f}), "
          f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='minutes')}, data dir {db.data_dir()}", flush=True)
    from deer_pipeline.identity import coarse
    print(f"bfloat16 matrix units (AMX-BF16 / AVX512-BF16) and torch: {coarse.cpu_has_bf16()} "
          "(torch imported before the timings: a process's first decision pays its import once)", flush=True)
    results = []
    for g in sorted(galleries):
        gallery_cache.clear()
        engine = engine_for(g, args.burst)
        setup(engine)
        grow_gallery(engine, g, index=not args.no_hnsw)
        camera, day, insert_s = ensure_partition(engine, args.partition, g, args.burst)
        row = {"gallery": g, "partition": args.partition, "insert_s": insert_s}
        row["exact_cold"] = run_mode(engine, camera, day, "exact")
        row["exact"] = run_mode(engine, camera, day, "exact")
        row["exact_f32"] = run_mode(engine, camera, day, "exact", precision="float32")
        row["two_stage_first"] = run_mode(engine, camera, day, "two_stage")
        row["two_stage"] = run_mode(engine, camera, day, "two_stage")
        if not args.no_hnsw:
            row["hnsw"] = run_mode(engine, camera, day, "hnsw")
            row["hnsw_recall"] = hnsw_recall_at_10(engine)
        exact_state = row["exact_f32"]["state"]          # the reference: exhaustive, float32 first pass
        for m in ("exact_cold", "exact", "two_stage", "hnsw"):
            if m in row:
                row[m]["agree"], row[m]["best_recall"], row[m]["set_recall"] = compare(exact_state, row[m]["state"])
        row["rss_mb"] = peak_rss_mb()
        results.append(row)
        r = row
        print(f"  gallery {g:>8,}: exact cold {r['exact_cold']['rate']:7,.0f}/s ({r['exact_cold']['s']:.2f} s) "
              f"exact {r['exact']['rate']:7,.0f}/s ({r['exact']['s']:.2f} s) "
              f"two_stage {r['two_stage']['rate']:7,.0f}/s ({r['two_stage']['s']:.2f} s, first "
              f"{r['two_stage_first']['s']:.2f} s, agreement {r['two_stage']['agree']:.2%})"
              + (f" hnsw {r['hnsw']['rate']:5,.0f}/s" if "hnsw" in r else "")
              + f"; peak RSS {r['rss_mb']:,.0f} MB", flush=True)
        print(f"    exact float32 first pass {r['exact_f32']['rate']:,.0f}/s ({r['exact_f32']['s']:.2f} s); "
              f"first pass of exact: {r['exact']['coarse']} (handed back to float32: {r['exact']['fallbacks']}, "
              f"agreement with float32 {r['exact']['agree']:.2%}), of two_stage: {r['two_stage']['coarse']}", flush=True)
        print(f"    phases exact {r['exact']['phases']} two_stage {r['two_stage']['phases']}; replayed sightings "
              f"(should be 0) {r['exact']['replayed']}", flush=True)
    print()
    print("| gallery sightings | exact, float32 first pass, in memory assign/s (wall s) "
          "| exact, cold (gallery read) assign/s (wall s) | exact, in memory assign/s (wall s, client cpu s) "
          "| two-stage assign/s (wall s, client cpu s) | two-stage / exact | two-stage agreement with exact "
          "| recall of exact's best deer / of its candidates | hnsw ef 200 assign/s (wall s) | hnsw / exact "
          "| hnsw agreement | peak RSS MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        e, c, t, h, f = r["exact"], r["exact_cold"], r["two_stage"], r.get("hnsw"), r["exact_f32"]
        print(f"| {r['gallery']:,} | {f['rate']:,.0f} ({f['s']:.2f}) "
              f"| {c['rate']:,.0f} ({c['s']:.2f}) | {e['rate']:,.0f} ({e['s']:.2f}, {e['cpu']:.2f}) "
              f"| {t['rate']:,.0f} ({t['s']:.2f}, {t['cpu']:.2f}) | {t['rate'] / e['rate']:.2f}x | {t['agree']:.2%} "
              f"| {t['best_recall']:.4f} / {t['set_recall']:.4f} "
              + (f"| {h['rate']:,.0f} ({h['s']:.2f}) | {h['rate'] / e['rate']:.2f}x | {h['agree']:.2%} " if h else "| - | - | - ")
              + f"| {r['rss_mb']:,.0f} |")
    for r in results:
        if "hnsw_recall" in r:
            print(f"HNSW recall@10 for one-vector look-ups at {r['gallery']:,} gallery sightings: "
                  + ", ".join(f"ef_search={ef}: {v:.3f}" for ef, v in r["hnsw_recall"].items())
                  + (f"; insert through the index {r['insert_s'] * 1e3:.2f} ms per vector" if r["insert_s"] else ""))
    print(f"total bench time {time.perf_counter() - started:.0f} s, peak RSS {peak_rss_mb():,.0f} MB")
    by = {r["gallery"]: r for r in results}

    def auto(g):             # the mode search=auto takes at this gallery size
        if g not in by:
            return "n/a"
        mode = "exact" if g < MatchingSettings().exact_search_max_gallery else "two_stage"
        return f"{by[g][mode]['rate']:.0f}"
    agree = min((r[m]["agree"] for r in results for m in ("exact", "two_stage")), default=float("nan"))
    print(f"assignments/s gallery=10000: {auto(10000)}; gallery=100000: {auto(100000)}; "
          f"agreement with exact: {100 * agree:.2f}%")
    return 0


SIMILAR = 0.5     # look-ups: deer this similar to the photo are the ones a person wants listed


def lookup_quality(engine, n: int = 20, efs=(200, 400)) -> dict:
    """"Which deer is this photo?" (``identity.lookup.look_alikes``, 10 deer) for ``n`` gallery
    sightings, per ef_search: median milliseconds, how often the best deer is the exact
    reference's best, and the recall of the reference's deer with ensemble similarity >=
    SIMILAR (the reference: a sequential scan of the primary model shortlists the deer instead
    of the index; both then score the ensemble exactly). The bench's other deer are unrelated
    (cosine ~0): their order below the similar ones is noise, so it is not scored."""
    from deer_pipeline.identity import lookup

    weights = {"multiscale": 0.6, "efficientnet_b0": 0.4}
    rng = np.random.default_rng(2)
    out: dict = {}
    with engine.connect() as conn:
        probes = [f"g{int(i):07d}" for i in rng.choice(meta(engine, "gallery"), size=n, replace=False)]
        ref, t_ref = {}, []
        for d in probes:
            t = time.perf_counter()
            ref[d] = lookup.look_alikes(conn, d, weights, versions=VERSIONS, k=10, search="exact").look_alikes
            t_ref.append(time.perf_counter() - t)
        similar = {d: {a.deer_id for a in r if a.similarity >= SIMILAR} for d, r in ref.items()}
        out["exact"] = {"ms": 1e3 * float(np.median(t_ref)), "top1": 1.0, "recall": 1.0,
                        "similar": sum(map(len, similar.values()))}
        for ef in efs:
            times, top1, hits = [], 0, 0
            for d in probes:
                t = time.perf_counter()
                r = lookup.look_alikes(conn, d, weights, versions=VERSIONS, k=10, ef_search=ef).look_alikes
                times.append(time.perf_counter() - t)
                top1 += bool(r and ref[d] and r[0].deer_id == ref[d][0].deer_id)
                hits += len({a.deer_id for a in r} & similar[d])
            out[ef] = {"ms": 1e3 * float(np.median(times)), "top1": top1 / n,
                       "recall": hits / max(1, out["exact"]["similar"])}
    return out


def index_cost_only(args) -> int:
    """The HNSW index's cost alone: build after the bulk load, insert cost per vector through
    the index (a partition's vectors, both models), recall@10 for one-vector look-ups."""
    for g in sorted(args.galleries or [100000]):
        engine = engine_for(g, args.burst)
        setup(engine)
        grow_gallery(engine, g, index=False)
        with engine.begin() as conn:
            vector_store.drop_vector_indexes(conn)
            conn.execute(sa.text("DELETE FROM bench_meta WHERE key LIKE 'partition_%'"))
        with engine.connect() as conn:
            n = conn.execute(sa.text("SELECT count(*) FROM embeddings")).scalar_one()
        build_s = build_index(engine, f"gallery {g:,} ({n:,} vectors)", args.maintenance_work_mem)
        _, _, per_vector = ensure_partition(engine, args.partition, g)
        recall = hnsw_recall_at_10(engine)
        look = lookup_quality(engine)
        print(f"HNSW at {n:,} vectors ({g:,} sightings x {len(VERSIONS)} models, one index per version): "
              f"build {build_s:.0f} s ({n / build_s:,.0f} vectors/s); insert through the index "
              f"{per_vector * 1e3:.2f} ms per vector ({2 * args.partition:,} vectors); recall@10 "
              + ", ".join(f"ef_search={ef}: {v:.3f}" for ef, v in recall.items())
              + "; 'which deer is this photo?' (identity.lookup, 10 deer, median of 20 look-ups): "
              + ", ".join(f"{k if k == 'exact' else f'ef_search={k}'} {v['ms']:.0f} ms, best deer agrees "
                          f"{v['top1']:.2f}, similar deer (>= {SIMILAR}) recalled {v['recall']:.3f}"
                          for k, v in look.items())
              + f"; peak client RSS {peak_rss_mb():,.0f} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
