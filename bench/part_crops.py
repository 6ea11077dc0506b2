"""Research script: part crops (the front and the rear of the animal embedded on their own, as
part-based person re-identification splits a body into stripes) added to the whole crop's
similarity, judged on one half of nyala-dev split by identity (seed 0) with the metrics of
``bench/crop_zooms.py``.

    .venv/bin/python bench/part_crops.py --half 0 --model /tmp/encm     # choose (calibration half)

Decisions compare a flank with the same flank only (``settings.FLANK_AWARE``), and a flank photo
shows the head at the same side of the frame, so the left and right parts of two photos of one
flank show the same body parts. Parts: the left and the right ``--part`` fraction of the crop's
width (full height; 0.6 by default: they overlap in the middle), each embedded with the crop
zooms like the whole crop. Scores: the whole crop's cosine alone, the mean of the whole crop's and
the two parts' cosines, and the parts alone. Pairs of photos of different flanks are scored as
they come (the closed-set figures use every other-encounter photo, as ``crop_zooms.py`` does);
``--same-flank`` restricts the pair figures to same-flank pairs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
from crop_zooms import ImageNetHead, load_half, report  # noqa: E402
from foreground_masks import embed  # noqa: E402

from deer_pipeline.embedding import trained_model  # noqa: E402


def parts(images, frac: float):
    left = [im.crop((0, 0, round(frac * im.width), im.height)) for im in images]
    right = [im.crop((im.width - round(frac * im.width), 0, im.width, im.height)) for im in images]
    return left, right


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--half", type=int, default=0, choices=(0, 1))
    ap.add_argument("--model", help="a trained model directory (deer-pipeline train --out)")
    ap.add_argument("--part", type=float, default=0.6)
    ap.add_argument("--same-flank", action="store_true", help="pair figures over same-flank pairs only")
    args = ap.parse_args()
    torch.set_num_threads(2)
    ts, ids, enc = load_half(args.half)
    side = np.array([p.side or "" for p in ts.photos])
    nets = {"imagenet": ImageNetHead()}
    if args.model:
        nets["trained"] = trained_model.load_model(args.model)[0].eval()
    whole = embed(ts.images, nets)
    left_imgs, right_imgs = parts(ts.images, args.part)
    left, right = embed(left_imgs, nets), embed(right_imgs, nets)
    other_flank = side[:, None] != side[None, :]
    for name in nets:
        Sw = whole[name] @ whole[name].T
        Sl, Sr = left[name] @ left[name].T, right[name] @ right[name].T
        for label, S in (("whole", Sw), ("whole + parts (mean of 3)", (Sw + Sl + Sr) / 3),
                         ("parts only (mean of 2)", (Sl + Sr) / 2), ("left part", Sl), ("right part", Sr)):
            if args.same_flank:
                S = np.where(other_flank, -np.inf, S)
            report(f"{name} {label}", S, ids, enc)


if __name__ == "__main__":
    main()
