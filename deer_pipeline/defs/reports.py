"""The ``threshold_report`` asset (unpartitioned): score distributions, would-match table,
precision/recall per threshold and a recommended threshold. Thin over
``deer_pipeline.identity.threshold_report``; files go to ``<DEER_DATA_DIR>/reports/``."""


import dagster as dg

from deer_pipeline.defs.resources import (
    DeerDatabase,
    IdentitySettings,
    InferenceResource,
)
from deer_pipeline.lazy_modules import lazy

report_lib = lazy("deer_pipeline.identity.threshold_report")
identity_store = lazy("deer_pipeline.identity.store")


def _inline_png(path) -> str:
    """The report's PNG as an image the UI shows (markdown with a data URI), not only a path."""
    from pathlib import Path

    from deer_pipeline.export.roster import png_markdown, shrink_png

    try:
        return png_markdown(shrink_png(Path(path).read_bytes()), "threshold report")
    except OSError as exc:
        return f"(plot not readable: {exc})"


@dg.asset(
    deps=["similarity_scores"],
    group_name="reports",
    kinds={"postgres", "matplotlib"},
    description="What the re-identification threshold does: score distribution, 'would match at t', "
                "precision/recall/F1 per threshold (overall and per sex, truth named with its pair count) "
                "and a recommended threshold. Writes CSV, JSON and a PNG under <data dir>/reports/.",
)
def threshold_report(context: dg.AssetExecutionContext, database: DeerDatabase,
                     identity: IdentitySettings, inference: InferenceResource) -> dg.MaterializeResult:
    engine = database.engine()
    try:
        components = identity.resolved_versions(engine, inference.embedding_settings())
    except identity_store.MatchingError as exc:      # no vectors at all yet: the distribution part still works
        context.log.warning(f"threshold report without pair truth: {exc}")
        components = None
    rep = report_lib.build_report(engine, components=components, weights=identity.ensemble_weights,
                                  min_precision=identity.report_min_precision,
                                  current_threshold=identity.reid_threshold)
    rec = rep.recommended
    meta = {
        "report": dg.MetadataValue.md(report_lib.markdown(rep)),
        "truth_source": dg.MetadataValue.text(rep.truth_source),
        "truth_pairs": dg.MetadataValue.int(rep.pairs["n_pairs"]),
        "scores": dg.MetadataValue.int(int(rep.score_summary.get("count", 0))),
        "score_summary": dg.MetadataValue.json(rep.score_summary),
        "recommendation_rule": dg.MetadataValue.text(rec["rule"]),
        "threshold_in_use": dg.MetadataValue.float(float(identity.reid_threshold)),
        "plot": dg.MetadataValue.path(rep.files["png"]),
        "plot_image": dg.MetadataValue.md(_inline_png(rep.files["png"])),
        "json": dg.MetadataValue.path(rep.files["json"]),
        "sweep_csv": dg.MetadataValue.path(rep.files["sweep_csv"]),
    }
    if rec.get("threshold") is not None:
        meta["recommended_threshold"] = dg.MetadataValue.float(float(rec["threshold"]))
        meta["best_f1"] = dg.MetadataValue.float(float(rec["f1"]))
        meta["precision_at_recommended"] = dg.MetadataValue.float(float(rec["precision"]))
        meta["recall_at_recommended"] = dg.MetadataValue.float(float(rec["recall"]))
    if rep.grouping:
        meta["grouping_f1"] = dg.MetadataValue.float(float(rep.grouping["f1"]))
        meta["grouping_ari"] = dg.MetadataValue.float(float(rep.grouping["ari"]))
    return dg.MaterializeResult(metadata=meta)
