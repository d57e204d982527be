#!/usr/bin/env python
"""How well can region intervals be calibrated from n validation subjects? Bias and spread, measured.

The region intervals of ``predict/spatial.py`` are fitted on the validation subjects (100 by default).
A region family with one region per subject (the whole mask) then rests on about 100 numbers, and a
calibration fitted on 100 exchangeable subjects covers a new subject with a probability that itself
varies from one validation set to the next: for a split-conformal interval at level p its sd is
about sqrt(p (1 - p) / (n + 2)) (0.050 at p = 0.5 and n = 100), before the test set's own binomial
noise is added. A goal of "within 0.03 of nominal" for one fit is then a statement about one draw of
that spread. This script separates the two parts:

1. fits the default preset once (300 training subjects, 100 validation subjects that also drive
   early stopping, as ``inva fit`` does) and predicts a pool of ``--pool`` fresh subjects of the
   same design (true mean and sd known);
2. scores the fitted calibration on the whole pool (the test noise is then small: sd 0.011 at
   p = 0.5 for 2,000 subjects): the coverage a user of this fit gets;
   With ``--calibration-share s`` the fit keeps that share of the validation subjects out of early
   stopping and calibrates on them only (``[training] calibration_share``); the same calibration
   refitted on the early-stopping subjects is scored beside it, which measures what reusing the
   subjects that chose the epoch costs;
3. refits only the joint calibration (``fit_spatial_covariance``, the networks unchanged) on ``--replicates``
   random sets of n pool subjects (n in ``--n-cal``) and scores each on the rest of the pool: the
   mean over replicates is the procedure's bias, their sd its spread, shown beside the theoretical
   sd sqrt(p (1 - p) (1 / (n + 2) + 1 / n_test));
4. energy score of the joint and of the independent-voxel predictive on the pool, per subject, with
   the paired difference and its standard error;
5. with ``--ranks``, the same coverage and energy score for the factor of ``[prediction]
   covariance_rank = r`` (probabilistic PCA of rank r instead of the sample second moment), each
   refitted on this fit's validation subjects: which covariance estimate the multivariate score prefers.

Writes OUT/limits.json, OUT/limits.md (tables) and OUT/limits.png (coverage by family and n).

    python analysis/region_calibration_limits.py --design paper --noise independent --out DIR
    python analysis/region_calibration_limits.py --quick --out /tmp/rcl     # seconds
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's shared module
import analysis_common as common  # noqa: E402

LEVELS = common.LEVELS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.pool_study_arguments(p, n_cal="100,400")
    p.add_argument("--replicates", type=int, default=40)
    p.add_argument("--epochs", type=int)
    p.add_argument("--ranks", default="", help="covariance ranks to compare with the default factor, e.g. 4,16,64")
    p.add_argument("--calibration-share", type=float, default=0.0,
                   help="[training] calibration_share of the fit: that share of the validation subjects calibrates, "
                   "the rest drives early stopping; a row then shows the calibration refitted on the early-stopping "
                   "subjects (the reuse) beside it (default 0: one set does both, as before)")
    p.add_argument("--finals", default="all", help="with --ranks: the final factor of each, comma-separated: all "
                   "(fitted on every validation subject) and/or folds (the average of the cross-fitted folds')")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    return p.parse_args(argv)


def coverage_by_family(joint, mean, sd, observed, families) -> dict:
    """family -> level -> coverage of its region means (every region and subject pooled)."""
    from inva_pyro.predict.regions import region_interval
    out = {}
    for name, weights in families.items():
        m, s = joint.region_moments(mean, sd, weights)
        y = np.asarray(weights @ observed.T).T
        out[name] = {}
        for lv in LEVELS:
            lo, hi = region_interval(joint, m, s, weights, lv)
            out[name][lv] = float(np.mean((y >= lo) & (y <= hi)))
    return out


def energy_per_subject(mean, sd, joint, observed, seed: int) -> dict:
    from inva_pyro.criticism.scores import DRAWS, StreamingEnergy
    from inva_pyro.predict.spatial import spatial_draws
    values = {}
    for name, independent in (("joint", False), ("independent", True)):
        energy = StreamingEnergy(observed)
        for chunk in spatial_draws(mean, sd, joint, DRAWS, seed=seed, independent=independent, chunk=8):
            energy.update(chunk)
        values[name] = energy.value()
    diff = values["joint"] - values["independent"]
    return {"energy_joint": float(values["joint"].mean()), "energy_independent": float(values["independent"].mean()),
            "difference": float(diff.mean()), "difference_se": float(diff.std(ddof=1) / np.sqrt(len(diff))),
            "n_subjects": int(len(diff))}


def study_settings(args) -> dict:
    """The simulation and fit of ``common.simulate_split``, and the calibration set sizes (``--quick``: tiny)."""
    n_train, n_val = (24, 12) if args.quick else (300, 100)
    if args.quick:
        args.pool, args.replicates, args.n_cal = 60, 3, "12"
    return dict(sizes=[n_train], n_val=n_val, n_test=args.pool, epochs=3 if args.quick else args.epochs,
                grid=(8, 8) if args.quick else None, noise=args.noise, design=args.design,
                voxel_mm=args.voxel_mm, out=args.out, n_cal=[int(v) for v in args.n_cal.split(",")])


def fit_and_predict(args, cfg: dict) -> dict:
    """Fit the default preset on the training subjects, predict the pool: everything the tables score."""
    from inva_pyro import InVA
    from inva_pyro.predict.spatial import label_weights
    from scipy import sparse

    cohort, train, val, pool = common.train_val_pool(args.seed, cfg)
    space = cohort.spaces[cohort.outcome_name]
    changes = {"training.calibration_share": args.calibration_share}
    if cfg["epochs"]:
        changes["training.epochs"] = cfg["epochs"]
    preset = common.preset_with("inva", changes, quick=args.quick)
    start = time.perf_counter()
    model = InVA(preset).fit(train, val, seed=args.seed, progress=False)
    fit_s = time.perf_counter() - start
    pred = model.predict(pool, seed=args.seed)
    observed = np.asarray(pool.outcome, dtype=np.float64)
    n_features = observed.shape[1]
    families = {name: label_weights(labels)[1] for name, labels in common.study_regions(space).items()}
    families["all"] = sparse.csr_matrix(np.full((1, n_features), 1.0 / n_features))
    rank = preset.prediction.covariance_rank
    return dict(model=model, preset=preset, val=val, pred=pred, observed=observed, families=families,
                mean=pred.mean.astype(np.float64), sd=pred.raw_sd.astype(np.float64), fit_s=fit_s,
                rank=None if rank == "full" else rank, coords=space.feature_coordinates())


def refit_on(subset, pred, f: dict, seed: int, **options):
    """The spatial covariance refitted on ``subset`` and its prediction ``pred`` (the networks unchanged);
    ``options`` (rank, final) replace the fit's."""
    import torch

    from inva_pyro.predict.spatial import fit_spatial_covariance

    return fit_spatial_covariance(torch.as_tensor(np.asarray(subset.outcome, dtype=np.float64)),
                                  pred.mean.astype(np.float64), pred.raw_sd.astype(np.float64),
                                  **{"rank": f["rank"], "coords": f["coords"], "seed": seed, **options})[2]


def replicate_coverage(args, cfg: dict, f: dict) -> dict:
    """Per n in --n-cal: mean and sd over --replicates refits on n random pool subjects, scored on the rest."""
    import torch

    from inva_pyro.predict.spatial import fit_spatial_covariance

    observed, mean, sd, families = f["observed"], f["mean"], f["sd"], f["families"]
    replicates = {}
    rng = np.random.default_rng([args.seed, 99])
    for n in cfg["n_cal"]:
        rows = []
        for r in range(args.replicates):
            order = rng.permutation(len(observed))
            cal, test = order[:n], order[n:]
            _, _, joint = fit_spatial_covariance(torch.as_tensor(observed[cal]), mean[cal], sd[cal], rank=f["rank"],
                                                 coords=f["coords"], seed=r)
            rows.append(coverage_by_family(joint, mean[test], sd[test], observed[test], families))
        n_test = len(observed) - n
        replicates[n] = {name: {lv: {"mean": float(np.mean([row[name][lv] for row in rows])),
                                     "sd": float(np.std([row[name][lv] for row in rows], ddof=1)),
                                     "sd_theory_one_region": float(np.sqrt(lv * (1 - lv) * (1 / (n + 2) + 1 / n_test)))}
                                for lv in LEVELS} for name in families}
        print(f"n_cal {n}: whole-mask coverage mean " + " ".join(
            f"{replicates[n]['all'][lv]['mean']:.3f}±{replicates[n]['all'][lv]['sd']:.3f}" for lv in LEVELS), flush=True)
    return replicates


def alternative_factors(args, f: dict) -> dict:
    """With --ranks: each covariance factor (and --finals) refitted on the validation subjects, scored on the pool."""
    alternatives = {}
    ranks = [None] + [int(r) for r in args.ranks.split(",") if r]
    if len(ranks) == 1:
        return alternatives
    val_pred = f["model"].predict(f["val"], seed=args.seed)
    for r in ranks:
        for final in args.finals.split(","):
            joint = refit_on(f["val"], val_pred, f, args.seed, rank=r, final=final)
            name = ("sample" if r is None else f"pca{r}") + ("" if final == "all" else f", final {final}")
            alternatives[name] = {
                "alpha": joint.alpha, "beta": joint.beta,
                "coverage": coverage_by_family(joint, f["mean"], f["sd"], f["observed"], f["families"]),
                "energy": energy_per_subject(f["mean"], f["sd"], joint, f["observed"], args.seed)}
            print(f"{name}: energy difference {alternatives[name]['energy']['difference']:+.4f}; 50 regions "
                  + " ".join(f"{v:.3f}" for v in alternatives[name]["coverage"]["r50"].values()), flush=True)
    return alternatives


def main(argv=None) -> int:
    args = parse_args(argv)
    common.prepare_run(args)
    cfg = study_settings(args)
    f = fit_and_predict(args, cfg)
    model, pred, observed, families = f["model"], f["pred"], f["observed"], f["families"]
    voxel = {lv: float(np.mean((observed >= pred.intervals[lv][0]) & (observed <= pred.intervals[lv][1])))
             for lv in LEVELS}
    reuse = None
    if args.calibration_share > 0:  # the same calibration fitted on the subjects that chose the epoch
        from inva_pyro.data.splits import calibration_split
        stop = calibration_split(f["val"], args.calibration_share, args.seed)[0]
        joint = refit_on(stop, model.predict(stop, seed=args.seed), f, args.seed)
        reuse = coverage_by_family(joint, f["mean"], f["sd"], observed, families)
    command = "python analysis/region_calibration_limits.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"command": command, "design": args.design, "noise": args.noise, "seed": args.seed,
              "n_train": cfg["sizes"][0], "n_val": cfg["n_val"], "n_early_stopping": model.info["n_val"],
              "n_calibration": model.info["n_calibration"], "calibration_share": args.calibration_share,
              "covariance_rank": f["preset"].prediction.covariance_rank, "reuse": reuse,
              "pool": int(len(observed)), "fit_seconds": round(f["fit_s"], 1),
              "best_epoch": model.history["best_epoch"], "voxel_coverage": voxel,
              "fitted": coverage_by_family(model.spatial_covariance, f["mean"], f["sd"], observed, families),
              "replicates": {str(k): v for k, v in replicate_coverage(args, cfg, f).items()},
              "energy": energy_per_subject(f["mean"], f["sd"], model.spatial_covariance, observed, args.seed),
              "alternatives": alternative_factors(args, f)}
    (args.out / "limits.json").write_text(json.dumps(result, indent=2))
    (args.out / "limits.md").write_text(markdown(result))
    plot(result, args.out / "limits.png")
    print((args.out / "limits.md").read_text())
    return 0


FAMILY_NAMES = {"r8": "8 regions", "r50": "50 regions", "all": "whole mask"}


def markdown(r: dict) -> str:
    n_cal, n_stop = r.get("n_calibration", r["n_val"]), r.get("n_early_stopping", r["n_val"])
    held_out = r.get("reuse") is not None
    split = (f"{n_stop} of them for early stopping (best epoch {r['best_epoch']}) and {n_cal} others for "
             "calibration only" if held_out else f"all of them for early stopping (best epoch {r['best_epoch']}) "
             "and calibration")
    lines = [f"`{r['command']}`", "",
             f"{r['design']} design, {r['noise']} noise, seed {r['seed']}: {r['n_train']} training and "
             f"{r['n_val']} validation subjects, {split}; covariance factor "
             f"`covariance_rank = {r.get('covariance_rank', 'full')}`; {r['pool']} fresh subjects scored.", "",
             "| family | n calibration | " + " | ".join(f"coverage {lv}" for lv in LEVELS) + " |",
             "|---|---|" + "---|" * len(LEVELS)]
    this = "this fit, held-out calibration subjects" if held_out else "this fit"
    lines.append(f"| voxels | {n_cal} ({this}) | " + " | ".join(f"{r['voxel_coverage'][lv]:.3f}" for lv in LEVELS) + " |")
    for name, label in FAMILY_NAMES.items():
        lines.append(f"| {label} | {n_cal} ({this}) | "
                     + " | ".join(f"{r['fitted'][name][lv]:.3f}" for lv in LEVELS) + " |")
        if held_out:
            lines.append(f"| {label} | {n_stop} (the early-stopping subjects, reused) | "
                         + " | ".join(f"{r['reuse'][name][lv]:.3f}" for lv in LEVELS) + " |")
        for n, rep in r["replicates"].items():
            cells = [f"{rep[name][lv]['mean']:.3f} ± {rep[name][lv]['sd']:.3f}"
                     + (f" (theory ± {rep[name][lv]['sd_theory_one_region']:.3f})" if name == "all" else "")
                     for lv in LEVELS]
            lines.append(f"| {label} | {n} (mean ± sd of refits) | " + " | ".join(cells) + " |")
    e = r["energy"]
    lines += ["", f"Energy score on the {e['n_subjects']} pool subjects: joint {e['energy_joint']:.4f}, "
              f"independent voxels {e['energy_independent']:.4f}, paired difference {e['difference']:+.4f} "
              f"(standard error {e['difference_se']:.4f})."]
    if r.get("alternatives"):
        lines += ["", "Covariance factor fitted on the validation subjects (default: sample second moment; pca r: "
                  "`covariance_rank = r`), scored on the pool:", "",
                  "| factor | alpha | beta | energy joint - independent (se) | whole mask " + " / ".join(map(str, LEVELS))
                  + " | 50 regions " + " / ".join(map(str, LEVELS)) + " |", "|---|---|---|---|---|---|"]
        for name, a in r["alternatives"].items():
            lines.append(f"| {name} | {a['alpha']:.3f} | {a['beta']:.3f} | {a['energy']['difference']:+.4f} "
                         f"({a['energy']['difference_se']:.4f}) | "
                         + " / ".join(f"{a['coverage']['all'][lv]:.3f}" for lv in LEVELS) + " | "
                         + " / ".join(f"{a['coverage']['r50'][lv]:.3f}" for lv in LEVELS) + " |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(FAMILY_NAMES), figsize=(4 * len(FAMILY_NAMES), 3.6), sharey=True)
    for ax, (name, label) in zip(axes, FAMILY_NAMES.items()):
        ax.plot(LEVELS, [r["fitted"][name][lv] - lv for lv in LEVELS], "ko-",
                label=f"this fit (n={r.get('n_calibration', r['n_val'])})")
        if r.get("reuse") is not None:
            ax.plot(LEVELS, [r["reuse"][name][lv] - lv for lv in LEVELS], "rv--",
                    label=f"calibrated on the early-stopping subjects (n={r['n_early_stopping']})")
        for k, (n, rep) in enumerate(r["replicates"].items()):
            x = np.array(LEVELS) + 0.006 * (k + 1)
            ax.errorbar(x, [rep[name][lv]["mean"] - lv for lv in LEVELS], yerr=[rep[name][lv]["sd"] for lv in LEVELS],
                        fmt="s", capsize=3, label=f"refits n={n} (mean ± sd)")
        ax.axhspan(-0.03, 0.03, color="0.9")
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set(title=label, xlabel="nominal level")
    axes[0].set_ylabel("coverage - nominal")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{r['design']} design, {r['noise']} noise: region coverage on {r['pool']} fresh subjects")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
