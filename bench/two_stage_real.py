"""Two-stage search against exhaustive exact scoring on REAL labelled photos (nyala-dev).

    DEER_DATA_DIR=/tmp/deer-two-stage-real nice .venv/bin/python bench/two_stage_real.py
    DEER_DATA_DIR=/tmp/deer-two-stage-real nice .venv/bin/python bench/two_stage_real.py --fresh  # embed again

(``--data`` names the labelled set, default ``../shared/data/nyala-dev``; the first run ingests,
crops and embeds it into the database ``two_stage_real`` of the embedded server in DEER_DATA_DIR
and keeps the prepared sets in ``DEER_DATA_DIR/two_stage_real/prepared.pkl``; later runs reuse
both, so only the decisions are timed again. ``--fresh`` prepares and embeds again.)

bench/matching.py measures two-stage search on synthetic clustered vectors, where a deer's mean
(profile) vector is a kind summary of its sightings. This script measures it on real photos of
179 individual nyala, with the pipeline's own code:

1. Embedding: the labels are split by identity (``split_by_identity``, seed 0) into a calibration
   and an evaluation half, each ingested, cropped and embedded as ``deer-pipeline evaluate`` does
   (``evaluation.prepare.prepare_set`` / ``embed_sets``, the default embedding configuration:
   ``EmbeddingSettings()``, ONNX Runtime on a CPU). Encounters get seeded synthetic capture
   times (the set has none), as in ``evaluate``.
2. Thresholds, all fixed before any decision is scored: the one ``evaluate`` chooses for the
   default method on the calibration half (max open-set cross-encounter F1 of the in-memory
   replay), ``evaluate``'s count operating point on the calibration half (number of deer
   closest to the number of individuals), the configured ``reid_threshold`` (0.60) and a fixed
   0.86 (where the calibration replay finds about twice as many deer as individuals: many small
   deer, the hardest list for a shortlist). With these weak features the first and third merge
   nearly every photo into a handful of deer, which a shortlist of 5 already covers.
3. Decisions, from an empty identity store, with ``matching.decide_partition`` in time order
   (the default method's settings, ``coarse_precision=float32``): ``search="exact"`` (the
   reference), then ``search="two_stage"`` with ``profile_candidate_deer`` in 5, 10, 20, 50. Two
   feeds: the evaluation half (~600 photos, its partitions in time order, as ``evaluate``
   decides it) and all photos (both halves' partitions decided jointly, their encounters
   interleaved in capture-time order: 1,213 photos, 179 individuals, a larger gallery).
   Per run: agreement with exact (same deer, compared by founding detection, and same
   matched/new decision, per photo), recall of exact's best candidate deer of each encounter
   (the deer it joined, or the best one that was not similar enough) among two-stage's recorded
   candidates of that encounter (``similarity_scores``, per photo; over every photo that had a
   candidate, and over the photos exact matched), and wall seconds.
4. Closed-set view, offline with numpy (the shortlist two-stage forms at decision time is not
   exposed by the matching code): encounters in the exact run's order; the gallery is every
   earlier encounter, grouped (a) into the deer exact scoring made of them, (b) into the true
   individuals. The best deer by best-pair score (flank-masked, as the cosine decision scores)
   is compared with the ranking by profile score (per model the unit mean of the deer's
   sightings, flanks mixed, as two-stage ranks); recall@K = the share of encounters (counted
   per photo) whose best-pair deer is among the top K by profile, and that deer's profile rank
   (99th percentile, worst). (b) also gives the closed-set top-1 of the true individual under
   both rankings. For (a) the replay is checked: every photo exact matched must have joined the
   replay's best-pair deer. For two operating points and the true individuals the ranking is
   also shown with per-flank profiles (a left photo against the mean of a deer's left
   sightings), which the pipeline does not have: an estimate of what per-flank profiles, one
   option issue 15 names, would change.

Prints a table and ends with ``two-stage on nyala-dev: agreement with exact at K=50: P%``, the
lowest agreement at K=50 over both feeds and all thresholds.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import os
import pickle
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DEER_DATA_DIR", "/tmp/deer-two-stage-real")

import numpy as np  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from deer_pipeline import db  # noqa: E402
from deer_pipeline.embedding.models import unit_rows  # noqa: E402
from deer_pipeline.evaluation import methods as rm  # noqa: E402
from deer_pipeline.evaluation.labels import read_labels, split_by_identity  # noqa: E402
from deer_pipeline.evaluation.openset import (  # noqa: E402
    _cannot_link,
    flank_masked,
    method_similarity,
    reset_identities,
)
from deer_pipeline.evaluation.prepare import PreparedSet, embed_sets, prepare_set  # noqa: E402
from deer_pipeline.evaluation.scoring import calibrate_threshold  # noqa: E402
from deer_pipeline.identity import gallery_cache  # noqa: E402
from deer_pipeline.identity.flanks import opposite_flanks, side_codes  # noqa: E402
from deer_pipeline.identity.matching import decide_partition, decide_partitions  # noqa: E402
from deer_pipeline.settings import CropSettings, EmbeddingSettings, MatchingSettings  # noqa: E402

DB_NAME = "two_stage_real"
KS = (5, 10, 20, 50)
SPLIT_SEED = 0
ORDER_SEED = 0
FIXED_THRESHOLD = 0.86     # above the count rule: the calibration replay finds ~2x the individuals


# -- preparing and embedding (cached) -----------------------------------------------------------
def open_engine(fresh: bool):
    if os.environ.get("DEER_DATABASE_URL"):
        raise SystemExit("bench/two_stage_real.py uses the embedded server: unset DEER_DATABASE_URL")
    server = db.embedded_server()
    if fresh:
        server.psql(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE);')
    db._ensure_database(server, DB_NAME)
    return db.get_engine(db._sqlalchemy_url(server.get_uri(DB_NAME)))


def labels_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepared_sets(data: Path, fresh: bool):
    """(engine, calibration set, evaluation set, embedding info, seconds spent preparing)."""
    work = db.data_dir() / DB_NAME
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "prepared.pkl"
    digest = labels_digest(data / "labels.csv")
    if not fresh and cache.exists():
        with open(cache, "rb") as fh:
            saved = pickle.load(fh)
        if saved.get("labels_sha256") == digest:
            engine = open_engine(False)
            ids = saved["cal"].ok_ids + saved["ev"].ok_ids
            with engine.connect() as conn:
                n = conn.execute(sa.text("SELECT count(DISTINCT detection_id) FROM embeddings "
                                         "WHERE detection_id = ANY(:i)"), {"i": ids}).scalar_one()
            if n == len(ids):
                print(f"reusing the prepared and embedded sets in {work} (database {DB_NAME})", flush=True)
                return engine, saved["cal"], saved["ev"], saved["emb"], 0.0
        print("cached sets do not match the labels or the database: preparing again", flush=True)
    t0 = time.perf_counter()
    engine = open_engine(True)
    photos = read_labels(data / "labels.csv", data)
    cal_photos, ev_photos = split_by_identity(photos, SPLIT_SEED)
    crop_settings = CropSettings(store_dir=str(work / "crops"))
    ev = prepare_set(engine, ev_photos, "evaluation", work, crop_settings, ORDER_SEED)
    cal = prepare_set(engine, cal_photos, "calibration", work, crop_settings, ORDER_SEED)
    method = rm.resolve_methods([rm.DEFAULT_METHOD])
    print(f"embedding {len(photos)} photos with the default embedding configuration ...", flush=True)
    emb = embed_sets(engine, [ev, cal], method, crop_settings.store_dir, EmbeddingSettings())
    with open(cache, "wb") as fh:
        pickle.dump({"labels_sha256": digest, "cal": cal, "ev": ev, "emb": emb}, fh)
    return engine, cal, ev, emb, time.perf_counter() - t0


# -- one feed of photos in capture-time order -------------------------------------------------
class Feed:
    """Photos of one or more prepared sets: ids, unit vectors per model, sides, identities and
    encounters (rows) in capture-time order, and the partitions to decide."""

    def __init__(self, name: str, sets: list[PreparedSet], joint: bool):
        self.name, self.joint = name, joint
        self.ids, self.identity, self.side, self.encounters, self.partitions = [], [], [], [], []
        vecs: dict[str, list[np.ndarray]] = {}
        keyed = []
        for ps in sets:
            base = len(self.ids)
            ids = ps.ok_ids
            self.ids += ids
            self.identity += ps.identities()
            self.side += [(ps.photos[i].side or "").strip().lower() or None for i in ps.ok]
            for m, v in ps.vectors.items():
                vecs.setdefault(m, []).append(v)
            for rows in ps.feed_encounters():
                first = min(ps.captured_at[ids[r]] for r in rows)
                keyed.append(((first, ids[rows[0]]), [base + r for r in rows]))
            self.partitions += list(ps.partitions)
        keyed.sort(key=lambda x: x[0])
        self.encounters = [rows for _, rows in keyed]
        self.vectors = {m: unit_rows(np.vstack(v)).astype(np.float64) for m, v in vecs.items()}
        self.codes = side_codes(self.side)

    def __len__(self) -> int:
        return len(self.ids)


# -- decisions through the pipeline ---------------------------------------------------------
def run_decisions(engine, feed: Feed, settings: MatchingSettings, versions: dict) -> dict:
    gallery_cache.clear()
    reset_identities(engine)
    t0 = time.perf_counter()
    if feed.joint:
        decide_partitions(engine, feed.partitions, settings, versions)
    else:
        for cam, day in feed.partitions:
            decide_partition(engine, cam, day, settings, versions)
    seconds = time.perf_counter() - t0
    with engine.connect() as conn:
        founder = dict(conn.execute(sa.text("SELECT deer_id, founding_detection_id FROM deer")).all())
        dec = {r[0]: (founder[r[1]], r[2]) for r in conn.execute(sa.text(
            "SELECT detection_id, deer_id, decision FROM sightings WHERE detection_id = ANY(:i)"),
            {"i": feed.ids})}
        # candidates per encounter (the unit decided): the union over its photos' recorded
        # candidates, and the best one (the deer the decision compared with the threshold)
        enc_of: dict[str, str] = {}
        enc_cands: dict[str, set] = {}
        enc_best: dict[str, str] = {}
        for d, e, c in conn.execute(sa.text(
                "SELECT detection_id, encounter_key, candidate_deer_id FROM similarity_scores "
                "WHERE detection_id = ANY(:i) ORDER BY similarity DESC, candidate_deer_id"), {"i": feed.ids}):
            f = founder.get(c, c)
            enc_of[d] = e
            enc_cands.setdefault(e, set()).add(f)
            enc_best.setdefault(e, f)
    cands = {d: enc_cands[e] for d, e in enc_of.items()}
    best = {d: enc_best[e] for d, e in enc_of.items()}
    missing = [d for d in feed.ids if d not in dec]
    if missing:
        raise SystemExit(f"{len(missing)} photo(s) of {feed.name} left without a deer, e.g. {missing[:3]}")
    return {"seconds": seconds, "dec": dec, "cands": cands, "best": best,
            "deer": len({f for f, _ in dec.values()}),
            "matched": sum(v[1] == "matched" for v in dec.values())}


def compare(exact: dict, other: dict) -> dict:
    """Per photo: same deer (by founding detection) and same decision; recall of exact's best
    candidate deer of the photo's encounter (the deer joined, or the best one that was not
    similar enough) among the other run's recorded candidates of that encounter (over all photos
    with a candidate; over the photos exact matched)."""
    de, do = exact["dec"], other["dec"]
    agree = sum(do.get(d) == v for d, v in de.items())
    hit_all = n_all = hit_m = n_m = 0
    for d, f in exact["best"].items():
        got = f in other["cands"].get(d, set())
        n_all += 1
        hit_all += got
        if de[d][1] == "matched":
            n_m += 1
            hit_m += got
    return {"agree": agree / len(de), "disagree": len(de) - agree,
            "best_recall": hit_all / max(n_all, 1), "best_recall_matched": hit_m / max(n_m, 1), "n_matched": n_m}


# -- offline closed-set view -----------------------------------------------------------------
def _unit_mean(sums: np.ndarray, dims: list[int]) -> np.ndarray:
    """Per model (column block) the sums brought to unit length: the profile vectors."""
    P = np.zeros_like(sums)
    o = 0
    for d in dims:
        blk = sums[:, o:o + d]
        P[:, o:o + d] = blk / np.maximum(np.linalg.norm(blk, axis=1, keepdims=True), 1e-12)
        o += d
    return P


def profile_vs_best_pair(feed: Feed, labels: list, weights: dict, ks=KS, matched: list | None = None,
                         per_flank: bool = False) -> dict:
    """Encounter by encounter in time order, the gallery = earlier encounters grouped by
    ``labels``: is the best deer by best-pair score (flank-masked) among the top K by profile
    score? Counted per photo. Also closed-set top-1 of the true identity by both rankings.
    ``matched`` (per photo, the exact run's decision): a check of this replay, the share of
    photos exact matched whose deer is the replay's best-pair deer. ``per_flank``: a photo of a
    known flank is ranked against each deer's profile of that flank's (and unknown) sightings
    only (what the pipeline does NOT do: its profiles mix flanks)."""
    models = list(weights)
    w = np.array([weights[m] for m in models])
    dims = [feed.vectors[m].shape[1] for m in models]
    X = np.hstack([feed.vectors[m] * w[i] for i, m in enumerate(models)])     # weights folded in
    U = np.hstack([feed.vectors[m] for m in models])
    groups = sorted(set(labels))
    gi = {g: i for i, g in enumerate(groups)}
    lab = np.array([gi[x] for x in labels])
    truth = np.array([gi.get(x, -1) for x in feed.identity]) if set(feed.identity) <= set(gi) else None
    sums = np.zeros((3, len(groups), U.shape[1]))     # per side code (0 unknown, 1 left, 2 right)
    count = np.zeros((3, len(groups)), np.int64)
    seen = np.zeros(len(groups), bool)
    gallery: list[int] = []
    hits = {k: 0 for k in ks}
    n = top1_pair = top1_prof = n_truth = n_matched = same_as_exact = 0
    ranks: list[tuple[int, int]] = []          # per encounter: (profile rank of the best-pair deer, deer then)
    for rows in feed.encounters:
        if gallery:
            g = np.array(gallery)
            S = X[rows] @ U[g].T                                     # ensemble cosine, rows x gallery
            S[opposite_flanks(feed.codes[rows], feed.codes[g])] = -np.inf
            best = np.full(len(groups), -np.inf)
            np.maximum.at(best, lab[g], S.max(axis=0))
            prof = np.full(len(groups), -np.inf)
            if per_flank:
                for r in rows:
                    c = int(feed.codes[r])
                    tot, cnt = (sums.sum(0), count.sum(0)) if c == 0 else (sums[c] + sums[0], count[c] + count[0])
                    ok = cnt > 0
                    prof[ok] = np.maximum(prof[ok], _unit_mean(tot[ok], dims) @ X[r])
            else:
                prof[seen] = (X[rows] @ _unit_mean(sums.sum(0)[seen], dims).T).max(axis=0)
            if np.isfinite(best).any():
                win = int(np.argmax(best))
                rank = int((prof > prof[win]).sum()) + 1            # ties in its favour: the order is by id
                ranks.append((rank, int(seen.sum())))
                n += len(rows)
                for k in ks:
                    hits[k] += len(rows) * (rank <= k)
                for r in rows if matched is not None else ():
                    if matched[r]:
                        n_matched += 1
                        same_as_exact += lab[r] == win
            if truth is not None:
                t = truth[rows[0]]
                if seen[t]:
                    n_truth += len(rows)
                    top1_pair += len(rows) * (np.isfinite(best).any() and int(np.argmax(best)) == t)
                    top1_prof += len(rows) * (int(np.argmax(prof)) == t)
        for r in rows:
            sums[feed.codes[r], lab[r]] += U[r]
            count[feed.codes[r], lab[r]] += 1
        seen = count.sum(0) > 0
        gallery += rows
    worst = max(ranks, default=(0, 0))
    out = {"n": n, "recall": {k: hits[k] / max(n, 1) for k in ks}, "worst": worst,
           "p99": float(np.percentile([r for r, _ in ranks], 99)) if ranks else 0.0, "deer": int(seen.sum())}
    if matched is not None:
        out["replay_check"] = f"{same_as_exact}/{n_matched}"
    if truth is not None:
        out.update(n_truth=n_truth, top1_pair=top1_pair / max(n_truth, 1), top1_profile=top1_prof / max(n_truth, 1))
    return out


# -- main ---------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "nyala-dev"))
    ap.add_argument("--fresh", action="store_true", help="ingest, crop and embed again")
    ap.add_argument("--feeds", nargs="*", default=["evaluation", "all"], choices=["evaluation", "all"])
    args = ap.parse_args()
    data = Path(args.data).resolve()
    if not (data / "labels.csv").exists():
        raise SystemExit(f"no labels.csv in {data} (give --data)")
    started = time.perf_counter()
    load = os.getloadavg()[0]
    print(f"# bench/two_stage_real.py {' '.join(sys.argv[1:])} on {platform.node()} "
          f"({platform.machine()}, {os.cpu_count()} cpu, load average {load:.1f}), "
          f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='minutes')}, data {data}, "
          f"data dir {db.data_dir()}", flush=True)
    engine, cal, ev, emb, prep_s = prepared_sets(data, args.fresh)
    print(f"prepared: calibration {len(cal.ok)} photos / {len(set(cal.identities()))} individuals, evaluation "
          f"{len(ev.ok)} / {len(set(ev.identities()))} ({ev.order_source}); embedding {emb.get('device')}, "
          f"versions {emb['versions']}; {prep_s:.0f} s preparing (0 = cached)", flush=True)
    method = rm.resolve_methods([rm.DEFAULT_METHOD])[0]
    weights = dict(method.ensemble_weights)
    versions = {m: emb["versions"][m] for m in method.models}
    cal_feed = cal.feed_encounters()
    rec = calibrate_threshold(flank_masked(method_similarity(cal, method), cal), cal.identities(), cal_feed,
                              _cannot_link(cal, cal_feed), method.encounter_pooling)
    cr = rec["count_rule"]
    thresholds = [("calibrated", float(rec["threshold"])), ("count rule", float(cr["threshold"])),
                  ("configured", rm.default_threshold()), ("fixed", FIXED_THRESHOLD)]
    print(f"thresholds: calibrated {thresholds[0][1]:.3f} (the default method's, as `evaluate` chooses it on the "
          f"calibration half: {rec['rule']}, {rec['n_pred']} deer for {rec['n_true']} individuals there); "
          f"count rule {cr['threshold']:.3f} (evaluate's count operating point on the calibration half: "
          f"{cr['n_pred']} deer for {cr['n_true']}); configured reid_threshold {thresholds[2][1]:.2f}; "
          f"fixed {FIXED_THRESHOLD:.2f} (fragments: more deer than individuals, a longer list to rank)", flush=True)
    feeds = {"evaluation": Feed("evaluation half", [ev], joint=False),
             "all": Feed("all photos", [cal, ev], joint=True)}
    base = MatchingSettings(ensemble_weights=weights, match_score=method.match_score,
                            encounter_pooling=method.encounter_pooling, coarse_precision="float32")
    rows, offline, headline = [], [], None
    for fname in args.feeds:
        feed = feeds[fname]
        for tname, t in thresholds:
            s_exact = dataclasses.replace(base, reid_threshold=t, search="exact")
            exact = run_decisions(engine, feed, s_exact, versions)
            rows.append((feed, tname, t, "exact", None, exact, None))
            print(f"  {feed.name} ({len(feed)} photos, {len(feed.partitions)} partition(s)), threshold {tname} "
                  f"{t:.3f}: exact {exact['seconds']:.2f} s, {exact['deer']} deer, {exact['matched']} matched",
                  flush=True)
            for k in KS:
                s2 = dataclasses.replace(base, reid_threshold=t, search="two_stage",
                                     profile_candidate_deer=k)
                two = run_decisions(engine, feed, s2, versions)
                c = compare(exact, two)
                rows.append((feed, tname, t, "two_stage", k, two, c))
                print(f"    two_stage K={k}: {two['seconds']:.2f} s, agreement {c['agree']:.2%} "
                      f"({c['disagree']} photos differ), best-candidate recall {c['best_recall']:.4f}", flush=True)
                if k == 50:
                    headline = c["agree"] if headline is None else min(headline, c["agree"])
            exact_labels = [exact["dec"][d][0] for d in feed.ids]
            matched = [exact["dec"][d][1] == "matched" for d in feed.ids]
            offline.append((feed, tname, t, False, profile_vs_best_pair(feed, exact_labels, weights, matched=matched)))
            if tname in ("count rule", "fixed"):
                offline.append((feed, tname, t, True, profile_vs_best_pair(feed, exact_labels, weights,
                                                                           matched=matched, per_flank=True)))
        for flank in (False, True):
            offline.append((feed, "truth", None, flank, profile_vs_best_pair(feed, feed.identity, weights,
                                                                             per_flank=flank)))

    print()
    print("| photos | threshold | search | K | deer | matched | agreement with exact | photos differing "
          "| exact's best candidate recalled (all / matched) | seconds |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for feed, tname, t, mode, k, r, c in rows:
        if c is None:
            print(f"| {feed.name} ({len(feed)}) | {tname} {t:.3f} | exact | - | {r['deer']} | {r['matched']} "
                  f"| reference | - | - | {r['seconds']:.2f} |")
        else:
            print(f"| {feed.name} ({len(feed)}) | {tname} {t:.3f} | two_stage | {k} | {r['deer']} | {r['matched']} "
                  f"| {c['agree']:.2%} | {c['disagree']} | {c['best_recall']:.4f} / {c['best_recall_matched']:.4f} "
                  f"({c['n_matched']}) | {r['seconds']:.2f} |")
    print()
    print("Closed-set view (offline, numpy): share of encounters (counted per photo) whose best deer by "
          "best-pair score is among the top K deer by profile score, gallery = earlier encounters")
    print("| photos | deer of the gallery | profiles | queries | " + " | ".join(f"recall@{k}" for k in KS)
          + " | rank by profile of the best-pair deer: 99th percentile, worst (deer then) | deer at the end "
          "| true individual top-1: best pair / profile |")
    print("|---|---|---|---:|" + "---:|" * len(KS) + "---:|---:|---:|")
    for feed, tname, t, flank, o in offline:
        who = "true individuals" if tname == "truth" else f"exact's deer at {tname} {t:.3f}"
        top1 = (f"{o['top1_pair']:.3f} / {o['top1_profile']:.3f} ({o['n_truth']})" if "top1_pair" in o
                else f"- (replay check: {o['replay_check']} matched photos in exact's deer)")
        print(f"| {feed.name} | {who} | {'per flank' if flank else 'mixed (pipeline)'} | {o['n']} | " + " | ".join(f"{o['recall'][k]:.4f}" for k in KS)
              + f" | {o['p99']:.0f}, {o['worst'][0]} ({o['worst'][1]}) | {o['deer']} | {top1} |")
    print(f"total {time.perf_counter() - started:.0f} s")
    if headline is not None:
        print("(the lowest agreement at K=50 over the feeds and thresholds above)")
        print(f"two-stage on nyala-dev: agreement with exact at K=50: {100 * headline:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
