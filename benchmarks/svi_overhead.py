"""Pyro's overhead: one SVI step of the InVA program against the same ELBO written by hand in PyTorch.

Both steps use the same networks, the same minibatch and the same single-sample ELBO estimator
(reparameterised draws of the output layer and of every latent, log-densities summed, subjects
scaled by N/B, latents by the KL weight), followed by backward, gradient clipping and an AdamW
step. The hand-written step computes the encoders once, as a careful PyTorch programmer would.
Prints a table and a final JSON line {"ratio": median pyro step / median torch step, ...}.

    python benchmarks/svi_overhead.py [--steps 50] [--features 1024] [--batch 32]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from pyro.infer import Trace_ELBO
from torch.distributions import Normal

from inva_pyro.config import ModelConfig
from inva_pyro.module import InVAModule


def torch_elbo_loss(module, xs, y, n_subjects, kl_scale=1.0):
    """The negative ELBO of module.model/module.guide, written with torch.distributions only."""
    batch = y.shape[0]
    scale = n_subjects / batch
    w_q, b_q = module.output_weight_q, module.output_bias_q
    weight = w_q.loc + w_q.scale * torch.randn_like(w_q.loc)
    bias = b_q.loc + b_q.scale * torch.randn_like(b_q.loc)
    tau = module.cfg.output_prior_scale
    elbo = (Normal(0.0, tau).log_prob(weight).sum() + Normal(0.0, tau).log_prob(bias).sum()
            - Normal(w_q.loc, w_q.scale).log_prob(weight).sum() - Normal(b_q.loc, b_q.scale).log_prob(bias).sum())
    encoded = module.encode(xs)
    local_terms = 0.0
    for (h_loc, h_scale), decoder, x in zip(encoded, module.modality_decoders, module.vae_inputs(xs)):
        h = h_loc + h_scale * torch.randn_like(h_loc)
        z_loc, z_scale = module.shared_encoder(h)
        z = z_loc + z_scale * torch.randn_like(z_loc)
        prior_h = Normal(*module.shared_decoder(z))
        kl_part = (Normal(0.0, 1.0).log_prob(z).sum() + prior_h.log_prob(h).sum()
                   - Normal(h_loc, h_scale).log_prob(h).sum() - Normal(z_loc, z_scale).log_prob(z).sum())
        local_terms = local_terms + kl_scale * kl_part + Normal(*decoder(h)).log_prob(x).sum()
    hidden = module.predictor.hidden(module.latent_statistics(encoded))
    local_mean, sd = module.predictor.deterministic_parts(hidden, module.local_inputs(xs))
    mean = hidden @ weight.T + bias + local_mean
    local_terms = local_terms + Normal(mean, sd).log_prob(y).sum()
    return -(elbo + scale * local_terms)


def time_steps(step, steps, warmup):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--features", type=int, default=1024, help="features per input and outcome")
    parser.add_argument("--inputs", type=int, default=3)
    parser.add_argument("--subjects", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names = [f"x{k + 1}" for k in range(args.inputs)]
    module = InVAModule(names, [args.features] * args.inputs, args.features, ModelConfig())
    xs = [torch.randn(args.batch, args.features) for _ in names]
    y = torch.randn(args.batch, args.features)
    idx = torch.arange(args.batch)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    elbo = Trace_ELBO()

    def update(loss):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 10.0)
        optimizer.step()

    def pyro_step():  # as in training.train: one encoder pass shared by model and guide
        update(elbo.differentiable_loss(module.model, module.guide, xs, y, subjects=idx, n_subjects=args.subjects,
                                        encoded=module.encode(xs)))

    def torch_step():
        update(torch_elbo_loss(module, xs, y, args.subjects))

    # Interleave the two arms in rounds so that machine load drifts affect both alike.
    pyro_times, torch_times = [], []
    for _ in range(5):
        pyro_times += time_steps(pyro_step, args.steps // 5, args.warmup // 5)
        torch_times += time_steps(torch_step, args.steps // 5, args.warmup // 5)
    pyro_ms, torch_ms = 1e3 * statistics.median(pyro_times), 1e3 * statistics.median(torch_times)
    print(f"{'step':<22}{'median ms':>10}")
    print(f"{'Pyro SVI (Trace_ELBO)':<22}{pyro_ms:>10.2f}")
    print(f"{'hand-written PyTorch':<22}{torch_ms:>10.2f}")
    print(json.dumps({"ratio": round(pyro_ms / torch_ms, 4), "pyro_ms": round(pyro_ms, 3),
                      "torch_ms": round(torch_ms, 3), "features": args.features, "inputs": args.inputs,
                      "batch": args.batch, "steps": len(pyro_times), "threads": args.threads}))


if __name__ == "__main__":
    main()
