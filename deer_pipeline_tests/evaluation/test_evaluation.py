"""Evaluation: metrics on hand-computed cases, the legacy method's behaviour, the isolated
database, and a small end-to-end evaluation on real labelled nyala photos."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from deer_pipeline.evaluation import isolated as eval_isolated
from deer_pipeline.evaluation import labels as eval_labels
from deer_pipeline.evaluation import methods as rm
from deer_pipeline.identity import metrics, pooling
from deer_pipeline.evaluation import scoring as eval_scoring

# --------------------------------------------------------------------------------------------
# Closed set
# --------------------------------------------------------------------------------------------

def _closed_case():
    # photo: identity, encounter
    ids = ["A", "A", "A", "B", "B", "C", "D", "D"]
    encs = ["e1", "e1", "e2", "e3", "e4", "e5", "e6", "e6"]
    S = np.zeros((8, 8))
    pairs = {(0, 1): 0.95,          # same encounter: must be ignored
             (0, 2): 0.5, (0, 3): 0.9, (0, 4): 0.1,
             (1, 2): 0.8, (1, 3): 0.2, (1, 4): 0.3,
             (2, 3): 0.6, (2, 4): 0.7,
             (3, 4): 0.3,
             (6, 7): 0.99}
    for (i, j), s in pairs.items():
        S[i, j] = S[j, i] = s
    np.fill_diagonal(S, 1.0)
    return S, ids, encs


def test_closed_set_excludes_same_encounter_and_matches_hand_computation():
    S, ids, encs = _closed_case()
    got = eval_scoring.closed_set_metrics(S, ids, encs)
    # q0: 3(B) .9, 2(A) .5 -> miss, AP 1/2 (its encounter mate 1 at .95 is not a match)
    # q1: 2(A) .8 first -> hit, AP 1
    # q2: 1(A) .8, 4 .7, 3 .6, 0(A) .5 -> hit, AP (1 + 2/4) / 2
    # q3: 0 .9, 2 .6, 4(B) .3 -> miss, AP 1/3
    # q4: 2 .7, then a tie at .3 between 1 (wrong) and 3 (right): ties rank against the query -> AP 1/3
    # q5 (C alone), q6 and q7 (D only in their own encounter) have nothing to find: skipped
    assert got["queries"] == 5 and got["skipped_queries"] == 3
    assert got["top1"] == pytest.approx(2 / 5)
    assert got["top5"] == pytest.approx(1.0)
    assert got["mAP"] == pytest.approx((0.5 + 1 + 0.75 + 1 / 3 + 1 / 3) / 5)


def test_closed_set_counts_same_encounter_when_encounters_differ():
    """The same scores with every photo its own encounter: photo 1 becomes q0's first match."""
    S, ids, _ = _closed_case()
    got = eval_scoring.closed_set_metrics(S, ids, [str(i) for i in range(8)])
    assert got["skipped_queries"] == 1           # only C has no other photo
    assert got["top1"] > 2 / 5


def test_closed_set_constant_scores_earn_nothing():
    ids = ["A", "A", "B", "B"]
    got = eval_scoring.closed_set_metrics(np.ones((4, 4)), ids, ["1", "2", "3", "4"])
    assert got["top1"] == 0.0


# --------------------------------------------------------------------------------------------
# Open set: BAKS / BAUS, pairwise, the replayed decision rule
# --------------------------------------------------------------------------------------------

def test_known_unknown_accuracy_hand_computed():
    feed = [("A", 1, True),    # first A founds a deer: right
            ("B", 1, False),   # first B joins A's deer: wrong (should be new)
            ("A", 1, False),   # known A joins deer 1 = {A:1, B:1}: a tie is not "A's deer": wrong
            ("A", 1, False),   # deer 1 = {A:2, B:1}: right
            ("B", 2, True),    # known B founds a new deer: wrong
            ("C", 3, True)]    # first C: right
    got = eval_scoring.known_unknown_accuracy(feed)
    assert got["baks"] == pytest.approx((0.5 + 0.0) / 2)     # A: 1 of 2, B: 0 of 1
    assert got["baus"] == pytest.approx(2 / 3)
    assert got["known_encounters"] == 3 and got["unknown_encounters"] == 3
    assert got["known_accuracy_pooled"] == pytest.approx(1 / 3)
    assert got["balanced_accuracy"] == pytest.approx((0.25 + 2 / 3) / 2)


def test_open_set_metrics_pairwise_and_counts():
    got = eval_scoring.open_set_metrics(["A", "A", "B", "B"], [1, 1, 1, 2],
                              [("A", 1, True), ("B", 1, False), ("B", 2, True)])
    assert got["pairwise_precision"] == pytest.approx(1 / 3)   # pairs 01, 02, 12; only 01 right
    assert got["pairwise_recall"] == pytest.approx(1 / 2)      # 01 found, 23 missed
    assert got["pairwise_f1"] == pytest.approx(0.4)
    assert got["n_pred"] == 2 and got["n_true"] == 2 and got["count_error"] == 0


# --------------------------------------------------------------------------------------------
# Cross-encounter metrics (hand-made cases)
# --------------------------------------------------------------------------------------------

# six photos: individual A in encounters e1 (2 photos) and e2 (2 photos), B in e3 (2 photos)
_X_IDS = ["A", "A", "A", "A", "B", "B"]
_X_ENC = ["e1", "e1", "e2", "e2", "e3", "e3"]


def test_cross_encounter_never_matching_earns_nothing():
    # one deer per encounter: all-pairs precision 1 from the within-encounter pairs, but no
    # cross-encounter pair is predicted, so cross-encounter precision/recall/F1 are 0
    pred = [1, 1, 2, 2, 3, 3]
    x = metrics.cross_encounter_prf(_X_IDS, pred, _X_ENC)
    assert (x.tp, x.fp, x.fn) == (0, 0, 4) and x.f1 == 0.0 and x.precision == 0.0
    allp = metrics.pairwise_prf(_X_IDS, pred)
    assert allp.precision == 1.0 and allp.recall == pytest.approx(3 / 7)    # 3 of A's 6 + B's 1 pairs
    o = eval_scoring.open_set_metrics(_X_IDS, pred, [("A", 1, True), ("A", 2, True), ("B", 3, True)], _X_ENC)
    assert o["cross_encounter_f1"] == 0.0 and o["pairwise_precision"] == 1.0


def test_cross_encounter_perfect_and_everything_merged():
    x = metrics.cross_encounter_prf(_X_IDS, _X_IDS, _X_ENC)
    assert (x.tp, x.fp, x.fn) == (4, 0, 0) and x.f1 == 1.0                # e1 x e2: 2 x 2 pairs
    x = metrics.cross_encounter_prf(_X_IDS, [0] * 6, _X_ENC)
    # 15 pairs, 3 within an encounter -> 12 cross-encounter pairs predicted, 4 of them right
    assert (x.tp, x.fp, x.fn) == (4, 8, 0)
    assert x.precision == pytest.approx(1 / 3) and x.recall == 1.0 and x.f1 == pytest.approx(0.5)


def test_cross_encounter_partial_join_counted_by_hand():
    # photo 2 (A, e2) joins A's e1 deer, photo 3 (A, e2) joins B's deer; photo 5 (B) alone
    pred = ["a", "a", "a", "b", "b", "c"]
    x = metrics.cross_encounter_prf(_X_IDS, pred, _X_ENC)
    # predicted cross pairs: (0,2), (1,2) [deer a], (3,4) [deer b]; right: (0,2), (1,2)
    assert (x.tp, x.fp, x.fn) == (2, 1, 2)
    assert x.precision == pytest.approx(2 / 3) and x.recall == pytest.approx(0.5)
    # without encounters every photo is its own encounter: the plain pairwise metric
    assert metrics.cross_encounter_prf(_X_IDS, pred, range(6)) == metrics.pairwise_prf(_X_IDS, pred)


def test_cross_encounter_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        metrics.cross_encounter_prf(["A", "B"], [1, 2], ["e1"])


def test_baks_baus_geometric_mean():
    o = eval_scoring.open_set_metrics(["A", "A", "B"], [1, 1, 2], [("A", 1, True), ("A", 1, False), ("B", 2, True)],
                                      ["e1", "e2", "e3"])
    assert o["baks"] == 1.0 and o["baus"] == 1.0 and o["baks_baus_gmean"] == 1.0
    o = eval_scoring.open_set_metrics(["A", "A", "B"], [1, 2, 1], [("A", 1, True), ("A", 2, True), ("B", 1, False)],
                                      ["e1", "e2", "e3"])
    assert o["baks"] == 0.0 and o["baks_baus_gmean"] == 0.0


def test_encounter_pooling_mean_of_the_best_pairs():
    scores = np.array([[0.9, 0.2, 0.5],
                       [0.1, 0.3, 0.6]])
    deer = np.array([0, 0, 1])
    assert pooling.pool_by_deer(scores, deer, 3, "max").tolist() == [0.9, 0.6, -np.inf]
    got = pooling.pool_by_deer(scores, deer, 3, "top2")
    assert got[0] == pytest.approx((0.9 + 0.3) / 2) and got[1] == pytest.approx((0.6 + 0.5) / 2)
    with pytest.raises(ValueError):
        pooling.pooling_k("median")


def test_simulated_open_set_follows_the_pipeline_rule():
    S = np.eye(4, dtype=np.float32)
    S[2, 0] = S[0, 2] = 0.7
    S[2, 1] = S[1, 2] = 0.4
    S[3, 0] = S[0, 3] = 0.5
    S[3, 1] = S[1, 3] = 0.65
    S[3, 2] = S[2, 3] = 0.2
    encounters = [[0, 1], [2], [3]]
    deer, new = eval_scoring.simulate_open_set(S, encounters, 0.6)
    assert deer.tolist() == [0, 0, 0, 0] and new == [True, False, False]
    deer, new = eval_scoring.simulate_open_set(S, encounters, 0.68)       # 0.65 (max over pairs) < 0.68
    assert deer.tolist() == [0, 0, 0, 1] and new == [True, False, True]
    deer, _ = eval_scoring.simulate_open_set(S, encounters, 0.6, cannot_link={2: {0}, 0: {2}})
    assert deer.tolist() == [0, 0, 0, 1]                        # e2 may not join e0's deer


def test_calibrated_threshold_separates_two_clear_individuals():
    # two individuals, two encounters each; same-individual photos at 0.8, others at 0.3
    ids = ["A", "A", "B", "B"]
    S = np.full((4, 4), 0.3)
    S[0, 1] = S[1, 0] = S[2, 3] = S[3, 2] = 0.8
    np.fill_diagonal(S, 1.0)
    rec = eval_scoring.calibrate_threshold(S, ids, [[0], [2], [1], [3]])
    assert 0.3 < rec["threshold"] <= 0.8
    assert rec["f1"] == pytest.approx(1.0) and rec["n_pred"] == 2
    assert rec["count_rule"]["n_pred"] == 2 and rec["count_rule"]["f1"] == pytest.approx(1.0)


def test_threshold_chosen_on_a_few_individuals_is_corrected_for_the_population():
    """Three individuals, three photos each; only two same-animal pairs stand out. On these three
    alone, joining everything has the best F1 (a quarter of all pairs are right); weighting each
    wrong join for a population of 90 individuals picks the threshold that joins only the clear
    pairs."""
    ids = [x for x in "ABC" for _ in range(3)]
    S = np.full((9, 9), 0.3)
    S[0, 1] = S[1, 0] = S[3, 4] = S[4, 3] = 0.8
    np.fill_diagonal(S, 1.0)
    encounters = [[k] for k in range(9)]
    plain = eval_scoring.calibrate_threshold(S, ids, encounters)
    assert plain["threshold"] <= 0.3 and plain["n_pred"] == 1 and plain["fp_weight"] == 1.0
    assert plain["f1"] == pytest.approx(0.4)                       # 9 right pairs of 36
    corrected = eval_scoring.calibrate_threshold(S, ids, encounters, population=90)
    assert corrected["fp_weight"] == pytest.approx(89 / 2)
    assert 0.3 < corrected["threshold"] <= 0.8 and corrected["n_pred"] == 7
    assert corrected["precision"] == pytest.approx(1.0) and corrected["f1"] == pytest.approx(4 / 11)
    # the count rule chooses by the number of deer (its F1 is reported weighted); a population no
    # larger than the set changes nothing
    assert [corrected["count_rule"][k] for k in ("threshold", "n_pred")] == [plain["count_rule"][k]
                                                                           for k in ("threshold", "n_pred")]
    same = eval_scoring.calibrate_threshold(S, ids, encounters, population=3)
    assert same["threshold"] == plain["threshold"] and same["fp_weight"] == 1.0


def test_count_rule_finds_the_closest_number_of_deer():
    rng = np.random.default_rng(5)
    ids = [f"i{k % 7}" for k in range(40)]
    S = rng.uniform(0, 1, (40, 40))
    S = (S + S.T) / 2
    for a in range(40):
        for b in range(40):
            if ids[a] == ids[b]:
                S[a, b] += 0.15
    encounters = [[k] for k in range(40)]
    rec = eval_scoring.calibrate_threshold(S, ids, encounters)
    best = min(abs(r["n_pred"] - 7) for r in rec["sweep"])
    assert abs(rec["count_rule"]["n_pred"] - 7) <= best
    # the F1 rule is the maximum of the sweep
    assert rec["f1"] >= max(r["f1"] for r in rec["sweep"]) - 1e-12


# --------------------------------------------------------------------------------------------
# Labels and split
# --------------------------------------------------------------------------------------------

def test_read_labels_and_split_by_identity(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("image_path,identity,encounter_id,side\n"
                 + "".join(f"img/{i}.jpg,ind{i % 6},{i // 2},left\n" for i in range(24)))
    photos = eval_labels.read_labels(p, tmp_path / "root")
    assert len(photos) == 24 and photos[0].image_path == str(tmp_path / "root" / "img" / "0.jpg")
    assert photos[0].box is None and photos[0].timestamp is None
    cal, rest = eval_labels.split_by_identity(photos, 7)
    assert {x.identity for x in cal}.isdisjoint({x.identity for x in rest})
    assert len({x.identity for x in cal}) == 3 and len(cal) + len(rest) == 24
    again, _ = eval_labels.split_by_identity(photos, 7)
    assert [x.image_path for x in again] == [x.image_path for x in cal]


def test_labels_read_the_flank_as_ingest_does(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("image_path,identity,orientation\n"
                 "a.jpg,x,Left\nb.jpg,x,R\nc.jpg,x,frontleft\nd.jpg,x,front\ne.jpg,x,\nf.jpg,x,sideways\n")
    assert [ph.side for ph in eval_labels.read_labels(p)] == ["left", "right", "left", None, None, None]


def test_encounters_without_ids_are_derived_from_capture_times(tmp_path):
    """No encounter_id: photos of one individual at one camera within the burst window of each
    other (a chain) are one encounter, as the pipeline's bursts join them; another individual,
    another camera or a longer gap is another encounter; without a timestamp the photo is its
    own encounter; an encounter_id given in the labels is kept."""
    p = tmp_path / "labels.csv"
    rows = [("a1", "ind1", "", "cam1", "2024-05-01T06:00:00"),
            ("a2", "ind1", "", "cam1", "2024-05-01T06:00:04"),     # 4 s after a1: same burst
            ("a3", "ind1", "", "cam1", "2024-05-01T06:00:08"),     # 4 s after a2: chained
            ("a4", "ind1", "", "cam1", "2024-05-01T06:01:00"),     # 52 s later: a new encounter
            ("b1", "ind2", "", "cam1", "2024-05-01T06:00:01"),     # another individual, same burst
            ("c1", "ind1", "", "cam2", "2024-05-01T06:00:02"),     # another camera
            ("d1", "ind3", "", "cam1", ""),                        # no time: the photo alone
            ("d2", "ind3", "", "cam1", ""),
            ("e1", "ind4", "E7", "cam1", "2024-05-01T06:00:00"),   # given: kept
            ("e2", "ind4", "E8", "cam1", "2024-05-01T06:00:01")]
    p.write_text("image_path,identity,encounter_id,camera,timestamp\n"
                 + "".join(f"{n}.jpg,{i},{e},{c},{t}\n" for n, i, e, c, t in rows))
    by = {Path(x.image_path).stem: x for x in eval_labels.read_labels(p)}
    enc = {k: v.encounter for k, v in by.items()}
    assert enc["a1"] == enc["a2"] == enc["a3"] and enc["a3"].startswith(eval_labels.BURST_ENCOUNTER)
    assert len({enc["a1"], enc["a4"], enc["b1"], enc["c1"]}) == 4
    assert enc["d1"] != enc["d2"] and enc["d1"].startswith(eval_labels.PHOTO_ENCOUNTER)
    assert (enc["e1"], enc["e2"]) == ("E7", "E8") and by["e1"].encounter_given and not by["a1"].encounter_given
    summary = eval_labels.dataset_summary(list(by.values()))
    assert summary["encounters_from"] == {"capture times (same individual and camera, burst window)": 6,
                                          "the photo alone (no encounter_id, no timestamp)": 2, "encounter_id": 2}
    assert summary["encounters"] == 8


def test_labels_read_without_identities_derive_encounters_by_camera_and_time(tmp_path):
    """Training from encounters reads no identity: the column may be missing, values such as
    'unknown' are kept, and capture times chain photos of one camera whatever their identity
    column says - the pipeline's burst grouping, not the labels' individuals."""
    p = tmp_path / "labels.csv"
    p.write_text("image_path,identity,camera,timestamp\n"
                 "a.jpg,ind1,cam1,2024-05-01T06:00:00\nb.jpg,ind2,cam1,2024-05-01T06:00:03\n"
                 "c.jpg,unknown,cam1,2024-05-01T06:00:05\nd.jpg,ind1,cam2,2024-05-01T06:00:01\n")
    with_ids = {Path(x.image_path).stem: x for x in eval_labels.read_labels(p)}
    assert "c" not in with_ids and with_ids["a"].encounter != with_ids["b"].encounter
    by = {Path(x.image_path).stem: x for x in eval_labels.read_labels(p, identities=False)}
    assert {x.identity for x in by.values()} == {eval_labels.UNLABELLED}
    assert by["a"].encounter == by["b"].encounter == by["c"].encounter != by["d"].encounter
    bare = tmp_path / "bare.csv"
    bare.write_text("image_path,encounter_id\na.jpg,E1\nb.jpg,E1\n")
    assert [x.encounter for x in eval_labels.read_labels(bare, identities=False)] == ["E1", "E1"]
    with pytest.raises(eval_labels.EvaluationError, match="image_path and identity"):
        eval_labels.read_labels(bare)


def test_without_identities_derives_encounters_again_from_camera_and_time(tmp_path):
    """Photos read with identities (encounters chained per individual) seen without them: the
    identity is gone, encounters the labels did not give are chained by camera and time alone,
    and given encounter ids are kept."""
    p = tmp_path / "labels.csv"
    p.write_text("image_path,identity,encounter_id,camera,timestamp\n"
                 "a.jpg,ind1,,cam1,2024-05-01T06:00:00\nb.jpg,ind2,,cam1,2024-05-01T06:00:03\n"
                 "c.jpg,ind3,,cam1,\nd.jpg,ind3,,cam1,\ne.jpg,ind4,E9,cam1,2024-05-01T06:00:04\n")
    photos = eval_labels.read_labels(p)
    assert photos[0].encounter != photos[1].encounter
    by = {Path(x.image_path).stem: x for x in eval_labels.without_identities(photos)}
    assert {x.identity for x in by.values()} == {eval_labels.UNLABELLED}
    assert by["a"].encounter == by["b"].encounter and by["c"].encounter != by["d"].encounter
    assert by["e"].encounter == "E9"


def test_labels_with_dates_only_are_not_fed_as_one_burst_per_day(tmp_path):
    """Timestamps that are dates (all at midnight) are not capture times: fed as they are, every
    photo of a day would be one burst at one instant. The encounters keep their date and are
    spaced beyond the burst window; real capture times are fed as they are."""
    from deer_pipeline.evaluation import prepare as eval_prepare

    p = tmp_path / "labels.csv"
    rows = [("a1", "ind1", "2024-05-01"), ("a2", "ind1", "2024-05-01"), ("b1", "ind2", "2024-05-01"),
            ("c1", "ind3", "2024-05-01"), ("a3", "ind1", "2024-05-03")]
    p.write_text("image_path,identity,date\n" + "".join(f"{n}.jpg,{i},{t}\n" for n, i, t in rows))
    photos = eval_labels.read_labels(p)
    assert eval_prepare.dates_only(photos)
    enc = [ph.encounter for ph in photos]
    assert enc[0] == enc[1] and len(set(enc)) == 4          # one encounter per individual and day
    out = tmp_path / "det.csv"
    _, order = eval_prepare.write_detections_csv(out, photos, "evaluation", 0)
    assert "dates" in order
    fed = {r["detection_id"]: r for r in csv.DictReader(open(out))}
    t = [datetime.fromisoformat(fed[f"eval-{i:06d}"]["captured_at"]) for i in range(5)]
    assert [x.date().isoformat() for x in t] == ["2024-05-01"] * 4 + ["2024-05-03"]
    assert abs((t[1] - t[0]).total_seconds()) <= 1                      # one encounter: one burst
    starts = sorted({t[0], t[2], t[3]})
    assert all((b - a).total_seconds() > eval_prepare.BURST_WINDOW_S for a, b in zip(starts, starts[1:]))
    p.write_text("image_path,identity,timestamp\n" + "".join(
        f"{n}.jpg,{i},{d}T06:00:{k:02d}\n" for k, (n, i, d) in enumerate(rows)))
    timed = eval_labels.read_labels(p)
    assert not eval_prepare.dates_only(timed)
    assert eval_prepare.write_detections_csv(out, timed, "evaluation", 0)[1] == "timestamp"


def test_unidentified_photos_are_skipped_not_one_individual(tmp_path, caplog):
    p = tmp_path / "labels.csv"
    p.write_text("image_path,identity\na.jpg,ind1\nb.jpg,Unknown\nc.jpg,unidentified\nd.jpg,ind2\n")
    with caplog.at_level("WARNING"):
        photos = eval_labels.read_labels(p)
    assert [ph.identity for ph in photos] == ["ind1", "ind2"] and "2 photos" in caplog.text
    p.write_text("image_path,identity\nb.jpg,unknown\n")
    with pytest.raises(eval_labels.EvaluationError, match="1 unidentified skipped"):
        eval_labels.read_labels(p)


def test_read_labels_rejects_missing_columns(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("path,who\na.jpg,x\n")
    with pytest.raises(eval_labels.EvaluationError, match="image_path and identity"):
        eval_labels.read_labels(p)


# --------------------------------------------------------------------------------------------
# Legacy method
# --------------------------------------------------------------------------------------------

def _unit(cos_to_e1: float, dim: int = 512, axis: int = 1) -> np.ndarray:
    v = np.zeros(dim, np.float32)
    v[0] = cos_to_e1
    v[axis] = np.sqrt(1 - cos_to_e1 ** 2)
    return v


def test_legacy_keeps_the_first_vector_and_a_fixed_threshold():
    lm = rm.LegacyMatcher(8)
    assert lm.threshold == 0.60
    e1 = _unit(1.0)
    assert lm.decide(e1)[:2] == (0, False)                     # founds deer 0
    d, matched, score = lm.decide(_unit(0.601))                # just above 0.60: joins deer 0
    assert (d, matched) == (0, True) and score == pytest.approx(0.601, abs=1e-6)
    np.testing.assert_array_equal(lm.frozen[0], e1)            # the profile did not move
    # close to the second sighting (cos ~0.96) but 0.599 to the frozen first one: a new deer
    d, matched, _ = lm.decide(_unit(0.599))
    assert (d, matched) == (1, False) and len(lm.frozen) == 2


def test_legacy_projection_is_drawn_anew_with_default_init_and_leaves_global_rng():
    import torch

    state = torch.get_rng_state()
    a, b = rm.LegacyMatcher(64), rm.LegacyMatcher(64)
    assert torch.equal(state, torch.get_rng_state())
    assert a.projection_sha256 != b.projection_sha256
    bound = 1 / np.sqrt(64)                                     # nn.Linear default init bound
    w = a.projection.weight.detach().numpy()
    assert w.shape == (512, 64) and np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
    assert np.abs(a.projection.bias.detach().numpy()).max() <= bound
    v = a.embed(np.random.default_rng(0).random((3, 64)))
    assert v.shape == (3, 512) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_legacy_projection_differs_between_processes():
    code = "from deer_pipeline.evaluation.methods import LegacyMatcher; print(LegacyMatcher(32).projection_sha256)"
    out = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          timeout=120).stdout.strip() for _ in range(2)]
    assert len(out[0]) == 64 and out[0] != out[1]


def test_method_registry_has_every_method():
    names = set(rm.ALL_METHODS)
    assert {"v1_resnet50", "multiscale", "efficientnet_b0", "v3_ensemble", "default", "legacy",
            "local_verified", "fused", "fused_pooled"} <= names
    assert rm.method_registry()["fused_pooled"].verified and not rm.method_registry()["v3_ensemble"].verified
    assert rm.method_registry()["legacy"].fixed_threshold == 0.60
    with pytest.raises(ValueError, match="unknown method"):
        rm.resolve_methods(["nope"])
    assert [m.name for m in rm.resolve_methods(["legacy,default"])] == ["legacy", "default"]


# --------------------------------------------------------------------------------------------
# Isolated database
# --------------------------------------------------------------------------------------------

def test_isolated_database_is_migrated_and_dropped(session_engine):
    with eval_isolated.isolated_database(prefix="deer_evaltest") as engine:
        with engine.connect() as conn:
            name = conn.execute(sa.text("SELECT current_database()")).scalar_one()
            assert name.startswith("deer_evaltest_")
            assert conn.execute(sa.text("SELECT count(*) FROM deer")).scalar_one() == 0
            assert conn.execute(sa.text("SELECT max(version) FROM schema_migrations")).scalar_one() >= 3
    with session_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM pg_database WHERE datname = :n"),
                            {"n": name}).scalar_one() == 0


# --------------------------------------------------------------------------------------------
# End to end on real labelled photos
# --------------------------------------------------------------------------------------------

def _nyala_subset(nyala_dir: Path, tmp_path: Path, n_individuals: int = 10) -> Path:
    with open(nyala_dir / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_id: dict[str, list] = {}
    for r in rows:
        by_id.setdefault(r["identity"], []).append(r)
    chosen = [i for i in sorted(by_id) if len({r["encounter_id"] for r in by_id[i]}) >= 2][:n_individuals]
    out = tmp_path / "labels.csv"
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image_path", "identity", "encounter_id", "side"])
        w.writeheader()
        for i in chosen:
            for r in by_id[i][:4]:
                w.writerow({k: r[k] for k in ("image_path", "identity", "encounter_id", "side")})
    return out


def test_evaluate_command_on_real_photos_writes_a_valid_report(nyala_dir, tmp_path, session_engine, capsys):
    from deer_pipeline.evaluation import cli as evaluation_cli

    labels = _nyala_subset(nyala_dir, tmp_path)
    out = tmp_path / "report.json"
    assignments = tmp_path / "assignments.csv"
    rc = evaluation_cli.main(["--labels", str(labels), "--images-root", str(nyala_dir),
                              "--split-by-identity", "3", "--out", str(out), "--batch-size", "16",
                              "--assignments", str(assignments)])
    assert rc == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["default_method"] == "default"
    # the trained model and the downloadable backbones are skipped, with the reason, when absent
    assert set(report["skipped_methods"]) == {"trained", "miewid", "megadescriptor", "dinov2"}
    assert set(report["methods"]) == set(rm.ALL_METHODS) - set(report["skipped_methods"])
    for name, e in report["methods"].items():
        assert name in printed
        assert set(e["closed_set"]) >= {"top1", "top5", "mAP"}
        assert set(e["open_set"]) >= {"pairwise_precision", "pairwise_recall", "pairwise_f1", "ari",
                                      "n_pred", "n_true", "baks", "baus", "cross_encounter_precision",
                                      "cross_encounter_recall", "cross_encounter_f1", "baks_baus_gmean"}
        assert "assignments" not in e
        assert 0 <= e["closed_set"]["top1"] <= e["closed_set"]["top5"] <= 1
        assert e["open_set"]["n_true"] == 5 and 1 <= e["open_set"]["n_pred"] <= 20
        assert isinstance(e["threshold"], float) and e["threshold_source"]
        if name != "legacy":
            assert "calibration" in e["threshold_source"]
            assert e["replay_agreement_ari"] == pytest.approx(1.0)   # in-memory replay == pipeline run
    assert report["methods"]["legacy"]["threshold"] == 0.60
    assert "count_operating_point" not in report["methods"]["legacy"]
    rd = report["methods"]["legacy"]["redraws"]
    assert rd["n"] == 10 and rd["pairwise_f1"]["min"] <= rd["pairwise_f1"]["max"]
    for name in ("default", "v3_ensemble", "animal_weighted", "centre_weighted"):
        cop = report["methods"][name]["count_operating_point"]
        assert cop["open_set"]["n_true"] == 5 and "calibration" in cop["threshold_source"]
    assert report["methods"]["default"]["as_configured"]["threshold"] == 0.60
    assert "default@count" in printed and "default@configured" in printed
    # the ablation: local verification, calibrated fusion (threshold in probability units), pooling
    fused = report["methods"]["fused"]
    art = fused["calibration_artefact"]
    assert art["version"].startswith("cal1-") and set(art["curves"]) == {"global_cosine", "local_inliers"}
    assert art["reliability_calibration"] and art["reliability_evaluated"]
    assert 0.0 <= fused["threshold"] <= 1.0 and "probability" in fused["threshold_source"]
    assert report["methods"]["fused_pooled"]["encounter_pooling"] == "top2"
    lv = report["local_verification"]
    assert lv["pairs_verified"] > 0 and lv["crops_computed"] == 40
    v = report["verdict"]
    assert v["compared"] and v["threshold"] == report["methods"]["default"]["threshold"]
    assert v["default_f1"] == report["methods"]["default"]["open_set"]["cross_encounter_f1"]
    assert "cross-encounter F1" in printed
    # the assignments file: one row per evaluated photo and method, enough to recompute the metrics
    with open(assignments, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert report["assignments_file"] == str(assignments)
    assert {"method", "image_path", "identity", "encounter_id", "predicted_deer", "score",
            "decided_against"} <= set(rows[0])
    assert len(rows) == 20 * len(report["methods"])
    for name, e in report["methods"].items():
        mine = [r for r in rows if r["method"] == name]
        x = metrics.cross_encounter_prf([r["identity"] for r in mine], [r["predicted_deer"] for r in mine],
                                        [r["encounter_id"] for r in mine])
        assert x.f1 == pytest.approx(e["open_set"]["cross_encounter_f1"])
        assert len({r["predicted_deer"] for r in mine}) == e["open_set"]["n_pred"]
        joined = [r for r in mine if r["decision"] == "matched"]
        assert all(r["decided_against"] == r["predicted_deer"] for r in joined)
    # legacy and the feature method came from the pipeline's own forward pass (a hook), not a second pass
    assert report["embedding"]["feature_source"]["separate_pass"] == []
    assert report["methods"]["default"]["weights"] == {"multiscale": 0.6, "efficientnet_b0": 0.4}
    ds = report["dataset"]
    assert ds["evaluation"]["individuals"] == 5 and ds["calibration"]["individuals"] == 5
    assert ds["evaluation"]["evaluated_photos"] == ds["evaluation"]["photos"] == 20
    assert "substitutes" in " ".join(report["methods"]["v1_resnet50"]["backbone"]) or report["substitution_note"] is None
    html = out.with_suffix(".html").read_text()
    assert "data:image/png;base64," in html and "legacy" in html
    # the temporary database is gone
    with session_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM pg_database WHERE datname LIKE 'deer_eval_%'")).scalar_one() == 0


def test_feature_hook_keeps_the_whole_crop_rows_of_a_pass_with_crop_zooms(tmp_path):
    """The legacy method reads the pipeline's own backbone pass through a hook; when that pass
    also embeds centred zooms of every crop, the hook keeps each crop's whole-crop row only, so
    legacy gets exactly what a separate pass over the whole crops gives."""
    from PIL import Image

    from deer_pipeline.embedding import networks
    from deer_pipeline.embedding.inference import CropItem, InferenceEngine

    rng = np.random.default_rng(3)
    items = []
    for i in range(5):
        p = tmp_path / f"c{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (90 + 9 * i, 130, 3), dtype=np.uint8)).save(p)
        items.append(CropItem(f"d{i}", str(p)))
    eng = InferenceEngine(["efficientnet_b0"], device="cpu", batch_size=6, num_workers=0, zooms=(0.9, 1.0, 0.8))
    eng.load()
    spec = eng.specs["efficientnet_b0"]
    net = networks.load_backbone(spec.weights, spec.pooling, eng.device, eng.channels_last)
    hooked = rm.backbone_sinks([], "resnet50")[0]
    assert (hooked.rw.backbone, hooked.rw.sha256) == (spec.weights.backbone, spec.weights.sha256)
    handle = hooked.hook_on(net, eng.zooms)
    try:
        res = eng.embed(items, quiet=True)
    finally:
        handle.remove()
    assert hooked.rows == len(res.detection_ids) == 5          # 15 rows went through, 5 kept
    separate = rm.backbone_sinks([], "resnet50")[0]
    ids, failures = rm.run_sinks(items, [separate])
    assert ids == res.detection_ids and not failures
    np.testing.assert_allclose(np.concatenate(hooked.legacy_parts), np.concatenate(separate.legacy_parts),
                               rtol=1e-3, atol=1e-4)
