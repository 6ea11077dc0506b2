"""The two-stage search (deer ranked by profile vector, the best re-scored exactly) decides like
exhaustive exact scoring: at least 99.9% of sightings get the same deer and decision, on
synthetic clustered vectors like bench/matching.py's (each deer seen in two poses, so a profile
is a blend of looks; sexes mixed so the sex filter applies)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
import sqlalchemy as sa

from deer_pipeline import db
from deer_pipeline.embedding import store as vector_store
from deer_pipeline.identity import store
from deer_pipeline.identity.matching import decide_partition
from deer_pipeline.settings import MatchingSettings
from deer_pipeline_tests.dbutil import empty_pipeline_tables
from deer_pipeline_tests.identity.test_matching import MODELS

DIM = 512
N_DEER, PER_DEER, N_PART = 400, 8, 1000
T_GALLERY = datetime(2024, 1, 1, tzinfo=timezone.utc)
T_PART = datetime(2024, 6, 1, tzinfo=timezone.utc)


def _unit(a):
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)


def _world(engine, burst: int = 1):
    """The gallery and a partition of N_PART photos; ``burst`` > 1: photos come in bursts of that
    many frames a second apart (one encounter of several detections each)."""
    rng = np.random.default_rng(42)
    sexes = rng.choice(["female", "male", "unknown"], N_DEER, p=[0.45, 0.45, 0.1])
    # per deer and model: two poses around a centre
    poses = {m: _unit(_unit(rng.standard_normal((N_DEER, 1, DIM)))
                      + 0.7 * rng.standard_normal((N_DEER, 2, DIM)) / np.sqrt(DIM)) for m in MODELS}

    def sighting(deer, pose):
        return {m: _unit(poses[m][deer, pose] + 0.5 * rng.standard_normal(DIM) / np.sqrt(DIM)) for m in MODELS}

    images, dets, deer_rows, sights, embs = [], [], [], [], []
    for k in range(N_DEER):
        deer_rows.append((k + 1, f"g{k * PER_DEER:05d}", sexes[k], PER_DEER))
        for j in range(PER_DEER):
            i = k * PER_DEER + j
            t = T_GALLERY + timedelta(minutes=i)
            d = f"g{i:05d}"
            images.append((i + 1, f"/two-stage/g/{i}.jpg", "gallery", t))
            dets.append((d, i + 1, "gallery", t, t.date(), 10.0, 10.0, 200.0, 150.0, 0.9, "x", sexes[k], None))
            sights.append((d, k + 1, f"enc:{d}", f"gallery|{t.date()}", "new" if j == 0 else "matched",
                           0.8, 0.6, "test", t))
            for m, v in sighting(k, j % 2).items():
                embs.append((d, MODELS[m], db.vector_literal(v)))
    known = rng.random(N_PART) < 0.7
    new_deer = rng.integers(N_DEER, N_DEER + 100, N_PART)       # strangers, several sightings each
    extra = {m: _unit(rng.standard_normal((100, 2, DIM))) for m in MODELS}
    for i in range(N_PART):
        t = T_PART + timedelta(seconds=60 * (i // burst) + (i % burst))
        d = f"p{i:05d}"
        k = int(rng.integers(0, N_DEER)) if known[i] else int(new_deer[i])
        images.append((100000 + i, f"/two-stage/p/{i}.jpg", "cam", t))
        sex = sexes[k] if k < N_DEER else "unknown"
        # a quarter of the known sightings are classified 'unknown' (matched against every sex)
        sex = "unknown" if rng.random() < 0.25 else sex
        dets.append((d, 100000 + i, "cam", t, t.date(), 10.0, 10.0, 200.0, 150.0, 0.9, "x", sex,
                     f"burst{i // burst}" if burst > 1 else None))
        pose = int(rng.integers(0, 2))
        vecs = sighting(k, pose) if k < N_DEER else \
            {m: _unit(extra[m][k - N_DEER, pose] + 0.5 * rng.standard_normal(DIM) / np.sqrt(DIM)) for m in MODELS}
        for m, v in vecs.items():
            embs.append((d, MODELS[m], db.vector_literal(v)))
    dets_cols = ("detection_id", "image_id", "camera_id", "captured_at", "day", "bbox_x", "bbox_y", "bbox_w",
                 "bbox_h", "confidence", "classification", "sex", "encounter_id")
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO cameras (camera_id) VALUES ('gallery'), ('cam')"))
        for m, v in MODELS.items():
            conn.execute(sa.text(
                "INSERT INTO embedding_versions (embedding_version, model, backbone, weights_sha256, "
                "reduction_sha256, preprocessing, dim) VALUES (:v, :m, 'synthetic', 'x', 'x', 'none', 512)"),
                {"v": v, "m": m})
        store.copy_rows(conn, "images", ("image_id", "path", "camera_id", "captured_at"), images)
        store.copy_rows(conn, "detections", dets_cols, dets)
        store.copy_rows(conn, "crops", ("detection_id", "status"), [(d[0], "ok") for d in dets])
        store.copy_rows(conn, "deer", ("deer_id", "founding_detection_id", "sex", "sighting_count"), deer_rows)
        store.copy_rows(conn, "sightings", store.SIGHTING_COLUMNS, sights)
        store.copy_rows(conn, "embeddings", ("detection_id", "embedding_version", "vector"), embs)
        conn.execute(sa.text("SELECT setval('deer_deer_id_seq', (SELECT max(deer_id) FROM deer))"))
    return "cam", str(T_PART.date())


def _decisions(engine):
    with engine.connect() as conn:
        founder = dict(conn.execute(sa.text("SELECT deer_id, founding_detection_id FROM deer")).all())
        return {r[0]: (founder[r[1]], r[2]) for r in conn.execute(sa.text(
            "SELECT detection_id, deer_id, decision FROM sightings WHERE partition_key LIKE 'cam|%'"))}


@pytest.fixture
def no_index(engine):
    """Bulk-load without the HNSW index (inserting 10k vectors through it takes a minute), then
    empty the tables and put the index back for the other tests."""
    with engine.begin() as conn:
        vector_store.drop_vector_indexes(conn)
    yield engine
    empty_pipeline_tables(engine)
    with engine.begin() as conn:
        vector_store.ensure_vector_indexes(conn)


def test_two_stage_search_agrees_with_exhaustive_exact_scoring(no_index):
    engine = no_index
    cam, day = _world(engine)
    exact = decide_partition(engine, cam, day, MatchingSettings(search="exact"), versions=MODELS)
    by_exact = _decisions(engine)
    two = decide_partition(engine, cam, day, MatchingSettings(search="two_stage"), versions=MODELS)
    by_two = _decisions(engine)
    assert exact.search == "exact" and two.search == "two_stage"
    assert exact.decided == two.decided == N_PART
    # a real test: most sightings join known deer, strangers found new deer, several of them
    assert 0.5 < exact.matched / exact.decided < 0.95 and exact.new_deer > 20
    agree = sum(by_two[d] == v for d, v in by_exact.items()) / len(by_exact)
    assert agree >= 0.999, f"two-stage agrees with exact on {agree:.2%} of sightings"
    # auto takes two_stage above exact_search_max_gallery sightings, and decides alike
    auto = decide_partition(engine, cam, day, MatchingSettings(exact_search_max_gallery=1000), versions=MODELS)
    assert auto.search == "two_stage"
    assert sum(_decisions(engine)[d] == v for d, v in by_exact.items()) / len(by_exact) >= 0.999


def _score_rows(engine):
    with engine.connect() as conn:
        founder = dict(conn.execute(sa.text("SELECT deer_id, founding_detection_id FROM deer")).all())
        rows = conn.execute(sa.text(
            "SELECT detection_id, candidate_deer_id, similarity, component_scores, sex_match, matched, threshold "
            "FROM similarity_scores WHERE partition_key LIKE 'cam|%'")).all()
    return {(r[0], founder.get(r[1], r[1])): (r[2], tuple(r[3]), r[4], r[5], r[6]) for r in rows}


@pytest.mark.parametrize("burst", [1, 3])
def test_planned_chunks_decide_and_log_exactly_as_the_encounter_by_encounter_rule(no_index, monkeypatch, burst):
    """The chunk plan (candidates._ChunkPlan) is the one-by-one rule computed together: the same
    decisions and the same score rows (candidates, float64 scores, components), exact and
    two-stage; encounters of one photo and of bursts of three."""
    from deer_pipeline.identity import matching

    engine = no_index
    cam, day = _world(engine, burst)
    for search in ("exact", "two_stage"):
        st = MatchingSettings(search=search, coarse_precision="float32")
        planned = decide_partition(engine, cam, day, st, versions=MODELS)
        by_plan, rows_plan = _decisions(engine), _score_rows(engine)
        monkeypatch.setattr(matching, "PLAN_CHUNKS", False)
        one_by_one = decide_partition(engine, cam, day, st, versions=MODELS)
        monkeypatch.setattr(matching, "PLAN_CHUNKS", True)
        assert planned.plan_fallbacks < planned.decided / 10
        assert planned.encounters == (N_PART if burst == 1 else -(-N_PART // burst))
        assert _decisions(engine) == by_plan
        rows = _score_rows(engine)
        assert rows.keys() == rows_plan.keys() and len(rows) == planned.score_rows == one_by_one.score_rows
        for key, (sim, comps, *rest) in rows.items():
            p_sim, p_comps, *p_rest = rows_plan[key]
            assert sim == pytest.approx(p_sim, abs=1e-6) and comps == pytest.approx(p_comps, abs=1e-6)
            assert rest == p_rest


def test_bfloat16_first_pass_decides_as_float32_and_hands_close_calls_back(no_index, monkeypatch):
    """bfloat16 products only rank deer: decisions and recorded scores are those of the float32
    pass, also where a deer left off an encounter's list could reach the threshold (that
    encounter is handed back to float32 scoring and counted)."""
    from deer_pipeline.identity import candidates, coarse

    monkeypatch.setattr(coarse, "cpu_has_bf16", lambda: True)   # torch computes it on any CPU
    engine = no_index
    cam, day = _world(engine)
    for extra in ({}, {"reid_threshold": 0.05, "candidate_deer": 1}):
        # the second case: one candidate and no margin, a threshold below chance level: a
        # stranger's best and second-best deer are often within the bfloat16 error bound
        monkeypatch.setattr(candidates, "PLAN_MARGIN", 0 if extra else 8)
        f32 = decide_partition(engine, cam, day, MatchingSettings(search="exact", coarse_precision="float32", **extra),
                               versions=MODELS)
        by_f32 = _decisions(engine)
        best_f32 = _best_scores(engine)
        bf = decide_partition(engine, cam, day, MatchingSettings(search="exact", coarse_precision="bfloat16", **extra),
                              versions=MODELS)
        assert f32.coarse_precision == "float32" and bf.coarse_precision == "bfloat16"
        assert _decisions(engine) == by_f32
        best = _best_scores(engine)
        assert best.keys() == best_f32.keys()
        assert max(abs(best[d] - best_f32[d]) for d in best) < 1e-6
        if extra:        # close calls: some handed back
            assert bf.plan_fallbacks > 0
        assert 0.5 < f32.matched / f32.decided


def _best_scores(engine):
    with engine.connect() as conn:
        return dict(conn.execute(sa.text(
            "SELECT detection_id, score FROM sightings WHERE partition_key LIKE 'cam|%' AND score IS NOT NULL")).all())
