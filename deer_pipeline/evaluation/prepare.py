"""Preparing a labelled set with the pipeline's own code: a detections CSV written from the labels, ingestion, cropping and embedding (plus the extra backbone pass for the legacy and feature methods)."""

from __future__ import annotations

import csv
import logging
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from deer_pipeline.evaluation import methods as rm
from deer_pipeline.evaluation.labels import EvaluationError, LabelledPhoto
from deer_pipeline.settings import BURST_WINDOW_S, EmbeddingSettings

log = logging.getLogger(__name__)


SYNTH_BASE_TIME = datetime(2024, 6, 1, tzinfo=timezone.utc)


SYNTH_CAMERA = {"evaluation": "eval", "calibration": "calib"}


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
    # individuals a threshold chosen on this set is meant for, when the set holds only some of
    # them (scoring.calibrate_threshold's prevalence correction); None: the set's own
    population: int | None = None

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


def _synthetic_times(photos: Sequence[LabelledPhoto], seed: int, by_date: bool = False) -> list[datetime]:
    """Capture times for photos without any: encounters in a seeded random order, 1 s apart
    within an encounter and at least ``BURST_WINDOW_S`` + 5 s apart between encounters, so the
    pipeline's bursts are exactly the label encounters. ``by_date``: the labels give dates only
    (midnight): the encounters keep their date (each on its own day, in the seeded order)."""
    encs = sorted({p.encounter for p in photos})
    rng = np.random.default_rng(int(seed))
    order = [encs[i] for i in rng.permutation(len(encs))]
    size = Counter(p.encounter for p in photos)
    spacing = max(size.values()) + BURST_WINDOW_S + 5
    if by_date:
        day = {p.encounter: p.timestamp for p in photos}
        order.sort(key=lambda e: day[e])                  # stable: the seeded order within a date
        rank: Counter = Counter()
        start = {}
        for e in order:
            start[e] = day[e] + timedelta(seconds=rank[day[e]] * spacing)
            rank[day[e]] += 1
    else:
        start = {e: SYNTH_BASE_TIME + timedelta(seconds=k * spacing) for k, e in enumerate(order)}
    seen: Counter = Counter()
    out = []
    for p in photos:
        out.append(start[p.encounter] + timedelta(seconds=seen[p.encounter]))
        seen[p.encounter] += 1
    return out


def dates_only(photos: Sequence[LabelledPhoto]) -> bool:
    """Do the labels give dates rather than capture times (every timestamp at midnight)?"""
    ts = [p.timestamp for p in photos]
    return bool(ts) and all(t is not None for t in ts) and all(
        (t.hour, t.minute, t.second, t.microsecond) == (0, 0, 0, 0) for t in ts)


def write_detections_csv(path: Path, photos: Sequence[LabelledPhoto], role: str, seed: int) -> tuple[list[str], str]:
    """The labels as a detections CSV for ``ingest`` (our detection ids); returns (ids, order
    source). Without a box the box is the whole frame (ingest clips it to the photo). Labels
    with dates only (every timestamp at midnight) are not capture times: put as they are, every
    photo of a day would be one burst at one instant, and the pipeline would join them."""
    prefix = "cal" if role == "calibration" else "eval"
    ids = [f"{prefix}-{i:06d}" for i in range(len(photos))]
    if dates_only(photos):
        times, order = _synthetic_times(photos, seed, by_date=True), f"labels' dates, seeded encounter order within a date (seed {seed})"
    elif all(p.timestamp is not None for p in photos):
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
    from deer_pipeline.detections.cropping import crop_partition
    from deer_pipeline.detections.ingest import ingest
    from deer_pipeline.settings import IngestSettings

    csv_path = workdir / f"{role}_detections.csv"
    ids, order = write_detections_csv(csv_path, photos, role, seed)
    # The labels name the photos (resolved against --images-root by read_labels): they are the image root.
    roots = (os.path.commonpath([os.path.dirname(p.image_path) for p in photos]),) if photos else ()
    report = ingest(engine, csv_path, format="csv", hold_outside_partitions=False,
                    settings=IngestSettings(burst_window_s=BURST_WINDOW_S, image_roots=roots))
    ps = PreparedSet(role=role, photos=list(photos), detection_ids=ids, order_source=order)
    sides = [{"d": d, "s": p.side.lower()} for d, p in zip(ids, photos)
             if p.side and p.side.lower() in ("left", "right")]
    if sides:   # the flank seen, where the labels know it (flank-aware matching uses it)
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE detections SET side = :s WHERE detection_id = :d"), sides)
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
        crop_partition(engine, cam, day, crop_settings, quiet=None)     # a bar on a terminal
    log.info("%s set: %d photos ingested (%s), %d skipped, %d partitions", role, len(ids) - len(ps.skipped),
             report.summary().splitlines()[0], len(ps.skipped), len(ps.partitions))
    return ps


def crop_items(engine: Engine, ps: PreparedSet, store_dir: str) -> list:
    from deer_pipeline.embedding.inference import CropItem
    from deer_pipeline.embedding.store import partition_crops

    wanted = set(ps.detection_ids)
    items = []
    for cam, day in ps.partitions:
        items += [CropItem(c.detection_id, c.crop_path, store_dir)
                  for c in partition_crops(engine, cam, day) if c.detection_id in wanted]
    return items


def embed_sets(engine: Engine, sets: Sequence[PreparedSet], methods: Sequence[rm.Method], store_dir: str,
               embedding: EmbeddingSettings | None = None) -> dict:
    """Embed every ok crop of the sets with the pipeline's models; vectors are written to the
    store and kept in memory.

    The legacy method's input (the backbone's average-pooled last feature map) and the feature
    methods' vectors are taken from the SAME forward pass, by a forward hook on the pipeline's
    own backbone (:class:`reid_methods.FeatureSink`, the whole crop's rows when the pipeline also
    embeds zooms), when the pipeline runs that backbone; otherwise (no whole crop among the
    zooms, or rows that do not line up) a separate pass over the same crops computes them."""
    from deer_pipeline.embedding import config as embedding_config
    from deer_pipeline.embedding import networks
    from deer_pipeline.embedding import store as embedding_store
    from deer_pipeline.embedding.inference import resolve_device

    embedding = embedding or EmbeddingSettings()
    weights = embedding.weights

    t0 = time.perf_counter()
    pipeline_models = list(dict.fromkeys(m for meth in methods if meth.kind == "pipeline" for m in meth.models))
    extractors = [rm.FEATURES[meth.feature] for meth in methods if meth.kind == "features"]
    want_legacy = any(meth.kind == "legacy" for meth in methods)
    if extractors or want_legacy:
        # the legacy and feature methods read the pipeline's backbone through forward hooks,
        # which only the eager network has (ONNX Runtime gives the same vectors, cosine 1.0)
        embedding = replace(embedding, backend="eager")
    items = [it for ps in sets for it in crop_items(engine, ps, store_dir)]
    info: dict = {"versions": {}, "weights_used": {}, "failures": [], "seconds": {}}
    vecs: dict[str, dict[str, np.ndarray]] = defaultdict(dict)     # model -> detection id -> vector
    sinks = rm.backbone_sinks(extractors, "resnet50" if want_legacy else None, weights) \
        if (extractors or want_legacy) else []
    hooked: list = []
    sink_ids: list[str] | None = None
    if pipeline_models:
        eng = embedding_config.engine(embedding, pipeline_models)
        eng.load()
        nets = {}
        for spec in eng.specs.values():       # the engine's own (cached) backbone networks
            nets[(spec.weights.backbone, spec.weights.sha256, spec.weights.source)] = networks.load_backbone(
                spec.weights, spec.pooling, eng.device, eng.channels_last)
        handles = []
        # the legacy and feature methods take the whole crop only: with crop zooms they keep the
        # whole crop's rows of the pipeline's pass, or get a pass of their own without it
        for sink in (sinks if 1.0 in eng.zooms else []):
            net = nets.get((sink.rw.backbone, sink.rw.sha256, sink.rw.source))
            if net is not None:
                handles.append(sink.hook_on(net, eng.zooms))
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
        ids, failures = rm.run_sinks(items, rest, resolve_device(embedding.device, embedding.gpu_index), embedding.batch_size)
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
