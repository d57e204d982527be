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

Groups (sites, scanners; ``groups``, one label per validation subject): each group g gets its own
quantile function Q_g and scale tau_g, shrunk towards the pooled ones by w_g = n_g / (n_g + n0), the
pooled ones alone below a minimum number of subjects and for a group the calibration never saw
(``conformal.py``). A subject of group g lacking inputs uses Q_p times tau_g / tau: the site scales its
errors, the pattern shapes them.

``coverage_confidence`` c: intervals whose coverage is at least nominal with probability c over the draw
of the validation subjects (training-conditional conformal; ``conformal.py``). It widens the intervals
only: the sd map, CRPS, PIT and draws still describe the calibrated predictive.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from scipy import stats

from .conformal import (GROUP_SPREAD, MIN_GROUP_SUBJECTS, N_QUANTILES, PROBS, beta_level, bootstrap_level, bootstrap_t,
                        group_quantiles, order_statistic_level, quantile_function, subject_cdf)

__all__ = ["N_QUANTILES", "Calibrator", "calibration_options", "central_probs", "level_tag"]


def level_tag(level: float) -> str:
    """0.9 -> '90', 0.95 -> '95', 0.5 -> '50' (file-name suffix of a central interval)."""
    return format(round(level * 100, 6), "g")


def central_probs(levels: list[float]) -> list[float]:
    """The probabilities of the ends of the central intervals at ``levels``, sorted."""
    return sorted({p for lv in levels for p in ((1 - lv) / 2, (1 + lv) / 2)})


def calibration_options(prediction_config) -> dict:
    """The keyword arguments of ``Calibrator.fit`` and ``fit_spatial_covariance`` that the ``[prediction]``
    table sets: ``confidence``, ``group_spread``, ``group_min_subjects``."""
    return {"confidence": prediction_config.coverage_confidence, "group_spread": prediction_config.group_spread,
            "group_min_subjects": prediction_config.group_min_subjects}


def _per_row(values: list[float], ndim: int) -> np.ndarray:
    """A column of per-row values that broadcasts against (n,) or (n, V) arrays."""
    return np.asarray(values, dtype=np.float64).reshape((-1,) + (1,) * max(ndim - 1, 0))


@dataclass
class Calibrator:
    method: str
    tau: float
    z_quantiles: np.ndarray     # Q((j + 0.5) / M), j = 0..M-1, sorted
    pattern_scale: dict[str, float] = field(default_factory=dict)  # missingness pattern -> s_p
    pattern_quantiles: dict[str, np.ndarray] = field(default_factory=dict)  # pattern -> Q_p (units of s_p sd)
    group_quantiles: dict[str, np.ndarray] = field(default_factory=dict)    # group -> shrunk Q_g
    group_tau: dict[str, float] = field(default_factory=dict)               # group -> shrunk tau_g
    group_info: dict[str, dict] = field(default_factory=dict)  # group -> weight, subjects, effective_subjects
    n_subjects: int = 0           # validation subjects fitted (0: a calibration from before it was kept)
    n_scores: int = 0             # their finite standardised residuals
    coverage_sd: np.ndarray | None = None   # (M/2,) sd of per-subject coverage per candidate level (conformal.py)
    t_quantiles: np.ndarray | None = None   # (T, M/2) its bootstrap-t quantiles (None: one score per subject)
    coverage_confidence: float | None = None

    def row_scale(self, patterns: list[str] | None, n: int) -> np.ndarray:
        """(n, 1) multipliers of the raw sd: s_p of each subject's pattern (1 for complete subjects)."""
        if patterns is None:
            return np.ones((n, 1))
        return np.array([self.pattern_scale.get(p, 1.0) for p in patterns], dtype=np.float64)[:, None]

    @classmethod
    def fit(cls, observed: np.ndarray, mean: np.ndarray, sd: np.ndarray, method: str = "quantile", groups=None, *,
            confidence: float | None = None, group_spread: float = GROUP_SPREAD,
            group_min_subjects: int = MIN_GROUP_SUBJECTS) -> "Calibrator":
        """Fit on validation subjects: arrays (n, V) (or (n,), one value per subject); ``groups``: a label per
        subject (site), or None; ``confidence``: ``coverage_confidence`` (None: intervals right on average)."""
        z = np.asarray((observed - mean) / sd, dtype=np.float64)
        rows = z.reshape(len(z), -1)
        finite = np.isfinite(rows)
        quantiles = quantile_function(z)
        tau = float(np.sqrt(np.mean(z[np.isfinite(z)] ** 2)))
        calibrator = cls(method=method, tau=tau, z_quantiles=quantiles, n_subjects=int(finite.any(1).sum()),
                         n_scores=int(finite.sum()))
        if finite.sum(1).max(initial=0) > 1 and calibrator.n_subjects > 1:   # many scores per subject
            calibrator.coverage_sd, calibrator.t_quantiles = bootstrap_t(subject_cdf(rows, quantiles), quantiles)
        if groups is not None:
            for label, g in group_quantiles(rows, groups, quantiles, spread=group_spread,
                                            min_subjects=group_min_subjects).items():
                calibrator.group_info[label] = {k: v for k, v in g.items() if k != "quantiles"}
                if g["weight"] > 0:
                    own = rows[np.asarray([str(v) for v in groups]) == label]
                    own_square = float(np.mean(own[np.isfinite(own)] ** 2))
                    calibrator.group_quantiles[label] = g["quantiles"]
                    shrunk_square = g["weight"] * own_square + (1 - g["weight"]) * tau ** 2
                    calibrator.group_tau[label] = float(np.sqrt(shrunk_square))
        return calibrator.with_confidence(confidence)

    def with_confidence(self, confidence: float | None) -> "Calibrator":
        """This calibration with intervals at ``coverage_confidence`` (None: right on average)."""
        if confidence is not None:
            if not 0.5 <= confidence <= 0.99:
                raise ValueError(f"coverage_confidence must be between 0.5 and 0.99, got {confidence}")
            if self.n_subjects < 2:
                raise ValueError("coverage_confidence needs a calibration that kept its number of validation "
                                 "subjects (refit with this version)")
        return replace(self, coverage_confidence=confidence)

    def sd(self, sd: np.ndarray, groups: list[str] | None = None) -> np.ndarray:
        """The calibrated sd: tau * sd, or tau_g * sd per row with ``groups``."""
        if groups is None or not self.group_tau:
            return self.tau * sd
        return _per_row([self.group_tau.get(g, self.tau) for g in groups], np.ndim(sd)) * sd

    def central_level(self, level: float, group: str | None = None) -> float:
        """The central level of the quantile function whose interval is reported at ``level``: ``level``
        itself, or with ``coverage_confidence`` the narrowest that holds with that probability."""
        if self.coverage_confidence is None or self.n_subjects < 2:
            return level
        grouped = group in self.group_quantiles
        n = self.group_info[group]["effective_subjects"] if grouped else self.n_subjects
        if self.t_quantiles is not None:
            return bootstrap_level(level, self.coverage_confidence, n, self.coverage_sd, self.t_quantiles)[0]
        if grouped:
            return beta_level(level, self.coverage_confidence, n)[0]
        return order_statistic_level(level, self.coverage_confidence, self.n_subjects)[0]

    def z(self, prob: float, pattern: str | None = None, group: str | None = None) -> float:
        """Calibrated standardised quantile at ``prob`` (of the missingness ``pattern``'s subjects, of ``group``)."""
        if self.method == "variance":
            return self.group_tau.get(group, self.tau) * float(stats.norm.ppf(prob))
        return float(np.interp(prob, PROBS, self.atoms(pattern, group)))

    def interval_z(self, level: float, pattern: str | None = None, group: str | None = None) -> tuple[float, float]:
        """Standardised ends of the central ``level`` interval of a row with ``pattern`` and ``group``."""
        p = self.central_level(level, group)
        return self.z((1 - p) / 2, pattern, group), self.z((1 + p) / 2, pattern, group)

    def interval(self, mean: np.ndarray, sd: np.ndarray, level: float, patterns: list[str] | None = None,
                 groups: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Central ``level`` interval; ``patterns`` and ``groups`` (one per row) pick each row's quantile function."""
        patterns = None if not self.pattern_quantiles or self.method == "variance" else patterns
        groups = groups if self.group_quantiles else None
        if patterns is None and groups is None:
            z_lo, z_hi = self.interval_z(level)
            return mean + sd * z_lo, mean + sd * z_hi
        n = len(patterns if patterns is not None else groups)
        keys = list(zip(patterns or [None] * n, groups or [None] * n))
        ends = {key: self.interval_z(level, *key) for key in dict.fromkeys(keys)}
        z_lo, z_hi = (_per_row([ends[key][side] for key in keys], np.ndim(mean)) for side in (0, 1))
        return mean + sd * z_lo, mean + sd * z_hi

    def atoms(self, pattern: str | None = None, group: str | None = None) -> np.ndarray:
        """Equally weighted atoms of the calibrated standardised predictive Z (for CRPS)."""
        if self.method == "variance":
            return self.group_tau.get(group, self.tau) * stats.norm.ppf(PROBS)
        if pattern and pattern in self.pattern_quantiles:
            return self.pattern_quantiles[pattern] * (self.group_tau.get(group, self.tau) / self.tau)
        return self.group_quantiles.get(group, self.z_quantiles) if group is not None else self.z_quantiles

    def row_atoms(self, patterns: list[str] | None, n: int, groups: list[str] | None = None) -> np.ndarray:
        """(n, M) atoms of each row's pattern and group ((1, M) when every row shares one)."""
        patterns = patterns if self.pattern_quantiles else None
        groups = groups if self.group_quantiles else None
        if patterns is None and groups is None:
            return self.atoms()[None]
        return np.stack([self.atoms(p, g) for p, g in zip(patterns or [None] * n, groups or [None] * n)])

    def sample_z(self, rng: np.random.Generator, shape: tuple[int, ...], patterns: list[str] | None = None,
                 groups: list[str] | None = None):
        """Draws of Z of the given shape (..., n, V), each row from its pattern's and group's calibrated predictive."""
        table = self.row_atoms(patterns, shape[-2], groups)
        index = rng.integers(0, table.shape[1], size=shape)
        if len(table) == 1:
            return table[0][index]
        return table[np.arange(shape[-2])[:, None], index]

    def to_dict(self) -> dict:
        return {"method": self.method, "tau": self.tau, "z_quantiles": self.z_quantiles.tolist(),
                "pattern_scale": dict(self.pattern_scale),
                "pattern_quantiles": {k: v.tolist() for k, v in self.pattern_quantiles.items()},
                "group_quantiles": {k: v.tolist() for k, v in self.group_quantiles.items()},
                "group_tau": dict(self.group_tau), "group_info": {k: dict(v) for k, v in self.group_info.items()},
                "n_subjects": self.n_subjects, "n_scores": self.n_scores,
                "coverage_sd": None if self.coverage_sd is None else np.round(self.coverage_sd, 5).tolist(),
                "t_quantiles": None if self.t_quantiles is None else np.round(self.t_quantiles, 3).tolist(),
                "coverage_confidence": self.coverage_confidence}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibrator":
        # calibrations from before the per-pattern quantiles have scales only (Q of complete subjects);
        # from before groups and coverage_confidence, none of those keys (pooled, intervals right on average)
        arrays = lambda key: {str(k): np.asarray(v, dtype=float) for k, v in (d.get(key) or {}).items()}  # noqa: E731
        return cls(method=d["method"], tau=float(d["tau"]), z_quantiles=np.asarray(d["z_quantiles"], dtype=float),
                   pattern_scale={str(k): float(v) for k, v in (d.get("pattern_scale") or {}).items()},
                   pattern_quantiles=arrays("pattern_quantiles"), group_quantiles=arrays("group_quantiles"),
                   group_tau={str(k): float(v) for k, v in (d.get("group_tau") or {}).items()},
                   group_info={str(k): dict(v) for k, v in (d.get("group_info") or {}).items()},
                   n_subjects=int(d.get("n_subjects", 0)), n_scores=int(d.get("n_scores", 0)),
                   coverage_sd=None if d.get("coverage_sd") is None else np.asarray(d["coverage_sd"], dtype=float),
                   t_quantiles=None if d.get("t_quantiles") is None else np.asarray(d["t_quantiles"], dtype=float),
                   coverage_confidence=d.get("coverage_confidence"))
