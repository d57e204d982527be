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
"""
from __future__ import annotations

import torch


def roughness(values: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Sum over neighbour pairs (u, v) of ||values_u - values_v||^2; ``values`` is (..., V, k) or (V,)."""
    if values.dim() == 1:
        values = values.unsqueeze(-1)
    return (values[..., pairs[:, 0], :] - values[..., pairs[:, 1], :]).pow(2).sum()


def smoothness_log_prior(maps: list[torch.Tensor], pairs: torch.Tensor, strength: float,
                         prior_scale: float) -> torch.Tensor:
    """-lambda / (2 tau^2) times the summed roughness of ``maps`` (each with voxels on dim -2, or (V,))."""
    total = sum(roughness(m, pairs) for m in maps)
    return total * (-strength / (2.0 * prior_scale ** 2))
