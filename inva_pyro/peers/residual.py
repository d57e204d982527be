"""Predictive intervals for point estimators (ridge, tensor), from validation residuals.

A point estimator gives a mean map m(x) and no spread. Its predictive distribution is built on
the validation subjects, which the point fit never saw, in two steps on two disjoint parts:

1. **Scale** (a seeded share ``scale_share`` of the validation subjects, set A): the raw sd of
   voxel v is the root mean square of the residuals r_iv = y_iv - m_v(x_i) over i in A, shrunk
   towards the pooled mean square s_pool^2 (over all voxels) with ``scale_shrinkage`` = nu
   pseudo-subjects:  s_v^2 = (sum_{i in A} r_iv^2 + nu s_pool^2) / (|A| + nu)
   (the posterior mean of a voxel variance under an inverse-gamma prior centred on s_pool^2).
   With ``interval_scale = "pooled"``, s_v = s_pool for every voxel.
   The raw predictive is Normal(m, s_v^2); its central intervals are m +- z_P s_v.
2. **Calibration** (the other validation subjects, set B): ``Calibrator.fit`` on the standardised
   residuals z = (y - m) / s_v, exactly as for InVA (quantile recalibration; ``[prediction]
   calibration``). Set B is independent of s_v, so its z are exchangeable with a new subject's:
   the calibrated intervals are split-conformal with normalised scores.

Fitting s_v and the quantiles on the same residuals would make sum_i z_iv^2 = |A| at every voxel
by construction, so the quantiles would be too narrow for new subjects; hence the split. With a
single validation subject (|val| = 1) both steps use it and the intervals are not guaranteed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats
from threadpoolctl import threadpool_limits

from ..predict.calibration import Calibrator
from ..data.cohort import Subset
from .base import PeerModel


def split_validation(n: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded disjoint (scale, calibration) index sets of n validation subjects (both non-empty if n >= 2)."""
    order = np.random.default_rng(seed).permutation(n)
    if n < 2:
        return order, order
    n_scale = min(max(int(round(share * n)), 1), n - 1)
    return np.sort(order[:n_scale]), np.sort(order[n_scale:])


def residual_scale(residuals: np.ndarray, mode: str = "voxel", shrinkage: float = 0.0) -> np.ndarray:
    """(V,) raw sd from (n, V) residuals: per-voxel RMS shrunk towards the pooled RMS, or pooled."""
    residuals = np.asarray(residuals, dtype=np.float64)
    pooled = float(np.mean(residuals ** 2))
    if mode == "pooled":
        var = np.full(residuals.shape[1], pooled)
    else:
        var = ((residuals ** 2).sum(0) + shrinkage * pooled) / (residuals.shape[0] + shrinkage)
    floor = 1e-12 + 1e-6 * pooled
    return np.sqrt(np.maximum(var, floor))


@dataclass
class ResidualIntervals:
    """Raw sd map + calibrator fitted from validation residuals (see the module docstring)."""
    sd: np.ndarray            # (V,) raw predictive sd, outcome units
    calibrator: Calibrator

    @classmethod
    def fit(cls, observed: np.ndarray, mean: np.ndarray, *, mode: str, share: float, shrinkage: float,
            method: str, seed: int) -> "ResidualIntervals":
        scale_idx, calib_idx = split_validation(len(observed), share, seed)
        residuals = np.asarray(observed, np.float64) - np.asarray(mean, np.float64)
        sd = residual_scale(residuals[scale_idx], mode, shrinkage)
        calibrator = Calibrator.fit(observed[calib_idx], mean[calib_idx], np.broadcast_to(sd, mean[calib_idx].shape),
                                    method)
        return cls(sd=sd, calibrator=calibrator)


def gaussian_intervals(mean: np.ndarray, sd: np.ndarray, levels: list[float]) -> dict:
    """Central intervals of Normal(mean, sd^2) for each level."""
    return {lv: (mean + stats.norm.ppf((1 - lv) / 2) * sd, mean + stats.norm.ppf((1 + lv) / 2) * sd)
            for lv in levels}


class PointPeer(PeerModel):
    """A point estimator on standardised inputs and outcome, with residual intervals.

    Subclasses implement ``_fit_point(x, y, seed) -> None`` and ``_predict_point(x) -> (n, V_y)``
    on standardised matrices (inputs concatenated; outcome standardised per voxel), and
    ``_point_arrays()`` / ``_set_point_arrays(arrays)`` for persistence.
    """

    residual_sd: np.ndarray | None = None

    def _fit_point(self, x: np.ndarray, y: np.ndarray, seed: int) -> None:
        raise NotImplementedError

    def _predict_point(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _point_arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _set_point_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def _fit_model(self, train: Subset, val: Subset, *, seed: int, space, progress: bool) -> None:
        y = self.standardizer.transform_outcome(train.outcome).astype(np.float64)
        # The matrices are small (N x N kernels, N = subjects): extra BLAS threads only add overhead,
        # and on a busy machine spinning OpenBLAS threads slowed eigh 100-fold (measured).
        with threadpool_limits(limits=1, user_api="blas"):
            self._fit_point(self._standardised_inputs(train), y, seed)
        cfg = self.config
        fitted = ResidualIntervals.fit(val.outcome.astype(np.float64), self._mean(val), mode=cfg.interval_scale,
                                       share=cfg.scale_share, shrinkage=cfg.scale_shrinkage,
                                       method=self.preset.prediction.calibration, seed=seed + 1)
        self.residual_sd, self.calibrator = fitted.sd, fitted.calibrator

    def _mean(self, subset: Subset) -> np.ndarray:
        """Predicted mean in outcome units, (n, V_y) float64."""
        z = self._predict_point(self._standardised_inputs(subset))
        st = self.standardizer
        return z * st.outcome_scale.astype(np.float64) + st.outcome_mean.astype(np.float64)

    def _predictive(self, subset, levels, num_samples, seed, keep_samples):
        mean = self._mean(subset)
        sd = np.broadcast_to(self.residual_sd, mean.shape)
        samples = None
        if keep_samples:
            noise = np.random.default_rng(seed).standard_normal((keep_samples, *mean.shape))
            samples = mean + sd * noise
        return mean, sd, gaussian_intervals(mean, sd, levels), samples

    def _arrays(self) -> dict[str, np.ndarray]:
        return {**self._point_arrays(), "residual_sd": self.residual_sd}

    def _set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.residual_sd = np.asarray(arrays["residual_sd"], dtype=np.float64)
        self._set_point_arrays(arrays)
