"""Which subjects train, which stop training early and calibrate, which are predicted: seeded splits.

Validation subjects are drawn from those with the outcome (early stopping and calibration need it);
subjects without it all stay in train. The same seed always gives the same split.
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError
from .manifest import SPLITS
from .missing import outcome_presence


def split_indices(split: list[str] | None, n: int, seed: int, val_fraction: float,
                   labeled: np.ndarray) -> dict[str, np.ndarray]:
    """Validation subjects held out by seed are drawn from those with the outcome (``labeled``):
    early stopping and calibration need it; subjects without it all stay in train."""
    everyone = np.arange(n)
    if split is None:
        train, val = _labeled_holdout(everyone, labeled, seed, val_fraction)
        return {"train": train, "val": val, "test": everyone}
    labels = np.asarray(split)
    indices = {name: everyone[labels == name] for name in SPLITS}
    if len(indices["val"]) == 0:
        indices["train"], indices["val"] = _labeled_holdout(indices["train"], labeled, seed, val_fraction)
    return indices


def _labeled_holdout(indices: np.ndarray, labeled: np.ndarray, seed: int,
                     fraction: float) -> tuple[np.ndarray, np.ndarray]:
    if labeled.all() or not labeled.any():
        return _holdout(indices, seed, fraction)
    with_outcome = labeled[indices]
    train, val = _holdout(indices[with_outcome], seed, fraction)
    return np.sort(np.concatenate([train, indices[~with_outcome]])), val


def _holdout(indices: np.ndarray, seed: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, val) split of ``indices``: val gets ``fraction`` of them (rounded), at
    least one when there are two or more and ``fraction`` > 0, and train keeps at least one."""
    n = len(indices)
    n_val = min(max(int(round(fraction * n)), 1), n - 1) if n >= 2 and fraction > 0 else 0
    chosen = np.random.default_rng(seed).permutation(n)[:n_val]
    is_val = np.zeros(n, dtype=bool)
    is_val[chosen] = True
    return indices[~is_val], indices[is_val]


def holdout(subset, share: float, seed: int):
    """Seeded split of ``subset`` into (train, held-out share) for early stopping and calibration, when
    ``fit`` is given no validation subjects: the held-out ones are drawn from those with the outcome (all
    of them in a complete cohort); subjects without it stay in train."""
    labeled = np.flatnonzero(outcome_presence(subset))
    if len(labeled) == 0:
        labeled = np.arange(len(subset))
    order = labeled[np.random.default_rng(seed).permutation(len(labeled))]
    n_val = max(1, int(round(share * len(labeled))))
    rest = np.setdiff1d(np.arange(len(subset)), order[:n_val])
    return subset.subset(rest), subset.subset(np.sort(order[:n_val]))


def calibration_split(val, share: float, seed: int, min_each: int = 2):
    """(early-stopping subjects, calibration subjects) of the labeled validation subjects ``val``:
    both ``val`` itself when ``share`` is 0, else a seeded split with ``share`` of them for calibration."""
    if share <= 0:
        return val, val
    n = len(val)
    n_cal = int(round(share * n))
    if min(n_cal, n - n_cal) < min_each:
        raise InputError(f"{n} validation subjects with the outcome: calibration_share {share} leaves {n - n_cal} for "
                         f"early stopping and {n_cal} for calibration; each needs at least {min_each}")
    order = np.random.default_rng([seed, 7]).permutation(n)
    return val.subset(np.sort(order[n_cal:])), val.subset(np.sort(order[:n_cal]))
