#!/usr/bin/env python
"""Where a model's error lies on the built-in ``paper`` design: subject-level patterns or local detail.

Fits a preset (or an ablation of ``analysis_common.VARIANTS``) on one replicate of the design (as
``simulation_study.py`` does: 500 subjects, the design's 60/20/20 split), predicts the test subjects
and splits the excess error of the predictive mean, E_i = mean_i - m_i (m: the true mean), per
subject into its least-squares projection on the
design's spatial patterns (constant, the two coordinate gradients, the shared bumps S1, S2 and the
specific bumps C1, C2, C3; docs/simulation.md) and the rest. The projection is the error in the
subject factors' effects (a1, a2, b1, b2); the rest is error in the voxel-level (local) terms.
Prints the mean squared error of each part and of each pattern's coefficient.

    python analysis/error_decomposition.py [--model inva] [--seed 0] [--out /tmp/error_decomposition]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's shared module
import analysis_common as common  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="inva", help="preset (name in models/ or TOML path) or ablation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("/tmp/error_decomposition"))
    args = parser.parse_args(argv)
    from inva_pyro.registry import model_from_preset

    cohort = common.simulated_cohort(args.out, "paper", int(round(args.size / common.TRAIN_SHARE)), args.seed)
    train = cohort.train.subset(np.arange(min(args.size, len(cohort.train))))
    preset = common.preset_with(args.model, {"prediction.num_samples": 200})
    model = model_from_preset(preset).fit(train, cohort.val, seed=args.seed, device="cpu", progress=False)
    test = cohort.test
    error = model.predict(test, seed=args.seed).mean - test.truth_mean
    names, basis = common.pattern_basis()
    coef, *_ = np.linalg.lstsq(basis, error.T, rcond=None)
    subject_level = (basis @ coef).T
    result = {"model": args.model, "seed": args.seed, "excess_mse": float(np.mean(error ** 2)),
              "subject_level_mse": float(np.mean(subject_level ** 2)),
              "local_mse": float(np.mean((error - subject_level) ** 2)),
              "coefficient_mse": {n: float(np.mean(c ** 2)) for n, c in zip(names, coef)}}
    print(f"excess MSE over the true mean {result['excess_mse']:.4f}: subject-level patterns "
          f"{result['subject_level_mse']:.4f}, local {result['local_mse']:.4f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
