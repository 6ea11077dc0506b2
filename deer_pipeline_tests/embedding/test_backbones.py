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


def _original_swin_layout(state: dict, n_classes: int = 10) -> dict:
    """timm's Swin keys -> the original Swin layout (microsoft/Swin-Transformer, timm < 0.9):
    the patch merging at the end of a stage instead of the start of the next, stored
    ``relative_position_index`` buffers and a ``head`` classifier."""
    import re

    out = {}
    for k, v in state.items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k] = v
        if k.endswith("attn.relative_position_bias_table"):
            n = int(round((v.shape[0] ** 0.5 + 1) / 2)) ** 2
            out[k.replace("relative_position_bias_table", "relative_position_index")] = torch.zeros(n, n, dtype=torch.long)
    dim = state["norm.weight"].shape[0]
    out["head.weight"], out["head.bias"] = torch.zeros(n_classes, dim), torch.zeros(n_classes)
    return out


def _write_state(name: str, path, seed: int = 0, layout: str = "published"):
    """A random state dict of ``name``'s tiny architecture, in the published file's layout
    (miewid: MiewIdNet's keys plus its training head ``final.*``, a Linear for the hub's
    ``loss_module: softmax``;
    megadescriptor: ``layout`` "published" = the original Swin layout, "timm" = timm's)."""
    torch.manual_seed(seed)
    net = backbones.build_architecture(name, tiny=True)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    if name == "miewid":      # the hub config: loss_module "softmax", n_classes 10 -> final = Linear(dim, 10)
        state["final.weight"] = torch.zeros(10, net.bn.num_features)
        state["final.bias"] = torch.zeros(10)
    if name == "megadescriptor" and layout == "published":
        state = _original_swin_layout(state)
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("name,suffix,layout", [("miewid", ".safetensors", "published"),
                                                ("megadescriptor", ".bin", "published"),
                                                ("megadescriptor", ".bin", "timm"),
                                                ("dinov2", ".safetensors", "published")])
def test_each_backbone_imports_embeds_unit_vectors_and_versions_its_weights(tiny, name, suffix, layout, capsys):
    f = _write_state(name, tiny / f"{name}{suffix}", layout=layout)
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


# The real architectures, built on PyTorch's meta device (shapes only, no memory, no weights),
# against the key layouts of the published checkpoints (README: "What was checked against the
# published checkpoints").

def _meta(name):
    with torch.device("meta"):
        return backbones.build_architecture(name, tiny=False)


def _published_miewid_keys(net) -> dict:
    """MiewIdNet (WildMeOrg/wbia-plugin-miew-id wbia_miew_id/models/model.py, the hub's
    modeling_miewid.py): timm's efficientnetv2_rw_m as ``backbone`` with its classifier replaced
    by Identity, GeM as ``pooling``, BatchNorm1d(2152) as ``bn``, and the training head ``final``
    of the hub config (conservationxlabs/miewid-msv2 config.json: loss_module softmax, n_classes
    10 -> Linear(2152, 10))."""
    import timm

    with torch.device("meta"):
        body = timm.create_model("efficientnetv2_rw_m", pretrained=False)     # num_classes 1000
    keys = {f"backbone.{k}": tuple(v.shape) for k, v in body.state_dict().items()
            if not k.startswith("classifier.")}
    keys["pooling.p"] = (1,)
    for k in ("weight", "bias", "running_mean", "running_var"):
        keys[f"bn.{k}"] = (2152,)
    keys["bn.num_batches_tracked"] = ()
    keys["final.weight"], keys["final.bias"] = (10, 2152), (10,)
    return keys


def test_miewid_builds_the_published_key_layout():
    net = _meta("miewid")
    own = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    published = _published_miewid_keys(net)
    remapped = backbones._remap("miewid", {k: torch.empty(s, device="meta") for k, s in published.items()}, net)
    assert {k: tuple(v.shape) for k, v in remapped.items()} == own
    assert own["pooling.p"] == (1,) and own["bn.weight"] == (2152,)
    assert own["backbone.conv_head.weight"][0] == 2152 and backbones.backbone("miewid").dim == 2152
    assert not any(k.startswith("backbone.classifier") for k in own)
    b = backbones.backbone("miewid")
    assert (b.input_size, b.mean, b.std) == (440, backbones.IMAGENET_MEAN, backbones.IMAGENET_STD)


def test_megadescriptor_builds_swin_large_384_and_reads_the_original_swin_layout():
    net = _meta("megadescriptor")
    own = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert own["patch_embed.proj.weight"] == (192, 3, 4, 4) and own["norm.weight"] == (1536,)
    assert own["layers.0.blocks.0.attn.relative_position_bias_table"] == (23 * 23, 6)     # window 12
    assert own["layers.3.blocks.1.attn.relative_position_bias_table"] == (23 * 23, 48)
    assert [sum(k.startswith(f"layers.{i}.blocks.") and k.endswith(".attn.qkv.weight") for k in own)
            for i in range(4)] == [2, 2, 18, 2]
    assert "layers.1.downsample.reduction.weight" in own and not any(k.startswith("head.") for k in own)
    for layout in (_original_swin_layout({k: torch.empty(s, device="meta") for k, s in own.items()}, 1000),
                   {k: torch.empty(s, device="meta") for k, s in own.items()}):
        remapped = backbones._remap("megadescriptor", layout, net)
        assert {k: tuple(v.shape) for k, v in remapped.items()} == own
    b = backbones.backbone("megadescriptor")
    assert (b.input_size, b.mean, b.std, b.dim) == (384, backbones.IMAGENET_MEAN, backbones.IMAGENET_STD, 1536)


def test_dinov2_builds_timms_hub_layout_and_preprocessing():
    import timm

    net = _meta("dinov2")
    own = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert own["pos_embed"] == (1, 1 + 37 * 37, 384) and own["patch_embed.proj.weight"] == (384, 3, 14, 14)
    cfg = timm.models.get_pretrained_cfg("vit_small_patch14_dinov2.lvd142m")
    b = backbones.backbone("dinov2")
    assert cfg.hf_hub_id == b.repo and (tuple(cfg.mean), tuple(cfg.std)) == (b.mean, b.std)
