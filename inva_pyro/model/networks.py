"""Neural networks used by the InVA Pyro program (no Pyro code here)."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def mlp(sizes: list[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear layers with SiLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def positive(raw: torch.Tensor, floor: float = 1e-4) -> torch.Tensor:
    # softplus keeps scales positive with a gradient everywhere; the floor avoids degenerate Normals.
    return F.softplus(raw) + floor


class GaussianNet(nn.Module):
    """x -> (loc, scale) of a diagonal Gaussian: encoders q(h|x), q(z|h) and the shared decoder p(h|z)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.body = mlp([in_dim, hidden, hidden])
        self.body.append(nn.SiLU())
        self.loc = nn.Linear(hidden, out_dim)
        self.scale = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.body(x)
        return self.loc(hidden), positive(self.scale(hidden))


class ModalityDecoder(nn.Module):
    """h -> mean of x_k, with a learned per-feature noise scale sigma_k."""

    def __init__(self, latent_dim: int, hidden: int, n_features: int):
        super().__init__()
        self.net = mlp([latent_dim, hidden, hidden, n_features])
        self.raw_sigma = nn.Parameter(torch.zeros(n_features))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(h), positive(self.raw_sigma, 1e-3)


class MeanFieldNormal(nn.Module):
    """Variational parameters of a fully factorised Normal over a weight tensor."""

    def __init__(self, shape: tuple[int, ...], init_scale: float = 0.01):
        super().__init__()
        self.loc = nn.Parameter(torch.randn(shape) * init_scale)
        # softplus^-1(init_scale): start with small posterior spread so early training is stable.
        self.raw_scale = nn.Parameter(torch.full(shape, math.log(math.expm1(init_scale))))

    @property
    def scale(self) -> torch.Tensor:
        return positive(self.raw_scale, 1e-6)


class Predictor(nn.Module):
    """Maps latent statistics (and, for the local form, voxel inputs) to the outcome's mean and sd.

    mean_iv = b_v + <W_v, H_i> + sum_c A_vc g_c(u_iv, e_v, C H_i)
    sd_iv   = softplus(s_v + <S_v, H_i> + sum_c B_vc g'_c(u_iv, e_v, C H_i)) + min_scale
    H_i = trunk(features_i); (W, b) is the output layer, Bayesian when the preset says so, so it is
    passed in by the Pyro program; g is a small network shared by all voxels (the local pathway) and
    A, B are its voxel-specific modulation.
    """

    def __init__(self, feature_dim: int, n_outcome: int, cfg, n_local_inputs: int):
        super().__init__()
        d = cfg.predictor_hidden
        self.trunk = mlp([feature_dim, 2 * d, d], dropout=cfg.dropout)
        self.trunk.append(nn.SiLU())
        self.scale_head = nn.Linear(d, n_outcome)
        nn.init.zeros_(self.scale_head.weight)
        self.min_scale = cfg.min_scale
        self.n_local_inputs = n_local_inputs
        if n_local_inputs:
            c = cfg.local_channels
            self.context = nn.Linear(d, cfg.context_dim) if cfg.context_dim else None
            self.voxel_code = nn.Parameter(0.1 * torch.randn(n_outcome, cfg.voxel_embedding))
            in_dim = n_local_inputs + cfg.voxel_embedding + cfg.context_dim
            self.voxel_net = mlp([in_dim, cfg.local_hidden, cfg.local_hidden, 2 * c])
            self.mean_mix = nn.Parameter(torch.full((n_outcome, c), 1.0 / c))
            self.scale_mix = nn.Parameter(torch.zeros(n_outcome, c))

    def hidden(self, features: torch.Tensor) -> torch.Tensor:
        return self.trunk(features)

    def voxel_maps(self) -> list[torch.Tensor]:
        """The per-voxel parameters (voxels on dim 0) other than the output layer: what the spatial
        smoothing prior (smoothing.py) acts on, with W and b."""
        maps = [self.scale_head.weight, self.scale_head.bias]
        if self.n_local_inputs:
            maps += [self.voxel_code, self.mean_mix, self.scale_mix]
        return maps

    def deterministic_parts(self, hidden: torch.Tensor, local_x: torch.Tensor | None):
        """Everything but the output layer: (local mean term, sd). Shapes (B, V)."""
        raw_scale = self.scale_head(hidden)
        if not self.n_local_inputs:
            return torch.zeros_like(raw_scale), positive(raw_scale, self.min_scale)
        batch, n_vox, _ = local_x.shape
        parts = [local_x, self.voxel_code.expand(batch, -1, -1)]
        if self.context is not None:
            parts.append(self.context(hidden).unsqueeze(1).expand(-1, n_vox, -1))
        g_mean, g_scale = self.voxel_net(torch.cat(parts, dim=-1)).chunk(2, dim=-1)
        local_mean = (g_mean * self.mean_mix).sum(-1)
        raw_scale = raw_scale + (g_scale * self.scale_mix).sum(-1)
        return local_mean, positive(raw_scale, self.min_scale)
