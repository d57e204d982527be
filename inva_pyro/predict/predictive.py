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
                         keep_features=None, conditions=None) -> PredictiveSummary:
    """Posterior predictive summaries of ``num_samples`` draws for every subject (see the module doc).

    ``keep_draws``/``keep_features`` (default: every feature): keep the first draws per draw
    (``PredictiveSummary.draws``); the other outputs do not change in distribution. ``conditions``: the
    subjects' covariates and sites (model/conditions.py), for a model fitted with them. ``module`` may also be
    an object with a ``routed_predictive`` method taking the same arguments (``routing.PatternRoutes``).
    """
    kwargs = dict(num_samples=num_samples, probs=probs, observed=observed, block_size=block_size,
                  chunk_size=chunk_size, keep_samples=keep_samples, generator=generator, keep_draws=keep_draws,
                  keep_features=keep_features, conditions=conditions)
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

    parts: object = None         # the module's OutcomeParts (the site's offset and gain)

    @classmethod
    def of(cls, module, xs: list[torch.Tensor], conditions=None) -> "_Component":
        parts = module.outcome_parts(xs, conditions=conditions)
        hidden, local_mean, noise_sd = parts.hidden, parts.local_mean, parts.sd
        total_sd = noise_sd
        if module.cfg.bayesian_output:  # local reparameterisation: the output layer's spread per entry
            w_sd, b_sd = module.output_weight_q.scale, module.output_bias_q.scale
            spread = hidden.square() @ w_sd.square().T + b_sd.square()
            if parts.affine is not None:  # the site gain scales the output layer's spread too
                spread = parts.gain().square() * spread
            total_sd = torch.sqrt(spread + noise_sd.square())
        return cls(module, hidden, local_mean, noise_sd, parts.mean(*module.output_layer_mean()), total_sd, parts)

    def kept_means(self, s: int, generator, features: torch.Tensor):
        """(s, B, V) means given s joint draws of (W, b) (shared by the subjects), and those draws at
        ``features`` (None without a Bayesian output layer)."""
        if not self.module.cfg.bayesian_output:
            return self.reference.expand(s, -1, -1), None, None
        weight_q, bias_q = self.module.output_layer_posterior()
        weight, bias = _sample(weight_q, s, generator), _sample(bias_q, s, generator)  # (s, V, D), (s, V)
        mean = self.parts.scaled(torch.einsum("bd,svd->sbv", self.hidden, weight) + bias[:, None, :] + self.local_mean)
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
                       keep_features=None, conditions=None) -> PredictiveSummary:
    """``posterior_predictive`` of the equal-weight mixture of the predictives of ``components``, (module, its
    inputs) for the same subjects; one component: that module's predictive. A draw of subject i comes from a
    component chosen uniformly for that draw and subject; kept draw s comes from component s mod C for every
    subject (with that module's draw of (W, b); ``KeptDraws.noise_sd`` is then (K, n, F), and the kept
    (W, b) are the first component's)."""
    for module, _ in components:
        module.eval()
    first, inputs = components[0]
    n, n_vox = inputs[0].shape[0], first.predictor.scale_head.out_features
    device = inputs[0].device
    # Keep a block's histogram (block x V x bins, int32) and a chunk of draws near 64 MiB each.
    block_size = block_size or max(1, min(n, (16 << 20) // (n_vox * (len(GRID) + 1))))
    hidden_dim = max(module.cfg.predictor_hidden for module, _ in components)
    # Draws cost (chunk x block x V); only the kept draws also sample W, at (chunk x V x D).
    chunk_size = chunk_size or max(2, min(num_samples, (16 << 20) // (n_vox * block_size)))
    sizes = _ChunkSizes(num_samples, chunk_size, max(1, min(chunk_size, (16 << 20) // (n_vox * hidden_dim))))
    keep_draws = min(int(keep_draws), num_samples)
    kept = _KeptBuffer.start(keep_draws, keep_features, n_vox, len(components) > 1, generator, device) \
        if keep_draws else None
    blocks = []
    for start in range(0, n, block_size):
        rows = slice(start, start + block_size)
        block_conditions = None if conditions is None else conditions.rows(rows)
        parts = [_Component.of(module, [x[rows] for x in xs], block_conditions) for module, xs in components]
        y = observed[start:start + block_size] if observed is not None else None
        blocks.append(_block_predictive(parts, y, probs, sizes, keep_samples, kept, start == 0, generator))
    cat = lambda values, dim=0: torch.cat(values, dim).numpy()  # noqa: E731
    samples = [b["samples"] for b in blocks if b["samples"] is not None]
    crps = [b["crps"] for b in blocks if b["crps"] is not None]
    return PredictiveSummary(
        mean=cat([b["mean"] for b in blocks]), sd=cat([b["sd"] for b in blocks]),
        quantiles={p: cat([b["quantiles"][p] for b in blocks]) for p in probs},
        crps=cat(crps) if crps else None, samples=cat(samples, 1) if samples else None,
        draws=kept.result() if kept is not None else None)


@dataclass
class _ChunkSizes:
    """Draws per subject, drawn ``chunk`` at a time (``kept_chunk`` while the kept draws are drawn)."""
    num_samples: int
    chunk: int
    kept_chunk: int


def _block_predictive(parts: list[_Component], observed, probs, sizes: _ChunkSizes, keep_samples: int,
                      kept: "_KeptBuffer | None", first_block: bool, generator) -> dict:
    """Mean, sd, quantiles (a histogram of the draws), CRPS and kept samples of one block of subjects."""
    mixed, device = len(parts) > 1, parts[0].reference.device
    # the histogram's grid: around the (mixture's) mean, in units of the noise sd
    reference = parts[0].reference if not mixed else torch.stack([c.reference for c in parts]).mean(0)
    scale = parts[0].noise_sd if not mixed else torch.stack([c.noise_sd for c in parts]).mean(0)
    moments = StreamingMoments()
    crps = StreamingCRPS(observed) if observed is not None else None
    counts = torch.zeros(*reference.shape, len(GRID) + 1, dtype=torch.int32, device=device)
    block_kept, drawn = [], 0
    kept_gen = kept.begin_block(device) if kept is not None else None  # the same (W, b) draws in every block
    while drawn < sizes.num_samples:
        s = min(sizes.chunk, sizes.num_samples - drawn)
        keeping = kept is not None and drawn < kept.count
        if keeping:
            s = min(s, kept.count - drawn, sizes.kept_chunk)   # a chunk is either wholly kept or not
            draws, mean, noise_sd, drawn_means = _kept_chunk(parts, drawn, s, kept, kept_gen, generator)
        else:
            draws = _chunk(parts, reference, s, generator)
        moments.update(draws)
        if crps is not None:
            crps.update(draws)
        _count(counts, draws, reference, scale, s)
        if len(block_kept) * sizes.chunk < keep_samples:
            block_kept.append(draws[: keep_samples - drawn].cpu())
        if keeping:
            kept.add(mean, noise_sd, draws, observed, drawn_means[0][1:] if first_block else (None, None))
        drawn += s
    if kept is not None:
        kept.end_block()
    quantiles = {p: (reference + scale * q.to(reference.dtype)).cpu()
                 for p, q in histogram_quantiles(counts, probs).items()}
    return {"mean": moments.mean.float().cpu(), "sd": moments.sd().float().cpu(), "quantiles": quantiles,
            "crps": torch.as_tensor(crps.value(average=False)).float().cpu() if crps is not None else None,
            "samples": torch.cat(block_kept, 0)[:keep_samples] if keep_samples else None}


def _chunk(parts: list[_Component], reference: torch.Tensor, s: int, generator) -> torch.Tensor:
    """(s, B, V) draws, each subject's from a component chosen per draw, the output layer's spread in total_sd."""
    noise = torch.randn((s, *reference.shape), generator=generator, device=reference.device, dtype=reference.dtype)
    if len(parts) == 1:
        return reference + parts[0].total_sd * noise
    which = torch.randint(len(parts), (s, reference.shape[0], 1), generator=generator, device=reference.device)
    return _pick([c.reference for c in parts], which) + _pick([c.total_sd for c in parts], which) * noise


def _kept_chunk(parts: list[_Component], drawn: int, s: int, kept: "_KeptBuffer", kept_gen, generator):
    """(draws, means, noise sds, each component's means and (W, b)) of s kept draws: joint draws of (W, b),
    shared by every subject, for ArviZ; draw j from component j mod C."""
    drawn_means = [c.kept_means(s, kept_gen, kept.features) for c in parts]
    which = (torch.arange(drawn, drawn + s, device=kept.features.device) % len(parts))[:, None, None]
    mean = _pick([m for m, _, _ in drawn_means], which)
    noise_sd = _pick([c.noise_sd for c in parts], which)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + noise_sd * noise, mean, noise_sd, drawn_means


def _count(counts: torch.Tensor, draws: torch.Tensor, reference, scale, s: int) -> None:
    """Add the (s, B, V) draws to the (B, V, bins) histogram around ``reference`` in units of ``scale``."""
    # GRID is uniform, so a draw's bin is arithmetic (no binary search): 0 below, len(GRID) above
    bins = ((draws - reference) / scale).sub_(GRID_LOW).div_(GRID_STEP).floor_().add_(1)
    bins = bins.clamp_(0, len(GRID)).to(torch.int64)
    ones = torch.ones(1, dtype=torch.int32, device=counts.device).expand(bins.numel() // s, s)
    counts.view(-1, counts.shape[-1]).scatter_add_(1, bins.permute(1, 2, 0).reshape(-1, s), ones)


class _KeptBuffer:
    """The first ``count`` draws of every subject kept whole at ``features``, block by block (``KeptDraws``)."""

    def __init__(self, count: int, features: torch.Tensor, seed: int, mixed: bool):
        self.count, self.features, self.seed, self.mixed = count, features, seed, mixed
        self.parts = {"mean": [], "noise_sd": [], "outcome": [], "loglik": []}
        self.weight = self.bias = None

    @classmethod
    def start(cls, count: int, keep_features, n_vox: int, mixed: bool, generator, device) -> "_KeptBuffer":
        features = torch.arange(n_vox) if keep_features is None else torch.as_tensor(np.asarray(keep_features),
                                                                                     dtype=torch.long)
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=device))
        return cls(count, features.to(device), seed, mixed)

    def begin_block(self, device) -> torch.Generator:
        self.block = {"mean": [], "noise_sd": [], "outcome": [], "loglik": [], "w": [], "b": []}
        return seeded_generator(device, self.seed)

    def add(self, mean, noise_sd, draws, observed, weight_bias) -> None:
        f = self.features
        self.block["mean"].append(mean[..., f].cpu())
        self.block["noise_sd"].append(noise_sd.expand_as(mean)[..., f].cpu())
        self.block["outcome"].append(draws[..., f].cpu())
        if observed is not None:
            self.block["loglik"].append(torch.distributions.Normal(mean, noise_sd).log_prob(observed)
                                        .double().sum(-1).cpu())
        if weight_bias[0] is not None:
            self.block["w"].append(weight_bias[0].cpu())
            self.block["b"].append(weight_bias[1].cpu())

    def end_block(self) -> None:
        block = self.block
        self.parts["mean"].append(torch.cat(block["mean"], 0))
        self.parts["outcome"].append(torch.cat(block["outcome"], 0))
        # the noise sd is the same for every draw of one module: (B, F) then, (K, B, F) for a mixture
        self.parts["noise_sd"].append(torch.cat(block["noise_sd"], 0) if self.mixed else block["noise_sd"][0][0])
        if block["loglik"]:
            self.parts["loglik"].append(torch.cat(block["loglik"], 0))
        if block["w"]:
            self.weight, self.bias = torch.cat(block["w"], 0), torch.cat(block["b"], 0)

    def result(self) -> KeptDraws:
        cat = lambda values, dim: torch.cat(values, dim).numpy()  # noqa: E731
        return KeptDraws(
            features=self.features.cpu().numpy(), component_mean=cat(self.parts["mean"], 1),
            noise_sd=cat(self.parts["noise_sd"], 1 if self.mixed else 0), outcome=cat(self.parts["outcome"], 1),
            output_weight=None if self.weight is None else self.weight.numpy(),
            output_bias=None if self.bias is None else self.bias.numpy(),
            image_loglik=cat(self.parts["loglik"], 1) if self.parts["loglik"] else None)


def _sample(distribution, s: int, generator: torch.Generator | None) -> torch.Tensor:
    # Reparameterised draws with an explicit generator, so prediction never touches the global RNG.
    base = distribution.base_dist if hasattr(distribution, "base_dist") else distribution
    eps = torch.randn((s, *base.loc.shape), generator=generator, device=base.loc.device, dtype=base.loc.dtype)
    return base.loc + base.scale * eps
