"""Which deer is this photo? (``identity.lookup``) on the real embedded PostgreSQL + pgvector:
the HNSW index of the primary model shortlists deer, the ensemble scores them exactly, as a
brute-force scan of every stored sighting would; flank-aware; an exact scan when the index
finds too few deer; clear errors for unknown detections and missing vectors."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
import sqlalchemy as sa

from deer_pipeline import settings
from deer_pipeline.identity import lookup, store
from deer_pipeline.identity.matching import decide_partition
from deer_pipeline.settings import MatchingSettings
from deer_pipeline_tests.identity.test_matching import MODELS, T0, SyntheticWorld, deer_of

WEIGHTS = {m: settings.ENSEMBLE_WEIGHTS[m] for m in MODELS}


def _world(engine, n_deer: int = 12, per_deer: int = 3):
    w = SyntheticWorld(engine, noise=0.9, seed=4)
    ids: dict[str, list[str]] = {}
    for k in range(per_deer):
        for i in range(n_deer):
            ident = f"I{i:02d}"
            ids.setdefault(ident, []).append(w.sighting("cam1", T0 + timedelta(minutes=20 * (k * n_deer + i)), ident))
    decide_partition(engine, "cam1", "2024-05-01", MatchingSettings(search="exact", reid_threshold=0.55))
    assert set(deer_of(engine)) == {d for v in ids.values() for d in v}        # one day: all decided
    return w, ids


def _brute(engine, query_id: str, side_out: str | None = None) -> list[tuple[int, float, str]]:
    """Every decided sighting but the query, float64 ensemble score; best per deer, best first."""
    with engine.connect() as conn:
        q = {m: np.asarray(store.load_vectors(conn, [query_id], v)[query_id], np.float64) for m, v in MODELS.items()}
        rows = conn.execute(sa.text("SELECT s.detection_id, s.deer_id, d.side FROM sightings s "
                                    "JOIN detections d USING (detection_id)")).all()
        vecs = {m: store.load_vectors(conn, [r.detection_id for r in rows], v) for m, v in MODELS.items()}
    best: dict[int, tuple[float, str]] = {}
    for r in rows:
        if r.detection_id == query_id or (side_out and r.side == side_out):
            continue
        s = sum(WEIGHTS[m] * float(np.asarray(vecs[m][r.detection_id], np.float64) @ q[m]) for m in MODELS)
        if r.deer_id not in best or s > best[r.deer_id][0]:
            best[r.deer_id] = (s, r.detection_id)
    return sorted(((d, s, det) for d, (s, det) in best.items()), key=lambda t: (-t[1], t[0]))


def test_look_alikes_are_the_deer_exact_scoring_ranks_first(engine):
    _, ids = _world(engine)
    query = ids["I03"][1]
    with engine.connect() as conn:
        found = lookup.look_alikes(conn, query, WEIGHTS, versions=MODELS, k=5)
    brute = _brute(engine, query)[:5]
    assert found.found_by == "hnsw" and found.ef_search == 200
    assert [a.deer_id for a in found.look_alikes] == [d for d, _, _ in brute]
    assert [a.detection_id for a in found.look_alikes] == [det for _, _, det in brute]
    assert [a.similarity for a in found.look_alikes] == pytest.approx([s for _, s, _ in brute], abs=1e-9)
    assert found.deer_id == deer_of(engine)[query]
    assert query not in {a.detection_id for a in found.look_alikes}
    a = found.look_alikes[0]
    assert a.similarity == pytest.approx(sum(WEIGHTS[m] * a.components[m] for m in MODELS))
    # its own deer is among them, ranked like any other (the synthetic deer are distinct)
    assert found.look_alikes[0].deer_id == found.deer_id


def test_a_known_flank_is_never_compared_with_the_other_flank(engine):
    _, ids = _world(engine)
    query = ids["I05"][0]
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE detections SET side = 'left' WHERE detection_id = :q"), {"q": query})
        conn.execute(sa.text("UPDATE detections SET side = 'right' WHERE detection_id = ANY(:o)"),
                     {"o": ids["I05"][1:]})
        before = dict(conn.execute(sa.text("SELECT detection_id, deer_id FROM sightings")).all())
    with engine.connect() as conn:
        aware = lookup.look_alikes(conn, query, WEIGHTS, versions=MODELS, k=4)
        blind = lookup.look_alikes(conn, query, WEIGHTS, versions=MODELS, k=4, flank_aware=False)
    assert {a.detection_id for a in aware.look_alikes}.isdisjoint(ids["I05"][1:])
    assert [a.deer_id for a in aware.look_alikes] == [d for d, _, _ in _brute(engine, query, side_out="right")[:4]]
    assert blind.look_alikes[0].detection_id in ids["I05"][1:]          # the same animal, other flank
    assert before[blind.look_alikes[0].detection_id] == blind.look_alikes[0].deer_id


def test_the_exact_reference_ranks_like_the_index_on_a_small_gallery(engine):
    _, ids = _world(engine)
    query = ids["I09"][1]
    with engine.connect() as conn:
        exact = lookup.look_alikes(conn, query, WEIGHTS, versions=MODELS, k=6, search="exact")
        hnsw = lookup.look_alikes(conn, query, WEIGHTS, versions=MODELS, k=6)
        with pytest.raises(ValueError, match="hnsw or exact"):
            lookup.look_alikes(conn, query, WEIGHTS, versions=MODELS, search="ivf")
    assert exact.found_by == "exact" and hnsw.found_by == "hnsw"
    assert [(a.deer_id, a.detection_id) for a in exact.look_alikes] == [(a.deer_id, a.detection_id)
                                                                       for a in hnsw.look_alikes]


def test_too_few_deer_from_the_index_fall_back_to_an_exact_scan(engine):
    _, ids = _world(engine, n_deer=4)
    query = ids["I00"][0]
    with engine.connect() as conn:
        found = lookup.look_alikes(conn, query, WEIGHTS, versions=MODELS, k=10)
    assert found.found_by == "exact" and found.ef_search == 0
    assert [a.deer_id for a in found.look_alikes] == [d for d, _, _ in _brute(engine, query)]


def test_unknown_detections_and_missing_vectors_are_clear_errors(engine):
    w, ids = _world(engine, n_deer=3, per_deer=1)
    late = w.sighting("cam1", T0 + timedelta(days=1), "I00", embed=False)
    with engine.connect() as conn:
        with pytest.raises(lookup.UnknownDetection, match="nope"):
            lookup.look_alikes(conn, "nope", WEIGHTS, versions=MODELS)
        with pytest.raises(lookup.PhotoLookupError, match="no vector of multiscale"):
            lookup.look_alikes(conn, late, WEIGHTS, versions=MODELS)
        with pytest.raises(ValueError):
            lookup.look_alikes(conn, ids["I00"][0], WEIGHTS, versions=MODELS, k=0)


def test_the_review_lookup_command_prints_the_ranking(engine, capsys):
    from deer_pipeline.review import cli as review_cli

    _, ids = _world(engine)
    query = ids["I07"][2]
    assert review_cli.main(["lookup", query, "--k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    ranked = [int(line.split()[1]) for line in out[2:]]
    assert ranked == [d for d, _, _ in _brute(engine, query)[:3]]
    assert f"now deer {deer_of(engine)[query]}" in out[0] and "HNSW, ef_search 200" in out[0]
    assert review_cli.main(["lookup", "nope"]) == 2
    assert "detection 'nope'" in capsys.readouterr().err
