"""Research script: does removing the background (GrabCut, OpenCV, no weights) or normalising the
photometry (grey scale, CLAHE) make features describe the animal rather than the scene? Judged on
one half of nyala-dev split by identity (seed 0), with the metrics of ``bench/crop_zooms.py``.

    .venv/bin/python bench/foreground_masks.py --half 0 --model /tmp/encm     # choose (calibration half)
    .venv/bin/python bench/foreground_masks.py --half 1 --model /tmp/encm     # report once (evaluated half)

Why: an encounter's photos share their place and light, so a network that separates encounters
(or ImageNet features, which describe scenes) can rely on the background. GrabCut is initialised
with the crop less a margin as "probably animal" and the margin as background (a detector's box
holds the animal up to its edges; nyala-dev's whole-frame photos hold it in the middle); the
mask is computed on the crop brought to ``--mask-side`` px (GrabCut's cost grows with pixels)
and scaled back. Variants, each embedded with the pipeline's crop zooms (1, 0.9, 0.8):

- ``plain``: the crop as the pipeline embeds it;
- ``masked grey``: pixels outside the mask set to the ImageNet mean colour;
- ``masked blur``: pixels outside the mask replaced by a strong blur of the crop (keeps the
  colour statistics, removes the texture);
- ``background only`` (a control): the animal greyed out instead (the mask grown by 3 % of the
  crop's side), to measure how much the place alone tells;
- ``grey``: the crop in grey scale (three equal channels);
- ``clahe``: contrast-limited histogram equalisation of the lightness (Lab L channel).

Masks are cached in ``--cache`` (npz of the booleans per photo, keyed by its path; ``--unseeded``: the
first masks measured, GrabCut from the rectangle alone, in their own cache file).
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
from crop_zooms import ImageNetHead, load_half, report, unit, zoom_vectors  # noqa: E402

from deer_pipeline.embedding import trained_model  # noqa: E402

ZOOMS = (1.0, 0.9, 0.8)
IMAGENET_MEAN = (124, 116, 104)


def grabcut_mask(rgb: np.ndarray, side: int = 160, margin: float = 0.04, iters: int = 5,
                 seed: float = 0.12) -> np.ndarray:
    """Boolean animal mask of an RGB crop (H x W x 3 uint8) by GrabCut: the margin is background,
    the rest probably animal, and (``seed`` > 0) a central ellipse of semi-axes ``seed`` x the
    crop's sides surely animal (without it GrabCut gives everything to the background for about a
    third of nyala-dev's photos)."""
    import cv2

    cv2.setNumThreads(1)
    h, w = rgb.shape[:2]
    s = min(1.0, side / max(h, w))
    small = cv2.resize(rgb, (max(8, round(w * s)), max(8, round(h * s))), interpolation=cv2.INTER_AREA)
    sh, sw = small.shape[:2]
    mx, my = max(1, round(margin * sw)), max(1, round(margin * sh))
    mask = np.full((sh, sw), cv2.GC_BGD, np.uint8)
    mask[my:sh - my, mx:sw - mx] = cv2.GC_PR_FGD
    if seed:     # the middle of the crop is the animal: a small central ellipse as sure foreground
        yy, xx = np.ogrid[:sh, :sw]
        mask[((yy - sh / 2) / (seed * sh)) ** 2 + ((xx - sw / 2) / (seed * sw)) ** 2 <= 1] = cv2.GC_FGD
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(cv2.cvtColor(small, cv2.COLOR_RGB2BGR), mask, None, bgd, fgd, iters, cv2.GC_INIT_WITH_MASK)
    except cv2.error:
        return np.ones((h, w), bool)
    m = ((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)).astype(np.uint8)
    if m.mean() < 0.05:                   # GrabCut lost the animal: keep the whole crop
        return np.ones((h, w), bool)
    return cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)


def _mask_job(job):
    from PIL import Image

    path, seed = job
    with Image.open(path) as im:
        return grabcut_mask(np.asarray(im.convert("RGB")), seed=seed)


def masks_for(photos, images, cache: Path, seed: float = 0.12) -> list[np.ndarray]:
    """One mask per photo (cached by the photo's path; one cache file per ``seed``)."""
    got = dict(np.load(cache, allow_pickle=True)) if cache.exists() else {}
    keys = [str(p.image_path) for p in photos]
    todo = [i for i, k in enumerate(keys) if k not in got]
    if todo:
        t = time.perf_counter()
        with ProcessPoolExecutor(2) as ex:
            for i, m in zip(todo, ex.map(_mask_job, [(photos[i].image_path, seed) for i in todo], chunksize=8)):
                got[keys[i]] = m
        print(f"  {len(todo)} GrabCut masks in {time.perf_counter() - t:.0f} s "
              f"({(time.perf_counter() - t) / len(todo) * 2:.2f} s per photo per core)", file=sys.stderr, flush=True)
        np.savez_compressed(cache, **got)
    out = [got[k] for k in keys]
    for m, im in zip(out, images):
        assert m.shape == (im.height, im.width), "photos with boxes are not handled by this script"
    return out


def variant_images(images, masks, name: str):
    import cv2
    from PIL import Image

    out = []
    for im, m in zip(images, masks if masks is not None else [None] * len(images)):   # masks: only masked variants
        a = np.asarray(im.convert("RGB"))
        if name == "plain":
            b = a
        elif name == "masked grey":
            b = np.where(m[:, :, None], a, np.array(IMAGENET_MEAN, np.uint8))
        elif name == "masked blur":
            b = np.where(m[:, :, None], a, cv2.GaussianBlur(a, (0, 0), sigmaX=max(a.shape[:2]) / 20))
        elif name == "background only":   # the control: the animal (mask grown by 3 %) greyed out
            grown = cv2.dilate(m.astype(np.uint8), np.ones((3, 3), np.uint8),
                               iterations=max(1, round(0.03 * max(m.shape)))).astype(bool)
            b = np.where(grown[:, :, None], np.array(IMAGENET_MEAN, np.uint8), a)
        elif name == "grey":
            b = np.repeat(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)[:, :, None], 3, axis=2)
        elif name == "clahe":
            lab = cv2.cvtColor(a, cv2.COLOR_RGB2LAB)
            lab[:, :, 0] = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(lab[:, :, 0])
            b = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
        else:
            raise ValueError(name)
        out.append(Image.fromarray(np.ascontiguousarray(b)))
    return out


def embed(images, nets: dict) -> dict[str, np.ndarray]:
    """Each net's zoom-averaged unit vectors of the images (each zoom's vectors unit first)."""
    return {name: unit(sum(unit(v) for v in zoom_vectors(net, images, ZOOMS, batch=32).values()))
            for name, net in nets.items()}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--half", type=int, default=0, choices=(0, 1))
    ap.add_argument("--model", help="a trained model directory (deer-pipeline train --out)")
    ap.add_argument("--variants", nargs="*", default=["plain", "masked grey", "masked blur", "grey", "clahe"])
    ap.add_argument("--cache", help="mask cache file (default /tmp/grabcut_seeded.npz, with --unseeded "
                                    "/tmp/grabcut_masks.npz)")
    ap.add_argument("--unseeded", action="store_true",
                    help="GrabCut from the rectangle alone, no central seed (the first masks measured)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ts, ids, enc = load_half(args.half)
    cache = args.cache or ("/tmp/grabcut_masks.npz" if args.unseeded else "/tmp/grabcut_seeded.npz")
    masks = (masks_for(ts.photos, ts.images, Path(cache), 0.0 if args.unseeded else 0.12)
             if any("masked" in v or "background" in v for v in args.variants) else None)
    if masks is not None:
        frac = np.array([m.mean() for m in masks])
        print(f"  mask covers {np.median(frac):.2f} of the photo (median; 10-90 %: "
              f"{np.quantile(frac, 0.1):.2f}-{np.quantile(frac, 0.9):.2f}); whole photo kept for "
              f"{int((frac == 1).sum())}", flush=True)
    nets = {"imagenet": ImageNetHead()}
    if args.model:
        nets["trained"] = trained_model.load_model(args.model)[0].eval()
    for v in args.variants:
        t = time.perf_counter()
        feats = embed(variant_images(ts.images, masks, v), nets)
        for name, V in feats.items():
            report(f"{name} {v}", V @ V.T, ids, enc)
        print(f"  ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
