"""Animal re-identification backbones that users download: MiewID, MegaDescriptor, DINOv2.

Plain PyTorch + ``timm`` (architectures) + ``huggingface_hub`` (downloads), no Dagster.

* ``miewid``: MiewID-msv3 (Wild Me / Conservation X Labs), an EfficientNetV2 (timm
  ``efficientnetv2_rw_m``) with GeM pooling and a batch-norm neck, trained for individual
  identification on many species; 2152-d; 440x440 input (squashed), ImageNet normalisation.
  Hugging Face: ``conservationxlabs/miewid-msv3`` file ``model.safetensors``. Key layout of
  ``MiewIdNet`` (WildMeOrg/wbia-plugin-miew-id ``wbia_miew_id/models/model.py``):
  ``backbone.*`` (timm's model without ``classifier``), ``pooling.p`` (GeM), ``bn.*``
  (BatchNorm1d(2152)) and, from training, a ``final.*`` head, which is not used.
* ``megadescriptor``: MegaDescriptor-L-384 (BVRA), a Swin-L (timm
  ``swin_large_patch4_window12_384``) trained on many animal re-identification datasets; 1536-d;
  384x384 input (squashed), ImageNet normalisation (as in the authors' training and inference
  notebooks, WildlifeDatasets/wildlife-tools ``baselines/*/MegaDescriptor-L-384.ipynb``).
  Hugging Face: ``BVRA/MegaDescriptor-L-384`` file ``pytorch_model.bin``, read through timm's
  own Swin ``checkpoint_filter_fn`` (as ``timm.create_model("hf-hub:...")`` does), which accepts
  both the original Swin layout (downsample at the end of a stage, ``head.*``, stored
  ``relative_position_index``) and timm's. **Licence CC BY-NC 4.0: non-commercial use only.**
* ``dinov2``: DINOv2 ViT-S/14 (Meta, self-supervised; timm ``vit_small_patch14_dinov2.lvd142m``),
  the class token, 384-d; 224x224 input (position embeddings interpolated), ImageNet
  normalisation. Hugging Face: ``timm/vit_small_patch14_dinov2.lvd142m`` file ``model.safetensors``.

Weights live in a local cache, ``$DEER_WEIGHTS_DIR`` (default ``$DEER_DATA_DIR/weights``, i.e.
``.deer/weights``): ``<cache>/<name>/<file>`` plus ``<cache>/<name>/manifest.json`` with the
file's sha256. They get there by ``deer-pipeline weights fetch NAME`` (downloads from the
Hugging Face hub; needs internet) or, on an air-gapped box, ``deer-pipeline weights import NAME
FILE [--sha256 HEX]`` (copies a file downloaded elsewhere; its checksum is verified against
``--sha256`` when given, and the file is loaded into the architecture before it is accepted).
Loading re-checks the file against the manifest's sha256 and refuses a changed file. Nothing is
ever downloaded implicitly and nothing falls back silently: absent weights raise
:class:`~deer_pipeline.embedding.models.WeightsUnavailable` naming the file to fetch and where
to put it.

The pipeline stores 512-d vectors: a backbone's own vector (L2-normalised) is zero-padded to 512
when narrower (cosines unchanged), or reduced by the recorded fixed Gaussian projection when
wider, as the other embedders are. The embedding version names the backbone, the weights'
sha256, the reduction and the preprocessing.

Test-only switch: with ``DEER_TINY_ARCHITECTURES=1`` each backbone is built as a tiny network of
the same timm family (``test_efficientnet``, a 1-block Swin, a 1-block ViT) so that tests can
write a random state dict, import it and run the whole loading path quickly. The version string
then says ``tiny-test-architecture``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

from deer_pipeline import settings
from deer_pipeline.embedding import models as embedders
from deer_pipeline.embedding.models import (
    EmbedderError,
    WeightsMismatch,
    WeightsUnavailable,
)

log = logging.getLogger(__name__)

TINY_ENV = "DEER_TINY_ARCHITECTURES"
MANIFEST = "manifest.json"
EMBEDDING_DIM = embedders.EMBEDDING_DIM
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ChecksumMismatch(EmbedderError):
    """A weights file whose sha256 is not the one expected (given, or recorded at import)."""


@dataclass(frozen=True)
class Backbone:
    """A downloadable re-identification backbone."""

    name: str
    title: str
    timm_name: str
    timm_kwargs: Mapping = field(default_factory=dict)
    tiny_name: str = ""                       # test-only architecture of the same timm family
    tiny_kwargs: Mapping = field(default_factory=dict)
    repo: str = ""                            # Hugging Face hub repository
    filename: str = ""                        # file in that repository
    input_size: int = 224
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    dim: int = 0                              # the backbone's own vector width
    neck: str = "none"                        # none | miewid (GeM pooling + BatchNorm1d)
    licence: str = ""
    licence_warning: str | None = None
    projection_seed: int = 0

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo}/resolve/main/{self.filename}"


BACKBONES: dict[str, Backbone] = {
    "miewid": Backbone(
        "miewid", "MiewID-msv3 (Wild Me / Conservation X Labs)", "efficientnetv2_rw_m",
        {"num_classes": 0, "global_pool": ""}, "test_efficientnet", {"num_classes": 0, "global_pool": ""},
        repo="conservationxlabs/miewid-msv3", filename="model.safetensors", input_size=440,
        dim=2152, neck="miewid",
        licence="not stated in the sources checked here: read the model card of conservationxlabs/miewid-msv3",
        projection_seed=20240520),
    "megadescriptor": Backbone(
        "megadescriptor", "MegaDescriptor-L-384 (BVRA)", "swin_large_patch4_window12_384",
        {"num_classes": 0}, "swin_large_patch4_window12_384",
        {"num_classes": 0, "embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)},
        repo="BVRA/MegaDescriptor-L-384", filename="pytorch_model.bin", input_size=384,
        dim=1536, licence="CC BY-NC 4.0",
        licence_warning=("MegaDescriptor-L-384 is licensed CC BY-NC 4.0: non-commercial use only. "
                         "Do not use it where the pipeline's results serve a commercial purpose."),
        projection_seed=20240521),
    "dinov2": Backbone(
        "dinov2", "DINOv2 ViT-S/14 (Meta, self-supervised)", "vit_small_patch14_dinov2.lvd142m",
        {"num_classes": 0, "dynamic_img_size": True}, "vit_small_patch14_dinov2.lvd142m",
        {"num_classes": 0, "dynamic_img_size": True, "embed_dim": 24, "depth": 1, "num_heads": 2},
        repo="timm/vit_small_patch14_dinov2.lvd142m", filename="model.safetensors", input_size=224,
        dim=384, licence="Apache-2.0", projection_seed=20240522),
}
NAMES = tuple(BACKBONES)


def tiny_architectures() -> bool:
    """Test-only switch: build each backbone as a tiny network of the same timm family."""
    return settings.env(TINY_ENV, "") == "1"


def backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise embedders.UnknownModel(f"unknown re-identification backbone {name!r}; use one of {', '.join(NAMES)}")
    return BACKBONES[name]


def weights_root() -> Path:
    """``$DEER_WEIGHTS_DIR``, default ``<data dir>/weights``."""
    return Path(settings.env("DEER_WEIGHTS_DIR") or os.path.join(settings.data_dir_setting(), "weights")).expanduser()


def cached_file(name: str) -> Path:
    b = backbone(name)
    return weights_root() / name / b.filename


def _fetch_hint(b: Backbone) -> str:
    dest = weights_root() / b.name / b.filename
    return (f"With internet: `deer-pipeline weights fetch {b.name}` (downloads {b.filename} of "
            f"{b.repo} from the Hugging Face hub into {dest.parent}/). Air-gapped: download {b.url} "
            f"on another machine, copy it here and run `deer-pipeline weights import {b.name} FILE "
            f"[--sha256 HEX]` (it is checked, then stored as {dest}).")


# --------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------

def build_architecture(name: str, tiny: bool | None = None):
    """The bare network (random initialisation, nothing downloaded): timm's architecture, plus
    MiewID's GeM pooling and batch-norm neck."""
    import timm
    import torch
    from torch import nn

    b = backbone(name)
    tiny = tiny_architectures() if tiny is None else tiny
    arch, kwargs = (b.tiny_name, b.tiny_kwargs) if tiny else (b.timm_name, b.timm_kwargs)
    body = timm.create_model(arch, pretrained=False, **dict(kwargs))
    if b.neck != "miewid":
        return body

    class GeM(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.ones(1) * 3.0)

        def forward(self, x):
            return x.clamp(min=1e-6).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)

    class MiewID(nn.Module):
        """timm EfficientNetV2 features -> GeM -> BatchNorm1d (MiewID's inference path)."""

        def __init__(self):
            super().__init__()
            self.backbone = body
            self.pooling = GeM()
            self.bn = nn.BatchNorm1d(body.num_features)

        def forward(self, x):
            return self.bn(self.pooling(self.backbone.forward_features(x)))

    return MiewID()


def _output_dim(name: str, tiny: bool) -> int:
    if not tiny:
        return backbone(name).dim
    net = build_architecture(name, tiny=True)
    return int(getattr(net, "num_features", None) or net.bn.num_features)


def _remap(name: str, state: Mapping, net) -> dict:
    """Key layouts of the published files -> our module's keys.

    * miewid: ``MiewIdNet``'s own keys (``backbone.*``, ``pooling.p``, ``bn.*``) are ours; its
      training heads (``final.*``; ``fc.*`` when built with ``use_fc``) are dropped;
    * megadescriptor: timm's Swin ``checkpoint_filter_fn`` (original or timm layout -> timm's),
      then the classifier (``head.fc.*``) is dropped: the pipeline uses the pooled features;
    * dinov2: timm's own layout; a classifier head, if any, is dropped."""
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    if name == "miewid":
        return {k: v for k, v in state.items() if not k.startswith(("final.", "fc."))}
    if name == "megadescriptor":
        from timm.models.swin_transformer import checkpoint_filter_fn

        try:
            state = checkpoint_filter_fn(state, net)
        except Exception as exc:   # a file of another shape: the strict load names the keys
            log.debug("swin checkpoint filter failed (%s); loading the keys as they are", exc)
        return {k: v for k, v in state.items() if not k.startswith("head.fc.")}
    return {k: v for k, v in state.items() if not k.startswith(("head.fc.", "head.weight", "head.bias"))}


def read_state_dict(path) -> dict:
    """A state dict from a ``.safetensors`` file or a PyTorch file (never unpickles code)."""
    import torch

    path = str(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsMismatch(f"weights file {path} could not be read as a state dict: "
                              f"{type(exc).__name__}: {exc}"[:600]) from exc
    for nested in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(nested), dict):
            obj = obj[nested]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
        raise WeightsMismatch(f"weights file {path} does not hold a state dict (name -> tensor)")
    return obj


def load_into(name: str, path, tiny: bool | None = None):
    """Build ``name``'s architecture and load the file strictly; any mismatch fails naming the
    file, the architecture and the keys."""
    tiny = tiny_architectures() if tiny is None else tiny
    net = build_architecture(name, tiny)
    state = _remap(name, read_state_dict(path), net)
    own = net.state_dict()
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        def few(items):
            return ", ".join(items[:6]) + (f", ... ({len(items)} in all)" if len(items) > 6 else "")

        arch = backbone(name).tiny_name if tiny else backbone(name).timm_name
        parts = [f"{label}: {few(items)}" for label, items in
                 (("shape mismatches", mismatched), ("missing keys", missing), ("unexpected keys", unexpected)) if items]
        raise WeightsMismatch(f"weights file {path} is not a {name} checkpoint (architecture {arch}"
                              f"{', tiny test variant' if tiny else ''}): " + "; ".join(parts))
    net.load_state_dict(state, strict=True)
    return net.eval()


# --------------------------------------------------------------------------------------------
# The local cache: import (air-gapped) and fetch (internet)
# --------------------------------------------------------------------------------------------

def read_manifest(name: str) -> dict | None:
    path = weights_root() / name / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise EmbedderError(f"{path} is not valid JSON ({exc}); import the weights again") from exc


def import_weights(name: str, file, sha256: str | None = None, source: str = "import") -> dict:
    """Check ``file`` and store it in the cache as ``name``'s weights. The checksum is compared
    with ``sha256`` when given (:class:`ChecksumMismatch`), the file is loaded into the
    architecture (:class:`WeightsMismatch` naming the file), and only then copied into place
    (temporary file + rename) with a manifest recording its sha256. Returns the manifest."""
    b = backbone(name)
    file = Path(file).expanduser()
    if not file.is_file():
        raise EmbedderError(f"weights file {file} does not exist")
    digest = embedders.read_sha256(file)
    if sha256 and digest.lower() != sha256.strip().lower():
        raise ChecksumMismatch(f"weights file {file}: sha256 {digest} does not match the expected "
                               f"{sha256.strip().lower()} (wrong or incomplete download?); nothing imported")
    tiny = tiny_architectures()
    load_into(name, file, tiny)            # wrong architecture: fails here, nothing is written
    dest_dir = weights_root() / name
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / b.filename
    fd, tmp = tempfile.mkstemp(prefix=f".{b.filename}.", dir=str(dest_dir))
    os.close(fd)
    try:
        shutil.copyfile(file, tmp)
        if embedders.read_sha256(tmp) != digest:
            raise ChecksumMismatch(f"copy of {file} to {dest_dir} changed its sha256; nothing imported")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    manifest = {"name": name, "title": b.title, "file": b.filename, "sha256": digest,
                "repo": b.repo, "source": source, "imported_from": str(file.resolve()),
                "tiny_test_architecture": tiny, "licence": b.licence,
                "imported_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    mpath = dest_dir / MANIFEST
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", dir=str(dest_dir))
    with os.fdopen(fd, "w") as fh:
        json.dump(manifest, fh, indent=2)
    os.replace(tmp, mpath)
    return manifest


def fetch_weights(name: str, revision: str | None = None) -> dict:
    """Download ``name``'s weights from the Hugging Face hub (needs internet and the package
    ``huggingface_hub``), verify the file against the sha256 the hub reports, and import it."""
    b = backbone(name)
    try:
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    except ImportError as exc:   # pragma: no cover - pinned dependency
        raise EmbedderError("fetching weights needs the package huggingface_hub") from exc
    try:
        meta = get_hf_file_metadata(hf_hub_url(b.repo, b.filename, revision=revision))
        expected = (meta.etag or "").strip('"') if meta.etag and len((meta.etag or "").strip('"')) == 64 else None
        path = hf_hub_download(b.repo, b.filename, revision=revision)
    except Exception as exc:
        raise WeightsUnavailable(f"could not download {b.filename} of {b.repo} from the Hugging Face hub "
                                 f"({type(exc).__name__}: {exc}). " + _fetch_hint(b)) from exc
    return import_weights(name, path, expected, source=f"huggingface:{b.repo}")


# --------------------------------------------------------------------------------------------
# Resolving and loading for the pipeline
# --------------------------------------------------------------------------------------------

def resolve_weights(name: str, weights: str = "auto") -> embedders.ResolvedWeights:
    """The cached (or given) weights file of ``name``, its checksum verified against the
    manifest. Absent weights raise :class:`WeightsUnavailable` saying what to fetch and where."""
    b = backbone(name)
    weights = (weights or "auto").strip()
    if weights in ("auto", "imagenet", "hub"):
        path = cached_file(name)
        manifest = read_manifest(name)
        if not path.is_file() or manifest is None:
            raise WeightsUnavailable(f"weights for {name} ({b.title}) are not here: expected {path}"
                                     f"{'' if path.is_file() else ' (missing)'} with its {MANIFEST}. "
                                     + _fetch_hint(b))
        digest = embedders.file_sha256(path)
        if digest != manifest.get("sha256"):
            raise ChecksumMismatch(f"weights file {path}: sha256 {digest[:12]}... is not the "
                                   f"{str(manifest.get('sha256'))[:12]}... recorded when it was imported; "
                                   f"the file changed. Import or fetch it again.")
        if bool(manifest.get("tiny_test_architecture")) != tiny_architectures():
            raise WeightsMismatch(f"weights file {path} was imported for the "
                                  f"{'tiny test' if manifest.get('tiny_test_architecture') else 'real'} "
                                  f"architecture of {name}; import the real weights")
        return embedders.ResolvedWeights(name, name, "file", digest, str(path))
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailable(f"weights for {name}: {weights!r} is neither 'auto' nor an existing file. "
                                 + _fetch_hint(b))
    return embedders.ResolvedWeights(name, name, "file", embedders.file_sha256(path), str(path.resolve()))


def resolve_embedder(name: str, weights: str = "auto") -> embedders.EmbedderSpec:
    """The spec (with its embedding version) of a downloaded backbone; builds no network."""
    b = backbone(name)
    rw = resolve_weights(name, weights)
    tiny = tiny_architectures()
    d_in = _output_dim(name, tiny)
    if d_in > EMBEDDING_DIM:
        _, proj_sha = embedders.projection_matrix(d_in, b.projection_seed)
        reduction = f"proj-{proj_sha[:12]}"
    else:
        proj_sha = "zero-pad"
        reduction = f"pad{d_in}"
    red = hashlib.sha256(json.dumps({"features": ["embedding"], "reduction": proj_sha, "d_in": d_in},
                                    sort_keys=True).encode()).hexdigest()
    norm = "imagenet" if b.mean == IMAGENET_MEAN else "pm1"
    pre = embedders.Preprocessing(f"{embedders.INPUT_SIZE}sq-to-{b.input_size}-{norm}-norm", b.input_size, b.mean, b.std)
    arch = b.tiny_name + "-tiny-test-architecture" if tiny else b.timm_name
    version = f"{name}:{arch}@file-{rw.sha12}:{reduction}:{pre.tag}"
    return embedders.EmbedderSpec(model=name, weights=rw, features=("embedding",), pooling="avg",
                                  projection_seed=b.projection_seed, reduction_sha256=red, d_in=d_in,
                                  preprocessing=pre, version=version)


def warn_licence(name: str) -> None:
    b = backbone(name)
    if b.licence_warning:
        log.warning("%s", b.licence_warning)


def make_net(name: str, module, input_size: int, mean, std):
    """uint8 crops (n, 3, 224, 224) -> {"embedding": (n, d) float32}: resized to the backbone's
    input size (bilinear), normalised, run, L2-normalised."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class ReidNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = module
            self.backbone = name
            self.input_size = int(input_size)
            self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0)
            self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0)
            self.body_channels_last = False

        def forward(self, x):
            x = x.to(self.mean.dtype)
            if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
                x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                                  align_corners=False)
            x = (x - self.mean) / self.std
            return {"embedding": F.normalize(self.body(x).float(), dim=1)}

    return ReidNet()


def load_network(rw: embedders.ResolvedWeights, device: str = "cpu"):
    """The backbone of ``rw`` in eval mode on ``device`` (file checked, strictly loaded)."""
    b = backbone(rw.backbone)
    if rw.path and embedders.file_sha256(rw.path) != rw.sha256:
        raise ChecksumMismatch(f"weights file {rw.path} changed since it was resolved")
    warn_licence(b.name)
    module = load_into(b.name, rw.path)
    net = make_net(b.name, module, b.input_size, b.mean, b.std).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net.to(device)


# --------------------------------------------------------------------------------------------
# Dispatch for the models with a network of their own (models.REID_MODELS)
# --------------------------------------------------------------------------------------------

def resolve_any(model: str, weights: str = "auto") -> embedders.EmbedderSpec:
    """Spec of ``trained`` (weights = its model folder; ``auto`` = the registered one) or of a
    downloaded backbone (weights = ``auto``: the local cache, or a file)."""
    if model == "trained":
        from deer_pipeline.embedding import trained_model

        return trained_model.resolve_embedder(weights)
    return resolve_embedder(model, weights)


def load_any(rw: embedders.ResolvedWeights, device: str = "cpu"):
    if rw.backbone == "trained":
        from deer_pipeline.embedding import trained_model

        return trained_model.load_network(rw, device)
    return load_network(rw, device)
