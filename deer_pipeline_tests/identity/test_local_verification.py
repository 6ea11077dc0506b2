"""Local-feature verification, the feature cache, calibrated match probabilities and the fused
decision: on made images (a textured 'flank', the same image warped, a different one), the real
embedded PostgreSQL for the cache and the stored calibration."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
import sqlalchemy as sa

from deer_pipeline.identity import calibration as calib
from deer_pipeline.identity import local_features as lf
from deer_pipeline.identity import store
from deer_pipeline.identity.matching import decide_partition
from deer_pipeline.identity.verification import Verifier, flank_compatible
from deer_pipeline.settings import LocalFeatureSettings, MatchingSettings, SettingsError
from deer_pipeline_tests.identity.test_matching import MODELS, T0, SyntheticWorld


def texture(seed: int, shape=(240, 320)) -> np.ndarray:
    """A grey image with many distinctive blobs, bars and lines (a made 'coat pattern')."""
    import cv2

    rng = np.random.default_rng(seed)
    img = np.full(shape, 110, np.uint8)
    h, w = shape
    for _ in range(70):
        c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        col = int(rng.integers(0, 256))
        kind = rng.integers(0, 3)
        if kind == 0:
            cv2.circle(img, c, int(rng.integers(3, 18)), col, -1)
        elif kind == 1:
            cv2.rectangle(img, c, (c[0] + int(rng.integers(4, 30)), c[1] + int(rng.integers(4, 30))), col, -1)
        else:
            cv2.line(img, c, (int(rng.integers(0, w)), int(rng.integers(0, h))), col, int(rng.integers(1, 4)))
    return cv2.GaussianBlur(img, (3, 3), 0)


def warped(img: np.ndarray, angle: float = 8.0, scale: float = 1.08, shift=(12, -7)) -> np.ndarray:
    import cv2

    h, w = img.shape
    M = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    M[:, 2] += shift
    return cv2.warpAffine(img, M, (w, h), borderMode=cv2.BORDER_REFLECT)


# --------------------------------------------------------------------------------------------
# Verification on a known pair vs two different images
# --------------------------------------------------------------------------------------------

def test_same_image_warped_verifies_and_two_different_images_do_not():
    a = lf.extract(texture(1), long_side=320, max_keypoints=400)
    a2 = lf.extract(warped(texture(1)), long_side=320, max_keypoints=400)
    b = lf.extract(texture(2), long_side=320, max_keypoints=400)
    assert len(a) > 50 and len(b) > 50
    same = lf.verify(a, a2)
    diff = lf.verify(a, b)
    assert same.reason is None and diff.reason is None
    assert same.inliers >= 40                       # the warp is recovered by the affine fit
    assert diff.inliers <= 10
    assert same.inliers > 4 * max(diff.inliers, 1)
    # every model of the fit separates them too
    for model in ("homography", "similarity"):
        assert lf.verify(a, a2, model=model).inliers > lf.verify(a, b, model=model).inliers


def test_small_crops_are_upsampled_for_keypoints():
    small = texture(3, shape=(60, 80))
    few = lf.extract(small, long_side=80)
    more = lf.extract(small, long_side=384)
    assert len(more) > len(few)
    assert more.keypoints[:, 0].max() > 80          # positions are in the upsampled crop


def test_bad_input_gives_no_score_and_a_reason_never_an_exception():
    flat = lf.extract(np.full((120, 160), 128, np.uint8))
    assert len(flat) == 0
    v = lf.verify(flat, lf.extract(texture(1)))
    assert v.inliers is None and v.reason == "no keypoints"
    assert len(lf.extract(np.zeros((3, 3), np.uint8))) == 0      # degenerate crop
    # keypoints all on one point: the fit is degenerate or finds nothing, never raises
    pts = lf.LocalFeatures(np.zeros((10, 2), np.float32), np.tile(np.eye(128, dtype=np.float32)[:1], (10, 1)))
    out = lf.verify(pts, pts)
    assert out.inliers is None or out.inliers >= 0


def test_feature_blob_round_trip_and_corruption_is_detected():
    f = lf.extract(texture(4))
    blob, sha = lf.pack(f)
    g = lf.unpack(blob, sha)
    assert np.array_equal(g.keypoints, f.keypoints)
    assert np.allclose(g.descriptors, f.descriptors, atol=1e-3)
    bad = bytearray(blob)
    bad[40] ^= 0xFF
    with pytest.raises(lf.CorruptFeatures):
        lf.unpack(bytes(bad), sha)
    with pytest.raises(lf.CorruptFeatures):
        lf.unpack(blob[:-7])
    assert "rootsift" in lf.feature_version(384, 400) and ":n400:" in lf.feature_version(384, 400)


def test_flank_compatibility():
    assert flank_compatible("left", "left") and flank_compatible(None, "right") and flank_compatible("left", None)
    assert not flank_compatible("left", "right")


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------

def test_isotonic_calibration_is_monotone_and_fuses_with_the_global_score_alone_when_local_is_missing():
    rng = np.random.default_rng(0)
    s = rng.uniform(0, 1, 2000)
    same = rng.uniform(0, 1, 2000) < s ** 3                # higher score, more often the same animal
    curve = calib.fit_isotonic(s, same)
    grid = np.linspace(-0.5, 1.5, 301)
    p = curve(grid)
    assert np.all(np.diff(p) >= -1e-12) and p.min() >= 0 and p.max() <= 1
    assert curve(0.95) > curve(0.2)
    inl = np.where(same, rng.integers(5, 40, 2000), rng.integers(0, 12, 2000)).astype(float)
    inl[::7] = np.nan                                      # pairs without a local score
    cal = calib.fit_calibration(s, same, inl, fitted_on={"source": "test"})
    assert set(cal.curves) == {calib.GLOBAL, calib.LOCAL}
    fused = cal.fuse(s[:50], inl[:50])
    alone = cal.probability(calib.GLOBAL, s[:50])
    no_local = ~np.isfinite(inl[:50])
    assert np.allclose(fused[no_local], alone[no_local])
    assert np.allclose(fused[~no_local], (alone[~no_local] + cal.probability(calib.LOCAL, inl[:50][~no_local])) / 2)
    assert cal.reliability and all(0 <= b["observed"] <= 1 for b in cal.reliability)
    with pytest.raises(calib.CalibrationError):
        calib.fit_isotonic([0.1, 0.2] * 20, [False] * 40)      # one kind of pair only


def test_calibration_is_stored_versioned_and_loaded(engine):
    rng = np.random.default_rng(1)
    s = rng.uniform(0, 1, 300)
    cal = calib.fit_calibration(s, s + rng.normal(0, 0.2, 300) > 0.7, fitted_on={"source": "test"})
    with engine.begin() as conn:
        assert calib.load(conn) is None
        v = calib.save(conn, cal)
        assert calib.save(conn, cal) == v                      # idempotent: the version is the content
    with engine.connect() as conn:
        got = calib.load(conn, v)
        newest = calib.load(conn)
    assert got.version == v == newest.version and v.startswith("cal1-")
    assert np.allclose(got.probability(calib.GLOBAL, s), cal.probability(calib.GLOBAL, s))
    with engine.connect() as conn, pytest.raises(calib.CalibrationError):
        calib.load(conn, "cal1-doesnotexist")


# --------------------------------------------------------------------------------------------
# The cache and the fused decision in the pipeline
# --------------------------------------------------------------------------------------------

def _write_crop(crop_dir, det: str, img: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(img).convert("RGB").save(crop_dir / f"{det}.jpg", quality=95)


def test_features_are_computed_once_cached_with_a_version_and_a_corrupt_entry_is_recomputed(engine, crop_dir):
    w = SyntheticWorld(engine, seed=3)
    d1 = w.sighting("camA", T0, "A")
    d2 = w.sighting("camA", T0 + timedelta(minutes=5), "A")
    _write_crop(crop_dir, d1, texture(1))
    _write_crop(crop_dir, d2, warped(texture(1)))
    s = LocalFeatureSettings(max_keypoints=300)
    v = Verifier(engine, str(crop_dir), s)
    v.prepare([d1, d2])
    assert (v.computed, v.cached) == (2, 0)
    first = v.inliers(d1, d2)
    assert first is not None and first >= 20
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT detection_id, feature_version, status, n_keypoints "
                                    "FROM local_features ORDER BY 1")).all()
    assert [r.status for r in rows] == ["ok", "ok"] and all(r.feature_version == v.version for r in rows)
    again = Verifier(engine, str(crop_dir), s)
    again.prepare([d1, d2])
    assert (again.computed, again.cached) == (0, 2)            # a second run never recomputes
    assert again.inliers(d1, d2) == first
    other = Verifier(engine, str(crop_dir), LocalFeatureSettings(max_keypoints=200))
    other.prepare([d1])
    assert other.computed == 1                                 # another version misses the cache
    with engine.begin() as conn:                               # corrupt one cached entry
        conn.execute(sa.text("UPDATE local_features SET features = substring(features from 1 for 50) "
                             "WHERE detection_id = :d AND feature_version = :v"), {"d": d1, "v": v.version})
    fixed = Verifier(engine, str(crop_dir), s)
    fixed.prepare([d1, d2])
    assert fixed.reasons["corrupt cache entry (recomputed)"] == 1 and fixed.computed == 1
    assert fixed.inliers(d1, d2) == first
    with engine.connect() as conn:
        blob, sha = conn.execute(sa.text("SELECT features, sha256 FROM local_features WHERE detection_id = :d "
                                         "AND feature_version = :v"), {"d": d1, "v": v.version}).one()
    lf.unpack(blob, sha)                                       # replaced by a good entry


def test_fused_decision_joins_the_verified_animal_and_bad_crops_only_cost_their_local_score(engine, crop_dir):
    # global vectors that cannot tell A from B (one centre for both); the crops can
    w = SyntheticWorld(engine, seed=5, noise=0.3)
    same = w.centre("X")
    w.centres["A"] = w.centres["B"] = same
    dets = [w.sighting("camA", T0 + timedelta(minutes=10 * k), ident) for k, ident in enumerate("ABAB")]
    bad = w.sighting("camA", T0 + timedelta(minutes=50), "A")
    imgs = [texture(1), texture(2), warped(texture(1)), warped(texture(2), angle=-6)]
    for d, img in zip(dets, imgs):
        _write_crop(crop_dir, d, img)
    # no crop file for `bad`: it keeps its global score alone
    g = np.linspace(0.0, 1.0, 200)
    rng = np.random.default_rng(0)
    inl = rng.integers(0, 60, 200).astype(float)
    cal = calib.fit_calibration(g, (inl > 25) & (g > 0.3), inl, fitted_on={"source": "test"})
    with engine.begin() as conn:
        version = calib.save(conn, cal)
    settings = MatchingSettings(reid_threshold=0.7, match_score="fused", calibration_version=version,
                                local=LocalFeatureSettings(max_keypoints=300), search="exact")
    verifier = Verifier(engine, str(crop_dir), settings.local)
    summary = decide_partition(engine, "camA", T0.date(), settings, MODELS, verifier=verifier)
    with engine.connect() as conn:
        deer = dict(conn.execute(sa.text("SELECT detection_id, deer_id FROM sightings")).all())
    assert deer[dets[0]] == deer[dets[2]] and deer[dets[1]] == deer[dets[3]]
    assert deer[dets[0]] != deer[dets[1]]
    assert bad in deer                   # the sighting without a crop is decided on its global score
    assert summary.decided == 5
    lv = summary.local_verification
    assert lv["match_score"] == "fused" and lv["calibration_version"] == version
    assert lv["no_local_score"].get("crop unreadable (FileNotFoundError)", 0) == 1
    assert lv["pairs_verified"] >= 4
    with engine.connect() as conn:
        comps = conn.execute(sa.text(f"SELECT {store.COMPONENTS_SQL} FROM similarity_scores WHERE detection_id = :d"),
                             {"d": dets[2]}).scalars().all()
    assert comps and all("local_inliers" in c for c in comps)


def test_fused_without_a_stored_calibration_refuses_and_creates_no_deer(engine, crop_dir):
    w = SyntheticWorld(engine, seed=6)
    w.sighting("camA", T0, "A")
    from deer_pipeline.identity.matching import MatchingError

    with pytest.raises(MatchingError, match="calibration"):
        decide_partition(engine, "camA", T0.date(), MatchingSettings(match_score="fused"), MODELS,
                         verifier=Verifier(engine, str(crop_dir)))
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM deer")).scalar_one() == 0


def test_settings_reject_bad_values():
    with pytest.raises(SettingsError):
        MatchingSettings(match_score="magic")
    with pytest.raises(SettingsError):
        MatchingSettings(encounter_pooling="median")
    with pytest.raises(SettingsError):
        LocalFeatureSettings(model="projective")
    assert MatchingSettings(encounter_pooling="top3").encounter_pooling == "top3"


def test_flank_aware_opposite_flanks_are_not_verified_and_keep_their_global_score(engine, crop_dir):
    w = SyntheticWorld(engine, seed=7, noise=0.2)
    left = w.sighting("camA", T0, "A")
    right = w.sighting("camA", T0 + timedelta(minutes=10), "A")
    for d, img in ((left, texture(1)), (right, warped(texture(1)))):
        _write_crop(crop_dir, d, img)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE detections SET side = 'left' WHERE detection_id = :d"), {"d": left})
        conn.execute(sa.text("UPDATE detections SET side = 'right' WHERE detection_id = :d"), {"d": right})
    g = np.linspace(0.0, 1.0, 100)
    cal = calib.fit_calibration(g, g > 0.5, np.where(g > 0.5, 50.0, 0.0), fitted_on={"source": "test"})
    with engine.begin() as conn:
        version = calib.save(conn, cal)
    settings = MatchingSettings(reid_threshold=0.5, match_score="fused", calibration_version=version,
                                local=LocalFeatureSettings(max_keypoints=300), search="exact")
    summary = decide_partition(engine, "camA", T0.date(), settings, MODELS,
                               verifier=Verifier(engine, str(crop_dir), settings.local))
    assert summary.local_verification["pairs_verified"] == 0        # left is never compared with right
    with engine.connect() as conn:
        score = conn.execute(sa.text("SELECT score FROM sightings WHERE detection_id = :d"), {"d": right}).scalar_one()

        def vec(d, v):
            txt = conn.execute(sa.text("SELECT vector::text FROM embeddings WHERE detection_id = :d "
                                       "AND embedding_version = :v"), {"d": d, "v": v}).scalar_one()
            x = np.array([float(t) for t in txt.strip("[]").split(",")])
            return x / np.linalg.norm(x)

        cos = sum(wt * vec(left, MODELS[m]) @ vec(right, MODELS[m])
                  for m, wt in {"multiscale": 0.6, "efficientnet_b0": 0.4}.items())
    # the global probability alone (the pair has no local score), not a fused one
    expected = float(cal.probability(calib.GLOBAL, [cos])[0]) + 1e-6 * (1 + cos) / 2
    assert score == pytest.approx(expected, abs=1e-5)


def test_matching_settings_survive_a_json_round_trip():
    import dataclasses
    import json

    s = MatchingSettings(match_score="fused", local=LocalFeatureSettings(max_keypoints=123))
    back = MatchingSettings(**json.loads(json.dumps(dataclasses.asdict(s))))
    assert back == s and back.local.max_keypoints == 123


def test_background_shared_with_another_animal_of_the_frame_is_discarded(engine, crop_dir):
    # A and B are photographed together in front of the same bush (texture 9); C, a third animal,
    # passes the same bush later. Without the control, A and C match on the bush.
    bush = texture(9, shape=(240, 160))
    crops = {"A": np.hstack([texture(1, shape=(240, 160)), bush]),
             "B": np.hstack([texture(2, shape=(240, 160)), bush]),
             "C": np.hstack([texture(3, shape=(240, 160)), bush])}
    w = SyntheticWorld(engine, seed=8)
    a, b = w.frame("camA", T0, [("A", "doe"), ("B", "doe")])
    c = w.sighting("camA", T0 + timedelta(hours=1), "C")
    for d, k in ((a, "A"), (b, "B"), (c, "C")):
        _write_crop(crop_dir, d, crops[k])
    off = Verifier(engine, str(crop_dir), LocalFeatureSettings(max_keypoints=400, background_control=False))
    off.prepare([a, c])
    on = Verifier(engine, str(crop_dir), LocalFeatureSettings(max_keypoints=400, background_control=True))
    on.prepare([a, c])
    assert on.background_keypoints_removed > 20 and off.background_keypoints_removed == 0
    assert off.inliers(a, c) >= 20                      # the still background matches itself
    assert on.inliers(a, c) < off.inliers(a, c) / 2     # ... and the control removes most of it
