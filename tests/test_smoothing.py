"""The spatial smoothing prior of the predictor's per-voxel maps: the neighbour graphs of the spaces, the
factor's value against its formula, its effect on a fit, and a run folder that rebuilds it."""
from __future__ import annotations

import dataclasses

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine

from inva_pyro.data.spaces import RegionSpace, SurfaceSpace, VolumeSpace
from inva_pyro.data.spaces.surface import FSAVERAGE5_VERTICES, mesh_edges
from inva_pyro.estimator import InVA
from inva_pyro.model.module import InVAModule
from inva_pyro.model.smoothing import neighbour_table, roughness

GRID_SPACE = VolumeSpace(shape=(8, 8, 1), affine=np.eye(4), header=None, mask=np.ones((8, 8, 1), bool))


def test_volume_pairs_are_the_face_neighbours_inside_the_mask_once_each():
    mask = np.ones((3, 3, 2), bool)
    mask[1, 1, 0] = False                       # a hole with 4 in-plane neighbours and 1 above
    space = VolumeSpace(shape=(3, 3, 2), affine=np.eye(4), header=None, mask=mask)
    pairs = space.neighbour_pairs()
    # a full 3 x 3 x 2 box has 2*3*2 + 3*2*2 + 3*3*1 = 33 face pairs; the hole removes 5
    assert pairs.shape == (28, 2)
    ijk = np.argwhere(mask)                     # feature order
    steps = np.abs(ijk[pairs[:, 0]] - ijk[pairs[:, 1]]).sum(1)
    assert (steps == 1).all()
    assert len({tuple(sorted(p)) for p in pairs.tolist()}) == len(pairs)


def test_surface_pairs_follow_the_fsaverage5_mesh_and_regions_have_none():
    assert mesh_edges(np.array([[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]])).tolist() == \
        [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]       # a tetrahedron: 6 edges
    pair = SurfaceSpace(parts=(("lh", FSAVERAGE5_VERTICES), ("rh", FSAVERAGE5_VERTICES))).neighbour_pairs()
    # a closed triangulated surface of V vertices (genus 0) has 3V - 6 edges (Euler)
    per_hemisphere = 3 * FSAVERAGE5_VERTICES - 6
    assert pair.shape == (2 * per_hemisphere, 2)
    left, right = pair[:per_hemisphere], pair[per_hemisphere:]
    assert left.max() < FSAVERAGE5_VERTICES <= right.min() and right.max() < 2 * FSAVERAGE5_VERTICES
    assert SurfaceSpace(parts=(("lh", 100),)).neighbour_pairs() is None        # not a mesh known here
    assert RegionSpace(regions=("a", "b")).neighbour_pairs() is None


@pytest.mark.parametrize("bayesian", [True, False])
def test_the_factor_is_minus_lambda_over_two_tau_squared_times_the_roughness(make_preset, make_arrays, bayesian):
    strength, tau = 50.0, 0.5
    preset = make_preset({"spatial_smoothing": strength, "output_prior_scale": tau, "bayesian_output": bayesian})
    pairs = GRID_SPACE.neighbour_pairs()
    module = InVAModule(["gm", "wm"], [64, 24], 64, preset.model, neighbour_pairs=pairs)
    inputs, y, _, _ = make_arrays(5, 0)
    xs = [torch.as_tensor(inputs["gm"], dtype=torch.float32), torch.as_tensor(inputs["wm"], dtype=torch.float32)]
    y = torch.as_tensor(y, dtype=torch.float32)
    kwargs = dict(subjects=torch.arange(5), n_subjects=5)
    pyro.set_rng_seed(0)
    guide = poutine.trace(module.guide).get_trace(xs, y, **kwargs)
    trace = poutine.trace(poutine.replay(module.model, trace=guide)).get_trace(xs, y, **kwargs)
    site = trace.nodes["predictor_smoothness"]
    if bayesian:
        weight, bias = guide.nodes["output_weight"]["value"], guide.nodes["output_bias"]["value"]
    else:
        weight, bias = module.output_weight, module.output_bias
    maps = [weight, bias[:, None], module.predictor.scale_head.weight, module.predictor.scale_head.bias[:, None],
            module.predictor.voxel_code, module.predictor.mean_mix, module.predictor.scale_mix]
    by_hand = sum(float(((m.detach().numpy()[pairs[:, 0]] - m.detach().numpy()[pairs[:, 1]]) ** 2).sum())
                  for m in maps)
    assert site["fn"].log_prob(site["value"]).item() == pytest.approx(-strength / (2 * tau ** 2) * by_hand, rel=1e-5)
    # without a strength or a graph there is no site
    for module_off in (InVAModule(["gm", "wm"], [64, 24], 64, make_preset({"bayesian_output": bayesian}).model,
                                  neighbour_pairs=pairs),
                       InVAModule(["gm", "wm"], [64, 24], 64, preset.model)):
        off = poutine.trace(module_off.model).get_trace(xs, y, **kwargs)
        assert "predictor_smoothness" not in off.nodes


def test_roughness_and_its_gradient_match_the_sum_over_pairs():
    mask = np.random.default_rng(0).random((5, 4, 3)) < 0.7        # a ragged mask: degrees 0 to 6
    space = VolumeSpace(shape=(5, 4, 3), affine=np.eye(4), header=None, mask=mask)
    pairs = torch.as_tensor(space.neighbour_pairs())
    table, degree = neighbour_table(pairs, space.n_features)
    assert degree.sum().item() == 2 * len(pairs) and table.shape == (space.n_features, int(degree.max()))
    values = torch.randn(space.n_features, 3, dtype=torch.float64, requires_grad=True)
    by_pairs = (values[pairs[:, 0]] - values[pairs[:, 1]]).pow(2).sum()
    expected, = torch.autograd.grad(by_pairs, values)
    value = roughness(values, table, degree)
    got, = torch.autograd.grad(value, values)
    torch.testing.assert_close(value, by_pairs)
    torch.testing.assert_close(got, expected)      # the hand-written backward, 2 L m
    assert roughness(torch.ones(space.n_features), table, degree).item() == 0.0   # a constant map is smooth


def _fit(make_preset, make_cohort, strength, space=GRID_SPACE, **fit_kwargs):
    cohort = make_cohort(40, 16, 8, seed=3)
    preset = make_preset({"spatial_smoothing": strength}, {"epochs": 4})
    train, val = (dataclasses.replace(s, spaces={} if space is None else {s.outcome_name: space})
                  for s in (cohort.train, cohort.val))
    return cohort, InVA(preset).fit(train, val, seed=0, device="cpu", progress=False, **fit_kwargs)


def test_a_strong_prior_makes_the_fitted_maps_smooth(make_preset, make_cohort):
    pairs = torch.as_tensor(GRID_SPACE.neighbour_pairs())
    table, degree = neighbour_table(pairs, 64)
    rough = {}
    for strength in (0.0, 1e4):
        _, model = _fit(make_preset, make_cohort, strength)
        assert model.info["neighbour_pairs"] == (len(pairs) if strength else 0)
        rough[strength] = [roughness(m.detach(), table, degree).item()
                           for m in (model.module.output_weight_q.loc, model.module.predictor.mean_mix)]
    # the same seed and steps: the prior alone takes most of the differences between neighbours away
    for smooth, free in zip(rough[1e4], rough[0.0]):
        assert smooth < 0.3 * free


def test_a_run_folder_rebuilds_the_graph_and_predicts_alike(make_preset, make_cohort, tmp_path):
    cohort, model = _fit(make_preset, make_cohort, 100.0, run_dir=tmp_path / "run")
    loaded = InVA.load(tmp_path / "run")
    assert torch.equal(loaded.module.neighbour_table, model.module.neighbour_table)
    assert loaded.info["neighbour_pairs"] == model.module.n_neighbour_pairs == len(GRID_SPACE.neighbour_pairs())
    a, b = model.predict(cohort.test, seed=1), loaded.predict(cohort.test, seed=1)
    np.testing.assert_array_equal(a.mean, b.mean)


def test_a_space_without_a_graph_warns_that_the_prior_is_off(make_preset, make_cohort):
    regions = RegionSpace(regions=tuple(f"r{v}" for v in range(64)))
    with pytest.warns(RuntimeWarning, match=r"spatial_smoothing = 100 has no effect: the outcome space \(regions\)"):
        _, model = _fit(make_preset, make_cohort, 100.0, space=regions)
    assert model.info["neighbour_pairs"] == 0
    with pytest.warns(RuntimeWarning, match=r"no effect: the training subjects carry no outcome space"):
        _fit(make_preset, make_cohort, 100.0, space=None)


def test_the_default_prior_is_off_without_a_word_on_a_space_without_a_graph(make_cohort):
    import warnings
    from inva_pyro.config import Preset
    cohort = make_cohort(40, 16, 8, seed=3)
    regions = RegionSpace(regions=tuple(f"r{v}" for v in range(64)))
    preset = Preset.model_validate({"model": {"hidden": 8, "shared_hidden": 4}, "training": {"epochs": 1},
                                    "prediction": {"num_samples": 20}})
    assert preset.model.spatial_smoothing == 100.0  # the default's strength, which this preset does not set
    train, val = (dataclasses.replace(s, spaces={s.outcome_name: regions}) for s in (cohort.train, cohort.val))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model = InVA(preset).fit(train, val, seed=0, device="cpu", progress=False)
    assert model.info["neighbour_pairs"] == 0
