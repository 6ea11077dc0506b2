"""The gallery kept in memory across decisions (``gallery_cache.py``): used while the store's
generation is the one it was left at, reloaded (never used) once another path changed the
sightings; and the in-memory gallery's bookkeeping (grouping by deer, profiles) stays exact
through removals, additions and renaming."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
import sqlalchemy as sa

from deer_pipeline.identity import gallery_cache, store
from deer_pipeline.identity.gallery import Gallery, per_deer_max
from deer_pipeline.identity.matching import decide_partition
from deer_pipeline.settings import MatchingSettings
from deer_pipeline_tests.identity.test_matching import MODELS, T0, SyntheticWorld, deer_of

SETTINGS = MatchingSettings(search="exact")


def _snapshot(engine):
    with engine.connect() as conn:
        founder = dict(conn.execute(sa.text("SELECT deer_id, founding_detection_id FROM deer")).all())
        s = sorted((r.detection_id, founder[r.deer_id], r.decision, r.score) for r in conn.execute(sa.text(
            "SELECT detection_id, deer_id, decision, score FROM sightings")))
        sc = sorted((r.detection_id, founder.get(r.candidate_deer_id, "gone"), r.similarity) for r in conn.execute(
            sa.text("SELECT detection_id, candidate_deer_id, similarity FROM similarity_scores")))
        prof = sorted((founder[r.deer_id], r.embedding_version, r.n_sightings, r.vector) for r in conn.execute(
            sa.text("SELECT deer_id, embedding_version, n_sightings, vector::text vector FROM deer_profile_vectors")))
    return s, sc, prof


def test_a_stale_gallery_is_reloaded_and_decides_as_a_cold_start(engine):
    gallery_cache.clear()
    w = SyntheticWorld(engine, seed=2)
    for i, ident in enumerate("ABCAB"):
        w.sighting("cam1", T0 + timedelta(minutes=5 * i), ident)
    for i, ident in enumerate("CAB"):
        w.sighting("cam2", T0 + timedelta(days=1, minutes=5 * i), ident)
    a_day3 = w.sighting("cam3", T0 + timedelta(days=2), "A")
    b_day3 = w.sighting("cam3", T0 + timedelta(days=2, minutes=3), "B")

    first = decide_partition(engine, "cam1", "2024-05-01", SETTINGS)
    assert first.gallery_cache == "none"
    second = decide_partition(engine, "cam2", "2024-05-02", SETTINGS)
    assert second.gallery_cache == "hit" and second.matched == 3        # the kept gallery was used
    again = decide_partition(engine, "cam2", "2024-05-02", SETTINGS)     # re-deciding: still in memory
    assert again.gallery_cache == "hit"

    # another connection (a person's correction, another process) withdraws deer A entirely
    d = deer_of(engine)
    deer_a = d[next(x for x in d if w.truth[x] == "A")]
    with engine.begin() as conn:
        gone = conn.execute(sa.text("DELETE FROM sightings WHERE deer_id = :k RETURNING detection_id"),
                            {"k": deer_a}).scalars().all()
        conn.execute(sa.text("DELETE FROM similarity_scores WHERE detection_id = ANY(:i)"), {"i": gone})
        store.finish_deer(conn, [deer_a], list(MODELS.values()))
    assert len(gone) == 3

    third = decide_partition(engine, "cam3", "2024-05-03", SETTINGS)
    assert third.gallery_cache == "stale"                               # reload detected, not used
    with engine.connect() as conn:
        dec = dict(conn.execute(sa.text("SELECT detection_id, decision FROM sightings "
                                        "WHERE partition_key = 'cam3|2024-05-03'")).all())
    assert dec == {a_day3: "new", b_day3: "matched"}     # deer A is gone: its sighting founds a deer
    warm = _snapshot(engine)

    # the same decision from a cold start (nothing in memory) is identical
    gallery_cache.clear()
    cold = decide_partition(engine, "cam3", "2024-05-03", SETTINGS)
    assert cold.gallery_cache == "none"
    assert _snapshot(engine) == warm
    # and so is the warm path once more
    assert decide_partition(engine, "cam3", "2024-05-03", SETTINGS).gallery_cache == "hit"
    assert _snapshot(engine) == warm


def test_every_write_to_sightings_bumps_the_generation(engine):
    w = SyntheticWorld(engine)
    w.sighting("cam1", T0, "A")
    with engine.connect() as conn:
        g0 = store.gallery_generation(conn)
    decide_partition(engine, "cam1", "2024-05-01", SETTINGS)
    with engine.connect() as conn:
        g1 = store.gallery_generation(conn)
    assert g1[0] == g0[0] and g1[1] > g0[1]
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE sightings SET score = score"))
        g2 = store.gallery_generation(conn)
    assert g2[1] > g1[1]
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE sightings, similarity_scores, deer_profile_vectors, deer"))
    with engine.connect() as conn:
        g3 = store.gallery_generation(conn)
    assert g3 != g2


def _brute_profiles(g: Gallery):
    out = {}
    for d in np.unique(g.deer[: g.n]).tolist():
        rows = np.flatnonzero(g.deer[: g.n] == d)
        p = g.vec[rows].astype(np.float64).sum(axis=0)
        for i in range(len(g.models)):
            blk = p[i * g.dim:(i + 1) * g.dim]
            p[i * g.dim:(i + 1) * g.dim] = blk / np.linalg.norm(blk)
        out[d] = (p, len(rows))
    return out


def test_the_in_memory_gallery_keeps_its_grouping_and_profiles_exact():
    rng = np.random.default_rng(0)
    g = Gallery(["a", "b"], {"a": 0.6, "b": 0.4})

    def vecs(k):
        v = rng.standard_normal((k, 16)).astype(np.float32)
        return [v[:, :8] / np.linalg.norm(v[:, :8], axis=1, keepdims=True),
                v[:, 8:] / np.linalg.norm(v[:, 8:], axis=1, keepdims=True)]

    g.append(rng.integers(1, 30, 200), vecs(200), [f"d{i}" for i in range(200)], ["female"] * 200)
    g.reindex()
    g.profiles()                       # start keeping profiles
    g.append(np.array([-1, -1, 5]), vecs(3), ["n1", "n2", "n3"], ["male"] * 3)
    g.remove([f"d{i}" for i in range(0, 200, 3)] + ["not there"])
    g.relabel({-1: 99})
    g.append(np.array([99, 7]), vecs(2), ["n4", "n5"])
    q = vecs(4)
    # best score per deer: precomputed order + tail == brute force
    deer, M = g.deer_max(q, g.n)
    bd, bM = per_deer_max(g.scores(q, 0, g.n), g.deer[: g.n])
    assert np.array_equal(deer, bd) and np.allclose(M, bM, atol=1e-6)
    assert sorted(g.rows(99).tolist()) == sorted(np.flatnonzero(g.deer[: g.n] == 99).tolist())
    assert -1 not in g.deer[: g.n]
    # profiles kept up to date == recomputed from the rows
    ids, P, counts = g.profiles()
    brute = _brute_profiles(g)
    assert sorted(ids.tolist()) == sorted(brute)
    for d, p, c in zip(ids.tolist(), P, counts.tolist()):
        assert c == brute[d][1]
        assert np.allclose(p, brute[d][0], atol=1e-5)
    # sex counts from the rows
    sc = g.sex_counts()
    assert sc[99] == (0, 2, 3)
    assert sum(n for _, _, n in sc.values()) == g.n
    # the best pair per deer is the exact maximum
    for d in (5, 7, 99):
        (sims, comp), = g.best_pairs(q, [d])
        rows = g.rows(d)
        brute_best = (0.6 * q[0].astype(np.float64) @ g.mats[0][rows].T.astype(np.float64)
                      + 0.4 * q[1].astype(np.float64) @ g.mats[1][rows].T.astype(np.float64)).max(axis=1)
        assert np.allclose(sims, brute_best, atol=1e-6)


@pytest.mark.parametrize("n", [0, 1])
def test_an_empty_or_tiny_gallery_scores(n):
    g = Gallery(["a"], {"a": 1.0})
    if n:
        g.append(np.array([3]), [np.ones((1, 4), np.float32) / 2], ["x"])
    deer, M = g.deer_max([np.ones((2, 4), np.float32) / 2], g.n)
    assert len(deer) == n and M.shape == (2, n)


def test_two_stage_after_withdrawals_in_a_small_gallery_decides_like_exact(engine):
    """Re-deciding withdraws the partition's deer (their profile rows become free); with fewer
    deer than profile_candidate_deer the shortlist must hold only deer that have sightings."""
    gallery_cache.clear()
    w = SyntheticWorld(engine, seed=4)
    for i, ident in enumerate("ABCABDEA"):
        w.sighting("cam1", T0 + timedelta(minutes=5 * i), ident, cls="unknown")
    for i, ident in enumerate("FAGB"):
        w.sighting("cam2", T0 + timedelta(days=1, minutes=5 * i), ident, cls="unknown")
    two = MatchingSettings(search="two_stage")
    decide_partition(engine, "cam1", "2024-05-01", two)
    for _ in range(2):                      # kept gallery, own deer withdrawn and founded again
        s = decide_partition(engine, "cam2", "2024-05-02", two)
        assert s.gallery_cache == "hit" and s.search == "two_stage"
    got = _snapshot(engine)
    gallery_cache.clear()
    decide_partition(engine, "cam2", "2024-05-02", SETTINGS)      # exhaustive exact, cold
    assert _snapshot(engine)[0] == got[0]
    assert (s.decided, s.matched, s.new_deer) == (4, 2, 2)


def test_a_deer_has_a_profile_per_flank_and_a_known_flank_is_ranked_against_its_own():
    """Two-stage ranks deer by profile: one per deer and flank (left, right, unknown), so a
    left-flank query is not ranked by the mean of a deer's two flanks nor by its right flank."""
    rng = np.random.default_rng(1)
    g = Gallery(["a"], {"a": 1.0})
    L, R, U = (rng.standard_normal((1, 8)).astype(np.float32) for _ in range(3))
    L, R, U = (v / np.linalg.norm(v) for v in (L, R, U))
    # deer 1: two left photos like L, two right photos like R; deer 2: right flank only, like L
    g.append(np.array([1, 1, 1, 1, 2]), [np.vstack([L, L, R, R, L])], ["l1", "l2", "r1", "r2", "x"],
             sides=["left", "left", "right", "right", "right"])
    g.reindex()
    ids, P, counts = g.profiles()
    assert sorted(zip(ids.tolist(), counts.tolist())) == [(1, 2), (1, 2), (2, 1)]
    deer, S = g.profile_scores(np.vstack([L, L, U]), np.array([1, 0, 0]))
    assert deer.tolist() == [1, 2]
    assert S[0, 0] == pytest.approx(1.0, abs=1e-5)        # left query: deer 1's left profile
    assert S[0, 1] == -np.inf                               # deer 2 known from the right flank only
    assert S[1, 1] == pytest.approx(1.0, abs=1e-5)          # unknown side: every profile
    # rows added, removed and relabelled keep one profile per deer and flank
    g.append(np.array([-1]), [R], ["n1"], sides=["left"])
    g.remove(["l1", "l2"])
    g.relabel({-1: 1})
    ids, P, counts = g.profiles([1])
    by = dict(zip(zip(ids.tolist(), g.prof_side[[g._prow[4 * 1 + s] for s in (1, 2)]].tolist()), counts.tolist()))
    assert by == {(1, 1): 1, (1, 2): 2}
    deer, S = g.profile_scores(R, np.array([1]), deer_ids=[1])
    assert S[0, 0] == pytest.approx(1.0, abs=1e-5)         # its left profile is now the relabelled R
