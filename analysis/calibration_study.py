#!/usr/bin/env python
"""Calibration study: coverage (raw and calibrated), interval width and CRPS over seeds and sizes.

For every simulation seed S and training size N, the script simulates the built-in ``paper``
design with ``simulate_paper(n_train_max + n_val + n_test, S)``, splits it with
``simulate.default_split`` (300 / 100 / 100 for the defaults), trains InVA on the first N training
subjects (the training sets are nested; validation and test subjects are the same for every N),
predicts the test subjects and scores the raw and the calibrated posterior predictive against the
observed outcomes and against the oracle (the true mean and sd of the simulation).

The validation subjects are used by ``InVA.fit`` twice: for early stopping and to fit the
calibrator. ``--calibration-split held-out`` measures what that reuse costs: the validation
subjects are split in two seeded halves, one for early stopping and one for calibration only
(``[training] calibration_share = 0.5``).

Outputs in ``--out``:
    runs.csv            one row per (size, seed): every metric (written as runs finish; re-running
                        the same command skips the runs already there)
    summary.csv / .md   per size: mean and sd across seeds of every metric
    calibration_study.png   observed vs nominal coverage per size (raw and calibrated, +-1 sd across
                        seeds) and CRPS / oracle CRPS against training size
    across_runs.json / .md  (with ``--chains M``) R-hat and ESS of the predictions of M fits on one
                        data set (``inference.across_run_diagnostics``)

Examples:
    python analysis/calibration_study.py --out study            # 3 sizes x 5 seeds, ~30 min on 2 CPU cores
    python analysis/calibration_study.py --quick --out /tmp/cs  # tiny smoke run (seconds)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's shared module
import analysis_common as common  # noqa: E402

LEVELS = common.LEVELS
CURVE_LEVELS = [round(0.05 * i, 2) for i in range(1, 20)]

# --quick: tiny networks (analysis_common.QUICK) trained for 3 epochs on an 8 x 8 grid
QUICK = dict(sizes=[24], seeds=[0, 1], n_val=12, n_test=10, epochs=3, samples=60, chains=2, grid=(8, 8))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--out", required=True, type=Path, help="output folder (created; re-runs resume)")
    p.add_argument("--sizes", default="50,100,300", help="training sizes, comma-separated (default 50,100,300)")
    p.add_argument("--seeds", default="0,1,2,3,4", help="simulation seeds, comma-separated (default 0..4)")
    p.add_argument("--n-val", type=int, default=100, help="validation subjects (default 100)")
    p.add_argument("--n-test", type=int, default=100, help="test subjects (default 100)")
    p.add_argument("--model", default="inva", help="preset name or TOML path (default inva)")
    p.add_argument("--epochs", type=int, help="override the preset's maximum number of epochs")
    p.add_argument("--samples", type=int, default=500, help="posterior predictive draws (default 500)")
    p.add_argument("--calibration-split", choices=["shared", "held-out"], default="shared",
                   help="shared: the validation subjects drive early stopping and calibration (what "
                        "`inva fit` does); held-out: half of them for each")
    p.add_argument("--chains", type=int, default=None,
                   help="also fit this many seeds on the first seed's data at the largest size and "
                        "report R-hat / ESS of the predictions across fits (default 0: skip; 2 with --quick)")
    p.add_argument("--design", choices=["paper", "volume"], default="paper",
                   help="paper (built-in, in memory) or volume (MNI152 design written under OUT/cohorts)")
    p.add_argument("--voxel-mm", type=int, default=6, help="voxel size of the volume design (default 6)")
    p.add_argument("--noise", choices=["independent", "smooth"], default="independent",
                   help="outcome noise of the design: independent per pixel, or smooth (Gaussian PSF)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="tiny smoke-test settings (seconds)")
    return p.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def settings(args) -> dict:
    share = 0.5 if args.calibration_split == "held-out" else 0.0
    if args.quick:
        return dict(QUICK, chains=QUICK["chains"] if args.chains is None else args.chains, noise=args.noise,
                    design="paper", out=args.out, quick=True, calibration_share=share)
    return dict(sizes=_ints(args.sizes), seeds=_ints(args.seeds), n_val=args.n_val, n_test=args.n_test,
                epochs=args.epochs, samples=args.samples, chains=args.chains or 0, quick=False,
                grid=None, noise=args.noise, design=args.design, voxel_mm=args.voxel_mm, out=args.out,
                calibration_share=share)


def region_columns(pred, space, fit_seed: int) -> dict:
    """Region coverage (joint and independent voxels) for 8 and 50 regions and the whole mask, energy
    and variogram scores (joint and independent), and the time of the region summaries."""
    from inva_pyro.criticism.regions import region_metrics
    from inva_pyro.criticism.scores import multivariate_scores
    row = {}
    for name, labels in common.study_regions(space).items():
        start = time.perf_counter()
        pred.regions(labels)
        row[f"regions_seconds_{name}"] = time.perf_counter() - start
        m = region_metrics(pred, labels, LEVELS)
        for tag, block in ((name, m["labels"]), ("all", m["all"])):
            for lv in LEVELS:
                k = format(lv, "g")
                row[f"{tag}_cov{k}"] = block["coverage"][k]
                row[f"{tag}_cov{k}_ind"] = block["independent_coverage"][k]
            row[f"{tag}_crps"], row[f"{tag}_crps_ind"] = block["crps"], block["independent_crps"]
    scores = multivariate_scores(pred, seed=fit_seed)
    row.update({k: scores[k] for k in ("energy_joint", "energy_independent", "variogram_joint",
                                       "variogram_independent")})
    return row


def make_preset(model: str, cfg: dict):
    """The preset ``model`` with the study's settings: --epochs, the calibration split, --quick's networks."""
    changes = {"training.calibration_share": cfg.get("calibration_share", 0.0)}
    if cfg["epochs"]:
        changes["training.epochs"] = cfg["epochs"]
    return common.preset_with(model, changes, quick=cfg.get("quick", False))


def one_run(cohort, idx, size: int, seed: int, fit_seed: int, cfg: dict, args) -> tuple[dict, object]:
    from inva_pyro import InVA
    from inva_pyro.criticism.diagnostics import collapse_report
    from inva_pyro.criticism.evaluation import coverage_curve

    data = cohort.all
    train = data.subset(idx["train"][:size])
    val = data.subset(idx["val"])
    test = data.subset(idx["test"])
    space = cohort.spaces[cohort.outcome_name]
    start = time.perf_counter()
    model = InVA(make_preset(args.model, cfg)).fit(train, val, seed=fit_seed, progress=False)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    pred = model.predict(test, num_samples=cfg["samples"], levels=sorted(set(LEVELS) | set(CURVE_LEVELS)),
                         seed=fit_seed)
    predict_s = time.perf_counter() - start
    truth = dict(truth_mean=test.truth_mean, truth_sd=test.truth_sd)
    cal, raw = pred.metrics(calibrated=True, **truth), pred.metrics(calibrated=False, **truth)
    row = {"size": size, "seed": seed, "fit_seed": fit_seed, "n_val": model.info["n_val"],
           "n_calibration": model.info["n_calibration"], "n_test": len(test),
           "epochs": len(model.history["epoch"]), "best_epoch": model.history["best_epoch"],
           "fit_seconds": round(fit_s, 1), "mse": cal["mse"], "oracle_mse": cal["oracle_mse"],
           "crps": cal["crps"], "crps_raw": raw["crps"], "oracle_crps": cal["oracle_crps"],
           "nll": cal["nll"], "nll_raw": raw["nll"], "tau": model.calibrator.tau}
    for lv in LEVELS:
        key = format(lv, "g")
        row[f"cov{key}"] = cal["coverage"][key]
        row[f"cov{key}_raw"] = raw["coverage"][key]
        row[f"width{key}"] = cal["interval_width"][key]
        row[f"width{key}_raw"] = raw["interval_width"][key]
    row.update(region_columns(pred, space, fit_seed), predict_seconds=predict_s, noise=cfg["noise"])
    covariance = model.spatial_covariance
    ratios = covariance.info["mean_square_ratio"] if covariance is not None else {}
    row.update(joint_alpha=covariance.alpha if covariance is not None else None,
               joint_beta=covariance.beta if covariance is not None else None,
               joint_ratio_all=ratios.get("all"), joint_ratio_voxel=ratios.get("voxel"))
    row["regions_time_ratio"] = (predict_s + row["regions_seconds_r8"] + row["regions_seconds_r50"]) / predict_s
    row["crps_ratio"] = row["crps"] / row["oracle_crps"]
    row["crps_raw_ratio"] = row["crps_raw"] / row["oracle_crps"]
    oracle_width = {lv: float(np.mean(2 * test.truth_sd)) * _z(lv) for lv in LEVELS}
    for lv in LEVELS:
        row[f"oracle_width{format(lv, 'g')}"] = oracle_width[lv]
    row["curve"] = json.dumps({"raw": coverage_curve(pred, False, CURVE_LEVELS),
                               "calibrated": coverage_curve(pred, True, CURVE_LEVELS)})
    collapse = collapse_report(model.module, model.tensors(train)[0])
    row["active_units"] = json.dumps(collapse["active_units"]["count"])
    row["collapsed"] = ",".join(collapse["collapsed_modalities"])
    return row, model


def _z(level: float) -> float:
    from scipy import stats
    return float(stats.norm.ppf((1 + level) / 2))


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    metrics = ([f"cov{format(lv, 'g')}" for lv in LEVELS] + [f"cov{format(lv, 'g')}_raw" for lv in LEVELS]
               + [f"width{format(lv, 'g')}" for lv in LEVELS] + [f"width{format(lv, 'g')}_raw" for lv in LEVELS]
               + [f"oracle_width{format(lv, 'g')}" for lv in LEVELS]
               + ["crps", "crps_raw", "oracle_crps", "crps_ratio", "crps_raw_ratio", "mse", "oracle_mse",
                  "nll", "nll_raw", "tau", "best_epoch", "fit_seconds"]
               + [f"{tag}_cov{format(lv, 'g')}{ind}" for tag in ("r8", "r50", "all") for lv in LEVELS for ind in ("", "_ind")]
               + ["energy_joint", "energy_independent", "variogram_joint", "variogram_independent",
                  "regions_time_ratio", "predict_seconds"])
    rows = []
    for size, group in runs.groupby("size"):
        row = {"size": int(size), "n_seeds": len(group)}
        for m in metrics:
            if m not in group:
                continue
            values = group[m].astype(float)
            row[f"{m}_mean"] = values.mean()
            row[f"{m}_sd"] = values.std(ddof=1) if len(values) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(summary: pd.DataFrame, command: str, calibration_split: str) -> str:
    f = lambda s, m, d=3: f"{s[m + '_mean']:.{d}f} ± {s[m + '_sd']:.{d}f}"  # noqa: E731
    lines = [f"Command: `{command}`", "",
             f"Calibration subjects: {calibration_split}. Mean ± sd across seeds; coverage is the fraction "
             "of test voxels (all subjects, all voxels) inside the central interval.", "",
             "| N train | seeds | level | calibrated coverage | raw coverage | calibrated width | raw width | oracle width |",
             "|---|---|---|---|---|---|---|---|"]
    for _, s in summary.iterrows():
        for lv in LEVELS:
            k = format(lv, "g")
            lines.append(f"| {int(s['size'])} | {int(s['n_seeds'])} | {k} | {f(s, 'cov' + k)} | {f(s, 'cov' + k + '_raw')} "
                         f"| {f(s, 'width' + k)} | {f(s, 'width' + k + '_raw')} | {s['oracle_width' + k + '_mean']:.3f} |")
    lines += ["", "| N train | CRPS calibrated | CRPS raw | oracle CRPS | CRPS / oracle | raw CRPS / oracle | MSE | oracle MSE | tau | best epoch |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for _, s in summary.iterrows():
        lines.append(f"| {int(s['size'])} | {f(s, 'crps', 4)} | {f(s, 'crps_raw', 4)} | {f(s, 'oracle_crps', 4)} "
                     f"| {f(s, 'crps_ratio')} | {f(s, 'crps_raw_ratio')} | {f(s, 'mse', 4)} | {f(s, 'oracle_mse', 4)} "
                     f"| {f(s, 'tau', 2)} | {f(s, 'best_epoch', 0)} |")
    if "r8_cov0.5_mean" in summary:
        lines += ["", "Region means (joint calibrated; independent voxels in brackets): coverage of the central "
                  "intervals of 8 blocks, 50 Voronoi regions and the whole mask, beside voxel coverage.", "",
                  "| N train | level | voxels | 8 regions | 50 regions | whole mask |", "|---|---|---|---|---|---|"]
        for _, s in summary.iterrows():
            for lv in LEVELS:
                k = format(lv, "g")
                cells = [f"{f(s, t + '_cov' + k)} ({s[t + '_cov' + k + '_ind_mean']:.3f})" for t in ("r8", "r50", "all")]
                lines.append(f"| {int(s['size'])} | {k} | {f(s, 'cov' + k)} | " + " | ".join(cells) + " |")
        lines += ["", "| N train | energy joint | energy independent | variogram joint | variogram independent "
                  "| predict time with / without regions |", "|---|---|---|---|---|---|"]
        for _, s in summary.iterrows():
            lines.append(f"| {int(s['size'])} | {f(s, 'energy_joint', 3)} | {f(s, 'energy_independent', 3)} | "
                         f"{f(s, 'variogram_joint', 4)} | {f(s, 'variogram_independent', 4)} | "
                         f"{f(s, 'regions_time_ratio', 3)} |")
    return "\n".join(lines) + "\n"


def plot(runs: pd.DataFrame, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sizes = sorted(runs["size"].unique())
    fig = Figure(figsize=(4.2 * (len(sizes) + 1), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(sizes) + 1, squeeze=False)[0]
    for ax in axes[1:len(sizes)]:
        ax.sharey(axes[0])
    nominal = np.array(CURVE_LEVELS)
    for ax, size in zip(axes, sizes):
        curves = [json.loads(c) for c in runs.loc[runs["size"] == size, "curve"]]
        for kind, color, style in (("raw", "tab:red", "--"), ("calibrated", "tab:blue", "-")):
            values = np.array([c[kind] for c in curves])
            mean, sd = values.mean(0), values.std(0, ddof=1) if len(values) > 1 else np.zeros(values.shape[1])
            ax.plot(nominal, mean - nominal, color=color, linestyle=style, marker=".", label=kind)
            ax.fill_between(nominal, mean - nominal - sd, mean - nominal + sd, color=color, alpha=0.2)
        ax.axhline(0, color="grey", linestyle=":", label="ideal")
        ax.axhspan(-0.02, 0.02, color="green", alpha=0.12, label="±0.02")
        ax.set_xlim(0, 1)
        ax.set_xlabel("nominal level of the central interval")
        ax.set_ylabel("observed − nominal coverage")
        ax.set_title(f"N train = {size} ({len(curves)} seeds, ±1 sd)")
        ax.legend(fontsize="small", loc="lower left")
    ax = axes[-1]
    summary = summarise(runs)
    for col, label, color in (("crps_ratio", "calibrated", "tab:blue"), ("crps_raw_ratio", "raw", "tab:red")):
        ax.errorbar(summary["size"], summary[f"{col}_mean"], yerr=summary[f"{col}_sd"].fillna(0), marker="o",
                    color=color, label=label, capsize=3)
    ax.axhline(1.2, color="grey", linestyle="--", label="1.2 × oracle")
    ax.axhline(1.0, color="grey", linestyle=":")
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("training subjects")
    ax.set_ylabel("CRPS / oracle CRPS")
    ax.set_title("Probabilistic accuracy")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    return path


def across_runs(cohort, idx, cfg, args, first_model, out: Path) -> dict:
    """M fits (seeds 0..M-1) on the first data seed at the largest size, as chains."""
    from inva_pyro import InVA
    from inva_pyro.criticism.inference import across_run_diagnostics

    size, seed = max(cfg["sizes"]), cfg["seeds"][0]
    models = [first_model]
    for fit_seed in range(1, cfg["chains"]):
        train, val = cohort.all.subset(idx["train"][:size]), cohort.all.subset(idx["val"])
        models.append(InVA(make_preset(args.model, cfg)).fit(train, val, seed=fit_seed, progress=False))
    test = cohort.all.subset(idx["test"])
    diag = across_run_diagnostics(models, test, num_draws=min(200, cfg["samples"]), seed=0)
    diag.update(size=size, data_seed=seed, chains=len(models))
    (out / "across_runs.json").write_text(json.dumps(diag, indent=2))
    s = diag["summary"]
    lines = [f"{len(models)} fits (seeds 0..{len(models) - 1}) on data seed {seed}, N train = {size}; "
             f"{diag['n_draws']} draws per fit, {diag['n_features']} test voxel-subject pairs.", "",
             "| quantity | R-hat median | R-hat 90% | R-hat max | share R-hat > 1.01 | share > 1.1 | ESS bulk median | ESS bulk min |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in s.items():
        lines.append(f"| {name} | {r['rhat_median']:.3f} | {r['rhat_q90']:.3f} | {r['rhat_max']:.3f} | "
                     f"{r['rhat_gt_1.01']:.2f} | {r['rhat_gt_1.1']:.2f} | {r['ess_bulk_median']:.0f} | {r['ess_bulk_min']:.0f} |")
    (out / "across_runs.md").write_text("\n".join(lines) + "\n")
    return diag


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = settings(args)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    runs_csv = out / "runs.csv"
    runs = pd.read_csv(runs_csv) if runs_csv.exists() else pd.DataFrame()
    done = set(zip(runs["size"], runs["seed"])) if len(runs) else set()
    command = "python analysis/calibration_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    first_model = None
    for seed in cfg["seeds"]:
        cohort, idx = common.simulate_split(seed, cfg)
        for size in sorted(cfg["sizes"]):
            need_model = cfg["chains"] > 1 and seed == cfg["seeds"][0] and size == max(cfg["sizes"])
            if (size, seed) in done and not need_model:
                continue
            row, model = one_run(cohort, idx, size, seed, seed, cfg, args)
            if need_model:
                first_model = model
            if (size, seed) in done:
                continue
            runs = pd.concat([runs, pd.DataFrame([row])], ignore_index=True)
            runs.to_csv(runs_csv, index=False)
            print(f"size {size} seed {seed}: coverage cal " +
                  " ".join(f"{row['cov' + format(lv, 'g')]:.3f}" for lv in LEVELS) + " raw " +
                  " ".join(f"{row['cov' + format(lv, 'g') + '_raw']:.3f}" for lv in LEVELS) +
                  f"; CRPS/oracle {row['crps_ratio']:.3f}; {row['fit_seconds']:.0f} s", flush=True)
        if first_model is not None and seed == cfg["seeds"][0]:
            across_runs(cohort, idx, cfg, args, first_model, out)
            first_model = None
    runs = runs[runs["size"].isin(cfg["sizes"]) & runs["seed"].isin(cfg["seeds"])]
    summary = summarise(runs)
    summary.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(markdown(summary, command, args.calibration_split))
    plot(runs, out / "calibration_study.png")
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
