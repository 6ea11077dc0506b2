"""Research script: does labelling some animals help the encounter recipe recognise the others?

A landowner has unlabelled photos (encounters: one burst, one animal) and may label a few
individuals. The encounter recipe (``train --classes encounter``, SupCon on encounter pairs)
learns only that the photos of one encounter match: same minute, same place, same light. An
identity label adds what it cannot see: the same animal on another day. This script measures
that inside the calibration half of nyala-dev (split by identity, seed 0), two folds: the half's
individuals are split in two (seeded); fold A/B:

- ``encounters``: every encounter of the calibration half is a class (no identity read);
- ``mixed``: the photos of the A individuals are classed by identity (all encounters of an
  animal one class), the B individuals' by encounter (no identity read for B);

both scored on B's photos only (identities used only to measure): closed-set top-1 / mAP across
encounters and the pair figures of ``crop_zooms.py``, crop zooms 1 + 0.9 + 0.8. Then the folds
swap. Same recipe otherwise (SupCon, 14 epochs, 3 views as in encounter_variants.py, seed 0, the last
model).

    .venv/bin/python bench/semi_supervised.py /tmp/semi            # both folds, both variants
    .venv/bin/python bench/semi_supervised.py /tmp/semi_s1 1       # a second argument: the training seed
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
import training_variants as tv  # noqa: E402
from crop_zooms import pair_metrics, unit, zoom_vectors  # noqa: E402

from deer_pipeline.embedding import trained_model, training  # noqa: E402
from deer_pipeline.evaluation.scoring import closed_set_metrics  # noqa: E402


def train_variant(photos, labelled: set[str], out: str, seed: int = 0) -> float:
    """Train the encounter recipe with the ``labelled`` individuals classed by identity."""
    shipped = training.encounter_classes

    def classes(ps):
        by_enc = {p.image_path: p for p in shipped(ps)}
        return [dataclasses.replace(p, identity=f"id:{p.identity}") if p.identity in labelled
                else by_enc[p.image_path] for p in ps]

    training.encounter_classes = classes
    try:
        t0 = time.time()
        opts = training.options_for("encounter", threads=2, seed=seed, views=3)
        training.train(list(photos), out, opts, classes="encounter", log_fn=lambda s: None)
        return time.time() - t0
    finally:
        training.encounter_classes = shipped


def score(out: str, photos) -> dict:
    net = trained_model.load_model(out)[0]
    ts = training.prepare_training_set(photos)
    ids = np.array([p.identity for p in ts.photos])
    enc = np.array([p.encounter for p in ts.photos])
    zv = zoom_vectors(net, ts.images)
    V = unit(sum(unit(v) for v in zv.values()))
    S = V @ V.T
    cm = closed_set_metrics(S, ids, enc, ks=(1, 5))
    return {"top1": round(cm["top1"], 4), "top5": round(cm["top5"], 4), "mAP": round(cm["mAP"], 4),
            **pair_metrics(S, ids, enc)}


def main() -> None:
    import torch

    root = Path(sys.argv[1])
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    torch.set_num_threads(2)
    photos = list(tv.calibration_half())
    individuals = sorted({p.identity for p in photos})
    perm = np.random.default_rng(7).permutation(len(individuals))
    half = len(individuals) // 2
    folds = [set(individuals[i] for i in perm[:half]), set(individuals[i] for i in perm[half:])]
    for f, labelled in enumerate(folds):
        scored = [p for p in photos if p.identity not in labelled]
        for variant in ("encounters", "mixed"):
            out = root / ("encounters" if variant == "encounters" else f"fold{f}_{variant}")   # one encounters model
            secs = None
            if not (out / "model_card.json").exists():
                secs = round(train_variant(photos, labelled if variant == "mixed" else set(), str(out), seed))
            row = score(str(out), scored)
            print(f"fold {f} {variant:10s} (scored on {len(scored)} photos of "
                  f"{len({p.identity for p in scored})} unlabelled individuals) {json.dumps(row)} train_s {secs}",
                  flush=True)


if __name__ == "__main__":
    main()
