"""Feature spaces: how one subject's feature vector maps to and from an image file.

The model sees every image as a vector of V features. A *space* knows which file
positions those features come from (the voxels inside a mask, for volumes) and how to
write a vector back as a file in the input's own format. A run folder stores its spaces
with ``to_dict`` (JSON, no pickle) and rebuilds them with ``space_from_dict``.

Three kinds, with the same methods (``n_features``, ``extension``, ``grid_shape``,
``read``, ``write``, ``to_dict``/``from_dict``), registered in ``SPACE_KINDS``:

- ``VolumeSpace``: NIfTI voxels inside a mask, read through nibabel proxies and nilearn masking;
- ``SurfaceSpace``: GIfTI per-vertex maps, one hemisphere or a left/right pair;
- ``RegionSpace``: named regions of a table whose rows are subjects (aparcstats2table layout).

``grid_shape`` is the 2-D/3-D grid SSIM and slice figures need, or None when the features do
not lie on a grid (surfaces, regions). ``write`` returns the paths it wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import nibabel as nib
import numpy as np
from nilearn import masking

from ..errors import InputError
from .io import (load_gifti_map, load_region_table, load_volume, open_volume, read_volume_data,
                 save_gifti_map, save_nifti, save_region_table)

# Tolerance for "same affine": voxel sizes and origins are stored as float32 in NIfTI,
# so images written by different tools differ in the last digits.
AFFINE_ATOL = 1e-4


@dataclass(eq=False)
class VolumeSpace:
    """Voxels inside a boolean mask of a 3D grid with a fixed affine.

    Features are the mask's True voxels in C (row-major) order, the order nilearn's
    ``apply_mask`` uses and ``np.flatnonzero(mask)`` lists.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    header: nib.Nifti1Header | None
    mask: np.ndarray

    kind: ClassVar[str] = "volume"
    extension: ClassVar[str] = ".nii.gz"  # of the files ``write`` makes
    _mask_img: nib.Nifti1Image | None = field(default=None, init=False, repr=False)
    _box: tuple[slice, slice, slice] | None = field(default=None, init=False, repr=False)
    _box_mask_img: nib.Nifti1Image | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        self.mask = np.asarray(self.mask, dtype=bool)
        if len(self.shape) != 3:
            raise ValueError(f"VolumeSpace needs a 3D shape, got {self.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"VolumeSpace needs a 4x4 affine, got {self.affine.shape}")
        if self.mask.shape != self.shape:
            raise ValueError(f"mask shape {self.mask.shape} differs from shape {self.shape}")
        if not self.mask.any():
            raise ValueError("VolumeSpace mask is empty")

    # ----- construction -------------------------------------------------------------
    @classmethod
    def from_image(cls, img: nib.Nifti1Image, mask: np.ndarray | None = None) -> "VolumeSpace":
        """The space of a loaded reference image; ``mask`` None means every voxel."""
        shape = tuple(img.shape[:3])
        if mask is None:
            mask = np.ones(shape, dtype=bool)
        return cls(shape=shape, affine=img.affine, header=img.header.copy(), mask=mask)

    @classmethod
    def from_files(cls, reference: str | Path, mask: str | Path | None = None) -> "VolumeSpace":
        """The space of the image at ``reference``, restricted to the mask file if given."""
        ref_img = load_volume(reference, "image")
        mask_array = load_mask(mask, shape=ref_img.shape, affine=ref_img.affine) if mask else None
        return cls.from_image(ref_img, mask_array)

    # ----- features <-> arrays ------------------------------------------------------
    @property
    def n_features(self) -> int:
        return int(self.mask.sum())

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """``shape`` without singleton dims, e.g. (32, 32, 1) -> (32, 32): the grid SSIM sees."""
        kept = tuple(s for s in self.shape if s != 1)
        return kept if kept else (1,)

    def _mask_image(self) -> nib.Nifti1Image:
        if self._mask_img is None:
            self._mask_img = nib.Nifti1Image(self.mask.astype(np.uint8), self.affine)
        return self._mask_img

    def to_vector(self, array3d: np.ndarray) -> np.ndarray:
        """The (V,) float32 feature vector of a 3D array on this grid. Non-finite values are kept."""
        array3d = np.asarray(array3d, dtype=np.float32)
        if array3d.shape != self.shape:
            raise ValueError(f"array shape {array3d.shape} differs from space shape {self.shape}")
        img = nib.Nifti1Image(array3d, self.affine)
        # ensure_finite=False: nilearn would silently zero NaN/Inf, but the cohort must see
        # them to report the offending file.
        return masking.apply_mask(img, self._mask_image(), dtype=np.float32, ensure_finite=False)

    def to_volume(self, vector: np.ndarray) -> np.ndarray:
        """The 3D float32 array of a (V,) vector, zero outside the mask."""
        vector = self._check_vector(vector)
        img = masking.unmask(vector, self._mask_image())
        return np.asarray(img.dataobj, dtype=np.float32)

    def to_grid(self, matrix: np.ndarray) -> np.ndarray:
        """(n, V) -> (n, *grid_shape), zeros outside the mask (for SSIM and figures)."""
        matrix = np.asarray(matrix, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape[1] != self.n_features:
            raise ValueError(f"expected shape (n, {self.n_features}), got {matrix.shape}")
        # Plain indexing: nilearn's unmask would return a 4D image with subjects last,
        # needing an image round trip and a transpose for the same result.
        grid = np.zeros((matrix.shape[0], *self.shape), dtype=np.float32)
        grid[:, self.mask] = matrix
        return grid.reshape(matrix.shape[0], *self.grid_shape)

    def _check_vector(self, vector: np.ndarray) -> np.ndarray:
        vector = np.asarray(vector, dtype=np.float32)
        if vector.shape != (self.n_features,):
            raise ValueError(f"expected a vector of {self.n_features} features, got shape {vector.shape}")
        return vector

    # ----- files --------------------------------------------------------------------
    def check_image(self, img: nib.Nifti1Image, path: str | Path, what: str = "image") -> None:
        """Raise InputError naming ``path`` if ``img`` is not on this space's grid."""
        if tuple(img.shape[:3]) != self.shape or len(img.shape) < 3:
            raise InputError(f"{path}: {what} shape {tuple(img.shape)} differs from the cohort's {self.shape}")
        if not np.allclose(img.affine, self.affine, atol=AFFINE_ATOL):
            worst = float(np.abs(img.affine - self.affine).max())
            raise InputError(f"{path}: {what} affine differs from the cohort's "
                             f"(largest difference {worst:.4g}; images must share one space)")

    def vector_from_image(self, img: nib.Nifti1Image, path: str | Path, what: str = "image") -> np.ndarray:
        """The checked feature vector of a loaded image: same grid, finite inside the mask."""
        self.check_image(img, path, what)
        vector = self.to_vector(np.asanyarray(img.dataobj))
        bad = ~np.isfinite(vector)
        if bad.any():
            raise InputError(f"{path}: {what} has {int(bad.sum())} NaN/Inf voxel(s) inside the mask")
        return vector

    def _mask_box(self) -> tuple[tuple[slice, slice, slice], nib.Nifti1Image]:
        """The mask's bounding box, and the mask cropped to it as an image on the box's grid."""
        if self._box is None:
            nonzero = np.nonzero(self.mask)
            self._box = tuple(slice(int(ix.min()), int(ix.max()) + 1) for ix in nonzero)
            corner = np.array([b.start for b in self._box] + [1.0])
            box_affine = self.affine.copy()
            box_affine[:, 3] = self.affine @ corner  # the box's first voxel is its origin
            self._box_mask_img = nib.Nifti1Image(self.mask[self._box].astype(np.uint8), box_affine)
        return self._box, self._box_mask_img

    def read(self, path: str | Path, what: str = "image", subject: str | None = None) -> np.ndarray:
        """The (V,) float32 feature vector of the NIfTI file at ``path`` (``subject`` is unused).

        Lazy: the header is checked first, then only the mask's bounding box is read through
        nibabel's array proxy and masked with nilearn, so memory holds one box, not the file.
        """
        img = open_volume(path, what)
        self.check_image(img, path, what)
        box, box_mask = self._mask_box()
        data = read_volume_data(img, path, what, box)
        # ensure_finite=False: nilearn would silently zero NaN/Inf; they must be reported.
        vector = masking.apply_mask(nib.Nifti1Image(data, box_mask.affine), box_mask,
                                    dtype=np.float32, ensure_finite=False)
        bad = ~np.isfinite(vector)
        if bad.any():
            raise InputError(f"{path}: {what} has {int(bad.sum())} NaN/Inf voxel(s) inside the mask")
        return vector

    def check_file(self, path: str | Path, what: str = "image", subject: str | None = None) -> None:
        """Cheap check that a file is on this grid: header only, no voxel data is read."""
        self.check_image(open_volume(path, what), path, what)

    def write(self, vector: np.ndarray, path: str | Path) -> list[Path]:
        """Write a (V,) vector as a float32 NIfTI with this space's affine and header."""
        save_nifti(self.to_volume(vector), self.affine, self.header, path)
        return [Path(path)]

    # ----- persistence --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able description; the mask is stored as the flat (C order) indices of its voxels."""
        return {
            "kind": self.kind,
            "shape": list(self.shape),
            "affine": self.affine.tolist(),
            "header": _header_to_dict(self.header) if self.header is not None else None,
            "mask_indices": np.flatnonzero(self.mask).tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VolumeSpace":
        shape = tuple(int(s) for s in d["shape"])
        mask = np.zeros(int(np.prod(shape)), dtype=bool)
        mask[np.asarray(d["mask_indices"], dtype=np.int64)] = True
        header = _header_from_dict(d["header"], shape) if d.get("header") is not None else None
        return cls(shape=shape, affine=np.asarray(d["affine"], dtype=np.float64),
                   header=header, mask=mask.reshape(shape))


def _header_to_dict(header: nib.Nifti1Header) -> dict[str, Any]:
    # Only what outputs need to look like the inputs in a viewer: voxel sizes, both
    # orientation matrices with their codes, and units. Intensity scaling, data type and
    # description are per file, and save_nifti sets them.
    qform, qform_code = header.get_qform(coded=True)
    sform, sform_code = header.get_sform(coded=True)
    return {
        "zooms": [float(z) for z in header.get_zooms()[:3]],
        "qform": None if qform is None else qform.tolist(),
        "qform_code": int(qform_code),
        "sform": None if sform is None else sform.tolist(),
        "sform_code": int(sform_code),
        "xyzt_units": int(header["xyzt_units"]),
    }


def _header_from_dict(d: dict[str, Any], shape: tuple[int, ...]) -> nib.Nifti1Header:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    if d["qform"] is not None:
        header.set_qform(np.asarray(d["qform"]), int(d["qform_code"]))
    if d["sform"] is not None:
        header.set_sform(np.asarray(d["sform"]), int(d["sform_code"]))
    # After the forms: set_qform recomputes zooms from the matrix, the stored ones win.
    header.set_zooms(tuple(d["zooms"]))
    header["xyzt_units"] = int(d["xyzt_units"])
    return header


def load_mask(path: str | Path, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """Load a binary mask file that must lie on the given grid; returns a bool array.

    Nonzero voxels are in. A mask with several distinct nonzero values (e.g. a
    probability map) is refused rather than guessed at: threshold it first.
    """
    img = load_volume(path, "mask")
    data = np.asanyarray(img.dataobj)
    if tuple(img.shape) != tuple(shape[:3]):
        raise InputError(f"{path}: mask shape {tuple(img.shape)} differs from the images' {tuple(shape[:3])}")
    if not np.allclose(img.affine, affine, atol=AFFINE_ATOL):
        raise InputError(f"{path}: mask affine differs from the images' (the mask must be in the same space)")
    if not np.isfinite(data).all():
        raise InputError(f"{path}: mask has NaN/Inf voxels")
    nonzero_values = np.unique(data[data != 0])
    if nonzero_values.size > 1:
        raise InputError(f"{path}: mask is not binary ({nonzero_values.size} distinct nonzero values); "
                         "threshold it first")
    mask = data != 0
    if not mask.any():
        raise InputError(f"{path}: mask is empty (no nonzero voxels)")
    return mask


# GIfTI structure names of the two cortical hemispheres, and the short labels used in
# column and file names (FreeSurfer's lh./rh. prefixes).
HEMISPHERES = {"lh": "CortexLeft", "rh": "CortexRight"}
_LABEL_OF_STRUCTURE = {structure: label for label, structure in HEMISPHERES.items()}


def surface_sources(source: str | Path | tuple) -> tuple[Path, ...]:
    """A surface image's files: one path, or the (left, right) pair of paths."""
    if isinstance(source, (tuple, list)):
        return tuple(Path(p) for p in source)
    return (Path(source),)


@dataclass(eq=False)
class SurfaceSpace:
    """Vertices of one or two surface meshes (GIfTI per-vertex maps).

    ``parts`` lists ``(label, n_vertices)`` per file: one part for a map given as a single
    GIfTI per subject, or ``("lh", n_left), ("rh", n_right)`` for a hemisphere pair (two
    manifest columns NAME_lh and NAME_rh). Features are the parts' vertices in order, so a
    pair is the left hemisphere's vertices followed by the right's. ``structures`` keeps each
    part's GIfTI AnatomicalStructurePrimary (e.g. CortexLeft) to write it back on outputs.
    """

    parts: tuple[tuple[str, int], ...]
    structures: tuple[str | None, ...] = ()

    kind: ClassVar[str] = "surface"
    extension: ClassVar[str] = ".gii"

    def __post_init__(self) -> None:
        self.parts = tuple((str(label), int(n)) for label, n in self.parts)
        if not self.parts or any(n < 1 for _, n in self.parts):
            raise ValueError(f"SurfaceSpace needs parts with vertices, got {self.parts}")
        labels = [label for label, _ in self.parts]
        if len(set(labels)) != len(labels):
            raise ValueError(f"SurfaceSpace part labels must differ, got {labels}")
        structures = tuple(self.structures) or tuple(HEMISPHERES.get(label) for label in labels)
        if len(structures) != len(self.parts):
            raise ValueError("SurfaceSpace needs one structure per part")
        self.structures = structures

    @classmethod
    def from_maps(cls, maps: list[tuple[np.ndarray, str | None]], labels: tuple[str, ...] | None = None):
        """The space of one subject's loaded maps (``load_gifti_map`` results), one per part."""
        if labels is None:
            if len(maps) != 1:
                raise ValueError("labels are needed for several parts")
            labels = (_LABEL_OF_STRUCTURE.get(maps[0][1], "surface"),)
        return cls(parts=tuple((label, data.size) for label, (data, _) in zip(labels, maps)),
                   structures=tuple(structure or HEMISPHERES.get(label) for label, (_, structure)
                                    in zip(labels, maps)))

    @property
    def n_features(self) -> int:
        return sum(n for _, n in self.parts)

    @property
    def grid_shape(self) -> None:
        """None: vertices are not on a grid (no SSIM, no slice figures)."""
        return None

    @property
    def n_vertices(self) -> dict[str, int]:
        return dict(self.parts)

    def split(self, vector: np.ndarray) -> list[np.ndarray]:
        """A (..., V) array cut into its parts' (..., n_vertices) pieces."""
        vector = np.asarray(vector)
        if vector.shape[-1] != self.n_features:
            raise ValueError(f"expected {self.n_features} features, got shape {vector.shape}")
        bounds = np.cumsum([0] + [n for _, n in self.parts])
        return [vector[..., a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def read(self, path: str | Path | tuple, what: str = "surface map",
             subject: str | None = None) -> np.ndarray:
        """The (V,) float32 vector of one subject's file(s): a path, or the (left, right) pair."""
        paths = surface_sources(path)
        if len(paths) != len(self.parts):
            raise InputError(f"{paths[0]}: {what} is {len(paths)} file(s); this surface space has "
                             f"{len(self.parts)} part(s) ({', '.join(label for label, _ in self.parts)})")
        pieces = []
        for file, (label, n) in zip(paths, self.parts):
            data, _ = load_gifti_map(file, what)
            if data.size != n:
                where = "" if len(self.parts) == 1 else f" ({label})"
                raise InputError(f"{file}: {what}{where} has {data.size} vertices; the cohort's "
                                 f"surface has {n}")
            bad = ~np.isfinite(data)
            if bad.any():
                raise InputError(f"{file}: {what} has {int(bad.sum())} NaN/Inf vertex value(s)")
            pieces.append(data)
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def check_file(self, path, what: str = "surface map", subject: str | None = None) -> None:
        self.read(path, what)  # GIfTI has no separate header: checking is reading (small files)

    def output_paths(self, path: str | Path) -> list[Path]:
        """The files ``write(vector, path)`` makes: ``path`` itself for one part, else
        ``{stem}_lh.gii`` and ``{stem}_rh.gii`` beside it for a hemisphere pair."""
        path = Path(path)
        if len(self.parts) == 1:
            return [path]
        stem = path.name[: -len(".gii")] if path.name.endswith(".gii") else path.name
        return [path.with_name(f"{stem}_{label}.gii") for label, _ in self.parts]

    def write(self, vector: np.ndarray, path: str | Path) -> list[Path]:
        """Write a (V,) vector as float32 GIfTI map(s) with the input's vertex counts."""
        vector = np.asarray(vector, dtype=np.float32)
        if vector.shape != (self.n_features,):
            raise ValueError(f"expected a vector of {self.n_features} features, got shape {vector.shape}")
        paths = self.output_paths(path)
        for file, piece, structure in zip(paths, self.split(vector), self.structures):
            save_gifti_map(piece, file, structure)
        return paths

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "parts": [[label, n] for label, n in self.parts],
                "structures": list(self.structures)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SurfaceSpace":
        return cls(parts=tuple((label, int(n)) for label, n in d["parts"]),
                   structures=tuple(d.get("structures") or ()))


@dataclass(eq=False)
class RegionSpace:
    """Named regions, read from tables whose rows are subjects (aparcstats2table layout).

    A subject's vector is its row (found by subject id in the table's first column) at the
    columns ``regions``, in this order, whatever the column order of a later table; extra
    columns in a later table are ignored, missing ones are an error. ``id_column`` is the
    header of the first column, written back on outputs.
    """

    regions: tuple[str, ...]
    id_column: str = "subject"

    kind: ClassVar[str] = "regions"
    extension: ClassVar[str] = ".csv"

    def __post_init__(self) -> None:
        self.regions = tuple(str(r) for r in self.regions)
        if not self.regions:
            raise ValueError("RegionSpace needs at least one region")
        if len(set(self.regions)) != len(self.regions):
            raise ValueError("RegionSpace region names must be unique")
        self._index: dict[tuple[str, ...], np.ndarray] = {}

    @property
    def n_features(self) -> int:
        return len(self.regions)

    @property
    def grid_shape(self) -> None:
        """None: regions are not on a grid (no SSIM, no slice figures)."""
        return None

    def _columns(self, table, path: Path, what: str) -> np.ndarray:
        """Positions of this space's regions in ``table`` (cached per column layout)."""
        columns = self._index.get(table.regions)
        if columns is None:
            position = {region: j for j, region in enumerate(table.regions)}
            missing = [region for region in self.regions if region not in position]
            if missing:
                shown = ", ".join(f"'{r}'" for r in missing[:3]) + (", ..." if len(missing) > 3 else "")
                raise InputError(f"{path}: {what} lacks {len(missing)} of the cohort's "
                                 f"{len(self.regions)} regions ({shown})")
            columns = np.array([position[region] for region in self.regions], dtype=np.int64)
            self._index[table.regions] = columns
        return columns

    def read(self, path: str | Path, what: str = "region table", subject: str | None = None) -> np.ndarray:
        """The (V,) float32 vector of ``subject``'s row (or of the only row, when subject is None)."""
        path = Path(path)
        table = load_region_table(path, what)
        if subject is None:
            if len(table.ids) != 1:
                raise InputError(f"{path}: {what} has {len(table.ids)} rows; say which subject to read")
            row = 0
        else:
            row = table.row(subject)
            if row is None:
                raise InputError(f"{path}: {what} has no row for subject '{subject}' "
                                 f"(first column '{table.id_column}')")
        vector = table.values[row, self._columns(table, path, what)]
        bad = ~np.isfinite(vector)
        if bad.any():
            first = self.regions[int(np.flatnonzero(bad)[0])]
            raise InputError(f"{path}: {what} has {int(bad.sum())} missing or NaN/Inf value(s) for "
                             f"subject '{table.ids[row]}' (e.g. region '{first}')")
        return vector.astype(np.float32)

    def check_file(self, path, what: str = "region table", subject: str | None = None) -> None:
        self.read(path, what, subject)  # tables are small and cached

    def write(self, vector: np.ndarray, path: str | Path) -> list[Path]:
        """Write a (V,) vector as a one-row CSV with the same region names (first cell: the file's
        name without extension, under the input's id-column header)."""
        vector = np.asarray(vector, dtype=np.float32)
        if vector.shape != (self.n_features,):
            raise ValueError(f"expected a vector of {self.n_features} features, got shape {vector.shape}")
        save_region_table(vector, self.regions, path, id_column=self.id_column)
        return [Path(path)]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "regions": list(self.regions), "id_column": self.id_column}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RegionSpace":
        return cls(regions=tuple(d["regions"]), id_column=str(d.get("id_column", "subject")))


Space = VolumeSpace | SurfaceSpace | RegionSpace

# kind -> class with from_dict.
SPACE_KINDS: dict[str, type] = {cls.kind: cls for cls in (VolumeSpace, SurfaceSpace, RegionSpace)}


def space_from_dict(d: dict[str, Any], source: str | Path = "space") -> Space:
    """Rebuild a space saved with ``to_dict``; ``source`` names the file in error messages."""
    if not isinstance(d, dict) or "kind" not in d:
        raise InputError(f"{source}: not a saved space (no 'kind')")
    cls = SPACE_KINDS.get(d["kind"])
    if cls is None:
        raise InputError(f"{source}: unknown space kind {d['kind']!r} (known: {', '.join(SPACE_KINDS)})")
    try:
        return cls.from_dict(d)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise InputError(f"{source}: corrupt {d['kind']} space ({exc})") from None
