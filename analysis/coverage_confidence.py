#!/usr/bin/env python
"""Does a single fit's calibration hold? ``[prediction] coverage_confidence``, measured over calibration draws.

Split-conformal calibration is right on average over calibration sets; a user runs one fit, whose coverage
varies around nominal with the calibration set (the whole mask rests on one score per validation subject).
``coverage_confidence = c`` picks the intervals so that a fit covers at least nominal with probability c
over that draw (predict/conformal.py). This script measures both, on the ``paper`` design (or ``volume``):

1. fits the default preset once (300 training, 100 validation subjects, as ``inva fit`` does) and predicts a
   pool of ``--pool`` fresh subjects (raw predictive);
2. ``--draws`` times per n in ``--n-cal`` (60 and 100): draws n pool subjects as the calibration set and
   refits the voxel calibrator and the spatial covariance (region calibration) on them, with and without
   ``--confidence``; the networks are unchanged;
3. scores each draw on the rest of the pool: coverage of voxels, 8 regions and the whole mask at 50, 80, 90
   and 95%, and the mean interval width. On the paper design the coverage is exact given each subject's
   true mean and sd (the outcome is Gaussian with known covariance: independent, or the smooth-noise
   covariance), so the only scoring noise is which subjects are scored; the volume design scores voxels
   exactly and region means by whether the observed mean falls inside.

Per n, family and level it reports the mean coverage, the share of draws more than 0.01 below nominal and
below nominal at all, and the width with / without. Writes OUT/coverage_confidence.json and .md.

    python analysis/coverage_confidence.py --noise independent --out DIR
    python analysis/coverage_confidence.py --quick --out /tmp/cc     # seconds
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's shared module
import analysis_common as common  # noqa: E402

LEVELS = common.LEVELS
FAMILIES = {"voxels": "voxels", "r8": "8 regions", "all": "whole mask"}
TOLERANCE = 0.01


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.pool_study_arguments(p, n_cal="60,100")
    p.add_argument("--draws", type=int, default=20, help="calibration sets per size")
    p.add_argument("--confidence", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    return p.parse_args(argv)


def study_settings(args) -> dict:
    if args.quick:
        args.pool, args.draws, args.n_cal = 80, 3, "12,20"
    return dict(sizes=[24 if args.quick else 300], n_val=12 if args.quick else 100, n_test=args.pool,
                grid=(8, 8) if args.quick else None, noise=args.noise, design=args.design, voxel_mm=args.voxel_mm,
                out=args.out, epochs=2 if args.quick else None, n_cal=[int(v) for v in args.n_cal.split(",")])


def fit_and_predict(args, cfg: dict) -> dict:
    """The fit, the pool's raw predictive, truth and the scored regions' weights (and exact moments)."""
    from scipy import sparse

    from inva_pyro import InVA
    from inva_pyro.predict.spatial import label_weights

    cohort, train, val, pool = common.train_val_pool(args.seed, cfg)
    preset = common.preset_with("inva", {"training.epochs": cfg["epochs"]} if cfg["epochs"] else {}, quick=args.quick)
    start = time.perf_counter()
    model = InVA(preset).fit(train, val, seed=args.seed, progress=False)
    fit_s = time.perf_counter() - start
    pred = model.predict(pool, seed=args.seed)
    space = cohort.spaces[cohort.outcome_name]
    n_features = pred.mean.shape[1]
    weights = {name: label_weights(labels)[1] for name, labels in common.study_regions(space).items() if name == "r8"}
    weights["all"] = sparse.csr_matrix(np.full((1, n_features), 1.0 / n_features))
    truth_mean, truth_sd = (np.asarray(a, dtype=np.float64) for a in (pool.truth_mean, pool.truth_sd))
    rank = preset.prediction.covariance_rank
    return dict(model=model, observed=np.asarray(pool.outcome, dtype=np.float64), mean=pred.mean.astype(np.float64),
                sd=pred.raw_sd.astype(np.float64), truth_mean=truth_mean, truth_sd=truth_sd, weights=weights,
                region_truth=region_truth(args, space, weights, truth_mean, truth_sd), fit_s=fit_s,
                best_epoch=model.history["best_epoch"], rank=None if rank == "full" else rank,
                coords=space.feature_coordinates())


def region_truth(args, space, weights: dict, truth_mean, truth_sd) -> dict | None:
    """family -> (true mean (n, L), true sd (n, L)) of region means, where the noise covariance is known
    (paper design: independent, or ``smooth_noise_covariance``); None otherwise (scored on observed means)."""
    if args.design != "paper":
        return None
    from inva_pyro.data.simulate.common import smooth_noise_covariance
    from inva_pyro.data.simulate.paper import NOISE_SIGMA

    grid = space.grid_shape[:2]
    covariance = smooth_noise_covariance(tuple(grid), NOISE_SIGMA) if args.noise == "smooth" else None
    out = {}
    for name, w in weights.items():
        dense = w.toarray()
        scaled = dense[None, :, :] * truth_sd[:, None, :]                     # (n, L, V): w_R * sd_i
        var = (np.einsum("nlv,vu,nlu->nl", scaled, covariance, scaled, optimize=True) if covariance is not None
               else np.square(scaled).sum(-1))
        out[name] = (truth_mean @ dense.T, np.sqrt(var))
    return out


def calibrate(f: dict, rows: np.ndarray, seed: int, confidence: float):
    """The voxel calibrator and the spatial covariance refitted on the pool subjects ``rows``."""
    import torch

    from inva_pyro.predict.calibration import Calibrator
    from inva_pyro.predict.spatial import fit_spatial_covariance

    y, m, s = f["observed"][rows], f["mean"][rows], f["sd"][rows]
    calibrator = Calibrator.fit(y, m, s, "quantile", confidence=confidence)
    spatial = fit_spatial_covariance(torch.as_tensor(y), m, s, rank=f["rank"], coords=f["coords"], seed=seed,
                                     confidence=confidence)[2]
    return calibrator, spatial


def _covered(lo, hi, mean, sd) -> np.ndarray:
    """Probability that a Normal(mean, sd) value falls in [lo, hi]."""
    return stats.norm.cdf((hi - mean) / sd) - stats.norm.cdf((lo - mean) / sd)


def score(f: dict, rows: np.ndarray, calibrator, spatial) -> dict:
    """family -> level -> {"coverage", "width", "scoring_sd"} on the pool subjects ``rows``."""
    from inva_pyro.predict.regions import region_interval

    out = {"voxels": {}}
    mean, sd = f["mean"][rows], f["sd"][rows]
    for lv in LEVELS:
        lo, hi = calibrator.interval(mean, sd, lv)
        per_subject = _covered(lo, hi, f["truth_mean"][rows], f["truth_sd"][rows]).mean(1)
        out["voxels"][lv] = _summary(per_subject, hi - lo)
    for name, weights in f["weights"].items():
        out[name] = {}
        region_mean, region_sd = spatial.region_moments(mean, sd, weights)
        for lv in LEVELS:
            lo, hi = region_interval(spatial, region_mean, region_sd, weights, lv)
            if f["region_truth"] is not None:
                true_mean, true_sd = (a[rows] for a in f["region_truth"][name])
                per_subject = _covered(lo, hi, true_mean, true_sd).mean(1)
            else:
                observed = np.asarray(weights @ f["observed"][rows].T).T
                per_subject = ((observed >= lo) & (observed <= hi)).mean(1)
            out[name][lv] = _summary(per_subject, hi - lo)
    return out


def _summary(per_subject: np.ndarray, width: np.ndarray) -> dict:
    return {"coverage": float(per_subject.mean()), "width": float(np.mean(width)),
            "scoring_sd": float(per_subject.std(ddof=1) / np.sqrt(len(per_subject)))}


def run_draws(args, cfg: dict, f: dict) -> dict:
    """n -> list over draws of {"without": score, "with": score}."""
    rng = np.random.default_rng([args.seed, 77])
    draws = {}
    for n in cfg["n_cal"]:
        draws[n] = []
        for r in range(args.draws):
            order = rng.permutation(len(f["observed"]))
            calibrator, spatial = calibrate(f, order[:n], seed=r, confidence=args.confidence)
            test = order[n:]
            draws[n].append({"with": score(f, test, calibrator, spatial),
                             "without": score(f, test, calibrator.with_confidence(None),
                                              spatial.with_confidence(None))})
        print(f"n_cal {n}: {args.draws} draws done", flush=True)
    return draws


def summarise(draws: dict) -> dict:
    """n -> family -> level -> mean coverage, shares of draws below nominal (- 0.01), width, per variant."""
    table = {}
    for n, rows in draws.items():
        table[n] = {}
        for family in FAMILIES:
            table[n][family] = {}
            for lv in LEVELS:
                cell = {}
                for variant in ("without", "with"):
                    cov = np.array([row[variant][family][lv]["coverage"] for row in rows])
                    cell[variant] = {"coverage_mean": float(cov.mean()), "coverage_sd": float(cov.std(ddof=1)),
                                     "share_below_tolerance": float(np.mean(cov < lv - TOLERANCE)),
                                     "share_below_nominal": float(np.mean(cov < lv)),
                                     "width": float(np.mean([row[variant][family][lv]["width"] for row in rows]))}
                cell["width_ratio"] = cell["with"]["width"] / cell["without"]["width"]
                cell["scoring_sd"] = float(np.mean([row["with"][family][lv]["scoring_sd"] for row in rows]))
                table[n][family][lv] = cell
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    common.prepare_run(args)
    cfg = study_settings(args)
    start = time.perf_counter()
    f = fit_and_predict(args, cfg)
    draws = run_draws(args, cfg, f)
    command = "python analysis/coverage_confidence.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"command": command, "design": args.design, "noise": args.noise, "seed": args.seed,
              "n_train": cfg["sizes"][0], "n_val": cfg["n_val"], "pool": int(len(f["observed"])),
              "draws": args.draws, "confidence": args.confidence, "tolerance": TOLERANCE,
              "exact_region_coverage": f["region_truth"] is not None, "fit_seconds": round(f["fit_s"], 1),
              "best_epoch": f["best_epoch"], "seconds": round(time.perf_counter() - start, 1),
              "summary": {str(n): {fam: {str(lv): c for lv, c in v.items()} for fam, v in t.items()}
                          for n, t in summarise(draws).items()}}
    (args.out / "coverage_confidence.json").write_text(json.dumps(result, indent=2))
    (args.out / "coverage_confidence.md").write_text(markdown(result))
    print((args.out / "coverage_confidence.md").read_text())
    return 0


def markdown(r: dict) -> str:
    exact = "exact given the truth" if r["exact_region_coverage"] else "observed region means (voxels exact)"
    lines = [f"`{r['command']}`", "",
             f"{r['design']} design, {r['noise']} noise, seed {r['seed']}: one fit ({r['n_train']} training, "
             f"{r['n_val']} validation subjects, best epoch {r['best_epoch']}), {r['pool']} pool subjects; "
             f"{r['draws']} calibration draws per size, scored on the rest of the pool ({exact}); "
             f"coverage_confidence = {r['confidence']}. Cells: without / with.", "",
             "| n | family | level | mean coverage | sd over draws | draws < nominal - 0.01 | draws < nominal "
             "| width with / without | scoring sd |", "|---|---|---|---|---|---|---|---|---|"]
    for n, table in r["summary"].items():
        for family, label in FAMILIES.items():
            for lv, c in table[family].items():
                w, h = c["without"], c["with"]
                lines.append(f"| {n} | {label} | {lv} | {w['coverage_mean']:.3f} / {h['coverage_mean']:.3f} | "
                             f"{w['coverage_sd']:.3f} / {h['coverage_sd']:.3f} | "
                             f"{w['share_below_tolerance']:.2f} / {h['share_below_tolerance']:.2f} | "
                             f"{w['share_below_nominal']:.2f} / {h['share_below_nominal']:.2f} | "
                             f"{c['width_ratio']:.3f} | {c['scoring_sd']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
