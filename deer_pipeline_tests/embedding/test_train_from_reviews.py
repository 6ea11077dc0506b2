"""``deer-pipeline train --from-reviews``: the training set is built from people's confirmed
review decisions in the real embedded PostgreSQL (confirmed same/merge/split sightings, the deer
as decided now, unidentifiable sightings out, cannot-links respected, encounters from the burst
tracks), too few confirmed deer is a clear refusal, and a tiny training run on the crops of
confirmed sightings lowers its loss and records in its card that the data came from reviews."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from deer_pipeline.embedding import reviewed_data, train_cli, trained_model
from deer_pipeline.embedding.trained_model import TrainingError
from deer_pipeline.identity import reviews
from deer_pipeline.identity.matching import decide_partition
from deer_pipeline_tests.identity.test_matching import SETTINGS, T0, SyntheticWorld, deer_of

DAY = "2024-05-01"


def _decide(engine):
    decide_partition(engine, "cam1", DAY, SETTINGS)


def _record(engine, kind, a, b=(), apply=True):
    with engine.begin() as conn:
        rid = reviews.record(conn, kind, list(a), list(b), reviewer="ann")
    if apply:
        reviews.apply(engine, list(a) + list(b))
    return rid


def _world(engine, layout: dict[str, int]) -> tuple[SyntheticWorld, dict[str, list[str]]]:
    """``layout`` identity -> sightings, each its own encounter (10 minutes apart), one camera-day."""
    w = SyntheticWorld(engine, noise=0.3)
    ids: dict[str, list[str]] = {}
    t = T0
    for k in range(max(layout.values())):
        for ident, n in layout.items():
            if k < n:
                ids.setdefault(ident, []).append(w.sighting("cam1", t, ident))
                t += timedelta(minutes=10)
    _decide(engine)
    return w, ids


def test_reviewed_sightings_become_the_training_rows_expected(engine, tmp_path):
    w, s = _world(engine, {"A": 4, "B": 3, "C": 2, "D": 3, "E": 2})
    a, b, c, d, e = (s[k] for k in "ABCDE")
    deer = deer_of(engine)
    assert len({deer[x] for x in a}) == 1 and len({deer[x] for x in b}) == 1   # matching joined them
    _record(engine, "same", [a[1]], [a[0]])
    _record(engine, "same", [a[2]], [a[0], a[1]])
    _record(engine, "same", [a[3]], [a[0]])
    _record(engine, "unidentifiable", [a[3]])                   # later: a[3] never trains
    _record(engine, "merge", [b[0]], [b[1], b[2]])
    # C: nobody reviewed it
    _record(engine, "same", [d[0]], [d[1], d[2]])
    _record(engine, "different", [d[2]], [d[0], d[1]])          # later cannot-link wins: d[2] out
    _record(engine, "same", [e[1]], [e[0]])
    _record(engine, "different", [e[1]], [e[0]], apply=False)   # recorded, not applied yet
    deer = deer_of(engine)
    assert deer[d[2]] != deer[d[0]] and deer[e[1]] == deer[e[0]]

    rs = reviewed_data.reviewed_training_set(engine, tmp_path, min_deer=3)
    rows = {det: p for det, p in zip(rs.detection_ids, rs.photos)}
    assert set(rows) == set(a[:3]) | set(b) | set(d[:2])
    for det, p in rows.items():
        assert p.identity == f"deer-{deer[det]}"
        assert p.image_path == str(tmp_path / f"{det}.jpg")       # the crop in the crop store
    assert rs.identities() == {f"deer-{deer[a[0]]}": 3, f"deer-{deer[b[0]]}": 3, f"deer-{deer[d[0]]}": 2}
    with engine.connect() as conn:
        keys = dict(conn.execute(sa.text("SELECT detection_id, encounter_key FROM sightings")).all())
    assert all(p.encounter == keys[det] for det, p in rows.items())
    assert rs.skipped["marked unidentifiable"] == [a[3]]
    assert d[2] in rs.skipped["confirmed with no other sighting of its deer as decided now"]
    held = [k for k in rs.skipped if k.startswith(f"deer {deer[e[0]]} holds both sides of decision")]
    assert len(held) == 1 and sorted(rs.skipped[held[0]]) == sorted(e)
    assert not set(c) & (set(rows) | {x for v in rs.skipped.values() for x in v})
    card = rs.card_data()
    assert card["source_kind"] == "reviews" and len(card["sha256"]) == 64
    assert card["deer_ids"] == sorted({deer[a[0]], deer[b[0]], deer[d[0]]})

    # --classes mixed: every other decided sighting follows unnamed, by its burst track; what was
    # left out for a reason (unidentifiable, cannot-linked, decisions not applied) stays out
    from deer_pipeline.evaluation.labels import UNLABELLED

    ru = reviewed_data.reviewed_training_set(engine, tmp_path, min_deer=3, unnamed=True)
    assert set(ru.unnamed_ids) == set(c) and ru.identities() == rs.identities()
    unnamed_rows = {det: p for det, p in zip(ru.detection_ids, ru.photos) if det in ru.unnamed_ids}
    assert all(p.identity == UNLABELLED and p.encounter == keys[det] for det, p in unnamed_rows.items())
    assert ru.card_data()["detection_ids"] == card["detection_ids"] and ru.card_data()["unnamed_sightings"] == 2
    assert ru.sha256 != rs.sha256

    # the same confirmed sightings give the same hash after a replay; one more decision changes it
    _decide(engine)
    assert reviewed_data.reviewed_training_set(engine, tmp_path, min_deer=3).sha256 == rs.sha256
    _record(engine, "same", [c[1]], [c[0]])
    rs2 = reviewed_data.reviewed_training_set(engine, tmp_path, min_deer=3)
    assert rs2.sha256 != rs.sha256 and len(rs2.identities()) == 4

    # too few confirmed deer: a refusal that names the problem
    with pytest.raises(TrainingError, match=r"too few confirmed deer to train on: 4 deer .* 5 needed"):
        reviewed_data.reviewed_training_set(engine, tmp_path, min_deer=5)


def test_no_reviews_is_a_clear_refusal_from_the_command(engine, tmp_path, capsys):
    _world(engine, {"A": 2, "B": 2})
    rc = train_cli.main(["--from-reviews", "--out", str(tmp_path / "m"), "--crop-store", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "too few confirmed deer to train on: 0 deer" in err
    assert "deer-pipeline review" in err
    assert not (tmp_path / "m" / trained_model.CARD_FILE).exists()


def _sample_crops(sample_dir: Path) -> dict[str, list]:
    """identity -> crops (PIL) of the sample's photos, from its truth boxes."""
    from PIL import Image

    from deer_pipeline.sample import read_truth

    out: dict[str, list] = {}
    for r in read_truth(sample_dir):
        with Image.open(sample_dir / r["file"]) as im:
            W, H = im.size
            x, y, w, h = (float(r[k]) for k in ("x", "y", "w", "h"))
            out.setdefault(r["identity"], []).append(
                im.convert("RGB").crop((int(x * W), int(y * H), int((x + w) * W), int((y + h) * H))))
    return out


def test_a_tiny_training_run_from_reviews_lowers_its_loss(engine, tmp_path, capsys):
    from deer_pipeline.sample import write_sample

    sample = tmp_path / "sample"
    write_sample(sample, n_cameras=1, n_days=1, n_deer=4, encounters_per_day=(5, 5))
    crops = _sample_crops(sample)
    layout = {ident: min(4, len(v)) for ident, v in sorted(crops.items())}
    assert len(layout) == 4 and min(layout.values()) >= 3
    _w, s = _world(engine, layout)
    store = tmp_path / "crops"
    store.mkdir()
    for ident, dets in s.items():
        for det, img in zip(dets, crops[ident]):
            img.save(store / f"{det}.jpg", quality=92)              # SyntheticWorld's crop_path
        _record(engine, "same", dets[1:], dets[:1])
    out = tmp_path / "model"
    rc = train_cli.main(["--from-reviews", "--crop-store", str(store), "--out", str(out), "--min-deer", "4",
                         "--epochs", "3", "--views", "1", "--probe-epochs", "1", "--frozen-blocks", "15",
                         "--threads", "2"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    card = json.loads((out / trained_model.CARD_FILE).read_text())
    losses = [r["loss"] for r in card["training"]["loss_curve"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    data = card["data"]
    assert data["source"] == reviewed_data.SOURCE and data["source_kind"] == "reviews"
    assert data["individuals_used"] == 4 and data["photos_used"] == sum(layout.values())
    deer = deer_of(engine)
    assert data["deer_ids"] == sorted({deer[d] for dets in s.values() for d in dets})
    assert data["identities"] == sorted(f"deer-{deer[dets[0]]}" for dets in s.values())
    rs = reviewed_data.reviewed_training_set(engine, store, min_deer=4)
    assert data["sha256"] == rs.sha256
    assert trained_model.read_card(out)["embedding_version"] == card["embedding_version"]
    assert json.loads(captured.out)["embedding_version"] == card["embedding_version"]
    # --classes mixed reads the same confirmed deer (here every sighting is confirmed: none unnamed)
    rc = train_cli.main(["--from-reviews", "--classes", "mixed", "--crop-store", str(store), "--out",
                         str(tmp_path / "mixed"), "--min-deer", "4", "--epochs", "2", "--views", "0",
                         "--probe-epochs", "1", "--frozen-blocks", "15", "--threads", "2"])
    assert rc == 0, capsys.readouterr().err
    mixed = trained_model.read_card(tmp_path / "mixed")["data"]
    assert mixed["classes"] == "mixed" and mixed["unnamed_sightings"] == 0 and "burst track" in mixed["source"]
    assert set(mixed["identities"]) == set(data["identities"])

    # the reid_model asset trains from the same reviews when configured to
    import dagster as dg

    from deer_pipeline.defs.reid_model import reid_model
    from deer_pipeline.defs.resources import CropStore, DeerDatabase

    res = dg.materialize([reid_model], resources={"database": DeerDatabase(), "crop_store": CropStore(root=str(store))},
                         run_config={"ops": {"reid_model": {"config": {
                             "from_reviews": True, "min_deer": 4, "epochs": 1, "views": 0, "device": "cpu",
                             "out_dir": str(tmp_path / "asset-model")}}}})
    meta = res.asset_materializations_for_node("reid_model")[0].metadata
    assert meta["data_source"].value == "reviews" and meta["data_sha256"].value == rs.sha256
    assert meta["individuals_used"].value == 4


def test_the_reid_model_asset_reads_reviews_when_configured_and_refuses_clearly(engine, tmp_path,
                                                                                  monkeypatch):
    import dagster as dg

    from deer_pipeline.defs.reid_model import reid_model
    from deer_pipeline.defs.resources import CropStore, DeerDatabase

    w, s = _world(engine, {"A": 2, "B": 2})
    _record(engine, "same", [s["A"][1]], [s["A"][0]])
    monkeypatch.delenv("DEER_TRAIN_LABELS", raising=False)
    monkeypatch.setenv("DEER_TRAIN_FROM_REVIEWS", "1")
    res = dg.materialize([reid_model], resources={"database": DeerDatabase(), "crop_store": CropStore(root=str(tmp_path))},
                         run_config={"ops": {"reid_model": {"config": {"out_dir": str(tmp_path / "m")}}}},
                         raise_on_error=False)
    assert not res.success
    failure = next(e for e in res.all_events if e.event_type_value == "STEP_FAILURE")
    message = str(failure.event_specific_data.error)
    assert "too few confirmed deer to train on: 1 deer" in message and "4 needed" in message
    assert not (tmp_path / "m" / trained_model.CARD_FILE).exists()
