"""Local features of a crop and geometric verification of two crops: RootSIFT keypoints inside
the detection box, Lowe's ratio test, a robust model fit (OpenCV USAC MAGSAC) and the number of
inlier correspondences. No downloaded weights.

Plain logic (OpenCV, numpy), no database, no Dagster.

* :func:`extract`: keypoints of one crop (the detection box as ``cropping`` cut it) on a grey
  image whose longest side is brought to ``long_side`` pixels, so small crops are upsampled and
  give enough keypoints; at most ``max_keypoints`` (the strongest). Descriptors are RootSIFT
  (L1-normalised SIFT, square root: unit L2 norm), so the descriptor distance is a dot product.
* :func:`verify`: ratio test by one matrix product (nearest and second-nearest descriptor), then
  an affine model (or a homography) fitted with USAC MAGSAC (a similarity with RANSAC, which
  OpenCV offers for that model); the score is the number of inliers. Bad input never raises: no keypoints, too few correspondences or a degenerate fit give
  ``inliers=None`` with the reason, and the caller lets the global score stand alone.
* :func:`pack` / :func:`unpack`: the cache format (``local_features`` table), with a checksum:
  a corrupt entry is detected (:class:`CorruptFeatures`) and recomputed, never trusted.
* :func:`feature_version`: everything that changes the features, so that a changed setting
  misses the cache instead of mixing features.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np

LOCAL_FEATURES_FORMAT = 1
_HEADER = struct.Struct("<4sHII")      # magic, format, keypoints, descriptor length
_MAGIC = b"DLF1"
MODELS = ("affine", "homography", "similarity")


class CorruptFeatures(ValueError):
    """A cached feature blob does not decode or fails its checksum."""


@dataclass(frozen=True)
class LocalFeatures:
    keypoints: np.ndarray        # (n, 2) float32, pixels of the crop brought to long_side
    descriptors: np.ndarray      # (n, 128) float32 RootSIFT, unit L2 norm

    def __len__(self) -> int:
        return int(self.keypoints.shape[0])


@dataclass(frozen=True)
class Verification:
    inliers: int | None           # None: no geometric score (see reason)
    matches: int = 0              # correspondences that passed the ratio test
    reason: str | None = None     # no keypoints | too few matches | degenerate fit


def empty_features() -> LocalFeatures:
    return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32))


def feature_version(long_side: int, max_keypoints: int) -> str:
    import cv2

    return f"rootsift-f{LOCAL_FEATURES_FORMAT}:long{int(long_side)}:n{int(max_keypoints)}:cv{cv2.__version__}"


def _grey(image) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 3:
        import cv2

        a = cv2.cvtColor(np.ascontiguousarray(a[..., :3]), cv2.COLOR_RGB2GRAY)
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    return a


def extract(image, long_side: int = 384, max_keypoints: int = 600) -> LocalFeatures:
    """RootSIFT keypoints of a crop (RGB or grey array, or a PIL image) at ``long_side`` px."""
    import cv2

    g = _grey(image)
    if g.ndim != 2 or min(g.shape) < 8:
        return empty_features()
    h, w = g.shape
    s = float(long_side) / max(h, w)
    if abs(s - 1.0) > 1e-6:
        g = cv2.resize(g, (max(1, round(w * s)), max(1, round(h * s))),
                       interpolation=cv2.INTER_CUBIC if s > 1 else cv2.INTER_AREA)
    kps, desc = cv2.SIFT_create(nfeatures=int(max_keypoints)).detectAndCompute(g, None)
    if desc is None or not kps:
        return empty_features()
    if len(kps) > max_keypoints:       # SIFT keeps ties at the cut
        order = np.argsort([-k.response for k in kps], kind="stable")[:max_keypoints]
        kps, desc = [kps[i] for i in order], desc[order]
    desc = desc.astype(np.float32)
    desc /= np.maximum(desc.sum(axis=1, keepdims=True), 1e-7)
    desc = np.sqrt(desc)
    return LocalFeatures(np.array([k.pt for k in kps], np.float32).reshape(-1, 2), desc)


def pack(f: LocalFeatures) -> tuple[bytes, str]:
    """(blob, sha256 hex): header, keypoints float32, descriptors float16."""
    n, d = len(f), 128
    blob = (_HEADER.pack(_MAGIC, LOCAL_FEATURES_FORMAT, n, d)
            + np.ascontiguousarray(f.keypoints, np.float32).tobytes()
            + np.ascontiguousarray(f.descriptors, np.float16).tobytes())
    return blob, hashlib.sha256(blob).hexdigest()


def unpack(blob, sha256: str | None = None) -> LocalFeatures:
    """Features from a cache blob; :class:`CorruptFeatures` when it does not check out."""
    blob = bytes(blob or b"")
    if sha256 is not None and hashlib.sha256(blob).hexdigest() != sha256:
        raise CorruptFeatures("checksum mismatch")
    if len(blob) < _HEADER.size:
        raise CorruptFeatures("truncated header")
    magic, fmt, n, d = _HEADER.unpack_from(blob)
    if magic != _MAGIC or fmt != LOCAL_FEATURES_FORMAT or d != 128:
        raise CorruptFeatures(f"unknown format {magic!r}/{fmt}/{d}")
    need = _HEADER.size + n * 8 + n * d * 2
    if len(blob) != need:
        raise CorruptFeatures(f"{len(blob)} bytes, expected {need}")
    kp = np.frombuffer(blob, np.float32, n * 2, _HEADER.size).reshape(n, 2).copy()
    de = np.frombuffer(blob, np.float16, n * d, _HEADER.size + n * 8).reshape(n, d).astype(np.float32)
    if not (np.isfinite(kp).all() and np.isfinite(de).all()):
        raise CorruptFeatures("non-finite values")
    return LocalFeatures(kp, de)


def ratio_matches(a: LocalFeatures, b: LocalFeatures, ratio: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """Indices (in a, in b) of Lowe ratio-test correspondences from a to b. RootSIFT rows have
    unit norm, so the squared distance is 2 - 2 x dot product: one matrix product finds the
    nearest and second-nearest descriptor of every keypoint of ``a``."""
    if len(a) == 0 or len(b) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    s = a.descriptors @ b.descriptors.T
    top2 = np.argpartition(-s, 1, axis=1)[:, :2]
    s2 = np.take_along_axis(s, top2, axis=1)
    first = s2[:, 0] >= s2[:, 1]
    best = np.where(first, top2[:, 0], top2[:, 1])
    s_best, s_second = np.maximum(s2[:, 0], s2[:, 1]), np.minimum(s2[:, 0], s2[:, 1])
    d1 = np.sqrt(np.maximum(2.0 - 2.0 * s_best, 0.0))
    d2 = np.sqrt(np.maximum(2.0 - 2.0 * s_second, 0.0))
    ok = d1 < ratio * d2
    return np.flatnonzero(ok), best[ok]


def verify(a: LocalFeatures, b: LocalFeatures, ratio: float = 0.8, model: str = "affine",
           reproj_px: float = 6.0, min_matches: int = 5) -> Verification:
    """Geometric verification of two crops' features; never raises on bad input."""
    import cv2

    if len(a) < 2 or len(b) < 2:
        return Verification(None, 0, "no keypoints")
    qi, ti = ratio_matches(a, b, ratio)
    if len(qi) < min_matches:
        # too few correspondences to fit: the crops share nothing distinctive (a real score of 0)
        return Verification(0, int(len(qi)), None)
    p1 = np.ascontiguousarray(a.keypoints[qi], np.float32)
    p2 = np.ascontiguousarray(b.keypoints[ti], np.float32)
    try:
        if model == "homography":
            M, mask = cv2.findHomography(p1, p2, cv2.USAC_MAGSAC, reproj_px, maxIters=2000, confidence=0.999)
        elif model == "similarity":
            # OpenCV has no USAC variant for the 4-parameter model: plain RANSAC
            M, mask = cv2.estimateAffinePartial2D(p1, p2, method=cv2.RANSAC,
                                                  ransacReprojThreshold=reproj_px, maxIters=2000, confidence=0.999)
        else:
            M, mask = cv2.estimateAffine2D(p1, p2, method=cv2.USAC_MAGSAC,
                                           ransacReprojThreshold=reproj_px, maxIters=2000, confidence=0.999)
    except cv2.error as exc:
        return Verification(None, int(len(qi)), f"degenerate fit ({str(exc).strip().splitlines()[-1][:60]})")
    if M is None or mask is None or not np.isfinite(M).all():
        return Verification(None, int(len(qi)), "degenerate fit")
    return Verification(int(np.count_nonzero(mask)), int(len(qi)), None)
