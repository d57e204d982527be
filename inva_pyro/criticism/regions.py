"""Region metrics for ``evaluate --regions``: coverage, width and CRPS of region means, their calibration
curve and posterior predictive check (docs/uncertainty.md, section 8); the region means and
intervals themselves come from ``predict/regions.py``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..predict.regions import region_interval, region_summary
from ..predict.spatial import independent_region_sd


def region_metrics(prediction, labels, levels) -> dict:
    """Coverage, width and CRPS of region means (joint predictive, and independent voxels for comparison),
    per level; ``all`` (the whole mask) also separately."""
    from scipy import stats

    from . import metrics as M
    regions, mean, sd, observed, weights = region_summary(prediction, labels)
    if observed is None:
        raise ValueError("region metrics need observed outcomes")
    sd_ind = independent_region_sd(prediction.raw_sd, weights)
    covariance = prediction.spatial_covariance

    fractions = weights.getnnz(axis=1) / weights.shape[1]

    def block(cols):
        y, m, s, si = observed[:, cols], mean[:, cols], sd[:, cols], sd_ind[:, cols]
        out = {"n_regions": int(y.shape[1]), "coverage": {}, "interval_width": {}, "independent_coverage": {}}
        for lv in levels:
            lo, hi = region_interval(covariance, m, s, weights[cols], lv)
            z = stats.norm.ppf((1 + lv) / 2)
            out["coverage"][M.level_key(lv)] = M.coverage(y, lo, hi)
            out["interval_width"][M.level_key(lv)] = M.interval_width(lo, hi)
            out["independent_coverage"][M.level_key(lv)] = M.coverage(y, m - z * si, m + z * si)
        out["crps"] = float(np.mean([M.crps_quantile_distribution_map(y[:, j], m[:, j], s[:, j],
                                                                     covariance.atoms(fractions[cols][j]))
                                     for j in range(y.shape[1])]))
        out["independent_crps"] = M.crps_gaussian(y, m, si)
        return out

    return {"labels": block(slice(0, len(regions) - 1)), "all": block(slice(len(regions) - 1, len(regions))),
            "n_subjects": int(mean.shape[0])}


def region_curves(prediction, labels, levels) -> tuple[list[float], list[float]]:
    """Observed coverage of region means (labels and whole mask pooled) at ``levels``: independent, joint."""
    from scipy import stats
    _, mean, sd, observed, weights = region_summary(prediction, labels)
    sd_ind = independent_region_sd(prediction.raw_sd, weights)
    joint, indep = [], []
    for lv in levels:
        lo, hi = region_interval(prediction.spatial_covariance, mean, sd, weights, lv)
        joint.append(float(np.mean((observed >= lo) & (observed <= hi))))
        half = stats.norm.ppf((1 + lv) / 2) * sd_ind
        indep.append(float(np.mean(np.abs(observed - mean) <= half)))
    return indep, joint


def evaluate_regions(prediction, labels, levels, out_dir: Path, seed: int = 0) -> dict:
    """``metrics.json``'s ``regions``: region metrics, and ``region_calibration.png`` (joint against
    independent voxels, labels and whole mask pooled, at 0.05 ... 0.95)."""
    from . import figures
    result = region_metrics(prediction, labels, levels)
    curve = [round(0.05 * i, 2) for i in range(1, 20)]
    indep, joint = region_curves(prediction, labels, curve)
    path = figures.plot_calibration_curve(Path(out_dir) / "region_calibration.png", curve, indep, joint,
                                          labels=("independent voxels", "joint (calibrated)"),
                                          title="Region means: interval calibration")
    result["figure"] = path.name
    result["ppc"] = region_ppc(prediction, labels, out_dir, seed=seed)
    return result


def region_ppc(prediction, labels, out_dir: Path, draws: int = 200, seed: int = 0) -> dict:
    """Posterior predictive check of region means with ArviZ: u = P(y_rep <= y) of every observed region
    mean (labels and whole mask) under joint draws and under independent-voxel draws of the same voxel
    variances; ``ppc_regions.png`` (``az.plot_bpv(kind="u_value")``, flat = calibrated) and the
    Kolmogorov-Smirnov distance of the u values from uniform."""
    from scipy import stats

    from ..predict.spatial import spatial_draws
    from .inference import _az
    from .plotting import new_figure, save_png
    az = _az()
    _, _, _, observed, weights = region_summary(prediction, labels)
    pp, result = {}, {"draws": int(draws)}
    for name, independent in (("joint", False), ("independent", True)):
        chunks = [np.asarray(weights @ c.reshape(-1, c.shape[-1]).T).T.reshape(c.shape[0], c.shape[1], -1)
                  for c in spatial_draws(prediction.mean, prediction.raw_sd, prediction.spatial_covariance, draws, seed=seed,
                                       independent=independent)]
        pp[name] = np.concatenate(chunks)[None]                                  # (chain, draw, subject, region)
        u = (pp[name][0] <= observed[None]).mean(0).ravel()
        result[f"pit_ks_{name}"] = float(stats.kstest(u, "uniform").statistic)
    idata = az.from_dict(posterior_predictive={"region_mean": pp["joint"], "region_mean_independent": pp["independent"]},
                         observed_data={"region_mean": observed})
    fig = new_figure(9.2, 4.0)
    for ax, (var, title) in zip(fig.subplots(1, 2), (("region_mean", "joint"),
                                                     ("region_mean_independent", "independent voxels"))):
        az.plot_bpv(idata, kind="u_value", var_names=["region_mean"], data_pairs={"region_mean": var}, ax=ax)
        ax.set_title(f"PIT of region means, {title}")
        ax.set_xlabel("u = P(y_rep ≤ y)")
        ax.set_ylabel("density (flat = calibrated)")
    result["figure"] = save_png(fig, Path(out_dir) / "ppc_regions.png").name
    return result
