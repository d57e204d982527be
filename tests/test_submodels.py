"""Pattern submodels (train/submodels.py): fitted without one input, mixed with the joint model for the
subjects lacking that input only (predict/routing.py), saved and loaded with their parent."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from inva_pyro.data.cohort import Cohort
from inva_pyro.data.missing import drop_input
from inva_pyro.data.subset import Subset
from inva_pyro.estimator import InVA
from inva_pyro.model.module import InVAModule
from inva_pyro.predict.predictive import mixture_predictive, posterior_predictive, seeded_generator
from inva_pyro.predict.routing import PatternRoutes
from inva_pyro.train.loop import predictive_mean


def three_input_cohort(make_arrays, n_train=48, n_val=16, n_test=10, seed=0):
    """gm and gm2 on the outcome's 64 voxels (the local pathway has one left without either), wm (24)."""
    inputs, y, mean, sd = make_arrays(n_train + n_val + n_test, seed)
    rng = np.random.default_rng(seed + 5)
    inputs["gm2"] = inputs["gm"] + rng.standard_normal(inputs["gm"].shape)
    split = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    return Cohort.from_arrays(inputs, y, split=split, truth_mean=mean, truth_sd=sd)


def lacking(subset, name):
    inputs = dict(subset.inputs)
    inputs[name] = np.full_like(np.asarray(inputs[name]), np.nan)
    return dataclasses.replace(subset, inputs=inputs)


def test_drop_input_removes_the_column_and_the_subjects_left_with_nothing():
    inputs = {"a": np.ones((4, 3)), "b": np.ones((4, 2))}
    inputs["b"][1] = np.nan
    inputs["a"][2] = np.nan
    subset = Subset(subjects=["s0", "s1", "s2", "s3"], inputs=inputs, outcome=np.arange(12.0).reshape(4, 3))
    dropped = drop_input(subset, "a")
    assert list(dropped.inputs) == ["b"] and list(subset.inputs) == ["a", "b"]
    assert dropped.subjects == ["s0", "s2", "s3"]  # s1 had only 'a'
    np.testing.assert_array_equal(dropped.outcome, subset.outcome[[0, 2, 3]])
    with pytest.raises(ValueError, match="only input"):
        drop_input(dropped, "b")


def test_pattern_submodels_need_the_joint_structure(make_preset):
    with pytest.raises(ValidationError, match="pattern_submodels needs model.structure = 'joint'"):
        make_preset({"structure": "integrative"}, {"pattern_submodels": True})


def test_routes_give_each_subject_the_model_of_its_pattern(make_preset):
    torch.manual_seed(0)
    cfg = make_preset({"structure": "joint"}).model
    main = InVAModule(["gm", "wm"], [64, 24], 64, cfg).eval()
    without_wm = InVAModule(["gm"], [64], 64, cfg).eval()
    gm, wm = torch.randn(7, 64), torch.randn(7, 24)
    wm[[1, 4]] = float("nan")                                  # lack wm only: the mixture with its submodel
    gm[5] = float("nan")                                       # lacks gm: no submodel for it, the joint model alone
    routes = PatternRoutes(main, {1: without_wm})
    assert routes.route([gm, wm]).tolist() == [-1, 1, -1, -1, 1, -1, -1]
    y = torch.randn(7, 64)
    kw = dict(num_samples=20, probs=[0.05, 0.95], keep_samples=3, keep_draws=4, keep_features=[0, 5, 9])
    got = posterior_predictive(routes, [gm, wm], observed=y, generator=seeded_generator("cpu", 3), **kw)
    # the same draws, group by group: the joint model's subjects first, then the mixture's
    gen = seeded_generator("cpu", 3)
    rest, sub = [0, 2, 3, 5, 6], [1, 4]
    first = posterior_predictive(main, [gm[rest], wm[rest]], observed=y[rest], generator=gen, **kw)
    second = mixture_predictive([(main, [gm[sub], wm[sub]]), (without_wm, [gm[sub]])], observed=y[sub],
                                generator=gen, **kw)
    for rows, expected in ((rest, first), (sub, second)):
        np.testing.assert_array_equal(got.mean[rows], expected.mean)
        np.testing.assert_array_equal(got.sd[rows], expected.sd)
        np.testing.assert_array_equal(got.quantiles[0.95][rows], expected.quantiles[0.95])
        np.testing.assert_array_equal(got.crps[rows], expected.crps)
        np.testing.assert_array_equal(got.samples[:, rows], expected.samples)
        np.testing.assert_array_equal(got.draws.component_mean[:, rows], expected.draws.component_mean)
        np.testing.assert_array_equal(got.draws.image_loglik[:, rows], expected.draws.image_loglik)
    assert got.samples.shape == (3, 7, 64) and got.draws.outcome.shape == (4, 7, 3)
    # a mixture's kept draws alternate between its components, so their noise sd differs by draw
    assert second.draws.noise_sd.shape == (4, 2, 3) and got.draws.noise_sd.shape == (4, 7, 3)
    np.testing.assert_array_equal(got.draws.noise_sd[:, rest], np.broadcast_to(first.draws.noise_sd, (4, 5, 3)))
    np.testing.assert_array_equal(got.draws.output_weight, first.draws.output_weight)  # the joint model's W
    # with no subject routed, the joint model alone, exactly
    complete = posterior_predictive(routes, [gm[[0]], wm[[0]]], num_samples=20, probs=[], generator=seeded_generator("cpu", 1))
    alone = posterior_predictive(main, [gm[[0]], wm[[0]]], num_samples=20, probs=[], generator=seeded_generator("cpu", 1))
    np.testing.assert_array_equal(complete.mean, alone.mean)


def test_an_equal_mixture_has_the_mean_and_variance_of_one(make_preset):
    torch.manual_seed(1)
    cfg = make_preset({"structure": "joint"}).model
    joint, alone = InVAModule(["gm", "wm"], [64, 24], 64, cfg).eval(), InVAModule(["gm"], [64], 64, cfg).eval()
    with torch.no_grad():  # move the submodel's mean well away from the joint model's
        alone.output_bias_q.loc += 1.0
    gm, wm = torch.randn(3, 64), torch.full((3, 24), float("nan"))
    draws, gen = 4000, seeded_generator("cpu", 0)
    mix = mixture_predictive([(joint, [gm, wm]), (alone, [gm])], num_samples=draws, probs=[], generator=gen)
    one = posterior_predictive(joint, [gm, wm], num_samples=draws, probs=[], generator=gen)
    two = posterior_predictive(alone, [gm], num_samples=draws, probs=[], generator=gen)
    # E = (m1 + m2) / 2; Var = (v1 + v2) / 2 + (m1 - m2)^2 / 4. Each mean has Monte-Carlo sd <= sd / sqrt(S):
    # 5 of those on each of 192 entries; the variance ratio, averaged over them, is within 3%.
    sd = np.maximum(mix.sd, np.maximum(one.sd, two.sd))
    assert np.abs(mix.mean - (one.mean + two.mean) / 2).max() < 5 * 2 * sd.max() / np.sqrt(draws)
    expected = (one.sd ** 2 + two.sd ** 2) / 2 + (one.mean - two.mean) ** 2 / 4
    assert abs((mix.sd ** 2).mean() / expected.mean() - 1) < 0.03
    assert (mix.mean - one.mean).mean() > 0.3   # the shift is seen: half of the submodel's +1


def test_fit_records_the_choice_routes_saves_and_loads(make_preset, make_arrays, tmp_path):
    cohort = three_input_cohort(make_arrays)
    preset = make_preset({"structure": "joint"}, {"epochs": 3, "input_dropout": 0.5, "pattern_submodels": True})
    model = InVA(preset).fit(cohort.train, cohort.val, device="cpu", progress=False, run_dir=tmp_path / "run")
    records = {c["input"]: c for c in model.info["pattern_submodels"]}
    assert list(records) == ["gm", "wm", "gm2"] and set(model.submodels) == {"gm", "wm", "gm2"}
    for c in records.values():
        assert c["n_val"] == 16 and c["predictor"] == "local"
        # the mixture's mean: its squared error is at most the average of the two
        assert c["val_mse_mixture"] <= (c["val_mse_joint"] + c["val_mse_submodel"]) / 2 + 1e-9
    assert model.submodels["wm"].info["inputs"] == ["gm", "gm2"]
    # the submodel speaks its parent's units
    np.testing.assert_array_equal(model.submodels["wm"].standardizer.outcome_mean, model.standardizer.outcome_mean)
    test = lacking(cohort.test, "wm")
    routed = model.predict(test, seed=4)
    # the routed mean is the mixture's: the average of the two models' means, up to Monte-Carlo error
    xs = model.tensors(test)[0]
    halves = [predictive_mean(model.module, xs), predictive_mean(model.submodels["wm"].module, [xs[0], xs[2]])]
    expected = model.standardizer.inverse_outcome_mean(((halves[0] + halves[1]) / 2).numpy())
    z = (routed.mean - expected) / (routed.raw_sd / np.sqrt(preset.prediction.num_samples))
    assert np.abs(z).max() < 5.5
    assert "no wm" in model.calibrator.pattern_scale
    # ArviZ: the mixture's kept draws carry a noise sd per draw, and the log-likelihood follows it
    from inva_pyro.criticism.inference import build_inference_data
    idata = build_inference_data(model, test, routed, num_draws=4, n_features=5)
    loglik = idata.log_likelihood["outcome"].values
    assert loglik.shape == (1, 4, len(test), 5) and np.isfinite(loglik).all()
    assert not np.allclose(loglik[0, 0], loglik[0, 1])  # draws 0 and 1 come from different models
    loaded = InVA.load(tmp_path / "run")
    assert set(loaded.submodels) == {"gm", "wm", "gm2"}
    again = loaded.predict(test, seed=4)
    np.testing.assert_array_equal(again.mean, routed.mean)
    np.testing.assert_array_equal(again.intervals[0.9][0], routed.intervals[0.9][0])
    assert (tmp_path / "run" / "submodels" / "without-wm" / "weights.safetensors").exists()


def test_the_submodel_without_the_only_local_input_uses_the_paper_predictor(make_preset, make_arrays):
    inputs, y, mean, sd = make_arrays(60, 2)
    cohort = Cohort.from_arrays(inputs, y, split=["train"] * 44 + ["val"] * 16)
    preset = make_preset({"structure": "joint"}, {"epochs": 3, "pattern_submodels": True})
    model = InVA(preset).fit(cohort.train, cohort.val, device="cpu", progress=False)
    records = {c["input"]: c for c in model.info["pattern_submodels"]}
    assert records["gm"]["predictor"] == "paper" and records["wm"]["predictor"] == "local"
    assert model.submodels["gm"].preset.model.predictor == "paper"
    xs = [torch.as_tensor(np.asarray(cohort.val.inputs[n])) for n in ("gm", "wm")]
    assert (model.predictive_module.route(xs) == -1).all()   # complete subjects: the joint model alone
    # refitting without pattern submodels leaves none behind
    model.preset.training.pattern_submodels = False
    model.fit(cohort.train, cohort.val, device="cpu", progress=False)
    assert model.submodels == {} and model.predictive_module is model.module


def test_cli_fits_submodels_lazily_and_in_memory_alike(tmp_path, make_manifest):
    import json
    import pandas as pd
    from inva_pyro import cli
    cohort = tmp_path / "cohort"
    table = make_manifest(cohort)[1]
    train = table.index[table["split"] == "train"]
    table.loc[train[:4], "y"] = np.nan                 # MRI-only training subjects
    table.loc[train[4:6], ["x2", "x3"]] = np.nan       # left with x1 only: the submodel without x1 drops them
    test = table.index[table["split"] == "test"]
    table.loc[test[:3], "x1"] = np.nan
    table.to_csv(cohort / "manifest.csv", index=False)
    preset = tmp_path / "tiny.toml"
    preset.write_text('name = "tiny"\n[model]\nstructure = "joint"\nshallow_dim = 4\nhidden = 16\npredictor_hidden = 8\n'
                      'local_hidden = 8\n[training]\nepochs = 2\nbatch_size = 8\npattern_submodels = true\n'
                      '[prediction]\nnum_samples = 20\n')
    means = {}
    for mode in ("memory", "lazy"):
        run = tmp_path / f"run-{mode}"
        assert cli.main(["fit", "--manifest", str(cohort / "manifest.csv"), "--inputs", "x1,x2,x3", "--outcome", "y",
                         "--model", str(preset), "--device", "cpu", "--out", str(run)]
                        + (["--lazy"] if mode == "lazy" else [])) == 0
        info = json.loads((run / "run.json").read_text())
        assert [c["input"] for c in info["pattern_submodels"]] == ["x1", "x2", "x3"]
        assert all((run / "submodels" / f"without-{name}" / "weights.safetensors").exists() for name in ("x1", "x2", "x3"))
        sub = json.loads((run / "submodels" / "without-x1" / "run.json").read_text())
        assert sub["inputs"] == ["x2", "x3"] and sub["n_train"] == info["n_train"] - 2
        out = tmp_path / f"pred-{mode}"
        assert cli.main(["predict", "--run", str(run), "--manifest", str(cohort / "manifest.csv"), "--out", str(out)]) == 0
        means[mode] = pd.read_csv(out / "predictions.csv")
    pd.testing.assert_frame_equal(means["lazy"], means["memory"], rtol=1e-5)
