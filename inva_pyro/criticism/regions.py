"""Regions: label files on the cohort's space, region summaries of a prediction (``regions.csv``) and
region metrics for ``evaluate --regions`` (docs/uncertainty.md, "Joint uncertainty").

Labels are a (V,) integer vector over the outcome's features, 0 = not in any region:

- volume cohorts: a NIfTI label image on the cohort's grid (same shape and affine), 0 = background;
- surface cohorts: a label GIfTI with one integer per vertex (for a hemisphere pair, the two files
  ``LH,RH`` comma-separated, or one file with every vertex of both);
- region-table cohorts: a CSV whose first column names regions of the cohort and whose second names the
  group each belongs to (regions not listed are in none).

Region means are the plain averages of the region's features; their predictive is the joint one
(``predict/joint.py``): mean, sd and intervals mean_R + sd_R Q(p) with the region calibration's Q.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from ..predict.joint import independent_region_sd, label_weights

LABEL_KINDS = {"volume": "a NIfTI label image (.nii, .nii.gz)", "surface": "a label GIfTI (.gii)",
               "regions": "a CSV mapping regions to groups (.csv, .tsv)"}


def _kind_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "volume"
    if name.endswith(".gii"):
        return "surface"
    if name.endswith((".csv", ".tsv")):
        return "regions"
    return None


def read_labels(source: str | Path, space) -> tuple[np.ndarray, dict[int, str]]:
    """(labels (V,) int64, region id -> name) of a label file on ``space``; InputError naming the file."""
    paths = [Path(p) for p in str(source).split(",") if p.strip()]
    if space is None:
        raise InputError(f"{paths[0]}: --regions needs the outcome's space (this run has none)")
    kinds = {_kind_of(p) for p in paths}
    kind = kinds.pop() if len(kinds) == 1 else None
    if kind != space.kind:
        raise InputError(f"{paths[0]}: --regions on a {space.kind} cohort needs {LABEL_KINDS[space.kind]}")
    if kind == "volume":
        labels, names = _volume_labels(paths[0], space), {}
    elif kind == "surface":
        labels, names = _surface_labels(paths, space), {}
    else:
        labels, names = _table_labels(paths[0], space)
    if not np.any(labels != 0):
        raise InputError(f"{paths[0]}: no region label (non-zero) inside the cohort's mask")
    return labels, names


def _integers(values: np.ndarray, path: Path) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
        raise InputError(f"{path}: region labels must be integers (found non-integer values)")
    if np.any(values < 0):
        raise InputError(f"{path}: region labels must be non-negative integers (0 = background)")
    return values.astype(np.int64)


def _volume_labels(path: Path, space) -> np.ndarray:
    from ..data.io import open_volume, read_volume_data
    img = open_volume(path, "label image")
    space.check_image(img, path, "label image")
    data = read_volume_data(img, path, "label image")
    return _integers(data[np.asarray(space.mask, dtype=bool)], path)


def _surface_labels(paths: list[Path], space) -> np.ndarray:
    import nibabel as nib
    pieces = []
    for path in paths:
        if not path.exists():
            raise InputError(f"{path}: label GIfTI file not found")
        try:
            img = nib.load(str(path))
            data = np.asarray(img.darrays[0].data).reshape(-1)
        except Exception as exc:
            raise InputError(f"{path}: cannot read label GIfTI ({type(exc).__name__})") from None
        pieces.append(_integers(data, path))
    labels = np.concatenate(pieces)
    if labels.size != space.n_features:
        raise InputError(f"{paths[0]}: label GIfTI has {labels.size} vertices; the cohort's surface has "
                         f"{space.n_features}")
    return labels


def _table_labels(path: Path, space) -> tuple[np.ndarray, dict[int, str]]:
    if not path.exists():
        raise InputError(f"{path}: region groups file not found")
    try:
        table = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype=str)
    except Exception as exc:
        raise InputError(f"{path}: cannot read region groups ({type(exc).__name__})") from None
    if table.shape[1] < 2 or table.empty:
        raise InputError(f"{path}: region groups need two columns (region, group) and at least one row")
    region, group = table.iloc[:, 0].str.strip(), table.iloc[:, 1].str.strip()
    position = {name: j for j, name in enumerate(space.regions)}
    unknown = [r for r in region if r not in position]
    if unknown:
        raise InputError(f"{path}: {len(unknown)} region(s) not in the cohort (e.g. '{unknown[0]}')")
    if region.duplicated().any():
        raise InputError(f"{path}: region '{region[region.duplicated()].iloc[0]}' is listed twice")
    groups = sorted(g for g in group.unique() if isinstance(g, str) and g)
    ids = {g: k + 1 for k, g in enumerate(groups)}
    labels = np.zeros(space.n_features, dtype=np.int64)
    for r, g in zip(region, group):
        if isinstance(g, str) and g:
            labels[position[r]] = ids[g]
    return labels, {k: g for g, k in ids.items()}


def with_whole_mask(labels: np.ndarray):
    """(region names, (L + 1, V) weights): the labels' regions and ``all``, the whole mask."""
    from scipy import sparse
    ids, weights = label_weights(labels)
    n = np.asarray(labels).size
    whole = sparse.csr_matrix(np.full((1, n), 1.0 / n))
    return ids + ["all"], sparse.vstack([weights, whole]).tocsr()


def region_summary(prediction, labels) -> tuple[list, np.ndarray, np.ndarray, np.ndarray | None, object]:
    """(region ids + 'all', means (n, L), sds (n, L), observed means or None, weights)."""
    joint = prediction.joint
    if joint is None:
        raise InputError("region intervals need a run fitted with the joint covariance (covariance.safetensors); "
                         "refit it with this version")
    labels = np.asarray(labels)
    if labels.shape != (prediction.mean.shape[1],):
        raise ValueError(f"labels must be a vector of {prediction.mean.shape[1]} features, got {labels.shape}")
    regions, weights = with_whole_mask(labels)
    mean, sd = joint.region_moments(prediction.mean, prediction.raw_sd, weights)
    observed = None if prediction.observed is None else np.asarray(weights @ np.asarray(prediction.observed,
                                                                                       dtype=np.float64).T).T
    return regions, mean, sd, observed, weights


def region_interval(joint, mean, sd, weights, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Central ``level`` intervals (n, L) of region means, with each region's size-matched quantiles."""
    fractions = weights.getnnz(axis=1) / weights.shape[1]
    return (mean + sd * joint.z_regions((1 - level) / 2, fractions),
            mean + sd * joint.z_regions((1 + level) / 2, fractions))


def region_table(prediction, labels, levels, names: dict | None = None) -> pd.DataFrame:
    level_tag = lambda lv: format(round(lv * 100, 6), "g")  # noqa: E731  (prediction.level_tag)
    regions, mean, sd, _, weights = region_summary(prediction, labels)
    names = names or {}
    n, n_regions = mean.shape
    frame = {"subject": np.repeat(np.asarray(prediction.subjects, dtype=object), n_regions),
             "region": np.tile(np.asarray([names.get(r, str(r)) for r in regions], dtype=object), n),
             "mean": mean.ravel(), "sd": sd.ravel()}
    for lv in sorted(levels):
        lo, hi = region_interval(prediction.joint, mean, sd, weights, lv)
        frame[f"lo{level_tag(lv)}"], frame[f"hi{level_tag(lv)}"] = lo.ravel(), hi.ravel()
    return pd.DataFrame(frame)


def region_metrics(prediction, labels, levels) -> dict:
    """Coverage, width and CRPS of region means (joint predictive, and independent voxels for comparison),
    per level; ``all`` (the whole mask) also separately."""
    from scipy import stats

    from . import metrics as M
    regions, mean, sd, observed, weights = region_summary(prediction, labels)
    if observed is None:
        raise ValueError("region metrics need observed outcomes")
    sd_ind = independent_region_sd(prediction.raw_sd, weights)
    joint = prediction.joint

    fractions = weights.getnnz(axis=1) / weights.shape[1]

    def block(cols):
        y, m, s, si = observed[:, cols], mean[:, cols], sd[:, cols], sd_ind[:, cols]
        out = {"n_regions": int(y.shape[1]), "coverage": {}, "interval_width": {}, "independent_coverage": {}}
        for lv in levels:
            lo, hi = region_interval(joint, m, s, weights[cols], lv)
            z = stats.norm.ppf((1 + lv) / 2)
            out["coverage"][M.level_key(lv)] = M.coverage(y, lo, hi)
            out["interval_width"][M.level_key(lv)] = M.interval_width(lo, hi)
            out["independent_coverage"][M.level_key(lv)] = M.coverage(y, m - z * si, m + z * si)
        out["crps"] = float(np.mean([M.crps_quantile_distribution_map(y[:, j], m[:, j], s[:, j],
                                                                     joint.atoms(fractions[cols][j]))
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
        lo, hi = region_interval(prediction.joint, mean, sd, weights, lv)
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

    from ..predict.joint import joint_draws
    from .inference import _az
    from .plotting import new_figure, save_png
    az = _az()
    _, _, _, observed, weights = region_summary(prediction, labels)
    pp, result = {}, {"draws": int(draws)}
    for name, independent in (("joint", False), ("independent", True)):
        chunks = [np.asarray(weights @ c.reshape(-1, c.shape[-1]).T).T.reshape(c.shape[0], c.shape[1], -1)
                  for c in joint_draws(prediction.mean, prediction.raw_sd, prediction.joint, draws, seed=seed,
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
