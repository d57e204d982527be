"""Metrics per group of subjects (``inva evaluate --by COLUMN``): the groups are the values of one
manifest column (site, sex, diagnosis, ...), read from the manifest itself by subject id.

``read_groups`` checks the column and gives each evaluated subject its group; ``metrics_by_group``
scores the prediction within each group with the same calibrated intervals and predictive as the
pooled metrics, so that every pooled figure is the subject-weighted average of the groups' (every
subject has the same number of features); ``plot_coverage_by_group`` draws coverage minus nominal
per group and level (``coverage_by_group.png``); ``group_table`` is the short table the command prints.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from . import metrics as M
from ..errors import InputError

EMPTY = "(empty)"                       # the group of subjects whose cell is empty
TABLE_LEVEL = 0.9                       # the level the printed table shows (else the highest evaluated)
_IMAGE_SUFFIXES = (".nii", ".nii.gz", ".gii", ".mgz", ".mgh")
_SHOWN_COLUMNS = 12                     # columns named in an unknown-column error


def read_groups(manifest: Path, column: str, subjects: Sequence[str], image_names: Iterable[str] = ()) -> list[str]:
    """The group of each of ``subjects`` (ids of the manifest): its cell of ``column`` as text, stripped,
    ``EMPTY`` for an empty cell. ``image_names``: the run's images (inputs, outcome, truth maps; an
    ``_lh``/``_rh`` pair counts as its name). One-line InputError for an unknown column, an image column,
    or a column whose every cell among ``subjects`` is empty."""
    from ..data.manifest import read_manifest, subject_ids
    manifest = Path(manifest)
    table = read_manifest(manifest)
    if column not in table:
        known = [c for c in table.columns if c != column]
        shown = ", ".join(known[:_SHOWN_COLUMNS]) + (f", ... ({len(known)} in all)" if len(known) > _SHOWN_COLUMNS else "")
        raise InputError(f"{manifest}: --by {column}: no such column (columns: {shown})")
    images = {name for image in image_names for name in (image, f"{image}_lh", f"{image}_rh")}
    cells = {subject: ("" if not isinstance(value, str) else value.strip())
             for subject, value in zip(subject_ids(table, manifest), table[column])}
    present = [v for v in cells.values() if v]
    if column in images or (present and all(v.lower().endswith(_IMAGE_SUFFIXES) for v in present)):
        raise InputError(f"{manifest}: --by {column}: an image column; give a column that groups subjects "
                         "(site, sex, diagnosis, ...)")
    missing = [s for s in subjects if s not in cells]
    if missing:
        raise InputError(f"{manifest}: subject '{missing[0]}' is not in this manifest")
    groups = [cells[s] or EMPTY for s in subjects]
    if all(g == EMPTY for g in groups):
        raise InputError(f"{manifest}: --by {column}: the cell is empty for every one of the {len(groups)} "
                         "evaluated subjects")
    return groups


def group_order(values: Iterable[str]) -> list[str]:
    """Distinct group values: by number when every value is one, else alphabetically; ``EMPTY`` last."""
    distinct = sorted(set(values) - {EMPTY})
    try:
        distinct.sort(key=float)
    except ValueError:
        pass
    return distinct + ([EMPTY] if EMPTY in set(values) else [])


def crps_map(prediction) -> np.ndarray:
    """Entry-wise CRPS of the predictive the pooled ``crps`` averages (``Prediction.metrics``)."""
    cal = prediction.calibrator
    if cal is not None and cal.method != "none":
        return prediction._by_pattern(M.crps_quantile_distribution_map)
    if prediction.raw_crps is not None:
        return M.to_numpy(prediction.raw_crps)
    return M.crps_gaussian_map(prediction.observed, prediction.mean, prediction.sd)


def metrics_by_group(prediction, groups: Sequence[str], levels: Sequence[float],
                     truth_mean=None, truth_sd=None) -> dict[str, dict]:
    """Per group (in ``group_order``): n_subjects, mse, oracle_mse and excess_error ((mse - oracle) / oracle,
    with the truth), coverage and interval_width of the calibrated intervals at ``levels``, crps.

    ``groups``: one value per subject of ``prediction`` (its rows). ``truth_mean``: the true mean maps of
    the same rows (simulated cohorts); the oracle MSE is the MSE of the true mean, as in the pooled metrics.
    """
    y, mean = M.to_numpy(prediction.observed), M.to_numpy(prediction.mean)
    if len(groups) != len(y):
        raise ValueError(f"{len(groups)} group values for {len(y)} subjects")
    groups = np.asarray(groups, dtype=object)
    truth = None if truth_mean is None else M.to_numpy(truth_mean)
    crps = crps_map(prediction)
    intervals = {M.level_key(lv): tuple(M.to_numpy(a) for a in bounds) for lv, bounds in prediction.intervals.items()}
    out = {}
    for value in group_order(groups.tolist()):
        rows = np.flatnonzero(groups == value)
        entry = {"n_subjects": int(rows.size), "mse": M.mse(y[rows], mean[rows])}
        if truth is not None:
            oracle = M.mse(y[rows], truth[rows])
            entry["oracle_mse"] = oracle
            entry["excess_error"] = (entry["mse"] - oracle) / oracle if oracle > 0 else None
        entry["coverage"], entry["interval_width"] = {}, {}
        for key in sorted({M.level_key(lv) for lv in levels}, key=float):
            lo, hi = intervals[key][0][rows], intervals[key][1][rows]
            entry["coverage"][key] = M.coverage(y[rows], lo, hi)
            entry["interval_width"][key] = M.interval_width(lo, hi)
        entry["crps"] = float(np.mean(crps[rows]))
        out[value] = entry
    return out


def table_level(by: dict) -> str | None:
    """The coverage level the printed table shows: 0.9 when evaluated, else the highest."""
    first = next(iter(by["groups"].values()), {})
    keys = list(first.get("coverage", {}))
    if not keys:
        return None
    return M.level_key(TABLE_LEVEL) if M.level_key(TABLE_LEVEL) in keys else max(keys, key=float)


def group_table(by: dict) -> list[str]:
    """The lines of the per-group table ``inva evaluate --by`` prints: group, n, MSE, coverage at 0.9."""
    level = table_level(by)
    header = [by["column"], "n", "MSE"] + ([f"coverage {level}"] if level else [])
    rows = [[str(value), str(g["n_subjects"]), f"{g['mse']:.4f}"]
            + ([f"{g['coverage'][level]:.3f}"] if level else []) for value, g in by["groups"].items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    align = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return [align(header), *map(align, rows)]


def plot_coverage_by_group(path, by: dict) -> Path:
    """Grouped bars: observed minus nominal coverage of the calibrated intervals, per group and level;
    zero is nominal. Group sizes are in the labels."""
    from .plotting import new_figure, save_png
    names = list(by["groups"])
    levels = list(next(iter(by["groups"].values()))["coverage"])
    diff = np.array([[by["groups"][g]["coverage"][lv] - float(lv) for lv in levels] for g in names])
    fig = new_figure(min(16.0, max(5.0, 1.0 + 0.55 * len(names) * max(1, len(levels)) ** 0.5)), 4.2)
    ax = fig.subplots()
    x, width = np.arange(len(names)), 0.8 / max(1, len(levels))
    for j, lv in enumerate(levels):
        ax.bar(x + (j - (len(levels) - 1) / 2) * width, diff[:, j], width, label=f"{float(lv):.0%}")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x, [f"{g}\nn={by['groups'][g]['n_subjects']}" for g in names],
                  rotation=45 if len(names) > 8 else 0, ha="right" if len(names) > 8 else "center")
    bound = max(0.05, 1.15 * float(np.nanmax(np.abs(diff))) if diff.size else 0.05)
    ax.set_ylim(-bound, bound)
    ax.set_ylabel("observed - nominal coverage")
    ax.set_xlabel(by["column"])
    ax.set_title(f"Coverage by {by['column']} (0 = nominal)")
    fig.legend(title="interval", fontsize="small", loc="outside right upper")
    return save_png(fig, path)
