"""The ONNX Runtime backend gives the eager vectors, names itself in the version, exports once
per backbone into its cache, and recovers from a corrupt cache entry."""

from __future__ import annotations

import numpy as np
import pytest

from deer_pipeline.embedding import backends, networks
from deer_pipeline.embedding import config as embedding_config
from deer_pipeline.embedding import models as embedders
from deer_pipeline.embedding.inference import InferenceEngine
from deer_pipeline.settings import EmbeddingSettings, SettingsError
from deer_pipeline_tests.detections.test_images import write_photo

pytestmark = pytest.mark.skipif(not backends.onnxruntime_installed(), reason="onnxruntime not installed")


@pytest.fixture
def onnx_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DEER_DATA_DIR", str(tmp_path / "data"))
    networks.clear_cache()
    yield tmp_path / "data" / "onnx"
    networks.clear_cache()


def _photos(tmp_path, n=6):
    rng = np.random.default_rng(3)
    paths = []
    for i in range(n):
        p = tmp_path / f"p{i}.jpg"
        write_photo(p, size=(int(rng.integers(120, 300)), int(rng.integers(120, 300))), seed=i)
        paths.append(str(p))
    return paths


def test_onnxruntime_vectors_equal_the_eager_ones_and_the_version_says_so(tmp_path, onnx_dir):
    photos = _photos(tmp_path)
    eager = InferenceEngine(["multiscale", "efficientnet_b0"], device="cpu", num_workers=0, backend="eager")
    ort = InferenceEngine(["multiscale", "efficientnet_b0"], device="cpu", num_workers=0, backend="onnxruntime")
    a, b = eager.embed_images(photos), ort.embed_images(photos)
    for m in ("multiscale", "efficientnet_b0"):
        cos = np.sum(a.vectors[m] * b.vectors[m], axis=1)
        assert cos.min() > 0.9999, cos
        assert ort.versions[m] == eager.versions[m] + ":onnxruntime"
    assert ort.n_backbone_passes == 1                       # the one Lite0 pass serves both models
    assert len(list(onnx_dir.glob("*.onnx"))) == 1          # exported once, into the cache
    assert not list(onnx_dir.glob("*.tmp"))


def test_export_is_cached_and_a_corrupt_entry_is_exported_again(onnx_dir, monkeypatch):
    spec = embedders.resolve_embedder("efficientnet_lite0", "auto", backend="onnxruntime")
    net = networks.load_backbone(spec.weights, spec.pooling, "cpu", False, "onnxruntime")
    (path,) = onnx_dir.glob("*.onnx")
    mtime = path.stat().st_mtime_ns
    networks.clear_cache()
    exports = []
    real_export = backends.OnnxBackbone._export
    monkeypatch.setattr(backends.OnnxBackbone, "_export", lambda self, n: (exports.append(1), real_export(self, n)))
    networks.load_backbone(spec.weights, spec.pooling, "cpu", False, "onnxruntime")
    assert exports == [] and path.stat().st_mtime_ns == mtime          # read from the cache
    path.write_bytes(b"not an onnx file")
    networks.clear_cache()
    again = networks.load_backbone(spec.weights, spec.pooling, "cpu", False, "onnxruntime")
    assert exports == [1]
    import torch

    x = torch.randint(0, 255, (2, 3, 224, 224), dtype=torch.uint8)
    np.testing.assert_allclose(again(x)["head"].numpy(), net(x)["head"].numpy(), atol=1e-4)


def test_auto_backend_follows_the_device():
    assert embedding_config.resolve_backend(EmbeddingSettings(device="cpu")) == "onnxruntime"
    assert embedding_config.resolve_backend(EmbeddingSettings(device="cuda:0")) == "eager"
    assert embedding_config.resolve_backend(EmbeddingSettings(device="cpu", backend="eager")) == "eager"
    cpu = embedding_config.versions(EmbeddingSettings(device="cpu"))
    gpu = embedding_config.versions(EmbeddingSettings(device="cuda"))
    zooms = embedders.zoom_label(EmbeddingSettings().zooms)
    assert all(cpu[m] == gpu[m].removesuffix(zooms) + ":onnxruntime" + zooms for m in cpu)   # never mixed in one version
    with pytest.raises(SettingsError, match="backend"):
        EmbeddingSettings(backend="tensorrt")
    with pytest.raises(embedders.EmbedderError, match="backend"):
        embedders.resolve_embedder("efficientnet_lite0", "auto", backend="tensorrt")


def test_centre_pooling_exports_and_gives_the_eager_vectors(tmp_path, onnx_dir):
    """The ``centre`` pooling's weights are built inside the exported graph: ONNX Runtime gives
    the eager vectors, and they differ from average pooling's."""
    photos = _photos(tmp_path, 4)
    runs = {(pooling, backend): InferenceEngine(["efficientnet_b0"], device="cpu", num_workers=0, backend=backend,
                                                pooling=pooling).embed_images(photos).vectors["efficientnet_b0"]
            for pooling in ("avg", "centre") for backend in ("eager", "onnxruntime")}
    cos = np.sum(runs[("centre", "eager")] * runs[("centre", "onnxruntime")], axis=1)
    assert cos.min() > 0.9999, cos
    assert not np.allclose(runs[("centre", "eager")], runs[("avg", "eager")], atol=1e-3)
