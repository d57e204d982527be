"""Diagnostic figures (PNG) for predictions and their calibration.

Figures are built on matplotlib.figure.Figure with the Agg canvas directly, not pyplot, so
no display or global backend switch is needed and nothing is left registered in pyplot
after a figure is saved. Every function writes its PNG atomically (temporary file in the
target folder, then os.replace), so a crash never leaves a truncated image behind, and
returns the path. The target folder must exist.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import TwoSlopeNorm

from .metrics import to_numpy
from .brain_maps import plot_brain_maps, plot_subject_maps
from .plotting import display_slice, new_figure, save_png

# Brain maps live in their own module; every figure is reachable from here.
__all__ = ["plot_brain_maps", "plot_calibration_curve", "plot_coverage_map", "plot_latent_activity", "plot_pit_histogram",
           "plot_ppc", "plot_ppc_pit", "plot_sd_vs_error", "plot_subject_maps", "plot_training_curves"]


def plot_calibration_curve(path, nominal_levels, observed_raw, observed_calibrated=None,
                           labels=("raw", "calibrated"), title="Interval calibration") -> Path:
    """Observed coverage of central intervals against their nominal level, with the diagonal."""
    nominal = to_numpy(nominal_levels)
    fig = new_figure(4.8, 4.6)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="ideal")
    ax.plot(nominal, to_numpy(observed_raw), marker="o", label=labels[0])
    if observed_calibrated is not None:
        ax.plot(nominal, to_numpy(observed_calibrated), marker="s", label=labels[1])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("nominal coverage of central interval")
    ax.set_ylabel("observed coverage")
    ax.set_title(title)
    ax.legend(loc="upper left")
    return save_png(fig, path)


def plot_pit_histogram(path, pit_values, bins: int = 20) -> Path:
    """Density histogram of PIT values with the uniform density a calibrated predictive gives."""
    pit = to_numpy(pit_values).ravel()
    fig = new_figure(5.2, 3.8)
    ax = fig.subplots()
    heights, _, _ = ax.hist(pit, bins=bins, range=(0, 1), density=True, color="tab:blue", alpha=0.75, label="PIT")
    ax.axhline(1.0, color="black", linestyle="--", label="uniform (calibrated)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.45 * max(float(np.max(heights)) if len(heights) else 1.0, 1.0))  # room for the legend
    ax.set_xlabel("PIT = predictive CDF at the observed value")
    ax.set_ylabel("density")
    ax.set_title("Probability integral transform")
    ax.legend(loc="upper center")
    return save_png(fig, path)


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

    fig = new_figure(5.2, 4.6)
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
    return save_png(fig, path)


def plot_coverage_map(path, coverage_grid, level: float) -> Path:
    """Per-voxel coverage across test subjects (2-D grid, or middle axial slice of a volume).

    The colour scale is centred (white) on the nominal level, so under-covered voxels are red
    and over-covered ones blue; voxels outside the mask can be NaN and are drawn grey, so
    they are not mistaken for well-calibrated ones.
    """
    level = float(level)
    image = display_slice(to_numpy(coverage_grid))
    fig = new_figure(5.2, 4.6)
    ax = fig.subplots()
    cmap = colormaps["RdBu"].with_extremes(bad="lightgrey")
    im = ax.imshow(image, origin="lower", cmap=cmap, norm=TwoSlopeNorm(vcenter=level, vmin=0.0, vmax=1.0))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"Coverage of the central {format(100 * level, 'g')}% interval")
    colorbar = fig.colorbar(im, ax=ax, label="fraction of test subjects covered")
    colorbar.set_ticks(sorted({0.0, 0.5, level, 1.0}))
    return save_png(fig, path)


def plot_training_curves(path, history: Mapping[str, Sequence]) -> Path:
    """Two panels over epochs: training loss (negative ELBO per subject) and validation MSE.

    history: dict of equal-length lists "epoch", "train_loss", "val_mse"; None entries
    (e.g. epochs without validation) are skipped.
    """
    epoch = to_numpy(history["epoch"])
    fig = new_figure(9, 3.6)
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
    return save_png(fig, path)


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
    fig = new_figure(5.0 * len(panels), 4.2)
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
    return save_png(fig, path)


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
    fig = new_figure(4.6 * (len(panels) + has_loo), 4.0)
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
    return save_png(fig, path)


def plot_latent_activity(path, report: Mapping, threshold: float | None = None) -> Path:
    """Posterior-collapse diagnostics per VAE and latent level: activity Var_i(E[u|x_i]) of every
    latent unit (log scale, with the active-unit threshold) and its KL (nats per subject).

    report: ``diagnostics.collapse_report`` output.
    """
    threshold = report.get("threshold", 0.01) if threshold is None else threshold
    activity = report["active_units"]["activity"]
    kls = report["kl_per_dimension"]
    rows = [(name, level) for name in activity for level in activity[name]]
    fig = new_figure(9.0, 1.9 * len(rows) + 0.8)
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
    return save_png(fig, path)
