"""NIfTI volumes: the voxels inside a brain mask of a 3-D grid, read through nibabel proxies and nilearn masking.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import nibabel as nib
import numpy as np
from nilearn import masking

from ...errors import InputError
from ..io import load_volume, open_volume, read_volume_data, save_nifti


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

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        self.mask = np.asarray(self.mask, dtype=bool)
        self._flat = np.flatnonzero(self.mask)  # the mask's voxels, C order (as nilearn's apply_mask)
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

    def feature_coordinates(self) -> np.ndarray:
        """(V, 3) positions in mm of the features (mask voxels in C order), up to the affine's offset:
        what distances between features need (random regions of the joint calibration)."""
        ijk = np.argwhere(np.asarray(self.mask, dtype=bool)).astype(np.float64)
        return ijk @ np.asarray(self.affine)[:3, :3].T

    def neighbour_pairs(self) -> np.ndarray:
        """(E, 2) int64 feature indices of the mask voxels that share a face (6-connectivity), each
        pair once: the graph of the predictor's spatial smoothing prior (model/smoothing.py)."""
        mask = np.asarray(self.mask, dtype=bool)
        index = np.full(mask.shape, -1, dtype=np.int64)
        index[mask] = np.arange(int(mask.sum()))
        pairs = []
        for axis in range(3):
            n = mask.shape[axis]
            first = np.take(index, np.arange(n - 1), axis=axis)
            second = np.take(index, np.arange(1, n), axis=axis)
            both = (first >= 0) & (second >= 0)
            pairs.append(np.stack([first[both], second[both]], axis=1))
        return np.concatenate(pairs).reshape(-1, 2)

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

    def read(self, path: str | Path, what: str = "image", subject: str | None = None) -> np.ndarray:
        """The (V,) float32 feature vector of the NIfTI file at ``path`` (``subject`` is unused).

        The header is checked first, then the voxels are read in one pass and the mask's voxels
        taken in C order (as nilearn's ``apply_mask``). One pass: a gzip stream is decompressed
        front to back whatever is asked, and nibabel's reads of a sub-box, slab by slab, cost 4x
        more at 2 mm; memory holds one image while it is read.
        """
        img = open_volume(path, what)
        self.check_image(img, path, what)
        vector = read_volume_data(img, path, what).reshape(-1).take(self._flat)
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



@dataclass(eq=False)
class ArraySpace(VolumeSpace):
    """The features of in-memory arrays whose geometry is unknown (``Cohort.from_arrays`` without a space).

    Written as (V, 1, 1) NIfTI volumes, so predictions still become files; but it has no grid, no
    coordinates and no neighbours, so nothing spatial (the smoothing prior, SSIM, random regions,
    convolutions) is read into the order of the features."""

    kind: ClassVar[str] = "array"

    @classmethod
    def of_size(cls, n_features: int) -> "ArraySpace":
        return cls(shape=(n_features, 1, 1), affine=np.eye(4), header=None,
                   mask=np.ones((n_features, 1, 1), dtype=bool))

    @property
    def grid_shape(self) -> None:
        return None

    def feature_coordinates(self) -> None:
        return None

    def neighbour_pairs(self) -> None:
        return None

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
