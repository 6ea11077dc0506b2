"""Settings shared by the plain logic and the Dagster resources, validated at load.

Every value that the system we start from had is kept with its old default: ensemble weights
0.6/0.4, a re-identification threshold, the sex filter, a 5 s burst window and a 50 px minimum
crop size. Bad values are rejected here, with a message naming the setting.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class MatchingSettings:
    """How sightings are matched to known deer."""

    reid_threshold: float = 0.60
    thresholds_by_sex: dict[str, float] = field(default_factory=dict)
    ensemble_weights: dict[str, float] = field(
        default_factory=lambda: {"multiscale": 0.6, "efficientnet_b0": 0.4})
    sex_filter: bool = True
    candidate_deer: int = 20          # candidates re-scored exactly per encounter
    search: str = "auto"              # auto | exact | hnsw
    hnsw_ef_search: int = 200
    exact_search_max_gallery: int = 200_000

    def __post_init__(self) -> None:
        check_threshold("reid_threshold", self.reid_threshold)
        for sex, t in self.thresholds_by_sex.items():
            if sex not in SEXES:
                raise SettingsError(f"thresholds_by_sex: unknown sex {sex!r}; use one of {SEXES}")
            check_threshold(f"thresholds_by_sex[{sex}]", t)
        check_weights(self.ensemble_weights)
        if self.search not in ("auto", "exact", "hnsw"):
            raise SettingsError(f"search must be auto, exact or hnsw, not {self.search!r}")
        if self.candidate_deer < 1:
            raise SettingsError("candidate_deer must be at least 1")

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
    burst_window_s: float = 5.0
    image_roots: tuple[str, ...] = ()   # empty = any path is accepted

    def __post_init__(self) -> None:
        if not self.burst_window_s >= 0:
            raise SettingsError(f"burst_window_s must be >= 0, got {self.burst_window_s!r}")


@dataclass(frozen=True)
class CropSettings:
    min_crop_px: int = 50
    pad_fraction: float = 0.05
    store_dir: str = field(default_factory=lambda: os.environ.get(
        "DEER_CROP_STORE", os.path.join(os.environ.get("DEER_DATA_DIR", ".deer"), "crops")))

    def __post_init__(self) -> None:
        if self.min_crop_px < 1:
            raise SettingsError(f"min_crop_px must be >= 1, got {self.min_crop_px!r}")
        if not 0 <= self.pad_fraction <= 1:
            raise SettingsError(f"pad_fraction must be in [0, 1], got {self.pad_fraction!r}")
