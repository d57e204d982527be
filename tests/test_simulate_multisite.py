"""The multisite design (docs/simulation.md): the paper design at K training sites and a held-out site, with
covariates that act on the outcome only; checked against its known truth."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import tiny_toml
from inva_pyro import cli
from inva_pyro.data.simulate import MultisiteDesign, simulate_paper, site_parameters, write_cohort
from inva_pyro.data.simulate.multisite import AGE_EFFECT, AGE_MEAN, AGE_SD, multisite_maps
from inva_pyro.data.simulate.paper import paper_patterns

N = 600   # subjects of the design-level checks: a few seconds


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory):
    return write_cohort(tmp_path_factory.mktemp("multisite") / "cohort", "multisite", 60, 4)


@pytest.fixture(scope="module")
def design():
    design = MultisiteDesign(N, seed=2)
    subjects = [design.subject(i, extras=True) for i in range(N)]
    arrays = {name: np.stack([s[name] for s in subjects]) for name in subjects[0]}
    return design, arrays


def _image(folder, rel):
    return np.asarray(nib.load(folder / rel).dataobj)[..., 0]


def test_files_columns_and_cohort_json(cohort_dir):
    manifest = pd.read_csv(cohort_dir / "manifest.csv")
    assert list(manifest.columns) == ["subject", "split", "x1", "x2", "x3", "y", "y_true_mean", "y_true_sd",
                                      "age", "sex", "apoe4", "site"]
    spec = json.loads((cohort_dir / "cohort.json").read_text())
    assert spec["design"] == "multisite" and spec["inputs"] == ["x1", "x2", "x3"] and spec["outcome"] == "y"
    assert spec["truth"] == {"mean": "y_true_mean", "sd": "y_true_sd"} and spec["mask"] is None
    assert spec["covariates"] == ["age", "sex", "apoe4"] and spec["site"] == "site"
    assert spec["sites"] == ["S1", "S2", "S3", "S4"] and spec["held_out_site"] == "S4"
    assert set(spec["site_parameters"]) == set(spec["sites"]) and spec["seed"] == 4 and spec["n_subjects"] == 60
    assert set(manifest["sex"]) <= {"F", "M"} and set(manifest["apoe4"]) <= {0, 1, 2}
    assert manifest["apoe4"].dtype.kind == "i" and manifest["age"].between(55, 90).all()
    assert set(manifest["site"]) <= set(spec["sites"])
    # The files are the design's arrays, and the outcome scatters around the true mean with the true sd.
    design = MultisiteDesign(60, seed=4)
    for i in (0, 17):
        for column, values in design.subject(i).items():
            img = nib.load(cohort_dir / manifest.loc[i, column])
            assert img.shape == (32, 32, 1)
            np.testing.assert_allclose(np.asarray(img.dataobj)[..., 0], values, rtol=1e-6, atol=1e-6)
    pd.testing.assert_frame_equal(manifest[["age", "sex", "apoe4", "site"]],
                                  design.covariates.astype({"apoe4": "int64"}), check_dtype=False)


def test_the_held_out_site_is_test_only(cohort_dir):
    manifest = pd.read_csv(cohort_dir / "manifest.csv")
    held_out = manifest["site"] == "S4"
    assert held_out.any() and (manifest.loc[held_out, "split"] == "test").all()
    assert set(manifest.loc[manifest["split"].isin(["train", "val"]), "site"]) <= {"S1", "S2", "S3"}
    training = manifest.loc[~held_out, "split"].value_counts()
    n = int((~held_out).sum())
    assert training["val"] == training["test"] == round(0.2 * n) and training["train"] == n - 2 * round(0.2 * n)


def test_seeded_runs_are_identical_and_subjects_do_not_depend_on_the_cohort_size(tmp_path):
    a = write_cohort(tmp_path / "a", "multisite", 12, 9, sites=2)
    b = write_cohort(tmp_path / "b", "multisite", 12, 9, sites=2)
    c = write_cohort(tmp_path / "c", "multisite", 12, 10, sites=2)
    ma, mb = pd.read_csv(a / "manifest.csv"), pd.read_csv(b / "manifest.csv")
    pd.testing.assert_frame_equal(ma, mb)
    assert (a / "cohort.json").read_text() == (b / "cohort.json").read_text()
    for column in ("x2", "y", "y_true_sd"):
        np.testing.assert_array_equal(_image(a, ma.loc[5, column]), _image(b, mb.loc[5, column]))
    assert not np.allclose(_image(a, ma.loc[5, "y"]), _image(c, ma.loc[5, "y"]))
    # Subject i's site, covariates and images are the same whatever the number of subjects; site S1's
    # parameters are the same whatever the number of sites (only the shares change).
    small, large = MultisiteDesign(20, seed=5), MultisiteDesign(70, seed=5)
    pd.testing.assert_frame_equal(small.covariates, large.covariates.iloc[:20])
    for name, values in small.subject(13).items():
        np.testing.assert_array_equal(values, large.subject(13)[name])
    two, five = site_parameters(2, 5), site_parameters(5, 5)
    assert {k: v for k, v in two["S1"].items() if k != "share"} == {k: v for k, v in five["S1"].items() if k != "share"}


def test_input_site_offsets_are_recovered(design):
    """Mean over a site's subjects and pixels of x_obs_k = o_sk + g_sk (mean_v mu_k + mean of the subjects'
    deviations), the bias field averaging zero over the grid: o_sk within 4 standard errors."""
    design, arrays = design
    base = paper_patterns()["base"]
    sites = design.covariates["site"].to_numpy()
    for name in design.names:
        rows = sites == name
        p = design.parameters[name]
        assert rows.sum() >= 20, "every site has subjects at this size and seed"
        offsets = []
        for k in range(3):
            subject_means = arrays[f"x{k + 1}"][rows].mean(axis=(1, 2))
            se = subject_means.std(ddof=1) / np.sqrt(rows.sum())
            estimate = subject_means.mean() - p["input_gain"][k] * base[k].mean()
            assert abs(estimate - p["input_offset"][k]) < 4 * se + 1e-9, (name, k)
            offsets.append(estimate)
            # Exactly: o + g (x + beta_s), x the site-free input.
            bias = 0.3 * np.tensordot(p["bias"], design.maps["bias"], axes=1)
            np.testing.assert_allclose(arrays[f"x{k + 1}"][rows], p["input_offset"][k] + p["input_gain"][k]
                                       * (arrays[f"x{k + 1}_site_free"][rows] + bias), atol=1e-12)
    spread = np.ptp([design.parameters[s]["input_offset"][0] for s in design.names])
    assert spread > 0.3, "the sites' offsets differ at this seed"


def _ols(x, y):
    """Intercept, slope, their standard errors and the residuals of y on x."""
    X = np.stack([np.ones_like(x), x], axis=1)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    cov = np.linalg.inv(X.T @ X) * resid.var(ddof=2)
    return coef, np.sqrt(np.diag(cov)), resid


def test_outcome_site_calibration(design):
    """Within a site: y on the true mean has slope 1 and residuals of the true sd; y on the site-free mean
    m + c has intercept a_s and slope b_s; the true sd is b_s s."""
    design, arrays = design
    sites = design.covariates["site"].to_numpy()
    for name in design.names:
        rows = sites == name
        p = design.parameters[name]
        y, mean, sd = (arrays[c][rows].ravel() for c in ("y", "y_true_mean", "y_true_sd"))
        (_, slope), (_, se), _ = _ols(mean, y)
        assert abs(slope - 1) < 5 * se
        z = (y - mean) / sd
        assert abs(z.mean()) < 5 / np.sqrt(z.size) and abs(z.std() - 1) < 5 / np.sqrt(2 * z.size)
        free = (arrays["paper_mean"][rows] + arrays["covariate_effect"][rows]).ravel()
        (a, b), (se_a, se_b), resid = _ols(free, y)
        assert abs(a - p["outcome_offset"]) < 5 * se_a and abs(b - p["outcome_gain"]) < 5 * se_b
        ratio = resid / arrays["paper_sd"][rows].ravel()
        assert abs(ratio.std() - p["outcome_gain"]) < 5 * p["outcome_gain"] / np.sqrt(2 * ratio.size)
        np.testing.assert_allclose(sd, p["outcome_gain"] * arrays["paper_sd"][rows].ravel(), rtol=1e-12)


def test_covariates_act_on_the_truth_and_not_on_the_inputs(design):
    """Age moves the true mean in its map's support by 0.9 age_z A(v); no input carries age, sex or APOE4
    (|r| under 4 / sqrt(n), the null's 4 sd), unlike the paper design, where age drives a_1 and every input."""
    design, arrays = design
    covariates, maps = design.covariates, multisite_maps()
    age_z = ((covariates["age"] - AGE_MEAN) / AGE_SD).to_numpy()
    gains = np.array([design.parameters[s]["outcome_gain"] for s in covariates["site"]])[:, None, None]
    offsets = np.array([design.parameters[s]["outcome_offset"] for s in covariates["site"]])[:, None, None]
    site_free = (arrays["y_true_mean"] - offsets) / gains   # m + c
    support = maps["age"] > 0.5
    region = site_free[:, support].mean(axis=1)
    (_, slope), (_, se), _ = _ols(age_z, region)
    assert abs(slope - AGE_EFFECT * maps["age"][support].mean()) < 4 * se
    assert np.corrcoef(age_z, region)[0, 1] > 0.4
    for name in design.names:   # within each site, on the written truth itself
        rows = (covariates["site"] == name).to_numpy()
        assert np.corrcoef(age_z[rows], arrays["y_true_mean"][rows][:, support].mean(axis=1))[0, 1] > 0.3
    bound = 4 / np.sqrt(N)
    values = {"age": age_z, "sex": (covariates["sex"] == "F").to_numpy(float),
              "apoe4": covariates["apoe4"].to_numpy(float)}
    for covariate, value in values.items():
        where = maps[covariate] > 0.5
        for k in (1, 2, 3):
            for pixels in (where, np.ones_like(where)):
                observed = arrays[f"x{k}"][:, pixels].mean(axis=1)
                assert abs(np.corrcoef(value, observed)[0, 1]) < bound, (covariate, k)
    paper = simulate_paper(N, 2)
    s1 = paper_patterns()["shared"][0] > 0.5
    assert np.corrcoef(paper["covariates"]["age"], paper["inputs"]["x1"][:, s1].mean(axis=1))[0, 1] > 0.3


def test_covariates_share_of_the_true_mean(design):
    """Variance over subjects of c_i(v), averaged over pixels, against that of m_i(v) + c_i(v): 20-40%."""
    _, arrays = design
    effect = arrays["covariate_effect"]
    share = effect.var(axis=0).mean() / (arrays["paper_mean"] + effect).var(axis=0).mean()
    assert 0.2 < share < 0.4


def test_missing_covariates_and_mri_only_subjects(tmp_path):
    out = write_cohort(tmp_path / "m", "multisite", 60, 1, unlabeled=12, missing_covariates=0.3)
    manifest = pd.read_csv(out / "manifest.csv")
    assert manifest["site"].notna().all()
    empty = manifest[["age", "sex", "apoe4"]].isna().to_numpy().mean()
    assert abs(empty - 0.3) < 4 * np.sqrt(0.3 * 0.7 / (3 * len(manifest)))
    text = pd.read_csv(out / "manifest.csv", dtype=str)["apoe4"]
    assert set(text.dropna()) <= {"0", "1", "2"}   # copies written as whole numbers, empty cells left empty
    assert json.loads((out / "cohort.json").read_text())["missing_covariates"] == 0.3
    mri_only = manifest.iloc[60:]
    assert (mri_only["split"] == "train").all() and mri_only["y"].isna().all() and (mri_only["site"] != "S4").all()


def test_cli_refuses_bad_site_options(tmp_path, capsys):
    cases = ((["--design", "multisite", "--sites", "0"], ("--sites 0: need at least 1 training site and fewer "
                                                         "sites than subjects")),
             (["--design", "paper", "--sites", "2"], "--sites: only the multisite design has sites (not 'paper')"),
             (["--design", "multisite", "--missing-covariates", "1"], "--missing-covariates 1.0: need 0 <= P < 1"))
    for args, problem in cases:
        assert cli.main(["simulate", *args, "--n-subjects", "20", "--out", str(tmp_path / "bad")]) == 2
        assert capsys.readouterr().err.strip() == f"inva: error: {problem}"
        assert not (tmp_path / "bad").exists()


def test_cli_simulates_and_fits_a_multisite_cohort(tmp_path, capsys):
    out = tmp_path / "cohort"
    assert cli.main(["simulate", "--design", "multisite", "--sites", "3", "--n-subjects", "200", "--seed", "0",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "S4 held out" in printed
    preset = tmp_path / "tiny.toml"
    preset.write_text(tiny_toml(training={"epochs": 2, "batch_size": 32}, prediction={"num_samples": 20}))
    assert cli.main(["fit", "--manifest", str(out / "manifest.csv"), "--inputs", "x1,x2,x3", "--outcome", "y",
                     "--model", str(preset), "--device", "cpu", "--out", str(tmp_path / "run")]) == 0
    assert "trained 2 epochs" in capsys.readouterr().out
