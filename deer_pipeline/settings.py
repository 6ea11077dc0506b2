"""Every default of the pipeline, the one place environment variables are read, and the
settings shared by the plain logic and the Dagster resources, validated at load.

Every value that the system we start from had is kept with its old default: ensemble weights
0.6/0.4, a re-identification threshold of 0.60, the sex filter, a 5 s burst window and a 50 px
minimum crop size. Bad values are rejected here, with a message naming the setting. The Dagster
resources (``defs/resources.py``) take their defaults from the constants below.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone

# --------------------------------------------------------------------------------------------
# Defaults, written once
# --------------------------------------------------------------------------------------------

DATA_DIR = ".deer"                         # embedded database, crops, reports (DEER_DATA_DIR)
START_DATE = "2024-01-01"                  # first day partition (DEER_START_DATE)
# ingestion and crops
BURST_WINDOW_S = 5.0                       # frames of one camera this close form one burst
MIN_CROP_PX = 50                           # smaller crops are skipped with the reason stored
PAD_FRACTION = 0.05                        # box padding on each side, as a share of its size
# embeddings
EMBEDDING_MODELS = ("multiscale", "efficientnet_b0")   # the ensemble's components
EMBEDDING_WEIGHTS = "auto"                 # auto | imagenet | path to a state-dict file
POOLING = "avg"                            # avg | gem | centre (embedding.models.CENTRE_SIGMA)
CROP_ZOOMS = (1.0, 0.9, 0.8)               # the crop and centred zooms into it (fractions of its width and height);
                                           # each is embedded and the vectors averaged (chosen on nyala-dev's calibration half)
DEVICE = "auto"                            # auto | cpu | cuda | cuda:N
BATCH_SIZE = 32                            # crops per forward pass (halved on CUDA OOM)
AMP = True                                 # float16 autocast on CUDA
CHANNELS_LAST = True
BACKEND = "auto"                           # auto | eager | onnxruntime (auto: ONNX Runtime without a GPU)
INFERENCE_BACKENDS = ("eager", "onnxruntime")   # what "auto" resolves to (embedding.backends)
# matching
REID_THRESHOLD = 0.60                      # ensemble similarity needed to join a known deer
ENSEMBLE_WEIGHTS = {"multiscale": 0.6, "efficientnet_b0": 0.4}
SEX_FILTER = True                          # a female sighting never joins a male deer
CANDIDATE_DEER = 20                        # candidate deer re-scored and recorded per sighting
SEARCH = "auto"                            # auto | exact | two_stage | hnsw
HNSW_EF_SEARCH = 200
EXACT_SEARCH_MAX_GALLERY = 20_000          # auto: exhaustive exact scoring below this many sightings, two_stage above
COARSE_PRECISION = "auto"                  # auto | float32 | bfloat16: the pass that ranks deer (scores stay float64)
COARSE_BF16_MIN_ROWS = 5_000               # auto: bfloat16 from this many gallery rows, on CPUs with bfloat16 units
PROFILE_CANDIDATE_DEER = 50                # two_stage: deer ranked best by profile vector, then re-scored exactly
GALLERY_CACHE = True                       # keep the gallery in memory across decisions of a process
GALLERY_CACHE_ENTRIES = 2                  # galleries kept (database x embedding versions)
# match score: cosine (global ensemble cosine) | local (inliers of local-feature verification) |
# fused (mean of calibrated probabilities of both; the threshold is then a probability)
MATCH_SCORE = "cosine"
VERIFY_TOP_K = 50                          # candidate sightings verified per sighting (local, fused)
ENCOUNTER_POOLING = "max"                  # encounter vs deer: best pair (max) or mean of the best N (topN)
FLANK_AWARE = True                         # local/fused: known opposite flanks are not compared
LOCAL_LONG_SIDE = 384                      # crops brought to this longest side for keypoints
LOCAL_MAX_KEYPOINTS = 400                  # strongest RootSIFT keypoints kept per crop
LOCAL_RATIO = 0.8                          # Lowe's ratio test
LOCAL_MODEL = "affine"                     # affine | homography | similarity (fitted with USAC MAGSAC)
LOCAL_REPROJ_PX = 6.0                      # inlier distance, pixels at LOCAL_LONG_SIDE
BACKGROUND_CONTROL = True                  # drop keypoints shared with another animal of the same frame
# identity checks
ASSIGNMENT_RATE_MIN = 0.05
ASSIGNMENT_RATE_MAX = 0.98
MIN_SIGHTINGS_FOR_RATE = 10
ZERO_MATCH_MIN_SIGHTINGS = 5
NEW_DEER_SPIKE_FACTOR = 2.0
CHECK_WINDOW_DAYS = 7
NORM_TOLERANCE = 1e-3
MERGE_CANDIDATES_LIMIT = 50
# review (people in the loop: deer-pipeline review)
REVIEW_HOST = "127.0.0.1"                  # the review app listens on loopback unless --host says otherwise
REVIEW_PORT = 8765
REVIEW_TOKEN_ENV = "DEER_REVIEW_TOKEN"     # token a non-loopback --host requires (read from this variable)
REVIEWER_ENV = "DEER_REVIEWER"             # default reviewer name (else the login name)
REVIEW_MARGIN = 0.10                       # queue: decisions whose score lies this close to the threshold
REVIEW_QUEUE_MAX_ITEMS = 50                # check: WARN when more items wait
REVIEW_QUEUE_MAX_AGE_DAYS = 14             # check: WARN when an item waits longer (days since its detection arrived)
REVIEW_TRAINING_MIN_DEER = 4               # train --from-reviews: confirmed deer needed (each with MIN_PHOTOS)
REVIEW_TRAINING_MIN_PHOTOS = 2             # train --from-reviews: confirmed photos a deer needs to train
# training a re-identification model (deer-pipeline train, the reid_model asset; embedding.training)
TRAIN_EPOCHS = 40                          # most epochs, stopping early on held-out individuals
ENCOUNTER_TRAINING_EPOCHS = 14             # train --classes encounter: epochs (no held-out set to stop on; chosen on nyala-dev's calibration half)
TRAIN_SEED = 0
TRAIN_VIEWS = 4                            # augmented views cached per photo, besides the photo itself
TRAIN_FROZEN_BLOCKS = 11                   # EfficientNet-Lite0 blocks 0..10 frozen (cached); 11..15 + head + projection learn
TRAIN_PROBE_EPOCHS = 5                     # linear probe before the blocks are unfrozen
TRAIN_DIM = 512                            # dimension of the trained embedding
TRAIN_SUBCENTERS = 2                       # sub-center ArcFace: centres per class
TRAIN_MARGIN = 0.3                         # ArcFace angular margin (radians)
TRAIN_SCALE = 30.0                         # ArcFace logit scale
TRAIN_LOSSES = ("arcface", "supcon")       # sub-center ArcFace (class proxies) or supervised contrastive (pairs in the batch)
TRAIN_LOSS = "arcface"                     # the training loss of --classes identity (TRAIN_LOSSES)
ENCOUNTER_TRAINING_LOSS = "supcon"         # the training loss of --classes encounter (chosen on nyala-dev's calibration half)
TRAIN_TEMPERATURE = 0.1                    # supcon: temperature of the contrastive softmax
TRAIN_LR_HEAD = 1e-3                       # learning rate of the head and projection
TRAIN_LR_BLOCKS = 1e-4                     # learning rate of the unfrozen blocks
TRAIN_WEIGHT_DECAY = 1e-4
TRAIN_BATCH_SIZE = 32
TRAIN_PATIENCE = 8                         # epochs without a better held-out top-1 before stopping
TRAIN_VAL_FRACTION = 0.2                   # share of individuals held out for early stopping
LOOKUP_DEER = 10                           # "which deer is this photo?": deer listed (review app, review lookup)
# executors
EXECUTOR = "multiprocess"                  # multiprocess | in_process | celery
GPU_SLOTS = 1

# --------------------------------------------------------------------------------------------
# The environment: read here and nowhere else (never at import time of a Dagster module)
# --------------------------------------------------------------------------------------------

ENVIRONMENT = {
    "DEER_DATA_DIR": "data directory (embedded database, crops, reports); default .deer",
    "DEER_DATABASE_URL": "postgresql:// URL of the pipeline's database; unset = embedded server",
    "DAGSTER_POSTGRES_URL": "postgresql+psycopg2:// URL of Dagster's own storage",
    "DAGSTER_HOME": "Dagster instance directory; default <data dir>/dagster_home",
    "DEER_CROP_STORE": "crop store directory; default <data dir>/crops",
    "DEER_START_DATE": "first day partition (YYYY-MM-DD); detections before it are held",
    "DEER_DB_RETRY_S": "how long decisions and writes wait for the database to come back; default 300",
    "DEER_EMBEDDING_MODELS": "comma list of embedding models",
    "DEER_EMBEDDING_WEIGHTS": "auto | imagenet | path to a state-dict file",
    "DEER_WEIGHTS_DIR": "cache of downloaded re-identification backbones; default <data dir>/weights",
    "DEER_TINY_ARCHITECTURES": "1 builds tiny test variants of the downloadable backbones (unit tests only)",
    "DEER_CROP_ZOOMS": "comma list of centred zooms into each crop, averaged (1 = the whole crop); default 1,0.9,0.8",
    "DEER_DEVICE": "auto | cpu | cuda | cuda:N",
    "DEER_GPU_INDEX": "pin inference to GPU N",
    "DEER_BATCH_SIZE": "crops per forward pass",
    "DEER_NUM_WORKERS": "decode workers",
    "DEER_AMP": "0/1: float16 autocast on CUDA",
    "DEER_INFERENCE_BACKEND": "auto | eager | onnxruntime (auto: ONNX Runtime when there is no GPU)",
    "DEER_ALLOW_RANDOM_WEIGHTS": "1 allows random weights (unit tests only)",
    "TORCH_HOME": "torch's cache; ImageNet weights are looked for in $TORCH_HOME/hub/checkpoints",
    "XDG_CACHE_HOME": "TORCH_HOME defaults to $XDG_CACHE_HOME/torch (~/.cache/torch)",
    "DEER_EXECUTOR": "multiprocess | in_process | celery",
    "DEER_GPU_SLOTS": "concurrent inference steps (pool gpu)",
    "DEER_CELERY_BROKER_URL": "celery broker",
    "DEER_CELERY_BACKEND_URL": "celery result backend; default the broker",
    "DEER_ALERT_WEBHOOK_URL": "failed checks are POSTed here",
    "DEER_EVAL_LABELS": "labels CSV of the reid_evaluation asset",
    "DEER_TRAIN_LABELS": "labels CSV the reid_model asset trains on",
    "DEER_TRAIN_IMAGES_ROOT": "images root of the reid_model asset",
    "DEER_TRAIN_SPLIT_SEED": "reid_model trains on the calibration half of this identity split",
    "DEER_TRAIN_FROM_REVIEWS": "1: the reid_model asset trains on the confirmed review decisions in the database",
    "DEER_EVAL_IMAGES_ROOT": "images root of the reid_evaluation asset",
    "DEER_EVAL_SPLIT_SEED": "split the reid_evaluation labels by identity with this seed",
    "DEER_EVAL_CALIBRATION_LABELS": "calibration labels CSV of the reid_evaluation asset",
    "DEER_EVAL_CALIBRATION_IMAGES_ROOT": "calibration images root of the reid_evaluation asset",
    "DEER_INCOMING_DIR": "drop folder for detector files (MegaDetector / SpeciesNet JSON); unset = sensor idle",
    "DEER_INCOMING_SETTLE_S": "seconds a dropped file must be unchanged before it is ingested; default 10",
    "DEER_INCOMING_ALL_ANIMALS_ARE_DEER": "1: dropped files without a species classifier take every animal as a deer",
    "DEER_PROGRESS_EVERY": "assets log progress (rate, ETA) every N batches; default 10",
    "DEER_QUIET": "1: no progress bars on the command line",
    "DEER_REVIEW_TOKEN": "token the review app requires when it listens beyond 127.0.0.1",
    "DEER_REVIEWER": "reviewer name recorded with decisions (default: the login name)",
}


def env(name: str, default: str | None = None) -> str | None:
    """The value of environment variable ``name`` (stripped; empty counts as unset)."""
    raw = os.environ.get(name, "")
    raw = raw.strip() if raw else ""
    return raw if raw else default


def env_int(name: str, default: int | None = None) -> int | None:
    raw = env(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None


def env_bool(name: str, default: bool) -> bool:
    raw = (env(name) or "").lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be 0 or 1, got {raw!r}")


def env_list(name: str, default: tuple[str, ...]) -> list[str]:
    raw = env(name)
    return [p.strip() for p in raw.split(",") if p.strip()] if raw else list(default)


def check_zooms(zooms) -> tuple[float, ...]:
    """Centred zooms into a crop as a tuple of distinct fractions in (0, 1], in the order given
    (1 is the whole crop), or :class:`SettingsError`."""
    try:
        out = tuple(dict.fromkeys(float(z) for z in zooms))
    except (TypeError, ValueError):
        raise SettingsError(f"crop zooms must be numbers in (0, 1], got {zooms!r}") from None
    if not out or any(not 0 < z <= 1 for z in out):
        raise SettingsError(f"crop zooms must be one or more numbers in (0, 1] (1 = the whole crop), got {zooms!r}")
    return out


def env_zooms(name: str, default: tuple[float, ...]) -> tuple[float, ...]:
    raw = env(name)
    if raw is None:
        return tuple(default)
    try:
        return check_zooms([p for p in raw.split(",") if p.strip()])
    except SettingsError as exc:
        raise SettingsError(f"{name}: {exc}") from None


def data_dir_setting() -> str:
    return env("DEER_DATA_DIR", DATA_DIR)


def crop_store_dir() -> str:
    return env("DEER_CROP_STORE") or os.path.join(data_dir_setting(), "crops")


def registered_embedder_file() -> str:
    """Where ``deer-pipeline models register`` records the pipeline's embedder."""
    return os.path.join(data_dir_setting(), "models", "registered.json")


def registered_embedder() -> dict | None:
    """``{"model", "weights", "embedding_version", ...}`` of the embedder registered with
    ``deer-pipeline models register``, or None (the default ensemble)."""
    import json

    path = registered_embedder_file()
    if not os.path.isfile(path):
        return None
    try:
        reg = json.loads(open(path, encoding="utf-8").read())
    except ValueError as exc:
        raise SettingsError(f"{path} is not valid JSON ({exc}); run `deer-pipeline models register` again") from None
    if not isinstance(reg, dict) or not reg.get("model") or not reg.get("weights"):
        raise SettingsError(f"{path} does not name a model and its weights")
    return reg


def configured_ensemble_weights() -> dict[str, float]:
    """The matching's model weights: the registered embedder alone when one is registered (and
    DEER_EMBEDDING_MODELS does not override it), otherwise the default ensemble."""
    reg = registered_embedder()
    if reg and env("DEER_EMBEDDING_MODELS") is None:
        return {reg["model"]: 1.0}
    return dict(ENSEMBLE_WEIGHTS)


def start_date() -> str:
    return env("DEER_START_DATE", START_DATE)


# Detector classes and the sex they imply. 'unknown' sightings are matched against every sex.
CLASS_TO_SEX = {
    "doe": "female",
    "fawn": "unknown",   # fawns are not sexed in the field; matched against every deer
    "young_buck": "male",
    "mid_buck": "male",
    "mature_buck": "male",
    "buck": "male",
    "unknown": "unknown",
}
CLASS_SYNONYMS = {
    "deer": "unknown",
    "animal": "unknown",
    "whitetail": "unknown",
    "white-tailed deer": "unknown",
    "young buck": "young_buck",
    "mid buck": "mid_buck",
    "mature buck": "mature_buck",
    "yearling_buck": "young_buck",
}
SEXES = ("female", "male", "unknown")

# Species map for classifier output (MegaDetector ``classifications``, SpeciesNet predictions).
# A deer taxon becomes a candidate sighting of sex ``unknown`` (unless the classifier's class is
# itself an age/sex class above: doe, fawn, buck, ...); every other species is rejected with
# "not a deer: <name>". Names are compared in lower case; SpeciesNet's taxonomy strings
# ("<uuid>;mammalia;artiodactyla;cervidae;odocoileus;virginianus;white-tailed deer") are matched
# on the genus, "genus species" and the common name.
DEER_TAXA = frozenset({
    "deer", "white-tailed deer", "white tailed deer", "whitetail", "whitetail deer",
    "whitetailed deer", "odocoileus virginianus", "odocoileus", "odocoileus spp.", "odocoileus spp",
    "odocoileus sp.", "odocoileus sp", "mule deer", "black-tailed deer", "odocoileus hemionus",
})
DEER_GENUS = "odocoileus"
# Detector output that is never a deer: the reason stored for it.
NOT_AN_ANIMAL = {"person": "person, not an animal", "human": "person, not an animal",
                 "vehicle": "vehicle, not an animal", "blank": "classifier saw no animal (blank)",
                 "empty": "classifier saw no animal (blank)"}
DEFAULT_MIN_CONFIDENCE = 0.2      # when the detector file gives no typical_detection_threshold


class SettingsError(ValueError):
    """A setting is out of range; the message names it."""


def normalise_classification(raw: str | None) -> str | None:
    """Canonical class name, or None when the class is not one we know."""
    if raw is None:
        return "unknown"
    key = str(raw).strip().lower()
    key = CLASS_SYNONYMS.get(key, key).replace(" ", "_").replace("-", "_")
    key = CLASS_SYNONYMS.get(key, key)
    return key if key in CLASS_TO_SEX else None


def sex_of(classification: str) -> str:
    return CLASS_TO_SEX.get(classification, "unknown")


def species_decision(raw: str | None) -> tuple[str | None, str | None]:
    """What a classifier's class means for a detection: ``(classification, None)`` for a deer
    (an age/sex class such as ``doe``, or ``unknown`` for a deer taxon), ``(None, reason)`` for
    anything else ("not a deer: raccoon")."""
    if raw is None or not str(raw).strip():
        return None, "no species classification"
    text = str(raw).strip()
    parts = [p.strip().lower() for p in text.split(";")]
    if len(parts) >= 7:                       # SpeciesNet: uuid;class;order;family;genus;species;common
        genus, species, common = parts[4], parts[5], parts[6]
        names = [n for n in (common, f"{genus} {species}".strip(), genus) if n]
        label = common or " ".join(p for p in (genus, species) if p) or parts[3] or parts[2] or parts[1] or "?"
        if genus == DEER_GENUS or any(n in DEER_TAXA for n in names):
            return "unknown", None
        if label in NOT_AN_ANIMAL:
            return None, NOT_AN_ANIMAL[label]
        return None, f"not a deer: {label}"
    key = parts[0] if len(parts) == 1 else text.lower()
    if key in NOT_AN_ANIMAL:
        return None, NOT_AN_ANIMAL[key]
    if key != "animal":                       # 'animal' alone says nothing about the species
        cls = normalise_classification(key)
        if cls is not None:
            return cls, None
    if key in DEER_TAXA or key.split(" ")[0] == DEER_GENUS:
        return "unknown", None
    return None, f"not a deer: {key}"


@dataclass(frozen=True)
class LocalFeatureSettings:
    """Local features inside the detection box and their geometric verification."""

    long_side: int = LOCAL_LONG_SIDE
    max_keypoints: int = LOCAL_MAX_KEYPOINTS
    ratio: float = LOCAL_RATIO
    model: str = LOCAL_MODEL
    reproj_px: float = LOCAL_REPROJ_PX
    background_control: bool = BACKGROUND_CONTROL

    def __post_init__(self) -> None:
        if not 32 <= self.long_side <= 4096:
            raise SettingsError(f"local long_side must be in [32, 4096], got {self.long_side!r}")
        if self.max_keypoints < 8:
            raise SettingsError(f"local max_keypoints must be at least 8, got {self.max_keypoints!r}")
        if not 0 < self.ratio <= 1:
            raise SettingsError(f"local ratio must be in (0, 1], got {self.ratio!r}")
        if self.model not in ("affine", "homography", "similarity"):
            raise SettingsError(f"local model must be affine, homography or similarity, not {self.model!r}")
        if not self.reproj_px > 0:
            raise SettingsError(f"local reproj_px must be > 0, got {self.reproj_px!r}")


@dataclass(frozen=True)
class MatchingSettings:
    """How sightings are matched to known deer."""

    reid_threshold: float = REID_THRESHOLD
    thresholds_by_sex: dict[str, float] = field(default_factory=dict)
    ensemble_weights: dict[str, float] = field(default_factory=lambda: dict(ENSEMBLE_WEIGHTS))
    sex_filter: bool = SEX_FILTER
    candidate_deer: int = CANDIDATE_DEER   # candidates re-scored exactly per encounter
    search: str = SEARCH                   # auto | exact | two_stage | hnsw
    hnsw_ef_search: int = HNSW_EF_SEARCH
    exact_search_max_gallery: int = EXACT_SEARCH_MAX_GALLERY
    profile_candidate_deer: int = PROFILE_CANDIDATE_DEER
    coarse_precision: str = COARSE_PRECISION
    gallery_cache: bool = GALLERY_CACHE
    match_score: str = MATCH_SCORE          # cosine | local | fused
    verify_top_k: int = VERIFY_TOP_K
    encounter_pooling: str = ENCOUNTER_POOLING
    flank_aware: bool = FLANK_AWARE
    calibration_version: str | None = None  # fused: the stored calibration to use (None: the newest)
    local: LocalFeatureSettings = field(default_factory=LocalFeatureSettings)

    def __post_init__(self) -> None:
        check_threshold("reid_threshold", self.reid_threshold)
        for sex, t in self.thresholds_by_sex.items():
            if sex not in SEXES:
                raise SettingsError(f"thresholds_by_sex: unknown sex {sex!r}; use one of {SEXES}")
            check_threshold(f"thresholds_by_sex[{sex}]", t)
        check_weights(self.ensemble_weights)
        if self.search not in ("auto", "exact", "two_stage", "hnsw"):
            raise SettingsError(f"search must be auto, exact, two_stage or hnsw, not {self.search!r}")
        if self.coarse_precision not in ("auto", "float32", "bfloat16"):
            raise SettingsError(f"coarse_precision must be auto, float32 or bfloat16, not {self.coarse_precision!r}")
        if self.profile_candidate_deer < 1:
            raise SettingsError("profile_candidate_deer must be at least 1")
        if self.candidate_deer < 1:
            raise SettingsError("candidate_deer must be at least 1")
        if isinstance(self.local, dict):          # read back from JSON (e.g. the recorded decision settings)
            object.__setattr__(self, "local", LocalFeatureSettings(**self.local))
        if self.match_score not in ("cosine", "local", "fused"):
            raise SettingsError(f"match_score must be cosine, local or fused, not {self.match_score!r}")
        if self.verify_top_k < 1:
            raise SettingsError("verify_top_k must be at least 1")
        p = self.encounter_pooling
        if not (p == "max" or (p.startswith("top") and p[3:].isdigit() and int(p[3:]) >= 1)):
            raise SettingsError(f"encounter_pooling must be max or topN (e.g. top2), not {p!r}")

    def threshold_for(self, sex: str) -> float:
        return self.thresholds_by_sex.get(sex, self.reid_threshold)


def check_threshold(name: str, value: float) -> None:
    if value is None or not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= value <= 1.0:
        raise SettingsError(f"{name} must be a number in [0, 1], got {value!r}")


def check_weights(weights: dict[str, float]) -> None:
    if not weights:
        raise SettingsError("ensemble_weights must name at least one model")
    for name, w in weights.items():
        if not isinstance(w, (int, float)) or math.isnan(w) or w < 0:
            raise SettingsError(f"ensemble weight for {name!r} must be >= 0, got {w!r}")
    total = sum(weights.values())
    if abs(total - 1.0) > 1e-6:
        raise SettingsError(f"ensemble_weights must sum to 1, got {total:.6g} from {weights}")


@dataclass(frozen=True)
class IngestSettings:
    burst_window_s: float = BURST_WINDOW_S
    image_roots: tuple[str, ...] = ()   # empty = the folder of the detections file (or the image folder)

    def __post_init__(self) -> None:
        if not self.burst_window_s >= 0:
            raise SettingsError(f"burst_window_s must be >= 0, got {self.burst_window_s!r}")


@dataclass(frozen=True)
class CropSettings:
    min_crop_px: int = MIN_CROP_PX
    pad_fraction: float = PAD_FRACTION
    store_dir: str = field(default_factory=crop_store_dir)

    def __post_init__(self) -> None:
        if self.min_crop_px < 1:
            raise SettingsError(f"min_crop_px must be >= 1, got {self.min_crop_px!r}")
        if not 0 <= self.pad_fraction <= 1:
            raise SettingsError(f"pad_fraction must be in [0, 1], got {self.pad_fraction!r}")


@dataclass(frozen=True)
class EmbeddingSettings:
    """How crops become vectors: the one embedding configuration (models, weights, per-model
    weights files, pooling, device, batch size). Built once (:meth:`from_environment` or the
    inference resource) and used by the inference resource, the identity settings, the
    ``embeddings`` asset's code version and the evaluation (see ``embedding.config``)."""

    models: tuple[str, ...] = EMBEDDING_MODELS
    weights: str = EMBEDDING_WEIGHTS
    weights_files: tuple[tuple[str, str], ...] = ()     # (model, state-dict file) overrides
    pooling: str = POOLING
    zooms: tuple[float, ...] = CROP_ZOOMS
    device: str = DEVICE
    gpu_index: int | None = None
    batch_size: int = BATCH_SIZE
    amp: bool = AMP
    channels_last: bool = CHANNELS_LAST
    num_workers: int | None = None
    backend: str = BACKEND

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(dict.fromkeys(self.models)))
        if self.backend not in ("auto", *INFERENCE_BACKENDS):
            raise SettingsError(f"backend must be auto, eager or onnxruntime, not {self.backend!r}")
        object.__setattr__(self, "weights_files", tuple(sorted(dict(self.weights_files).items())))
        if not self.models:
            raise SettingsError("embedding models: name at least one model")
        if self.pooling not in ("avg", "gem", "centre"):
            raise SettingsError(f"pooling must be avg, gem or centre, not {self.pooling!r}")
        object.__setattr__(self, "zooms", check_zooms(self.zooms))
        if self.batch_size < 1:
            raise SettingsError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if self.num_workers is not None and self.num_workers < 0:
            raise SettingsError(f"num_workers must be >= 0, got {self.num_workers!r}")

    def weights_for(self, model: str) -> str:
        return dict(self.weights_files).get(model, self.weights)

    def weights_by_model(self) -> dict[str, str]:
        return {m: self.weights_for(m) for m in self.models}

    @classmethod
    def from_environment(cls) -> "EmbeddingSettings":
        """The deployment's configuration: DEER_EMBEDDING_MODELS, DEER_EMBEDDING_WEIGHTS,
        DEER_CROP_ZOOMS, DEER_DEVICE, DEER_GPU_INDEX, DEER_BATCH_SIZE, DEER_NUM_WORKERS, DEER_AMP,
        DEER_INFERENCE_BACKEND. Without DEER_EMBEDDING_MODELS, an embedder registered with
        ``deer-pipeline models register`` (``registered_embedder``) replaces the default models."""
        reg = registered_embedder() if env("DEER_EMBEDDING_MODELS") is None else None
        return cls(models=(reg["model"],) if reg else tuple(env_list("DEER_EMBEDDING_MODELS", EMBEDDING_MODELS)),
                   weights=env("DEER_EMBEDDING_WEIGHTS", EMBEDDING_WEIGHTS),
                   weights_files=((reg["model"], reg["weights"]),) if reg else (),
                   zooms=env_zooms("DEER_CROP_ZOOMS", CROP_ZOOMS),
                   device=env("DEER_DEVICE", DEVICE), gpu_index=env_int("DEER_GPU_INDEX"),
                   batch_size=env_int("DEER_BATCH_SIZE", BATCH_SIZE),
                   num_workers=env_int("DEER_NUM_WORKERS"), amp=env_bool("DEER_AMP", AMP),
                   backend=env("DEER_INFERENCE_BACKEND", BACKEND))


# Exports (deer-pipeline export camtrap-dp, the camtrap_dp asset): what a Camtrap DP package
# says about itself when the command line does not say otherwise.
CAMTRAP_DP_DEFAULTS = {
    "package_name": "deer-pipeline-individual-deer",
    "title": "Individual white-tailed deer from trail cameras (deer_pipeline)",
    "contributor": "deer_pipeline user",
    "data_license": "CC0-1.0",
    "media_license": "CC-BY-4.0",
    "sampling_design": "opportunistic",
    "scientific_name": "Odocoileus virginianus",
    "vernacular_name": "white-tailed deer",
}
INCOMING_SETTLE_S = 10.0        # a dropped detector file must be unchanged this long
PROGRESS_LOG_EVERY = 10         # assets log progress every N batches


def incoming_dir() -> str | None:
    """DEER_INCOMING_DIR: the drop folder the incoming-detector-files sensor watches (None = off)."""
    return env("DEER_INCOMING_DIR")


def incoming_settle_seconds() -> float:
    """A dropped file is ingested once it has not changed for this long (still being copied)."""
    raw = env("DEER_INCOMING_SETTLE_S")
    try:
        value = float(raw) if raw is not None else INCOMING_SETTLE_S
    except ValueError:
        raise SettingsError(f"DEER_INCOMING_SETTLE_S must be a number of seconds, got {raw!r}") from None
    if not value >= 0:
        raise SettingsError(f"DEER_INCOMING_SETTLE_S must be >= 0, got {raw!r}")
    return value


def incoming_all_animals_are_deer() -> bool:
    """DEER_INCOMING_ALL_ANIMALS_ARE_DEER=1: dropped detector files without a species classifier
    are ingested with every animal box taken as a deer (default: such files are refused)."""
    return env_bool("DEER_INCOMING_ALL_ANIMALS_ARE_DEER", False)


def progress_log_every() -> int:
    """DEER_PROGRESS_EVERY: assets log progress (rate, ETA) every this many batches."""
    value = env_int("DEER_PROGRESS_EVERY", PROGRESS_LOG_EVERY)
    if value < 1:
        raise SettingsError(f"DEER_PROGRESS_EVERY must be >= 1, got {value!r}")
    return value


def quiet_progress() -> bool:
    """DEER_QUIET=1: no progress bars on the command line."""
    return env_bool("DEER_QUIET", False)


# --------------------------------------------------------------------------------------------
# The day partitions: from DEER_START_DATE to yesterday (UTC). Detections captured outside this
# range are held (status 'held', with the reason) instead of blocking the sensor.
# --------------------------------------------------------------------------------------------

def partition_start_date() -> date:
    """The first day partition: DEER_START_DATE (YYYY-MM-DD), default START_DATE."""
    raw = start_date().strip()
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise SettingsError(f"DEER_START_DATE must be a date YYYY-MM-DD, got {raw!r}") from None


def last_partition_day(now: datetime | None = None) -> date:
    """The last day partition that exists now: yesterday in UTC (Dagster's daily partitions end
    with the last complete day; today's photos are processed once the day is over)."""
    now = now or datetime.now(timezone.utc)
    return now.astimezone(timezone.utc).date() - timedelta(days=1)


def partition_day_range(now: datetime | None = None) -> tuple[date, date]:
    return partition_start_date(), last_partition_day(now)


def held_reason(day: date, first: date, last: date) -> str | None:
    """Why a detection of ``day`` cannot be a partition yet (None when it can)."""
    if day < first:
        return (f"captured on {day.isoformat()}, before the first day partition {first.isoformat()} "
                f"(DEER_START_DATE); held until DEER_START_DATE is {day.isoformat()} or earlier")
    if day > last:
        return (f"captured on {day.isoformat()}, after the last complete day {last.isoformat()} (UTC): held "
                "until its day is over" + (" (a date in the future: check the camera's clock)"
                                           if day > last + timedelta(days=1) else ""))
    return None
