"""File reading and writing that never leaves half-written outputs behind.

Every writer here first writes to a temporary name in the destination folder and then
renames it into place with ``os.replace``, which is atomic on one file system: a reader
(or a user after a crash) sees either the old file or the complete new one.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np

from .errors import InputError

# nibabel's own default; prediction writes many maps per subject, so speed beats the
# few percent of disk a higher level would save.
_GZIP_LEVEL = 1


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary sibling file, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
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
               path: str | Path) -> None:
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
        # mtime=0 keeps identical maps byte-identical across runs.
        payload = gzip.compress(payload, compresslevel=_GZIP_LEVEL, mtime=0)
    atomic_write_bytes(path, payload)


def _short_reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())[:200]


def load_volume(path: str | Path, what: str = "image") -> nib.Nifti1Image:
    """Load a 3D NIfTI volume fully into memory, or raise InputError naming the file.

    ``what`` says what the file is for ("image", "mask", ...) in error messages.
    A 4D image whose extra dimensions all have size 1 is squeezed to 3D; a real 4D
    (time series) image is an error. The returned image holds its data in memory as
    float32 (``img.dataobj`` is an ndarray), keeping the file's affine and header.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {what} file not found")
    if path.is_dir():
        raise InputError(f"{path}: {what} is a folder, not an image file")
    try:
        img = nib.load(str(path))
        if not isinstance(img, nib.spatialimages.SpatialImage):
            raise InputError(f"{path}: {what} is not a volume image ({type(img).__name__})")
        # nibabel reads lazily: force the read here, so a truncated or corrupt gzip
        # stream is reported now, with the file name, rather than deep inside training.
        data = np.asanyarray(img.dataobj, dtype=np.float32)
    except InputError:
        raise
    except nib.filebasedimages.ImageFileError:
        # nibabel's own text just repeats the path; say what it means instead.
        raise InputError(f"{path}: cannot read {what} (not a NIfTI file, or the file is damaged)") from None
    except Exception as exc:  # nibabel, gzip and zlib raise many unrelated types
        raise InputError(f"{path}: cannot read {what} ({_short_reason(exc)})") from None
    shape = data.shape
    if len(shape) > 3 and all(size == 1 for size in shape[3:]):
        data = data.reshape(shape[:3])
    if data.ndim != 3:
        raise InputError(f"{path}: {what} must be a 3D volume, got shape {shape}")
    header = img.header if isinstance(img.header, nib.Nifti1Header) else None
    loaded = nib.Nifti1Image(data, img.affine, header)
    return loaded
