"""File reading and writing that never leaves half-written outputs behind.

Every writer here first writes to a temporary name in the destination folder and then
renames it into place with ``os.replace``, which is atomic on one file system: a reader
(or a user after a crash) sees either the old file or the complete new one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np

from ..errors import InputError
from .gz import first_member, gzip_bytes


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (temporary sibling file, then rename).

    ``fsync=False`` skips forcing the bytes to disk before the rename: right for the many files
    written inside a fresh ``atomic_dir`` (simulated cohorts), where the folder as a whole
    appears only at the end and a per-file flush would dominate the run time.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        # mkstemp creates files readable by the owner only; give the usual permissions.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Build an output folder under a temporary name and move it into place at the end.

    Yields a fresh, empty sibling folder ``.{name}.tmp-XXXX`` next to ``out``. On normal
    exit it replaces ``out`` (a previous ``out`` is moved aside, then deleted); on an
    exception the temporary folder is deleted and the exception re-raised, leaving any
    previous ``out`` untouched. So a failed run never leaves a half-written folder.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # mkdtemp makes an owner-only folder; the result should look like any other folder.
    os.chmod(tmp, 0o777 & ~_umask())
    if not out.exists():
        os.replace(tmp, out)
        return
    # A folder cannot be os.replace'd onto a non-empty folder: move the old one aside
    # first, so the only window without a complete `out` is between two renames.
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    try:
        os.replace(out, aside / out.name)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(aside / out.name, out)  # put the previous result back
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def save_nifti(array3d: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None,
               path: str | Path, fsync: bool = True) -> None:
    """Save a 3D array as float32 NIfTI (``.nii`` or ``.nii.gz``) atomically.

    The affine and a copy of ``header`` (zooms, qform/sform codes, units, ...) are kept;
    the data type is set to float32 and any intensity scaling of the source is dropped,
    since the values written are already final.
    """
    path = Path(path)
    data = np.asarray(array3d, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"save_nifti expects a 3D array, got shape {data.shape}")
    header = header.copy() if header is not None else None
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64), header)
    img.set_data_dtype(np.float32)
    # Display range of the source image would be wrong for predicted values.
    img.header["cal_min"] = 0
    img.header["cal_max"] = 0
    payload = img.to_bytes()
    if path.name.endswith(".gz"):
        payload = gzip_bytes(payload)
    atomic_write_bytes(path, payload, fsync=fsync)


def _short_reason(exc: BaseException, width: int = 200) -> str:
    """A library's error message on one line, shortened at a word boundary (never mid-word)."""
    text = str(exc).strip() or type(exc).__name__
    return textwrap.shorten(text, width=width, placeholder=" ...")


def open_volume(path: str | Path, what: str = "image") -> nib.spatialimages.SpatialImage:
    """Open a NIfTI file lazily: the header is read and checked, the voxels stay on disk.

    The returned image's ``dataobj`` is a nibabel array proxy, so slicing it reads only
    what is asked for (for ``.nii`` files; a ``.nii.gz`` is decompressed up to the slice).
    Errors (missing file, not an image, a real 4D series) are InputErrors naming the file;
    damaged voxel data is only detected when it is read (``read_volume_data``).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {what} file not found")
    if path.is_dir():
        raise InputError(f"{path}: {what} is a folder, not an image file")
    try:
        img = nib.load(str(path))
    except nib.filebasedimages.ImageFileError:
        raise InputError(f"{path}: cannot read {what} (not a NIfTI file, or the file is damaged)") from None
    except Exception as exc:  # nibabel, gzip and zlib raise many unrelated types
        raise InputError(f"{path}: cannot read {what} ({_short_reason(exc)})") from None
    if not isinstance(img, nib.spatialimages.SpatialImage):
        raise InputError(f"{path}: {what} is not a volume image ({type(img).__name__})")
    shape = tuple(img.shape)
    if len(shape) < 3 or (len(shape) > 3 and any(size != 1 for size in shape[3:])):
        raise InputError(f"{path}: {what} must be a 3D volume, got shape {shape}")
    return img


def read_volume_data(img: nib.spatialimages.SpatialImage, path: str | Path, what: str = "image",
                     box: tuple[slice, slice, slice] | None = None) -> np.ndarray:
    """The float32 voxels of an opened volume (the sub-box ``box`` only, when given), as 3D.

    Reading goes through the proxy, so only the box is held in memory; a truncated or
    corrupt gzip stream is reported here as an InputError naming the file.
    """
    try:
        if box is None:  # the whole file in one read: gzip streams are read front to back anyway
            data = _read_whole_nifti(img, path)
            if data is None:
                data = np.asarray(img.dataobj, dtype=np.float32)
            return data.reshape(data.shape[:3])  # singleton 4th/5th dims dropped
        index = box + (0,) * (len(img.shape) - 3)  # singleton 4th/5th dims: take their one entry
        data = np.asarray(img.dataobj[index], dtype=np.float32)
    except Exception as exc:  # nibabel, gzip and zlib raise many unrelated types
        raise InputError(f"{path}: cannot read {what} ({_short_reason(exc)})") from None
    return data


def _read_whole_nifti(img, path) -> np.ndarray | None:
    """The voxels of an unscaled image file as float32, decompressed in one call by zlib-ng (gz.py;
    it releases the GIL, so several reading threads run at once; nibabel's gzip reader loops in
    Python, 8 KiB at a time). Layout (offset, dtype, order, shape) from nibabel's array proxy. None where this
    fast path does not apply or fails: nibabel then reads the file and reports any problem."""
    proxy = img.dataobj
    if not isinstance(proxy, nib.arrayproxy.ArrayProxy) or (float(proxy.slope), float(proxy.inter)) != (1.0, 0.0):
        return None
    path = Path(path)
    try:
        raw = path.read_bytes()
        shape = tuple(int(n) for n in proxy.shape)
        count, offset = int(np.prod(shape)), int(proxy.offset)
        if path.suffix == ".gz":  # a first member shorter than the image makes frombuffer fail: nibabel reads it
            raw = first_member(raw, offset + count * np.dtype(proxy.dtype).itemsize)
        array = np.frombuffer(raw, dtype=proxy.dtype, count=count, offset=offset)
        return array.reshape(shape, order=proxy.order).astype(np.float32)
    except Exception:
        return None


def load_volume(path: str | Path, what: str = "image") -> nib.Nifti1Image:
    """Load a 3D NIfTI volume fully into memory, or raise InputError naming the file.

    ``what`` says what the file is for ("image", "mask", ...) in error messages.
    A 4D image whose extra dimensions all have size 1 is squeezed to 3D; a real 4D
    (time series) image is an error. The returned image holds its data in memory as
    float32 (``img.dataobj`` is an ndarray), keeping the file's affine and header.
    Reading every voxel now reports a truncated or corrupt gzip stream here, with the file
    name, rather than deep inside training.
    """
    img = open_volume(path, what)
    data = read_volume_data(img, path, what)
    header = img.header if isinstance(img.header, nib.Nifti1Header) else None
    return nib.Nifti1Image(data, img.affine, header)


# ----- GIfTI surface maps --------------------------------------------------------------------
# GIfTI's name for the hemisphere a map lies on (AnatomicalStructurePrimary), as FreeSurfer's
# mris_convert and Connectome Workbench write it.
STRUCTURE_KEY = "AnatomicalStructurePrimary"


def load_gifti_map(path: str | Path, what: str = "surface map") -> tuple[np.ndarray, str | None]:
    """One per-vertex map from a GIfTI file: ((n_vertices,) float32, hemisphere structure or None).

    The file must hold exactly one data array of one value per vertex (a ``.shape.gii`` or
    ``.func.gii`` with a single map); a mesh (``.surf.gii``), a label file or a series of maps
    is refused, since which array is meant would be a guess.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {what} file not found")
    if path.is_dir():
        raise InputError(f"{path}: {what} is a folder, not a GIfTI file")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # XML, base64 and zlib errors are all "damaged file" to the user
        raise InputError(f"{path}: cannot read {what} (not a GIfTI file, or the file is damaged: "
                         f"{_short_reason(exc)})") from None
    if not isinstance(img, nib.gifti.GiftiImage):
        raise InputError(f"{path}: {what} is not a GIfTI image ({type(img).__name__})")
    if len(img.darrays) != 1:
        raise InputError(f"{path}: {what} has {len(img.darrays)} data arrays; expected exactly one "
                         "per-vertex map")
    array = img.darrays[0]
    if array.intent in (nib.nifti1.intent_codes["NIFTI_INTENT_POINTSET"],
                        nib.nifti1.intent_codes["NIFTI_INTENT_TRIANGLE"]):
        raise InputError(f"{path}: {what} is a surface mesh, not a per-vertex map")
    try:
        data = np.asarray(array.data, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: cannot read {what} ({_short_reason(exc)})") from None
    if data.ndim == 2 and 1 in data.shape:
        data = data.reshape(-1)
    if data.ndim != 1 or data.size == 0:
        raise InputError(f"{path}: {what} must be one value per vertex, got an array of shape {data.shape}")
    structure = img.meta.get(STRUCTURE_KEY) or array.meta.get(STRUCTURE_KEY)
    return data, structure


def save_gifti_map(vector: np.ndarray, path: str | Path, structure: str | None = None,
                   fsync: bool = True) -> None:
    """Write a per-vertex float32 map as a one-array GIfTI file atomically."""
    data = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)
    meta = {STRUCTURE_KEY: structure} if structure else {}
    array = nib.gifti.GiftiDataArray(data, intent="NIFTI_INTENT_NONE", datatype="NIFTI_TYPE_FLOAT32",
                                     meta=nib.gifti.GiftiMetaData(meta))
    img = nib.gifti.GiftiImage(darrays=[array], meta=nib.gifti.GiftiMetaData(meta))
    atomic_write_bytes(path, img.to_bytes(), fsync=fsync)


# ----- region tables -------------------------------------------------------------------------
@dataclass(frozen=True)
class RegionTable:
    """A table of region values, rows = subjects (FreeSurfer ``aparcstats2table`` layout).

    The first column holds subject ids, whatever its header (aparcstats2table writes e.g.
    ``lh.aparc.thickness``); every other column is one region.
    """

    id_column: str
    ids: tuple[str, ...]
    regions: tuple[str, ...]
    values: np.ndarray  # (n_rows, n_regions) float64

    def row(self, subject: str) -> int | None:
        try:
            return self.ids.index(subject)
        except ValueError:
            return None


def _table_separator(path: Path) -> str:
    # aparcstats2table writes tab-separated files by default (named .txt or .tsv by habit);
    # a .csv is comma-separated.
    return "," if path.name.lower().endswith(".csv") else "\t"


def _read_table_bytes(path: Path, what: str) -> bytes:
    if not path.exists():
        raise InputError(f"{path}: {what} file not found")
    if path.is_dir():
        raise InputError(f"{path}: {what} is a folder, not a table")
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise InputError(f"{path}: {what} is not a text table (binary content)")
    return raw


def _parse_region_table(path: Path, what: str, raw: bytes) -> RegionTable:
    import io as _io

    import pandas as pd

    try:
        # Text first: ids like "007" must stay strings; values are converted below.
        table = pd.read_csv(_io.BytesIO(raw), sep=_table_separator(path), dtype=str, encoding="utf-8-sig",
                            skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: {what} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: {what} is not a readable table ({_short_reason(exc)})") from None
    table.columns = [str(column).strip() for column in table.columns]
    if table.shape[1] < 2:
        raise InputError(f"{path}: {what} needs a subject-id column and at least one region column "
                         f"(separator {_table_separator(path)!r})")
    if len(table) == 0:
        raise InputError(f"{path}: {what} has no rows (header only)")
    ids = [str(value).strip() for value in table.iloc[:, 0]]
    seen: set[str] = set()
    for subject in ids:
        if subject in seen:
            raise InputError(f"{path}: {what} has subject '{subject}' twice")
        seen.add(subject)
    regions = list(table.columns[1:])
    duplicated = sorted({r for r in regions if regions.count(r) > 1})
    if duplicated or any(str(r).startswith("Unnamed:") for r in regions):
        raise InputError(f"{path}: {what} has duplicate or empty region names")
    values = np.empty((len(table), len(regions)), dtype=np.float64)
    for j, region in enumerate(regions):
        try:
            values[:, j] = pd.to_numeric(table.iloc[:, j + 1]).to_numpy(dtype=np.float64)
        except (ValueError, TypeError):
            raise InputError(f"{path}: {what} region column '{region}' is not numeric") from None
    return RegionTable(table.columns[0], tuple(ids), tuple(regions), values)


_TABLE_CACHE: dict[tuple, RegionTable] = {}
_TABLE_CACHE_SIZE = 16


def load_region_table(path: str | Path, what: str = "region table") -> RegionTable:
    """Read a region table, cached by (path, content hash).

    A cohort usually points every subject at the same aparcstats2table file, so it is parsed
    once. The key is the content's hash, not the modification time (whose granularity can hide
    a quick rewrite): reading the bytes again is cheap, parsing them is what is saved.
    """
    import hashlib

    path = Path(path)
    raw = _read_table_bytes(path, what)
    key = (str(path.resolve()), hashlib.blake2b(raw, digest_size=16).digest())
    table = _TABLE_CACHE.get(key)
    if table is None:
        table = _parse_region_table(path, what, raw)
        if len(_TABLE_CACHE) >= _TABLE_CACHE_SIZE:
            _TABLE_CACHE.pop(next(iter(_TABLE_CACHE)))
        _TABLE_CACHE[key] = table
    return table


def save_region_table(values: np.ndarray, regions: list[str] | tuple[str, ...], path: str | Path,
                      id_column: str = "subject", label: str | None = None) -> None:
    """Write one row of region values as a CSV atomically: ``id_column,region,...`` then the row.

    ``label`` (default: the file name without extension) fills the id column, so that rows
    from many output files can be concatenated and still say which map they are.
    """
    import csv
    import io as _io

    path = Path(path)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size != len(regions):
        raise ValueError(f"{values.size} values for {len(regions)} regions")
    label = label if label is not None else path.name.split(".")[0]
    buffer = _io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([id_column, *regions])
    # float32 precision is what the model produces; repr of a float32 keeps it exactly.
    writer.writerow([label, *(repr(float(np.float32(v))) for v in values)])
    atomic_write_text(path, buffer.getvalue())
