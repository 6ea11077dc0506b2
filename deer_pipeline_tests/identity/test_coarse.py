"""The bfloat16 first pass: its scores stay within the stated error bound of the exact ones, and
``auto`` picks it only for large galleries on CPUs with bfloat16 units."""

from __future__ import annotations

import numpy as np
import pytest

from deer_pipeline import settings as S
from deer_pipeline.identity import coarse


def _unit(a):
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)


def test_bfloat16_scores_stay_within_the_error_bound(monkeypatch):
    monkeypatch.setattr(coarse, "cpu_has_bf16", lambda: True)
    rng = np.random.default_rng(3)
    w = np.array([0.6, 0.4])
    q = [_unit(rng.standard_normal((40, 512))) for _ in w]
    g = [_unit(rng.standard_normal((3000, 512))) for _ in w]
    g[0][:40] = _unit(q[0] + 0.3 * rng.standard_normal((40, 512)) / np.sqrt(512))   # some close pairs
    folded = np.hstack([qm * np.float32(wm) for qm, wm in zip(q, w)])
    G = np.hstack(g)
    exact = folded.astype(np.float64) @ G.astype(np.float64).T
    got = coarse.scores(folded, G, "bfloat16")
    assert got.dtype == np.float32 and got.shape == exact.shape
    err = np.abs(got - exact).max()
    assert err <= coarse.error_bound(w)
    assert coarse.error_bound(w) == pytest.approx(2 ** -7 * 1.01 + 1e-5)
    assert np.array_equal(coarse.scores(folded, G, "float32"), folded @ G.T)


def test_auto_takes_bfloat16_only_for_large_galleries_on_cpus_that_have_it(monkeypatch):
    monkeypatch.setattr(coarse, "cpu_has_bf16", lambda: True)
    assert coarse.resolve("auto", S.COARSE_BF16_MIN_ROWS) == "bfloat16"
    assert coarse.resolve("auto", S.COARSE_BF16_MIN_ROWS - 1) == "float32"
    assert coarse.resolve("float32", 10**6) == "float32"
    monkeypatch.setattr(coarse, "cpu_has_bf16", lambda: False)
    assert coarse.resolve("auto", 10**6) == "float32"
    assert coarse.resolve("bfloat16", 10**6) == "float32"         # asked for, not there: float32
    with pytest.raises(ValueError):
        coarse.resolve("float16", 10)


def test_the_setting_is_checked():
    from deer_pipeline.settings import MatchingSettings, SettingsError

    assert MatchingSettings().coarse_precision == "auto"
    with pytest.raises(SettingsError, match="coarse_precision"):
        MatchingSettings(coarse_precision="float16")
