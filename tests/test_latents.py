"""Latent tables, traversal figures and analysis/latent_glm.py against simulated truth.

simulate_paper's covariate ``age`` drives the shared factor a_1 (a_1 = 0.8 age_z + 0.6 u, so
corr(age, a_1) = 0.8) and ``site`` is independent of everything. a_1 loads on every input, so a
fitted InVA's latents carry it: with 160 subjects the best latent's correlation with age is
~0.5-0.7 (p ~ 1e-12 to 1e-28 over simulation seeds 0-5 with this preset, 18 latent mean
columns), far beyond the Benjamini-Hochberg threshold, while ``site`` is a true null, so a
rejection for it happens with probability <= 0.05 per seed (none in seeds 0-5; smallest BH
p-value 0.16). The seed is fixed, so the test is deterministic.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from inva_pyro.data.cohort import Cohort
from inva_pyro.config import Preset
from inva_pyro.estimator import InVA
from inva_pyro.criticism.latents import latent_columns, latent_table, latent_traversal, traversal_images, write_latents
from inva_pyro.data.simulate import simulate_paper
from inva_pyro.data.spaces import VolumeSpace

N, GRID, SEED = 160, (16, 16), 0
PRESET = {"model": dict(shallow_dim=4, deep_dim=2, hidden=32, shared_hidden=16, predictor="paper",
                        predictor_hidden=8, dropout=0.0),
          "training": dict(epochs=20, batch_size=32, learning_rate=5e-3, kl_anneal_epochs=5, patience=100),
          "prediction": dict(num_samples=10)}


def _script():
    path = Path(__file__).resolve().parents[1] / "analysis" / "latent_glm.py"
    spec = importlib.util.spec_from_file_location("analysis_latent_glm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fitted():
    sim = simulate_paper(N, SEED, grid=GRID)
    space = VolumeSpace(shape=(*GRID, 1), affine=np.eye(4), header=None, mask=np.ones((*GRID, 1), dtype=bool))
    flat = lambda a: a.reshape(N, -1)  # noqa: E731
    split = ["train"] * 120 + ["val"] * 40
    subjects = [f"sub-{i:03d}" for i in range(N)]
    # from_arrays keeps the frame as given: index it by subject, as from_manifest does
    covariates = sim["covariates"].set_index(pd.Index(subjects, name="subject"))
    cohort = Cohort.from_arrays({k: flat(v) for k, v in sim["inputs"].items()}, flat(sim["outcome"]),
                                subjects=subjects, split=split, space=space, covariates=covariates)
    model = InVA(Preset.model_validate(PRESET)).fit(cohort.train, cohort.val, seed=0, progress=False)
    return model, cohort


@pytest.fixture(scope="module")
def files(fitted, tmp_path_factory):
    model, cohort = fitted
    folder = tmp_path_factory.mktemp("latents")
    latents = write_latents(model, cohort.all, folder / "latents.csv")
    manifest = cohort.all.covariates.reset_index()  # subject, age, site
    manifest.to_csv(folder / "manifest.csv", index=False)
    return folder, latents, folder / "manifest.csv"


def test_latent_table_has_every_posterior_summary(fitted):
    model, cohort = fitted
    table = latent_table(model, cohort.all)
    assert list(table.index) == cohort.all.subjects and table.index.name == "subject"
    assert list(table.columns) == latent_columns(model.module)
    assert table.shape == (N, 3 * (2 * 4 + 2 * 2))
    assert {"x1_shallow_mean_3", "x2_shallow_sd_0", "x3_deep_mean_1", "x3_deep_sd_1"} <= set(table.columns)
    assert (table.filter(like="_sd_") > 0).all().all() and np.isfinite(table.to_numpy()).all()
    # deterministic, and a subject's row does not depend on the others
    again = latent_table(model, cohort.all.subset([5, 2]))
    pd.testing.assert_frame_equal(again, table.iloc[[5, 2]], atol=1e-5, rtol=1e-5)


def test_write_latents_round_trips(files, fitted):
    model, cohort = fitted
    _, path, _ = files
    read = pd.read_csv(path, index_col="subject")
    expected = latent_table(model, cohort.all)
    read.index = read.index.astype(str)
    pd.testing.assert_frame_equal(read, expected, atol=1e-6, rtol=1e-6)
    assert not list(path.parent.glob(".*.tmp"))


def test_latent_glm_finds_the_driving_covariate_and_not_the_null_one(files, capsys):
    folder, latents, manifest = files
    glm = _script()
    out = folder / "glm"
    assert glm.main(["--latents", str(latents), "--manifest", str(manifest), "--covariate", "age",
                     "--out", str(out), "--joint"]) == 0
    age = pd.read_csv(out / "glm_age.csv")
    assert list(age.columns) == ["latent", "n", "estimate", "se", "stat", "p", "p_fdr", "significant"]
    assert len(age) == 18 and (age["n"] == N).all() and (age["p_fdr"] >= age["p"] - 1e-12).all()
    assert age["significant"].any() and age["p_fdr"].min() < 1e-4
    assert "significant at FDR 0.05" in capsys.readouterr().out
    assert "| latent | n | estimate |" in (out / "glm_age.md").read_text()
    joint = pd.read_csv(out / "glm_age_joint.csv")
    assert set(joint["block"]) == {"x1_shallow", "x1_deep", "x2_shallow", "x2_deep", "x3_shallow",
                                   "x3_deep", "all"}
    assert bool(joint.set_index("block").loc["all", "significant"])

    for family in ("gaussian", "binomial"):  # site is 0/1: linear or logistic, both null
        assert glm.main(["--latents", str(latents), "--manifest", str(manifest), "--covariate", "site",
                         "--family", family, "--out", str(out / family), "--joint"]) == 0
        site = pd.read_csv(out / family / "glm_site.csv")
        assert not site["significant"].any(), site.sort_values("p").head(3)
        assert not pd.read_csv(out / family / "glm_site_joint.csv")["significant"].any()


def test_latent_glm_adjusts_and_reports_bad_input(files, capsys):
    folder, latents, manifest = files
    glm = _script()
    assert glm.main(["--latents", str(latents), "--manifest", str(manifest), "--covariate", "age",
                     "--adjust", "site", "--columns", "_deep_mean_"]) == 0
    assert "age:" in capsys.readouterr().out
    assert glm.main(["--latents", str(latents), "--manifest", str(manifest), "--covariate", "sex"]) == 2
    assert "no column 'sex'" in capsys.readouterr().err
    assert glm.main(["--latents", str(latents), "--manifest", str(manifest), "--covariate", "age",
                     "--family", "binomial"]) == 2
    assert "two levels" in capsys.readouterr().err
    assert glm.main(["--latents", str(folder / "missing.csv"), "--manifest", str(manifest),
                     "--covariate", "age"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        glm.main(["--help"])
    assert exit_info.value.code == 0 and "--covariate" in capsys.readouterr().out


def test_latent_traversal_figures(fitted, tmp_path, monkeypatch):
    model, cohort = fitted
    offsets, images, centre, spread = traversal_images(model, "x2", subset=cohort.all, sd=2.0, steps=5)
    assert images.shape == (2, 5, GRID[0] * GRID[1]) and np.allclose(offsets, [-2, -1, 0, 1, 2])
    assert (spread > 0).all() and centre.shape == (2,)
    # the middle column is the decoded centre for every row; the ends differ from it
    assert np.allclose(images[0, 2], images[1, 2], atol=1e-5)
    assert np.abs(images[:, 0] - images[:, 2]).max() > 0
    for kwargs in ({}, {"difference": True}, {"subset": cohort.all}):
        path = latent_traversal(model, "x1", tmp_path / f"t{len(kwargs)}.png", **kwargs)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # no grid known for the modality: drawn as profiles
    monkeypatch.setitem(model.info, "space", None)
    assert latent_traversal(model, "x3", tmp_path / "profiles.png").stat().st_size > 0
    with pytest.raises(Exception, match="unknown modality"):
        latent_traversal(model, "pet", tmp_path / "bad.png")


@pytest.mark.parametrize("structure,names", [("separate", ["gm", "wm"]), ("concatenated", ["concat"])])
def test_peer_structures_have_shallow_latents_only(structure, names, make_preset, small_cohort, tmp_path):
    model = InVA(make_preset(model={"structure": structure}, training={"epochs": 2},
                             prediction={"num_samples": 10})).fit(small_cohort.train, small_cohort.val,
                                                                  seed=0, progress=False)
    table = latent_table(model, small_cohort.test)
    assert table.shape == (len(small_cohort.test), len(names) * 2 * 3)
    assert not table.filter(like="_deep_").shape[1]
    assert all(any(c.startswith(f"{n}_shallow_") for c in table.columns) for n in names)
    _, images, _, _ = traversal_images(model, "wm")
    assert images.shape == (3, 5, 24)
    assert latent_traversal(model, "wm", tmp_path / "wm.png").exists()


def test_joint_latents_and_glm_with_missing_inputs(tmp_path, capsys):
    # A joint model's subject latent pools the inputs a subject has: every subject gets a posterior,
    # and age (driving a_1, seen through every input) is found in it though a quarter lack x2.
    sim = simulate_paper(N, SEED, grid=GRID)
    space = VolumeSpace(shape=(*GRID, 1), affine=np.eye(4), header=None, mask=np.ones((*GRID, 1), dtype=bool))
    inputs = {k: v.reshape(N, -1).astype(np.float32) for k, v in sim["inputs"].items()}
    lacking = np.random.default_rng(0).random(N) < 0.25
    inputs["x2"][lacking] = np.nan
    subjects = [f"sub-{i:03d}" for i in range(N)]
    covariates = sim["covariates"].set_index(pd.Index(subjects, name="subject"))
    cohort = Cohort.from_arrays(inputs, sim["outcome"].reshape(N, -1), subjects=subjects,
                                split=["train"] * 120 + ["val"] * 40, space=space, covariates=covariates)
    preset = Preset.model_validate({**PRESET, "model": {**PRESET["model"], "structure": "joint"}})
    model = InVA(preset).fit(cohort.train, cohort.val, seed=0, progress=False)
    table = latent_table(model, cohort.all)
    assert list(table.columns) == latent_columns(model.module) and "subject_joint_mean_0" in table
    joint_cols = table.filter(like="subject_joint").to_numpy()
    assert np.isfinite(joint_cols).all()
    assert table.loc[lacking, "x2_shallow_mean_0"].isna().all() and table.loc[~lacking, "x2_shallow_mean_0"].notna().all()
    # fewer inputs, wider joint posterior (a product of fewer experts)
    sd = table.filter(like="subject_joint_sd_").mean(axis=1)
    assert sd[lacking].mean() > sd[~lacking].mean()
    latents = write_latents(model, cohort.all, tmp_path / "latents.csv")
    covariates.reset_index().to_csv(tmp_path / "manifest.csv", index=False)
    glm = _script()
    assert glm.main(["--latents", str(latents), "--manifest", str(tmp_path / "manifest.csv"), "--covariate", "age",
                     "--out", str(tmp_path / "glm"), "--joint"]) == 0
    age = pd.read_csv(tmp_path / "glm" / "glm_age.csv").set_index("latent")
    assert (age.loc["x2_shallow_mean_0", "n"] == (~lacking).sum()) and age.loc["subject_joint_mean_0", "n"] == N
    assert age.filter(like="subject_joint", axis=0)["significant"].any()
    blocks = pd.read_csv(tmp_path / "glm" / "glm_age_joint.csv").set_index("block")
    assert bool(blocks.loc["subject_joint", "significant"])
