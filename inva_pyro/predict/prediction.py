"""Posterior predictive maps for a set of subjects, in the outcome's original units and space."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .calibration import Calibrator, level_tag


@dataclass
class Prediction:
    """Raw and calibrated posterior predictive summaries, arrays of shape (subjects, features).

    ``mean`` is the posterior predictive mean. ``raw_sd`` and ``raw_intervals`` come straight from
    the predictive draws; ``sd`` and ``intervals`` are recalibrated on validation subjects (see
    ``calibration.py``), per missingness pattern (``patterns``) and per group (``groups``, a label per
    subject such as its site; a group the calibration never saw gets the pooled calibration).
    ``samples`` holds the first draws when they were asked for.
    """
    subjects: list[str]
    outcome_name: str
    levels: list[float]
    mean: np.ndarray
    raw_sd: np.ndarray
    raw_intervals: dict[float, tuple[np.ndarray, np.ndarray]]
    calibrator: Calibrator | None
    raw_crps: np.ndarray | None = None
    samples: np.ndarray | None = None
    observed: np.ndarray | None = None
    space: object | None = None
    spatial_covariance: object | None = None  # SpatialCovariance (spatial.py): region means, correlated draws
    patterns: list[str] | None = None       # missingness pattern of each subject (data/missing.py)
    groups: list[str] | None = None         # calibration group (site) of each subject (calibration.py)
    sd: np.ndarray = field(init=False)
    intervals: dict[float, tuple[np.ndarray, np.ndarray]] = field(init=False)

    def __post_init__(self):
        # the sd the calibration applies to: raw, scaled per missingness pattern (calibration.py)
        self.cal_base_sd = self.raw_sd
        if self.calibrator is None or self.calibrator.method == "none":
            self.sd, self.intervals = self.raw_sd, dict(self.raw_intervals)
        else:
            if self.patterns is not None and self.calibrator.pattern_scale:
                scale = self.calibrator.row_scale(self.patterns, len(self.raw_sd))
                self.cal_base_sd = (self.raw_sd * scale).astype(self.raw_sd.dtype)
            if self.groups is not None:
                self.groups = [str(g) for g in self.groups]
                if len(self.groups) != len(self.raw_sd):
                    raise ValueError(f"groups must give one label per subject ({len(self.raw_sd)}), "
                                     f"got {len(self.groups)}")
            self.sd = self.calibrator.sd(self.cal_base_sd, self.groups)
            self.intervals = {lv: self.calibrator.interval(self.mean, self.cal_base_sd, lv, self.patterns, self.groups)
                              for lv in self.levels}

    def __len__(self) -> int:
        return len(self.subjects)

    # ---- metrics -----------------------------------------------------------------------------------
    def metrics(self, calibrated: bool = True, truth_mean=None, truth_sd=None) -> dict:
        """metrics.json's figures over every subject and feature (needs observed outcomes; criticism/metrics.py)."""
        from ..criticism import metrics as M
        if self.observed is None:
            raise ValueError("metrics need observed outcomes")
        intervals = self.intervals if calibrated else self.raw_intervals
        sd = self.sd if calibrated else self.raw_sd
        if calibrated and self.calibrator is not None and self.calibrator.method != "none":
            crps = float(np.mean(self._by_pattern(M.crps_quantile_distribution_map)))
        elif self.raw_crps is not None:
            crps = float(np.mean(self.raw_crps))
        else:
            crps = M.crps_gaussian(self.observed, self.mean, sd)
        grid_shape = mask = None
        space_grid = getattr(self.space, "grid_shape", None) if self.space is not None else None
        if space_grid is not None and len(space_grid) in (2, 3):  # SSIM on image grids only
            grid_shape = space_grid
            mask = self.space.mask.reshape(grid_shape)
        return M.evaluation_metrics(self.observed, self.mean, sd, intervals, crps, grid_shape=grid_shape,
                                    mask=mask, truth_mean=truth_mean, truth_sd=truth_sd)

    def pit(self, calibrated: bool = True) -> np.ndarray:
        """Probability integral transform of the observed values under the predictive."""
        from ..criticism import metrics as M
        if calibrated and self.calibrator is not None and self.calibrator.method != "none":
            return self._by_pattern(M.pit_quantile_distribution)
        return M.pit_gaussian(self.observed, self.mean, self.raw_sd)

    def _by_pattern(self, score) -> np.ndarray:
        """(n, V) ``score(observed, mean, sd, atoms)`` of the calibrated predictive, each subject's rows
        with its missingness pattern's and group's atoms (``calibration.py``)."""
        n = len(self.mean)
        patterns = self.patterns if self.calibrator.pattern_quantiles else None
        groups = self.groups if self.calibrator.group_quantiles else None
        keys = list(zip(patterns or [None] * n, groups or [None] * n))
        out = np.empty(self.observed.shape, dtype=np.float64)
        for key in dict.fromkeys(keys):
            rows = np.flatnonzero([k == key for k in keys])
            out[rows] = score(self.observed[rows], self.mean[rows], self.cal_base_sd[rows], self.calibrator.atoms(*key))
        return out

    def to_inference_data(self, model=None, subset=None, **kwargs):
        """ArviZ InferenceData (inference.py): full with the fitted model and its subjects, else reduced."""
        from ..criticism.inference import build_inference_data, inference_data_from_prediction
        if model is not None and subset is not None:
            return build_inference_data(model, subset, self, **kwargs)
        return inference_data_from_prediction(self, **kwargs)

    def regions(self, labels, levels: list[float] | None = None, names: dict | None = None) -> pd.DataFrame:
        """Region means with calibrated intervals: one row per subject and label (> 0) of ``labels``
        (a (V,) integer vector over the features) and a row ``all`` for the whole mask; columns
        subject, region, mean, sd, lo{P}, hi{P} (regions.py)."""
        from .regions import region_table
        return region_table(self, labels, levels or self.levels, names)

    # ---- files -------------------------------------------------------------------------------------
    def maps(self, calibrated: bool = True) -> dict[str, np.ndarray]:
        """Named maps in the order of the files: mean, sd, lo{P}, hi{P}."""
        intervals = self.intervals if calibrated else self.raw_intervals
        out = {"mean": self.mean, "sd": self.sd if calibrated else self.raw_sd}
        for lv in self.levels:
            lo, hi = intervals[lv]
            out[f"lo{level_tag(lv)}"], out[f"hi{level_tag(lv)}"] = lo, hi
        return out

    def to_files(self, out_dir: str | Path, calibrated: bool = True, tables: dict | None = None,
                 subject_columns: dict | None = None) -> Path:
        """Write every map in the outcome's space, and ``predictions.csv`` listing them (atomically);
        ``tables``: file name -> DataFrame written beside them (e.g. ``regions.csv``); ``subject_columns``:
        name -> one value per subject, columns of ``predictions.csv`` (e.g. ``novelty``)."""
        from ..data.io import atomic_dir

        if self.space is None:
            raise ValueError("this prediction has no space to write into")
        rows = []
        with atomic_dir(Path(out_dir)) as tmp:
            for i, subject in enumerate(self.subjects):
                for kind, values in self.maps(calibrated).items():
                    name = f"{subject}_{self.outcome_name}_{kind}{self.space.extension}"
                    # a space may write several files (a pair of hemispheres): list each one
                    for path in self.space.write(values[i], tmp / name) or [tmp / name]:
                        rows.append({"subject": subject, "map": kind, "path": Path(path).name,
                                     **{column: values_[i] for column, values_ in (subject_columns or {}).items()}})
            pd.DataFrame(rows).to_csv(tmp / "predictions.csv", index=False)
            for name, table in (tables or {}).items():
                table.to_csv(tmp / name, index=False, float_format="%.6g")
        return Path(out_dir)
