"""``tensor``: low-rank tensor-on-tensor regression (Lock 2018) with a ridge penalty.

What is fitted. Lock (2018, "Tensor-on-tensor regression", JCGS 27:638) predicts an outcome tensor
Y (N x Q_1 x ... x Q_M) from a predictor tensor X (N x P_1 x ... x P_L) through the contracted
product Y = <X, B> + E, with B of CP rank R, B = sum_r u_r^(1) o ... o u_r^(L) o v_r^(1) o ... o v_r^(M),
estimated by least squares with a ridge penalty lambda ||B||_F^2.

Here the predictor modes are (features of all inputs concatenated; L = 1, P = sum_k V_k) and the
outcome mode is (voxels; M = 1, Q = V_y), after the same standardisation as ``ridge``. With one mode
on each side a CP-rank-R coefficient is a P x Q matrix of rank R, B = sum_r u_r v_r^T, and
the penalised problem

    min_{rank B <= R}  sum_i ||y_i - B^T x_i||^2 + lambda ||B||_F^2

is reduced-rank ridge regression, whose global minimiser is known in closed form (Mukherjee & Zhu
2011): B = B_lambda V_R V_R^T, with B_lambda the ridge solution and V_R the top R right singular
vectors of the fitted values of the ridge problem written as least squares on augmented data
[X; sqrt(lambda) I]. So the closed form is exactly the estimator Lock's alternating least
squares targets for this mode structure, without its local optima. We compute it in the dual
(N x N kernel K = X X^T = U S U^T):  Y_hat*^T Y_hat* = Y^T U diag(s / (s + lambda)) U^T Y.

Why not the finer modes (input k) x (voxel) -> (voxel), or separate spatial axes? Matricising any
such CP-rank-R tensor gives a rank <= R matrix, so the matrix model nests them at the same rank,
and voxels inside a brain mask (or surface vertices, or regions) have no separable grid axes.
(R, lambda) are chosen jointly by ``cv_folds``-fold cross-validation over the training subjects
from ``ranks`` x a log grid of ``n_alphas`` penalties. B is stored factored, B = C V_R^T.
Intervals: validation residuals (``peers/residual.py``).

What it cannot do: a rank-R map cannot carry a voxel-to-same-voxel (identity-like, full-rank)
effect of the inputs, which the built-in design has; that is the ridge / InVA local pathway's job.
"""
from __future__ import annotations

import numpy as np

from .linear import CentredKernel, FactoredLinear
from .residual import PointPeer


class TensorRegression(PointPeer):
    family = "tensor"

    def __init__(self, preset=None):
        super().__init__(preset)
        self.linear: FactoredLinear | None = None     # B = left @ right.T, rank R

    def _fit_point(self, x: np.ndarray, y: np.ndarray, seed: int) -> None:
        cfg = self.config
        n = len(x)
        alphas = np.logspace(np.log10(cfg.alpha_min), np.log10(cfg.alpha_max), cfg.n_alphas)
        ranks = sorted({min(r, n - 1, y.shape[1]) for r in cfg.ranks} - {0}) or [1]
        folds = np.random.default_rng(seed).permutation(n) % min(cfg.cv_folds, n)
        errors = np.zeros((len(alphas), len(ranks)))
        for f in np.unique(folds):
            train, held = folds != f, folds == f
            kernel = CentredKernel.fit(x[train], y[train])
            rows = kernel.kernel_rows(x[held])
            target = y[held] - kernel.y_mean
            for a, alpha in enumerate(alphas):
                v = kernel.rrr_directions(alpha, max(ranks))
                ridge_fit = rows @ (kernel.uty / (kernel.s + alpha)[:, None])   # held-out ridge predictions
                for j, r in enumerate(ranks):
                    errors[a, j] += np.sum((target - (ridge_fit @ v[:, :r]) @ v[:, :r].T) ** 2)
        a_best, r_best = np.unravel_index(np.argmin(errors), errors.shape)
        alpha, rank = float(alphas[a_best]), int(ranks[r_best])
        kernel = CentredKernel.fit(x, y)
        v = kernel.rrr_directions(alpha, rank)
        # B = X_c^T A V V^T with A = U diag(1/(s+alpha)) U^T Y_c: left = X_c^T (A V), right = V
        self.linear = FactoredLinear(kernel.x_mean, kernel.y_mean, kernel.xc.T @ (kernel.dual_coef(alpha) @ v), v)
        self.info.update(rank=rank, alpha=alpha, cv_mse=float(errors[a_best, r_best] / y.size))

    def _predict_point(self, x: np.ndarray) -> np.ndarray:
        return self.linear.predict(x)

    def _point_arrays(self) -> dict[str, np.ndarray]:
        return self.linear.arrays()

    def _set_point_arrays(self, arrays) -> None:
        self.linear = FactoredLinear.from_arrays(arrays)
