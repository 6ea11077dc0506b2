"""The coarse first pass of candidate search: ranking deer with bfloat16 products.

Scoring a chunk of encounters against every gallery row (``exact``) or every deer profile
(``two_stage``) is one matrix product, the largest cost of a decision. On CPUs with bfloat16
matrix units (Intel AMX-BF16 / AVX512-BF16) oneDNN computes it from bfloat16-rounded inputs with
float32 accumulation several times faster than float32 (``bench/matching.py`` measures it). That
pass only RANKS deer and picks each candidate's best rows; every score that is stored or compared
with the threshold is still computed in float64 from the two vectors (``Gallery.rescore_rows``).

Error bound. Rounding a value to bfloat16 (8 significant bits, round to nearest) changes it by at
most a factor 2^-8, so each product q_i g_i by at most 2^-7 |q_i g_i| and a dot product by at
most 2^-7 sum |q_i g_i| <= 2^-7 |q| |g| (Cauchy-Schwarz). With unit vectors per model and the
ensemble weights folded into the query, a coarse score is within ``error_bound(weights)`` =
2^-7 sum(w) (+ float32 accumulation) of the exact one. ``candidates._ChunkPlan`` uses the bound to
(a) re-score exactly every row of a candidate deer that could be its best row and (b) hand an
encounter back to float32 scoring when a deer outside its list could reach the threshold or the
best candidate's score - so decisions are those of float32 search.

Plain logic; no Dagster.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Mapping

import numpy as np

from deer_pipeline import settings as S

PRECISIONS = ("auto", "float32", "bfloat16")


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Does this CPU multiply bfloat16 matrices in hardware (AMX-BF16 or AVX512-BF16), and does
    torch (the embedding dependency) import? Without either, the coarse pass stays float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    if "amx_bf16" not in flags and "avx512_bf16" not in flags:
        return False
    try:
        import torch  # noqa: F401
    except Exception:                     # noqa: BLE001 - any import failure means: no bf16 pass
        return False
    return True


def resolve(precision: str, gallery_rows: int) -> str:
    """The precision of the coarse pass for a gallery of this many rows: ``auto`` = bfloat16
    where the CPU has bfloat16 matrix units and the gallery has at least
    ``settings.COARSE_BF16_MIN_ROWS`` rows (below that the product is small and float32 costs
    little), else float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"coarse precision must be one of {PRECISIONS}, not {precision!r}")
    if precision == "auto":
        return "bfloat16" if gallery_rows >= S.COARSE_BF16_MIN_ROWS and cpu_has_bf16() else "float32"
    if precision == "bfloat16" and not cpu_has_bf16():
        return "float32"
    return precision


def error_bound(weights: Mapping[str, float] | np.ndarray) -> float:
    """Largest difference between a bfloat16-input score and the exact one (unit vectors)."""
    w = np.abs(np.asarray(list(weights.values()) if isinstance(weights, Mapping) else weights, np.float64))
    return float(2.0 ** -7 * w.sum() * 1.01 + 1e-5)


@contextlib.contextmanager
def _bf16_matmul():
    import torch

    mk = torch.backends.mkldnn.matmul
    before = mk.fp32_precision
    mk.fp32_precision = "bf16"
    try:
        yield torch
    finally:
        mk.fp32_precision = before


def scores(a: np.ndarray, b: np.ndarray, precision: str) -> np.ndarray:
    """``a @ b.T`` (float32 in and out); ``bfloat16``: products of bfloat16-rounded inputs
    accumulated in float32 (one thread, like the rest of a decision)."""
    if precision != "bfloat16" or not len(a) or not len(b):
        return a @ b.T
    with _bf16_matmul() as torch:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return (torch.from_numpy(np.ascontiguousarray(a)) @ torch.from_numpy(b).T).numpy()
        finally:
            torch.set_num_threads(threads)
