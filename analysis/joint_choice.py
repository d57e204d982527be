#!/usr/bin/env python
"""Which covariance factor for the joint predictive (predict/spatial.py)? A synthetic check with known truth.

Outcome errors e_i = s_i * eta_i with eta smooth Gaussian noise (white noise smoothed by a Gaussian of
``--sigma`` pixels on a 32 x 32 periodic grid, unit variance; exact covariance known) and heteroscedastic
sds s_i (log-normal). ``fit_spatial_covariance`` is fitted on ``--n-val`` "validation" subjects with the predictive mean
0 and sd s (a perfect mean, so only the covariance is tested), once per factor:

- ``sample``: the residuals' sample second moment (rank n_val; the default of ``inva fit``);
- ``pca R``: probabilistic PCA of rank R (``[prediction] covariance_rank = R``).

On ``--n-test`` new subjects it reports, for 8 blocks (4 x 2), 50 Voronoi regions and the whole grid:
predicted / true variance of region means (true: w' S C S w) and the coverage of the region intervals
at 50/80/90/95%.

    python analysis/joint_choice.py            # a minute on one core
    python analysis/joint_choice.py --quick    # seconds
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

LEVELS = (0.5, 0.8, 0.9, 0.95)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-val", type=int, default=100)
    p.add_argument("--n-test", type=int, default=400)
    p.add_argument("--sigma", type=float, default=1.5)
    p.add_argument("--ranks", default="16,48", help="PCA ranks to compare with the sample factor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="40 validation and 50 test subjects, rank 16 only")
    args = p.parse_args(argv)
    if args.quick:
        args.n_val, args.n_test, args.ranks = 40, 50, "16"
    from inva_pyro.data.simulate.common import smooth_noise, smooth_noise_covariance
    from inva_pyro.predict.regions import region_interval
    from inva_pyro.predict.spatial import fit_spatial_covariance, label_weights, voronoi_labels

    grid, v = (32, 32), 1024
    rng = np.random.default_rng(args.seed)
    cov = smooth_noise_covariance(grid, args.sigma)
    coords = np.argwhere(np.ones(grid)).astype(float)

    def errors(n):
        sd = 0.5 * np.exp(0.3 * rng.standard_normal((n, v)))
        return sd, sd * smooth_noise(rng, n, grid, args.sigma).reshape(n, v)

    sd_val, e_val = errors(args.n_val)
    sd_test, e_test = errors(args.n_test)
    i, j = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    regions = {"8 regions": ((i // 8) * 2 + (j // 16) + 1).ravel(),
               "50 regions": voronoi_labels(coords, 50, np.random.default_rng(2026)),
               "whole grid": np.ones(v, dtype=int)}
    print(f"n_val {args.n_val}, n_test {args.n_test}, PSF sigma {args.sigma} px, seed {args.seed}\n")
    print("| factor | regions | predicted / true variance | coverage " + " / ".join(f"{lv:g}" for lv in LEVELS) + " |")
    print("|---|---|---|---|")
    for rank in [None] + [int(r) for r in args.ranks.split(",") if r]:
        _, _, joint = fit_spatial_covariance(torch.as_tensor(e_val), np.zeros_like(e_val), sd_val, rank=rank, coords=coords,
                                seed=args.seed)
        for name, labels in regions.items():
            _, weights = label_weights(labels)
            _, region_sd = joint.region_moments(np.zeros_like(sd_test), sd_test, weights)
            dense = weights.toarray()
            true_var = np.stack([((dense * s) @ cov * (dense * s)).sum(1) for s in sd_test])
            err = np.asarray(weights @ e_test.T).T
            bounds = [region_interval(joint, np.zeros_like(err), region_sd, weights, lv) for lv in LEVELS]
            cover = [np.mean((err >= lo) & (err <= hi)) for lo, hi in bounds]
            label = "sample" if rank is None else f"pca {rank}"
            print(f"| {label} | {name} | {np.mean(region_sd ** 2 / true_var):.3f} | "
                  + " / ".join(f"{c:.3f}" for c in cover) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
