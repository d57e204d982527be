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


def _as_tensor(x, device=None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    return x.to(device=device, dtype=torch.float64)


class StreamingCRPS:
    """Sample-based CRPS for a fixed block of subjects, fed with chunks of predictive samples.

    For a predictive X with samples X_1, X_2, ... the CRPS at y is E|X - y| - E|X - X'|/2.
    This accumulates

        A = mean_s |X_s - y|                        (all samples)
        B = mean_p |X_{2p-1} - X_{2p}|              (disjoint consecutive pairs)

    and estimates CRPS = A - B/2. Both means are unbiased (pairs of independent draws are
    independent copies of X, X'), so the estimate is unbiased, and memory stays O(n V)
    instead of the O(S^2) of the all-pairs form. A chunk with an odd number of samples
    keeps its last sample to pair with the first one of the next chunk.

    Accumulation is float64 on the device of the first chunk (GPU samples stay on the GPU).
    """

    def __init__(self, y):
        self._y = y
        self._abs_dev = None  # running sum of |X_s - y|
        self._pair_dev = None  # running sum of |X - X'| over completed pairs
        self._n_samples = 0
        self._n_pairs = 0
        self._unpaired = None  # last sample of a chunk still waiting for its partner

    def update(self, samples) -> None:
        """Add samples of shape (s, n, V) (or (s, *y.shape)); torch or numpy."""
        device = samples.device if isinstance(samples, torch.Tensor) else None
        x = _as_tensor(samples, device)
        if not isinstance(self._y, torch.Tensor) or self._y.device != x.device:
            self._y = _as_tensor(self._y, x.device)
        if x.shape[1:] != self._y.shape:
            raise ValueError(f"samples of shape {tuple(x.shape)} do not match y of shape {tuple(self._y.shape)}")
        if x.shape[0] == 0:
            return
        if self._abs_dev is None:
            self._abs_dev = torch.zeros_like(self._y)
            self._pair_dev = torch.zeros_like(self._y)

        self._abs_dev += (x - self._y).abs().sum(0)
        self._n_samples += x.shape[0]

        if self._unpaired is not None:  # complete the pair left open by the previous chunk
            self._pair_dev += (self._unpaired - x[0]).abs()
            self._n_pairs += 1
            self._unpaired, x = None, x[1:]
        n_pairs = x.shape[0] // 2
        pairs = x[: 2 * n_pairs].reshape(n_pairs, 2, *x.shape[1:])
        self._pair_dev += (pairs[:, 0] - pairs[:, 1]).abs().sum(0)
        self._n_pairs += n_pairs
        if x.shape[0] % 2:
            self._unpaired = x[-1].clone()

    def value(self, average: bool = True):
        """The mean CRPS (float) or, with average=False, the entry-wise CRPS map as numpy."""
        if self._n_pairs == 0:
            raise ValueError("StreamingCRPS needs at least two samples")
        crps_map = self._abs_dev / self._n_samples - 0.5 * self._pair_dev / self._n_pairs
        return float(crps_map.mean()) if average else crps_map.cpu().numpy()


class StreamingMoments:
    """Running mean and variance along axis 0 of chunks, merged with Chan et al.'s update.

    Merging a chunk (count n_b, mean m_b, sum of squared deviations M2_b) into the running
    state (n_a, m_a, M2_a):

        n = n_a + n_b,  d = m_b - m_a,  m = m_a + d n_b / n,  M2 = M2_a + M2_b + d^2 n_a n_b / n.

    This is Welford's algorithm generalised to chunks; unlike sum / sum-of-squares it does
    not lose precision when the mean is large relative to the spread. Float64 throughout,
    on the device of the first chunk.
    """

    def __init__(self):
        self.count = 0
        self._mean = None
        self._m2 = None

    def update(self, x) -> None:
        """Add a chunk of shape (s, ...) (torch or numpy)."""
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(np.asarray(x))
        n_b = x.shape[0]
        if n_b == 0:
            return
        # Chunk statistics in the chunk's own precision (centred, so float32 loses nothing that
        # matters); only the merge below, where rounding would accumulate, is float64.
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        target = self._mean.device if self._mean is not None else x.device
        mean_b, m2_b = mean_b.to(target, torch.float64), m2_b.to(target, torch.float64)
        if self._mean is None:
            self.count, self._mean, self._m2 = n_b, mean_b, m2_b
            return
        n = self.count + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + delta**2 * (self.count * n_b / n)
        self.count = n

    @property
    def mean(self) -> torch.Tensor:
        if self._mean is None:
            raise ValueError("StreamingMoments has seen no data")
        return self._mean

    def variance(self, ddof: int = 1) -> torch.Tensor:
        """Variance with divisor count - ddof (ddof=1: the unbiased sample variance)."""
        if self.count - ddof <= 0:
            raise ValueError(f"variance with ddof={ddof} needs more than {ddof} samples, have {self.count}")
        return self._m2 / (self.count - ddof)

    def sd(self, ddof: int = 1) -> torch.Tensor:
        return self.variance(ddof).sqrt()


# --------------------------------------------------------------------------- metrics.json


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
    """The metrics.json dictionary of CONTRACT.md.

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
