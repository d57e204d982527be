"""Accuracy and calibration metrics for voxel-wise predictive distributions.

Arrays are laid out as (n_subjects, n_features): one row per subject, one column per
voxel / vertex / region inside the mask. Every function accepts numpy arrays or torch
tensors and computes in float64, so metrics do not depend on the model's dtype.

The predictive distribution of an entry is described either as Gaussian, N(mean, sd^2),
or as a location-scale family Y = mean + sd * Z with Z drawn from an empirical
distribution (e.g. standardised validation residuals), or by samples.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
from scipy import stats

# SSIM window: 7 voxels with a Gaussian sigma of 1.5. The usual 11-voxel window would leave
# only 22x22 valid positions on a 32x32 slice and blurs small structures in ~40^3
# volumes; 7 still covers +-2 sigma of the kernel.
SSIM_WINDOW = 7
SSIM_SIGMA = 1.5


def to_numpy(x) -> np.ndarray:
    """Any array-like (numpy, torch on any device, list) as a float64 numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _check_sd(sd: np.ndarray) -> None:
    if not np.all(np.isfinite(sd)) or np.any(sd < 0):
        raise ValueError("predictive sd must be finite and non-negative")


# --------------------------------------------------------------------------- point accuracy


def mse(y, mean) -> float:
    """Mean squared error over all entries."""
    return float(np.mean((to_numpy(y) - to_numpy(mean)) ** 2))


def mae(y, mean) -> float:
    """Mean absolute error over all entries."""
    return float(np.mean(np.abs(to_numpy(y) - to_numpy(mean))))


def corr(y, mean) -> float:
    """Pearson correlation of all entries pooled (subjects and features together).

    NaN when either array is constant.
    """
    a, b = to_numpy(y).ravel(), to_numpy(mean).ravel()
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b / denom) if denom > 0 else float("nan")


def ssim(pred, obs, grid_shape: Sequence[int], data_range: float) -> float | None:
    """Structural similarity (MONAI), averaged over subjects.

    pred, obs: shape (n, *grid_shape) or (n, prod(grid_shape)) in C order; 2-D or 3-D grids.
    Voxels outside a brain mask should hold the same fill value (e.g. 0) in both arrays.
    data_range: the value range SSIM's stabilising constants are scaled by. It is passed in
    explicitly so that every model on a cohort is scored on the same scale; inva uses the
    observed outcome's range (max - min) over the test set.

    Uses a Gaussian window of SSIM_WINDOW voxels (sigma SSIM_SIGMA). Returns None when some
    grid dimension is smaller than that window, since SSIM is then undefined.
    """
    from monai.metrics.regression import compute_ssim_and_cs

    grid_shape = tuple(int(s) for s in grid_shape)
    if len(grid_shape) not in (2, 3):
        raise ValueError(f"ssim needs a 2-D or 3-D grid, got shape {grid_shape}")
    if min(grid_shape) < SSIM_WINDOW:
        return None
    if not data_range > 0:
        raise ValueError(f"ssim data_range must be positive, got {data_range}")
    as_batch = lambda x: torch.from_numpy(to_numpy(x)).reshape(-1, 1, *grid_shape)  # noqa: E731
    ndim = len(grid_shape)
    ssim_map, _ = compute_ssim_and_cs(
        y_pred=as_batch(pred),
        y=as_batch(obs),
        spatial_dims=ndim,
        kernel_size=[SSIM_WINDOW] * ndim,
        kernel_sigma=[SSIM_SIGMA] * ndim,
        data_range=float(data_range),
    )
    return float(ssim_map.mean())  # same window count per subject, so this is the subject mean


# --------------------------------------------------------------------------- intervals


def coverage(y, lo, hi) -> float:
    """Fraction of observed values inside the closed interval [lo, hi]."""
    y = to_numpy(y)
    return float(np.mean((y >= to_numpy(lo)) & (y <= to_numpy(hi))))


def coverage_by_feature(y, lo, hi) -> np.ndarray:
    """Per-feature coverage across subjects, shape (n_features,) (for coverage maps)."""
    y = to_numpy(y)
    return np.mean((y >= to_numpy(lo)) & (y <= to_numpy(hi)), axis=0)


def interval_width(lo, hi) -> float:
    """Mean interval width hi - lo."""
    return float(np.mean(to_numpy(hi) - to_numpy(lo)))


# --------------------------------------------------------------------------- proper scores


def gaussian_nll(y, mean, sd) -> float:
    """Mean negative log density of y under N(mean, sd^2); sd must be positive."""
    sd = to_numpy(sd)
    if not np.all(sd > 0):
        raise ValueError("gaussian_nll needs a strictly positive sd")
    return float(-np.mean(stats.norm.logpdf(to_numpy(y), loc=to_numpy(mean), scale=sd)))


def crps_gaussian_map(y, mean, sd) -> np.ndarray:
    """Entry-wise CRPS of N(mean, sd^2) at y, closed form (Gneiting & Raftery 2007, eq. 21):

        CRPS = sd * [ w (2 Phi(w) - 1) + 2 phi(w) - 1/sqrt(pi) ],   w = (y - mean) / sd,

    and |y - mean| where sd == 0 (a point mass).
    """
    y, mean, sd = np.broadcast_arrays(to_numpy(y), to_numpy(mean), to_numpy(sd))
    _check_sd(sd)
    err = y - mean
    w = np.divide(err, sd, out=np.zeros_like(err), where=sd > 0)
    score = sd * (w * (2 * stats.norm.cdf(w) - 1) + 2 * stats.norm.pdf(w) - 1 / math.sqrt(math.pi))
    return np.where(sd > 0, score, np.abs(err))


def crps_gaussian(y, mean, sd) -> float:
    """Mean closed-form Gaussian CRPS over all entries (see crps_gaussian_map)."""
    return float(np.mean(crps_gaussian_map(y, mean, sd)))


def _sorted_atoms(z_quantiles) -> np.ndarray:
    z = np.sort(to_numpy(z_quantiles).ravel())
    if z.size == 0 or not np.all(np.isfinite(z)):
        raise ValueError("z_quantiles must be a non-empty array of finite values")
    return z


def crps_quantile_distribution_map(y, mean, sd, z_quantiles) -> np.ndarray:
    """Entry-wise CRPS of Y = mean + sd * Z, Z uniform on the M atoms z_quantiles.

    CRPS is scale-equivariant: CRPS(F, y) = sd * CRPS(G, w) with w = (y - mean) / sd. For an
    empirical G, CRPS(G, w) = E|Z - w| - E|Z - Z'| / 2 exactly (Gneiting & Raftery 2007, eq. 22).
    With sorted atoms z_1 <= ... <= z_M, k = #{z_j < w} and prefix sums P_k = z_1 + ... + z_k,

        M E|Z - w| = (k w - P_k) + (P_M - P_k - (M - k) w),
        M^2 E|Z - Z'| = 2 sum_j (2j - M - 1) z_j,

    so the cost is O(n V log M) time and O(n V) memory, never an M x n x V tensor.
    Where sd == 0 the predictive is a point mass and the score is |y - mean|.
    """
    z = _sorted_atoms(z_quantiles)
    m = z.size
    y, mean, sd = np.broadcast_arrays(to_numpy(y), to_numpy(mean), to_numpy(sd))
    _check_sd(sd)
    err = y - mean
    w = np.divide(err, sd, out=np.zeros_like(err), where=sd > 0)

    prefix = np.concatenate([[0.0], np.cumsum(z)])
    k = np.searchsorted(z, w, side="left")
    below = prefix[k]
    abs_dev = (k * w - below + (prefix[-1] - below) - (m - k) * w) / m

    ranks = np.arange(1, m + 1)
    spread = 2.0 * np.dot(2 * ranks - m - 1, z) / m**2  # E|Z - Z'|

    return np.where(sd > 0, sd * (abs_dev - 0.5 * spread), np.abs(err))


def crps_quantile_distribution(y, mean, sd, z_quantiles) -> float:
    """Mean CRPS of the location-scale empirical predictive (see crps_quantile_distribution_map)."""
    return float(np.mean(crps_quantile_distribution_map(y, mean, sd, z_quantiles)))


def pit_gaussian(y, mean, sd) -> np.ndarray:
    """Probability integral transform Phi((y - mean) / sd); uniform when calibrated."""
    return stats.norm.cdf(to_numpy(y), loc=to_numpy(mean), scale=to_numpy(sd))


def pit_quantile_distribution(y, mean, sd, z_quantiles) -> np.ndarray:
    """PIT under Y = mean + sd * Z, Z empirical on z_quantiles.

    Ties (w equal to an atom) get the mid-point of the CDF jump, so the PIT of a calibrated
    predictive stays centred on 1/2 even for a coarse set of atoms.
    """
    z = _sorted_atoms(z_quantiles)
    w = (to_numpy(y) - to_numpy(mean)) / to_numpy(sd)
    left = np.searchsorted(z, w, side="left")
    right = np.searchsorted(z, w, side="right")
    return (left + right) / (2.0 * z.size)


# --------------------------------------------------------------------------- streaming estimators


def level_key(level) -> str:
    """The metrics.json key of an interval level: 0.9 -> "0.9", "0.50" -> "0.5"."""
    return format(float(level), "g")


def scatter_to_grid(values, mask, fill: float = 0.0) -> np.ndarray:
    """(n, n_features) values inside a boolean mask -> (n, *mask.shape) grids (C order)."""
    values, mask = to_numpy(values), np.asarray(mask, dtype=bool)
    grids = np.full((values.shape[0], *mask.shape), fill, dtype=np.float64)
    grids[:, mask] = values
    return grids


def evaluation_metrics(
    y,
    mean,
    sd,
    intervals: Mapping[str | float, tuple],
    crps: float,
    grid_shape: Sequence[int] | None = None,
    truth_mean=None,
    truth_sd=None,
    mask=None,
) -> dict:
    """The metrics.json dictionary (docs/uncertainty.md, section 1).

    y, mean, sd: (n_subjects, n_features). intervals: level -> (lo, hi) arrays, keys are
    normalised with level_key. crps is passed in because it depends on the predictive form
    (Gaussian, empirical-quantile or samples). nll is Gaussian with the given sd.

    SSIM needs a grid: either grid_shape, when the features are the full grid in C order, or
    mask (a boolean grid), when the features are the mask's voxels; voxels outside the mask
    are then 0 in both images. Its data_range is the observed range over the given subjects.
    Without either, or when the observed outcome is constant, ssim is None. oracle_mse needs truth_mean, oracle_crps also truth_sd.
    """
    y, mean, sd = to_numpy(y), to_numpy(mean), to_numpy(sd)
    if not (y.shape == mean.shape == sd.shape) or y.ndim != 2:
        raise ValueError(f"y, mean, sd must share a (n_subjects, n_features) shape, got {y.shape}, {mean.shape}, {sd.shape}")

    ssim_value = None
    obs_range = float(y.max() - y.min())
    if obs_range > 0 and mask is not None:
        ssim_value = ssim(scatter_to_grid(mean, mask), scatter_to_grid(y, mask), np.shape(mask), obs_range)
    elif obs_range > 0 and grid_shape is not None:
        ssim_value = ssim(mean, y, grid_shape, obs_range)

    by_level = sorted(intervals.items(), key=lambda kv: float(kv[0]))
    return {
        "n_subjects": int(y.shape[0]),
        "n_features": int(y.shape[1]),
        "mse": mse(y, mean),
        "mae": mae(y, mean),
        "corr": corr(y, mean),
        "ssim": ssim_value,
        "coverage": {level_key(p): coverage(y, lo, hi) for p, (lo, hi) in by_level},
        "interval_width": {level_key(p): interval_width(lo, hi) for p, (lo, hi) in by_level},
        "crps": float(crps),
        "nll": gaussian_nll(y, mean, sd),
        "oracle_mse": mse(y, truth_mean) if truth_mean is not None else None,
        "oracle_crps": crps_gaussian(y, truth_mean, truth_sd) if truth_mean is not None and truth_sd is not None else None,
    }
