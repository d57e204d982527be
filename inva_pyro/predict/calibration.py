"""Recalibration of predictive intervals on held-out (validation) subjects.

The raw predictive of a network trained to convergence is over-confident: the learned noise
scale shrinks on the training set (docs/design.md). We fit, on validation subjects never used for
gradient steps, the distribution of standardised residuals z = (y - mean) / sd pooled over
subjects and voxels, and keep its quantile function Q on a grid of M probabilities.

- ``quantile`` (default): the calibrated predictive is Y = mean + sd * Z with Z ~ Q, i.e. quantile
  recalibration (Kuleshov et al., 2018) of a location-scale family. The central P interval is
  [mean + sd Q((1-P)/2), mean + sd Q((1+P)/2)]; it corrects both the width and the shape (tails,
  skew) of the raw intervals. With n_val exchangeable subjects this is split-conformal with
  normalised scores, up to pooling voxels within subjects.
- ``variance``: Gaussian intervals with sd scaled by tau = sqrt(mean z^2) (variance scaling).
- ``none``: the raw sample quantiles.
In every mode the calibrated sd map is tau * sd, so that E[(y - mean)^2] = sd_cal^2 on validation.

Missingness patterns (``patterns.py``): a subject lacking inputs has its own calibration, fitted on
the validation subjects predicted with that pattern p imposed (``pattern_scale`` s_p and
``pattern_quantiles`` Q_p, by pattern label such as ``"no x2"``): its sd is scaled by s_p, the ratio
of the RMS standardised residual under p to that of the same subjects predicted complete, and its
intervals use Q_p, the quantile function of those residuals in units of s_p * sd. A pattern changes
the shape of the errors as well as their size (with an input gone, a subject-level misjudgement the
input would have corrected spreads over the whole image: heavier tails), so one scale per pattern
over- or under-covers at some levels; Q_p is split-conformal per pattern (Mondrian).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats

N_QUANTILES = 1000


def level_tag(level: float) -> str:
    """0.9 -> '90', 0.95 -> '95', 0.5 -> '50' (file-name suffix of a central interval)."""
    return format(round(level * 100, 6), "g")


def central_probs(levels: list[float]) -> list[float]:
    """The probabilities of the ends of the central intervals at ``levels``, sorted."""
    return sorted({p for lv in levels for p in ((1 - lv) / 2, (1 + lv) / 2)})


@dataclass
class Calibrator:
    method: str
    tau: float
    z_quantiles: np.ndarray     # Q((j + 0.5) / M), j = 0..M-1, sorted
    pattern_scale: dict[str, float] = field(default_factory=dict)  # missingness pattern -> s_p
    pattern_quantiles: dict[str, np.ndarray] = field(default_factory=dict)  # pattern -> Q_p (units of s_p sd)

    def row_scale(self, patterns: list[str] | None, n: int) -> np.ndarray:
        """(n, 1) multipliers of the raw sd: s_p of each subject's pattern (1 for complete subjects)."""
        if patterns is None:
            return np.ones((n, 1))
        return np.array([self.pattern_scale.get(p, 1.0) for p in patterns], dtype=np.float64)[:, None]

    @classmethod
    def fit(cls, observed: np.ndarray, mean: np.ndarray, sd: np.ndarray, method: str = "quantile") -> "Calibrator":
        z = ((observed - mean) / sd).ravel()
        z = z[np.isfinite(z)]
        probs = (np.arange(N_QUANTILES) + 0.5) / N_QUANTILES
        return cls(method=method, tau=float(np.sqrt(np.mean(z ** 2))), z_quantiles=np.quantile(z, probs))

    def sd(self, sd: np.ndarray) -> np.ndarray:
        return self.tau * sd

    def z(self, prob: float, pattern: str | None = None) -> float:
        """Calibrated standardised quantile at ``prob`` (of the missingness ``pattern``'s subjects)."""
        if self.method == "variance":
            return self.tau * float(stats.norm.ppf(prob))
        probs = (np.arange(N_QUANTILES) + 0.5) / N_QUANTILES
        return float(np.interp(prob, probs, self.atoms(pattern)))

    def interval(self, mean: np.ndarray, sd: np.ndarray, level: float,
                 patterns: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Central ``level`` interval; ``patterns`` (one per row) picks each row's quantile function."""
        lo, hi = (1 - level) / 2, (1 + level) / 2
        if patterns is None or not self.pattern_quantiles or self.method == "variance":
            return mean + sd * self.z(lo), mean + sd * self.z(hi)
        z_lo, z_hi = (np.array([self.z(p, pattern) for pattern in patterns])[:, None] for p in (lo, hi))
        return mean + sd * z_lo, mean + sd * z_hi

    def atoms(self, pattern: str | None = None) -> np.ndarray:
        """Equally weighted atoms of the calibrated standardised predictive Z (for CRPS)."""
        if self.method == "variance":
            return self.tau * stats.norm.ppf((np.arange(N_QUANTILES) + 0.5) / N_QUANTILES)
        return self.pattern_quantiles.get(pattern, self.z_quantiles) if pattern else self.z_quantiles

    def row_atoms(self, patterns: list[str] | None, n: int) -> np.ndarray:
        """(n, M) atoms of each row's pattern ((1, M) when every row shares one)."""
        if patterns is None or not self.pattern_quantiles:
            return self.atoms()[None]
        return np.stack([self.atoms(p) for p in patterns])

    def sample_z(self, rng: np.random.Generator, shape: tuple[int, ...], patterns: list[str] | None = None):
        """Draws of Z of the given shape (..., n, V), each row from its pattern's calibrated predictive."""
        table = self.row_atoms(patterns, shape[-2])
        index = rng.integers(0, table.shape[1], size=shape)
        if len(table) == 1:
            return table[0][index]
        return table[np.arange(shape[-2])[:, None], index]

    def to_dict(self) -> dict:
        return {"method": self.method, "tau": self.tau, "z_quantiles": self.z_quantiles.tolist(),
                "pattern_scale": dict(self.pattern_scale),
                "pattern_quantiles": {k: v.tolist() for k, v in self.pattern_quantiles.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibrator":
        return cls(method=d["method"], tau=float(d["tau"]), z_quantiles=np.asarray(d["z_quantiles"], dtype=float),
                   pattern_scale={str(k): float(v) for k, v in (d.get("pattern_scale") or {}).items()},
                   # runs from before the per-pattern quantiles have scales only (Q of complete subjects)
                   pattern_quantiles={str(k): np.asarray(v, dtype=float)
                                      for k, v in (d.get("pattern_quantiles") or {}).items()})
