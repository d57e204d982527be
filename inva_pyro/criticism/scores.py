"""Multivariate proper scores of whole-image predictives, from streamed draws (docs/uncertainty.md).

- Energy score (Gneiting & Raftery 2007): ES(F, y) = E||X - y|| - 1/2 E||X - X'||, X, X' ~ F
  independent, ||.|| the Euclidean norm over the image's features; estimated without bias from draws
  (all draws for the first term, disjoint consecutive pairs for the second, as ``StreamingCRPS``).
- Variogram score of order p (Scheuerer & Hamill 2015):
  VS_p(F, y) = sum_{(v, w) in P} (|y_v - y_w|^p - E|X_v - X_w|^p)^2, over every pair of features
  (V <= ``ALL_PAIRS_MAX``) or a seeded uniform set of ``N_PAIRS`` pairs, divided by the number of pairs
  so that cohorts of different sizes compare; p = 0.5 as they recommend. It is sensitive to the
  correlation between features, which the energy score detects only weakly in high dimension.

Both are lower-is-better, averaged over subjects. ``multivariate_scores`` compares the joint
predictive with the independent-voxel predictive of the same voxel variances (``predict/joint.py``).
"""
from __future__ import annotations

import numpy as np

ALL_PAIRS_MAX = 128
N_PAIRS = 4096
DRAWS = 200


class StreamingEnergy:
    """Energy score per subject, fed chunks of draws (s, n, V)."""

    def __init__(self, observed: np.ndarray):
        self.y = np.asarray(observed, dtype=np.float64)
        self.dist_sum = np.zeros(self.y.shape[0])
        self.pair_sum = np.zeros(self.y.shape[0])
        self.n_draws = self.n_pairs = 0
        self._open = None

    def update(self, draws: np.ndarray) -> None:
        x = np.asarray(draws, dtype=np.float64)
        self.dist_sum += np.linalg.norm(x - self.y, axis=-1).sum(0)
        self.n_draws += len(x)
        if self._open is not None and len(x):
            self.pair_sum += np.linalg.norm(self._open - x[0], axis=-1)
            self.n_pairs += 1
            self._open, x = None, x[1:]
        half = len(x) // 2
        if half:
            self.pair_sum += np.linalg.norm(x[0:2 * half:2] - x[1:2 * half:2], axis=-1).sum(0)
            self.n_pairs += half
        if len(x) % 2:
            self._open = x[-1]

    def value(self) -> np.ndarray:
        return self.dist_sum / self.n_draws - 0.5 * self.pair_sum / self.n_pairs


def feature_pairs(n_features: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    if n_features <= ALL_PAIRS_MAX:
        return np.triu_indices(n_features, 1)
    rng = np.random.default_rng([seed, 17])
    a = rng.integers(0, n_features, N_PAIRS)
    b = (a + rng.integers(1, n_features, N_PAIRS)) % n_features       # never the same feature
    return a, b


class StreamingVariogram:
    """Variogram score of order p per subject on fixed feature pairs, fed chunks of draws (s, n, V)."""

    def __init__(self, observed: np.ndarray, pairs: tuple[np.ndarray, np.ndarray], p: float = 0.5):
        y = np.asarray(observed, dtype=np.float64)
        self.pairs, self.p = pairs, p
        self.y_vario = np.abs(y[:, pairs[0]] - y[:, pairs[1]]) ** p
        self.sum = np.zeros_like(self.y_vario)
        self.n_draws = 0

    def update(self, draws: np.ndarray) -> None:
        x = np.asarray(draws, dtype=np.float64)
        self.sum += (np.abs(x[:, :, self.pairs[0]] - x[:, :, self.pairs[1]]) ** self.p).sum(0)
        self.n_draws += len(x)

    def value(self) -> np.ndarray:
        return np.mean((self.y_vario - self.sum / self.n_draws) ** 2, axis=1)


def multivariate_scores(prediction, draws: int = DRAWS, seed: int = 0, p: float = 0.5) -> dict:
    """Energy and variogram scores (means over subjects) of the joint predictive and of the
    independent-voxel predictive with the same voxel variances, from ``draws`` seeded draws each."""
    from ..predict.spatial import spatial_draws

    observed = np.asarray(prediction.observed, dtype=np.float64)
    pairs = feature_pairs(observed.shape[1], seed)
    out = {"draws": int(draws), "variogram_order": p, "variogram_pairs": int(len(pairs[0]))}
    for name, independent in (("joint", False), ("independent", True)):
        energy, vario = StreamingEnergy(observed), StreamingVariogram(observed, pairs, p)
        for chunk in spatial_draws(prediction.mean, prediction.raw_sd, prediction.spatial_covariance, draws, seed=seed,
                                 independent=independent, chunk=max(2, min(16, (4 << 20) // max(observed.size, 1)))):
            energy.update(chunk)
            vario.update(chunk)
        out[f"energy_{name}"] = float(energy.value().mean())
        out[f"variogram_{name}"] = float(vario.value().mean())
    return out
