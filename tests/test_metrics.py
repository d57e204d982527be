"""Metrics against closed-form truth; figure functions write PNGs.

Tolerances come from the sampling error of each check (binomial or Monte-Carlo standard
errors times 4-5, or a discretisation bound), so a correct implementation fails with
negligible probability and the seeds only make failures reproducible.
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from inva_pyro.criticism import figures

from inva_pyro.criticism import metrics
from inva_pyro.predict import summaries


@pytest.fixture
def rng():
    return np.random.default_rng(20240601)


def gaussian_problem(rng, n=40, v=500):
    mean = rng.normal(0.0, 2.0, size=(n, v))
    sd = rng.uniform(0.5, 2.0, size=(n, v))
    y = mean + sd * rng.standard_normal((n, v))
    return y, mean, sd


def test_point_metrics_closed_form():
    y = np.array([[0.0, 1.0], [2.0, 3.0]])
    mean = y + np.array([[1.0, -1.0], [2.0, -2.0]])
    assert metrics.mse(y, mean) == pytest.approx((1 + 1 + 4 + 4) / 4)
    assert metrics.mae(y, mean) == pytest.approx((1 + 1 + 2 + 2) / 4)
    assert metrics.corr(y, 3 * y + 1) == pytest.approx(1.0)
    assert metrics.corr(y, -y) == pytest.approx(-1.0)
    assert metrics.corr(y, torch.tensor(y)) == pytest.approx(1.0)  # torch input accepted


@pytest.mark.parametrize("level", [0.5, 0.8, 0.9, 0.95])
def test_coverage_of_exact_gaussian_intervals(rng, level):
    y, mean, sd = gaussian_problem(rng)
    half = stats.norm.ppf(0.5 + level / 2) * sd
    got = metrics.coverage(y, mean - half, mean + half)
    # entries are independent Bernoulli(level) draws
    se = math.sqrt(level * (1 - level) / y.size)
    assert abs(got - level) < 4 * se
    assert metrics.interval_width(mean - half, mean + half) == pytest.approx(2 * np.mean(half))


def test_coverage_by_feature_counts_subjects():
    y = np.array([[0.0, 5.0], [1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    lo, hi = np.full_like(y, 1.0), np.full_like(y, 2.0)
    np.testing.assert_allclose(metrics.coverage_by_feature(y, lo, hi), [0.5, 0.0])


def test_gaussian_nll_matches_scipy(rng):
    y, mean, sd = gaussian_problem(rng, n=5, v=50)
    expected = -np.mean(stats.norm.logpdf(y, mean, sd))
    assert metrics.gaussian_nll(y, mean, sd) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError):
        metrics.gaussian_nll(y, mean, np.zeros_like(sd))


def test_crps_gaussian_at_the_mean_is_closed_form():
    # w = 0: sd * (0 + 2 phi(0) - 1/sqrt(pi)) = sd * (sqrt(2) - 1) / sqrt(pi)
    sd = np.array([[0.5, 1.0, 3.0]])
    expected = sd * (math.sqrt(2) - 1) / math.sqrt(math.pi)
    np.testing.assert_allclose(metrics.crps_gaussian_map(np.zeros_like(sd), 0.0, sd), expected, rtol=1e-12)
    # a zero sd is a point mass: CRPS reduces to the absolute error
    assert metrics.crps_gaussian(np.array([[2.5]]), 1.0, 0.0) == pytest.approx(1.5)


def test_crps_gaussian_matches_monte_carlo(rng):
    # CRPS = E|X - y| - E|X - X'|/2 with X, X' ~ N(mean, sd^2), estimated on many draws
    mean, sd = 0.7, 1.3
    y = np.array([[-2.0, 0.0, 0.7, 1.5, 4.0]])
    s = 400_000
    x = mean + sd * rng.standard_normal((s, 1))
    x2 = mean + sd * rng.standard_normal((s, 1))
    terms = np.abs(x - y) - 0.5 * np.abs(x - x2)
    mc, mc_se = terms.mean(0), terms.std(0) / math.sqrt(s)
    exact = metrics.crps_gaussian_map(y, mean, sd)[0]
    assert np.all(np.abs(exact - mc) < 5 * mc_se)


@pytest.mark.parametrize("m", [50, 200, 2000])
def test_crps_quantile_distribution_converges_to_gaussian(rng, m):
    y, mean, sd = gaussian_problem(rng, n=20, v=200)
    z = stats.norm.ppf((np.arange(1, m + 1) - 0.5) / m)
    got = metrics.crps_quantile_distribution_map(y, mean, sd, z)
    exact = metrics.crps_gaussian_map(y, mean, sd)
    # The M-atom distribution's E|Z - Z'| includes the M zero diagonal pairs, so it is short
    # by about E|Z - Z'| / M = 2 / (sqrt(pi) M), which raises the CRPS by ~0.56/M per unit sd;
    # the step CDF's other deviations from Phi (at most 1/(2M)) partly offset that and are of
    # the same order. The error must therefore shrink like 1/M: bound it by 1/M.
    assert np.max(np.abs(got - exact) / sd) < 1.0 / m
    # mean version agrees with the map and ignores the order of the atoms
    assert metrics.crps_quantile_distribution(y, mean, sd, rng.permutation(z)) == pytest.approx(got.mean())


def test_crps_quantile_distribution_matches_brute_force(rng):
    z = np.sort(rng.standard_t(df=4, size=37))
    y, mean, sd = gaussian_problem(rng, n=3, v=11)
    w = (y - mean) / sd
    abs_dev = np.abs(z[:, None, None] - w[None]).mean(0)
    spread = np.abs(z[:, None] - z[None, :]).mean()
    expected = sd * (abs_dev - 0.5 * spread)
    np.testing.assert_allclose(metrics.crps_quantile_distribution_map(y, mean, sd, z), expected, rtol=1e-10)


def test_crps_quantile_distribution_is_fast_on_a_million_entries(rng):
    import time

    y = rng.standard_normal((100, 10_000))
    z = stats.norm.ppf((np.arange(1, 2001) - 0.5) / 2000)
    start = time.perf_counter()
    metrics.crps_quantile_distribution(y, np.zeros_like(y), np.ones_like(y), z)
    assert time.perf_counter() - start < 2.0  # typically ~0.2 s; generous for slow CI


def test_pit_is_uniform_under_the_true_model(rng):
    y, mean, sd = gaussian_problem(rng, n=20, v=500)
    m = 999
    z = stats.norm.ppf((np.arange(1, m + 1) - 0.5) / m)
    for pit in (metrics.pit_gaussian(y, mean, sd), metrics.pit_quantile_distribution(y, mean, sd, z)):
        # P(PIT <= 0.3) = 0.3 for a calibrated predictive (up to 1/M for the step CDF)
        se = math.sqrt(0.3 * 0.7 / y.size)
        assert abs(np.mean(pit <= 0.3) - 0.3) < 4 * se + 1 / m


def test_streaming_crps_matches_closed_form(rng):
    y, mean, sd = gaussian_problem(rng, n=4, v=250)
    streaming = summaries.StreamingCRPS(torch.tensor(y))
    n_samples = 0
    # odd chunk sizes exercise the pairing across chunks; mixed torch / numpy input
    for i, chunk in enumerate([7, 64, 1, 128, 99, 101]):
        draws = mean + sd * rng.standard_normal((chunk, *y.shape))
        streaming.update(torch.tensor(draws, dtype=torch.float32) if i % 2 else draws)
        n_samples += chunk
    exact = metrics.crps_gaussian_map(y, mean, sd)
    crps_map = streaming.value(average=False)
    assert crps_map.shape == y.shape
    # Per entry, with w = (y - mean)/sd: Var mean|X_s - y| <= E(X - y)^2 / S = sd^2 (1 + w^2) / S,
    # and |X - X'| is half-normal with variance 2 sd^2 (1 - 2/pi), so half the mean over S/2
    # pairs has variance 0.36 sd^2 / S. By the triangle inequality for standard deviations the
    # estimator's sd is below (sqrt(1 + w^2) + 0.6) sd / sqrt(S) <= 1.6 sqrt(1 + w^2) sd / sqrt(S).
    # Entries are independent, so their mean has standard error sqrt(mean(se^2) / n_entries).
    entry_se = 1.6 * np.sqrt(1 + ((y - mean) / sd) ** 2) * sd / math.sqrt(n_samples)
    assert abs(streaming.value() - exact.mean()) < 4 * np.sqrt(np.mean(entry_se**2) / y.size)
    assert np.mean(np.abs(crps_map - exact) < 4 * entry_se) > 0.99


def test_streaming_crps_needs_a_pair():
    streaming = summaries.StreamingCRPS(np.zeros((1, 3)))
    streaming.update(np.ones((1, 1, 3)))
    with pytest.raises(ValueError):
        streaming.value()
    streaming.update(np.full((1, 1, 3), 3.0))
    # samples 1 and 3 around y = 0: E|X - y| = 2, E|X - X'| = 2 -> CRPS = 1
    assert streaming.value() == pytest.approx(1.0)


def test_streaming_moments_equal_numpy(rng):
    chunks = [rng.normal(1e4, 3.0, size=(k, 5, 7)) for k in (1, 13, 2, 40)]
    moments = summaries.StreamingMoments()
    for chunk in chunks:
        moments.update(torch.tensor(chunk, dtype=torch.float64))
    whole = np.concatenate(chunks)
    assert moments.count == whole.shape[0]
    np.testing.assert_allclose(moments.mean.numpy(), whole.mean(0), rtol=1e-12)
    np.testing.assert_allclose(moments.variance(ddof=0).numpy(), whole.var(0), rtol=1e-9)
    np.testing.assert_allclose(moments.sd().numpy(), whole.std(0, ddof=1), rtol=1e-9)
    assert moments.mean.dtype == torch.float64


def test_ssim_identical_noisy_and_tiny(rng):
    image = np.cumsum(rng.standard_normal((3, 32, 32)), axis=1)  # smooth-ish structure
    data_range = float(image.max() - image.min())
    assert metrics.ssim(image, image, (32, 32), data_range) == pytest.approx(1.0, abs=1e-6)
    noisy = image + rng.normal(0.0, 0.2 * image.std(), size=image.shape)
    assert metrics.ssim(noisy, image, (32, 32), data_range) < 0.99
    # flattened features are accepted too
    flat = metrics.ssim(noisy.reshape(3, -1), image.reshape(3, -1), (32, 32), data_range)
    assert flat == pytest.approx(metrics.ssim(noisy, image, (32, 32), data_range))
    volume = rng.standard_normal((2, 12, 10, 9))
    assert metrics.ssim(volume, volume, (12, 10, 9), 1.0) == pytest.approx(1.0, abs=1e-6)
    assert metrics.ssim(image[:, :5, :5], image[:, :5, :5], (5, 5), data_range) is None


def test_evaluation_metrics_dict(rng):
    y, mean, sd = gaussian_problem(rng, n=6, v=64)
    half = stats.norm.ppf(0.95) * sd
    intervals = {0.9: (mean - half, mean + half), "0.50": (mean - 0.674 * sd, mean + 0.674 * sd)}
    crps = metrics.crps_gaussian(y, mean, sd)
    out = metrics.evaluation_metrics(y, mean, sd, intervals, crps, grid_shape=(8, 8), truth_mean=mean, truth_sd=sd)
    assert set(out) == {"n_subjects", "n_features", "mse", "mae", "corr", "ssim", "coverage",
                        "interval_width", "crps", "nll", "oracle_mse", "oracle_crps"}
    assert (out["n_subjects"], out["n_features"]) == (6, 64)
    assert list(out["coverage"]) == ["0.5", "0.9"] and list(out["interval_width"]) == ["0.5", "0.9"]
    assert isinstance(out["ssim"], float) and isinstance(out["mse"], float)
    assert out["oracle_mse"] == pytest.approx(out["mse"]) and out["oracle_crps"] == pytest.approx(crps)

    mask = np.zeros((9, 9, 9), dtype=bool)
    mask[1:5, 1:5, 1:5] = True
    masked = metrics.evaluation_metrics(y, mean, sd, intervals, crps, mask=mask)
    assert isinstance(masked["ssim"], float)
    plain = metrics.evaluation_metrics(y, mean, sd, intervals, crps)
    assert plain["ssim"] is None and plain["oracle_mse"] is None and plain["oracle_crps"] is None


def test_figures_write_pngs(tmp_path, rng):
    y, mean, sd = gaussian_problem(rng, n=3, v=16 * 16)
    grids = [a.reshape(3, 16, 16) for a in (y, mean, sd)]
    levels = [0.5, 0.8, 0.9, 0.95]
    mask = np.ones((8, 8, 4), dtype=bool)
    mask[0] = False
    paths = [
        figures.plot_subject_maps(tmp_path / "maps2d.png", *grids, ["s1", "s2", "s3"]),
        figures.plot_subject_maps(
            tmp_path / "maps3d.png", y, mean, sd, ["a", "b", "c"],
            grid_maps=lambda a: metrics.scatter_to_grid(a[:, : mask.sum()], mask, fill=np.nan),
        ),
        figures.plot_calibration_curve(tmp_path / "calib.png", levels, [0.4, 0.7, 0.85, 0.9], levels),
        figures.plot_pit_histogram(tmp_path / "pit.png", metrics.pit_gaussian(y, mean, sd)),
        figures.plot_sd_vs_error(tmp_path / "sd_err.png", sd, np.abs(y - mean)),
        figures.plot_coverage_map(tmp_path / "cov.png", rng.uniform(0.7, 1.0, size=(6, 6, 5)), 0.9),
        figures.plot_training_curves(
            tmp_path / "train.png", {"epoch": [1, 2, 3], "train_loss": [5.0, 3.0, 2.5], "val_mse": [1.0, None, 0.8]}
        ),
    ]
    for path in paths:
        assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)  # no temp files left
