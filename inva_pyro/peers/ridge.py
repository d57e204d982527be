"""``ridge``: multi-output ridge regression of the outcome on every input, penalty by cross-validation.

What is fitted: x_i = all inputs of subject i standardised feature-wise (training mean and sd)
and concatenated (P = sum_k V_k features); y_i the outcome standardised voxel-wise. For each
outcome voxel v,  y_iv = b_v + x_i . w_v + e_iv,  with (b, W) minimising
sum_i ||y_i - b - W x_i||^2 + alpha ||W||_F^2. alpha is chosen from a log grid
(``alpha_min`` .. ``alpha_max``, ``n_alphas`` values) by efficient leave-one-out cross-validation
(scikit-learn ``RidgeCV``, generalised cross-validation), one alpha for all voxels unless
``alpha_per_target``. Intervals: validation residuals (``peers/residual.py``).
"""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import RidgeCV

from .residual import PointPeer


class RidgeRegression(PointPeer):
    family = "ridge"

    def __init__(self, preset=None):
        super().__init__(preset)
        self.coef: np.ndarray | None = None        # (P, V_y)
        self.intercept: np.ndarray | None = None   # (V_y,)
        self.alpha: np.ndarray | None = None       # (1,) or (V_y,)

    def _fit_point(self, x: np.ndarray, y: np.ndarray, seed: int) -> None:
        cfg = self.config
        alphas = np.logspace(np.log10(cfg.alpha_min), np.log10(cfg.alpha_max), cfg.n_alphas)
        ridge = RidgeCV(alphas=alphas, alpha_per_target=cfg.alpha_per_target).fit(x, y)
        self.coef = np.asarray(ridge.coef_, dtype=np.float64).T
        self.intercept = np.asarray(ridge.intercept_, dtype=np.float64)
        self.alpha = np.atleast_1d(np.asarray(ridge.alpha_, dtype=np.float64))
        self.info["alpha"] = float(np.median(self.alpha))

    def _predict_point(self, x: np.ndarray) -> np.ndarray:
        return x @ self.coef + self.intercept

    def _point_arrays(self) -> dict[str, np.ndarray]:
        return {"coef": self.coef.astype(np.float32), "intercept": self.intercept, "alpha": self.alpha}

    def _set_point_arrays(self, arrays) -> None:
        self.coef = np.asarray(arrays["coef"], dtype=np.float64)
        self.intercept = np.asarray(arrays["intercept"], dtype=np.float64)
        self.alpha = np.asarray(arrays["alpha"], dtype=np.float64)
