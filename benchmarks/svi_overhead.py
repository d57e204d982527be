"""Pyro's overhead: one SVI step of the InVA program (with ``DeviceTrace_ELBO``, as training runs it)
against the same ELBO written by hand in PyTorch (``bench_common.torch_elbo_loss``).

Both steps use the same networks, the same minibatch and the same single-sample ELBO estimator
(reparameterised draws of the output layer and of every latent, log-densities summed, subjects
scaled by N/B, latents by the KL weight), followed by backward, gradient clipping and an AdamW
step. The hand-written step computes the encoders once, as a careful PyTorch programmer would.
Both run without distribution validation, as training runs every step after a fit's first.
Prints a table and a final JSON line {"ratio": median pyro step / median torch step, ...}.

``--trials`` adds speed-ups worth trying, each an extra arm timed against the same
hand-written step (``trials`` in the JSON: median ms and ratio of each):
- ``jit``: Pyro's ``JitTrace_ELBO`` (torch.jit.trace of the whole ELBO). It needs every tensor
  as a positional argument and the networks in Pyro's param store (``pyro.module``), and it
  traces one graph per minibatch shape; model and guide each run the encoders (no shared pass).
- ``compile``: the same Pyro step with every network compiled by ``torch.compile`` (the
  networks are plain torch; Pyro's effect handlers stay outside the compiled graphs).
- ``autocast``: the same Pyro step with the networks run under ``torch.autocast`` in bfloat16
  (the preset setting ``training.mixed_precision``); densities are still evaluated in float32.

    python benchmarks/svi_overhead.py [--steps 50] [--features 1024] [--batch 32] [--trials jit,compile,autocast]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import JitTrace_ELBO

from inva_pyro.train.elbo import DeviceTrace_ELBO
from inva_pyro.train.loop import autocast

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's shared module
import bench_common as common  # noqa: E402


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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--trials", default="", help="comma-separated extra arms: jit, compile, autocast")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    module, names = common.default_module(args.features, device, args.inputs)
    xs = [torch.randn(args.batch, args.features, device=device) for _ in names]
    y = torch.randn(args.batch, args.features, device=device)
    idx = torch.arange(args.batch, device=device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    elbo = DeviceTrace_ELBO()  # as training runs it: Trace_ELBO's value and gradient, no per-site .item()

    def update(loss):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 10.0)
        optimizer.step()

    def pyro_step():  # as in training.train: one encoder pass shared by model and guide
        update(elbo.differentiable_loss(module.model, module.guide, xs, y, subjects=idx, n_subjects=args.subjects,
                                        encoded=module.encode_inputs(xs)))

    def torch_step():
        update(common.torch_elbo_loss(module, xs, y, args.subjects))

    arms = {"Pyro SVI (DeviceTrace_ELBO)": pyro_step, "hand-written PyTorch": torch_step}
    trials = [t for t in args.trials.split(",") if t]
    unknown = set(trials) - {"jit", "compile", "autocast"}
    if unknown:
        parser.error(f"unknown trial(s): {', '.join(sorted(unknown))}")
    if {"jit", "compile"} <= set(trials):
        parser.error("trials jit and compile need separate runs: torch.jit.trace cannot trace torch.compile'd networks")
    if "jit" in trials:
        arms["JitTrace_ELBO"] = jit_step(module, xs, y, idx, args.subjects, update)
    if "autocast" in trials:
        arms["autocast"] = autocast_step(pyro_step, device)
    if "compile" in trials:  # last: it changes the networks of every arm after it
        arms["torch.compile"] = compile_step(module, pyro_step)

    # Interleave the arms in rounds so that machine load drifts affect all alike. The compiled
    # networks would also serve the eager arms, so those are timed first, then the compiled one.
    # Steps are timed as training.train runs them: Pyro's validation (which also switches torch's
    # distribution checks, used by the hand-written step) on the first step of a fit only.
    eager = {k: v for k, v in arms.items() if k != "torch.compile"}
    times = {name: [] for name in arms}
    pyro_step()  # the validated first step
    with pyro.validation_enabled(False):
        for _ in range(5):
            for name, step in eager.items():
                times[name] += time_steps(step, args.steps // 5, args.warmup // 5)
        if "torch.compile" in arms:
            times["torch.compile"] = time_steps(arms["torch.compile"], args.steps, args.warmup)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    torch_ms, pyro_ms = ms["hand-written PyTorch"], ms["Pyro SVI (DeviceTrace_ELBO)"]
    print(f"{'step':<24}{'median ms':>10}{'/ PyTorch':>10}")
    for name, value in ms.items():
        print(f"{name:<24}{value:>10.2f}{value / torch_ms:>10.2f}")
    trial_rows = {name: {"ms": round(value, 3), "ratio": round(value / torch_ms, 4)}
                  for name, value in list(ms.items())[2:]}  # the arms after the two baselines
    print(json.dumps({"ratio": round(pyro_ms / torch_ms, 4), "pyro_ms": round(pyro_ms, 3),
                      "torch_ms": round(torch_ms, 3), "features": args.features, "inputs": args.inputs,
                      "batch": args.batch, "steps": len(times["Pyro SVI (DeviceTrace_ELBO)"]), "threads": args.threads,
                      "device": str(device), "trials": trial_rows}))


def jit_step(module, xs, y, idx, n_subjects, update):
    """A step with JitTrace_ELBO: tensors positional, networks registered in the param store."""
    pyro.clear_param_store()

    def model(idx, y, *xs):
        pyro.module("inva", module)
        module.model(list(xs), y, subjects=idx, n_subjects=n_subjects)

    def guide(idx, y, *xs):
        pyro.module("inva", module)
        module.guide(list(xs), y, subjects=idx, n_subjects=n_subjects)

    elbo = JitTrace_ELBO(ignore_jit_warnings=True)
    return lambda: update(elbo.differentiable_loss(model, guide, idx, y, *xs))


def autocast_step(pyro_step, device):
    def step():
        with autocast(device, True):  # as training.mixed_precision = true
            pyro_step()
    return step


def compile_step(module, pyro_step):
    predictor = module.predictor
    for net in [*module.shallow_encoders, *module.modality_decoders, module.shared_encoder, module.shared_decoder,
                predictor.trunk, predictor.scale_head, predictor.voxel_net]:
        net.compile()  # each network once, in place: the Pyro program calls them as before
    return pyro_step


if __name__ == "__main__":
    main()
