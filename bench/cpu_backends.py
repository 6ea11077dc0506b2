"""CPU inference backends side by side: crops/s of the configured ensemble's backbone pass and
projections, per backend, interleaved in rounds so that a shared, noisy machine affects every
backend alike; ratios are against eager PyTorch (channels-last, the engine's default) in the
same run, and each backend's vectors are compared with the eager ones (min cosine).

    python bench/cpu_backends.py [--batch 32] [--rounds 5] [--threads 2]

Backends: eager (fp32, channels-last), eager-nchw, bf16 (torch.autocast on the CPU; AVX-512 /
AMX bf16 where the CPU has it), onnxruntime (the pipeline's ``embedding/backends.py``). The last
line: ``crops/s eager: A; onnxruntime: B (xR, min cosine C); bf16: D (xS, min cosine E)``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import os

    os.environ.setdefault("DEER_DATA_DIR", tempfile.mkdtemp(prefix="deer-bench-"))
    import numpy as np
    import torch

    from deer_pipeline.embedding import config as embedding_config
    from deer_pipeline.embedding import networks
    from deer_pipeline.settings import EmbeddingSettings

    torch.set_num_threads(args.threads)
    specs = embedding_config.specs(EmbeddingSettings(backend="eager"))
    spec = next(iter(specs.values()))
    x = torch.randint(0, 256, (args.batch, 3, 224, 224), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    cl = networks.load_backbone(spec.weights, spec.pooling, "cpu", True, "eager")
    nchw = copy.deepcopy(networks.load_backbone(spec.weights, spec.pooling, "cpu", False, "eager"))
    t0 = time.perf_counter()
    ort = networks.load_backbone(spec.weights, spec.pooling, "cpu", False, "onnxruntime")
    print(f"onnxruntime: export + session {time.perf_counter() - t0:.1f}s (once per backbone, cached)")

    def project(pooled):
        return {m: networks.project(s, pooled).float().numpy() for m, s in specs.items()}

    def run_eager():
        with torch.inference_mode():
            return project(cl(x))

    def run_nchw():
        with torch.inference_mode():
            return project(nchw(x))

    def run_bf16():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return project(cl(x))

    def run_ort():
        with torch.inference_mode():
            return project(ort(x))

    runs = {"eager": run_eager, "eager-nchw": run_nchw, "bf16": run_bf16, "onnxruntime": run_ort}
    for f in runs.values():       # warm-up
        f()
    times = {k: [] for k in runs}
    outs = {}
    for _ in range(args.rounds):
        for k, f in runs.items():
            t = time.perf_counter()
            outs[k] = f()
            times[k].append(time.perf_counter() - t)
    rate = {k: args.batch / statistics.median(v) for k, v in times.items()}
    cos = {k: min(float(np.min(np.sum(outs[k][m] * outs["eager"][m], axis=1))) for m in specs) for k in runs}
    print(f"models {sorted(specs)}; backbone {spec.backbone}; batch {args.batch}; threads {args.threads}; "
          f"rounds {args.rounds}; torch {torch.__version__}")
    print("| backend | crops/s | x eager | min cosine to eager |")
    print("|---|---|---|---|")
    for k in runs:
        print(f"| {k} | {rate[k]:.1f} | {rate[k] / rate['eager']:.2f} | {cos[k]:.6f} |")
    print(f"crops/s eager: {rate['eager']:.1f}; onnxruntime: {rate['onnxruntime']:.1f} "
          f"(x{rate['onnxruntime'] / rate['eager']:.2f}, min cosine {cos['onnxruntime']:.6f}); "
          f"bf16: {rate['bf16']:.1f} (x{rate['bf16'] / rate['eager']:.2f}, min cosine {cos['bf16']:.6f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
