"""``deer-pipeline train``: a re-identification model from labelled individuals.

    deer-pipeline train --labels CSV [--images-root DIR] --out MODEL_DIR [--epochs N]
        [--device auto|cpu|cuda:N] [--seed N] [--split-by-identity SEED]
    deer-pipeline train --from-reviews --out MODEL_DIR [--min-deer N] [...]
    deer-pipeline train --labels CSV --classes encounter --out MODEL_DIR [...]
    deer-pipeline train --labels CSV --classes mixed --out MODEL_DIR [...]

The labels CSV is the one ``deer-pipeline evaluate`` reads (``image_path, identity`` and
optionally ``encounter_id, side`` and a box ``x, y, w, h``). ``--split-by-identity SEED`` trains
on the calibration half of the split ``evaluate --split-by-identity SEED`` makes, so the other
half can be evaluated honestly. Writes ``weights.pt`` and ``model_card.json`` into MODEL_DIR and
prints the new embedding version; ``deer-pipeline models register MODEL_DIR`` makes it the
pipeline's embedder.

``--from-reviews`` trains on the pipeline database instead: the deer whose sightings people
confirmed in the review app (same / merge / split decisions; unidentifiable sightings left out;
different / new decisions respected), their crops from the crop store, one encounter per burst
track (``embedding.reviewed_data``). It refuses, naming what is missing, when fewer than
``--min-deer`` deer have at least two confirmed photos.

``--classes encounter`` needs no identity at all: every encounter (the CSV's ``encounter_id``, or
photos of one camera chained within the burst window by ``timestamp``) is its own class, because
the photos of one burst show one animal. The identity column is not read. Nothing is held out,
so it runs ``--epochs`` (default ``settings.ENCOUNTER_TRAINING_EPOCHS``) and keeps the last;
its loss is supervised contrastive over pairs of photos of one encounter (``--loss``, default
``settings.ENCOUNTER_TRAINING_LOSS``; identities default to ``settings.TRAIN_LOSS``, ArcFace).
On nyala-dev this label-free recipe matched training on identities (docs/evaluation.md).

``--classes mixed`` is for labels that name some animals and not others (with ``--from-reviews``:
the confirmed deer named, every other decided sighting unnamed): a row with an identity
trains by it (all encounters of a named animal are one class), a row whose identity is empty or
``unknown`` trains by its encounter; as for encounters, all epochs run, the last model is kept
and the loss is supervised contrastive. A fifth of the named individuals are trained as if unnamed
and measured (their held-out top-1 is in the card; ``evaluate`` chooses the trained model's
threshold on them). With ``--split-by-identity SEED`` the calibration half is named and the other
half is read without its identities: the honest protocol for ``evaluate --split-by-identity SEED
--model-file MODEL_DIR``, which scores the half whose identities the training never read.
"""

from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    from deer_pipeline import settings
    from deer_pipeline.embedding.training import TrainOptions

    d = TrainOptions()
    p = argparse.ArgumentParser(prog="deer-pipeline train", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--labels", help="labels CSV (image_path, identity[, encounter_id, side, x, y, w, h])")
    src.add_argument("--from-reviews", action="store_true",
                     help="train on the sightings people confirmed in the review app (the pipeline database)")
    p.add_argument("--min-deer", type=int, default=settings.REVIEW_TRAINING_MIN_DEER,
                   help="--from-reviews: refuse with fewer confirmed deer (each with at least "
                        f"{settings.REVIEW_TRAINING_MIN_PHOTOS} confirmed photos; default "
                        f"{settings.REVIEW_TRAINING_MIN_DEER})")
    p.add_argument("--crop-store", help="--from-reviews: crop store folder (default: DEER_CROP_STORE or <data dir>/crops)")
    p.add_argument("--images-root", help="folder relative image paths are under (default: the CSV's folder)")
    p.add_argument("--out", required=True, help="new folder for weights.pt and model_card.json")
    p.add_argument("--classes", choices=("identity", "encounter", "mixed"), default="identity",
                   help="identity: learn the labelled individuals (default); encounter: learn each "
                        "encounter as its own animal, no identity labels needed or read; mixed: named "
                        "individuals by identity, rows with an empty or 'unknown' identity by encounter")
    p.add_argument("--epochs", type=int,
                   help=f"most epochs (default {d.epochs}, stopping early on held-out individuals; "
                        f"--classes encounter / mixed: {settings.ENCOUNTER_TRAINING_EPOCHS}, all run)")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N (AMP on a GPU)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--views", type=int, default=d.views, help=f"augmented views per photo (default {d.views})")
    p.add_argument("--frozen-blocks", type=int, default=d.frozen_blocks,
                   help=f"EfficientNet-Lite0 blocks kept frozen (0..N-1; default {d.frozen_blocks}: blocks "
                        f"{d.frozen_blocks}-15, the head and the projection learn)")
    p.add_argument("--probe-epochs", type=int, default=d.probe_epochs,
                   help=f"epochs of linear probe before the blocks learn (default {d.probe_epochs})")
    p.add_argument("--loss", choices=settings.TRAIN_LOSSES,
                   help=f"arcface: sub-center ArcFace, a learnt centre per class; supcon: supervised "
                        f"contrastive over pairs of photos of one class in each batch (temperature "
                        f"{d.temperature}); default {settings.TRAIN_LOSS}, --classes encounter / mixed: "
                        f"{settings.ENCOUNTER_TRAINING_LOSS}")
    p.add_argument("--split-by-identity", type=int, metavar="SEED",
                   help="train on the calibration half of the labels split by identity with SEED "
                        "(the half evaluate --split-by-identity SEED does not score); --classes mixed: "
                        "the other half too, without its identities")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from deer_pipeline.embedding import trained_model, training
    from deer_pipeline.evaluation.labels import EvaluationError

    data = None
    by_encounter = args.classes == "encounter"
    mixed = args.classes == "mixed"
    try:
        if by_encounter and (args.from_reviews or args.split_by_identity is not None):
            raise trained_model.TrainingError(
                "--classes encounter reads no identity: it cannot be combined with "
                + ("--from-reviews" if args.from_reviews else "--split-by-identity"))
        if args.from_reviews:
            if args.split_by_identity is not None:
                raise trained_model.TrainingError("--split-by-identity splits a labels CSV; it does not apply "
                                                  "to --from-reviews")
            photos, source, data = _from_reviews(args, unnamed=mixed)
        else:
            photos, source = training.photos_from_labels(args.labels, args.images_root, args.classes,
                                                         args.split_by_identity)
        options = training.options_for(args.classes, epochs=args.epochs, loss=args.loss, seed=args.seed,
                                       device=args.device, views=args.views, threads=args.threads,
                                       frozen_blocks=args.frozen_blocks, probe_epochs=args.probe_epochs)
        result = training.train(photos, args.out, options, source=source,
                                log_fn=lambda s: print(s, file=sys.stderr), data=data,
                                classes=args.classes)
    except (trained_model.TrainingError, EvaluationError, ValueError) as exc:
        print(f"deer-pipeline train: {exc}", file=sys.stderr)
        return 2
    t = result.card["training"]
    print(json.dumps({"model_dir": str(result.out_dir), "embedding_version": result.version,
                      "validation_top1": t["validation_top1"], "best_epoch": t["best_epoch"],
                      "epochs_run": t["epochs_run"], "seconds": t["seconds"]["total"],
                      "skipped": result.card["data"]["skipped"]}, indent=2))
    return 0


def _from_reviews(args, unnamed: bool = False):
    """(photos, source, card data) of the confirmed review decisions in the pipeline database
    (``unnamed``: and every other decided sighting, unnamed, for --classes mixed)."""
    from deer_pipeline import db
    from deer_pipeline.embedding import reviewed_data
    from deer_pipeline.settings import CropSettings

    store = args.crop_store or CropSettings().store_dir
    rs = reviewed_data.reviewed_training_set(db.get_engine(), store, min_deer=args.min_deer, unnamed=unnamed)
    print(f"from reviews: {len(rs.photos) - len(rs.unnamed_ids)} confirmed photos of {len(rs.identities())} deer "
          f"({rs.decisions_used} standing decisions)"
          + (f" and {len(rs.unnamed_ids)} other sightings unnamed" if unnamed else "")
          + f"; left out: { {k: len(v) for k, v in rs.skipped.items()} or 'none'}", file=sys.stderr)
    source = reviewed_data.SOURCE + (" and the other sightings by burst track" if unnamed else "")
    return rs.photos, source, rs.card_data()
