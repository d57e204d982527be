"""ArviZ InferenceData: the groups, their consistency with the model, the netCDF round trip, the
kept per-draw pieces of the streamed predictive, and R-hat / ESS across fits.

Exact identities are checked to float32 precision; Monte-Carlo comparisons within 5 standard
errors of the difference.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from inva_pyro import InVA

from inva_pyro.criticism import inference
from inva_pyro.predict.predictive import posterior_predictive

GROUPS = {"posterior", "posterior_predictive", "observed_data", "log_likelihood", "constant_data"}


@pytest.fixture(scope="module")
def fitted(make_preset, make_cohort):
    cohort = make_cohort(40, 16, 12, seed=2)
    model = InVA(make_preset(training={"epochs": 4})).fit(cohort.train, cohort.val, seed=0, progress=False)
    return model, cohort


def test_inference_data_groups_and_netcdf_round_trip(fitted, tmp_path):
    model, cohort = fitted
    test = cohort.test
    pred = model.predict(test, num_samples=100, seed=0)
    idata = inference.build_inference_data(model, test, pred, num_draws=30, n_features=16, seed=4)
    assert set(idata.groups()) == GROUPS
    k, n, f = 30, len(test), 16
    assert idata.posterior_predictive["outcome"].shape == (1, k, n, f)
    assert idata.posterior_predictive["outcome_calibrated"].shape == (1, k, n, f)
    assert idata.log_likelihood["outcome"].shape == (1, k, n, f)
    assert idata.log_likelihood["outcome_image"].shape == (1, k, n)
    assert idata.posterior["output_weight"].shape == (1, k, f, model.module.cfg.predictor_hidden)
    assert idata.posterior["deep_latent_gm"].shape == (1, k, n, model.module.cfg.deep_dim)
    feats = idata.constant_data["feature_index"].values
    assert len(np.unique(feats)) == f and feats.max() < test.outcome.shape[1]
    np.testing.assert_allclose(idata.observed_data["outcome"].values, test.outcome[:, feats], rtol=1e-6)
    np.testing.assert_allclose(idata.constant_data["predictive_mean"].values, pred.mean[:, feats], rtol=1e-6)
    assert list(idata.posterior_predictive["subject"].values) == list(test.subjects)

    path = inference.save_inference_data(idata, tmp_path / "inference_data.nc")
    back = inference.load_inference_data(path)
    assert set(back.groups()) == GROUPS
    for group in GROUPS:
        for name, var in idata[group].data_vars.items():
            np.testing.assert_array_equal(back[group][name].values, var.values)
    assert back.attrs["calibration"] == "quantile" and back.attrs["num_draws"] == k
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_pointwise_log_likelihood_sums_to_the_whole_image_one(fitted):
    model, cohort = fitted
    # every feature kept: the image log-likelihood is the sum of the pointwise ones (image units)
    idata = inference.build_inference_data(model, cohort.test, num_draws=10, n_features=0)
    pointwise = idata.log_likelihood["outcome"].values.astype(np.float64).sum(-1)
    image = idata.log_likelihood["outcome_image"].values
    np.testing.assert_allclose(image, pointwise, rtol=2e-5)


def test_kept_draws_are_joint_across_blocks(fitted):
    # draw s uses the same (W, b) for every block of subjects: rebuild each subject's component
    # mean from the kept output-layer draws
    model, cohort = fitted
    module = model.module
    xs, y = model.tensors(cohort.test)
    gen = torch.Generator().manual_seed(0)
    s = posterior_predictive(module, xs, num_samples=40, probs=[0.5], observed=y, keep_draws=12,
                             block_size=5, chunk_size=7, generator=gen)
    d = s.draws
    assert d.component_mean.shape == (12, len(cohort.test), y.shape[1]) and d.image_loglik.shape == (12, len(cohort.test))
    with torch.no_grad():
        hidden, local, sd, _ = module.outcome_parts(xs)
    w, b = torch.from_numpy(d.output_weight), torch.from_numpy(d.output_bias)
    rebuilt = torch.einsum("nd,svd->snv", hidden, w) + b[:, None] + local
    np.testing.assert_allclose(d.component_mean, rebuilt.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d.noise_sd, sd.numpy(), rtol=1e-6)
    loglik = torch.distributions.Normal(rebuilt, sd).log_prob(y).sum(-1)
    np.testing.assert_allclose(d.image_loglik, loglik.numpy(), rtol=1e-5)


def test_keeping_draws_does_not_change_the_predictive(fitted):
    model, cohort = fitted
    xs, _ = model.tensors(cohort.test)
    runs = [posterior_predictive(model.module, xs, num_samples=400, probs=[], keep_draws=k,
                                 generator=torch.Generator().manual_seed(k)) for k in (0, 100)]
    assert runs[0].draws is None
    # independent Monte-Carlo estimates of the same predictive mean: each has se = sd / sqrt(400)
    diff = runs[0].mean - runs[1].mean
    se = np.sqrt(2) * runs[0].sd / math.sqrt(400)
    assert np.mean(np.abs(diff) < 5 * se) == 1.0


def test_rhat_is_one_for_chains_of_one_fit_and_large_for_different_fits(fitted, make_preset):
    model, cohort = fitted
    same = inference.across_run_diagnostics([model, model], cohort.test, num_draws=200, n_features=8, seed=0)
    # two chains of independent draws from the same distribution: rank-normalised split R-hat
    # is 1 + O(1/draws); 1.05 leaves > 5 se of room for the median over 96 entries
    assert same["summary"]["mean"]["rhat_median"] < 1.02
    assert same["summary"]["outcome"]["rhat_median"] < 1.02
    assert same["summary"]["mean"]["ess_bulk_median"] > 200   # of 400 draws in all
    other = InVA(make_preset(training={"epochs": 4})).fit(cohort.train, cohort.val, seed=7, progress=False)
    diff = inference.across_run_diagnostics([model, other], cohort.test, num_draws=100, n_features=8, seed=0)
    assert diff["n_chains"] == 2 and math.isfinite(diff["summary"]["mean"]["rhat_max"])
    assert diff["summary"]["mean"]["rhat_median"] > same["summary"]["mean"]["rhat_median"]


def test_inference_data_from_a_prediction_alone(fitted, tmp_path):
    model, cohort = fitted
    pred = model.predict(cohort.test, num_samples=50, keep_samples=20)
    idata = inference.inference_data_from_prediction(pred, num_draws=25, n_features=10)
    assert {"posterior_predictive", "observed_data", "constant_data"} <= set(idata.groups())
    # with 20 kept samples, both variables have 20 draws
    assert idata.posterior_predictive["outcome_calibrated"].shape == (1, 20, len(cohort.test), 10)
    assert idata.posterior_predictive["outcome"].shape == (1, 20, len(cohort.test), 10)
    back = inference.load_inference_data(inference.save_inference_data(idata, tmp_path / "x.nc"))
    assert set(back.groups()) == set(idata.groups())


def test_calibrated_draws_follow_the_calibrated_intervals(fitted):
    # outcome_calibrated = mean + raw_sd * Z, Z drawn from the calibrator's atoms: the share of
    # draws inside the calibrated central 80% interval is 0.8 (binomial se over all draws)
    model, cohort = fitted
    pred = model.predict(cohort.test, num_samples=100, levels=[0.8])
    idata = inference.build_inference_data(model, cohort.test, pred, num_draws=100, n_features=32)
    draws = idata.posterior_predictive["outcome_calibrated"].values[0]
    feats = idata.constant_data["feature_index"].values
    lo, hi = (a[:, feats] for a in pred.intervals[0.8])
    inside = np.mean((draws >= lo - 1e-5) & (draws <= hi + 1e-5))
    assert abs(inside - 0.8) < 5 * math.sqrt(0.8 * 0.2 / draws.size) + 1e-3   # + the atoms' 1/1000 grid
    # the raw draws' pointwise log-likelihood is the Normal density given each component mean
    assert np.all(np.isfinite(idata.log_likelihood["outcome"].values))
    assert stats.norm.logpdf(0.0) > idata.log_likelihood["outcome"].values.min()
