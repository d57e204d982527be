"""Simulated cohorts: the paper design as before, and the volume, surface and region designs
built from the templates nilearn ships (MNI152, fsaverage5), with known truth."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from inva_pyro import cli
from inva_pyro.data.cohort import Cohort
from inva_pyro.errors import InputError
from inva_pyro.data.simulate import (RegionDesign, SurfaceDesign, VolumeDesign, simulate_paper, sphere_parcels,
                                write_cohort)
from inva_pyro.data.spaces import RegionSpace, SurfaceSpace, VolumeSpace


@pytest.fixture(scope="module")
def volume_dir(tmp_path_factory):
    # 12 mm voxels: 18 x 21 x 17, about a thousand brain voxels; enough to check the design.
    return write_cohort(tmp_path_factory.mktemp("vol") / "cohort", "volume", 24, 5, voxel_mm=12)


@pytest.fixture(scope="module")
def surface_dir(tmp_path_factory):
    return write_cohort(tmp_path_factory.mktemp("surf") / "cohort", "surface", 10, 2)


def test_paper_design_files_match_its_arrays(tmp_path):
    out = write_cohort(tmp_path / "paper", "paper", 10, 3)
    sim = simulate_paper(10, 3)
    manifest = pd.read_csv(out / "manifest.csv")
    assert list(manifest.columns) == ["subject", "split", "x1", "x2", "x3", "y", "y_true_mean", "y_true_sd",
                                      "age", "site"]
    spec = json.loads((out / "cohort.json").read_text())
    assert spec == {"design": "paper", "inputs": ["x1", "x2", "x3"], "outcome": "y", "mask": None,
                    "truth": {"mean": "y_true_mean", "sd": "y_true_sd"}, "covariates": ["age", "site"],
                    "seed": 3, "n_subjects": 10, "noise": "independent"}
    img = nib.load(out / manifest.loc[4, "y_true_mean"])
    np.testing.assert_allclose(np.asarray(img.dataobj)[..., 0], sim["true_mean"][4], rtol=1e-6)


def test_paper_design_returns_the_factors_behind_its_true_mean():
    """The true mean is mu_y + the subject terms of the returned factors on their patterns + the local terms."""
    from inva_pyro.data.simulate.paper import paper_patterns, subject_terms

    sim, p = simulate_paper(40, 5), paper_patterns()
    factors = sim["factors"]
    assert factors.shape == (40, 5)
    assert np.corrcoef(factors[:, 0], sim["covariates"]["age"])[0, 1] > 0.6   # a_1 = 0.8 age_z + 0.6 u
    d1, d3 = sim["inputs"]["x1"] - p["base"][0], sim["inputs"]["x3"] - p["base"][2]
    terms = subject_terms(factors)
    rebuilt = p["mu_y"] + np.einsum("it,thw->ihw", terms, np.stack(p["terms"])) \
        + 0.6 * np.tanh(d1) + 0.3 * d1 * d3
    np.testing.assert_allclose(rebuilt, sim["true_mean"], atol=1e-12)


def test_volume_design_writes_a_masked_cohort_with_truth(volume_dir):
    spec = json.loads((volume_dir / "cohort.json").read_text())
    assert spec["design"] == "volume" and spec["inputs"] == ["gm", "wm", "t1"] and spec["outcome"] == "pet"
    assert spec["mask"] == "mask.nii.gz" and spec["truth"] == {"mean": "pet_true_mean", "sd": "pet_true_sd"}
    assert spec["covariates"] == ["age", "site"] and spec["voxel_mm"] == 12

    cohort = Cohort.from_dir(volume_dir)
    space = cohort.spaces["pet"]
    assert isinstance(space, VolumeSpace) and space.shape == (18, 21, 17)
    assert 500 < space.n_features < 2000
    np.testing.assert_allclose(np.diag(space.affine)[:3], [12, 12, 12])
    assert len(cohort.train) + len(cohort.val) + len(cohort.test) == 24
    data = cohort.all
    assert np.all(data.truth_sd > 0) and np.all((data.inputs["gm"] >= 0) & (data.inputs["gm"] <= 1))
    # The outcome scatters around its true mean with the true sd.
    z = (data.outcome - data.truth_mean) / data.truth_sd
    assert abs(z.mean()) < 0.05 and 0.95 < z.std() < 1.05
    # Skull-stripped: zero outside the brain mask.
    pet = np.asarray(nib.load(volume_dir / pd.read_csv(volume_dir / "manifest.csv").loc[0, "pet"]).dataobj)
    assert np.all(pet[~space.mask] == 0)


def test_volume_design_factors_act_as_documented():
    design = VolumeDesign(120, seed=1, voxel_mm=12)
    in_p1 = design.mask & (design.P1 > 0.5)
    gm_p1 = np.array([design.subject(i)["gm"][in_p1].mean() for i in range(120)])
    age = design.covariates["age"].to_numpy()
    # age drives the atrophy factor, which removes grey matter in pattern P1; site is null.
    assert np.corrcoef(age, gm_p1)[0, 1] < -0.4
    assert abs(np.corrcoef(design.covariates["site"], gm_p1)[0, 1]) < 0.25
    # A subject's images come from its own random stream: the same whatever was generated before.
    again = VolumeDesign(120, seed=1, voxel_mm=12)
    np.testing.assert_array_equal(again.subject(2)["gm"], design.subject(2)["gm"])


def test_surface_design_writes_hemisphere_pairs(surface_dir):
    manifest = pd.read_csv(surface_dir / "manifest.csv")
    for name in ("thickness", "area", "curv", "sulc", "pet", "pet_true_mean", "pet_true_sd"):
        assert {f"{name}_lh", f"{name}_rh"} <= set(manifest.columns)
    img = nib.load(surface_dir / manifest.loc[0, "pet_rh"])
    assert img.darrays[0].data.shape == (10242,) and img.meta["AnatomicalStructurePrimary"] == "CortexRight"

    cohort = Cohort.from_dir(surface_dir)
    space = cohort.spaces["pet"]
    assert isinstance(space, SurfaceSpace) and space.parts == (("lh", 10242), ("rh", 10242))
    data = cohort.all
    assert data.inputs["thickness"].shape == (10, 20484) and np.all(data.truth_sd > 0)
    z = (data.outcome - data.truth_mean) / data.truth_sd
    assert abs(z.mean()) < 0.05 and 0.95 < z.std() < 1.05
    # Subject fields are smooth on the mesh: neighbouring vertices are strongly correlated.
    design = SurfaceDesign(2, seed=0)
    field = design._fields([np.random.default_rng(0)], "lh")[0]
    step = design.smoothers["lh"]
    assert np.corrcoef(field, step @ field)[0, 1] > 0.9


def test_region_design_writes_aparcstats_like_tables(tmp_path):
    out = write_cohort(tmp_path / "regions", "regions", 12, 0)
    manifest = pd.read_csv(out / "manifest.csv")
    assert set(manifest["thickness"]) == {"tables/thickness.csv"}
    table = pd.read_csv(out / "tables/thickness.csv")
    assert list(table.columns[:2]) == ["subject", "lh_r01"] and table.shape == (12, 69)
    cohort = Cohort.from_dir(out)
    assert isinstance(cohort.spaces["pet"], RegionSpace) and cohort.spaces["pet"].n_features == 68
    assert np.all(cohort.all.truth_sd > 0)
    parcels = sphere_parcels(np.random.default_rng(0).normal(size=(500, 3)), 10)
    assert set(parcels) == set(range(10))
    assert RegionDesign.N_PARCELS == 34


def test_cli_simulates_the_new_designs_and_refuses_unknown_ones(tmp_path, capsys):
    assert cli.main(["simulate", "--design", "regions", "--n-subjects", "10", "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "cohort.json").exists()
    assert cli.main(["simulate", "--design", "mesh", "--n-subjects", "10", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "inva: error: --design mesh: unknown design (known: paper, volume, surface, regions, multisite)"
    assert not (tmp_path / "m").exists()
    with pytest.raises(InputError):
        write_cohort(tmp_path / "x", "nope", 10, 0)


def test_cli_sets_the_voxel_size_of_the_volume_design(tmp_path, capsys):
    out = tmp_path / "v"
    assert cli.main(["simulate", "--design", "volume", "--voxel-mm", "12", "--n-subjects", "10", "--out", str(out)]) == 0
    assert json.loads((out / "cohort.json").read_text())["voxel_mm"] == 12
    assert nib.load(out / "mask.nii.gz").shape == (18, 21, 17)  # MNI152 at 12 mm
    capsys.readouterr()
    for args, problem in ((["--design", "paper", "--voxel-mm", "2"], "--voxel-mm: only the volume design has a "
                           "voxel size (not 'paper')"),
                          (["--design", "volume", "--voxel-mm", "0"], "--voxel-mm 0: must be an integer from 1 to 12")):
        assert cli.main(["simulate", *args, "--n-subjects", "10", "--out", str(tmp_path / "bad")]) == 2
        assert capsys.readouterr().err.strip() == f"inva: error: {problem}"
        assert not (tmp_path / "bad").exists()


def test_simulate_unlabeled_and_missing_inputs(tmp_path):
    import numpy as np
    import pandas as pd
    from inva_pyro import cli
    from inva_pyro.data.cohort import Cohort
    from inva_pyro.data.missing import input_presence, outcome_presence
    out = tmp_path / "c"
    assert cli.main(["simulate", "--design", "paper", "--n-subjects", "20", "--seed", "1", "--unlabeled", "15",
                     "--missing", "0.3", "--out", str(out)]) == 0
    table = pd.read_csv(out / "manifest.csv")
    assert len(table) == 35 and (table["split"].iloc[20:] == "train").all()
    assert table["y"].iloc[20:].isna().all() and table["y"].iloc[:20].notna().all()
    cohort = Cohort.from_dir(out)
    presence = input_presence(cohort.all)
    assert presence.any(axis=1).all() and 0.15 < 1 - presence.mean() < 0.45   # about 30% empty, never all
    assert outcome_presence(cohort.train).sum() == (table["split"].iloc[:20] == "train").sum()
    assert len(list((out / "images").glob("*_y.nii.gz"))) == 20
    assert np.isnan(np.asarray(cohort.all.inputs["x1"])[~presence[:, 0]]).all()
