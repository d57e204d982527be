"""Peer models (ridge, tensor, voxel-wise BART): known truths, interval coverage, persistence, CLI.

Problems are small and seeded. Coverage tolerances are binomial: the calibrated intervals are
split-conformal over subjects, so the observed coverage of a level P on n_test values, with
quantiles estimated from n_cal values, has sd about sqrt(P (1 - P) (1/n_test + 1/n_cal)); we allow
4 such sd (a false alarm on a correct implementation has probability below 1e-4 per check),
with n counted in subjects x voxels (noise is independent across voxels given the inputs).
"""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import Ridge, RidgeCV

from inva_pyro import cli
from inva_pyro.data.cohort import Cohort
from inva_pyro.config import Preset, load_preset, parse_preset
from inva_pyro.errors import InputError
from inva_pyro.peers import RidgeRegression, TensorRegression, VoxelBART
from inva_pyro.peers.bart import FORESTS_FILE, neighbour_index
from inva_pyro.peers.residual import residual_scale, split_validation
from inva_pyro.registry import load_model, model_from_preset
from inva_pyro.data.spaces import VolumeSpace

LEVELS = [0.5, 0.8, 0.9, 0.95]
GRID = (4, 4, 1)
N_VOX = 16


def preset(family: str, **model) -> Preset:
    return Preset.model_validate({"model": {"family": family, **model}, "prediction": {"num_samples": 400}})


def grid_space() -> VolumeSpace:
    return VolumeSpace(shape=GRID, affine=np.eye(4), header=None, mask=np.ones(GRID, dtype=bool))


def cohort(inputs: dict, y, mean, sd, n_train: int, n_val: int, space=None) -> Cohort:
    n = len(y)
    split = ["train"] * n_train + ["val"] * n_val + ["test"] * (n - n_train - n_val)
    return Cohort.from_arrays(inputs, y, split=split, truth_mean=mean, truth_sd=sd, space=space)


# ---- known truths --------------------------------------------------------------------------------
def linear_problem(n=500, seed=0, noise=0.5):
    """y = 1 + A a + B b + noise, inputs of two sizes, Gaussian truth (linear: ridge's family)."""
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((n, 12)), rng.standard_normal((n, 8))
    coef_a, coef_b = rng.standard_normal((12, N_VOX)) * 0.5, rng.standard_normal((8, N_VOX)) * 0.5
    mean = 1.0 + a @ coef_a + b @ coef_b
    sd = np.full_like(mean, noise)
    return cohort({"a": a, "b": b}, mean + sd * rng.standard_normal(mean.shape), mean, sd, 200, 150)


def low_rank_problem(n=500, seed=1, noise=0.5, rank=2):
    """y = X U V^T + noise with a rank-2 coefficient (the tensor model's family)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 30))
    coef = rng.standard_normal((30, rank)) @ rng.standard_normal((rank, 24)) / 3
    mean = x @ coef
    sd = np.full_like(mean, noise)
    return cohort({"x": x}, mean + sd * rng.standard_normal(mean.shape), mean, sd, 200, 150)


def additive_problem(n=460, seed=2, noise=0.3):
    """Voxel-wise additive truth y_v = sin(2 u_v) + 0.5 w_v^2 + noise on a 4 x 4 grid (BART's family)."""
    rng = np.random.default_rng(seed)
    u, w = rng.standard_normal((n, N_VOX)), rng.standard_normal((n, N_VOX))
    mean = np.sin(2 * u) + 0.5 * w ** 2
    sd = np.full_like(mean, noise)
    return cohort({"u": u, "w": w}, mean + sd * rng.standard_normal(mean.shape), mean, sd, 200, 160, grid_space())


@pytest.fixture(scope="module")
def linear():
    return linear_problem()


@pytest.fixture(scope="module")
def ridge_fit(linear):
    return RidgeRegression(preset("ridge")).fit(linear.train, linear.val, seed=0)


@pytest.fixture(scope="module")
def low_rank():
    return low_rank_problem()


@pytest.fixture(scope="module")
def tensor_fit(low_rank):
    return TensorRegression(preset("tensor")).fit(low_rank.train, low_rank.val, seed=0)


@pytest.fixture(scope="module")
def additive():
    return additive_problem()


@pytest.fixture(scope="module")
def bart_fit(additive):
    cfg = preset("bart", num_trees=20, num_draws=40, num_gfr=5, neighbourhood=0, n_jobs=1)
    return VoxelBART(cfg).fit(additive.train, additive.val, seed=0)


def relative_error(pred, subset) -> float:
    """MSE of the predicted mean against the true mean, relative to the true mean's variance."""
    truth = subset.truth_mean
    return float(np.mean((pred.mean - truth) ** 2) / np.var(truth))


def test_ridge_recovers_linear_truth(ridge_fit, linear):
    pred = ridge_fit.predict(linear.test)
    assert relative_error(pred, linear.test) < 0.05
    # the mean's error is small next to the noise: test MSE close to the oracle's
    m = pred.metrics(truth_mean=linear.test.truth_mean, truth_sd=linear.test.truth_sd)
    assert m["mse"] < 1.15 * m["oracle_mse"]


def test_tensor_recovers_low_rank_truth(tensor_fit, low_rank):
    assert tensor_fit.info["rank"] == 2
    pred = tensor_fit.predict(low_rank.test)
    assert relative_error(pred, low_rank.test) < 0.03


def test_tensor_full_rank_is_ridge_and_reduced_rank_is_the_closed_form(low_rank):
    """With one penalty and rank Q the fit is ridge; with rank R it is B_ridge V_R V_R^T (Mukherjee & Zhu)."""
    alpha = 30.0
    train = low_rank.train
    q = train.outcome.shape[1]
    full = TensorRegression(preset("tensor", ranks=[q], alpha_min=alpha, alpha_max=alpha, n_alphas=1))
    full.fit(train, low_rank.val, seed=0)
    x = full._standardised_inputs(train)
    y = full.standardizer.transform_outcome(train.outcome).astype(np.float64)
    ridge = Ridge(alpha=alpha).fit(x, y)
    x_test = full._standardised_inputs(low_rank.test)
    np.testing.assert_allclose(full._predict_point(x_test), ridge.predict(x_test), rtol=1e-4, atol=1e-5)

    rank = 3
    reduced = TensorRegression(preset("tensor", ranks=[rank], alpha_min=alpha, alpha_max=alpha, n_alphas=1))
    reduced.fit(train, low_rank.val, seed=0)
    b_ridge = ridge.coef_.T                                        # (P, Q)
    xc = x - x.mean(0)
    augmented_fit = np.vstack([xc @ b_ridge, math.sqrt(alpha) * b_ridge])
    v = np.linalg.svd(augmented_fit, full_matrices=False)[2][:rank].T
    np.testing.assert_allclose(reduced.linear.coefficient, b_ridge @ v @ v.T, rtol=1e-4, atol=1e-5)
    assert np.linalg.matrix_rank(reduced.linear.coefficient, tol=1e-4) == rank


@pytest.mark.parametrize("n_train, n_features, per_target", [(200, 20, False), (30, 100, False), (30, 100, True)])
def test_ridge_is_sklearn_ridge_with_the_loo_penalty(n_train, n_features, per_target):
    """Same penalty as RidgeCV's leave-one-out choice and the same predictions, dense or dual storage."""
    rng = np.random.default_rng(n_features)
    n, q = n_train + 40, 50
    x = rng.standard_normal((n, n_features))
    y = x[:, :5] @ rng.standard_normal((5, q)) + rng.standard_normal((n, q))
    data = cohort({"x": x}, y, None, None, n_train, 20)
    model = RidgeRegression(preset("ridge", alpha_per_target=per_target)).fit(data.train, data.val, seed=0)
    assert (model.linear.right is None) == (n_features * q <= n_train * (n_features + q))
    xs = model._standardised_inputs(data.train)
    ys = model.standardizer.transform_outcome(data.train.outcome).astype(np.float64)
    alphas = np.logspace(-2, 5, 15)
    reference = RidgeCV(alphas=alphas, alpha_per_target=per_target).fit(xs, ys)
    np.testing.assert_allclose(model.alpha, np.atleast_1d(reference.alpha_))
    x_test = model._standardised_inputs(data.test)
    np.testing.assert_allclose(model._predict_point(x_test), reference.predict(x_test), rtol=1e-4, atol=1e-4)


def test_bart_recovers_additive_truth(bart_fit, additive, linear):
    pred = bart_fit.predict(additive.test)
    assert relative_error(pred, additive.test) < 0.15
    # a linear model cannot: the truth is even in w and periodic in u
    ridge = RidgeRegression(preset("ridge")).fit(additive.train, additive.val, seed=0)
    assert relative_error(ridge.predict(additive.test), additive.test) > 0.6


def test_bart_prediction_matches_stochtree(bart_fit, additive):
    """The numpy traversal of the flattened forests gives stochtree's own posterior draws."""
    from stochtree import BARTModel

    test = additive.test
    features = bart_fit._features(test)
    for voxel in (0, 7, 15):
        model = BARTModel()
        model.from_json(gzip.decompress(bart_fit.documents[voxel]).decode())
        expected = model.predict(features[:, voxel, :])["y_hat"]
        got = bart_fit.forests.draws(features[:, voxel:voxel + 1, :], slice(voxel, voxel + 1))[:, 0, :]
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)


def test_bart_does_not_depend_on_the_number_of_workers(additive):
    train = additive.train.subset(np.arange(60))
    small = dict(num_trees=3, num_draws=5, num_gfr=2, neighbourhood=1)
    one = VoxelBART(preset("bart", n_jobs=1, **small)).fit(train, additive.val, seed=3)
    two = VoxelBART(preset("bart", n_jobs=2, **small)).fit(train, additive.val, seed=3)
    assert one.info["neighbourhood"] == 1
    p1, p2 = one.predict(additive.test, seed=1), two.predict(additive.test, seed=1)
    np.testing.assert_array_equal(p1.mean, p2.mean)
    np.testing.assert_array_equal(p1.intervals[0.9][0], p2.intervals[0.9][0])


def test_neighbourhood_index_on_a_masked_grid():
    mask = np.zeros((4, 4, 1), dtype=bool)
    mask[1:4, 1:4, 0] = True
    mask[3, 3, 0] = False                                     # 8 voxels
    space = VolumeSpace(shape=(4, 4, 1), affine=np.eye(4), header=None, mask=mask)
    idx = neighbour_index(space, 1)
    assert idx.shape[0] == 8
    counts = (idx >= 0).sum(1)
    # voxel (1,1): neighbours (1,1),(1,2),(2,1),(2,2) inside the mask -> 4; centre (2,2) sees all 8
    assert counts[0] == 4 and counts.max() == 8
    assert neighbour_index(space, 0) is None and neighbour_index(None, 1) is None


# ---- coverage on Gaussian truth ------------------------------------------------------------------
def coverage_tolerance(level: float, n_test: int, n_cal: int) -> float:
    return 4 * math.sqrt(level * (1 - level) * (1 / n_test + 1 / n_cal))


@pytest.mark.parametrize("which", ["ridge", "tensor", "bart"])
def test_intervals_have_the_promised_coverage(which, request):
    model, problem = {"ridge": ("ridge_fit", "linear"), "tensor": ("tensor_fit", "low_rank"),
                      "bart": ("bart_fit", "additive")}[which]
    model, problem = request.getfixturevalue(model), request.getfixturevalue(problem)
    test = problem.test
    pred = model.predict(test, levels=LEVELS)
    n_test = test.outcome.size
    n_val = problem.val.outcome.size
    n_cal = n_val // 2 if which != "bart" else n_val      # point peers calibrate on half of val
    for level in LEVELS:
        lo, hi = pred.intervals[level]
        observed = float(np.mean((test.outcome >= lo) & (test.outcome <= hi)))
        assert abs(observed - level) < coverage_tolerance(level, n_test, n_cal), (level, observed)
    # the calibrated sd is the right scale too: E z^2 = 1 on test within sampling error
    z2 = np.mean(((test.outcome - pred.mean) / pred.sd) ** 2)
    assert abs(z2 - 1) < 0.15


def test_residual_scale_and_validation_split():
    rng = np.random.default_rng(0)
    residuals = rng.standard_normal((400, 5)) * np.array([1, 1, 1, 1, 3.0])
    sd = residual_scale(residuals, "voxel", shrinkage=0.0)
    np.testing.assert_allclose(sd, [1, 1, 1, 1, 3], rtol=0.15)
    pooled = residual_scale(residuals, "pooled")
    assert np.ptp(pooled) == 0 and 1.5 < pooled[0] < 1.7          # sqrt((4 + 9) / 5)
    shrunk = residual_scale(residuals, "voxel", shrinkage=400.0)   # halfway to the pooled variance
    assert sd[4] > shrunk[4] > pooled[4]
    scale, cal = split_validation(10, 0.5, seed=0)
    assert len(scale) == 5 and len(cal) == 5 and not set(scale) & set(cal)


# ---- persistence ---------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["ridge", "tensor", "bart"])
def test_save_load_round_trip(which, request, tmp_path):
    model, problem = {"ridge": ("ridge_fit", "linear"), "tensor": ("tensor_fit", "low_rank"),
                      "bart": ("bart_fit", "additive")}[which]
    model, problem = request.getfixturevalue(model), request.getfixturevalue(problem)
    run = model.save(tmp_path / "run")
    info = json.loads((run / "run.json").read_text())
    assert info["format"] == "inva-pyro-run/1" and info["family"] == which and info["complete"]
    assert not list(run.glob("*.pkl")) and not list(run.glob("*.pt"))
    loaded = load_model(run)
    assert type(loaded) is type(model)
    before, after = model.predict(problem.test, seed=4), loaded.predict(problem.test, seed=4)
    np.testing.assert_allclose(after.mean, before.mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(after.sd, before.sd, rtol=1e-6, atol=1e-6)
    for level in before.levels:
        np.testing.assert_allclose(after.intervals[level], before.intervals[level], rtol=1e-6, atol=1e-6)
    if which == "bart":
        with gzip.open(run / FORESTS_FILE, "rt") as handle:
            assert sum(1 for _ in handle) == N_VOX
        again = loaded.save(tmp_path / "again")                 # a loaded BART saves its forests again
        assert (again / FORESTS_FILE).read_bytes() == (run / FORESTS_FILE).read_bytes()


def test_corrupt_and_foreign_run_folders(ridge_fit, tmp_path):
    run = ridge_fit.save(tmp_path / "run")
    (run / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputError, match="corrupt run folder"):
        load_model(run)
    with pytest.raises(InputError, match="not a 'tensor' run"):
        TensorRegression.load(ridge_fit.save(tmp_path / "run2"))


def test_wrong_inputs_at_predict_time(ridge_fit, linear):
    bad = linear.test.subset(np.arange(3))
    bad.inputs = {"a": bad.inputs["a"]}
    with pytest.raises(InputError, match="lack the input"):
        ridge_fit.predict(bad)
    bad.inputs = {"a": linear.test.inputs["a"][:3, :5], "b": linear.test.inputs["b"][:3]}
    with pytest.raises(InputError, match="features"):
        ridge_fit.predict(bad)


def test_bart_needs_an_input_on_the_outcome_voxels(linear):
    with pytest.raises(InputError, match="bart needs at least one input"):
        VoxelBART(preset("bart", n_jobs=1)).fit(linear.train, linear.val)


# ---- presets -------------------------------------------------------------------------------------
def test_peer_presets_validate_and_the_inva_presets_are_unchanged():
    for name, cls in (("ridge", RidgeRegression), ("tensor", TensorRegression), ("bart", VoxelBART)):
        p = load_preset(name)
        assert p.model.family == name and type(model_from_preset(p)) is cls
        assert Preset.model_validate(p.model_dump()) == p
    assert load_preset("inva").model.family == "inva"
    assert Preset.model_validate({"model": {"hidden": 8}}).model.hidden == 8   # family defaults to inva
    with pytest.raises(InputError, match="model.num_trees"):
        parse_preset({"model": {"family": "bart", "num_trees": 0}})
    with pytest.raises(InputError, match="model.hidden"):
        parse_preset({"model": {"family": "ridge", "hidden": 8}})     # an InVA key in a ridge preset
    with pytest.raises(InputError, match="unknown model family"):
        parse_preset({"model": {"family": "forest"}})


# ---- command line --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "cohort"
    assert cli.main(["simulate", "--design", "paper", "--n-subjects", "40", "--seed", "5", "--out", str(out)]) == 0
    return out


TINY_BART = """
name = "tiny-bart"
[model]
family = "bart"
num_trees = 2
num_gfr = 2
num_draws = 4
n_jobs = 1
[prediction]
num_samples = 50
"""


@pytest.mark.parametrize("model", ["ridge", "tensor", "tiny-bart"])
def test_cli_fit_and_evaluate(model, cohort_dir, tmp_path, capsys):
    if model == "tiny-bart":
        (tmp_path / "tiny-bart.toml").write_text(TINY_BART)
        model = str(tmp_path / "tiny-bart.toml")
    run, out = tmp_path / "run", tmp_path / "eval"
    manifest = str(cohort_dir / "manifest.csv")
    assert cli.main(["fit", "--manifest", manifest, "--inputs", "x1,x2,x3", "--outcome", "y", "--model", model,
                     "--seed", "0", "--out", str(run)]) == 0
    assert cli.main(["evaluate", "--run", str(run), "--manifest", manifest, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_features"] == 1024 and metrics["n_subjects"] == 8
    assert 0 < metrics["mse"] < 5 and 0.5 < metrics["coverage"]["0.9"] <= 1
    assert (out / "calibration_curve.png").stat().st_size > 1000
    assert cli.main(["predict", "--run", str(run), "--manifest", manifest, "--out", str(tmp_path / "pred"),
                     "--levels", "0.9"]) == 0
    assert (tmp_path / "pred" / "predictions.csv").exists()
    capsys.readouterr()
    assert cli.main(["fit", "--resume", str(run)]) == 2
    assert "fit it again" in capsys.readouterr().err


# ---- the simulation study's machinery (the full --quick run with the networks is the CI smoke test) ----
def test_simulation_study_quick_with_the_fast_peers(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "analysis" / "simulation_study.py"
    spec = importlib.util.spec_from_file_location("simulation_study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    out = tmp_path / "study"
    assert study.main(["--quick", "--out", str(out), "--models", "ridge,tensor"]) == 0
    summary = (out / "summary.md").read_text()
    assert "| ridge |" in summary and "| tensor |" in summary
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 2 and set(runs["design"]) == {"paper"} and (runs["n_features"] == 1024).all()
    assert (out / "simulation_study.png").stat().st_size > 10_000
    assert study.main(["--quick", "--out", str(out), "--models", "ridge,tensor"]) == 0   # resumes: nothing new
    assert len(pd.read_csv(out / "runs.csv")) == 2


def test_semisupervised_scenario_quick(tmp_path):
    # labeled + MRI-only subjects; the joint model is also scored per missingness pattern
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "analysis" / "simulation_study.py"
    spec = importlib.util.spec_from_file_location("simulation_study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    out = tmp_path / "semi"
    assert study.main(["--scenario", "semisupervised", "--quick", "--out", str(out), "--models",
                       "inva-joint-semi,ridge"]) == 0
    runs = pd.read_csv(out / "runs.csv")
    semi = runs[runs["model"] == "inva-joint-semi"]
    assert set(semi["pattern"]) == {"complete", "no x1", "no x2", "no x3", "only x1", "only x2", "only x3"}
    assert (semi["n_unlabeled"] == 20).all()
    assert (runs.loc[runs["model"] == "ridge", "n_fit"] == 12).all()
    assert np.isclose(runs["excess"], (runs["mse"] - runs["oracle_mse"]) / runs["oracle_mse"]).all()
    summary = (out / "summary.md").read_text()
    assert "--scenario semisupervised" in summary and "ridge: " in summary
    # where the error lies and what the latent knows: reported for the networks only
    complete = semi[semi["pattern"] == "complete"].iloc[0]
    columns = ["excess_subject", "excess_rest", "excess_representation",
               *(f"r2_{f}" for f in ("a1", "a2", "b1", "b2", "b3"))]
    assert np.isfinite(complete[columns].astype(float)).all()
    assert runs.loc[runs["model"] == "ridge", "excess_subject"].isna().all()
    assert "Where the error lies" in summary
    missing = semi[semi["pattern"].str.startswith("no ")]
    assert np.isfinite(missing[["specific_sd", "specific_sd_truth", "specific_corr"]].astype(float)).all().all()
    assert (missing["specific_sd_truth"] > 0).all() and "C_k read" in summary
    # refits on the same cohort with other training seeds: new rows, the rows already there are kept
    assert study.main(["--scenario", "semisupervised", "--quick", "--out", str(out), "--models", "ridge",
                       "--fit-seeds", "0,1"]) == 0
    again = pd.read_csv(out / "runs.csv")
    assert sorted(again.loc[again["model"] == "ridge", "fit_seed"]) == [0, 1]
    assert (again.loc[again["model"] == "inva-joint-semi", "fit_seed"] == 0).all() and len(again) == len(runs) + 1


def test_the_never_given_table_pairs_each_fit_with_its_reference():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "analysis" / "semisupervised_study.py"
    spec = importlib.util.spec_from_file_location("semisupervised_study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    row = lambda fit, model, pattern, mse: {"seed": 0, "fit_seed": fit, "size": 300, "model": model,
                                            "pattern": pattern, "mse": mse}
    runs = pd.DataFrame([row(0, "inva-joint-semi", "complete", 0.2), row(0, "inva-joint-semi", "no x1", 0.44),
                         row(0, "inva-joint-semi-no-x1", "no x1", 0.40), row(1, "inva-joint-semi", "complete", 0.2),
                         row(1, "inva-joint-semi", "no x1", 0.38), row(1, "inva-joint-semi-no-x1", "no x1", 0.40),
                         row(1, "inva-joint-semi", "no x2", 0.3)])      # no reference for x2: not in the table
    lines = study.never_given_table(runs)
    assert "| 300 | 0 (0) | no x1 | 0.4400 | 0.4000 | +10.0% | 0.2000 |" in lines
    assert "| 300 | 0 (1) | no x1 | 0.3800 | 0.4000 | -5.0% | 0.2000 |" in lines
    assert "| 300 | no x1 | 2 | 0.4100 | 0.4000 | +2.5% (7.5) |" in lines        # se = sd 10.6 / sqrt(2)
    assert not any("no x2" in line for line in lines)
    assert study.never_given_table(runs[runs["model"] == "inva-joint-semi"]) == []
    # a run of the references alone (no model scored on complete subjects) still gets its summary
    only_refs = runs[runs["model"] == "inva-joint-semi-no-x1"].assign(
        n_test=100, excess=1.2, **{f"cov{c}": c / 100 for c in (50, 80, 90, 95)})
    summary = study.markdown(only_refs, "analysis/simulation_study.py --models inva-joint-semi-no-x1")
    assert "test: 100 complete subjects" in summary and "| 300 | inva-joint-semi-no-x1 | no x1 | 0.4000 |" in summary


def test_the_specific_map_read_finds_a_made_up_factor():
    import importlib.util
    import types

    from inva_pyro.data.simulate import paper_patterns

    path = Path(__file__).resolve().parent.parent / "analysis" / "semisupervised_study.py"
    spec = importlib.util.spec_from_file_location("semisupervised_study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    n, rng = 200, np.random.default_rng(1)
    maps = paper_patterns()
    s1, c1 = maps["shared"][0].ravel(), maps["specific"][0].ravel()
    a, b, made_up = rng.standard_normal((3, n, 1))
    test = types.SimpleNamespace(subjects=list(range(n)), truth_mean=1.0 + a * s1 + 0.6 * b * c1)
    read = study.specific_map_read(test, types.SimpleNamespace(mean=test.truth_mean), "x1")
    assert read["specific_corr"] == pytest.approx(1.0) and read["specific_sd"] == pytest.approx(0.6 * b.std())
    # b1 unknown, a made-up factor in its place: the read is that factor's sd, uncorrelated with the truth
    read = study.specific_map_read(test, types.SimpleNamespace(mean=1.0 + a * s1 + 0.5 * made_up * c1), "x1")
    assert read["specific_sd"] == pytest.approx(0.5 * made_up.std())
    assert abs(read["specific_corr"]) < 4 / np.sqrt(n)   # the sample correlation of independent draws


def test_the_error_split_puts_a_pattern_error_in_the_subject_part():
    """A prediction off the truth by c S_1 + a checkerboard: the first is all subject-level, the second local."""
    import importlib.util
    import types

    from inva_pyro.data.simulate import paper_patterns, simulate_paper

    path = Path(__file__).resolve().parent.parent / "analysis" / "semisupervised_study.py"
    spec = importlib.util.spec_from_file_location("semisupervised_study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    sim, n = simulate_paper(12, 0), 12
    test = types.SimpleNamespace(subjects=list(range(n)), truth_mean=sim["true_mean"].reshape(n, -1),
                                 outcome=sim["outcome"].reshape(n, -1))
    truth = test.truth_mean
    oracle = np.mean((test.outcome - truth) ** 2)
    s1 = paper_patterns()["shared"][0].ravel()
    checker = (np.indices((32, 32)).sum(0) % 2 * 2 - 1).ravel() * 0.1
    c = np.linspace(-1, 1, n)[:, None]
    split = study.representation(None, test, types.SimpleNamespace(mean=truth + c * s1 + checker))
    assert split["excess_subject"] == pytest.approx(np.mean((c * s1) ** 2) / oracle, rel=0.02)
    assert split["excess_rest"] == pytest.approx(0.01 / oracle, rel=0.05)


def test_semisupervised_study_overrides_the_inva_presets():
    import argparse
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "analysis" / "semisupervised_study.py"
    spec = importlib.util.spec_from_file_location("semisupervised_study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    args = argparse.Namespace(epochs=None, input_dropout=None, quick=True, bart_jobs=0, samples=None,
                              set=["model.shallow_dim=5", "training.patience=7"])
    preset = study.preset_for("inva-joint-semi", args)
    assert (preset.model.shallow_dim, preset.training.patience, preset.model.structure) == (5, 7, "joint")
    assert study.preset_for("ridge", args).model.family == "ridge"      # the peers keep their settings
    with pytest.raises(SystemExit, match="expected SECTION.KEY=VALUE"):
        study.preset_for("inva-joint-semi", argparse.Namespace(**{**vars(args), "set": ["shallow_dim=5"]}))


def test_the_bayes_limit_matches_simulated_outcomes():
    """E[m | x] from the exact factor posterior: its MSE on simulated outcomes is oracle MSE + E Var(m | x)
    subject by subject (z within 4 of 0 at a fixed seed), and the floor lies above the oracle."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "analysis" / "semisupervised_limits.py"
    spec = importlib.util.spec_from_file_location("semisupervised_limits", path)
    limits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(limits)
    result = limits.bayes_limit(200, seed=3, draws=500)
    assert abs(result["check_z"]) < 4
    assert 0 < result["bayes_excess"] < 0.2
    assert all(0 < s < 1 for s in result["posterior_sd"])
    # Given x2 and x3 only: b_1 keeps its prior (sd 1) and d_1 is drawn too; the same check holds, and the
    # floor rises (x1 carries b_1 C_1 and the voxel-wise tanh(d_1), so losing it costs the most).
    without = {k: limits.bayes_limit(200, seed=3, draws=500, without=k) for k in ("x1", "x2", "x3")}
    assert all(abs(r["check_z"]) < 4 for r in without.values())
    assert without["x1"]["posterior_sd"][2] == pytest.approx(1.0)
    assert result["bayes_excess"] < min(without["x2"]["bayes_excess"], without["x3"]["bayes_excess"])
    assert max(without["x2"]["bayes_excess"], without["x3"]["bayes_excess"]) < without["x1"]["bayes_excess"]
    with pytest.raises(ValueError, match="without must be one of x1, x2, x3"):
        limits.bayes_limit(10, seed=3, draws=10, without="gm")
