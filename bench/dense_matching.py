"""Research script: dense matching of CNN feature maps as the local verification of issue 10.

RootSIFT on nyala-dev's small photos separates individuals no better than chance (docs/evaluation.md,
AUC ~0.5 among the global candidates). The issue also names dense matching: every cell of a
convolutional feature map is a local descriptor, so two photos can be matched cell to cell and the
correspondences checked for one geometric model, which global pooling cannot do (it forgets where
the stripes are). No downloaded weights: the cells come from the offline ImageNet EfficientNet-Lite0
(after block 11, 112 channels, stride 16; or after block 15, 320 channels, stride 32) or from a
model trained with ``deer-pipeline train`` (its last feature map, each cell projected by the
model's own head into the embedding space).

For each photo of one half of nyala-dev (split by identity, seed 0; 0 = calibration) the global
score (the trained model's crop-zoom vectors, or the ImageNet head) gives the ``--top-k`` best
candidates among photos of other encounters; each candidate pair is matched densely:

- mutual nearest neighbours between the two maps' unit cell descriptors (``mnn``: their count with
  cosine above ``--min-sim``);
- ``inliers``: of those, the ones consistent with one similarity transform (OpenCV
  ``estimateAffinePartial2D``, RANSAC, 1.5 cells);
- ``mnn_sum``: the sum of the mutual matches' cosines.

Printed: for each dense score, the AUC of same animal vs different animal among the candidate
pairs, and the closed-set and pair figures of ``crop_zooms.py`` when the candidate pairs are
re-ranked by the global score plus ``w`` x the dense score standardised on the candidate pairs
(other pairs keep the global score, shifted below every candidate's), for a few ``w``.

    .venv/bin/python bench/encounter_variants.py supcon /tmp/ev/supcon          # the global model
    .venv/bin/python bench/dense_matching.py --half 0 --model /tmp/ev/supcon    # choose (calibration)
    .venv/bin/python bench/dense_matching.py --half 0 --model /tmp/ev/supcon --variants s5@320 s7@320 \
        --demean --centre 0.7                       # what every photo shares removed; central cells only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
from crop_zooms import ImageNetHead, load_half, report, unit, zoom_vectors  # noqa: E402

from deer_pipeline.embedding import trained_model, training  # noqa: E402


def cell_maps(net, images, size: int, kind: str, batch: int = 32) -> np.ndarray:
    """(n, cells, channels) float32 unit cell descriptors of every image at ``size`` px."""
    import torch
    import torch.nn.functional as F

    out = []
    m = net.body
    for s in range(0, len(images), batch):
        x = torch.stack([training.to_tensor_u8(im, size) for im in images[s:s + batch]])
        with torch.inference_mode():
            h = net.frozen(x)                      # after block net.frozen_blocks (11: 112 ch, stride 16)
            if kind in ("s7", "head"):
                for block in m._blocks[net.frozen_blocks:]:
                    h = block(h, drop_connect_rate=None)
            if kind == "head":                     # the trained model's embedding space, per cell
                h = m._swish(m._bn1(m._conv_head(h)))
                h = torch.einsum("nchw,dc->ndhw", h.float(), net.proj.weight)
            h = F.normalize(h.float(), dim=1)
        out.append(h.flatten(2).transpose(1, 2).numpy())
    return np.concatenate(out).astype(np.float32)


def grid(cells: int) -> np.ndarray:
    side = int(round(np.sqrt(cells)))
    yy, xx = np.mgrid[0:side, 0:side]
    return np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float32)


def dense_scores(A: np.ndarray, B: np.ndarray, xy: np.ndarray, min_sim: float) -> tuple[int, int, float]:
    """(mutual matches above min_sim, of them inliers of one similarity transform, sum of the
    mutual matches' cosines) of two cell maps."""
    import cv2

    S = A @ B.T
    j = S.argmax(1)
    i = S.argmax(0)
    mutual = i[j] == np.arange(len(A))
    sims = S[np.arange(len(A)), j]
    keep = mutual & (sims > min_sim)
    n = int(keep.sum())
    total = float(sims[mutual].sum())
    if n < 3:
        return n, 0, total
    src, dst = xy[keep], xy[j[keep]]
    _, inl = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=1.5,
                                         maxIters=500, confidence=0.99)
    return n, int(inl.sum()) if inl is not None else 0, total


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Probability that a same-animal pair outscores a different-animal pair (ties count half)."""
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sv = allv[order]
    r = np.arange(1, len(allv) + 1, dtype=np.float64)
    # average ranks of ties
    uniq, start, counts = np.unique(sv, return_index=True, return_counts=True)
    avg = start + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    del r
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def main() -> None:
    import cv2
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--half", type=int, default=0, choices=(0, 1))
    ap.add_argument("--model", help="a trained model directory: its vectors rank the candidates and "
                                    "its last map is one of the dense variants")
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--min-sim", type=float, default=0.0)
    ap.add_argument("--variants", nargs="+", default=["s5@224", "s5@320", "s7@320", "head@224", "head@320"],
                    help="KIND@PX: s5 (ImageNet, after block 11), s7 (after block 15; the trained "
                         "model's blocks when --model), head (the trained model's projected head)")
    ap.add_argument("--centre", type=float, default=1.0,
                    help="keep only the cells in the central fraction of each side (the animal; 1: all)")
    ap.add_argument("--demean", action="store_true",
                    help="subtract the half's mean cell descriptor before normalising (what every "
                         "photo shares: habitat, generic hide texture)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)
    ts, ids, enc = load_half(args.half)
    n = len(ids)
    if args.model:
        net = trained_model.load_model(args.model)[0]
    else:
        net = ImageNetHead().net
    imagenet = ImageNetHead().net
    t0 = time.time()
    zv = zoom_vectors(net if args.model else ImageNetHead(), ts.images)
    V = unit(sum(unit(v) for v in zv.values()))
    G = V @ V.T
    print(f"global vectors: {time.time() - t0:.0f} s", flush=True)
    report("global (zooms)", G, ids, enc)
    other = enc[:, None] != enc[None, :]
    Gm = np.where(other, G, -np.inf)
    cand = np.argsort(-Gm, axis=1)[:, :args.top_k]
    pairs = sorted({(min(a, b), max(a, b)) for a in range(n) for b in cand[a]})
    pa = np.array(pairs)
    same = ids[pa[:, 0]] == ids[pa[:, 1]]
    print(f"{len(pairs)} candidate pairs (top {args.top_k} per photo), {int(same.sum())} of the same animal; "
          f"global AUC among them {auc(G[pa[:, 0], pa[:, 1]][same], G[pa[:, 0], pa[:, 1]][~same]):.3f}",
          flush=True)
    gs = G[pa[:, 0], pa[:, 1]]
    for variant in args.variants:
        kind, px = variant.split("@")
        src = net if (kind == "head" or (kind == "s7" and args.model)) else imagenet
        if kind == "head" and not args.model:
            continue
        t0 = time.time()
        maps = cell_maps(src, ts.images, int(px), kind)
        t1 = time.time()
        xy = grid(maps.shape[1])
        if args.demean:
            maps = maps - maps.reshape(-1, maps.shape[2]).mean(0)
            maps /= np.linalg.norm(maps, axis=2, keepdims=True) + 1e-9
        if args.centre < 1.0:
            side = xy[:, 0].max() + 1
            lo, hi = (1 - args.centre) / 2 * side, (1 + args.centre) / 2 * side
            inner = (xy[:, 0] + 0.5 >= lo) & (xy[:, 0] + 0.5 <= hi) & (xy[:, 1] + 0.5 >= lo) & (xy[:, 1] + 0.5 <= hi)
            maps, xy = np.ascontiguousarray(maps[:, inner]), xy[inner]
        res = np.array([dense_scores(maps[a], maps[b], xy, args.min_sim) for a, b in pairs], np.float64)
        t2 = time.time()
        print(f"\n{variant}: {maps.shape[1]} cells x {maps.shape[2]} ch; maps {t1 - t0:.0f} s, "
              f"{len(pairs)} pairs {t2 - t1:.0f} s", flush=True)
        for c, name in enumerate(("mnn", "inliers", "mnn_sum")):
            s = res[:, c]
            print(f"  {name:8s} AUC {auc(s[same], s[~same]):.3f}  median same {np.median(s[same]):.1f} "
                  f"different {np.median(s[~same]):.1f}", flush=True)
            z = (s - s.mean()) / (s.std() + 1e-9)
            zg = (gs - gs.mean()) / (gs.std() + 1e-9)
            for w in (0.25, 0.5, 1.0, 2.0):
                S = np.where(other, G, -np.inf) - 10.0       # non-candidates below every candidate
                S[np.eye(n, dtype=bool)] = 1.0
                fused = zg + w * z
                S[pa[:, 0], pa[:, 1]] = fused
                S[pa[:, 1], pa[:, 0]] = fused
                S = np.where(other | np.eye(n, dtype=bool), S, G)   # same-encounter pairs: left out by the metrics
                report(f"  {variant} {name} w={w}", S, ids, enc)


if __name__ == "__main__":
    main()
