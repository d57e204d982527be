"""ArviZ ``InferenceData`` for posterior predictive checks, and across-run (multi-fit) diagnostics.

ArviZ's Pyro converter only accepts MCMC, so the data are assembled with ``az.from_dict``
(docs/design.md). Whole images are too large to keep per draw (draws x subjects x voxels), so the
per-draw groups hold a **seeded uniform subset of features** (voxels inside the mask, vertices or
regions; ``DEFAULT_FEATURES`` = 64) of every evaluated subject, plus one whole-image quantity per
subject and draw (the joint log-likelihood of all its features). Groups and variables:

- ``posterior`` (draws of the variational posterior):
  ``output_weight`` (chain, draw, feature, hidden) and ``output_bias`` (chain, draw, feature): the
  Bayesian output layer of the predictor at the kept features (standardised outcome units, the
  model's own parameterisation); ``deep_latent_{k}`` (chain, draw, subject, deep_dim): draws of
  z ~ q(z|h), h ~ q(h|x_k) for every subject and modality (their means and sds, e.g. from
  ``az.summary``, are the per-subject deep-latent posterior summaries); ``shallow_latent_{k}``
  (chain, draw, subject, shallow_dim) instead for the structures without a deep level, or with
  ``shallow=True``. The latent draws are independent of the output-layer draws: the outcome
  depends on the encoders' deterministic summaries, not on sampled latents.
- ``posterior_predictive``: ``outcome`` (chain, draw, subject, feature): draws of the raw posterior
  predictive (output layer ~ q, then the heteroscedastic Normal noise), in image units;
  ``outcome_calibrated``: draws of the calibrated predictive mean + raw_sd * Z, Z drawn from the
  calibrator's atoms (what the reported intervals describe).
- ``observed_data``: ``outcome`` (subject, feature).
- ``log_likelihood``: ``outcome`` (chain, draw, subject, feature): log N(y | mean_s, noise_sd) of
  each observed value given draw s of the output layer (image units), pointwise, for
  ``az.loo``/``az.plot_loo_pit``; ``outcome_image`` (chain, draw, subject): the same summed over
  every feature of the subject's image (the image is one observation: the likelihood factorises
  over features given the inputs and the output layer).
- ``constant_data``: ``predictive_mean``, ``predictive_sd`` (calibrated), ``predictive_raw_sd``,
  and ``true_mean``/``true_sd`` when known (subject, feature); ``feature_index`` (feature) the
  position of each kept feature in the image's feature vector, and ``grid_index`` (feature, axis)
  its voxel index in the image grid when the space has one.

The evaluated subjects are held out: the posterior was not conditioned on them, so the plain PIT
(``az.plot_bpv(kind="u_value")``) is already an out-of-sample check; ``az.plot_loo_pit`` reweights
the draws as if each observation had been in the training data, which changes little here (one
observation against hundreds of training subjects), and its Pareto k-hats say so.

Across runs: M fits of the same data with different seeds are M "chains"; R-hat and ESS of the
predictions (``across_run_diagnostics``) compare the spread between fits with the posterior
spread each fit reports.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from ..data.io import _umask
from ..predict.predictive import seeded_generator

DEFAULT_DRAWS = 100
DEFAULT_FEATURES = 64


def _az():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ArviZ 0.x announces its 1.0 refactor on import
        import arviz as az
    return az


def feature_subset(n_features: int, n_keep: int = DEFAULT_FEATURES, seed: int = 0) -> np.ndarray:
    """Sorted seeded uniform choice of ``n_keep`` feature indices (all of them if there are fewer)."""
    if n_keep <= 0 or n_keep >= n_features:
        return np.arange(n_features)
    return np.sort(np.random.default_rng(seed).choice(n_features, size=n_keep, replace=False))


def _grid_index(space, features: np.ndarray) -> np.ndarray | None:
    mask, grid = getattr(space, "mask", None), getattr(space, "grid_shape", None)
    if mask is None or grid is None:  # features on no grid (surfaces, regions, arrays)
        return None
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != len(getattr(space, "grid_shape", ())):
        mask = mask.reshape(space.grid_shape)
    where = np.argwhere(mask)
    return where[features] if len(where) > int(features.max(initial=0)) else None


@torch.no_grad()
def latent_draws(module, xs: list[torch.Tensor], num_draws: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Draws (K, n, dim) of h ~ q(h|x) and z ~ q(z|h) per modality, named like the Pyro sites."""
    was_training = module.training
    module.eval()
    gen = seeded_generator(xs[0].device, seed)
    out = {}
    for k, (name, x) in enumerate(zip(module.vae_names, module.vae_inputs(xs))):
        h_loc, h_scale = module.shallow_encoders[k](x)
        h = h_loc + h_scale * torch.randn((num_draws, *h_loc.shape), generator=gen, device=x.device, dtype=x.dtype)
        out[f"shallow_latent_{name}"] = h.cpu().numpy()
        if module.hierarchical:
            z_loc, z_scale = module.shared_encoder(h)
            z = z_loc + z_scale * torch.randn(z_loc.shape, generator=gen, device=x.device, dtype=x.dtype)
            out[f"deep_latent_{name}"] = z.cpu().numpy()
    module.train(was_training)
    return out


def _kept_draws(model, subset, num_draws: int, features: np.ndarray, seed: int):
    from ..predict.predictive import posterior_predictive

    xs, y = model.tensors(subset)
    gen = seeded_generator(model.device, seed)
    summary = posterior_predictive(model.predictive_module, xs, num_samples=max(2, num_draws), probs=[], observed=y,
                                   keep_draws=num_draws, keep_features=features, generator=gen)
    return xs, summary


def build_inference_data(model, subset, prediction=None, *, num_draws: int = DEFAULT_DRAWS,
                         n_features: int = DEFAULT_FEATURES, features=None, seed: int = 0, shallow: bool = False):
    """InferenceData (groups in the module docstring) for a fitted InVA model on ``subset``.

    ``prediction`` (from ``model.predict(subset)``) supplies the predictive mean and sds of the
    calibrated predictive (more draws than ``num_draws``); without it they are estimated from the
    kept draws. ``features``: explicit feature indices instead of the seeded subset.
    """
    az = _az()
    st = model.standardizer
    n_all = int(model.info["n_outcome"])
    feats = feature_subset(n_all, n_features, seed) if features is None else np.asarray(features, dtype=int)
    xs, summary = _kept_draws(model, subset, num_draws, feats, seed)
    d = summary.draws
    loc, scale = st.outcome_mean.astype(np.float64), st.outcome_scale.astype(np.float64)
    to_units = lambda a: a * scale[feats] + loc[feats]  # noqa: E731
    comp_mean = to_units(d.component_mean.astype(np.float64))
    noise_sd = d.noise_sd.astype(np.float64) * scale[feats]
    y_rep = to_units(d.outcome.astype(np.float64))
    subjects = [str(s) for s in subset.subjects]
    if prediction is not None:
        mean, raw_sd, sd = (np.asarray(a, dtype=np.float64)[:, feats] for a in
                            (prediction.mean, getattr(prediction, "cal_base_sd", prediction.raw_sd), prediction.sd))
        calibrator = prediction.calibrator
    else:
        mean = to_units(summary.mean.astype(np.float64)[:, feats])
        raw_sd = summary.sd.astype(np.float64)[:, feats] * scale[feats]
        calibrator = model.calibrator
        sd = calibrator.sd(raw_sd) if calibrator is not None and calibrator.method != "none" else raw_sd

    rng = np.random.default_rng(seed)
    posterior_predictive = {"outcome": y_rep[None].astype(np.float32)}
    if calibrator is not None and calibrator.method != "none":
        z = calibrator.sample_z(rng, y_rep.shape, getattr(prediction, "patterns", None))
        posterior_predictive["outcome_calibrated"] = (mean + raw_sd * z)[None].astype(np.float32)

    posterior = {}
    dims = {"outcome": ["subject", "feature"], "outcome_calibrated": ["subject", "feature"],
            "outcome_image": ["subject"], "output_weight": ["feature", "hidden"], "output_bias": ["feature"],
            "predictive_mean": ["subject", "feature"], "predictive_sd": ["subject", "feature"],
            "predictive_raw_sd": ["subject", "feature"], "true_mean": ["subject", "feature"],
            "true_sd": ["subject", "feature"], "feature_index": ["feature"], "grid_index": ["feature", "axis"]}
    if d.output_weight is not None:
        posterior["output_weight"] = d.output_weight[None].astype(np.float32)
        posterior["output_bias"] = d.output_bias[None].astype(np.float32)
    for name, draws in latent_draws(model.module, xs, num_draws, seed).items():
        if name.startswith("shallow") and model.module.hierarchical and not shallow:
            continue
        posterior[name] = draws[None].astype(np.float32)
        dims[name] = ["subject", "shallow_dim" if name.startswith("shallow") else "deep_dim"]

    observed, log_likelihood = _observed_groups(subset, feats, comp_mean, noise_sd, d.image_loglik, scale)
    constant = {"predictive_mean": mean, "predictive_sd": sd, "predictive_raw_sd": raw_sd,
                "feature_index": feats}
    if subset.truth_mean is not None:
        constant["true_mean"] = np.asarray(subset.truth_mean, dtype=np.float64)[:, feats]
    if subset.truth_sd is not None:
        constant["true_sd"] = np.asarray(subset.truth_sd, dtype=np.float64)[:, feats]
    space = prediction.space if prediction is not None else None
    grid = _grid_index(space, feats) if space is not None else None
    if grid is not None:
        constant["grid_index"] = grid

    cfg = model.module.cfg
    coords = {"subject": subjects, "feature": feats, "hidden": np.arange(cfg.predictor_hidden),
              "shallow_dim": np.arange(cfg.shallow_dim), "deep_dim": np.arange(cfg.deep_dim),
              "axis": np.arange(grid.shape[1]) if grid is not None else np.arange(1)}
    attrs = {"inference_library": "inva-pyro", "model_family": model.info.get("family", "inva"),
             "outcome": model.info.get("outcome", "y"), "num_draws": int(num_draws), "seed": int(seed),
             "n_features_total": n_all, "n_subjects": len(subjects),
             "feature_selection": "all" if len(feats) == n_all else f"seeded uniform subset (seed {seed})",
             "calibration": calibrator.method if calibrator is not None else "none",
             "calibration_tau": float(calibrator.tau) if calibrator is not None else 1.0,
             "units": "outcome image units; posterior output_weight/output_bias in standardised units",
             "held_out": "the posterior was not conditioned on these subjects"}
    used = {k: v for k, v in dims.items()
            if k in {**posterior, **posterior_predictive, **observed, **log_likelihood, **constant}}
    return az.from_dict(posterior=posterior or None, posterior_predictive=posterior_predictive,
                        observed_data=observed or None, log_likelihood=log_likelihood or None,
                        constant_data=constant, coords=coords, dims=used, attrs=attrs)


def _observed_groups(subset, feats, comp_mean, noise_sd, image_loglik, scale) -> tuple[dict, dict]:
    """observed_data and log_likelihood of the subjects with an outcome (empty without one)."""
    if subset.outcome is None:
        return {}, {}
    obs = np.asarray(subset.outcome, dtype=np.float64)[:, feats]
    log_likelihood = {"outcome": stats.norm.logpdf(obs, comp_mean, noise_sd)[None].astype(np.float32)}
    if image_loglik is not None:
        # standardised -> image units: the density picks up -log(scale_v) for every feature
        log_likelihood["outcome_image"] = (image_loglik - np.log(scale).sum())[None]
    return {"outcome": obs}, log_likelihood


def inference_data_from_prediction(prediction, *, num_draws: int = DEFAULT_DRAWS, n_features: int = DEFAULT_FEATURES,
                                   seed: int = 0):
    """A reduced InferenceData from a ``Prediction`` alone (any model family).

    ``posterior_predictive``: ``outcome_calibrated`` drawn from the calibrated predictive
    (mean + raw_sd * Z, Gaussian when there is no calibrator) and ``outcome`` from
    ``prediction.samples`` when it holds draws; ``observed_data`` and ``constant_data`` as in
    ``build_inference_data``. No posterior or log-likelihood: those need the model.
    """
    az = _az()
    n_all = prediction.mean.shape[1]
    feats = feature_subset(n_all, n_features, seed)
    rng = np.random.default_rng(seed)
    mean = np.asarray(prediction.mean, dtype=np.float64)[:, feats]
    raw_sd = np.asarray(getattr(prediction, "cal_base_sd", prediction.raw_sd), dtype=np.float64)[:, feats]
    cal = prediction.calibrator
    has_samples = prediction.samples is not None and len(prediction.samples) >= 2
    if has_samples:  # one draw dimension for both variables
        num_draws = min(num_draws, len(prediction.samples))
    z = (cal.sample_z(rng, (num_draws, *mean.shape), prediction.patterns) if cal is not None and cal.method != "none"
         else rng.standard_normal((num_draws, *mean.shape)))
    pp = {"outcome_calibrated": (mean + raw_sd * z)[None].astype(np.float32)}
    if has_samples:
        pp["outcome"] = np.asarray(prediction.samples[:num_draws], dtype=np.float32)[:, :, feats][None]
    observed = {"outcome": np.asarray(prediction.observed, dtype=np.float64)[:, feats]} if prediction.observed is not None else None
    constant = {"predictive_mean": mean, "predictive_sd": np.asarray(prediction.sd, dtype=np.float64)[:, feats],
                "predictive_raw_sd": raw_sd, "feature_index": feats}
    dims = {k: ["subject", "feature"] for k in ("outcome", "outcome_calibrated", "predictive_mean", "predictive_sd",
                                                 "predictive_raw_sd")}
    dims["feature_index"] = ["feature"]
    coords = {"subject": [str(s) for s in prediction.subjects], "feature": feats}
    attrs = {"inference_library": "inva-pyro", "num_draws": int(num_draws), "seed": int(seed),
             "n_features_total": int(n_all), "calibration": cal.method if cal is not None else "none"}
    return az.from_dict(posterior_predictive=pp, observed_data=observed, constant_data=constant,
                        coords=coords, dims=dims, attrs=attrs)


def save_inference_data(idata, path: str | Path, engine: str = "h5netcdf") -> Path:
    """Write ``idata`` as netCDF (atomically: a temporary file in the same folder, then renamed)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".nc")
    os.close(fd)
    try:
        idata.to_netcdf(tmp, engine=engine)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_inference_data(path: str | Path, engine: str = "h5netcdf"):
    """Read an InferenceData written by ``save_inference_data`` (fully loaded into memory)."""
    az = _az()
    idata = az.from_netcdf(str(path), engine=engine)
    for group in idata.groups():
        idata[group].load()
    return idata


# --------------------------------------------------------------------------- across runs


def across_run_inference_data(models, subset, *, num_draws: int = DEFAULT_DRAWS, n_features: int = DEFAULT_FEATURES,
                              seed: int = 0):
    """M fitted models on the same subjects as M chains: posterior_predictive ``mean`` (the outcome
    mean given each output-layer draw, the epistemic part) and ``outcome`` (replicated outcomes)."""
    az = _az()
    if len(models) < 2:
        raise ValueError("across-run diagnostics need at least two fitted models")
    n_all = int(models[0].info["n_outcome"])
    feats = feature_subset(n_all, n_features, seed)
    means, reps = [], []
    for m, model in enumerate(models):
        _, summary = _kept_draws(model, subset, num_draws, feats, seed + 1000 * m)
        st = model.standardizer
        sc, lc = st.outcome_scale[feats].astype(np.float64), st.outcome_mean[feats].astype(np.float64)
        means.append(summary.draws.component_mean.astype(np.float64) * sc + lc)
        reps.append(summary.draws.outcome.astype(np.float64) * sc + lc)
    coords = {"subject": [str(s) for s in subset.subjects], "feature": feats}
    dims = {"mean": ["subject", "feature"], "outcome": ["subject", "feature"]}
    return az.from_dict(posterior_predictive={"mean": np.stack(means), "outcome": np.stack(reps)},
                        coords=coords, dims=dims, attrs={"chains": "one fit (seed) per chain"})


def across_run_diagnostics(models, subset, *, num_draws: int = DEFAULT_DRAWS, n_features: int = DEFAULT_FEATURES,
                           seed: int = 0) -> dict:
    """R-hat (rank-normalised) and bulk/tail ESS of the predictions, fits as chains.

    For every (subject, kept feature): ``mean`` is the outcome mean given a draw of the output
    layer, ``outcome`` a replicated outcome. R-hat near 1 means the fits agree within the spread
    each reports; R-hat >> 1 on ``mean`` means fits differ by more than their own posteriors allow
    (the variational posterior under-states between-fit, i.e. epistemic, uncertainty).
    ``sd_ratio``: median over entries of between-fit sd of the fit means / mean within-fit sd.
    """
    az = _az()
    idata = across_run_inference_data(models, subset, num_draws=num_draws, n_features=n_features, seed=seed)
    pp = idata.posterior_predictive
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rhat = az.rhat(pp)
        ess_bulk = az.ess(pp, method="bulk")
        ess_tail = az.ess(pp, method="tail")
    out = {"n_chains": len(models), "n_draws": int(num_draws), "n_features": int(pp["mean"].shape[2] * pp["mean"].shape[3]),
           "summary": {}}
    for var in ("mean", "outcome"):
        r = np.asarray(rhat[var]).ravel()
        eb, et = np.asarray(ess_bulk[var]).ravel(), np.asarray(ess_tail[var]).ravel()
        values = np.asarray(pp[var])                                   # (M, K, n, F)
        within = values.std(axis=1, ddof=1).mean(axis=0)
        between = values.mean(axis=1).std(axis=0, ddof=1)
        out["summary"][var] = {
            "rhat_median": float(np.median(r)), "rhat_q90": float(np.quantile(r, 0.9)), "rhat_max": float(r.max()),
            "rhat_gt_1.01": float(np.mean(r > 1.01)), "rhat_gt_1.1": float(np.mean(r > 1.1)),
            "ess_bulk_median": float(np.median(eb)), "ess_bulk_min": float(eb.min()),
            "ess_tail_median": float(np.median(et)), "ess_tail_min": float(et.min()),
            "sd_ratio": float(np.median(between / np.maximum(within, 1e-12)))}
    return out
