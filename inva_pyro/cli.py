"""The ``inva`` command line (README, "Command line"). Thin: every command is a few calls of the Python API."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .cli_args import build_parser
from .errors import InputError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .train.loop import TrainingDiverged
    try:
        return COMMANDS[args.command](args) or 0
    except InputError as exc:
        print(f"inva: error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"inva: {exc}", file=sys.stderr)
        return 1


def _simulate(args) -> None:
    from .data.simulate import write_cohort
    if args.n_subjects < 10:
        raise InputError(f"--n-subjects {args.n_subjects}: need at least 10 subjects")
    if args.voxel_mm is not None:
        if args.design != "volume":
            raise InputError(f"--voxel-mm: only the volume design has a voxel size (not '{args.design}')")
        if not 1 <= args.voxel_mm <= 12:
            raise InputError(f"--voxel-mm {args.voxel_mm}: must be an integer from 1 to 12")
    out = write_cohort(args.out, args.design, args.n_subjects, args.seed, voxel_mm=args.voxel_mm,
                       noise=args.noise, unlabeled=args.unlabeled, missing=args.missing, sites=args.sites,
                       missing_covariates=args.missing_covariates)
    extra = f" and {args.unlabeled} MRI-only training subjects" if args.unlabeled else ""
    print(f"wrote {args.n_subjects} subjects{extra} to {out} (manifest.csv, cohort.json)")
    if args.design == "multisite":
        spec = json.loads((out / "cohort.json").read_text())
        print(f"sites {', '.join(spec['sites'][:-1])} train/val/test; {spec['held_out_site']} held out (test only)")


def _fit(args) -> None:
    from . import Cohort, load_preset
    from .registry import model_class, model_from_preset
    if args.resume is not None:
        run_dir = args.resume
        from .runs import read_info
        run = read_info(run_dir)
        fit_args = run.get("fit_args") or {}
        if not fit_args:
            raise InputError(f"{run_dir / 'run.json'}: no fit arguments recorded; this run cannot be resumed")
        cohort = Cohort.from_manifest(fit_args["manifest"], fit_args["inputs"], fit_args["outcome"],
                                      mask=fit_args.get("mask"), seed=run["seed"], lazy=fit_args.get("lazy", False),
                                      cache_subjects=fit_args.get("cache_subjects", 64),
                                      conditions=fit_args.get("covariates"), site=fit_args.get("site"))
        model = model_class(run.get("family", "inva"))()
        model.fit(cohort.train, cohort.val, seed=run["seed"], device=fit_args.get("device", "auto"),
                  run_dir=run_dir, resume=True, progress=sys.stderr.isatty())
    else:
        missing = [flag for flag, value in (("--manifest", args.manifest), ("--inputs", args.inputs),
                                            ("--outcome", args.outcome), ("--out", args.out)) if not value]
        if missing:
            raise InputError(f"inva fit needs {', '.join(missing)} (or --resume RUNDIR)")
        run_dir = args.out
        if run_dir.exists() and any(run_dir.iterdir()) and not args.overwrite:
            raise InputError(f"{run_dir}: already exists and is not empty (use --overwrite to replace it)")
        devices = _check_devices(args)
        preset = load_preset(args.model)
        if args.epochs:
            preset.training.epochs = args.epochs
        if args.batch_size is not None:
            if args.batch_size < 1:
                raise InputError(f"--batch-size {args.batch_size}: must be at least 1")
            preset.training.batch_size = args.batch_size
        if args.calibration_share is not None:
            if not 0 <= args.calibration_share < 1:
                raise InputError(f"--calibration-share {args.calibration_share}: must be at least 0 and below 1")
            preset.training.calibration_share = args.calibration_share
        cohort = Cohort.from_manifest(args.manifest, args.inputs, args.outcome, mask=args.mask, seed=args.seed,
                                      lazy=args.lazy, cache_subjects=args.cache_subjects, conditions=args.covariates,
                                      site=args.site)
        fit_args = {"manifest": str(args.manifest.resolve()), "inputs": args.inputs, "outcome": args.outcome,
                    "covariates": args.covariates, "site": args.site,
                    "mask": str(args.mask.resolve()) if args.mask else None, "device": args.device,
                    "lazy": args.lazy, "cache_subjects": args.cache_subjects,
                    "model": str(args.model)}
        model = model_from_preset(preset)
        if model.needs_every_input:  # a run that cannot predict its own cohort is refused before training
            from .data.missing import require_inputs
            require_inputs(cohort.test if cohort.has_split else cohort.all, args.inputs, f"'{preset.name}'",
                           where=f"{args.manifest}" + (" (split 'test')" if cohort.has_split else ""))
        if run_dir.exists():
            import shutil
            shutil.rmtree(run_dir)
        model = model.fit(cohort.train, cohort.val, seed=args.seed, device=args.device, devices=devices,
                          run_dir=run_dir, progress=sys.stderr.isatty(), extra_info={"fit_args": fit_args})
    h = model.history
    if not h or not h.get("epoch"):
        print(f"fitted; run folder: {run_dir}")
        return
    print(f"trained {len(h['epoch'])} epochs (best {h['best_epoch']}, validation MSE {min(h['val_mse']):.4f} "
          f"standardised); run folder: {run_dir}")


def _check_devices(args) -> int:
    """Processes to spawn here: --devices locally; none inside a torchrun job, which made them already."""
    from .train.distributed import launched_by_torchrun
    if args.devices < 1 or args.num_nodes < 1:
        raise InputError("--devices and --num-nodes must be at least 1")
    if launched_by_torchrun():
        import os
        expected = args.devices * args.num_nodes
        if int(os.environ["WORLD_SIZE"]) != expected:
            raise InputError(f"torchrun started {os.environ['WORLD_SIZE']} processes but --devices x --num-nodes "
                             f"= {expected}")
        return 1
    if args.num_nodes > 1:
        raise InputError("--num-nodes > 1: start one process per device on every node with torchrun "
                         "(see docs/performance.md)")
    return args.devices


def _load_for_manifest(args, require_outcome: bool):
    """The run's model and the manifest's subjects to predict (test rows when there is a split)."""
    from . import Cohort
    from .registry import load_model
    model = load_model(args.run, device=args.device)
    truth = _truth_columns(args.manifest)
    cohort = Cohort.from_manifest(args.manifest, model.info["inputs"], model.info["outcome"],
                                  require_outcome=require_outcome, space=_run_spaces(model, args.run),
                                  truth_mean=truth.get("mean"), truth_sd=truth.get("sd"),
                                  conditions=model.info.get("covariates") or None, site=model.info.get("site"))
    subset = cohort.test if cohort.has_split else cohort.all
    return model, subset


def _predict_noted(model, subset, **kwargs):
    """``model.predict`` with what a user should know said in one line each (a site training never saw)."""
    import warnings
    from .model.conditions import NewSiteWarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NewSiteWarning)
        prediction = model.predict(subset, **kwargs)
    for warning in caught:
        if issubclass(warning.category, NewSiteWarning):
            print(f"inva: note: {warning.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return prediction


def _reading_new_sites(args, model, subset):
    """With ``--new-site-intensities``: the model reading new sites' images on the training scale, said in a line."""
    if not args.new_site_intensities:
        return model
    from .adaptation import with_new_site_intensities
    reading, sites = with_new_site_intensities(model, subset)
    if sites:
        counts = subset.sites.astype(str).value_counts()
        print(f"inva: note: input intensities of site(s) {', '.join(f'{s} ({counts[s]} subjects)' for s in sites)} "
              "fitted from this manifest's images", file=sys.stderr)
    return reading


def _run_spaces(model, run_dir: Path) -> dict | None:
    """The image spaces a run was trained in, by column: new subjects must be in the same spaces."""
    from .runs import read_spaces
    return read_spaces(run_dir, model.info) or None


def _truth_columns(manifest: Path) -> dict:
    """Truth columns named by a cohort.json beside the manifest (simulated cohorts), else none."""
    spec = manifest.parent / "cohort.json"
    try:
        truth = json.loads(spec.read_text()).get("truth") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}
    return truth if isinstance(truth, dict) else {}


def _region_labels(args, model):
    """The checked --regions labels on the run's outcome space (before anything is written), or None."""
    if not args.regions:
        return None
    from .data.labels import read_labels
    spaces = _run_spaces(model, args.run) or {}
    labels = read_labels(args.regions, spaces.get(model.info["outcome"]))
    if getattr(model, "spatial_covariance", None) is None:
        raise InputError(f"{args.run}: no spatial covariance in this run (fitted before it existed, or by a model "
                         "family without one); region intervals need `inva fit` of this version")
    return labels


def _predict(args) -> None:
    import numpy as np
    from .criticism.novelty import NOVEL
    model, subset = _load_for_manifest(args, require_outcome=False)
    regions = _region_labels(args, model)
    pred = _predict_noted(_reading_new_sites(args, model, subset), subset, num_samples=args.samples,
                          levels=args.levels, seed=args.seed)
    tables = {"regions.csv": pred.regions(regions[0], names=regions[1])} if regions is not None else None
    novelty = model.novelty(subset) if hasattr(model, "novelty") else None
    pred.to_files(args.out, calibrated=not args.raw, tables=tables,
                  subject_columns=None if novelty is None else {"novelty": np.round(novelty, 3)})
    if novelty is not None and np.mean(novelty > NOVEL) > 0.5:
        print(f"inva: warning: {int(np.sum(novelty > NOVEL))} of {len(novelty)} subjects have inputs unlike the "
              f"fit's (novelty > {NOVEL:g}, predictions.csv): their predictions extrapolate", file=sys.stderr)
    print(f"wrote posterior predictive maps for {len(pred)} subjects to {args.out} (predictions.csv lists them"
          + (", regions.csv the region means)" if tables else ")"))


def _evaluate(args) -> None:
    from .criticism.evaluation import CURVE_LEVELS, evaluate_prediction
    from .data.io import atomic_dir
    from .data.missing import labeled
    model, subset = _load_for_manifest(args, require_outcome=True)
    if subset.outcome is None:
        raise InputError(f"{args.manifest}: evaluate needs the outcome column '{model.info['outcome']}'")
    subset = labeled(subset)  # subjects without the outcome have nothing to be evaluated against
    if len(subset) == 0:
        raise InputError(f"{args.manifest}: no subject to evaluate has the outcome '{model.info['outcome']}'")
    regions = _region_labels(args, model)
    by = None
    if args.by is not None:  # checked before anything is predicted or written
        from .criticism.groups import group_table, read_groups
        images = [*model.info["inputs"], model.info["outcome"], *_truth_columns(args.manifest).values()]
        by = (args.by, read_groups(args.manifest, args.by, subset.subjects, images))
    model = _reading_new_sites(args, model, subset)
    pred = _predict_noted(model, subset, num_samples=args.samples,
                          levels=sorted(set(args.levels) | set(CURVE_LEVELS)), seed=args.seed)
    with atomic_dir(args.out) as tmp:
        metrics = evaluate_prediction(pred, subset, tmp, history=model.history, levels=args.levels, model=model,
                                      seed=args.seed, regions=regions, psis_subjects=args.psis_subjects,
                                      psis_particles=args.psis_particles, by=by)
    print_summary(metrics)
    if by is not None:
        print(f"\nby {args.by} (calibrated intervals; coverage_by_group.png):")
        for line in group_table(metrics["by"]):
            print(f"  {line}")
    print(f"metrics and figures in {args.out}")


def print_summary(metrics: dict, ridge_mse: float | None = None) -> None:
    rows = [("subjects x features", f"{metrics['n_subjects']} x {metrics['n_features']}"),
            ("MSE", f"{metrics['mse']:.4f}")]
    if metrics.get("oracle_mse"):
        rows.append(("oracle MSE", f"{metrics['oracle_mse']:.4f}  (ratio {metrics['mse'] / metrics['oracle_mse']:.3f})"))
    if ridge_mse is not None:
        rows.append(("ridge MSE", f"{ridge_mse:.4f}"))
    rows += [("correlation", f"{metrics['corr']:.3f}"),
             ("SSIM", "n/a" if metrics["ssim"] is None else f"{metrics['ssim']:.3f}"),
             ("CRPS", f"{metrics['crps']:.4f}" + (f"  (oracle {metrics['oracle_crps']:.4f})" if metrics.get("oracle_crps") else ""))]
    for level, cov in metrics["coverage"].items():
        raw = metrics.get("raw", {}).get("coverage", {}).get(level)
        rows.append((f"coverage {level}", f"{cov:.3f} calibrated" + (f", {raw:.3f} raw" if raw is not None else "")))
    for message in metrics.get("diagnostics", {}).get("collapse", {}).get("warnings", []):
        rows.append(("warning", message))
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def _demo(args) -> None:
    from . import Cohort, InVA
    from .criticism.evaluation import CURVE_LEVELS, evaluate_prediction
    from .criticism.metrics import mse
    from .data.io import atomic_dir
    from .data.simulate import write_cohort
    from .peers import RidgeRegression
    start = time.perf_counter()
    with atomic_dir(args.out) as out:
        write_cohort(out / "cohort", "paper", args.n_subjects, args.seed)
        cohort = Cohort.from_dir(out / "cohort", seed=args.seed)
        print(f"simulated {args.n_subjects} subjects ({len(cohort.train)} train, {len(cohort.val)} val, "
              f"{len(cohort.test)} test) in {time.perf_counter() - start:.1f} s")
        model = InVA.from_preset("inva").fit(cohort.train, cohort.val, seed=args.seed, device=args.device,
                                             run_dir=out / "run", progress=sys.stderr.isatty())
        print(f"fitted in {time.perf_counter() - start:.1f} s (best epoch {model.history['best_epoch']})")
        test = cohort.test
        levels = [0.5, 0.8, 0.9, 0.95]
        pred = model.predict(test, levels=sorted(set(levels) | set(CURVE_LEVELS)), seed=args.seed)
        pred.levels = levels  # files carry the contract's levels; the curve used all of them
        pred.to_files(out / "predictions")
        metrics = evaluate_prediction(pred, test, out, history=model.history, levels=levels, model=model,
                                      seed=args.seed, psis_subjects=8)
        ridge = RidgeRegression().fit(cohort.train, cohort.val, seed=args.seed, progress=False)
        ridge_mse = mse(test.outcome, ridge.predict(test, seed=args.seed).mean)
    print(f"\ninva demo: {time.perf_counter() - start:.0f} s in all; outputs in {args.out}")
    print_summary(metrics, ridge_mse=ridge_mse)


def _latents(args) -> None:
    from . import Cohort, InVA
    from .criticism.latents import latent_traversal, write_latents
    from .registry import load_model
    model = load_model(args.run, device=args.device)
    if not isinstance(model, InVA):
        raise InputError(f"{args.run}: a '{model.info.get('family')}' run has no latent variables")
    info = model.info
    cohort = Cohort.from_manifest(args.manifest, info["inputs"], info["outcome"], require_outcome=False,
                                  space=_run_spaces(model, args.run))
    write_latents(model, cohort.all, args.out)
    print(f"wrote latent means and sds of {len(cohort.all)} subjects to {args.out}")
    if args.traversal:
        args.traversal.mkdir(parents=True, exist_ok=True)
        for name in model.module.vae_names:
            latent_traversal(model, name, args.traversal / f"{name}_traversal.png", subset=cohort.all, difference=True)
        print(f"latent traversals in {args.traversal}")


def _manifest(args) -> None:
    from .data.bids_manifest import build_manifest, parse_image_spec, plural, write_manifest
    manifest = build_manifest(args.bids, [parse_image_spec(text) for text in args.image], args.derivatives,
                              sessions=args.session, exclude_subjects=args.exclude_subjects, strict=args.strict)
    write_manifest(manifest, args.out)
    print(f"wrote {plural(len(manifest.table), 'row')} to {args.out}")
    for line in manifest.summary():
        print(f"  {line}")


def _tune(args) -> None:
    import shutil
    import optuna
    from . import Cohort, load_preset
    from .tune.search_space import load_space
    from .tune import tuning
    if args.trials < 1 or (args.epochs is not None and args.epochs < 1):
        raise InputError("--trials and --epochs must be at least 1")
    base = load_preset(args.model)
    if base.model.family != "inva":
        raise InputError(f"--model {args.model}: a '{base.model.family}' preset has none of the settings "
                         "tune searches")
    cohort = Cohort.from_manifest(args.manifest, args.inputs, args.outcome, mask=args.mask, seed=args.seed)
    space = load_space(args.space, base, cohort.spaces[args.outcome].neighbour_pairs() is not None)
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"{args.out}: exists and is not a folder")
    created = not args.out.exists()
    args.out.mkdir(parents=True, exist_ok=True)
    storage = args.storage or tuning.default_storage(args.out)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial is printed below instead
    try:
        pruner = tuning.make_pruner(args.pruner, args.epochs)
        sampler_seed = args.seed if args.sampler_seed is None else args.sampler_seed
        study = tuning.open_study(storage, args.study_name, args.objective, pruner, sampler_seed)
    except InputError:
        if created:
            shutil.rmtree(args.out)
        raise
    print(f"study '{args.study_name}' ({storage}): {tuning.finished_trials(study)} finished trials, "
          f"running until {args.trials}")
    tuning.optimize(study, cohort, base, space, trials=args.trials, epochs=args.epochs, seed=args.seed,
                    device=args.device)
    written = tuning.write_outputs(study, args.out)
    preset = tuning.best_preset(study)
    print(f"best: {preset.description}" if preset else "no trial has completed yet: no best.toml")
    print(f"wrote {', '.join(written)} to {args.out}")


def _adapt(args) -> None:
    from . import Cohort
    from .adaptation import adapt
    from .data.io import atomic_dir
    from .registry import load_model
    if args.out.exists() and any(args.out.iterdir()):
        raise InputError(f"{args.out}: already exists and is not empty")
    if args.steps < 1:
        raise InputError(f"--steps {args.steps}: must be at least 1")
    model = load_model(args.run, device=args.device)
    info = model.info
    cohort = Cohort.from_manifest(args.manifest, info["inputs"], info["outcome"], space=_run_spaces(model, args.run),
                                  conditions=info.get("covariates") or None, site=info.get("site"))
    adapted = adapt(model, cohort.all, seed=args.seed, steps=args.steps, where=str(args.manifest))
    with atomic_dir(args.out) as tmp:
        adapted.save(tmp)
    sites = adapted.info["adapted"][-1]["sites"]
    harmoniser = adapted.standardizer.site_intensity
    scaled = [s for s in sites if harmoniser is not None and s in harmoniser.sites]
    how = f" (input intensities of {', '.join(scaled)} fitted from their images)" if scaled else ""
    print(f"adapted {args.run} to site(s) {', '.join(sites)} from {len(cohort.all)} subjects{how}; run folder: {args.out}")


COMMANDS = {"simulate": _simulate, "fit": _fit, "predict": _predict, "evaluate": _evaluate, "demo": _demo,
            "latents": _latents, "manifest": _manifest, "tune": _tune, "adapt": _adapt}

if __name__ == "__main__":
    sys.exit(main())
