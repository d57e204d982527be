"""A fitted run taken to a new site (``inva adapt``): a new scanner from a few of its subjects.

A run fitted with ``--site`` predicts a site it never saw with the pooled site (the training sites'
average embedding, offset and gain). With a few subjects of the new site that have the outcome, the new
site's embedding e_s, outcome offset a_s and gain b_s are fitted with every network frozen, by the
likelihood of their outcomes given their inputs (and priors around the training sites). The encoders do
not see the site, so the embedding reaches a prediction only through the predictor: fitting it to the
inputs' reconstruction as well (the ELBO) moved it far from every training site's and made predictions
worse than the pooled site's on simulated multi-site cohorts. The new site is then
calibrated on the same subjects, cross-fitted: they are split into two seeded folds, the site is fitted on
each fold and the other fold's standardised residuals calibrate it, so no subject calibrates its own fit.
The run keeps the site fitted on all of them. The result is a normal run folder.

Where the run brings each site's inputs to one scale (``[training] site_intensity``, the default), the new
site's gain and offset field are fitted first, from its subjects' images against the training sites'
reference (data/site_intensity.py). The encoders then read the new scanner's images on the scale they were
trained on, which the embedding alone cannot give them.
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pandas as pd
import torch

from .data.missing import outcome_presence
from .errors import InputError
from .estimator import InVA
from .predict.conformal import quantile_function, shrinkage_weight
from .predict.predictive import posterior_predictive

STEPS = 300            # full-batch steps: a few parameters per site, a few dozen subjects
LEARNING_RATE = 0.05
# Floors of the prior sds of a new site's embedding, outcome offset and log gain (standardised units): the
# embedding kept near the training sites', the offset and gain left to the data (1 and 0.5 are wide there).
PRIOR_FLOORS = (0.1, 1.0, 0.5)


def new_sites(model: InVA, subset, where: str) -> list[str]:
    """The sites of ``subset`` that ``model`` has not seen, checked: every subject has the outcome and a site,
    and none is from a training site."""
    if not isinstance(model, InVA) or model.sites is None:
        raise InputError(f"{where}: the run was fitted without --site; only a run with sites can be adapted to one")
    if model.submodels:
        raise InputError(f"{where}: a run with pattern submodels cannot be adapted yet (fit it with "
                         "[training] pattern_submodels = false)")
    if subset.outcome is None or not outcome_presence(subset).all():
        lacking = len(subset) if subset.outcome is None else int((~outcome_presence(subset)).sum())
        raise InputError(f"{where}: adapt needs the outcome '{model.info['outcome']}' of every subject "
                         f"({lacking} of {len(subset)} lack it)")
    sites = subset.sites
    if sites.isna().any():
        raise InputError(f"{where}: subject '{sites.index[sites.isna()][0]}' has no site")
    known = sorted({str(s) for s in sites} & set(model.sites.levels))
    if known:
        raise InputError(f"{where}: site {known[0]} is a training site; adapt fits sites the run has not seen")
    return list(dict.fromkeys(str(s) for s in sites))


def adapt(model: InVA, subset, *, seed: int = 0, steps: int = STEPS, where: str = "manifest") -> InVA:
    """A copy of ``model`` with the new sites of ``subset`` (every subject with the outcome) fitted and
    calibrated (see the module docstring)."""
    labels = new_sites(model, subset, where)
    adapted = copy.deepcopy(model)
    harmoniser = adapted.standardizer.site_intensity
    if harmoniser is not None:  # the new scanner's intensities, from its subjects' images (no outcome)
        adapted.standardizer.site_intensity = harmoniser.with_new_sites(subset)
    old = len(adapted.sites.levels)
    adapted.sites = adapted.sites.with_sites(labels)
    adapted.module.conditioning.add_sites(len(labels))
    folds = np.random.default_rng([seed, 17]).permutation(len(subset)) % 2
    residuals = np.full(subset.outcome.shape, np.nan)
    for fold in (0, 1):  # cross-fitting: each half calibrates the site fitted on the other half
        fitted = copy.deepcopy(adapted)
        fit_site(fitted, subset.subset(folds != fold), old, seed=seed, steps=steps)
        residuals[folds == fold] = standardised_residuals(fitted, subset.subset(folds == fold), seed)
    fit_site(adapted, subset, old, seed=seed, steps=steps)
    calibrate_sites(adapted, subset, residuals)
    adapted.info["adapted"] = (adapted.info.get("adapted") or []) + [
        {"sites": labels, "n_subjects": len(subset), "steps": steps, "seed": seed}]
    return adapted


def with_new_site_intensities(model, subset) -> tuple[InVA, list[str]]:
    """(``model`` reading the sites of ``subset`` it has no intensities for on the training scale, those sites):
    their input gains and offset fields fitted from their images in ``subset`` (``MIN_SUBJECTS`` or more per
    site; no outcome used). Their PET offset, gain and calibration stay the pooled site's: ``adapt`` fits those.
    The model itself is unchanged (a shallow copy with its own standardisation is returned)."""
    harmoniser = getattr(getattr(model, "standardizer", None), "site_intensity", None)
    if harmoniser is None or subset.sites is None:
        return model, []
    extended = harmoniser.with_new_sites(subset)
    added = [s for s in extended.sites if s not in harmoniser.sites]
    if not added:
        return model, []
    reading = copy.copy(model)
    reading.standardizer = dataclasses.replace(model.standardizer, site_intensity=extended)
    return reading, added


def fit_site(model: InVA, subset, first_new: int, *, seed: int, steps: int) -> None:
    """The new sites' rows (``first_new`` on) of the site tables, every other parameter frozen: the maximum
    a posteriori fit of the outcome's likelihood given the subjects' inputs (latents and output layer at their
    posterior means), under priors centred on the training sites' average (``site_prior``)."""
    module = model.module
    module.eval()  # no dropout: the networks are not being fitted
    tables = module.conditioning.site_parameters()
    frozen = [p for p in module.parameters() if all(p is not t for t in tables)]
    flags = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    prior = site_prior(tables, first_new)
    optimizer = torch.optim.Adam(tables, lr=LEARNING_RATE)
    xs, y = model.tensors(subset)
    conditions = model.conditions(subset)
    torch.manual_seed(seed)
    try:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            parts = module.outcome_parts(xs, conditions=conditions)
            loss = -torch.distributions.Normal(parts.mean(*module.output_layer_mean()), parts.sd).log_prob(y).sum()
            loss = loss + sum(((t[first_new:] - mean) ** 2 / (2 * sd ** 2)).sum() for t, (mean, sd) in zip(tables, prior))
            loss.backward()
            for table in tables:
                table.grad[:first_new] = 0.0  # the training sites' rows stay as they are
            optimizer.step()
    finally:
        for p, flag in zip(frozen, flags):
            p.requires_grad_(flag)


def site_prior(tables, first_new: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(mean, sd) of each site table over the training sites, the sd floored (``PRIOR_FLOORS``): a new site
    starts as the pooled site and moves as far as its subjects' outcomes show, the embedding no further than
    the training sites' spread, so the networks are not asked about embeddings they never saw."""
    out = []
    for table, floor in zip(tables, PRIOR_FLOORS):
        known = table[:first_new].detach()
        sd = known.std(0) if len(known) > 1 else torch.zeros_like(known[0])
        out.append((known.mean(0), sd.clamp_min(floor)))
    return out


def standardised_residuals(model: InVA, subset, seed: int) -> np.ndarray:
    """(n, V) (y - mean) / sd of the raw posterior predictive, standardised units."""
    xs, y = model.tensors(subset)
    summary = posterior_predictive(model.predictive_module, xs, num_samples=model.preset.prediction.num_samples,
                                   probs=[], generator=model._generator(seed + 3), conditions=model.conditions(subset))
    return (y.cpu().numpy() - summary.mean) / summary.sd


def calibrate_sites(model: InVA, subset, residuals: np.ndarray) -> None:
    """Each new site's own voxel calibration, from its subjects' cross-fitted standardised residuals, shrunk
    towards the pooled one as a training site's is (predict/calibration.py): w = n / (n + n0), n0 the prior
    subjects the fit estimated from the spread between its training sites (no training groups: pooled)."""
    calibrator, cfg = model.calibrator, model.preset.prediction
    prior = next((info["prior_subjects"] for info in calibrator.group_info.values() if "prior_subjects" in info), None)
    sites = pd.Series(subset.sites).astype(str).to_numpy()
    for label in dict.fromkeys(sites):
        rows = residuals[sites == label]
        n = len(rows)
        weight = 0.0 if prior is None else shrinkage_weight(n, prior, cfg.group_min_subjects)
        pooled_n = max(calibrator.n_subjects, 1)
        calibrator.group_info[label] = {"weight": weight, "subjects": n, "prior_subjects": prior, "adapted": True,
                                        "effective_subjects": 1.0 / (weight ** 2 / n + (1 - weight) ** 2 / pooled_n)}
        if weight > 0:
            calibrator.group_quantiles[label] = weight * quantile_function(rows) + (1 - weight) * calibrator.z_quantiles
            calibrator.group_tau[label] = float(np.sqrt(weight * np.mean(rows[np.isfinite(rows)] ** 2)
                                                        + (1 - weight) * calibrator.tau ** 2))
