"""Reading a cohort manifest: its columns, subject ids, splits, covariates and image files.

Every check here reports one InputError line naming the manifest (or image) and the problem.
``ImageReader`` reads image columns into matrices (or, lazily, only checks them) and builds each
column's space; the extension of a manifest cell decides the kind of space (``image_kind``).
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
from .covariates import is_numeric
from .io import load_gifti_map, load_region_table, open_volume
from .spaces import HEMISPHERES, RegionSpace, Space, SurfaceSpace, VolumeSpace, load_mask


SPLITS = ("train", "val", "test")
SUBJECT_COLUMN = "subject"
SPLIT_COLUMN = "split"
DEFAULT_VAL_FRACTION = 0.2
# Enough of the file to tell text from binary without reading a large file.
_SNIFF_BYTES = 8192

# ----- manifest parsing -----------------------------------------------------------------
def read_manifest(csv_path: Path) -> pd.DataFrame:
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


def check_input_names(inputs: Sequence[str], outcome: str | None, csv_path: Path) -> list[str]:
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


def subject_ids(table: pd.DataFrame, csv_path: Path) -> list[str]:
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


def split_labels(values: pd.Series, subjects: list[str], source: str | Path) -> list[str]:
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


def covariate_columns(table: pd.DataFrame, requested: Sequence[str] | None,
                       image_columns: set[str], csv_path: Path) -> list[str]:
    if requested is not None:
        for column in requested:  # named ones may hold text (a categorical covariate)
            _require_column(table, column, "covariate", csv_path)
        return list(requested)
    # Other numeric columns; text columns (unused image paths, notes) are ignored.
    reserved = {SUBJECT_COLUMN, SPLIT_COLUMN} | image_columns
    return [column for column in table.columns
            if column not in reserved and is_numeric(table[column])]


def read_cohort_json(path: Path) -> dict[str, Any]:
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
KIND_NOUN = {"volume": "image", "surface": "surface map", "regions": "region table"}


def image_kind(path: Path) -> str:
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


def has_image(table: pd.DataFrame, name: str) -> bool:
    """Whether the manifest has image ``name`` (a column or an _lh/_rh pair) with any path in it."""
    columns = [name] if name in table else [f"{name}_{h}" for h in HEMISPHERES]
    return all(c in table for c in columns) and not table[columns].isna().all().all()


def image_columns(table: pd.DataFrame, name: str, role: str, csv_path: Path) -> tuple[str, ...]:
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
class ImageReader:
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
                subjects: list[str]) -> list[Path | tuple[Path, ...] | None]:
        """Per subject: the image's path, its (left, right) paths for a column pair, or None where
        the cell is empty (the image was not acquired; a pair needs both cells or neither)."""
        out = []
        for row, subject in enumerate(subjects):
            paths = []
            for column in columns:
                value = table[column].iloc[row]
                empty = pd.isna(value) or not str(value).strip()
                paths.append(None if empty else self.resolve(str(value)))
            if all(p is None for p in paths):
                out.append(None)
            elif any(p is None for p in paths):
                gap = columns[paths.index(None)]
                raise InputError(f"{self.csv_path}: subject '{subject}' has no '{gap}' image path but has "
                                 f"the other hemisphere of '{name}' (give both or leave both empty)")
            else:
                out.append(paths[0] if len(paths) == 1 else tuple(paths))
        if all(source is None for source in out):
            raise InputError(f"{self.csv_path}: column '{name}' has no image path in any row")
        return out

    def column_kind(self, name: str, sources: list) -> str:
        """The one kind of every file of a column (checked by extension, no file is opened)."""
        sources = [source for source in sources if source is not None]
        first = _files(sources[0])[0]
        kind = image_kind(first)
        for source in sources:
            for path in _files(source):
                if image_kind(path) != kind:
                    raise InputError(f"{path}: a {image_kind(path)} file in column '{name}', whose first "
                                     f"file ({first.name}) is a {kind}")
        if isinstance(sources[0], tuple) and kind != "surface":
            raise InputError(f"{first}: a {name}_lh/{name}_rh column pair must hold GIfTI hemisphere "
                             f"maps, not {kind} files")
        return kind

    def read_column(self, name: str, sources: list, kind: str, subjects: list[str],
                    space_name: str) -> tuple[np.ndarray | None, Space]:
        """(matrix (n, V) float32, or None when lazy; the column's space). Rows of subjects
        without the image (source None) are NaN (``missing.py``)."""
        what = f"{name} {KIND_NOUN[kind]}"
        first = next(i for i, source in enumerate(sources) if source is not None)
        space = self._space_for(space_name, kind, sources[first], subjects[first], what)
        if self.lazy:
            for subject, source in zip(subjects, sources):
                if source is not None:
                    space.check_file(source, what, subject=subject)
            return None, space
        matrix = np.full((len(subjects), space.n_features), np.nan, dtype=np.float32)
        for row, (subject, source) in enumerate(zip(subjects, sources)):
            if source is not None:
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
