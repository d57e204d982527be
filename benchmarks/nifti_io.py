"""Reading and writing whole-brain .nii.gz images: the standard library's gzip against data/gz.py (zlib-ng).

A cohort of the ``volume`` design is simulated at ``--voxel-mm`` (2: MNI152 at 2 mm, 91 x 109 x 91
voxels); its gm, wm, t1 and pet images are compressed again by the standard zlib at ``--source-level``
(6, zlib's default, as FSL and most tools write; nibabel writes 1; 0 keeps the files as inva writes
them, zlib-ng at level 2, which inflate faster), then

- read as training reads them (``VolumeSpace.read``: header check, the voxels in one pass, the mask's
  voxels taken), by 1 and by ``--threads`` threads, once with the inflate of data/gz.py and once with
  ``gzip.decompress`` in its place (what the package used before);
- written as prediction writes maps (``save_nifti``), with ``gzip_bytes`` and with
  ``gzip.compress(level 1)`` (before).

    python benchmarks/nifti_io.py [--subjects 10] [--voxel-mm 2] [--threads 2] [--source-level 6]

Prints a table (files per second, ms and kB per written map) and one JSON line.
"""
from __future__ import annotations

import argparse
import gzip
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import nibabel as nib
import numpy as np

from inva_pyro.data import gz, io
from inva_pyro.data.simulate import write_cohort
from inva_pyro.data.spaces.volume import VolumeSpace

ARMS = {"zlib-ng (data/gz.py)": (gz.first_member, gz.gzip_bytes),
        "gzip module (before)": (lambda raw, size: gzip.decompress(raw),
                                 lambda payload: gzip.compress(payload, compresslevel=1, mtime=0))}


def files_per_second(space: VolumeSpace, files: list[Path], threads: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(space.read, files))
    return len(files) / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=10)
    parser.add_argument("--voxel-mm", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="reading threads of the second reading figure")
    parser.add_argument("--repeats", type=int, default=2, help="alternating passes over the files per arm")
    parser.add_argument("--source-level", type=int, default=6, choices=range(10),
                        help="zlib level of the images read (0: as inva wrote them)")
    args = parser.parse_args(argv)
    rows = {name: {"read_1": [], f"read_{args.threads}": [], "write_ms": [], "write_kB": []} for name in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cohort"
        write_cohort(root, "volume", args.subjects, 0, voxel_mm=args.voxel_mm)
        images = sorted((root / "images").glob("*.nii.gz"))
        files = [p for p in images if p.name.rsplit("_", 1)[-1] in ("gm.nii.gz", "wm.nii.gz", "t1.nii.gz", "pet.nii.gz")]
        if args.source_level:
            for path in files:
                path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()), compresslevel=args.source_level))
        space = VolumeSpace.from_files(files[0], root / "mask.nii.gz")
        maps = [(np.asarray(img.dataobj, dtype=np.float32), img) for img in map(nib.load, files[:20])]
        for _ in range(args.repeats):
            for name, (inflate, deflate) in ARMS.items():
                with mock.patch.object(io, "first_member", inflate), mock.patch.object(io, "gzip_bytes", deflate):
                    for threads in (1, args.threads):
                        rows[name][f"read_{threads}"].append(files_per_second(space, files, threads))
                    start = time.perf_counter()
                    for k, (array, img) in enumerate(maps):
                        io.save_nifti(array, img.affine, img.header, Path(tmp) / f"map{k}.nii.gz", fsync=False)
                    rows[name]["write_ms"].append(1e3 * (time.perf_counter() - start) / len(maps))
                    rows[name]["write_kB"].append(np.mean([(Path(tmp) / f"map{k}.nii.gz").stat().st_size
                                                           for k in range(len(maps))]) / 1e3)
    summary = {name: {key: round(float(np.median(values)), 1) for key, values in row.items()} for name, row in rows.items()}
    source = f"zlib level {args.source_level}" if args.source_level else "inva's writer"
    print(f"{len(files)} images at {args.voxel_mm} mm ({space.n_features:,} voxels in the mask) compressed by {source}, "
          f"medians of {args.repeats} passes")
    print(f"{'':<24}{'files/s, 1 thread':>19}{f'files/s, {args.threads} threads':>21}{'ms per map written':>20}{'kB per map':>12}")
    for name, row in summary.items():
        print(f"{name:<24}{row['read_1']:>19}{row[f'read_{args.threads}']:>21}{row['write_ms']:>20}{row['write_kB']:>12}")
    print(json.dumps({"files": len(files), "voxel_mm": args.voxel_mm, "features": space.n_features, "source_level": args.source_level,
                      "threads": args.threads, "results": summary}))


if __name__ == "__main__":
    main()
