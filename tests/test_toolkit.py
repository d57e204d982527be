"""The VAE tutorial's options inside the InVA Pyro program: they train, their terms carry gradient,
and shapes hold on 2-D and 3-D grids."""
import numpy as np
import pandas as pd
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from conftest import TINY_MODEL
from inva_pyro import cli
from inva_pyro.config import ModelConfig, TrainingConfig
from inva_pyro.model.module import InVAModule
from inva_pyro.train.loop import kl_scale_at

GRID_2D, GRID_3D = (10, 12), (8, 9, 7)
SMALL = {**TINY_MODEL, "conv_channels": [4, 8]}


def problem(grid, n=16, seed=0, masked=True):
    """Two smooth-ish inputs and an outcome on ``grid``; a ball-shaped mask for 3-D grids."""
    rng = np.random.default_rng(seed)
    coords = np.stack(np.meshgrid(*[np.linspace(-1, 1, g) for g in grid], indexing="ij"), -1)
    mask = (coords ** 2).sum(-1) < 1.2 if masked and len(grid) == 3 else np.ones(grid, bool)
    idx = np.flatnonzero(mask)
    factor = rng.normal(size=(n, 1))
    base = np.exp(-(coords ** 2).sum(-1)).ravel()[idx]
    xs = [torch.tensor(factor * base + 0.3 * rng.normal(size=(n, idx.size)), dtype=torch.float32) for _ in range(2)]
    y = torch.tensor(np.tanh(factor) * base + 0.3 * rng.normal(size=(n, idx.size)), dtype=torch.float32)
    return xs, y, [(tuple(grid), idx)] * 2


def build(grid, **options):
    xs, y, grids = problem(grid)
    cfg = ModelConfig(**{**SMALL, **options})
    return InVAModule(["a", "b"], [x.shape[1] for x in xs], y.shape[1], cfg, grids), xs, y


def loss_of(module, xs, y, **kw):
    n = y.shape[0]
    return Trace_ELBO().differentiable_loss(module.model, module.guide, xs, y, subjects=torch.arange(n),
                                            n_subjects=n, **kw)


OPTIONS = {
    "laplace": dict(reconstruction="laplace"),
    "dssim": dict(dssim_weight=0.5, dssim_window=5),
    "mmd": dict(mmd_weight=1.0),
    "infovae": dict(mmd_weight=1.0, deep_kl_weight=0.0),
    "conv": dict(network="conv"),
    "conv+dssim": dict(network="conv", dssim_weight=0.5, dssim_window=5),
}


@pytest.mark.parametrize("grid", [GRID_2D, GRID_3D], ids=["2d", "3d"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_trains_and_keeps_shapes(name, grid):
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    module, xs, y = build(grid, **OPTIONS[name])
    n = y.shape[0]
    trace = poutine.trace(module.model).get_trace(xs, y, subjects=torch.arange(n), n_subjects=n)
    assert trace.nodes["outcome"]["fn"].batch_shape == (n,)
    assert trace.nodes["outcome"]["fn"].event_shape == (y.shape[1],)
    for k, x in zip("ab", xs):
        assert trace.nodes[f"input_{k}"]["fn"].event_shape == (x.shape[1],)
        if "dssim" in name:
            assert trace.nodes[f"dssim_{k}"]["fn"].batch_shape == (n,)  # one DSSIM per subject, in the plate
    if "mmd" in OPTIONS[name] or name in ("mmd", "infovae"):
        assert "mmd_a" in trace.nodes and "mmd_b" in trace.nodes

    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = torch.stack([loss_of(module, xs, y) for _ in range(2)]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # a clear fall from the first steps to the last (single-sample ELBO noise is far smaller)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05 * abs(np.mean(losses[:5])), losses[::8]


def _grad_of_site(module, xs, y, site):
    """Gradient of one factor site's log-density alone, replayed from the guide's draws."""
    n = y.shape[0]
    kw = dict(subjects=torch.arange(n), n_subjects=n)
    guide_trace = poutine.trace(module.guide).get_trace(xs, y, **kw)
    trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(xs, y, **kw)
    module.zero_grad()
    trace.nodes[site]["fn"].log_prob(trace.nodes[site]["value"]).sum().backward()
    return module


@pytest.mark.parametrize("grid", [GRID_2D, GRID_3D], ids=["2d", "3d"])
def test_dssim_term_sends_gradient_to_the_decoder(grid):
    torch.manual_seed(1)
    module, xs, y = build(grid, dssim_weight=1.0, dssim_window=5)
    _grad_of_site(module, xs, y, "dssim_a")
    grads = [p.grad for p in module.modality_decoders[0].parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_mmd_term_sends_gradient_to_the_encoders():
    torch.manual_seed(2)
    module, xs, y = build(GRID_2D, mmd_weight=1.0)
    _grad_of_site(module, xs, y, "mmd_a")
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.shared_encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.shallow_encoders[0].parameters())


def test_grid_options_need_a_grid():
    xs, y, _ = problem(GRID_2D)
    with pytest.raises(ValueError, match="grid"):
        InVAModule(["a", "b"], [x.shape[1] for x in xs], y.shape[1], ModelConfig(**SMALL, dssim_weight=1.0))


def test_cyclical_schedule_in_training():
    cfg = TrainingConfig(epochs=40, kl_schedule="cyclical", kl_cycles=4, kl_cycle_ratio=0.5, kl_weight=1.0)
    betas = [kl_scale_at(e, cfg) for e in range(40)]
    assert betas[9] == pytest.approx(1.0) and betas[10] < 0.2 and betas[19] == pytest.approx(1.0)
    assert [kl_scale_at(e, TrainingConfig(kl_anneal_epochs=4)) for e in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_inva_latents_command(tmp_path, capsys):
    cohort = tmp_path / "cohort"
    assert cli.main(["simulate", "--n-subjects", "20", "--seed", "1", "--out", str(cohort)]) == 0
    preset = tmp_path / "tiny.toml"
    preset.write_text('[model]\nshallow_dim = 3\ndeep_dim = 2\nhidden = 16\nshared_hidden = 8\n'
                      'predictor_hidden = 8\nlocal_hidden = 8\n[training]\nepochs = 2\nbatch_size = 8\n'
                      '[prediction]\nnum_samples = 10\n')
    run = tmp_path / "run"
    assert cli.main(["fit", "--manifest", str(cohort / "manifest.csv"), "--inputs", "x1,x2,x3", "--outcome", "y",
                     "--model", str(preset), "--device", "cpu", "--out", str(run)]) == 0
    out = tmp_path / "latents.csv"
    assert cli.main(["latents", "--run", str(run), "--manifest", str(cohort / "manifest.csv"), "--out", str(out),
                     "--traversal", str(tmp_path / "trav")]) == 0
    table = pd.read_csv(out)
    assert len(table) == 20
    for k in ("x1", "x2", "x3"):
        assert {f"{k}_shallow_mean_0", f"{k}_shallow_sd_2", f"{k}_deep_mean_1"} <= set(table.columns)
    assert (tmp_path / "trav" / "x1_traversal.png").stat().st_size > 1000


def test_zero_kl_weight_drops_the_latent_terms():
    # a cyclical schedule starts each cycle at beta = 0: the KL terms vanish rather than fail
    torch.manual_seed(3)
    module, xs, y = build(GRID_2D)
    n = y.shape[0]
    trace = poutine.trace(module.model).get_trace(xs, y, subjects=torch.arange(n), n_subjects=n, kl_scale=0.0)
    trace.compute_log_prob()
    assert trace.nodes["deep_latent_a"]["log_prob_sum"] == 0
    assert trace.nodes["input_a"]["log_prob_sum"] != 0
    assert torch.isfinite(loss_of(module, xs, y, kl_scale=0.0))
