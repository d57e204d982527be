#!/usr/bin/env python
"""The lowest excess error any model can reach on the ``paper`` design from the inputs: the Bayes limit.

How far can MRI-only subjects lower InVA's excess error, (MSE - oracle MSE) / oracle MSE? The oracle of
that ratio knows each subject's true factors (a_1, a_2, b_1, b_2, b_3); a model only sees
the input images, and the images show the factors through noise (a smooth field and white noise,
docs/simulation.md). What no model can learn, however many subjects with or without PET it is given,
is the spread of the true mean m_i given the inputs x_i. The best possible prediction is E[m_i | x_i], with

    MSE(Bayes) = oracle MSE + E_i mean_v Var(m_i(v) | x_i)

so its excess, E Var(m | x) / oracle MSE, is the floor under every row of the study's tables.

In this design the inputs are linear in the factors with Gaussian noise,

    d_k = x_k - mu_k = F_k theta + 0.5 e_k + 0.2 eps_k,    theta = (a_1, a_2, b_1, b_2, b_3) ~ N(0, I),

so theta | x is Normal with precision I + sum_k F_k' Sigma^-1 F_k (Sigma = 0.25 R + 0.04 I, R the smooth
field's correlation) and a mean that is linear in the deviations (``analysis_common.factor_posterior``,
which ``semisupervised_study.py`` uses too). The local terms of m (tanh(d_1),
d_1 d_3) are known from x; the subject terms (tanh(1.5 a_1) S_1, 0.5 (a_2^2 - 1) S_2, 0.6 b_1 C_1,
0.6 tanh(2 b_2) C_2) are averaged over draws of theta | x.

R is the exact correlation of white noise smoothed with a Gaussian of 1.5 pixels on the periodic grid;
the design instead rescales each subject's field by its own sample sd, a random factor near 1. The
script checks the whole computation against the data: the Bayes prediction's
empirical MSE on the simulated outcomes must match oracle MSE + E Var(m | x), subject by subject, within
the standard error of their paired difference (``check_z``).

``--without xk``: the floor for subjects lacking input k, E[m | the other inputs]. Then d_k is unknown
as well: given theta it is F_k theta plus input k's field and white noise, independent of the other
inputs, so m is averaged over draws of theta and of d_k, and the same check applies.

    python analysis/semisupervised_limits.py --pool 2000 --out DIR [--without x1]

Writes DIR/bayes_limit_paper.json (bayes_limit_paper_without_xk.json) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's shared module
import analysis_common as common  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pool", type=int, default=2000, help="simulated subjects scored")
    p.add_argument("--draws", type=int, default=4000, help="posterior draws of the factors per subject")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--without", choices=["x1", "x2", "x3"], help="the limit for subjects lacking this input")
    p.add_argument("--quick", action="store_true", help="smoke test: 100 subjects, 200 draws")
    return p.parse_args(argv)


def local_terms(d1: np.ndarray, d3: np.ndarray) -> np.ndarray:
    """The true mean's voxel-wise terms (docs/simulation.md)."""
    return 0.6 * np.tanh(d1) + 0.3 * d1 * d3


def bayes_limit(n: int, seed: int, draws: int, without: str | None = None) -> dict:
    """The Bayes predictor E[m | x] and its MSE. ``without`` = "xk": given the other inputs only. Then
    d_k is unknown too: given theta it is F_k theta plus the field and white noise of input k, Normal
    per voxel with variance FIELD_SD^2 + WHITE_SD^2, independent of the other inputs; m is averaged over
    draws of theta and of d_k, and E Var(m | x) is their spread."""
    from inva_pyro.data.simulate.paper import FIELD_SD, WHITE_SD, paper_patterns, simulate_paper, subject_terms

    sim = simulate_paper(n, seed)
    patterns = paper_patterns()
    deviations = [(sim["inputs"][f"x{k + 1}"] - patterns["base"][k]).reshape(n, -1) for k in range(3)]
    given = [k for k in range(3) if f"x{k + 1}" != without]
    if len(given) == 3 and without is not None:
        raise ValueError(f"without must be one of x1, x2, x3, got {without!r}")
    means, covariance = common.factor_posterior([deviations[k] for k in given], patterns, inputs=given)
    maps = np.stack(patterns["terms"]).reshape(4, -1)                         # (4, V)
    truth, outcome = sim["true_mean"].reshape(n, -1), sim["outcome"].reshape(n, -1)
    rng = np.random.default_rng([seed, 14])
    root = np.linalg.cholesky(covariance)
    true_terms = subject_terms(sim["factors"])
    bayes = np.empty_like(truth)
    spread = np.empty(n)                                                       # mean_v Var(m(v) | x) per subject
    k = next((j for j in range(3) if j not in given), None)                    # the input left out
    for i in range(n):
        theta = means[i] + rng.standard_normal((draws, 5)) @ root.T
        terms = subject_terms(theta)                                           # (draws, 4)
        if without is None:
            centred = terms - terms.mean(0)
            term_cov = centred.T @ centred / (draws - 1)
            spread[i] = np.einsum("tv,ts,sv->v", maps, term_cov, maps).mean()
            bayes[i] = truth[i] + (terms.mean(0) - true_terms[i]) @ maps        # swap the true terms for their mean
            continue
        devs = [np.broadcast_to(d[i], (draws, d.shape[1])) for d in deviations]
        devs[k] = theta @ common.input_design(k, patterns).T + np.hypot(FIELD_SD, WHITE_SD) * rng.standard_normal(devs[k].shape)
        m = terms @ maps + local_terms(devs[0], devs[2])                        # (draws, V) without mu_y
        spread[i] = m.var(axis=0, ddof=1).mean()
        bayes[i] = truth[i] - true_terms[i] @ maps - local_terms(deviations[0][i], deviations[2][i]) + m.mean(0)
    oracle_sq = ((outcome - truth) ** 2).mean(1)
    oracle_mse = float(oracle_sq.mean())
    bayes_sq = ((outcome - bayes) ** 2).mean(1)
    # Paired per subject: Bayes MSE - oracle MSE - predicted spread has mean 0 if the posterior is right.
    check = bayes_sq - oracle_sq - spread
    return {"n_subjects": n, "seed": seed, "draws": draws, "without": without,
            "posterior_sd": np.sqrt(np.diag(covariance)).round(4).tolist(),
            "oracle_mse": oracle_mse,
            "expected_spread": float(spread.mean()), "expected_spread_se": float(spread.std(ddof=1) / np.sqrt(n)),
            "bayes_excess": float(spread.mean() / oracle_mse),
            "bayes_mse_empirical": float(bayes_sq.mean()), "bayes_mse_se": float(bayes_sq.std(ddof=1) / np.sqrt(n)),
            "bayes_mse_predicted": oracle_mse + float(spread.mean()),
            "check_z": float(check.mean() / (check.std(ddof=1) / np.sqrt(n)))}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.pool, args.draws = 100, 200
    result = bayes_limit(args.pool, args.seed, args.draws, args.without)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "bayes_limit_paper.json" if args.without is None else f"bayes_limit_paper_without_{args.without}.json"
    (args.out / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"inputs: {'all' if args.without is None else 'all but ' + args.without}")
    print("| subjects | posterior sd of a1, a2, b1, b2, b3 | oracle MSE | E Var(m given x) | Bayes excess | "
          "Bayes MSE predicted / empirical (se) |")
    print("|---|---|---|---|---|---|")
    print(f"| {result['n_subjects']} | {', '.join(f'{s:.3f}' for s in result['posterior_sd'])} | "
          f"{result['oracle_mse']:.4f} | {result['expected_spread']:.4f} ({result['expected_spread_se']:.4f}) | "
          f"{result['bayes_excess']:.3f} | {result['bayes_mse_predicted']:.4f} / "
          f"{result['bayes_mse_empirical']:.4f} ({result['bayes_mse_se']:.4f}) |")
    print(f"paired check, (Bayes MSE - oracle MSE - E Var) / se: z = {result['check_z']:+.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
