"""Pattern submodels (train/submodels.py): fitted without one input, chosen on validation, routed to the
subjects lacking that input only, saved and loaded with their parent."""
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
from inva_pyro.predict.predictive import PatternRoutes, posterior_predictive, seeded_generator
from inva_pyro.train import submodels as submodels_mod


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


def test_routes_give_each_subject_the_module_of_its_pattern(make_preset):
    torch.manual_seed(0)
    cfg = make_preset({"structure": "joint"}).model
    main = InVAModule(["gm", "wm"], [64, 24], 64, cfg).eval()
    without_wm = InVAModule(["gm"], [64], 64, cfg).eval()
    gm, wm = torch.randn(7, 64), torch.randn(7, 24)
    wm[[1, 4]] = float("nan")                                  # lack wm only: the submodel's
    gm[5] = float("nan")                                       # lacks gm: no submodel for it, the main module's
    routes = PatternRoutes(main, {1: without_wm})
    assert routes.route([gm, wm]).tolist() == [-1, 1, -1, -1, 1, -1, -1]
    y = torch.randn(7, 64)
    got = posterior_predictive(routes, [gm, wm], num_samples=20, probs=[0.05, 0.95], observed=y, keep_samples=3,
                               keep_draws=4, keep_features=[0, 5, 9], generator=seeded_generator("cpu", 3))
    # the same draws, group by group: the main module's subjects first, then the submodel's
    gen = seeded_generator("cpu", 3)
    kw = dict(num_samples=20, probs=[0.05, 0.95], keep_samples=3, keep_draws=4, keep_features=[0, 5, 9])
    rest, sub = [0, 2, 3, 5, 6], [1, 4]
    first = posterior_predictive(main, [gm[rest], wm[rest]], observed=y[rest], generator=gen, **kw)
    second = posterior_predictive(without_wm, [gm[sub]], observed=y[sub], generator=gen, **kw)
    for rows, expected in ((rest, first), (sub, second)):
        np.testing.assert_array_equal(got.mean[rows], expected.mean)
        np.testing.assert_array_equal(got.sd[rows], expected.sd)
        np.testing.assert_array_equal(got.quantiles[0.95][rows], expected.quantiles[0.95])
        np.testing.assert_array_equal(got.crps[rows], expected.crps)
        np.testing.assert_array_equal(got.samples[:, rows], expected.samples)
        np.testing.assert_array_equal(got.draws.component_mean[:, rows], expected.draws.component_mean)
        np.testing.assert_array_equal(got.draws.image_loglik[:, rows], expected.draws.image_loglik)
    assert got.samples.shape == (3, 7, 64) and got.draws.outcome.shape == (4, 7, 3)
    np.testing.assert_array_equal(got.draws.output_weight, first.draws.output_weight)  # the main module's W
    # with no subject routed, the main module alone, exactly
    complete = posterior_predictive(routes, [gm[[0]], wm[[0]]], num_samples=20, probs=[], generator=seeded_generator("cpu", 1))
    alone = posterior_predictive(main, [gm[[0]], wm[[0]]], num_samples=20, probs=[], generator=seeded_generator("cpu", 1))
    np.testing.assert_array_equal(complete.mean, alone.mean)


def test_fit_chooses_on_validation_routes_saves_and_loads(make_preset, make_arrays, tmp_path, monkeypatch):
    cohort = three_input_cohort(make_arrays)
    preset = make_preset({"structure": "joint"}, {"epochs": 3, "input_dropout": 0.5, "pattern_submodels": True})
    # every submodel kept, whatever validation says, so that routing is exercised for each input
    monkeypatch.setattr(submodels_mod.SubmodelChoice, "used", property(lambda self: True))
    model = InVA(preset).fit(cohort.train, cohort.val, device="cpu", progress=False, run_dir=tmp_path / "run")
    choices = {c["input"]: c for c in model.info["pattern_submodels"]}
    assert list(choices) == ["gm", "wm", "gm2"] and set(model.submodels) == {"gm", "wm", "gm2"}
    assert all(c["n_val"] == 16 and np.isfinite(c["val_mse_joint"]) and np.isfinite(c["val_mse_submodel"])
               for c in choices.values())
    assert [choices[n]["predictor"] for n in ("gm", "wm", "gm2")] == ["local", "local", "local"]
    assert model.submodels["wm"].info["inputs"] == ["gm", "gm2"]
    # the submodel speaks its parent's units
    np.testing.assert_array_equal(model.submodels["wm"].standardizer.outcome_mean, model.standardizer.outcome_mean)
    test = lacking(cohort.test, "wm")
    routed = model.predict(test, seed=4)
    alone = model.submodels["wm"].predict(drop_input(cohort.test, "wm"), seed=4)
    np.testing.assert_allclose(routed.mean, alone.mean, rtol=1e-6)
    # per-pattern calibration scales the submodel's raw intervals by its own pattern factor
    assert "no wm" in model.calibrator.pattern_scale
    loaded = InVA.load(tmp_path / "run")
    assert set(loaded.submodels) == {"gm", "wm", "gm2"}
    again = loaded.predict(test, seed=4)
    np.testing.assert_array_equal(again.mean, routed.mean)
    np.testing.assert_array_equal(again.intervals[0.9][0], routed.intervals[0.9][0])
    assert (tmp_path / "run" / "submodels" / "without-wm" / "weights.safetensors").exists()


def test_a_submodel_is_kept_only_where_it_wins_and_the_local_pathway_falls_back(make_preset, make_arrays):
    inputs, y, mean, sd = make_arrays(60, 2)
    cohort = Cohort.from_arrays(inputs, y, split=["train"] * 44 + ["val"] * 16)
    preset = make_preset({"structure": "joint"}, {"epochs": 3, "pattern_submodels": True})
    model = InVA(preset).fit(cohort.train, cohort.val, device="cpu", progress=False)
    choices = {c["input"]: c for c in model.info["pattern_submodels"]}
    assert choices["gm"]["predictor"] == "paper"   # wm alone has no voxel on the outcome's grid
    for name, c in choices.items():
        assert c["used"] == (c["val_mse_submodel"] < c["val_mse_joint"]) == (name in model.submodels)
    # complete subjects never leave the main module
    if model.submodels:
        xs = [torch.as_tensor(np.asarray(cohort.val.inputs[n])) for n in ("gm", "wm")]
        assert (model.predictive_module.route(xs) == -1).all()
    else:
        assert model.predictive_module is model.module


def test_cli_fits_submodels_lazily_and_in_memory_alike(tmp_path, monkeypatch, make_manifest):
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
    monkeypatch.setattr(submodels_mod.SubmodelChoice, "used", property(lambda self: True))  # each one routed
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
