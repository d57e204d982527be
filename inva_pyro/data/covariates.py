"""Covariates and sites as the model sees them.

A fit may condition on covariates (``inva fit --covariates age,sex,apoe4``) and on a site, the scanner or
centre a subject was imaged at (``--site site``). ``CovariateEncoder`` turns the covariate columns into
numbers with what it learnt from the training subjects: a numeric column is standardised with their mean
and sd, a text column becomes one indicator per level they showed (one-hot). An empty cell is a covariate
not acquired: it stays NaN here, and the Pyro program imputes it with its learned prior (model/module.py).
``SiteLevels`` numbers the training sites; a site training never saw (or an empty cell) gets -1, which the
program reads as the pooled site. Both are saved in the run folder (``covariates.json``), so that new
subjects are encoded exactly as the training subjects were.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import InputError

NUMERIC, CATEGORICAL = "numeric", "categorical"


def is_numeric(values: pd.Series) -> bool:
    """Whether every non-empty cell of a column reads as a number."""
    present = values.dropna()
    if present.empty:
        return False
    try:
        pd.to_numeric(present)
    except (ValueError, TypeError):
        return False
    return True


@dataclass
class CovariateEncoder:
    """Numeric columns standardised, text columns one-hot over the training levels (see the module docstring).

    ``columns``: one dict per covariate, in order: ``{"name", "kind": "numeric", "mean", "sd"}`` or
    ``{"name", "kind": "categorical", "levels": [...]}``."""

    columns: list[dict] = field(default_factory=list)

    @classmethod
    def fit(cls, frame: pd.DataFrame, where: str = "covariates") -> "CovariateEncoder":
        columns = []
        for name in frame.columns:
            values = frame[name]
            if values.dropna().empty:
                raise InputError(f"{where}: covariate '{name}' is empty for every training subject")
            if is_numeric(values):
                numbers = pd.to_numeric(values).astype(np.float64)
                sd = float(numbers.std(ddof=0))
                columns.append({"name": name, "kind": NUMERIC, "mean": float(numbers.mean()),
                                "sd": sd if sd > 0 else 1.0})
            else:
                levels = sorted({str(v) for v in values.dropna()})
                columns.append({"name": name, "kind": CATEGORICAL, "levels": levels})
        return cls(columns)

    @property
    def names(self) -> list[str]:
        return [c["name"] for c in self.columns]

    def widths(self) -> list[int]:
        """Encoded width of each covariate: 1 for a numeric one, its number of levels for a categorical one."""
        return [1 if c["kind"] == NUMERIC else len(c["levels"]) for c in self.columns]

    def spec(self) -> list[tuple[str, str, int]]:
        """(name, kind, width) per covariate: what the Pyro program needs to build its priors."""
        return [(c["name"], c["kind"], w) for c, w in zip(self.columns, self.widths())]

    def transform(self, frame: pd.DataFrame, where: str = "covariates") -> np.ndarray:
        """(n, sum of widths) float32: the encoded covariates, NaN where a cell is empty."""
        missing = [name for name in self.names if name not in frame.columns]
        if missing:
            raise InputError(f"{where}: no covariate column {', '.join(repr(m) for m in missing)} (the run was "
                             f"fitted with covariates {', '.join(self.names)})")
        parts = []
        for column in self.columns:
            values = frame[column["name"]]
            if column["kind"] == NUMERIC:
                parts.append(self._numeric(values, column, where)[:, None])
            else:
                parts.append(self._one_hot(values, column, frame.index, where))
        return np.concatenate(parts, axis=1).astype(np.float32) if parts else np.zeros((len(frame), 0), np.float32)

    @staticmethod
    def _numeric(values: pd.Series, column: dict, where: str) -> np.ndarray:
        try:
            numbers = pd.to_numeric(values).astype(np.float64).to_numpy()
        except (ValueError, TypeError):
            raise InputError(f"{where}: covariate '{column['name']}' was numeric in training and holds text "
                             "here") from None
        return (numbers - column["mean"]) / column["sd"]

    @staticmethod
    def _one_hot(values: pd.Series, column: dict, index, where: str) -> np.ndarray:
        levels = column["levels"]
        out = np.full((len(values), len(levels)), np.nan)
        for row, (subject, value) in enumerate(zip(index, values)):
            if pd.isna(value):
                continue
            text = str(value)
            if text not in levels:
                raise InputError(f"{where}: covariate '{column['name']}' of subject '{subject}' is '{text}', a "
                                 f"level training never saw (levels: {', '.join(levels)})")
            out[row] = 0.0
            out[row, levels.index(text)] = 1.0
        return out

    def to_dict(self) -> dict:
        return {"columns": [dict(c) for c in self.columns]}

    @classmethod
    def from_dict(cls, d: dict) -> "CovariateEncoder":
        return cls([dict(c) for c in d.get("columns", [])])


@dataclass
class SiteLevels:
    """The sites of the training subjects, numbered 0..K-1; -1 for any other site (the pooled site)."""

    column: str
    levels: list[str]

    @classmethod
    def fit(cls, sites: pd.Series, where: str = "site") -> "SiteLevels":
        labels = sorted({str(v) for v in sites.dropna()})
        if not labels:
            raise InputError(f"{where}: the site column '{sites.name}' is empty for every training subject")
        return cls(str(sites.name), labels)

    def index(self, sites: pd.Series) -> np.ndarray:
        """(n,) int64 site numbers, -1 where the site is empty or not a training site."""
        lookup = {label: k for k, label in enumerate(self.levels)}
        return np.array([lookup.get(str(v), -1) if not pd.isna(v) else -1 for v in sites], dtype=np.int64)

    def unseen(self, sites: pd.Series) -> list[str]:
        """The site labels of ``sites`` that training never saw, in order of appearance."""
        return list(dict.fromkeys(str(v) for v in sites.dropna() if str(v) not in self.levels))

    def with_sites(self, labels: list[str]) -> "SiteLevels":
        """These levels and ``labels`` after them (a run adapted to new sites keeps the old numbers)."""
        return SiteLevels(self.column, self.levels + [x for x in labels if x not in self.levels])

    def to_dict(self) -> dict:
        return {"column": self.column, "levels": list(self.levels)}

    @classmethod
    def from_dict(cls, d: dict) -> "SiteLevels":
        return cls(d["column"], list(d["levels"]))
