"""Pooling what several modalities say about one subject: a product of Gaussian experts.

MVAE (Wu & Goodman 2018): each input k present for subject i gives an expert N(mu_ik, sigma_ik^2)
over the subject latent z_i (its encoder, q_k(z | x_k)); with the prior expert N(mu_0, sigma_0^2)
the joint posterior over any subset S of the inputs is their product, precision-weighted:

    T_i = 1 / sigma_0^2 + sum_{k in S} 1 / sigma_ik^2,
    mu_i = (mu_0 / sigma_0^2 + sum_{k in S} mu_ik / sigma_ik^2) / T_i,    sd_i = T_i^(-1/2).

An input that is missing has no expert (its precision is multiplied by 0), so every subset of
inputs, the empty one included (the prior), gives a proper posterior, and fewer inputs give a wider
one. Everything is elementwise per latent dimension; no tensor is created off the inputs' device.
"""
from __future__ import annotations

import torch


def product_of_experts(locs: torch.Tensor, scales: torch.Tensor, present: torch.Tensor | None = None,
                       prior_loc: float | torch.Tensor = 0.0,
                       prior_scale: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loc, scale) (B, D) of the product of the experts (B, K, D) present ((B, K) bool) and the prior."""
    precision = scales.pow(-2)
    if present is not None:
        precision = precision * present.unsqueeze(-1).to(precision.dtype)
    # A Python prior stays a Python number (a kernel argument): no tensor copied from the host per call.
    prior_precision = prior_scale ** -2.0
    total = prior_precision + precision.sum(dim=-2)
    loc = (prior_precision * prior_loc + (precision * locs).sum(dim=-2)) / total
    return loc, total.rsqrt()


def stack_experts(encoded: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(loc_k, scale_k) (B, D)] -> (locs, scales) (B, K, D)."""
    return torch.stack([loc for loc, _ in encoded], dim=-2), torch.stack([scale for _, scale in encoded], dim=-2)
