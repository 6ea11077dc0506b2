"""The evaluation report: the verdict, tables (text and markdown), JSON, plots and the self-contained HTML page."""

from __future__ import annotations

import base64
import io
import json
from datetime import datetime
from pathlib import Path

import numpy as np

from deer_pipeline.evaluation import methods as rm

REPORT_METRICS = ("top1", "top5", "mAP", "pairwise_precision", "pairwise_recall", "pairwise_f1", "ari",
                  "n_pred", "n_true", "baks", "baus")


def verdict(report: dict) -> dict:
    """Does the pipeline's default beat legacy on open-set pairwise F1 and on the error of the
    estimated number of deer? At the main (F1-calibrated) threshold, and - when calibration
    labels were given - at the count operating point."""
    ms = report.get("methods", {})
    d, l = ms.get(rm.DEFAULT_METHOD), ms.get("legacy")
    if not d or not l:
        return {"compared": False}
    lf1, lce = l["open_set"]["pairwise_f1"], l["open_set"]["count_error_abs"]
    df1, dce = d["open_set"]["pairwise_f1"], d["open_set"]["count_error_abs"]
    out = {"compared": True, "default_beats_legacy_f1": df1 > lf1, "default_beats_legacy_count_error": dce < lce,
           "default_f1": df1, "legacy_f1": lf1, "default_count_error": dce, "legacy_count_error": lce}
    rd = l.get("redraws", {})
    if rd.get("n"):
        out["legacy_redraws"] = {"n": rd["n"], "f1_max": rd["pairwise_f1"]["max"],
                                 "count_error_min": rd["count_error_abs"]["min"],
                                 "default_beats_every_draw_f1": df1 > rd["pairwise_f1"]["max"],
                                 "default_beats_every_draw_count_error": dce < rd["count_error_abs"]["min"]}
    cop = d.get("count_operating_point")
    if cop:
        cf1, cce = cop["open_set"]["pairwise_f1"], cop["open_set"]["count_error_abs"]
        out["count_operating_point"] = {"threshold": cop["threshold"], "default_f1": cf1, "default_count_error": cce,
                                        "beats_legacy_f1": cf1 > lf1, "beats_legacy_count_error": cce < lce}
        if rd.get("n"):
            out["count_operating_point"].update(
                beats_every_legacy_draw_f1=cf1 > rd["pairwise_f1"]["max"],
                beats_every_legacy_draw_count_error=cce < rd["count_error_abs"]["min"])
    return out


TABLE_COLUMNS = (("method", None), ("top1", "closed_set"), ("top5", "closed_set"), ("mAP", "closed_set"),
                 ("P", "pairwise_precision"), ("R", "pairwise_recall"), ("F1", "pairwise_f1"), ("ARI", "ari"),
                 ("deer", "n_pred"), ("true", "n_true"), ("BAKS", "baks"), ("BAUS", "baus"), ("thr", "threshold"))


def _row(label: str, closed: dict, o: dict, threshold: float) -> list[str]:
    return [label, f"{closed['top1']:.3f}", f"{closed['top5']:.3f}", f"{closed['mAP']:.3f}",
            f"{o['pairwise_precision']:.3f}", f"{o['pairwise_recall']:.3f}", f"{o['pairwise_f1']:.3f}",
            f"{o['ari']:.3f}", str(o["n_pred"]), str(o["n_true"]), f"{o['baks']:.3f}", f"{o['baus']:.3f}",
            f"{threshold:.3f}"]


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
    v = report.get("verdict", {})
    verdict_text = ""
    if v.get("compared"):
        verdict_text = (f"<p>Default vs legacy: open-set F1 {v['default_f1']:.3f} vs {v['legacy_f1']:.3f} "
                        f"({'better' if v['default_beats_legacy_f1'] else 'NOT better'}); error of the number "
                        f"of deer {v['default_count_error']} vs {v['legacy_count_error']} "
                        f"({'better' if v['default_beats_legacy_count_error'] else 'NOT better'}).</p>")
        c = v.get("count_operating_point")
        if c:
            verdict_text += (f"<p>At the count operating point (threshold {c['threshold']:.3f}): F1 "
                             f"{c['default_f1']:.3f} ({'better' if c['beats_legacy_f1'] else 'NOT better'}), "
                             f"error of the number of deer {c['default_count_error']} "
                             f"({'better' if c['beats_legacy_count_error'] else 'NOT better'}).</p>")
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
<p>* the pipeline's default. Closed set: top-1/top-5/mAP leave-one-out, own encounter excluded. Open set: pairwise
precision/recall/F1 and ARI of the deer the pipeline created; deer found vs true; BAKS/BAUS.</p>
{verdict_text}{note}<h2>Thresholds</h2><ul>{thr}</ul>{figs}
<p>Generated {h.escape(report.get('environment', {}).get('date', ''))}.</p></body></html>"""
    path.write_text(doc)
    return path
