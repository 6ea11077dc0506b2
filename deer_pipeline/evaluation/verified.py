"""The evaluation of methods that verify candidates with local features (``local_verified``,
``fused``, ``fused_pooled``): the pair scores the pipeline's rule would look at, for the
in-memory replay (threshold choice on the calibration labels), the calibration of match
probabilities on the calibration labels, and the closed-set ranking.

One :class:`VerifiedScores` per evaluation: it holds the pipeline's own
:class:`deer_pipeline.identity.verification.Verifier`, so the features of each crop are computed
once (and cached in the evaluation database) and each pair is verified once, whichever method,
threshold or replay asks for it.

Which pairs are verified is exactly what ``matching`` verifies: for each photo, in the order the
pipeline decides them, the ``verify_top_k`` photos decided before it (other encounters) with the
highest global score among those whose flank is compatible (flank-aware: known opposite flanks
are never compared). The pipeline's gallery at that moment is exactly those earlier photos.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from deer_pipeline.identity import calibration as calib
from deer_pipeline.identity.candidates import pair_scores
from deer_pipeline.identity.verification import Verifier, flank_compatible
from deer_pipeline.settings import MatchingSettings

log = logging.getLogger(__name__)

CLOSED_SET_VERIFY = 10     # closed set: each query's global top 10 are verified and re-ranked


class VerifiedScores:
    def __init__(self, engine, crop_store: str, settings: MatchingSettings | None = None):
        self.settings = settings or MatchingSettings()
        self.verifier = Verifier(engine, crop_store, self.settings.local)
        self._open: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _compat(self, ps) -> np.ndarray:
        ids = ps.ok_ids
        self.verifier.load_sides(ids)
        sides = [self.verifier.side(d) for d in ids]
        if not self.settings.flank_aware:
            return np.ones((len(ids), len(ids)), bool)
        return np.array([[flank_compatible(a, b) for b in sides] for a in sides], bool)

    def open_set_local(self, ps, S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(L, compat): inliers of the verified (photo, earlier photo) pairs (NaN: not verified or
        no local score), and the flank compatibility of every pair."""
        if ps.role in self._open:
            return self._open[ps.role]
        with _one_blas_thread():
            self._open[ps.role] = self._open_set_local(ps, S)
        return self._open[ps.role]

    def _open_set_local(self, ps, S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = ps.ok_ids
        v = self.verifier
        v.prepare(ids)
        compat = self._compat(ps)
        n = len(ids)
        L = np.full((n, n), np.nan)
        earlier: list[int] = []
        for rows in ps.feed_encounters():
            g = np.asarray(earlier, np.int64)
            for r in rows:
                if len(g):
                    cand = g[compat[r, g]]
                    top = cand[np.argsort(-S[r, cand], kind="stable")[: self.settings.verify_top_k]]
                    for c in top:
                        x = v.inliers(ids[r], ids[c])
                        L[r, c] = np.nan if x is None else x
            earlier += list(rows)
        return L, compat

    def closed_set_local(self, ps, S: np.ndarray, k: int = CLOSED_SET_VERIFY) -> tuple[np.ndarray, np.ndarray]:
        """(L, compat) for the closed set: each photo's global top ``k`` among the other
        encounters' flank-compatible photos are verified."""
        with _one_blas_thread():
            return self._closed_set_local(ps, S, k)

    def _closed_set_local(self, ps, S: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        ids = ps.ok_ids
        enc = np.asarray([str(e) for e in ps.label_encounters()], dtype=object)
        compat = self._compat(ps)
        self.verifier.prepare(ids)
        L = np.full(S.shape, np.nan)
        for r in range(len(ids)):
            cand = np.flatnonzero((enc != enc[r]) & compat[r])
            for c in cand[np.argsort(-S[r, cand], kind="stable")[:k]]:
                x = self.verifier.inliers(ids[r], ids[c])
                L[r, c] = np.nan if x is None else x
        return L, compat

    def fit_calibration(self, ps, S: np.ndarray, source: str) -> calib.Calibration:
        """Isotonic curves of the global cosine and the inliers on the set's labelled pairs of
        photos from different encounters (each photo with the photos decided before it)."""
        L, compat = self.open_set_local(ps, S)
        ids = np.asarray(ps.identities(), dtype=object)
        pos = np.empty(len(ids), np.int64)
        for e, rows in enumerate(ps.feed_encounters()):
            pos[rows] = e
        a, b = np.nonzero(pos[:, None] > pos[None, :])          # b decided before a
        keep = compat[a, b]
        a, b = a[keep], b[keep]
        return calib.fit_calibration(S[a, b], ids[a] == ids[b], L[a, b],
                                     fitted_on={"source": source, "feature_version": self.verifier.version,
                                                "verify_top_k": self.settings.verify_top_k,
                                                "flank_aware": self.settings.flank_aware})

    @staticmethod
    def pair_scores(match_score: str, S: np.ndarray, L: np.ndarray, compat: np.ndarray,
                    cal: calib.Calibration | None) -> np.ndarray:
        """The pipeline's pair score (``candidates._Rescorer.pair_scores``) as a matrix; -inf for
        pairs that are not compared."""
        P = pair_scores(match_score, S, L, cal)
        P[~compat] = -np.inf
        return P


def _one_blas_thread():
    """Descriptor products are small: OpenBLAS threads would spin against each other (and
    against the rest of a busy machine); one thread is several times faster here."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def reliability_on(ps, S: np.ndarray, L: np.ndarray, compat: np.ndarray, cal: calib.Calibration) -> list[dict]:
    """Reliability of a calibration on another labelled set (the evaluated photos): predicted
    probability vs the observed share of same-animal pairs, per bin."""
    ids = np.asarray(ps.identities(), dtype=object)
    pos = np.empty(len(ids), np.int64)
    for e, rows in enumerate(ps.feed_encounters()):
        pos[rows] = e
    a, b = np.nonzero(pos[:, None] > pos[None, :])
    keep = compat[a, b]
    a, b = a[keep], b[keep]
    return calib.reliability(cal.fuse(S[a, b], L[a, b]), ids[a] == ids[b])


def summary(verified: "VerifiedScores | None") -> dict | None:
    return None if verified is None else verified.verifier.metadata()


__all__: Sequence[str] = ("VerifiedScores", "reliability_on", "summary", "CLOSED_SET_VERIFY")
