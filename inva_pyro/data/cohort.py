"""A cohort: subjects' images read from a manifest CSV into feature matrices, with splits.

Reading checks everything a user can get wrong (docs/cohorts.md) and
reports it as one InputError line naming the file or column. Each image is read once,
reduced to its masked feature vector and dropped, so memory holds only the matrices; with
``lazy=True`` not even those: files are checked up front and read on demand
(``streaming.DiskSubset``).

Image formats (the manifest cell's extension decides; docs/cohorts.md):
- NIfTI ``.nii``/``.nii.gz``: 3D volumes; every volume column shares one grid and mask.
- GIfTI ``.gii``: one per-vertex map per file. An image NAME is either a column NAME (one
  file per subject) or the column pair NAME_lh + NAME_rh (left and right hemispheres, read
  as one image: left vertices, then right). Every surface column shares one vertex layout.
- region tables ``.csv`` (comma) or ``.tsv``/``.txt`` (tab): rows = subjects, first column
  = subject id, other columns = regions (FreeSurfer aparcstats2table's layout). Cells may all
  point at one table; the subject's row is found by id. Each region column has its own regions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import InputError
from .spaces import ArraySpace, Space, VolumeSpace
from .manifest import (DEFAULT_VAL_FRACTION, SPLIT_COLUMN, SPLITS, SUBJECT_COLUMN, ImageReader, check_input_names,
                       covariate_columns, has_image, image_columns, read_cohort_json, read_manifest, split_labels,
                       subject_ids)
from .covariates import is_numeric
from .missing import outcome_presence
from .splits import split_indices
from .streaming import DiskSubset, RowCache
from .subset import Subset


class Cohort:
    """All subjects of a cohort, their feature spaces, and the train/val/test split.

    Splits: with a ``split`` column (values train/val/test), ``train``, ``val`` and
    ``test`` are its rows; if it has no ``val`` rows, a seeded ``val_fraction`` of the
    train rows is held out as ``val`` instead. Without a ``split`` column, ``train`` and
    ``val`` are a seeded split of every subject (``val_fraction``, default 20%, at least
    one subject when there are two or more), and ``test`` is every subject, like ``all``.
    The seed defaults to 0, so the same manifest always gives the same split.
    Within each subset, subjects keep the manifest's order.
    """

    def __init__(self, data: Subset, spaces: dict[str, Space], input_names: list[str],
                 outcome_name: str | None, split: list[str] | None = None,
                 manifest_path: Path | None = None, seed: int = 0,
                 val_fraction: float = DEFAULT_VAL_FRACTION):
        self._data = dataclasses.replace(data, outcome_name=outcome_name,
                                         spaces={name: spaces[name] for name in [*input_names, outcome_name]
                                                 if name in spaces})
        self._spaces = dict(spaces)
        self._input_names = list(input_names)
        self._outcome_name = outcome_name
        self._split = None if split is None else list(split)
        self._manifest_path = manifest_path
        self._indices = split_indices(self._split, len(data), seed, val_fraction, outcome_presence(data))

    # ----- construction -------------------------------------------------------------
    @classmethod
    def from_manifest(cls, path: str | Path, inputs: Sequence[str], outcome: str | None,
                      mask: str | Path | None = None, *, require_outcome: bool = True,
                      space: Space | dict[str, Space] | None = None, truth_mean: str | None = None,
                      truth_sd: str | None = None, covariates: Sequence[str] | None = None,
                      conditions: Sequence[str] | None = None, site: str | None = None,
                      seed: int = 0, val_fraction: float = DEFAULT_VAL_FRACTION,
                      lazy: bool = False, cache_subjects: int = 64) -> "Cohort":
        """Read a cohort from a manifest CSV.

        ``inputs``/``outcome`` name images: a column, or a NAME_lh/NAME_rh pair of GIfTI
        columns. ``mask`` (a NIfTI path, relative to the working directory) selects voxels of
        volume columns; None means every voxel. ``space`` (a trained run's) makes images be
        checked against it and read through it instead: one space applies to every volume (or
        every surface) column, or to the outcome when it is a RegionSpace; a dict gives one per
        name. ``mask`` must then be None. With ``require_outcome=False`` a missing or all-empty
        outcome column gives ``outcome=None`` (predict time).
        ``truth_mean``/``truth_sd`` name true-mean/true-sd images (in the outcome's space).
        ``covariates`` lists covariate columns; None takes every other numeric column.
        ``conditions`` lists the covariates a fit is to condition on (numeric or text columns), and ``site``
        names the column of each subject's site (scanner, centre): the subsets carry them as ``conditions``
        and ``sites``.
        ``lazy=True`` checks every file (headers, vertex counts, table rows) but reads no voxel
        data: the subsets are ``streaming.DiskSubset`` views that read on demand, keeping the
        last ``cache_subjects`` subjects' vectors in memory.
        """
        csv_path = Path(path)
        if space is not None and mask is not None:
            raise ValueError("give either a mask or a space, not both")
        table = read_manifest(csv_path)
        inputs = check_input_names(inputs, outcome, csv_path)
        subjects = subject_ids(table, csv_path)
        split = split_labels(table[SPLIT_COLUMN], subjects, csv_path) if SPLIT_COLUMN in table else None

        if outcome is not None and not require_outcome and not has_image(table, outcome):
            outcome = None
        truth = {"truth_mean": truth_mean, "truth_sd": truth_sd}
        roles = {**{name: "input" for name in inputs},
                 **({outcome: "outcome"} if outcome is not None else {}),
                 **{col: role.replace("_", " ") for role, col in truth.items() if col is not None}}
        columns = {name: image_columns(table, name, role, csv_path) for name, role in roles.items()}

        reader = ImageReader(base=csv_path.parent, csv_path=csv_path, mask=mask, given=space,
                              outcome=outcome, lazy=lazy)
        sources = {name: reader.sources(table, cols, name, subjects) for name, cols in columns.items()}
        kinds = {name: reader.column_kind(name, column_sources) for name, column_sources in sources.items()}
        _check_columns(csv_path, subjects, inputs, outcome, roles, sources, kinds, mask)
        matrices, spaces = {}, {}
        for name in roles:
            space_name = outcome if roles[name].startswith("truth") else name
            matrices[name], spaces[name] = reader.read_column(name, sources[name], kinds[name],
                                                              subjects, space_name)

        used_columns = {column for cols in columns.values() for column in cols}
        covariate_names = covariate_columns(table, covariates, used_columns, csv_path)
        covariate_frame = None
        if covariate_names:
            covariate_frame = table[covariate_names].apply(
                lambda column: pd.to_numeric(column).astype(np.float64) if is_numeric(column) else column
            ).set_axis(pd.Index(subjects, name=SUBJECT_COLUMN))

        extra = _condition_columns(table, conditions, site, used_columns, subjects, csv_path)
        names = inputs + ([outcome] if outcome is not None else [])
        if lazy:
            data = DiskSubset.from_sources(
                subjects, sources, spaces, inputs, outcome, truth_mean=truth_mean, truth_sd=truth_sd,
                covariates=covariate_frame, cache=RowCache(cache_subjects * len(roles)))
        else:
            data = Subset(
                subjects=subjects,
                inputs={name: matrices[name] for name in inputs},
                outcome=matrices.get(outcome) if outcome is not None else None,
                truth_mean=matrices.get(truth_mean) if truth_mean is not None else None,
                truth_sd=matrices.get(truth_sd) if truth_sd is not None else None,
                covariates=covariate_frame,
            )
        return cls(dataclasses.replace(data, **extra), {name: spaces[name] for name in names}, inputs, outcome,
                   split, csv_path, seed, val_fraction)

    @classmethod
    def from_dir(cls, directory: str | Path, *, require_outcome: bool = True, seed: int = 0,
                 val_fraction: float = DEFAULT_VAL_FRACTION, lazy: bool = False,
                 cache_subjects: int = 64, conditions: Sequence[str] | None = None,
                 site: str | None = None) -> "Cohort":
        """Read a cohort folder made by ``inva simulate``: ``cohort.json`` + ``manifest.csv``.

        ``cohort.json`` = ``{"design": ..., "inputs": [...], "outcome": ..., "mask": path
        or null, "truth": {"mean": COL, "sd": COL} (optional), "covariates": [...]
        (optional)}``; its paths are absolute or relative to the folder.
        """
        directory = Path(directory)
        spec = read_cohort_json(directory / "cohort.json")
        mask = spec.get("mask")
        if mask is not None:
            mask = Path(mask) if Path(mask).is_absolute() else directory / mask
        truth = spec.get("truth") or {}
        return cls.from_manifest(
            directory / "manifest.csv", inputs=spec["inputs"], outcome=spec.get("outcome"),
            mask=mask, require_outcome=require_outcome, truth_mean=truth.get("mean"),
            truth_sd=truth.get("sd"), covariates=spec.get("covariates"), seed=seed,
            val_fraction=val_fraction, lazy=lazy, cache_subjects=cache_subjects, conditions=conditions, site=site)

    @classmethod
    def from_arrays(cls, inputs: dict[str, np.ndarray], outcome: np.ndarray | None,
                    subjects: Sequence[str] | None = None, split: Sequence[str] | None = None,
                    space: VolumeSpace | None = None, truth_mean: np.ndarray | None = None,
                    truth_sd: np.ndarray | None = None, *, outcome_name: str = "outcome",
                    covariates: pd.DataFrame | None = None, conditions: pd.DataFrame | None = None,
                    sites: pd.Series | None = None, seed: int = 0,
                    val_fraction: float = DEFAULT_VAL_FRACTION) -> "Cohort":
        """A cohort from in-memory (n, V) matrices (tests, simulations, notebooks).
        ``conditions`` (covariates to condition a fit on) and ``sites`` (named by their column) are per subject,
        in the order of the rows.

        ``space`` (shared by every input and the outcome) defaults to one ``ArraySpace`` per
        name: features of unknown geometry, written as (V, 1, 1) volumes. ``subjects`` defaults to
        "sub-000", "sub-001", ...; ``split`` to the seeded split described on the class.
        """
        if not inputs:
            raise ValueError("from_arrays needs at least one input")
        inputs = {name: np.asarray(array, dtype=np.float32) for name, array in inputs.items()}
        n = next(iter(inputs.values())).shape[0]
        subjects = [f"sub-{i:03d}" for i in range(n)] if subjects is None else [str(s) for s in subjects]

        def checked(name: str, array: np.ndarray | None) -> np.ndarray | None:
            if array is None:
                return None
            array = np.asarray(array, dtype=np.float32)
            if array.ndim != 2 or array.shape[0] != len(subjects):
                raise ValueError(f"{name}: expected shape ({len(subjects)}, V), got {array.shape}")
            if space is not None and array.shape[1] != space.n_features:
                raise ValueError(f"{name}: {array.shape[1]} features but the space has {space.n_features}")
            return array

        inputs = {name: checked(name, array) for name, array in inputs.items()}
        outcome = checked(outcome_name, outcome)
        index = pd.Index(subjects, name=SUBJECT_COLUMN)
        data = Subset(subjects=subjects, inputs=inputs, outcome=outcome,
                      truth_mean=checked("truth_mean", truth_mean),
                      truth_sd=checked("truth_sd", truth_sd), covariates=covariates,
                      conditions=None if conditions is None else conditions.set_axis(index),
                      sites=None if sites is None else pd.Series(list(sites), index=index, name=sites.name or "site"))
        if len(set(subjects)) != len(subjects):
            raise ValueError("subjects must be unique")
        split = None if split is None else split_labels(pd.Series(list(split)), subjects, "split")

        matrices = {**inputs, **({outcome_name: outcome} if outcome is not None else {})}
        spaces = {name: space if space is not None else ArraySpace.of_size(array.shape[1])
                  for name, array in matrices.items()}
        return cls(data, spaces, list(inputs), outcome_name if outcome is not None else None,
                   split, None, seed, val_fraction)

    # ----- access -------------------------------------------------------------------
    @property
    def all(self) -> Subset:
        return self._data

    @property
    def train(self) -> Subset:
        return self._subset("train")

    @property
    def val(self) -> Subset:
        return self._subset("val")

    @property
    def test(self) -> Subset:
        return self._subset("test")

    @property
    def input_names(self) -> list[str]:
        return list(self._input_names)

    @property
    def outcome_name(self) -> str | None:
        return self._outcome_name

    @property
    def spaces(self) -> dict[str, Space]:
        """name -> space, for every input and the outcome (volumes share one space, and so do
        surfaces; each region column has its own)."""
        return dict(self._spaces)

    @property
    def manifest_path(self) -> Path | None:
        return self._manifest_path

    @property
    def has_split(self) -> bool:
        """Whether the manifest had a ``split`` column."""
        return self._split is not None

    def _subset(self, name: str) -> Subset:
        indices = self._indices[name]
        if len(indices) == 0 and name in ("train", "test") and self.has_split:
            source = self._manifest_path if self._manifest_path is not None else "split"
            raise InputError(f"{source}: the split column has no '{name}' rows")
        return self._data.subset(indices)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name}={len(self._indices[name])}" for name in SPLITS)
        return (f"Cohort(n={len(self._data)}, inputs={self._input_names}, "
                f"outcome={self._outcome_name!r}, {sizes})")


def _check_columns(csv_path: Path, subjects, inputs, outcome, roles: dict, sources: dict, kinds: dict, mask) -> None:
    """What the cells of a manifest can get wrong together: a subject without any input, a mask on a cohort
    without volumes, truth images of another kind than the outcome."""
    for row, subject in enumerate(subjects):  # an empty cell is an image not acquired (missing.py)
        if all(sources[name][row] is None for name in inputs):
            raise InputError(f"{csv_path}: subject '{subject}' (line {row + 2}) has no input image at all "
                             f"(every one of {', '.join(inputs)} is empty)")
    if mask is not None and "volume" not in kinds.values():
        raise InputError(f"{mask}: a mask selects voxels of NIfTI volumes, but no image column "
                         f"holds volumes ({', '.join(f'{n}: {k}' for n, k in kinds.items())})")
    for name in [n for n in roles if roles[n].startswith("truth")]:
        if outcome is not None and kinds[name] != kinds[outcome]:
            raise InputError(f"{csv_path}: truth column '{name}' holds {kinds[name]} files but the "
                             f"outcome '{outcome}' holds {kinds[outcome]} files")


def _condition_columns(table: pd.DataFrame, conditions, site, image_columns: set, subjects, csv_path) -> dict:
    """``conditions`` (a frame of the named columns, raw) and ``sites`` (a series) of a manifest, checked."""
    reserved = {SUBJECT_COLUMN, SPLIT_COLUMN} | set(image_columns)
    names = list(conditions or []) + ([site] if site else [])
    for name in names:
        if name not in table.columns:
            known = [c for c in table.columns if c not in reserved]
            raise InputError(f"{csv_path}: no column '{name}' for --{'site' if name == site else 'covariates'} "
                             f"(columns that could be: {', '.join(known) or 'none'})")
        if name in reserved:
            raise InputError(f"{csv_path}: column '{name}' is an image, subject or split column, not a covariate")
    if site and site in (conditions or []):
        raise InputError(f"{csv_path}: column '{site}' is the site; it cannot be a covariate as well")
    index = pd.Index(subjects, name=SUBJECT_COLUMN)
    frame = table[list(conditions)].set_axis(index) if conditions else None
    sites = table[site].set_axis(index).rename(site) if site else None
    return {"conditions": frame, "sites": sites}

