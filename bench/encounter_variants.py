"""Research script: variants of the encounter recipe (``deer-pipeline train --classes
encounter``) under the transductive protocol. Each is trained on the encounters of the calibration
half of nyala-dev (split by identity, seed 0; no identity read, all 14 epochs, 3 views, the last
model) and scored on all of that half's photos, identities used only to measure: 564 queries of
88 individuals instead of the 137 of ``training_variants.py``'s 18 held-out individuals.

    .venv/bin/python bench/encounter_variants.py base /tmp/ev/base         # the shipped recipe
    .venv/bin/python bench/encounter_variants.py lite2 /tmp/ev/lite2       # EfficientNet-Lite2 body
    .venv/bin/python bench/encounter_variants.py unfreeze8 /tmp/ev/unf8    # blocks 8-15 learn
    .venv/bin/python bench/encounter_variants.py flips /tmp/ev/flips       # + left-right flips (p 0.5)
    .venv/bin/python bench/encounter_variants.py views8 /tmp/ev/views8     # 8 augmented views cached, not 3
    .venv/bin/python bench/encounter_variants.py masked /tmp/ev/masked     # background greyed out (GrabCut
                                                     # masks of bench/foreground_masks.py), train and score
    .venv/bin/python bench/encounter_variants.py grouped /tmp/ev/grouped   # batches of whole encounters
    .venv/bin/python bench/encounter_variants.py supcon /tmp/ev/supcon     # train --loss supcon: supervised
                                                     # contrastive loss (temperature 0.1) instead of
                                                     # ArcFace, on batches of encounter pairs
    .venv/bin/python bench/encounter_variants.py arcsupcon /tmp/ev/arcsup  # ArcFace + SupCon, same batches
    .venv/bin/python bench/encounter_variants.py supcon@0.05 /tmp/ev/t005  # SupCon at another temperature
    .venv/bin/python bench/encounter_variants.py score /tmp/encm           # score a model folder only
    .venv/bin/python bench/encounter_variants.py base /tmp/ev/base_s1 1       # a third argument: the seed
    .venv/bin/python bench/encounter_variants.py base /tmp/ev/more 0 0.5      # a fourth: add that fraction
                                                     # of the other half's encounters (no identity read)

Printed per variant: closed-set top-1 / top-5 / mAP across encounters and the pair figures of
``crop_zooms.py``, for the whole crop and for the crop zooms (1, 0.9, 0.8) averaged.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import training_variants as tv  # noqa: E402
from crop_zooms import pair_metrics, unit, zoom_vectors  # noqa: E402

from deer_pipeline.embedding import trained_model, training  # noqa: E402
from deer_pipeline.evaluation.labels import read_labels, split_by_identity  # noqa: E402
from deer_pipeline.evaluation.scoring import closed_set_metrics  # noqa: E402


def patch_flips() -> None:
    from PIL import ImageOps

    augment = training.augment

    def augment_flip(image, rng):
        img = augment(image, rng)
        return ImageOps.mirror(img) if rng.uniform() < 0.5 else img

    training.augment = augment_flip


def patch_masked(cache: str = "/tmp/grabcut_seeded.npz") -> None:
    """Every decoded photo (training and scoring) with its background set to the ImageNet mean
    colour, by the seeded GrabCut masks of ``bench/foreground_masks.py`` (computed if missing)."""
    from foreground_masks import masks_for, variant_images

    prepare = training.prepare_training_set

    def prepare_masked(photos, *a, **k):
        ts = prepare(photos, *a, **k)
        ts.images = variant_images(ts.images, masks_for(ts.photos, ts.images, Path(cache)), "masked grey")
        return ts

    training.prepare_training_set = prepare_masked


def patch_grouped() -> None:
    """The shipped ArcFace loss on the batches the contrastive loss needs (``train --loss
    supcon``'s ``epoch_order(pairs=True)``): isolates what the batching alone does."""
    order = training.epoch_order
    training.epoch_order = lambda rows, labels, gen, pairs=False: order(rows, labels, gen, pairs=True)


def patch_arc_and_supcon() -> None:
    """``train --loss supcon`` with the shipped sub-center ArcFace loss added to it."""
    import torch

    make = training.make_loss

    class Both(torch.nn.Module):
        def __init__(self, options, n_classes, generator):
            super().__init__()
            self.con = make(options, n_classes, generator)
            self.arc = make(dataclasses.replace(options, loss="arcface"), n_classes, generator)

        def forward(self, emb, labels):
            return self.con(emb, labels) + self.arc(emb, labels)

    training.make_loss = lambda options, n_classes, generator=None: Both(options, n_classes, generator)


def other_half_encounters(fraction: float) -> list:
    """The photos of a seeded ``fraction`` of the evaluated half's encounters (for training on
    more unlabelled photos; the encounter recipe reads no identity)."""
    if fraction <= 0:
        return []
    other = split_by_identity(read_labels(tv.DATA / "labels.csv", tv.DATA), 0)[1]
    encounters = sorted({p.encounter for p in other}, key=str)
    chosen = set(np.random.default_rng(123).permutation(encounters)[: int(round(fraction * len(encounters)))].tolist())
    return [p for p in other if p.encounter in chosen]


def load(out: str, variant: str):
    if variant != "lite2":
        return trained_model.load_model(out)[0]
    import torch   # load_model builds the Lite0 body: rebuild with Lite2

    card = trained_model.read_card(out)
    net = trained_model.build_embedder(int(card["weights"]["dim"]), int(card["weights"]["frozen_blocks"]),
                                       body=tv.lite_module(2))
    net.load_state_dict(torch.load(card["_weights_path"], map_location="cpu", weights_only=True))
    return net.eval()


def main() -> None:
    import torch

    variant, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(2)
    photos = tv.calibration_half()
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    extra = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    seconds = None
    if variant != "score":
        temperature = float(variant[len("supcon@"):]) if variant.startswith("supcon@") else None
        if temperature is not None:
            variant = "supcon"
        if variant not in ("base", "lite2", "unfreeze8", "flips", "masked", "views8", "grouped", "supcon",
                           "arcsupcon"):
            sys.exit(f"unknown variant {variant!r}")
        frozen = tv.patch_body(variant)
        if variant == "flips":
            patch_flips()
        if variant == "grouped":
            patch_grouped()
        if variant == "arcsupcon":
            patch_arc_and_supcon()
    if variant == "masked":          # training and scoring both see masked photos
        patch_masked()
    if variant != "score":
        t0 = time.time()
        opts = training.TrainOptions(epochs=14, views=8 if variant == "views8" else 3, threads=2, probe_epochs=5,
                                     frozen_blocks=frozen, seed=seed,
                                     loss="supcon" if variant in ("supcon", "arcsupcon") else "arcface",
                                     **({"temperature": temperature} if temperature is not None else {}))
        training.train(list(photos) + other_half_encounters(extra), out, opts, classes="encounter",
                       log_fn=lambda s: None)
        seconds = round(time.time() - t0)
    net = load(out, variant)
    ts = training.prepare_training_set(photos)
    ids = np.array([p.identity for p in ts.photos])
    enc = np.array([p.encounter for p in ts.photos])
    V = zoom_vectors(net, ts.images)
    for name, W in (("whole crop", unit(V[1.0])), ("zooms", unit(V[1.0] + V[0.9] + V[0.8]))):
        S = W @ W.T
        cm = closed_set_metrics(S, ids, enc, ks=(1, 5))
        print(variant, name, json.dumps({"top1": round(cm["top1"], 4), "top5": round(cm["top5"], 4),
                                         "mAP": round(cm["mAP"], 4), **pair_metrics(S, ids, enc),
                                         "train_s": seconds}), flush=True)


if __name__ == "__main__":
    main()
