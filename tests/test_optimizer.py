"""The update of a step (train/optimizer.py): clipping and the non-finite guard inside fused AdamW.

Checked against what they replace, torch.nn.utils.clip_grad_norm_ followed by torch's AdamW (the
per-tensor loop): one step from the same weights and gradients lands on the same weights up to
float32 rounding (a few ulp of the update, lr x 1e-5 here), with the norm above the clip (clipped)
and below it (untouched). A non-finite loss or gradient leaves weights, both moments and the step
count exactly as they were.
"""
from __future__ import annotations

import math

import pytest
import torch

from inva_pyro.config import TrainingConfig
from inva_pyro.train.optimizer import clip_and_guard, is_fused, make_optimizer, param_groups

LR = 1e-2


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(30, 20)
        self.b = torch.nn.Linear(20, 5)


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    first = TwoLayers()
    second = TwoLayers()
    second.load_state_dict(first.state_dict())
    return first, second


def _set_grads(module, scale: float, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.grad = scale * torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("grad_size", [100.0, 0.01])  # total norm far above / below the clip of 10
def test_the_folded_update_equals_clip_then_adamw(grad_size):
    cfg = TrainingConfig(learning_rate=LR, grad_clip=10.0, weight_decay=1e-2)
    folded, reference = _pair()
    start = {k: v.clone() for k, v in folded.state_dict().items()}
    opt = make_optimizer(folded, cfg, torch.device("cpu"))
    assert is_fused(opt)
    ref_opt = torch.optim.AdamW(param_groups(reference, cfg.weight_decay), lr=LR)  # the per-tensor loop
    assert not is_fused(ref_opt)
    for step in range(3):  # the moments matter from the second step on
        _set_grads(folded, grad_size, seed=step)
        _set_grads(reference, grad_size, seed=step)
        expected_norm = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), cfg.grad_clip)
        norm = clip_and_guard(opt, list(folded.parameters()), torch.tensor(1.0), cfg.grad_clip)
        assert torch.allclose(norm, expected_norm, rtol=1e-6)
        opt.step()
        ref_opt.step()
    for (name, p), q in zip(folded.named_parameters(), reference.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=3 * LR * 1e-5), name
        assert (p - start[name]).abs().max() > 100 * LR * 1e-5, name  # it moved, by far more than the tolerance


@pytest.mark.parametrize("spoil", ["loss", "gradient"])
def test_a_non_finite_value_skips_the_whole_update(spoil):
    cfg = TrainingConfig(learning_rate=LR)
    module, _ = _pair()
    params = list(module.parameters())
    opt = make_optimizer(module, cfg, torch.device("cpu"))
    _set_grads(module, 1.0)
    clip_and_guard(opt, params, torch.tensor(2.0), cfg.grad_clip)
    opt.step()  # a good step builds the moments
    before = {k: v.clone() for k, v in module.state_dict().items()}
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    _set_grads(module, 1.0, seed=5)
    loss = torch.tensor(2.0)
    if spoil == "loss":
        loss = torch.tensor(float("nan"))
    else:
        params[0].grad[0, 0] = float("inf")
    norm = clip_and_guard(opt, params, loss, cfg.grad_clip)
    assert math.isfinite(norm.item()) == (spoil == "loss")
    opt.step()
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p in params:
        for k, v in opt.state[p].items():
            assert torch.equal(v, state[id(p)][k]), k
    assert all(float(opt.state[p]["step"]) == 1.0 for p in params)
    # and the next good step goes on from there
    _set_grads(module, 1.0, seed=6)
    clip_and_guard(opt, params, torch.tensor(2.0), cfg.grad_clip)
    opt.step()
    assert all(float(opt.state[p]["step"]) == 2.0 for p in params)
    assert not torch.equal(module.a.weight, before["a.weight"])


def test_without_a_fused_kernel_the_gradients_are_clipped_or_poisoned():
    """The path of the meta device and of resumed non-fused optimisers: one multiply of the gradients."""
    module, _ = _pair()
    params = list(module.parameters())
    opt = torch.optim.AdamW(params, lr=LR)
    assert not is_fused(opt)
    _set_grads(module, 100.0)
    norm = clip_and_guard(opt, params, torch.tensor(0.0), max_norm=10.0)
    assert norm > 10.0
    assert torch.nn.utils.get_total_norm([p.grad for p in params]).item() == pytest.approx(10.0, rel=1e-5)
    _set_grads(module, 0.01)
    small = [p.grad.clone() for p in params]
    clip_and_guard(opt, params, torch.tensor(0.0), max_norm=10.0)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, small))
    clip_and_guard(opt, params, torch.tensor(float("inf")), max_norm=10.0)
    assert all(torch.isnan(p.grad).all() for p in params)
    assert not hasattr(opt, "grad_scale")
