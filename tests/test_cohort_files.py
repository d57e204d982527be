"""Real cohort files end to end: NIfTI volumes with a mask, GIfTI hemisphere pairs and region
tables in; predictions out in the same format and space; bad input refused by the command line
with exit status 2, one line on stderr and no output folder; run folders never unpickled."""
from __future__ import annotations

import gzip
import json
import pickle
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import tiny_preset as conftest_tiny_preset
from conftest import tiny_toml
from inva_pyro import InVA, cli
from inva_pyro.data.cohort import Cohort
from inva_pyro.config import Preset
from inva_pyro.criticism.figures import plot_brain_maps

TINY_CHANGES = dict(training={"epochs": 2, "batch_size": 8}, prediction={"num_samples": 16})
SHAPE = (6, 5, 4)
N = 15
SPLIT = ["train"] * 9 + ["val"] * 3 + ["test"] * 3
VERTICES = {"lh": 14, "rh": 11}
REGIONS = [f"{h}_{name}_thickness" for h in ("lh", "rh") for name in ("bankssts", "cuneus", "fusiform")]


def tiny_preset_file(folder: Path) -> Path:
    path = folder / "tiny.toml"
    path.write_text(tiny_toml(**TINY_CHANGES))
    return path


def tiny_preset() -> Preset:
    return conftest_tiny_preset(**TINY_CHANGES)


# ----- writing small cohorts of each kind ---------------------------------------------------------
def affine() -> np.ndarray:
    a = np.diag([3.0, 3.0, 4.0, 1.0])
    a[:3, 3] = [-9.0, -7.5, -8.0]
    return a


def save_nifti(path: Path, data, aff=None) -> None:
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine() if aff is None else aff)
    img.header.set_qform(img.affine, 1)
    img.header.set_sform(img.affine, 2)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def mask_array() -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[1:5, 1:4, 1:3] = True
    return mask


def write_volume_cohort(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    gm = rng.random((N, *SHAPE))
    wm = rng.random((N, *SHAPE))
    pet = 1 + 2 * gm - wm + 0.1 * rng.standard_normal((N, *SHAPE))
    rows = []
    for i in range(N):
        row = {"subject": f"s{i:02d}", "split": SPLIT[i], "age": 60 + i}
        for name, values in (("gm", gm), ("wm", wm), ("pet", pet)):
            row[name] = f"img/s{i:02d}_{name}.nii.gz"
            save_nifti(root / row[name], values[i])
        rows.append(row)
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    save_nifti(root / "mask.nii.gz", mask_array().astype(np.float32))
    return root


def write_gifti(path: Path, data, structure: str | None = None) -> None:
    meta = nib.gifti.GiftiMetaData({"AnatomicalStructurePrimary": structure} if structure else {})
    array = nib.gifti.GiftiDataArray(np.asarray(data, dtype=np.float32))
    nib.save(nib.gifti.GiftiImage(darrays=[array], meta=meta), str(path))


def write_surface_cohort(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "surf").mkdir(parents=True)
    rows = []
    for i in range(N):
        row = {"subject": f"s{i:02d}", "split": SPLIT[i]}
        for h, n in VERTICES.items():
            thick = 2.5 + 0.3 * rng.standard_normal(n)
            pet = 0.5 + 0.4 * thick + 0.05 * rng.standard_normal(n)
            for name, values in (("thick", thick), ("pet", pet)):
                row[f"{name}_{h}"] = f"surf/s{i:02d}_{h}.{name}.gii"
                write_gifti(root / row[f"{name}_{h}"], values, {"lh": "CortexLeft", "rh": "CortexRight"}[h])
        rows.append(row)
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def write_region_cohort(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    subjects = [f"s{i:02d}" for i in range(N)]
    thick = 2.5 + 0.3 * rng.standard_normal((N, len(REGIONS)))
    pet = 0.5 + 0.4 * thick + 0.05 * rng.standard_normal(thick.shape)
    for name, values, first in (("thickness.tsv", thick, "aparc.thickness"), ("pet.tsv", pet, "subject")):
        table = pd.DataFrame(values, columns=REGIONS)
        table.insert(0, first, subjects)
        table.to_csv(root / name, sep="\t", index=False)
    pd.DataFrame({"subject": subjects, "split": SPLIT, "thick": "thickness.tsv", "pet": "pet.tsv"}).to_csv(
        root / "manifest.csv", index=False)
    return root


def set_cell(root: Path, subject: str, column: str, value) -> None:
    table = pd.read_csv(root / "manifest.csv", dtype=str)
    table.loc[table["subject"] == subject, column] = value
    table.to_csv(root / "manifest.csv", index=False)


# ----- done when: write, fit, predict, read the outputs back ------------------------------------
def fit_and_predict(cohort: Cohort, out: Path):
    model = InVA(tiny_preset()).fit(cohort.train, cohort.val, seed=0, device="cpu", progress=False)
    pred = model.predict(cohort.test, levels=[0.9], seed=0)
    pred.to_files(out)
    listing = pd.read_csv(out / "predictions.csv")
    assert sorted(set(listing["map"])) == ["hi90", "lo90", "mean", "sd"]
    assert sorted(set(listing["subject"])) == cohort.test.subjects
    return pred, listing


def test_volume_predictions_keep_affine_header_and_masked_values(tmp_path):
    root = write_volume_cohort(tmp_path / "vol")
    cohort = Cohort.from_manifest(root / "manifest.csv", ["gm", "wm"], "pet", mask=root / "mask.nii.gz")
    pred, listing = fit_and_predict(cohort, tmp_path / "pred")
    reference = nib.load(str(root / "img/s00_pet.nii.gz"))
    mask = mask_array()
    for row in listing.itertuples():
        img = nib.load(str(tmp_path / "pred" / row.path))
        assert img.shape == reference.shape
        np.testing.assert_allclose(img.affine, reference.affine)
        assert img.header.get_zooms() == reference.header.get_zooms()
        assert img.header.get_xyzt_units() == reference.header.get_xyzt_units()
        for code in ("qform_code", "sform_code"):
            assert int(img.header[code]) == int(reference.header[code])
        np.testing.assert_allclose(img.header.get_sform(), reference.header.get_sform())
        volume = np.asarray(img.dataobj)
        i = cohort.test.subjects.index(row.subject)
        np.testing.assert_array_equal(volume[mask], pred.maps()[row.map][i])  # same float32 values
        assert np.all(volume[~mask] == 0)


def test_surface_predictions_are_gifti_pairs_with_the_input_vertex_counts(tmp_path):
    root = write_surface_cohort(tmp_path / "surf")
    cohort = Cohort.from_manifest(root / "manifest.csv", ["thick"], "pet")
    space = cohort.spaces["pet"]
    pred, _ = fit_and_predict(cohort, tmp_path / "pred")
    for i, subject in enumerate(cohort.test.subjects):
        for kind, values in pred.maps().items():
            files = space.output_paths(tmp_path / "pred" / f"{subject}_pet_{kind}{space.extension}")
            assert [f.name for f in files] == [f"{subject}_pet_{kind}_lh.gii", f"{subject}_pet_{kind}_rh.gii"]
            pieces = []
            for file, (label, n) in zip(files, space.parts):
                img = nib.load(str(file))
                assert img.darrays[0].data.shape == (VERTICES[label],) == (n,)
                assert img.meta["AnatomicalStructurePrimary"] == {"lh": "CortexLeft", "rh": "CortexRight"}[label]
                pieces.append(img.darrays[0].data)
            np.testing.assert_array_equal(np.concatenate(pieces), values[i])


def test_region_predictions_are_tables_with_the_same_regions(tmp_path):
    root = write_region_cohort(tmp_path / "reg")
    cohort = Cohort.from_manifest(root / "manifest.csv", ["thick"], "pet")
    pred, listing = fit_and_predict(cohort, tmp_path / "pred")
    for row in listing.itertuples():
        table = pd.read_csv(tmp_path / "pred" / row.path)
        assert list(table.columns) == ["subject", *REGIONS] and len(table) == 1
        i = cohort.test.subjects.index(row.subject)
        np.testing.assert_array_equal(table[REGIONS].to_numpy(np.float32)[0], pred.maps()[row.map][i])


# ----- command line: bad input ends with status 2, one line, no output -----------------------------
@pytest.fixture(scope="module")
def volume_root(tmp_path_factory):
    return write_volume_cohort(tmp_path_factory.mktemp("cli") / "vol")


@pytest.fixture(scope="module")
def run_dir(volume_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    run = folder / "run"
    assert cli.main(fit_args(volume_root, tiny_preset_file(folder), run)) == 0
    return run


def fit_args(root: Path, preset: Path, out: Path, inputs="gm,wm", outcome="pet", mask=True) -> list[str]:
    args = ["fit", "--manifest", str(root / "manifest.csv"), "--inputs", inputs, "--outcome", outcome,
            "--model", str(preset), "--device", "cpu", "--out", str(out)]
    return args + (["--mask", str(root / "mask.nii.gz")] if mask else [])


def assert_refused(capsys, expected: str, *absent: Path) -> None:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("inva: error: "), err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    for path in absent:
        assert not path.exists(), path
        # nor a half-built temporary sibling
        assert not list(path.parent.glob(f".{path.name}.*")), list(path.parent.iterdir())


def _missing_file(root):
    (root / "img/s03_gm.nii.gz").unlink()
    return "s03_gm.nii.gz: gm image file not found"


def _corrupt_gzip(root):
    path = root / "img/s04_wm.nii.gz"
    path.write_bytes(path.read_bytes()[:60])
    return "s04_wm.nii.gz: cannot read wm image"


def _not_gzip_at_all(root):
    (root / "img/s04_wm.nii.gz").write_bytes(gzip.compress(b"hello" * 50)[:-8] + b"garbage!")
    return "s04_wm.nii.gz: cannot read wm image"


def _four_d(root):
    save_nifti(root / "img/s02_pet.nii.gz", np.zeros((*SHAPE, 3)))
    return "s02_pet.nii.gz: pet image must be a 3D volume, got shape (6, 5, 4, 3)"


def _shape_differs(root):
    save_nifti(root / "img/s05_gm.nii.gz", np.zeros((6, 5, 5)))
    return "s05_gm.nii.gz: gm image shape (6, 5, 5) differs from the cohort's (6, 5, 4)"


def _affine_differs(root):
    other = affine()
    other[1, 3] += 2
    save_nifti(root / "img/s06_wm.nii.gz", np.zeros(SHAPE), other)
    return "s06_wm.nii.gz: wm image affine differs from the cohort's"


def _nan_inside_mask(root):
    data = np.zeros(SHAPE)
    data[2, 2, 2] = np.nan
    save_nifti(root / "img/s07_pet.nii.gz", data)
    return "s07_pet.nii.gz: pet image has 1 NaN/Inf voxel(s) inside the mask"


def _inf_inside_mask(root):
    data = np.zeros(SHAPE)
    data[1, 1, 1] = -np.inf
    save_nifti(root / "img/s08_gm.nii.gz", data)
    return "s08_gm.nii.gz: gm image has 1 NaN/Inf voxel(s) inside the mask"


def _nan_in_mask_file(root):
    mask = mask_array().astype(np.float32)
    mask[0, 0, 0] = np.nan
    save_nifti(root / "mask.nii.gz", mask)
    return "mask.nii.gz: mask has NaN/Inf voxels"


def _empty_mask(root):
    save_nifti(root / "mask.nii.gz", np.zeros(SHAPE))
    return "mask.nii.gz: mask is empty"


def _mask_other_shape(root):
    save_nifti(root / "mask.nii.gz", np.ones((6, 5, 3)))
    return "mask.nii.gz: mask shape (6, 5, 3) differs from the images' (6, 5, 4)"


def _duplicate_subject(root):
    set_cell(root, "s09", "subject", "s01")
    return "manifest.csv: duplicate subject id 's01'"


def _empty_manifest(root):
    (root / "manifest.csv").write_text("")
    return "manifest.csv: manifest is empty"


def _not_a_csv(root):
    shutil.copy(root / "img/s00_gm.nii.gz", root / "manifest.csv")
    return "manifest.csv: not a CSV file"


def _header_only(root):
    (root / "manifest.csv").write_text("subject,gm,wm,pet\n")
    return "manifest.csv: manifest has no subjects"


@pytest.mark.parametrize("spoil", [_missing_file, _corrupt_gzip, _not_gzip_at_all, _four_d, _shape_differs,
                                   _affine_differs, _nan_inside_mask, _inf_inside_mask, _nan_in_mask_file,
                                   _empty_mask, _mask_other_shape, _duplicate_subject, _empty_manifest,
                                   _not_a_csv, _header_only])
def test_fit_refuses_bad_volume_cohorts(tmp_path, capsys, spoil):
    root = write_volume_cohort(tmp_path / "vol")
    expected = spoil(root)
    run = tmp_path / "run"
    assert cli.main(fit_args(root, tiny_preset_file(tmp_path), run)) == 2
    assert_refused(capsys, expected, run)


@pytest.mark.parametrize("inputs, outcome, expected", [
    ("gm,csf", "pet", "manifest.csv: no column 'csf' for the input (available: subject, split, age, gm, wm, pet)"),
    ("gm,wm", "fdg", "manifest.csv: no column 'fdg' for the outcome"),
])
def test_fit_refuses_unknown_columns(volume_root, tmp_path, capsys, inputs, outcome, expected):
    run = tmp_path / "run"
    assert cli.main(fit_args(volume_root, tiny_preset_file(tmp_path), run, inputs, outcome)) == 2
    assert_refused(capsys, expected, run)


def test_fit_refuses_a_gifti_with_the_wrong_vertex_count(tmp_path, capsys):
    root = write_surface_cohort(tmp_path / "surf")
    write_gifti(root / "surf/s05_rh.pet.gii", np.ones(12), "CortexRight")
    run = tmp_path / "run"
    assert cli.main(fit_args(root, tiny_preset_file(tmp_path), run, "thick", mask=False)) == 2
    assert_refused(capsys, "s05_rh.pet.gii: pet surface map (rh) has 12 vertices; the cohort's surface has 11", run)


def test_fit_refuses_a_region_table_with_missing_regions(tmp_path, capsys):
    root = write_region_cohort(tmp_path / "reg")
    table = pd.read_csv(root / "pet.tsv", sep="\t").drop(columns=REGIONS[4])
    table.to_csv(root / "pet_s07.tsv", sep="\t", index=False)
    set_cell(root, "s07", "pet", "pet_s07.tsv")
    run = tmp_path / "run"
    assert cli.main(fit_args(root, tiny_preset_file(tmp_path), run, "thick", mask=False)) == 2
    assert_refused(capsys, f"pet_s07.tsv: pet region table lacks 1 of the cohort's 6 regions ('{REGIONS[4]}')", run)


def predict_args(run: Path, manifest: Path, out: Path, command: str = "predict") -> list[str]:
    return [command, "--run", str(run), "--manifest", str(manifest), "--out", str(out)]


def test_predict_refuses_a_manifest_without_one_of_the_runs_inputs(run_dir, volume_root, tmp_path, capsys):
    manifest = tmp_path / "manifest.csv"
    table = pd.read_csv(volume_root / "manifest.csv").drop(columns="wm")
    table["gm"] = [str(volume_root / p) for p in table["gm"]]
    table["pet"] = [str(volume_root / p) for p in table["pet"]]
    table.to_csv(manifest, index=False)
    out = tmp_path / "pred"
    assert cli.main(predict_args(run_dir, manifest, out)) == 2
    assert_refused(capsys, f"{manifest}: no column 'wm' for the input", out)


def test_predict_refuses_images_off_the_runs_grid(run_dir, volume_root, tmp_path, capsys):
    root = tmp_path / "vol"
    shutil.copytree(volume_root, root)
    save_nifti(root / "img/s13_gm.nii.gz", np.zeros((6, 5, 5)))  # a test subject
    out = tmp_path / "pred"
    assert cli.main(predict_args(run_dir, root / "manifest.csv", out)) == 2
    assert_refused(capsys, "s13_gm.nii.gz: gm image shape (6, 5, 5) differs from the cohort's (6, 5, 4)", out)


def test_evaluate_refuses_a_manifest_without_the_outcome(run_dir, volume_root, tmp_path, capsys):
    manifest = volume_root / "no_outcome.csv"
    pd.read_csv(volume_root / "manifest.csv").drop(columns="pet").to_csv(manifest, index=False)
    out = tmp_path / "eval"
    assert cli.main(predict_args(run_dir, manifest, out, "evaluate")) == 2
    assert_refused(capsys, f"{manifest}: no column 'pet' for the outcome", out)


def _no_folder(run: Path) -> str:
    shutil.rmtree(run)
    return "run folder not found"


def _foreign_folder(run: Path) -> str:
    for path in run.iterdir():
        path.unlink()
    (run / "run.json").write_text(json.dumps({"format": "someone-elses/3"}))
    return "not an inva run folder"


def _folder_without_run_json(run: Path) -> str:
    (run / "run.json").unlink()
    return "not an inva run folder (no run.json)"


def _run_json_not_json(run: Path) -> str:
    (run / "run.json").write_text("{ not json")
    return "run.json: corrupt (not valid JSON)"


def _weights_garbage(run: Path) -> str:
    (run / "weights.safetensors").write_bytes(b"\x00" * 64)
    return "corrupt run folder"


def _weights_missing(run: Path) -> str:
    (run / "weights.safetensors").unlink()
    return "corrupt run folder"


def _config_corrupt(run: Path) -> str:
    (run / "config.json").write_text('{"model": {"hidden": "many"}}')
    return "corrupt run folder"


def _standardizer_truncated(run: Path) -> str:
    text = (run / "standardizer.json").read_text()
    (run / "standardizer.json").write_text(text[: len(text) // 2])
    return "corrupt run folder"


@pytest.mark.parametrize("spoil", [_no_folder, _foreign_folder, _folder_without_run_json, _run_json_not_json,
                                   _weights_garbage, _weights_missing, _config_corrupt, _standardizer_truncated])
def test_predict_refuses_missing_foreign_or_corrupt_run_folders(run_dir, volume_root, tmp_path, capsys, spoil):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    expected = spoil(run)
    out = tmp_path / "pred"
    assert cli.main(predict_args(run, volume_root / "manifest.csv", out)) == 2
    assert_refused(capsys, expected, out)


# ----- safe run folders: loading never unpickles ---------------------------------------------------
class _Payload:
    """Unpickling this calls open(marker, "w"): proof that code from the run folder was executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_malicious_pickle_in_a_run_folder_is_never_unpickled(run_dir, volume_root, tmp_path, capsys):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker), protocol=2)
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)

    # A pickle where the weights should be: refused as a corrupt run folder.
    (run / "weights.safetensors").write_bytes(payload)
    out = tmp_path / "pred"
    assert cli.main(predict_args(run, volume_root / "manifest.csv", out)) == 2
    assert_refused(capsys, "corrupt run folder", out)
    assert not marker.exists()

    # A pickle as checkpoint.pt and as a weights.pt beside good weights: predicting never reads them.
    shutil.copy(run_dir / "weights.safetensors", run / "weights.safetensors")
    (run / "checkpoint.pt").write_bytes(payload)
    (run / "weights.pt").write_bytes(payload)
    assert cli.main(predict_args(run, volume_root / "manifest.csv", out)) == 0
    assert not marker.exists()

    # Resuming reads checkpoint.pt with torch.load(weights_only=True), which refuses the pickle.
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "complete": False}))
    assert cli.main(["fit", "--resume", str(run)]) == 2
    assert "not a valid inva checkpoint" in capsys.readouterr().err
    assert not marker.exists()


# ----- brain figures -----------------------------------------------------------------------------
def sphere_mesh(n: int, seed: int = 0):
    """A closed triangle mesh of n points on a sphere (their convex hull)."""
    from scipy.spatial import ConvexHull

    points = np.random.default_rng(seed).standard_normal((n, 3))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return 50 * points, ConvexHull(points).simplices


def test_brain_figures_for_each_kind_of_space(tmp_path):
    from inva_pyro.data.spaces import RegionSpace, SurfaceSpace, VolumeSpace

    rng = np.random.default_rng(0)
    volume = VolumeSpace(shape=SHAPE, affine=affine(), header=None, mask=mask_array())
    surface = SurfaceSpace(parts=(("lh", 14), ("rh", 11)))
    regions = RegionSpace(regions=tuple(REGIONS))
    meshes = {"lh": sphere_mesh(14), "rh": sphere_mesh(11, 1)}
    for name, space, options in (("volume", volume, {}), ("surface", surface, {"meshes": meshes}),
                                 ("regions", regions, {}), ("nomesh", surface, {})):
        y, mean = rng.random((3, space.n_features)), rng.random((3, space.n_features))
        path = plot_brain_maps(tmp_path / f"{name}.png", space, y, mean, 0.1 + y / 10, ["a", "b", "c"],
                               **options)
        assert path.stat().st_size > 5000
    # nilearn's own fsaverage5 mesh, shipped inside the package: no download, and no outcome.
    fsaverage = SurfaceSpace(parts=(("lh", 10242), ("rh", 10242)))
    values = rng.random((1, fsaverage.n_features))
    assert plot_brain_maps(tmp_path / "fs5.png", fsaverage, None, values, values / 10, ["a"]).stat().st_size > 5000
