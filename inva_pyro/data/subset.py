"""Some subjects' data as matrices: what every later stage (preprocessing, training, prediction) reads.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd


@dataclass
class Subset:
    """Some subjects' data as matrices, one row per subject (in ``subjects`` order).

    ``inputs``: name -> (n, V_k) float32; ``outcome``: (n, V_y) float32 or None (at
    predict time); ``truth_mean``/``truth_sd``: the known true outcome mean and sd
    (simulated cohorts) or None; ``covariates``: numeric columns indexed by subject, or None.
    ``outcome_name`` names the outcome image, and ``spaces`` gives the feature space of each input and
    of the outcome by name (empty when they are not known): a model fitted on the subset records both,
    so that its predictions are written as files of the outcome's kind. ``conditions``: the covariates a
    model fitted on the subset conditions on (raw cells, text allowed, NaN where empty), and ``sites``: the
    site (scanner, centre) of each subject, named by its column; both None when a fit is to ignore them.
    """

    subjects: list[str]
    inputs: dict[str, np.ndarray]
    outcome: np.ndarray | None = None
    truth_mean: np.ndarray | None = None
    truth_sd: np.ndarray | None = None
    covariates: pd.DataFrame | None = None
    outcome_name: str | None = None
    spaces: dict = field(default_factory=dict)
    conditions: pd.DataFrame | None = None
    sites: pd.Series | None = None

    def __len__(self) -> int:
        return len(self.subjects)

    @property
    def outcome_space(self):
        """The outcome's feature space, or None when it is not known."""
        return self.spaces.get(self.outcome_name) if self.outcome_name is not None else None

    def subset(self, indices: Sequence[int] | np.ndarray) -> "Subset":
        """A new Subset with the rows at ``indices`` (positions, or a boolean mask)."""
        idx = np.asarray(indices)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64)

        def rows(array: np.ndarray | None) -> np.ndarray | None:
            return None if array is None else array[idx]

        return dataclasses.replace(
            self,
            subjects=[self.subjects[i] for i in idx],
            inputs={name: array[idx] for name, array in self.inputs.items()},
            outcome=rows(self.outcome),
            truth_mean=rows(self.truth_mean),
            truth_sd=rows(self.truth_sd),
            covariates=None if self.covariates is None else self.covariates.iloc[idx],
            conditions=None if self.conditions is None else self.conditions.iloc[idx],
            sites=None if self.sites is None else self.sites.iloc[idx],
        )
