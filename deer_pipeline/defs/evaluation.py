"""The ``reid_evaluation`` asset: re-identification measured on labelled photos, in the UI.

Thin Dagster layer over :func:`deer_pipeline.evaluation.run.evaluate` (the same evaluation as
``deer-pipeline evaluate``). Unpartitioned. Which labels to use comes from the asset's run
config, else the environment (``DEER_EVAL_LABELS``, ``DEER_EVAL_IMAGES_ROOT``,
``DEER_EVAL_CALIBRATION_LABELS``, ``DEER_EVAL_CALIBRATION_IMAGES_ROOT``,
``DEER_EVAL_SPLIT_SEED``); with no labels configured the asset records "no labels configured"
and does nothing heavy.

Metadata: a markdown table of methods x metrics, one float per method and metric that the UI
plots across materialisations (``default_open_set_f1``, ``legacy_open_set_f1``,
``default_top1``, ...), the verdict default vs legacy, and the paths of the JSON and HTML
reports written under ``<data dir>/reports/evaluation/``.
"""


from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import dagster as dg
from pydantic import Field

from deer_pipeline import settings
from deer_pipeline.defs.executors import GPU_POOL, GPU_STEP_TAGS
from deer_pipeline.defs.resources import DeerDatabase
from deer_pipeline.settings import EmbeddingSettings

ENV = {
    "labels_csv": "DEER_EVAL_LABELS",
    "images_root": "DEER_EVAL_IMAGES_ROOT",
    "calibration_labels_csv": "DEER_EVAL_CALIBRATION_LABELS",
    "calibration_images_root": "DEER_EVAL_CALIBRATION_IMAGES_ROOT",
    "split_by_identity_seed": "DEER_EVAL_SPLIT_SEED",
}
PLOTTED = {  # metadata key suffix -> (section, metric)
    "cross_encounter_f1": ("open_set", "cross_encounter_f1"),
    "cross_encounter_precision": ("open_set", "cross_encounter_precision"),
    "cross_encounter_recall": ("open_set", "cross_encounter_recall"),
    "baks_baus_gmean": ("open_set", "baks_baus_gmean"),
    "open_set_f1": ("open_set", "pairwise_f1"),
    "open_set_precision": ("open_set", "pairwise_precision"),
    "open_set_recall": ("open_set", "pairwise_recall"),
    "ari": ("open_set", "ari"),
    "deer_found": ("open_set", "n_pred"),
    "count_error": ("open_set", "count_error"),
    "baks": ("open_set", "baks"),
    "baus": ("open_set", "baus"),
    "top1": ("closed_set", "top1"),
    "top5": ("closed_set", "top5"),
    "mAP": ("closed_set", "mAP"),
}


class ReidEvaluationConfig(dg.Config):
    """Ground truth for the evaluation (each field falls back to its DEER_EVAL_* variable)."""

    labels_csv: Optional[str] = Field(default=None, description="labels CSV (image_path, identity, ...)")
    images_root: Optional[str] = Field(default=None, description="folder of the photos")
    calibration_labels_csv: Optional[str] = Field(default=None, description="labels used only for thresholds")
    calibration_images_root: Optional[str] = Field(default=None)
    split_by_identity_seed: Optional[int] = Field(
        default=None, description="split labels_csv by identity into calibration/evaluation halves")
    methods: Optional[list[str]] = Field(default=None, description="methods to run (default: all)")
    weights: str = Field(default="auto", description="embedding weights: auto | imagenet | path")
    device: str = Field(default="auto", description="auto | cpu | cuda:N")
    zooms: list[float] = Field(default=list(settings.CROP_ZOOMS),
                               description="the crop (1) and centred zooms into it, embedded and averaged")
    model_file: Optional[str] = Field(default=None, description="trained model folder for the method `trained` "
                                      "(never trained on an evaluated individual)")

    def resolved(self) -> dict:
        out = {}
        for name, env in ENV.items():
            value = getattr(self, name)
            if value is None and settings.env(env):
                value = settings.env(env)
                if name == "split_by_identity_seed":
                    value = int(value)
            out[name] = value
        return out


def reports_dir() -> Path:
    from deer_pipeline import db

    return db.data_dir() / "reports" / "evaluation"


def report_metadata(report: dict, json_path: Path | None = None, html_path: Path | None = None) -> dict:
    """Asset metadata for a report: table, per-method floats, verdict, paths."""
    from deer_pipeline.evaluation import report as eval_report

    md = eval_report.markdown_table(report)
    other = eval_report.markdown_table(report, "other")
    if other.count("\n") > 1:
        md += "\n\nOther operating points (@count: number of deer matched on calibration labels; " \
              "@configured: the configured threshold)\n\n" + other
    if report.get("substitution_note"):
        md += "\n\n_" + report["substitution_note"] + "_"
    md += "\n\nThresholds: " + "; ".join(f"**{n}** {e['threshold']:.3f} ({e['threshold_source']})"
                                       for n, e in report["methods"].items())
    meta: dict = {"status": dg.MetadataValue.text("evaluated"), "results": dg.MetadataValue.md(md)}
    for name, entry in report["methods"].items():
        for suffix, (section, metric) in PLOTTED.items():
            value = entry.get(section, {}).get(metric)
            if value is not None:
                meta[f"{name}_{suffix}"] = dg.MetadataValue.float(float(value))
        meta[f"{name}_threshold"] = dg.MetadataValue.float(float(entry["threshold"]))
        cop = entry.get("count_operating_point")
        if cop:
            meta[f"{name}_at_count_open_set_f1"] = dg.MetadataValue.float(float(cop["open_set"]["pairwise_f1"]))
            meta[f"{name}_at_count_count_error"] = dg.MetadataValue.float(float(cop["open_set"]["count_error"]))
    v = report.get("verdict", {})
    if v.get("compared"):
        meta["default_beats_legacy_f1"] = dg.MetadataValue.bool(bool(v["default_beats_legacy_f1"]))
        meta["default_beats_legacy_count_error"] = dg.MetadataValue.bool(bool(v["default_beats_legacy_count_error"]))
    ds = report.get("dataset", {}).get("evaluation", {})
    meta["evaluated_photos"] = dg.MetadataValue.int(int(ds.get("evaluated_photos", 0)))
    meta["individuals"] = dg.MetadataValue.int(int(ds.get("individuals", 0)))
    meta["seconds"] = dg.MetadataValue.float(float(report.get("timings", {}).get("total_s", 0.0)))
    if json_path:
        meta["report_json"] = dg.MetadataValue.path(str(json_path))
    if html_path:
        meta["report_html"] = dg.MetadataValue.path(str(html_path))
    return meta


@dg.asset(
    name="reid_evaluation",
    group_name="evaluation",
    pool=GPU_POOL,
    op_tags=dict(GPU_STEP_TAGS),
    kinds={"pytorch", "postgres"},
    description="Re-identification measured on labelled photos: closed-set top-1/top-5/mAP and open-set "
                "pairwise F1, ARI, deer found, BAKS/BAUS for every method side by side (the pipeline's own "
                "crop, embedding and matching code, in a temporary database).",
)
def reid_evaluation(context: dg.AssetExecutionContext, config: ReidEvaluationConfig,
                    database: DeerDatabase) -> dg.MaterializeResult:
    cfg = config.resolved()
    if not cfg["labels_csv"]:
        context.log.info("no labels configured: set labels_csv in the run config or DEER_EVAL_LABELS")
        return dg.MaterializeResult(metadata={
            "status": dg.MetadataValue.text("no labels configured"),
            "how_to_configure": dg.MetadataValue.md(
                "Set `labels_csv` (and `images_root`, optionally `calibration_labels_csv` or "
                "`split_by_identity_seed`) in the run config, or the variables "
                + ", ".join(f"`{v}`" for v in ENV.values()) + ".")})
    from deer_pipeline.evaluation import report as eval_report
    from deer_pipeline.evaluation import run as ev

    embedding = EmbeddingSettings(weights=config.weights, device=config.device, zooms=tuple(config.zooms))
    options = ev.EvaluationOptions(methods=config.methods, embedding=embedding, database_url=database.url,
                                   model_file=config.model_file)
    report = ev.evaluate(cfg["labels_csv"], cfg["images_root"], cfg["calibration_labels_csv"],
                         cfg["calibration_images_root"], cfg["split_by_identity_seed"], options)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = reports_dir()
    json_path = eval_report.write_json(report, out / f"reid_evaluation-{stamp}.json")
    html_path = eval_report.write_html(report, out / f"reid_evaluation-{stamp}.html")
    context.log.info("evaluation:\n%s", eval_report.format_table(report))
    return dg.MaterializeResult(metadata=report_metadata(report, json_path, html_path))
