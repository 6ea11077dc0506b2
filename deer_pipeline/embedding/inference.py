"""Batched inference: crops in, one L2-normalised 512-d vector per crop and model out.

Plain PyTorch, no Dagster. :class:`InferenceEngine` loads each backbone once per process (the
cache in :mod:`deer_pipeline.embedding.models`), decodes and resizes crops in DataLoader workers while
the network runs, runs a backbone once per batch for every model that shares it (with
``weights='auto'`` and no ImageNet ResNet50/B0 weights, ``multiscale`` and ``efficientnet_b0``
both run on the one EfficientNet-Lite0 pass), halves the batch on CUDA out-of-memory, and turns a
crop that cannot be decoded into a failure record instead of failing the batch.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from deer_pipeline import settings
from deer_pipeline.embedding import models as embedders
from deer_pipeline.embedding import networks
from deer_pipeline.embedding.models import EmbedderError, EmbedderSpec

log = logging.getLogger(__name__)

DEFAULT_MODELS = settings.EMBEDDING_MODELS


@dataclass(frozen=True)
class CropItem:
    """One crop to embed: ``path`` is absolute, or relative to ``store_dir`` (the crop store)."""

    detection_id: str
    path: str
    store_dir: str | None = None


def load_crop_image(item: CropItem):
    """Decode a crop to an RGB PIL image (through ``cropping.load_crop`` for crop-store paths)."""
    from PIL import Image

    if item.store_dir is not None:
        from deer_pipeline.detections.cropping import load_crop

        return load_crop(item.store_dir, item.path).convert("RGB")
    with Image.open(item.path) as im:
        im.load()
        return im.convert("RGB")


def preprocess(image, size: int = embedders.INPUT_SIZE):
    """RGB image -> uint8 tensor (3, size, size): bilinear resize, aspect not kept. Normalisation
    happens on the device, per backbone, so one decoded tensor feeds every model."""
    import torch
    from PIL import Image

    if image.width < 1 or image.height < 1:
        raise ValueError(f"empty image {image.width}x{image.height}")
    image = image.convert("RGB").resize((size, size), Image.BILINEAR)
    arr = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def zoom(image, fraction: float):
    """The centred ``fraction`` of ``image``'s width and height (at least 1 x 1 pixel); the
    image itself for 1."""
    if fraction >= 1.0:
        return image
    w, h = image.size
    cw, ch = max(1, round(w * fraction)), max(1, round(h * fraction))
    x, y = (w - cw) // 2, (h - ch) // 2
    return image.crop((x, y, x + cw, y + ch))


def preprocess_zooms(image, zooms: Sequence[float] = (1.0,), size: int = embedders.INPUT_SIZE):
    """RGB image -> uint8 tensor (3, size, size) for the whole crop alone, else
    (len(zooms), 3, size, size): each centred zoom resized as :func:`preprocess` does."""
    import torch

    if tuple(zooms) == (1.0,):
        return preprocess(image, size)
    if image.width < 1 or image.height < 1:
        raise ValueError(f"empty image {image.width}x{image.height}")
    return torch.stack([preprocess(zoom(image, z), size) for z in zooms])


class _CropDataset:
    """Map-style dataset: index -> (index, uint8 tensor or None, failure reason or None)."""

    def __init__(self, items: Sequence[CropItem], size: int, zooms: Sequence[float] = (1.0,)):
        self.items = items
        self.size = size
        self.zooms = tuple(zooms)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            return i, preprocess_zooms(load_crop_image(item), self.zooms, self.size), None
        except Exception as exc:   # one bad crop must not stop the batch
            return i, None, f"{type(exc).__name__}: {exc}"[:500]


def _collate(batch):
    import torch

    indices = [b[0] for b in batch if b[1] is not None]
    tensor = torch.stack([b[1] for b in batch if b[1] is not None]) if indices else None
    failures = [(b[0], b[2]) for b in batch if b[1] is None]
    return indices, tensor, failures


def _worker_init(_):
    import torch

    torch.set_num_threads(1)


def resolve_device(device: str = "auto", gpu_index: int | None = None) -> str:
    """'auto' -> 'cuda:0' when a GPU is visible else 'cpu'; 'cuda' -> 'cuda:0'; validates N."""
    import torch

    device = (device or "auto").strip()
    if gpu_index is not None:
        device = f"cuda:{int(gpu_index)}"
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise EmbedderError(f"device {device!r} asked for but no CUDA GPU is visible; use 'cpu' or 'auto'")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if not 0 <= index < torch.cuda.device_count():
            raise EmbedderError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) visible")
        return f"cuda:{index}"
    raise EmbedderError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', not {device!r}")


@dataclass
class BatchResult:
    detection_ids: list[str]                       # embedded crops, in input order
    vectors: dict[str, np.ndarray]                 # model -> (len(detection_ids), 512) float32
    failures: list[tuple[str, str]]                # (detection_id, reason)


@dataclass
class EmbedResult:
    specs: dict[str, EmbedderSpec]
    detection_ids: list[str] = field(default_factory=list)
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    n_items: int = 0

    @property
    def versions(self) -> dict[str, str]:
        return {m: s.version for m, s in self.specs.items()}

    @property
    def crops_per_s(self) -> float:
        return self.n_items / self.seconds if self.seconds > 0 else 0.0


class InferenceEngine:
    """Embeds crops with one or more models.

    ``weights`` is one setting for every model ('auto', 'imagenet', a path, 'random-test-only')
    or a mapping model -> setting. ``amp`` (float16 autocast) applies on CUDA only;
    ``num_workers=None`` picks a value (0 for a single batch). ``zooms``: each crop and centred
    zooms into it are embedded and every model's unit vectors averaged and normalised again
    (``settings.CROP_ZOOMS``; the whole crop alone by default here), named in the versions.
    """

    def __init__(self, models: Sequence[str] = DEFAULT_MODELS, *, weights: str | Mapping[str, str] = "auto",
                 device: str = "auto", gpu_index: int | None = None, batch_size: int = 32,
                 amp: bool = True, channels_last: bool = True, num_workers: int | None = None,
                 pooling: str = "avg", projection_seeds: Mapping[str, int] | None = None,
                 backend: str = "eager", zooms: Sequence[float] = (1.0,)):
        if isinstance(models, str):
            models = [models]
        models = list(dict.fromkeys(models))
        if not models:
            raise EmbedderError("InferenceEngine needs at least one model")
        if batch_size < 1:
            raise EmbedderError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers is not None and num_workers < 0:
            raise EmbedderError(f"num_workers must be >= 0, got {num_workers}")
        seeds = dict(projection_seeds or {})
        self.specs: dict[str, EmbedderSpec] = {}
        for m in models:
            w = weights.get(m, "auto") if isinstance(weights, Mapping) else weights
            self.specs[m] = embedders.resolve_embedder(m, w, pooling=pooling, projection_seed=seeds.get(m),
                                                       backend=backend, zooms=zooms)
        self.zooms = next(iter(self.specs.values())).zooms
        self.device = resolve_device(device, gpu_index)
        self.batch_size = int(batch_size)
        self.amp = bool(amp) and self.device.startswith("cuda")
        self.channels_last = bool(channels_last)
        self.num_workers = num_workers
        self.pooling = pooling
        self._effective_batch = self.batch_size
        self._nets: dict[tuple, object] | None = None
        self._groups: dict[tuple, list[str]] = {}
        for m, spec in self.specs.items():
            self._groups.setdefault(self._net_key(spec), []).append(m)

    # -- description --------------------------------------------------------------------------
    @property
    def models(self) -> list[str]:
        return list(self.specs)

    @property
    def versions(self) -> dict[str, str]:
        return {m: s.version for m, s in self.specs.items()}

    @property
    def weights_used(self) -> list[str]:
        return [s.weights_used for s in self.specs.values()]

    @property
    def n_backbone_passes(self) -> int:
        """Backbone forward passes per crop (models sharing a backbone share its pass)."""
        return len(self._groups)

    # -- networks -----------------------------------------------------------------------------
    def _net_key(self, spec: EmbedderSpec) -> tuple:
        return (spec.backbone, spec.weights.sha256, spec.weights.source, spec.pooling, spec.backend)

    def load(self) -> None:
        """Load every backbone now (otherwise done at the first batch)."""
        if self._nets is None:
            nets = {}
            for key, models in self._groups.items():
                spec = self.specs[models[0]]
                nets[key] = networks.load_backbone(spec.weights, spec.pooling, self.device,
                                                    self.channels_last, spec.backend)
            self._nets = nets

    def _forward(self, x) -> dict[str, np.ndarray]:
        """uint8 batch (n, 3, 224, 224) on CPU -> {model: (n, 512) float32}."""
        import torch

        self.load()
        out: dict[str, np.ndarray] = {}
        with torch.inference_mode():
            for key, models in self._groups.items():
                net = self._nets[key]
                if self.specs[models[0]].backend != "eager":        # ONNX Runtime runs on the CPU
                    pooled = net(x)
                    for m in models:
                        out[m] = networks.project(self.specs[m], pooled).float().numpy()
                    continue
                x = x.to(self.device, non_blocking=True)
                if self.amp:
                    with torch.autocast(device_type="cuda", dtype=torch.float16):
                        pooled = net(x)
                else:
                    pooled = net(x)
                for m in models:
                    out[m] = networks.project(self.specs[m], pooled).float().cpu().numpy()
        return out

    def embed_tensor(self, x) -> dict[str, np.ndarray]:
        """Embed a preprocessed uint8 batch (n, 3, H, W), or (n, zooms, 3, H, W) from
        :func:`preprocess_zooms`: each crop's zoom vectors are averaged and normalised again."""
        if x.dim() == 5:
            n, v = int(x.shape[0]), int(x.shape[1])
            flat = self._embed_flat(x.reshape(n * v, *x.shape[2:]), align=v)
            return {m: embedders.unit_rows(a.reshape(n, v, -1).mean(axis=1)) for m, a in flat.items()}
        return self._embed_flat(x)

    def _embed_flat(self, x, align: int = 1) -> dict[str, np.ndarray]:
        """Embed a uint8 batch (n, 3, H, W); on CUDA out-of-memory retry with half the batch
        (and keep the smaller size for later batches). Every forward pass holds a multiple of
        ``align`` rows (all the zooms of a crop go through together)."""
        import torch

        n = int(x.shape[0])
        chunks: list[dict[str, np.ndarray]] = []
        start = 0
        while start < n:
            size = min(self._effective_batch, n - start)
            size = max(align, size - size % align)
            try:
                chunks.append(self._forward(x[start:start + size]))
            except torch.OutOfMemoryError:
                if size <= align:
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self._effective_batch = max(1, size // 2)
                log.warning("CUDA out of memory at batch %d; retrying with batch %d", size,
                            self._effective_batch)
                continue
            start += size
        return {m: np.concatenate([c[m] for c in chunks], axis=0) for m in self.specs}

    # -- crops --------------------------------------------------------------------------------
    def _crops_per_batch(self) -> int:
        """Crops decoded per batch: ``batch_size`` images go through the networks at once, so
        with several zooms per crop a batch holds fewer crops."""
        return max(1, self.batch_size // len(self.zooms))

    def _workers_for(self, n_items: int) -> int:
        if self.num_workers is not None:
            return self.num_workers
        if n_items <= self.batch_size:
            return 0
        cpus = os.cpu_count() or 1
        if self.device.startswith("cuda"):
            return max(1, min(8, cpus - 1))
        return 1 if cpus >= 2 else 0

    def iter_embed(self, items: Iterable[CropItem]) -> Iterator[BatchResult]:
        """Embed crops batch by batch (for writing as you go)."""
        from torch.utils.data import DataLoader

        items = list(items)
        if not items:
            return
        workers = self._workers_for(len(items))
        loader = DataLoader(
            _CropDataset(items, embedders.INPUT_SIZE, self.zooms), batch_size=self._crops_per_batch(), shuffle=False,
            num_workers=workers, collate_fn=_collate,
            pin_memory=self.device.startswith("cuda"),
            worker_init_fn=_worker_init if workers else None,
            prefetch_factor=2 if workers else None,
        )
        for indices, tensor, failed in loader:
            failures = [(items[i].detection_id, reason) for i, reason in failed]
            if tensor is None:
                yield BatchResult([], {m: np.zeros((0, embedders.EMBEDDING_DIM), np.float32)
                                       for m in self.specs}, failures)
                continue
            vecs = self.embed_tensor(tensor)
            finite = np.ones(len(indices), dtype=bool)
            for m in self.specs:
                finite &= np.isfinite(vecs[m]).all(axis=1)
            if not finite.all():
                failures += [(items[i].detection_id, "non-finite embedding")
                             for i, ok in zip(indices, finite) if not ok]
                indices = [i for i, ok in zip(indices, finite) if ok]
                vecs = {m: v[finite] for m, v in vecs.items()}
            yield BatchResult([items[i].detection_id for i in indices], vecs, failures)

    def embed(self, items: Iterable[CropItem], desc: str = "embedding", quiet: bool | None = None) -> EmbedResult:
        """Embed every crop; vectors aligned with ``detection_ids`` (failures left out). A
        progress bar shows on a terminal unless ``quiet`` (or DEER_QUIET=1)."""
        from deer_pipeline.ops.progress import ProgressBar

        t0 = time.perf_counter()
        items = list(items)
        result = EmbedResult(specs=dict(self.specs), n_items=len(items))
        parts: dict[str, list[np.ndarray]] = {m: [] for m in self.specs}
        with ProgressBar(len(items), desc=desc, unit="crop", quiet=quiet) as bar:
            for batch in self.iter_embed(items):
                bar.update(len(batch.detection_ids) + len(batch.failures))
                result.detection_ids += batch.detection_ids
                result.failures += batch.failures
                for m in self.specs:
                    parts[m].append(batch.vectors[m])
        result.vectors = {m: (np.concatenate(p, axis=0) if p else
                              np.zeros((0, embedders.EMBEDDING_DIM), np.float32))
                          for m, p in parts.items()}
        result.seconds = time.perf_counter() - t0
        return result

    def embed_images(self, paths: Sequence[str | os.PathLike]) -> EmbedResult:
        """Embed image files (the detection id of each is its path)."""
        return self.embed([CropItem(str(p), str(p)) for p in paths])
