"""Research script: how the untrained ImageNet Lite0 head's 7x7 map is pooled, and the input
size, judged by closed-set top-1 across encounters on one half of nyala-dev split by identity
(seed 0). No training is involved, so the calibration half (half 0) is a fair place to choose;
the evaluated half (1) is for reporting once.

    .venv/bin/python bench/pooling_variants.py --half 0 --sizes 224 256 288 320 352 384 448

Pooling: average (what the pipeline does), GeM (p 3), max, a centred Gaussian weight on the map
(sigma in map coordinates [-1, 1]; a prior that the animal is in the middle of its crop), and
feature-norm ("saliency") weighting. Prints one line per input size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from deer_pipeline.embedding import trained_model, training  # noqa: E402
from deer_pipeline.evaluation.labels import read_labels, split_by_identity  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "nyala-dev"


def head_maps(net, images, size: int):
    import torch

    m, outs = net.body, []
    with torch.inference_mode():
        for s in range(0, len(images), 32):
            f = net.frozen(torch.stack([training.to_tensor_u8(im, size) for im in images[s:s + 32]]))
            for block in m._blocks[net.frozen_blocks:]:
                f = block(f, drop_connect_rate=None)
            outs.append(m._swish(m._bn1(m._conv_head(f))))
    return torch.cat(outs)


def pooled(H) -> dict:
    import torch

    _, _, h, w = H.shape
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    out = {"avg": H.mean((2, 3)), "max": H.amax((2, 3)),
           "gem3": H.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3)}
    for sigma in (0.3, 0.4, 0.5, 0.6, 0.8):
        g = torch.exp(-(xx ** 2 + yy ** 2) / (2 * sigma ** 2))
        out[f"gauss{sigma}"] = (H * g).sum((2, 3)) / g.sum()
    sal = H.norm(dim=1, keepdim=True)
    out["saliency"] = (H * sal / sal.sum((2, 3), keepdim=True)).sum((2, 3))
    return out


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--half", type=int, default=0, choices=(0, 1), help="0: calibration half, 1: evaluated half")
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 320])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    photos = split_by_identity(read_labels(DATA / "labels.csv", DATA), 0)[args.half]
    ts = training.prepare_training_set(photos)
    ids, enc = [p.identity for p in ts.photos], [p.encounter for p in ts.photos]
    net = trained_model.build_embedder(512, 11, body=trained_model.lite0_module()).eval()
    print(f"half {args.half}: {len(ts.photos)} photos of {len(set(ids))} individuals", flush=True)
    for size in args.sizes:
        res = {}
        for name, v in pooled(head_maps(net, ts.images, size)).items():
            v = v.numpy().astype(np.float64)
            res[name] = round(training.closed_set_top1(v / np.linalg.norm(v, axis=1, keepdims=True), ids, enc), 4)
        print(json.dumps({"input": size, "top1": res}), flush=True)


if __name__ == "__main__":
    main()
