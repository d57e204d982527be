"""The InVA Pyro program (model + guide), the ELBO's minibatch scaling, the streamed posterior
predictive and the recalibration, on tiny problems with exactly known answers.

Statistical checks use tolerances derived from the sampling distribution of the statistic
(standard errors from the binomial or from sample variances), never from one observed run; the
seeds are fixed, so each check is deterministic, and a tolerance of k standard errors makes a
false alarm on a correct implementation improbable (|N(0,1)| > 4 has probability 6e-5).
"""
from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from scipy import stats

from inva_pyro.predict.calibration import Calibrator
from inva_pyro.model.module import InVAModule
from inva_pyro.predict.predictive import GRID, histogram_quantiles, posterior_predictive

N_OUTCOME = 40
NAMES = ["gm", "wm", "ct"]


def build(make_preset, sizes, predictor="local", n_outcome=N_OUTCOME, seed=0, **model):
    pyro.set_rng_seed(seed)
    cfg = make_preset(model={"predictor": predictor, "dropout": 0.0, **model}).model
    return InVAModule(NAMES[:len(sizes)], list(sizes), n_outcome, cfg)


def batch(sizes, n, seed=0, n_outcome=N_OUTCOME):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, v, generator=g) for v in sizes]
    y = torch.randn(n, n_outcome, generator=g)
    return xs, y


def traces(module, xs, y, subjects, n_subjects, **kw):
    guide_trace = poutine.trace(module.guide).get_trace(xs, y, subjects=subjects, n_subjects=n_subjects, **kw)
    model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(
        xs, y, subjects=subjects, n_subjects=n_subjects, **kw)
    return guide_trace, model_trace


def sample_sites(trace):
    # "subjects" is the plate's own subsample site (a _Subsample distribution), not a model variable.
    return {name: site for name, site in trace.nodes.items() if site["type"] == "sample" and name != "subjects"}


# ---- 1. sites, shapes and minibatch scaling ------------------------------------------------------
CASES = [
    ("local", [40]),
    ("local", [30, 40]),
    ("local", [30, 50, 40]),
    ("paper", [30]),
    ("paper", [30, 50]),
    ("paper", [30, 50, 40]),
]


@pytest.mark.parametrize("bayesian_output", [True, False])
@pytest.mark.parametrize("predictor,sizes", CASES)
def test_model_and_guide_sites_have_the_right_shapes(make_preset, predictor, sizes, bayesian_output):
    N, B = 20, 5
    p, q, d = 3, 2, 6           # shallow_dim, deep_dim, predictor_hidden of the tiny preset
    module = build(make_preset, sizes, predictor, bayesian_output=bayesian_output)
    names = NAMES[:len(sizes)]
    assert module.local_modalities == ([k for k, v in enumerate(sizes) if v == N_OUTCOME] if predictor == "local" else [])

    xs, y = batch(sizes, B)
    subjects = torch.tensor([3, 17, 0, 9, 12])
    kl_scale, prediction_scale = 0.5, 2.0
    guide_trace, model_trace = traces(module, xs, y, subjects, N, kl_scale=kl_scale, prediction_scale=prediction_scale)

    global_sites = {"output_weight": (N_OUTCOME, d), "output_bias": (N_OUTCOME,)} if bayesian_output else {}
    latent_sites = {**{f"shallow_latent_{n}": p for n in names}, **{f"deep_latent_{n}": q for n in names}}
    observed_sites = {**{f"input_{n}": v for n, v in zip(names, sizes)}, "outcome": N_OUTCOME}

    guide_sites, model_sites = sample_sites(guide_trace), sample_sites(model_trace)
    assert set(guide_sites) == set(global_sites) | set(latent_sites)
    assert set(model_sites) == set(global_sites) | set(latent_sites) | set(observed_sites)
    assert "subjects" in model_trace.nodes and "subjects" in guide_trace.nodes

    ratio = N / B
    for sites in (guide_sites, model_sites):
        for name, event in global_sites.items():
            site = sites[name]
            assert site["fn"].batch_shape == torch.Size(())
            assert site["fn"].event_shape == torch.Size(event)
            assert site["value"].shape == torch.Size(event)
            assert site["scale"] == 1.0, name             # global: never scaled by N/B or the KL weight
            assert not site["cond_indep_stack"]
        for name, dim in latent_sites.items():
            site = sites[name]
            assert site["fn"].batch_shape == torch.Size((B,)), name
            assert site["fn"].event_shape == torch.Size((dim,)), name
            assert site["value"].shape == (B, dim)
            assert not site["is_observed"]
            assert site["scale"] == pytest.approx(ratio * kl_scale), name
            (frame,) = site["cond_indep_stack"]
            assert (frame.name, frame.dim, frame.size, frame.full_size) == ("subjects", -1, B, N)
    for name, dim in observed_sites.items():
        site = model_sites[name]
        assert site["fn"].batch_shape == torch.Size((B,)), name
        assert site["fn"].event_shape == torch.Size((dim,)), name
        assert site["is_observed"]
        expected = ratio * (prediction_scale if name == "outcome" else 1.0)
        assert site["scale"] == pytest.approx(expected), name
    for name, x in zip(names, xs):
        assert torch.equal(model_sites[f"input_{name}"]["value"], x)
    assert torch.equal(model_sites["outcome"]["value"], y)
    # The guide's latent values are the ones the model scores.
    for name in set(global_sites) | set(latent_sites):
        assert torch.equal(model_sites[name]["value"], guide_sites[name]["value"])


@pytest.mark.parametrize("sizes", [[40], [30, 50, 40]])
def test_subsampling_scales_local_log_probs_by_n_over_b(make_preset, sizes):
    """log p(subsampled) = global terms + (N / B) * local terms, against the same batch unscaled."""
    N, B = 24, 6
    module = build(make_preset, sizes)
    xs, y = batch(sizes, B, seed=1)
    guide_trace = poutine.trace(module.guide).get_trace(xs, y, subjects=torch.arange(B), n_subjects=N)

    def model_log_prob(n_subjects):
        # plate size == batch size means no subsampling: every scale is 1.
        trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(
            xs, y, subjects=torch.arange(B), n_subjects=n_subjects)
        trace.compute_log_prob()
        return trace

    scaled, unscaled = model_log_prob(N), model_log_prob(B)
    global_names = {"output_weight", "output_bias"}
    g = sum(unscaled.nodes[n]["log_prob_sum"] for n in global_names)
    local = unscaled.log_prob_sum() - g
    torch.testing.assert_close(scaled.log_prob_sum(), g + (N / B) * local, rtol=1e-5, atol=1e-3)
    for name, site in sample_sites(scaled).items():
        factor = 1.0 if name in global_names else N / B
        torch.testing.assert_close(site["log_prob_sum"], factor * unscaled.nodes[name]["log_prob_sum"],
                                   rtol=1e-5, atol=1e-4)
    # The guide's local entropy terms are scaled the same way.
    guide_trace.compute_log_prob()
    for name, site in sample_sites(guide_trace).items():
        assert site["scale"] == (1.0 if name in global_names else N / B)


def test_model_without_outcome_samples_it(make_preset):
    module = build(make_preset, [30, 40])
    xs, _ = batch([30, 40], 4)
    guide_trace = poutine.trace(module.guide).get_trace(xs, subjects=torch.arange(4), n_subjects=4)
    trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(
        xs, subjects=torch.arange(4), n_subjects=4)
    site = trace.nodes["outcome"]
    assert not site["is_observed"] and site["value"].shape == (4, N_OUTCOME)
    assert torch.isfinite(site["value"]).all()


def test_local_predictor_needs_an_input_the_size_of_the_outcome(make_preset):
    with pytest.raises(ValueError, match="local"):
        build(make_preset, [30, 50], "local")
    build(make_preset, [30, 50], "paper")     # the paper predictor has no such requirement


def test_module_needs_an_input(make_preset):
    with pytest.raises(ValueError):
        InVAModule([], [], N_OUTCOME, make_preset().model)


# ---- 4. the subsampled ELBO is unbiased for the full-data ELBO ---------------------------------
def test_subsampled_elbo_is_unbiased(make_preset):
    """E_{batch, latents}[loss(batch)] = E_{latents}[loss(all subjects)] for fixed parameters.

    The full-data loss is -[global terms + sum_i l_i]; the minibatch loss is -[global terms +
    (N/B) sum_{i in batch} l_i]; under a uniform batch E[(N/B) sum_{i in batch} l_i] = sum_i l_i.
    We average M_sub minibatch losses (fresh batch and fresh latents each time) and M_full full
    losses (fresh latents); the two means are independent, so their difference has standard error
    SE = sqrt(s_sub^2 / M_sub + s_full^2 / M_full), with s^2 the sample variances, and by the CLT
    (difference)/SE ~ N(0, 1) when the estimator is unbiased. Tolerance: 4 SE (false alarm 6e-5).
    """
    N, B, sizes = 40, 8, [30, 40]
    module = build(make_preset, sizes, seed=3)
    module.eval()
    xs, y = batch(sizes, N, seed=4)
    elbo = Trace_ELBO()
    pyro.set_rng_seed(5)
    g = torch.Generator().manual_seed(6)

    def loss(idx, n):
        with torch.no_grad():
            return float(elbo.differentiable_loss(module.model, module.guide, [x[idx] for x in xs], y[idx],
                                                  subjects=idx, n_subjects=n))

    M_sub, M_full = 400, 80
    sub = np.array([loss(torch.randperm(N, generator=g)[:B], N) for _ in range(M_sub)])
    full = np.array([loss(torch.arange(N), N) for _ in range(M_full)])
    se = math.sqrt(sub.var(ddof=1) / M_sub + full.var(ddof=1) / M_full)
    diff = sub.mean() - full.mean()
    assert abs(diff) < 4 * se, (sub.mean(), full.mean(), se)
    # Power: the check must be able to see a mis-scaled plate. Scaling the local part by N/(B+1)
    # instead of N/B would shift the mean by |local| / (B+1); the tolerance must be far below that.
    # local = full loss - global part, where the global part's expectation is KL(q(W, b) || p(W, b)).
    # (A scale error common to both estimators, e.g. a wrong N, is caught by the exact
    # log-prob check above; this test is about scale errors that depend on the batch.)
    prior = torch.distributions.Normal(0.0, module.cfg.output_prior_scale)
    with torch.no_grad():
        kl = sum(float(torch.distributions.kl_divergence(torch.distributions.Normal(q.loc, q.scale), prior).sum())
                 for q in (module.output_weight_q, module.output_bias_q))
    local = full.mean() - kl
    assert 4 * se < 0.2 * abs(local) / (B + 1), (se, local)


# ---- 7b. the streamed predictive: exact Normal quantiles ---------------------------------------
def test_histogram_quantiles_interpolate_inside_a_bin():
    # All mass in bin j (= (GRID[j-1], GRID[j]]): the cdf rises linearly across that bin.
    n_bins = len(GRID) + 1
    counts = torch.zeros(3, n_bins, dtype=torch.int32)
    js = [10, 160, 300]
    for row, j in enumerate(js):
        counts[row, j] = 100
    probs = [0.1, 0.5, 0.95]
    q = histogram_quantiles(counts, probs)
    edges = GRID.double()
    for p in probs:
        expected = torch.stack([edges[j - 1] + p * (edges[j] - edges[j - 1]) for j in js])
        # float32 interpolation: |value| <= 8 standardised units, eps 6e-8 -> at most ~5e-7 off
        torch.testing.assert_close(q[p], expected, rtol=0, atol=1e-6)
    # Two bins with equal mass: the median is the shared edge.
    counts = torch.zeros(1, n_bins, dtype=torch.int32)
    counts[0, 100], counts[0, 101] = 50, 50
    assert float(histogram_quantiles(counts, [0.5])[0.5]) == pytest.approx(float(GRID[100]), abs=1e-6)


def test_posterior_predictive_matches_the_exact_normal(make_preset):
    """With a non-Bayesian output layer the predictive is exactly Normal(m, s) per entry.

    For S iid draws: the sample mean has SE s/sqrt(S); the sample sd has SE ~ s/sqrt(2(S-1));
    the sample p-quantile has SE sqrt(p(1-p)/S) s / phi(z_p), and the histogram estimate differs
    from the sample quantile by less than one bin (0.05 s). Each of n entries is checked at 5 SE,
    so a correct implementation fails one of the n = 640 checks with probability < 640 * 6e-7.

    Coverage: every entry has its own independent draws and one fresh observation
    y ~ Normal(m, s), so the n interval-hit indicators are iid Bernoulli(c) with c = E[F(hi) -
    F(lo)]. The interpolated quantile lies within one order statistic of the target, and
    E[F(X_(k))] = k/(S+1), so |c - P| <= 2/(S+1); the empirical coverage is then within
    4 sqrt(P(1-P)/n) + 2/(S+1) of P.
    """
    sizes = [30, 40]
    module = build(make_preset, sizes, bayesian_output=False, seed=7)
    module.eval()
    n, S = 16, 400
    xs, _ = batch(sizes, n, seed=8)
    levels = [0.5, 0.8, 0.9, 0.95]
    probs = sorted({p for lv in levels for p in ((1 - lv) / 2, (1 + lv) / 2)})
    summary = posterior_predictive(module, xs, num_samples=S, probs=probs, chunk_size=64,
                                   generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        hidden, local_mean, sd, _ = module.outcome_parts(xs)
        w, b = module.output_layer_mean()
        mean = (hidden @ w.T + b + local_mean).double().numpy()
        sd = sd.double().numpy()
    assert summary.mean.shape == summary.sd.shape == (n, N_OUTCOME)
    assert np.all(np.abs(summary.mean - mean) < 5 * sd / math.sqrt(S))
    assert np.all(np.abs(summary.sd - sd) < 5 * sd / math.sqrt(2 * (S - 1)))
    bin_width = float(GRID[1] - GRID[0])
    for p in probs:
        z = stats.norm.ppf(p)
        se = math.sqrt(p * (1 - p) / S) / stats.norm.pdf(z)
        err = np.abs(summary.quantiles[p] - (mean + z * sd)) / sd
        assert np.all(err < 5 * se + bin_width), (p, err.max(), 5 * se + bin_width)

    rng = np.random.default_rng(10)
    y = mean + sd * rng.standard_normal(mean.shape)
    m = y.size
    for lv in levels:
        lo, hi = summary.quantiles[(1 - lv) / 2], summary.quantiles[(1 + lv) / 2]
        coverage = np.mean((y >= lo) & (y <= hi))
        tol = 4 * math.sqrt(lv * (1 - lv) / m) + 2 / (S + 1)
        assert abs(coverage - lv) < tol, (lv, coverage, tol)


def test_posterior_predictive_is_reproducible_with_a_generator(make_preset):
    module = build(make_preset, [30, 40], seed=11)
    xs, _ = batch([30, 40], 6, seed=12)
    run = lambda seed: posterior_predictive(module, xs, num_samples=50, probs=[0.05, 0.95],
                                            generator=torch.Generator().manual_seed(seed))
    a, b, c = run(1), run(1), run(2)
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_array_equal(a.quantiles[0.05], b.quantiles[0.05])
    assert not np.array_equal(a.mean, c.mean)


# ---- 7c. recalibration on validation residuals -------------------------------------------------
LEVELS = [0.5, 0.8, 0.9, 0.95]


@pytest.mark.parametrize("method", ["quantile", "variance"])
def test_calibrator_fixes_a_mis_scaled_gaussian(method):
    """Predicted sd = 1 where the truth is 2: calibration on n_fit iid residuals restores coverage.

    The fitted interval's true coverage c has sampling sd <= sqrt(P(1-P)/n_fit) (the mass between
    two sample quantiles is Beta-distributed with that variance; variance scaling is tighter);
    coverage on n_test fresh iid draws adds sqrt(P(1-P)/n_test). Tolerance: 4 combined SE.
    tau = sqrt(mean z^2) with z ~ N(0, 4): SE(tau) = tau / sqrt(2 n_fit).
    """
    rng = np.random.default_rng(0)
    n_fit, n_test, true_sd = 4000, 20000, 2.0
    mean_fit, sd_fit = rng.normal(size=(100, 40)), np.ones((100, 40))
    y_fit = mean_fit + true_sd * rng.standard_normal(mean_fit.shape)
    cal = Calibrator.fit(y_fit, mean_fit, sd_fit, method)
    assert abs(cal.tau - true_sd) < 4 * true_sd / math.sqrt(2 * n_fit)
    np.testing.assert_allclose(cal.sd(sd_fit), cal.tau * sd_fit)

    mean_test = rng.normal(size=n_test)
    sd_test = rng.uniform(0.5, 1.5, size=n_test)           # the predicted scale varies; the truth is 2x it
    y_test = mean_test + true_sd * sd_test * rng.standard_normal(n_test)
    for lv in LEVELS:
        lo, hi = cal.interval(mean_test, sd_test, lv)
        coverage = np.mean((y_test >= lo) & (y_test <= hi))
        tol = 4 * math.sqrt(lv * (1 - lv) * (1 / n_fit + 1 / n_test))
        assert abs(coverage - lv) < tol, (method, lv, coverage, tol)
        raw = np.mean(np.abs(y_test - mean_test) <= sd_test * stats.norm.ppf((1 + lv) / 2))
        assert raw < lv - 0.15                              # the raw intervals really were too narrow


def test_quantile_calibration_fixes_skewed_residuals():
    """Quantile recalibration also fixes shape: for skewed residuals each tail gets (1-P)/2."""
    rng = np.random.default_rng(1)
    n_fit, n_test = 4000, 20000
    z_fit = rng.exponential(size=n_fit) - 1.0
    cal = Calibrator.fit(z_fit, np.zeros(n_fit), np.ones(n_fit), "quantile")
    z = rng.exponential(size=n_test) - 1.0
    for lv in LEVELS:
        lo, hi = cal.interval(np.zeros(n_test), np.ones(n_test), lv)
        tail = (1 - lv) / 2
        tol = 4 * math.sqrt(tail * (1 - tail) * (1 / n_fit + 1 / n_test))
        assert abs(np.mean(z < lo) - tail) < tol
        assert abs(np.mean(z > hi) - tail) < tol


def test_calibrator_round_trips_through_a_dict():
    cal = Calibrator.fit(np.random.default_rng(2).normal(size=(10, 30)), np.zeros((10, 30)), np.ones((10, 30)))
    back = Calibrator.from_dict(cal.to_dict())
    assert back.method == cal.method and back.tau == cal.tau
    np.testing.assert_array_equal(back.z_quantiles, cal.z_quantiles)
