"""Jobs: the camera x day identification job and the report job."""

from __future__ import annotations

import dagster as dg

# Every camera x day asset, in dependency order: crops -> embeddings -> deer_profiles ->
# similarity_scores. Their checks run with them.
identification_job = dg.define_asset_job(
    name="identification_job",
    selection=dg.AssetSelection.assets("crops", "embeddings", "deer_profiles", "similarity_scores"),
    description="Crop, embed and identify the deer of one camera x day.",
)

report_job = dg.define_asset_job(
    name="report_job",
    selection=dg.AssetSelection.assets("threshold_report"),
    description="Rebuild the threshold report from every similarity score.",
)

evaluation_job = dg.define_asset_job(
    name="evaluation_job",
    selection=dg.AssetSelection.assets("reid_evaluation"),
    description="Measure re-identification on the configured labelled photos (DEER_EVAL_LABELS).",
)

training_job = dg.define_asset_job(
    name="training_job",
    selection=dg.AssetSelection.assets("reid_model"),
    description="Train a re-identification model on the configured labelled individuals (DEER_TRAIN_LABELS); "
                "on no schedule.",
)
