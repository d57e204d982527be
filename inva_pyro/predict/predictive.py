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
    noise_sd: np.ndarray                    # (n, F) sd of the outcome given (W, b) (the same for every s; a mixture's: (K, n, F))
    outcome: np.ndarray                     # (K, n, F) replicated outcomes y_rep
    output_weight: np.ndarray | None        # (K, F, D) draws of W at the kept features (Bayesian output layer)
    output_bias: np.ndarray | None          # (K, F)
    image_loglik: np.ndarray | None         # (K, n) sum over every feature of log N(y | mean_s, noise_sd)


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


def posterior_predictive(module, inputs: list[torch.Tensor], *, num_samples: int, probs: list[float],
                         observed: torch.Tensor | None = None, block_size: int | None = None,
                         chunk_size: int | None = None, keep_samples: int = 0,
                         generator: torch.Generator | None = None, keep_draws: int = 0,
                         keep_features=None) -> PredictiveSummary:
    """Posterior predictive summaries of ``num_samples`` draws for every subject (see the module doc).

    ``keep_draws``/``keep_features`` (default: every feature): keep the first draws per draw
    (``PredictiveSummary.draws``); the other outputs do not change in distribution. ``module`` may also be
    an object with a ``routed_predictive`` method taking the same arguments (``routing.PatternRoutes``).
    """
    kwargs = dict(num_samples=num_samples, probs=probs, observed=observed, block_size=block_size,
                  chunk_size=chunk_size, keep_samples=keep_samples, generator=generator, keep_draws=keep_draws,
                  keep_features=keep_features)
    routed = getattr(module, "routed_predictive", None)
    if routed is not None:
        return routed(inputs, **kwargs)
    return mixture_predictive([(module, inputs)], **kwargs)


@dataclass
class _Component:
    """One module's predictive for a block of subjects, all but the output layer's draws: (B, V) tensors."""
    module: object
    hidden: torch.Tensor
    local_mean: torch.Tensor
    noise_sd: torch.Tensor
    reference: torch.Tensor      # the mean, at the output layer's posterior mean
    total_sd: torch.Tensor       # noise and output-layer spread together (local reparameterisation)

    @classmethod
    def of(cls, module, xs: list[torch.Tensor]) -> "_Component":
        hidden, local_mean, noise_sd = module.outcome_parts(xs)
        w_mean, b_mean = module.output_layer_mean()
        total_sd = noise_sd
        if module.cfg.bayesian_output:  # local reparameterisation: the output layer's spread per entry
            w_sd, b_sd = module.output_weight_q.scale, module.output_bias_q.scale
            total_sd = torch.sqrt(hidden.square() @ w_sd.square().T + b_sd.square() + noise_sd.square())
        return cls(module, hidden, local_mean, noise_sd, hidden @ w_mean.T + b_mean + local_mean, total_sd)

    def kept_means(self, s: int, generator, features: torch.Tensor):
        """(s, B, V) means given s joint draws of (W, b) (shared by the subjects), and those draws at
        ``features`` (None without a Bayesian output layer)."""
        if not self.module.cfg.bayesian_output:
            return self.reference.expand(s, -1, -1), None, None
        weight_q, bias_q = self.module.output_layer_posterior()
        weight, bias = _sample(weight_q, s, generator), _sample(bias_q, s, generator)  # (s, V, D), (s, V)
        mean = torch.einsum("bd,svd->sbv", self.hidden, weight) + bias[:, None, :] + self.local_mean
        return mean, weight[:, features], bias[:, features]


def _pick(values: list[torch.Tensor], choice: torch.Tensor) -> torch.Tensor:
    """values[choice] elementwise: ``choice`` broadcasts against the (B, V) values."""
    out = values[0].expand(torch.broadcast_shapes(values[0].shape, choice.shape))
    for c, value in enumerate(values[1:], start=1):
        out = torch.where(choice == c, value, out)
    return out


@torch.no_grad()
def mixture_predictive(components: list[tuple[object, list[torch.Tensor]]], *, num_samples: int,
                       probs: list[float], observed: torch.Tensor | None = None, block_size: int | None = None,
                       chunk_size: int | None = None, keep_samples: int = 0,
                       generator: torch.Generator | None = None, keep_draws: int = 0,
                       keep_features=None) -> PredictiveSummary:
    """``posterior_predictive`` of the equal-weight mixture of the predictives of ``components``, (module, its
    inputs) for the same subjects; one component: that module's predictive. A draw of subject i comes from a
    component chosen uniformly for that draw and subject; kept draw s comes from component s mod C for every
    subject (with that module's draw of (W, b); ``KeptDraws.noise_sd`` is then (K, n, F), and the kept
    (W, b) are the first component's)."""
    for module, _ in components:
        module.eval()
    mixed = len(components) > 1
    first, inputs = components[0]
    n, n_vox = inputs[0].shape[0], first.predictor.scale_head.out_features
    device = inputs[0].device
    # Keep a block's histogram (block x V x bins, int32) and a chunk of draws near 64 MiB each.
    block_size = block_size or max(1, min(n, (16 << 20) // (n_vox * (len(GRID) + 1))))
    hidden_dim = max(module.cfg.predictor_hidden for module, _ in components)
    # Draws cost (chunk x block x V); only the kept draws also sample W, at (chunk x V x D).
    chunk_size = chunk_size or max(2, min(num_samples, (16 << 20) // (n_vox * block_size)))
    kept_chunk = max(1, min(chunk_size, (16 << 20) // (n_vox * hidden_dim)))
    grid = GRID.to(device)
    means, sds, crps_maps, kept = [], [], [], []
    quantiles = {p: [] for p in probs}
    keep_draws = min(int(keep_draws), num_samples)
    kept_seed = None
    if keep_draws:
        features = torch.arange(n_vox) if keep_features is None else torch.as_tensor(np.asarray(keep_features), dtype=torch.long)
        features = features.to(device)
        kept_seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=device))
        kd = {"mean": [], "noise_sd": [], "outcome": [], "loglik": []}
        kept_w = kept_b = None
    for start in range(0, n, block_size):
        parts = [_Component.of(module, [x[start:start + block_size] for x in xs]) for module, xs in components]
        # the histogram's grid: around the (mixture's) mean, in units of the noise sd
        reference = parts[0].reference if not mixed else torch.stack([c.reference for c in parts]).mean(0)
        scale = parts[0].noise_sd if not mixed else torch.stack([c.noise_sd for c in parts]).mean(0)
        moments = StreamingMoments()
        crps = StreamingCRPS(observed[start:start + block_size]) if observed is not None else None
        counts = torch.zeros(*reference.shape, len(grid) + 1, dtype=torch.int32, device=device)
        block_kept, drawn = [], 0
        if keep_draws:
            # the same (W, b) draws for the kept draws of every block
            kept_gen = seeded_generator(device, kept_seed)
            block_draws = {"mean": [], "noise_sd": [], "outcome": [], "loglik": [], "w": [], "b": []}
        while drawn < num_samples:
            s = min(chunk_size, num_samples - drawn)
            if drawn < keep_draws:
                s = min(s, keep_draws - drawn, kept_chunk)   # a chunk is either wholly kept or not
            if drawn < keep_draws:  # joint draws of (W, b), shared by every subject, for ArviZ
                drawn_means = [c.kept_means(s, kept_gen, features) for c in parts]
                which = (torch.arange(drawn, drawn + s, device=device) % len(parts))[:, None, None]
                mean = _pick([m for m, _, _ in drawn_means], which)
                noise_sd = _pick([c.noise_sd for c in parts], which)
                noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
                draws = mean + noise_sd * noise                                 # (s, B, V)
            else:
                noise = torch.randn((s, *reference.shape), generator=generator, device=device, dtype=reference.dtype)
                if mixed:
                    which = torch.randint(len(parts), (s, reference.shape[0], 1), generator=generator, device=device)
                    draws = _pick([c.reference for c in parts], which) + _pick([c.total_sd for c in parts], which) * noise
                else:
                    draws = reference + parts[0].total_sd * noise
            moments.update(draws)
            if crps is not None:
                crps.update(draws)
            # GRID is uniform, so a draw's bin is arithmetic (no binary search): 0 below, len(GRID) above
            bins = ((draws - reference) / scale).sub_(GRID_LOW).div_(GRID_STEP).floor_().add_(1)
            bins = bins.clamp_(0, len(grid)).to(torch.int64)
            counts.view(-1, counts.shape[-1]).scatter_add_(
                1, bins.permute(1, 2, 0).reshape(-1, s), torch.ones(1, dtype=torch.int32, device=device).expand(bins.numel() // s, s))
            if len(block_kept) * chunk_size < keep_samples:
                block_kept.append(draws[: keep_samples - drawn].cpu())
            if drawn < keep_draws:
                block_draws["mean"].append(mean[..., features].cpu())
                block_draws["noise_sd"].append(noise_sd.expand_as(mean)[..., features].cpu())
                block_draws["outcome"].append(draws[..., features].cpu())
                if observed is not None:
                    y_block = observed[start:start + block_size]
                    block_draws["loglik"].append(torch.distributions.Normal(mean, noise_sd).log_prob(y_block)
                                                 .double().sum(-1).cpu())
                if drawn_means[0][1] is not None and start == 0:
                    block_draws["w"].append(drawn_means[0][1].cpu())
                    block_draws["b"].append(drawn_means[0][2].cpu())
            drawn += s
        means.append(moments.mean.float().cpu())
        sds.append(moments.sd().float().cpu())
        for p, q in histogram_quantiles(counts, probs).items():
            quantiles[p].append((reference + scale * q.to(reference.dtype)).cpu())
        if crps is not None:
            crps_maps.append(torch.as_tensor(crps.value(average=False)).float().cpu())
        if keep_samples:
            kept.append(torch.cat(block_kept, 0)[:keep_samples])
        if keep_draws:
            kd["mean"].append(torch.cat(block_draws["mean"], 0))
            kd["outcome"].append(torch.cat(block_draws["outcome"], 0))
            # the noise sd is the same for every draw of one module: (B, F) then, (K, B, F) for a mixture
            kd["noise_sd"].append(torch.cat(block_draws["noise_sd"], 0) if mixed else block_draws["noise_sd"][0][0])
            if block_draws["loglik"]:
                kd["loglik"].append(torch.cat(block_draws["loglik"], 0))
            if block_draws["w"]:
                kept_w, kept_b = torch.cat(block_draws["w"], 0), torch.cat(block_draws["b"], 0)
    cat = lambda parts, dim=0: torch.cat(parts, dim).numpy()
    kept_draws = None
    if keep_draws:
        kept_draws = KeptDraws(
            features=features.cpu().numpy(), component_mean=cat(kd["mean"], 1),
            noise_sd=cat(kd["noise_sd"], 1 if mixed else 0),
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
