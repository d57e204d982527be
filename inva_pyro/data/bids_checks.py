"""Checks behind ``inva manifest --bids``: which derivatives folders pybids can index, which images
nibabel can read, and which columns mix files of different kinds.

pybids indexes a derivatives folder only when it holds a ``dataset_description.json`` naming its
pipeline, and skips the others without a word (FreeSurfer's output often has none); the folders
are screened here so that the summary can name every one left out, and why.

The images are opened for their headers only (nibabel reads the first bytes, not the voxels), so
that placeholders (0-byte files), saved web pages and header-only files are found at once rather
than by ``inva fit``.
"""
from __future__ import annotations

import gzip
import json
import struct
import warnings
from collections import Counter
from pathlib import Path

from ..errors import InputError

DESCRIPTION = "dataset_description.json"
# Entities whose differing values within one column are expected, not a sign of mixed kinds:
# rows differ by subject and session, and one image may be .nii in one subject and .nii.gz in another.
_ROW_OR_FORMAT = ("subject", "session", "extension", "datatype")
_XML = b"<?xml"  # how GIfTI files start, and S3's error messages
# What a download that failed leaves under an image's name, by its first bytes: a web page (a login or
# error page), or the pointer file a git-annex (DataLad, OpenNeuro) or Git LFS clone holds until the
# content is fetched.
_NOT_AN_IMAGE = {
    (b"<!doctype html", b"<html", b"<head"): ("a web page, not an image", "a failed download?"),
    (_XML,): ("XML text, not an image", "a file server's error message?"),
    (b"/annex/objects/",): ("a git-annex pointer, not the image", "content not fetched: datalad get"),
    (b"version https://git-lfs",): ("a Git LFS pointer, not the image", "content not fetched: git lfs pull"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def screen_derivatives(root: Path, extra: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(derivatives datasets to index, [(folder, why it is not used)]), as pybids would find them.

    ``root/derivatives`` and every ``extra`` folder is one derivatives dataset when it holds a
    dataset description, else a folder of them (one per pipeline), pybids' own convention.
    """
    candidates: list[Path] = []
    places = ([root / "derivatives"] if (root / "derivatives").is_dir() else []) + list(extra)
    for place in places:
        if not place.is_dir():
            raise InputError(f"{place}: derivatives folder not found")
        if (place / DESCRIPTION).is_file():
            candidates.append(place)
        else:
            inside = sorted(p for p in place.iterdir() if p.is_dir() and not p.name.startswith("."))
            candidates += inside or [place]
    used: list[Path] = []
    unused: list[tuple[Path, str]] = []
    seen: dict[str, Path] = {}
    screened: set[Path] = set()
    for folder in candidates:
        if folder.resolve() in screened:
            continue  # named twice (found under DIR/derivatives and given with --derivatives)
        screened.add(folder.resolve())
        reason = _unusable_derivative(folder)
        if reason is None and folder.name in seen:
            # pybids names a derivatives dataset by its folder; two of one name cannot both be indexed.
            reason = f"another derivatives folder of this name is used ({seen[folder.name]})"
        if reason is None:
            seen[folder.name] = folder
            used.append(folder)
        else:
            unused.append((folder, reason))
    return used, unused


def _unusable_derivative(folder: Path) -> str | None:
    """Why pybids would not index ``folder`` as a derivatives dataset; None when it would."""
    from bids.exceptions import BIDSDerivativesValidationError
    from bids.layout.validation import validate_derivative_path

    if not (folder / DESCRIPTION).is_file():
        return f"no {DESCRIPTION}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pybids' advice to upgrade PipelineDescription
            validate_derivative_path(folder)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{DESCRIPTION} is not valid JSON"
    except (BIDSDerivativesValidationError, AttributeError, TypeError):
        return f"{DESCRIPTION} names no pipeline (GeneratedBy: [{{\"Name\": ...}}])"
    return None


def unreadable_images(paths: list[str]) -> dict[str, str]:
    """{path: why nibabel cannot read it} for the images among ``paths`` that fail (each read once)."""
    found = {}
    for path in dict.fromkeys(paths):
        reason = image_problem(Path(path))
        if reason:
            found[path] = reason
    return found


def image_problem(path: Path) -> str | None:
    """Why the image at ``path`` cannot serve a fit (empty, not an image, data missing); None if fine.

    The header is read; the voxels are not. Whether the file holds as many voxel bytes as the
    header promises is checked from the file size (``.nii``) or the gzip trailer (``.nii.gz``).
    """
    import nibabel as nib

    if path.is_symlink() and not path.exists():
        return "a link to a file that is not there (git-annex/DataLad content not fetched? datalad get)"
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(64).lstrip().lower()
    except OSError as exc:
        return f"cannot be opened ({exc.strerror or exc})"
    if size == 0:
        return "empty file (0 bytes): a placeholder, not an image"
    for markers, (what, why) in _NOT_AN_IMAGE.items():
        if head.startswith(markers) and not (markers == (_XML,) and path.name.endswith(".gii")):
            return f"{what} ({plural(size, 'byte')}; {why})"
    try:
        image = nib.load(path)
    except Exception as exc:  # nibabel, gzip and zlib raise many unrelated types; each one is reported
        return f"nibabel cannot read it ({plural(size, 'byte')}): {_one_line(exc)}"
    return _missing_voxels(path, image, size, head.startswith(_GZIP_MAGIC))


def _missing_voxels(path: Path, image, size: int, gzipped: bool) -> str | None:
    """A header-only or cut file: fewer voxel bytes than the header's shape and data type need."""
    import nibabel as nib
    import numpy as np

    # Single-file formats only: an Analyze or NIfTI pair keeps its voxels in a second file, and GIfTI
    # (XML) was read whole by nib.load already.
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image, nib.MGHImage)):
        return None
    proxy = image.dataobj
    needed = int(proxy.offset) + int(np.prod(proxy.shape)) * np.dtype(proxy.dtype).itemsize
    held = _uncompressed_size(path, needed) if gzipped else size
    if held < needed:
        return (f"header only or cut short: the header describes {needed - int(proxy.offset)} bytes of voxels, "
                f"the file holds {max(held - int(proxy.offset), 0)}")
    return None


def _uncompressed_size(path: Path, needed: int) -> int:
    """Bytes a gzip file inflates to: its trailer's size field, checked by inflating when short.

    The trailer holds the size modulo 2**32 of the last gzip member only, so a small value is
    confirmed by reading the stream (rare: a single-member file holds its true size there).
    """
    if needed >= 2 ** 32:
        return needed  # the trailer cannot tell; nibabel reports a cut stream when fit reads it
    with path.open("rb") as handle:
        handle.seek(-4, 2)
        trailer = struct.unpack("<I", handle.read(4))[0]
    if trailer >= needed:
        return trailer
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while total < needed:
                chunk = stream.read(1 << 20)
                if not chunk:
                    break
                total += len(chunk)
    except (OSError, EOFError):
        pass  # a cut stream holds what was inflated so far
    return total


def mixed_kinds(column: str, entities_by_row: list[dict], typed: set[str], key_of) -> list[str]:
    """Lines for entities whose presence or value differs between a column's files.

    A task-less PET in one row and a ``task-rest`` PET in another, or files in two spaces, are
    probably not the same image; entities the user gave (``typed``) are fixed already.
    """
    lines = []
    rows = [e for e in entities_by_row if e is not None]
    names = sorted({n for e in rows for n in e} - set(_ROW_OR_FORMAT) - typed)
    for name in names:
        values = Counter(str(e[name]) if name in e else None for e in rows)
        if len(values) < 2 or (name == "run" and None not in values):
            continue  # one kind; or runs numbered differently per subject: the same acquisition
        key = key_of(name)
        counts = ", ".join(f"{key}-{value if value is not None else 'none'}: {plural(count, 'row')}"
                           for value, count in sorted(values.items(), key=lambda kv: (kv[0] is None, kv[0] or "")))
        lines.append(f"{column}: files differ in {key} ({counts}); add {key}-VALUE or {key}-none "
                     "to keep one kind")
    return lines


def plural(count: int, noun: str) -> str:
    """``1 row``, ``2 rows``."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _one_line(exc: BaseException) -> str:
    """A library's message folded onto one line, whole (never cut)."""
    return " ".join(str(exc).split()) or type(exc).__name__
