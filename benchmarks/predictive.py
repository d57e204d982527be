"""Posterior predictive throughput and peak memory: the package's streamed path against plain
``pyro.infer.Predictive``.

Each arm runs in its own subprocess so that its peak resident memory (ru_maxrss) is its own.
The model is an untrained InVA module (weights do not change the cost) with K inputs of V
features; both arms predict the same n subjects.
- streamed: ``inva_pyro.predict.predictive.posterior_predictive`` (mean, sd, central-interval quantiles
  and CRPS accumulated chunk by chunk);
- Predictive: ``pyro.infer.Predictive(model, guide=guide, num_samples=S, return_sites=["outcome"])``,
  which keeps all S x n x V draws, then mean, sd and quantiles computed from them.
Prints a table and a final JSON line.

    python benchmarks/predictive.py [--subjects 100] [--features 20000] [--samples 1000] [--predictive-samples 100]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's shared module
import bench_common as common  # noqa: E402


def build(args):
    torch.manual_seed(0)
    module, names = common.default_module(args.features, "cpu", args.inputs)
    module.eval()
    xs = [torch.randn(args.subjects, args.features) for _ in names]
    y = torch.randn(args.subjects, args.features)
    return module, xs, y


def run_arm(args) -> dict:
    torch.set_num_threads(args.threads)
    module, xs, y = build(args)
    probs = [0.025, 0.05, 0.1, 0.25, 0.75, 0.9, 0.95, 0.975]
    start = time.perf_counter()
    if args.arm == "streamed":
        from inva_pyro.predict.predictive import posterior_predictive
        posterior_predictive(module, xs, num_samples=args.samples, probs=probs, observed=y,
                             generator=torch.Generator().manual_seed(0))
        samples = args.samples
    else:
        from pyro.infer import Predictive
        samples = args.predictive_samples
        with torch.no_grad():
            predictive = Predictive(module.model, guide=module.guide, num_samples=samples, return_sites=["outcome"])
            draws = predictive(xs, subjects=torch.arange(args.subjects), n_subjects=args.subjects)["outcome"]
            draws.mean(0), draws.std(0), torch.quantile(draws[:, :4], torch.tensor(probs), dim=0)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"arm": args.arm, "samples": samples, "seconds": seconds, "samples_per_s": samples / seconds,
            "peak_mb": peak_mb}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=100)
    parser.add_argument("--features", type=int, default=20000)
    parser.add_argument("--inputs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=1000, help="draws for the streamed path")
    parser.add_argument("--predictive-samples", type=int, default=100,
                        help="draws for plain Predictive (it holds all of them: S x n x V floats)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arm", choices=["streamed", "predictive"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.arm:
        print(json.dumps(run_arm(args)))
        return
    results = {}
    for arm in ("streamed", "predictive"):
        cmd = [sys.executable, __file__, "--arm", arm] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                                          if k != "arm" and v is not None]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[arm] = json.loads(out)
    print(f"{'path':<12}{'draws':>7}{'seconds':>10}{'draws/s':>10}{'peak MB':>10}")
    for arm, r in results.items():
        print(f"{arm:<12}{r['samples']:>7}{r['seconds']:>10.2f}{r['samples_per_s']:>10.1f}{r['peak_mb']:>10.0f}")
    speedup = results["streamed"]["samples_per_s"] / results["predictive"]["samples_per_s"]
    print(json.dumps({"speedup": round(speedup, 2), "streamed_peak_mb": round(results["streamed"]["peak_mb"]),
                      "predictive_peak_mb": round(results["predictive"]["peak_mb"]),
                      "streamed_seconds": round(results["streamed"]["seconds"], 2),
                      "subjects": args.subjects, "features": args.features, "samples": args.samples,
                      "predictive_samples": args.predictive_samples}))


if __name__ == "__main__":
    main()
