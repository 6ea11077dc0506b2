"""Labelled photos: the labels CSV (image_path, identity and optional encounter, side, time, box), the split by identity into a calibration and an evaluation half, and a summary of a set."""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Sequence

import numpy as np


log = logging.getLogger(__name__)


UNIDENTIFIED = ("unknown", "unidentified")   # identity values that name no individual: rows skipped


class EvaluationError(ValueError):
    """The labels or the options cannot be evaluated; the message says why."""


@dataclass(frozen=True)
class LabelledPhoto:
    """One labelled detection: a photo (or a box in it) of a known individual."""

    image_path: str                       # absolute
    identity: str
    encounter: str                        # label encounter id; else derived (see read_labels)
    camera: str | None = None
    timestamp: datetime | None = None
    side: str | None = None
    box: tuple[float, float, float, float] | None = None   # x, y, w, h in pixels
    classification: str | None = None
    line: int = 0
    encounter_given: bool = True          # False: no encounter_id in the labels (derived or the photo)


_BOX_COLUMNS = (("x", "y", "w", "h"), ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))


_TIME_COLUMNS = ("timestamp", "captured_at", "datetime", "date")   # the first one a row has


UNLABELLED = "unlabelled"         # identity of every row read with ``identities=False``


def read_labels(path, images_root=None, *, identities: bool = True, unnamed: bool = False) -> list[LabelledPhoto]:
    """Read a labels CSV; relative image paths are resolved against ``images_root`` (default:
    the CSV's folder). ``identities=False`` (training from encounters): the identity column is
    optional and never read; every photo's identity is ``UNLABELLED``, so encounters derived from
    capture times join photos by camera and time alone, as the pipeline's burst grouping does.
    ``unnamed=True`` (training with mixed classes): a row whose identity is empty or names no
    individual (``unknown``...) is read as ``UNLABELLED`` instead of refused or skipped.
    The flank is read from ``side`` (or ``flank``, ``viewpoint``, ``orientation``) as ingest
    reads it: ``left``, ``l``, ``frontleft``... -> left, likewise right, anything else unknown. Raises :class:`EvaluationError` naming the file and line on
    bad input."""
    from deer_pipeline.detections.formats import SIDE_FIELDS, parse_side, parse_time

    path = Path(path).expanduser()
    if not path.is_file():
        raise EvaluationError(f"labels file {path} does not exist")
    root = Path(images_root).expanduser() if images_root else path.parent
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "image_path" not in cols or ("identity" not in cols and identities and not unnamed):
            raise EvaluationError(f"{path}: needs the columns image_path and identity; has {', '.join(cols) or 'none'}")
        box_cols = next((bc for bc in _BOX_COLUMNS if all(c in cols for c in bc)), None)
        photos, unidentified = [], 0
        for row in reader:
            r = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
            line = reader.line_num
            if not r.get("image_path"):
                raise EvaluationError(f"{path}, line {line}: empty image_path")
            if not identities or (unnamed and (not r.get("identity")
                                               or r["identity"].lower() in UNIDENTIFIED)):
                r["identity"] = UNLABELLED
            if not r.get("identity"):
                raise EvaluationError(f"{path}, line {line}: empty identity")
            if r["identity"].lower() in UNIDENTIFIED:     # not an individual: would join unrelated animals
                unidentified += 1
                continue
            p = Path(os.path.expanduser(r["image_path"]))
            p = p if p.is_absolute() else root / p
            box = None
            if box_cols and all(r.get(c) for c in box_cols):
                try:
                    box = tuple(float(r[c]) for c in box_cols)
                except ValueError as exc:
                    raise EvaluationError(f"{path}, line {line}: bad box value: {exc}") from exc
            ts = None
            t_col = next((c for c in _TIME_COLUMNS if r.get(c)), None)
            if t_col:
                ts = parse_time(r[t_col])
                if ts is None:
                    raise EvaluationError(f"{path}, line {line}: cannot read {t_col} {r[t_col]!r}")
            photos.append(LabelledPhoto(
                image_path=os.path.abspath(p), identity=r["identity"],
                encounter=r.get("encounter_id") or f"{PHOTO_ENCOUNTER}{line}",
                encounter_given=bool(r.get("encounter_id")),
                camera=r.get("camera") or r.get("camera_id") or None, timestamp=ts,
                side=parse_side(next((r[c] for c in SIDE_FIELDS if r.get(c)), None))[0], box=box,
                classification=r.get("classification") or None,
                line=line))
    if unidentified:
        log.warning("%s: %d photos whose identity is %s skipped (no individual named)", path, unidentified,
                    " or ".join(repr(u) for u in UNIDENTIFIED))
    if not photos:
        raise EvaluationError(f"{path}: no labelled photos" + (f" ({unidentified} unidentified skipped)"
                                                               if unidentified else ""))
    return derive_encounters(photos)


PHOTO_ENCOUNTER = "photo:"       # prefix of an encounter that is one photo (no id, no timestamp)
BURST_ENCOUNTER = "burst:"       # prefix of an encounter derived from capture times


def derive_encounters(photos: Sequence[LabelledPhoto], window_s: float | None = None) -> list[LabelledPhoto]:
    """Photos without an ``encounter_id`` but with a timestamp get an encounter derived from
    time: the photos of one individual at one camera whose capture times are at most the burst
    window (``settings.BURST_WINDOW_S``) apart, in a chain, are one encounter - what the
    pipeline's burst grouping joins, so that such pairs count as grouping, not recognition, in
    the cross-encounter metrics. Photos with neither stay an encounter of their own."""
    from dataclasses import replace

    from deer_pipeline.settings import BURST_WINDOW_S

    window = BURST_WINDOW_S if window_s is None else float(window_s)
    rows = [i for i, p in enumerate(photos) if not p.encounter_given and p.timestamp is not None]
    if not rows:
        return list(photos)
    out = list(photos)
    rows.sort(key=lambda i: (photos[i].identity, photos[i].camera or "", photos[i].timestamp, i))
    current, last_key, last_t = "", None, None
    for i in rows:
        p = photos[i]
        key = (p.identity, p.camera or "")
        if key != last_key or (p.timestamp - last_t).total_seconds() > window:
            current = f"{BURST_ENCOUNTER}{p.identity}@{p.camera or '-'}@{p.timestamp.isoformat()}"
        out[i] = replace(p, encounter=current)
        last_key, last_t = key, p.timestamp
    return out


def without_identities(photos: Sequence[LabelledPhoto]) -> list[LabelledPhoto]:
    """The photos as training from encounters may see them: every identity ``UNLABELLED``, and
    every encounter that the labels did not give derived again from camera and capture time
    alone (``derive_encounters`` had used the identity to chain them)."""
    from dataclasses import replace

    out = [replace(p, identity=UNLABELLED,
                   encounter=p.encounter if p.encounter_given else f"{PHOTO_ENCOUNTER}{p.image_path}")
           for p in photos]
    return derive_encounters(out)


def named_half(photos: Sequence[LabelledPhoto], seed: int) -> list[LabelledPhoto]:
    """For training with mixed classes on one half of an identity split: the named photos split
    by identity with ``seed`` (as :func:`split_by_identity`); the calibration half keeps its
    identities, the other half (and any photo already ``UNLABELLED``) is read as unnamed
    (:func:`without_identities`: encounters not given in the labels are derived from camera and
    time alone), so a model trained on it never read an identity of the half evaluated."""
    named = [p for p in photos if p.identity != UNLABELLED]
    cal, other = split_by_identity(named, seed)
    return list(cal) + without_identities(list(other) + [p for p in photos if p.identity == UNLABELLED])


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


def _encounter_sources(photos: Sequence[LabelledPhoto]) -> dict:
    """How many photos' encounters came from the labels' encounter_id, from capture times
    (:func:`derive_encounters`), or are the photo alone."""
    src = Counter("encounter_id" if p.encounter_given
                  else "capture times (same individual and camera, burst window)" if p.timestamp is not None
                  else "the photo alone (no encounter_id, no timestamp)" for p in photos)
    return dict(src)


def dataset_summary(photos: Sequence[LabelledPhoto]) -> dict:
    per_id = Counter(p.identity for p in photos)
    encs = {p.encounter for p in photos}
    enc_per_id = Counter(pid for pid, _ in {(p.identity, p.encounter) for p in photos})
    return {
        "photos": len(photos), "individuals": len(per_id), "encounters": len(encs),
        "photos_per_individual": round(len(photos) / max(1, len(per_id)), 2),
        "individuals_seen_once": sum(1 for i in per_id if enc_per_id[i] == 1),
        "has_timestamps": all(p.timestamp is not None for p in photos),
        "encounters_from": _encounter_sources(photos),
        "has_boxes": any(p.box is not None for p in photos),
        "has_cameras": any(p.camera for p in photos),
        "sides": dict(Counter(p.side or "-" for p in photos)),
    }
