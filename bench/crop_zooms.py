"""Research script: centred zooms of the crop averaged at test time, and three score
normalisations (CSLS, database-side augmentation, k-reciprocal re-ranking), judged on one half of
nyala-dev split by identity (seed 0). Two feature sets: the untrained ImageNet Lite0 head
(average-pooled 1280-d, the stand-in of the default ensemble's models) and a trained model
(``--model DIR``, e.g. the encounter-trained model of ``deer-pipeline train --classes encounter``).

    .venv/bin/python bench/crop_zooms.py --half 0 --model /tmp/encm     # choose (calibration half)
    .venv/bin/python bench/crop_zooms.py --half 1 --model /tmp/encm     # report once (evaluated half)
    .venv/bin/python bench/crop_zooms.py --half 0 --model /tmp/encm --mirror   # + mirrored crops averaged

A zoom ``f`` is the centred ``f x f`` part of the crop (the same fraction of its width and of its
height), resized to the model's input as the whole crop is. A set of zooms is embedded view by
view and the unit vectors are averaged (then normalised again): the pipeline's
``settings.CROP_ZOOMS``.

Metrics per variant: closed-set top-1 / top-5 / mAP across encounters (the evaluation's
definition), and over every pair of photos from different encounters: the average precision of
ranking same-animal pairs first (``pairAP``), the best pair-level F1 over thresholds and its
precision, and the precision of the 100 best-scoring pairs. Pair-level figures say how well one
threshold can separate; they are not the replayed open set that ``deer-pipeline evaluate`` scores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from PIL import ImageOps  # noqa: E402

from deer_pipeline.embedding import trained_model, training  # noqa: E402
from deer_pipeline.embedding.inference import zoom  # noqa: E402
from deer_pipeline.evaluation.labels import read_labels, split_by_identity  # noqa: E402
from deer_pipeline.evaluation.scoring import closed_set_metrics  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "nyala-dev"
ZOOMS = (1.0, 0.9, 0.8, 0.7, 0.6)
ZOOM_SETS = ((1.0, 0.8), (1.0, 0.9, 0.8), (0.9, 0.8, 0.7), (1.0, 0.8, 0.6), (1.0, 0.9, 0.8, 0.7))


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def zoom_vectors(net, images, zooms=(1.0, 0.9, 0.8), batch: int = 64) -> dict:
    """{zoom: (n, d) float64 vectors of ``net`` for the centred zoom of every image}."""
    import torch

    out = {}
    for f in zooms:
        x = torch.stack([training.to_tensor_u8(zoom(im, f), training.INPUT_SIZE) for im in images])
        with torch.inference_mode():
            out[f] = np.concatenate([net(x[s:s + batch]).numpy() for s in range(0, len(x), batch)]).astype(np.float64)
    return out


class ImageNetHead:
    """The untrained ImageNet Lite0 head, average pooled (1280-d): the default ensemble's stand-in."""

    def __init__(self):
        self.net = trained_model.build_embedder(512, 11, body=trained_model.lite0_module()).eval()

    def __call__(self, x):
        net, m = self.net, self.net.body
        h = net.frozen(x)
        for block in m._blocks[net.frozen_blocks:]:
            h = block(h, drop_connect_rate=None)
        return m._swish(m._bn1(m._conv_head(h))).mean((2, 3))


def features(images, model_dir: str | None) -> dict[str, dict[float, np.ndarray]]:
    """{"imagenet": {zoom: (n, 1280)}, "trained": {zoom: (n, 512)}} (trained only with a model),
    unit vectors."""
    nets = {"imagenet": ImageNetHead(), **({"trained": trained_model.load_model(model_dir)[0]} if model_dir else {})}
    out: dict[str, dict[float, np.ndarray]] = {}
    for name, net in nets.items():
        out[name] = {f: unit(v) for f, v in zoom_vectors(net, images, ZOOMS, batch=32).items()}
        print(f"  {name}: embedded at zooms {ZOOMS}", file=sys.stderr, flush=True)
    return out


def ranking_figures(scores: np.ndarray, same: np.ndarray, at: int = 100) -> dict:
    """Pairs ranked by score: average precision of the same-animal pairs, the best F1 over
    thresholds and its precision, and the precision of the ``at`` best pairs."""
    yy = same[np.argsort(-scores, kind="stable")]
    tp = np.cumsum(yy)
    prec, rec = tp / np.arange(1, len(yy) + 1), tp / yy.sum()
    f1 = 2 * prec * rec / np.maximum(prec + rec, 1e-12)
    b = int(np.argmax(f1))
    return {"pairAP": round(float((prec * yy).sum() / yy.sum()), 4), "bestF1": round(float(f1[b]), 4),
            "P@bestF1": round(float(prec[b]), 3), f"P@{at}": round(float(prec[at - 1]), 3)}


def pair_metrics(S, ids, enc) -> dict:
    """``ranking_figures`` over every pair of photos of different encounters."""
    iu = np.triu_indices(len(ids), 1)
    keep = enc[iu[0]] != enc[iu[1]]
    return ranking_figures(S[iu][keep], (ids[iu[0]] == ids[iu[1]])[keep])


def load_half(half: int):
    """(training set of the photos, identities, encounters) of one half of nyala-dev split by
    identity with seed 0 (0: calibration, 1: evaluated); prints its size."""
    photos = split_by_identity(read_labels(DATA / "labels.csv", DATA), 0)[half]
    ts = training.prepare_training_set(photos)
    ids = np.array([p.identity for p in ts.photos])
    enc = np.array([p.encounter for p in ts.photos])
    print(f"half {half}: {len(ids)} photos of {len(set(ids))} individuals", flush=True)
    return ts, ids, enc


def other_encounter(enc) -> np.ndarray:
    return enc[:, None] != enc[None, :]


def csls(S, enc, k: int) -> np.ndarray:
    """Cross-domain similarity local scaling: 2 cos - r_i - r_j, r = mean of the k best
    similarities to photos of other encounters (hubs are penalised)."""
    r = np.sort(np.where(other_encounter(enc), S, -np.inf), axis=1)[:, -k:].mean(1)
    return 2 * S - r[:, None] - r[None, :]


def dba(V, enc, k: int, alpha: float = 3.0) -> np.ndarray:
    """Database-side augmentation: each vector plus its k nearest other-encounter vectors
    weighted by similarity ** alpha."""
    S = V @ V.T
    idx = np.argsort(-np.where(other_encounter(enc), S, -np.inf), axis=1)[:, :k]
    W = np.clip(np.take_along_axis(S, idx, 1), 0, None) ** alpha
    return unit(V + (W[:, :, None] * V[idx]).sum(1))


def k_reciprocal(S, enc, k1: int, k2: int, lam: float = 0.3) -> np.ndarray:
    """Zhong et al. 2017 re-ranking (Jaccard distance of k-reciprocal neighbour sets), as a
    similarity; a photo's own encounter is left out of its neighbours."""
    n = len(S)
    M = np.where(other_encounter(enc) | np.eye(n, dtype=bool), S, -np.inf)
    D = 2 - 2 * np.clip(S, -1, 1)
    rank = np.argsort(-M, axis=1)
    V = np.zeros((n, n))
    for i in range(n):
        fk = rank[i, :k1 + 1]
        rec = fk[np.any(rank[fk, :k1 + 1] == i, axis=1)]
        exp = rec
        half = int(round(k1 / 2)) + 1
        for j in rec:
            cj = rank[j, :half]
            crec = cj[np.any(rank[cj, :half] == j, axis=1)]
            if len(np.intersect1d(crec, rec)) > 2 / 3 * len(crec):
                exp = np.append(exp, crec)
        exp = np.unique(exp)
        w = np.exp(-D[i, exp])
        V[i, exp] = w / w.sum()
    if k2 > 1:
        V = np.stack([V[rank[i, :k2]].mean(0) for i in range(n)])
    mins = np.minimum(V[:, None, :], V[None, :, :]).sum(2)
    return -((1 - lam) * (1 - mins / (2 - mins)) + lam * D)


def report(name: str, S, ids, enc) -> None:
    cm = closed_set_metrics(S, ids, enc, ks=(1, 5))
    row = {"top1": round(cm["top1"], 4), "top5": round(cm["top5"], 4), "mAP": round(cm["mAP"], 4),
           **pair_metrics(S, ids, enc)}
    print(f"{name:34s} {json.dumps(row)}", flush=True)


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--half", type=int, default=0, choices=(0, 1), help="0: calibration half, 1: evaluated half")
    ap.add_argument("--model", help="a trained model directory (deer-pipeline train --out)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--normalisations", action="store_true", help="also CSLS, DBA and k-reciprocal re-ranking")
    ap.add_argument("--mirror", action="store_true",
                    help="also each vector averaged with its mirrored crop's (left-right flip at test time)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ts, ids, enc = load_half(args.half)
    feats = features(ts.images, args.model)
    mirrored = features([ImageOps.mirror(im) for im in ts.images], args.model) if args.mirror else {}
    for name, by_zoom in feats.items():
        for f, V in by_zoom.items():
            report(f"{name} zoom {f}", V @ V.T, ids, enc)
        for zs in ZOOM_SETS:
            V = unit(sum(by_zoom[f] for f in zs))
            report(f"{name} zooms {zs}", V @ V.T, ids, enc)
        for zs in ((1.0,), (1.0, 0.9, 0.8)) if mirrored else ():
            V = unit(unit(sum(by_zoom[f] for f in zs)) + unit(sum(mirrored[name][f] for f in zs)))
            report(f"{name} zooms {zs} + mirrored", V @ V.T, ids, enc)
        if args.normalisations:
            V = by_zoom[1.0]
            S = V @ V.T
            for k in (3, 5, 10, 20):
                report(f"{name} csls k{k}", csls(S, enc, k), ids, enc)
            for k in (1, 2, 3, 5):
                W = dba(V, enc, k)
                report(f"{name} dba k{k}", W @ W.T, ids, enc)
            for k1, k2 in ((5, 1), (10, 1), (10, 3), (20, 6)):
                report(f"{name} k-reciprocal {k1},{k2}", k_reciprocal(S, enc, k1, k2), ids, enc)


if __name__ == "__main__":
    main()
