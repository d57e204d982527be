"""Convolutional encoder and decoder for inputs on a 2-D grid or a 3-D volume (no Pyro code here).

Drop-in replacements for ``networks.GaussianNet`` (as the modality encoder q(h_k | x_k)) and
``networks.ModalityDecoder`` (as g_k), with the same call interfaces, for inputs whose features
are the voxels of a mask on a grid (``VolumeSpace``: ``grid_shape`` and ``np.flatnonzero(mask)``):

    ConvEncoder(grid_shape, mask_flat_indices, latent_dim, channels)(x) -> (loc, scale)   x: (B, V)
    ConvDecoder(grid_shape, mask_flat_indices, latent_dim, channels)(h) -> (mean (B, V), sigma (V,))

Encoder: the masked vector is scattered onto the grid (zero outside the mask) and stacked with
the mask itself as a second channel (so the network can tell "outside the brain" from "a zero
value"), then ``len(channels)`` stages of [3^d convolution with stride 2, SiLU, 3^d convolution,
SiLU] halve every axis (ceil(n / 2)), and the flattened feature map goes through a hidden
layer to loc and a softplus scale, as in GaussianNet.

Decoder: a linear layer to the encoder's bottleneck feature map, then the same stages in reverse
with transposed convolutions whose ``output_padding`` is chosen per axis so that every stage
lands exactly on the encoder's size at that depth (non-cubic and odd sizes need no crop), a final
3^d convolution to one channel plus a learned per-voxel offset; the mask's voxels are gathered
into the (B, V) mean. sigma is a learned per-voxel noise scale, as in ModalityDecoder.

Plain torch (Conv2d/Conv3d chosen by ``len(grid_shape)``); no normalisation layers, since batch
statistics are noisy on the small batches this model trains with and instance/group norm would
remove the per-subject intensity level that the reconstruction needs.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from .losses import mask_indices, scatter_to_grid
from .networks import positive


def _halved(shape: Sequence[int]) -> tuple[int, ...]:
    # Output size of a kernel-3, stride-2, padding-1 convolution.
    return tuple((s + 1) // 2 for s in shape)


def stage_shapes(grid_shape: Sequence[int], n_stages: int) -> list[tuple[int, ...]]:
    """Grid sizes from the input (index 0) down to the bottleneck (index n_stages)."""
    shapes = [tuple(int(s) for s in grid_shape)]
    for _ in range(n_stages):
        shapes.append(_halved(shapes[-1]))
    return shapes


class _GridNet(nn.Module):
    def __init__(self, grid_shape: Sequence[int], mask_flat_indices, channels: Sequence[int]):
        super().__init__()
        self.grid_shape = tuple(int(s) for s in grid_shape)
        self.ndim = len(self.grid_shape)
        if self.ndim not in (2, 3):
            raise ValueError(f"convolutional networks need a 2-D or 3-D grid, got shape {self.grid_shape}")
        if min(self.grid_shape) < 1:
            raise ValueError(f"grid sizes must be positive, got {self.grid_shape}")
        self.channels = [int(c) for c in channels]
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"channels must be a non-empty list of positive integers, got {list(channels)}")
        index = torch.as_tensor(mask_indices(self.grid_shape, mask_flat_indices))
        self.n_features = int(index.numel())
        # Non-persistent: rebuilt from the space, so state_dicts hold only learned weights.
        self.register_buffer("index", index, persistent=False)
        self.shapes = stage_shapes(self.grid_shape, len(self.channels))
        self.bottleneck = self.channels[-1] * int(np.prod(self.shapes[-1]))
        self.Conv = nn.Conv2d if self.ndim == 2 else nn.Conv3d
        self.ConvT = nn.ConvTranspose2d if self.ndim == 2 else nn.ConvTranspose3d


class ConvEncoder(_GridNet):
    """x (B, V) masked vector -> (loc, scale) of a diagonal Gaussian of size ``latent_dim``."""

    def __init__(self, grid_shape: Sequence[int], mask_flat_indices, latent_dim: int,
                 channels: Sequence[int] = (8, 16, 32), hidden: int = 128):
        super().__init__(grid_shape, mask_flat_indices, channels)
        layers: list[nn.Module] = []
        c_in = 2  # the image and the mask
        for c in self.channels:
            layers += [self.Conv(c_in, c, 3, stride=2, padding=1), nn.SiLU(),
                       self.Conv(c, c, 3, padding=1), nn.SiLU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(self.bottleneck, hidden), nn.SiLU())
        self.loc = nn.Linear(hidden, latent_dim)
        self.scale = nn.Linear(hidden, latent_dim)
        mask_grid = scatter_to_grid(torch.ones(1, self.n_features), self.index, self.grid_shape)
        self.register_buffer("mask_grid", mask_grid, persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected x of shape (B, {self.n_features}), got {tuple(x.shape)}")
        grid = scatter_to_grid(x, self.index, self.grid_shape)
        mask = self.mask_grid.to(grid.dtype).expand_as(grid)
        hidden = self.body(self.features(torch.cat([grid, mask], dim=1)))
        return self.loc(hidden), positive(self.scale(hidden))


class ConvDecoder(_GridNet):
    """h (B, latent_dim) -> (mean (B, V) on the mask's voxels, sigma (V,))."""

    def __init__(self, grid_shape: Sequence[int], mask_flat_indices, latent_dim: int,
                 channels: Sequence[int] = (8, 16, 32), hidden: int = 128):
        super().__init__(grid_shape, mask_flat_indices, channels)
        self.inflate = nn.Sequential(nn.Linear(latent_dim, hidden), nn.SiLU(),
                                     nn.Linear(hidden, self.bottleneck), nn.SiLU())
        layers: list[nn.Module] = []
        reversed_channels = self.channels[::-1]
        for stage, c in enumerate(reversed_channels):
            c_out = reversed_channels[stage + 1] if stage + 1 < len(reversed_channels) else self.channels[0]
            small, large = self.shapes[len(self.channels) - stage], self.shapes[len(self.channels) - stage - 1]
            # (n - 1) * 2 - 2 + 3 + p = 2n - 1 + p: p = 1 gives an even size 2n, p = 0 the odd 2n - 1.
            output_padding = tuple(int(big - (2 * n - 1)) for n, big in zip(small, large))
            layers += [self.ConvT(c, c_out, 3, stride=2, padding=1, output_padding=output_padding), nn.SiLU(),
                       self.Conv(c_out, c_out, 3, padding=1), nn.SiLU()]
        layers.append(self.Conv(self.channels[0], 1, 3, padding=1))
        self.net = nn.Sequential(*layers)
        self.offset = nn.Parameter(torch.zeros(self.n_features))
        self.raw_sigma = nn.Parameter(torch.zeros(self.n_features))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = h.shape[0]
        start = self.inflate(h).reshape(batch, self.channels[-1], *self.shapes[-1])
        grid = self.net(start)
        if tuple(grid.shape[2:]) != self.grid_shape:  # cannot happen: output_padding makes sizes exact
            raise RuntimeError(f"decoder produced {tuple(grid.shape[2:])}, expected {self.grid_shape}")
        mean = grid.reshape(batch, -1).index_select(1, self.index) + self.offset
        return mean, positive(self.raw_sigma, 1e-3)
