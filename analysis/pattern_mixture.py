#!/usr/bin/env python
"""Why pattern submodels are mixed with the joint model, not chosen on validation (docs/model.md).

For one semi-supervised cohort and training seed (the design of ``semisupervised_study.py``), fits
``inva-joint`` with its pattern submodels, then scores, for each input k, the subjects lacking k on the
validation subjects (those that stopped every model early) and on the test subjects: the joint model
given the other inputs, the submodel fitted without k, and the mean of their equal-weight mixture. The
means are exact (output layer at its posterior mean; no Monte-Carlo draws), MSE in the outcome's units.
If validation flatters the submodels (each stopped early on exactly that error), the joint-minus-submodel
difference is larger on validation than on test, and a choice made there leans towards the submodel.

    python analysis/pattern_mixture.py --seed 0 --fit-seed 1 --size 300 --out DIR   # about 6 minutes, one core

Writes DIR/pattern_mixture_s{seed}_f{fit_seed}_n{size}.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's shared module
import analysis_common as common  # noqa: E402


def main(argv=None) -> int:
    from inva_pyro.data.io import atomic_write_text
    from inva_pyro.data.missing import input_presence, outcome_presence
    from inva_pyro.estimator import InVA
    from inva_pyro.predict.patterns import impose
    from inva_pyro.train.loop import predictive_mean

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0, help="the cohort's seed")
    p.add_argument("--fit-seed", type=int, default=0, help="the training seed")
    p.add_argument("--size", type=int, default=300, help="labeled training subjects (the 600 MRI-only are added)")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cohort = common.simulated_cohort(args.out, "paper", 500, args.seed, unlabeled=600)  # as semisupervised_study.py
    train, val = cohort.train, cohort.val
    test = cohort.test.subset(np.flatnonzero(input_presence(cohort.test).all(1)))
    has_y = outcome_presence(train)
    rows = np.sort(np.concatenate([np.flatnonzero(has_y)[:args.size], np.flatnonzero(~has_y)]))
    preset = common.preset_with("inva-joint", {"training.epochs": args.epochs, "training.pattern_submodels": True})
    model = InVA(preset).fit(
        train.subset(rows), val, seed=args.fit_seed, device="cpu", progress=False)
    names, st = model.info["inputs"], model.standardizer
    result = {"seed": args.seed, "fit_seed": args.fit_seed, "size": args.size, "patterns": []}
    print(f"cohort {args.seed}, training seed {args.fit_seed}, N = {args.size}: MSE of the subjects lacking xk")
    print("| subjects | pattern | joint | submodel | mixture's mean | joint vs submodel | mixture vs submodel |")
    print("|---|---|---|---|---|---|---|")
    for split, subset in (("validation", val), ("test", test)):
        subset = subset.subset(np.flatnonzero(input_presence(subset, names).all(1)))
        xs, _ = model.tensors(subset)
        for k, name in enumerate(names):
            joint = predictive_mean(model.module.eval(), impose(xs, [j != k for j in range(len(names))]))
            alone = predictive_mean(model.submodels[name].module.eval(), [x for j, x in enumerate(xs) if j != k])
            means = {"joint": joint, "submodel": alone, "mixture": (joint + alone) / 2}
            mse = {key: float(np.mean((st.inverse_outcome_mean(m.numpy()) - subset.outcome) ** 2))
                   for key, m in means.items()}
            result["patterns"].append({"subjects": split, "pattern": f"no {name}", "n": len(subset), **mse})
            print(f"| {split} | no {name} | {mse['joint']:.4f} | {mse['submodel']:.4f} | {mse['mixture']:.4f} | "
                  f"{100 * (mse['joint'] / mse['submodel'] - 1):+.1f}% | {100 * (mse['mixture'] / mse['submodel'] - 1):+.1f}% |")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"pattern_mixture_s{args.seed}_f{args.fit_seed}_n{args.size}.json",
                      json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
