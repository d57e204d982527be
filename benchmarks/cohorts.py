"""Benchmark: real-format cohorts end to end, and the memory of reading from disk.

1. ``volume``: ``inva simulate --design volume`` (MNI152 templates at 4 mm, 50 x 59 x 48 voxels, about
   27,000 in the brain mask), 200 subjects; read the manifest, fit the default preset, predict the
   test subjects and write their NIfTI maps. Likewise ``surface`` (fsaverage5, 20,484 vertices).
   Wall time of every stage, held-out MSE against the oracle, calibrated 90% coverage.
2. ``memory``: peak memory of reading a cohort of N = 100 and N = 1000 small volumes (6 mm, about
   8,000 voxels) eagerly (``Cohort.from_dir``), and of streaming it (``lazy=True``: the
   streaming standardisation plus one epoch of ``DiskBatches`` minibatches), each in a fresh
   process: peak RSS (VmHWM, minus the peak after imports) and the peak of
   traced numpy allocations (``tracemalloc``).

Prints a table, then one JSON line with every figure. Usage (2 CPU threads):

    python benchmarks/cohorts.py --out /tmp/bench_cohorts [--epochs 20] [--quick]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's shared module
import bench_common as common  # noqa: E402


def memory_probe(mode: str, cohort_dir: str, batch_size: int, cache_subjects: int) -> dict:
    """Run in a fresh process: peak memory of reading ``cohort_dir`` eagerly or by streaming."""
    import tracemalloc

    import numpy as np
    import torch

    from inva_pyro.data.cohort import Cohort
    from inva_pyro.data.preprocessing import Standardizer
    from inva_pyro.data.streaming import DiskBatches

    torch.set_num_threads(2)
    spec = json.loads((Path(cohort_dir) / "cohort.json").read_text())
    # What training needs, nothing more: the inputs, the outcome and the mask (no truth maps).
    read = dict(path=Path(cohort_dir) / "manifest.csv", inputs=spec["inputs"], outcome=spec["outcome"],
                mask=Path(cohort_dir) / spec["mask"])
    base = common.peak_rss_mb()
    tracemalloc.start()
    start = time.perf_counter()
    if mode == "eager":
        cohort = Cohort.from_manifest(**read)
        train = cohort.train
        Standardizer.fit(train)
        n = len(cohort.all)
    else:
        cohort = Cohort.from_manifest(**read, lazy=True, cache_subjects=cache_subjects)
        train = cohort.train
        standardizer = Standardizer.fit_streaming(train)
        batches = DiskBatches(train, standardizer, cohort.input_names)
        order = torch.randperm(len(batches))
        for first in range(0, len(batches), batch_size):  # one epoch of minibatches, as SVI draws them
            xs, y = batches.take(order[first:first + batch_size])
        n = len(cohort.all)
    seconds = time.perf_counter() - start
    _, traced_peak = tracemalloc.get_traced_memory()
    return {"mode": mode, "n_subjects": n, "seconds": round(seconds, 2),
            "peak_rss_mb": round(common.peak_rss_mb() - base, 1), "traced_peak_mb": round(traced_peak / 2**20, 1),
            "features": int(np.sum([m.shape[1] for m in cohort.all.inputs.values()]))}


# Whole-brain inputs have 20,000-30,000 features, some 30 times the built-in design's: the
# benchmark keeps the default architecture (local voxel pathway, Bayesian output layer,
# calibration) but narrows the layers whose cost grows with the number of features, takes
# minibatches of 16 (twice the updates per epoch, so fewer epochs) and draws 100 posterior
# predictive samples instead of 500. --full-preset runs `inva` unchanged.
WHOLE_BRAIN = {"model.hidden": 64, "model.predictor_hidden": 16, "model.local_hidden": 16,
               "training.batch_size": 16, "prediction.num_samples": 100}


def run_design(design: str, n_subjects: int, out: Path, epochs: int, seed: int, full_preset: bool) -> dict:
    import numpy as np
    import torch

    from inva_pyro import Cohort, InVA
    from inva_pyro.config import load_preset
    from inva_pyro.data.simulate import write_cohort
    from inva_pyro.tune.search_space import apply

    torch.set_num_threads(2)
    times = {}
    start = time.perf_counter()
    write_cohort(out / design, design, n_subjects, seed)
    times["simulate_s"] = time.perf_counter() - start

    start = time.perf_counter()
    cohort = Cohort.from_dir(out / design, seed=seed)
    times["read_s"] = time.perf_counter() - start

    start = time.perf_counter()
    model = InVA(apply(load_preset("inva"), {**({} if full_preset else WHOLE_BRAIN), "training.epochs": epochs}))
    model.fit(cohort.train, cohort.val, seed=seed, device="cpu", progress=False)
    times["fit_s"] = time.perf_counter() - start

    start = time.perf_counter()
    test = cohort.test
    pred = model.predict(test, seed=seed)
    times["predict_s"] = time.perf_counter() - start
    start = time.perf_counter()
    pred.to_files(out / f"{design}_predictions")
    times["write_s"] = time.perf_counter() - start

    # The figures by hand rather than Prediction.metrics (the same definitions), for every kind of
    # space alike.
    y = test.outcome
    mse = float(np.mean((y - pred.mean) ** 2))
    oracle_mse = float(np.mean(test.truth_sd.astype(np.float64) ** 2))
    lo, hi = pred.intervals[0.9]
    history = model.history
    return {"design": design, "n_subjects": n_subjects, "n_features": int(pred.mean.shape[1]),
            "preset": "inva" if full_preset else "inva + WHOLE_BRAIN", "n_train": len(cohort.train),
            "n_test": len(test), "epochs_run": len(history["epoch"]), "best_epoch": history["best_epoch"],
            **{k: round(v, 1) for k, v in times.items()},
            "fit_s_per_epoch": round(times["fit_s"] / max(1, len(history["epoch"])), 2),
            "train_predict_s": round(times["fit_s"] + times["predict_s"] + times["write_s"], 1),
            "total_s": round(sum(times.values()), 1),
            "mse": mse, "oracle_mse": oracle_mse, "mse_ratio": mse / oracle_mse,
            "voxel_mean_mse": float(np.mean((y - cohort.train.outcome.mean(axis=0)) ** 2)),
            "coverage_90": float(np.mean((y >= lo) & (y <= hi)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_cohorts"))
    parser.add_argument("--n-subjects", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=20, help="cap on training epochs (early stopping may end sooner)")
    parser.add_argument("--memory-n", default="100,1000", help="cohort sizes of the memory probe")
    parser.add_argument("--memory-voxel-mm", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache-subjects", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script itself")
    parser.add_argument("--full-preset", action="store_true", help="the `inva` preset unchanged (see WHOLE_BRAIN)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: volume, surface, memory")
    parser.add_argument("--probe", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.probe:  # the child process of the memory part
        print(json.dumps(memory_probe(args.probe[0], args.probe[1], args.batch_size, args.cache_subjects)))
        return

    if args.quick:
        args.n_subjects, args.epochs, args.memory_n, args.memory_voxel_mm = 30, 2, "20,60", 12
    skip = set(filter(None, args.skip.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"designs": [], "memory": []}

    for design in ("volume", "surface"):
        if design in skip:
            continue
        row = run_design(design, args.n_subjects, args.out, args.epochs, args.seed, args.full_preset)
        results["designs"].append(row)
        print(f"{design}: {json.dumps(row)}", file=sys.stderr)

    if "memory" not in skip:
        from inva_pyro.data.simulate import write_cohort

        for n in [int(x) for x in args.memory_n.split(",")]:
            folder = args.out / f"memory_{n}"
            if not (folder / "cohort.json").exists():
                write_cohort(folder, "volume", n, args.seed, voxel_mm=args.memory_voxel_mm)
            for mode in ("eager", "lazy"):
                child = subprocess.run([sys.executable, __file__, "--probe", mode, str(folder),
                                        "--batch-size", str(args.batch_size),
                                        "--cache-subjects", str(args.cache_subjects)],
                                       check=True, capture_output=True, text=True)
                row = json.loads(child.stdout.strip().splitlines()[-1])
                results["memory"].append(row)
                print(f"memory: {json.dumps(row)}", file=sys.stderr)

    print()
    if results["designs"]:
        print("| design | subjects (train/test) | features | simulate s | read s | fit s (epochs, best) | "
              "predict s | write s | train+predict s | MSE / oracle (voxel-mean MSE) | coverage 90% |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in results["designs"]:
            print(f"| {r['design']} | {r['n_subjects']} ({r['n_train']}/{r['n_test']}) | {r['n_features']} | "
                  f"{r['simulate_s']} | {r['read_s']} | {r['fit_s']} ({r['epochs_run']}, {r['best_epoch']}) | "
                  f"{r['predict_s']} | {r['write_s']} | {r['train_predict_s']} | "
                  f"{r['mse']:.4g} / {r['oracle_mse']:.4g} = {r['mse_ratio']:.2f} ({r['voxel_mean_mse']:.4g}) | "
                  f"{r['coverage_90']:.3f} |")
    if results["memory"]:
        print()
        print("| reading | subjects | features (all inputs) | seconds | peak RSS above imports (MB) | "
              "peak traced numpy (MB) |")
        print("|---|---|---|---|---|---|")
        for r in results["memory"]:
            print(f"| {r['mode']} | {r['n_subjects']} | {r['features']} | {r['seconds']} | {r['peak_rss_mb']} | "
                  f"{r['traced_peak_mb']} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
