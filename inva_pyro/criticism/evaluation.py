"""Predictions against observed outcomes: metrics.json, diagnostic figures, ArviZ InferenceData.

``evaluate_prediction`` writes into ``out_dir``:
- ``metrics.json``: the metrics of the calibrated predictive (docs/uncertainty.md, section 1), ``raw`` (the same
  interval figures, CRPS and NLL for the uncalibrated posterior predictive), ``calibration`` (the
  method) and ``diagnostics`` (model criticism: posterior-collapse diagnostics and Pareto k-hats of
  the guide when the model is given, PSIS-LOO of the pointwise log-likelihood, see
  docs/uncertainty.md);
- figures: ``calibration_curve.png``, ``pit_histogram.png``, ``coverage_map.png`` (grids),
  ``sd_vs_error.png``, ``subject_maps.png``, ``training_curves.png`` (with a history),
  ``ppc.png`` and ``ppc_pit.png`` (ArviZ), ``latent_activity.png`` (with the model);
- ``inference_data.nc``: the ArviZ InferenceData (``inference.py``), netCDF via h5netcdf.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np

from . import figures
from . import metrics as M
from ..data.cohort import Subset
from ..data.io import atomic_write_text

# Levels of the calibration curve (observed vs nominal coverage).
CURVE_LEVELS = [round(0.05 * i, 2) for i in range(1, 20)]
COVERAGE_MAP_LEVEL = 0.9


def evaluate_prediction(prediction, subset: Subset, out_dir: Path, history: dict | None = None,
                        levels: list[float] | None = None, *, model=None, inference_data: bool = True,
                        num_draws: int | None = None, n_features: int | None = None, psis_subjects: int = 16,
                        psis_particles: int = 1000, seed: int = 0, regions=None, by=None) -> dict:
    """Write ``metrics.json``, figures and ``inference_data.nc`` for ``prediction`` into out_dir.

    ``prediction`` should cover CURVE_LEVELS (the calibration curve uses the levels it has).
    The top-level metrics are those of the calibrated predictive (docs/uncertainty.md, section 1); ``raw`` holds the
    same interval figures for the uncalibrated posterior predictive. With ``model`` (the fitted
    InVA that made the prediction), ``diagnostics`` also has the posterior-collapse report and the
    guide's Pareto k-hats on ``psis_subjects`` subjects (0: skip), and the InferenceData has the
    posterior and pointwise log-likelihood groups; without it, a reduced InferenceData is written.
    ``num_draws``/``n_features``: draws and seeded feature subset of the InferenceData.
    ``regions``: (labels, names) from ``regions.read_labels``: adds ``regions`` (region means: coverage,
    width, CRPS per level, joint and independent-voxel; ArviZ PPC of region means) and the figures
    ``region_calibration.png``, ``ppc_regions.png`` (regions.py). A prediction with a joint predictive also
    gets ``multivariate``: energy and variogram scores, joint and independent-voxel (scores.py).
    ``by``: (column, one group value per subject of ``prediction``): adds ``by`` (metrics per group,
    groups.py) and the figure ``coverage_by_group.png``.
    """
    from . import inference

    out_dir = Path(out_dir)
    levels = levels or [0.5, 0.8, 0.9, 0.95]
    num_draws = num_draws or inference.DEFAULT_DRAWS
    n_features = n_features or inference.DEFAULT_FEATURES
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

    diagnostics, idata = {}, None
    if _is_inva(model):
        from .diagnostics import model_diagnostics
        diagnostics.update(model_diagnostics(model, subset, psis_subjects=psis_subjects,
                                             psis_particles=psis_particles, seed=seed))
    if inference_data:
        if _is_inva(model):
            idata = inference.build_inference_data(model, subset, prediction, num_draws=num_draws,
                                                   n_features=n_features, seed=seed)
        else:
            idata = inference.inference_data_from_prediction(prediction, num_draws=num_draws,
                                                             n_features=n_features, seed=seed)
        inference.save_inference_data(idata, out_dir / "inference_data.nc")
        diagnostics["inference_data"] = {"file": "inference_data.nc", "num_draws": num_draws,
                                         "n_features": int(idata.observed_data.sizes.get("feature", 0))
                                         if "observed_data" in idata.groups() else 0}
        loo = loo_summary(idata)
        if loo:
            diagnostics["loo"] = loo
    if prediction.spatial_covariance is not None:  # energy and variogram scores, correlated vs independent draws
        from .scores import multivariate_scores
        result["multivariate"] = multivariate_scores(prediction, seed=seed)
    if regions is not None:
        from .regions import evaluate_regions
        result["regions"] = _jsonable(evaluate_regions(prediction, regions[0], levels, out_dir, seed=seed))
    if by is not None:
        from .groups import metrics_by_group, plot_coverage_by_group
        result["by"] = _jsonable({"column": by[0], "groups": metrics_by_group(prediction, by[1], levels, **truth)})
        plot_coverage_by_group(out_dir / "coverage_by_group.png", result["by"])
    result["diagnostics"] = _jsonable(diagnostics)
    paths = write_figures(prediction, subset, out_dir, history)
    paths += write_criticism_figures(out_dir, idata, diagnostics.get("collapse"), result["diagnostics"])
    atomic_write_text(out_dir / "metrics.json", json.dumps(result, indent=2))
    return result


def _is_inva(model) -> bool:
    module = getattr(model, "module", None)
    return module is not None and hasattr(module, "shallow_encoders") and hasattr(model, "tensors")


def _jsonable(value):
    """Plain JSON types; NaN and infinities become null."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def loo_summary(idata) -> dict:
    """PSIS-LOO of the pointwise (per subject and kept feature) log-likelihood, when there is one."""
    if "log_likelihood" not in idata.groups() or "outcome" not in idata.log_likelihood:
        return {}
    from .inference import _az
    az = _az()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loo = az.loo(idata, var_name="outcome", pointwise=True)
    k = np.asarray(loo.pareto_k).ravel()
    n_obs = k.size
    return {"elpd_loo": float(loo.elpd_loo), "se": float(loo.se), "p_loo": float(loo.p_loo),
            "elpd_loo_per_value": float(loo.elpd_loo) / n_obs, "n_values": int(n_obs),
            "pareto_k_max": float(k.max()), "share_pareto_k_above_0.7": float(np.mean(k > 0.7))}


def curve_levels(prediction) -> list[float]:
    """The levels of the calibration curve: CURVE_LEVELS where the prediction has them, else its own."""
    have = set(prediction.raw_intervals) & set(prediction.intervals)
    common = [lv for lv in CURVE_LEVELS if lv in have]
    return common if len(common) >= 3 else sorted(have)


def coverage_curve(prediction, calibrated: bool, levels: list[float] | None = None) -> list[float]:
    """Observed coverage of the central intervals at ``levels`` (default ``curve_levels``)."""
    intervals = prediction.intervals if calibrated else prediction.raw_intervals
    return [M.coverage(prediction.observed, *intervals[lv]) for lv in (levels or curve_levels(prediction))]


curve = coverage_curve  # the former name


def write_figures(prediction, subset: Subset, out_dir: Path, history: dict | None) -> list[Path]:
    y, space = prediction.observed, prediction.space
    on_grid = space is not None and getattr(space, "grid_shape", None) is not None
    to_grid = (lambda a: space.to_grid(np.asarray(a))) if on_grid else None
    paths = []
    if to_grid is not None:  # maps need the image grid (surfaces and region tables have none)
        paths.append(figures.plot_subject_maps(out_dir / "subject_maps.png", y, prediction.mean, prediction.sd,
                                               prediction.subjects, grid_maps=to_grid, true_mean=subset.truth_mean))
    if space is not None:  # in brain space: slices for volumes, the mesh for surfaces, profiles for regions
        paths.append(figures.plot_brain_maps(out_dir / "brain_maps.png", space, y, prediction.mean, prediction.sd,
                                             prediction.subjects))
    paths += [
        figures.plot_calibration_curve(out_dir / "calibration_curve.png", curve_levels(prediction),
                                       coverage_curve(prediction, False), coverage_curve(prediction, True)),
        figures.plot_pit_histogram(out_dir / "pit_histogram.png", prediction.pit(calibrated=True)),
        figures.plot_sd_vs_error(out_dir / "sd_vs_error.png", prediction.sd, np.abs(y - prediction.mean)),
    ]
    if to_grid is not None:
        level = COVERAGE_MAP_LEVEL if COVERAGE_MAP_LEVEL in prediction.intervals else max(prediction.intervals)
        per_voxel = M.coverage_by_feature(y, *prediction.intervals[level])
        paths.append(figures.plot_coverage_map(out_dir / "coverage_map.png", to_grid(per_voxel[None])[0], level))
    if history:
        paths.append(figures.plot_training_curves(out_dir / "training_curves.png", history))
    return paths


def write_criticism_figures(out_dir: Path, idata, collapse: dict | None, diagnostics: dict) -> list[Path]:
    """ArviZ PPC figures and the latent-activity figure. A figure that fails is reported in
    ``diagnostics["figure_errors"]`` and as a warning instead of failing the evaluation."""
    jobs = []
    if idata is not None and "observed_data" in idata.groups():
        jobs += [("ppc.png", lambda p: figures.plot_ppc(p, idata)),
                 ("ppc_pit.png", lambda p: figures.plot_ppc_pit(p, idata))]
    if collapse:
        jobs.append(("latent_activity.png", lambda p: figures.plot_latent_activity(p, collapse)))
    paths = []
    for name, make in jobs:
        try:
            paths.append(make(out_dir / name))
        except Exception as exc:  # a figure is not worth losing the metrics for
            msg = f"{name}: {type(exc).__name__}: {exc}".splitlines()[0]
            warnings.warn(f"figure not written: {msg}", RuntimeWarning, stacklevel=2)
            diagnostics.setdefault("figure_errors", []).append(msg)
    return paths
