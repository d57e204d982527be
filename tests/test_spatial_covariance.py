"""Joint (spatially correlated) predictive: covariance fitted on validation subjects, region moments,
joint draws, the Pyro program's outcome site, save/load (predict/joint.py, model/covariance.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pyro import poutine

from inva_pyro import InVA
from inva_pyro.data.simulate.common import smooth_noise, smooth_noise_covariance
from inva_pyro.predict.regions import region_interval
from inva_pyro.errors import InputError
from inva_pyro.model.covariance import fit_factor
from inva_pyro.predict.spatial import (fit_spatial_covariance, independent_region_sd, spatial_draws, label_weights,
                                     region_moments, voronoi_labels)

GRID = (12, 12)
SIGMA = 1.5


def _smooth_residuals(n: int, seed: int):
    """Outcome errors with a known covariance: sd * smooth noise (Gaussian PSF), sd heteroscedastic."""
    rng = np.random.default_rng(seed)
    v = GRID[0] * GRID[1]
    sd = 0.5 * np.exp(0.3 * rng.standard_normal((n, v)))
    return sd, sd * smooth_noise(rng, n, GRID, SIGMA).reshape(n, v)


def test_label_weights_average_each_region_and_skip_background():
    labels = np.array([0, 3, 3, 1, 0, 1, 1])
    ids, weights = label_weights(labels)
    assert ids == [1, 3]
    values = np.arange(7.0)
    np.testing.assert_allclose(weights @ values, [(3 + 5 + 6) / 3, (1 + 2) / 2])


def test_sample_factor_is_the_second_moment():
    r = torch.as_tensor(np.random.default_rng(0).standard_normal((20, 9)))
    factor, diag = fit_factor(r, None)
    np.testing.assert_allclose((factor @ factor.T).numpy(), (r.T @ r / 20).numpy(), atol=1e-12)
    np.testing.assert_allclose(diag.numpy(), np.maximum((r ** 2).mean(0).numpy(), 0.05))


def test_region_variance_of_joint_draws_matches_the_true_smooth_noise():
    """Fitted on n subjects with known smooth noise, the variance of region means over S joint draws is
    the true one within 3.5 sd of its estimation error (7 regions x 3 subjects compared): relative sd
    sqrt(2 / n) of a variance estimated from n subjects (the covariance) plus sqrt(2 / S) of the draws'
    sample variance. Independent draws with the same voxel variances miss it by far (the test can fail)."""
    n, draws = 400, 2000
    sd, errors = _smooth_residuals(n, seed=1)
    coords = np.argwhere(np.ones(GRID)).astype(float)
    _, _, joint = fit_spatial_covariance(torch.as_tensor(errors), np.zeros_like(errors), sd, coords=coords, seed=0)
    cov = smooth_noise_covariance(GRID, SIGMA)
    labels = voronoi_labels(coords, 6, np.random.default_rng(5))          # regions the fit never saw
    ids, weights = label_weights(labels)
    dense = np.vstack([weights.toarray(), np.full((1, labels.size), 1 / labels.size)])
    sd_new = sd[:3]                                                         # three subjects' sd maps
    true_var = np.array([[w * s @ cov @ (w * s) for w in dense] for s in sd_new])
    samples = np.concatenate(list(spatial_draws(np.zeros_like(sd_new), sd_new, joint, draws, seed=1)))
    region_var = (samples @ dense.T).var(0, ddof=1)
    tol = 3.5 * np.sqrt(2 / n + 2 / draws)
    assert np.all(np.abs(region_var / true_var - 1) < tol), region_var / true_var
    # the closed form agrees with the draws
    _, closed_sd = region_moments(np.zeros_like(sd_new), sd_new, dense, joint.factor, joint.diag, joint.alpha, joint.beta)
    np.testing.assert_allclose(region_var, closed_sd ** 2, rtol=4 * np.sqrt(2 / draws))
    indep = np.concatenate(list(spatial_draws(np.zeros_like(sd_new), sd_new, joint, 400, seed=1, independent=True)))
    assert np.all((indep @ dense.T).var(0) / true_var < 0.5)


def test_region_intervals_cover_on_new_subjects():
    """Calibrated on 200 subjects, the 90% intervals of 6 unseen regions and the whole mask cover new
    subjects' region means at 0.90 within 3 binomial sds; independent-voxel intervals do not."""
    sd, errors = _smooth_residuals(200, seed=3)
    coords = np.argwhere(np.ones(GRID)).astype(float)
    _, _, joint = fit_spatial_covariance(torch.as_tensor(errors), np.zeros_like(errors), sd, coords=coords, seed=0)
    sd_t, e_t = _smooth_residuals(400, seed=2)
    _, weights = label_weights(voronoi_labels(coords, 6, np.random.default_rng(5)))
    mean, region_sd = joint.region_moments(np.zeros_like(sd_t), sd_t, weights)
    err = np.asarray(weights @ e_t.T).T
    lo, hi = region_interval(joint, np.zeros_like(err), region_sd, weights, 0.9)
    covered = np.mean((err >= lo) & (err <= hi))
    assert abs(covered - 0.9) < 3 * np.sqrt(0.09 / (400 * 6)) * 2.5   # regions of a subject are correlated
    independent = np.mean(np.abs(err) <= 1.645 * independent_region_sd(sd_t, weights))
    assert independent < 0.7


@pytest.fixture(scope="module")
def fitted(make_preset, make_cohort):
    cohort = make_cohort(40, 16, 12, seed=1)
    model = InVA(make_preset()).fit(cohort.train, cohort.val, seed=0, progress=False)
    return model, cohort


def test_outcome_site_is_low_rank_normal_once_fitted(fitted, make_preset, make_cohort):
    model, cohort = fitted
    xs, y = model.tensors(cohort.test)
    trace = poutine.trace(model.module.model).get_trace(xs, y, subjects=torch.arange(len(y)), n_subjects=len(y))
    fn = trace.nodes["outcome"]["fn"].base_dist  # masked where the outcome is missing
    assert type(fn).__name__ == "LowRankMultivariateNormal" and fn.event_shape == (64,)
    # the two folds' factors side by side: rank 16 by default, at most 8 - 1 from each fold's 8 subjects
    assert model.module.outcome_covariance.rank == 14
    full = InVA(make_preset(prediction={"covariance_rank": "full"})).fit(cohort.train, cohort.val, seed=0,
                                                                       progress=False)
    assert full.module.outcome_covariance.rank == 16           # each fold's 8 residuals' second moment
    fresh = InVA(make_preset(prediction={"spatial_covariance": False})).fit(cohort.train, cohort.val, seed=0, progress=False)
    trace = poutine.trace(fresh.module.model).get_trace(xs, y, subjects=torch.arange(len(y)), n_subjects=len(y))
    assert type(trace.nodes["outcome"]["fn"].base_dist).__name__ == "Independent" and fresh.spatial_covariance is None
    # the covariance is fitted after training: the predictive mean (and so the MSE) is today's, bit for bit
    np.testing.assert_array_equal(fresh.predict(cohort.test, seed=0).mean, model.predict(cohort.test, seed=0).mean)


def test_every_latent_structure_scores_the_fitted_covariance(make_preset, make_cohort):
    # one outcome site for every structure: the joint (product-of-experts) one too, so the program the
    # diagnostics score is the one that predicts
    cohort = make_cohort(40, 16, 4, seed=2)
    model = InVA(make_preset({"structure": "joint"}, {"epochs": 2})).fit(cohort.train, cohort.val, seed=0,
                                                                          progress=False)
    xs, y = model.tensors(cohort.test)
    trace = poutine.trace(model.module.model).get_trace(xs, y, subjects=torch.arange(len(y)), n_subjects=len(y))
    assert type(trace.nodes["outcome"]["fn"].base_dist).__name__ == "LowRankMultivariateNormal"


def test_regions_table_and_whole_mask_row(fitted):
    model, cohort = fitted
    pred = model.predict(cohort.test, levels=[0.5, 0.9], seed=0)
    labels = np.repeat([0, 2, 5, 7], 16)
    table = pred.regions(labels)
    assert list(table.columns) == ["subject", "region", "mean", "sd", "lo50", "hi50", "lo90", "hi90"]
    assert len(table) == len(cohort.test) * 4
    assert list(table["region"][:4]) == ["2", "5", "7", "all"]
    whole = table[table["region"] == "all"]
    np.testing.assert_allclose(whole["mean"], pred.mean.astype(float).mean(1), rtol=1e-6)
    assert np.all(table["lo90"] < table["lo50"]) and np.all(table["hi50"] < table["hi90"])
    # the kept samples are joint draws: their region means spread like the closed-form sds
    pred = model.predict(cohort.test, seed=0, keep_samples=400)
    region_means = pred.samples @ (labels == 2) / 16
    sds = table[table["region"] == "2"]["sd"].to_numpy()
    np.testing.assert_allclose(region_means.std(0, ddof=1), sds, rtol=4 * np.sqrt(1 / 400))


def test_save_load_keeps_the_covariance_and_old_runs_still_load(fitted, tmp_path):
    model, cohort = fitted
    run = model.save(tmp_path / "run")
    assert (run / "covariance.safetensors").exists() and json.loads((run / "covariance.json").read_text())["rank"] == 14
    labels = np.repeat([1, 2, 3, 4], 16)
    a = model.predict(cohort.test, seed=3).regions(labels)
    for name in ("covariance.json", "joint.json"):  # runs written before the rename call it joint.json
        if name == "joint.json":
            (run / "covariance.json").rename(run / "joint.json")
        loaded = InVA.load(run, device=str(model.device))  # same device, so the same seeded draws
        b = loaded.predict(cohort.test, seed=3).regions(labels)
        np.testing.assert_allclose(a[["mean", "sd", "lo90"]].to_numpy(float),
                                   b[["mean", "sd", "lo90"]].to_numpy(float), rtol=1e-6)
    (run / "covariance.safetensors").unlink()
    (run / "joint.json").unlink()
    old = InVA.load(run, device=str(model.device))        # a run folder from before the covariance
    assert old.spatial_covariance is None and old.module.outcome_covariance.rank == 0
    pred = old.predict(cohort.test, seed=3)
    np.testing.assert_allclose(pred.mean, model.predict(cohort.test, seed=3).mean, rtol=1e-6)
    with pytest.raises(InputError, match="spatial covariance"):
        pred.regions(labels)


def test_feature_coordinates_are_mask_voxels_in_mm():
    from inva_pyro.data.spaces import VolumeSpace
    mask = np.zeros((3, 2, 1), dtype=bool)
    mask[0, 0, 0] = mask[2, 1, 0] = True
    space = VolumeSpace(shape=(3, 2, 1), affine=np.diag([2.0, 3.0, 4.0, 1.0]), header=None, mask=mask)
    np.testing.assert_array_equal(space.feature_coordinates(), [[0.0, 0.0, 0.0], [4.0, 3.0, 0.0]])


def test_the_kept_covariance_is_the_average_of_the_folds():
    """final="folds": the model keeps exactly the folds' covariances averaged (the estimates whose region
    errors fitted the calibration); final="all" keeps one fit on every subject."""
    sd, errors = _smooth_residuals(40, seed=4)
    coords = np.argwhere(np.ones(GRID)).astype(float)
    residuals = torch.as_tensor(errors / sd)
    fold_of = np.random.default_rng([7, 13]).permutation(40) % 2
    folds = [fit_factor(residuals[torch.as_tensor(np.flatnonzero(fold_of != k))], 5) for k in range(2)]
    factor, diag, joint = fit_spatial_covariance(torch.as_tensor(errors), np.zeros_like(errors), sd, rank=5, coords=coords, seed=7)
    expected = sum(f.double() @ f.double().T for f, _ in folds) / 2
    torch.testing.assert_close(factor.double() @ factor.double().T, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(diag.double(), (folds[0][1].double() + folds[1][1].double()) / 2, rtol=1e-5, atol=1e-6)
    assert joint.rank == 10 and joint.info["final"] == "folds"
    factor_all, _, joint_all = fit_spatial_covariance(torch.as_tensor(errors), np.zeros_like(errors), sd, rank=5, coords=coords,
                                         seed=7, final="all")
    assert joint_all.rank == 5 and joint_all.alpha == joint.alpha   # the calibration itself does not change
