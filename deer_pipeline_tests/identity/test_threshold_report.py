import json
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest

from deer_pipeline.identity import threshold_report
from deer_pipeline.identity.matching import decide_partition
from deer_pipeline.settings import MatchingSettings
from deer_pipeline_tests.identity.test_matching import DIM, MODELS, T0, SyntheticWorld

WEIGHTS = {"multiscale": 0.6, "efficientnet_b0": 0.4}


def at_angle(deg: float) -> np.ndarray:
    v = np.zeros(DIM)
    v[0], v[1] = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return v


def test_precision_recall_match_a_hand_computed_case(engine, tmp_path):
    """Four labelled sightings on a circle: the cosine of two is the cosine of their angle
    difference (the same vector for both models, so the ensemble equals it).

        A1 0deg, A2 30deg, B1 60deg, B2 100deg
        A1-A2 .866 same | A1-B1 .500 diff | A1-B2 -.174 diff
        A2-B1 .866 diff | A2-B2 .342 diff | B1-B2 .766 same

    t = 0.80: predicted {A1-A2, A2-B1}: tp 1, fp 1, fn 1 -> precision 0.5, recall 0.5
    t = 0.70: predicted + B1-B2:         tp 2, fp 1, fn 0 -> precision 2/3, recall 1
    t = 0.90: nothing predicted          -> precision 0, recall 0
    """
    w = SyntheticWorld(engine)
    ids = []
    for i, (ident, deg) in enumerate([("A", 0), ("A", 30), ("B", 60), ("B", 100)]):
        vec = at_angle(deg)
        ids.append(w.sighting("cam1", T0 + timedelta(minutes=i), ident,
                              vectors={0: {m: vec for m in MODELS}}))
    w.truth_to_db(ids)
    decide_partition(engine, "cam1", "2024-05-01", MatchingSettings(search="exact", reid_threshold=0.8))
    rep = threshold_report.build_report(engine, components=MODELS, weights=WEIGHTS,
                                        thresholds=[0.7, 0.8, 0.9], out_dir=tmp_path)
    assert rep.truth_source == "true_identities"
    assert rep.pairs["n_pairs"] == 6 and rep.pairs["same"] == 2 and rep.pairs["different"] == 4
    by_t = {r["threshold"]: r for r in rep.sweep}
    assert (by_t[0.8]["tp"], by_t[0.8]["fp"], by_t[0.8]["fn"]) == (1, 1, 1)
    assert by_t[0.8]["precision"] == pytest.approx(0.5) and by_t[0.8]["recall"] == pytest.approx(0.5)
    assert by_t[0.7]["precision"] == pytest.approx(2 / 3) and by_t[0.7]["recall"] == pytest.approx(1.0)
    assert by_t[0.7]["f1"] == pytest.approx(0.8)
    assert by_t[0.9]["predicted_same"] == 0 and by_t[0.9]["f1"] == 0.0
    assert rep.recommended["threshold"] == 0.7 and rep.recommended["f1"] == pytest.approx(0.8)
    assert rep.recommended["truth_source"] == "true_identities" and rep.recommended["pairs"] == 6
    # all four are does: the per-sex table rests on the same six pairs
    assert rep.sweep_by_sex["female"][0]["pairs"] == 6

    # decisions at threshold 0.8: A1 new; A2 joins A (.866); B1's best is A (.866, wrong deer);
    # B2's best is the A-deer (.766 to B1 which joined A) -> would match at 0.7
    wm = {r["threshold"]: r for r in rep.would_match}
    assert (wm[0.8]["would_match"], wm[0.8]["would_be_new"]) == (2, 2)
    assert (wm[0.7]["would_match"], wm[0.7]["would_be_new"]) == (3, 1)
    # the current grouping {A1, A2, B1}, {B2}: tp 1 (A1-A2), fp 2, fn 1 (B1-B2)
    g = rep.grouping
    assert (g["tp"], g["fp"], g["fn"]) == (1, 2, 1) and g["sightings"] == 4

    # files
    for key in ("png", "sweep_csv", "would_match_csv", "buckets_csv", "json"):
        assert (tmp_path / rep.files[key].split("/")[-1]).exists()
    assert open(rep.files["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(open(rep.files["json"]).read())
    assert saved["recommended"]["threshold"] == 0.7 and saved["truth_source"] == "true_identities"
    csv = pd.read_csv(rep.files["sweep_csv"])
    assert set(csv["sex"]) == {"all", "female"} and set(csv["truth_source"]) == {"true_identities"}
    md = threshold_report.markdown(rep)
    assert "Recommended threshold 0.70" in md and "6 pairs" in md and "data:image/png;base64," in md


def test_without_labels_the_report_uses_frame_and_track_constraints(engine, tmp_path):
    w = SyntheticWorld(engine, noise=0.3)
    # two deer in one frame: a negative pair; a three-frame burst of one deer: 3 positive pairs
    w.frame("cam1", T0, [("A", "doe"), ("B", "doe")])
    w.burst("cam1", T0 + timedelta(minutes=5), [("C", "doe")], frames=3)
    decide_partition(engine, "cam1", "2024-05-01", MatchingSettings(search="exact"))
    rep = threshold_report.build_report(engine, components=MODELS, weights=WEIGHTS, out_dir=tmp_path)
    assert rep.truth_source == "constraints"
    assert rep.pairs["same"] == 3 and rep.pairs["different"] == 1
    assert rep.grouping == {} and rep.decisions == {}
    md = threshold_report.markdown(rep)
    assert "constraints" in md and "4 pairs" in md
    assert "No match-probability calibration" in md and "at least 20" in rep.calibration["not_fitted"]


def test_report_fits_and_stores_a_match_probability_calibration_with_a_reliability_diagram(engine, tmp_path):
    from deer_pipeline.identity import calibration

    w = SyntheticWorld(engine, seed=4, noise=0.9)
    for k in range(24):
        w.sighting("cam1", T0 + timedelta(minutes=3 * k), f"D{k % 6}")
    w.truth_to_db()
    decide_partition(engine, "cam1", "2024-05-01", MatchingSettings(search="exact", reid_threshold=0.5))
    rep = threshold_report.build_report(engine, components=MODELS, weights=WEIGHTS, out_dir=tmp_path)
    cal = rep.calibration
    assert cal["version"].startswith("cal1-") and cal["fitted_on"]["source"] == rep.truth_source
    assert cal["fitted_on"]["reliability"] == "2-fold cross-fitted"     # out of sample, not a tautology
    assert cal["reliability"] and sum(b["pairs"] for b in cal["reliability"]) == rep.pairs["n_pairs"]
    p = cal["curve"]["p"]
    assert all(b >= a for a, b in zip(p, p[1:]))                # monotone
    with engine.connect() as conn:
        assert calibration.load(conn).version == cal["version"]   # stored, versioned
    assert "reliability diagram" in threshold_report.markdown(rep)


def test_report_on_an_empty_store_says_there_is_nothing_to_recommend(engine, tmp_path):
    rep = threshold_report.build_report(engine, components=MODELS, weights=WEIGHTS, out_dir=tmp_path)
    assert rep.recommended["threshold"] is None and rep.score_summary == {"count": 0}
    assert (tmp_path / "threshold_report.png").exists()
