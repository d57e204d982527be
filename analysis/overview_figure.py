"""The README's overview figure: one test subject of the built-in design, from inputs to a calibrated prediction.

Simulates the ``paper`` design (as ``inva demo`` does), fits the default ``inva`` preset, predicts the test
subjects and draws, for one of them: the three input maps, the observed outcome, the posterior predictive
mean and sd, and a table of 8 region means (4 x 2 blocks of the 32 x 32 grid) with their sd, calibrated
90% interval and the observed region mean.

    python analysis/overview_figure.py --out docs/figures/overview.png

About 5 minutes on 2 CPU cores shared with other jobs, with the defaults (500 subjects, seed 0).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def block_labels(grid_shape, rows: int = 4, cols: int = 2) -> np.ndarray:
    """Integer labels 1..rows*cols over the features (C order) of a 2-D grid (a trailing axis of 1 allowed)."""
    h, w = grid_shape[:2]
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    labels = (i * rows // h) * cols + (j * cols // w) + 1
    return np.broadcast_to(labels[..., None], (h, w, 1)).ravel() if len(grid_shape) == 3 else labels.ravel()


def region_borders(labels: np.ndarray) -> list:
    """Line segments between neighbouring pixels of different labels, in imshow's pixel coordinates."""
    segments = []
    rows, cols = labels.shape
    for r in range(rows):
        for c in range(cols):
            if c + 1 < cols and labels[r, c] != labels[r, c + 1]:
                segments.append([(c + 0.5, r - 0.5), (c + 0.5, r + 0.5)])
            if r + 1 < rows and labels[r, c] != labels[r + 1, c]:
                segments.append([(c - 0.5, r + 0.5), (c + 0.5, r + 0.5)])
    return segments


def draw(path: Path, subject: str, inputs: dict[str, np.ndarray], observed: np.ndarray, mean: np.ndarray,
         sd: np.ndarray, labels: np.ndarray, table, level: float) -> Path:
    """inputs, observed, mean, sd, labels: 2-D grids; table: rows of region, mean, sd, lo, hi, observed."""
    from matplotlib.collections import LineCollection

    from inva_pyro.criticism.plotting import display_slice, finite_range, new_figure, save_png

    panels = [(name, image, "gray", None) for name, image in inputs.items()]
    value_range = finite_range(observed, mean)
    panels += [("observed outcome", observed, "viridis", value_range),
               ("predicted mean", mean, "viridis", value_range),
               ("predicted sd", sd, "magma", (0.0, finite_range(sd)[1]))]
    fig = new_figure(15.5, 5.4)
    grid = fig.add_gridspec(2, 5, width_ratios=[1, 1, 1, 0.08, 2.3])
    shown_labels = display_slice(labels)
    borders = region_borders(shown_labels)
    for k, (title, image, cmap, vrange) in enumerate(panels):
        ax = fig.add_subplot(grid[k // 3, k % 3])
        vmin, vmax = vrange if vrange is not None else finite_range(image)
        im = ax.imshow(display_slice(image), origin="lower", cmap=cmap, vmin=vmin, vmax=vmax)
        if k >= 3:  # region borders on the outcome maps, numbered on the observed one
            ax.add_collection(LineCollection(borders, colors="white", linewidths=0.8))
            if k == 3:
                for region in np.unique(shown_labels[np.isfinite(shown_labels) & (shown_labels > 0)]):
                    r, c = np.argwhere(shown_labels == region).mean(axis=0)
                    ax.text(c, r, str(int(region)), color="white", ha="center", va="center", fontsize=9)
            fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set_title(title if k >= 3 else f"input {title}")
        ax.set_xticks([])
        ax.set_yticks([])
    tag = format(round(level * 100, 6), "g")
    ax = fig.add_subplot(grid[:, 4])
    ax.axis("off")
    cells = [[str(r), f"{m:.3f}", f"{s:.3f}", f"[{lo:.3f}, {hi:.3f}]", f"{o:.3f}"] for r, m, s, lo, hi, o in table]
    tab = ax.table(cellText=cells, colLabels=["region", "mean", "sd", f"{tag}% interval", "observed"],
                   loc="center", cellLoc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(9.5)
    tab.scale(1.0, 1.45)
    ax.set_title(f"region means of {subject} (calibrated)")
    fig.suptitle(f"inva-pyro on the built-in design: test subject {subject}, default preset `inva`")
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_png(fig, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/figures/overview.png"))
    parser.add_argument("--n-subjects", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subject", type=int, default=0, help="index of the test subject shown")
    parser.add_argument("--level", type=float, default=0.9, help="level of the region intervals")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)

    import torch

    from inva_pyro import Cohort, InVA
    from inva_pyro.criticism.metrics import scatter_to_grid
    from inva_pyro.data.simulate import write_cohort

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        write_cohort(Path(tmp) / "cohort", "paper", args.n_subjects, args.seed)
        cohort = Cohort.from_dir(Path(tmp) / "cohort", seed=args.seed)
    model = InVA.from_preset("inva").fit(cohort.train, val=cohort.val, seed=args.seed, device="cpu")
    test = cohort.test
    pred = model.predict(test, levels=[args.level], seed=args.seed)
    print(f"simulated, fitted and predicted in {time.perf_counter() - start:.0f} s "
          f"(best epoch {model.history['best_epoch']}, {len(test)} test subjects)")

    space = cohort.spaces[cohort.outcome_name]
    labels = block_labels(space.grid_shape)
    regions = pred.regions(labels, levels=[args.level])
    i = args.subject
    subject = test.subjects[i]
    rows = regions[regions["subject"] == subject]
    tag = format(round(args.level * 100, 6), "g")
    table = []
    for _, row in rows.iterrows():
        region = row["region"]
        chosen = np.ones_like(labels, dtype=bool) if str(region) == "all" else labels == int(region)
        table.append((region, row["mean"], row["sd"], row[f"lo{tag}"], row[f"hi{tag}"],
                      float(test.outcome[i, chosen].mean())))

    def grid(values: np.ndarray) -> np.ndarray:
        return scatter_to_grid(values[None], space.mask, fill=np.nan)[0]

    inputs = {name: grid(test.inputs[name][i]) for name in cohort.input_names}
    path = draw(args.out, subject, inputs, grid(test.outcome[i]), grid(pred.mean[i]), grid(pred.sd[i]),
                grid(labels.astype(float)), table, args.level)
    print(f"wrote {path} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
