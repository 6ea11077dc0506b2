"""The embedding store against the real embedded PostgreSQL + pgvector."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from deer_pipeline.embedding import store
from deer_pipeline.embedding.store import EmbeddingStoreError


def version_info(name: str, model: str = "efficientnet_lite0", weights_sha: str = "a" * 64) -> dict:
    return {"embedding_version": name, "model": model, "backbone": "efficientnet_lite0",
            "weights_sha256": weights_sha, "reduction_sha256": "b" * 64,
            "preprocessing": "224sq-pm1-norm", "dim": 512, "details": {"test": True}}


def add_crops(engine, camera: str, day: str, n: int, crop_dir: Path | None = None, start: int = 0,
              status: str = "ok", write_images: bool = False) -> list[str]:
    """Insert camera/images/detections/crops rows for one camera x day (and, with
    ``write_images``, small synthetic crop JPEGs under ``crop_dir``). Returns the detection ids."""
    ids = [f"{camera}-{day}-{i:04d}" for i in range(start, start + n)]
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO cameras (camera_id) VALUES (:c) ON CONFLICT DO NOTHING"), {"c": camera})
        for i, det in enumerate(ids):
            image_id = conn.execute(sa.text(
                "INSERT INTO images (path, camera_id, captured_at, width, height) "
                "VALUES (:p, :c, CAST(:day AS date) + make_interval(secs => :s), 640, 480) RETURNING image_id"),
                {"p": f"/photos/{det}.jpg", "c": camera, "day": day, "s": 60 * (start + i)}).scalar_one()
            conn.execute(sa.text(
                "INSERT INTO detections (detection_id, image_id, camera_id, captured_at, day, bbox_x, bbox_y,"
                " bbox_w, bbox_h, confidence, classification, sex) "
                "VALUES (:d, :i, :c, CAST(:day AS date) + make_interval(secs => :s), CAST(:day AS date),"
                " 10, 10, 200, 150, 0.9, 'doe', 'female')"),
                {"d": det, "i": image_id, "c": camera, "day": day, "s": 60 * (start + i)})
            rel = f"{det[-2:]}/{det}.jpg"
            conn.execute(sa.text(
                "INSERT INTO crops (detection_id, crop_path, crop_sha256, x0, y0, x1, y1, width, height,"
                " decode_scale, status) VALUES (:d, :p, :h, 0, 0, 200, 150, 200, 150, 1.0, :st)"),
                {"d": det, "p": rel, "h": f"sha-{det}", "st": status})
            if write_images and crop_dir is not None:
                from PIL import Image

                rng = np.random.default_rng(abs(hash(det)) % (2 ** 32))
                arr = rng.integers(0, 255, size=(96, 128, 3), dtype=np.uint8)
                arr[:, :, int(rng.integers(0, 3))] //= 3
                path = crop_dir / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(path, quality=90)
    return ids


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, 512)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_register_version_is_idempotent_and_refuses_a_changed_definition(engine):
    assert store.register_version(engine, version_info("v-a")) is True
    assert store.register_version(engine, version_info("v-a")) is False
    rows = store.registered_versions(engine, model="efficientnet_lite0")
    assert [r["embedding_version"] for r in rows] == ["v-a"] and rows[0]["details"] == {"test": True}
    with pytest.raises(EmbeddingStoreError, match="weights_sha256"):
        store.register_version(engine, version_info("v-a", weights_sha="c" * 64))


def test_register_version_from_an_embedder_spec(engine):
    from deer_pipeline.embedding import models as embedders

    spec = embedders.resolve_embedder("efficientnet_lite0", "auto")
    assert store.register_version(engine, spec) is True
    (row,) = store.registered_versions(engine)
    assert row["embedding_version"] == spec.version
    assert row["weights_sha256"] == spec.weights.sha256 and row["reduction_sha256"] == spec.reduction_sha256
    assert row["details"]["projection_seed"] == spec.projection_seed


def test_write_embeddings_is_idempotent_and_retries_failures(engine):
    ids = add_crops(engine, "cam1", "2024-05-01", 4)
    store.register_version(engine, version_info("v-a"))
    vecs = unit_vectors(4)
    rows = [(ids[0], vecs[0], "ok", None), (ids[1], vecs[1], "ok", None),
            (ids[2], None, "failed", "OSError: truncated")]
    c = store.write_embeddings(engine, "v-a", rows)
    assert (c.inserted, c.updated, c.unchanged) == (3, 0, 0)
    c = store.write_embeddings(engine, "v-a", rows)
    assert (c.inserted, c.updated, c.unchanged) == (0, 1, 2)   # the failed row is retried in place
    assert store.count_embeddings(engine, "v-a") == 3
    # A retry that succeeds replaces the failure; a later failure never replaces an ok vector.
    c = store.write_embeddings(engine, "v-a", [(ids[2], vecs[2], "ok", None), (ids[0], None, "failed", "x")])
    assert (c.inserted, c.updated, c.unchanged) == (0, 1, 1)
    got_ids, got = store.load_vectors(engine, "v-a")
    assert got_ids == ids[:3]
    np.testing.assert_allclose(got, vecs[:3], atol=1e-6)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM embeddings WHERE status = 'failed'")).scalar_one() == 0


def test_write_embeddings_refuses_bad_vectors(engine):
    (det,) = add_crops(engine, "cam1", "2024-05-01", 1)
    store.register_version(engine, version_info("v-a"))
    with pytest.raises(EmbeddingStoreError, match="511"):
        store.write_embeddings(engine, "v-a", [(det, np.ones(511), "ok", None)])
    with pytest.raises(EmbeddingStoreError, match="non-finite"):
        store.write_embeddings(engine, "v-a", [(det, np.full(512, np.nan), "ok", None)])
    with pytest.raises(EmbeddingStoreError, match="without a vector"):
        store.write_embeddings(engine, "v-a", [(det, None, "ok", None)])
    with pytest.raises(sa.exc.IntegrityError):   # unregistered version: the foreign key says no
        store.write_embeddings(engine, "v-unknown", [(det, unit_vectors(1)[0], "ok", None)])


def test_load_vectors_in_requested_order_and_aligned_by_model(engine):
    ids = add_crops(engine, "cam1", "2024-05-01", 3)
    store.register_version(engine, version_info("v-a"))
    store.register_version(engine, version_info("v-b", model="multiscale"))
    va, vb = unit_vectors(3, 1), unit_vectors(3, 2)
    store.write_embeddings(engine, "v-a", [(d, v, "ok", None) for d, v in zip(ids, va)])
    store.write_embeddings(engine, "v-b", [(d, v, "ok", None) for d, v in zip(ids[1:], vb[1:])])
    got_ids, got = store.load_vectors(engine, "v-a", [ids[2], "nope", ids[0]])
    assert got_ids == [ids[2], ids[0]]
    np.testing.assert_allclose(got, va[[2, 0]], atol=1e-6)
    assert store.load_vectors(engine, "v-none")[1].shape == (0, 512)
    common, by_model = store.load_vectors_by_model(engine, {"efficientnet_lite0": "v-a", "multiscale": "v-b"})
    assert common == ids[1:]
    np.testing.assert_allclose(by_model["efficientnet_lite0"], va[1:], atol=1e-6)
    np.testing.assert_allclose(by_model["multiscale"], vb[1:], atol=1e-6)


def test_crops_to_embed_lists_what_a_version_lacks_in_a_partition(engine):
    ids = add_crops(engine, "cam1", "2024-05-01", 4)
    add_crops(engine, "cam1", "2024-05-02", 2)                  # another day
    add_crops(engine, "cam2", "2024-05-01", 2)                  # another camera
    add_crops(engine, "cam1", "2024-05-01", 1, start=50, status="too_small")
    store.register_version(engine, version_info("v-a"))
    store.register_version(engine, version_info("v-b"))
    assert [c.detection_id for c in store.crops_to_embed(engine, "cam1", "2024-05-01", "v-a")] == ids
    v = unit_vectors(2)
    store.write_embeddings(engine, "v-a", [(ids[0], v[0], "ok", None), (ids[1], None, "failed", "bad")])
    todo = store.crops_to_embed(engine, "cam1", "2024-05-01", "v-a")
    assert [c.detection_id for c in todo] == ids[1:]            # the failure is retried
    assert todo[0].crop_path.endswith(f"{ids[1]}.jpg") and todo[0].crop_sha256 == f"sha-{ids[1]}"
    assert [c.detection_id for c in store.crops_to_embed(engine, "cam1", "2024-05-01", "v-a",
                                                         include_failed=False)] == ids[2:]
    assert len(store.crops_to_embed(engine, "cam1", "2024-05-01", "v-b")) == 4   # other version untouched
    counts = store.partition_embedding_counts(engine, "cam1", "2024-05-01", ["v-a", "v-b"])
    assert counts["v-a"] == {"crops": 4, "ok": 1, "failed": 1, "missing": 2}
    assert counts["v-b"] == {"crops": 4, "ok": 0, "failed": 0, "missing": 4}


def _bulk_detections(engine, ids):
    with engine.begin() as conn:   # bare rows for the foreign keys
        conn.execute(sa.text("INSERT INTO cameras (camera_id) VALUES ('camh') ON CONFLICT DO NOTHING"))
        conn.execute(sa.text("INSERT INTO images (image_id, path, camera_id) VALUES (1, '/photos/h.jpg', 'camh') "
                             "ON CONFLICT DO NOTHING"))
        conn.execute(sa.text("INSERT INTO detections (detection_id, image_id, camera_id, day) "
                             "SELECT d, 1, 'camh', DATE '2024-05-01' FROM unnest(CAST(:ids AS text[])) AS d"),
                     {"ids": ids})


def _plan(conn, sql, params) -> str:
    return "\n".join(r[0] for r in conn.execute(sa.text("EXPLAIN (COSTS OFF) " + sql), params))


def test_hnsw_query_returns_the_exact_nearest_neighbour_through_the_index(engine):
    n = 300
    ids = [f"hn-{i:04d}" for i in range(n)]
    _bulk_detections(engine, ids)
    store.register_version(engine, version_info("v-a"))
    vecs = unit_vectors(n, seed=3)
    store.write_embeddings(engine, "v-a", [(d, v, "ok", None) for d, v in zip(ids, vecs)])
    rng = np.random.default_rng(5)
    sql = ("SELECT detection_id FROM embeddings WHERE embedding_version = 'v-a' "
           "ORDER BY vector <=> CAST(:q AS vector) LIMIT :k")
    with engine.begin() as conn:
        conn.execute(sa.text("ANALYZE embeddings"))
        # a table this small is cheaper to sort than to search: make the planner show the index
        conn.execute(sa.text("SET LOCAL enable_seqscan = off"))
        conn.execute(sa.text("SET LOCAL enable_sort = off"))
        conn.execute(sa.text("SET LOCAL hnsw.ef_search = 100"))
        plan = _plan(conn, sql, {"q": store.vector_literal(vecs[0]), "k": 5})
        assert f"Index Scan using {store.vector_index_name(conn, 'v-a')}" in plan, plan
        for target in (17, 123, 250):
            q = vecs[target] + rng.normal(scale=0.05, size=512).astype(np.float32)
            q /= np.linalg.norm(q)
            exact = np.argsort(-(vecs @ q))[:5]
            got = [r[0] for r in conn.execute(sa.text(sql), {"q": store.vector_literal(q), "k": 5})]
            assert got[0] == ids[target] == ids[exact[0]]
            assert got == [ids[i] for i in exact]


def test_the_matching_look_up_scans_its_versions_index_even_when_prepared(engine):
    """``identity.store.NearestSightings`` writes the version into its statement as a literal,
    so the plan scans that version's partial index (sql/009) however the statement is planned:
    the generic plan of a prepared statement (psycopg prepares a query after five runs) cannot
    match the index's predicate to a parameter, and would sort the whole version instead."""
    from deer_pipeline.identity import store as identity_store

    n = 120
    ids = [f"hp-{i:04d}" for i in range(n)]
    _bulk_detections(engine, ids)
    store.register_version(engine, version_info("v-p"))
    store.write_embeddings(engine, "v-p", [(d, v, "ok", None) for d, v in zip(ids, unit_vectors(n, seed=9))])
    q = store.vector_literal(unit_vectors(1, seed=1)[0])
    with engine.begin() as conn:
        index = store.vector_index_name(conn, "v-p")
        conn.execute(sa.text("ANALYZE embeddings"))
        conn.execute(sa.text("SET LOCAL enable_seqscan = off"))
        conn.execute(sa.text("SET LOCAL enable_sort = off"))
        cur = identity_store.vector_cursor(conn)
        query = identity_store.nearest_sightings_sql("v-p")
        assert "embedding_version = 'v-p'" in query.as_string(cur)
        cur.execute(b"EXPLAIN (COSTS OFF) " + query.as_bytes(cur),
                    {"q": unit_vectors(1, seed=1)[0], "ef": 10, "other": None})
        plan = "\n".join(r[0] for r in cur.fetchall())
        assert f"Index Scan using {index}" in plan, plan
        # why a literal: generic plans of prepared statements, with the version as a literal
        # and as a parameter
        conn.execute(sa.text("SET LOCAL plan_cache_mode = force_generic_plan"))
        conn.exec_driver_sql("PREPARE nn_literal(vector) AS SELECT detection_id FROM embeddings "
                             "WHERE embedding_version = 'v-p' ORDER BY vector <=> $1 LIMIT 5")
        conn.exec_driver_sql("PREPARE nn_param(vector, text) AS SELECT detection_id FROM embeddings "
                             "WHERE embedding_version = $2 ORDER BY vector <=> $1 LIMIT 5")
        literal = _plan(conn, f"EXECUTE nn_literal('{q}')", {})
        param = _plan(conn, f"EXECUTE nn_param('{q}', 'v-p')", {})
        conn.exec_driver_sql("DEALLOCATE nn_literal")
        conn.exec_driver_sql("DEALLOCATE nn_param")
        assert f"Index Scan using {index}" in literal, literal
        assert index not in param, param
        # the class itself, more often than psycopg's prepare threshold: nothing decided yet
        nearest = identity_store.NearestSightings(conn, "v-p")
        for _ in range(8):
            assert nearest.query(unit_vectors(1, seed=1)[0], ef=10) == []


def test_hnsw_read_path_stays_within_its_version(engine):
    """The matching's HNSW read path (identity store) returns only the asked version's vectors."""
    from deer_pipeline.identity import store as identity_store

    n = 200
    ids = [f"hn-{i:04d}" for i in range(n)]
    _bulk_detections(engine, ids)
    store.register_version(engine, version_info("v-a"))
    store.register_version(engine, version_info("v-b"))
    vecs = unit_vectors(n, seed=3)
    store.write_embeddings(engine, "v-a", [(d, v, "ok", None) for d, v in zip(ids, vecs)])
    # v-b holds the *same* vectors under other ids' rows shifted by one: a leak would show.
    store.write_embeddings(engine, "v-b", [(d, v, "ok", None) for d, v in zip(ids[1:], vecs[:-1])])
    with engine.begin() as conn:   # every detection is its own decided deer (deer_id = index + 1)
        for i, d in enumerate(ids):
            deer_id = conn.execute(sa.text("INSERT INTO deer (founding_detection_id) VALUES (:d) RETURNING deer_id"),
                                   {"d": d}).scalar_one()
            conn.execute(sa.text(
                "INSERT INTO sightings (detection_id, deer_id, encounter_key, partition_key, decision, embedding_version) "
                "VALUES (:d, :deer, :d, 'camh|2024-05-01', 'new', 'v-a')"), {"d": d, "deer": deer_id})
        deer_of = dict(conn.execute(sa.text("SELECT detection_id, deer_id FROM sightings")).all())
        q = vecs[42]
        best = identity_store.hnsw_nearest_deer(conn, q, "v-a", ef=100)
        top = sorted(best.items(), key=lambda kv: -kv[1])[:3]
        assert top[0][0] == deer_of[ids[42]] and top[0][1] == pytest.approx(1.0, abs=1e-5)
        assert [d for d, _ in top] == [deer_of[ids[i]] for i in np.argsort(-(vecs @ q))[:3]]
        best_b = identity_store.hnsw_nearest_deer(conn, q, "v-b", ef=100)
        assert max(best_b, key=best_b.get) == deer_of[ids[43]]
