#!/usr/bin/env python
"""Simulation study: InVA against its peers on the same simulated subjects, with the same metrics.

For every design D (``inva_pyro.data.simulate.DESIGNS``), replicate seed S and training size N, the
script simulates D with ``write_cohort(D, n_subjects, S)`` (n_subjects = max N / 0.6, so that the
design's own 60/20/20 split has max N training subjects: 500 for N = 300), reads it back with
``Cohort.from_dir`` exactly as ``inva fit`` does, and fits every model on the first N training
subjects (nested training sets; validation and test subjects are the same for every N and model).
Each model is a preset of ``models/`` fitted through the registry (the same code path as
``inva fit --model M``): its validation subjects drive early stopping (InVA, VAEs) and the
predictive intervals (every model). The test subjects are predicted and scored with
``Prediction.metrics`` against the observed outcomes and the simulation's true mean and sd.

Models (``--models``): inva, inva-paper, vae-concat, vae-separate (the Pyro program),
ridge, tensor (point estimators with validation-residual intervals), bart (voxel-wise BART).
BART costs O(voxels): it is skipped on designs with more than ``--max-bart-features`` outcome
features (the table says so).

Outputs in ``--out``:
    runs.csv                one row per (design, size, seed, model) with every metric, written as runs
                            finish; re-running the same command skips the rows already there
    summary.csv / summary.md  per (design, size, model): mean and sd over replicates of test MSE,
                            MSE / oracle MSE, correlation, coverage at 0.9 (calibrated and raw), CRPS,
                            fit time and predict time (median and fastest); and InVA's MSE against the
                            best peer
    paired.csv              per (design, size, model): the default InVA's MSE and CRPS relative to the model's,
                            paired by replicate (in summary.md too)
    simulation_study.png    per design: MSE / oracle, coverage at 0.9 and fit time of every model
    cohorts/                the simulated cohorts (reused by re-runs; delete to save space)

Timings are wall-clock seconds on whatever the machine is doing; ``runs.csv`` records the
1-minute load average when each fit started and the fit's CPU seconds in this process. On a busy
machine, torch's intra-op threads spin while they wait for each other (measured: 8 InVA epochs took
78 CPU-s with 2 threads and 7 CPU-s with 1 thread at load 6 to 8 on 2 cores), so for timings on a shared
machine use ``--threads 1 --bart-jobs 1`` (one core per model) and compare CPU seconds.

Examples:
    python analysis/simulation_study.py --out study                      # paper design, N = 300, 3 replicates
    python analysis/simulation_study.py --out study --designs paper,volume,surface --sizes 100,300
    python analysis/simulation_study.py --quick --out /tmp/ss            # smoke test (about a minute)
    python analysis/simulation_study.py --scenario semisupervised --out semi   # labeled + MRI-only subjects
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's shared module
import analysis_common as common  # noqa: E402

MODELS = ["inva", "inva-paper", "vae-concat", "vae-separate", "ridge", "tensor", "bart"]
# Ablations (common.VARIANTS) can be named in --models too.
ORDER = ["inva", "inva-nosmooth", "inva-smooth1000", "vae-concat", "vae-separate", "vae-concat-smooth", "vae-separate-smooth",
         "inva-paper", "vae-concat-paper", "vae-separate-paper", "bart", "ridge", "tensor"]
DEFAULT_INVA = "inva"
NOT_PEERS = {"inva", "inva-paper", "inva-nosmooth", "inva-smooth1000"}   # InVA's own presets; every other model is a peer
LEVELS = common.LEVELS

# --quick: one replicate of 24 training subjects, 50 predictive draws, the models' common.QUICK settings
QUICK = dict(sizes=[24], seeds=[0], num_samples=50)

METRICS = ["mse", "mse_ratio", "corr", "cov90", "cov90_raw", "cov50", "cov95", "width90", "crps", "crps_ratio",
           "nll", "fit_seconds", "predict_seconds"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--out", required=True, type=Path, help="output folder (created; re-runs resume)")
    p.add_argument("--designs", default="paper",
                   help="simulation designs, comma-separated, or 'all' (default paper; known: see "
                        "inva_pyro.data.simulate.DESIGNS)")
    p.add_argument("--sizes", default="300", help="training sizes, comma-separated (default 300)")
    p.add_argument("--replicates", type=int, default=3, help="replicates: seeds 0..R-1 (default 3)")
    p.add_argument("--seeds", help="explicit replicate seeds, comma-separated (overrides --replicates)")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"presets (names in models/ or TOML paths) or ablations ({', '.join(common.VARIANTS)}), "
                        f"comma-separated (default {','.join(MODELS)})")
    p.add_argument("--max-bart-features", type=int, default=5000,
                   help="skip bart on designs with more outcome features than this (default 5000)")
    p.add_argument("--samples", type=int, help="predictive draws (default: each preset's)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--bart-jobs", type=int, default=0, help="BART worker processes (default: the preset's)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: one replicate, 24 training subjects, tiny networks, 2 epochs, few BART trees")
    return p.parse_args(argv)


def _list(text: str) -> list[str]:
    return [x.strip() for x in str(text).split(",") if x.strip()]


def settings(args) -> dict:
    from inva_pyro.data.simulate import DESIGNS

    designs = list(DESIGNS) if args.designs == "all" else _list(args.designs)
    unknown = [d for d in designs if d not in DESIGNS]
    if unknown:
        raise SystemExit(f"simulation_study: unknown design(s) {', '.join(unknown)} (known: {', '.join(DESIGNS)})")
    cfg = dict(designs=designs, models=_list(args.models), num_samples=args.samples, quick=args.quick,
               bart_jobs=args.bart_jobs, sizes=[int(x) for x in _list(args.sizes)],
               seeds=[int(x) for x in _list(args.seeds)] if args.seeds else list(range(args.replicates)))
    if args.quick:
        cfg.update(sizes=QUICK["sizes"], num_samples=args.samples or QUICK["num_samples"],
                   seeds=cfg["seeds"] if args.seeds else QUICK["seeds"])
    return cfg


def make_preset(name: str, cfg: dict):
    """The preset or ablation ``name`` with the study's settings: --quick, --samples, --bart-jobs."""
    changes = {"prediction.num_samples": cfg["num_samples"]} if cfg["num_samples"] else {}
    by_family = {"bart": {"model.n_jobs": cfg["bart_jobs"]}} if cfg["bart_jobs"] else None
    return common.preset_with(name, changes, quick=cfg["quick"], by_family=by_family)


def cohort_for(design: str, seed: int, cfg: dict, out: Path):
    """The design's cohort for one replicate, with max(sizes) training subjects in its 60/20/20 split
    (simulated once under OUT/cohorts, then read back from its folder)."""
    n_subjects = int(round(max(cfg["sizes"]) / common.TRAIN_SHARE))
    return common.simulated_cohort(out, design, n_subjects, seed)


def one_run(cohort, size: int, seed: int, name: str, cfg: dict) -> dict:
    from inva_pyro.registry import model_from_preset

    train = cohort.train
    train = train.subset(np.arange(min(size, len(train))))
    val, test = cohort.val, cohort.test
    load = os.getloadavg()[0]
    start, cpu = time.perf_counter(), time.process_time()
    model = model_from_preset(make_preset(name, cfg)).fit(train, val, seed=seed, device="cpu", progress=False)
    fit_s, fit_cpu = time.perf_counter() - start, time.process_time() - cpu
    start = time.perf_counter()
    pred = model.predict(test, levels=LEVELS, seed=seed)
    predict_s = time.perf_counter() - start
    truth = dict(truth_mean=test.truth_mean, truth_sd=test.truth_sd)
    cal, raw = pred.metrics(calibrated=True, **truth), pred.metrics(calibrated=False, **truth)
    details = {k: model.info[k] for k in ("alpha", "rank", "neighbourhood", "local_inputs") if k in model.info}
    if model.history and model.history.get("epoch"):
        details.update(epochs=len(model.history["epoch"]), best_epoch=model.history.get("best_epoch"))
    row = {"model": name, "family": model.info["family"], "size": size, "seed": seed, "n_train": len(train),
           "n_val": len(val), "n_test": len(test), "n_features": cal["n_features"], "load1": round(load, 2),
           "fit_seconds": round(fit_s, 2), "predict_seconds": round(predict_s, 2),
           "fit_cpu_seconds": round(fit_cpu, 2),   # this process only: not BART's worker processes
           "mse": cal["mse"], "oracle_mse": cal["oracle_mse"], "corr": cal["corr"], "crps": cal["crps"],
           "oracle_crps": cal["oracle_crps"], "nll": cal["nll"], "crps_raw": raw["crps"],
           "details": json.dumps(details)}
    for lv in LEVELS:
        key, tag = format(lv, "g"), round(100 * lv)
        row[f"cov{tag}"] = cal["coverage"][key]
        row[f"cov{tag}_raw"] = raw["coverage"][key]
        row[f"width{tag}"] = cal["interval_width"][key]
    row["mse_ratio"] = row["mse"] / row["oracle_mse"] if row["oracle_mse"] else float("nan")
    row["crps_ratio"] = row["crps"] / row["oracle_crps"] if row["oracle_crps"] else float("nan")
    return row


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (design, size, model), group in runs.groupby(["design", "size", "model"], sort=False):
        row = {"design": design, "size": int(size), "model": model, "n_replicates": len(group),
               "n_features": int(group["n_features"].iloc[0])}
        for m in METRICS:
            values = group[m].astype(float)
            row[f"{m}_mean"] = values.mean()
            row[f"{m}_sd"] = values.std(ddof=1) if len(values) > 1 else float("nan")
        for m in ("fit_seconds", "predict_seconds", "fit_cpu_seconds"):  # timings: robust summaries
            values = group[m].astype(float) if m in group else pd.Series([np.nan])
            row[f"{m}_median"], row[f"{m}_min"] = values.median(), values.min()
        rows.append(row)
    summary = pd.DataFrame(rows)
    if len(summary):
        order = {m: i for i, m in enumerate(ORDER)}
        summary = summary.sort_values(["design", "size", "model"],
                                      key=lambda c: c.map(order).fillna(99) if c.name == "model" else c)
    return summary.reset_index(drop=True)


def paired_against_inva(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (design, size, model): MSE and CRPS of the default InVA relative to the model's, paired by replicate.

    ``mse_change`` = mean over replicates of mse_inva / mse_model - 1 (negative: InVA lower), its sd, and
    the number of replicates where InVA's MSE is lower.
    """
    rows = []
    for (design, size), group in runs.groupby(["design", "size"], sort=False):
        inva = group[group["model"] == DEFAULT_INVA].set_index("seed")
        if inva.empty:
            continue
        for model, other in group[group["model"] != DEFAULT_INVA].groupby("model", sort=False):
            other = other.set_index("seed")
            seeds = inva.index.intersection(other.index)
            if not len(seeds):
                continue
            mse = inva.loc[seeds, "mse"] / other.loc[seeds, "mse"] - 1
            crps = inva.loc[seeds, "crps"] / other.loc[seeds, "crps"] - 1
            rows.append({"design": design, "size": int(size), "model": model, "n_pairs": len(seeds),
                         "mse_change": mse.mean(), "mse_change_sd": mse.std(ddof=1) if len(seeds) > 1 else float("nan"),
                         "crps_change": crps.mean(), "inva_lower": int((mse < 0).sum())})
    order = {m: i for i, m in enumerate(ORDER)}
    return pd.DataFrame(rows).sort_values(["design", "size", "model"], kind="stable",
                                          key=lambda c: c.map(order).fillna(99) if c.name == "model" else c) \
        if rows else pd.DataFrame()


def inva_against_peers(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (design, size): the default InVA's MSE against the best peer's (negative: InVA lower)."""
    rows = []
    for (design, size), group in summary.groupby(["design", "size"]):
        inva = group[group["model"] == DEFAULT_INVA]
        peers = group[~group["model"].isin(NOT_PEERS)]
        if inva.empty or peers.empty:
            continue
        best = peers.loc[peers["mse_mean"].idxmin()]
        rows.append({"design": design, "size": int(size), "inva_mse": float(inva["mse_mean"].iloc[0]),
                     "best_peer": best["model"], "best_peer_mse": float(best["mse_mean"]),
                     "change": float(inva["mse_mean"].iloc[0] / best["mse_mean"] - 1)})
    return pd.DataFrame(rows)


def markdown(summary: pd.DataFrame, paired: pd.DataFrame, skipped: list[str], command: str) -> str:
    def f(s, m, d=3):
        sd = s[m + "_sd"]
        return f"{s[m + '_mean']:.{d}f}" + ("" if np.isnan(sd) else f" ± {sd:.{d}f}")

    lines = [f"Command: `{command}`", "",
             "Mean ± sd over replicates (each replicate: a new simulated cohort and fit seed). MSE, correlation "
             "and CRPS over all test subjects and features; coverage: share of test values inside the central "
             "90% interval, calibrated (raw in the next column); times: wall-clock seconds, median (fastest) over "
             "replicates; fit CPU s: CPU seconds of the fitting process (BART's worker processes not counted).", ""]
    for (design, size), group in summary.groupby(["design", "size"], sort=False):
        lines += [f"### {design}, N train = {size} ({int(group['n_features'].iloc[0])} outcome features, "
                  f"replicates: {int(group['n_replicates'].max())})", "",
                  "| model | MSE | MSE / oracle | corr | coverage 0.9 | raw coverage 0.9 | CRPS | fit s | fit CPU s "
                  "| predict s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for _, s in group.iterrows():
            t = lambda m: ("n/a" if np.isnan(s[m + "_median"])  # noqa: E731
                           else f"{s[m + '_median']:.1f} ({s[m + '_min']:.1f})")
            lines.append(f"| {s['model']} | {f(s, 'mse', 4)} | {f(s, 'mse_ratio')} | {f(s, 'corr')} | {f(s, 'cov90')} "
                         f"| {f(s, 'cov90_raw')} | {f(s, 'crps', 4)} | {t('fit_seconds')} | {t('fit_cpu_seconds')} "
                         f"| {t('predict_seconds')} |")
        lines.append("")
        pairs = paired[(paired["design"] == design) & (paired["size"] == size)] if len(paired) else paired
        if len(pairs):
            lines += ["Default InVA against each model, paired by replicate (InVA / model - 1; negative: InVA better):",
                      "", "| model | MSE change | CRPS change | replicates with lower InVA MSE |", "|---|---|---|---|"]
            for _, p in pairs.iterrows():
                sd = "" if np.isnan(p["mse_change_sd"]) else f" ± {100 * p['mse_change_sd']:.1f}"
                lines.append(f"| {p['model']} | {100 * p['mse_change']:+.1f}%{sd} | {100 * p['crps_change']:+.1f}% "
                             f"| {p['inva_lower']} of {p['n_pairs']} |")
            lines.append("")
    versus = inva_against_peers(summary)
    if len(versus):
        lines += ["| design | N train | InVA MSE | best peer | its MSE | InVA vs best peer |", "|---|---|---|---|---|---|"]
        for _, v in versus.iterrows():
            lines.append(f"| {v['design']} | {v['size']} | {v['inva_mse']:.4f} | {v['best_peer']} | "
                         f"{v['best_peer_mse']:.4f} | {100 * v['change']:+.1f}% |")
        lines.append("")
    lines += [f"Not run: {s}" for s in skipped]
    return "\n".join(lines) + "\n"


def plot(summary: pd.DataFrame, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    designs = list(dict.fromkeys(summary["design"]))
    fig = Figure(figsize=(15, 4.2 * len(designs)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(designs), 3, squeeze=False)
    for row, design in zip(axes, designs):
        d = summary[summary["design"] == design]
        models = list(dict.fromkeys(d["model"]))
        sizes = sorted(d["size"].unique())
        width = 0.8 / len(sizes)
        x = np.arange(len(models))
        for j, size in enumerate(sizes):
            s = d[d["size"] == size].set_index("model").reindex(models)
            offset = x + (j - (len(sizes) - 1) / 2) * width
            err = lambda m: s[f"{m}_sd"].fillna(0).to_numpy()  # noqa: E731
            row[0].bar(offset, s["mse_ratio_mean"], width, yerr=err("mse_ratio"), capsize=3, label=f"N = {size}")
            row[1].errorbar(offset, s["cov90_mean"], yerr=err("cov90"), fmt="o", capsize=3, label=f"calibrated, N = {size}")
            row[1].plot(offset, s["cov90_raw_mean"], "x", color="grey", label="raw" if j == 0 else None)
            row[2].bar(offset, s["fit_seconds_median"], width, label=f"N = {size} (median)")
            row[2].plot(offset, s["fit_seconds_min"], "_", color="black", markersize=10,
                        label="fastest replicate" if j == 0 else None)
        row[0].axhline(1, color="grey", linestyle=":")
        row[0].set_ylabel("test MSE / oracle MSE")
        row[0].set_title(f"{design}: prediction error (1 = oracle)")
        row[1].axhline(0.9, color="grey", linestyle=":")
        row[1].axhspan(0.88, 0.92, color="green", alpha=0.08)
        row[1].set_ylabel("coverage of the central 90% interval")
        row[1].set_title(f"{design}: calibration")
        row[2].set_yscale("log")
        row[2].set_ylabel("fit time (s, log scale)")
        row[2].set_title(f"{design}: fit time")
        for ax in row:
            ax.set_xticks(x)
            ax.set_xticklabels(models, rotation=30, ha="right")
            ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    return path


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--scenario" in argv:  # --scenario semisupervised: labeled + MRI-only subjects (semisupervised_study.py)
        i = argv.index("--scenario")
        if argv[i + 1:i + 2] != ["semisupervised"]:
            raise SystemExit("simulation_study: --scenario takes 'semisupervised'")
        from semisupervised_study import main as semisupervised
        return semisupervised(argv[:i] + argv[i + 2:])
    args = parse_args(argv)
    cfg = settings(args)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    runs_csv = out / "runs.csv"
    runs = pd.read_csv(runs_csv) if runs_csv.exists() else pd.DataFrame()
    done = set(zip(runs["design"], runs["size"], runs["seed"], runs["model"])) if len(runs) else set()
    command = "python analysis/simulation_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    skipped: list[str] = []
    for design in cfg["designs"]:
        for seed in cfg["seeds"]:
            todo = [(size, name) for size in sorted(cfg["sizes"]) for name in cfg["models"]
                    if (design, size, seed, name) not in done]
            if not todo:
                continue
            cohort = cohort_for(design, seed, cfg, out)
            n_features = cohort.train.outcome.shape[1]
            for size, name in todo:
                if name == "bart" and n_features > args.max_bart_features:
                    continue
                row = {"design": design, **one_run(cohort, size, seed, name, cfg)}
                runs = pd.concat([runs, pd.DataFrame([row])], ignore_index=True)
                runs.to_csv(runs_csv, index=False)
                print(f"{design} N={size} seed={seed} {name:12s} MSE {row['mse']:.4f} (oracle x{row['mse_ratio']:.2f}) "
                      f"cov90 {row['cov90']:.3f} (raw {row['cov90_raw']:.3f}) CRPS {row['crps']:.4f} "
                      f"fit {row['fit_seconds']:.1f} s predict {row['predict_seconds']:.1f} s", flush=True)
    keep = runs["design"].isin(cfg["designs"]) & runs["size"].isin(cfg["sizes"]) & runs["seed"].isin(cfg["seeds"]) \
        & runs["model"].isin(cfg["models"]) if len(runs) else []
    runs = runs[keep] if len(runs) else runs
    if "bart" in cfg["models"] and len(runs):
        for design, rows in runs.groupby("design"):
            n_features = int(rows["n_features"].iloc[0])
            if n_features > args.max_bart_features:
                skipped.append(f"bart on {design} ({n_features} outcome features > --max-bart-features "
                               f"{args.max_bart_features}; voxel-wise BART costs O(features))")
    summary = summarise(runs)
    summary.to_csv(out / "summary.csv", index=False)
    paired = paired_against_inva(runs) if len(runs) else pd.DataFrame()
    paired.to_csv(out / "paired.csv", index=False)
    (out / "summary.md").write_text(markdown(summary, paired, skipped, command))
    if len(summary):
        plot(summary, out / "simulation_study.png")
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
