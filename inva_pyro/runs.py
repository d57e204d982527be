"""What every model family's run folder shares: the format marker, recorded versions, the hold-out rule."""
from __future__ import annotations

import platform
from importlib import metadata

import numpy as np

from .data.cohort import Subset
from .errors import InputError

RUN_FORMAT = "inva-pyro-run/1"


def package_versions(names) -> dict[str, str]:
    """Installed versions of ``names`` (and Python), for run.json: a run records what made it."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def holdout(subset: Subset, share: float, seed: int) -> tuple[Subset, Subset]:
    """Seeded split of ``subset`` into (train, held-out share) for early stopping and calibration.

    The held-out subjects are drawn from those with the outcome (all of them in a complete cohort);
    subjects without it stay in train."""
    from .data.missing import outcome_presence
    labeled = np.flatnonzero(outcome_presence(subset))
    if len(labeled) == 0:
        labeled = np.arange(len(subset))
    order = labeled[np.random.default_rng(seed).permutation(len(labeled))]
    n_val = max(1, int(round(share * len(labeled))))
    rest = np.setdiff1d(np.arange(len(subset)), order[:n_val])
    return subset.subset(rest), subset.subset(np.sort(order[:n_val]))


def calibration_split(val: Subset, share: float, seed: int, min_each: int = 2) -> tuple[Subset, Subset]:
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
