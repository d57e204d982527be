#!/usr/bin/env python
"""How much can modelling spatial correlation lower the energy score at all? The oracle, measured.

A goal of the joint predictive is an energy score below the independent-voxel predictive's on every
design. Before reading a fitted model's difference, this script measures the largest difference any
covariance model could make. It uses the true predictive distribution of the
simulation: the true mean and sd of every voxel, and the true noise process.

- **joint oracle:** draws of mean + sd x (the design's own noise process). With smooth noise these
  are spatially correlated exactly as the observed images are.
- **independent oracle:** draws of mean + sd x N(0, 1), independent per voxel. These have the same
  margins, without the correlation.

Both are scored on the same observed images, subject by subject (``criticism.scores.StreamingEnergy``,
the estimator ``inva evaluate`` uses, with the same number of draws), so the paired difference and its
standard error show the size of the gain and how many subjects a test needs to see it. With
independent noise the two oracles are the same distribution: no gain is possible there, and only a
fitted model's own errors (a misjudged subject-level summary shifts many voxels together) can make
the joint predictive worth anything.

    python analysis/energy_score_oracle.py --design paper --pool 2000 --out DIR
    python analysis/energy_score_oracle.py --design volume --voxel-mm 6 --pool 1000 --out DIR

Writes DIR/oracle_<design>.json and prints one table row.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--design", choices=["paper", "volume"], default="paper")
    p.add_argument("--voxel-mm", type=int, default=6)
    p.add_argument("--pool", type=int, default=2000, help="simulated subjects scored")
    p.add_argument("--draws", type=int, default=None, help="draws per subject (default: inva evaluate's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def paper_subjects(n: int, seed: int):
    """(observed, mean, sd) arrays (n, V) and a sampler of the true noise: (rng, draws) -> (draws, V)."""
    from inva_pyro.data.simulate.common import smooth_noise
    from inva_pyro.data.simulate.paper import NOISE_SIGMA, PAPER_GRID, simulate_paper

    sim = simulate_paper(n, seed, noise="smooth")
    flat = lambda a: np.asarray(a, dtype=np.float64).reshape(n, -1)  # noqa: E731
    grid = tuple(PAPER_GRID)
    return (flat(sim["outcome"]), flat(sim["true_mean"]), flat(sim["true_sd"]),
            lambda rng, s: smooth_noise(rng, s, grid, NOISE_SIGMA).reshape(s, -1))


def volume_subjects(n: int, seed: int, voxel_mm: int):
    from inva_pyro.data.simulate.common import smooth_noise
    from inva_pyro.data.simulate.volume import VolumeDesign

    design = VolumeDesign(n, seed, voxel_mm=voxel_mm, noise="smooth")
    images = [design.subject(i) for i in range(n)]
    take = lambda key: np.stack([im[key][design.mask] for im in images]).astype(np.float64)  # noqa: E731
    sigma = design.NOISE_SIGMA_MM / voxel_mm
    return (take("pet"), take("pet_true_mean"), take("pet_true_sd"),
            lambda rng, s: smooth_noise(rng, s, design.shape, sigma, mode="nearest")[:, design.mask])


def oracle_energy(observed, mean, sd, noise, draws: int, seed: int) -> dict:
    from inva_pyro.criticism.scores import StreamingEnergy

    rng = np.random.default_rng([seed, 31])
    scores = {"joint": np.empty(len(observed)), "independent": np.empty(len(observed))}
    for i in range(len(observed)):
        for name, eta in (("joint", noise(rng, draws)), ("independent", rng.standard_normal((draws, mean.shape[1])))):
            energy = StreamingEnergy(observed[i:i + 1])
            energy.update((mean[i] + sd[i] * eta)[:, None, :])
            scores[name][i] = energy.value()[0]
    diff = scores["joint"] - scores["independent"]
    return {"energy_joint": float(scores["joint"].mean()), "energy_independent": float(scores["independent"].mean()),
            "difference": float(diff.mean()), "difference_se": float(diff.std(ddof=1) / np.sqrt(len(diff))),
            "relative_difference": float(diff.mean() / scores["independent"].mean()), "n_subjects": len(diff)}


def main(argv=None) -> int:
    from inva_pyro.criticism.scores import DRAWS

    args = parse_args(argv)
    draws = args.draws or DRAWS
    if args.design == "paper":
        observed, mean, sd, noise = paper_subjects(args.pool, args.seed)
    else:
        observed, mean, sd, noise = volume_subjects(args.pool, args.seed, args.voxel_mm)
    result = {"design": args.design, "voxel_mm": args.voxel_mm if args.design == "volume" else None,
              "noise": "smooth", "seed": args.seed, "draws": draws, "n_features": int(mean.shape[1]),
              **oracle_energy(observed, mean, sd, noise, draws, args.seed),
              "command": "python analysis/energy_score_oracle.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"oracle_{args.design}.json").write_text(json.dumps(result, indent=2))
    print("| design | features | subjects | oracle energy, independent | joint - independent (se) | relative |")
    print(f"| {args.design} smooth | {result['n_features']} | {result['n_subjects']} | "
          f"{result['energy_independent']:.4f} | {result['difference']:+.4f} ({result['difference_se']:.4f}) | "
          f"{100 * result['relative_difference']:+.2f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
