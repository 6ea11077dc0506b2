"""``deer-pipeline train`` and ``deer-pipeline models register``: a tiny training run on the
sample lowers its loss, writes a checked model card and weights, and registering it changes the
pipeline's embedding version (and ``register default`` brings the old one back); bad labels and
photos give clear errors or counted skips; nothing half-written is registered."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from deer_pipeline import settings
from deer_pipeline.embedding import config as embedding_config
from deer_pipeline.embedding import (
    models_cli,
    registry,
    train_cli,
    trained_model,
    training,
)
from deer_pipeline.embedding.inference import InferenceEngine
from deer_pipeline.embedding.networks import clear_cache
from deer_pipeline.evaluation.labels import read_labels


def _labels_from_sample(sample_dir: Path, out: Path, limit_per_id: int | None = None) -> Path:
    """The sample's truth as a labels CSV in the format ``evaluate`` reads (boxes in pixels)."""
    from deer_pipeline.sample import FRAME_H, FRAME_W, read_truth

    rows, per_id = [], {}
    for r in read_truth(sample_dir):
        per_id[r["identity"]] = per_id.get(r["identity"], 0) + 1
        if limit_per_id and per_id[r["identity"]] > limit_per_id:
            continue
        rows.append([r["file"], r["identity"], float(r["x"]) * FRAME_W, float(r["y"]) * FRAME_H,
                     float(r["w"]) * FRAME_W, float(r["h"]) * FRAME_H])
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_path", "identity", "x", "y", "w", "h"])
        w.writerows(rows)
    return out


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory):
    from deer_pipeline.sample import write_sample

    d = tmp_path_factory.mktemp("sample")
    write_sample(d, n_cameras=1, n_days=1, n_deer=4, encounters_per_day=(5, 5))
    return d


@pytest.fixture(scope="module")
def trained(small_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "m"
    labels = _labels_from_sample(small_sample, small_sample / "labels.csv")
    rc = train_cli.main(["--labels", str(labels), "--images-root", str(small_sample), "--out", str(out),
                         "--epochs", "3", "--views", "1", "--probe-epochs", "1", "--frozen-blocks", "15",
                         "--threads", "2"])
    assert rc == 0
    return out


def test_training_lowers_the_loss_and_writes_a_checked_card(trained):
    card = json.loads((trained / trained_model.CARD_FILE).read_text())
    losses = [r["loss"] for r in card["training"]["loss_curve"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert card["embedding_version"].startswith("trained:efficientnet_lite0@trained-")
    assert card["weights"]["sha256"][:12] in card["embedding_version"]
    assert card["data"]["individuals_used"] == 4 and card["data"]["photos_used"] > 6
    assert len(card["data"]["sha256"]) == 64 and card["training"]["seed"] == 0
    assert trained_model.read_card(trained)["embedding_version"] == card["embedding_version"]


def test_trained_model_embeds_unit_vectors_and_registering_changes_the_version(trained, small_sample, monkeypatch,
                                                                                tmp_path, capsys):
    monkeypatch.setenv("DEER_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("DEER_EMBEDDING_MODELS", raising=False)
    clear_cache()
    before = embedding_config.code_version(settings.EmbeddingSettings.from_environment())
    before_versions = embedding_config.versions(settings.EmbeddingSettings.from_environment())
    assert models_cli.main(["register", str(trained)]) == 0
    config = settings.EmbeddingSettings.from_environment()
    assert config.models == ("trained",)
    assert settings.configured_ensemble_weights() == {"trained": 1.0}
    version = embedding_config.versions(config)["trained"]
    # the card names the model's own version (the whole crop); the pipeline adds its crop zooms
    from deer_pipeline.embedding.models import zoom_label

    assert version == json.loads((trained / trained_model.CARD_FILE).read_text())["embedding_version"] \
        + zoom_label(config.zooms)
    assert embedding_config.code_version(config) != before             # embeddings partitions go stale
    photos = sorted(small_sample.rglob("*.jpg"))[:3]
    res = InferenceEngine(["trained"], weights={"trained": str(trained)}, device="cpu").embed_images(photos)
    v = res.vectors["trained"]
    assert v.shape == (3, 512) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert models_cli.main(["register", "default"]) == 0                 # roll back
    config = settings.EmbeddingSettings.from_environment()
    assert embedding_config.code_version(config) == before
    assert embedding_config.versions(config) == before_versions


def test_half_written_or_altered_models_are_never_registered(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("DEER_DATA_DIR", str(tmp_path / "data"))
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(trained / trained_model.WEIGHTS_FILE, half / trained_model.WEIGHTS_FILE)     # no card: unfinished
    with pytest.raises(registry.RegistryError, match="holds no model_card.json"):
        registry.register(str(half))
    altered = tmp_path / "altered"
    shutil.copytree(trained, altered)
    with open(altered / trained_model.WEIGHTS_FILE, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(registry.RegistryError, match="does not match the model card"):
        registry.register(str(altered))
    assert settings.registered_embedder() is None


def test_one_photo_per_individual_is_a_clear_error(small_sample, tmp_path, capsys):
    labels = _labels_from_sample(small_sample, tmp_path / "one.csv", limit_per_id=1)
    rc = train_cli.main(["--labels", str(labels), "--images-root", str(small_sample), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert rc == 2 and str(labels) in err and "at least two individuals with at least two" in err
    assert not (tmp_path / "m" / trained_model.CARD_FILE).exists()


def test_unreadable_photos_are_skipped_and_counted(small_sample, tmp_path):
    labels = _labels_from_sample(small_sample, tmp_path / "l.csv")
    photos = read_labels(labels, small_sample)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    photos.append(type(photos[0])(image_path=str(bad), identity=photos[0].identity, encounter="x"))
    ts = training.prepare_training_set(photos, str(labels))
    assert len(ts.photos) == len(photos) - 1
    assert ts.skipped_counts() == {"unreadable photo (UnidentifiedImageError)": 1}
    assert str(bad) in ts.skipped["unreadable photo (UnidentifiedImageError)"][0]


def test_individuals_seen_once_never_join_the_held_out_split(small_sample, tmp_path):
    labels = _labels_from_sample(small_sample, tmp_path / "l.csv")
    photos = read_labels(labels, small_sample)          # no encounter ids: every photo its own
    single = type(photos[0])(image_path=photos[0].image_path, identity="seen-once", encounter="e1")
    photos = photos + [single, type(single)(image_path=photos[1].image_path, identity="seen-once", encounter="e1")]
    tr, va = training.split_individuals(photos, 0, 0.5)
    assert all(photos[i].identity != "seen-once" for i in va)
    assert any(photos[i].identity == "seen-once" for i in tr)


def _encounter_labels(sample_dir: Path, out: Path) -> tuple[Path, list]:
    """The sample's photos as encounters of two photos of one animal, with no identity column."""
    from deer_pipeline.sample import read_truth

    rows, seen = [], {}
    for r in read_truth(sample_dir):
        k = seen[r["identity"]] = seen.get(r["identity"], -1) + 1
        rows.append([r["file"], f"{r['identity']}-{k // 2}"])
    with open(out, "w", newline="") as fh:
        csv.writer(fh).writerows([["image_path", "encounter_id"]] + rows)
    return out, rows


def _tiny_training(sample_dir: Path, labels: Path, out: Path, capsys, *extra: str) -> dict:
    """``train`` for 3 quick epochs with ``extra`` arguments; checks that it succeeds and that the
    loss falls; returns the card."""
    rc = train_cli.main(["--labels", str(labels), "--images-root", str(sample_dir), "--out", str(out),
                         *extra, "--epochs", "3", "--views", "1", "--probe-epochs", "1",
                         "--frozen-blocks", "15", "--threads", "2"])
    assert rc == 0, capsys.readouterr().err
    card = json.loads((out / trained_model.CARD_FILE).read_text())
    losses = [r["loss"] for r in card["training"]["loss_curve"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    return card


def test_training_from_encounters_reads_no_identity(small_sample, trained, tmp_path, capsys):
    """``--classes encounter``: a CSV with no identity column, each encounter (two photos of one
    animal here) its own class; nothing held out, every epoch run, the loss falls, the card names
    no individual, and the version differs from the identity-trained model's."""
    labels, rows = _encounter_labels(small_sample, tmp_path / "encounters.csv")
    card = _tiny_training(small_sample, labels, tmp_path / "m", capsys, "--classes", "encounter")
    assert card["training"]["validation_top1"] is None and card["training"]["best_epoch"] == -1
    d = card["data"]
    assert d["classes"] == "encounter" and d["identities"] == [] and d["individuals_used"] == 0
    n_enc = len({e for _, e in rows if sum(1 for _, x in rows if x == e) >= 2})
    assert d["encounters_used"] == n_enc and d["validation_photos"] == 0
    assert "encounter with a single usable photo" in d["skipped"] or n_enc * 2 == len(rows)
    assert card["method"]["classes"].startswith("encounters")
    assert card["embedding_version"] != trained_model.read_card(trained)["embedding_version"]


def test_training_from_encounters_refuses_identity_splits(small_sample, tmp_path, capsys):
    labels = _labels_from_sample(small_sample, tmp_path / "l.csv")
    rc = train_cli.main(["--labels", str(labels), "--images-root", str(small_sample), "--out", str(tmp_path / "m"),
                         "--classes", "encounter", "--split-by-identity", "0"])
    assert rc == 2 and "--classes encounter reads no identity" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def _labels_for(sample_dir: Path, out: Path, identities: set[str]) -> Path:
    full = _labels_from_sample(sample_dir, out.with_suffix(".all.csv"))
    with open(full, newline="") as fh:
        rows = list(csv.reader(fh))
    with open(out, "w", newline="") as fh:
        csv.writer(fh).writerows([rows[0]] + [r for r in rows[1:] if r[1] in identities])
    return out


def test_evaluate_trains_on_the_calibration_half_and_never_on_evaluated_individuals(
        small_sample, trained, tmp_path, capsys, monkeypatch):
    from deer_pipeline.evaluation import cli as evaluation_cli

    monkeypatch.setenv("DEER_WEIGHTS_DIR", str(tmp_path / "no-weights"))
    ids = sorted({r[1] for r in csv.reader(open(_labels_from_sample(small_sample, tmp_path / "a.csv")))} - {"identity"})
    cal = _labels_for(small_sample, tmp_path / "cal.csv", set(ids[:2]))
    ev = _labels_for(small_sample, tmp_path / "ev.csv", set(ids[2:]))
    common = ["--labels", str(ev), "--images-root", str(small_sample), "--calibration-labels", str(cal),
              "--calibration-images-root", str(small_sample), "--legacy-redraws", "0", "--device", "cpu"]
    # a model trained on every individual may not be evaluated on any of them
    rc = evaluation_cli.main(common + ["--methods", "default", "trained", "--model-file", str(trained),
                                       "--out", str(tmp_path / "r0.json")])
    assert rc == 2 and "was trained on 2 of the evaluated individuals" in capsys.readouterr().err
    rc = evaluation_cli.main(common + ["--methods", "default", "trained", "miewid", "--train-split",
                                       "--train-epochs", "2", "--train-views", "0",
                                       "--out", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["methods"]) == {"default", "trained"}
    assert "deer-pipeline weights fetch miewid" in report["skipped_methods"]["miewid"]
    tm = report["trained_model"]
    assert tm["trained_in_this_run"] and tm["data"]["individuals_used"] == 2
    # the card lists the photos it trained on (file sha256): none of the evaluated ones, except a
    # frame shared with a calibration animal (two deer in one photo)
    files = {name: {r[0] for r in list(csv.reader(open(tmp_path / f"{name}.csv")))[1:]} for name in ("cal", "ev")}
    ev_rows = [r[0] for r in list(csv.reader(open(ev)))[1:]]
    assert tm["evaluated_photos_trained_on"] == sum(f in files["cal"] for f in ev_rows)
    assert tm["embedding_version"] == report["methods"]["trained"]["embedding_versions"]["trained"]
    assert 0.0 <= report["methods"]["trained"]["closed_set"]["top1"] <= 1.0
    assert "skipped miewid" in out and "trained model:" in out


def _evaluate_trained_in_run(sample_dir: Path, tmp_path: Path, capsys, header: list, rows: list,
                             cal_ids: set, flag: str, other_flag: str) -> tuple[dict, str]:
    """Write the rows of ``cal_ids`` as calibration labels and the others as evaluated labels,
    check that ``flag`` with ``other_flag`` is refused, run ``evaluate flag`` (2 epochs) and
    return (the report's trained model, the printed output)."""
    from deer_pipeline.evaluation import cli as evaluation_cli

    for name, keep in (("cal", lambda r: r[1] in cal_ids), ("ev", lambda r: r[1] not in cal_ids)):
        with open(tmp_path / f"{name}.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([header] + [r for r in rows if keep(r)])
    common = ["--labels", str(tmp_path / "ev.csv"), "--images-root", str(sample_dir),
              "--calibration-labels", str(tmp_path / "cal.csv"), "--calibration-images-root", str(sample_dir),
              "--legacy-redraws", "0", "--device", "cpu", "--methods", "default", "trained"]
    rc = evaluation_cli.main(common + [flag, other_flag, "--out", str(tmp_path / "x.json")])
    assert rc == 2 and "give one of --model-file, --train-split, --train-encounters and" in capsys.readouterr().err
    rc = evaluation_cli.main(common + [flag, "--train-epochs", "2", "--train-views", "0",
                                       "--out", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads((tmp_path / "r.json").read_text())["trained_model"], out


def test_evaluate_trains_on_encounters_of_every_photo_without_identities(small_sample, tmp_path, capsys,
                                                                        monkeypatch):
    """``evaluate --train-encounters``: the method ``trained`` learns in the run from the encounters
    of the calibration and the evaluated photos, no identity read; its threshold still comes from
    the calibration labels. It cannot be combined with another source of the trained model."""

    monkeypatch.setenv("DEER_WEIGHTS_DIR", str(tmp_path / "no-weights"))
    with open(_labels_from_sample(small_sample, tmp_path / "all.csv"), newline="") as fh:
        rows = list(csv.reader(fh))
    seen, body = {}, []
    for r in rows[1:]:
        k = seen[r[1]] = seen.get(r[1], -1) + 1
        body.append(r[:2] + [f"{r[1]}-{k // 2}"] + r[2:])
    ids = sorted(seen)
    tm, out = _evaluate_trained_in_run(small_sample, tmp_path, capsys, rows[0][:2] + ["encounter_id"] + rows[0][2:],
                                       body, set(ids[:2]), "--train-encounters", "--train-split")
    assert tm["trained_in_this_run"] and tm["data"]["classes"] == "encounter"
    pairs = [e for e in {r[2] for r in body} if sum(1 for r in body if r[2] == e) >= 2]
    assert tm["data"]["individuals_used"] == 0 and tm["data"]["encounters_used"] == len(pairs)
    assert tm["training"]["epochs_run"] == 2 and "without identity labels" in out
    trained_files = {r[0] for r in body if r[2] in pairs}
    ev_rows = [r for r in body if r[1] in set(ids[2:])]
    assert tm["evaluated_photos_trained_on"] == sum(r[0] in trained_files for r in ev_rows) > 0
    assert f"{tm['evaluated_photos_trained_on']} of the evaluated photos among them" in out


def test_reid_model_asset_records_the_model_card(small_sample, tmp_path, monkeypatch):
    import dagster as dg

    from deer_pipeline.defs.reid_model import reid_model
    from deer_pipeline.defs.resources import CropStore, DeerDatabase

    resources = {"database": DeerDatabase(), "crop_store": CropStore()}
    monkeypatch.delenv("DEER_TRAIN_LABELS", raising=False)
    monkeypatch.delenv("DEER_TRAIN_FROM_REVIEWS", raising=False)
    res = dg.materialize([reid_model], resources=resources)
    meta = res.asset_materializations_for_node("reid_model")[0].metadata
    assert meta["status"].value == "no labels configured"
    labels = _labels_from_sample(small_sample, tmp_path / "l.csv")
    res = dg.materialize([reid_model], resources=resources, run_config={"ops": {"reid_model": {"config": {
        "labels_csv": str(labels), "images_root": str(small_sample), "epochs": 2, "views": 0,
        "device": "cpu", "out_dir": str(tmp_path / "model")}}}})
    meta = res.asset_materializations_for_node("reid_model")[0].metadata
    card = json.loads((tmp_path / "model" / trained_model.CARD_FILE).read_text())
    assert meta["embedding_version"].value == card["embedding_version"]
    assert meta["model_card"].value["data"]["sha256"] == card["data"]["sha256"]
    assert "| 2 |" in meta["loss_curve"].value
    assert meta["data_source"].value == "labels"
    assert settings.registered_embedder() is None          # training alone never registers
    enc_labels, _ = _encounter_labels(small_sample, tmp_path / "enc.csv")
    cfg = {"labels_csv": str(enc_labels), "images_root": str(small_sample), "classes": "encounter", "epochs": 2,
           "views": 0, "device": "cpu", "out_dir": str(tmp_path / "enc-model")}
    res = dg.materialize([reid_model], resources=resources, run_config={"ops": {"reid_model": {"config": cfg}}})
    meta = res.asset_materializations_for_node("reid_model")[0].metadata
    assert meta["model_card"].value["data"]["classes"] == "encounter" and meta["epochs_run"].value == 2
    with pytest.raises(dg.Failure, match="reads no identity"):
        dg.materialize([reid_model], resources=resources, run_config={"ops": {"reid_model": {"config": {
            **cfg, "split_by_identity_seed": 0, "out_dir": str(tmp_path / "never")}}}})
    assert not (tmp_path / "never").exists()


def test_supervised_contrastive_loss_rewards_same_class_pairs_and_survives_batches_without_one():
    """SupCon: embeddings where each photo lies next to its class partner score a lower loss than
    the same embeddings with the partners swapped to other classes; a batch with no pair gives a
    zero loss (no NaN) that still backpropagates."""
    import torch

    loss = training.SupervisedContrastive(0.1)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 16))
    emb = torch.tensor(np.repeat(centres, 2, axis=0) + 0.05 * rng.standard_normal((8, 16)), dtype=torch.float32)
    same = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    wrong = torch.tensor([0, 1, 1, 2, 2, 3, 3, 0])
    assert float(loss(emb, same)) < 0.1 < float(loss(emb, wrong))
    x = emb.clone().requires_grad_(True)
    none = loss(x, torch.arange(8))
    none.backward()
    assert float(none) == 0.0 and torch.isfinite(x.grad).all()


def test_pair_batches_hold_every_row_once_with_class_partners_side_by_side():
    """``epoch_order(..., pairs=True)``: a permutation of the training rows in which the rows of a
    class come two by two; without ``pairs`` the shipped random order, unchanged."""
    import torch

    labels = torch.tensor([c for c in range(30) for _ in range(2)] + [30, 31, 31, 31])
    rows = list(range(len(labels)))
    order = training.epoch_order(rows, labels, torch.Generator().manual_seed(0), pairs=True).tolist()
    assert sorted(order) == rows
    lab = labels[order].tolist()
    adjacent = sum(lab[i] == lab[i + 1] for i in range(len(lab) - 1))
    assert adjacent >= 31                    # 30 two-photo classes + one pair of class 31
    plain = training.epoch_order(rows, labels, torch.Generator().manual_seed(0)).tolist()
    assert plain == torch.tensor(rows)[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))].tolist()


def test_training_with_the_contrastive_loss_lowers_it_and_says_so_in_the_card(small_sample, tmp_path, capsys):
    labels, _ = _encounter_labels(small_sample, tmp_path / "encounters.csv")
    card = _tiny_training(small_sample, labels, tmp_path / "m", capsys, "--classes", "encounter", "--loss", "supcon")
    assert card["method"]["loss"].startswith("supervised contrastive") and card["method"]["temperature"] == 0.1
    assert card["options"]["loss"] == "supcon"
    with pytest.raises(trained_model.TrainingError, match="loss must be one of"):
        training.TrainOptions(loss="triplet")


def test_mixed_classes_learn_named_animals_by_identity_and_the_rest_by_encounter():
    """``classes="mixed"``: named photos are classed by identity, unnamed ones by encounter; a
    seeded fifth of the named individuals seen in two encounters is trained as unnamed (by
    encounter) and returned with its true identities to measure; no unnamed photo gets one."""
    from deer_pipeline.evaluation.labels import UNLABELLED, LabelledPhoto

    photos = [LabelledPhoto(f"/p/{i}-{e}-{k}.jpg", f"deer{i}", f"{i}-{e}") for i in range(10)
              for e in range(2) for k in range(2)]
    photos += [LabelledPhoto(f"/u/{e}-{k}.jpg", UNLABELLED, f"u{e}") for e in range(3) for k in range(2)]
    out, held = training.mixed_classes(photos, seed=0, val_fraction=0.2)
    assert len(out) == len(photos) and sorted(p.image_path for p in out) == sorted(p.image_path for p in photos)
    held_ids = set(held.values())
    assert len(held_ids) == 2 and held_ids < {f"deer{i}" for i in range(10)}
    by_path = {p.image_path: p for p in out}
    for p in photos:
        q = by_path[p.image_path]
        if p.identity == UNLABELLED or p.identity in held_ids:
            assert q.identity == f"{training.ENCOUNTER_CLASS}{p.encounter}"      # its encounter, nothing more
        else:
            assert q.identity == p.identity                                   # all its encounters one class
    assert {out[i].image_path for i in held} == {p.image_path for p in photos if p.identity in held_ids}
    assert all(held[i] == photos[[p.image_path for p in photos].index(out[i].image_path)].identity for i in held)
    # the same seed holds out the same individuals; fewer than two named is a clear error
    assert training.mixed_classes(photos, seed=0, val_fraction=0.2)[1] == held
    with pytest.raises(trained_model.TrainingError, match="at least two named individuals"):
        training.mixed_classes([p for p in photos if p.identity in (UNLABELLED, "deer0")], 0, 0.2)


def _mixed_labels(sample_dir: Path, out: Path, named: set[str]) -> tuple[Path, list]:
    """The sample as labels naming only ``named`` individuals (the others' identity left empty or
    'unknown'), with encounters of two photos."""
    from deer_pipeline.sample import read_truth

    rows, seen = [], {}
    for r in read_truth(sample_dir):
        k = seen[r["identity"]] = seen.get(r["identity"], -1) + 1
        ident = r["identity"] if r["identity"] in named else ("" if k % 2 else "unknown")
        rows.append([r["file"], ident, f"{r['identity']}-{k // 2}"])
    with open(out, "w", newline="") as fh:
        csv.writer(fh).writerows([["image_path", "identity", "encounter_id"]] + rows)
    return out, rows


def test_training_with_mixed_classes_reads_named_animals_only(small_sample, tmp_path, capsys):
    """``train --classes mixed``: empty and 'unknown' identities are read as unnamed (refused
    without it); the named animals are the card's individuals, every other encounter a class; all
    epochs run with the pair loss and the loss falls."""
    from deer_pipeline.evaluation.labels import UNLABELLED, EvaluationError

    ids = sorted({r["identity"] for r in __import__("deer_pipeline.sample", fromlist=["read_truth"]).read_truth(small_sample)})
    named = set(ids[:2])
    labels, rows = _mixed_labels(small_sample, tmp_path / "mixed.csv", named)
    with pytest.raises(EvaluationError, match="empty identity"):
        read_labels(labels, small_sample)
    photos = read_labels(labels, small_sample, unnamed=True)
    assert {p.identity for p in photos} == named | {UNLABELLED}
    card = _tiny_training(small_sample, labels, tmp_path / "m", capsys, "--classes", "mixed")
    assert card["options"]["loss"] == "supcon"
    d = card["data"]
    assert d["classes"] == "mixed" and set(d["identities"]) == named and d["individuals_used"] == 2
    unnamed = [r for r in rows if r[1] not in named]
    pairs = {e for e in {r[2] for r in unnamed} if sum(r[2] == e for r in unnamed) >= 2}   # single photos skipped
    assert d["encounter_classes"] == len(pairs) and d["unnamed_photos"] == sum(r[2] in pairs for r in unnamed)
    assert card["method"]["classes"].startswith("mixed") and card["training"]["best_epoch"] == 3
    # with an identity split, only the calibration half is named: no identity of the other half is read
    out2 = tmp_path / "m2"
    full, _ = _mixed_labels(small_sample, tmp_path / "full.csv", set(ids))      # every animal named
    rc = train_cli.main(["--labels", str(full), "--images-root", str(small_sample), "--out", str(out2),
                         "--classes", "mixed", "--split-by-identity", "0", "--epochs", "2", "--views", "0",
                         "--probe-epochs", "1", "--frozen-blocks", "15", "--threads", "2"])
    assert rc == 0, capsys.readouterr().err
    from deer_pipeline.evaluation.labels import split_by_identity

    cal, other = split_by_identity(read_labels(full, small_sample), 0)
    d2 = trained_model.read_card(out2)["data"]
    assert set(d2["identities"]) == {p.identity for p in cal}
    assert not set(d2["identities"]) & {p.identity for p in other}
    assert d2["unnamed_photos"] > 0 and "other half without identities" in d2["source"]


def test_evaluate_trains_mixed_classes_without_reading_an_evaluated_identity(small_sample, tmp_path, capsys,
                                                                           monkeypatch):
    """``evaluate --train-mixed``: the calibration animals train by identity, the evaluated photos
    by encounter; the card names the calibration animals only, so the overlap check passes, and
    the evaluated photos are among those trained on (by encounter)."""
    from deer_pipeline.sample import read_truth

    monkeypatch.setenv("DEER_WEIGHTS_DIR", str(tmp_path / "no-weights"))
    ids = sorted({r["identity"] for r in read_truth(small_sample)})
    full, rows = _mixed_labels(small_sample, tmp_path / "all.csv", set(ids))
    tm, out = _evaluate_trained_in_run(small_sample, tmp_path, capsys, ["image_path", "identity", "encounter_id"],
                                       rows, set(ids[:2]), "--train-mixed", "--train-encounters")
    assert tm["trained_in_this_run"] and tm["data"]["classes"] == "mixed"
    assert tm["data"]["individuals_used"] == 2 and tm["training"]["epochs_run"] == 2
    assert tm["evaluated_photos_trained_on"] > 0 and "named individuals, none evaluated" in out
    assert tm["data"]["encounter_classes"] > 0 and f"{tm['data']['encounter_classes']} encounters of unnamed" in out
