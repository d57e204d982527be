"""Covariates and sites: their encoding, their place in the Pyro program, and what a fit gains from them."""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pandas as pd
import pyro
import pytest
import torch
from pyro import poutine

from inva_pyro.data.cohort import Cohort
from inva_pyro.data.covariates import CovariateEncoder, SiteLevels
from inva_pyro.errors import InputError
from inva_pyro.estimator import InVA
from inva_pyro.model.conditions import Conditions, NewSiteWarning
from inva_pyro.model.module import InVAModule
from inva_pyro.train.elbo import DeviceTrace_ELBO

SPEC = [("age", "numeric", 1), ("sex", "categorical", 2)]


def test_covariates_are_standardised_one_hot_and_nan_where_empty():
    frame = pd.DataFrame({"age": [60.0, 70.0, np.nan, 80.0], "sex": ["F", None, "M", "F"]},
                         index=pd.Index(list("abcd"), name="subject"))
    encoder = CovariateEncoder.fit(frame)
    assert encoder.spec() == SPEC and encoder.columns[0]["mean"] == 70.0
    values = encoder.transform(frame)
    sd = np.std([60.0, 70.0, 80.0])
    np.testing.assert_allclose(values[:, 0], [-10 / sd, 0.0, np.nan, 10 / sd])
    np.testing.assert_array_equal(values[[0, 2, 3], 1:], [[1, 0], [0, 1], [1, 0]])
    assert np.isnan(values[1, 1:]).all()
    again = CovariateEncoder.from_dict(encoder.to_dict())
    np.testing.assert_array_equal(again.transform(frame), values)


def test_covariate_problems_are_one_line_naming_the_place():
    encoder = CovariateEncoder.fit(pd.DataFrame({"sex": ["F", "M"]}, index=["a", "b"]))
    with pytest.raises(InputError, match=r"^m\.csv: covariate 'sex' of subject 'c' is 'X', a level training never "
                                         r"saw \(levels: F, M\)$"):
        encoder.transform(pd.DataFrame({"sex": ["X"]}, index=["c"]), "m.csv")
    with pytest.raises(InputError, match=r"^m\.csv: no covariate column 'sex' \(the run was fitted with covariates sex\)"):
        encoder.transform(pd.DataFrame({"age": [1.0]}, index=["c"]), "m.csv")
    with pytest.raises(InputError, match="covariate 'age' is empty for every training subject"):
        CovariateEncoder.fit(pd.DataFrame({"age": [np.nan, np.nan]}))


def test_sites_are_numbered_and_an_unknown_one_is_pooled():
    levels = SiteLevels.fit(pd.Series(["S2", "S1", "S2", None], name="site"))
    assert levels.levels == ["S1", "S2"]
    sites = pd.Series(["S2", "S9", None, "S1"], name="site")
    np.testing.assert_array_equal(levels.index(sites), [1, -1, -1, 0])
    assert levels.unseen(sites) == ["S9"]
    assert levels.with_sites(["S9"]).levels == ["S1", "S2", "S9"]


def _module(make_preset, n_sites=2, spec=SPEC, structure="integrative"):
    return InVAModule(["gm", "wm"], [20, 8], 20, make_preset({"structure": structure}).model,
                      covariate_spec=spec, n_sites=n_sites)


def _batch(n=4):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 20, generator=g), torch.randn(n, 8, generator=g)]
    covariates = torch.tensor([[0.5, 1.0, 0.0], [float("nan"), 0.0, 1.0], [1.5, float("nan"), float("nan")],
                               [-1.0, 1.0, 0.0]])[:n]
    return xs, torch.randn(n, 20, generator=g), Conditions(covariates, torch.tensor([0, 1, -1, 1])[:n])


@pytest.mark.parametrize("structure", ["integrative", "joint"])
def test_observed_covariates_are_scored_by_their_prior_and_empty_ones_not(make_preset, structure):
    module = _module(make_preset, structure=structure)
    xs, y, conditions = _batch()
    kwargs = dict(subjects=torch.arange(4), n_subjects=4, conditions=conditions)
    guide = poutine.trace(module.guide).get_trace(xs, y, **kwargs)
    trace = poutine.trace(poutine.replay(module.model, trace=guide)).get_trace(xs, y, **kwargs)
    trace.compute_log_prob()
    age = trace.nodes["covariate_age"]["log_prob"]
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(torch.tensor([0.5, 0.0, 1.5, -1.0]))
    np.testing.assert_allclose(age.detach(), (expected * torch.tensor([1.0, 0.0, 1.0, 1.0])).numpy(), rtol=1e-6)
    sex = trace.nodes["covariate_sex"]["log_prob"]
    np.testing.assert_allclose(sex.detach(), [np.log(0.5), np.log(0.5), 0.0, np.log(0.5)], rtol=1e-6)


def test_the_pooled_site_is_the_average_site_and_the_gain_scales_mean_and_sd(make_preset):
    module = _module(make_preset)
    with torch.no_grad():
        module.conditioning.site_offset.copy_(torch.tensor([1.0, 3.0]))
        module.conditioning.site_log_gain.copy_(torch.tensor([np.log(0.5), np.log(2.0)]))
    xs, _, conditions = _batch()
    offset, gain = module.conditioning.site_affine(conditions.site)
    np.testing.assert_allclose(offset.squeeze(-1).detach(), [1.0, 3.0, 2.0, 3.0])
    np.testing.assert_allclose(gain.squeeze(-1).detach(), [0.5, 2.0, 1.0, 2.0], rtol=1e-6)  # exp(mean log gain)
    module.eval()
    parts = module.outcome_parts(xs, conditions=conditions)
    weight, bias = module.output_layer_mean()
    raw = parts.hidden @ weight.T + bias + parts.local_mean
    np.testing.assert_allclose(parts.mean(weight, bias).detach(), (offset + gain * raw).detach(), rtol=1e-5)


def test_a_conditioned_program_runs_on_the_module_device(make_preset):
    from test_device import META, MetaHost
    module = _module(make_preset).to(META)
    xs, y, conditions = _batch()
    xs, y, conditions = [x.to(META) for x in xs], y.to(META), conditions.to(META)
    with pyro.validation_enabled(False), MetaHost():
        loss = DeviceTrace_ELBO().differentiable_loss(module.model, module.guide, xs, y, subjects=torch.arange(
            4, device=META), n_subjects=10, conditions=conditions)
        loss.backward()
    assert loss.device == META and all(p.grad is None or p.grad.device == META for p in module.parameters())


def _site_cohort(n=160, seed=0, effect="site"):
    """gm, wm ~ N(0, 1) and y = 1.5 gm + site offset (+-1.5) or + 1.2 age, noise sd 0.3: without the site (age)
    no model can know its part, whose variance is about 2.25 (1.44) against a noise floor of 0.09."""
    rng = np.random.default_rng(seed)
    gm, wm = rng.standard_normal((n, 16)), rng.standard_normal((n, 6))
    site = rng.integers(0, 2, n)
    age = rng.standard_normal(n)
    extra = np.where(site == 1, 1.5, -1.5)[:, None] if effect == "site" else 1.2 * age[:, None]
    y = 1.5 * gm + extra + 0.3 * rng.standard_normal((n, 16))
    split = ["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n - n // 2 - n // 4)
    return Cohort.from_arrays({"gm": gm, "wm": wm}, y, split=split,
                              conditions=pd.DataFrame({"age": 70 + 8 * age}),
                              sites=pd.Series([f"S{s + 1}" for s in site], name="site"))


@pytest.mark.parametrize("effect", ["site", "age"])
def test_a_fit_that_knows_what_moves_the_outcome_predicts_it(make_preset, effect):
    import dataclasses
    cohort = _site_cohort(effect=effect)
    keep = {"site": dict(conditions=None), "age": dict(sites=None)}[effect]
    drop = dict(conditions=None, sites=None)
    preset = make_preset(training={"epochs": 40, "batch_size": 16})
    mse = {}
    for name, fields in (("with", keep), ("without", drop)):
        train, val, test = (dataclasses.replace(s, **fields) for s in (cohort.train, cohort.val, cohort.test))
        model = InVA(preset).fit(train, val, seed=0, progress=False, device="cpu")
        mse[name] = float(((model.predict(test, seed=0).mean - test.outcome) ** 2).mean())
    # without it the part it explains (variance 2.25 or 1.44) stays in the error; with it most of it goes
    assert mse["without"] > 1.0 and mse["with"] < 0.5 * mse["without"], mse


def test_a_run_with_conditions_saves_loads_and_pools_an_unseen_site(make_preset, tmp_path):
    import dataclasses
    cohort = _site_cohort(n=80, seed=1)
    model = InVA(make_preset(training={"epochs": 3})).fit(cohort.train, cohort.val, seed=0, progress=False,
                                                          device="cpu", run_dir=tmp_path / "run")
    assert model.info["covariates"] == ["age"] and model.info["site"] == "site"
    assert (tmp_path / "run" / "covariates.json").exists()
    loaded = InVA.load(tmp_path / "run")
    test = cohort.test
    np.testing.assert_array_equal(model.predict(test, seed=2).mean, loaded.predict(test, seed=2).mean)
    new = dataclasses.replace(test, sites=pd.Series(["S9"] * len(test), index=test.sites.index, name="site"))
    with pytest.warns(NewSiteWarning, match=r"site\(s\) S9 not seen in training: predicted with the pooled site"):
        pooled = loaded.predict(new, seed=2)
    assert not np.allclose(pooled.mean, loaded.predict(test, seed=2).mean)
    with pytest.raises(InputError, match="no site column; this run was fitted with sites from column 'site'"):
        loaded.predict(dataclasses.replace(test, sites=None))
    with warnings.catch_warnings():
        warnings.simplefilter("error", NewSiteWarning)
        loaded.predict(test, seed=2)  # every site known: no word


def test_cli_fits_with_covariates_and_site_and_says_what_predict_needs(tmp_path, capsys):
    from conftest import tiny_toml
    from inva_pyro import cli
    cohort = tmp_path / "cohort"
    assert cli.main(["simulate", "--design", "multisite", "--sites", "2", "--n-subjects", "40", "--seed", "1",
                     "--out", str(cohort)]) == 0
    preset = tmp_path / "tiny.toml"
    preset.write_text(tiny_toml(training={"epochs": 2, "batch_size": 8}, prediction={"num_samples": 20}))
    manifest = cohort / "manifest.csv"
    fit = ["fit", "--manifest", str(manifest), "--inputs", "x1,x2,x3", "--outcome", "y", "--model", str(preset),
           "--device", "cpu", "--covariates", "age,sex,apoe4", "--site", "site"]
    assert cli.main([*fit, "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert cli.main(["predict", "--run", str(tmp_path / "run"), "--manifest", str(manifest), "--samples", "20",
                     "--out", str(tmp_path / "pred")]) == 0
    err = capsys.readouterr().err  # the held-out site's test subjects: pooled, said once
    assert err.count("inva: note: site(s) S3 not seen in training: predicted with the pooled site") == 1
    listed = pd.read_csv(tmp_path / "pred" / "predictions.csv")
    assert list(listed.columns) == ["subject", "map", "path", "novelty"] and listed["novelty"].notna().all()
    assert listed.groupby("subject")["novelty"].nunique().eq(1).all()  # one score per subject
    table = pd.read_csv(manifest).drop(columns=["age"])
    table.to_csv(cohort / "no_age.csv", index=False)
    assert cli.main(["predict", "--run", str(tmp_path / "run"), "--manifest", str(cohort / "no_age.csv"),
                     "--out", str(tmp_path / "pred2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("inva: error: ") and "no column 'age'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "pred2").exists()
    typo = [a if a != "age,sex,apoe4" else "agee" for a in fit]
    peer = [a if a != str(preset) else "ridge" for a in fit]
    for args, message in ((typo, "no column 'agee' for --covariates"),
                          (peer, "a 'ridge' model conditions on no covariates or sites")):
        assert cli.main([*args, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_novelty_is_near_zero_for_subjects_like_the_fit_and_large_for_shifted_inputs(make_preset):
    import dataclasses
    from inva_pyro.criticism.novelty import NOVEL
    cohort = _site_cohort(n=120, seed=2)
    model = InVA(make_preset(training={"epochs": 15})).fit(cohort.train, cohort.val, seed=0, progress=False,
                                                           device="cpu")
    ref = model.info["novelty_reference"]
    assert ref["n"] == len(cohort.val) and ref["scale"] > 0
    test = cohort.test
    usual = model.novelty(test)
    shifted = model.novelty(dataclasses.replace(test, inputs={k: v + 2.0 for k, v in test.inputs.items()}))
    # a robust z against the validation subjects: test subjects like them mostly under NOVEL, shifted ones far over
    assert (usual >= 0).all() and np.median(usual) < 1.5 and (usual > NOVEL).mean() <= 0.2
    assert (shifted > NOVEL).all() and np.median(shifted) > 3 * NOVEL
    np.testing.assert_array_equal(model.novelty(test), usual)  # seeded: the same scores again
    # inputs squeezed towards their mean are explained better than the validation subjects': atypical too (a
    # one-sided score would give them 0); this tiny model scores them near NOVEL, far above the usual subjects
    squeezed = {k: 0.2 * v + 0.8 * v.mean(0) for k, v in test.inputs.items()}
    assert np.median(model.novelty(dataclasses.replace(test, inputs=squeezed))) > max(2.0, 2.5 * np.median(usual))


def _new_site(cohort, label="S3", offset=3.0):
    """The test subjects of site S1 (outcome offset -1.5) moved to a new site whose outcome is shifted by
    ``offset``: its offset, +1.5, is 1.5 from the pooled site's (0)."""
    test = cohort.test.subset(np.flatnonzero(cohort.test.sites.to_numpy() == "S1"))
    return dataclasses.replace(test, outcome=test.outcome + offset, truth_mean=None,
                               sites=pd.Series([label] * len(test), index=test.sites.index, name="site"))


def test_adapt_fits_a_new_site_from_a_few_subjects_and_calibrates_it_cross_fitted(make_preset, tmp_path):
    import dataclasses as dc
    from inva_pyro.adaptation import adapt
    cohort = _site_cohort(n=320, seed=3)
    model = InVA(make_preset(training={"epochs": 30, "batch_size": 16})).fit(cohort.train, cohort.val, seed=0,
                                                                             progress=False, device="cpu")
    new = _new_site(cohort)
    few, rest = new.subset(np.arange(15)), new.subset(np.arange(15, len(new)))
    assert len(rest) >= 20
    with pytest.warns(NewSiteWarning):
        pooled = model.predict(rest, seed=0)
    adapted = adapt(model, few, seed=0, steps=200)
    assert adapted.sites.levels == ["S1", "S2", "S3"] and model.sites.levels == ["S1", "S2"]  # the original kept
    assert adapted.info["adapted"] == [{"sites": ["S3"], "n_subjects": 15, "steps": 200, "seed": 0}]
    assert "S3" in adapted.calibrator.group_info and adapted.calibrator.group_info["S3"]["subjects"] == 15
    fitted = adapted.predict(rest, seed=0)
    error = {name: float(((p.mean - rest.outcome) ** 2).mean()) for name, p in (("pooled", pooled), ("adapted", fitted))}
    # the new site's offset (1.5 from the pooled site's) is the pooled prediction's error (2.25 in squares);
    # the adapted site takes most of it away
    assert error["pooled"] > 1.5 and error["adapted"] < 0.3 * error["pooled"], error
    lo, hi = fitted.intervals[0.9]
    assert abs(float(((rest.outcome >= lo) & (rest.outcome <= hi)).mean()) - 0.9) < 0.1
    adapted.save(tmp_path / "run")
    again = InVA.load(tmp_path / "run")
    np.testing.assert_array_equal(again.predict(rest, seed=0).mean, fitted.mean)
    with pytest.raises(InputError, match="site S1 is a training site"):
        adapt(model, dc.replace(few, sites=pd.Series(["S1"] * 15, index=few.sites.index, name="site")))
    lacking = dc.replace(few, outcome=np.where(np.arange(15)[:, None] < 3, np.nan, few.outcome))
    with pytest.raises(InputError, match=r"adapt needs the outcome 'outcome' of every subject \(3 of 15 lack it\)"):
        adapt(model, lacking)
    no_sites = InVA(make_preset(training={"epochs": 1})).fit(*(dc.replace(s, sites=None) for s in (cohort.train,
                                                                                                     cohort.val)),
                                                              progress=False, device="cpu")
    with pytest.raises(InputError, match="fitted without --site"):
        adapt(no_sites, few)


def test_cli_adapt_writes_a_run_folder_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    from conftest import tiny_toml
    from inva_pyro import cli
    cohort = tmp_path / "cohort"
    assert cli.main(["simulate", "--design", "multisite", "--sites", "2", "--n-subjects", "60", "--seed", "2",
                     "--out", str(cohort)]) == 0
    table = pd.read_csv(cohort / "manifest.csv")
    new = table[table["site"] == "S3"]
    new.iloc[:6].to_csv(cohort / "new.csv", index=False)
    new.iloc[:6].drop(columns=["y"]).to_csv(cohort / "no_outcome.csv", index=False)
    new.iloc[:6].assign(y=[None, None, None] + list(new["y"].iloc[3:6])).to_csv(cohort / "some_outcome.csv", index=False)
    table[table["site"] == "S1"].iloc[:4].to_csv(cohort / "old.csv", index=False)
    preset = tmp_path / "tiny.toml"
    preset.write_text(tiny_toml(training={"epochs": 2, "batch_size": 8}, prediction={"num_samples": 20}))
    assert cli.main(["fit", "--manifest", str(cohort / "manifest.csv"), "--inputs", "x1,x2,x3", "--outcome", "y",
                     "--model", str(preset), "--device", "cpu", "--covariates", "age,sex,apoe4", "--site", "site",
                     "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    adapt = ["adapt", "--run", str(tmp_path / "run"), "--steps", "20"]
    assert cli.main([*adapt, "--manifest", str(cohort / "new.csv"), "--out", str(tmp_path / "run2")]) == 0
    out = capsys.readouterr().out
    assert "adapted" in out and "(input intensities of S3 fitted from their images)" in out
    assert (tmp_path / "run2" / "site_intensity.json").exists() and (tmp_path / "run2" / "run.json").exists()
    capsys.readouterr()
    assert cli.main(["predict", "--run", str(tmp_path / "run2"), "--manifest", str(cohort / "new.csv"), "--samples",
                     "20", "--out", str(tmp_path / "pred")]) == 0
    assert "not seen in training" not in capsys.readouterr().err  # the adapted site is known now
    assert cli.main(["predict", "--run", str(tmp_path / "run"), "--manifest", str(cohort / "new.csv"), "--samples",
                     "20", "--new-site-intensities", "--out", str(tmp_path / "pred_new")]) == 0
    err = capsys.readouterr().err   # without labels: the new site's images on the training scale, said in a line
    assert "inva: note: input intensities of site(s) S3 (6 subjects) fitted from this manifest's images" in err
    for manifest, message in (("no_outcome.csv", "no column 'y' for the outcome"),
                              ("some_outcome.csv", "adapt needs the outcome 'y' of every subject (3 of 6 lack it)"),
                              ("old.csv", "site S1 is a training site")):
        assert cli.main([*adapt, "--manifest", str(cohort / manifest), "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_predict_says_in_one_line_when_most_subjects_are_novel(tmp_path, capsys, monkeypatch):
    from conftest import simulated_manifest, tiny_toml
    from inva_pyro import cli
    manifest, _ = simulated_manifest(tmp_path / "cohort", n_subjects=30)
    preset = tmp_path / "tiny.toml"
    preset.write_text(tiny_toml(training={"epochs": 1, "batch_size": 8}, prediction={"num_samples": 20}))
    assert cli.main(["fit", "--manifest", str(manifest), "--inputs", "x1,x2,x3", "--outcome", "y", "--model",
                     str(preset), "--device", "cpu", "--out", str(tmp_path / "run")]) == 0
    predict = ["predict", "--run", str(tmp_path / "run"), "--manifest", str(manifest), "--samples", "20"]
    for scores, warned in ((lambda n: np.zeros(n), False), (lambda n: np.r_[np.full(n - 1, 9.0), 0.0], True)):
        monkeypatch.setattr(InVA, "novelty", lambda self, subset, f=scores: f(len(subset)))
        capsys.readouterr()
        out = tmp_path / f"pred-{warned}"
        assert cli.main([*predict, "--out", str(out)]) == 0
        lines = [line for line in capsys.readouterr().err.splitlines() if "unlike the fit" in line]
        assert len(lines) == (1 if warned else 0)
        if warned:
            n = len(pd.read_csv(out / "predictions.csv")["subject"].unique())
            assert lines[0] == (f"inva: warning: {n - 1} of {n} subjects have inputs unlike the fit's (novelty > 3, "
                                "predictions.csv): their predictions extrapolate")
