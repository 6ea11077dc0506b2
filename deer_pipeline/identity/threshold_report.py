"""The threshold report: what the re-identification threshold does, and which one to use.

Built from the ``similarity_scores`` table (every score a decision looked at) and, where truth
is known, from scored pairs of sightings:

* distribution of the scores (min, max, mean, quantiles, buckets) and of each sighting's best
  score;
* the 'would match at threshold t' table: how many sightings would have joined a known deer
  (best score >= t) and how many would have founded a new deer, for a grid of thresholds;
* precision, recall and F1 per threshold, overall and per sex, on pairs of sightings whose
  ensemble similarity (the quantity the threshold is compared with: the encounter-to-deer score
  is the best pair score) is computed from the stored vectors. Truth source, in order:
  ``true_identities`` (all pairs of labelled, embedded detections); otherwise the constraints
  the data gives for free - two deer in one frame are different animals (negative pairs),
  detections of one burst track are the same animal (positive pairs; easy ones, so recall is
  optimistic);
* with ``true_identities``, the open-set decisions themselves (each sighting's best candidate
  right or wrong; see ``metrics.decision_sweep``) and the grouping now in the store (pairwise
  precision/recall/F1 and ARI);
* a recommended threshold: the highest F1, or the lowest threshold reaching a configured
  precision.

Every figure names its truth source and the number of pairs it rests on. Outputs: a dict for the
asset metadata, CSV + JSON files and a PNG plot under ``<data dir>/reports/``.

Plain logic: no Dagster here.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from deer_pipeline import db
from deer_pipeline.embedding.models import unit_rows, weighted_cosine
from deer_pipeline.identity import metrics, reviews, store

if TYPE_CHECKING:   # pandas is imported where it is used: loading the code location does not need it
    import pandas as pd

log = logging.getLogger(__name__)

SEX_GROUPS = ("female", "male", "unknown", "mixed")


@dataclass
class PairSet:
    """Scored pairs of detections with same/different labels from one truth source."""

    source: str                     # true_identities | constraints | none
    scores: np.ndarray
    same: np.ndarray
    sex: np.ndarray                 # female | male | unknown | mixed (the two detections' sexes)
    n_items: int = 0
    sampled_from: int = 0           # labelled items before sampling (0 = not sampled)

    @property
    def n_pairs(self) -> int:
        return int(len(self.scores))


@dataclass
class ThresholdReport:
    generated_at: str
    thresholds: list[float]
    score_summary: dict
    best_score_summary: dict
    buckets: list[dict]
    would_match: list[dict]
    truth_source: str
    pairs: dict
    sweep: list[dict]
    sweep_by_sex: dict[str, list[dict]]
    recommended: dict
    decisions: dict = field(default_factory=dict)       # open-set decision sweep (true_identities)
    grouping: dict = field(default_factory=dict)        # current deer vs true identities
    current_threshold: float | None = None
    calibration: dict = field(default_factory=dict)     # match-probability calibration fitted on the pairs
    files: dict[str, str] = field(default_factory=dict)
    png_base64: str | None = None

    def as_json(self) -> dict:
        d = dict(self.__dict__)
        d.pop("png_base64", None)
        return d


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def load_scores(conn: sa.Connection) -> pd.DataFrame:
    import pandas as pd

    return pd.read_sql(sa.text(
        "SELECT s.detection_id, s.encounter_key, s.candidate_deer_id, s.similarity, s.matched, "
        "s.sex_match, s.threshold, s.partition_key, coalesce(d.sex, 'unknown') AS sex "
        "FROM similarity_scores s JOIN detections d ON d.detection_id = s.detection_id"), conn)


def best_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per sighting: its best candidate and score."""
    if scores.empty:
        return scores.assign(best=[])
    idx = scores.groupby("detection_id")["similarity"].idxmax()
    return scores.loc[idx].reset_index(drop=True)


def would_match_table(best: Sequence[float], thresholds: Sequence[float], n_without_candidates: int = 0) -> list[dict]:
    """For each threshold t: sightings whose best score reaches t (would join a known deer) and
    the rest (would found a new deer; sightings that had no candidate at all always do)."""
    b = np.asarray(best, dtype=np.float64)
    total = len(b) + n_without_candidates
    out = []
    for t in thresholds:
        m = int((b >= t).sum())
        out.append({"threshold": float(t), "would_match": m, "would_be_new": total - m,
                    "match_rate": (m / total) if total else 0.0})
    return out


def _sex_pair(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.where(a == b, a, "mixed")


def _vectors(conn, ids: Sequence[str], components: Mapping[str, str]) -> tuple[list[str], dict[str, np.ndarray]]:
    """Vectors of the detections that have every component version, rows aligned."""
    per = {m: store.load_vectors(conn, ids, v) for m, v in components.items()}
    keep = [i for i in ids if all(i in per[m] for m in per)]
    mats = {}
    for m in per:
        mat = np.vstack([per[m][i] for i in keep]).astype(np.float32) if keep else np.zeros((0, 512), np.float32)
        mats[m] = unit_rows(mat)
    return keep, mats


def labelled_pairs(conn: sa.Connection, components: Mapping[str, str], weights: Mapping[str, float],
                   max_items: int = 3000, seed: int = 0) -> PairSet:
    """All pairs of embedded detections that have a true identity (sampled to ``max_items``
    detections, seeded, when there are more)."""
    rows = conn.execute(sa.text(
        "SELECT t.detection_id, t.identity, coalesce(d.sex, 'unknown') sex FROM true_identities t "
        "JOIN detections d ON d.detection_id = t.detection_id ORDER BY t.detection_id")).all()
    sampled_from = 0
    if len(rows) > max_items:
        sampled_from = len(rows)
        pick = np.random.default_rng(seed).choice(len(rows), size=max_items, replace=False)
        rows = [rows[i] for i in sorted(pick)]
    keep, mats = _vectors(conn, [r.detection_id for r in rows], components)
    info = {r.detection_id: r for r in rows}
    n = len(keep)
    if n < 2:
        return PairSet("true_identities", np.zeros(0), np.zeros(0, bool), np.zeros(0, str), n, sampled_from)
    sim = weighted_cosine(mats, mats, weights)
    iu, ju = np.triu_indices(n, k=1)
    ident = np.array([info[i].identity for i in keep], dtype=object)
    sexes = np.array([info[i].sex for i in keep], dtype=object)
    return PairSet("true_identities", sim[iu, ju].astype(np.float64), ident[iu] == ident[ju],
                   _sex_pair(sexes[iu], sexes[ju]).astype(str), n, sampled_from)


def constraint_pairs(conn: sa.Connection, components: Mapping[str, str], weights: Mapping[str, float],
                     max_pairs: int = 200_000, seed: int = 0) -> PairSet:
    """Pairs the data labels for free: two detections of one frame are different animals;
    two detections of one burst track (same encounter, different frames) are the same."""
    neg = conn.execute(sa.text(
        "SELECT a.detection_id, b.detection_id FROM detections a JOIN detections b "
        "ON a.image_id = b.image_id AND a.detection_id < b.detection_id "
        "WHERE a.status = 'ok' AND b.status = 'ok' LIMIT :n"), {"n": max_pairs}).all()
    pos = conn.execute(sa.text(
        "SELECT a.detection_id, b.detection_id FROM sightings a JOIN sightings b "
        "ON a.encounter_key = b.encounter_key AND a.detection_id < b.detection_id "
        "JOIN detections da ON da.detection_id = a.detection_id "
        "JOIN detections db ON db.detection_id = b.detection_id AND db.image_id <> da.image_id "
        "LIMIT :n"), {"n": max_pairs}).all()
    pairs = [(a, b, False) for a, b in neg] + [(a, b, True) for a, b in pos]
    return score_pairs(conn, pairs, components, weights, "constraints")


def score_pairs(conn: sa.Connection, pairs: Sequence[tuple[str, str, bool]], components: Mapping[str, str],
                weights: Mapping[str, float], source: str) -> PairSet:
    """Ensemble similarity of labelled pairs (a, b, same) from one truth source: ``constraints``
    or ``reviewed`` (pairs people decided in the review app or with ``deer-pipeline id``)."""
    ids = sorted({x for a, b, _ in pairs for x in (a, b)})
    keep, mats = _vectors(conn, ids, components)
    index = {d: i for i, d in enumerate(keep)}
    pairs = [p for p in pairs if p[0] in index and p[1] in index]
    if not pairs:
        return PairSet(source, np.zeros(0), np.zeros(0, bool), np.zeros(0, str), len(keep))
    sex = dict(conn.execute(sa.text("SELECT detection_id, coalesce(sex, 'unknown') FROM detections "
                                    "WHERE detection_id = ANY(:ids)"), {"ids": keep}).all())
    ia = np.array([index[a] for a, _, _ in pairs])
    ib = np.array([index[b] for _, b, _ in pairs])
    scores = sum(weights[m] * np.einsum("ij,ij->i", mats[m][ia], mats[m][ib]) for m in weights)
    sa_ = np.array([sex[a] for a, _, _ in pairs], dtype=object)
    sb_ = np.array([sex[b] for _, b, _ in pairs], dtype=object)
    return PairSet(source, np.asarray(scores, np.float64), np.array([p[2] for p in pairs]),
                   _sex_pair(sa_, sb_).astype(str), len(keep))


def decision_quality(conn: sa.Connection, scores: pd.DataFrame) -> pd.DataFrame:
    """Per scored sighting with a true identity: best score, whether its best candidate deer
    is the right animal (the deer's identity = its founding detection's true identity), and
    whether a right deer was among its candidates."""
    import pandas as pd

    truth = dict(conn.execute(sa.text("SELECT detection_id, identity FROM true_identities")).all())
    founder_truth = {r.deer_id: truth.get(r.founding_detection_id) for r in conn.execute(sa.text(
        "SELECT deer_id, founding_detection_id FROM deer"))}
    if scores.empty or not truth:
        return pd.DataFrame(columns=["detection_id", "best", "correct", "matchable", "sex"])
    df = scores[scores["detection_id"].isin(truth.keys())].copy()
    if df.empty:
        return pd.DataFrame(columns=["detection_id", "best", "correct", "matchable", "sex"])
    df["right"] = [founder_truth.get(int(c)) == truth[d] and founder_truth.get(int(c)) is not None
                   for d, c in zip(df["detection_id"], df["candidate_deer_id"])]
    best = best_scores(df)
    matchable = df.groupby("detection_id")["right"].any()
    return pd.DataFrame({"detection_id": best["detection_id"], "best": best["similarity"].astype(float),
                         "correct": best["right"].astype(bool),
                         "matchable": best["detection_id"].map(matchable).astype(bool),
                         "sex": best["sex"]})


def current_grouping(conn: sa.Connection) -> dict:
    rows = conn.execute(sa.text(
        "SELECT t.identity, s.deer_id FROM true_identities t JOIN sightings s USING (detection_id)")).all()
    if not rows:
        return {}
    m = metrics.pairwise_prf([r[0] for r in rows], [r[1] for r in rows])
    return {"truth_source": "true_identities", "sightings": len(rows),
            "true_deer": len({r[0] for r in rows}), "predicted_deer": len({r[1] for r in rows}),
            **m.as_dict(), "ari": metrics.adjusted_rand_index([r[0] for r in rows], [r[1] for r in rows])}


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------

def build_report(engine: Engine, components: Mapping[str, str] | None = None,
                 weights: Mapping[str, float] | None = None, thresholds: Sequence[float] | None = None,
                 min_precision: float | None = None, out_dir: Path | None = None,
                 max_items: int = 3000, current_threshold: float | None = None) -> ThresholdReport:
    """Compute the report and write it under ``out_dir`` (default ``<data dir>/reports``)."""
    from deer_pipeline.settings import MatchingSettings

    weights = dict(weights or MatchingSettings().ensemble_weights)
    thresholds = list(thresholds or metrics.default_thresholds())
    with engine.connect() as conn:
        if components is None:
            try:
                components = store.resolve_versions(conn, weights)
            except store.MatchingError as exc:
                log.warning("threshold report without vectors: %s", exc)
                components = None
        scores = load_scores(conn)
        best = best_scores(scores)
        n_decided = conn.execute(sa.text("SELECT count(*) FROM sightings")).scalar_one()
        n_without = max(n_decided - len(best), 0)
        has_truth = conn.execute(sa.text("SELECT count(*) FROM true_identities")).scalar_one() >= 2
        if components is None:
            pairs = PairSet("none", np.zeros(0), np.zeros(0, bool), np.zeros(0, str))
        elif has_truth:
            pairs = labelled_pairs(conn, components, weights, max_items=max_items)
        elif reviewed := reviews.reviewed_pairs(conn):
            pairs = score_pairs(conn, reviewed, components, weights, "reviewed")
        else:
            pairs = constraint_pairs(conn, components, weights)
        decisions = {}
        grouping = {}
        if has_truth:
            dq = decision_quality(conn, scores)
            if len(dq):
                decisions = {"truth_source": "true_identities", "sightings": int(len(dq)),
                             "matchable": int(dq["matchable"].sum()),
                             "sweep": metrics.decision_sweep(dq["best"], dq["correct"], dq["matchable"], thresholds)}
            grouping = current_grouping(conn)

    calibration = _fit_calibration(engine, pairs, components)
    sweep = metrics.threshold_sweep(pairs.scores, pairs.same, thresholds) if pairs.n_pairs else []
    by_sex = {}
    for sex in SEX_GROUPS:
        mask = pairs.sex == sex
        if mask.any() and pairs.same[mask].any():
            by_sex[sex] = [dict(r, pairs=int(mask.sum())) for r in
                           metrics.threshold_sweep(pairs.scores[mask], pairs.same[mask], thresholds)]
    recommended = metrics.recommend_threshold(sweep, min_precision) if sweep and pairs.same.any() else \
        {"threshold": None, "f1": 0.0, "precision": 0.0, "recall": 0.0,
         "rule": "no positive pairs: nothing to recommend from"}
    recommended.update({"truth_source": pairs.source, "pairs": pairs.n_pairs})
    if current_threshold is None and not scores.empty:
        current_threshold = float(scores["threshold"].median())

    report = ThresholdReport(
        generated_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        thresholds=thresholds,
        score_summary=metrics.score_summary(scores["similarity"]) if not scores.empty else {"count": 0},
        best_score_summary=metrics.score_summary(best["similarity"]) if not best.empty else {"count": 0},
        buckets=metrics.bucket_counts(scores["similarity"] if not scores.empty else []),
        would_match=would_match_table(best["similarity"] if not best.empty else [], thresholds, n_without),
        truth_source=pairs.source,
        pairs={"source": pairs.source, "n_pairs": pairs.n_pairs, "same": int(pairs.same.sum()),
               "different": int((~pairs.same).sum()), "items": pairs.n_items,
               "sampled_from": pairs.sampled_from,
               "same_summary": metrics.score_summary(pairs.scores[pairs.same]),
               "different_summary": metrics.score_summary(pairs.scores[~pairs.same])},
        sweep=sweep, sweep_by_sex=by_sex, recommended=recommended, decisions=decisions,
        grouping=grouping, current_threshold=current_threshold, calibration=calibration,
    )
    write_report(report, pairs, Path(out_dir) if out_dir else db.data_dir() / "reports")
    return report


def plot_png(report: ThresholdReport, pairs: PairSet) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=100)
    ax1, ax2 = fig.subplots(1, 2)
    bins = np.linspace(-0.2, 1.0, 61)
    if pairs.n_pairs:
        ax1.hist(pairs.scores[pairs.same], bins=bins, alpha=0.6, density=True,
                 label=f"same deer ({int(pairs.same.sum())} pairs)")
        ax1.hist(pairs.scores[~pairs.same], bins=bins, alpha=0.6, density=True,
                 label=f"different deer ({int((~pairs.same).sum())} pairs)")
    if report.current_threshold is not None:
        ax1.axvline(report.current_threshold, color="k", ls="--", label=f"threshold {report.current_threshold:.2f}")
    if report.recommended.get("threshold") is not None:
        ax1.axvline(report.recommended["threshold"], color="g", ls=":",
                    label=f"recommended {report.recommended['threshold']:.2f}")
    ax1.set_xlabel("ensemble similarity")
    ax1.set_ylabel("density")
    ax1.set_title(f"Same vs different (truth: {pairs.source}, {pairs.n_pairs} pairs)", fontsize=9)
    ax1.legend(fontsize=7)
    if report.sweep:
        r = [x["recall"] for x in report.sweep]
        p = [x["precision"] for x in report.sweep]
        ax2.plot(r, p, marker="o", ms=3)
        for x in report.sweep[:: max(1, len(report.sweep) // 7)]:
            ax2.annotate(f"{x['threshold']:.2f}", (x["recall"], x["precision"]), fontsize=7)
    ax2.set_xlim(0, 1.02)
    ax2.set_ylim(0, 1.02)
    ax2.set_xlabel("recall")
    ax2.set_ylabel("precision")
    ax2.set_title(f"Precision / recall by threshold (truth: {pairs.source}, {pairs.n_pairs} pairs)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _fit_calibration(engine: Engine, pairs: PairSet, components: Mapping[str, str] | None) -> dict:
    """Isotonic calibration of the ensemble cosine to P(same animal) on the report's labelled
    pairs (true identities, or the data's own constraints), stored versioned in
    ``match_calibrations`` (``match_score=fused`` decides with the newest one); returns its
    version, what it was fitted on and its reliability diagram (or why none was fitted)."""
    from deer_pipeline.identity import calibration as calib

    if not pairs.n_pairs:
        return {"not_fitted": "no labelled pairs"}
    try:
        cal = calib.fit_calibration(pairs.scores, pairs.same, fitted_on={
            "source": pairs.source, "components": dict(components or {}),
            "score": "ensemble cosine (threshold report pairs)"})
    except calib.CalibrationError as exc:
        return {"not_fitted": str(exc)}
    with engine.begin() as conn:
        calib.save(conn, cal)
    return {"version": cal.version, "fitted_on": dict(cal.fitted_on), "reliability": list(cal.reliability),
            "curve": cal.curves[calib.GLOBAL].as_dict()}


def write_report(report: ThresholdReport, pairs: PairSet, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_png(report, pairs)
    files = {
        "png": out_dir / "threshold_report.png",
        "sweep_csv": out_dir / "threshold_sweep.csv",
        "would_match_csv": out_dir / "would_match.csv",
        "buckets_csv": out_dir / "score_buckets.csv",
        "json": out_dir / "threshold_report.json",
    }
    files["png"].write_bytes(png)
    sweep_rows = [dict(r, sex="all", truth_source=pairs.source, pairs=pairs.n_pairs) for r in report.sweep]
    for sex, rows in report.sweep_by_sex.items():
        sweep_rows += [dict(r, sex=sex, truth_source=pairs.source) for r in rows]
    import pandas as pd

    pd.DataFrame(sweep_rows).to_csv(files["sweep_csv"], index=False)
    pd.DataFrame(report.would_match).to_csv(files["would_match_csv"], index=False)
    pd.DataFrame(report.buckets).to_csv(files["buckets_csv"], index=False)
    report.files = {k: str(v) for k, v in files.items()}
    report.png_base64 = base64.b64encode(png).decode()
    files["json"].write_text(json.dumps(report.as_json(), indent=2, default=float))


def markdown(report: ThresholdReport) -> str:
    """The report as markdown for the asset metadata (tables + the plot inline)."""
    lines = []
    src = f"truth: **{report.truth_source}**, {report.pairs['n_pairs']} pairs " \
          f"({report.pairs['same']} same, {report.pairs['different']} different)"
    rec = report.recommended
    if rec.get("threshold") is not None:
        lines.append(f"**Recommended threshold {rec['threshold']:.2f}** ({rec['rule']}; {src}): "
                     f"precision {rec['precision']:.3f}, recall {rec['recall']:.3f}, F1 {rec['f1']:.3f}.")
    else:
        lines.append(f"No recommendation: {rec['rule']} ({src}).")
    if report.current_threshold is not None:
        lines.append(f"Threshold in use: {report.current_threshold:.2f}.")
    lines.append("")
    by_t = {r["threshold"]: r for r in report.sweep}
    lines.append("| threshold | would match | would be new | precision | recall | F1 |")
    lines.append("|---|---|---|---|---|---|")
    for w in report.would_match:
        s = by_t.get(w["threshold"])
        pr = f"{s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f}" if s else "- | - | -"
        lines.append(f"| {w['threshold']:.2f} | {w['would_match']} | {w['would_be_new']} | {pr} |")
    lines.append(f"\n_would match/new: best score per sighting from similarity_scores "
                 f"({report.best_score_summary.get('count', 0)} sightings with candidates); "
                 f"precision/recall: {src}._")
    if report.sweep_by_sex:
        lines.append("\n| sex | pairs | best F1 | at threshold |\n|---|---|---|---|")
        for sex, rows in report.sweep_by_sex.items():
            b = max(rows, key=lambda r: (r["f1"], r["threshold"]))
            lines.append(f"| {sex} | {rows[0]['pairs']} | {b['f1']:.3f} | {b['threshold']:.2f} |")
    if report.grouping:
        g = report.grouping
        lines.append(f"\nCurrent grouping vs true identities ({g['sightings']} sightings): pairwise "
                     f"precision {g['precision']:.3f}, recall {g['recall']:.3f}, F1 {g['f1']:.3f}, "
                     f"ARI {g['ari']:.3f}; {g['predicted_deer']} deer for {g['true_deer']} true animals.")
    cal = report.calibration
    if cal.get("reliability"):
        lines.append(f"\nMatch-probability calibration **{cal['version']}** (isotonic, {cal['fitted_on'].get('pairs')} "
                     f"pairs from {cal['fitted_on'].get('source')}); reliability diagram:\n")
        lines.append("| predicted probability | pairs | mean predicted | observed same-animal share |")
        lines.append("|---|---|---|---|")
        for b in cal["reliability"]:
            lines.append(f"| {b['lo']:.1f}-{b['hi']:.1f} | {b['pairs']} | {b['predicted']:.3f} | {b['observed']:.3f} |")
    elif cal.get("not_fitted"):
        lines.append(f"\nNo match-probability calibration: {cal['not_fitted']}.")
    if report.png_base64:
        lines.append(f"\n![threshold report](data:image/png;base64,{report.png_base64})")
    return "\n".join(lines)
