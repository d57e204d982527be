"""Training from files on disk: epoch time and peak memory against subjects N and features V.

Cohorts of the ``volume`` design (MNI152 templates; the voxel size sets V, 3 inputs + outcome)
are written once under ``--out``, then each configuration trains the default ``inva`` preset in
a fresh process with the training subjects streamed from disk (``Cohort.from_dir(lazy=True)``,
the ``inva fit --lazy`` path: a streaming standardisation pass, then minibatches read file by
file through an LRU cache of ``--cache-subjects`` subjects). The validation subjects, which
training keeps in memory by design (early stopping and calibration visit them every epoch), are
fixed at ``--val`` subjects for every N, so that what grows with N is the part on disk.

Per configuration: the median time of the epochs after the first (every epoch reads all N
training subjects from disk and takes N / batch SVI steps, then scores the validation subjects),
and the peak resident memory of the fit above the process's peak after its imports (VmHWM).
The summary fits log(epoch time) on log(N) and on log(V): a slope of 1 is linear scaling.

    python benchmarks/scaling.py --out /tmp/bench_scaling [--n 100,250,500,1000] [--voxel-mm 8,6,5,4]

Prints a table, then one JSON line with every figure.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's shared module
import bench_common as common  # noqa: E402


def probe(folder: Path, n_train: int, n_val: int, epochs: int, batch_size: int, cache_subjects: int,
          threads: int, device: str) -> dict:
    """Run in a fresh process: fit with the training subjects streamed from ``folder``."""
    import torch

    from inva_pyro import Cohort, InVA, load_preset

    torch.set_num_threads(threads)
    base = common.peak_rss_mb()
    cohort = Cohort.from_dir(folder, lazy=True, cache_subjects=cache_subjects)
    everyone = cohort.all
    if len(everyone) < n_val + n_train:
        raise SystemExit(f"{folder}: {len(everyone)} subjects, need {n_val + n_train}")
    val = everyone.subset(np.arange(n_val))
    train = everyone.subset(np.arange(n_val, n_val + n_train))
    preset = load_preset("inva")
    preset.training.epochs, preset.training.patience = epochs, epochs + 1
    preset.training.batch_size = batch_size
    preset.prediction.num_samples = 100
    stamps = []
    start = time.perf_counter()
    model = InVA(preset).fit(train, val, seed=0, device=device, progress=False,
                             on_epoch_end=lambda state: stamps.append(time.perf_counter()))
    fit_s = time.perf_counter() - start
    epoch_s = np.diff(stamps)  # the epochs after the first: no warm-up, the cache in its steady state
    return {"n_train": n_train, "n_val": n_val, "features": int(model.info["n_outcome"]),
            "input_features": int(sum(model.info["input_sizes"])), "epochs": len(stamps),
            "epoch_s": round(float(statistics.median(epoch_s)), 3),
            "first_epoch_s": round(stamps[0] - start, 2), "fit_s": round(fit_s, 1),
            "peak_rss_mb": round(common.peak_rss_mb() - base, 1), "device": device}


def slope(xs, ys) -> float:
    """Least-squares slope of log(ys) on log(xs): 1 means linear scaling."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def run_probe(folder: Path, n_train: int, args) -> dict:
    child = subprocess.run([sys.executable, __file__, "--probe", str(folder), str(n_train), "--val", str(args.val),
                            "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                            "--cache-subjects", str(args.cache_subjects), "--threads", str(args.threads),
                            "--device", args.device],
                           capture_output=True, text=True)
    if child.returncode != 0:
        raise SystemExit(f"probe {folder} N={n_train} failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_scaling"), help="where the cohorts are written")
    parser.add_argument("--n", default="100,250,500,1000", help="training sizes of the N sweep")
    parser.add_argument("--n-voxel-mm", type=int, default=6, help="voxel size (mm) of the N sweep")
    parser.add_argument("--voxel-mm", default="8,6,5,4", help="voxel sizes (mm) of the V sweep")
    parser.add_argument("--v-n", type=int, default=100, help="training size of the V sweep")
    parser.add_argument("--val", type=int, default=50, help="validation subjects (in memory), the same for every N")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache-subjects", type=int, default=64, help="as `inva fit --lazy --cache-subjects`")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script itself")
    parser.add_argument("--probe", nargs=2, metavar=("DIR", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.probe:  # the child process: one configuration
        result = probe(Path(args.probe[0]), int(args.probe[1]), args.val, args.epochs, args.batch_size,
                       args.cache_subjects, args.threads, args.device)
        print(json.dumps(result))
        return
    if args.quick:
        args.n, args.voxel_mm, args.n_voxel_mm, args.v_n, args.val, args.epochs = "20,40", "12,10", 12, 20, 10, 2

    from inva_pyro.data.simulate import write_cohort

    sizes = [int(v) for v in args.n.split(",")]
    voxels = [int(v) for v in args.voxel_mm.split(",")]

    def cohort(voxel_mm: int, n_train: int) -> Path:
        # One cohort per voxel size, as large as the largest N it serves; reused between runs.
        n_total = args.val + max([n_train] + (sizes if voxel_mm == args.n_voxel_mm else []))
        folder = args.out / f"volume_{voxel_mm}mm_{n_total}"
        if not (folder / "cohort.json").exists():
            start = time.perf_counter()
            write_cohort(folder, "volume", n_total, args.seed, voxel_mm=voxel_mm)
            print(f"wrote {folder} ({n_total} subjects) in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        return folder

    rows = {"n": [], "v": []}
    for n_train in sizes:
        rows["n"].append(run_probe(cohort(args.n_voxel_mm, n_train), n_train, args) | {"voxel_mm": args.n_voxel_mm})
        print(f"N sweep: {json.dumps(rows['n'][-1])}", file=sys.stderr)
    for voxel_mm in voxels:
        reuse = voxel_mm == args.n_voxel_mm and args.v_n in sizes
        row = (next(r for r in rows["n"] if r["n_train"] == args.v_n) if reuse
               else run_probe(cohort(voxel_mm, args.v_n), args.v_n, args) | {"voxel_mm": voxel_mm})
        rows["v"].append(row)
        print(f"V sweep: {json.dumps(row)}", file=sys.stderr)

    summary = {
        "epoch_time_slope_in_n": slope([r["n_train"] for r in rows["n"]], [r["epoch_s"] for r in rows["n"]]),
        "epoch_time_slope_in_v": slope([r["features"] for r in rows["v"]], [r["epoch_s"] for r in rows["v"]]),
        "peak_rss_ratio_largest_over_smallest_n": rows["n"][-1]["peak_rss_mb"] / rows["n"][0]["peak_rss_mb"],
    }
    print(f"\n{'sweep':<6}{'N train':>8}{'voxel mm':>9}{'V':>8}{'epoch s':>9}{'s / (N V) x 1e6':>17}{'peak MB':>9}")
    for sweep, table in rows.items():
        for r in table:
            per = r["epoch_s"] / (r["n_train"] * r["features"]) * 1e6
            print(f"{sweep:<6}{r['n_train']:>8}{r['voxel_mm']:>9}{r['features']:>8}{r['epoch_s']:>9.2f}{per:>17.3f}"
                  f"{r['peak_rss_mb']:>9.0f}")
    print(f"log-log slope of epoch time: in N {summary['epoch_time_slope_in_n']:.2f}, "
          f"in V {summary['epoch_time_slope_in_v']:.2f} (1 = linear); peak memory N = {sizes[-1]} / N = {sizes[0]}: "
          f"{summary['peak_rss_ratio_largest_over_smallest_n']:.3f}")
    print(json.dumps({"settings": {k: v for k, v in vars(args).items() if k not in ("probe", "out")},
                      "n_sweep": rows["n"], "v_sweep": rows["v"], **summary}))


if __name__ == "__main__":
    main()
