"""The networks behind the embedders: building a backbone (torchvision ResNet50 / EfficientNet-B0, EfficientNet-Lite0), loading and checking its state dict, pooling its features, the fixed projection to 512-d, and a per-process cache of built networks. Versions and weights resolution live in ``models``."""

from __future__ import annotations

import threading
from typing import Mapping, Sequence

from deer_pipeline.embedding.models import (
    ALLOW_RANDOM_ENV,
    BACKBONE_FEATURES,
    BACKBONE_PREPROCESSING,
    CENTRE_SIGMA,
    EMBEDDING_DIM,
    GEM_P,
    RANDOM_WEIGHTS,
    RANDOM_WEIGHTS_SEED,
    REID_MODELS,
    EmbedderError,
    EmbedderSpec,
    ResolvedWeights,
    UnknownModel,
    WeightsMismatch,
    _torchvision_weights_enum,
    projection_matrix,
    random_weights_allowed,
)


def _build_module(backbone: str, empty: bool = False):
    """The bare architecture, never downloading anything: randomly initialised, or with
    ``empty=True`` built on the meta device without its ImageNet classifier (nothing allocated or
    initialised; :func:`load_state_dict_checked` then assigns the loaded tensors)."""
    if empty:
        import torch
        from torch import nn

        with torch.device("meta"):
            module = _build_module(backbone)
        for head in ("fc", "classifier", "_fc"):   # never used for embeddings
            if hasattr(module, head):
                setattr(module, head, nn.Identity())
        return module
    if backbone == "resnet50":
        import torchvision.models as tvm

        return tvm.resnet50(weights=None)
    if backbone == "efficientnet_b0":
        import torchvision.models as tvm

        return tvm.efficientnet_b0(weights=None)
    if backbone == "efficientnet_lite0":
        from efficientnet_lite_pytorch import EfficientNet

        return EfficientNet.from_name("efficientnet-lite0")
    raise UnknownModel(f"unknown backbone {backbone!r}")


# Keys a weights file may lack: the ImageNet classifier, unused for embeddings.
_OPTIONAL_PREFIXES = ("fc.", "classifier.", "_fc.")


def random_test_state_dict(backbone: str, seed: int = RANDOM_WEIGHTS_SEED) -> dict:
    """A seeded random state dict for ``backbone`` (unit tests only; needs DEER_ALLOW_RANDOM_WEIGHTS=1)."""
    import torch

    if not random_weights_allowed():
        raise EmbedderError(f"random weights are for unit tests only; set {ALLOW_RANDOM_ENV}=1")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = _build_module(backbone)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _read_state_dict(path: str) -> dict:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsMismatch(f"weights file {path} could not be read as a PyTorch state dict: "
                              f"{type(exc).__name__}: {exc}") from exc
    for nested in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(nested), dict):
            obj = obj[nested]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise WeightsMismatch(f"weights file {path} does not hold a state dict (name -> tensor)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_state_dict_checked(module, state_dict: Mapping, source: str, backbone: str) -> None:
    """Load ``state_dict`` into ``module``; any mismatch fails with the file and the keys."""
    import torch

    own = module.state_dict()
    if not any(k.startswith(_OPTIONAL_PREFIXES) for k in own):   # classifier removed: ignore its keys
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(_OPTIONAL_PREFIXES)}
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state_dict.items()
                  if k in own and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state_dict and not k.startswith(_OPTIONAL_PREFIXES)]
    unexpected = [k for k in state_dict if k not in own]
    if mismatched or missing or unexpected:
        def _few(items):
            return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")

        parts = []
        if mismatched:
            parts.append(f"shape mismatches: {_few(mismatched)}")
        if missing:
            parts.append(f"missing keys: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_few(unexpected)}")
        raise WeightsMismatch(f"weights file {source} does not fit the {backbone} backbone: "
                              + "; ".join(parts))
    meta = any(t.is_meta for t in own.values())
    module.load_state_dict(dict(state_dict), strict=meta, assign=meta)


def centre_weights(h: int, w: int, sigma: float = CENTRE_SIGMA, device=None):
    """(h, w) weights summing to 1: a Gaussian centred on the map, ``sigma`` in map coordinates
    scaled to [-1, 1] on both axes (a 1-wide axis is all centre)."""
    import torch

    def axis(n):
        return (torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2) / max((n - 1) / 2, 1)

    y, x = axis(h), axis(w)
    g = torch.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def pool(x, pooling: str):
    """(n, C, h, w) feature map -> (n, C) float32: ``avg``, ``gem`` (p = GEM_P) or ``centre``
    (a centred Gaussian weight on the map, :func:`centre_weights`)."""
    x = x.float()
    if pooling == "gem":
        return x.clamp(min=1e-6).pow(GEM_P).mean(dim=(2, 3)).pow(1.0 / GEM_P)
    if pooling == "centre":
        return (x * centre_weights(x.shape[2], x.shape[3], device=x.device)).sum(dim=(2, 3))
    return x.mean(dim=(2, 3))





def _make_backbone_net(backbone: str, module, pooling: str, wanted: Sequence[str]):
    import torch
    from torch import nn

    pre = BACKBONE_PREPROCESSING[backbone]

    class BackboneNet(nn.Module):
        """uint8 crops (n, 3, 224, 224) -> {feature name: pooled float32 (n, channels)}."""

        def __init__(self):
            super().__init__()
            self.body = module
            self.backbone = backbone
            self.pooling = pooling
            self.wanted = tuple(wanted)
            self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1) * 255.0)
            self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1) * 255.0)

        def forward(self, x):
            x = (x.to(self.mean.dtype) - self.mean) / self.std
            if self.body_channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = {}
            m = self.body
            if backbone == "resnet50":
                x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
                x = m.layer1(x)
                x = m.layer2(x)
                if "layer2" in self.wanted:
                    out["layer2"] = pool(x, pooling)
                x = m.layer3(x)
                if "layer3" in self.wanted:
                    out["layer3"] = pool(x, pooling)
                x = m.layer4(x)
                out["layer4"] = pool(x, pooling)   # == m.avgpool(x) for average pooling
            elif backbone == "efficientnet_b0":
                out["head"] = pool(m.features(x), pooling)
            else:  # efficientnet_lite0
                x = m._swish(m._bn0(m._conv_stem(x)))
                for idx, block in enumerate(m._blocks):
                    x = block(x, drop_connect_rate=None)
                    name = f"block{idx}"
                    if name in self.wanted:
                        out[name] = pool(x, pooling)
                x = m._swish(m._bn1(m._conv_head(x)))
                out["head"] = pool(x, pooling)
            return out

    net = BackboneNet()
    net.body_channels_last = False
    return net


_net_cache: dict[tuple, object] = {}


_net_lock = threading.Lock()


def load_backbone(weights: ResolvedWeights, pooling: str = "avg", device: str = "cpu",
                  channels_last: bool = False, backend: str = "eager"):
    """The backbone network for ``weights`` in eval mode on ``device``: loaded once per process
    (cached by backbone, weights hash, pooling, device, memory format and backend). ``backend``
    ``onnxruntime`` returns the same network run by ONNX Runtime on the CPU (``backends``)."""
    import torch

    from deer_pipeline.embedding import backends

    if backend != "eager":
        key = (weights.backbone, weights.sha256, weights.source, pooling, backend)
        with _net_lock:
            net = _net_cache.get(key)
        if net is None:
            eager = load_backbone(weights, pooling, "cpu", False, "eager")
            net = backends.wrap(eager, backend, backends.cache_key(
                weights.backbone, weights.sha256, weights.source, pooling, BACKBONE_FEATURES[weights.backbone]))
            with _net_lock:
                _net_cache[key] = net
        return net
    key = (weights.backbone, weights.sha256, weights.source, pooling, str(device), bool(channels_last))
    with _net_lock:
        net = _net_cache.get(key)
        if net is not None:
            return net
        if weights.backbone in REID_MODELS:     # trained model or downloaded re-id backbone
            from deer_pipeline.embedding import backbones

            net = _net_cache[key] = backbones.load_any(weights, device)
            return net
        if weights.source == RANDOM_WEIGHTS:
            if not random_weights_allowed():
                raise EmbedderError(f"random weights are refused unless {ALLOW_RANDOM_ENV}=1")
            module = _build_module(weights.backbone, empty=True)
            load_state_dict_checked(module, random_test_state_dict(weights.backbone),
                                    f"<{RANDOM_WEIGHTS}>", weights.backbone)
        else:
            module = _build_module(weights.backbone, empty=True)
            if weights.source == "imagenet" and weights.backbone != "efficientnet_lite0":
                # torchvision's own mechanism; the file is in the cache (checked when resolving),
                # so this never downloads.
                state = _torchvision_weights_enum(weights.backbone).get_state_dict(
                    progress=False, check_hash=False)
            else:
                state = _read_state_dict(weights.path)
            load_state_dict_checked(module, state, weights.path or weights.backbone, weights.backbone)
        wanted = tuple(BACKBONE_FEATURES[weights.backbone])
        net = _make_backbone_net(weights.backbone, module, pooling, wanted)
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        net = net.to(device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
            net.body_channels_last = True
        _net_cache[key] = net
        return net


def clear_cache() -> None:
    with _net_lock:
        _net_cache.clear()


def project(spec: EmbedderSpec, pooled: Mapping):
    """Pooled backbone features -> L2-normalised float32 (n, 512) torch tensor for ``spec``."""
    import torch

    if spec.features == ("embedding",):          # a network with its own vector (backbones.py)
        x = pooled["embedding"].float()
        if spec.d_in < EMBEDDING_DIM:              # zero-padding keeps every cosine
            x = torch.nn.functional.pad(x, (0, EMBEDDING_DIM - spec.d_in))
        if spec.d_in <= EMBEDDING_DIM:
            return _l2_normalise(x)
        return _l2_normalise(x @ _projection_tensor(spec.d_in, spec.projection_seed, x.device))
    parts = [pooled[f].float() for f in spec.features]
    if len(parts) > 1:   # multiscale: each scale L2-normalised so no scale dominates by size
        parts = [_l2_normalise(p) for p in parts]
    x = torch.cat(parts, dim=1)
    return _l2_normalise(x @ _projection_tensor(spec.d_in, spec.projection_seed, x.device))


def _l2_normalise(x):
    """Row-wise L2 normalisation that cannot overflow: rows are first divided by their largest
    absolute value (squares of activations above ~1e19 would overflow float32)."""
    import torch.nn.functional as F

    scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    return F.normalize(x / scale, dim=1)


_proj_tensors: dict[tuple, object] = {}


def _projection_tensor(d_in: int, seed: int, device):
    import torch

    key = (d_in, seed, str(device))
    t = _proj_tensors.get(key)
    if t is None:
        t = torch.from_numpy(projection_matrix(d_in, seed)[0].copy()).to(device)
        _proj_tensors[key] = t
    return t
