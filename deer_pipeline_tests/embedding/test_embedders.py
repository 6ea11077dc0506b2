"""Embedders, weights and inference: reproducible, versioned, unit-norm vectors.

CPU only, no network. Real architectures run with seeded random weights saved to state-dict
files (so the path-loading code is what runs) or with the offline EfficientNet-Lite0 weights.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deer_pipeline.embedding import models as embedders
from deer_pipeline.embedding import networks
from deer_pipeline.embedding.inference import CropItem, InferenceEngine
from deer_pipeline.embedding.models import (
    EmbedderError,
    UnknownModel,
    WeightsMismatch,
    WeightsUnavailable,
)

REPO = Path(__file__).resolve().parents[2]


def _synthetic_jpeg(path: Path, seed: int, size=(160, 120)) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3)
    arr = np.clip(base * rng.uniform(0.3, 1.0, 3) + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path, quality=90)
    return path


@pytest.fixture(scope="module")
def random_weight_files(tmp_path_factory):
    """Seeded random ResNet50 / EfficientNet-B0 state dicts saved as files (torchvision format)."""
    import torch

    old = os.environ.get(embedders.ALLOW_RANDOM_ENV)
    os.environ[embedders.ALLOW_RANDOM_ENV] = "1"
    try:
        d = tmp_path_factory.mktemp("weights")
        files = {}
        for backbone, seed in (("resnet50", 0), ("efficientnet_b0", 0), ("efficientnet_b0", 1)):
            path = d / f"{backbone}_seed{seed}.pth"
            torch.save(networks.random_test_state_dict(backbone, seed=seed), path)
            files[(backbone, seed)] = path
        return files
    finally:
        if old is None:
            os.environ.pop(embedders.ALLOW_RANDOM_ENV, None)
        else:
            os.environ[embedders.ALLOW_RANDOM_ENV] = old


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch-home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture
def sample_image(tmp_path) -> Path:
    nyala = REPO.parent / "shared" / "data" / "nyala-dev" / "images" / "60" / "630_leftphoto.jpg"
    if nyala.exists():
        return nyala
    return _synthetic_jpeg(tmp_path / "sample.jpg", 7)


# ---------------------------------------------------------------------------------------------

def test_projection_is_deterministic_float32_and_hashed():
    a, ha = embedders.projection_matrix(3584, 123)
    embedders._proj_cache.clear()
    b, hb = embedders.projection_matrix(3584, 123)
    assert a.dtype == np.float32 and a.shape == (3584, 512)
    assert np.array_equal(a, b) and ha == hb
    # The documented recipe, recomputed here independently.
    ref = (np.random.Generator(np.random.PCG64(123)).standard_normal((3584, 512), dtype=np.float64)
           / np.sqrt(512)).astype(np.float32)
    assert np.array_equal(a, ref)
    assert embedders.projection_matrix(3584, 124)[1] != ha


def test_multiscale_uses_three_scales_once_each(random_weight_files, monkeypatch):
    monkeypatch.setenv(embedders.ALLOW_RANDOM_ENV, "1")
    native = embedders.resolve_embedder("multiscale", str(random_weight_files[("resnet50", 0)]))
    assert native.features == ("layer2", "layer3", "layer4")   # no avgpool: it *is* pooled layer4
    assert native.d_in == 512 + 1024 + 2048
    sub = embedders.resolve_embedder("multiscale", "auto") if not embedders.torchvision_cache_path(
        "resnet50")[1].exists() else None
    if sub is not None:
        assert sub.backbone == "efficientnet_lite0" and sub.d_in == 112 + 320 + 1280
        assert "-for-resnet50" in sub.version


def test_unknown_model_fails_at_load_with_the_choices():
    with pytest.raises(UnknownModel, match="vgg16.*resnet50, multiscale, efficientnet_b0, efficientnet_lite0"):
        embedders.resolve_embedder("vgg16")
    with pytest.raises(UnknownModel):
        InferenceEngine(["multiscale", "vgg16"])


def test_random_weights_refused_without_the_test_flag(monkeypatch):
    monkeypatch.delenv(embedders.ALLOW_RANDOM_ENV, raising=False)
    with pytest.raises(EmbedderError, match=embedders.ALLOW_RANDOM_ENV):
        embedders.resolve_embedder("resnet50", embedders.RANDOM_WEIGHTS)
    with pytest.raises(EmbedderError, match="tests only"):
        networks.random_test_state_dict("efficientnet_b0")


def test_imagenet_weights_missing_says_what_to_do(empty_torch_home):
    with pytest.raises(WeightsUnavailable) as err:
        embedders.resolve_embedder("resnet50", "imagenet")
    msg = str(err.value)
    assert "resnet50-11ad3fa6.pth" in msg
    assert "https://download.pytorch.org/models/resnet50-11ad3fa6.pth" in msg
    assert str(empty_torch_home / "hub" / "checkpoints") in msg
    assert "--weights PATH" in msg and "weights='auto'" in msg
    with pytest.raises(WeightsUnavailable, match="efficientnet_b0_rwightman-7f5810bc.pth"):
        embedders.resolve_embedder("efficientnet_b0", "imagenet")
    # Lite0's ImageNet weights ship with the pip package: always there.
    assert embedders.resolve_embedder("efficientnet_lite0", "imagenet").weights.source == "imagenet"


def test_auto_substitutes_lite0_loudly(empty_torch_home, caplog):
    embedders._warned.clear()
    with caplog.at_level(logging.WARNING, logger="deer_pipeline.embedding.models"):
        spec = embedders.resolve_embedder("efficientnet_b0", "auto")
    assert spec.backbone == "efficientnet_lite0"
    assert spec.weights.substituted_for == "efficientnet_b0"
    assert spec.version.startswith("efficientnet_b0:efficientnet_lite0-for-efficientnet_b0@imagenet-")
    assert "substitutes for efficientnet_b0" in spec.weights_used
    assert any("substitutes" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert spec.version_info()["details"]["substituted_for"] == "efficientnet_b0"
    assert embedders.resolve_embedder("resnet50", "auto").version.startswith("v1_resnet50:")


def test_auto_uses_cached_imagenet_weights_through_torchvision(empty_torch_home, random_weight_files):
    # A file where torchvision caches ImageNet weights is used as such, without any download.
    url, cached = embedders.torchvision_cache_path("efficientnet_b0")
    assert cached.parent == empty_torch_home / "hub" / "checkpoints"
    cached.parent.mkdir(parents=True)
    shutil.copy(random_weight_files[("efficientnet_b0", 0)], cached)
    spec = embedders.resolve_embedder("efficientnet_b0", "auto")
    assert spec.backbone == "efficientnet_b0" and spec.weights.source == "imagenet"
    assert spec.weights.substituted_for is None
    net = networks.load_backbone(spec.weights, device="cpu")
    assert not net.training


def test_versions_change_with_weights_and_reduction(random_weight_files, tmp_path):
    f0, f1 = random_weight_files[("efficientnet_b0", 0)], random_weight_files[("efficientnet_b0", 1)]
    v0 = embedders.resolve_embedder("efficientnet_b0", str(f0)).version
    assert embedders.resolve_embedder("efficientnet_b0", str(f1)).version != v0       # weights
    assert embedders.resolve_embedder("efficientnet_b0", str(f0), projection_seed=1).version != v0  # reduction
    assert embedders.resolve_embedder("efficientnet_b0", str(f0), pooling="gem").version != v0      # pooling
    centre = embedders.resolve_embedder("efficientnet_b0", str(f0), pooling="centre")
    assert centre.version not in (v0, embedders.resolve_embedder("efficientnet_b0", str(f0), pooling="gem").version)
    assert "+centre0.4" in centre.version and centre.version_info()["details"]["pooling"] == "centre(sigma=0.4)"
    copy = tmp_path / "same_bytes.pth"
    shutil.copy(f0, copy)
    assert embedders.resolve_embedder("efficientnet_b0", str(copy)).version == v0  # content, not path
    sha12 = embedders.file_sha256(f0)[:12]
    assert v0.startswith(f"efficientnet_b0:efficientnet_b0@file-{sha12}:proj-") and v0.endswith(":224sq-imagenet-norm")


def test_weights_file_with_wrong_shapes_fails_naming_file_and_keys(random_weight_files, tmp_path):
    import torch

    sd = torch.load(random_weight_files[("efficientnet_b0", 0)], weights_only=True)
    sd["features.0.0.weight"] = torch.zeros(16, 3, 3, 3)   # B0 stem has 32 output channels
    bad = tmp_path / "b0_bad_stem.pth"
    torch.save(sd, bad)
    engine = InferenceEngine(["efficientnet_b0"], weights=str(bad), device="cpu")
    with pytest.raises(WeightsMismatch) as err:
        engine.load()
    msg = str(err.value)
    assert str(bad) in msg and "features.0.0.weight" in msg and "(16, 3, 3, 3)" in msg and "(32, 3, 3, 3)" in msg
    # A file for another architecture: every key is named as missing / unexpected.
    lite0 = embedders.lite0_weights_path()
    with pytest.raises(WeightsMismatch, match=r"missing keys: features\.0\.0\.weight.*unexpected keys: _conv_stem"):
        InferenceEngine(["efficientnet_b0"], weights=str(lite0), device="cpu").load()


_TWO_PROCESS_SCRIPT = r"""
import json, sys
import numpy as np
from deer_pipeline.embedding.inference import InferenceEngine
cfg = json.loads(sys.argv[1])
engine = InferenceEngine(cfg["models"], weights=cfg["weights"], device="cpu", batch_size=2, num_workers=0)
res = engine.embed_images([cfg["image"]])
assert not res.failures, res.failures
np.savez(cfg["out"], **res.vectors)
print(json.dumps({"versions": res.versions, "passes": engine.n_backbone_passes}))
"""


def test_same_image_in_two_processes_gives_identical_vectors(random_weight_files, sample_image, tmp_path):
    r50 = str(random_weight_files[("resnet50", 0)])
    cfg = {"models": list(embedders.MODELS), "image": str(sample_image),
           "weights": {"resnet50": r50, "multiscale": r50,
                       "efficientnet_b0": str(random_weight_files[("efficientnet_b0", 0)]),
                       "efficientnet_lite0": "auto"}}
    env = {k: v for k, v in os.environ.items() if k != embedders.ALLOW_RANDOM_ENV}
    env["PYTHONPATH"] = str(REPO)
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_SCRIPT,
                               json.dumps({**cfg, "out": str(tmp_path / f"run{run}.npz")})],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
             for run in range(2)]   # two independent processes, run side by side
    outs, infos = [], []
    for run, proc in enumerate(procs):
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        infos.append(json.loads(stdout.strip().splitlines()[-1]))
        outs.append(np.load(tmp_path / f"run{run}.npz"))
    assert infos[0] == infos[1]
    assert infos[0]["passes"] == 3          # resnet50 and multiscale share one ResNet50 pass
    for model in embedders.MODELS:
        a, b = outs[0][model], outs[1][model]
        assert a.shape == (1, 512) and a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        assert abs(float(np.linalg.norm(a)) - 1.0) < 1e-5
    assert len({v for v in infos[0]["versions"].values()}) == 4


def test_engine_keeps_going_past_a_bad_crop_and_vectors_are_unit_norm(tmp_path):
    good = [_synthetic_jpeg(tmp_path / f"c{i}.jpg", i) for i in range(5)]
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    items = [CropItem(f"d{i}", p.name, str(tmp_path)) for i, p in enumerate(good)]
    items.insert(2, CropItem("d-broken", "broken.jpg", str(tmp_path)))
    items.append(CropItem("d-missing", "nowhere.jpg", str(tmp_path)))
    engine = InferenceEngine(["efficientnet_lite0"], device="cpu", batch_size=3, num_workers=1)
    res = engine.embed(items)
    assert res.detection_ids == [f"d{i}" for i in range(5)]
    assert [d for d, _ in res.failures] == ["d-broken", "d-missing"]
    assert all(reason for _, reason in res.failures)
    v = res.vectors["efficientnet_lite0"]
    assert v.shape == (5, 512) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # Same crops, one at a time, without workers: the same vectors (order and batching do not matter).
    single = InferenceEngine(["efficientnet_lite0"], device="cpu", batch_size=1, num_workers=0).embed(items[:2])
    np.testing.assert_allclose(single.vectors["efficientnet_lite0"], v[:2], atol=1e-5)


def _memory_for(engine, rows: int, monkeypatch) -> list[int]:
    """Make ``engine``'s forward pass fail with CUDA out-of-memory above ``rows`` images; returns
    the list the size of every attempted pass is appended to."""
    import torch

    real_forward, sizes = engine._forward, []

    def forward_with_small_memory(x):
        sizes.append(int(x.shape[0]))
        if x.shape[0] > rows:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(x)

    monkeypatch.setattr(engine, "_forward", forward_with_small_memory)
    return sizes


def test_cuda_out_of_memory_retries_with_half_the_batch(tmp_path, monkeypatch):
    paths = [_synthetic_jpeg(tmp_path / f"c{i}.jpg", i) for i in range(4)]
    reference = InferenceEngine(["efficientnet_lite0"], device="cpu", batch_size=4, num_workers=0).embed_images(paths)
    engine = InferenceEngine(["efficientnet_lite0"], device="cpu", batch_size=4, num_workers=0)
    sizes = _memory_for(engine, 2, monkeypatch)
    res = engine.embed_images(paths)
    assert sizes == [4, 2, 2] and engine._effective_batch == 2
    assert res.detection_ids == [str(p) for p in paths]
    np.testing.assert_allclose(res.vectors["efficientnet_lite0"], reference.vectors["efficientnet_lite0"], atol=1e-5)

    # with crop zooms a pass always holds all the zooms of a crop: 2 crops x 3 zooms = 6 rows,
    # out of memory -> 3 rows (one crop) per pass, never a crop split across passes
    zooms = (1.0, 0.9, 0.8)
    reference = InferenceEngine(["efficientnet_lite0"], device="cpu", batch_size=6, num_workers=0,
                                zooms=zooms).embed_images(paths)
    engine = InferenceEngine(["efficientnet_lite0"], device="cpu", batch_size=6, num_workers=0, zooms=zooms)
    sizes = _memory_for(engine, 4, monkeypatch)
    res = engine.embed_images(paths)
    assert sizes == [6, 3, 3, 3, 3] and all(s % 3 == 0 for s in sizes)
    np.testing.assert_allclose(res.vectors["efficientnet_lite0"], reference.vectors["efficientnet_lite0"], atol=1e-5)


def test_shared_backbone_runs_once_for_auto_ensemble(empty_torch_home):
    engine = InferenceEngine(["multiscale", "efficientnet_b0"], device="cpu")
    assert engine.n_backbone_passes == 1   # both substituted by the one Lite0 pass
    assert engine.versions["multiscale"] != engine.versions["efficientnet_b0"]


def test_ensemble_similarity_and_version():
    rng = np.random.default_rng(0)
    q = {m: rng.normal(size=(3, 512)).astype(np.float32) for m in ("multiscale", "efficientnet_b0")}
    g = {m: rng.normal(size=(4, 512)).astype(np.float32) for m in ("multiscale", "efficientnet_b0")}
    uq = {m: embedders.unit_rows(v) for m, v in q.items()}
    ug = {m: embedders.unit_rows(v) for m, v in g.items()}
    np.testing.assert_allclose(np.linalg.norm(uq["multiscale"], axis=1), 1.0, atol=1e-6)
    assert not embedders.unit_rows(np.zeros((2, 512))).any()          # zero rows stay zero
    comps = {}
    sim = embedders.weighted_cosine(uq, ug, embedders.DEFAULT_ENSEMBLE_WEIGHTS, comps)
    unit = {k: {m: v / np.linalg.norm(v, axis=1, keepdims=True) for m, v in d.items()} for k, d in (("q", q), ("g", g))}
    expect = {m: unit["q"][m] @ unit["g"][m].T for m in q}
    np.testing.assert_allclose(comps["multiscale"], expect["multiscale"], atol=1e-5)
    np.testing.assert_allclose(sim, 0.6 * expect["multiscale"] + 0.4 * expect["efficientnet_b0"], atol=1e-5)
    assert sim.shape == (3, 4)
    sim2 = embedders.weighted_cosine(uq, ug, {"multiscale": 0.5, "efficientnet_b0": 0.5})
    np.testing.assert_allclose(sim2, 0.5 * expect["multiscale"] + 0.5 * expect["efficientnet_b0"], atol=1e-5)

    from deer_pipeline.settings import MatchingSettings, SettingsError, check_weights

    with pytest.raises(SettingsError):   # weights are validated where they are configured
        check_weights({"multiscale": 0.7, "efficientnet_b0": 0.4})
    with pytest.raises(SettingsError):
        MatchingSettings(ensemble_weights={"multiscale": 0.7, "efficientnet_b0": 0.4})
    with pytest.raises(KeyError, match="resnet50"):   # a model without vectors is never scored silently
        embedders.weighted_cosine(uq, ug, {"resnet50": 1.0})

    comps_v = {"multiscale": "multiscale:a", "efficientnet_b0": "efficientnet_b0:b"}
    v = embedders.ensemble_version(comps_v)
    assert v.startswith("v3_ensemble:multiscale=0.6+efficientnet_b0=0.4:")
    assert embedders.ensemble_version(comps_v) == v
    assert embedders.ensemble_version(comps_v, {"multiscale": 0.5, "efficientnet_b0": 0.5}) != v
    assert embedders.ensemble_version({**comps_v, "multiscale": "multiscale:c"}) != v


def test_embed_cli_on_a_nyala_photo(nyala_dir, tmp_path, capsys):
    from deer_pipeline.embedding import cli as embedders_cli

    photos = sorted((nyala_dir / "images").glob("*/*.jpg"))[:3]
    out = tmp_path / "vectors.npy"
    assert embedders_cli.main([*map(str, photos), "--model", "efficientnet_lite0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    vecs = np.load(out)
    assert vecs.shape == (3, 512) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    from deer_pipeline.settings import CROP_ZOOMS

    spec = embedders.resolve_embedder("efficientnet_lite0", "auto", zooms=CROP_ZOOMS)
    assert f"embedding version: {spec.version}" in printed
    assert "weights used: efficientnet_lite0 ImageNet weights" in printed
    # Same photos through the engine directly: the same rows, in order.
    direct = InferenceEngine(["efficientnet_lite0"], device="cpu", num_workers=0, zooms=CROP_ZOOMS).embed_images(photos)
    np.testing.assert_allclose(vecs, direct.vectors["efficientnet_lite0"], atol=1e-6)
    # --zooms 1: the whole crop alone, the version without a zoom label
    assert embedders_cli.main([*map(str, photos), "--model", "efficientnet_lite0", "--out", str(out), "--zooms", "1"]) == 0
    whole = embedders.resolve_embedder("efficientnet_lite0", "auto")
    assert f"embedding version: {whole.version}" in capsys.readouterr().out and ":zoom" not in whole.version
    assert embedders_cli.main([str(photos[0]), "--model", "efficientnet_lite0", "--out", str(out), "--zooms", "0"]) == 2
    # An unreadable image fails the command and names the file.
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    assert embedders_cli.main([str(photos[0]), str(bad), "--model", "efficientnet_lite0", "--out", str(out)]) == 1
    assert "bad.jpg" in capsys.readouterr().err


def test_weight_urls_and_hub_dir_agree_with_torchvision(monkeypatch, tmp_path):
    """Versions are resolved without torch (the code location computes them when it loads); the
    written-out URLs and cache folder must be exactly torchvision's."""
    import torch

    for backbone in embedders.TORCHVISION_WEIGHT_URLS:
        assert embedders.TORCHVISION_WEIGHT_URLS[backbone] == embedders._torchvision_weights_enum(backbone).url
    assert embedders.torch_hub_dir() == Path(torch.hub.get_dir())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert embedders.torch_hub_dir() == Path(torch.hub.get_dir()) == tmp_path / "th" / "hub"


HEAVY_MODULES = ("torch", "torchvision", "pandas", "numpy", "sqlalchemy", "PIL", "psycopg",
                 "deer_pipeline.identity.matching", "deer_pipeline.embedding.inference")


def test_loading_the_code_location_imports_no_torch():
    """The code location loads without the networks, pandas, numpy, SQLAlchemy, PIL or the
    library modules its steps call: they load when a step (or a sensor tick) first uses them."""
    code = ("import sys, deer_pipeline.definitions as d; d.defs.resolve_asset_graph(); "
            f"print([m for m in {HEAVY_MODULES!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_recorded_projection_digests():
    """The digests a version is resolved from without drawing the matrix are the matrices' own."""
    for (d_in, seed, d_out), digest in embedders.PROJECTION_SHA256.items():
        assert embedders.projection_matrix(d_in, seed, d_out)[1] == digest
    # every configured model's projection is recorded (the code location draws none)
    for (model, backbone), feats in embedders.MODEL_FEATURES.items():
        if model in embedders.PROJECTION_SEEDS:
            d_in = sum(embedders.BACKBONE_FEATURES[backbone][f] for f in feats)
            assert (d_in, embedders.PROJECTION_SEEDS[model], embedders.EMBEDDING_DIM) in embedders.PROJECTION_SHA256


def test_weights_hashes_are_kept_on_disk(tmp_path, monkeypatch):
    """file_sha256 keeps hashes in the data directory by (path, size, mtime): a new process does
    not read the file again, a changed file is read again, a corrupt cache is ignored."""
    monkeypatch.setenv("DEER_DATA_DIR", str(tmp_path / "data"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights" * 1000)
    monkeypatch.setattr(embedders, "_sha_cache", {})
    first = embedders.file_sha256(f)
    assert first == embedders.read_sha256(f)
    stored = json.loads((tmp_path / "data" / "file-hashes.json").read_text())
    assert list(stored.values()) == [first]
    monkeypatch.setattr(embedders, "_sha_cache", {})             # a new process
    monkeypatch.setattr(embedders, "read_sha256", lambda p: pytest.fail("read again"))
    assert embedders.file_sha256(f) == first
    monkeypatch.undo()
    monkeypatch.setenv("DEER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(embedders, "_sha_cache", {})
    f.write_bytes(b"other weights" * 1000)                       # size and mtime change
    assert embedders.file_sha256(f) == embedders.read_sha256(f) != first
    (tmp_path / "data" / "file-hashes.json").write_text("{not json")
    monkeypatch.setattr(embedders, "_sha_cache", {})
    assert embedders.file_sha256(f) == embedders.read_sha256(f)


def test_centre_pooling_weights_the_middle_of_the_map():
    """``centre`` pooling: a centred Gaussian on the map (sums to 1, symmetric, largest in the
    middle); a map whose energy is in its middle pools higher than the same energy on its edge,
    where average pooling cannot tell them apart."""
    import torch

    w = networks.centre_weights(7, 7)
    assert w.shape == (7, 7) and abs(float(w.sum()) - 1.0) < 1e-6
    assert torch.equal(w, w.flip(0)) and torch.equal(w, w.flip(1)) and torch.allclose(w, w.T)
    assert float(w[3, 3]) == float(w.max()) and float(w[0, 0]) == float(w.min())
    assert float(w[3, 0]) / float(w[3, 3]) == pytest.approx(math.exp(-1 / (2 * embedders.CENTRE_SIGMA ** 2)), rel=1e-5)
    assert networks.centre_weights(1, 5)[0, 2] == networks.centre_weights(1, 5).max()   # a 1-wide axis is all centre

    middle, edge = torch.zeros(1, 2, 7, 7), torch.zeros(1, 2, 7, 7)
    middle[0, 0, 3, 3] = 1.0
    edge[0, 0, 0, 0] = 1.0
    assert torch.equal(networks.pool(middle, "avg"), networks.pool(edge, "avg"))
    assert float(networks.pool(middle, "centre")[0, 0]) > 20 * float(networks.pool(edge, "centre")[0, 0])
    flat = torch.full((3, 4, 5, 6), 2.5)
    assert torch.allclose(networks.pool(flat, "centre"), torch.full((3, 4), 2.5))   # a constant map pools to itself


def test_crop_zooms_average_the_vectors_of_centred_zooms(tmp_path):
    """Crop zooms: each crop and its centred zooms go through the network and the unit vectors
    are averaged and normalised again; the same as embedding the zoomed crops one by one. The
    zooms are in the version (the whole crop alone keeps the version it always had), bad zooms
    are refused where they are configured, and a 1-pixel crop still embeds."""
    from PIL import Image

    from deer_pipeline.embedding.inference import preprocess_zooms, zoom
    from deer_pipeline.settings import CROP_ZOOMS, EmbeddingSettings, SettingsError, check_zooms

    paths = [_synthetic_jpeg(tmp_path / f"z{i}.jpg", i) for i in range(4)]
    items = [CropItem(f"d{i}", p.name, str(tmp_path)) for i, p in enumerate(paths)]
    zooms = (1.0, 0.9, 0.8)
    zoomed = InferenceEngine(["efficientnet_lite0"], device="cpu", batch_size=6, num_workers=0, zooms=zooms)
    whole = InferenceEngine(["efficientnet_lite0"], device="cpu", batch_size=6, num_workers=0)
    res = zoomed.embed(items)
    v = res.vectors["efficientnet_lite0"]
    assert res.detection_ids == [f"d{i}" for i in range(4)] and v.shape == (4, 512)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # by hand: each zoom of each crop on its own through the whole-crop engine, then the mean
    per_zoom = []
    for z in zooms:
        for i, p in enumerate(paths):
            with Image.open(p) as im:
                zoom(im.convert("RGB"), z).save(tmp_path / f"z{i}-{z}.png")
        per_zoom.append(whole.embed([CropItem(f"d{i}", f"z{i}-{z}.png", str(tmp_path))
                                     for i in range(4)]).vectors["efficientnet_lite0"])
    np.testing.assert_allclose(v, embedders.unit_rows(np.mean(per_zoom, axis=0)), atol=1e-5)
    assert not np.allclose(v, per_zoom[0], atol=1e-3)        # the zooms do change the vector

    # versions: the zooms are named; the whole crop alone is the version it always was
    assert zoomed.versions["efficientnet_lite0"] == whole.versions["efficientnet_lite0"] + ":zoom1-0.9-0.8"
    assert ":zoom" not in whole.versions["efficientnet_lite0"]
    spec = zoomed.specs["efficientnet_lite0"]
    assert spec.version_info()["details"]["crop_zooms"] == [1.0, 0.9, 0.8]
    assert embedding_config_versions(EmbeddingSettings(zooms=(1.0, 0.8))) != embedding_config_versions(EmbeddingSettings())
    assert EmbeddingSettings().zooms == CROP_ZOOMS

    # a batch of 6 images holds 2 crops of 3 zooms; the batching does not change the vectors
    one_by_one = InferenceEngine(["efficientnet_lite0"], device="cpu", batch_size=1, num_workers=0, zooms=zooms)
    np.testing.assert_allclose(one_by_one.embed(items[:2]).vectors["efficientnet_lite0"], v[:2], atol=1e-5)

    # a 1 x 1 crop: every zoom keeps at least one pixel
    tiny = Image.new("RGB", (1, 1), (200, 10, 10))
    assert tuple(preprocess_zooms(tiny, zooms).shape) == (3, 3, 224, 224)
    assert tuple(preprocess_zooms(tiny, (1.0,)).shape) == (3, 224, 224)

    for bad in ((), (0.0,), (1.2,), (0.9, float("nan")), ("x",)):
        with pytest.raises(SettingsError, match="zoom"):
            check_zooms(bad)
        with pytest.raises(SettingsError):
            EmbeddingSettings(zooms=bad)
    assert check_zooms([1, 0.8, 1.0]) == (1.0, 0.8)          # repeats dropped, order kept


def embedding_config_versions(config):
    from deer_pipeline.embedding import config as embedding_config

    return embedding_config.versions(config)


def test_crop_zooms_from_the_environment(monkeypatch):
    from deer_pipeline.settings import EmbeddingSettings, SettingsError

    monkeypatch.setenv("DEER_CROP_ZOOMS", "1, 0.75")
    assert EmbeddingSettings.from_environment().zooms == (1.0, 0.75)
    monkeypatch.setenv("DEER_CROP_ZOOMS", "1,2")
    with pytest.raises(SettingsError, match="DEER_CROP_ZOOMS"):
        EmbeddingSettings.from_environment()
