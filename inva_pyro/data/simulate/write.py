"""Writing a simulated design as a cohort folder (docs/simulation.md): images, manifest with splits, truth, cohort.json.
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from ...errors import InputError
from ..io import atomic_dir, save_gifti_map, save_nifti
from ..spaces import HEMISPHERES
from .common import NOISE_KINDS, default_split
from .multisite import DEFAULT_SITES, MultisiteDesign
from .paper import simulate_paper
from .surface import RegionDesign, SurfaceDesign
from .volume import VolumeDesign


DESIGNS = ("paper", "volume", "surface", "regions", "multisite")
VOLUME_VOXEL_MM = 4
_CHUNK = 50  # subjects generated at once by the surface and region designs
_TRUTH = {"mean": "pet_true_mean", "sd": "pet_true_sd"}


def write_cohort(out: Path, design: str, n_subjects: int, seed: int, *, voxel_mm: int | None = None,
                 noise: str = "independent", unlabeled: int = 0, missing: float = 0.0, sites: int | None = None,
                 missing_covariates: float = 0.0) -> Path:
    """Simulate ``design`` and write it as a cohort folder (docs/simulation.md): images, manifest, truth.

    ``voxel_mm`` sets the voxel size of the ``volume`` design (integer mm, default 4). ``noise``:
    ``independent`` outcome noise per voxel (default), or ``smooth`` (spatially correlated, a scanner's
    point-spread function: paper, volume, surface and multisite designs; recorded in cohort.json).
    ``unlabeled``: that many more training subjects (ids after the others) with every input and an
    empty outcome cell (MRI only; their outcome and truth images are not written). ``missing``: each
    input cell of every subject is left empty with this probability, independently (seeded), never
    every input of a subject (a subject drawn with none keeps one input chosen at random). The
    unlabeled subjects are drawn from the design together with the others; the first ``n_subjects``
    keep the design's split (60/20/20; multisite: see MultisiteDesign.split). ``sites``: the number of
    training sites of the ``multisite`` design (default 3; one more site is held out).
    ``missing_covariates``: each cell of the covariates named in cohort.json "covariates" is left
    empty with this probability, independently (seeded).
    """
    _check_options(design, noise, unlabeled, missing, sites, missing_covariates, n_subjects)
    writers = {"paper": _write_paper, "volume": _write_volume, "surface": _write_surface,
               "regions": _write_regions, "multisite": _write_multisite}
    with atomic_dir(Path(out)) as tmp:
        (tmp / "images").mkdir()
        split = list(default_split(n_subjects, seed)) + ["train"] * unlabeled
        subjects = [f"sub-{i + 1:04d}" for i in range(n_subjects + unlabeled)]
        options = {"voxel_mm": voxel_mm or VOLUME_VOXEL_MM} if design == "volume" else {}
        noise_option = {"noise": noise} if design != "regions" else {}
        site_options = {"sites": sites or DEFAULT_SITES, "n_labeled": n_subjects} if design == "multisite" else {}
        rows, spec, covariates = writers[design](tmp, subjects, seed, **options, **noise_option, **site_options)
        for row, subject, label in zip(rows, subjects, split):
            row.update({"subject": subject, "split": row.get("split", label)})
        _not_acquired(tmp, rows, spec, n_subjects, missing, seed)
        spec.setdefault("covariates", list(covariates.columns))
        covariates = _missing_covariates(covariates.reset_index(drop=True), spec["covariates"], missing_covariates,
                                         seed)
        manifest = pd.DataFrame(rows)
        front = ["subject", "split"]
        manifest = manifest[front + [c for c in manifest.columns if c not in front]]
        manifest = pd.concat([manifest, covariates], axis=1)
        manifest.to_csv(tmp / "manifest.csv", index=False)
        cohort = {"design": design, **spec, "seed": seed,
                  "n_subjects": n_subjects, **options, "noise": noise, **({"unlabeled": unlabeled} if unlabeled else {}),
                  **({"missing": missing} if missing else {}),
                  **({"missing_covariates": missing_covariates} if missing_covariates else {})}
        (tmp / "cohort.json").write_text(json.dumps(cohort, indent=2))
    return Path(out)


def _check_options(design: str, noise: str, unlabeled: int, missing: float, sites: int | None,
                   missing_covariates: float, n_subjects: int) -> None:
    if design not in DESIGNS:
        raise InputError(f"--design {design}: unknown design (known: {', '.join(DESIGNS)})")
    if noise not in NOISE_KINDS:
        raise InputError(f"--noise {noise}: unknown noise (known: {', '.join(NOISE_KINDS)})")
    if noise != "independent" and design == "regions":
        raise InputError("--noise smooth: the regions design draws its noise per region (use paper, volume, "
                         "surface or multisite)")
    if unlabeled < 0 or not 0.0 <= missing < 1.0:
        raise InputError(f"--unlabeled {unlabeled} / --missing {missing}: need N >= 0 and 0 <= P < 1")
    if not 0.0 <= missing_covariates < 1.0:
        raise InputError(f"--missing-covariates {missing_covariates}: need 0 <= P < 1")
    if sites is not None:
        if design != "multisite":
            raise InputError(f"--sites: only the multisite design has sites (not '{design}')")
        if not 1 <= sites < n_subjects:
            raise InputError(f"--sites {sites}: need at least 1 training site and fewer sites than subjects")


def _missing_covariates(covariates: pd.DataFrame, names: list[str], p: float, seed: int) -> pd.DataFrame:
    """Empty each cell of the columns ``names`` with probability ``p`` (row i's draws are the same
    whatever the number of subjects)."""
    if p <= 0 or not names:
        return covariates
    gone = np.random.default_rng([seed, 37]).random((len(covariates), len(names))) < p
    covariates = covariates.copy()
    for j, name in enumerate(names):
        covariates[name] = covariates[name].mask(gone[:, j])
    return covariates


def _not_acquired(tmp: Path, rows: list[dict], spec: dict, n_labeled: int, missing: float, seed: int) -> None:
    """Empty the outcome (and truth) cells of the subjects after ``n_labeled`` and, with probability
    ``missing``, input cells; the files of empty cells are removed (docstring of write_cohort)."""
    truth = list((spec.get("truth") or {}).values())
    rng = np.random.default_rng([seed, 23])
    inputs = spec["inputs"]
    for i, row in enumerate(rows):
        drop = list(truth) + [spec["outcome"]] if i >= n_labeled else []
        if missing > 0:
            gone = rng.random(len(inputs)) < missing
            if gone.all():
                gone[rng.integers(len(inputs))] = False
            drop += [name for name, g in zip(inputs, gone) if g]
        for name in drop:
            for column in [c for c in row if c == name or c in (f"{name}_lh", f"{name}_rh")]:
                path = tmp / str(row[column])
                if path.parent.name == "images" and path.is_file():  # region tables are shared: kept
                    path.unlink()
                row[column] = ""


def _write_paper(tmp: Path, subjects: list[str], seed: int, noise: str = "independent"):

    sim = simulate_paper(len(subjects), seed, noise=noise)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])  # 2 mm pixels; the grid is one slice thick
    arrays = {**sim["inputs"], "y": sim["outcome"], "y_true_mean": sim["true_mean"], "y_true_sd": sim["true_sd"]}
    rows = []
    for i, subject in enumerate(subjects):
        row = {}
        for col, values in arrays.items():
            rel = f"images/{subject}_{col}.nii.gz"
            nib.save(nib.Nifti1Image(values[i][..., None].astype(np.float32), affine), tmp / rel)
            row[col] = rel
        rows.append(row)
    spec = {"inputs": list(sim["inputs"]), "outcome": "y", "mask": None,
            "truth": {"mean": "y_true_mean", "sd": "y_true_sd"}}
    return rows, spec, sim["covariates"]


def _write_volume(tmp: Path, subjects: list[str], seed: int, voxel_mm: int, noise: str = "independent"):

    design = VolumeDesign(len(subjects), seed, voxel_mm, noise=noise)
    header = design.header.copy()
    header.set_xyzt_units("mm")
    # fsync=False: the files are inside a fresh atomic_dir, which appears only when complete.
    save_nifti(design.mask.astype(np.float32), design.affine, header, tmp / "mask.nii.gz", fsync=False)
    rows = []
    for i, subject in enumerate(subjects):
        row = {}
        for col, values in design.subject(i).items():
            rel = f"images/{subject}_{col}.nii.gz"
            save_nifti(values, design.affine, header, tmp / rel, fsync=False)
            row[col] = rel
        rows.append(row)
    spec = {"inputs": ["gm", "wm", "t1"], "outcome": "pet", "mask": "mask.nii.gz", "truth": _TRUTH}
    return rows, spec, design.covariates


def _write_surface(tmp: Path, subjects: list[str], seed: int, noise: str = "independent"):

    design = SurfaceDesign(len(subjects), seed, noise=noise)
    rows = [{} for _ in subjects]
    for start in range(0, len(subjects), _CHUNK):
        chunk = design.chunk(start, min(start + _CHUNK, len(subjects)))
        for hemi, maps in chunk.items():
            for name, values in maps.items():
                for k, vector in enumerate(values):
                    subject = subjects[start + k]
                    rel = f"images/{subject}_{name}_{hemi}.gii"
                    save_gifti_map(vector, tmp / rel, HEMISPHERES[hemi], fsync=False)
                    rows[start + k][f"{name}_{hemi}"] = rel
    spec = {"inputs": ["thickness", "area", "curv", "sulc"], "outcome": "pet", "mask": None, "truth": _TRUTH,
            "mesh": "fsaverage5"}
    return rows, spec, design.covariates


def _write_regions(tmp: Path, subjects: list[str], seed: int):
    design = RegionDesign(len(subjects), seed)
    tables: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(subjects), _CHUNK):
        for name, values in design.chunk(start, min(start + _CHUNK, len(subjects))).items():
            tables.setdefault(name, []).append(values)
    (tmp / "tables").mkdir()
    rows = [{} for _ in subjects]
    for name, parts in tables.items():
        # One table per measure, rows = subjects, as aparcstats2table writes; every subject's
        # manifest cell points at it.
        frame = pd.DataFrame(np.concatenate(parts).astype(np.float32), columns=design.regions)
        frame.insert(0, "subject", subjects)
        rel = f"tables/{name}.csv"
        frame.to_csv(tmp / rel, index=False, float_format="%.9g")
        for row in rows:
            row[name] = rel
    spec = {"inputs": ["thickness", "area", "curv", "sulc"], "outcome": "pet", "mask": None, "truth": _TRUTH}
    return rows, spec, design.covariates


def _write_multisite(tmp: Path, subjects: list[str], seed: int, sites: int, n_labeled: int,
                     noise: str = "independent"):
    design = MultisiteDesign(len(subjects), seed, sites, noise=noise, n_labeled=n_labeled)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])  # as the paper design: 2 mm pixels, one slice thick
    rows = []
    for i, (subject, label) in enumerate(zip(subjects, design.split())):
        row = {}
        for col, values in design.subject(i).items():
            rel = f"images/{subject}_{col}.nii.gz"
            save_nifti(values[..., None].astype(np.float32), affine, None, tmp / rel, fsync=False)
            row[col] = rel
        rows.append({**row, "split": label})
    spec = {"inputs": ["x1", "x2", "x3"], "outcome": "y", "mask": None,
            "truth": {"mean": "y_true_mean", "sd": "y_true_sd"}, "covariates": ["age", "sex", "apoe4"],
            "site": "site", "sites": design.names, "held_out_site": design.held_out_site,
            "site_parameters": design.parameters}
    return rows, spec, design.covariates
