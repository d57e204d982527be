"""What several benchmarks share: the peak-memory probe, the default module at a given size, timing
with device synchronisation, and the SVI steps they time (as training runs them, as Pyro's
``Trace_ELBO`` runs them, written by hand in PyTorch, replayed as a CUDA graph).

Every benchmark runs as a file (``python benchmarks/NAME.py ...`` from the repository root), so one
that uses this module puts its own folder on ``sys.path`` with this one line, the same in every
script, and imports the module under one name::

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's shared module
    import bench_common as common  # noqa: E402

Dependencies go one way: benchmarks import this module, it imports no benchmark, and no benchmark
imports another.
"""
from __future__ import annotations

import resource
import time
from pathlib import Path

import torch


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB).

    VmHWM from /proc belongs to the process's own address space; ``ru_maxrss`` would not do for
    a probe started by a benchmark: Linux carries it over from the parent through fork and exec,
    so a child of a big parent starts with the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA; a no-op elsewhere), so that wall time measures it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def default_module(features: int, device="cpu", inputs: int = 3):
    """(module, input names): the default networks (``ModelConfig()``) for ``inputs`` inputs x1, x2, ...
    and an outcome of ``features`` features each, on ``device``."""
    from inva_pyro.config import ModelConfig
    from inva_pyro.model.module import InVAModule

    names = [f"x{k + 1}" for k in range(inputs)]
    return InVAModule(names, [features] * inputs, features, ModelConfig()).to(device), names


def timed_ms(step, device, steps: int, warmup: int, deadline: float) -> float:
    """Milliseconds per call of ``step``: ``warmup`` untimed calls, then ``steps`` calls between two device
    synchronisations (fewer if ``deadline``, a ``time.perf_counter`` value, passes first)."""
    for _ in range(warmup):
        step()
    sync(device)
    start, done = time.perf_counter(), 0
    while done < steps:
        step()
        done += 1
        if done % 5 == 0 and time.perf_counter() > deadline:
            break
    sync(device)
    return 1e3 * (time.perf_counter() - start) / done


def torch_elbo_loss(module, xs, y, n_subjects, kl_scale=1.0):
    """The negative ELBO of module.model/module.guide, written with torch.distributions only."""
    from torch.distributions import Normal

    batch = y.shape[0]
    scale = n_subjects / batch
    w_q, b_q = module.output_weight_q, module.output_bias_q
    weight = w_q.loc + w_q.scale * torch.randn_like(w_q.loc)
    bias = b_q.loc + b_q.scale * torch.randn_like(b_q.loc)
    zero = weight.new_zeros(())  # priors on the device of the weights
    tau = zero + module.cfg.output_prior_scale
    elbo = (Normal(zero, tau).log_prob(weight).sum() + Normal(zero, tau).log_prob(bias).sum()
            - Normal(w_q.loc, w_q.scale).log_prob(weight).sum() - Normal(b_q.loc, b_q.scale).log_prob(bias).sum())
    encoded = module.encode(xs)
    local_terms = 0.0
    for (h_loc, h_scale), decoder, x in zip(encoded, module.modality_decoders, module.vae_inputs(xs)):
        h = h_loc + h_scale * torch.randn_like(h_loc)
        z_loc, z_scale = module.shared_encoder(h)
        z = z_loc + z_scale * torch.randn_like(z_loc)
        prior_h = Normal(*module.shared_decoder(z))
        kl_part = (Normal(zero, zero + 1.0).log_prob(z).sum() + prior_h.log_prob(h).sum()
                   - Normal(h_loc, h_scale).log_prob(h).sum() - Normal(z_loc, z_scale).log_prob(z).sum())
        local_terms = local_terms + kl_scale * kl_part + Normal(*decoder(h)).log_prob(x).sum()
    hidden = module.predictor.hidden(module.latent_statistics(encoded))
    local_mean, sd = module.predictor.deterministic_parts(hidden, module.local_inputs(xs))
    mean = hidden @ weight.T + bias + local_mean
    local_terms = local_terms + Normal(mean, sd).log_prob(y).sum()
    return -(elbo + scale * local_terms)


def step_arms(module, xs, y, idx, n_subjects, device) -> dict:
    """Closures, each one SVI step of ``module`` on the batch (xs, y): "eager inva step" (as training runs
    it: ``DeviceTrace_ELBO``, fused AdamW with clipping and the non-finite guard), "Pyro Trace_ELBO step
    (before)" (Pyro's ELBO, a host synchronisation per site, checks per step) and "hand-written PyTorch"
    (the update of the inva step, the loss of ``torch_elbo_loss``)."""
    import pyro
    from pyro.infer import Trace_ELBO

    from inva_pyro.config import TrainingConfig
    from inva_pyro.train.elbo import DeviceTrace_ELBO
    from inva_pyro.train.optimizer import clip_and_guard, make_optimizer

    params = list(module.parameters())
    cfg = TrainingConfig()
    new_opt, old_opt = make_optimizer(module, cfg, device), torch.optim.AdamW(params, lr=cfg.learning_rate)
    device_elbo, pyro_elbo = DeviceTrace_ELBO(), Trace_ELBO()
    kwargs = dict(subjects=idx, n_subjects=n_subjects)

    def inva_step():  # as train/loop.py runs it
        new_opt.zero_grad(set_to_none=True)
        loss = device_elbo.differentiable_loss(module.model, module.guide, xs, y, encoded=module.encode_inputs(xs), **kwargs)
        loss.backward()
        clip_and_guard(new_opt, params, loss, cfg.grad_clip)
        new_opt.step()
        return loss

    def pyro_step():  # Pyro's Trace_ELBO (a host sync per site), loss.item(), checks per step
        old_opt.zero_grad(set_to_none=True)
        loss = pyro_elbo.differentiable_loss(module.model, module.guide, xs, y, encoded=module.encode_inputs(xs), **kwargs)
        if torch.isfinite(loss):
            loss.backward()
            loss.item()
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        bool(torch.isfinite(norm))
        old_opt.step()

    def torch_step():  # the same update as inva_step, the loss written by hand
        new_opt.zero_grad(set_to_none=True)
        loss = torch_elbo_loss(module, xs, y, n_subjects)
        loss.backward()
        clip_and_guard(new_opt, params, loss, cfg.grad_clip)
        new_opt.step()

    arms = {"eager inva step": inva_step, "Pyro Trace_ELBO step (before)": pyro_step,
            "hand-written PyTorch": torch_step}
    with pyro.validation_enabled(False):
        inva_step()
    return arms


def graph_step(module, xs, y, n_subjects, cfg):
    """The inva step as training runs it on CUDA with ``cuda_graphs`` (train/graphs.py): recorded once
    after an eager warm-up, then replayed. Returns a closure, or one that raises the recording's error."""
    import pyro

    from inva_pyro.train.elbo import DeviceTrace_ELBO
    from inva_pyro.train.graphs import StepGraphs
    from inva_pyro.train.loop import Batchable, svi_step
    from inva_pyro.train.optimizer import make_optimizer

    params = list(module.parameters())
    data = Batchable(xs, y)  # the minibatch is the cohort: the graph gathers all of it each step
    idx = torch.arange(len(y), device=y.device)
    opt = make_optimizer(module, cfg, y.device, capturable=True)
    elbo = DeviceTrace_ELBO()
    graphs = StepGraphs(lambda i, kl: svi_step(elbo, module, opt, params, data, i, i, n_subjects, kl, cfg), y.device)
    with pyro.validation_enabled(False):
        graphs(idx, 1.0)  # eager warm-up on the side stream
        graphs(idx, 1.0)  # recording, then the first replay
    if not graphs.enabled:
        def failed():
            raise RuntimeError("recording failed (see the warning above)")
        return failed
    return lambda: graphs(idx, 1.0)
