"""Does tuning pay? An Optuna study on the built-in design, then the default preset against best.toml.

Simulates ``inva simulate --design paper`` (500 subjects: 300 train, 100 validation, 100 test,
true mean and sd known), runs ``--trials`` trials of the ``inva tune`` study (validation CRPS,
median pruner, every trial capped at ``--epochs``), then fits the default ``inva`` preset and the
study's best.toml with the same seed and the same epoch cap, and reports on the test subjects:
MSE, oracle MSE (the mean true variance: the floor no model passes) and the excess MSE
(MSE - oracle) / oracle. Prints a table and writes JSON; the study folder (study.db, best.toml,
trials.csv, figures) is kept, and a rerun with the same ``--study-dir`` resumes the study.

    python benchmarks/tuning.py --trials 40 --epochs 60 --study-dir /tmp/tune-bench --out tuning.json
    python benchmarks/tuning.py --quick        # a smoke run: 100 subjects, 3 trials of 3 epochs
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import torch

from inva_pyro import Cohort, InVA, load_preset
from inva_pyro.data.simulate import write_cohort
from inva_pyro.tune import tuning
from inva_pyro.tune.search_space import load_space


def test_scores(preset, cohort: Cohort, seed: int) -> dict:
    """Fit on train (validation for early stopping and calibration) and score on the test subjects."""
    start = time.perf_counter()
    model = InVA(preset).fit(cohort.train, cohort.val, seed=seed, device="cpu", progress=False)
    test = cohort.test
    metrics = model.predict(test, seed=seed).metrics(truth_mean=test.truth_mean, truth_sd=test.truth_sd)
    oracle = float(np.mean(test.truth_sd.astype(np.float64) ** 2))
    return {"mse": metrics["mse"], "oracle_mse": oracle, "excess_mse": (metrics["mse"] - oracle) / oracle,
            "crps": metrics["crps"], "coverage_0.9": metrics["coverage"]["0.9"],
            "epochs": len(model.history["epoch"]), "fit_s": round(time.perf_counter() - start, 1)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=60, help="cap on every fit (trials and both final fits)")
    parser.add_argument("--n-subjects", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fit-seeds", default="0", help="seeds of the final fits of both presets, comma-separated "
                        "(the same for both; the table gives the mean and, with several, the sd)")
    parser.add_argument("--study-dir", type=Path, help="keep the study here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help="100 subjects, 3 trials of 3 epochs")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_subjects, args.trials, args.epochs = 100, 3, 3
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with tempfile.TemporaryDirectory() as scratch:
        study_dir = args.study_dir or Path(scratch) / "study"
        study_dir.mkdir(parents=True, exist_ok=True)
        cohort = Cohort.from_dir(write_cohort(Path(scratch) / "cohort", "paper", args.n_subjects, args.seed),
                                 seed=args.seed)
        base = load_preset("inva")
        study = tuning.open_study(tuning.default_storage(study_dir), "inva", "crps",
                                  tuning.make_pruner("median", args.epochs), sampler_seed=args.seed)
        start = time.perf_counter()
        tuning.optimize(study, cohort, base, load_space(None, base), trials=args.trials, epochs=args.epochs,
                        seed=args.seed, device="cpu", report=lambda line: print(line, flush=True))
        study_s = time.perf_counter() - start
        tuning.write_outputs(study, study_dir)
        default = base.model_copy(deep=True)
        default.training.epochs = args.epochs
        fit_seeds = [int(v) for v in args.fit_seeds.split(",")]
        per_seed = {name: [test_scores(preset, cohort, seed) for seed in fit_seeds]
                    for name, preset in (("default", default), ("tuned", tuning.best_preset(study)))}
        rows = {name: {key: float(np.mean([r[key] for r in runs])) for key in runs[0]} for name, runs in per_seed.items()}
        for name, runs in per_seed.items():
            rows[name]["excess_mse_sd"] = float(np.std([r["excess_mse"] for r in runs], ddof=1)) if len(runs) > 1 else None
            rows[name]["excess_mse_per_seed"] = [r["excess_mse"] for r in runs]
        states = [t.state.name for t in study.trials]  # read while a temporary study folder exists
        best = study.best_trial
    print(f"\n{len(states)} trials ({states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned, "
          f"{states.count('FAIL')} failed) in {study_s:.0f} s; best: trial {best.number}, "
          f"validation CRPS {best.value:.4f}; study folder {study_dir}")
    print(f"fits with seeds {fit_seeds} (means over seeds)")
    print(f"{'preset':<9}{'test MSE':>10}{'oracle':>9}{'excess':>9}{'CRPS':>9}{'cov 0.9':>9}{'epochs':>8}{'fit s':>8}"
          "  excess per seed")
    for name, r in rows.items():
        print(f"{name:<9}{r['mse']:>10.4f}{r['oracle_mse']:>9.4f}{r['excess_mse']:>9.3f}{r['crps']:>9.4f}"
              f"{r['coverage_0.9']:>9.3f}{r['epochs']:>8.0f}{r['fit_s']:>8.0f}  "
              + " ".join(f"{v:.3f}" for v in r["excess_mse_per_seed"]))
    result = {"command": " ".join(["python", "benchmarks/tuning.py", *(argv if argv is not None else sys.argv[1:])]),
              "n_subjects": args.n_subjects, "trials": args.trials, "epochs_cap": args.epochs, "seed": args.seed,
              "fit_seeds": fit_seeds, "study_seconds": round(study_s), "trial_states": {s: states.count(s) for s in set(states)},
              "best_trial": best.number, "best_params": best.params,
              "best_validation_crps": best.value, "results": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
