"""gzip for .nii.gz files, through zlib-ng (python-zlib-ng, a drop-in for the zlib and gzip modules).

Decompression is most of the time it takes to read an image, and a whole-brain epoch streamed from
disk on a GPU was bound by reading (docs/performance.md). On 2 CPU cores (x86_64), 2 mm images
(``python benchmarks/nifti_io.py``, docs/results/nifti_io_2mm.txt) are read 2.2x as fast as with
the gzip module when zlib compressed them at its default level 6 (152 against 68 files a second on
one thread, 264 against 121 on two) and 1.4x as fast at level 1 (148 against 107; 267 against 181).
Maps are written at zlib-ng's level 2: 16 ms and 783 kB a map against 32 ms and 811 kB at zlib's
level 1. Both release the GIL while they work, so reading threads overlap.

zlib-ng is a dependency; the standard library serves where it is absent (an offline box that
installs wheels without their dependencies), with the same bytes read.
"""
from __future__ import annotations

try:
    from zlib_ng import gzip_ng as _gzip
    from zlib_ng import zlib_ng as _zlib
    WRITE_LEVEL = 2
except ImportError:  # pragma: no cover - exercised only where zlib-ng is not installed
    import gzip as _gzip
    import zlib as _zlib
    WRITE_LEVEL = 1  # zlib's fastest, nibabel's default

_GZIP_WBITS = 16 + 15  # a gzip header and trailer (CRC-32 and size checked), the largest window


def first_member(raw: bytes, size: int) -> bytes:
    """The contents of the first gzip member of ``raw`` (what nibabel, FSL, ANTs and SPM write is one
    member: the whole file), inflated into one buffer of ``size`` bytes, the expected length. Members
    after the first are ignored, so a caller checks that it got all it needs; a truncated or corrupt
    member raises.

    One preallocated buffer: in a check on 2 mm images, two threads inflated 1.8x as many a second as
    one with it, 1.35x with an output grown block by block (decompressobj)."""
    return _zlib.decompress(raw, _GZIP_WBITS, max(int(size), 1))


def gzip_bytes(payload: bytes) -> bytes:
    """``payload`` as one gzip member; mtime 0, so identical maps give identical files across runs."""
    return _gzip.compress(payload, compresslevel=WRITE_LEVEL, mtime=0)
