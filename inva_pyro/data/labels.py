"""Region label files on a cohort's feature space: ``--regions LABELS`` of ``inva predict`` and ``evaluate``.

Labels are a (V,) integer vector over the outcome's features, 0 = not in any region:

- volume cohorts: a NIfTI label image on the cohort's grid (same shape and affine), 0 = background;
- surface cohorts: a label GIfTI with one integer per vertex (for a hemisphere pair, the two files
  ``LH,RH`` comma-separated, or one file with every vertex of both);
- region-table cohorts: a CSV whose first column names regions of the cohort and whose second names the
  group each belongs to (regions not listed are in none).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from .io import open_volume, read_volume_data

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
