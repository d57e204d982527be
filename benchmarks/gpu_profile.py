"""Where a training step's GPU time goes, and where a demo fit's wall time goes (CUDA only).

- ``fit``: the demo-size fit (as ``benchmarks/gpu.py``'s demo_fit) under cProfile: seconds per
  epoch (first and median) and the functions with the most cumulative time.
- ``kernels``: the eager step at ``--features`` under torch.profiler: the kernels with the most
  device time per step (the step is bound by them once CUDA graphs remove the launch cost).
- ``variants``: the step as the loop replays it (train/graphs.py) against the same with TF32
  matrix products, and with the predictor's voxel network compiled by ``torch.compile``.

    python benchmarks/gpu_profile.py [--features 65536,230000] [--parts fit,kernels,variants]

Prints text sections and one JSON line.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's shared module
import bench_common as common  # noqa: E402


def profile_fit() -> dict:
    from inva_pyro import Cohort, InVA
    from inva_pyro.data.simulate import write_cohort

    with tempfile.TemporaryDirectory() as tmp:
        write_cohort(Path(tmp) / "cohort", "paper", 500, 0)
        cohort = Cohort.from_dir(Path(tmp) / "cohort", seed=0)
        torch.zeros(1, device="cuda")  # the CUDA context, outside the timings
        stamps = [time.perf_counter()]
        model = InVA.from_preset("inva")
        profiler = cProfile.Profile()
        profiler.enable()
        model.fit(cohort.train, cohort.val, seed=0, device="cuda", progress=False,
                  on_epoch_end=lambda state: stamps.append(time.perf_counter()))
        profiler.disable()
    epochs = [b - a for a, b in zip(stamps, stamps[1:])]
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(35)
    print(text.getvalue()[-9000:])
    return {"epochs": len(epochs), "first_epoch_s": round(epochs[0], 3),
            "median_epoch_s": round(statistics.median(epochs), 4), "after_training_note": "cProfile slows Python"}


def profile_kernels(features: int) -> dict:
    import pyro
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cuda")
    torch.manual_seed(0)
    module, names = common.default_module(features, device)
    xs = [torch.randn(32, features, device=device) for _ in names]
    y = torch.randn(32, features, device=device)
    step = common.step_arms(module, xs, y, torch.arange(32, device=device), 1000, device)["eager inva step"]
    with pyro.validation_enabled(False):
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
    rows = []
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events) / 3 / 1e3
    for e in events[:18]:
        rows.append({"kernel": e.key[:90], "calls_per_step": e.count // 3,
                     "ms_per_step": round(e.device_time_total / 3 / 1e3, 3)})
    print(f"--- kernels at {features} features: {total:.2f} ms of device time per step")
    for r in rows:
        print(f"{r['ms_per_step']:>8.3f} ms  x{r['calls_per_step']:<4} {r['kernel']}")
    return {"device_ms_per_step": round(total, 3), "top": rows}


def variants(features: int) -> dict:
    import pyro

    from inva_pyro.config import TrainingConfig

    device, out = torch.device("cuda"), {}
    for name in ("graph", "graph + tf32", "graph + compiled voxel net"):
        try:
            torch.backends.cuda.matmul.allow_tf32 = name == "graph + tf32"
            torch.manual_seed(0)
            module, names = common.default_module(features, device)
            if name == "graph + compiled voxel net":
                module.predictor.voxel_net.compile()
            xs = [torch.randn(32, features, device=device) for _ in names]
            y = torch.randn(32, features, device=device)
            start = time.perf_counter()
            replay = common.graph_step(module, xs, y, 1000, TrainingConfig())
            setup = time.perf_counter() - start
            with pyro.validation_enabled(False):
                ms = common.timed_ms(replay, device, 30, 3, time.perf_counter() + 60)
            out[name] = {"ms": round(ms, 3), "setup_s": round(setup, 1)}
        except Exception as exc:
            out[name] = f"error: {type(exc).__name__}: {exc}".splitlines()[0][:300]
        print(f"--- {features} features, {name}: {out[name]}", flush=True)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", default="65536,230000")
    parser.add_argument("--parts", default="fit,kernels,variants")
    args = parser.parse_args(argv)
    sizes, parts, result = [int(f) for f in args.features.split(",")], args.parts.split(","), {}
    for part in parts:
        try:
            if part == "fit":
                result["fit"] = profile_fit()
            elif part == "kernels":
                result["kernels"] = {str(f): profile_kernels(f) for f in sizes}
            elif part == "variants":
                result["variants"] = {str(f): variants(f) for f in sizes}
        except Exception as exc:
            result[part] = f"error: {type(exc).__name__}: {exc}".splitlines()[0][:300]
        print(f"[{part}] done", file=sys.stderr, flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
