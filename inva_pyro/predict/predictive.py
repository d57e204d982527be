"""Streamed posterior predictive sampling.

For a block of subjects, everything in the predictive distribution except the Bayesian output
layer is deterministic given the inputs (the predictor sees the encoders' summaries), so it is
computed once; then S draws of the output layer (W, b) ~ q and of the outcome noise are made in
chunks. Each chunk updates running summaries and is dropped, so memory is bounded by
(chunk x block x voxels), never S x subjects x voxels:

- mean and sd: Chan/Welford moments in float64;
- central-interval quantiles: a per-voxel histogram of the draws on a fixed grid of standardised
  values (0.05 sd bins over +-8 sd around a reference prediction), inverted by linear interpolation;
- CRPS against observed values (when given): running E|X - y| and E|X - X'| over disjoint pairs.

Draws use the local reparameterisation (Kingma, Salimans & Welling 2015): under the mean-field
q(W, b), the pre-activation H_i . W_v + b_v of voxel v is Normal(H_i . loc_v + loc_b_v,
sum_d H_id^2 sd_vd^2 + sd_b_v^2), independently across voxels, so a draw of subject i's outcome
image is exactly reference_i + sqrt(epistemic^2 + noise^2) * eps. This has the same joint
distribution over the voxels of a subject as drawing W and b, at O(V) instead of O(V x D) cost per
draw; only the dependence between subjects through a shared (W, b) is dropped, and no per-subject
summary depends on it. The kept draws below are made the joint way.

With ``keep_draws=K`` the first K draws are also kept per draw, for ArviZ (``inference.py``):
the output-layer draws (W, b) at ``keep_features``, the per-draw component means
mean_s = H W_s + b_s + local (the predictive is a mixture over s of Normal(mean_s, noise_sd)),
the noise sd, the replicated outcomes at ``keep_features`` and, when observed values are given,
the whole-image log-likelihood sum_v log Normal(y_v | mean_sv, noise_sd_v) of every subject and
draw. The first K draws of (W, b) come from a generator seeded once from ``generator``, so draw
s uses the same (W, b) for every block of subjects (the kept draws are joint across subjects).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .summaries import StreamingCRPS, StreamingMoments

# Standardised histogram grid: fine enough that interpolation error (<= 1/2 bin) is well under
# the Monte-Carlo error of a 0.025/0.975 sample quantile at a few hundred draws.
GRID = torch.linspace(-8.0, 8.0, 321)
GRID_LOW, GRID_STEP = -8.0, 16.0 / 320


def seeded_generator(device, seed: int) -> torch.Generator:
    """A generator for draws made on ``device``, seeded. Meta tensors (tests/test_device.py), which
    have no generator of their own, draw with a CPU one."""
    device = torch.device(device)
    return torch.Generator(device="cpu" if device.type == "meta" else device).manual_seed(int(seed))


@dataclass
class PredictiveSummary:
    """Posterior predictive summaries in the module's (standardised) units, arrays (n, V)."""
    mean: np.ndarray
    sd: np.ndarray
    quantiles: dict[float, np.ndarray]      # probability -> sample quantile map
    crps: np.ndarray | None = None          # per-entry sample CRPS, when observed values were given
    samples: np.ndarray | None = None       # (keep_samples, n, V) first draws, when asked for
    draws: "KeptDraws | None" = None        # per-draw pieces of the first keep_draws draws


@dataclass
class KeptDraws:
    """The first K posterior predictive draws, per draw (standardised units; F = kept features)."""
    features: np.ndarray                    # (F,) indices of the kept features
    component_mean: np.ndarray              # (K, n, F) mean of the outcome given draw s of (W, b)
    noise_sd: np.ndarray                    # (n, F) sd of the outcome given (W, b) (the same for every s)
    outcome: np.ndarray                     # (K, n, F) replicated outcomes y_rep
    output_weight: np.ndarray | None        # (K, F, D) draws of W at the kept features (Bayesian output layer)
    output_bias: np.ndarray | None          # (K, F)
    image_loglik: np.ndarray | None         # (K, n) sum over every feature of log N(y | mean_s, noise_sd)


@dataclass
class PatternRoutes:
    """A joint module with pattern submodels (``pattern_submodels.py``): ``submodels[k]`` was fitted without
    input k, and predicts the subjects that lack input k and no other; every other subject goes to ``main``.
    ``posterior_predictive`` takes it in place of a module."""
    main: object
    submodels: dict[int, object]
    joint = True

    @property
    def cfg(self):
        return self.main.cfg

    def eval(self) -> "PatternRoutes":
        for module in (self.main, *self.submodels.values()):
            module.eval()
        return self

    def route(self, inputs: list[torch.Tensor]) -> np.ndarray:
        """(n,) the input k whose submodel predicts subject i, or -1 for the main module."""
        present = torch.stack([~torch.isnan(x).all(-1) for x in inputs], -1).cpu().numpy()
        route = np.full(len(present), -1)
        lacks_one = present.sum(1) == present.shape[1] - 1
        for k in self.submodels:
            route[lacks_one & ~present[:, k]] = k
        return route


def _routed(routes: PatternRoutes, inputs, observed, keep_samples, keep_draws, **kwargs) -> PredictiveSummary:
    """Each group of subjects predicted by its own module; the summaries put back in subject order. Kept
    draws of the output layer (W, b) are the main module's when it predicts any subject."""
    route = routes.route(inputs)
    groups = [k for k in (-1, *sorted(routes.submodels)) if (route == k).any()]
    parts = []
    for k in groups:
        rows = torch.as_tensor(np.flatnonzero(route == k), device=inputs[0].device)
        module = routes.main if k < 0 else routes.submodels[k]
        xs = [x[rows] for j, x in enumerate(inputs) if j != k]
        parts.append((rows.cpu().numpy(), posterior_predictive(
            module, xs, observed=None if observed is None else observed[rows], keep_samples=keep_samples,
            keep_draws=keep_draws, **kwargs)))
    if len(parts) == 1:
        return parts[0][1]
    n = len(route)

    def merged(get, axis: int = 0):
        first = get(parts[0][1])
        if first is None:
            return None
        shape = list(first.shape)
        shape[axis] = n
        out = np.empty(shape, dtype=first.dtype)
        for rows, summary in parts:
            np.moveaxis(out, axis, 0)[rows] = np.moveaxis(get(summary), axis, 0)
        return out

    draws = None
    if keep_draws:
        first = parts[0][1].draws  # the main module's, when it has subjects: groups start with -1
        draws = KeptDraws(
            features=first.features, component_mean=merged(lambda s: s.draws.component_mean, 1),
            noise_sd=merged(lambda s: s.draws.noise_sd), outcome=merged(lambda s: s.draws.outcome, 1),
            output_weight=first.output_weight, output_bias=first.output_bias,
            image_loglik=merged(lambda s: s.draws.image_loglik, 1))
    return PredictiveSummary(
        mean=merged(lambda s: s.mean), sd=merged(lambda s: s.sd),
        quantiles={p: merged(lambda s, p=p: s.quantiles[p]) for p in parts[0][1].quantiles},
        crps=merged(lambda s: s.crps), samples=merged(lambda s: s.samples, 1), draws=draws)


def histogram_quantiles(counts: torch.Tensor, probs: list[float]) -> dict[float, torch.Tensor]:
    """Quantiles (standardised units) from per-voxel counts over the bins of GRID (+2 open bins)."""
    # Cumulative counts at each bin's right edge, in float32 (exact for counts below 2^24).
    flat = torch.cumsum(counts.reshape(-1, counts.shape[-1]), -1, dtype=torch.float32)
    total = flat[:, -1:]
    edges = GRID.to(counts.device)
    out = {}
    for p in probs:
        target = (p * total).contiguous()
        j = torch.searchsorted(flat, target).squeeze(-1).clamp(1, len(edges) - 1)
        # bin j spans [edges[j-1], edges[j]); interpolate the cumulative count linearly inside it
        left, right = flat.gather(1, (j - 1)[:, None]).squeeze(-1), flat.gather(1, j[:, None]).squeeze(-1)
        frac = ((target.squeeze(-1) - left) / (right - left).clamp_min(1e-6)).clamp(0.0, 1.0)
        value = edges[j - 1] + frac * (edges[j] - edges[j - 1])
        out[p] = value.double().reshape(counts.shape[:-1])
    return out


@torch.no_grad()
def posterior_predictive(module, inputs: list[torch.Tensor], *, num_samples: int, probs: list[float],
                         observed: torch.Tensor | None = None, block_size: int | None = None,
                         chunk_size: int | None = None, keep_samples: int = 0,
                         generator: torch.Generator | None = None, keep_draws: int = 0,
                         keep_features=None) -> PredictiveSummary:
    """Posterior predictive summaries of ``num_samples`` draws for every subject (see the module doc).

    ``keep_draws``/``keep_features`` (default: every feature): keep the first draws per draw
    (``PredictiveSummary.draws``); the other outputs do not change in distribution.
    ``module`` may be a ``PatternRoutes``: each subject is then predicted by the module of its pattern.
    """
    if isinstance(module, PatternRoutes):
        return _routed(module.eval(), inputs, observed, keep_samples, keep_draws, num_samples=num_samples,
                       probs=probs, block_size=block_size, chunk_size=chunk_size, generator=generator,
                       keep_features=keep_features)
    module.eval()
    n, n_vox = inputs[0].shape[0], module.predictor.scale_head.out_features
    device = inputs[0].device
    # Keep a block's histogram (block x V x bins, int32) and a chunk of draws near 64 MiB each.
    block_size = block_size or max(1, min(n, (16 << 20) // (n_vox * (len(GRID) + 1))))
    hidden_dim = module.cfg.predictor_hidden
    # Draws cost (chunk x block x V); only the kept draws also sample W, at (chunk x V x D).
    chunk_size = chunk_size or max(2, min(num_samples, (16 << 20) // (n_vox * block_size)))
    kept_chunk = max(1, min(chunk_size, (16 << 20) // (n_vox * hidden_dim)))
    grid = GRID.to(device)
    means, sds, crps_maps, kept = [], [], [], []
    quantiles = {p: [] for p in probs}
    w_mean, b_mean = module.output_layer_mean()
    keep_draws = min(int(keep_draws), num_samples)
    kept_seed = None
    if keep_draws:
        features = torch.arange(n_vox) if keep_features is None else torch.as_tensor(np.asarray(keep_features), dtype=torch.long)
        features = features.to(device)
        kept_seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=device))
        kd = {"mean": [], "noise_sd": [], "outcome": [], "loglik": []}
        kept_w = kept_b = None
    for start in range(0, n, block_size):
        xs = [x[start:start + block_size] for x in inputs]
        hidden, local_mean, noise_sd = module.outcome_parts(xs)
        reference = hidden @ w_mean.T + b_mean + local_mean
        total_sd = noise_sd
        if module.cfg.bayesian_output:  # local reparameterisation: the output layer's spread per entry
            w_sd, b_sd = module.output_weight_q.scale, module.output_bias_q.scale
            total_sd = torch.sqrt(hidden.square() @ w_sd.square().T + b_sd.square() + noise_sd.square())
        moments = StreamingMoments()
        crps = StreamingCRPS(observed[start:start + block_size]) if observed is not None else None
        counts = torch.zeros(*reference.shape, len(grid) + 1, dtype=torch.int32, device=device)
        block_kept, drawn = [], 0
        if keep_draws:
            # the same (W, b) draws for the kept draws of every block
            kept_gen = seeded_generator(device, kept_seed)
            block_draws = {"mean": [], "outcome": [], "loglik": [], "w": [], "b": []}
        while drawn < num_samples:
            s = min(chunk_size, num_samples - drawn)
            if drawn < keep_draws:
                s = min(s, keep_draws - drawn, kept_chunk)   # a chunk is either wholly kept or not
            if drawn < keep_draws:  # joint draws of (W, b), shared by every subject, for ArviZ
                if module.cfg.bayesian_output:
                    weight_q, bias_q = module.output_layer_posterior()
                    weight = _sample(weight_q, s, kept_gen)                    # (s, V, D)
                    bias = _sample(bias_q, s, kept_gen)                        # (s, V)
                    mean = torch.einsum("bd,svd->sbv", hidden, weight) + bias[:, None, :] + local_mean
                else:
                    mean = reference.expand(s, -1, -1)
                noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
                draws = mean + noise_sd * noise                                 # (s, B, V)
            else:
                noise = torch.randn((s, *reference.shape), generator=generator, device=device, dtype=reference.dtype)
                draws = reference + total_sd * noise
            moments.update(draws)
            if crps is not None:
                crps.update(draws)
            # GRID is uniform, so a draw's bin is arithmetic (no binary search): 0 below, len(GRID) above
            bins = ((draws - reference) / noise_sd).sub_(GRID_LOW).div_(GRID_STEP).floor_().add_(1)
            bins = bins.clamp_(0, len(grid)).to(torch.int64)
            counts.view(-1, counts.shape[-1]).scatter_add_(
                1, bins.permute(1, 2, 0).reshape(-1, s), torch.ones(1, dtype=torch.int32, device=device).expand(bins.numel() // s, s))
            if len(block_kept) * chunk_size < keep_samples:
                block_kept.append(draws[: keep_samples - drawn].cpu())
            if drawn < keep_draws:
                block_draws["mean"].append(mean[..., features].cpu())
                block_draws["outcome"].append(draws[..., features].cpu())
                if observed is not None:
                    y_block = observed[start:start + block_size]
                    block_draws["loglik"].append(torch.distributions.Normal(mean, noise_sd).log_prob(y_block)
                                                 .double().sum(-1).cpu())
                if module.cfg.bayesian_output and start == 0:
                    block_draws["w"].append(weight[:, features].cpu())
                    block_draws["b"].append(bias[:, features].cpu())
            drawn += s
        means.append(moments.mean.float().cpu())
        sds.append(moments.sd().float().cpu())
        for p, q in histogram_quantiles(counts, probs).items():
            quantiles[p].append((reference + noise_sd * q.to(reference.dtype)).cpu())
        if crps is not None:
            crps_maps.append(torch.as_tensor(crps.value(average=False)).float().cpu())
        if keep_samples:
            kept.append(torch.cat(block_kept, 0)[:keep_samples])
        if keep_draws:
            kd["mean"].append(torch.cat(block_draws["mean"], 0))
            kd["outcome"].append(torch.cat(block_draws["outcome"], 0))
            kd["noise_sd"].append(noise_sd[:, features].cpu())
            if block_draws["loglik"]:
                kd["loglik"].append(torch.cat(block_draws["loglik"], 0))
            if block_draws["w"]:
                kept_w, kept_b = torch.cat(block_draws["w"], 0), torch.cat(block_draws["b"], 0)
    cat = lambda parts, dim=0: torch.cat(parts, dim).numpy()
    kept_draws = None
    if keep_draws:
        kept_draws = KeptDraws(
            features=features.cpu().numpy(), component_mean=cat(kd["mean"], 1), noise_sd=cat(kd["noise_sd"]),
            outcome=cat(kd["outcome"], 1), output_weight=None if kept_w is None else kept_w.numpy(),
            output_bias=None if kept_b is None else kept_b.numpy(),
            image_loglik=cat(kd["loglik"], 1) if kd["loglik"] else None)
    return PredictiveSummary(
        mean=cat(means), sd=cat(sds), quantiles={p: cat(v) for p, v in quantiles.items()},
        crps=cat(crps_maps) if crps_maps else None, samples=cat(kept, 1) if kept else None,
        draws=kept_draws)


def _sample(distribution, s: int, generator: torch.Generator | None) -> torch.Tensor:
    # Reparameterised draws with an explicit generator, so prediction never touches the global RNG.
    base = distribution.base_dist if hasattr(distribution, "base_dist") else distribution
    eps = torch.randn((s, *base.loc.shape), generator=generator, device=base.loc.device, dtype=base.loc.dtype)
    return base.loc + base.scale * eps
