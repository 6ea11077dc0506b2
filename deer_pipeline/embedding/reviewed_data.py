"""Training data from people's confirmed review decisions (``deer-pipeline train --from-reviews``).

The review app records decisions about sightings (``identity_reviews``, see
:mod:`deer_pipeline.identity.reviews`); matching replays them so the stored deer honour every
standing decision (later decisions win). A training set learnt from them uses only what a person
confirmed:

* a sighting is **confirmed** as deer D when a standing ``same`` / ``merge`` / ``split``
  decision names it together with at least one other sighting that the store also holds in D
  (a person said "these are one animal" and the deer as decided now agrees);
* sightings a standing ``unidentifiable`` decision excludes never train;
* a deer that holds confirmed sightings from both sides of a standing ``different`` / ``new`` /
  ``split`` decision (one no later ``same`` / ``merge`` overrode) is left out with the reason
  counted: the decisions were recorded but not yet applied (``deer-pipeline review apply`` or
  the next materialisation replays them);
* the photo of a sighting is its crop from the crop store, its encounter is the sighting's
  ``encounter_key`` (burst track), its flank ``detections.side``;
* ``unnamed=True`` (``train --from-reviews --classes mixed``): every other decided sighting with
  a stored crop is added without a name (``labels.UNLABELLED``), so it trains by its burst track;
  sightings a person marked unidentifiable are not decided and so never among them, and confirmed
  sightings left out for a reason above stay out (their reason is in the card).

Identities are named ``deer-<id>``. Deer ids may change when a replay renumbers deer, so the
data hash is taken over the *groups* of detection ids (one group per deer, each detection with
its crop's sha256) rather than over the ids' numbers: the same confirmed sightings give the
same hash after a replay; the deer ids used are listed in the card next to it.

Plain logic; no Dagster.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from deer_pipeline import settings
from deer_pipeline.embedding.trained_model import TrainingError
from deer_pipeline.identity import reviews as rv

SOURCE = "confirmed review decisions"


@dataclass
class ReviewedTrainingSet:
    """The confirmed sightings that train: ``photos`` are ``LabelledPhoto`` rows of crops,
    ``detection_ids`` the sightings they are (aligned)."""

    photos: list                                                   # LabelledPhoto
    detection_ids: list[str]
    deer_of: dict[str, int]                                        # detection id -> deer id
    skipped: dict[str, list[str]] = field(default_factory=dict)    # reason -> detection ids
    decisions_used: int = 0                                        # standing same/merge/split decisions
    sha256: str = ""
    unnamed_ids: list[str] = field(default_factory=list)           # unnamed=True: the other sightings' ids

    def identities(self) -> dict[str, int]:
        """identity -> confirmed photos."""
        from deer_pipeline.evaluation.labels import UNLABELLED

        return dict(sorted(Counter(p.identity for p in self.photos if p.identity != UNLABELLED).items()))

    def card_data(self) -> dict:
        """What the model card records about the data (merged into its ``data`` block)."""
        named = [d for d in self.detection_ids if d in self.deer_of]
        return {"source_kind": "reviews", "sha256": self.sha256,
                "sha256_over": "groups of detection ids (one group per deer, and one of the unnamed sightings) "
                               "with their crops' sha256",
                "decisions_used": self.decisions_used,
                "deer_ids": sorted({self.deer_of[d] for d in named}),
                "detection_ids": sorted(named),
                "unnamed_sightings": len(self.unnamed_ids),
                "skipped_before_training": {k: len(v) for k, v in self.skipped.items()},
                "skipped_before_training_examples": {k: v[:5] for k, v in self.skipped.items()}}


def confirmed_sightings(conn: sa.Connection) -> tuple[dict[str, int], dict[str, list[str]], int]:
    """(detection id -> deer id of every confirmed sighting, reason -> detection ids left out,
    number of standing must-link decisions) from the standing decisions and the stored deer."""
    standing = rv.active_reviews(conn)
    c = rv.constraints_from(standing)
    involved = set().union(*(g for _, g in c.groups)) if c.groups else set()
    stored = rv.stored_deer(conn, involved)
    skipped: dict[str, list[str]] = defaultdict(list)
    confirmed: dict[str, int] = {}
    for _rid, g in c.groups:
        by_deer: dict[int, list[str]] = defaultdict(list)
        for d in g:
            if d in c.excluded or d not in stored:
                continue
            by_deer[stored[d]].append(d)
        for deer, members in by_deer.items():
            if len(members) >= 2:
                for d in members:
                    confirmed[d] = deer
    for d in sorted(involved):
        if d in confirmed:
            continue
        if d in c.excluded:
            skipped["marked unidentifiable"].append(d)
        elif d not in stored:
            skipped["not decided (no sighting stored)"].append(d)
        else:
            skipped["confirmed with no other sighting of its deer as decided now"].append(d)
    # cannot-links: a deer holding both sides of a standing cannot-link that no later must-link
    # overrode contradicts a person's decision (recorded but not yet applied)
    later_must = [(rid, g) for rid, g in c.groups]
    bad_deer: dict[int, int] = {}
    for rid, x, y in c.cannot:
        dx = {confirmed[d]: d for d in x if d in confirmed}
        dy = {confirmed[d]: d for d in y if d in confirmed}
        for deer in set(dx) & set(dy):
            xs = {d for d in x if confirmed.get(d) == deer}
            ys = {d for d in y if confirmed.get(d) == deer}
            if any(mrid > rid and (g & xs) and (g & ys) for mrid, g in later_must):
                continue
            bad_deer.setdefault(deer, rid)
    for deer, rid in sorted(bad_deer.items()):
        reason = (f"deer {deer} holds both sides of decision {rid} (different/new/split) that is not "
                  f"applied yet")
        for d in sorted(d for d, k in confirmed.items() if k == deer):
            skipped[reason].append(d)
            del confirmed[d]
    must = sum(1 for r in standing if r.kind in rv.MUST_KINDS + ("split",))
    return confirmed, dict(skipped), must


def reviewed_training_set(engine, crop_store, min_deer: int | None = None,
                          min_photos: int | None = None, unnamed: bool = False) -> ReviewedTrainingSet:
    """The training set of the confirmed sightings: one identity per deer with at least
    ``min_photos`` confirmed sightings whose crop is stored. Raises :class:`TrainingError`
    naming the problem when fewer than ``min_deer`` such deer remain. ``unnamed``: every other
    decided sighting with a stored crop follows, unnamed, with its burst track as encounter."""
    from deer_pipeline.evaluation.labels import UNLABELLED, LabelledPhoto

    min_deer = settings.REVIEW_TRAINING_MIN_DEER if min_deer is None else int(min_deer)
    min_photos = settings.REVIEW_TRAINING_MIN_PHOTOS if min_photos is None else int(min_photos)
    if min_deer < 2 or min_photos < 2:
        raise TrainingError(f"training from reviews needs min_deer >= 2 and min_photos >= 2 "
                            f"(got {min_deer}, {min_photos}): a metric is learnt from pairs")
    store = Path(crop_store).expanduser()
    with engine.connect() as conn:
        if not conn.execute(sa.text("SELECT to_regclass('identity_reviews') IS NOT NULL")).scalar_one():
            raise TrainingError("the database has no review decisions table (identity_reviews): run "
                                "`deer-pipeline db migrate` and review sightings first")
        confirmed, skipped, n_decisions = confirmed_sightings(conn)
        rows = conn.execute(sa.text(
            "SELECT s.detection_id, s.encounter_key, d.side, d.camera_id, d.captured_at, d.classification, "
            "c.crop_path, c.crop_sha256, c.status AS crop_status FROM sightings s "
            "JOIN detections d ON d.detection_id = s.detection_id "
            "LEFT JOIN crops c ON c.detection_id = s.detection_id "
            "WHERE s.detection_id = ANY(:ids) ORDER BY s.detection_id"), {"ids": sorted(confirmed)}).all()
        others = conn.execute(sa.text(
            "SELECT s.detection_id, s.encounter_key, d.side, d.camera_id, d.captured_at, d.classification, "
            "c.crop_path, c.crop_sha256 FROM sightings s "
            "JOIN detections d ON d.detection_id = s.detection_id "
            "JOIN crops c ON c.detection_id = s.detection_id AND c.status = 'ok' "
            "WHERE NOT (s.detection_id = ANY(:ids)) ORDER BY s.detection_id"),
            {"ids": sorted(confirmed)}).all() if unnamed else []
    skipped = {k: list(v) for k, v in skipped.items()}
    usable = []
    for r in rows:
        if r.crop_path is None or r.crop_status != "ok":
            skipped.setdefault(f"no stored crop ({r.crop_status or 'not cropped'})", []).append(r.detection_id)
        else:
            usable.append(r)
    per_deer = Counter(confirmed[r.detection_id] for r in usable)
    too_few = {deer for deer, n in per_deer.items() if n < min_photos}
    for r in usable:
        if confirmed[r.detection_id] in too_few:
            skipped.setdefault(f"deer with fewer than {min_photos} confirmed photos", []).append(r.detection_id)
    usable = [r for r in usable if confirmed[r.detection_id] not in too_few]
    n_deer = len({confirmed[r.detection_id] for r in usable})
    if n_deer < min_deer:
        left = "; ".join(f"{k}: {len(v)}" for k, v in sorted(skipped.items())) or "none"
        raise TrainingError(
            f"{SOURCE}: too few confirmed deer to train on: {n_deer} deer with at least {min_photos} "
            f"confirmed photos each, {min_deer} needed ({len(confirmed)} confirmed sightings of "
            f"{len(set(confirmed.values()))} deer from {n_decisions} standing same/merge/split decisions; "
            f"left out: {left}). Confirm more sightings in `deer-pipeline review` (S = same deer), or "
            f"train from a labels CSV with --labels")
    photos, ids = [], []
    for r in usable:
        deer = confirmed[r.detection_id]
        photos.append(LabelledPhoto(image_path=str(store / r.crop_path), identity=f"deer-{deer}",
                                    encounter=r.encounter_key, camera=r.camera_id, timestamp=r.captured_at,
                                    side=r.side or None, classification=r.classification))
        ids.append(r.detection_id)
    deer_of = {d: confirmed[d] for d in ids}
    groups: dict[int, list] = defaultdict(list)
    for r in usable:
        groups[confirmed[r.detection_id]].append([r.detection_id, r.crop_sha256 or ""])
    canon: list = sorted(sorted(g) for g in groups.values())
    left_out = {d for v in skipped.values() for d in v}      # confirmed but not training named: not unnamed either
    others = [r for r in others if r.detection_id not in left_out]
    for r in others:
        photos.append(LabelledPhoto(image_path=str(store / r.crop_path), identity=UNLABELLED,
                                    encounter=r.encounter_key, camera=r.camera_id, timestamp=r.captured_at,
                                    side=r.side or None, classification=r.classification))
        ids.append(r.detection_id)
    if unnamed:
        canon = [canon, sorted([r.detection_id, r.crop_sha256 or ""] for r in others)]
    sha = hashlib.sha256(json.dumps(canon).encode()).hexdigest()
    return ReviewedTrainingSet(photos, ids, deer_of, skipped, n_decisions, sha,
                               [r.detection_id for r in others])
