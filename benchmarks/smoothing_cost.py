"""What the predictor's spatial prior (model/smoothing.py) costs per training step.

For a full box of voxels of each ``--grids`` shape (the outcome and every input on it), one SVI step of
the ``inva`` preset's module (DeviceTrace_ELBO, backward, clipping, AdamW) with ``spatial_smoothing`` 0
and 1000, median over ``--steps`` steps after one warm-up; and the prior term alone (forward and
backward over the predictor's per-voxel maps, at the preset's sizes).

    python benchmarks/smoothing_cost.py [--grids 32x32x1,64x32x32] [--steps 3] [--threads 1] [--device cpu]

Prints a table, then one JSON line with every figure.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import pyro
import torch

from inva_pyro.config import load_preset
from inva_pyro.data.spaces import VolumeSpace
from inva_pyro.model.module import InVAModule
from inva_pyro.model.smoothing import smoothness_log_prior
from inva_pyro.train.elbo import DeviceTrace_ELBO
from inva_pyro.train.loop import Batchable, svi_step
from inva_pyro.train.optimizer import make_optimizer


def timed(fn, steps: int, device: torch.device) -> float:
    """Median seconds of ``fn`` over ``steps`` calls after one warm-up."""
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def measure(shape: tuple[int, int, int], steps: int, device: torch.device) -> dict:
    space = VolumeSpace(shape=shape, affine=np.eye(4), header=None, mask=np.ones(shape, bool))
    n, pairs, preset = space.n_features, space.neighbour_pairs(), load_preset("inva")
    g = torch.Generator().manual_seed(0)
    data = Batchable([torch.randn(64, n, generator=g).to(device) for _ in range(3)],
                     torch.randn(64, n, generator=g).to(device))
    row = {"features": n, "edges": int(len(pairs))}
    for strength in (0.0, 1000.0):
        cfg = preset.model.model_copy(update={"spatial_smoothing": strength})
        module = InVAModule(["x1", "x2", "x3"], [n] * 3, n, cfg, neighbour_pairs=pairs).to(device)
        params = list(module.parameters())
        optimizer = make_optimizer(module, preset.training, device)
        elbo, idx, kl = DeviceTrace_ELBO(), torch.arange(32, device=device), torch.ones((), device=device)

        def step():  # backward, clipping and the AdamW update, as training runs them
            svi_step(elbo, module, optimizer, params, data, idx, idx, len(data), kl, preset.training)
        with pyro.validation_enabled(False):
            row[f"step_ms_lambda_{strength:g}"] = 1000 * timed(step, steps, device)
    maps = [p.detach().clone().requires_grad_() for p in
            (module.output_weight_q.loc, module.output_bias_q.loc, *module.predictor.voxel_maps())]
    row["prior_term_ms"] = 1000 * timed(lambda: smoothness_log_prior(
        maps, module.neighbour_table, module.neighbour_degree, 1000.0, 1.0).backward(), max(steps, 10), device)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grids", default="32x32x1,64x32x32")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [measure(tuple(int(s) for s in grid.split("x")), args.steps, device) for grid in args.grids.split(",")]
    print(f"device {device}, {args.threads} thread(s); median of {args.steps} steps after a warm-up")
    print("| features | edges | step, lambda 0 (ms) | step, lambda 1000 (ms) | prior term (ms) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['features']} | {r['edges']} | {r['step_ms_lambda_0']:.1f} | {r['step_ms_lambda_1000']:.1f} | "
              f"{r['prior_term_ms']:.2f} |")
    print(json.dumps({"device": str(device), "threads": args.threads, "rows": rows}))


if __name__ == "__main__":
    main()
