"""Evaluation of re-identification on labelled photos, every method side by side.

Plain logic, no Dagster. :func:`evaluate` takes a labels file (``image_path, identity`` and
optionally ``encounter_id, camera, timestamp, side, classification`` and a box ``x, y, w, h``;
without a box the whole photo is the crop) and runs the pipeline's OWN code on it, inside an
isolated database that is created for the run and dropped afterwards:

1. ingestion (``ingest.ingest`` of a detections CSV written from the labels),
2. cropping (``cropping.crop_partition``),
3. embedding (``inference.InferenceEngine`` + ``embedding_store``), plus one extra backbone pass
   for the legacy method and the feature methods of :mod:`deer_pipeline.reid_methods`,
4. match-or-create (``matching.decide_partition``) at the method's threshold.

Per method it reports

* closed set: top-1, top-5 and mAP, leave-one-out over the evaluated photos, where the other
  photos of the query's own encounter are removed from the gallery (they are neither counted as
  matches nor as misses);
* open set, the way the pipeline runs: sightings in capture-time order (the labels' timestamps,
  or a fixed seeded order of encounters when there are none) through match-or-create; pairwise
  precision / recall / F1 and the adjusted Rand index of the resulting deer, number of deer found
  vs the true number, and BAKS / BAUS (below);
* the threshold, where it came from, and the fusion weights.

BAKS / BAUS (balanced accuracy on known / unknown samples), on encounters (the unit the
pipeline decides) in feed order:

* an encounter whose individual was seen in an earlier encounter is *known*; it is right when it
  joined an existing deer whose earlier sightings are mostly (strict plurality) that individual;
  BAKS = mean over individuals of the share of their known encounters that were right;
* the first encounter of an individual is *unknown*; it is right when it founded a new deer;
  BAUS = the share of first encounters that founded a new deer (one per individual, so the
  per-individual average is the plain share).

Threshold. With calibration labels, each calibrated method's threshold is the one that maximises
open-set pairwise F1 on the calibration set (``metrics.pairwise_prf`` +
``metrics.recommend_threshold``, ties to the higher threshold), found by replaying the pipeline's
decision rule in memory (:func:`simulate_open_set`) over a threshold grid; the evaluated set's
labels are used only for scoring. Without calibration labels the pipeline's configured threshold
is used. The legacy method's threshold is fixed at 0.60, as it was. The in-memory replay is
checked against the database run at the chosen threshold (``replay_agreement_ari``).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import os
import platform
import secrets
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from deer_pipeline import db, metrics
from deer_pipeline import reid_methods as rm

log = logging.getLogger(__name__)

SYNTH_BASE_TIME = datetime(2024, 6, 1, tzinfo=timezone.utc)
SYNTH_CAMERA = {"evaluation": "eval", "calibration": "calib"}
BURST_WINDOW_S = 5.0
REPORT_METRICS = ("top1", "top5", "mAP", "pairwise_precision", "pairwise_recall", "pairwise_f1", "ari",
                  "n_pred", "n_true", "baks", "baus")


class EvaluationError(ValueError):
    """The labels or the options cannot be evaluated; the message says why."""


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LabelledPhoto:
    """One labelled detection: a photo (or a box in it) of a known individual."""

    image_path: str                       # absolute
    identity: str
    encounter: str                        # label encounter id; the photo itself when absent
    camera: str | None = None
    timestamp: datetime | None = None
    side: str | None = None
    box: tuple[float, float, float, float] | None = None   # x, y, w, h in pixels
    classification: str | None = None
    line: int = 0


_BOX_COLUMNS = (("x", "y", "w", "h"), ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))


def read_labels(path, images_root=None) -> list[LabelledPhoto]:
    """Read a labels CSV; relative image paths are resolved against ``images_root`` (default:
    the CSV's folder). Raises :class:`EvaluationError` naming the file and line on bad input."""
    from deer_pipeline.ingest import parse_time

    path = Path(path).expanduser()
    if not path.is_file():
        raise EvaluationError(f"labels file {path} does not exist")
    root = Path(images_root).expanduser() if images_root else path.parent
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "image_path" not in cols or "identity" not in cols:
            raise EvaluationError(f"{path}: needs the columns image_path and identity; has {', '.join(cols) or 'none'}")
        box_cols = next((bc for bc in _BOX_COLUMNS if all(c in cols for c in bc)), None)
        photos = []
        for row in reader:
            r = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
            line = reader.line_num
            if not r.get("image_path"):
                raise EvaluationError(f"{path}, line {line}: empty image_path")
            if not r.get("identity"):
                raise EvaluationError(f"{path}, line {line}: empty identity")
            p = Path(os.path.expanduser(r["image_path"]))
            p = p if p.is_absolute() else root / p
            box = None
            if box_cols and all(r.get(c) for c in box_cols):
                try:
                    box = tuple(float(r[c]) for c in box_cols)
                except ValueError as exc:
                    raise EvaluationError(f"{path}, line {line}: bad box value: {exc}") from exc
            ts = None
            if r.get("timestamp"):
                ts = parse_time(r["timestamp"])
                if ts is None:
                    raise EvaluationError(f"{path}, line {line}: cannot read timestamp {r['timestamp']!r}")
            photos.append(LabelledPhoto(
                image_path=os.path.abspath(p), identity=r["identity"],
                encounter=r.get("encounter_id") or f"photo:{line}",
                camera=r.get("camera") or r.get("camera_id") or None, timestamp=ts,
                side=r.get("side") or None, box=box, classification=r.get("classification") or None,
                line=line))
    if not photos:
        raise EvaluationError(f"{path}: no labelled photos")
    return photos


def split_by_identity(photos: Sequence[LabelledPhoto], seed: int,
                      fraction: float = 0.5) -> tuple[list[LabelledPhoto], list[LabelledPhoto]]:
    """(calibration, evaluation): the individuals are shuffled with ``seed`` and the first
    ``fraction`` of them (rounded down, at least one) go to calibration, the rest to evaluation."""
    ids = sorted({p.identity for p in photos})
    if len(ids) < 2:
        raise EvaluationError("splitting by identity needs at least two individuals")
    rng = np.random.default_rng(int(seed))
    order = [ids[i] for i in rng.permutation(len(ids))]
    n_cal = min(len(ids) - 1, max(1, int(len(ids) * fraction)))
    cal = set(order[:n_cal])
    return [p for p in photos if p.identity in cal], [p for p in photos if p.identity not in cal]


def dataset_summary(photos: Sequence[LabelledPhoto]) -> dict:
    per_id = Counter(p.identity for p in photos)
    encs = {p.encounter for p in photos}
    enc_per_id = Counter(pid for pid, _ in {(p.identity, p.encounter) for p in photos})
    return {
        "photos": len(photos), "individuals": len(per_id), "encounters": len(encs),
        "photos_per_individual": round(len(photos) / max(1, len(per_id)), 2),
        "individuals_seen_once": sum(1 for i in per_id if enc_per_id[i] == 1),
        "has_timestamps": all(p.timestamp is not None for p in photos),
        "has_boxes": any(p.box is not None for p in photos),
        "has_cameras": any(p.camera for p in photos),
        "sides": dict(Counter(p.side or "-" for p in photos)),
    }


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

def closed_set_metrics(similarity: np.ndarray, identities: Sequence, encounters: Sequence,
                       ks: Sequence[int] = (1, 5)) -> dict:
    """Leave-one-out retrieval: each photo queries all the others, except the photos of its own
    encounter, which are removed from its gallery. Queries without any other-encounter photo of
    their individual are skipped (counted in ``skipped_queries``). Ties in the ranking are broken
    against the query (a wrong item ranks first), so a constant score earns nothing."""
    S = np.asarray(similarity, dtype=np.float64)
    ids = np.asarray([str(i) for i in identities], dtype=object)
    enc = np.asarray([str(e) for e in encounters], dtype=object)
    n = len(ids)
    if S.shape != (n, n):
        raise ValueError(f"similarity is {S.shape}, expected ({n}, {n})")
    hits = {k: 0 for k in ks}
    aps = []
    skipped = 0
    for q in range(n):
        keep = enc != enc[q]
        rel = (ids == ids[q]) & keep
        if not rel.any():
            skipped += 1
            continue
        cand = np.flatnonzero(keep)
        # sort by score desc; among equal scores irrelevant items first (pessimistic ties)
        order = cand[np.lexsort((rel[cand].astype(int), -S[q, cand]))]
        r = rel[order]
        for k in ks:
            hits[k] += bool(r[:k].any())
        cum = np.cumsum(r)
        ranks = np.flatnonzero(r) + 1
        aps.append(float(np.mean(cum[r] / ranks)))
    nq = n - skipped
    out = {f"top{k}": (hits[k] / nq if nq else 0.0) for k in ks}
    out["mAP"] = float(np.mean(aps)) if aps else 0.0
    out["queries"] = nq
    out["skipped_queries"] = skipped
    return out


def known_unknown_accuracy(feed: Sequence[tuple[str, object, bool]]) -> dict:
    """BAKS / BAUS from decisions in feed order.

    ``feed`` is one ``(true identity, predicted deer, founded_new_deer)`` per encounter, in the
    order they were decided. See the module doc for the definitions."""
    seen: set[str] = set()
    members: dict[object, Counter] = defaultdict(Counter)   # predicted deer -> identities so far
    known_right: dict[str, list[bool]] = defaultdict(list)
    unknown_right: list[bool] = []
    for identity, deer, new in feed:
        identity = str(identity)
        if identity in seen:
            ok = False
            if not new and members[deer]:
                top = members[deer].most_common()
                ok = top[0][0] == identity and (len(top) == 1 or top[1][1] < top[0][1])
            known_right[identity].append(ok)
        else:
            unknown_right.append(bool(new))
            seen.add(identity)
        members[deer][identity] += 1
    per_id = [float(np.mean(v)) for v in known_right.values()]
    baks = float(np.mean(per_id)) if per_id else 0.0
    baus = float(np.mean(unknown_right)) if unknown_right else 0.0
    return {"baks": baks, "baus": baus, "balanced_accuracy": (baks + baus) / 2,
            "known_encounters": int(sum(len(v) for v in known_right.values())),
            "known_individuals": len(known_right), "unknown_encounters": len(unknown_right),
            "known_accuracy_pooled": (float(np.mean([x for v in known_right.values() for x in v]))
                                      if known_right else 0.0)}


def open_set_metrics(true_ids: Sequence, pred_deer: Sequence, feed: Sequence[tuple[str, object, bool]]) -> dict:
    """Pairwise precision/recall/F1, ARI, deer counts and BAKS/BAUS of one open-set run."""
    p = metrics.pairwise_prf(true_ids, pred_deer)
    n_pred, n_true = len(set(map(str, pred_deer))), len(set(map(str, true_ids)))
    out = {"pairwise_precision": p.precision, "pairwise_recall": p.recall, "pairwise_f1": p.f1,
           "ari": metrics.adjusted_rand_index(true_ids, pred_deer), "n_pred": n_pred, "n_true": n_true,
           "count_error": n_pred - n_true, "count_error_abs": abs(n_pred - n_true)}
    out.update(known_unknown_accuracy(feed))
    return out


# --------------------------------------------------------------------------------------------
# The pipeline's decision rule, replayed in memory (for threshold calibration)
# --------------------------------------------------------------------------------------------

def simulate_open_set(similarity: np.ndarray, encounters: Sequence[Sequence[int]], threshold: float,
                      cannot_link: Mapping[int, set[int]] | None = None) -> tuple[np.ndarray, list[bool]]:
    """The pipeline's match-or-create (``matching.decide_partition``) on a precomputed
    similarity matrix: encounters (lists of row indices) in the order given; the score of an
    encounter against a deer is the maximum over (encounter row x deer row) pairs; the encounter
    joins the best deer when that score is at least ``threshold``, otherwise it founds a deer.
    ``cannot_link[e]`` are encounters (by position) that may not share e's deer.

    Returns (deer index per row, founded-new flag per encounter)."""
    S = np.asarray(similarity, dtype=np.float32)
    n = S.shape[0]
    deer_of_row = np.full(n, -1, np.int64)
    deer_of_enc: list[int] = []
    gallery_rows: list[int] = []
    new_flags: list[bool] = []
    n_deer = 0
    for e, rows in enumerate(encounters):
        rows = list(rows)
        best_deer, best = -1, -np.inf
        if gallery_rows:
            g = np.asarray(gallery_rows)
            s = S[np.ix_(rows, g)].max(axis=0)
            per_deer = np.full(n_deer, -np.inf, np.float32)
            np.maximum.at(per_deer, deer_of_row[g], s)
            if cannot_link and cannot_link.get(e):
                for o in cannot_link[e]:
                    if o < e:
                        per_deer[deer_of_enc[o]] = -np.inf
            best_deer = int(np.argmax(per_deer))
            best = float(per_deer[best_deer])
        if best_deer >= 0 and best >= threshold:
            deer, new = best_deer, False
        else:
            deer, new = n_deer, True
            n_deer += 1
        deer_of_row[rows] = deer
        deer_of_enc.append(deer)
        gallery_rows += rows
        new_flags.append(new)
    return deer_of_row, new_flags


def threshold_grid(lo: float = 0.0, hi: float = 1.0, step: float = 0.01) -> list[float]:
    n = int(round((hi - lo) / step))
    return [round(lo + i * step, 6) for i in range(n + 1)]


def _count_key(r: dict, n_true: int) -> tuple:
    return (abs(r["n_pred"] - n_true), -r["f1"], -r["threshold"])


def calibrate_threshold(similarity: np.ndarray, identities: Sequence, encounters: Sequence[Sequence[int]],
                        cannot_link: Mapping[int, set[int]] | None = None) -> dict:
    """Thresholds chosen on a labelled (calibration) set by replaying the pipeline's decisions
    (:func:`simulate_open_set`) over a 0.01 grid on [0, 1], refined on a 0.001 grid around each
    optimum. Two rules:

    * ``threshold`` (the main one): the highest open-set pairwise F1 (``metrics.pairwise_prf``,
      picked by ``metrics.recommend_threshold``: ties to the higher threshold);
    * ``count_rule["threshold"]``: the number of deer found closest to the true number (ties:
      higher F1, then the higher threshold) - the operating point for population counts.

    Returns ``{"threshold", "f1", "precision", "recall", "rule", "n_pred", "n_true",
    "count_rule": {...}, "sweep": [coarse grid rows]}``."""
    n_true = len(set(map(str, identities)))

    def run(ts):
        rows = []
        for t in ts:
            pred, _ = simulate_open_set(similarity, encounters, t, cannot_link)
            m = metrics.pairwise_prf(identities, pred)
            rows.append({"threshold": float(t), "precision": m.precision, "recall": m.recall, "f1": m.f1,
                         "predicted_same": m.tp + m.fp, "n_pred": int(len(set(pred.tolist())))})
        return rows

    def around(t):
        return threshold_grid(max(0.0, round(t - 0.01, 6)), min(1.0, round(t + 0.01, 6)), 0.001)

    coarse = run(threshold_grid())
    best = metrics.recommend_threshold(coarse)
    t_f1 = best["threshold"] if best["threshold"] is not None else 1.0
    t_count = min(coarse, key=lambda r: _count_key(r, n_true))["threshold"]
    fine = run(sorted(set(around(t_f1)) | set(around(t_count))))
    sweep = sorted({r["threshold"]: r for r in coarse + fine}.values(), key=lambda r: r["threshold"])
    rec = metrics.recommend_threshold(sweep)
    chosen = next(r for r in sweep if r["threshold"] == rec["threshold"])
    rec.update(n_pred=chosen["n_pred"], n_true=n_true, sweep=coarse)
    c = min(sweep, key=lambda r: _count_key(r, n_true))
    rec["count_rule"] = {"threshold": c["threshold"], "f1": c["f1"], "precision": c["precision"],
                         "recall": c["recall"], "n_pred": c["n_pred"], "n_true": n_true,
                         "rule": "number of deer closest to the true number (ties: higher F1)"}
    return rec


# --------------------------------------------------------------------------------------------
# The isolated database
# --------------------------------------------------------------------------------------------

@contextmanager
def isolated_database(prefix: str = "deer_eval", base_url: str | None = None) -> Iterator[Engine]:
    """A fresh, migrated database for one evaluation, dropped afterwards.

    Embedded server (no ``DEER_DATABASE_URL``): ``CREATE DATABASE <prefix>_<random>`` on it.
    With ``DEER_DATABASE_URL``: a new database on that server when the role may create one,
    otherwise a new schema ``<prefix>_<random>`` in that database (search_path set to it, then
    public for the vector type), dropped with CASCADE afterwards. ``base_url`` overrides
    ``DEER_DATABASE_URL``."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    name = f"{prefix}_{secrets.token_hex(5)}"
    url = base_url or os.environ.get("DEER_DATABASE_URL")
    cleanup = None
    if url:
        base = make_url(db._sqlalchemy_url(url))
        admin = sa.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        try:
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
            eng_url = base.set(database=name)
            connect_args = {}

            def cleanup():
                with admin.connect() as conn:
                    conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        except sa.exc.DBAPIError:
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE SCHEMA "{name}"'))
            eng_url = base
            connect_args = {"options": f"-csearch_path={name},public"}

            def cleanup():
                with admin.connect() as conn:
                    conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
    else:
        server = db.embedded_server()
        server.psql(f'CREATE DATABASE "{name}";')
        eng_url = db._sqlalchemy_url(server.get_uri(name))
        connect_args = {}

        def cleanup():
            server.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE);')
    engine = sa.create_engine(eng_url, poolclass=NullPool, connect_args=connect_args)
    try:
        db.apply_migrations(engine)
        yield engine
    finally:
        engine.dispose()
        try:
            cleanup()
        except Exception as exc:  # never hide the real error behind a cleanup failure
            log.warning("could not drop the evaluation database %s: %s", name, exc)


# --------------------------------------------------------------------------------------------
# Running the pipeline on a labelled set
# --------------------------------------------------------------------------------------------

@dataclass
class PreparedSet:
    """One labelled set (calibration or evaluation) after ingestion, cropping and embedding."""

    role: str
    photos: list[LabelledPhoto]
    detection_ids: list[str]                     # one per photo, in photos order
    partitions: list[tuple[str, str]] = field(default_factory=list)   # (camera, day), time order
    order_source: str = ""
    ok: list[int] = field(default_factory=list)  # photo indices with every vector
    skipped: dict[str, str] = field(default_factory=dict)             # detection id -> reason
    captured_at: dict[str, datetime] = field(default_factory=dict)
    vectors: dict[str, np.ndarray] = field(default_factory=dict)      # model -> (len(ok), 512)
    legacy_features: np.ndarray | None = None                          # (len(ok), d_in)

    @property
    def ok_ids(self) -> list[str]:
        return [self.detection_ids[i] for i in self.ok]

    def identities(self) -> list[str]:
        return [self.photos[i].identity for i in self.ok]

    def label_encounters(self) -> list[str]:
        return [self.photos[i].encounter for i in self.ok]

    def feed_encounters(self) -> list[list[int]]:
        """Row groups (positions in ``ok``) per label encounter, in capture-time order (ties by
        detection id) - the order the pipeline decides them in."""
        groups: dict[str, list[int]] = defaultdict(list)
        for pos, i in enumerate(self.ok):
            groups[self.photos[i].encounter].append(pos)
        ids = self.ok_ids

        def key(rows):
            first = min(rows, key=lambda r: (self.captured_at.get(ids[r], SYNTH_BASE_TIME), ids[r]))
            return (self.captured_at.get(ids[first], SYNTH_BASE_TIME), ids[first])

        out = [sorted(rows, key=lambda r: (self.captured_at.get(ids[r], SYNTH_BASE_TIME), ids[r]))
               for rows in groups.values()]
        return sorted(out, key=key)


def _synthetic_times(photos: Sequence[LabelledPhoto], seed: int) -> list[datetime]:
    """Capture times for photos without any: encounters in a seeded random order, 1 s apart
    within an encounter and at least ``BURST_WINDOW_S`` + 5 s apart between encounters, so the
    pipeline's bursts are exactly the label encounters."""
    encs = sorted({p.encounter for p in photos})
    rng = np.random.default_rng(int(seed))
    order = [encs[i] for i in rng.permutation(len(encs))]
    size = Counter(p.encounter for p in photos)
    spacing = max(size.values()) + BURST_WINDOW_S + 5
    start = {e: SYNTH_BASE_TIME + timedelta(seconds=k * spacing) for k, e in enumerate(order)}
    seen: Counter = Counter()
    out = []
    for p in photos:
        out.append(start[p.encounter] + timedelta(seconds=seen[p.encounter]))
        seen[p.encounter] += 1
    return out


def write_detections_csv(path: Path, photos: Sequence[LabelledPhoto], role: str, seed: int) -> tuple[list[str], str]:
    """The labels as a detections CSV for ``ingest`` (our detection ids); returns (ids, order
    source). Without a box the box is the whole frame (ingest clips it to the photo)."""
    prefix = "cal" if role == "calibration" else "eval"
    ids = [f"{prefix}-{i:06d}" for i in range(len(photos))]
    if all(p.timestamp is not None for p in photos):
        times, order = [p.timestamp for p in photos], "timestamp"
    else:
        times, order = _synthetic_times(photos, seed), f"seeded encounter order (seed {seed})"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_path", "x", "y", "w", "h", "detection_id", "camera_id", "captured_at", "classification"])
        for did, p, t in zip(ids, photos, times):
            x, y, bw, bh = p.box if p.box is not None else (0, 0, 1e7, 1e7)
            cam = p.camera if p.camera else SYNTH_CAMERA[role]
            if role == "calibration" and p.camera:
                cam = f"cal-{p.camera}"[:64]
            w.writerow([p.image_path, x, y, bw, bh, did, cam, t.isoformat(), p.classification or "unknown"])
    return ids, order


def prepare_set(engine: Engine, photos: Sequence[LabelledPhoto], role: str, workdir: Path,
                crop_settings, seed: int) -> PreparedSet:
    """Ingest and crop one labelled set with the pipeline's code."""
    from deer_pipeline.cropping import crop_partition
    from deer_pipeline.ingest import ingest
    from deer_pipeline.settings import IngestSettings

    csv_path = workdir / f"{role}_detections.csv"
    ids, order = write_detections_csv(csv_path, photos, role, seed)
    report = ingest(engine, csv_path, format="csv", settings=IngestSettings(burst_window_s=BURST_WINDOW_S))
    ps = PreparedSet(role=role, photos=list(photos), detection_ids=ids, order_source=order)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT detection_id, status, reason, camera_id, day::text AS day, captured_at "
            "FROM detections WHERE detection_id = ANY(:ids)"), {"ids": ids}).all()
    by_id = {r.detection_id: r for r in rows}
    parts = {}
    for did in ids:
        r = by_id.get(did)
        if r is None:
            ps.skipped[did] = "not ingested (see ingest_rejections)"
        elif r.status != "ok":
            ps.skipped[did] = f"rejected at ingestion: {r.reason}"
        else:
            ps.captured_at[did] = r.captured_at
            key = (r.camera_id, r.day)
            parts[key] = min(parts.get(key, r.captured_at), r.captured_at)
    ps.partitions = sorted(parts, key=lambda k: (parts[k], k))
    for cam, day in ps.partitions:
        crop_partition(engine, cam, day, crop_settings)
    log.info("%s set: %d photos ingested (%s), %d skipped, %d partitions", role, len(ids) - len(ps.skipped),
             report.summary().splitlines()[0], len(ps.skipped), len(ps.partitions))
    return ps


def crop_items(engine: Engine, ps: PreparedSet, store_dir: str) -> list:
    from deer_pipeline.embedding_store import partition_crops
    from deer_pipeline.inference import CropItem

    wanted = set(ps.detection_ids)
    items = []
    for cam, day in ps.partitions:
        items += [CropItem(c.detection_id, c.crop_path, store_dir)
                  for c in partition_crops(engine, cam, day) if c.detection_id in wanted]
    return items


def embed_sets(engine: Engine, sets: Sequence[PreparedSet], methods: Sequence[rm.Method], store_dir: str,
               weights: str = "auto", device: str = "auto", batch_size: int = 32) -> dict:
    """Embed every ok crop of the sets with the pipeline's models; vectors are written to the
    store and kept in memory.

    The legacy method's input (the backbone's average-pooled last feature map) and the feature
    methods' vectors are taken from the SAME forward pass, by a forward hook on the pipeline's
    own backbone (:class:`reid_methods.FeatureSink`), when the pipeline runs that backbone;
    otherwise (or if the rows do not line up) a separate pass over the same crops computes them."""
    from deer_pipeline import embedding_store
    from deer_pipeline import embedders
    from deer_pipeline.inference import InferenceEngine, resolve_device

    t0 = time.perf_counter()
    pipeline_models = list(dict.fromkeys(m for meth in methods if meth.kind == "pipeline" for m in meth.models))
    extractors = [rm.FEATURES[meth.feature] for meth in methods if meth.kind == "features"]
    want_legacy = any(meth.kind == "legacy" for meth in methods)
    items = [it for ps in sets for it in crop_items(engine, ps, store_dir)]
    info: dict = {"versions": {}, "weights_used": {}, "failures": [], "seconds": {}}
    vecs: dict[str, dict[str, np.ndarray]] = defaultdict(dict)     # model -> detection id -> vector
    sinks = rm.backbone_sinks(extractors, "resnet50" if want_legacy else None, weights) \
        if (extractors or want_legacy) else []
    hooked: list = []
    sink_ids: list[str] | None = None
    if pipeline_models:
        eng = InferenceEngine(pipeline_models, weights=weights, device=device, batch_size=batch_size)
        eng.load()
        nets = {}
        for spec in eng.specs.values():       # the engine's own (cached) backbone networks
            nets[(spec.weights.backbone, spec.weights.sha256, spec.weights.source)] = embedders.load_backbone(
                spec.weights, spec.pooling, eng.device, eng.channels_last)
        handles = []
        for sink in sinks:
            net = nets.get((sink.rw.backbone, sink.rw.sha256, sink.rw.source))
            if net is not None:
                handles.append(sink.hook_on(net))
                hooked.append(sink)
        try:
            res = eng.embed(items)
        finally:
            for h in handles:
                h.remove()
        if any(s.rows != len(res.detection_ids) for s in hooked):   # e.g. a non-finite row was dropped
            log.warning("feature hook rows do not line up with the embedded crops; using a separate pass")
            sinks = rm.backbone_sinks(extractors, "resnet50" if want_legacy else None, weights)
            hooked = []
        else:
            sink_ids = list(res.detection_ids)
        info["device"] = eng.device
        info["backbone_passes_per_crop"] = eng.n_backbone_passes
        for m, spec in res.specs.items():
            embedding_store.register_version(engine, spec)
            embedding_store.write_embeddings(engine, spec.version,
                                             [(d, v, "ok", None) for d, v in zip(res.detection_ids, res.vectors[m])]
                                             + [(d, None, "failed", r) for d, r in res.failures])
            info["versions"][m] = spec.version
            info["weights_used"][m] = spec.weights_used
            vecs[m] = dict(zip(res.detection_ids, res.vectors[m]))
        info["failures"] += [list(f) for f in res.failures]
        info["seconds"]["pipeline_embedding"] = round(res.seconds, 2)
    legacy_feats: dict[str, np.ndarray] = {}
    rest = [s for s in sinks if s not in hooked]
    if rest:
        t1 = time.perf_counter()
        ids, failures = rm.run_sinks(items, rest, resolve_device(device), batch_size)
        info["seconds"]["extra_backbone_pass"] = round(time.perf_counter() - t1, 2)
        if sink_ids is not None and hooked and ids != sink_ids:
            raise EvaluationError("the extra backbone pass and the pipeline embedded different crops")
        sink_ids = ids
        info["failures"] += [list(f) for f in failures if list(f) not in info["failures"]]
    info["feature_source"] = {"hooked_on_pipeline_pass": [s.rw.backbone for s in hooked],
                              "separate_pass": [s.rw.backbone for s in rest]}
    if sinks:
        out = rm.sink_outputs(sinks)
        for ex in extractors:
            v = out["versions"][ex.name]
            rw = out["feature_backbones"][ex.name]
            embedding_store.register_version(engine, rm.feature_version_info(ex, rw, v))
            embedding_store.write_embeddings(engine, v, [(d, x, "ok", None) for d, x in zip(sink_ids, out["features"][ex.name])])
            info["versions"][ex.name] = v
            info["weights_used"][ex.name] = f"{ex.name}: {rw.description}"
            vecs[ex.name] = dict(zip(sink_ids, out["features"][ex.name]))
        if want_legacy:
            legacy_feats = dict(zip(sink_ids, out["legacy"]))
            info["weights_used"]["legacy"] = f"legacy: {out['legacy_backbone'].description}"
            info["legacy_d_in"] = int(out["legacy"].shape[1])
    models = list(vecs)
    for ps in sets:
        ps.ok = [i for i, d in enumerate(ps.detection_ids)
                 if d not in ps.skipped and all(d in vecs[m] for m in models)
                 and (not want_legacy or d in legacy_feats)]
        ok_set = set(ps.ok)
        for i, d in enumerate(ps.detection_ids):
            if d not in ps.skipped and i not in ok_set:
                ps.skipped[d] = "no crop or no vector (crop too small, undecodable or failed to embed)"
        ids = ps.ok_ids
        ps.vectors = {m: np.asarray([vecs[m][d] for d in ids], np.float32).reshape(len(ids), -1) for m in models}
        if want_legacy:
            ps.legacy_features = np.asarray([legacy_feats[d] for d in ids], np.float32)
    info["seconds"]["embedding_total"] = round(time.perf_counter() - t0, 2)
    return info


def method_similarity(ps: PreparedSet, method: rm.Method, legacy: rm.LegacyMatcher | None = None) -> np.ndarray:
    """(n x n) similarity of the set's ok photos under ``method`` (ensemble cosine; legacy: the
    cosine of its projected vectors)."""
    if method.kind == "legacy":
        v = legacy.embed(ps.legacy_features)
        return v @ v.T
    from deer_pipeline.matching import ensemble_similarity

    vs = {m: ps.vectors[m] / np.maximum(np.linalg.norm(ps.vectors[m], axis=1, keepdims=True), 1e-12)
          for m in method.models}
    return np.asarray(ensemble_similarity(vs, vs, dict(method.ensemble_weights)), np.float64)


def reset_identities(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE sightings, similarity_scores, deer_profile_vectors, deer "
                             "RESTART IDENTITY CASCADE"))


def run_pipeline_open_set(engine: Engine, ps: PreparedSet, method: rm.Method, threshold: float,
                          versions: Mapping[str, str]) -> tuple[list[int], list[tuple[str, object, bool]], float]:
    """Decide the set's partitions in time order with ``matching.decide_partition`` at
    ``threshold`` (from an empty identity store); returns (deer per ok photo, feed, seconds)."""
    from deer_pipeline.matching import decide_partition
    from deer_pipeline.settings import MatchingSettings

    t0 = time.perf_counter()
    reset_identities(engine)
    settings = MatchingSettings(reid_threshold=float(min(1.0, max(0.0, threshold))),
                                ensemble_weights=dict(method.ensemble_weights), search="exact")
    vers = {m: versions[m] for m in method.models}
    for cam, day in ps.partitions:
        decide_partition(engine, cam, day, settings, vers)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT detection_id, deer_id, decision FROM sightings WHERE detection_id = ANY(:ids)"),
            {"ids": ps.ok_ids}).all()
    got = {r.detection_id: (int(r.deer_id), r.decision) for r in rows}
    missing = [d for d in ps.ok_ids if d not in got]
    if missing:
        raise EvaluationError(f"the pipeline left {len(missing)} embedded photo(s) without a deer "
                              f"(e.g. {missing[:3]})")
    ids = ps.ok_ids
    deer = [got[d][0] for d in ids]
    feed = []
    truth = ps.identities()
    for rows_ in ps.feed_encounters():
        d = Counter(deer[r] for r in rows_).most_common(1)[0][0]
        new = any(got[ids[r]][1] == "new" for r in rows_)
        feed.append((Counter(truth[r] for r in rows_).most_common(1)[0][0], d, new))
    return deer, feed, time.perf_counter() - t0


def run_legacy_open_set(ps: PreparedSet, legacy: rm.LegacyMatcher) -> tuple[list[int], list[tuple[str, object, bool]]]:
    """The legacy method sighting by sighting in capture-time order (it had no encounters)."""
    legacy.frozen.clear()
    order = [r for rows in ps.feed_encounters() for r in rows]
    vecs = legacy.embed(ps.legacy_features)
    deer = [0] * len(order)
    new_row = {}
    for r in order:
        d, matched, _ = legacy.decide(vecs[r])
        deer[r] = d
        new_row[r] = not matched
    truth = ps.identities()
    feed = []
    for rows_ in ps.feed_encounters():
        d = Counter(deer[r] for r in rows_).most_common(1)[0][0]
        feed.append((Counter(truth[r] for r in rows_).most_common(1)[0][0], d, new_row[rows_[0]]))
    return deer, feed


def legacy_redraws(ps: PreparedSet, d_in: int, n: int) -> dict:
    """The legacy method's result depends on its projection, drawn anew in every process: run it
    ``n`` more times, each with a fresh projection, and report the spread of its open-set F1 and
    of the error of its number of deer (the headline legacy row is one such draw)."""
    if n <= 0:
        return {"n": 0}
    f1, err, npred = [], [], []
    truth = ps.identities()
    for _ in range(n):
        deer, feed = run_legacy_open_set(ps, rm.LegacyMatcher(d_in))
        m = open_set_metrics(truth, deer, feed)
        f1.append(m["pairwise_f1"])
        err.append(m["count_error_abs"])
        npred.append(m["n_pred"])

    def spread(v):
        return {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))}

    return {"n": n, "pairwise_f1": spread(f1), "count_error_abs": spread(err), "n_pred": spread(npred)}


def _cannot_link(ps: PreparedSet, feed: Sequence[Sequence[int]]) -> dict[int, set[int]]:
    """Encounters (by feed position) that share a photo: two animals at once."""
    by_image: dict[str, set[int]] = defaultdict(set)
    for e, rows in enumerate(feed):
        for r in rows:
            by_image[ps.photos[ps.ok[r]].image_path].add(e)
    out: dict[int, set[int]] = defaultdict(set)
    for es in by_image.values():
        if len(es) > 1:
            for e in es:
                out[e] |= es - {e}
    return dict(out)


# --------------------------------------------------------------------------------------------
# The whole evaluation
# --------------------------------------------------------------------------------------------

@dataclass
class EvaluationOptions:
    methods: Sequence[str] | None = None
    weights: str = "auto"
    device: str = "auto"
    batch_size: int = 32
    order_seed: int = 0
    database_url: str | None = None      # None: DEER_DATABASE_URL, else the embedded server
    legacy_redraws: int = 10             # extra legacy runs, each with a new projection (its spread)


def evaluate(labels_csv, images_root=None, calibration_labels_csv=None, calibration_images_root=None,
             split_by_identity_seed: int | None = None, options: EvaluationOptions | None = None,
             photos: Sequence[LabelledPhoto] | None = None,
             calibration_photos: Sequence[LabelledPhoto] | None = None) -> dict:
    """Run every method on the labelled photos and return the report (a JSON-able dict).

    ``split_by_identity_seed``: split ``labels_csv`` by identity into a calibration half and an
    evaluation half (only when no calibration labels are given). ``photos`` /
    ``calibration_photos`` may be passed instead of files (tests, subsets)."""
    options = options or EvaluationOptions()
    t_start = time.perf_counter()
    methods = rm.resolve_methods(options.methods)
    if photos is None:
        photos = read_labels(labels_csv, images_root)
    cal_photos = None
    split_note = None
    if calibration_photos is not None:
        cal_photos = list(calibration_photos)
    elif calibration_labels_csv:
        cal_photos = read_labels(calibration_labels_csv, calibration_images_root)
    elif split_by_identity_seed is not None:
        cal_photos, photos = split_by_identity(photos, split_by_identity_seed)
        split_note = f"labels split by identity with seed {split_by_identity_seed}: first half calibration"
    if cal_photos is not None:
        overlap = {p.identity for p in cal_photos} & {p.identity for p in photos}
        if overlap and split_by_identity_seed is None:
            log.warning("%d individual(s) appear in both the calibration and the evaluated labels", len(overlap))
    from deer_pipeline.settings import CropSettings

    report: dict = {
        "default_method": rm.DEFAULT_METHOD,
        "methods": {},
        "dataset": {
            "labels": str(labels_csv) if labels_csv else None,
            "images_root": str(images_root) if images_root else None,
            "calibration_labels": str(calibration_labels_csv) if calibration_labels_csv else None,
            "split": split_note,
            "evaluation": dataset_summary(photos),
            "calibration": dataset_summary(cal_photos) if cal_photos else None,
        },
        "definitions": {
            "closed_set": "leave-one-out over the evaluated photos; photos of the query's own encounter "
                          "are removed from its gallery; ties ranked pessimistically",
            "open_set": "pipeline match-or-create (matching.decide_partition) in capture-time order, "
                        "encounters decided together; pairwise metrics over photos",
            "baks": "per individual, share of its non-first encounters that joined the deer holding "
                    "most of its earlier sightings; averaged over individuals",
            "baus": "share of individuals' first encounters that founded a new deer",
            "threshold": "calibrated: max open-set pairwise F1 on the calibration labels (in-memory "
                         "replay of the pipeline rule, 0.01 then 0.001 grid, ties to the higher threshold)",
        },
    }
    timings: dict = {}
    with tempfile.TemporaryDirectory(prefix="deer-eval-") as tmp, \
            isolated_database(base_url=options.database_url) as engine:
        workdir = Path(tmp)
        crop_settings = CropSettings(store_dir=str(workdir / "crops"))
        t0 = time.perf_counter()
        ev = prepare_set(engine, photos, "evaluation", workdir, crop_settings, options.order_seed)
        sets = [ev]
        cal = None
        if cal_photos:
            cal = prepare_set(engine, cal_photos, "calibration", workdir, crop_settings, options.order_seed)
            sets.append(cal)
        timings["ingest_and_crop_s"] = round(time.perf_counter() - t0, 2)
        emb = embed_sets(engine, sets, methods, crop_settings.store_dir, options.weights, options.device,
                         options.batch_size)
        timings.update({f"{k}_s": v for k, v in emb["seconds"].items()})
        report["dataset"]["evaluation"]["order"] = ev.order_source
        report["dataset"]["evaluation"]["evaluated_photos"] = len(ev.ok)
        report["dataset"]["evaluation"]["skipped"] = dict(list(ev.skipped.items())[:50])
        report["dataset"]["evaluation"]["skipped_count"] = len(ev.skipped)
        if cal is not None:
            report["dataset"]["calibration"]["evaluated_photos"] = len(cal.ok)
            report["dataset"]["calibration"]["skipped_count"] = len(cal.skipped)
        if len(ev.ok) < 2:
            raise EvaluationError(f"only {len(ev.ok)} evaluated photo(s) could be embedded; "
                                  f"skipped: {dict(list(ev.skipped.items())[:5])}")
        legacy = rm.LegacyMatcher(emb["legacy_d_in"]) if "legacy_d_in" in emb else None
        ev_feed = ev.feed_encounters()
        ev_cl = _cannot_link(ev, ev_feed)
        cal_feed = cal.feed_encounters() if cal is not None and cal.ok else None
        curves: dict = {}
        for method in methods:
            tm = time.perf_counter()
            entry: dict = {"kind": method.kind, "description": method.description,
                           "weights": dict(method.ensemble_weights) or None}
            S = method_similarity(ev, method, legacy)
            entry["closed_set"] = closed_set_metrics(S, ev.identities(), ev.label_encounters())
            if method.kind == "legacy":
                entry["threshold"] = rm.LEGACY_THRESHOLD
                entry["threshold_source"] = "fixed at 0.60 in the legacy code (not calibrated)"
                deer, feed = run_legacy_open_set(ev, legacy)
                entry["open_set"] = open_set_metrics(ev.identities(), deer, feed)
                entry["backbone"] = emb["weights_used"].get("legacy")
                entry["projection"] = {"kind": "torch.nn.Linear default init, unseeded, drawn per process",
                                       "d_in": legacy.d_in, "sha256": legacy.projection_sha256}
                entry["redraws"] = legacy_redraws(ev, legacy.d_in, options.legacy_redraws)
            else:
                if cal_feed:
                    Sc = method_similarity(cal, method, legacy)
                    rec = calibrate_threshold(Sc, cal.identities(), cal_feed, _cannot_link(cal, cal_feed))
                    threshold = float(rec["threshold"])
                    entry["threshold_source"] = (f"calibration labels ({len(cal.ok)} photos, "
                                                 f"{len(set(cal.identities()))} individuals): {rec['rule']} of "
                                                 "the replayed open set")
                    entry["calibration"] = {k: rec[k] for k in ("f1", "precision", "recall", "n_pred", "n_true")}
                    count_rule = rec["count_rule"]
                    curves.setdefault("calibration_f1", {})[method.name] = rec["sweep"]
                else:
                    threshold = rm.default_threshold()
                    entry["threshold_source"] = "the pipeline's configured reid_threshold (no calibration labels)"
                entry["threshold"] = threshold
                deer, feed, secs = run_pipeline_open_set(engine, ev, method, threshold, emb["versions"])
                entry["open_set"] = open_set_metrics(ev.identities(), deer, feed)
                entry["open_set_seconds"] = round(secs, 2)
                sim_deer, _ = simulate_open_set(S, ev_feed, threshold, ev_cl)
                entry["replay_agreement_ari"] = metrics.adjusted_rand_index(deer, sim_deer)
                if cal_feed:
                    d2, f2, _ = run_pipeline_open_set(engine, ev, method, count_rule["threshold"], emb["versions"])
                    entry["count_operating_point"] = {
                        "threshold": count_rule["threshold"],
                        "threshold_source": "calibration labels: " + count_rule["rule"],
                        "calibration": {k: count_rule[k] for k in ("f1", "precision", "recall", "n_pred", "n_true")},
                        "open_set": open_set_metrics(ev.identities(), d2, f2)}
                entry["embedding_versions"] = {m: emb["versions"][m] for m in method.models}
                entry["backbone"] = [emb["weights_used"][m] for m in method.models]
                if method.name == rm.DEFAULT_METHOD and cal_feed:
                    t_conf = rm.default_threshold()
                    d2, f2, _ = run_pipeline_open_set(engine, ev, method, t_conf, emb["versions"])
                    entry["as_configured"] = {"threshold": t_conf,
                                              "open_set": open_set_metrics(ev.identities(), d2, f2)}
            curves.setdefault("pairs", {})[method.name] = _pair_curve(S, ev.identities(), ev.label_encounters())
            entry["seconds"] = round(time.perf_counter() - tm, 2)
            report["methods"][method.name] = entry
        reset_identities(engine)
    timings["total_s"] = round(time.perf_counter() - t_start, 2)
    report["timings"] = timings
    report["embedding"] = {k: emb[k] for k in ("versions", "weights_used", "feature_source", "backbone_passes_per_crop") if k in emb}
    report["embedding"]["device"] = emb.get("device")
    report["embedding"]["failures"] = emb["failures"][:20]
    report["environment"] = _environment()
    report["curves"] = curves
    report["substitution_note"] = _substitution_note(emb)
    report["verdict"] = verdict(report)
    return report


def _pair_curve(S: np.ndarray, identities: Sequence, encounters: Sequence) -> list[dict]:
    """Precision/recall over photo pairs from different encounters, per threshold."""
    ids = np.asarray([str(i) for i in identities], dtype=object)
    enc = np.asarray([str(e) for e in encounters], dtype=object)
    iu = np.triu_indices(len(ids), 1)
    keep = enc[iu[0]] != enc[iu[1]]
    scores = np.asarray(S)[iu][keep]
    same = (ids[iu[0]] == ids[iu[1]])[keep]
    if len(scores) == 0:
        return []
    lo, hi = float(np.quantile(scores, 0.5)), float(scores.max())
    ts = np.linspace(lo, hi, 60)
    return [{k: r[k] for k in ("threshold", "precision", "recall", "f1", "tp", "fp")}
            for r in metrics.threshold_sweep(scores, same, ts)]


def _substitution_note(emb: dict) -> str | None:
    subs = [w for w in emb.get("weights_used", {}).values() if "substitutes for" in w]
    if not subs:
        return None
    return ("No ImageNet ResNet50 / EfficientNet-B0 weights exist on this machine: with weights='auto' "
            "the offline EfficientNet-Lite0 backbone substitutes for them (v1_resnet50, efficientnet_b0 and "
            "legacy run on the Lite0 head, multiscale pools three Lite0 stages); the version strings say "
            "'-for-<backbone>'.")


def _environment() -> dict:
    import torch

    from deer_pipeline import __version__ as pkg_version  # type: ignore[attr-defined]

    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "deer_pipeline": pkg_version,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


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


# --------------------------------------------------------------------------------------------
# Output: table, JSON, HTML
# --------------------------------------------------------------------------------------------

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
