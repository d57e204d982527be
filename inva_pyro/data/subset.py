"""Some subjects' data as matrices: what every later stage (preprocessing, training, prediction) reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd


@dataclass
class Subset:
    """Some subjects' data as matrices, one row per subject (in ``subjects`` order).

    ``inputs``: name -> (n, V_k) float32; ``outcome``: (n, V_y) float32 or None (at
    predict time); ``truth_mean``/``truth_sd``: the known true outcome mean and sd
    (simulated cohorts) or None; ``covariates``: numeric columns indexed by subject, or None.
    """

    subjects: list[str]
    inputs: dict[str, np.ndarray]
    outcome: np.ndarray | None = None
    truth_mean: np.ndarray | None = None
    truth_sd: np.ndarray | None = None
    covariates: pd.DataFrame | None = None

    def __len__(self) -> int:
        return len(self.subjects)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "Subset":
        """A new Subset with the rows at ``indices`` (positions, or a boolean mask)."""
        idx = np.asarray(indices)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64)

        def rows(array: np.ndarray | None) -> np.ndarray | None:
            return None if array is None else array[idx]

        return Subset(
            subjects=[self.subjects[i] for i in idx],
            inputs={name: array[idx] for name, array in self.inputs.items()},
            outcome=rows(self.outcome),
            truth_mean=rows(self.truth_mean),
            truth_sd=rows(self.truth_sd),
            covariates=None if self.covariates is None else self.covariates.iloc[idx],
        )
