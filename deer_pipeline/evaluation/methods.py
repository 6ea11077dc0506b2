"""Re-identification methods compared by the evaluation, side by side.

Plain logic (PyTorch / numpy), no Dagster. A *method* is everything that turns crops into deer:
the vectors and the decision rule. Three kinds:

* ``pipeline``: the pipeline's own embedders (:mod:`deer_pipeline.embedding.inference`) and its own
  match-or-create (:func:`deer_pipeline.identity.matching.decide_partition`) with a given set of ensemble
  weights; only the threshold differs from the production configuration, and it is chosen on
  calibration labels when there are any.
* ``features``: a different way of turning the backbone's feature map into a 512-d vector
  (:class:`FeatureExtractor`), stored as its own embedding version and then decided by the
  pipeline's own matching, exactly like a pipeline embedder. This is how an improved embedding
  is tried before it becomes an option of ``embedders.py``.
* ``legacy``: a faithful re-implementation of the system we start from (:class:`LegacyMatcher`):
  the backbone's pooled features through an untrained ``nn.Linear(d, 512)`` with PyTorch's
  default initialisation drawn anew in every process (no seed), one frozen vector per deer taken
  from its first sighting, greedy matching at a fixed 0.60.

``weights='auto'``: where no ImageNet ResNet50 / EfficientNet-B0 weights exist offline (this
machine), the EfficientNet-Lite0 backbone substitutes for both, and every method says so in its
``backbone`` description; ``v1_resnet50`` and ``efficientnet_b0`` then differ only by their
random projection, and ``multiscale`` pools three Lite0 stages.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from deer_pipeline import settings
from deer_pipeline.embedding import models as embedders
from deer_pipeline.embedding import networks

log = logging.getLogger(__name__)

LEGACY_THRESHOLD = 0.60
LEGACY_DIM = 512
DEFAULT_METHOD = "default"


@dataclass(frozen=True)
class Method:
    """One method of the comparison."""

    name: str
    kind: str                                  # pipeline | features | legacy
    description: str
    ensemble_weights: Mapping[str, float] = field(default_factory=dict)   # model -> weight
    feature: str | None = None                 # features: name in FEATURES
    calibrate: bool = True                     # False: the threshold is fixed (legacy)
    fixed_threshold: float | None = None
    match_score: str = "cosine"                # settings.MatchingSettings.match_score
    encounter_pooling: str = "max"             # settings.MatchingSettings.encounter_pooling

    @property
    def models(self) -> list[str]:
        return list(self.ensemble_weights)

    @property
    def verified(self) -> bool:
        """Does the method verify candidates with local features (match_score local or fused)?"""
        return self.match_score != "cosine"


def _default_weights() -> dict[str, float]:
    from deer_pipeline.settings import MatchingSettings

    return dict(MatchingSettings().ensemble_weights)


def default_threshold() -> float:
    """The re-identification threshold the pipeline is configured with out of the box."""
    from deer_pipeline.settings import MatchingSettings

    return float(MatchingSettings().reid_threshold)


def method_registry() -> dict[str, Method]:
    """Every method the evaluation knows, in report order. The ablation of local verification,
    calibration/fusion and encounter pooling: ``v3_ensemble`` (global only), ``local_verified``,
    ``fused``, ``fused_pooled``."""
    from deer_pipeline.settings import MatchingSettings

    dw = _default_weights()
    ms = MatchingSettings()
    return {
        "v1_resnet50": Method("v1_resnet50", "pipeline",
                              "ResNet50 pooled layer4 -> fixed random projection (the first version)",
                              {"resnet50": 1.0}),
        "multiscale": Method("multiscale", "pipeline",
                             "three pooled backbone stages, each L2-normalised, concatenated, projected",
                             {"multiscale": 1.0}),
        "efficientnet_b0": Method("efficientnet_b0", "pipeline",
                                  "EfficientNet-B0 pooled head -> fixed random projection",
                                  {"efficientnet_b0": 1.0}),
        "v3_ensemble": Method("v3_ensemble", "pipeline",
                              "0.6 x multiscale cosine + 0.4 x efficientnet_b0 cosine",
                              dict(settings.ENSEMBLE_WEIGHTS)),
        DEFAULT_METHOD: Method(DEFAULT_METHOD, "pipeline",
                               "the pipeline's default configuration (settings.MatchingSettings "
                               "ensemble weights " + ", ".join(f"{m}={w:g}" for m, w in dw.items())
                               + f"; match score {ms.match_score}, encounter pooling {ms.encounter_pooling})", dw,
                               match_score=ms.match_score, encounter_pooling=ms.encounter_pooling),
        "local_verified": Method(
            "local_verified", "pipeline",
            "global ensemble picks the top candidate sightings (verify_top_k), RootSIFT + ratio test + "
            "MAGSAC affine inliers decide (flank-aware); score = inliers / (inliers + 20)", dw,
            match_score="local"),
        "fused": Method(
            "fused", "pipeline",
            "mean of isotonic-calibrated probabilities of the global cosine and the local inliers "
            "(calibrated on the calibration labels); best pair per encounter and deer", dw,
            match_score="fused"),
        "fused_pooled": Method(
            "fused_pooled", "pipeline",
            "as fused, encounter vs deer = mean of the two best pairs over all its photos x the "
            "deer's sightings", dw, match_score="fused", encounter_pooling="top2"),
        "animal_weighted": Method(
            "animal_weighted", "features",
            "EfficientNet-Lite0 head feature map pooled with weights = activation norm per "
            "position (the animal, not the scene, dominates), fixed random projection; "
            "decided by the pipeline's matching",
            {"animal_weighted": 1.0}, feature="animal_weighted"),
        "centre_weighted": Method(
            "centre_weighted", "features",
            "EfficientNet-Lite0 head feature map pooled with a Gaussian centred on the crop "
            f"(sigma {embedders.CENTRE_SIGMA:g} of the half-width: the pipeline's pooling 'centre'), "
            "fixed random projection; decided by the pipeline's matching",
            {"centre_weighted": 1.0}, feature="centre_weighted"),
        "trained": Method("trained", "pipeline",
                          "re-identification model trained by `deer-pipeline train` (EfficientNet-Lite0, last "
                          "blocks + projection; labelled individuals with sub-center ArcFace, or encounters "
                          "without labels, or named individuals plus unnamed encounters, with the supervised "
                          "contrastive loss); from --model-file, or trained in the run (--train-split: the "
                          "calibration half's individuals; --train-encounters; --train-mixed)",
                          {"trained": 1.0}),
        "miewid": Method("miewid", "pipeline", "MiewID-msv3 (downloaded weights; skipped when absent)",
                         {"miewid": 1.0}),
        "megadescriptor": Method("megadescriptor", "pipeline",
                                 "MegaDescriptor-L-384 (downloaded weights, CC BY-NC 4.0; skipped when absent)",
                                 {"megadescriptor": 1.0}),
        "dinov2": Method("dinov2", "pipeline", "DINOv2 ViT-S/14 (downloaded weights; skipped when absent)",
                         {"dinov2": 1.0}),
        "legacy": Method("legacy", "legacy",
                         "the system we start from: untrained nn.Linear(d, 512) drawn anew per "
                         "process, one frozen vector per deer from its first sighting, greedy at 0.60",
                         calibrate=False, fixed_threshold=LEGACY_THRESHOLD),
    }


ALL_METHODS = tuple(method_registry())


def resolve_methods(names: Sequence[str] | None) -> list[Method]:
    reg = method_registry()
    if not names:
        return list(reg.values())
    out = []
    for n in names:
        for part in str(n).split(","):
            part = part.strip()
            if not part:
                continue
            if part not in reg:
                raise ValueError(f"unknown method {part!r}; known: {', '.join(reg)}")
            if reg[part] not in out:
                out.append(reg[part])
    return out


# --------------------------------------------------------------------------------------------
# Backbone feature maps (shared by the legacy method and the feature methods)
# --------------------------------------------------------------------------------------------

def backbone_for(model: str = "resnet50", weights: str = "auto") -> embedders.ResolvedWeights:
    """The backbone + weights the pipeline resolves for ``model`` (``auto``: Lite0 substitutes
    when the ImageNet weights of the native backbone are not available offline)."""
    return embedders.resolve_weights(model, weights)


def feature_map(net, x):
    """uint8 crops (n, 3, H, W) -> the backbone's last feature map (n, C, h, w) float32.

    ``net`` is the pipeline's own loaded backbone (:func:`networks.load_backbone`); its
    per-backbone normalisation is applied here exactly as in the pipeline's forward."""
    x = (x.to(net.mean.dtype) - net.mean) / net.std
    m = net.body
    if net.backbone == "resnet50":
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
    elif net.backbone == "efficientnet_b0":
        x = m.features(x)
    else:  # efficientnet_lite0
        x = m._swish(m._bn0(m._conv_stem(x)))
        for block in m._blocks:
            x = block(x, drop_connect_rate=None)
        x = m._swish(m._bn1(m._conv_head(x)))
    return x.float()


def average_pool(fmap):
    return fmap.mean(dim=(2, 3))


def activation_weighted_pool(fmap, power: float = 1.0):
    """Pool a feature map with per-position weights proportional to the activation norm at
    that position (``power`` sharpens it): positions where the backbone responds strongly - the
    animal - count more than the flat background."""
    w = fmap.norm(dim=1, keepdim=True).clamp_min(1e-12) ** power       # (n, 1, h, w)
    w = w / w.sum(dim=(2, 3), keepdim=True)
    return (fmap * w).sum(dim=(2, 3))


@dataclass(frozen=True)
class FeatureExtractor:
    """A vector recipe on top of a pipeline backbone: feature map -> pooled -> fixed projection."""

    name: str
    native_model: str                   # whose backbone to run (resolved like the pipeline does)
    pool: Callable
    projection_seed: int
    description: str
    params: str = ""                    # the pooling's parameters, named in the version

    def version(self, rw: embedders.ResolvedWeights, d_in: int) -> str:
        _, proj_sha = embedders.projection_matrix(d_in, self.projection_seed)
        backbone = rw.backbone if not rw.substituted_for else f"{rw.backbone}-for-{rw.substituted_for}"
        params = f"+{self.params}" if self.params else ""
        return f"{self.name}{params}:{backbone}@{rw.tag}-{rw.sha12}:proj-{proj_sha[:12]}:224sq"


FEATURES: dict[str, FeatureExtractor] = {
    "animal_weighted": FeatureExtractor(
        "animal_weighted", "efficientnet_lite0", activation_weighted_pool, 20240510,
        "EfficientNet-Lite0 head map, activation-norm-weighted pooling, Gaussian projection to 512"),
    "centre_weighted": FeatureExtractor(
        "centre_weighted", "efficientnet_lite0", lambda fmap: networks.pool(fmap, "centre"), 20240510,
        "EfficientNet-Lite0 head map, pooled with a centred Gaussian weight, Gaussian projection to 512",
        embedders.pooling_label("centre")),
}


def iter_crop_batches(items, batch_size: int = 32):
    """(detection ids, uint8 tensor batch, failures) from pipeline crop items, decoded and
    resized by the pipeline's own ``inference.preprocess``; undecodable crops are failures."""
    import torch

    from deer_pipeline.embedding.inference import load_crop_image, preprocess

    ids, tensors, failures = [], [], []
    for item in items:
        try:
            tensors.append(preprocess(load_crop_image(item)))
            ids.append(item.detection_id)
        except Exception as exc:   # a bad crop must not stop the evaluation
            failures.append((item.detection_id, f"{type(exc).__name__}: {exc}"))
        if len(ids) == batch_size:
            yield ids, torch.stack(tensors), failures
            ids, tensors, failures = [], [], []
    if ids or failures:
        yield ids, (torch.stack(tensors) if tensors else None), failures


class FeatureSink:
    """Collects, batch by batch, what the legacy method and the feature extractors need from
    one backbone's last feature map: the average-pooled features (legacy input) and each
    extractor's pooled features."""

    def __init__(self, rw: embedders.ResolvedWeights, legacy: bool, extractors: Sequence[FeatureExtractor],
                 extractor_weights: Mapping[str, embedders.ResolvedWeights] | None = None,
                 legacy_weights: embedders.ResolvedWeights | None = None):
        self.rw, self.legacy, self.extractors = rw, legacy, list(extractors)
        self.legacy_rw = legacy_weights or rw
        # how each extractor's own model resolved (same network; may differ in what it substitutes for)
        self.extractor_weights = dict(extractor_weights or {})
        self.legacy_parts: list[np.ndarray] = []
        self.parts: dict[str, list[np.ndarray]] = {ex.name: [] for ex in self.extractors}
        self.rows = 0
        self.every, self.offset = 1, 0          # hooked on a pass of crop zooms: the whole crop's rows

    def add(self, fmap) -> None:
        fmap = fmap.float()
        if self.every > 1:
            fmap = fmap[self.offset::self.every]
        if self.legacy:
            self.legacy_parts.append(average_pool(fmap).cpu().numpy())
        for ex in self.extractors:
            self.parts[ex.name].append(ex.pool(fmap).cpu().numpy())
        self.rows += int(fmap.shape[0])

    def hook_on(self, net, zooms: Sequence[float] = (1.0,)):
        """Register a forward hook on the pipeline's own backbone ``net`` (as loaded by
        ``networks.load_backbone``) that feeds its last feature map here while the pipeline
        embeds; returns the handle (call ``.remove()``). With crop ``zooms`` (which must hold
        1, the whole crop) the pass holds each crop's zooms in a row, and only the whole crop's
        rows are kept."""
        zooms = tuple(zooms)
        self.every, self.offset = len(zooms), zooms.index(1.0)
        m = net.body
        if net.backbone == "efficientnet_lite0":
            return m._bn1.register_forward_hook(lambda mod, inp, out: self.add(m._swish(out)))
        if net.backbone == "resnet50":
            return m.layer4.register_forward_hook(lambda mod, inp, out: self.add(out))
        return m.features.register_forward_hook(lambda mod, inp, out: self.add(out))


def backbone_sinks(extractors: Sequence[FeatureExtractor], legacy_model: str | None = "resnet50",
                   weights: str = "auto") -> list[FeatureSink]:
    """One sink per distinct backbone that the legacy method and the extractors need."""
    groups: dict[tuple, dict] = {}

    def _group(rw):
        return groups.setdefault((rw.backbone, rw.sha256, rw.source),
                                 {"rw": rw, "legacy": False, "ex": [], "ex_rw": {}})

    if legacy_model:
        g = _group(backbone_for(legacy_model, weights))
        g["legacy"], g["legacy_rw"] = True, backbone_for(legacy_model, weights)
    for ex in extractors:
        rw = backbone_for(ex.native_model, weights)
        g = _group(rw)
        g["ex"].append(ex)
        g["ex_rw"][ex.name] = rw
    return [FeatureSink(g["rw"], g["legacy"], g["ex"], g["ex_rw"], g.get("legacy_rw")) for g in groups.values()]


def run_sinks(items, sinks: Sequence[FeatureSink], device: str = "cpu", batch_size: int = 32) -> tuple[list[str], list]:
    """A separate pass over the crops for sinks whose backbone the pipeline did not run."""
    import torch

    nets = [networks.load_backbone(s.rw, "avg", device) for s in sinks]
    ids: list[str] = []
    failures: list = []
    with torch.inference_mode():
        for batch_ids, x, failed in iter_crop_batches(items, batch_size):
            failures += failed
            if x is None:
                continue
            ids += batch_ids
            x = x.to(device)
            for sink, net in zip(sinks, nets):
                sink.add(feature_map(net, x))
    return ids, failures


def sink_outputs(sinks: Sequence[FeatureSink]) -> dict:
    """``{"legacy": (n, d) or None, "legacy_backbone", "features": {name: (n, 512) unit rows},
    "versions": {name: version}, "feature_backbones": {name: ResolvedWeights}}``."""
    out = {"legacy": None, "legacy_backbone": None, "features": {}, "versions": {}, "feature_backbones": {}}
    for sink in sinks:
        if sink.legacy:
            out["legacy"] = np.concatenate(sink.legacy_parts) if sink.legacy_parts else None
            out["legacy_backbone"] = sink.legacy_rw
        for ex in sink.extractors:
            pooled = np.concatenate(sink.parts[ex.name]).astype(np.float32)
            d_in = pooled.shape[1]
            proj, _ = embedders.projection_matrix(d_in, ex.projection_seed)
            out["features"][ex.name] = embedders.unit_rows(pooled @ proj)
            rw = sink.extractor_weights.get(ex.name, sink.rw)
            out["versions"][ex.name] = ex.version(rw, d_in)
            out["feature_backbones"][ex.name] = rw
    return out


def feature_version_info(ex: FeatureExtractor, rw: embedders.ResolvedWeights, version: str) -> dict:
    """Row for ``embedding_versions`` (model = the extractor's name)."""
    d_in = {"efficientnet_lite0": 1280, "efficientnet_b0": 1280, "resnet50": 2048}[rw.backbone]
    _, proj_sha = embedders.projection_matrix(d_in, ex.projection_seed)
    return {"embedding_version": version, "model": ex.name, "backbone": rw.backbone,
            "weights_sha256": rw.sha256, "reduction_sha256": proj_sha, "preprocessing": "224sq",
            "dim": embedders.EMBEDDING_DIM,
            "details": {"description": ex.description, "weights_used": rw.description,
                        "projection_seed": ex.projection_seed, "evaluation_only": True}}


# --------------------------------------------------------------------------------------------
# Legacy: the system we start from
# --------------------------------------------------------------------------------------------

class LegacyMatcher:
    """The old re-identification, re-implemented faithfully.

    * projection: ``torch.nn.Linear(d_in, 512)`` with PyTorch's default initialisation, created
      when the matcher is created, from a fresh non-deterministic seed (the old code never
      seeded it, and created it in every process, so each process had its own projection);
    * one frozen vector per deer: the projected vector of the deer's first sighting, never
      updated;
    * greedy matching, sighting by sighting in the order given: cosine to every deer's frozen
      vector, join the best deer when its cosine is at least 0.60, else found a new deer.

    The global torch random state is left as it was (the projection draws from a forked RNG).
    """

    def __init__(self, d_in: int, threshold: float = LEGACY_THRESHOLD, dim: int = LEGACY_DIM):
        import torch

        self.d_in, self.dim, self.threshold = int(d_in), int(dim), float(threshold)
        with torch.random.fork_rng(devices=[]):
            torch.seed()                                   # non-deterministic, like an unseeded process
            self.projection = torch.nn.Linear(self.d_in, self.dim)
        self.projection.eval()
        self.frozen: list[np.ndarray] = []                  # deer index -> frozen unit vector

    @property
    def projection_sha256(self) -> str:
        w = self.projection.weight.detach().cpu().numpy().tobytes()
        b = self.projection.bias.detach().cpu().numpy().tobytes()
        return hashlib.sha256(w + b).hexdigest()

    def embed(self, features: np.ndarray) -> np.ndarray:
        """Pooled backbone features (n, d_in) -> L2-normalised (n, 512)."""
        import torch

        with torch.inference_mode():
            v = self.projection(torch.as_tensor(np.asarray(features, np.float32))).numpy()
        return embedders.unit_rows(v)

    def decide(self, vector: np.ndarray) -> tuple[int, bool, float | None]:
        """One sighting: (deer index, matched?, best cosine or None)."""
        v = np.asarray(vector, np.float32).reshape(-1)
        if self.frozen:
            sims = np.asarray(self.frozen) @ v
            best = int(np.argmax(sims))
            if sims[best] >= self.threshold:
                return best, True, float(sims[best])
            score = float(sims[best])
        else:
            score = None
        self.frozen.append(v.copy())
        return len(self.frozen) - 1, False, score

    def run(self, features: np.ndarray) -> list[int]:
        """Decide every sighting in order (rows of ``features``); returns a deer index per row."""
        vecs = self.embed(features)
        return [self.decide(v)[0] for v in vecs]
