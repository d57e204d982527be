"""Device cleanliness, checked without a GPU, and the synchronisation-free ELBO.

Everything runs with the module and the data on torch's ``meta`` device: meta tensors carry shapes
and dtypes but no data, and an operation that mixes a meta tensor with a CPU tensor (other than a
0-d scalar) raises "Tensor on device cpu is not on the expected device meta", exactly where a CUDA
run fails with "Expected all tensors to be on the same device". A tensor that the code builds on
the CPU by mistake (``torch.tensor(...)``, ``dist.Normal(0.0, tau).expand(...)``) therefore fails
here as it would on a GPU.

``MetaHost`` lets the code around the tensors run too: copies from the meta device to the host
(``.cpu()``, ``.item()``, ``float()``) return zeros (True for booleans), since meta tensors hold no
values. The numbers are meaningless; only the devices are checked.

Checked against earlier code: with the output layer's prior built as
``dist.Normal(0.0, tau).expand(...)`` (module.py before the fix) the model/guide, training-step
and PSIS tests below fail with "Tensor on device cpu is not on the expected device meta!"
(reverted by hand, run, restored: 6 of these tests failed); with Pyro's own ``psis_diagnostic``
in ``psis_khat`` (diagnostics.py before the fix) the diagnostics test fails too: Pyro selects the
tail and fits the Pareto on the weights' device (on a GPU its CPU grid then mixes devices; on meta
the boolean selection already raises).
"""
from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch.utils._python_dispatch import TorchDispatchMode

from inva_pyro.criticism import diagnostics as D
from inva_pyro.model.module import InVAModule
from inva_pyro.predict.predictive import posterior_predictive, seeded_generator
from inva_pyro.train.elbo import DeviceTrace_ELBO
from inva_pyro.train.loop import Batchable, train

META = torch.device("meta")
aten = torch.ops.aten


class MetaHost(TorchDispatchMode):
    """Meta -> host copies give zeros (True for booleans); every other operation runs as usual."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default and args[0].is_meta:
            return True if args[0].dtype == torch.bool else 0
        if func is aten._to_copy.default and args[0].is_meta and kwargs.get("device", META).type == "cpu":
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        return func(*args, **kwargs)


def build(make_preset, model=None, sizes=(20, 12), n_outcome=20) -> InVAModule:
    cfg = make_preset(model=model).model
    # the outcome's features as a line graph, for the spatial smoothing prior's index tensor
    pairs = [[v, v + 1] for v in range(n_outcome - 1)] if cfg.spatial_smoothing > 0 else None
    return InVAModule([f"x{k}" for k in range(len(sizes))], list(sizes), n_outcome, cfg, neighbour_pairs=pairs)


def data(sizes=(20, 12), n_outcome=20, n=6, device=META):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, v, generator=g).to(device) for v in sizes]
    return xs, torch.randn(n, n_outcome, generator=g).to(device)


MODELS = [None, {"bayesian_output": False}, {"predictor": "paper"}, {"structure": "separate"},
          {"structure": "concatenated", "predictor": "paper"}, {"mmd_weight": 1.0, "reconstruction": "laplace"},
          {"structure": "joint", "spatial_smoothing": 10.0}]


@pytest.mark.parametrize("model", MODELS)
def test_model_and_guide_trace_on_the_module_device(make_preset, model):
    module = build(make_preset, model).to(META)
    xs, y = data()
    idx = torch.arange(4, device=META)
    with pyro.validation_enabled(False), MetaHost():
        kwargs = dict(subjects=idx, n_subjects=10)
        guide_trace = poutine.trace(module.guide).get_trace([x[:4] for x in xs], y[:4], **kwargs)
        model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(
            [x[:4] for x in xs], y[:4], **kwargs)
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
        for trace in (model_trace, guide_trace):
            for name, site in trace.nodes.items():
                if site["type"] == "sample" and name != "subjects":  # the plate's subsample site: Pyro's
                    assert site["value"].device == META, name
                    assert site["log_prob_sum"].device == META, name
        loss = DeviceTrace_ELBO().differentiable_loss(module.model, module.guide, [x[:4] for x in xs], y[:4],
                                                      **kwargs)
        loss.backward()
    assert loss.device == META
    assert all(p.grad is None or p.grad.device == META for p in module.parameters())


def test_training_steps_on_the_module_device(make_preset):
    preset = make_preset(training={"epochs": 2, "batch_size": 4})
    module = build(make_preset).to(META)
    xs, y = data(n=10)
    with pyro.validation_enabled(False), MetaHost():
        state = train(module, Batchable(xs, y), Batchable([x[:3] for x in xs], y[:3]), preset.training,
                      progress=False)
    assert state.epoch == 2
    assert all(p.device == META for p in module.parameters())


@pytest.mark.parametrize("bayesian_output", [True, False])
def test_posterior_predictive_on_the_module_device(make_preset, bayesian_output):
    module = build(make_preset, {"bayesian_output": bayesian_output}).to(META)
    xs, y = data(n=5)
    with MetaHost():
        summary = posterior_predictive(module, xs, num_samples=6, probs=[0.05, 0.95], observed=y, block_size=2,
                                       chunk_size=3, keep_samples=2, keep_draws=3, keep_features=[0, 3],
                                       generator=seeded_generator(META, 0))
    assert summary.mean.shape == (5, 20) and summary.draws.component_mean.shape == (3, 5, 2)


def test_diagnostics_on_the_module_device(make_preset):
    module = build(make_preset).to(META)
    xs, _ = data(n=5)
    with pyro.validation_enabled(False), MetaHost():
        report = D.collapse_report(module, xs)
        psis = D.psis_khat(module, xs, num_particles=20, max_subjects=2)
    assert set(report) >= {"active_units"} and len(psis["khat"]) == 2


def test_device_elbo_has_the_value_and_gradient_of_trace_elbo(make_preset):
    """Same seed, same draws: DeviceTrace_ELBO's loss and gradients are Pyro's Trace_ELBO's (float32
    rounding of a sum of ~20 terms of size ~1e3: 1e-4 relative)."""
    module = build(make_preset, {"mmd_weight": 0.5})
    xs, y = data(device="cpu")
    kwargs = dict(subjects=torch.tensor([0, 2, 4]), n_subjects=12, kl_scale=0.3)
    results = []
    for elbo in (Trace_ELBO(), DeviceTrace_ELBO()):
        module.zero_grad(set_to_none=True)
        pyro.set_rng_seed(3)
        loss = elbo.differentiable_loss(module.model, module.guide, [x[::2] for x in xs], y[::2], **kwargs)
        loss.backward()
        results.append((torch.as_tensor(loss).detach().clone(), [p.grad.clone() for p in module.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.isfinite(loss_a) and float(loss_a) != 0.0
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-4, atol=1e-3)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-5)


def test_pattern_routes_and_mixtures_predict_on_the_module_device(make_preset):
    import numpy as np
    from inva_pyro.predict.routing import PatternRoutes

    class Fixed(PatternRoutes):  # meta tensors hold no NaN to read presence from: the routes are given
        def route(self, inputs):
            return np.array([-1, 1, -1, 1, -1])

    main = build(make_preset, {"structure": "joint"}).to(META)
    without_x1 = build(make_preset, {"structure": "joint"}, sizes=(20,)).to(META)
    xs, y = data(n=5)
    with MetaHost():
        summary = posterior_predictive(Fixed(main, {1: without_x1}), xs, num_samples=6, probs=[0.05], observed=y,
                                       keep_samples=2, keep_draws=3, keep_features=[0, 3],
                                       generator=seeded_generator(META, 0))
    assert summary.mean.shape == (5, 20) and summary.draws.component_mean.shape == (3, 5, 2)
