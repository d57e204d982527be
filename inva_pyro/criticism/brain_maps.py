"""Maps of observed, predicted mean and sd in the outcome's own space: slices of a grid, nilearn's volume and
surface plots, or per-region profiles; each writes one PNG atomically and returns its path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .metrics import to_numpy
from .plotting import display_slice, finite_range, new_figure, save_png


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
    observed, pred, pred_sd, *truth = ([display_slice(a[i]) for i in range(n_rows)] for a in arrays)
    reference = truth[0] if truth else observed
    abs_err = [np.abs(o - p) for o, p in zip(reference, pred)]

    value_range = finite_range(*observed, *pred)
    sd_range = (0.0, finite_range(*pred_sd)[1])
    err_range = (0.0, finite_range(*abs_err)[1])
    columns = [
        ("observed", observed, value_range, "viridis"),
        ("predicted mean", pred, value_range, "viridis"),
        ("predicted sd", pred_sd, sd_range, "magma"),
        ("|true mean - predicted|" if truth else "|observed - mean|", abs_err, err_range, "magma"),
    ]
    if truth:
        columns.insert(0, ("true mean", truth[0], value_range, "viridis"))

    fig = new_figure(2.75 * len(columns), 2.6 * n_rows + 0.4)
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
    return save_png(fig, path)


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
        value_range = finite_range(observed, mean)
        columns.append(("observed", observed, "viridis", value_range, False))
        columns.append(("predicted mean", mean, "viridis", value_range, False))
    else:
        columns.append(("predicted mean", mean, "viridis", finite_range(mean), False))
    columns.append(("predicted sd", sd, "magma", (0.0, finite_range(sd)[1]), False))
    if observed is not None:
        error = observed - mean
        bound = max(abs(v) for v in finite_range(error)) or 1.0
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
    return save_png(fig, path)


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
    return save_png(fig, path)


def _plot_profile_maps(path, names, observed, mean, sd, subjects) -> Path:
    mean, sd = to_numpy(mean), to_numpy(sd)
    observed = None if observed is None else to_numpy(observed)
    n_features = mean.shape[1]
    x = np.arange(n_features)
    fig = new_figure(max(8.0, min(20.0, 0.14 * n_features + 3)), 3.2 * len(subjects))
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
    return save_png(fig, path)
