"""The GPU figures in one run (at most about 8 minutes on one H100).

Sections, each with its own time budget and its own try/except (a failure or an overrun in one
still reports the others; a section over budget stops at its next unit of work and says so):

- ``demo_fit``: the demo-size fit (``paper`` design, 500 subjects, default ``inva`` preset,
  early stopping as in ``inva demo``) on ``--device`` (on CUDA: with the loop's CUDA graphs, then
  eagerly with ``cuda_graphs = false``) and, in the same run, on the CPU (all its threads). Fit
  time (split into the training loop and the calibration after it), epochs, test MSE.
- ``svi_step``: one SVI step (3 inputs, batch 32, default networks) at 1,024 / 8,192 / 65,536 /
  230,000 features per image, timed as the training loop runs it (``DeviceTrace_ELBO``, fused
  AdamW and foreach clipping on CUDA, no host synchronisation), against Pyro's ``Trace_ELBO``
  step (a host synchronisation per site, checks every step: how training ran before) and the
  hand-written PyTorch step (``bench_common.torch_elbo_loss``, as in ``svi_overhead.py``); the step
  as the loop runs it on CUDA, replayed as a CUDA graph (train/graphs.py), in a child process
  (CUDA only; its error is reported if recording fails). Then steps at larger batches (``training.batch_size``,
  ``inva fit --batch-size``) at 65,536 features: subjects per second.
  Step time = wall time of ``--steps`` steps between two device synchronisations / steps.
- ``stream_epoch``: epoch time of 1,000 training subjects at 2 mm (``volume`` design), read from
  disk minibatch by minibatch as ``inva fit --lazy`` does, with the read cache off so every
  subject is read and decompressed each time. To save time and disk, ``--stream-subjects``
  subjects are simulated and visited repeatedly to make up the 1,000 (said in the output); a
  read-only pass over 320 of them, scaled to the epoch, gives the I/O share. The second epoch
  (the first includes the warm-up) runs only where the budget leaves room for it.
- ``predictive``: posterior predictive throughput, 1,000 draws for 100 subjects at the 2 mm
  mask's size (the summaries ``inva predict`` makes: mean, sd, 8 quantiles, CRPS), an untrained
  default module (the cost does not depend on the weights).
- peak device memory (``torch.cuda.max_memory_allocated``) per section.

    python benchmarks/gpu.py --device cuda --out gpu.json
    python benchmarks/gpu.py --device cpu --quick          # a smoke run of every section

Prints a table, then one JSON line (also written to ``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's shared module
import bench_common as common  # noqa: E402

V_2MM = 216_049  # voxels in the brain mask of the volume design at 2 mm (MNI152 GM + WM > 0.5)
GOALS = {"demo_fit_s": 5.0, "step_ms_65536": 5.0, "step_ms_230000": 10.0, "epoch_s_1000_2mm": 20.0,
         "predictive_s_1000x100_2mm": 60.0}


class OverBudget(Exception):
    pass


def run_section(name: str, budget_s: float, device: torch.device, fn, args) -> dict:
    """fn(args, device, deadline) -> dict; errors and peak device memory recorded, never raised."""
    start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        out = fn(args, device, start + budget_s)
    except Exception as exc:  # one section's failure must not hide the others
        out = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500],
               "traceback": traceback.format_exc()[-1500:]}
    out["section_s"] = round(time.perf_counter() - start, 1)
    out["budget_s"] = budget_s
    if device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    print(f"[{name}] {json.dumps({k: v for k, v in out.items() if k != 'traceback'})}", file=sys.stderr, flush=True)
    return out


# ---- demo-size fit ---------------------------------------------------------------------------------
def demo_fit(args, device, deadline) -> dict:
    from inva_pyro import Cohort, InVA
    from inva_pyro.criticism.metrics import mse
    from inva_pyro.data.simulate import write_cohort

    n = 60 if args.quick else 500
    out = {"subjects": n, "design": "paper", "preset": "inva"}
    with tempfile.TemporaryDirectory() as tmp:
        write_cohort(Path(tmp) / "cohort", "paper", n, 0)
        cohort = Cohort.from_dir(Path(tmp) / "cohort", seed=0)
        # (key, device, CUDA graphs): the loop's default on the device, the eager loop there, the CPU
        arms = [(f"fit_{device.type}", device, True)]
        if device.type == "cuda":
            # the first fit of a process pays one-time costs (CUDA context, torch.optim's import of
            # torch._dynamo, lazy kernel loading): the same fit once more shows a warm process
            arms += [("fit_cuda_eager", device, False), ("fit_cpu", torch.device("cpu"), False),
                     ("fit_cuda_warm", device, True)]
        for i, (key, dev, graphs) in enumerate(arms):
            model = InVA.from_preset("inva")
            model.preset.training.cuda_graphs = graphs
            if args.quick:
                model.preset.training.epochs = 3
            # each fit gets an equal share of what is left of the budget
            share = time.perf_counter() + (deadline - time.perf_counter()) / (len(arms) - i)
            stamps = []

            def stop(state, share=share, stamps=stamps):
                stamps.append(time.perf_counter())
                if time.perf_counter() > share:
                    raise OverBudget

            start = time.perf_counter()
            try:
                model.fit(cohort.train, cohort.val, seed=0, device=str(dev), progress=False, on_epoch_end=stop)
                common.sync(dev)
                fitted = time.perf_counter()
                pred = model.predict(cohort.test, num_samples=100, seed=0)
                epochs = [b - a for a, b in zip([start] + stamps, stamps)]
                out[key] = {"fit_s": round(fitted - start, 2), "training_loop_s": round(stamps[-1] - start, 2),
                            "first_epoch_s": round(epochs[0], 3), "median_epoch_s": round(float(np.median(epochs)), 4),
                            "after_training_s": round(fitted - stamps[-1], 2),
                            "predict_s": round(time.perf_counter() - fitted, 2),
                            "epochs": len(model.history["epoch"]), "best_epoch": model.history["best_epoch"],
                            "test_mse": round(float(mse(cohort.test.outcome, pred.mean)), 4)}
            except OverBudget:
                per_epoch = (stamps[-1] - start) / len(stamps)
                out[key] = {"over_budget": True, "epochs_done": len(stamps), "s_per_epoch": round(per_epoch, 3)}
            out[key]["threads"] = torch.get_num_threads() if dev.type == "cpu" else None
    return out


# ---- SVI step --------------------------------------------------------------------------------------
def svi_step(args, device, deadline) -> dict:
    import pyro

    sizes = [256, 1024] if args.quick else [1024, 8192, 65536, 230_000]
    steps, warmup = (4, 1) if args.quick else (args.steps, 5)
    rows, batch, n_subjects = {}, 32, 1000
    per_size = max(1.0, (deadline - time.perf_counter()) * 0.55 / len(sizes))
    for features in sizes:
        if time.perf_counter() > deadline:
            rows[str(features)] = {"skipped": "section budget spent"}
            continue
        torch.manual_seed(0)
        module, names = common.default_module(features, device)
        xs = [torch.randn(batch, features, device=device) for _ in names]
        y = torch.randn(batch, features, device=device)
        idx = torch.arange(batch, device=device)
        arms = common.step_arms(module, xs, y, idx, n_subjects, device)
        row, until = {}, time.perf_counter() + per_size
        with pyro.validation_enabled(False):
            for name, step in arms.items():
                try:
                    row[name] = round(common.timed_ms(step, device, steps, warmup, until), 3)
                except Exception as exc:
                    row[name] = f"error: {type(exc).__name__}: {exc}".splitlines()[0][:300]
        rows[str(features)] = row
        del module, xs, y, arms
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = {"batch": batch, "inputs": 3, "steps": steps, "ms_per_step": rows}
    if device.type == "cuda" and not args.no_graph:
        # In a child process: a failed capture must not leave this process's CUDA context in doubt.
        graph_sizes = sizes
        left = deadline - time.perf_counter()
        if left > 20:
            try:
                child = subprocess.run([sys.executable, __file__, "--graph-probe", ",".join(map(str, graph_sizes)),
                                        "--steps", str(steps)], capture_output=True, text=True, timeout=left * 0.6)
                probe = json.loads(child.stdout.strip().splitlines()[-1]) if child.returncode == 0 else {
                    str(f): f"error: probe exit {child.returncode}: {child.stderr.strip()[-300:]}" for f in graph_sizes}
            except Exception as exc:
                probe = {str(f): f"error: {type(exc).__name__}: {exc}"[:300] for f in graph_sizes}
            for f, value in probe.items():  # "65536" or "65536, mixed_precision"
                size, _, variant = f.partition(", ")
                rows.setdefault(size, {})["CUDA graph (this loop)" + (f", {variant}" if variant else "")] = value
    # larger minibatches at 65,536 features (quick: 1,024): subjects per second
    features = 1024 if args.quick else 65536
    batches = [32, 64] if args.quick else [32, 128, 256]
    sweep = {}
    for b in batches:
        if time.perf_counter() > deadline:
            break
        try:
            module, names = common.default_module(features, device)
            xs = [torch.randn(b, features, device=device) for _ in names]
            y = torch.randn(b, features, device=device)
            arms = common.step_arms(module, xs, y, torch.arange(b, device=device), n_subjects, device)
            with pyro.validation_enabled(False):
                ms = common.timed_ms(arms["eager inva step"], device, steps, warmup, deadline)
            sweep[str(b)] = {"ms_per_step": round(ms, 3), "subjects_per_s": round(1e3 * b / ms, 1)}
            del module, xs, y, arms
        except Exception as exc:
            sweep[str(b)] = f"error: {type(exc).__name__}: {exc}".splitlines()[0][:300]
    out["batch_sweep"] = {"features": features, "rows": sweep}
    return out


# ---- one epoch streamed from disk at 2 mm ----------------------------------------------------------
def stream_epoch(args, device, deadline) -> dict:
    from inva_pyro import Cohort
    from inva_pyro.config import TrainingConfig
    from inva_pyro.data.preprocessing import Standardizer
    from inva_pyro.data.simulate import write_cohort
    from inva_pyro.data.streaming import DiskBatches
    from inva_pyro.model.module import InVAModule
    from inva_pyro.config import ModelConfig
    from inva_pyro.train.loop import Batchable, train

    voxel_mm = 12 if args.quick else 2
    n_files = 12 if args.quick else args.stream_subjects
    n_train = 40 if args.quick else args.stream_n
    n_val = 4
    out = {"voxel_mm": voxel_mm, "subjects_on_disk": n_files, "n_train": n_train,
           "note": f"{n_files} simulated subjects visited repeatedly to make up {n_train}; read cache off, "
                   "so every subject is read and decompressed each time"}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        start = time.perf_counter()
        write_cohort(Path(tmp) / "cohort", "volume", n_files, 0, voxel_mm=voxel_mm)
        out["simulate_s"] = round(time.perf_counter() - start, 1)
        cohort = Cohort.from_dir(Path(tmp) / "cohort", lazy=True, cache_subjects=0)
        everyone = cohort.all
        names = cohort.input_names
        standardizer = Standardizer.fit_streaming(everyone)
        train_set = everyone.subset(np.arange(n_train) % len(everyone))
        batches = DiskBatches(train_set, standardizer, names, device)
        val_rows = everyone.rows(np.arange(n_val))
        val_x = standardizer.transform_inputs(val_rows)
        val = Batchable([torch.as_tensor(val_x[k], device=device) for k in names],
                        torch.as_tensor(standardizer.transform_outcome(val_rows.outcome), device=device))
        features = int(val.outcome.shape[1])
        out["features"] = features
        out["read_workers"] = batches.workers
        # read-only pass over a share of the subjects: the I/O part of an epoch
        n_read = min(n_train, 320)
        order = torch.randperm(n_train)[:n_read]
        start = time.perf_counter()
        for s in range(0, n_read, 32):
            batches.take(order[s:s + 32])
            if s + 32 < n_read:
                batches.prefetch(order[s + 32:s + 64])
        common.sync(device)
        read_s = (time.perf_counter() - start) * n_train / n_read
        out["read_only_epoch_s"] = round(read_s, 2)
        torch.manual_seed(0)
        module = InVAModule(names, [features] * len(names), features, ModelConfig()).to(device)
        # a second epoch (the first has the warm-up) only where the budget leaves room for it
        epochs = 2 if deadline - time.perf_counter() > 2.5 * read_s else 1
        cfg = TrainingConfig(epochs=epochs, patience=10)
        stamps = [time.perf_counter()]

        def stop(state):
            common.sync(device)
            stamps.append(time.perf_counter())
            if time.perf_counter() > deadline:
                raise OverBudget

        try:
            train(module, batches, val, cfg, progress=False, on_epoch_end=stop)
        except OverBudget:
            out["over_budget"] = True
        epochs = np.diff(stamps)
        out["epoch_s"] = [round(float(e), 2) for e in epochs]
        out["epoch_s_1000"] = round(float(epochs[-1]) * 1000 / n_train, 2) if len(epochs) else None
    return out


# ---- posterior predictive throughput ---------------------------------------------------------------
def predictive(args, device, deadline) -> dict:
    from inva_pyro.predict.predictive import posterior_predictive, seeded_generator

    subjects, draws, features = (10, 100, 2048) if args.quick else (100, 1000, V_2MM)
    torch.manual_seed(0)
    module, names = common.default_module(features, device)
    module.eval()
    xs = [torch.randn(subjects, features, device=device) for _ in names]
    y = torch.randn(subjects, features, device=device)
    levels = [0.5, 0.8, 0.9, 0.95]
    probs = sorted({p for lv in levels for p in ((1 - lv) / 2, (1 + lv) / 2)})
    # time a first block of subjects to check the budget, then the rest
    first = max(1, subjects // 10)
    start = time.perf_counter()
    posterior_predictive(module, [x[:first] for x in xs], num_samples=draws, probs=probs, observed=y[:first],
                         generator=seeded_generator(device, 0))
    common.sync(device)
    first_s = time.perf_counter() - start
    out = {"subjects": subjects, "draws": draws, "features": features, "quantiles": len(probs)}
    if time.perf_counter() + first_s * (subjects - first) / first > deadline:
        out.update(subjects_timed=first, seconds=round(first_s, 2),
                   note="budget too small for every subject: timed the first block only")
        total_s, n = first_s, first
    else:
        start = time.perf_counter()
        posterior_predictive(module, xs, num_samples=draws, probs=probs, observed=y,
                             generator=seeded_generator(device, 1))
        common.sync(device)
        total_s, n = time.perf_counter() - start, subjects
        out["seconds"] = round(total_s, 2)
    out["entries_per_s"] = round(draws * n * features / total_s, 1)
    out["seconds_for_all"] = round(total_s * subjects / n, 2)
    return out


def graph_probe(sizes: list[int], steps: int) -> None:
    """(child process) ms per replay of the captured inva step at each size, one JSON line."""
    import pyro

    device, out = torch.device("cuda"), {}
    for features in sizes:
        try:
            torch.manual_seed(0)
            module, names = common.default_module(features, device)
            xs = [torch.randn(32, features, device=device) for _ in names]
            y = torch.randn(32, features, device=device)
            from inva_pyro.config import TrainingConfig
            for key, mixed in (("", False), (", mixed_precision", True)):
                replay = common.graph_step(module, xs, y, 1000, TrainingConfig(mixed_precision=mixed))
                with pyro.validation_enabled(False):
                    out[f"{features}{key}"] = round(common.timed_ms(replay, device, steps, 3, time.perf_counter() + 60), 3)
                del replay
                torch.cuda.empty_cache()
            del module, xs, y
            torch.cuda.empty_cache()
        except Exception as exc:
            out[str(features)] = f"error: {type(exc).__name__}: {exc}".splitlines()[0][:300]
    print(json.dumps(out))


SECTIONS = {"demo_fit": demo_fit, "svi_step": svi_step, "stream_epoch": stream_epoch, "predictive": predictive}
BUDGETS = {"demo_fit": 140, "svi_step": 140, "stream_epoch": 120, "predictive": 60}


def summary_rows(results: dict) -> list[tuple[str, str, str]]:
    rows = []
    demo = results.get("demo_fit", {})
    for key in ("fit_cuda", "fit_cuda_warm", "fit_cuda_eager", "fit_cpu"):
        r = demo.get(key)
        if isinstance(r, dict):
            value = (f"{r['fit_s']} s ({r['epochs']} epochs; loop {r['training_loop_s']} s, after it "
                     f"{r['after_training_s']} s; test MSE {r['test_mse']})" if "fit_s" in r
                     else f"over budget: {r.get('s_per_epoch')} s/epoch")
            name = {"fit_cuda": "cuda, CUDA graphs, first in the process", "fit_cuda_warm": "cuda, CUDA graphs, "
                    "warm process", "fit_cuda_eager": "cuda, eager", "fit_cpu": "cpu"}[key]
            rows.append((f"demo fit, {name}", value, "<= 5 s" if key == "fit_cuda" else ""))
    for features, row in results.get("svi_step", {}).get("ms_per_step", {}).items():
        goal = {"65536": "<= 5 ms", "230000": "<= 10 ms"}.get(features, "")
        cells = ", ".join(f"{k}: {v}" for k, v in row.items()) if isinstance(row, dict) else str(row)
        rows.append((f"SVI step ms, {features} features", cells, goal))
    sweep = results.get("svi_step", {}).get("batch_sweep", {})
    for b, r in sweep.get("rows", {}).items():
        rows.append((f"batch {b} at {sweep['features']}", str(r), ""))
    st = results.get("stream_epoch", {})
    if "epoch_s_1000" in st:
        rows.append((f"epoch of {st['n_train']} at {st['voxel_mm']} mm, streamed", f"{st['epoch_s_1000']} s per 1000 "
                     f"(epochs {st['epoch_s']} s; reading alone {st.get('read_only_epoch_s')} s)", "<= 20 s"))
    pr = results.get("predictive", {})
    if "seconds_for_all" in pr:
        rows.append((f"predictive {pr['draws']} draws x {pr['subjects']} subjects x {pr['features']}",
                     f"{pr['seconds_for_all']} s ({pr['entries_per_s']:.3g} entries/s)", "<= 60 s"))
    for name, r in results.items():
        if isinstance(r, dict) and "error" in r:
            rows.append((name, "ERROR " + r["error"], ""))
        if isinstance(r, dict) and "peak_gpu_mb" in r:
            rows.append((f"{name} peak GPU memory", f"{r['peak_gpu_mb']} MB", ""))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every section")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ", ".join(SECTIONS))
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every section's time budget")
    parser.add_argument("--steps", type=int, default=30, help="timed SVI steps per arm and size")
    parser.add_argument("--stream-subjects", type=int, default=40, help="2 mm subjects simulated on disk")
    parser.add_argument("--stream-n", type=int, default=1000, help="training subjects per streamed epoch")
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph arm")
    parser.add_argument("--tmp", default=None, help="folder for the temporary cohorts (default: the system's)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    parser.add_argument("--graph-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.graph_probe:
        return graph_probe([int(f) for f in args.graph_probe.split(",")], args.steps)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    chosen = [s for s in args.sections.split(",") if s]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    info = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "quick": args.quick}
    print(f"[info] {json.dumps(info)}", file=sys.stderr, flush=True)
    results = {}
    started = time.perf_counter()
    for name in chosen:
        budget = (20 if args.quick else BUDGETS[name]) * args.budget_scale
        results[name] = run_section(name, budget, device, SECTIONS[name], args)
    info["total_s"] = round(time.perf_counter() - started, 1)
    rows = summary_rows(results)
    width = max([len(r[0]) for r in rows] + [10])
    print(f"{'figure':<{width}}  {'value':<60}  goal")
    for name, value, goal in rows:
        print(f"{name:<{width}}  {value:<60}  {goal}")
    payload = {**info, "goals": GOALS, "results": {k: {kk: vv for kk, vv in v.items() if kk != "traceback"}
                                                    for k, v in results.items()}}
    errors = {k: v["traceback"] for k, v in results.items() if "traceback" in v}
    if errors:
        payload["tracebacks"] = errors
    line = json.dumps(payload)
    print(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")


if __name__ == "__main__":
    main()
