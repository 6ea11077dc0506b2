"""Inference backends for the embedding backbones: the same vectors, run faster on the CPU.

``eager`` is PyTorch itself. ``onnxruntime`` exports the pipeline's own backbone network (uint8
crops in, pooled features out; normalisation inside) to ONNX once per backbone, weights and
pooling, caches the file under ``<data dir>/onnx/`` (written atomically, so parallel workers
share it), and runs it with ONNX Runtime's CPU provider. Measured on this project's 2-core
machine it is several times faster than eager PyTorch with the same vectors (cosine 1.000000 to
the eager ones; see BENCHMARKS.md); the backend is part of the embedding version
(``...:onnxruntime``), so vectors of different backends are never mixed.

``auto`` (the default) picks ``onnxruntime`` when the run has no GPU and the package is
installed, else ``eager`` (``embedding.config.resolve_backend``); backbones that are not known to
export (``ONNX_BACKBONES``) always run eager, decided when the version is resolved.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from pathlib import Path

from deer_pipeline import settings

log = logging.getLogger(__name__)

BACKENDS = settings.INFERENCE_BACKENDS
ONNX_BACKBONES = ("resnet50", "efficientnet_b0", "efficientnet_lite0")
ONNX_OPSET = 17
_export_lock = threading.Lock()


class BackendUnavailable(RuntimeError):
    """The backend cannot run here; the message says what to install or set."""


def onnxruntime_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def onnx_cache_dir() -> Path:
    return Path(settings.data_dir_setting()).resolve() / "onnx"


class OnnxBackbone:
    """A backbone network run by ONNX Runtime: called like the eager one, uint8 crops
    (n, 3, 224, 224) -> {feature name: pooled float32 (n, channels)} as torch tensors (CPU)."""

    def __init__(self, eager_net, key: str):
        import onnxruntime as ort
        import torch

        self.names = self._output_names(eager_net)
        self.path = onnx_cache_dir() / f"{key}.onnx"
        if not self.path.exists():
            self._export(eager_net)
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:   # a corrupt cache entry: export again once
            log.warning("ONNX file %s unreadable (%s); exporting it again", self.path, exc)
            self.path.unlink(missing_ok=True)
            self._export(eager_net)
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    @staticmethod
    def _output_names(eager_net) -> list[str]:
        import torch

        with torch.inference_mode():
            return list(eager_net(torch.zeros((1, 3, 224, 224), dtype=torch.uint8)))

    def _export(self, eager_net) -> None:
        import warnings

        import torch

        names = self.names

        class _Flat(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = eager_net

            def forward(self, x):
                out = self.net(x)
                return tuple(out[k] for k in names)

        with _export_lock:
            if self.path.exists():
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=self.path.stem, suffix=".tmp", dir=self.path.parent)
            os.close(fd)
            try:
                with warnings.catch_warnings(), torch.inference_mode():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(_Flat().eval(), (torch.zeros((2, 3, 224, 224), dtype=torch.uint8),), tmp,
                                      input_names=["crops"], output_names=names,
                                      dynamic_axes={"crops": {0: "n"}}, opset_version=ONNX_OPSET, dynamo=False)
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            log.info("exported %s for ONNX Runtime", self.path)

    def __call__(self, x):
        import numpy as np
        import torch

        arr = np.ascontiguousarray(x.detach().to("cpu").numpy())
        outs = self.session.run(None, {"crops": arr})
        return {k: torch.from_numpy(v) for k, v in zip(self.names, outs)}


def cache_key(backbone: str, weights_sha256: str, source: str, pooling: str, features) -> str:
    """File name of a backbone's export: backbone, weights, pooling and the features it pools."""
    from deer_pipeline import __version__

    digest = hashlib.sha256(repr((backbone, weights_sha256, source, pooling, tuple(features),
                                  ONNX_OPSET, __version__)).encode()).hexdigest()[:16]
    return f"{backbone}-{weights_sha256[:12]}-{pooling}-{digest}"


def wrap(eager_net, backend: str, key: str):
    """``eager_net`` for ``backend`` (``eager``: itself)."""
    if backend == "eager":
        return eager_net
    if backend == "onnxruntime":
        if not onnxruntime_installed():
            raise BackendUnavailable("backend 'onnxruntime' needs the onnxruntime package "
                                     "(pip install onnxruntime onnx), or set DEER_INFERENCE_BACKEND=eager")
        return OnnxBackbone(eager_net, key)
    raise BackendUnavailable(f"unknown inference backend {backend!r}; use one of {BACKENDS} or auto")
