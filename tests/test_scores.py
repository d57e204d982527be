"""Energy and variogram scores (criticism/scores.py) and the smooth-noise designs (data/simulate)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from inva_pyro.criticism.metrics import crps_gaussian
from inva_pyro.criticism.scores import StreamingEnergy, StreamingVariogram, feature_pairs
from inva_pyro.data.simulate import simulate_paper, write_cohort
from inva_pyro.data.simulate.common import smooth_noise, smooth_noise_covariance
from inva_pyro.errors import InputError


def test_energy_score_in_one_dimension_is_the_crps():
    """For V = 1 the energy score is the CRPS: N(0, 1) draws against y, CRPS closed form; Monte-Carlo sd
    of the estimator at 20000 draws is below 0.01."""
    rng = np.random.default_rng(0)
    y = np.array([[0.3], [-1.2], [2.0]])
    energy = StreamingEnergy(y)
    for _ in range(4):
        energy.update(rng.standard_normal((5001, 3, 1)))          # odd chunks: pairs across chunks
    np.testing.assert_allclose(energy.value(), [crps_gaussian(v, 0.0, 1.0) for v in y[:, 0]], atol=0.03)


def test_scores_prefer_the_true_correlation():
    """Observed smooth noise: draws with the true covariance score better (lower) than independent draws
    with the same variances, on both scores."""
    grid, sigma = (8, 8), 1.5
    rng = np.random.default_rng(1)
    y = smooth_noise(rng, 30, grid, sigma).reshape(30, -1)
    chol = np.linalg.cholesky(smooth_noise_covariance(grid, sigma) + 1e-9 * np.eye(64))
    pairs = feature_pairs(64)
    scores = {}
    for name in ("joint", "independent"):
        energy, vario = StreamingEnergy(y), StreamingVariogram(y, pairs)
        for _ in range(10):
            e = rng.standard_normal((50, 30, 64))
            draws = e @ chol.T if name == "joint" else e
            energy.update(draws)
            vario.update(draws)
        scores[name] = (energy.value().mean(), vario.value().mean())
    assert scores["joint"][0] < scores["independent"][0]
    assert scores["joint"][1] < scores["independent"][1]


def test_smooth_noise_has_the_stated_covariance():
    """Sample covariance of 4000 fields against the exact one: entries within 4 sd (sd <= sqrt(2 / n))."""
    eta = smooth_noise(np.random.default_rng(2), 4000, (6, 6), 1.2).reshape(4000, -1)
    exact = smooth_noise_covariance((6, 6), 1.2)
    assert np.abs(np.cov(eta.T) - exact).max() < 4 * np.sqrt(2 / 4000)
    assert exact[0, 1] > 0.5                       # neighbours are strongly correlated


def test_paper_design_smooth_noise_keeps_mean_and_sd():
    a, b = simulate_paper(300, 0), simulate_paper(300, 0, noise="smooth")
    np.testing.assert_array_equal(a["true_mean"], b["true_mean"])
    np.testing.assert_array_equal(a["true_sd"], b["true_sd"])
    eta = ((b["outcome"] - b["true_mean"]) / b["true_sd"]).reshape(300, -1)
    exact = smooth_noise_covariance((32, 32), 1.5)
    neighbours = np.mean(eta[:, :-1] * eta[:, 1:])             # along rows (includes row ends: wrap)
    assert abs(eta.var() - 1) < 0.05
    assert abs(neighbours - np.mean(exact.diagonal(1))) < 0.05
    with pytest.raises(ValueError, match="noise"):
        simulate_paper(10, 0, noise="pink")


def test_write_cohort_records_noise_and_refuses_what_it_cannot(tmp_path):
    out = write_cohort(tmp_path / "c", "paper", 10, 0, noise="smooth")
    assert json.loads((out / "cohort.json").read_text())["noise"] == "smooth"
    with pytest.raises(InputError, match="regions design"):
        write_cohort(tmp_path / "r", "regions", 10, 0, noise="smooth")
    with pytest.raises(InputError, match="unknown noise"):
        write_cohort(tmp_path / "p", "paper", 10, 0, noise="pink")
    assert not (tmp_path / "r").exists() and not (tmp_path / "p").exists()
