"""Diagnostic figures (PNG) for predictions and their calibration.

Figures are built on matplotlib.figure.Figure with the Agg canvas directly, not pyplot, so
no display or global backend switch is needed and nothing is left registered in pyplot
after a figure is saved. Every function writes its PNG atomically (temporary file in the
target folder, then os.replace), so a crash never leaves a truncated image behind, and
returns the path. The target folder must exist.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from ..data.io import _umask
from .metrics import to_numpy


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the PNG the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def _display_slice(image: np.ndarray) -> np.ndarray:
    """A 2-D image to show: the image itself, or the middle axial (last-axis) slice of a volume.

    Transposed so that, with origin="lower", the first array axis runs left to right and the
    second bottom to top, which is the radiological convention for RAS-ordered arrays.
    """
    if image.ndim == 3:
        image = image[:, :, image.shape[2] // 2]
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D or 3-D grid, got shape {image.shape}")
    return image.T


def _finite_range(*arrays: np.ndarray) -> tuple[float, float]:
    values = np.concatenate([a[np.isfinite(a)] for a in arrays])
    if values.size == 0:
        return 0.0, 1.0
    return float(values.min()), float(values.max())


def plot_subject_maps(
    path,
    truth_or_observed,
    mean,
    sd,
    subjects: Sequence[str],
    grid_maps: Callable[[np.ndarray], np.ndarray] | None = None,
    max_subjects: int = 4,
    true_mean=None,
) -> Path:
    """One row per subject: [true mean |] observed | predicted mean | predicted sd | |error|.

    With ``true_mean`` (simulated cohorts) a first column shows it and the error column is
    |true mean - predicted mean|, the part of the error a model can remove.

    truth_or_observed, mean, sd: grids of shape (n, H, W) or (n, X, Y, Z) (the middle axial
    slice of a volume is shown), or (n, n_features) arrays together with grid_maps, a
    function turning such an array into grids (e.g. metrics.scatter_to_grid with
    fill=np.nan, so that voxels outside the mask stay blank). subjects: row labels, one per
    subject; the first max_subjects rows are drawn. Observed and mean share one colour scale.
    """
    sources = [truth_or_observed, mean, sd] + ([true_mean] if true_mean is not None else [])
    arrays = [to_numpy(a) for a in sources]
    if grid_maps is not None:
        arrays = [np.asarray(grid_maps(a), dtype=np.float64) for a in arrays]
    n_rows = min(len(subjects), arrays[0].shape[0], max_subjects)
    if n_rows == 0:
        raise ValueError("plot_subject_maps needs at least one subject")
    observed, pred, pred_sd, *truth = ([_display_slice(a[i]) for i in range(n_rows)] for a in arrays)
    reference = truth[0] if truth else observed
    abs_err = [np.abs(o - p) for o, p in zip(reference, pred)]

    value_range = _finite_range(*observed, *pred)
    sd_range = (0.0, _finite_range(*pred_sd)[1])
    err_range = (0.0, _finite_range(*abs_err)[1])
    columns = [
        ("observed", observed, value_range, "viridis"),
        ("predicted mean", pred, value_range, "viridis"),
        ("predicted sd", pred_sd, sd_range, "magma"),
        ("|true mean - predicted|" if truth else "|observed - mean|", abs_err, err_range, "magma"),
    ]
    if truth:
        columns.insert(0, ("true mean", truth[0], value_range, "viridis"))

    fig = _new_figure(2.75 * len(columns), 2.6 * n_rows + 0.4)
    axes = fig.subplots(n_rows, len(columns), squeeze=False)
    for col, (title, images, (vmin, vmax), cmap) in enumerate(columns):
        for row in range(n_rows):
            ax = axes[row, col]
            im = ax.imshow(images[row], origin="lower", cmap=cmap, vmin=vmin, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title)
            if col == 0:
                ax.set_ylabel(str(subjects[row]))
        fig.colorbar(im, ax=list(axes[:, col]), shrink=0.8)
    return _save(fig, path)


def plot_calibration_curve(path, nominal_levels, observed_raw, observed_calibrated=None) -> Path:
    """Observed coverage of central intervals against their nominal level, with the diagonal."""
    nominal = to_numpy(nominal_levels)
    fig = _new_figure(4.8, 4.6)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="ideal")
    ax.plot(nominal, to_numpy(observed_raw), marker="o", label="raw")
    if observed_calibrated is not None:
        ax.plot(nominal, to_numpy(observed_calibrated), marker="s", label="calibrated")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("nominal coverage of central interval")
    ax.set_ylabel("observed coverage")
    ax.set_title("Interval calibration")
    ax.legend(loc="upper left")
    return _save(fig, path)


def plot_pit_histogram(path, pit_values, bins: int = 20) -> Path:
    """Density histogram of PIT values with the uniform density a calibrated predictive gives."""
    pit = to_numpy(pit_values).ravel()
    fig = _new_figure(5.2, 3.8)
    ax = fig.subplots()
    heights, _, _ = ax.hist(pit, bins=bins, range=(0, 1), density=True, color="tab:blue", alpha=0.75, label="PIT")
    ax.axhline(1.0, color="black", linestyle="--", label="uniform (calibrated)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.45 * max(float(np.max(heights)) if len(heights) else 1.0, 1.0))  # room for the legend
    ax.set_xlabel("PIT = predictive CDF at the observed value")
    ax.set_ylabel("density")
    ax.set_title("Probability integral transform")
    ax.legend(loc="upper center")
    return _save(fig, path)


def plot_sd_vs_error(path, sd, abs_error, bins: int = 20) -> Path:
    """Error against predicted sd, in bins of equal count along the predicted sd.

    Per bin: mean |error| and RMSE against the bin's mean sd. For a calibrated Gaussian,
    RMSE = sd and E|error| = sd * sqrt(2 / pi); both reference lines are drawn.
    """
    sd, err = to_numpy(sd).ravel(), to_numpy(abs_error).ravel()
    edges = np.unique(np.quantile(sd, np.linspace(0, 1, bins + 1)))
    # digitize against the inner edges puts the maximum into the last bin, not past it
    which = np.digitize(sd, edges[1:-1], right=True)
    n_bins = len(edges) - 1 if len(edges) > 1 else 1
    counts = np.bincount(which, minlength=n_bins)
    keep = counts > 0
    mean_sd = np.bincount(which, weights=sd, minlength=n_bins)[keep] / counts[keep]
    mean_abs = np.bincount(which, weights=err, minlength=n_bins)[keep] / counts[keep]
    rmse = np.sqrt(np.bincount(which, weights=err**2, minlength=n_bins)[keep] / counts[keep])

    fig = _new_figure(5.2, 4.6)
    ax = fig.subplots()
    top = max(mean_sd.max(), rmse.max(), mean_abs.max()) * 1.05
    line = np.array([0.0, top])
    ax.plot(line, line, color="tab:orange", linestyle="--", label="ideal RMSE = sd")
    ax.plot(line, line * math.sqrt(2 / math.pi), color="tab:blue", linestyle="--",
            label=r"ideal E|error| = sd$\sqrt{2/\pi}$")
    ax.plot(mean_sd, rmse, marker="o", color="tab:orange", label="RMSE")
    ax.plot(mean_sd, mean_abs, marker="s", color="tab:blue", label="mean |error|")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("mean predicted sd in bin")
    ax.set_ylabel("error in bin")
    ax.set_title(f"Predicted sd vs error ({len(mean_sd)} equal-count bins)")
    ax.legend(loc="upper left", fontsize="small")
    return _save(fig, path)


def plot_coverage_map(path, coverage_grid, level: float) -> Path:
    """Per-voxel coverage across test subjects (2-D grid, or middle axial slice of a volume).

    The colour scale is centred (white) on the nominal level, so under-covered voxels are red
    and over-covered ones blue; voxels outside the mask can be NaN and are drawn grey, so
    they are not mistaken for well-calibrated ones.
    """
    level = float(level)
    image = _display_slice(to_numpy(coverage_grid))
    fig = _new_figure(5.2, 4.6)
    ax = fig.subplots()
    cmap = colormaps["RdBu"].with_extremes(bad="lightgrey")
    im = ax.imshow(image, origin="lower", cmap=cmap, norm=TwoSlopeNorm(vcenter=level, vmin=0.0, vmax=1.0))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"Coverage of the central {format(100 * level, 'g')}% interval")
    colorbar = fig.colorbar(im, ax=ax, label="fraction of test subjects covered")
    colorbar.set_ticks(sorted({0.0, 0.5, level, 1.0}))
    return _save(fig, path)


def plot_training_curves(path, history: Mapping[str, Sequence]) -> Path:
    """Two panels over epochs: training loss (negative ELBO per subject) and validation MSE.

    history: dict of equal-length lists "epoch", "train_loss", "val_mse"; None entries
    (e.g. epochs without validation) are skipped.
    """
    epoch = to_numpy(history["epoch"])
    fig = _new_figure(9, 3.6)
    ax_loss, ax_val = fig.subplots(1, 2)
    for ax, key, label, title in (
        (ax_loss, "train_loss", "negative ELBO per subject", "Training loss"),
        (ax_val, "val_mse", "validation MSE", "Validation error"),
    ):
        values = np.array([np.nan if v is None else float(v) for v in history.get(key, [])])
        shown = np.isfinite(values)
        ax.plot(epoch[: len(values)][shown], values[shown], marker="." if shown.sum() < 50 else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    return _save(fig, path)


# --------------------------------------------------------------------------- model criticism (ArviZ)


def _arviz():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ArviZ 0.x announces its 1.0 refactor on import
        import arviz as az
    return az


def _quiet(fn):
    """Run an ArviZ plotting call without its deprecation chatter (matplotlib/ArviZ version skew)."""
    import functools
    import warnings

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module="arviz")
            return fn(*args, **kwargs)
    return wrapper


@_quiet
def plot_ppc(path, idata, num_pp_samples: int = 100, seed: int = 0) -> Path:
    """Posterior predictive check (``az.plot_ppc``): density of the observed values against that of
    replicated data sets, pooled over the InferenceData's subjects and features; one panel for the
    raw posterior predictive (``outcome``) and, when present, one for the calibrated one."""
    az = _arviz()
    pp = idata.posterior_predictive
    panels = [("outcome", "raw posterior predictive")] if "outcome" in pp else []
    if "outcome_calibrated" in pp:
        panels.append(("outcome_calibrated", "calibrated predictive"))
    fig = _new_figure(5.0 * len(panels), 4.2)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    n_draws = int(pp.sizes["chain"] * pp.sizes["draw"])
    for ax, (var, title) in zip(axes, panels):
        az.plot_ppc(idata, var_names=["outcome"], data_pairs={"outcome": var}, ax=ax,
                    num_pp_samples=min(num_pp_samples, n_draws), random_seed=seed, legend=True)
        ax.set_title(f"PPC, {title}")
        ax.set_xlabel("outcome value")
        ax.set_ylabel("density")
    n_sub, n_feat = idata.observed_data["outcome"].shape if "observed_data" in idata.groups() else (0, 0)
    fig.suptitle(f"Observed vs replicated outcomes, pooled over {n_sub} subjects x {n_feat} features", fontsize="medium")
    return _save(fig, path)


@_quiet
def plot_ppc_pit(path, idata) -> Path:
    """Held-out PIT checks from ArviZ: ``az.plot_bpv(kind="u_value")`` (the marginal p-value
    P(y_rep <= y) of every observed value, whose density is flat for a calibrated predictive; the
    grey band is the range expected from a uniform sample of the same size) for the raw and the
    calibrated predictive, and ``az.plot_loo_pit`` (ECDF of the LOO-PIT minus the uniform CDF) when
    the InferenceData has a pointwise log-likelihood."""
    az = _arviz()
    pp = idata.posterior_predictive
    panels = [(v, t) for v, t in (("outcome", "raw"), ("outcome_calibrated", "calibrated")) if v in pp]
    has_loo = "log_likelihood" in idata.groups() and "outcome" in idata.log_likelihood and "outcome" in pp
    fig = _new_figure(4.6 * (len(panels) + has_loo), 4.0)
    axes = np.atleast_1d(fig.subplots(1, len(panels) + has_loo))
    for ax, (var, title) in zip(axes, panels):
        az.plot_bpv(idata, kind="u_value", var_names=["outcome"], data_pairs={"outcome": var}, ax=ax)
        ax.set_title(f"PIT of held-out values, {title}")
        ax.set_xlabel("u = P(y_rep ≤ y)")
        ax.set_ylabel("density (flat = calibrated)")
    if has_loo:
        ax = axes[-1]
        az.plot_loo_pit(idata, y="outcome", ecdf=True, ax=ax)
        ax.set_title("LOO-PIT, raw (ECDF − uniform)")
        ax.set_xlabel("LOO-PIT")
        ax.set_ylabel("ECDF difference")
    return _save(fig, path)


def plot_latent_activity(path, report: Mapping, threshold: float | None = None) -> Path:
    """Posterior-collapse diagnostics per VAE and latent level: activity Var_i(E[u|x_i]) of every
    latent unit (log scale, with the active-unit threshold) and its KL (nats per subject).

    report: ``diagnostics.collapse_report`` output.
    """
    threshold = report.get("threshold", 0.01) if threshold is None else threshold
    activity = report["active_units"]["activity"]
    kls = report["kl_per_dimension"]
    rows = [(name, level) for name in activity for level in activity[name]]
    fig = _new_figure(9.0, 1.9 * len(rows) + 0.8)
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for r, (name, level) in enumerate(rows):
        act = np.maximum(np.asarray(activity[name][level], dtype=float), 1e-8)
        kl = np.asarray(kls[name][level], dtype=float)
        units = np.arange(len(act))
        colors = ["tab:blue" if a > threshold else "tab:red" for a in act]
        ax = axes[r, 0]
        ax.bar(units, act, color=colors)
        ax.axhline(threshold, color="black", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.set_ylim(min(threshold / 10, act.min() / 2), max(1.0, act.max() * 2))
        ax.set_ylabel(f"{name}\n{level}")
        n_active = int(np.sum(act > threshold))
        ax.set_title(f"activity Var(E[u|x]): {n_active}/{len(act)} active (> {threshold:g})", fontsize="small")
        ax = axes[r, 1]
        ax.bar(units, kl, color=colors)
        ax.set_title(f"KL per unit (nats/subject), total {kl.sum():.1f}", fontsize="small")
        for a in axes[r]:
            a.set_xticks(units if len(units) <= 20 else units[::4])
    axes[-1, 0].set_xlabel("latent unit")
    axes[-1, 1].set_xlabel("latent unit")
    return _save(fig, path)


# ----- brain figures: maps in the outcome's own space (nilearn plotting) ---------------------------
# Vertex counts of the surface meshes nilearn ships inside the package (no download):
# fsaverage5, 10242 vertices per hemisphere.
_SHIPPED_MESHES = {10242: "fsaverage5"}
_NILEARN_SIDE = {"lh": "left", "rh": "right"}


def _shipped_mesh(label: str, n_vertices: int):
    """(coordinates, faces) of nilearn's inflated fsaverage5 hemisphere, or None if it does not fit."""
    name = _SHIPPED_MESHES.get(n_vertices)
    if name is None:
        return None
    from nilearn import datasets

    mesh = datasets.load_fsaverage(name)["inflated"].parts[_NILEARN_SIDE.get(label, "left")]
    return np.asarray(mesh.coordinates), np.asarray(mesh.faces)


def _brain_columns(observed, mean, sd):
    """(title, (n, V) values, colour map, value range, symmetric) for each figure column."""
    mean, sd = to_numpy(mean), to_numpy(sd)
    columns = []
    if observed is not None:
        observed = to_numpy(observed)
        value_range = _finite_range(observed, mean)
        columns.append(("observed", observed, "viridis", value_range, False))
        columns.append(("predicted mean", mean, "viridis", value_range, False))
    else:
        columns.append(("predicted mean", mean, "viridis", _finite_range(mean), False))
    columns.append(("predicted sd", sd, "magma", (0.0, _finite_range(sd)[1]), False))
    if observed is not None:
        error = observed - mean
        bound = max(abs(v) for v in _finite_range(error)) or 1.0
        columns.append(("observed - mean", error, "RdBu_r", (-bound, bound), True))
    return columns


def plot_brain_maps(path, space, observed, mean, sd, subjects: Sequence[str], max_subjects: int = 2,
                    meshes: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> Path:
    """Observed, predicted mean, predicted sd and error (observed - mean) in the outcome's space.

    One row per subject (the first ``max_subjects``), one column per map; ``observed`` may be
    None (prediction without outcome: mean and sd only). ``space`` decides the drawing:
    - VolumeSpace: nilearn orthogonal slices (``plot_img``) through the mask's centre of mass,
      the same cut in every panel (one axial slice for a single-slice grid);
    - SurfaceSpace: nilearn surface views (``plot_surf_stat_map``, lateral) of each hemisphere on
      ``meshes[label] = (coordinates, faces)``, or on nilearn's inflated fsaverage5 when a part has
      10242 vertices; a surface with no mesh to draw on is shown like regions;
    - RegionSpace (or anything else): values per region along the x axis, the mean with a
      +-1.64 sd band (a 90% normal interval) over the observed points, and sd and |error|.
    Arrays are (n, V) in the space's feature order. Writes a PNG (Agg) and returns its path.
    """
    n_rows = min(len(subjects), to_numpy(mean).shape[0], max_subjects)
    if n_rows == 0:
        raise ValueError("plot_brain_maps needs at least one subject")
    kind = getattr(space, "kind", None)
    if kind == "volume":
        return _plot_volume_maps(path, space, observed, mean, sd, subjects[:n_rows])
    if kind == "surface":
        drawable = {}
        for label, n in space.parts:
            mesh = (meshes or {}).get(label) or _shipped_mesh(label, n)
            if mesh is None or len(mesh[0]) != n:
                drawable = None
                break
            drawable[label] = mesh
        if drawable:
            return _plot_surface_maps(path, space, drawable, observed, mean, sd, subjects[:n_rows])
    names = list(getattr(space, "regions", [])) or None
    return _plot_profile_maps(path, names, observed, mean, sd, subjects[:n_rows])


def _label_rows(fig: Figure, first_axes, subjects) -> None:
    """Subject ids down the left margin, centred on each row's first panel."""
    for ax, subject in zip(first_axes, subjects):
        box = ax.get_position()
        fig.text(0.008, box.y0 + box.height / 2, str(subject), rotation=90, va="center", fontsize=9)


def _plot_volume_maps(path, space, observed, mean, sd, subjects) -> Path:
    import nibabel as nib
    from nilearn import plotting

    columns = _brain_columns(observed, mean, sd)
    single_slice = 1 in space.shape
    centre = np.argwhere(space.mask).mean(axis=0)
    cut = (space.affine @ np.append(centre, 1.0))[:3]
    display = "z" if single_slice else "ortho"
    cut_coords = [cut[2]] if single_slice else tuple(cut)
    width = 2.6 if single_slice else 4.6
    fig = Figure(figsize=(width * len(columns), 2.0 * len(subjects) + 0.5))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.03, right=0.99, top=0.9, bottom=0.02, wspace=0.08, hspace=0.15)
    axes = fig.subplots(len(subjects), len(columns), squeeze=False)
    # Outside the mask: blank (fully transparent), not the colour of 0.
    blank_outside = {} if space.mask.all() else {
        "transparency": nib.Nifti1Image(space.mask.astype(np.float32), space.affine),
        "transparency_range": [0, 1]}
    for col, (title, values, cmap, (vmin, vmax), _) in enumerate(columns):
        for row in range(len(subjects)):
            ax = axes[row, col]
            plotting.plot_img(nib.Nifti1Image(space.to_volume(values[row]), space.affine),
                              display_mode=display, cut_coords=cut_coords, figure=fig, axes=ax,
                              cmap=cmap, vmin=vmin, vmax=vmax, colorbar=True, annotate=False,
                              draw_cross=False, black_bg=False, resampling_interpolation="nearest",
                              **blank_outside)
            if row == 0:
                ax.set_title(title, fontsize=10)
    _label_rows(fig, axes[:, 0], subjects)
    return _save(fig, path)


def _plot_surface_maps(path, space, meshes, observed, mean, sd, subjects) -> Path:
    from nilearn import plotting

    columns = _brain_columns(observed, mean, sd)
    labels = [label for label, _ in space.parts]
    n_cols = len(columns) * len(labels)
    fig = Figure(figsize=(2.3 * n_cols, 2.1 * len(subjects) + 0.5))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.03, right=0.97, top=0.9, bottom=0.02, wspace=0.05, hspace=0.1)
    first_axes = []
    for col, (title, values, cmap, (vmin, vmax), symmetric) in enumerate(columns):
        for row, subject in enumerate(subjects):
            pieces = space.split(values[row])
            for h, (label, piece) in enumerate(zip(labels, pieces)):
                index = row * n_cols + col * len(labels) + h + 1
                ax = fig.add_subplot(len(subjects), n_cols, index, projection="3d")
                side = _NILEARN_SIDE.get(label, "left")
                plotting.plot_surf_stat_map(meshes[label], piece, hemi=side, view="lateral",
                                            engine="matplotlib", cmap=cmap, vmin=vmin, vmax=vmax,
                                            symmetric_cbar=symmetric, colorbar=h == len(labels) - 1,
                                            axes=ax, figure=fig)
                if row == 0:
                    ax.set_title(title + (f" ({label})" if len(labels) > 1 else ""), fontsize=9)
                if col == 0 and h == 0:
                    first_axes.append(ax)
    _label_rows(fig, first_axes, subjects)
    return _save(fig, path)


def _plot_profile_maps(path, names, observed, mean, sd, subjects) -> Path:
    mean, sd = to_numpy(mean), to_numpy(sd)
    observed = None if observed is None else to_numpy(observed)
    n_features = mean.shape[1]
    x = np.arange(n_features)
    fig = _new_figure(max(8.0, min(20.0, 0.14 * n_features + 3)), 3.2 * len(subjects))
    axes = fig.subplots(len(subjects), 2, squeeze=False, width_ratios=[3, 1.4])
    z90 = 1.6448536269514722  # central 90% of a normal
    for row, subject in enumerate(subjects):
        ax, ax_sd = axes[row]
        ax.fill_between(x, mean[row] - z90 * sd[row], mean[row] + z90 * sd[row], color="tab:blue",
                        alpha=0.25, linewidth=0, label="mean +- 1.64 sd")
        ax.plot(x, mean[row], color="tab:blue", linewidth=1, label="predicted mean")
        if observed is not None:
            ax.plot(x, observed[row], "o", color="black", markersize=2.5, label="observed")
        ax.set_title(str(subject), fontsize=10)
        ax.set_xlim(-0.5, n_features - 0.5)
        ax_sd.plot(x, sd[row], color="tab:orange", linewidth=1, label="predicted sd")
        if observed is not None:
            ax_sd.plot(x, np.abs(observed[row] - mean[row]), ".", color="tab:red", markersize=3,
                       label="|observed - mean|")
        ax_sd.set_xlim(-0.5, n_features - 0.5)
        if names is not None and n_features <= 80:
            ax.set_xticks(x)
            ax.set_xticklabels(names, rotation=90, fontsize=5)
        else:
            ax.set_xlabel("region" if names is not None else "vertex / feature")
        ax_sd.set_xlabel("region (same order)" if names is not None else "vertex / feature")
        if row == 0:
            ax.legend(loc="upper right", fontsize="x-small")
            ax_sd.legend(loc="upper right", fontsize="x-small")
    return _save(fig, path)
