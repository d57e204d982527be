"""Predictions against observed outcomes: metrics.json and diagnostic figures."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import figures
from . import metrics as M
from .cohort import Subset
from .io import atomic_write_text

# Levels of the calibration curve (observed vs nominal coverage).
CURVE_LEVELS = [round(0.05 * i, 2) for i in range(1, 20)]


def evaluate_prediction(prediction, subset: Subset, out_dir: Path, history: dict | None = None,
                        levels: list[float] | None = None) -> dict:
    """Write ``metrics.json`` and figures for ``prediction`` (which must cover CURVE_LEVELS) into out_dir.

    The top-level metrics are those of the calibrated predictive (CONTRACT.md); ``raw`` holds the
    same interval figures for the uncalibrated posterior predictive.
    """
    out_dir = Path(out_dir)
    levels = levels or [0.5, 0.8, 0.9, 0.95]
    truth = dict(truth_mean=subset.truth_mean, truth_sd=subset.truth_sd)
    calibrated = prediction.metrics(calibrated=True, **truth)
    raw = prediction.metrics(calibrated=False, **truth)
    keep = {M.level_key(lv) for lv in levels}
    for m in (calibrated, raw):
        for key in ("coverage", "interval_width"):
            m[key] = {k: v for k, v in m[key].items() if k in keep}
    result = dict(calibrated)
    result["raw"] = {k: raw[k] for k in ("coverage", "interval_width", "crps", "nll")}
    result["calibration"] = prediction.calibrator.method if prediction.calibrator else "none"
    atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=2))
    write_figures(prediction, subset, out_dir, history)
    return result


def coverage_curve(prediction, calibrated: bool, levels: list[float] | None = None) -> list[float]:
    """Observed coverage of the central intervals at ``levels`` (default CURVE_LEVELS)."""
    intervals = prediction.intervals if calibrated else prediction.raw_intervals
    return [M.coverage(prediction.observed, *intervals[lv]) for lv in (levels or CURVE_LEVELS)]


curve = coverage_curve  # the former name


def write_figures(prediction, subset: Subset, out_dir: Path, history: dict | None) -> list[Path]:
    y, space = prediction.observed, prediction.space
    to_grid = (lambda a: space.to_grid(np.asarray(a))) if space is not None else None
    paths = [
        figures.plot_subject_maps(out_dir / "subject_maps.png", y, prediction.mean, prediction.sd,
                                  prediction.subjects, grid_maps=to_grid, true_mean=subset.truth_mean),
        figures.plot_calibration_curve(out_dir / "calibration_curve.png", CURVE_LEVELS,
                                       curve(prediction, False), curve(prediction, True)),
        figures.plot_pit_histogram(out_dir / "pit_histogram.png", prediction.pit(calibrated=True)),
        figures.plot_sd_vs_error(out_dir / "sd_vs_error.png", prediction.sd, np.abs(y - prediction.mean)),
    ]
    if to_grid is not None:
        per_voxel = M.coverage_by_feature(y, *prediction.intervals[0.9])
        paths.append(figures.plot_coverage_map(out_dir / "coverage_map.png", to_grid(per_voxel[None])[0], 0.9))
    if history:
        paths.append(figures.plot_training_curves(out_dir / "training_curves.png", history))
    return paths
