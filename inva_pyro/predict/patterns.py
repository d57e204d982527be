"""Calibration per missingness pattern, on validation subjects (``calibration.py``).

A joint model predicts a subject from whatever inputs it has; its intervals must stay calibrated for
every pattern of inputs, not only on average. Validation subjects with every input are predicted
once complete (which fits the pooled quantile calibrator) and once per pattern p of the inputs
(every non-empty proper subset), the inputs outside p removed; s_p = RMS z_p / RMS z_complete of
the standardised residuals z = (y - mean) / sd, and Q_p the quantile function of z_p / s_p (the
pattern's own shape of errors: ``calibration.py``). This assumes that which inputs a subject lacks does
not depend on its outcome given its inputs (missing at random), the assumption of the ELBO's masks too.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from .calibration import N_QUANTILES, Calibrator
from .predictive import posterior_predictive
from ..data.missing import MIN_LABELED_VAL, missingness_patterns


def proper_patterns(n_inputs: int) -> list[tuple[bool, ...]]:
    """Every non-empty proper subset of the inputs, as presence tuples."""
    return [p for p in itertools.product([True, False], repeat=n_inputs) if any(p) and not all(p)]


def impose(xs: list[torch.Tensor], pattern) -> list[torch.Tensor]:
    """The inputs with those outside ``pattern`` removed (rows of NaN, ``data/missing.py``)."""
    return [x if keep else torch.full_like(x, float("nan")) for x, keep in zip(xs, pattern)]


def calibrate(module, val_xs: list[torch.Tensor], val_y: torch.Tensor, names: list[str], *, num_samples: int,
              method: str, generator: torch.Generator, summary=None, conditions=None, groups=None,
              **options) -> Calibrator:
    """The pooled calibrator of the complete validation subjects, with s_p and Q_p per pattern (joint models);
    without enough complete subjects, or for a model that needs every input, the pooled calibrator of all
    (from ``summary``, the raw predictive of all of ``val_xs``, when the caller has it already).
    ``groups`` (a label per validation subject, e.g. its site) and ``options`` (``confidence``,
    ``group_spread``, ``group_min_subjects``: ``calibration.calibration_options``) go to ``Calibrator.fit``."""
    present = torch.stack([~torch.isnan(x).all(-1) for x in val_xs], dim=-1)
    complete = present.all(-1).cpu().numpy()
    joint = getattr(module, "joint", False)
    if not joint or complete.sum() < MIN_LABELED_VAL:
        if summary is None:
            summary = posterior_predictive(module, val_xs, num_samples=num_samples, probs=[], generator=generator,
                                           conditions=conditions)
        return Calibrator.fit(val_y.cpu().numpy(), summary.mean, summary.sd, method, groups, **options)
    rows = torch.as_tensor(np.flatnonzero(complete), device=val_y.device)
    xs, y = [x[rows] for x in val_xs], val_y[rows].cpu().numpy()
    conditions = None if conditions is None else conditions.rows(rows)
    groups = None if groups is None else list(np.asarray(list(groups), dtype=object)[complete])

    def z(inputs):
        summary = posterior_predictive(module, inputs, num_samples=num_samples, probs=[], generator=generator,
                                       conditions=conditions)
        return summary, (y - summary.mean) / summary.sd

    reference, z_ref = z(xs)
    calibrator = Calibrator.fit(y, reference.mean, reference.sd, method, groups, **options)
    for pattern in proper_patterns(len(xs)):
        label = missingness_patterns(np.array([pattern]), names)[0]
        scale, quantiles = pattern_fit(z_ref, z(impose(xs, pattern))[1])
        calibrator.pattern_scale[label], calibrator.pattern_quantiles[label] = scale, quantiles
    return calibrator


def pattern_fit(z_complete: np.ndarray, z_pattern: np.ndarray) -> tuple[float, np.ndarray]:
    """(s_p, Q_p) from the standardised residuals of the same subjects predicted complete and with
    pattern p imposed: the RMS ratio, and the quantile function of z_p / s_p (``calibration.py``)."""
    z_complete, z_pattern = (np.asarray(z, dtype=np.float64).ravel() for z in (z_complete, z_pattern))
    z_complete, z_pattern = z_complete[np.isfinite(z_complete)], z_pattern[np.isfinite(z_pattern)]
    scale = float(np.sqrt(np.mean(z_pattern ** 2) / np.mean(z_complete ** 2)))
    return scale, np.quantile(z_pattern / scale, (np.arange(N_QUANTILES) + 0.5) / N_QUANTILES)
