"""The update of one SVI step (everything after backward) on the default preset's parameters.

Arms, each timed on the same parameters with fresh random gradients of a realistic size:

- ``before``: as training ran it before train/optimizer.py: a multiply of every gradient (to
  propagate a non-finite loss), ``clip_grad_norm_``, then AdamW (fused on CUDA, torch's per-tensor
  loop elsewhere);
- ``fused, clipped apart``: ``clip_grad_norm_`` then fused AdamW (the fused kernel alone);
- ``inva``: what training runs now: the norm, then fused AdamW dividing the gradients by the clip
  factor as it reads them and skipping the update on a non-finite value (``clip_and_guard``).

    python benchmarks/update.py [--features 8192,65536] [--device cpu|cuda] [--steps 10]

Prints a table (median ms per update) and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from inva_pyro.config import TrainingConfig
from inva_pyro.train.optimizer import clip_and_guard, make_optimizer, param_groups

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's shared module
import bench_common as common  # noqa: E402


def arms(params: list[torch.nn.Parameter], module, cfg: TrainingConfig, device: torch.device) -> dict:
    loss = torch.ones((), device=device)
    fused = make_optimizer(module, cfg, device)
    apart = make_optimizer(module, cfg, device)
    old = torch.optim.AdamW(param_groups(module, cfg.weight_decay), lr=cfg.learning_rate,
                            fused=True if device.type == "cuda" else None)
    foreach = True if device.type == "cuda" else None

    def before():
        grads = [p.grad for p in params]
        torch._foreach_mul_(grads, torch.where(~torch.isfinite(loss), float("nan"), 1.0))
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=foreach)
        old.step()

    def fused_apart():
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=foreach)
        apart.step()

    def inva():
        clip_and_guard(fused, params, loss, cfg.grad_clip)
        fused.step()

    return {"before": before, "fused, clipped apart": fused_apart, "inva": inva}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", default="8192,65536", help="features per image (3 inputs and the outcome)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed updates per arm (after 2 untimed)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cfg = TrainingConfig()
    rows = {}
    for features in [int(f) for f in args.features.split(",")]:
        torch.manual_seed(0)
        module = common.default_module(features, device)[0]
        params = [p for p in module.parameters() if p.requires_grad]
        for p in params:  # gradients of a typical size, the clip active (norm well above 10)
            p.grad = torch.randn_like(p)
        row = {"parameters_M": round(sum(p.numel() for p in params) / 1e6, 1)}
        for name, update in arms(params, module, cfg, device).items():
            times = []
            for i in range(args.steps + 2):
                common.sync(device)
                start = time.perf_counter()
                update()
                common.sync(device)
                if i >= 2:
                    times.append(1e3 * (time.perf_counter() - start))
            row[name] = round(statistics.median(times), 2)
        rows[str(features)] = row
        print(f"{features:>8} features, {row['parameters_M']:>6} M parameters: "
              + ", ".join(f"{k} {v} ms" for k, v in row.items() if k != "parameters_M"), file=sys.stderr, flush=True)
    print(json.dumps({"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                      "threads": torch.get_num_threads(), "torch": torch.__version__, "ms_per_update": rows}))


if __name__ == "__main__":
    main()
