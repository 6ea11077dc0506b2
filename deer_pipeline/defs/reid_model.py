"""The ``reid_model`` asset: a re-identification model trained on labelled individuals.

Thin Dagster layer over :func:`deer_pipeline.embedding.training.train` (the same training as
``deer-pipeline train``). Unpartitioned and on no schedule: it is not on the nightly path, and
training a model never changes what the pipeline embeds with until the model is registered
(``register_model: true`` in the run config, or ``deer-pipeline models register MODEL_DIR``).

Labels come from the run config, else ``DEER_TRAIN_LABELS`` / ``DEER_TRAIN_IMAGES_ROOT`` /
``DEER_TRAIN_SPLIT_SEED``; ``from_reviews: true`` (or ``DEER_TRAIN_FROM_REVIEWS=1``) trains on
the sightings people confirmed in the review app instead (``embedding.reviewed_data``); with
neither configured the asset records "no labels configured". The
model card is the materialisation's metadata (embedding version, held-out top-1, loss curve,
photos and individuals used, skipped photos, time).
"""

from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import dagster as dg
from pydantic import Field

from deer_pipeline import settings
from deer_pipeline.defs.executors import GPU_POOL, GPU_STEP_TAGS
from deer_pipeline.defs.resources import CropStore, DeerDatabase

ENV = {"labels_csv": "DEER_TRAIN_LABELS", "images_root": "DEER_TRAIN_IMAGES_ROOT",
       "split_by_identity_seed": "DEER_TRAIN_SPLIT_SEED"}


class ReidModelConfig(dg.Config):
    """What to train on (each field falls back to its DEER_TRAIN_* variable)."""

    labels_csv: Optional[str] = Field(default=None, description="labels CSV (image_path, identity[, encounter_id, side, x, y, w, h])")
    from_reviews: Optional[bool] = Field(
        default=None, description="train on the sightings people confirmed in the review app (default: DEER_TRAIN_FROM_REVIEWS)")
    min_deer: Optional[int] = Field(default=None, description="from_reviews: confirmed deer needed (default: settings)")
    images_root: Optional[str] = Field(default=None, description="folder of the photos")
    split_by_identity_seed: Optional[int] = Field(
        default=None, description="train only on the calibration half of this identity split (keep the other half to evaluate)")
    classes: str = Field(default="identity", description="identity: learn the labelled individuals; encounter: learn each "
                                                         "encounter of labels_csv as one animal, no identity read; "
                                                         "mixed: named individuals by identity, rows with an empty or "
                                                         "'unknown' identity by encounter (from_reviews: the confirmed "
                                                         "deer named, every other decided sighting by burst track)")
    epochs: Optional[int] = Field(default=None, description="most epochs (default: train's default for the classes)")
    views: Optional[int] = Field(default=None, description="augmented views per photo")
    loss: Optional[str] = Field(default=None, description="arcface | supcon (default: train's for the classes)")
    device: str = Field(default=settings.DEVICE, description="auto | cpu | cuda:N (AMP on a GPU)")
    seed: int = Field(default=0)
    out_dir: Optional[str] = Field(default=None, description="model folder; default <data dir>/models/reid-<time>")
    register_model: bool = Field(default=False, description="make the trained model the pipeline's embedder")

    def resolved(self) -> dict:
        out = {}
        for name, env in ENV.items():
            value = getattr(self, name)
            if value is None and settings.env(env):
                value = int(settings.env(env)) if name == "split_by_identity_seed" else settings.env(env)
            out[name] = value
        out["from_reviews"] = (self.from_reviews if self.from_reviews is not None
                               else settings.env_bool("DEER_TRAIN_FROM_REVIEWS", False))
        return out


def card_metadata(card: dict, model_dir: Path) -> dict:
    t, d = card["training"], card["data"]
    curve = "\n".join(["| epoch | stage | loss | held-out top-1 |", "|---:|---|---:|---:|"]
                      + [f"| {r['epoch']} | {r['stage']} | {r['loss']:.4f} | "
                         f"{r['val_top1'] if r.get('val_top1') is not None else '-'} |" for r in t["loss_curve"]])
    return {
        "status": dg.MetadataValue.text("trained"),
        "embedding_version": dg.MetadataValue.text(card["embedding_version"]),
        "model_dir": dg.MetadataValue.path(str(model_dir)),
        "validation_top1": dg.MetadataValue.float(float(t["validation_top1"] or 0.0)),
        "best_epoch": dg.MetadataValue.int(int(t["best_epoch"])),
        "epochs_run": dg.MetadataValue.int(int(t["epochs_run"])),
        "photos_used": dg.MetadataValue.int(int(d["photos_used"])),
        "individuals_used": dg.MetadataValue.int(int(d["individuals_used"])),
        "photos_skipped": dg.MetadataValue.json(d["skipped"]),
        "data_sha256": dg.MetadataValue.text(d["sha256"]),
        "data_source": dg.MetadataValue.text(d.get("source_kind", "labels")),
        "seconds": dg.MetadataValue.float(float(t["seconds"]["total"])),
        "loss_curve": dg.MetadataValue.md(curve),
        # the card as written, less the per-photo file hashes (one per photo: they stay in the file)
        "model_card": dg.MetadataValue.json({k: ({**v, "photo_sha256": f"{len(v['photo_sha256'])} hashes, in the card file"}
                                                 if k == "data" and "photo_sha256" in v else v)
                                             for k, v in card.items() if not k.startswith("_")}),
    }


@dg.asset(
    name="reid_model",
    group_name="training",
    pool=GPU_POOL,
    op_tags=dict(GPU_STEP_TAGS),
    kinds={"pytorch"},
    description="A re-identification model trained on labelled individuals (metric learning on the last "
                "EfficientNet-Lite0 blocks); the model card is the metadata. Not on the nightly path; "
                "register it to make it the pipeline's embedder.",
)
def reid_model(context: dg.AssetExecutionContext, config: ReidModelConfig, database: DeerDatabase,
               crop_store: CropStore) -> dg.MaterializeResult:
    cfg = config.resolved()
    if cfg["from_reviews"] and cfg["labels_csv"]:
        raise dg.Failure("reid_model: configure either labels_csv or from_reviews, not both")
    if not cfg["labels_csv"] and not cfg["from_reviews"]:
        context.log.info("no labels configured: set labels_csv in the run config or DEER_TRAIN_LABELS")
        return dg.MaterializeResult(metadata={
            "status": dg.MetadataValue.text("no labels configured"),
            "how_to_configure": dg.MetadataValue.md(
                "Set `labels_csv` (and `images_root`, optionally `split_by_identity_seed`) in the run "
                "config, or " + ", ".join(f"`{v}`" for v in ENV.values()) + "; or `from_reviews: true` "
                "(`DEER_TRAIN_FROM_REVIEWS=1`) to train on the confirmed review decisions.")})
    from deer_pipeline import db
    from deer_pipeline.embedding import registry, training

    data = None
    if config.classes not in training.CLASSES:
        raise dg.Failure(f"reid_model: classes must be one of {training.CLASSES}, not {config.classes!r}")
    by_encounter = config.classes == "encounter"
    if by_encounter and (cfg["from_reviews"] or cfg["split_by_identity_seed"] is not None):
        raise dg.Failure("reid_model: classes 'encounter' reads no identity: it cannot be combined with "
                         "from_reviews or split_by_identity_seed")
    if cfg["from_reviews"]:
        from deer_pipeline.embedding import reviewed_data

        rs = reviewed_data.reviewed_training_set(database.engine(), crop_store.settings().store_dir,
                                                 min_deer=config.min_deer, unnamed=config.classes == "mixed")
        photos, source, data = rs.photos, reviewed_data.SOURCE, rs.card_data()
    else:
        photos, source = training.photos_from_labels(cfg["labels_csv"], cfg["images_root"], config.classes,
                                                     cfg["split_by_identity_seed"])
    options = training.options_for(config.classes, device=config.device, seed=config.seed, epochs=config.epochs,
                                   views=config.views, loss=config.loss)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(config.out_dir) if config.out_dir else db.data_dir() / "models" / f"reid-{stamp}"
    result = training.train(photos, out, options, source=source, progress=False,
                            log_fn=lambda s: context.log.info(s), data=data, classes=config.classes)
    meta = card_metadata(result.card, out)
    if config.register_model:
        reg = registry.register(str(out))
        meta["registered"] = dg.MetadataValue.text(reg["embedding_version"])
        context.log.info("registered %s as the pipeline's embedder; the embeddings partitions are stale "
                         "until the code location reloads and they are backfilled", reg["embedding_version"])
    return dg.MaterializeResult(metadata=meta)
