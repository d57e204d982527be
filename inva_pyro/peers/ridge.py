"""``ridge``: multi-output ridge regression of the outcome on every input, penalty by cross-validation.

What is fitted: x_i = all inputs of subject i standardised feature-wise (training mean and sd)
and concatenated (P = sum_k V_k features); y_i the outcome standardised voxel-wise. For each
outcome voxel v,  y_iv = b_v + x_i . w_v + e_iv,  with (b, W) minimising
sum_i ||y_i - b - W x_i||^2 + alpha ||W||_F^2 (b unpenalised). alpha is chosen from a log grid
(``alpha_min`` .. ``alpha_max``, ``n_alphas`` values) by exact leave-one-out cross-validation of the
centred problem (the efficient formula scikit-learn's ``RidgeCV`` uses), summed over voxels; with
``alpha_per_target`` each voxel picks its own. The fit goes through the subjects' kernel
(``peers/linear.py``), so whole-brain inputs and outcomes need no P x Q matrix.
Intervals: validation residuals (``peers/residual.py``).
"""
from __future__ import annotations

import numpy as np

from .linear import CentredKernel, FactoredLinear, factored
from .residual import PointPeer


class RidgeRegression(PointPeer):
    family = "ridge"

    def __init__(self, preset=None):
        super().__init__(preset)
        self.linear: FactoredLinear | None = None
        self.alpha: np.ndarray | None = None       # (1,) or (V_y,)

    def _fit_point(self, x: np.ndarray, y: np.ndarray, seed: int) -> None:
        cfg = self.config
        alphas = np.logspace(np.log10(cfg.alpha_min), np.log10(cfg.alpha_max), cfg.n_alphas)
        kernel = CentredKernel.fit(x, y)
        errors = np.stack([kernel.loo_errors(a) for a in alphas])          # (n_alphas, Q)
        if cfg.alpha_per_target:
            alpha = alphas[np.argmin(errors, axis=0)]
        else:
            alpha = np.array([alphas[np.argmin(errors.sum(1))]])
        self.alpha = alpha
        dual = kernel.dual_coef(alpha if cfg.alpha_per_target else alpha[0])
        self.linear = FactoredLinear(kernel.x_mean, kernel.y_mean, *factored(kernel.xc, dual))
        self.info["alpha"] = float(np.median(alpha))

    def _predict_point(self, x: np.ndarray) -> np.ndarray:
        return self.linear.predict(x)

    def _point_arrays(self) -> dict[str, np.ndarray]:
        return {**self.linear.arrays(), "alpha": self.alpha}

    def _set_point_arrays(self, arrays) -> None:
        self.linear = FactoredLinear.from_arrays(arrays)
        self.alpha = np.asarray(arrays["alpha"], dtype=np.float64)
