"""Ridge regression in the dual (subject) space, shared by ``ridge`` and ``tensor``.

Images have many more features than there are subjects (P, Q >> N), so every fit goes through the
centred N x N kernel K = X_c X_c^T = U diag(s) U^T and never forms a P x P matrix:

    ridge coefficient   B_alpha = X_c^T U diag(1 / (s + alpha)) U^T Y_c          (P x Q)
    fitted values       H_alpha Y_c,  H_alpha = U diag(s / (s + alpha)) U^T
    leave-one-out       e_(-i) = (Y_c - H Y_c)_i / (1 - 1/N - H_ii)   (exact, with the unpenalised
                        intercept's leverage 1/N; one formula for every alpha)
    augmented-data fit  [X_c; sqrt(alpha) I] B_alpha has Gram matrix Y_c^T U diag(s / (s + alpha)) U^T Y_c,
                        whose top right singular vectors give reduced-rank ridge (``tensor``).

A coefficient is kept factored, B = left @ right.T (``left`` P x r, ``right`` Q x r), with r the
smaller of min(P, Q) (a dense B) and N (the dual form B = X_c^T A): for whole-brain images a
dense P x Q matrix would not fit in memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class CentredKernel:
    x_mean: np.ndarray   # (P,)
    y_mean: np.ndarray   # (Q,)
    xc: np.ndarray       # (N, P) centred inputs
    u: np.ndarray        # (N, N) eigenvectors of X_c X_c^T
    s: np.ndarray        # (N,) its eigenvalues (>= 0)
    uty: np.ndarray      # (N, Q) U^T Y_c

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray) -> "CentredKernel":
        x_mean, y_mean = x.mean(0), y.mean(0)
        xc = x - x_mean
        s, u = np.linalg.eigh(xc @ xc.T)
        return cls(x_mean, y_mean, xc, u, np.maximum(s, 0.0), u.T @ (y - y_mean))

    def dual_coef(self, alpha) -> np.ndarray:
        """A with B_alpha = X_c^T A, (N, Q); ``alpha`` a scalar or one penalty per target (Q,)."""
        alpha = np.asarray(alpha, dtype=np.float64)
        shrink = 1.0 / (self.s[:, None] + alpha) if alpha.ndim else (1.0 / (self.s + alpha))[:, None]
        return self.u @ (shrink * self.uty)

    def loo_errors(self, alpha: float) -> np.ndarray:
        """(Q,) sums over subjects of squared leave-one-out residuals of the ridge fit with ``alpha``."""
        ratio = self.s / (self.s + alpha)
        fitted = self.u @ (ratio[:, None] * self.uty)
        residual = self.u @ self.uty - fitted
        # hat matrix of the fit with its unpenalised intercept: 1 1^T / N + H_alpha (H_alpha 1 = 0)
        leverage = 1.0 / len(self.s) + (self.u ** 2) @ ratio
        return np.sum((residual / (1.0 - leverage)[:, None]) ** 2, axis=0)

    def kernel_rows(self, x_new: np.ndarray) -> np.ndarray:
        """(x_new - x_mean) X_c^T U: new subjects' kernel rows in the eigenbasis."""
        return ((x_new - self.x_mean) @ self.xc.T) @ self.u

    def rrr_directions(self, alpha: float, max_rank: int) -> np.ndarray:
        """(Q, max_rank): top right singular vectors of the augmented-data ridge fit (zero columns past its rank)."""
        w = np.sqrt(self.s / (self.s + alpha))[:, None] * self.uty       # (N, Q): W^T W is the Gram matrix
        lam, p = np.linalg.eigh(w @ w.T)
        order = np.argsort(lam)[::-1][:max_rank]
        sv = np.sqrt(np.maximum(lam[order], 0.0))
        keep = sv > 1e-10 * max(float(sv[0]) if len(sv) else 0.0, 1e-300)
        v = np.zeros((w.shape[1], len(order)))
        v[:, keep] = (w.T @ p[:, order[keep]]) / sv[keep]
        return v


def factored(xc: np.ndarray, dual: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """B = X_c^T dual, ``dual`` (N, Q), as the cheaper of a dense (P, Q) matrix (right None) or the
    factors (left = X_c^T, right = dual^T)."""
    n, p = xc.shape
    q = dual.shape[1]
    if p * q <= n * (p + q):
        return xc.T @ dual, None
    return xc.T, dual.T


@dataclass
class FactoredLinear:
    """y = (x - x_mean) @ B + y_mean with B = left @ right.T, or B = left when ``right`` is None.

    Stored in float32 (what is saved is exactly what predicts).
    """
    x_mean: np.ndarray
    y_mean: np.ndarray
    left: np.ndarray
    right: np.ndarray | None = None

    def __post_init__(self):
        self.x_mean = np.asarray(self.x_mean, dtype=np.float64)
        self.y_mean = np.asarray(self.y_mean, dtype=np.float64)
        self.left = np.asarray(self.left, dtype=np.float32)
        self.right = None if self.right is None else np.asarray(self.right, dtype=np.float32)

    def predict(self, x: np.ndarray) -> np.ndarray:
        out = (np.asarray(x, np.float64) - self.x_mean).astype(np.float32) @ self.left
        if self.right is not None:
            out = out @ self.right.T
        return out.astype(np.float64) + self.y_mean

    @property
    def coefficient(self) -> np.ndarray:
        """The dense (P, Q) coefficient (for tests and small problems)."""
        left = self.left.astype(np.float64)
        return left if self.right is None else left @ self.right.T.astype(np.float64)

    @property
    def rank_bound(self) -> int:
        return self.left.shape[1] if self.right is not None else min(self.left.shape)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"x_mean": self.x_mean, "y_mean": self.y_mean, "left": self.left}
        if self.right is not None:
            out["right"] = self.right
        return out

    @classmethod
    def from_arrays(cls, arrays) -> "FactoredLinear":
        return cls(arrays["x_mean"], arrays["y_mean"], arrays["left"], arrays.get("right"))
