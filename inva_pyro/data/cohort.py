"""A cohort: subjects' images read from a manifest CSV into feature matrices, with splits.

Reading checks everything a user can get wrong (see CONTRACT.md, "Cohort manifest") and
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

import csv as _csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..errors import InputError
from .io import load_gifti_map, load_region_table, open_volume
from .spaces import HEMISPHERES, RegionSpace, Space, SurfaceSpace, VolumeSpace, load_mask

SPLITS = ("train", "val", "test")
SUBJECT_COLUMN = "subject"
SPLIT_COLUMN = "split"
DEFAULT_VAL_FRACTION = 0.2
# Enough of the file to tell text from binary without reading a large file.
_SNIFF_BYTES = 8192


@dataclass
class Subset:
    """Some subjects' data as matrices, one row per subject (in ``subjects`` order).

    ``inputs``: name -> (n, V_k) float32; ``outcome``: (n, V_y) float32 or None (at
    predict time); ``truth_mean``/``truth_sd``: the known true outcome mean and sd
    (simulated cohorts) or None; ``covariates``: numeric columns indexed by subject, or None.
    """

    subjects: list[str]
    inputs: dict[str, np.ndarray]
    outcome: np.ndarray | None = None
    truth_mean: np.ndarray | None = None
    truth_sd: np.ndarray | None = None
    covariates: pd.DataFrame | None = None

    def __len__(self) -> int:
        return len(self.subjects)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "Subset":
        """A new Subset with the rows at ``indices`` (positions, or a boolean mask)."""
        idx = np.asarray(indices)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64)

        def rows(array: np.ndarray | None) -> np.ndarray | None:
            return None if array is None else array[idx]

        return Subset(
            subjects=[self.subjects[i] for i in idx],
            inputs={name: array[idx] for name, array in self.inputs.items()},
            outcome=rows(self.outcome),
            truth_mean=rows(self.truth_mean),
            truth_sd=rows(self.truth_sd),
            covariates=None if self.covariates is None else self.covariates.iloc[idx],
        )


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
        self._data = data
        self._spaces = dict(spaces)
        self._input_names = list(input_names)
        self._outcome_name = outcome_name
        self._split = None if split is None else list(split)
        self._manifest_path = manifest_path
        self._indices = _split_indices(self._split, len(data), seed, val_fraction)

    # ----- construction -------------------------------------------------------------
    @classmethod
    def from_manifest(cls, path: str | Path, inputs: Sequence[str], outcome: str | None,
                      mask: str | Path | None = None, *, require_outcome: bool = True,
                      space: Space | dict[str, Space] | None = None, truth_mean: str | None = None,
                      truth_sd: str | None = None, covariates: Sequence[str] | None = None,
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
        ``lazy=True`` checks every file (headers, vertex counts, table rows) but reads no voxel
        data: the subsets are ``streaming.DiskSubset`` views that read on demand, keeping the
        last ``cache_subjects`` subjects' vectors in memory.
        """
        csv_path = Path(path)
        if space is not None and mask is not None:
            raise ValueError("give either a mask or a space, not both")
        table = _read_manifest(csv_path)
        inputs = _check_input_names(inputs, outcome, csv_path)
        subjects = _subject_ids(table, csv_path)
        split = _split_labels(table[SPLIT_COLUMN], subjects, csv_path) if SPLIT_COLUMN in table else None

        if outcome is not None and not require_outcome and not _has_image(table, outcome):
            outcome = None
        truth = {"truth_mean": truth_mean, "truth_sd": truth_sd}
        roles = {**{name: "input" for name in inputs},
                 **({outcome: "outcome"} if outcome is not None else {}),
                 **{col: role.replace("_", " ") for role, col in truth.items() if col is not None}}
        columns = {name: _image_columns(table, name, role, csv_path) for name, role in roles.items()}

        reader = _ImageReader(base=csv_path.parent, csv_path=csv_path, mask=mask, given=space,
                              outcome=outcome, lazy=lazy)
        sources = {name: reader.sources(table, cols, name, subjects) for name, cols in columns.items()}
        kinds = {name: reader.column_kind(name, column_sources) for name, column_sources in sources.items()}
        if mask is not None and "volume" not in kinds.values():
            raise InputError(f"{mask}: a mask selects voxels of NIfTI volumes, but no image column "
                             f"holds volumes ({', '.join(f'{n}: {k}' for n, k in kinds.items())})")
        for name in [n for n in roles if roles[n].startswith("truth")]:
            if outcome is not None and kinds[name] != kinds[outcome]:
                raise InputError(f"{csv_path}: truth column '{name}' holds {kinds[name]} files but the "
                                 f"outcome '{outcome}' holds {kinds[outcome]} files")
        matrices, spaces = {}, {}
        for name in roles:
            space_name = outcome if roles[name].startswith("truth") else name
            matrices[name], spaces[name] = reader.read_column(name, sources[name], kinds[name],
                                                              subjects, space_name)

        image_columns = {column for cols in columns.values() for column in cols}
        covariate_columns = _covariate_columns(table, covariates, image_columns, csv_path)
        covariate_frame = None
        if covariate_columns:
            covariate_frame = table[covariate_columns].apply(pd.to_numeric).astype(np.float64)
            covariate_frame.index = pd.Index(subjects, name=SUBJECT_COLUMN)

        names = inputs + ([outcome] if outcome is not None else [])
        if lazy:
            from .streaming import DiskSubset, RowCache

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
        return cls(data, {name: spaces[name] for name in names}, inputs, outcome, split, csv_path,
                   seed, val_fraction)

    @classmethod
    def from_dir(cls, directory: str | Path, *, require_outcome: bool = True, seed: int = 0,
                 val_fraction: float = DEFAULT_VAL_FRACTION, lazy: bool = False,
                 cache_subjects: int = 64) -> "Cohort":
        """Read a cohort folder made by ``inva simulate``: ``cohort.json`` + ``manifest.csv``.

        ``cohort.json`` = ``{"design": ..., "inputs": [...], "outcome": ..., "mask": path
        or null, "truth": {"mean": COL, "sd": COL} (optional), "covariates": [...]
        (optional)}``; its paths are absolute or relative to the folder.
        """
        directory = Path(directory)
        spec = _read_cohort_json(directory / "cohort.json")
        mask = spec.get("mask")
        if mask is not None:
            mask = Path(mask) if Path(mask).is_absolute() else directory / mask
        truth = spec.get("truth") or {}
        return cls.from_manifest(
            directory / "manifest.csv", inputs=spec["inputs"], outcome=spec.get("outcome"),
            mask=mask, require_outcome=require_outcome, truth_mean=truth.get("mean"),
            truth_sd=truth.get("sd"), covariates=spec.get("covariates"), seed=seed,
            val_fraction=val_fraction, lazy=lazy, cache_subjects=cache_subjects)

    @classmethod
    def from_arrays(cls, inputs: dict[str, np.ndarray], outcome: np.ndarray | None,
                    subjects: Sequence[str] | None = None, split: Sequence[str] | None = None,
                    space: VolumeSpace | None = None, truth_mean: np.ndarray | None = None,
                    truth_sd: np.ndarray | None = None, *, outcome_name: str = "outcome",
                    covariates: pd.DataFrame | None = None, seed: int = 0,
                    val_fraction: float = DEFAULT_VAL_FRACTION) -> "Cohort":
        """A cohort from in-memory (n, V) matrices (tests, simulations, notebooks).

        ``space`` (shared by every input and the outcome) defaults to one VolumeSpace per
        name of shape (V, 1, 1) with an identity affine. ``subjects`` defaults to
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
        data = Subset(subjects=subjects, inputs=inputs, outcome=outcome,
                      truth_mean=checked("truth_mean", truth_mean),
                      truth_sd=checked("truth_sd", truth_sd), covariates=covariates)
        if len(set(subjects)) != len(subjects):
            raise ValueError("subjects must be unique")
        split = None if split is None else _split_labels(pd.Series(list(split)), subjects, "split")

        matrices = {**inputs, **({outcome_name: outcome} if outcome is not None else {})}
        spaces = {name: space if space is not None else _flat_space(array.shape[1])
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


# ----- manifest parsing -----------------------------------------------------------------
def _read_manifest(csv_path: Path) -> pd.DataFrame:
    if not csv_path.exists():
        raise InputError(f"{csv_path}: manifest file not found")
    if csv_path.is_dir():
        raise InputError(f"{csv_path}: manifest is a folder, not a CSV file")
    with csv_path.open("rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    if not head.strip():
        raise InputError(f"{csv_path}: manifest is empty")
    if b"\x00" in head:
        raise InputError(f"{csv_path}: not a CSV file (binary content)")
    try:
        # Everything as text: subject ids like "007" must not become 7; covariates are
        # converted to numbers later. utf-8-sig drops the byte-order mark Excel writes.
        table = pd.read_csv(csv_path, dtype=str, encoding="utf-8-sig", skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise InputError(f"{csv_path}: manifest is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, _csv.Error) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise InputError(f"{csv_path}: not a readable CSV file ({reason})") from None
    table.columns = [str(column).strip() for column in table.columns]
    if SUBJECT_COLUMN not in table:
        raise InputError(f"{csv_path}: no '{SUBJECT_COLUMN}' column "
                         f"(columns: {', '.join(table.columns)})")
    if len(table) == 0:
        raise InputError(f"{csv_path}: manifest has no subjects (header only)")
    return table


def _check_input_names(inputs: Sequence[str], outcome: str | None, csv_path: Path) -> list[str]:
    if isinstance(inputs, str):  # a bare "gm" would otherwise be read as ["g", "m"]
        inputs = [inputs]
    inputs = [str(name) for name in inputs]
    if not inputs:
        raise InputError(f"{csv_path}: no input columns given")
    duplicates = sorted({name for name in inputs if inputs.count(name) > 1})
    if duplicates:
        raise InputError(f"{csv_path}: input column '{duplicates[0]}' given twice")
    if outcome is not None and outcome in inputs:
        raise InputError(f"{csv_path}: column '{outcome}' is both an input and the outcome")
    return inputs


def _require_column(table: pd.DataFrame, column: str, role: str, csv_path: Path) -> None:
    if column not in table:
        raise InputError(f"{csv_path}: no column '{column}' for the {role} "
                         f"(available: {', '.join(table.columns)})")


def _subject_ids(table: pd.DataFrame, csv_path: Path) -> list[str]:
    subjects: list[str] = []
    seen: set[str] = set()
    for row, value in enumerate(table[SUBJECT_COLUMN]):
        subject = "" if pd.isna(value) else str(value).strip()
        if not subject:
            # +2: one for the header line, one because people count lines from 1.
            raise InputError(f"{csv_path}: line {row + 2} has an empty subject id")
        if subject in seen:
            raise InputError(f"{csv_path}: duplicate subject id '{subject}'")
        seen.add(subject)
        subjects.append(subject)
    return subjects


def _split_labels(values: pd.Series, subjects: list[str], source: str | Path) -> list[str]:
    labels = []
    for subject, value in zip(subjects, values):
        label = "" if pd.isna(value) else str(value).strip().lower()
        if label not in SPLITS:
            raise InputError(f"{source}: subject '{subject}' has split {value!r}; "
                             f"expected one of {', '.join(SPLITS)}")
        labels.append(label)
    if len(labels) != len(subjects):
        raise InputError(f"{source}: {len(labels)} split labels for {len(subjects)} subjects")
    return labels


def _covariate_columns(table: pd.DataFrame, requested: Sequence[str] | None,
                       image_columns: set[str], csv_path: Path) -> list[str]:
    if requested is not None:
        for column in requested:
            _require_column(table, column, "covariate", csv_path)
            if not _is_numeric(table[column]):
                raise InputError(f"{csv_path}: covariate column '{column}' is not numeric")
        return list(requested)
    # Other numeric columns; text columns (unused image paths, notes) are ignored.
    reserved = {SUBJECT_COLUMN, SPLIT_COLUMN} | image_columns
    return [column for column in table.columns
            if column not in reserved and _is_numeric(table[column])]


def _is_numeric(values: pd.Series) -> bool:
    present = values.dropna()
    if present.empty:
        return False
    try:
        pd.to_numeric(present)
    except (ValueError, TypeError):
        return False
    return True


def _read_cohort_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(spec, dict):
        raise InputError(f"{path}: expected a JSON object")
    inputs = spec.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
        raise InputError(f"{path}: 'inputs' must be a non-empty list of column names")
    if spec.get("outcome") is not None and not isinstance(spec["outcome"], str):
        raise InputError(f"{path}: 'outcome' must be a column name or null")
    if spec.get("mask") is not None and not isinstance(spec["mask"], str):
        raise InputError(f"{path}: 'mask' must be a path or null")
    truth = spec.get("truth")
    if truth is not None and not (isinstance(truth, dict) and set(truth) <= {"mean", "sd"}):
        raise InputError(f"{path}: 'truth' must be {{\"mean\": COLUMN, \"sd\": COLUMN}}")
    return spec


# ----- images -----------------------------------------------------------------------------
_KIND_NOUN = {"volume": "image", "surface": "surface map", "regions": "region table"}


def _image_kind(path: Path) -> str:
    """The kind of space an image file belongs to, from its extension (the one dispatch point)."""
    name = path.name.lower()
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        return "volume"
    if name.endswith(".gii"):
        return "surface"
    if name.endswith((".csv", ".tsv", ".txt")):
        return "regions"
    raise InputError(f"{path}: unsupported image format (expected NIfTI .nii/.nii.gz, GIfTI .gii, "
                     "or a region table .csv/.tsv/.txt)")


def _has_image(table: pd.DataFrame, name: str) -> bool:
    """Whether the manifest has image ``name`` (a column or an _lh/_rh pair) with any path in it."""
    columns = [name] if name in table else [f"{name}_{h}" for h in HEMISPHERES]
    return all(c in table for c in columns) and not table[columns].isna().all().all()


def _image_columns(table: pd.DataFrame, name: str, role: str, csv_path: Path) -> tuple[str, ...]:
    """The manifest column(s) of image ``name``: ``(name,)``, or ``(name_lh, name_rh)``."""
    if name in table:
        return (name,)
    pair = tuple(f"{name}_{h}" for h in HEMISPHERES)
    present = [c for c in pair if c in table]
    if len(present) == 1:
        other = pair[1 - pair.index(present[0])]
        raise InputError(f"{csv_path}: column '{present[0]}' for the {role} '{name}' has no partner "
                         f"column '{other}' (a hemisphere pair needs both)")
    if not present:
        _require_column(table, name, role, csv_path)
    return pair


@dataclass
class _ImageReader:
    """Reads image columns into matrices (or, lazily, checks them), building the spaces.

    Volume columns share one VolumeSpace (the first volume's grid and the mask) and surface
    columns one SurfaceSpace (the first map's vertex counts); each region column gets its own
    RegionSpace (the first table's regions). ``given`` (a trained run's space, or a dict of
    them by name) replaces building: images are checked against it.
    """

    base: Path
    csv_path: Path
    mask: str | Path | None = None
    given: Space | dict[str, Space] | None = None
    outcome: str | None = None
    lazy: bool = False

    def __post_init__(self) -> None:
        self.shared: dict[str, Space] = {}
        self.by_name: dict[str, Space] = {}
        given = self.given
        if isinstance(given, dict):
            self.by_name = dict(given)
        elif isinstance(given, RegionSpace):
            if self.outcome is not None:
                self.by_name[self.outcome] = given
        elif given is not None:
            self.shared[given.kind] = given
        for space in self.by_name.values():
            if space.kind in ("volume", "surface"):
                self.shared.setdefault(space.kind, space)

    def resolve(self, value: str) -> Path:
        path = Path(value.strip()).expanduser()
        return path if path.is_absolute() else self.base / path

    def sources(self, table: pd.DataFrame, columns: tuple[str, ...], name: str,
                subjects: list[str]) -> list[Path | tuple[Path, ...]]:
        """Per subject: the image's path, or its (left, right) paths for a column pair."""
        out = []
        for row, subject in enumerate(subjects):
            paths = []
            for column in columns:
                value = table[column].iloc[row]
                if pd.isna(value) or not str(value).strip():
                    raise InputError(f"{self.csv_path}: subject '{subject}' has no '{column}' image path")
                paths.append(self.resolve(str(value)))
            out.append(paths[0] if len(paths) == 1 else tuple(paths))
        return out

    def column_kind(self, name: str, sources: list) -> str:
        """The one kind of every file of a column (checked by extension, no file is opened)."""
        first = _files(sources[0])[0]
        kind = _image_kind(first)
        for source in sources:
            for path in _files(source):
                if _image_kind(path) != kind:
                    raise InputError(f"{path}: a {_image_kind(path)} file in column '{name}', whose first "
                                     f"file ({first.name}) is a {kind}")
        if isinstance(sources[0], tuple) and kind != "surface":
            raise InputError(f"{first}: a {name}_lh/{name}_rh column pair must hold GIfTI hemisphere "
                             f"maps, not {kind} files")
        return kind

    def read_column(self, name: str, sources: list, kind: str, subjects: list[str],
                    space_name: str) -> tuple[np.ndarray | None, Space]:
        """(matrix (n, V) float32, or None when lazy; the column's space)."""
        what = f"{name} {_KIND_NOUN[kind]}"
        space = self._space_for(space_name, kind, sources[0], subjects[0], what)
        if self.lazy:
            for subject, source in zip(subjects, sources):
                space.check_file(source, what, subject=subject)
            return None, space
        matrix = np.empty((len(subjects), space.n_features), dtype=np.float32)
        for row, (subject, source) in enumerate(zip(subjects, sources)):
            matrix[row] = space.read(source, what, subject=subject)
        return matrix, space

    def _space_for(self, space_name: str, kind: str, first, subject: str, what: str) -> Space:
        space = self.by_name.get(space_name) or (self.shared.get(kind) if kind != "regions" else None)
        if space is not None:
            if space.kind != kind:
                raise InputError(f"{_files(first)[0]}: {space_name} must be a {space.kind} like the "
                                 f"model's, got a {kind} file")
            return space
        if kind == "volume":
            img = open_volume(first, what)  # header only: the grid, not the voxels
            mask = load_mask(self.mask, shape=img.shape, affine=img.affine) if self.mask is not None else None
            space = VolumeSpace.from_image(img, mask)
        elif kind == "surface":
            files = _files(first)
            maps = [load_gifti_map(path, what) for path in files]
            space = SurfaceSpace.from_maps(maps, tuple(HEMISPHERES) if len(files) == 2 else None)
        else:
            table = load_region_table(first, what)
            space = RegionSpace(regions=table.regions, id_column=table.id_column)
        if kind != "regions":
            self.shared[kind] = space
        self.by_name[space_name] = space
        return space


def _files(source) -> tuple[Path, ...]:
    return tuple(source) if isinstance(source, tuple) else (source,)


def _split_indices(split: list[str] | None, n: int, seed: int,
                   val_fraction: float) -> dict[str, np.ndarray]:
    everyone = np.arange(n)
    if split is None:
        train, val = _holdout(everyone, seed, val_fraction)
        return {"train": train, "val": val, "test": everyone}
    labels = np.asarray(split)
    indices = {name: everyone[labels == name] for name in SPLITS}
    if len(indices["val"]) == 0:
        indices["train"], indices["val"] = _holdout(indices["train"], seed, val_fraction)
    return indices


def _holdout(indices: np.ndarray, seed: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, val) split of ``indices``: val gets ``fraction`` of them (rounded), at
    least one when there are two or more and ``fraction`` > 0, and train keeps at least one."""
    n = len(indices)
    n_val = min(max(int(round(fraction * n)), 1), n - 1) if n >= 2 and fraction > 0 else 0
    chosen = np.random.default_rng(seed).permutation(n)[:n_val]
    is_val = np.zeros(n, dtype=bool)
    is_val[chosen] = True
    return indices[~is_val], indices[is_val]


def _flat_space(n_features: int) -> VolumeSpace:
    return VolumeSpace(shape=(n_features, 1, 1), affine=np.eye(4), header=None,
                       mask=np.ones((n_features, 1, 1), dtype=bool))
