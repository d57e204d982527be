"""Recalibration of predictive intervals on held-out (validation) subjects.

The raw predictive of a network trained to convergence is over-confident: the learned noise
scale shrinks on the training set (DESIGN.md). We fit, on validation subjects never used for
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

Missingness patterns (``patterns.py``): a subject lacking inputs gets the calibration of complete
subjects applied to ``s_p * sd``, where s_p (``pattern_scale``, by pattern label such as
``"no x2"``) is the ratio of the RMS standardised residual of validation subjects predicted with
pattern p imposed to that of the same subjects predicted complete: variance scaling per pattern
composed with the quantile recalibration.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats

N_QUANTILES = 1000


@dataclass
class Calibrator:
    method: str
    tau: float
    z_quantiles: np.ndarray     # Q((j + 0.5) / M), j = 0..M-1, sorted
    pattern_scale: dict[str, float] = field(default_factory=dict)  # missingness pattern -> s_p

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

    def z(self, prob: float) -> float:
        """Calibrated standardised quantile at ``prob``."""
        if self.method == "variance":
            return self.tau * float(stats.norm.ppf(prob))
        probs = (np.arange(N_QUANTILES) + 0.5) / N_QUANTILES
        return float(np.interp(prob, probs, self.z_quantiles))

    def interval(self, mean: np.ndarray, sd: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
        return mean + sd * self.z((1 - level) / 2), mean + sd * self.z((1 + level) / 2)

    def atoms(self) -> np.ndarray:
        """Equally weighted atoms of the calibrated standardised predictive Z (for CRPS)."""
        if self.method == "variance":
            return self.tau * stats.norm.ppf((np.arange(N_QUANTILES) + 0.5) / N_QUANTILES)
        return self.z_quantiles

    def to_dict(self) -> dict:
        return {"method": self.method, "tau": self.tau, "z_quantiles": self.z_quantiles.tolist(),
                "pattern_scale": dict(self.pattern_scale)}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibrator":
        return cls(method=d["method"], tau=float(d["tau"]), z_quantiles=np.asarray(d["z_quantiles"], dtype=float),
                   pattern_scale={str(k): float(v) for k, v in (d.get("pattern_scale") or {}).items()})
