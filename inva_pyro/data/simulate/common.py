"""What the designs share: the default split, link functions, the subject factors and per-subject random streams.
"""
from __future__ import annotations

import numpy as np
import pandas as pd


def default_split(n_subjects: int, seed: int) -> np.ndarray:
    """60% train / 20% val / 20% test, shuffled with the seed."""
    rng = np.random.default_rng(seed + 1)
    labels = np.array(["train"] * n_subjects, dtype=object)
    n_val = n_test = int(round(0.2 * n_subjects))
    order = rng.permutation(n_subjects)
    labels[order[:n_val]] = "val"
    labels[order[n_val:n_val + n_test]] = "test"
    return labels


# ----- shared helpers of the brain designs ------------------------------------------------------
def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def logit(p, eps: float = 0.01):
    p = np.clip(p, eps, 1 - eps)
    return np.log(p / (1 - p))


def softplus(x):
    return np.logaddexp(0.0, x)


def subject_factors(n_subjects: int, seed: int) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """Subject factors and covariates shared by the brain designs.

    age_z ~ N(0, 1) drives the atrophy factor a1 = 0.8 age_z + 0.6 u; a2 (pathology load),
    b (white-matter / head-size factor) ~ N(0, 1); site ~ Bernoulli(0.5) is a null covariate.
    """
    rng = np.random.default_rng([seed, 7])
    age_z = rng.standard_normal(n_subjects)
    factors = {"a1": 0.8 * age_z + 0.6 * rng.standard_normal(n_subjects),
               "a2": rng.standard_normal(n_subjects),
               "b": rng.standard_normal(n_subjects)}
    covariates = pd.DataFrame({"age": np.round(70 + 8 * age_z, 2),
                               "site": rng.integers(0, 2, n_subjects).astype(float)})
    return factors, covariates


def subject_rng(seed: int, i: int) -> np.random.Generator:
    # One stream per subject: a subject's images do not depend on how subjects are chunked.
    return np.random.default_rng([seed, 11, i])


def bumps(coords: np.ndarray, centres: list[tuple[float, float, float]], width: float) -> np.ndarray:
    """max over centres c of exp(-|x - c|^2 / (2 width^2)): a pattern in [0, 1] (coords in mm)."""
    out = np.zeros(coords.shape[:-1])
    for centre in centres:
        d2 = ((coords - np.asarray(centre, dtype=float)) ** 2).sum(-1)
        out = np.maximum(out, np.exp(-d2 / (2 * width ** 2)))
    return out


def _mirrored(points: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    return [p for x, y, z in points for p in ((x, y, z), (-x, y, z))]


# MNI coordinates (mm) of the patterns: P1 atrophy (medial and lateral temporal lobe), P2 pathology
# (precuneus / posterior cingulate, medial frontal, lateral parietal), P3 periventricular white matter.
P1_CENTRES = _mirrored([(26, -20, -16), (54, -22, -12)])
P2_CENTRES = _mirrored([(4, -58, 34), (4, 48, 12), (44, -62, 36)])
P3_CENTRES = _mirrored([(20, -12, 26)])


# ----- spatially smooth outcome noise (``noise="smooth"``) ---------------------------------------
NOISE_KINDS = ("independent", "smooth")


def _impulse_norm(shape: tuple[int, ...], sigma: float, mode: str) -> float:
    """sd of filtered unit white noise at the centre of the grid: |impulse response|_2."""
    from scipy import ndimage

    delta = np.zeros(shape)
    delta[tuple(s // 2 for s in shape)] = 1.0
    return float(np.sqrt(np.square(ndimage.gaussian_filter(delta, sigma, mode=mode)).sum()))


def smooth_noise(rng: np.random.Generator, n: int, shape: tuple[int, ...], sigma: float,
                 mode: str = "wrap") -> np.ndarray:
    """(n, *shape) Gaussian noise with unit variance (away from edges for mode != wrap) and the
    correlation of white noise smoothed by a Gaussian kernel of ``sigma`` voxels (a scanner's PSF)."""
    from scipy import ndimage

    white = rng.standard_normal((n, *shape))
    smooth = ndimage.gaussian_filter(white, sigma=(0, *([sigma] * len(shape))), mode=mode)
    return smooth / _impulse_norm(shape, sigma, mode)


def smooth_noise_covariance(shape: tuple[int, ...], sigma: float, mode: str = "wrap") -> np.ndarray:
    """The exact (V, V) covariance of ``smooth_noise`` on a grid (C order): K K^T / norm^2, K the filter."""
    from scipy import ndimage

    n_vox = int(np.prod(shape))
    basis = np.eye(n_vox).reshape(n_vox, *shape)
    kernel = ndimage.gaussian_filter(basis, sigma=(0, *([sigma] * len(shape))), mode=mode).reshape(n_vox, n_vox)
    return kernel @ kernel.T / _impulse_norm(shape, sigma, mode) ** 2
