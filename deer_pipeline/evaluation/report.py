"""The evaluation report: the verdict, tables (text and markdown), JSON, plots and the self-contained HTML page."""

from __future__ import annotations

import base64
import io
import json
from datetime import datetime
from pathlib import Path

import numpy as np

from deer_pipeline.evaluation import methods as rm

REPORT_METRICS = ("top1", "top5", "mAP", "cross_encounter_precision", "cross_encounter_recall",
                  "cross_encounter_f1", "pairwise_precision", "pairwise_recall", "pairwise_f1", "ari",
                  "n_pred", "n_true", "baks", "baus", "baks_baus_gmean")


def verdict(report: dict) -> dict:
    """Does the pipeline's default beat legacy on CROSS-ENCOUNTER pairwise F1 and on the error of
    the estimated number of deer, both at ONE operating point: the default's threshold chosen on
    the calibration data only (legacy keeps its fixed 0.60)? ``default_f1`` / ``legacy_f1`` are the
    cross-encounter F1; the all-pairs F1 is reported next to it. Also says whether the issue's
    targets are met there: cross-encounter precision >= 0.5 and the number of deer within 25 % of
    the truth."""
    ms = report.get("methods", {})
    d, l = ms.get(rm.DEFAULT_METHOD), ms.get("legacy")
    if not d or not l:
        return {"compared": False}
    do, lo = d["open_set"], l["open_set"]
    lf1, lce = lo["cross_encounter_f1"], lo["count_error_abs"]
    df1, dce = do["cross_encounter_f1"], do["count_error_abs"]
    n_true = do["n_true"]
    out = {"compared": True, "threshold": d["threshold"], "threshold_source": d.get("threshold_source"),
           "default_beats_legacy_f1": df1 > lf1, "default_beats_legacy_count_error": dce < lce,
           "default_f1": df1, "legacy_f1": lf1, "default_count_error": dce, "legacy_count_error": lce,
           "default_cross_encounter_precision": do["cross_encounter_precision"],
           "default_cross_encounter_recall": do["cross_encounter_recall"],
           "default_all_pairs_f1": do["pairwise_f1"], "legacy_all_pairs_f1": lo["pairwise_f1"],
           "default_deer_found": do["n_pred"], "true_deer": n_true,
           "precision_at_least_half": do["cross_encounter_precision"] >= 0.5,
           "deer_within_25_percent": dce <= 0.25 * n_true}
    rd = l.get("redraws", {})
    if rd.get("n"):
        out["legacy_redraws"] = {"n": rd["n"], "f1_max": rd["cross_encounter_f1"]["max"],
                                 "count_error_min": rd["count_error_abs"]["min"],
                                 "default_beats_every_draw_f1": df1 > rd["cross_encounter_f1"]["max"],
                                 "default_beats_every_draw_count_error": dce < rd["count_error_abs"]["min"]}
    return out


TABLE_COLUMNS = (("method", None), ("top1", "closed_set"), ("xP", "cross_encounter_precision"),
                 ("xR", "cross_encounter_recall"), ("xF1", "cross_encounter_f1"), ("F1all", "pairwise_f1"),
                 ("deer", "n_pred"), ("true", "n_true"), ("BAKS", "baks"), ("BAUS", "baus"),
                 ("GM", "baks_baus_gmean"), ("thr", "threshold"))


def _row(label: str, closed: dict, o: dict, threshold: float) -> list[str]:
    return [label, f"{closed['top1']:.3f}", f"{o['cross_encounter_precision']:.3f}",
            f"{o['cross_encounter_recall']:.3f}", f"{o['cross_encounter_f1']:.3f}", f"{o['pairwise_f1']:.3f}",
            str(o["n_pred"]), str(o["n_true"]), f"{o['baks']:.3f}", f"{o['baus']:.3f}",
            f"{o['baks_baus_gmean']:.3f}", f"{threshold:.3f}"]


def verdict_lines(report: dict) -> list[str]:
    """The verdict in words (printed by the CLI, shown in the HTML report)."""
    v = report.get("verdict", {})
    if not v.get("compared"):
        return []
    out = [f"default vs legacy at one operating point (default threshold {v['threshold']:.3f}, chosen on the "
           f"calibration data): cross-encounter F1 {v['default_f1']:.4f} vs {v['legacy_f1']:.4f} "
           f"({'better' if v['default_beats_legacy_f1'] else 'NOT better'}); |deer found - true| "
           f"{v['default_count_error']} vs {v['legacy_count_error']} "
           f"({'better' if v['default_beats_legacy_count_error'] else 'NOT better'})",
           f"default: cross-encounter precision {v['default_cross_encounter_precision']:.3f} "
           f"({'at least' if v['precision_at_least_half'] else 'under'} 0.5); deer found {v['default_deer_found']} "
           f"for {v['true_deer']} ({'within' if v['deer_within_25_percent'] else 'NOT within'} 25 %)"]
    rd = v.get("legacy_redraws")
    if rd:
        out.append(f"legacy over {rd['n']} more projection draws: best cross-encounter F1 {rd['f1_max']:.4f}, "
                   f"smallest |deer found - true| {rd['count_error_min']:.0f} (the default beats every draw: "
                   f"F1 {'yes' if rd['default_beats_every_draw_f1'] else 'no'}, count "
                   f"{'yes' if rd['default_beats_every_draw_count_error'] else 'no'})")
    return out


def table_rows(report: dict, point: str = "main") -> list[list[str]]:
    """``main``: each method at its threshold (calibrated for F1, legacy fixed). ``other``: the
    count operating point of each calibrated method and the default as configured."""
    rows = []
    for name, e in report["methods"].items():
        if point == "main":
            rows.append(_row(name + (" *" if name == report.get("default_method") else ""),
                             e["closed_set"], e["open_set"], e["threshold"]))
            continue
        if e.get("count_operating_point"):
            c = e["count_operating_point"]
            rows.append(_row(f"{name}@count", e["closed_set"], c["open_set"], c["threshold"]))
        if e.get("as_configured"):
            c = e["as_configured"]
            rows.append(_row(f"{name}@configured", e["closed_set"], c["open_set"], c["threshold"]))
    return rows


def _text_table(rows: list[list[str]]) -> str:
    head = [c for c, _ in TABLE_COLUMNS]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda r: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def format_table(report: dict) -> str:
    out = _text_table(table_rows(report))
    other = table_rows(report, "other")
    if other:
        out += ("\n\nOther operating points (@count: threshold whose number of deer on the calibration labels "
                "is closest to the truth; @configured: the pipeline's configured threshold):\n" + _text_table(other))
    return out


def markdown_table(report: dict, point: str = "main") -> str:
    head = [c for c, _ in TABLE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(report, point)]
    return "\n".join(lines)


def write_json(report: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=_json_default, allow_nan=False))
    return path


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, datetime):
        return o.isoformat()
    return str(o)


def _png_base64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def plots(report: dict) -> dict[str, str]:
    """Base64 PNGs: precision/recall over cross-encounter photo pairs (evaluated set), and
    open-set F1 vs threshold on the calibration set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    pairs = report.get("curves", {}).get("pairs", {})
    if pairs:
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
        top = 0.0
        for name, rows in pairs.items():
            rows = [r for r in rows if r["tp"] + r["fp"] >= 5]     # precision of a handful of pairs is noise
            if not rows:
                continue
            ax.plot([r["recall"] for r in rows], [r["precision"] for r in rows], label=name, lw=1.4)
            top = max(top, max(r["precision"] for r in rows))
        ax.set_xlabel("recall (pairs of photos from different encounters)")
        ax.set_ylabel("precision")
        ax.set_title("Precision / recall of 'same individual' by similarity threshold")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, min(1.0, max(0.05, top * 1.15)))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        out["pr_curve"] = _png_base64(fig)
        plt.close(fig)
    cal = report.get("curves", {}).get("calibration_f1", {})
    if cal:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for name, rows in cal.items():
            ax.plot([r["threshold"] for r in rows], [r["f1"] for r in rows], label=name, lw=1.4)
            t = report["methods"].get(name, {}).get("threshold")
            if t is not None:
                ax.axvline(t, ls=":", lw=0.8, color=ax.lines[-1].get_color())
        ax.set_xlabel("threshold")
        ax.set_ylabel("open-set pairwise F1 (calibration)")
        ax.set_title("Threshold calibration (dotted: chosen)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        out["calibration_f1"] = _png_base64(fig)
        plt.close(fig)
    return out


def write_html(report: dict, path) -> Path:
    import html as h

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imgs = plots(report)
    head = [c for c, _ in TABLE_COLUMNS]
    rows = "".join("<tr>" + "".join(f"<td>{h.escape(v)}</td>" for v in r) + "</tr>" for r in table_rows(report))
    rows2 = "".join("<tr>" + "".join(f"<td>{h.escape(v)}</td>" for v in r) + "</tr>"
                    for r in table_rows(report, "other"))
    thr = "".join(f"<li><b>{h.escape(n)}</b>: {e['threshold']:.3f} &mdash; {h.escape(e['threshold_source'])}</li>"
                  for n, e in report["methods"].items())
    verdict_text = "".join(f"<p>{h.escape(line)}</p>" for line in verdict_lines(report))
    note = f"<p><i>{h.escape(report['substitution_note'])}</i></p>" if report.get("substitution_note") else ""
    figs = "".join(f'<figure><img src="data:image/png;base64,{b}" alt="{k}"><figcaption>{k}</figcaption></figure>'
                   for k, b in imgs.items())
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>Re-identification evaluation</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child{{text-align:left}}</style></head><body>
<h1>Re-identification evaluation</h1>
<p>{h.escape(json.dumps(report['dataset'].get('evaluation', {}), default=str))}</p>
<table><tr>{''.join(f'<th>{c}</th>' for c in head)}</tr>{rows}</table>
<h3>Other operating points</h3><table><tr>{''.join(f'<th>{c}</th>' for c in head)}</tr>{rows2}</table>
<p>* the pipeline's default. Closed set: top-1 leave-one-out, own encounter excluded. Open set: xP/xR/xF1 are
pairwise precision/recall/F1 over pairs of photos from different encounters (the headline); F1all over all pairs;
deer found vs true; BAKS/BAUS and their geometric mean GM.</p>
{verdict_text}{note}<h2>Thresholds</h2><ul>{thr}</ul>{figs}
<p>Generated {h.escape(report.get('environment', {}).get('date', ''))}.</p></body></html>"""
    path.write_text(doc)
    return path
