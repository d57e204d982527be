#!/usr/bin/env python
"""Posterior predictive check report for a run folder and a cohort manifest.

Predicts the manifest's test subjects (every subject when it has no split column) with the run's
model and writes into ``--out``:

    ppc_summary.md / .json   the report: coverage and scores (raw and calibrated), posterior
                             predictive p-values of test statistics, PIT uniformity, PSIS-LOO,
                             posterior-collapse diagnostics, the guide's Pareto k-hats and, with
                             several ``--run`` folders, R-hat / ESS of the predictions across fits
    ppc.png                  az.plot_ppc: observed vs replicated outcome densities (raw, calibrated)
    ppc_pit.png              az.plot_bpv(kind="u_value") for both, and az.plot_loo_pit
    test_statistics.png      replicated vs observed value of each test statistic
    calibration_curve.png, pit_histogram.png, latent_activity.png
    inference_data.nc        the ArviZ InferenceData behind the figures (see inva_pyro/criticism/inference.py)

Examples:
    inva simulate --out cohort && inva fit --manifest cohort/manifest.csv --inputs x1,x2,x3 --outcome y --out run
    python analysis/ppc.py --run run --manifest cohort/manifest.csv --out ppc_report
    python analysis/ppc.py --run run --run run_seed1 --run run_seed2 --manifest cohort/manifest.csv --out ppc_report
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's shared module
import analysis_common as common  # noqa: E402

LEVELS = common.LEVELS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, action="append",
                   help="run folder written by `inva fit`; repeat it for fits of the same data with "
                        "different seeds (the first one is checked, all of them enter R-hat / ESS)")
    p.add_argument("--manifest", required=True, type=Path, help="cohort manifest CSV (with the outcome column)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--samples", type=int, help="posterior predictive draws for the maps (default: the preset's)")
    p.add_argument("--draws", type=int, default=200, help="draws kept in the InferenceData (default 200)")
    p.add_argument("--features", type=int, default=64, help="seeded feature subset of the InferenceData (default 64)")
    p.add_argument("--psis-subjects", type=int, default=16, help="subjects for the guide's Pareto k-hat (default 16)")
    p.add_argument("--psis-particles", type=int, default=1000, help="importance samples per subject (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small settings for a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.samples = args.samples or 60
        args.draws, args.features, args.psis_subjects, args.psis_particles = 40, 16, 2, 100
    return args


def load_subjects(run: Path, manifest: Path):
    """The run's model and the manifest's subjects to check (test rows when there is a split)."""
    from inva_pyro import Cohort
    from inva_pyro.registry import load_model
    from inva_pyro.runs import read_spaces

    model = load_model(run)
    truth = {}
    spec = manifest.parent / "cohort.json"
    if spec.exists():
        truth = json.loads(spec.read_text()).get("truth") or {}
    # new subjects are read in the spaces the run was fitted in (as `inva predict` reads them)
    cohort = Cohort.from_manifest(manifest, model.info["inputs"], model.info["outcome"],
                                  space=read_spaces(run, model.info) or None,
                                  truth_mean=truth.get("mean"), truth_sd=truth.get("sd"))
    return model, (cohort.test if cohort.has_split else cohort.all)


# --------------------------------------------------------------------------- test statistics

STATISTICS = {
    "mean": lambda a: a.mean(axis=(-2, -1)),
    "sd": lambda a: a.std(axis=(-2, -1)),
    "q01": lambda a: np.quantile(a.reshape(*a.shape[:-2], -1), 0.01, axis=-1),
    "q99": lambda a: np.quantile(a.reshape(*a.shape[:-2], -1), 0.99, axis=-1),
    "between-subject sd": lambda a: a.mean(axis=-1).std(axis=-1),
}


def _replicates(idata):
    """(name, observed y, replicates (draws, *y.shape)) for the raw and the calibrated predictive."""
    y = idata.observed_data["outcome"].values
    for var in ("outcome", "outcome_calibrated"):
        if var in idata.posterior_predictive:
            yield var, y, idata.posterior_predictive[var].values.reshape(-1, *y.shape)


def ppc_pvalues(idata) -> dict:
    """P(T(y_rep) >= T(y)) over draws, for each test statistic and each predictive (raw, calibrated).

    Values near 0 or 1 flag a feature of the data the predictive does not reproduce.
    """
    out = {}
    for var, y, rep in _replicates(idata):
        out[var] = {}
        for name, stat in STATISTICS.items():
            t_obs, t_rep = float(stat(y)), stat(rep)
            out[var][name] = {"observed": t_obs, "replicated_mean": float(t_rep.mean()),
                              "replicated_sd": float(t_rep.std()), "p_value": float(np.mean(t_rep >= t_obs))}
    return out


def pit_uniformity(idata) -> dict:
    """u = P(y_rep <= y) per observed value; Kolmogorov-Smirnov distance to the uniform."""
    from scipy import stats

    out = {}
    for var, y, rep in _replicates(idata):
        u = (np.mean(rep < y, axis=0) + np.mean(rep <= y, axis=0)) / 2
        ks = stats.kstest(u.ravel(), "uniform")
        out[var] = {"ks_distance": float(ks.statistic), "share_u_below_0.05": float(np.mean(u < 0.05)),
                    "share_u_above_0.95": float(np.mean(u > 0.95))}
    return out


def plot_statistics(path: Path, idata) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    y = idata.observed_data["outcome"].values
    fig = Figure(figsize=(3.2 * len(STATISTICS), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(STATISTICS))
    for ax, (name, stat) in zip(axes, STATISTICS.items()):
        for var, color in (("outcome", "tab:red"), ("outcome_calibrated", "tab:blue")):
            if var in idata.posterior_predictive:
                rep = idata.posterior_predictive[var].values.reshape(-1, *y.shape)
                ax.hist(stat(rep), bins=25, color=color, alpha=0.5,
                        label="raw" if var == "outcome" else "calibrated")
        ax.axvline(float(stat(y)), color="black", linewidth=2, label="observed")
        ax.set_title(f"T = {name}")
        ax.set_xlabel("T(y_rep)")
    axes[0].set_ylabel("draws")
    axes[0].legend(fontsize="small")
    fig.suptitle("Posterior predictive test statistics (kept features of every subject)", fontsize="medium")
    fig.savefig(path, dpi=110)
    return path


# --------------------------------------------------------------------------- report


def interpret(summary: dict) -> list[str]:
    lines = []
    m = summary["metrics"]
    raw90, cal90 = m["raw"]["coverage"].get("0.9"), m["coverage"].get("0.9")
    if raw90 is not None and raw90 < 0.88:
        lines.append(f"The raw posterior predictive is over-confident: its 90% intervals cover {raw90:.3f}.")
    elif raw90 is not None and raw90 > 0.92:
        lines.append(f"The raw posterior predictive is under-confident: its 90% intervals cover {raw90:.3f}.")
    if cal90 is not None:
        ok = abs(cal90 - 0.9) <= 0.02
        lines.append(f"Calibrated 90% intervals cover {cal90:.3f} ({'within' if ok else 'outside'} 0.02 of nominal).")
    if m.get("oracle_crps"):
        lines.append(f"CRPS is {m['crps'] / m['oracle_crps']:.2f} x the oracle's (the true predictive).")
    for var, stats_ in summary["pvalues"].items():
        extreme = [name for name, s in stats_.items() if s["p_value"] < 0.025 or s["p_value"] > 0.975]
        which = "raw" if var == "outcome" else "calibrated"
        if extreme:
            lines.append(f"The {which} predictive misses these test statistics (p outside [0.025, 0.975]): "
                         f"{', '.join(extreme)}.")
        else:
            lines.append(f"The {which} predictive reproduces every test statistic (p within [0.025, 0.975]).")
    diag = summary.get("diagnostics", {})
    collapse = diag.get("collapse")
    if collapse:
        if collapse.get("warnings"):
            lines += collapse["warnings"]
        else:
            lines.append("No posterior collapse: every modality has active shallow units and reconstructions "
                         "that vary across subjects.")
    psis = diag.get("psis")
    if psis and psis.get("khat"):
        lines.append(f"Guide Pareto k-hat (per subject, output layer at its mean): median {psis['median']:.2f}, "
                     f"{100 * psis['share_above_0.7']:.0f}% above 0.7"
                     + (" - the amortised q(h, z | x) is a poor importance proposal for the exact latent "
                        "posterior; read latent sds as encoder features, not posterior uncertainty."
                        if psis["share_above_0.7"] > 0.5 else "."))
    across = summary.get("across_runs")
    if across:
        r = across["summary"]["mean"]
        lines.append(f"Across {across['n_chains']} fits, R-hat of the predictive mean: median {r['rhat_median']:.2f}, "
                     f"{100 * r['rhat_gt_1.1']:.0f}% above 1.1; between-fit sd / within-fit sd = {r['sd_ratio']:.2f}.")
    return lines


def markdown(summary: dict) -> str:
    m = summary["metrics"]
    lines = ["# Posterior predictive check", "",
             f"Run: `{summary['run']}`; manifest: `{summary['manifest']}`; {m['n_subjects']} subjects x "
             f"{m['n_features']} features (InferenceData: {summary['draws']} draws, {summary['features']} seeded features).",
             "", "## Summary", ""] + [f"- {line}" for line in interpret(summary)]
    lines += ["", "## Coverage of central intervals", "", "| level | calibrated | raw | calibrated width | raw width |",
              "|---|---|---|---|---|"]
    for key in m["coverage"]:
        lines.append(f"| {key} | {m['coverage'][key]:.3f} | {m['raw']['coverage'][key]:.3f} | "
                     f"{m['interval_width'][key]:.3f} | {m['raw']['interval_width'][key]:.3f} |")
    lines += ["", "| score | calibrated | raw | oracle |", "|---|---|---|---|",
              f"| CRPS | {m['crps']:.4f} | {m['raw']['crps']:.4f} | "
              + (f"{m['oracle_crps']:.4f}" if m.get("oracle_crps") else "n/a") + " |",
              f"| NLL | {m['nll']:.4f} | {m['raw']['nll']:.4f} | n/a |",
              f"| MSE | {m['mse']:.4f} | | " + (f"{m['oracle_mse']:.4f}" if m.get("oracle_mse") else "n/a") + " |"]
    lines += ["", "## Posterior predictive p-values P(T(y_rep) >= T(y))", "",
              "| statistic | observed | raw: replicated mean ± sd | raw p | calibrated: replicated mean ± sd | calibrated p |",
              "|---|---|---|---|---|---|"]
    pv = summary["pvalues"]
    for name in STATISTICS:
        r, c = pv.get("outcome", {}).get(name), pv.get("outcome_calibrated", {}).get(name)
        obs = (r or c)["observed"]
        cell = lambda s: (f"{s['replicated_mean']:.4f} ± {s['replicated_sd']:.4f} | {s['p_value']:.3f}"  # noqa: E731
                          if s else "n/a | n/a")
        lines.append(f"| {name} | {obs:.4f} | {cell(r)} | {cell(c)} |")
    lines += ["", "## PIT uniformity (u = P(y_rep <= y))", "", "| predictive | KS distance | share u < 0.05 | share u > 0.95 |",
              "|---|---|---|---|"]
    for var, s in summary["pit"].items():
        lines.append(f"| {'raw' if var == 'outcome' else 'calibrated'} | {s['ks_distance']:.3f} | "
                     f"{s['share_u_below_0.05']:.3f} | {s['share_u_above_0.95']:.3f} |")
    diag = summary.get("diagnostics", {})
    if "loo" in diag:
        loo = diag["loo"]
        lines += ["", "## PSIS-LOO (pointwise log-likelihood, raw predictive)", "",
                  f"elpd_loo = {loo['elpd_loo']:.1f} (se {loo['se']:.1f}) over {loo['n_values']} values "
                  f"({loo['elpd_loo_per_value']:.3f} per value), p_loo = {loo['p_loo']:.1f}; "
                  f"{100 * loo['share_pareto_k_above_0.7']:.1f}% of Pareto k above 0.7 (max {loo['pareto_k_max']:.2f})."]
    if "collapse" in diag:
        c = diag["collapse"]
        lines += ["", "## Posterior collapse", "",
                  f"Active units (Var of posterior means > {c['threshold']:g}) on {c['n_subjects']} subjects:", "",
                  "| modality | level | active / units | KL (nats/subject) | reconstruction var. ratio |", "|---|---|---|---|---|"]
        for name, levels in c["active_units"]["count"].items():
            for level, count in levels.items():
                kl = sum(c["kl_per_dimension"][name][level])
                ratio = c["reconstruction"][name]["ratio"] if level == "shallow" else None
                lines.append(f"| {name} | {level} | {count} / {c['active_units']['dims'][name][level]} | {kl:.2f} | "
                             + (f"{ratio:.3f}" if ratio is not None else "") + " |")
    if "psis" in diag:
        p = diag["psis"]
        lines += ["", "## Pareto k-hat of the guide", "",
                  f"{len(p['khat'])} subjects, {p['num_particles']} importance samples each: median {p['median']:.2f}, "
                  f"max {p['max']:.2f}, share above 0.7: {p['share_above_0.7']:.2f} (k < 0.5 good, 0.5-0.7 usable, "
                  "> 0.7 poor)."]
    across = summary.get("across_runs")
    if across:
        lines += ["", f"## Across {across['n_chains']} fits (chains)", "",
                  "| quantity | R-hat median | R-hat max | share > 1.1 | ESS bulk median | between/within sd |",
                  "|---|---|---|---|---|---|"]
        for name, r in across["summary"].items():
            lines.append(f"| {name} | {r['rhat_median']:.3f} | {r['rhat_max']:.3f} | {r['rhat_gt_1.1']:.2f} | "
                         f"{r['ess_bulk_median']:.0f} | {r['sd_ratio']:.2f} |")
    lines += ["", "Figures: ppc.png, ppc_pit.png, test_statistics.png, calibration_curve.png, pit_histogram.png"
              + (", latent_activity.png" if "collapse" in diag else "") + "."]
    return "\n".join(lines) + "\n"


def _plain(value):
    """JSON's fallback for numpy scalars and arrays."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def main(argv=None) -> int:
    args = parse_args(argv)
    from inva_pyro import InVA
    from inva_pyro.criticism import figures, inference
    from inva_pyro.criticism.evaluation import CURVE_LEVELS, coverage_curve, curve_levels, loo_summary
    from inva_pyro.errors import InputError

    try:
        model, subset = load_subjects(args.run[0], args.manifest)
    except InputError as exc:
        print(f"ppc: error: {exc}", file=sys.stderr)
        return 2
    if subset.outcome is None:
        print(f"ppc: error: {args.manifest}: the outcome column '{model.info['outcome']}' is needed", file=sys.stderr)
        return 2
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    pred = model.predict(subset, num_samples=args.samples, levels=sorted(set(LEVELS) | set(CURVE_LEVELS)), seed=args.seed)
    truth = dict(truth_mean=subset.truth_mean, truth_sd=subset.truth_sd)
    metrics, raw = pred.metrics(calibrated=True, **truth), pred.metrics(calibrated=False, **truth)
    keep = {format(lv, "g") for lv in LEVELS}
    for m in (metrics, raw):
        for key in ("coverage", "interval_width"):
            m[key] = {k: v for k, v in m[key].items() if k in keep}
    metrics["raw"] = {k: raw[k] for k in ("coverage", "interval_width", "crps", "nll")}

    diagnostics = {}
    if isinstance(model, InVA):  # the Pyro program (InVA and the VAE peers): its diagnostics too
        from inva_pyro.criticism.diagnostics import model_diagnostics
        diagnostics = model_diagnostics(model, subset, psis_subjects=args.psis_subjects,
                                        psis_particles=args.psis_particles, seed=args.seed)
        idata = inference.build_inference_data(model, subset, pred, num_draws=args.draws, n_features=args.features,
                                               seed=args.seed)
        diagnostics["loo"] = loo_summary(idata)
    else:
        idata = inference.inference_data_from_prediction(pred, num_draws=args.draws, n_features=args.features,
                                                         seed=args.seed)
    inference.save_inference_data(idata, out / "inference_data.nc")

    summary = {"run": str(args.run[0]), "manifest": str(args.manifest), "draws": args.draws,
               "features": int(idata.observed_data.sizes["feature"]), "metrics": metrics,
               "pvalues": ppc_pvalues(idata), "pit": pit_uniformity(idata), "diagnostics": diagnostics}
    if len(args.run) > 1:
        models = [model] + [load_subjects(run, args.manifest)[0] for run in args.run[1:]]
        summary["across_runs"] = inference.across_run_diagnostics(models, subset, num_draws=args.draws,
                                                                  n_features=args.features, seed=args.seed)
        summary["runs"] = [str(r) for r in args.run]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        figures.plot_ppc(out / "ppc.png", idata)
        figures.plot_ppc_pit(out / "ppc_pit.png", idata)
        plot_statistics(out / "test_statistics.png", idata)
        figures.plot_calibration_curve(out / "calibration_curve.png", curve_levels(pred),
                                       coverage_curve(pred, False), coverage_curve(pred, True))
        figures.plot_pit_histogram(out / "pit_histogram.png", pred.pit(calibrated=True))
        if "collapse" in diagnostics:
            figures.plot_latent_activity(out / "latent_activity.png", diagnostics["collapse"])
    summary = json.loads(json.dumps(summary, default=_plain), parse_constant=lambda _: None)  # NaN, inf: null
    (out / "ppc_summary.json").write_text(json.dumps(summary, indent=2))
    (out / "ppc_summary.md").write_text(markdown(summary))
    print((out / "ppc_summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
