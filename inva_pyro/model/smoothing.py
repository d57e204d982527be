"""The spatial smoothing prior of the predictor's per-voxel parameters (docs/model.md, "Spatial smoothing").

The predictor learns maps over the outcome's voxels: the output layer's weights W (V x D) and bias b,
the sd head, and the local pathway's voxel codes and mixing weights. Learned from a few dozen PET scans,
each voxel's entries are noisy, and every free parameter per voxel costs about 1/N of the noise variance
in test error. PET effects are smooth in space, so each map m gets a Gaussian Markov random field prior
on the outcome's neighbour graph (face-sharing voxels, or fsaverage5 mesh edges):

    log p(m) = -lambda / (2 tau^2) sum_{(u, v) neighbours} ||m_u - m_v||^2 + const

on top of the output layer's Normal(0, tau^2): together, the Gaussian with precision (I + lambda L) / tau^2,
L the graph Laplacian. Its normaliser does not depend on m, so the ELBO changes by a constant only. The
term is not scaled with the minibatch: like the output layer's own prior it is counted once per step,
and the likelihood of N subjects outweighs it as N grows.

The sum over pairs is m^T L m, computed from each voxel's neighbours (a padded (V, max degree) table) by
gathers only; its gradient 2 L m comes with it. Differences over an edge list need a scatter in the
backward pass, which cost about three times as much on the CPU at 65,536 voxels
(``benchmarks/smoothing_cost.py`` times this term).
"""
from __future__ import annotations

import torch


def neighbour_table(pairs, n_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(table, degree) of a graph given as (E, 2) index pairs (each edge once): ``table`` (V, max degree)
    lists each feature's neighbours, padded with V (a zero row appended when gathering); ``degree`` (V,)."""
    pairs = torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 2)
    both = torch.cat([pairs, pairs.flip(1)])
    both = both[torch.argsort(both[:, 0], stable=True)]
    degree = torch.bincount(both[:, 0], minlength=n_features)
    table = torch.full((n_features, int(degree.max()) if len(both) else 0), n_features, dtype=torch.long)
    slot = torch.arange(len(both)) - (torch.cumsum(degree, 0) - degree)[both[:, 0]]
    table[both[:, 0], slot] = both[:, 1]
    return table, degree.to(torch.get_default_dtype())


def laplacian_times(values: torch.Tensor, table: torch.Tensor, degree: torch.Tensor) -> torch.Tensor:
    """L @ values for ``values`` (..., V, k): degree times the value minus the sum of the neighbours'."""
    padded = torch.cat([values, values.new_zeros(*values.shape[:-2], 1, values.shape[-1])], dim=-2)
    neighbours = padded.index_select(-2, table.reshape(-1)).view(*values.shape[:-2], *table.shape, values.shape[-1])
    return degree.to(values.dtype).unsqueeze(-1) * values - neighbours.sum(-2)


class _Roughness(torch.autograd.Function):
    """m^T L m, with the gradient 2 L m kept from the forward pass (no scatter in the backward)."""

    @staticmethod
    def forward(ctx, values, table, degree):
        lm = laplacian_times(values, table, degree)
        ctx.save_for_backward(lm)
        return (values * lm).sum()

    @staticmethod
    def backward(ctx, grad):
        lm, = ctx.saved_tensors
        return 2 * grad * lm, None, None


def roughness(values: torch.Tensor, table: torch.Tensor, degree: torch.Tensor) -> torch.Tensor:
    """Sum over neighbour pairs (u, v) of ||values_u - values_v||^2; ``values`` is (..., V, k) or (V,)."""
    if values.dim() == 1:
        values = values.unsqueeze(-1)
    return _Roughness.apply(values, table, degree)


def smoothness_log_prior(maps: list[torch.Tensor], table: torch.Tensor, degree: torch.Tensor, strength: float,
                         prior_scale: float) -> torch.Tensor:
    """-lambda / (2 tau^2) times the summed roughness of ``maps`` (each with voxels on dim -2, or (V,))."""
    total = sum(roughness(m, table, degree) for m in maps)
    return total * (-strength / (2.0 * prior_scale ** 2))


def unsmoothed_warning(cfg, n_neighbour_pairs: int, space: dict | None) -> str | None:
    """What to say when a preset that asks for the spatial prior (not the default's, which is simply off on a
    space without neighbours, such as a region table) cannot have it; None when all is well."""
    if cfg.spatial_smoothing <= 0 or n_neighbour_pairs or "spatial_smoothing" not in cfg.model_fields_set:
        return None
    kind = (space or {}).get("kind")
    why = (f"the outcome space ({kind}) has no neighbour graph (a volume or an fsaverage5 surface has one)"
           if kind else "the training subjects carry no outcome space (fit the subsets of a Cohort)")
    return f"spatial_smoothing = {cfg.spatial_smoothing:g} has no effect: {why}"
