"""Region means of a prediction with calibrated intervals: the ``regions.csv`` table (``Prediction.regions``).

Region means are the plain averages of the region's features; their predictive comes from the outcome's
spatial covariance (``spatial.py``): mean, sd and intervals mean_R + sd_R Q(p) with the region
calibration's size-matched quantiles Q. A row ``all`` is the whole mask.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import InputError
from .calibration import level_tag
from .spatial import label_weights


def with_whole_mask(labels: np.ndarray):
    """(region names, (L + 1, V) weights): the labels' regions and ``all``, the whole mask."""
    from scipy import sparse
    ids, weights = label_weights(labels)
    n = np.asarray(labels).size
    whole = sparse.csr_matrix(np.full((1, n), 1.0 / n))
    return ids + ["all"], sparse.vstack([weights, whole]).tocsr()


def region_summary(prediction, labels) -> tuple[list, np.ndarray, np.ndarray, np.ndarray | None, object]:
    """(region ids + 'all', means (n, L), sds (n, L), observed means or None, weights)."""
    covariance = prediction.spatial_covariance
    if covariance is None:
        raise InputError("region intervals need a run fitted with the spatial covariance (covariance.safetensors); "
                         "refit it with this version")
    labels = np.asarray(labels)
    if labels.shape != (prediction.mean.shape[1],):
        raise ValueError(f"labels must be a vector of {prediction.mean.shape[1]} features, got {labels.shape}")
    regions, weights = with_whole_mask(labels)
    mean, sd = covariance.region_moments(prediction.mean, prediction.raw_sd, weights)
    observed = None if prediction.observed is None else np.asarray(weights @ np.asarray(prediction.observed,
                                                                                       dtype=np.float64).T).T
    return regions, mean, sd, observed, weights


def region_interval(covariance, mean, sd, weights, level: float, groups=None) -> tuple[np.ndarray, np.ndarray]:
    """Central ``level`` intervals (n, L) of region means, with each region's size-matched quantiles (of each
    subject's group, ``groups``: a label per row, where the calibration has groups)."""
    fractions = weights.getnnz(axis=1) / weights.shape[1]
    z_lo, z_hi = covariance.interval_z(level, fractions, groups)
    return mean + sd * z_lo, mean + sd * z_hi


def region_table(prediction, labels, levels, names: dict | None = None) -> pd.DataFrame:
    """One row per subject and region (labels > 0, then ``all``): subject, region, mean, sd, lo{P}, hi{P}."""
    regions, mean, sd, _, weights = region_summary(prediction, labels)
    names = names or {}
    n, n_regions = mean.shape
    frame = {"subject": np.repeat(np.asarray(prediction.subjects, dtype=object), n_regions),
             "region": np.tile(np.asarray([names.get(r, str(r)) for r in regions], dtype=object), n),
             "mean": mean.ravel(), "sd": sd.ravel()}
    for lv in sorted(levels):
        lo, hi = region_interval(prediction.spatial_covariance, mean, sd, weights, lv,
                                 getattr(prediction, "groups", None))
        frame[f"lo{level_tag(lv)}"], frame[f"hi{level_tag(lv)}"] = lo.ravel(), hi.ravel()
    return pd.DataFrame(frame)
