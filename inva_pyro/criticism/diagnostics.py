"""Posterior-collapse diagnostics and Pareto-k checks of the guide (docs/uncertainty.md).

A VAE's latent space can stop carrying information (tutorial seed 001, "information preference"
and "collapse to the mean image"): q(u|x) equals the prior for every subject, and the decoder
reconstructs one average image. Three measures, per VAE (modality) and per latent level:

- **Active units** (Burda, Grosse & Salakhutdinov 2016): a latent dimension u is active when the
  variance across subjects of its posterior mean, A_u = Var_i(E_q[u | x_i]), exceeds 0.01
  (``ACTIVE_UNIT_THRESHOLD``, their value; the priors have unit variance, so an active unit moves
  its posterior mean by more than a tenth of a prior sd between subjects). Posterior means:
  shallow h: the encoder's loc mu_h(x); deep z: the shared encoder's loc at the shallow mean,
  mu_z(mu_h(x)) (the statistic the predictor sees).
- **KL per latent dimension**, nats per subject, as in the ELBO: for z, E_{q(h|x)} KL(q(z_j|h) ||
  N(0, 1)) (closed form given h); for h, E_q[log q(h_j|x) - log p(h_j|z)] with p(h|z) the shared
  decoder (N(0, 1) without the shared level). Monte Carlo over h ~ q(h|x), z ~ q(z|h) with a seeded
  generator; the sum over dimensions and levels is the per-subject KL term of the ELBO.
- **Collapse to the mean image**: reconstructions xhat_i = g_k(mu_h(x_i)); the ratio
  sum_v Var_i(xhat_iv) / sum_v Var_i(x_iv). A decoder that outputs the mean image has ratio 0; the
  threshold ``COLLAPSE_RATIO`` = 0.05 flags reconstructions that vary across subjects by less
  than 5% of the data's variance. ``explained`` = 1 - sum Var_i(x - xhat) / sum Var_i(x) is
  reported beside it.

A modality is **collapsed** when it has no active shallow unit or its reconstructions collapse to
the mean image; its deep level is **inactive** when it has no active deep unit (the predictor then
gets no information through the deep statistics). ``warn_if_collapsed`` turns either into a
Python warning and a line on stderr (called at the end of ``fit``).

``psis_khat`` runs Pyro's ``psis_diagnostic`` (Yao et al. 2018) subject by subject: the target is
p(h_k, z_k for all k | x_i), the proposal the amortised guide q(h_k, z_k | x_i). The Bayesian output
layer is held at its posterior mean and the outcome left out: its likelihood does not depend on
the sampled latents (the predictor sees the encoders' deterministic summaries), so it would only
add a constant to every log-weight.
"""
from __future__ import annotations

import functools
import inspect
import math
import sys
import warnings

import numpy as np
import torch
from pyro.poutine.messenger import Messenger

from ..predict.predictive import seeded_generator

ACTIVE_UNIT_THRESHOLD = 0.01
COLLAPSE_RATIO = 0.05
KHAT_GOOD, KHAT_BAD = 0.5, 0.7
PSIS_CHUNK_VALUES = 1 << 25


class PosteriorCollapseWarning(UserWarning):
    """A modality's latent space carries (almost) no information about its input."""


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


@torch.no_grad()
def latent_summaries(module, xs: list[torch.Tensor], batch_size: int = 256) -> dict:
    """Posterior locs and scales per VAE: {name: {"shallow": (loc, scale), "deep": (loc, scale)}}.

    numpy arrays of shape (n, dim); "deep" only for the integrative (hierarchical) structure.
    """
    was_training = module.training
    module.eval()
    vae_xs = module.vae_inputs(xs)
    out = {}
    for k, name in enumerate(module.vae_names):
        parts = {"shallow": ([], [])}
        if module.hierarchical:
            parts["deep"] = ([], [])
        for sl in _batches(vae_xs[k].shape[0], batch_size):
            h_loc, h_scale = module.shallow_encoders[k](vae_xs[k][sl])
            parts["shallow"][0].append(h_loc)
            parts["shallow"][1].append(h_scale)
            if module.hierarchical:
                z_loc, z_scale = module.shared_encoder(h_loc)
                parts["deep"][0].append(z_loc)
                parts["deep"][1].append(z_scale)
        out[name] = {level: (torch.cat(locs).double().cpu().numpy(), torch.cat(scales).double().cpu().numpy())
                     for level, (locs, scales) in parts.items()}
    module.train(was_training)
    return out


def active_units(locs: np.ndarray, threshold: float = ACTIVE_UNIT_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """(activity A_u = Var_i of the posterior means, boolean active mask) for locs of shape (n, dim)."""
    locs = np.asarray(locs, dtype=np.float64)
    activity = locs.var(axis=0, ddof=1) if locs.shape[0] > 1 else np.zeros(locs.shape[1])
    return activity, activity > threshold


@torch.no_grad()
def kl_per_dimension(module, xs: list[torch.Tensor], num_samples: int = 16, seed: int = 0,
                     batch_size: int = 256) -> dict:
    """Mean KL (nats per subject) per latent dimension: {name: {"shallow": (p,), "deep": (q,)}}."""
    was_training = module.training
    module.eval()
    gen = seeded_generator(xs[0].device, seed)
    vae_xs = module.vae_inputs(xs)
    out = {}
    for k, name in enumerate(module.vae_names):
        n = vae_xs[k].shape[0]
        sums = {"shallow": 0.0, "deep": 0.0}
        for sl in _batches(n, batch_size):
            h_loc, h_scale = module.shallow_encoders[k](vae_xs[k][sl])
            eps = torch.randn((num_samples, *h_loc.shape), generator=gen, device=h_loc.device, dtype=h_loc.dtype)
            h = h_loc + h_scale * eps                                            # (S, B, p)
            log_q_h = torch.distributions.Normal(h_loc, h_scale).log_prob(h)
            if module.hierarchical:
                z_loc, z_scale = module.shared_encoder(h)                        # (S, B, q)
                # closed-form KL(N(m, s) || N(0, 1)) per dimension, averaged over h ~ q(h|x)
                kl_z = 0.5 * (z_loc ** 2 + z_scale ** 2 - 1.0) - torch.log(z_scale)
                sums["deep"] = sums["deep"] + kl_z.mean(0).sum(0).double()
                eps_z = torch.randn(z_loc.shape, generator=gen, device=h_loc.device, dtype=h_loc.dtype)
                z = z_loc + z_scale * eps_z
                log_p_h = torch.distributions.Normal(*module.shared_prior(z)).log_prob(h)
            else:
                log_p_h = torch.distributions.Normal(0.0, 1.0).log_prob(h)
            sums["shallow"] = sums["shallow"] + (log_q_h - log_p_h).mean(0).sum(0).double()
        out[name] = {level: (value / n).cpu().numpy() for level, value in sums.items()
                     if isinstance(value, torch.Tensor)}
    module.train(was_training)
    return out


@torch.no_grad()
def reconstruction_variance(module, xs: list[torch.Tensor], batch_size: int = 256) -> dict:
    """Per VAE: variance across subjects of reconstructions vs of the data (collapse-to-the-mean check)."""
    was_training = module.training
    module.eval()
    vae_xs = module.vae_inputs(xs)
    out = {}
    for k, name in enumerate(module.vae_names):
        recon = []
        for sl in _batches(vae_xs[k].shape[0], batch_size):
            h_loc, _ = module.shallow_encoders[k](vae_xs[k][sl])
            recon.append(module.decode(k, h_loc)[0])
        xhat = torch.cat(recon).double().cpu().numpy()
        x = vae_xs[k].double().cpu().numpy()
        data_var = float(x.var(axis=0, ddof=1).sum()) if x.shape[0] > 1 else 0.0
        recon_var = float(xhat.var(axis=0, ddof=1).sum()) if x.shape[0] > 1 else 0.0
        resid_var = float((x - xhat).var(axis=0, ddof=1).sum()) if x.shape[0] > 1 else 0.0
        ratio = recon_var / data_var if data_var > 0 else float("nan")
        out[name] = {"data_variance": data_var, "reconstruction_variance": recon_var, "ratio": ratio,
                     "explained": 1.0 - resid_var / data_var if data_var > 0 else float("nan"),
                     "collapsed_to_mean": bool(ratio < COLLAPSE_RATIO)}
    module.train(was_training)
    return out


def collapse_report(module, xs: list[torch.Tensor], *, threshold: float = ACTIVE_UNIT_THRESHOLD,
                    kl_samples: int = 16, seed: int = 0) -> dict:
    """Active units, KL per dimension and the collapse-to-the-mean check, as a JSON-able dict.

    ``xs``: the standardised input tensors of some subjects (at least 2), e.g. ``model.tensors(subset)[0]``.
    """
    if xs[0].shape[0] < 2:
        raise ValueError("collapse diagnostics need at least two subjects")
    if hasattr(module, "split_missing"):  # images not acquired (NaN rows) are read as zeros here
        xs = module.split_missing(xs)[0]
    summaries = latent_summaries(module, xs)
    kls = kl_per_dimension(module, xs, num_samples=kl_samples, seed=seed)
    recon = reconstruction_variance(module, xs)
    report = {"n_subjects": int(xs[0].shape[0]), "threshold": threshold, "collapse_ratio": COLLAPSE_RATIO,
              "active_units": {"count": {}, "dims": {}, "activity": {}}, "kl_per_dimension": {},
              "kl_total": {}, "reconstruction": recon, "collapsed_modalities": [], "inactive_deep": []}
    for name, levels in summaries.items():
        counts, dims, acts = {}, {}, {}
        for level, (loc, _) in levels.items():
            activity, active = active_units(loc, threshold)
            counts[level] = int(active.sum())
            dims[level] = int(active.size)
            acts[level] = [float(a) for a in activity]
        report["active_units"]["count"][name] = counts
        report["active_units"]["dims"][name] = dims
        report["active_units"]["activity"][name] = acts
        report["kl_per_dimension"][name] = {lv: [float(v) for v in kl] for lv, kl in kls[name].items()}
        report["kl_total"][name] = float(sum(float(np.sum(kl)) for kl in kls[name].values()))
        if counts["shallow"] == 0 or recon[name]["collapsed_to_mean"]:
            report["collapsed_modalities"].append(name)
        if "deep" in counts and counts["deep"] == 0:
            report["inactive_deep"].append(name)
    return report


def collapse_messages(report: dict) -> list[str]:
    """One sentence per problem found by ``collapse_report`` (empty when there is none)."""
    msgs = []
    for name in report["collapsed_modalities"]:
        au = report["active_units"]["count"][name]["shallow"]
        dims = report["active_units"]["dims"][name]["shallow"]
        ratio = report["reconstruction"][name]["ratio"]
        msgs.append(f"posterior collapse in modality '{name}': {au} of {dims} shallow latent units active "
                    f"(threshold {report['threshold']:g}), reconstructions vary across subjects by "
                    f"{100 * ratio:.1f}% of the data's variance; its latent statistics carry (almost) no "
                    "information about the input (try a lower kl_weight or longer kl_anneal_epochs)")
    for name in report["inactive_deep"]:
        if name in report["collapsed_modalities"]:
            continue
        dims = report["active_units"]["dims"][name]["deep"]
        msgs.append(f"deep latent of modality '{name}' is inactive: 0 of {dims} units active; the predictor "
                    "gets no information through its deep statistics")
    return msgs


def warn_if_collapsed(module, xs: list[torch.Tensor], *, stream=None, **kwargs) -> dict:
    """Run ``collapse_report`` and, for every problem, ``warnings.warn`` and print a line on stderr.

    Meant for the end of ``fit`` on the training subjects; returns the report.
    """
    report = collapse_report(module, xs, **kwargs)
    stream = sys.stderr if stream is None else stream
    for msg in collapse_messages(report):
        warnings.warn(msg, PosteriorCollapseWarning, stacklevel=2)
        print(f"inva: warning: {msg}", file=stream)
    return report


# --------------------------------------------------------------------------- Pareto k (PSIS)


class _UnitScale(Messenger):
    """Undo every ``poutine.scale`` inside (KL weights, annealing): importance weights need the
    model's own densities. Applied outside the program, it sees each site after the inner scales."""

    def _process_message(self, msg):
        msg["scale"] = 1.0


@torch.no_grad()
def psis_khat(module, xs: list[torch.Tensor], *, num_particles: int = 1000, max_subjects: int = 16,
              seed: int = 0) -> dict:
    """Pareto k-hat of the guide, per subject, for the first ``max_subjects`` of a seeded shuffle.

    Returns {"subjects": [index...], "khat": [...], "median", "max", "share_above_0.7",
    "share_above_0.5", "num_particles"}. k < 0.5: good, 0.5..0.7: usable, > 0.7: the guide's
    proposal for that subject's latents is poor (Yao et al. 2018). The output layer is held at its
    posterior mean and, like the outcome (whose likelihood is then constant in the latents), left
    out of both traces (``poutine.block``); KL weights (``poutine.scale``) are undone and training
    penalties (DSSIM, MMD factors) left out, so the importance weights are exactly
    p(x_i, h, z) / q(h, z | x_i).
    """
    import pyro
    from pyro import poutine

    was_training = module.training
    module.eval()
    n = xs[0].shape[0]
    order = np.random.default_rng(seed).permutation(n)[:max_subjects]
    data = {}
    if module.cfg.bayesian_output:
        w, b = module.output_layer_mean()
        data = {"output_weight": w.detach(), "output_bias": b.detach()}
    hidden = ["output_weight", "output_bias", "outcome"]
    model_fn = module.model
    if "outcome" in inspect.signature(module.model).parameters:
        # DSSIM / MMD penalties are training objectives (pyro.factor), not part of p(x, h, z); the outcome and
        # the output layer are hidden anyway, so the program leaves them out
        model_fn = functools.partial(module.model, extra_terms=False, outcome=False)
    model = _UnitScale()(poutine.block(poutine.condition(model_fn, data=data), hide=hidden))
    guide = _UnitScale()(poutine.block(poutine.condition(module.guide, data=data), hide=hidden))
    khats = []
    # Particles drawn in chunks of about 2^25 input values (whole-brain images: ~50 particles at
    # 2 mm), so memory does not grow with num_particles x voxels; small images take one chunk.
    chunk = max(1, min(num_particles, PSIS_CHUNK_VALUES // max(1, sum(x.shape[-1] for x in xs))))
    rng_state = torch.get_rng_state()
    try:
        pyro.set_rng_seed(seed)
        for i in order:
            xi = [x[i:i + 1] for x in xs]
            subjects = torch.zeros(1, dtype=torch.long, device=xs[0].device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                k = _psis_diagnostic(model, guide, xi, None, subjects=subjects, n_subjects=1,
                                     num_particles=num_particles, chunk=chunk)
            khats.append(float(k))
    finally:
        torch.set_rng_state(rng_state)
        module.train(was_training)
    finite = [k for k in khats if math.isfinite(k)]
    return {"subjects": [int(i) for i in order], "khat": khats, "num_particles": num_particles,
            "median": float(np.median(finite)) if finite else float("nan"),
            "max": float(np.max(finite)) if finite else float("nan"),
            "share_above_0.7": float(np.mean([k > KHAT_BAD for k in khats])) if khats else float("nan"),
            "share_above_0.5": float(np.mean([k > KHAT_GOOD for k in khats])) if khats else float("nan")}


def _psis_diagnostic(model, guide, *args, num_particles: int, chunk: int | None = None, **kwargs) -> float:
    """Pyro's ``psis_diagnostic`` with the importance weights drawn on the data's device, ``chunk``
    particles at a time (its ``max_simultaneous_particles``), and the Pareto fit on a CPU copy of
    them (Pyro's ``fit_generalized_pareto`` builds its grid on the CPU and fails against CUDA
    weights). Same steps and cut-off as Pyro 1.9's."""
    from pyro.infer.importance import vectorized_importance_weights
    from pyro.ops.stats import fit_generalized_pareto

    chunk, parts, drawn = chunk or num_particles, [], 0
    while drawn < num_particles:
        s = min(chunk, num_particles - drawn)
        parts.append(vectorized_importance_weights(model, guide, *args, num_samples=s, max_plate_nesting=1,
                                                   **kwargs)[0].detach().cpu())
        drawn += s
    log_weights = torch.cat(parts)
    log_weights = torch.sort(log_weights - log_weights.max())[0]
    cutoff_index = -int(math.ceil(min(0.2 * num_particles, 3.0 * math.sqrt(num_particles)))) - 1
    lw_cutoff = max(math.log(1.0e-15), float(log_weights[cutoff_index]))
    lw_tail = log_weights[log_weights > lw_cutoff]
    if len(lw_tail) < 10:
        return float("inf")
    k, _ = fit_generalized_pareto(lw_tail.exp() - math.exp(lw_cutoff))
    return float(k)


def model_diagnostics(model, subset, *, psis_subjects: int = 16, psis_particles: int = 1000, seed: int = 0) -> dict:
    """Everything above for a fitted InVA model on ``subset`` (its standardised tensors); {} otherwise."""
    module = getattr(model, "module", None)
    if module is None or not hasattr(module, "shallow_encoders") or len(subset) < 2:
        return {}
    xs, _ = model.tensors(subset, with_outcome=False)
    out = {"collapse": collapse_report(module, xs, seed=seed)}
    out["collapse"]["warnings"] = collapse_messages(out["collapse"])
    if psis_subjects > 0:
        out["psis"] = psis_khat(module, xs, num_particles=psis_particles, max_subjects=psis_subjects, seed=seed)
    return out
