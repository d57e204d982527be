"""Design ``paper``: K = 3 inputs and the outcome on a 32 x 32 grid (equations in the package docstring and
docs/simulation.md).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage

from .common import NOISE_KINDS, smooth_noise


PAPER_GRID = (32, 32)
NOISE_SIGMA = 1.5   # pixels: the Gaussian PSF of ``noise="smooth"`` (3 mm at 2 mm pixels)
LOADINGS = np.array([[1.0, 0.5], [0.6, -0.8], [0.8, 0.8]])
FIELD_SD, FIELD_SIGMA, WHITE_SD = 0.5, 1.5, 0.2   # an input's smooth field (sd, pixels) and white noise


def subject_terms(factors: np.ndarray) -> np.ndarray:
    """(..., 4) coefficients of ``paper_patterns()["terms"]`` (S_1, S_2, C_1, C_2) in the true mean,
    from factors (..., 5) = (a_1, a_2, b_1, b_2, b_3)."""
    a1, a2, b1, b2 = (factors[..., j] for j in range(4))
    return np.stack([np.tanh(1.5 * a1), 0.5 * (a2 ** 2 - 1), 0.6 * b1, 0.6 * np.tanh(2 * b2)], axis=-1)


def _bump(coords: np.ndarray, centre: tuple[float, float], width: float) -> np.ndarray:
    d2 = ((coords - np.asarray(centre)) ** 2).sum(-1)
    return np.exp(-d2 / (2 * width ** 2))


def _smooth_field(rng: np.random.Generator, n: int, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    white = rng.standard_normal((n, *shape))
    smooth = ndimage.gaussian_filter(white, sigma=(0, *([sigma] * len(shape))), mode="wrap")
    return smooth / smooth.reshape(n, -1).std(axis=1).reshape(n, *([1] * len(shape)))


def paper_patterns(grid: tuple[int, int] = PAPER_GRID) -> dict:
    """The ``paper`` design's fixed maps on ``grid``: coordinates, the shared bumps S_j, the specific
    bumps C_k, the input means mu_k, the outcome mean mu_y and ``terms``, the maps (S_1, S_2, C_1, C_2)
    that the subject terms (``subject_terms``) multiply in the true mean."""
    axes = [np.linspace(-1, 1, g) for g in grid]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    shared = [_bump(coords, (-0.4, 0.3), 0.35), _bump(coords, (0.4, -0.2), 0.4)]
    specific = [_bump(coords, (0.5, 0.55), 0.3), _bump(coords, (-0.5, -0.5), 0.3), _bump(coords, (0.0, 0.0), 0.3)]
    return {"coords": coords, "shared": shared, "specific": specific,
            "base": [1.0 + 0.3 * coords[..., 0], 0.5 - 0.2 * coords[..., 1], 0.3 * coords[..., 0] * coords[..., 1]],
            "mu_y": 1.0 + 0.4 * coords[..., 1], "terms": [*shared, *specific[:2]]}


def simulate_paper(n_subjects: int, seed: int = 0, grid: tuple[int, int] = PAPER_GRID,
                   noise: str = "independent") -> dict:
    """Arrays of the ``paper`` design: inputs (n, H, W) each, outcome, true mean and sd, covariates, and
    the subject factors (n, 5) = (a_1, a_2, b_1, b_2, b_3).

    ``noise="smooth"``: eta is white noise smoothed by a Gaussian of NOISE_SIGMA pixels (periodic
    edges), unit variance per pixel (``common.smooth_noise``; exact covariance
    ``common.smooth_noise_covariance(grid, NOISE_SIGMA)``), instead of independent per pixel."""
    rng = np.random.default_rng(seed)
    patterns = paper_patterns(grid)
    shared, specific, base, mu_y = (patterns[k] for k in ("shared", "specific", "base", "mu_y"))

    age = rng.standard_normal(n_subjects)
    site = rng.integers(0, 2, n_subjects).astype(float)
    a = np.stack([0.8 * age + 0.6 * rng.standard_normal(n_subjects), rng.standard_normal(n_subjects)], axis=1)
    b = rng.standard_normal((3, n_subjects))
    expand = lambda v: v[:, None, None]

    deviations, inputs = [], {}
    for k in range(3):
        dev = (sum(LOADINGS[k, j] * expand(a[:, j]) * shared[j] for j in range(2))
               + expand(b[k]) * specific[k]
               + FIELD_SD * _smooth_field(rng, n_subjects, grid, FIELD_SIGMA)
               + WHITE_SD * rng.standard_normal((n_subjects, *grid)))
        deviations.append(dev)
        inputs[f"x{k + 1}"] = base[k] + dev
    d1, d2, d3 = deviations
    factors = np.concatenate([a, b.T], axis=1)
    terms = subject_terms(factors)
    mean = mu_y
    for t, pattern in enumerate(patterns["terms"]):   # summed in this order: cohorts stay bit-identical
        mean = mean + expand(terms[:, t]) * pattern
    mean = mean + 0.6 * np.tanh(d1) + 0.3 * d1 * d3
    sd = 0.5 * np.exp(0.25 * d2) * (0.7 + 0.6 * shared[0])
    if noise == "smooth":
        eta = smooth_noise(rng, n_subjects, tuple(grid), NOISE_SIGMA)
    elif noise == "independent":
        eta = rng.standard_normal(mean.shape)
    else:
        raise ValueError(f"noise must be one of {NOISE_KINDS}, got {noise!r}")
    outcome = mean + sd * eta
    covariates = pd.DataFrame({"age": 70 + 8 * age, "site": site})
    return {"inputs": inputs, "outcome": outcome, "true_mean": mean, "true_sd": sd, "covariates": covariates,
            "factors": factors}
