"""Match-or-create against the real embedded PostgreSQL + pgvector.

``SyntheticWorld`` (also used by the other identity tests) inserts cameras, images, detections,
crops, embedding versions and embeddings directly: each identity has one random unit centre per
model, and each sighting is that centre plus noise, re-normalised (same-deer cosine ~0.8,
different deer ~0).
"""

from __future__ import annotations

import itertools
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
import sqlalchemy as sa

from deer_pipeline import db
from deer_pipeline.identity import gallery, matching, store
from deer_pipeline.identity.matching import MatchingError, decide_partition
from deer_pipeline.settings import MatchingSettings

MODELS = {"multiscale": "ms-test-v1", "efficientnet_b0": "eb0-test-v1"}
DIM = 512
T0 = datetime(2024, 5, 1, 6, 0, tzinfo=timezone.utc)
_SEQ = itertools.count(1)      # unique image paths and detection ids across worlds of one test
CLASS_SEX = {"doe": "female", "fawn": "unknown", "young_buck": "male", "mid_buck": "male",
             "mature_buck": "male", "unknown": "unknown"}


class SyntheticWorld:
    def __init__(self, engine, seed: int = 0, noise: float = 0.5, models=MODELS):
        self.engine = engine
        self.rng = np.random.default_rng(seed)
        self.noise = noise
        self.models = dict(models)
        self.centres: dict[str, dict[str, np.ndarray]] = {}
        self.truth: dict[str, str] = {}
        self._cams: set[str] = set()
        with engine.begin() as conn:
            for m, v in self.models.items():
                conn.execute(sa.text(
                    "INSERT INTO embedding_versions (embedding_version, model, backbone, weights_sha256, "
                    "reduction_sha256, preprocessing, dim) VALUES (:v, :m, 'synthetic', 'x', 'x', 'none', 512) "
                    "ON CONFLICT DO NOTHING"), {"v": v, "m": m})

    def unit(self, v):
        return v / np.linalg.norm(v)

    def centre(self, identity: str) -> dict[str, np.ndarray]:
        if identity not in self.centres:
            self.centres[identity] = {m: self.unit(self.rng.standard_normal(DIM)) for m in self.models}
        return self.centres[identity]

    def vector(self, identity: str, model: str, noise: float | None = None) -> np.ndarray:
        noise = self.noise if noise is None else noise
        c = self.centre(identity)[model]
        return self.unit(c + noise * self.rng.standard_normal(DIM) / np.sqrt(DIM))

    def frame(self, camera: str, t: datetime, animals, burst: str | None = None,
              versions=None, embed: bool = True, vectors=None) -> list[str]:
        """One image with one detection per (identity, class[, bbox]) in ``animals``; returns
        the detection ids. ``vectors`` = {detection index: {model: vector}} overrides."""
        versions = self.models if versions is None else versions
        ids = []
        with self._transaction() as conn:
            if camera not in self._cams:
                conn.execute(sa.text("INSERT INTO cameras (camera_id) VALUES (:c) ON CONFLICT DO NOTHING"),
                             {"c": camera})
                self._cams.add(camera)
            self._n = next(_SEQ)
            image_id = conn.execute(sa.text(
                "INSERT INTO images (path, camera_id, captured_at, width, height) "
                "VALUES (:p, :c, :t, 1920, 1080) RETURNING image_id"),
                {"p": f"/synthetic/{camera}/{self._n}.jpg", "c": camera, "t": t}).scalar_one()
            for i, animal in enumerate(animals):
                identity, cls = animal[0], animal[1]
                bbox = animal[2] if len(animal) > 2 else (100 + 500 * i, 100, 200, 150)
                self._n = next(_SEQ)
                det = f"{camera}-{t:%Y%m%d%H%M%S}-{self._n}"
                conn.execute(sa.text(
                    "INSERT INTO detections (detection_id, image_id, camera_id, captured_at, day, bbox_x, "
                    "bbox_y, bbox_w, bbox_h, confidence, classification, sex, encounter_id) VALUES "
                    "(:d, :i, :c, :t, :day, :x, :y, :w, :h, 0.9, :cls, :sex, :b)"),
                    {"d": det, "i": image_id, "c": camera, "t": t, "day": t.date(), "x": bbox[0],
                     "y": bbox[1], "w": bbox[2], "h": bbox[3], "cls": cls, "sex": CLASS_SEX[cls],
                     "b": burst})
                conn.execute(sa.text("INSERT INTO crops (detection_id, crop_path, status) "
                                     "VALUES (:d, :p, 'ok')"), {"d": det, "p": f"{det}.jpg"})
                if embed:
                    for m, v in versions.items():
                        vec = (vectors or {}).get(i, {}).get(m)
                        vec = self.vector(identity, m) if vec is None else vec
                        conn.execute(sa.text(
                            "INSERT INTO embeddings (detection_id, embedding_version, vector) "
                            "VALUES (:d, :v, CAST(:x AS vector))"),
                            {"d": det, "v": v, "x": db.vector_literal(vec)})
                self.truth[det] = identity
                ids.append(det)
        return ids

    @contextmanager
    def batch(self):
        """Insert everything of the block in one transaction (faster for many frames)."""
        with self.engine.begin() as conn:
            self._conn = conn
            try:
                yield self
            finally:
                self._conn = None

    @contextmanager
    def _transaction(self):
        if getattr(self, "_conn", None) is not None:
            yield self._conn
        else:
            with self.engine.begin() as conn:
                yield conn

    def truth_to_db(self, ids=None, source="synthetic"):
        with self.engine.begin() as conn:
            for d in (ids if ids is not None else list(self.truth)):
                conn.execute(sa.text("INSERT INTO true_identities (detection_id, identity, source) "
                                     "VALUES (:d, :i, :s) ON CONFLICT DO NOTHING"),
                             {"d": d, "i": self.truth[d], "s": source})

    def sighting(self, camera, t, identity, cls="doe", **kw) -> str:
        return self.frame(camera, t, [(identity, cls)], **kw)[0]

    def burst(self, camera, t, animals, frames=3, step_s=1) -> list[list[str]]:
        """A burst of frames; each animal walks a little to the right between frames."""
        key = f"burst-{camera}-{t:%H%M%S}-{next(_SEQ)}"
        out = []
        for f in range(frames):
            out.append(self.frame(camera, t + timedelta(seconds=f * step_s),
                                  [(ident, cls, (100 + 600 * i + 15 * f, 200, 220, 160))
                                   for i, (ident, cls) in enumerate(animals)], burst=key))
        return out


def grouping(engine) -> set[frozenset[str]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT deer_id, detection_id FROM sightings")).all()
    by: dict[int, set[str]] = {}
    for deer, det in rows:
        by.setdefault(deer, set()).add(det)
    return {frozenset(v) for v in by.values()}


def deer_of(engine) -> dict[str, int]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT detection_id, deer_id FROM sightings")).all())


def count(engine, sql: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text(sql)).scalar_one()


def truth_groups(world, ids) -> set[frozenset[str]]:
    by: dict[str, set[str]] = {}
    for d in ids:
        by.setdefault(world.truth[d], set()).add(d)
    return {frozenset(v) for v in by.values()}


SETTINGS = MatchingSettings(search="exact")


def decide_in_parallel(engine, parts, seed, settings=SETTINGS) -> list:
    """Decide the (camera, day) partitions on 4 threads in a shuffled order, started together."""
    order = parts[:]
    random.Random(seed).shuffle(order)
    barrier = threading.Barrier(4)

    def run(p):
        try:
            barrier.wait(timeout=5)
        except threading.BrokenBarrierError:
            pass
        return decide_partition(engine, p[0], p[1], settings)

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(run, order))


# ---------------------------------------------------------------------------------------------

def test_sightings_of_the_same_deer_are_matched_and_strangers_become_new_deer(engine):
    w = SyntheticWorld(engine)
    ids = [w.sighting("cam1", T0 + timedelta(minutes=10 * i), ident)
           for i, ident in enumerate(["A", "B", "A", "C", "B", "A"])]
    s = decide_partition(engine, "cam1", "2024-05-01", SETTINGS)
    assert (s.decided, s.matched, s.new_deer, s.unassigned) == (6, 3, 3, 0)
    assert grouping(engine) == truth_groups(w, ids)
    assert s.deer_total == 3
    assert s.embedding_version == matching.ensemble_version(MODELS, {"multiscale": 0.6, "efficientnet_b0": 0.4})
    assert s.max_similarity is not None and s.max_similarity > 0.6
    with engine.connect() as conn:
        deer = conn.execute(sa.text(
            "SELECT founding_detection_id, sighting_count, sex, first_seen, last_seen FROM deer "
            "ORDER BY first_seen")).all()
        # founding detection = first sighting of each deer; counts and times follow the sightings
        assert [d.founding_detection_id for d in deer] == [ids[0], ids[1], ids[3]]
        assert [d.sighting_count for d in deer] == [3, 2, 1]
        assert deer[0].first_seen == T0 and deer[0].last_seen == T0 + timedelta(minutes=50)
        assert {d.sex for d in deer} == {"female"}
        # profile vector per version: re-normalised mean of the sightings
        prof = conn.execute(sa.text(
            "SELECT p.embedding_version, p.n_sightings, p.vector::text FROM deer_profile_vectors p "
            "JOIN deer k USING (deer_id) WHERE k.founding_detection_id = :f"), {"f": ids[0]}).all()
        assert sorted(p[0] for p in prof) == sorted(MODELS.values())
        for version, n, text in prof:
            assert n == 3
            assert abs(np.linalg.norm(db.parse_vector(text)) - 1) < 1e-4
        # decisions record the best score and the threshold
        rows = conn.execute(sa.text("SELECT detection_id, decision, score, threshold FROM sightings")).all()
        for r in rows:
            assert r.threshold == pytest.approx(0.6)
            if r.decision == "matched":
                assert r.score >= 0.6
            elif r.score is not None:
                assert r.score < 0.6


def test_similarity_scores_hold_every_score_the_decision_looked_at(engine):
    w = SyntheticWorld(engine)
    for i, ident in enumerate(["A", "B", "C", "A"]):
        w.sighting("cam1", T0 + timedelta(minutes=i), ident)
    s = decide_partition(engine, "cam1", "2024-05-01", MatchingSettings(search="exact", candidate_deer=2))
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT s.detection_id, s.candidate_deer_id, s.similarity, "
            "score_components(s.component_models, s.component_scores, s.components) components, s.matched, "
            "s.sex_match, s.threshold, s.partition_key, s.embedding_version FROM similarity_scores s "
            "ORDER BY s.detection_id, s.similarity DESC")).all()
    # first sighting: no candidates; then 1, 2, 2 (capped by candidate_deer)
    assert len(rows) == 0 + 1 + 2 + 2 == s.score_rows
    last = [r for r in rows if w.truth[r.detection_id] == "A" and r.matched]
    assert len(last) == 1 and last[0].similarity >= 0.6
    for r in rows:
        assert set(r.components) == set(MODELS)
        # the stored similarity is the weighted sum of the stored per-model cosines
        assert r.similarity == pytest.approx(0.6 * r.components["multiscale"]
                                             + 0.4 * r.components["efficientnet_b0"], abs=1e-4)
        assert r.partition_key == "cam1|2024-05-01" and r.sex_match and r.threshold == pytest.approx(0.6)
        assert r.embedding_version == s.embedding_version


def test_two_deer_in_one_frame_never_share_an_identity(engine):
    w = SyntheticWorld(engine, noise=0.05)
    # the two animals look identical to the model (same identity vectors) ...
    single = w.frame("cam1", T0, [("twin", "doe"), ("twin", "doe")])
    # ... and in a burst of three frames the two tracks share every frame
    frames = w.burst("cam1", T0 + timedelta(minutes=5), [("twin", "doe"), ("twin", "doe")])
    decide_partition(engine, "cam1", "2024-05-01", SETTINGS)
    d = deer_of(engine)
    assert d[single[0]] != d[single[1]]
    track_a = {d[f[0]] for f in frames}
    track_b = {d[f[1]] for f in frames}
    assert len(track_a) == 1 and len(track_b) == 1      # a track goes to one deer
    assert track_a != track_b                             # two animals of one frame: two deer
    # the burst tracks match the two deer of the first frame (not new deer each)
    assert track_a | track_b == {d[single[0]], d[single[1]]}
    with engine.connect() as conn:
        keys = conn.execute(sa.text("SELECT count(DISTINCT encounter_key) FROM sightings")).scalar_one()
    assert keys == 4


def test_rematerialising_a_partition_changes_nothing(engine):
    w = SyntheticWorld(engine)
    for i, ident in enumerate("ABACBDA"):
        w.sighting("cam1", T0 + timedelta(minutes=7 * i), ident)
    for i, ident in enumerate("CBA"):
        w.sighting("cam2", T0 + timedelta(minutes=3 + 11 * i), ident, cls="unknown")
    decide_partition(engine, "cam1", "2024-05-01", SETTINGS)
    decide_partition(engine, "cam2", "2024-05-01", SETTINGS)

    def snapshot():
        with engine.connect() as conn:
            s = conn.execute(sa.text("SELECT detection_id, deer_id, encounter_key, partition_key, decision, "
                                     "score, threshold FROM sightings ORDER BY 1")).all()
            k = conn.execute(sa.text("SELECT deer_id, founding_detection_id, sex, sighting_count, first_seen, "
                                     "last_seen FROM deer ORDER BY 1")).all()
            sc = conn.execute(sa.text("SELECT detection_id, candidate_deer_id, round(similarity::numeric, 5), "
                                      "matched FROM similarity_scores ORDER BY 1, 2")).all()
        return s, k, sc

    before = snapshot()
    for cam in ("cam2", "cam1", "cam2"):      # the latest, then the older (replays the later)
        decide_partition(engine, cam, "2024-05-01", SETTINGS)
        assert snapshot() == before


def wandering_world(engine, cameras, days: int, per_partition: int, n_deer: int, n_female: int,
                    minutes: int, seed: int):
    """Deer wandering between cameras over days: ``per_partition`` sightings per camera x day at
    random minutes of the day, deer 0..n_female-1 female (doe, fawn or unknown), the others
    bucks (mid buck or unknown). Returns (world, [(camera, day)] in day, camera order)."""
    w = SyntheticWorld(engine, seed=seed)
    rnd = random.Random(seed)
    idents = [f"deer{i}" for i in range(n_deer)]
    parts = []
    for day in range(days):
        for cam in cameras:
            for _ in range(per_partition):
                t = T0 + timedelta(days=day, minutes=rnd.randrange(0, minutes))
                ident = rnd.choice(idents)
                cls = rnd.choice(["doe", "unknown", "fawn"]) if int(ident[4:]) < n_female else \
                    rnd.choice(["mid_buck", "unknown"])
                w.sighting(cam, t, ident, cls=cls)
            parts.append((cam, (T0 + timedelta(days=day)).date().isoformat()))
    return w, parts


def _world_for_backfill(engine, seed=3):
    """Three cameras x three days, deer wandering between cameras; some partitions start before
    others end so replays interleave."""
    return wandering_world(engine, ("camA", "camB", "camC"), days=3, per_partition=5, n_deer=7,
                           n_female=4, minutes=600, seed=seed)


def _reset_decisions(engine):
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE similarity_scores, sightings, deer_profile_vectors, deer CASCADE"))


def test_parallel_backfill_in_any_order_equals_a_serial_run(engine):
    w, parts = _world_for_backfill(engine)
    serial = sorted(parts, key=lambda p: (p[1], p[0]))
    for cam, day in serial:
        decide_partition(engine, cam, day, SETTINGS)
    expected = grouping(engine)
    with engine.connect() as conn:
        expected_founders = set(conn.execute(sa.text("SELECT founding_detection_id FROM deer")).scalars())
    n_dets = count(engine, "SELECT count(*) FROM detections")
    assert sum(len(g) for g in expected) == n_dets

    for trial, seed in enumerate((11, 12)):
        _reset_decisions(engine)
        results = decide_in_parallel(engine, parts, seed)
        assert sum(r.replayed for r in results) > 0        # out-of-order runs did replay
        assert grouping(engine) == expected
        with engine.connect() as conn:
            founders = set(conn.execute(sa.text("SELECT founding_detection_id FROM deer")).scalars())
            n_deer = conn.execute(sa.text("SELECT count(*) FROM deer")).scalar_one()
            n_sight = conn.execute(sa.text("SELECT count(*) FROM sightings")).scalar_one()
            orphan = conn.execute(sa.text("SELECT count(*) FROM deer k WHERE NOT EXISTS "
                                          "(SELECT 1 FROM sightings s WHERE s.deer_id = k.deer_id)")).scalar_one()
            counts_ok = conn.execute(sa.text(
                "SELECT bool_and(k.sighting_count = x.n) FROM deer k JOIN "
                "(SELECT deer_id, count(*) n FROM sightings GROUP BY 1) x USING (deer_id)")).scalar_one()
        assert founders == expected_founders and n_deer == len(expected)
        assert n_sight == n_dets and orphan == 0 and counts_ok


def test_parallel_backfill_in_separate_processes(engine):
    """Processes do not share the engine: only the advisory lock keeps them apart."""
    import multiprocessing as mp

    w, parts = _world_for_backfill(engine, seed=5)
    for cam, day in sorted(parts, key=lambda p: (p[1], p[0])):
        decide_partition(engine, cam, day, SETTINGS)
    expected = grouping(engine)
    _reset_decisions(engine)
    url = engine.url.render_as_string(hide_password=False)
    order = parts[::-1]
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        pool.starmap(_decide_in_process, [(url, cam, day) for cam, day in order])
    assert grouping(engine) == expected


def _decide_in_process(url, cam, day):
    from deer_pipeline import db as _db
    from deer_pipeline.identity.matching import decide_partition as _decide
    from deer_pipeline.settings import MatchingSettings as _MS

    _decide(_db.get_engine(url, migrate=False), cam, day, _MS(search="exact"))


def test_unknown_sex_and_fawn_sightings_match_deer_of_any_sex(engine):
    w = SyntheticWorld(engine)
    doe = w.sighting("cam1", T0, "A", cls="doe")
    buck = w.sighting("cam1", T0 + timedelta(minutes=1), "B", cls="mature_buck")
    unk_a = w.sighting("cam1", T0 + timedelta(minutes=2), "A", cls="unknown")
    fawn_b = w.sighting("cam1", T0 + timedelta(minutes=3), "B", cls="fawn")
    s = decide_partition(engine, "cam1", "2024-05-01", SETTINGS)
    d = deer_of(engine)
    assert d[unk_a] == d[doe] and d[fawn_b] == d[buck]
    assert s.matched == 2 and s.new_deer == 2
    with engine.connect() as conn:
        sexes = dict(conn.execute(sa.text("SELECT founding_detection_id, sex FROM deer")).all())
    assert sexes == {doe: "female", buck: "male"}


def test_an_unknown_deer_takes_the_sex_of_a_later_sighting(engine):
    w = SyntheticWorld(engine)
    first = w.sighting("cam1", T0, "A", cls="unknown")
    w.sighting("cam1", T0 + timedelta(minutes=1), "A", cls="doe")
    decide_partition(engine, "cam1", "2024-05-01", SETTINGS)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT sex FROM deer WHERE founding_detection_id = :f"),
                            {"f": first}).scalar_one() == "female"


def test_a_female_sighting_never_joins_a_male_deer_when_the_sex_filter_is_on(engine):
    w = SyntheticWorld(engine, noise=0.05)
    buck = w.sighting("cam1", T0, "A", cls="mid_buck")
    doe = w.sighting("cam1", T0 + timedelta(minutes=1), "A", cls="doe")   # looks exactly like him
    decide_partition(engine, "cam1", "2024-05-01", SETTINGS)
    d = deer_of(engine)
    assert d[buck] != d[doe]
    assert count(engine, "SELECT count(*) FROM similarity_scores") == 0   # no eligible candidate
    # with the filter off the same photos match, and the score row says the sexes differ
    decide_partition(engine, "cam1", "2024-05-01", MatchingSettings(search="exact", sex_filter=False))
    d = deer_of(engine)
    assert d[buck] == d[doe]
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT sex_match FROM similarity_scores")).scalars().all() == [False]


def test_per_sex_thresholds_are_used(engine):
    w = SyntheticWorld(engine)
    a1 = w.sighting("cam1", T0, "A", cls="doe")
    a2 = w.sighting("cam1", T0 + timedelta(minutes=1), "A", cls="doe")
    b1 = w.sighting("cam1", T0 + timedelta(minutes=2), "B", cls="mid_buck")
    b2 = w.sighting("cam1", T0 + timedelta(minutes=3), "B", cls="mid_buck")
    decide_partition(engine, "cam1", "2024-05-01",
                     MatchingSettings(search="exact", thresholds_by_sex={"female": 0.99}))
    d = deer_of(engine)
    assert d[a1] != d[a2] and d[b1] == d[b2]
    with engine.connect() as conn:
        thr = dict(conn.execute(sa.text("SELECT detection_id, threshold FROM sightings")).all())
    assert thr[a2] == pytest.approx(0.99) and thr[b2] == pytest.approx(0.6)


def test_detections_without_embeddings_are_reported_and_left_unassigned(engine):
    w = SyntheticWorld(engine)
    w.sighting("cam1", T0, "A")
    missing = w.sighting("cam1", T0 + timedelta(minutes=1), "A", embed=False)
    partial = w.sighting("cam1", T0 + timedelta(minutes=2), "A", versions={"multiscale": MODELS["multiscale"]})
    s = decide_partition(engine, "cam1", "2024-05-01", SETTINGS)
    assert s.decided == 1 and s.unassigned == 2
    assert set(s.unassigned_ids) == {missing, partial}
    assert s.unassigned_reasons == {"not embedded": 1, "missing a component version": 1}
    assert count(engine, "SELECT count(*) FROM sightings") == 1
    assert count(engine, "SELECT count(*) FROM detections") == 3      # nothing dropped


def test_a_failure_while_matching_creates_no_deer(engine, monkeypatch):
    w = SyntheticWorld(engine)
    for i, ident in enumerate("ABC"):
        w.sighting("cam1", T0 + timedelta(minutes=i), ident)
    decide_partition(engine, "cam1", "2024-05-01", SETTINGS)
    before = (grouping(engine), count(engine, "SELECT count(*) FROM deer"),
              count(engine, "SELECT count(*) FROM similarity_scores"))
    for i, ident in enumerate("ADE"):
        w.sighting("cam1", T0 + timedelta(days=1, minutes=i), ident)

    # 1. the configured version has no vectors anywhere
    with pytest.raises(MatchingError, match="not in embedding_versions"):
        decide_partition(engine, "cam1", "2024-05-02", SETTINGS,
                         versions={"multiscale": "nope", "efficientnet_b0": MODELS["efficientnet_b0"]})
    # 2. the partition is embedded only with another version of the model
    w2 = SyntheticWorld(engine, models={"multiscale": "ms-test-v2", "efficientnet_b0": "eb0-test-v2"})
    w2.sighting("cam1", T0 + timedelta(days=2), "Z")
    with pytest.raises(MatchingError, match="none has vectors for every configured version"):
        decide_partition(engine, "cam1", "2024-05-03", SETTINGS, versions=MODELS)
    # 3. the gallery was built with another version than the one now configured
    with pytest.raises(MatchingError, match="have no vector for embedding version"):
        decide_partition(engine, "cam1", "2024-05-03", SETTINGS,
                         versions={"multiscale": "ms-test-v2", "efficientnet_b0": "eb0-test-v2"})
    # 4. an error in the middle of the decision, after new deer were decided in memory
    fail_at_append(monkeypatch, 3, "simulated failure while matching")
    with pytest.raises(RuntimeError, match="simulated"):
        decide_partition(engine, "cam1", "2024-05-02", SETTINGS, versions=MODELS)
    monkeypatch.undo()
    after = (grouping(engine), count(engine, "SELECT count(*) FROM deer"),
             count(engine, "SELECT count(*) FROM similarity_scores"))
    assert after == before
    # and the partition decides fine once the failure is gone
    s = decide_partition(engine, "cam1", "2024-05-02", SETTINGS, versions=MODELS)
    assert (s.decided, s.matched, s.new_deer) == (3, 1, 2)


def test_exact_and_hnsw_search_decide_alike(engine):
    w = SyntheticWorld(engine, seed=7)
    rnd = random.Random(7)
    for i in range(60):
        w.sighting("cam1", T0 + timedelta(minutes=i), f"d{rnd.randrange(12)}",
                   cls=rnd.choice(["doe", "unknown"]))
    decide_partition(engine, "cam1", "2024-05-01", SETTINGS)
    exact = grouping(engine)
    s = decide_partition(engine, "cam1", "2024-05-01", MatchingSettings(search="hnsw", hnsw_ef_search=40))
    assert s.search == "hnsw"
    assert grouping(engine) == exact


def test_filtered_hnsw_query_still_finds_the_true_best(engine):
    """pgvector 0.6 filters after the index scan: many near vectors that are not in the gallery
    (other version, undecided detections) crowd out the true best at a small ef_search."""
    w = SyntheticWorld(engine, seed=1)
    others = [f"o{i}" for i in range(40)]
    for i, ident in enumerate(["target"] + others):
        w.sighting("cam1", T0 + timedelta(minutes=i), ident, cls="doe")
    # a buck that looks even more like the query: excluded by the sex filter after the scan
    w.sighting("cam1", T0 + timedelta(minutes=50), "target", cls="mature_buck",
               vectors={0: {m: w.centre("target")[m] for m in MODELS}})
    decide_partition(engine, "cam1", "2024-05-01", SETTINGS)
    target_deer = deer_of(engine)
    # 300 undecided detections (another camera, not yet decided) right next to the query
    query = {m: w.vector("target", m, noise=0.3) for m in MODELS}
    with w.batch():
        for i in range(300):
            w.sighting("cam9", T0 + timedelta(days=1, minutes=i), "target", cls="doe",
                       vectors={0: {m: w.unit(query[m] + 0.05 * w.rng.standard_normal(DIM) / np.sqrt(DIM))
                                    for m in MODELS}})
    q_det = w.sighting("cam2", T0 + timedelta(days=2), "target", cls="doe", vectors={0: query})
    first_doe = [d for d, i in w.truth.items() if i == "target"][0]

    with engine.begin() as conn:
        conn.execute(sa.text("SET LOCAL enable_seqscan = off"))    # make the planner use the index
        near = store.hnsw_nearest_deer(conn, query["multiscale"], MODELS["multiscale"], ef=40)
        scanned = conn.execute(sa.text(
            "SELECT count(*) FROM (SELECT 1 FROM embeddings ORDER BY vector <=> CAST(:q AS vector) "
            "LIMIT 40) x"), {"q": db.vector_literal(query["multiscale"])}).scalar_one()
    assert scanned == 40 and near == {}        # the naive filtered query finds no gallery deer at all

    s = decide_partition(engine, "cam2", "2024-05-03",
                         MatchingSettings(search="hnsw", hnsw_ef_search=40, candidate_deer=3))
    assert s.search == "hnsw" and s.hnsw_requeries > 0
    d = deer_of(engine)
    assert d[q_det] == target_deer[first_doe]
    with engine.connect() as conn:
        best = conn.execute(sa.text(
            "SELECT candidate_deer_id, similarity FROM similarity_scores WHERE detection_id = :d "
            "ORDER BY similarity DESC"), {"d": q_det}).all()
    # exact check: the true best female deer by ensemble similarity
    assert best[0][0] == target_deer[first_doe] and len(best) == 3


def test_ensemble_similarity_is_the_weighted_sum_of_per_model_cosines():
    rng = np.random.default_rng(0)
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)  # noqa: E731
    q = {m: unit(rng.standard_normal((3, DIM))).astype(np.float32) for m in MODELS}
    g = {m: unit(rng.standard_normal((5, DIM))).astype(np.float32) for m in MODELS}
    w = {"multiscale": 0.6, "efficientnet_b0": 0.4}
    from deer_pipeline.embedding import models as embedders

    components = {}
    got = embedders.weighted_cosine(q, g, w, components)   # the one ensemble score the matching uses
    want = 0.6 * q["multiscale"] @ g["multiscale"].T + 0.4 * q["efficientnet_b0"] @ g["efficientnet_b0"].T
    assert np.allclose(got, want, atol=1e-6)
    assert np.allclose(components["multiscale"], q["multiscale"] @ g["multiscale"].T, atol=1e-6)


def fail_at_append(monkeypatch, n: int, message: str) -> None:
    """Make the ``n``-th row append to an in-memory gallery raise (a crash in the middle of a
    decision, after some encounters were decided in memory)."""
    calls = {"n": 0}
    real_append = gallery.Gallery.append

    def failing_append(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError(message)
        return real_append(self, *args, **kw)

    monkeypatch.setattr(gallery.Gallery, "append", failing_append)
