"""The ``inva`` command line's arguments: every command, option and default in one place (cli.py runs them)."""
from __future__ import annotations

import argparse
from pathlib import Path

LEVELS = "0.5,0.8,0.9,0.95"


def _levels(text: str) -> list[float]:
    try:
        levels = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not levels or not all(0 < lv < 1 for lv in levels):
        raise argparse.ArgumentTypeError(f"levels must lie strictly between 0 and 1: {text!r}")
    return levels


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inva", description="Integrative VAEs (InVA) in Pyro: predict an outcome "
                                     "image from several input images with calibrated uncertainty.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_simulate, _fit, _predict_and_evaluate, _adapt, _latents, _manifest, _tune, _demo):
        add(sub)
    return parser


def _simulate(sub) -> None:
    """``inva simulate``."""
    p = sub.add_parser("simulate", help="write a simulated cohort with known truth")
    p.add_argument("--design", default="paper", help="simulation design: paper, volume, surface, regions or "
                   "multisite (default: paper)")
    p.add_argument("--voxel-mm", type=int, help="voxel size in mm of the volume design (integer; default 4; "
                   "2 is whole-brain PET resolution, about 230,000 voxels in the brain mask)")
    p.add_argument("--n-subjects", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", default="independent", choices=["independent", "smooth"],
                   help="outcome noise: independent per voxel, or smooth (a scanner's point-spread function)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--unlabeled", type=int, default=0, metavar="N",
                   help="N more training subjects with MRI only (the outcome cell empty)")
    p.add_argument("--missing", type=float, default=0.0, metavar="P",
                   help="each input cell empty with probability P (never every input of a subject)")
    p.add_argument("--missing-covariates", type=float, default=0.0, metavar="P",
                   help="each covariate cell (cohort.json \"covariates\") empty with probability P")
    p.add_argument("--sites", type=int, metavar="K", help="multisite design: K training sites and one held-out "
                   "site (default 3)")


def _fit(sub) -> None:
    """``inva fit``."""
    p = sub.add_parser("fit", help="train a model; RUNDIR holds everything needed to predict later")
    p.add_argument("--manifest", type=Path, help="cohort manifest CSV")
    p.add_argument("--inputs", type=_names, help="input image columns, comma-separated")
    p.add_argument("--outcome", help="outcome image column")
    p.add_argument("--mask", type=Path, help="brain mask (NIfTI) for volume cohorts")
    p.add_argument("--model", default="inva", help="preset name from models/ or a TOML path (default: inva)")
    p.add_argument("--covariates", type=_names, metavar="COL[,COL...]",
                   help="manifest columns the model conditions on (numeric ones standardised, text ones one-hot; "
                   "an empty cell is a covariate not acquired); predict then needs the same columns")
    p.add_argument("--site", metavar="COL", help="manifest column of each subject's site (scanner, centre): the "
                   "input decoders and the outcome's offset and gain depend on it")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, help="override the preset's maximum number of epochs")
    p.add_argument("--batch-size", type=int, help="override the preset's minibatch size (subjects per SVI step; "
                   "the ELBO is scaled to the training size whatever it is): larger batches fill a GPU")
    p.add_argument("--calibration-share", type=float, metavar="S",
                   help="override the preset's training.calibration_share: the share of validation subjects kept "
                   "out of early stopping and used only for calibration (0 <= S < 1)")
    p.add_argument("--out", type=Path, help="run folder to create")
    p.add_argument("--resume", type=Path, metavar="RUNDIR", help="continue the interrupted run in RUNDIR")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--lazy", action="store_true", help="read training images from disk minibatch by minibatch "
                   "(memory bounded by the batch and a cache, not by the number of subjects); with --device cuda "
                   "the cohort is read once into GPU memory when it takes at most half of what is free")
    p.add_argument("--cache-subjects", type=int, default=64, help="subjects kept in the --lazy read cache")
    p.add_argument("--devices", type=int, default=1, help="processes (GPUs, or CPU workers) per node (default 1)")
    p.add_argument("--num-nodes", type=int, default=1, help="nodes of a torchrun job (see docs/performance.md)")


def _predict_and_evaluate(sub) -> None:
    """``inva predict and inva evaluate``."""
    for name, helptext in (("predict", "posterior predictive maps for every subject of a manifest"),
                           ("evaluate", "predictions against observed outcomes: metrics.json and figures")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--run", required=True, type=Path, help="run folder written by `inva fit`")
        p.add_argument("--manifest", required=True, type=Path)
        p.add_argument("--out", required=True, type=Path)
        p.add_argument("--samples", type=int, help="posterior predictive draws (default: the preset's)")
        p.add_argument("--levels", type=_levels, default=_levels(LEVELS), help=f"central interval levels ({LEVELS})")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
        p.add_argument("--regions", metavar="LABELS", help="label image on the cohort's grid (NIfTI, 0 = background), "
                       "label GIfTI (LH,RH for a pair) or CSV of region,group for region tables: region means "
                       + ("in regions.csv" if name == "predict" else "scored in metrics.json (key regions)"))
        p.add_argument("--new-site-intensities", action="store_true", help="sites the run has no intensities for "
                       "(sites training never saw): fit their input gains and offset fields from this manifest's images "
                       "(5 subjects or more per site; no outcome used); their PET scale stays the pooled site's")
        if name == "predict":
            p.add_argument("--raw", action="store_true", help="write the uncalibrated posterior predictive maps")
        else:
            p.add_argument("--psis-subjects", type=int, default=16, metavar="N",
                           help="subjects whose guide is checked by Pareto k-hat (default 16; 0 skips it: the "
                                "slowest part of evaluate on whole-brain images)")
            p.add_argument("--psis-particles", type=int, default=1000, metavar="M",
                           help="importance particles per subject for the k-hat (default 1000)")
            p.add_argument("--by", metavar="COLUMN", help="also score each group of subjects sharing a value of "
                           "this manifest column (site, sex, diagnosis, ...): metrics.json key by, "
                           "coverage_by_group.png")


def _adapt(sub) -> None:
    """``inva adapt``."""
    p = sub.add_parser("adapt", help="adapt a run fitted with --site to a new site from a few of its subjects "
                       "(every row of the manifest, with the outcome)")
    p.add_argument("--run", required=True, type=Path, help="run folder written by `inva fit --site COL`")
    p.add_argument("--manifest", required=True, type=Path, help="subjects of the new site(s), every one with the "
                   "outcome; the run's inputs, covariates and site column")
    p.add_argument("--out", required=True, type=Path, help="the adapted run folder to create")
    p.add_argument("--steps", type=int, default=300, help="SVI steps fitting each new site (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])


def _latents(sub) -> None:
    """``inva latents``."""
    p = sub.add_parser("latents", help="posterior mean and sd of the shallow and deep latents per subject")
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="CSV file to write (one row per subject)")
    p.add_argument("--traversal", type=Path, metavar="DIR", help="also write latent-traversal figures here")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])


def _manifest(sub) -> None:
    """``inva manifest``."""
    p = sub.add_parser("manifest", help="a manifest CSV from a BIDS dataset and its derivatives (pybids)")
    p.add_argument("--bids", required=True, type=Path, help="BIDS dataset folder (derivatives/ indexed too)")
    p.add_argument("--image", required=True, action="append", metavar="NAME=ENTITIES",
                   help="a column and the entities selecting its file, keys as in file names or pybids' names, "
                   "e.g. gm=space-MNI152NLin2009cAsym,label-GM,suffix-probseg or t1=acq-mprage,suffix-T1w; "
                   "KEY-none: the entity is absent (t1=suffix-T1w,desc-none: the raw T1w); repeat for every image")
    p.add_argument("--derivatives", action="append", type=Path, default=[], metavar="DIR",
                   help="a derivatives dataset, or a folder of them, outside DIR/derivatives (repeatable)")
    p.add_argument("--session", action="append", default=[], metavar="LABEL",
                   help="keep only this session's rows (ses- optional; repeatable)")
    p.add_argument("--exclude-subjects", action="append", default=[], metavar="LABEL,...",
                   help="subjects to leave out, e.g. emptyroom (sub- optional; comma-separated, repeatable)")
    p.add_argument("--strict", action="store_true",
                   help="stop (exit 2, nothing written) when an image cannot be read, instead of listing it")
    p.add_argument("--out", required=True, type=Path, help="manifest CSV to write")


def _tune(sub) -> None:
    """``inva tune``."""
    p = sub.add_parser("tune", help="an Optuna hyperparameter study; STUDYDIR/best.toml is a preset for --model")
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument("--inputs", required=True, type=_names, help="input image columns, comma-separated")
    p.add_argument("--outcome", required=True, help="outcome image column")
    p.add_argument("--mask", type=Path, help="brain mask (NIfTI) for volume cohorts")
    p.add_argument("--model", default="inva", help="base preset whose settings the trials override (default: inva)")
    p.add_argument("--space", type=Path, help="TOML file overriding the search space (docs/bids_to_tuned.md)")
    p.add_argument("--trials", required=True, type=int, help="run until the study has N finished trials")
    p.add_argument("--epochs", type=int, help="cap on each trial's epochs")
    p.add_argument("--objective", default="crps", choices=["crps", "mse"], help="validation metric to minimise")
    p.add_argument("--pruner", default="median", choices=["median", "hyperband", "none"])
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite:///STUDYDIR/study.db)")
    p.add_argument("--study-name", default="inva", help="study name inside the storage (default: inva)")
    p.add_argument("--seed", type=int, default=0, help="seed of every trial's fit and of the data split")
    p.add_argument("--sampler-seed", type=int, help="TPE sampler seed (default: --seed; give each parallel "
                   "worker its own)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", required=True, type=Path, help="study folder: best.toml, trials.csv, figures")


def _demo(sub) -> None:
    """``inva demo``."""
    p = sub.add_parser("demo", help="simulate, fit, predict and evaluate on the built-in design")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--n-subjects", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
