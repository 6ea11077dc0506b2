"""Research script: how an encounter's two flank photos should be pooled against another
encounter's, judged on one half of nyala-dev split by identity (seed 0). Every nyala-dev
encounter has one left and one right flank photo; the pipeline scores an encounter against a deer
by its best same-flank pair (``settings.ENCOUNTER_POOLING = "max"``, flank-aware). Would asking
both flanks to agree (their mean, or the weaker of the two) reject more wrong animals?

    .venv/bin/python bench/flank_pooling.py --half 0 --model /tmp/encm

Over every pair of encounters (both flanks present), the same animal or not: average precision
of ranking same-animal pairs first, the best F1 over thresholds and its precision, and the
precision of the 50 best pairs; vectors with the crop zooms (1, 0.9, 0.8), ImageNet Lite0 and,
with ``--model``, a trained model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
from crop_zooms import ImageNetHead, load_half, ranking_figures  # noqa: E402
from foreground_masks import embed  # noqa: E402

from deer_pipeline.embedding import trained_model  # noqa: E402


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--half", type=int, default=0, choices=(0, 1))
    ap.add_argument("--model", help="a trained model directory (deer-pipeline train --out)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    ts, _, _ = load_half(args.half)
    nets = {"imagenet": ImageNetHead()}
    if args.model:
        nets["trained"] = trained_model.load_model(args.model)[0].eval()
    vectors = embed(ts.images, nets)
    row = {}                                        # (encounter, side) -> photo
    for i, p in enumerate(ts.photos):
        row[(p.encounter, p.side)] = i
    encs = sorted({p.encounter for p in ts.photos if (p.encounter, "left") in row and (p.encounter, "right") in row})
    ident = {p.encounter: p.identity for p in ts.photos}
    L = np.array([row[(e, "left")] for e in encs])
    R = np.array([row[(e, "right")] for e in encs])
    iu = np.triu_indices(len(encs), 1)
    same = np.array([ident[encs[a]] == ident[encs[b]] for a, b in zip(*iu)])
    print(f"half {args.half}: {len(encs)} encounters with both flanks, {len(same)} pairs, {int(same.sum())} the same animal")
    for name, V in vectors.items():
        S = V @ V.T
        LL, RR = S[np.ix_(L, L)], S[np.ix_(R, R)]
        LR, RL = S[np.ix_(L, R)], S[np.ix_(R, L)]
        for label, M in (("best same-flank pair (pipeline)", np.maximum(LL, RR)), ("mean of left-left and right-right", (LL + RR) / 2),
                         ("weaker of the two flanks", np.minimum(LL, RR)), ("left flanks only", LL),
                         ("best of all four pairs (flank-blind)", np.maximum(np.maximum(LL, RR), np.maximum(LR, RL))),
                         ("mean of all four pairs", (LL + RR + LR + RL) / 4)):
            print(f"  {name:8s} {label:38s} {ranking_figures(M[iu], same, at=50)}", flush=True)


if __name__ == "__main__":
    main()
