"""How unlike the cohort a model was fitted on a subject's input images are: a novelty score.

The score is the model's own evidence lower bound of the subject's inputs, E_q[log p(x, latents | c, s) -
log q(latents | x)] with the outcome and the output layer left out, compared with the same bound on the
validation subjects of the fit (held out, so they stand for new subjects like the training ones):

    novelty_i = |ELBO_i - median_val ELBO| / (1.4826 MAD_val ELBO)

a robust z score, in units of the validation subjects' spread: near 0 for a subject like them, large
when the inputs are unlike anything the model learnt (a new scanner, a different preprocessing, another
tracer's template). Both sides count: a scanner that compresses intensity ranges or smooths the images
makes them easier to explain, so their ELBO lies above the validation subjects', and in high dimensions
an unusually high likelihood is as atypical as a low one (the typicality test of Nalisnick et al. 2019,
"Detecting out-of-distribution inputs to deep generative models using typicality"). A subject with
novelty above ``NOVEL`` counts as novel. The bound of a subject whose site training never saw uses the
pooled site, as its prediction does.
"""
from __future__ import annotations

import numpy as np
import torch

NOVEL = 3.0                 # robust z above which a subject's inputs count as unlike the fit's
HIDDEN = ("output_weight", "output_bias", "outcome")
PARTICLES = 16


@torch.no_grad()
def input_elbo(module, xs: list[torch.Tensor], conditions=None, *, particles: int = PARTICLES, seed: int = 0,
               batch_size: int = 64) -> np.ndarray:
    """(n,) the ELBO of each subject's inputs (nats; images not acquired count for nothing), averaged over
    ``particles`` draws of its latents from the guide."""
    from pyro import poutine

    was_training = module.training
    module.eval()
    n, out = xs[0].shape[0], []
    devices = [xs[0].device] if xs[0].device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        for start in range(0, n, batch_size):
            rows = slice(start, min(start + batch_size, n))
            batch = [x[rows] for x in xs]
            b = batch[0].shape[0]
            kwargs = dict(subjects=torch.arange(b, device=batch[0].device), n_subjects=b,
                          conditions=None if conditions is None else conditions.rows(rows))
            total = torch.zeros(b, dtype=torch.float64, device=batch[0].device)
            for _ in range(particles):
                guide = poutine.trace(poutine.block(module.guide, hide=list(HIDDEN))).get_trace(batch, None, **kwargs)
                model = poutine.trace(poutine.block(poutine.replay(module.model, trace=guide), hide=list(HIDDEN)))
                model = model.get_trace(batch, None, extra_terms=False, outcome=False, **kwargs)
                total += _per_subject(model, b) - _per_subject(guide, b)
            out.append((total / particles).cpu().numpy())
    module.train(was_training)
    return np.concatenate(out)


def _per_subject(trace, batch: int) -> torch.Tensor:
    """(B,) the log-densities of a trace's latent and input sites per subject, without their KL weights
    (masks for images not acquired kept: they live on the distributions); covariates left out."""
    trace.compute_log_prob()
    total = torch.zeros(batch, dtype=torch.float64)
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or name.startswith("covariate_") or name == "subjects":
            continue
        log_p = site["unscaled_log_prob"]
        if log_p.dim() == 1 and log_p.shape[0] == batch:
            total = total.to(log_p.device) + log_p.double()
    return total


def reference(elbos: np.ndarray) -> dict:
    """What the novelty of new subjects is measured against: the median and robust sd of ``elbos``."""
    elbos = np.asarray(elbos, dtype=np.float64)
    median = float(np.median(elbos))
    scale = 1.4826 * float(np.median(np.abs(elbos - median)))
    return {"median": median, "scale": max(scale, 1e-6 * max(1.0, abs(median))), "n": int(len(elbos))}


def novelty(elbos: np.ndarray, ref: dict) -> np.ndarray:
    """(n,) how far each ELBO lies from the reference subjects', either side, in robust sds (module docstring)."""
    return np.abs(np.asarray(elbos, dtype=np.float64) - ref["median"]) / ref["scale"]
