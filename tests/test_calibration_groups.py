"""Calibration per group (site), shrunk towards the pooled calibration (predict/conformal.py, calibration.py,
spatial.py): per-group coverage with known truth, the shrinkage rule, unseen and tiny groups, Prediction's
groups, serialisation (old files without groups load), the region quantiles per group."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats

from inva_pyro.predict.calibration import Calibrator
from inva_pyro.predict.conformal import (CANDIDATE_LEVELS, effective_subjects, group_quantiles, prior_subjects,
                                         quantile_function, shrinkage_weight, subject_coverage)
from inva_pyro.predict.prediction import Prediction
from inva_pyro.predict.regions import region_interval
from inva_pyro.predict.spatial import fit_spatial_covariance, label_weights, voronoi_labels

LEVELS = [0.5, 0.8, 0.9, 0.95]
SCALES = {"A": 0.7, "B": 1.0, "C": 1.4}     # each site's error scale, in units of the predicted sd


def _sites(n_per_group: int, n_voxels: int, seed: int, scales=SCALES):
    """Standardised residuals (n, V) of independent voxels, N(0, scale_g^2) for a subject of site g."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(list(scales), n_per_group)
    z = rng.standard_normal((len(groups), n_voxels)) * np.array([scales[g] for g in groups])[:, None]
    return z, list(groups)


def _true_coverage(lo: float, hi: float, scale: float) -> float:
    return float(stats.norm.cdf(hi / scale) - stats.norm.cdf(lo / scale))


def test_each_site_gets_its_own_coverage():
    """Three sites with error scales 0.7, 1, 1.4, 100 subjects of 40 independent voxels each: per site the
    coverage of the fitted intervals (exact, from the known scale) is within 4 sds of nominal, where the sd
    is that of a quantile estimated from n_g V independent scores, sqrt(P (1 - P) / (n_g V)), plus the bias
    the shrinkage leaves, (1 - w_g) |pooled coverage - P|. The pooled calibration misses every outer site
    by more than that (the test can fail)."""
    n_g, n_vox = 100, 40
    z, groups = _sites(n_g, n_vox, seed=0)
    calibrator = Calibrator.fit(z, np.zeros_like(z), np.ones_like(z), "quantile", groups)
    for g, scale in SCALES.items():
        weight = calibrator.group_info[g]["weight"]
        assert weight > 0.95                   # 100 subjects of 40 independent voxels: nearly its own
        for lv in LEVELS:
            pooled = _true_coverage(*calibrator.interval_z(lv), scale)
            own = _true_coverage(*calibrator.interval_z(lv, group=g), scale)
            tol = 4 * np.sqrt(lv * (1 - lv) / (n_g * n_vox)) + (1 - weight) * abs(pooled - lv)
            assert abs(own - lv) < tol, (g, lv, own, tol)
            if g != "B":
                assert abs(pooled - lv) > 2 * tol, (g, lv, pooled)
    # the calibrated sd follows the site's scale too (tau_g, shrunk likewise)
    assert calibrator.group_tau["A"] < calibrator.tau < calibrator.group_tau["C"]
    assert abs(calibrator.group_tau["C"] / 1.4 - 1) < 4 / np.sqrt(2 * n_g * n_vox) + 0.05 * (1 - weight)


def test_shrinkage_rule():
    """w_g = n_g / (n_g + n0), n0 = within-group variance of the per-subject coverage of the pooled 80% interval
    over spread^2; no weight below the minimum; the group's quantiles are w Q_own + (1 - w) Q_pooled."""
    z, groups = _sites(30, 20, seed=1, scales={"A": 0.8, "B": 1.2})
    rng = np.random.default_rng(2)
    z[:30] += 0.5 * rng.standard_normal((30, 1))            # site A: a subject-level error as well
    pooled = quantile_function(z)
    a80 = int(np.argmin(np.abs(CANDIDATE_LEVELS - 0.8)))
    coverage = subject_coverage(z, pooled)[:, a80]
    within = np.concatenate([coverage[:30] - coverage[:30].mean(), coverage[30:] - coverage[30:].mean()])
    n0 = np.sum(within ** 2) / (60 - 2) / 0.04 ** 2
    assert prior_subjects(coverage, np.array(groups), 0.04) == pytest.approx(n0)
    tables = group_quantiles(z, groups, pooled, spread=0.04, min_subjects=5)
    for g, rows in (("A", slice(0, 30)), ("B", slice(30, 60))):
        w = 30 / (30 + n0)
        assert tables[g]["weight"] == pytest.approx(w)
        np.testing.assert_allclose(tables[g]["quantiles"], w * quantile_function(z[rows]) + (1 - w) * pooled)
    assert shrinkage_weight(2, n0, 5) == 0.0 and shrinkage_weight(4, 1.0, 5) == 0.0
    assert shrinkage_weight(5, 1.0, 5) == pytest.approx(5 / 6)
    assert shrinkage_weight(1000, 1.0) > 0.99                      # a large group: its own
    # a wider prior spread trusts groups more
    assert group_quantiles(z, groups, pooled, spread=0.2)["A"]["weight"] > tables["A"]["weight"]
    # evidence of the shrunk function: the pooled n when w = 0, the group's own n_g when w = 1
    assert effective_subjects(10, 100, 0.0) == pytest.approx(100)
    assert effective_subjects(10, 100, 1.0) == pytest.approx(10)
    assert 10 < effective_subjects(10, 100, 0.5) < 100


def test_tiny_and_unseen_groups_get_the_pooled_calibration():
    z, groups = _sites(50, 30, seed=3, scales={"A": 0.7, "B": 1.3})
    z = np.vstack([z, 3.0 * np.random.default_rng(4).standard_normal((2, 30))])   # site T: 2 subjects, scale 3
    groups = groups + ["T", "T"]
    calibrator = Calibrator.fit(z, np.zeros_like(z), np.ones_like(z), "quantile", groups)
    assert calibrator.group_info["T"] == {**calibrator.group_info["T"], "weight": 0.0, "subjects": 2}
    assert "T" not in calibrator.group_quantiles and "T" not in calibrator.group_tau
    mean, sd = np.zeros((4, 30)), np.ones((4, 30))
    lo, hi = calibrator.interval(mean, sd, 0.9, groups=["T", "never seen", "A", "B"])
    pooled_lo, pooled_hi = calibrator.interval(mean, sd, 0.9)
    for row in (0, 1):                                          # the tiny site and a new one: pooled
        np.testing.assert_array_equal(lo[row], pooled_lo[row])
        np.testing.assert_array_equal(hi[row], pooled_hi[row])
    assert hi[2, 0] < pooled_hi[2, 0] < hi[3, 0]
    np.testing.assert_array_equal(calibrator.sd(sd, ["T", "never seen", "A", "B"])[:2], calibrator.tau * sd[:2])


def test_round_trip_and_old_files():
    z, groups = _sites(20, 25, seed=5)
    calibrator = Calibrator.fit(z, np.zeros_like(z), np.ones_like(z), "quantile", groups, confidence=0.9)
    back = Calibrator.from_dict(json.loads(json.dumps(calibrator.to_dict())))
    mean, sd = np.zeros((3, 25)), np.ones((3, 25))
    rows = ["A", "C", "new"]
    for lv in LEVELS:
        for a, b in zip(back.interval(mean, sd, lv, groups=rows), calibrator.interval(mean, sd, lv, groups=rows)):
            np.testing.assert_allclose(a, b, atol=1e-6)
    assert back.group_tau == calibrator.group_tau and back.coverage_confidence == 0.9
    # a calibration.json written before groups and coverage_confidence: pooled, intervals on average
    old = {k: v for k, v in calibrator.to_dict().items()
           if k in ("method", "tau", "z_quantiles", "pattern_scale", "pattern_quantiles")}
    loaded = Calibrator.from_dict(old)
    assert loaded.group_quantiles == {} and loaded.coverage_confidence is None and loaded.n_subjects == 0
    np.testing.assert_array_equal(loaded.interval(mean, sd, 0.9, groups=rows)[1],
                                  Calibrator.fit(z, np.zeros_like(z), np.ones_like(z)).interval(mean, sd, 0.9)[1])
    with pytest.raises(ValueError, match="refit"):
        loaded.with_confidence(0.9)


def test_prediction_uses_each_subjects_group():
    """Prediction(..., groups=...) scales the sd by tau_g and takes each row's group quantiles; CRPS and PIT
    use each row's group atoms (equal to the calibrator's per-group computation)."""
    z, groups = _sites(60, 30, seed=6)
    calibrator = Calibrator.fit(z, np.zeros_like(z), np.ones_like(z), "quantile", groups)
    rng = np.random.default_rng(7)
    mean, raw_sd = rng.standard_normal((4, 30)), np.exp(0.2 * rng.standard_normal((4, 30)))
    rows = ["A", "C", "B", "elsewhere"]
    observed = mean + raw_sd * rng.standard_normal((4, 30))
    prediction = Prediction(subjects=list("abcd"), outcome_name="y", levels=[0.9], mean=mean, raw_sd=raw_sd,
                            raw_intervals={0.9: (mean - raw_sd, mean + raw_sd)}, calibrator=calibrator,
                            observed=observed, groups=rows)
    for i, g in enumerate(rows):
        np.testing.assert_allclose(prediction.sd[i], calibrator.group_tau.get(g, calibrator.tau) * raw_sd[i])
        z_lo, z_hi = calibrator.interval_z(0.9, group=g if g in calibrator.group_quantiles else None)
        np.testing.assert_allclose(prediction.intervals[0.9][0][i], mean[i] + raw_sd[i] * z_lo)
        np.testing.assert_allclose(prediction.intervals[0.9][1][i], mean[i] + raw_sd[i] * z_hi)
    from inva_pyro.criticism.metrics import pit_quantile_distribution
    pit = prediction.pit()
    np.testing.assert_allclose(pit[1], pit_quantile_distribution(observed[1:2], mean[1:2], raw_sd[1:2],
                                                                 calibrator.atoms(None, "C"))[0])
    with pytest.raises(ValueError, match="one label per subject"):
        Prediction(subjects=list("abcd"), outcome_name="y", levels=[0.9], mean=mean, raw_sd=raw_sd,
                   raw_intervals={0.9: (mean, mean)}, calibrator=calibrator, groups=["A"])


def _site_region_errors(n_per_group: int, seed: int, grid=(8, 8)):
    """Region-level data: independent voxel errors with sd s_iv (heteroscedastic) times the site's scale."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(list(SCALES), n_per_group)
    v = grid[0] * grid[1]
    sd = np.exp(0.2 * rng.standard_normal((len(groups), v)))
    scale = np.array([SCALES[g] for g in groups])[:, None]
    return sd, scale * sd * rng.standard_normal(sd.shape), list(groups), scale


def test_region_quantiles_per_site():
    """The region calibration per site: 150 subjects per site, independent voxel errors scaled by the site.
    Coverage of 8 unseen regions (exact: the region mean's error is Normal with the known variance) is, per
    site, within 4 binomial sds of nominal for the family's 16 independent regions per subject, plus the
    shrinkage's bias; the whole mask (one score per subject) is shrunk much harder (n0 near P(1 - P) /
    spread^2 = 100 at 80%)."""
    n_g = 150
    coords = np.argwhere(np.ones((8, 8))).astype(float)
    sd, errors, groups, _ = _site_region_errors(n_g, seed=8)
    _, _, joint = fit_spatial_covariance(torch.as_tensor(errors), np.zeros_like(errors), sd, coords=coords, seed=0,
                                         groups=groups)
    whole = joint.group_info["A"]
    assert 50 < whole["prior_subjects"][-1] < 160 and whole["weight"][-1] < 0.8
    assert whole["weight"][-1] < min(whole["weight"][:-1])
    new_sd, new_errors, new_groups, new_scale = _site_region_errors(200, seed=9)
    _, weights = label_weights(voronoi_labels(coords, 8, np.random.default_rng(5)))
    mean_r, sd_r = joint.region_moments(np.zeros_like(new_sd), new_sd, weights)
    true_sd = new_scale * np.sqrt(np.asarray(weights.multiply(weights) @ (new_sd ** 2).T).T)
    for lv in LEVELS:
        lo, hi = region_interval(joint, mean_r, sd_r, weights, lv, new_groups)
        pooled_lo, pooled_hi = region_interval(joint, mean_r, sd_r, weights, lv)
        covered = stats.norm.cdf(hi / true_sd) - stats.norm.cdf(lo / true_sd)
        pooled = stats.norm.cdf(pooled_hi / true_sd) - stats.norm.cdf(pooled_lo / true_sd)
        for g in SCALES:
            rows = np.asarray(new_groups) == g
            w = max(joint.group_info[g]["weight"][:-1])
            tol = 4 * np.sqrt(lv * (1 - lv) / (n_g * 16)) + (1 - w) * abs(pooled[rows].mean() - lv)
            assert abs(covered[rows].mean() - lv) < tol, (g, lv, covered[rows].mean(), tol)
    back = type(joint).from_parts(json.loads(json.dumps(joint.to_dict())), joint.factor, joint.diag)
    np.testing.assert_allclose(back.interval_z(0.9, [0.1, 1.0], ["A", "B"])[1],
                               joint.interval_z(0.9, [0.1, 1.0], ["A", "B"])[1], atol=1e-5)
