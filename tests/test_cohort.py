"""Cohort reading, feature spaces, atomic outputs and standardisation, on tiny images."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from inva_pyro.data.cohort import Cohort, Subset
from inva_pyro.data.missing import input_presence, outcome_presence
from inva_pyro.errors import InputError
from inva_pyro.data.io import atomic_dir, atomic_write_text, load_volume, save_nifti
from inva_pyro.data.preprocessing import Standardizer
from inva_pyro.data.spaces import RegionSpace, SurfaceSpace, VolumeSpace, space_from_dict

SHAPE = (6, 5, 4)
COLUMNS = ("gm", "wm", "pet")


def make_affine() -> np.ndarray:
    affine = np.diag([2.0, 2.5, 3.0, 1.0])
    affine[:3, 3] = [-10.0, -20.0, 5.0]
    return affine


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), make_affine() if affine is None else affine)
    img.header.set_qform(img.affine, 1)
    img.header.set_sform(img.affine, 4)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    return path


def make_mask() -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[1:5, 1:4, 1:3] = True
    return mask


def write_cohort(root: Path, n: int = 5, mask: bool = True, split: bool = True,
                 seed: int = 0) -> dict:
    """Write n subjects' gm/wm/pet images, a manifest and (optionally) a mask; return the truth."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    data = {column: rng.normal(size=(n, *SHAPE)).astype(np.float32) for column in COLUMNS}
    rows = []
    for i in range(n):
        row = {"subject": f"sub-{i:03d}"}
        for column in COLUMNS:
            row[column] = f"images/sub-{i:03d}_{column}.nii.gz"  # relative to the CSV
            write_nifti(root / row[column], data[column][i])
        row["age"] = 60 + i
        row["note"] = f"scan {i}"
        if split:
            row["split"] = ["train", "train", "train", "val", "test"][i % 5]
        rows.append(row)
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    if mask:
        write_nifti(root / "mask.nii.gz", make_mask().astype(np.float32))
    return data


def read(root: Path, **kwargs) -> Cohort:
    options = dict(inputs=["gm", "wm"], outcome="pet", mask=root / "mask.nii.gz")
    options.update(kwargs)
    return Cohort.from_manifest(root / "manifest.csv", **options)


def set_cell(root: Path, subject: str, column: str, value) -> None:
    table = pd.read_csv(root / "manifest.csv", dtype=str)
    table.loc[table["subject"] == subject, column] = value
    table.to_csv(root / "manifest.csv", index=False)


# ----- reading a cohort ---------------------------------------------------------------------
def test_manifest_round_trip_with_mask(tmp_path):
    data = write_cohort(tmp_path)
    cohort = read(tmp_path)
    mask = make_mask()

    assert cohort.input_names == ["gm", "wm"] and cohort.outcome_name == "pet"
    assert cohort.all.subjects == [f"sub-{i:03d}" for i in range(5)]
    for name in ("gm", "wm"):
        assert cohort.all.inputs[name].dtype == np.float32
        np.testing.assert_array_equal(cohort.all.inputs[name], data[name][:, mask])
    np.testing.assert_array_equal(cohort.all.outcome, data["pet"][:, mask])
    assert cohort.spaces["pet"].n_features == mask.sum()
    assert cohort.spaces["gm"] is cohort.spaces["pet"]  # volumes share one space

    # Numeric columns are covariates, text columns are not.
    assert list(cohort.all.covariates.columns) == ["age"]
    assert cohort.all.covariates.loc["sub-004", "age"] == 64

    assert cohort.has_split
    assert cohort.train.subjects == ["sub-000", "sub-001", "sub-002"]
    assert cohort.val.subjects == ["sub-003"]
    assert cohort.test.subjects == ["sub-004"]
    np.testing.assert_array_equal(cohort.test.outcome, data["pet"][4][mask][None])
    assert list(cohort.test.covariates.index) == ["sub-004"]


def test_manifest_without_mask_uses_every_voxel(tmp_path):
    data = write_cohort(tmp_path, mask=False)
    cohort = read(tmp_path, mask=None)
    assert cohort.spaces["gm"].n_features == np.prod(SHAPE)
    np.testing.assert_array_equal(cohort.all.inputs["gm"], data["gm"].reshape(5, -1))


def test_without_split_column_a_seeded_validation_share_is_held_out(tmp_path):
    write_cohort(tmp_path, n=10, split=False)
    first, second = read(tmp_path), read(tmp_path)
    assert not first.has_split
    assert len(first.val) == 2 and len(first.train) == 8
    assert first.val.subjects == second.val.subjects  # same seed, same split
    assert not set(first.val.subjects) & set(first.train.subjects)
    assert first.test.subjects == first.all.subjects == [f"sub-{i:03d}" for i in range(10)]
    other = read(tmp_path, seed=1)
    assert len(other.val) == 2


def test_outcome_may_be_absent_at_predict_time(tmp_path):
    write_cohort(tmp_path)
    table = pd.read_csv(tmp_path / "manifest.csv").drop(columns="pet")
    table.to_csv(tmp_path / "manifest.csv", index=False)
    cohort = read(tmp_path, require_outcome=False)
    assert cohort.all.outcome is None and cohort.outcome_name is None
    assert set(cohort.all.inputs) == {"gm", "wm"}
    assert read(tmp_path, outcome=None).all.outcome is None


def test_reading_against_a_trained_space_checks_the_grid(tmp_path):
    write_cohort(tmp_path)
    trained = read(tmp_path).spaces["gm"]
    again = read(tmp_path, mask=None, space=trained)
    assert again.spaces["gm"].n_features == trained.n_features

    other = tmp_path / "other"
    write_cohort(other)
    write_nifti(other / "images/sub-000_gm.nii.gz", np.zeros((6, 5, 3)))
    with pytest.raises(InputError, match="sub-000_gm.nii.gz"):
        read(other, mask=None, space=trained)


def test_from_dir_reads_cohort_json_with_truth(tmp_path):
    data = write_cohort(tmp_path)
    table = pd.read_csv(tmp_path / "manifest.csv")
    table["pet_true_mean"] = table["pet"]
    table["pet_true_sd"] = table["gm"]
    table.to_csv(tmp_path / "manifest.csv", index=False)
    spec = {"design": "toy", "inputs": ["gm", "wm"], "outcome": "pet", "mask": "mask.nii.gz",
            "truth": {"mean": "pet_true_mean", "sd": "pet_true_sd"}}
    (tmp_path / "cohort.json").write_text(json.dumps(spec))

    cohort = Cohort.from_dir(tmp_path)
    mask = make_mask()
    np.testing.assert_array_equal(cohort.all.truth_mean, data["pet"][:, mask])
    np.testing.assert_array_equal(cohort.all.truth_sd, data["gm"][:, mask])
    assert cohort.train.truth_mean.shape == (3, mask.sum())


def test_from_arrays_defaults_to_a_flat_space():
    rng = np.random.default_rng(0)
    cohort = Cohort.from_arrays({"a": rng.normal(size=(10, 7)), "b": rng.normal(size=(10, 3))},
                                rng.normal(size=(10, 4)), split=["train"] * 8 + ["val", "test"])
    assert cohort.spaces["a"].shape == (7, 1, 1) and cohort.spaces["outcome"].n_features == 4
    assert len(cohort.train) == 8 and cohort.test.subjects == ["sub-009"]
    assert cohort.all.inputs["b"].dtype == np.float32

    # A split column without val rows: val is a seeded share of the train rows.
    no_val = Cohort.from_arrays({"a": rng.normal(size=(10, 2))}, None, split=["train"] * 9 + ["test"])
    assert len(no_val.val) == 2 and len(no_val.train) == 7 and no_val.test.subjects == ["sub-009"]
    assert not set(no_val.val.subjects) & {"sub-009"}
    no_test = Cohort.from_arrays({"a": rng.normal(size=(3, 2))}, None, split=["train", "val", "train"])
    with pytest.raises(InputError, match="no 'test' rows"):
        no_test.test


def test_subset_selects_rows_of_every_field():
    subset = Subset(subjects=["a", "b", "c"], inputs={"x": np.arange(6.0).reshape(3, 2)},
                    outcome=np.arange(3.0)[:, None],
                    covariates=pd.DataFrame({"age": [1.0, 2.0, 3.0]}, index=["a", "b", "c"]))
    picked = subset.subset([2, 0])
    assert picked.subjects == ["c", "a"] and len(picked) == 2
    np.testing.assert_array_equal(picked.inputs["x"], [[4, 5], [0, 1]])
    np.testing.assert_array_equal(picked.outcome[:, 0], [2, 0])
    assert list(picked.covariates["age"]) == [3.0, 1.0]
    assert len(subset.subset(np.array([False, True, False]))) == 1


# ----- bad input: one InputError naming the file ---------------------------------------------
def _truncate_gzip(root):
    path = root / "images/sub-002_wm.nii.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return "sub-002_wm.nii.gz"


def _garbage_gzip(root):
    (root / "images/sub-002_wm.nii.gz").write_bytes(gzip.compress(b"not a nifti at all" * 10))
    return "sub-002_wm.nii.gz"


def _missing_file(root):
    (root / "images/sub-001_gm.nii.gz").unlink()
    return "sub-001_gm.nii.gz"


def _four_d(root):
    write_nifti(root / "images/sub-001_pet.nii.gz", np.zeros((*SHAPE, 2)))
    return "sub-001_pet.nii.gz"


def _shape_differs(root):
    write_nifti(root / "images/sub-003_gm.nii.gz", np.zeros((6, 5, 3)))
    return "sub-003_gm.nii.gz"


def _affine_differs(root):
    affine = make_affine()
    affine[0, 3] += 1.0
    write_nifti(root / "images/sub-003_wm.nii.gz", np.zeros(SHAPE), affine)
    return "sub-003_wm.nii.gz"


def _nan_in_mask(root):
    data = np.zeros(SHAPE)
    data[2, 2, 1] = np.nan  # inside make_mask()
    write_nifti(root / "images/sub-004_pet.nii.gz", data)
    return "sub-004_pet.nii.gz"


def _inf_in_mask(root):
    data = np.zeros(SHAPE)
    data[1, 1, 1] = np.inf
    write_nifti(root / "images/sub-000_wm.nii.gz", data)
    return "sub-000_wm.nii.gz"


def _empty_mask(root):
    write_nifti(root / "mask.nii.gz", np.zeros(SHAPE))
    return "mask.nii.gz"


def _mask_other_shape(root):
    write_nifti(root / "mask.nii.gz", np.ones((6, 5, 5)))
    return "mask.nii.gz"


def _duplicate_subject(root):
    set_cell(root, "sub-003", "subject", "sub-001")
    return "duplicate subject id 'sub-001'"


def _unsupported_format(root):
    set_cell(root, "sub-001", "gm", "images/sub-001_gm.mgz")
    return "sub-001_gm.mgz"


def _bad_split(root):
    set_cell(root, "sub-002", "split", "holdout")
    return "manifest.csv"


def _empty_manifest(root):
    (root / "manifest.csv").write_text("")
    return "manifest.csv"


def _header_only_manifest(root):
    (root / "manifest.csv").write_text("subject,gm,wm,pet\n")
    return "manifest.csv"


def _binary_manifest(root):
    (root / "manifest.csv").write_bytes((root / "images/sub-000_gm.nii.gz").read_bytes())
    return "manifest.csv"


def _no_subject_column(root):
    table = pd.read_csv(root / "manifest.csv").rename(columns={"subject": "id"})
    table.to_csv(root / "manifest.csv", index=False)
    return "manifest.csv"


@pytest.mark.parametrize("spoil", [
    _missing_file, _truncate_gzip, _garbage_gzip, _four_d, _shape_differs, _affine_differs,
    _nan_in_mask, _inf_in_mask, _empty_mask, _mask_other_shape, _duplicate_subject,
    _unsupported_format, _bad_split, _empty_manifest, _header_only_manifest, _binary_manifest,
    _no_subject_column,
])
def test_bad_input_raises_one_line_naming_the_file(tmp_path, spoil):
    write_cohort(tmp_path)
    expected = spoil(tmp_path)
    with pytest.raises(InputError) as caught:
        read(tmp_path)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize("options, column", [
    ({"inputs": ["gm", "csf"]}, "'csf'"),
    ({"outcome": "fdg"}, "'fdg'"),
])
def test_unknown_column_lists_the_available_ones(tmp_path, options, column):
    write_cohort(tmp_path)
    with pytest.raises(InputError) as caught:
        read(tmp_path, **options)
    message = str(caught.value)
    assert "manifest.csv" in message and column in message
    assert "available: subject, gm, wm, pet" in message


def test_missing_manifest_and_empty_cells(tmp_path):
    with pytest.raises(InputError, match="nowhere.csv: manifest file not found"):
        Cohort.from_manifest(tmp_path / "nowhere.csv", inputs=["gm"], outcome="pet")
    write_cohort(tmp_path)
    set_cell(tmp_path, "sub-001", "pet", np.nan)   # an empty cell: the image was not acquired
    set_cell(tmp_path, "sub-002", "wm", np.nan)
    for lazy in (False, True):
        cohort = Cohort.from_manifest(tmp_path / "manifest.csv", inputs=["gm", "wm"], outcome="pet",
                                      mask=tmp_path / "mask.nii.gz", lazy=lazy)
        assert outcome_presence(cohort.all).tolist() == [True, False, True, True, True]
        assert input_presence(cohort.all).tolist() == [[True, True]] * 2 + [[True, False]] + [[True, True]] * 2
        assert np.isnan(np.asarray(cohort.all.outcome)[1]).all() and np.isnan(np.asarray(cohort.all.inputs["wm"])[2]).all()
        assert np.isfinite(np.asarray(cohort.all.inputs["gm"])).all()
    set_cell(tmp_path, "sub-002", "gm", np.nan)
    with pytest.raises(InputError, match=r"subject 'sub-002' \(line 4\) has no input image at all"):
        read(tmp_path)


def test_nan_outside_the_mask_and_singleton_4d_are_accepted(tmp_path):
    data = write_cohort(tmp_path)
    outside = data["gm"][0].copy()
    outside[0, 0, 0] = np.nan  # not in make_mask()
    write_nifti(tmp_path / "images/sub-000_gm.nii.gz", outside)
    write_nifti(tmp_path / "images/sub-000_wm.nii.gz", data["wm"][0][..., None])
    cohort = read(tmp_path)
    np.testing.assert_array_equal(cohort.all.inputs["wm"][0], data["wm"][0][make_mask()])
    assert np.isfinite(cohort.all.inputs["gm"]).all()


def test_load_volume_reports_the_file(tmp_path):
    with pytest.raises(InputError, match="gone.nii.gz: mask file not found"):
        load_volume(tmp_path / "gone.nii.gz", "mask")
    path = write_nifti(tmp_path / "ok.nii.gz", np.arange(120.0).reshape(SHAPE))
    img = load_volume(path)
    assert img.shape == SHAPE and np.asanyarray(img.dataobj).dtype == np.float32

    # Large enough that the header survives truncation and only the (lazy) data read fails.
    big = write_nifti(tmp_path / "big.nii.gz", np.random.default_rng(0).random((24, 24, 24)))
    raw = big.read_bytes()
    big.write_bytes(raw[: len(raw) // 2])
    assert nib.load(str(big)).shape == (24, 24, 24)
    with pytest.raises(InputError, match="big.nii.gz: cannot read image"):
        load_volume(big)


# ----- spaces -------------------------------------------------------------------------------
def test_space_write_and_read_back_keep_the_grid(tmp_path):
    write_cohort(tmp_path)
    space = read(tmp_path).spaces["pet"]
    vector = np.linspace(-1, 1, space.n_features, dtype=np.float32)

    out = tmp_path / f"pred{space.extension}"
    space.write(vector, out)
    img = nib.load(str(out))
    assert img.shape == SHAPE and img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.affine, make_affine())
    assert img.header.get_zooms() == (2.0, 2.5, 3.0)
    assert int(img.header["sform_code"]) == 4 and int(img.header["qform_code"]) == 1
    assert img.header.get_xyzt_units() == ("mm", "sec")
    volume = img.get_fdata()
    np.testing.assert_array_equal(volume[~make_mask()], 0)
    np.testing.assert_array_equal(space.to_vector(volume), vector)
    np.testing.assert_array_equal(space.read(out), vector)


def test_space_dict_round_trip_through_json(tmp_path):
    write_cohort(tmp_path)
    space = read(tmp_path).spaces["gm"]
    rebuilt = space_from_dict(json.loads(json.dumps(space.to_dict())))
    assert isinstance(rebuilt, VolumeSpace) and rebuilt.shape == space.shape
    np.testing.assert_array_equal(rebuilt.mask, space.mask)
    np.testing.assert_allclose(rebuilt.affine, space.affine)

    vector = np.arange(space.n_features, dtype=np.float32)
    rebuilt.write(vector, tmp_path / "a.nii.gz")
    img = nib.load(str(tmp_path / "a.nii.gz"))
    np.testing.assert_allclose(img.affine, make_affine())
    assert img.header.get_zooms() == (2.0, 2.5, 3.0) and int(img.header["sform_code"]) == 4
    np.testing.assert_array_equal(rebuilt.to_vector(img.get_fdata()), vector)

    with pytest.raises(InputError, match="run/space.json: unknown space kind 'mesh'"):
        space_from_dict({"kind": "mesh"}, source="run/space.json")


def test_grid_drops_singleton_dims():
    mask = np.ones((4, 3, 1), dtype=bool)
    mask[0, 0, 0] = False
    space = VolumeSpace(shape=(4, 3, 1), affine=np.eye(4), header=None, mask=mask)
    assert space.grid_shape == (4, 3)
    grid = space.to_grid(np.ones((2, space.n_features)))
    assert grid.shape == (2, 4, 3)
    assert grid[:, 0, 0].tolist() == [0, 0] and grid.sum() == 2 * 11
    np.testing.assert_array_equal(space.to_volume(np.arange(11.0))[..., 0][mask[..., 0]], np.arange(11.0))


# ----- atomic outputs ------------------------------------------------------------------------
def test_atomic_dir_replaces_on_success_and_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("previous run")

    with pytest.raises(RuntimeError):
        with atomic_dir(out) as work:
            (work / "half.txt").write_text("half-written")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]

    with atomic_dir(out) as work:
        assert work != out and work.parent == out.parent
        (work / "new.txt").write_text("complete")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert [p.name for p in out.iterdir()] == ["new.txt"]

    fresh = tmp_path / "nested" / "fresh"
    with atomic_dir(fresh) as work:
        (work / "x").write_text("1")
    assert (fresh / "x").read_text() == "1"


def test_atomic_writes_leave_only_the_final_file(tmp_path):
    atomic_write_text(tmp_path / "a.json", "{}")
    atomic_write_text(tmp_path / "a.json", '{"b": 1}')
    save_nifti(np.ones(SHAPE), make_affine(), None, tmp_path / "m.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "m.nii.gz"]
    assert json.loads((tmp_path / "a.json").read_text()) == {"b": 1}
    np.testing.assert_array_equal(nib.load(str(tmp_path / "m.nii.gz")).get_fdata(), 1)


# ----- standardisation -----------------------------------------------------------------------
def test_standardizer_round_trip():
    rng = np.random.default_rng(1)
    gm = rng.normal(5, 2, size=(20, 6)).astype(np.float32)
    gm[:, 0] = 3.0  # constant in training: the scale floor keeps z finite
    pet = rng.normal(1000, 50, size=(20, 4)).astype(np.float32)
    train = Subset(subjects=[str(i) for i in range(20)], inputs={"gm": gm}, outcome=pet)

    std = Standardizer.fit(train)
    z = std.transform_inputs(train)["gm"]
    assert z.dtype == np.float32 and np.isfinite(z).all()
    np.testing.assert_allclose(z[:, 1:].mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(z[:, 1:].std(axis=0), 1, atol=1e-4)
    np.testing.assert_array_equal(z[:, 0], 0)

    zy = std.transform_outcome(pet)
    np.testing.assert_allclose(std.inverse_outcome_mean(zy), pet, rtol=1e-5)
    np.testing.assert_allclose(std.inverse_outcome_scale(np.ones(4)), pet.std(axis=0), rtol=1e-4)

    restored = Standardizer.from_state_dict(std.state_dict())
    assert set(std.state_dict()) == {"input_mean.gm", "input_scale.gm", "outcome_mean", "outcome_scale"}
    np.testing.assert_array_equal(restored.transform_inputs(train)["gm"], z)
    np.testing.assert_array_equal(restored.inverse_outcome_mean(zy), std.inverse_outcome_mean(zy))
    from_json = Standardizer.from_dict(json.loads(json.dumps(std.to_dict())))
    for key, value in std.state_dict().items():
        np.testing.assert_array_equal(from_json.state_dict()[key], value)

    with pytest.raises(InputError, match="input 'gm' is missing"):
        std.transform_inputs(Subset(subjects=["x"], inputs={"wm": gm[:1]}))


# ----- GIfTI surfaces ------------------------------------------------------------------------
N_VERTICES = {"lh": 12, "rh": 9}


def write_gifti(path: Path, data, structure: str | None = None) -> Path:
    """A one-map GIfTI written with nibabel directly (not through the package's writer)."""
    meta = nib.gifti.GiftiMetaData({"AnatomicalStructurePrimary": structure} if structure else {})
    array = nib.gifti.GiftiDataArray(np.asarray(data, dtype=np.float32), intent="NIFTI_INTENT_SHAPE",
                                     datatype="NIFTI_TYPE_FLOAT32")
    nib.save(nib.gifti.GiftiImage(darrays=[array], meta=meta), str(path))
    return path


def write_surface_cohort(root: Path, n: int = 5, pair: bool = True, seed: int = 0) -> dict:
    """Subjects' thickness/pet maps: a hemisphere pair (NAME_lh, NAME_rh) or one lh file per image."""
    rng = np.random.default_rng(seed)
    (root / "surf").mkdir(parents=True, exist_ok=True)
    hemis = ("lh", "rh") if pair else ("lh",)
    data = {(name, h): rng.normal(2, 0.3, size=(n, N_VERTICES[h])) for name in ("thick", "pet") for h in hemis}
    rows = []
    for i in range(n):
        row = {"subject": f"sub-{i:03d}", "split": ["train", "train", "train", "val", "test"][i % 5]}
        for (name, h), values in data.items():
            rel = f"surf/sub-{i:03d}_{h}.{name}.gii"
            write_gifti(root / rel, values[i], {"lh": "CortexLeft", "rh": "CortexRight"}[h])
            row[f"{name}_{h}" if pair else name] = rel
        rows.append(row)
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return data


def test_gifti_hemisphere_pair_reads_as_one_image_and_writes_back(tmp_path):
    data = write_surface_cohort(tmp_path)
    cohort = Cohort.from_manifest(tmp_path / "manifest.csv", inputs=["thick"], outcome="pet")
    space = cohort.spaces["pet"]
    assert isinstance(space, SurfaceSpace) and space.parts == (("lh", 12), ("rh", 9))
    assert space.grid_shape is None and space.n_features == 21
    assert cohort.spaces["thick"] is space  # surface columns share one layout
    np.testing.assert_allclose(cohort.all.inputs["thick"],
                               np.concatenate([data["thick", "lh"], data["thick", "rh"]], axis=1), rtol=1e-6)

    vector = np.arange(21, dtype=np.float32)
    written = space.write(vector, tmp_path / "sub-004_pet_mean.gii")
    assert [p.name for p in written] == ["sub-004_pet_mean_lh.gii", "sub-004_pet_mean_rh.gii"]
    for path, (label, n), piece in zip(written, space.parts, (vector[:12], vector[12:])):
        img = nib.load(str(path))
        assert len(img.darrays) == 1 and img.darrays[0].data.shape == (n,)
        np.testing.assert_array_equal(img.darrays[0].data, piece)
        assert img.meta["AnatomicalStructurePrimary"] == {"lh": "CortexLeft", "rh": "CortexRight"}[label]
    np.testing.assert_array_equal(space.read(tuple(written)), vector)

    rebuilt = space_from_dict(json.loads(json.dumps(space.to_dict())))
    assert isinstance(rebuilt, SurfaceSpace) and rebuilt.parts == space.parts
    assert rebuilt.structures == ("CortexLeft", "CortexRight")

    # At predict time the run's space checks every surface column.
    again = Cohort.from_manifest(tmp_path / "manifest.csv", inputs=["thick"], outcome="pet", space=rebuilt)
    np.testing.assert_array_equal(again.all.outcome, cohort.all.outcome)


def test_gifti_single_column_is_one_hemisphere(tmp_path):
    data = write_surface_cohort(tmp_path, pair=False)
    cohort = Cohort.from_manifest(tmp_path / "manifest.csv", inputs=["thick"], outcome="pet")
    space = cohort.spaces["pet"]
    assert space.parts == (("lh", 12),) and space.structures == ("CortexLeft",)
    np.testing.assert_allclose(cohort.test.outcome, data["pet", "lh"][4:5], rtol=1e-6)
    out = tmp_path / "x.gii"
    assert space.write(np.ones(12), out) == [out]
    assert nib.load(str(out)).darrays[0].data.shape == (12,)


def _gifti_wrong_vertex_count(root):
    write_gifti(root / "surf/sub-002_rh.thick.gii", np.ones(10), "CortexRight")
    return "sub-002_rh.thick.gii: thick surface map (rh) has 10 vertices; the cohort's surface has 9"


def _gifti_nan(root):
    values = np.ones(12)
    values[3] = np.nan
    write_gifti(root / "surf/sub-001_lh.pet.gii", values)
    return "sub-001_lh.pet.gii: pet surface map has 1 NaN/Inf vertex value(s)"


def _gifti_two_arrays(root):
    arrays = [nib.gifti.GiftiDataArray(np.ones(12, dtype=np.float32)) for _ in range(2)]
    nib.save(nib.gifti.GiftiImage(darrays=arrays), str(root / "surf/sub-003_lh.thick.gii"))
    return "sub-003_lh.thick.gii: thick surface map has 2 data arrays"


def _gifti_garbage(root):
    (root / "surf/sub-000_lh.pet.gii").write_text("<not gifti")
    return "sub-000_lh.pet.gii: cannot read pet surface map"


def _gifti_mesh(root):
    mesh = [nib.gifti.GiftiDataArray(np.zeros((12, 3), dtype=np.float32), intent="NIFTI_INTENT_POINTSET")]
    nib.save(nib.gifti.GiftiImage(darrays=mesh), str(root / "surf/sub-004_lh.pet.gii"))
    return "sub-004_lh.pet.gii: pet surface map is a surface mesh, not a per-vertex map"


def _gifti_missing_partner(root):
    table = pd.read_csv(root / "manifest.csv").drop(columns="pet_rh")
    table.to_csv(root / "manifest.csv", index=False)
    return "column 'pet_lh' for the outcome 'pet' has no partner column 'pet_rh'"


def _gifti_mixed_with_volume(root):
    set_cell(root, "sub-002", "thick_lh", "surf/sub-002_lh.thick.nii.gz")
    return "sub-002_lh.thick.nii.gz: a volume file in column 'thick'"


@pytest.mark.parametrize("spoil", [_gifti_wrong_vertex_count, _gifti_nan, _gifti_two_arrays, _gifti_garbage,
                                   _gifti_mesh, _gifti_missing_partner, _gifti_mixed_with_volume])
def test_bad_gifti_raises_one_line_naming_the_file(tmp_path, spoil):
    write_surface_cohort(tmp_path)
    expected = spoil(tmp_path)
    with pytest.raises(InputError) as caught:
        Cohort.from_manifest(tmp_path / "manifest.csv", inputs=["thick"], outcome="pet")
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_a_mask_needs_volumes(tmp_path):
    write_surface_cohort(tmp_path)
    write_nifti(tmp_path / "mask.nii.gz", make_mask().astype(np.float32))
    with pytest.raises(InputError, match="mask.nii.gz: a mask selects voxels of NIfTI volumes"):
        Cohort.from_manifest(tmp_path / "manifest.csv", inputs=["thick"], outcome="pet",
                             mask=tmp_path / "mask.nii.gz")


# ----- region tables -----------------------------------------------------------------------------
REGIONS = ["lh_bankssts_thickness", "lh_cuneus_thickness", "rh_bankssts_thickness", "rh_cuneus_thickness"]


def write_region_cohort(root: Path, n: int = 5, seed: int = 0) -> dict:
    """aparcstats2table-like tables (tab-separated, rows = subjects) shared by every subject,
    plus a volume outcome, to show that kinds mix."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    subjects = [f"sub-{i:03d}" for i in range(n)]
    thick = rng.normal(2.5, 0.2, size=(n, len(REGIONS)))
    frame = pd.DataFrame(thick, columns=REGIONS)
    frame.insert(0, "lh.aparc.thickness", subjects)
    frame.iloc[::-1].to_csv(root / "thickness.txt", sep="\t", index=False)  # any row order
    pet = rng.normal(size=(n, len(REGIONS)))
    table = pd.DataFrame(pet, columns=REGIONS)
    table.insert(0, "subject", subjects)
    table.to_csv(root / "pet.csv", index=False)
    gm = rng.normal(size=(n, *SHAPE)).astype(np.float32)
    rows = []
    for i, subject in enumerate(subjects):
        write_nifti(root / f"images/{subject}_gm.nii.gz", gm[i])
        rows.append({"subject": subject, "thick": "thickness.txt", "pet": "pet.csv",
                     "gm": f"images/{subject}_gm.nii.gz", "split": ["train", "train", "train", "val", "test"][i % 5]})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return {"thick": thick, "pet": pet, "gm": gm}


def read_regions(root: Path, **kwargs) -> Cohort:
    options = dict(inputs=["thick", "gm"], outcome="pet")
    options.update(kwargs)
    return Cohort.from_manifest(root / "manifest.csv", **options)


def test_region_tables_read_by_subject_and_write_back(tmp_path):
    data = write_region_cohort(tmp_path)
    cohort = read_regions(tmp_path)
    thick_space, pet_space = cohort.spaces["thick"], cohort.spaces["pet"]
    assert isinstance(pet_space, RegionSpace) and pet_space.regions == tuple(REGIONS)
    assert thick_space.id_column == "lh.aparc.thickness" and thick_space is not pet_space
    assert isinstance(cohort.spaces["gm"], VolumeSpace) and pet_space.grid_shape is None
    np.testing.assert_allclose(cohort.all.inputs["thick"], data["thick"], rtol=1e-6)
    np.testing.assert_allclose(cohort.all.outcome, data["pet"], rtol=1e-6)

    out = tmp_path / "sub-004_pet_mean.csv"
    vector = np.array([0.1, 1e-8, -3.25, 1234.5678], dtype=np.float32)
    assert pet_space.write(vector, out) == [out]
    written = pd.read_csv(out)
    assert list(written.columns) == ["subject", *REGIONS] and written.loc[0, "subject"] == "sub-004_pet_mean"
    np.testing.assert_array_equal(pet_space.read(out), vector)  # float32 values survive exactly

    # A later table with the regions in another order, and an extra one, maps by name.
    table = pd.read_csv(tmp_path / "pet.csv")
    table = table[["subject", *REGIONS[::-1]]].assign(eTIV=1.0)
    table.to_csv(tmp_path / "pet.csv", index=False)
    rebuilt = space_from_dict(json.loads(json.dumps(pet_space.to_dict())))
    again = read_regions(tmp_path, space={"pet": rebuilt, "thick": thick_space, "gm": cohort.spaces["gm"]})
    np.testing.assert_allclose(again.all.outcome, data["pet"], rtol=1e-6)


def _regions_missing(root):
    # One subject's own table lacks two of the regions the first table defined.
    pd.read_csv(root / "pet.csv").drop(columns=[REGIONS[1], REGIONS[3]]).to_csv(root / "pet2.csv", index=False)
    set_cell(root, "sub-003", "pet", "pet2.csv")
    return f"pet2.csv: pet region table lacks 2 of the cohort's 4 regions ('{REGIONS[1]}', '{REGIONS[3]}')"


def _regions_no_row(root):
    table = pd.read_csv(root / "pet.csv")
    table.loc[table["subject"] == "sub-002", "subject"] = "sub-999"
    table.to_csv(root / "pet.csv", index=False)
    return "pet.csv: pet region table has no row for subject 'sub-002'"


def _regions_nan(root):
    table = pd.read_csv(root / "pet.csv")
    table.loc[1, REGIONS[2]] = np.nan
    table.to_csv(root / "pet.csv", index=False)
    return f"for subject 'sub-001' (e.g. region '{REGIONS[2]}')"


def _regions_text(root):
    table = pd.read_csv(root / "pet.csv").astype({REGIONS[0]: str})
    table.loc[0, REGIONS[0]] = "n/a?"
    table.to_csv(root / "pet.csv", index=False)
    return f"pet.csv: pet region table region column '{REGIONS[0]}' is not numeric"


def _regions_duplicate_row(root):
    table = pd.read_csv(root / "pet.csv")
    pd.concat([table, table.iloc[:1]]).to_csv(root / "pet.csv", index=False)
    return "pet.csv: pet region table has subject 'sub-000' twice"


def _regions_id_only(root):
    pd.read_csv(root / "pet.csv")[["subject"]].to_csv(root / "pet.csv", index=False)
    return "pet.csv: pet region table needs a subject-id column and at least one region column"


@pytest.mark.parametrize("spoil", [_regions_missing, _regions_no_row, _regions_nan, _regions_text,
                                   _regions_duplicate_row, _regions_id_only])
def test_bad_region_table_raises_one_line_naming_the_file(tmp_path, spoil):
    write_region_cohort(tmp_path)
    expected = spoil(tmp_path)
    with pytest.raises(InputError) as caught:
        read_regions(tmp_path)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_nan_in_the_mask_file_is_refused(tmp_path):
    write_cohort(tmp_path)
    mask = make_mask().astype(np.float32)
    mask[0, 0, 0] = np.nan
    write_nifti(tmp_path / "mask.nii.gz", mask)
    with pytest.raises(InputError, match="mask.nii.gz: mask has NaN/Inf voxels"):
        read(tmp_path)


def test_volume_read_equals_nibabel_and_nilearn(tmp_path):
    data = write_cohort(tmp_path)
    space = read(tmp_path).spaces["gm"]
    # Uncompressed .nii too; the one-call decompression of .nii.gz; and scaled integers, which
    # take nibabel's own path.
    plain = write_nifti(tmp_path / "plain.nii", data["gm"][2])
    np.testing.assert_array_equal(space.read(plain), data["gm"][2][make_mask()])
    np.testing.assert_array_equal(space.read(tmp_path / "images/sub-002_gm.nii.gz"),
                                  space.to_vector(data["gm"][2]))
    img = nib.load(tmp_path / "images/sub-002_gm.nii.gz")
    scaled = nib.Nifti1Image(np.round(data["gm"][2] * 100).astype(np.int16), img.affine)
    scaled.header.set_slope_inter(0.01, 2.0)
    nib.save(scaled, tmp_path / "scaled.nii.gz")
    expected = np.asarray(nib.load(tmp_path / "scaled.nii.gz").dataobj, dtype=np.float32)[make_mask()]
    np.testing.assert_allclose(space.read(tmp_path / "scaled.nii.gz"), expected, rtol=1e-6)
    np.testing.assert_allclose(expected, data["gm"][2][make_mask()] + 2.0, atol=0.006)


# ----- lazy reading: DiskSubset, streaming standardisation, disk batches -------------------------
def test_lazy_cohort_matches_eager_and_bounds_its_cache(tmp_path):
    from inva_pyro.data.streaming import DiskBatches, DiskSubset, LazyMatrix
    from inva_pyro.train.distributed import fits_on_device

    write_cohort(tmp_path, n=10)
    eager = read(tmp_path)
    lazy = read(tmp_path, lazy=True, cache_subjects=2)
    assert isinstance(lazy.all, DiskSubset) and isinstance(lazy.all.inputs["gm"], LazyMatrix)
    assert lazy.all.inputs["gm"].shape == eager.all.inputs["gm"].shape
    assert lazy.train.subjects == eager.train.subjects and len(lazy.test) == len(eager.test)

    rows = lazy.train.rows()
    for name in ("gm", "wm"):
        np.testing.assert_array_equal(rows.inputs[name], eager.train.inputs[name])
    np.testing.assert_array_equal(rows.outcome, eager.train.outcome)
    np.testing.assert_array_equal(np.asarray(lazy.val.outcome), eager.val.outcome)
    assert len(lazy.all.cache) <= 2 * 3  # 2 subjects x 3 image columns
    picked = lazy.all.rows([7, 1])
    assert picked.subjects == ["sub-007", "sub-001"]
    np.testing.assert_array_equal(picked.inputs["wm"], eager.all.inputs["wm"][[7, 1]])

    streamed = Standardizer.fit_streaming(lazy.train, chunk_size=2)
    direct = Standardizer.fit(eager.train)
    for key, value in direct.state_dict().items():
        np.testing.assert_allclose(streamed.state_dict()[key], value, rtol=1e-5, atol=1e-6)

    import torch

    batches = DiskBatches(lazy.train, streamed, ["wm", "gm"], device="cpu")
    assert len(batches) == len(eager.train)
    xs, y = batches.take(torch.tensor([3, 0]))
    z = direct.transform_inputs(eager.train.subset([3, 0]))
    np.testing.assert_allclose(xs[0].numpy(), z["wm"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(xs[1].numpy(), z["gm"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(y.numpy(), direct.transform_outcome(eager.train.outcome[[3, 0]]), rtol=1e-4, atol=1e-5)
    assert batches.to("cpu").device.type == "cpu" and xs[0].dtype == torch.float32

    # Several reading threads and a prefetched minibatch give the same rows, in the asked order.
    single = DiskBatches(lazy.train, streamed, ["wm", "gm"], workers=1)
    threaded = DiskBatches(lazy.train, streamed, ["wm", "gm"], workers=4)
    for order in ([5, 2, 0, 4], [1, 3]):
        threaded.prefetch(np.array(order))
        expected, got = single.take(torch.tensor(order)), threaded.take(torch.tensor(order))
        for a, b in zip(expected[0] + [expected[1]], got[0] + [got[1]]):
            assert torch.equal(a, b)
    threaded.prefetch(np.array([0, 1]))  # a prefetch of other rows is dropped, not returned
    assert torch.equal(threaded.take(torch.tensor([2]))[1], single.take(torch.tensor([2]))[1])
    # the whole subset read into tensors, chunk by chunk (the --lazy fit on a GPU it fits on)
    all_x, all_y = threaded.read_all(chunk=3)
    every = single.take(torch.arange(len(single)))
    assert all(torch.equal(a, b) for a, b in zip(all_x + [all_y], every[0] + [every[1]]))
    assert threaded.nbytes() == 4 * len(single) * 3 * int(make_mask().sum())  # wm, gm and the outcome
    assert not fits_on_device(1, torch.device("cpu"))
    assert torch.equal(threaded.take(torch.tensor([2]))[1], single.take(torch.tensor([2]))[1])


def test_lazy_cohort_checks_headers_up_front_and_data_on_read(tmp_path):
    write_cohort(tmp_path)
    _shape_differs(tmp_path)
    with pytest.raises(InputError, match="sub-003_gm.nii.gz: gm image shape"):
        read(tmp_path, lazy=True)

    write_cohort(tmp_path)
    _nan_in_mask(tmp_path)
    lazy = read(tmp_path, lazy=True)  # headers are fine; the NaN is in the voxels
    with pytest.raises(InputError, match="sub-004_pet.nii.gz: pet image has 1 NaN/Inf voxel"):
        lazy.all.rows()


def test_lazy_reading_of_surfaces_and_region_tables(tmp_path):
    write_surface_cohort(tmp_path / "surf")
    eager = Cohort.from_manifest(tmp_path / "surf/manifest.csv", inputs=["thick"], outcome="pet")
    lazy = Cohort.from_manifest(tmp_path / "surf/manifest.csv", inputs=["thick"], outcome="pet", lazy=True)
    np.testing.assert_array_equal(lazy.train.rows().inputs["thick"], eager.train.inputs["thick"])
    assert lazy.spaces["pet"].parts == eager.spaces["pet"].parts

    write_region_cohort(tmp_path / "reg")
    eager = read_regions(tmp_path / "reg")
    lazy = read_regions(tmp_path / "reg", lazy=True)
    rows = lazy.all.rows()
    np.testing.assert_array_equal(rows.outcome, eager.all.outcome)
    np.testing.assert_array_equal(rows.inputs["gm"], eager.all.inputs["gm"])
    _regions_no_row(tmp_path / "reg")  # rows are looked up up front, even when lazy
    with pytest.raises(InputError, match="no row for subject 'sub-002'"):
        read_regions(tmp_path / "reg", lazy=True)


def test_a_long_read_error_is_shortened_at_a_word_boundary(tmp_path):
    from inva_pyro.data.io import _short_reason
    reason = "could the file be damaged " * 20
    short = _short_reason(ValueError(reason))
    assert len(short) <= 200 and short.endswith(" ...") and "\n" not in short
    kept = short[: -len(" ...")].split()
    assert kept and all(word in ("could", "the", "file", "be", "damaged") for word in kept)  # whole words only
    assert _short_reason(ValueError("short\nreason")) == "short reason"
