#!/usr/bin/env python
"""Semi-supervised scenario of the simulation study: few subjects with the outcome, many with MRI only.

Design ``paper`` (its outcome leans on the shared subject factors a_i, seen through every input via
the loadings L, docs/simulation.md), simulated with ``write_cohort(..., unlabeled=U)``: the design's
60/20/20 split of ``--n-subjects`` labeled subjects plus U MRI-only training subjects (outcome cell
empty). For every labeled training size N (the first N labeled training subjects; validation and test
subjects are the same for every N and model):

    inva-joint-semi      models/inva-joint.toml on the N labeled + U MRI-only subjects
    inva-joint-labeled   the same preset on the N labeled subjects only
    inva-labeled         the default preset (models/inva.toml) on the N labeled subjects
    inva-semi            the default preset on the N labeled + U MRI-only subjects (its reconstruction terms
                         use them; the outcome term only the labeled)
    vae-concat-semi, vae-separate-semi   the VAE peers, given the MRI-only subjects too (they can use them)
    vae-concat, vae-separate             the VAE peers on the labeled subjects only
    bart, ridge          the discriminative peers (labeled subjects only: they cannot use the others)
    inva-joint-semi-no-xk   inva-joint-semi trained and tested without input xk at all (a model that never
                         saw that modality: the reference for subjects lacking it; not in the default list)

Every model is scored on the complete test subjects: MSE, the oracle's MSE (the noise variance, known
in simulation) and the excess error (MSE - oracle) / oracle, coverage of the calibrated 50/80/90/95%
intervals. The joint models are also scored on the same test subjects with each input removed
(pattern "no xk") and with all but one removed ("only xk"), to show coverage per missingness pattern
(calibrated per pattern on validation subjects, ``inva_pyro/predict/patterns.py``) and the MSE cost of
the missing inputs.

Run (``--threads 1 --bart-jobs 1``: one core); ``--quick`` is a smoke test of a minute:
    python analysis/simulation_study.py --scenario semisupervised --out semi --threads 1 --bart-jobs 1
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's shared module
import analysis_common as common  # noqa: E402

LEVELS = common.LEVELS
MODELS = ["inva-joint-semi", "inva-joint-labeled", "inva-labeled", "inva-semi", "vae-concat-semi",
          "vae-separate-semi", "vae-concat", "vae-separate", "bart", "ridge"]
PEERS = ["vae-concat-semi", "vae-separate-semi", "vae-concat", "vae-separate", "bart", "ridge"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--sizes", default="50,100,300", help="labeled training sizes (default 50,100,300)")
    p.add_argument("--unlabeled", type=int, default=600, help="MRI-only training subjects (default 600)")
    p.add_argument("--n-subjects", type=int, default=500, help="labeled subjects of the design's 60/20/20 split")
    p.add_argument("--seeds", default="0", help="replicate seeds, comma-separated (default 0)")
    p.add_argument("--fit-seeds", help="training seeds per cohort, comma-separated (default: the cohort's "
                   "seed): refits on the same cohort measure how much a comparison moves with the training draw")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--epochs", type=int, help="cap on the InVA-family presets' epochs")
    p.add_argument("--samples", type=int, help="predictive draws (default: each preset's)")
    p.add_argument("--input-dropout", type=float, help="set training.input_dropout of the joint presets")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a setting of the InVA-family presets, e.g. model.shallow_dim=8 "
                        "(value in TOML/JSON syntax; repeatable)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--bart-jobs", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny cohort, networks and BART")
    return p.parse_args(argv)


BASES = {"inva-joint-semi": "inva-joint", "inva-joint-labeled": "inva-joint", "inva-labeled": "inva",
         "inva-semi": "inva", "vae-concat-semi": "vae-concat", "vae-separate-semi": "vae-separate"}
TABLES = ("model", "training", "prediction")


def preset_for(name: str, args):
    """The preset of model ``name`` with the command's settings. The InVA-family presets take --epochs,
    --input-dropout (joint structure only) and --set; BART --bart-jobs; every preset --samples; with
    --quick, common.QUICK's settings come first (the explicit ones win)."""
    from inva_pyro.config import load_preset

    base = BASES.get(name.split("-no-")[0], name)
    preset = load_preset(base)
    inva = {}
    if args.epochs:
        inva["training.epochs"] = args.epochs
    if args.input_dropout is not None and preset.model.family == "inva" and preset.model.structure == "joint":
        inva["training.input_dropout"] = args.input_dropout
    for setting in args.set:
        key, _, value = setting.partition("=")
        section, _, name_ = key.partition(".")
        if section not in TABLES or not name_ or not value:
            raise SystemExit(f"--set {setting}: expected SECTION.KEY=VALUE with SECTION one of {list(TABLES)}")
        inva[key] = json.loads(value)
    changes = {"prediction.num_samples": args.samples} if args.samples else {}
    if "-no-" in name:  # scored only on subjects with all its inputs: its own pattern submodels never predict
        changes["training.pattern_submodels"] = False
    by_family = {"inva": inva, "bart": {"model.n_jobs": args.bart_jobs} if args.bart_jobs else {}}
    return common.preset_with(base, changes, quick=args.quick, by_family=by_family)


def without(subset, name: str):
    """The subjects of ``subset`` with input ``name`` not acquired (a row of NaN)."""
    inputs = dict(subset.inputs)
    inputs[name] = np.full_like(np.asarray(inputs[name]), np.nan)
    return dataclasses.replace(subset, inputs=inputs)


def score(model, test, pattern: str, seed: int) -> tuple[dict, object]:
    """The row of metrics and the prediction it came from."""
    pred = model.predict(test, levels=LEVELS, seed=seed)
    m = pred.metrics(calibrated=True, truth_mean=test.truth_mean, truth_sd=test.truth_sd)
    row = {"pattern": pattern, "mse": m["mse"], "oracle_mse": m["oracle_mse"],
           "excess": (m["mse"] - m["oracle_mse"]) / m["oracle_mse"], "crps": m["crps"]}
    row.update({f"cov{round(100 * lv)}": m["coverage"][format(lv, "g")] for lv in LEVELS})
    return row, pred


def representation(model, test, pred) -> dict:
    """Where a complete test subject's error lies, and how well the subject latent knows the factors.

    - ``excess_subject``: the part of the predictive mean's excess error in the span of the design's
      spatial patterns (common.pattern_basis; least squares per subject), the error in the
      subject factors' effects; ``excess_rest``: the remainder (local terms, voxel detail).
    - ``r2_a1 ... r2_b3`` (networks): 5-fold cross-validated R^2 of a linear map from the latent means
      (the joint latent's, or every VAE's shallow means) to the Bayes posterior means of the factors
      given the inputs (common.factor_posterior, as in semisupervised_limits.py); 1.0 is all the inputs can tell.
    - ``excess_representation``: the excess error of the design's subject terms evaluated at that
      linear read-out instead of at the posterior means."""
    from inva_pyro.data.simulate.paper import paper_patterns, subject_terms

    patterns = paper_patterns()
    n = len(test.subjects)
    error = pred.mean - np.asarray(test.truth_mean).reshape(n, -1)
    oracle = float(np.mean((np.asarray(test.outcome).reshape(n, -1) - np.asarray(test.truth_mean).reshape(n, -1)) ** 2))
    maps = common.pattern_basis()[1]
    in_span = maps @ np.linalg.lstsq(maps, error.T, rcond=None)[0]
    row = {"excess_subject": float(np.mean(in_span ** 2) / oracle),
           "excess_rest": float(np.mean((error - in_span.T) ** 2) / oracle)}
    module = getattr(model, "module", None)
    if module is not None:
        from sklearn.linear_model import LinearRegression
        from sklearn.model_selection import cross_val_predict

        from inva_pyro.criticism.latents import latent_table
        table = latent_table(model, test)
        kind = "joint_mean_" if module.joint else "_mean_"
        latent = table[[c for c in table.columns if kind in c]].to_numpy(float)
        deviations = [np.asarray(test.inputs[f"x{k + 1}"]).reshape(n, -1) - patterns["base"][k].ravel()
                      for k in range(3)]
        factors = common.factor_posterior(deviations, patterns)[0]
        fitted = cross_val_predict(LinearRegression(), latent, factors, cv=5)
        r2 = 1 - ((fitted - factors) ** 2).sum(0) / ((factors - factors.mean(0)) ** 2).sum(0)
        row.update({f"r2_{name}": float(v) for name, v in zip(("a1", "a2", "b1", "b2", "b3"), r2)})
        # The excess a perfect predictor would still have if it read the factors from this latent
        # instead of from the inputs themselves: the most that a better latent (more MRI-only
        # subjects) can remove.
        shift = (subject_terms(fitted) - subject_terms(factors)) @ np.stack(patterns["terms"]).reshape(4, -1)
        row["excess_representation"] = float(np.mean(shift ** 2) / oracle)
    return row


def specific_map_read(test, pred, name: str) -> dict:
    """For test subjects lacking input ``name`` = xk: how much the prediction varies along C_k, the map of
    the factor b_k that only xk shows (least-squares coefficient on the design's patterns, sd across
    subjects), and its correlation with the truth's. Without xk nothing can know b_k, so a large sd with
    no correlation is a latent that claims what it cannot know (docs/results.md)."""
    names, maps = common.pattern_basis()
    j = names.index("C" + name[1:])
    n = len(test.subjects)
    coef = [np.linalg.lstsq(maps, (a - a.mean(0)).T, rcond=None)[0][j]
            for a in (pred.mean, np.asarray(test.truth_mean).reshape(n, -1))]
    return {"specific_sd": float(coef[0].std()), "specific_sd_truth": float(coef[1].std()),
            "specific_corr": float(np.corrcoef(coef[0], coef[1])[0, 1])}


def with_fit_seed(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with every row's training seed: rows written before --fit-seeds were fitted with the cohort's."""
    fit_seed = runs["fit_seed"].fillna(runs["seed"]) if "fit_seed" in runs else runs["seed"]
    return runs.assign(fit_seed=fit_seed.astype(int))


def run(args) -> pd.DataFrame:
    from inva_pyro.data.missing import drop_input, input_presence, outcome_presence
    from inva_pyro.registry import model_from_preset

    sizes = [int(s) for s in args.sizes.split(",")]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    runs_csv = args.out / "runs.csv"
    runs = with_fit_seed(pd.read_csv(runs_csv)) if runs_csv.exists() else pd.DataFrame()
    done = set(zip(runs["seed"], runs["fit_seed"], runs["size"], runs["model"])) if len(runs) else set()
    for seed in [int(s) for s in args.seeds.split(",")]:
        cohort = common.simulated_cohort(args.out, "paper", args.n_subjects, seed, unlabeled=args.unlabeled)
        train, val = cohort.train, cohort.val
        test = cohort.test.subset(np.flatnonzero(input_presence(cohort.test).all(1)))
        has_y = outcome_presence(train)
        labeled_rows, unlabeled_rows = np.flatnonzero(has_y), np.flatnonzero(~has_y)
        fit_seeds = [int(s) for s in args.fit_seeds.split(",")] if args.fit_seeds else [seed]
        for size, name, fit_seed in itertools.product(sizes, models, fit_seeds):
            if (seed, fit_seed, size, name) in done:
                continue
            rows = labeled_rows[:size]
            semi = name.split("-no-")[0].endswith("-semi")
            fit_set = train.subset(np.sort(np.concatenate([rows, unlabeled_rows])) if semi else rows)
            fit_val, fit_test, dropped = val, test, None
            if "-no-" in name:  # never saw input `dropped`: trained and scored without it
                dropped = name.split("-no-")[1]
                fit_set, fit_val, fit_test = (drop_input(s, dropped) for s in (fit_set, val, test))
            start, cpu = time.perf_counter(), time.process_time()
            model = model_from_preset(preset_for(name, args)).fit(
                fit_set, fit_val, seed=fit_seed, device="cpu", progress=False)
            fit_s, fit_cpu = time.perf_counter() - start, time.process_time() - cpu
            epochs = len(model.history["epoch"]) if model.history and model.history.get("epoch") else np.nan
            base = {"seed": seed, "fit_seed": fit_seed, "size": size, "model": name, "n_fit": len(fit_set),
                    "n_unlabeled": len(unlabeled_rows) if semi else 0, "n_test": len(test),
                    "fit_seconds": round(fit_s, 1), "fit_cpu_seconds": round(fit_cpu, 1), "epochs": epochs}
            patterns = ["complete"] if dropped is None else [f"no {dropped}"]
            if dropped is None and getattr(getattr(model, "module", None), "joint", False):
                patterns += [f"no {n}" for n in cohort.input_names]
                if len(cohort.input_names) > 2:
                    patterns += [f"only {n}" for n in cohort.input_names]
            mixed = {c["input"] for c in getattr(model, "info", {}).get("pattern_submodels") or []}
            new = []
            for pattern in patterns:
                if pattern == "complete" or dropped:
                    subset = fit_test
                elif pattern.startswith("only "):
                    subset = test
                    for other in (n for n in cohort.input_names if n != pattern[5:]):
                        subset = without(subset, other)
                else:
                    subset = without(test, pattern[3:])
                row, pred = score(model, subset, pattern, fit_seed)
                if pattern == "complete" and name not in ("bart", "ridge"):
                    row.update(representation(model, test, pred))
                elif pattern.startswith("no "):
                    row.update(specific_map_read(test, pred, pattern[3:]))
                    row["submodel"] = pattern[3:] in mixed  # the mixture with the pattern submodel without it
                new.append({**base, **row})
            runs = pd.concat([runs, pd.DataFrame(new)], ignore_index=True)
            runs.to_csv(runs_csv, index=False)
            r = new[0]
            print(f"seed {seed} (fit {fit_seed}) N={size} {name:20s} MSE {r['mse']:.4f} excess {r['excess']:.3f} "
                  f"cov90 {r['cov90']:.3f} fit {fit_s:.0f} s ({fit_cpu:.0f} CPU s, {epochs} epochs)", flush=True)
    return runs


def markdown(runs: pd.DataFrame, command: str) -> str:
    complete = runs[runs["pattern"] == "complete"]
    mean = complete.groupby(["size", "model"], sort=False).mean(numeric_only=True).reset_index()
    lines = [f"Command: `{command}`", "",
             f"Replicates (seeds): {sorted(runs['seed'].unique().tolist())}; test: "
             f"{int(runs['n_test'].iloc[0])} complete subjects. Excess = (MSE - oracle MSE) / oracle MSE.", ""]
    for size, group in mean.groupby("size", sort=True):
        lines += [f"### {size} labeled training subjects", "",
                  "| model | subjects fitted (MRI-only) | MSE | oracle MSE | excess | cov 0.5 | cov 0.8 | cov 0.9 "
                  "| cov 0.95 | fit s (CPU s) | epochs |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for _, r in group.iterrows():
            lines.append(f"| {r['model']} | {int(r['n_fit'])} ({int(r['n_unlabeled'])}) | {r['mse']:.4f} | "
                         f"{r['oracle_mse']:.4f} | {r['excess']:.3f} | {r['cov50']:.3f} | {r['cov80']:.3f} | "
                         f"{r['cov90']:.3f} | {r['cov95']:.3f} | {r['fit_seconds']:.0f} ({r['fit_cpu_seconds']:.0f}) "
                         f"| {'—' if pd.isna(r['epochs']) else int(r['epochs'])} |")
        semi = group[group["model"] == "inva-joint-semi"]
        if len(semi):
            e = float(semi["excess"].iloc[0])
            lines += ["", "inva-joint-semi's excess error against each model's (negative: lower):", ""]
            for _, r in group[group["model"] != "inva-joint-semi"].iterrows():
                lines.append(f"- {r['model']}: {100 * (e / r['excess'] - 1):+.1f}%")
        lines.append("")
    if "excess_subject" in complete:
        lines += ["### Where the error lies, and what the subject latent knows (complete test subjects)", "",
                  "Excess error split into the span of the subject-level maps and the rest; R^2 of the Bayes "
                  "posterior means of the factors from the latent means (1.0: all the inputs can tell); the excess "
                  "a perfect predictor would have if it read the factors from the latent.", "",
                  "| N labeled | model | excess | in the subject maps | rest | R^2 a1 / a2 / b1 / b2 / b3 | "
                  "excess due to the latent |", "|---|---|---|---|---|---|---|"]
        for _, r in mean.dropna(subset=["excess_subject"]).iterrows():
            known = "r2_a1" in r and not pd.isna(r["r2_a1"])
            r2 = " / ".join(f"{r[f'r2_{f}']:.3f}" for f in ("a1", "a2", "b1", "b2", "b3")) if known else "—"
            due = f"{r['excess_representation']:.3f}" if known else "—"
            lines.append(f"| {int(r['size'])} | {r['model']} | {r['excess']:.3f} | {r['excess_subject']:.3f} | "
                         f"{r['excess_rest']:.3f} | {r2} | {due} |")
        lines.append("")
    joint = runs[runs["model"].str.startswith("inva-joint")]
    if len(joint):
        lines += ["### Per missingness pattern (joint models, the same test subjects with an input removed)", "",
                  "C_k read: for subjects lacking xk, the sd across subjects of the prediction's coefficient on C_k "
                  "(the map of b_k, which only xk shows) and its correlation with the truth's.", "",
                  "| N labeled | model | pattern | MSE | excess | cov 0.5 | cov 0.8 | cov 0.9 | cov 0.95 | C_k read: sd (corr) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        per = joint.groupby(["size", "model", "pattern"], sort=False).mean(numeric_only=True).reset_index()
        for _, r in per.iterrows():
            read = (f"{r['specific_sd']:.3f} ({r['specific_corr']:+.2f})"
                    if "specific_sd" in r and not pd.isna(r["specific_sd"]) else "—")
            lines.append(f"| {int(r['size'])} | {r['model']} | {r['pattern']} | {r['mse']:.4f} | {r['excess']:.3f} | "
                         f"{r['cov50']:.3f} | {r['cov80']:.3f} | {r['cov90']:.3f} | {r['cov95']:.3f} | {read} |")
        lines.append("")
    lines += never_given_table(runs)
    return "\n".join(lines) + "\n"


def never_given_table(runs: pd.DataFrame) -> list[str]:
    """Subjects lacking input xk, predicted by inva-joint-semi, against inva-joint-semi-no-xk (a model never
    given xk) fitted with the same cohort and training seed: the goal is an error "between complete subjects and
    a model that never saw the modality". Paired per fit; the mean difference with its standard error."""
    runs = with_fit_seed(runs)
    keys = ["seed", "fit_seed", "size"]
    joint = runs[runs["model"] == "inva-joint-semi"]
    refs = runs[runs["model"].str.startswith("inva-joint-semi-no-")]
    pairs = refs.merge(joint, on=keys + ["pattern"], suffixes=("_never", ""))
    if not len(pairs):
        return []
    complete = joint[joint["pattern"] == "complete"][keys + ["mse"]].rename(columns={"mse": "mse_complete"})
    pairs = pairs.merge(complete, on=keys)
    pairs["diff"] = 100 * (pairs["mse"] / pairs["mse_never"] - 1)
    lines = ["### Subjects lacking an input: inva-joint-semi against the model never given it", "",
             "Goal: MSE between the complete subjects' and the never-given model's (difference <= 0).", "",
             "| N labeled | seed (fit) | pattern | MSE joint | MSE never given | difference | MSE complete |",
             "|---|---|---|---|---|---|---|"]
    for _, r in pairs.sort_values(keys + ["pattern"]).iterrows():
        lines.append(f"| {int(r['size'])} | {int(r['seed'])} ({int(r['fit_seed'])}) | {r['pattern']} | {r['mse']:.4f} | "
                     f"{r['mse_never']:.4f} | {r['diff']:+.1f}% | {r['mse_complete']:.4f} |")
    lines += ["", "| N labeled | pattern | fits | mean MSE joint | mean MSE never given | mean difference (se) |",
              "|---|---|---|---|---|---|"]
    for (size, pattern), g in pairs.groupby(["size", "pattern"]):
        se = f"{g['diff'].std(ddof=1) / np.sqrt(len(g)):.1f}" if len(g) > 1 else "—"
        lines.append(f"| {int(size)} | {pattern} | {len(g)} | {g['mse'].mean():.4f} | {g['mse_never'].mean():.4f} | "
                     f"{g['diff'].mean():+.1f}% ({se}) |")
    return lines + [""]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.sizes, args.unlabeled, args.n_subjects = "12", 20, 40
        args.samples = args.samples or 50
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = run(args)
    command = "python analysis/simulation_study.py --scenario semisupervised " + " ".join(
        sys.argv[1:] if argv is None else argv)
    text = markdown(runs, command)
    (args.out / "summary.md").write_text(text)
    (args.out / "settings.json").write_text(json.dumps(vars(args), default=str, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
