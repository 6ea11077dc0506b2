import itertools

import pytest

from deer_pipeline.identity import metrics


def brute_force_prf(true, pred):
    tp = fp = fn = 0
    for i, j in itertools.combinations(range(len(true)), 2):
        same_t, same_p = true[i] == true[j], pred[i] == pred[j]
        tp += same_t and same_p
        fp += same_p and not same_t
        fn += same_t and not same_p
    return tp, fp, fn


def test_pairwise_prf_hand_computed():
    # truth: A A A B B ; prediction: 1 1 2 2 2
    # true pairs: AA x3, BB x1 = 4; predicted pairs: (0,1), (2,3), (2,4), (3,4) = 4
    # tp = (0,1) and (3,4) = 2 -> precision 2/4, recall 2/4, f1 0.5
    m = metrics.pairwise_prf(["A", "A", "A", "B", "B"], [1, 1, 2, 2, 2])
    assert (m.tp, m.fp, m.fn) == (2, 2, 2)
    assert m.precision == m.recall == m.f1 == pytest.approx(0.5)


def test_pairwise_prf_agrees_with_pair_enumeration():
    import random

    rnd = random.Random(0)
    for _ in range(20):
        n = rnd.randrange(1, 30)
        true = [rnd.randrange(5) for _ in range(n)]
        pred = [rnd.randrange(7) for _ in range(n)]
        m = metrics.pairwise_prf(true, pred)
        assert (m.tp, m.fp, m.fn) == brute_force_prf(true, pred)


def test_perfect_and_degenerate_groupings():
    assert metrics.pairwise_prf("aabb", "xxyy").f1 == 1.0
    singletons = metrics.pairwise_prf("aabb", "wxyz")
    assert singletons.precision == 0.0 and singletons.recall == 0.0 and singletons.fn == 2
    assert metrics.adjusted_rand_index("aabb", "xxyy") == pytest.approx(1.0)
    assert metrics.adjusted_rand_index("aabb", "xyxy") < 0.1


def test_threshold_sweep_hand_computed():
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    same = [True, True, False, True, False, False]
    rows = {r["threshold"]: r for r in metrics.threshold_sweep(scores, same, [0.65, 0.55, 0.95])}
    # t = 0.65: predicted {0.9, 0.8, 0.7}: tp 2, fp 1, fn 1 (0.6)
    r = rows[0.65]
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (2, 1, 1, 2)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    # t = 0.55: predicted {0.9 .. 0.6}: tp 3, fp 1 -> precision 0.75, recall 1
    assert rows[0.55]["precision"] == pytest.approx(0.75) and rows[0.55]["recall"] == 1.0
    assert rows[0.55]["f1"] == pytest.approx(2 * 0.75 / 1.75)
    # nothing predicted: zeros, not NaN
    assert rows[0.95]["predicted_same"] == 0 and rows[0.95]["precision"] == 0.0
    # a score equal to the threshold counts as predicted same
    assert metrics.threshold_sweep([0.6], [True], [0.6])[0]["tp"] == 1


def test_threshold_sweep_weights_count_pairs():
    a = metrics.threshold_sweep([0.9, 0.9, 0.2], [True, True, False], [0.5])
    b = metrics.threshold_sweep([0.9, 0.2], [True, False], [0.5], weights=[2, 1])
    assert a == b


def test_recommend_threshold_rules():
    sweep = metrics.threshold_sweep([0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
                                    [True, True, False, True, False, False],
                                    [0.45, 0.55, 0.65, 0.75, 0.85])
    best = metrics.recommend_threshold(sweep)
    assert best["threshold"] == 0.55 and best["rule"] == "highest F1"
    strict = metrics.recommend_threshold(sweep, min_precision=1.0)
    assert strict["threshold"] == 0.75 and strict["precision"] == 1.0
    impossible = metrics.recommend_threshold(
        metrics.threshold_sweep([0.9, 0.8], [False, True], [0.5]), min_precision=0.99)
    assert "no threshold reaches" in impossible["rule"]


def test_decision_sweep_counts_open_set_decisions():
    # sighting 1: best candidate right (0.8); 2: wrong (0.7), its deer was available;
    # 3: a new deer in truth, best wrong candidate at 0.3
    rows = {r["threshold"]: r for r in metrics.decision_sweep(
        [0.8, 0.7, 0.3], [True, False, False], [True, True, False], [0.5, 0.75])}
    assert (rows[0.5]["tp"], rows[0.5]["fp"], rows[0.5]["fn"]) == (1, 1, 1)
    assert (rows[0.75]["tp"], rows[0.75]["fp"], rows[0.75]["fn"]) == (1, 0, 1)
    assert rows[0.75]["precision"] == 1.0 and rows[0.75]["recall"] == 0.5


def test_score_summary_and_buckets():
    s = metrics.score_summary([0.1, 0.2, 0.3, 0.4, 0.5])
    assert s["count"] == 5 and s["min"] == 0.1 and s["max"] == 0.5 and s["q50"] == pytest.approx(0.3)
    b = metrics.bucket_counts([-0.2, 0.05, 0.15, 0.95, 1.0])
    counts = {r["bucket"]: r["count"] for r in b}
    assert counts["[-1, 0)"] == 1 and counts["[0, 0.1)"] == 1 and counts["[0.9, 1]"] == 2
    assert sum(counts.values()) == 5
    assert metrics.score_summary([]) == {"count": 0}
