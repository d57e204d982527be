"""Multi-centre cohorts: what covariates, sites, ComBat and adapting to a new scanner each bring, on the
``multisite`` design with known truth (``inva simulate --design multisite``; docs/simulation.md).

Per seed, N subjects at K training sites and one held-out site; the training sites' subjects are split
60/20/20 (train / val / test), and every held-out-site subject is a test subject. Arms, each fitted on the
training sites' train and val subjects with the default preset:

- ``none``: no covariates, no site (the images only);
- ``covariates``: ``--covariates age,sex,apoe4``;
- ``covariates+site``: and ``--site site`` (per-site embedding, outcome offset and gain, per-site calibration,
  and each site's input intensities brought to one scale, ``[training] site_intensity``, the default);
- ``covariates+site-raw``: the same with the inputs as measured (``site_intensity = false``);
- ``combat``: the inputs harmonised by ComBat (neuroCombat; covariates protected), then ``--covariates``;
- ``combat+site``: the ComBat-harmonised inputs, ``--covariates`` and ``--site``.

ComBat harmonises the new site's inputs with estimates refitted on the training subjects and the new site's
own images (its inputs only: no outcome is used).

Each arm is scored on the training sites' test subjects, per site and pooled (MSE, the oracle's MSE, excess
error (MSE - oracle) / oracle, coverage and width of the calibrated 50/80/90/95% intervals), and on the
held-out site. For the held-out site, the arms with sites predict it with the pooled site (0 labeled
subjects) and adapted (``inva adapt``) with 10 and 30 of its subjects, scored on the rest of them (the
same subjects for every count); with site intensities, also with the pooled site reading the new site's
images on the training scale, its intensities fitted from those same subjects' images (``inva predict
--new-site-intensities``: no outcome used). Novelty: the AUC of the novelty score separating held-out-site subjects
from the training sites' test subjects, and the coverage of the subjects flagged novel.

    python analysis/multisite_study.py --seeds 0,1,2 --out docs/results/multisite
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's shared module
import analysis_common as common  # noqa: E402

COVARIATES = ["age", "sex", "apoe4"]
ARMS = ("none", "covariates", "covariates+site", "covariates+site-raw", "combat", "combat+site")
SITE_ARMS = ("covariates+site", "covariates+site-raw", "combat+site")   # adapted to the new site
ADAPT_COUNTS = (0, 10, 30)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="data seeds, comma-separated (each also the fit seed)")
    parser.add_argument("--n-subjects", type=int, default=600)
    parser.add_argument("--sites", type=int, default=3, help="training sites (plus one held out)")
    parser.add_argument("--noise", default="independent", choices=["independent", "smooth"])
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--epochs", type=int, help="cap on each fit's epochs")
    parser.add_argument("--quick", action="store_true", help="tiny networks and few epochs: a smoke run")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.arms = [a for a in args.arms.split(",") if a.strip()]
    unknown = set(args.arms) - set(ARMS)
    if unknown:
        parser.error(f"unknown arm(s): {', '.join(sorted(unknown))}")
    return args


def cohort_for(seed: int, args):
    from inva_pyro.data.cohort import Cohort
    from inva_pyro.data.simulate import write_cohort
    folder = args.out / "cohorts" / f"multisite-n{args.n_subjects}-k{args.sites}-{args.noise}-s{seed}"
    if not (folder / "cohort.json").exists():
        write_cohort(folder, "multisite", args.n_subjects, seed, sites=args.sites, noise=args.noise)
    spec = json.loads((folder / "cohort.json").read_text())
    return Cohort.from_dir(folder, seed=seed, conditions=COVARIATES, site="site"), spec["held_out_site"]


def without(subset, *fields):
    return dataclasses.replace(subset, **{f: None for f in fields})


def scores(prediction, subset, rows=None, levels=common.LEVELS) -> dict:
    """MSE, the oracle's (true mean against observed), excess error, and coverage and width of the calibrated
    intervals per level, over the subjects at ``rows`` (default: all)."""
    rows = np.arange(len(subset)) if rows is None else np.asarray(rows)
    pick = lambda a: np.asarray(a, dtype=np.float64)[rows]  # noqa: E731
    y, mean, truth = pick(subset.outcome), pick(prediction.mean), pick(subset.truth_mean)
    mse, oracle = float(((mean - y) ** 2).mean()), float(((truth - y) ** 2).mean())
    out = {"n": int(len(rows)), "mse": mse, "oracle_mse": oracle, "excess": (mse - oracle) / oracle}
    for lv in levels:
        lo, hi = (pick(bound) for bound in prediction.intervals[lv])
        covered = ((y >= lo) & (y <= hi)).reshape(len(rows), -1).mean(axis=1)   # each subject's coverage
        out[f"coverage_{lv:g}"] = float(covered.mean())
        # the sampling error of that coverage over these subjects (voxels of a subject are not independent)
        out[f"coverage_se_{lv:g}"] = float(covered.std(ddof=1) / np.sqrt(len(rows))) if len(rows) > 1 else None
        out[f"width_{lv:g}"] = float((hi - lo).mean())
    return out


def by_site(prediction, subset, sites: np.ndarray) -> dict:
    """``scores`` per site (``sites``: each subject's, from the cohort, whatever the arm saw), and pooled."""
    out = {site: scores(prediction, subset, np.flatnonzero(sites == site)) for site in sorted(set(sites))}
    out["pooled"] = scores(prediction, subset)
    return out


def arm_subsets(arm: str, cohort, held_out: str) -> dict:
    """The arm's train, val, test (training sites) and new-site subjects, as the arm sees them."""
    test, sites = cohort.test, np.asarray(cohort.test.sites.astype(str))
    subsets = {"train": cohort.train, "val": cohort.val, "test": test.subset(np.flatnonzero(sites != held_out)),
               "new": test.subset(np.flatnonzero(sites == held_out))}
    if arm == "none":
        return {k: without(s, "conditions", "sites") for k, s in subsets.items()}
    if arm == "covariates":
        return {k: without(s, "sites") for k, s in subsets.items()}
    if arm == "covariates+site-raw":
        return subsets
    if arm.startswith("combat"):  # harmonised on the training subjects; the new site's inputs by their own images
        from inva_pyro.data.harmonize import ComBat
        drop = ("sites",) if arm == "combat" else ()
        combat = ComBat.fit(subsets["train"], covariates=COVARIATES)
        known = {k: without(combat.transform(s), *drop) for k, s in subsets.items() if k != "new"}
        everyone = ComBat.fit(_joined(subsets["train"], subsets["new"]), covariates=COVARIATES)
        return {**known, "new": without(everyone.transform(subsets["new"]), *drop)}
    return subsets


def _joined(a, b):
    """The subjects of two in-memory subsets together (inputs, conditions and sites; for harmonisation)."""
    import pandas as pd
    return dataclasses.replace(
        a, subjects=a.subjects + b.subjects, inputs={k: np.concatenate([a.inputs[k], b.inputs[k]]) for k in a.inputs},
        outcome=None, truth_mean=None, truth_sd=None, covariates=None,
        conditions=pd.concat([a.conditions, b.conditions]), sites=pd.concat([a.sites, b.sites]))


def fit(subsets: dict, seed: int, args, arm: str = ""):
    from inva_pyro import InVA
    changes = [{"training.epochs": args.epochs}] if args.epochs else []
    if arm.endswith("-raw"):
        changes.append({"training.site_intensity": False})
    model = InVA(common.preset_with("inva", *changes, quick=args.quick))
    start = time.perf_counter()
    model.fit(subsets["train"], subsets["val"], seed=seed, device="cpu", progress=False)
    return model, time.perf_counter() - start


def new_site_rows(model, subsets: dict, seed: int, counts=ADAPT_COUNTS) -> dict:
    """The new site's subjects: 0 (pooled site) and ``counts`` labeled subjects adapted, scored on the rest."""
    from inva_pyro.adaptation import adapt, with_new_site_intensities
    new = subsets["new"]
    order = np.random.default_rng([seed, 23]).permutation(len(new))
    pool, rest = order[:max(counts)], new.subset(order[max(counts):])
    out = {}
    for count in counts:
        adapted = model if count == 0 else adapt(model, new.subset(pool[:count]), seed=seed)
        out[str(count)] = scores(adapted.predict(rest, seed=seed), rest)
        if count == 0 and model.standardizer.site_intensity is not None:  # inva predict --new-site-intensities
            reading, _ = with_new_site_intensities(model, rest)
            out["0, intensities from its images"] = scores(reading.predict(rest, seed=seed), rest)
    return out


def novelty_rows(model, subsets: dict, seed: int) -> dict:
    """AUC of the novelty score for new-site subjects against the training sites' test subjects, the share
    of each flagged novel, and the coverage (90%) of the flagged ones."""
    from sklearn.metrics import roc_auc_score
    from inva_pyro.criticism.novelty import NOVEL
    known, new = model.novelty(subsets["test"]), model.novelty(subsets["new"])
    both = dataclasses.replace(_joined(subsets["test"], subsets["new"]), outcome=np.concatenate(
        [subsets["test"].outcome, subsets["new"].outcome]), truth_mean=np.concatenate(
        [subsets["test"].truth_mean, subsets["new"].truth_mean]))
    flagged = np.flatnonzero(np.concatenate([known, new]) > NOVEL)
    pred = model.predict(both, seed=seed)
    return {"auc": float(roc_auc_score(np.r_[np.zeros(len(known)), np.ones(len(new))], np.r_[known, new])),
            "flagged_known": float((known > NOVEL).mean()), "flagged_new": float((new > NOVEL).mean()),
            "coverage_0.9_flagged": scores(pred, both, flagged)["coverage_0.9"] if len(flagged) else None,
            "n_flagged": int(len(flagged))}


def one_seed(seed: int, args) -> dict:
    cohort, held_out = cohort_for(seed, args)
    result = {"seed": seed, "held_out_site": held_out, "arms": {}}
    test_sites = np.asarray(cohort.test.sites.astype(str))
    test_sites = test_sites[test_sites != held_out]
    for arm in args.arms:
        subsets = arm_subsets(arm, cohort, held_out)
        model, fit_s = fit(subsets, seed, args, arm)
        row = {"fit_seconds": round(fit_s, 1), "epochs": len(model.history["epoch"]),
               "test": by_site(model.predict(subsets["test"], seed=seed), subsets["test"], test_sites)}
        if arm in SITE_ARMS:
            row["new_site"] = new_site_rows(model, subsets, seed)
            row["novelty"] = novelty_rows(model, subsets, seed)
        else:  # the same new-site subjects the adapted fits are scored on
            order = np.random.default_rng([seed, 23]).permutation(len(subsets["new"]))
            rest = subsets["new"].subset(order[max(ADAPT_COUNTS):])
            row["new_site"] = {"0": scores(model.predict(rest, seed=seed), rest)}
        result["arms"][arm] = row
        print(f"seed {seed} {arm}: excess {row['test']['pooled']['excess']:.3f} (training sites), "
              f"{row['new_site']['0']['excess']:.3f} (new site), fit {fit_s:.0f} s", flush=True)
    return result


def _mean_sd(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{np.mean(values):.3f}" + (f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else "")


def summary(results: list[dict], args) -> list[str]:
    """Markdown tables: means ± sd over seeds."""
    arms = [a for a in ARMS if a in args.arms]
    pooled = {a: [r["arms"][a]["test"]["pooled"] for r in results] for a in arms}
    lines = [f"Multisite design, {args.sites} training sites + 1 held out, {args.n_subjects} subjects, noise "
             f"{args.noise}, seeds {','.join(map(str, args.seeds))}; means ± sd over seeds.", "",
             "Training sites' test subjects (pooled):", "",
             "| arm | MSE | oracle MSE | excess error | excess vs none | coverage 50/80/90/95 |", "|---|---|---|---|---|---|"]
    for arm in arms:
        rows = pooled[arm]
        ratio = ([r["excess"] / n["excess"] - 1 for r, n in zip(rows, pooled["none"])] if "none" in pooled else [])
        cov = " / ".join(_mean_sd([r[f"coverage_{lv:g}"] for r in rows]).split(" ±")[0] for lv in common.LEVELS)
        lines.append(f"| {arm} | {_mean_sd([r['mse'] for r in rows])} | {_mean_sd([r['oracle_mse'] for r in rows])} | "
                     f"{_mean_sd([r['excess'] for r in rows])} | {_mean_sd(ratio) if ratio else 'n/a'} | {cov} |")
    lines += ["", "Coverage per training site (calibrated 50/80/90/95%; worst |coverage - nominal| over sites "
              "and levels, per seed):", "", "| arm | " + " | ".join(f"seed {r['seed']}" for r in results) + " |",
              "|---|" + "---|" * len(results)]
    for arm in arms:
        cells = []
        for r in results:
            sites = {k: v for k, v in r["arms"][arm]["test"].items() if k != "pooled"}
            miss, site, lv = max((abs(v[f"coverage_{lv:g}"] - lv), k, lv) for k, v in sites.items() for lv in common.LEVELS)
            se = sites[site].get(f"coverage_se_{lv:g}")   # its sampling error over the site's test subjects
            cells.append(f"{miss:.3f}" + (f" ({site}, n {sites[site]['n']}, se {se:.3f})" if se else ""))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "New site (its subjects not used for adapting; excess error relative to the same arm's training "
              "sites):", "", "| arm, labeled subjects | excess error | / training sites | coverage 50/80/90/95 |",
              "|---|---|---|---|"]
    for arm in arms:
        for count in results[0]["arms"][arm]["new_site"]:
            rows = [r["arms"][arm]["new_site"][count] for r in results]
            rel = [row["excess"] / r["arms"][arm]["test"]["pooled"]["excess"] for row, r in zip(rows, results)]
            cov = " / ".join(f"{np.mean([row[f'coverage_{lv:g}'] for row in rows]):.3f}" for lv in common.LEVELS)
            lines.append(f"| {arm}, {count} | {_mean_sd([row['excess'] for row in rows])} | {_mean_sd(rel)} | {cov} |")
    for arm in (a for a in SITE_ARMS if a in arms):
        nov = [r["arms"][arm]["novelty"] for r in results]
        lines += ["", f"Novelty score ({arm} fit): AUC new site against training sites' test subjects "
                  f"{_mean_sd([n['auc'] for n in nov])}; flagged novel (z > 3): new site "
                  f"{_mean_sd([n['flagged_new'] for n in nov])}, training sites {_mean_sd([n['flagged_known'] for n in nov])}; "
                  f"90% coverage of the flagged subjects (pooled site) {_mean_sd([n['coverage_0.9_flagged'] for n in nov])}."]
    return lines


def main(argv=None) -> dict:
    import warnings
    from inva_pyro.model.conditions import NewSiteWarning
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore", NewSiteWarning)  # the held-out site is meant to be new
    results = [one_seed(seed, args) for seed in args.seeds]
    lines = summary(results, args)
    print("\n".join(lines))
    (args.out / "multisite.json").write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v
                                                                  for k, v in vars(args).items()},
                                                         "results": results}, indent=1))
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    return {"results": results, "summary": lines}


if __name__ == "__main__":
    main()
