"""Downloadable re-identification backbones (miewid, megadescriptor, dinov2).

No weights can be downloaded here: each architecture is built in its tiny test variant (the same
timm family, ``DEER_TINY_ARCHITECTURES=1``), a random state dict is written by the test in the
layout the published file has, imported through ``deer-pipeline weights import``, and run
through the pipeline's inference engine."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from deer_pipeline.embedding import backbones, weights_cli
from deer_pipeline.embedding import models as embedders
from deer_pipeline.embedding.inference import InferenceEngine
from deer_pipeline.embedding.networks import clear_cache


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    monkeypatch.setenv(backbones.TINY_ENV, "1")
    monkeypatch.setenv("DEER_WEIGHTS_DIR", str(tmp_path / "weights"))
    clear_cache()
    yield tmp_path
    clear_cache()


def _write_state(name: str, path, seed: int = 0):
    """A random state dict of ``name``'s tiny architecture, in the published file's layout."""
    torch.manual_seed(seed)
    net = backbones.build_architecture(name, tiny=True)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    if name == "miewid":   # as in the hub file: GeM inside timm's model, plus the training head
        state["backbone.global_pool.p"] = state.pop("pooling.p")
        state["final.weight"] = torch.zeros(10, net.bn.num_features)
        state["final.bias"] = torch.zeros(10)
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("name,suffix", [("miewid", ".safetensors"), ("megadescriptor", ".bin"),
                                         ("dinov2", ".safetensors")])
def test_each_backbone_imports_embeds_unit_vectors_and_versions_its_weights(tiny, name, suffix, capsys):
    f = _write_state(name, tiny / f"{name}{suffix}")
    assert weights_cli.main(["import", name, str(f), "--sha256", embedders.read_sha256(f)]) == 0
    spec = embedders.resolve_embedder(name)
    sha = embedders.read_sha256(f)
    assert sha[:12] in spec.version and spec.version.startswith(f"{name}:")
    assert "tiny-test-architecture" in spec.version
    x = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8)
    v1 = InferenceEngine([name], device="cpu").embed_tensor(x)[name]
    clear_cache()
    v2 = InferenceEngine([name], device="cpu").embed_tensor(x)[name]
    assert v1.shape == (3, 512) and v1.dtype == np.float32
    assert np.allclose(np.linalg.norm(v1, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(v1, v2)                     # deterministic across loads
    # other weights, other version
    f2 = _write_state(name, tiny / f"other{suffix}", seed=1)
    backbones.import_weights(name, f2)
    assert embedders.resolve_embedder(name).version != spec.version


def test_missing_weights_name_the_file_and_how_to_fetch_it(tiny):
    with pytest.raises(embedders.WeightsUnavailable) as err:
        embedders.resolve_embedder("miewid")
    msg = str(err.value)
    assert "deer-pipeline weights fetch miewid" in msg
    assert "conservationxlabs/miewid-msv3" in msg and "model.safetensors" in msg
    assert str(tiny / "weights" / "miewid") in msg
    assert "deer-pipeline weights import miewid FILE" in msg


def test_wrong_checksum_imports_nothing(tiny, capsys):
    f = _write_state("dinov2", tiny / "d.safetensors")
    assert weights_cli.main(["import", "dinov2", str(f), "--sha256", "0" * 64]) == 2
    err = capsys.readouterr().err
    assert str(f) in err and "does not match" in err
    assert not backbones.cached_file("dinov2").exists()


def test_a_cached_file_that_changed_is_refused(tiny):
    f = _write_state("dinov2", tiny / "d.safetensors")
    backbones.import_weights("dinov2", f)
    with open(backbones.cached_file("dinov2"), "ab") as fh:
        fh.write(b"x")
    with pytest.raises(backbones.ChecksumMismatch, match="recorded when it was imported"):
        embedders.resolve_embedder("dinov2")


def test_weights_of_another_architecture_are_refused_naming_the_file(tiny):
    f = _write_state("dinov2", tiny / "d.safetensors")
    with pytest.raises(embedders.WeightsMismatch) as err:
        backbones.import_weights("miewid", f)
    assert str(f) in str(err.value) and "not a miewid checkpoint" in str(err.value)
    assert not backbones.cached_file("miewid").exists()


def test_megadescriptor_warns_about_its_non_commercial_licence(tiny, caplog):
    f = _write_state("megadescriptor", tiny / "m.bin")
    backbones.import_weights("megadescriptor", f)
    with caplog.at_level(logging.WARNING):
        InferenceEngine(["megadescriptor"], device="cpu").embed_tensor(torch.zeros((1, 3, 224, 224), dtype=torch.uint8))
    assert "CC BY-NC 4.0" in caplog.text
