"""Extra objective terms from the VAE tutorial (docs/toolkit.md): DSSIM, MMD and KL-weight schedules.

Plain, differentiable torch functions with no Pyro code; the Pyro program adds them as
``pyro.factor`` sites (see docs/toolkit.md for the wiring, the weights and when to use each).

- ``dssim`` / ``DSSIM``: structural dissimilarity 1 - SSIM per subject, MONAI's SSIM map on the
  image grid, averaged over the mask (2-D grids and 3-D volumes, any shape at least one window
  wide).
- ``mmd``: the unbiased estimate of the squared maximum mean discrepancy between two sample
  sets (InfoVAE's divergence between the aggregate posterior and the prior), IMQ or RBF kernel.
- ``kl_schedule``: the weight beta of the KL terms at an epoch: constant, linear warm-up, or
  the cyclical annealing of Fu et al. (2019).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# The same window as the SSIM metric (inva_pyro.criticism.metrics): 7 voxels, Gaussian sigma 1.5.
SSIM_WINDOW = 7
SSIM_SIGMA = 1.5


# --------------------------------------------------------------------------- DSSIM


def mask_indices(grid_shape: Sequence[int], mask=None) -> np.ndarray:
    """Flat (C order) indices on ``grid_shape`` of the features of a masked vector.

    ``mask``: None (every grid point, in C order), a boolean array with ``prod(grid_shape)``
    entries (any shape; True = inside), or an integer array of flat indices (sorted ascending,
    the order ``np.flatnonzero`` and VolumeSpace's features use).
    """
    size = int(np.prod(grid_shape))
    if mask is None:
        return np.arange(size, dtype=np.int64)
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.dtype == bool:
        if mask.size != size:
            raise ValueError(f"mask has {mask.size} entries but the grid {tuple(grid_shape)} has {size}")
        index = np.flatnonzero(mask.ravel())
    else:
        if not np.issubdtype(mask.dtype, np.integer):
            raise ValueError(f"mask must be boolean or integer flat indices, got dtype {mask.dtype}")
        index = mask.ravel().astype(np.int64)
        if index.size and (index.min() < 0 or index.max() >= size):
            raise ValueError(f"mask indices must lie in [0, {size}) for the grid {tuple(grid_shape)}")
        if np.any(np.diff(index) <= 0):
            raise ValueError("mask indices must be strictly increasing (C order, no repeats)")
    if index.size == 0:
        raise ValueError("mask is empty")
    return index


def scatter_to_grid(values: torch.Tensor, index: torch.Tensor, grid_shape: Sequence[int],
                    channel: bool = True) -> torch.Tensor:
    """(B, V) masked vectors -> (B, 1, *grid_shape) grids with zeros outside the mask (differentiable)."""
    batch = values.shape[0]
    flat = values.new_zeros(batch, int(np.prod(grid_shape)))
    flat = flat.index_copy(1, index, values)
    return flat.reshape(batch, *((1,) if channel else ()), *grid_shape)


def _gaussian_window(win_size: int, sigma: float, ndim: int) -> torch.Tensor:
    """The normalised separable Gaussian window of MONAI's SSIM, shape (1, 1, win, ..., win)."""
    offsets = torch.arange(win_size, dtype=torch.float64) - (win_size - 1) / 2
    g = torch.exp(-0.5 * (offsets / sigma) ** 2)
    g = g / g.sum()
    window = g
    for _ in range(ndim - 1):
        window = window[..., None] * g
    return window.reshape(1, 1, *([win_size] * ndim))


class DSSIM(nn.Module):
    """Structural dissimilarity 1 - SSIM of masked vectors on a fixed grid and mask.

    Precomputes the mask's flat indices and the window weights once (non-persistent buffers,
    so they follow ``.to(device)`` and stay out of ``state_dict``); call it like ``dssim``.

    For subject i the two (B, V) vectors are scattered onto the grid (zero outside the mask),
    MONAI's ``compute_ssim_and_cs`` gives the SSIM map over every full window position
    ("valid" windows: a map of shape grid - win_size + 1), and

        DSSIM_i = 1 - sum_c w_c SSIM_i(c) / sum_c w_c,    w_c = sum_u G(u) m(c + u),

    where G is the same normalised Gaussian window and m the mask: each window counts by the
    Gaussian-weighted share of it that lies inside the mask. Windows wholly outside the mask
    (where both images are 0 and SSIM is trivially 1) get weight 0, so they do not dilute the
    loss, and a window on the mask's edge counts in proportion to its brain content. Without a
    mask every window has weight 1 and this is MONAI's mean SSIM.

    ``data_range`` scales SSIM's stabilising constants c1 = (0.01 L)^2, c2 = (0.03 L)^2: a float
    L for every subject, or None (default) for each subject's own target range inside the mask,
    max - min (detached, floored at 1e-6), which makes DSSIM_i depend on subject i alone
    (minibatch estimates stay unbiased) and invariant to the images' units.
    """

    def __init__(self, grid_shape: Sequence[int], mask=None, data_range: float | None = None,
                 win_size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA):
        super().__init__()
        self.grid_shape = tuple(int(s) for s in grid_shape)
        ndim = len(self.grid_shape)
        if ndim not in (2, 3):
            raise ValueError(f"DSSIM needs a 2-D or 3-D grid, got shape {self.grid_shape} "
                             "(surfaces and region tables have no grid: use the Gaussian/Laplace likelihood)")
        if win_size < 1 or win_size % 2 == 0:
            raise ValueError(f"win_size must be a positive odd number, got {win_size}")
        if min(self.grid_shape) < win_size:
            raise ValueError(f"grid {self.grid_shape} is smaller than the SSIM window ({win_size} voxels) "
                             f"along some axis; use a smaller win_size (odd, <= {min(self.grid_shape)}) "
                             "or another reconstruction term")
        if data_range is not None and not data_range > 0:
            raise ValueError(f"data_range must be positive or None, got {data_range}")
        self.ndim, self.win_size, self.sigma, self.data_range = ndim, int(win_size), float(sigma), data_range
        index = torch.as_tensor(mask_indices(self.grid_shape, mask))
        self.n_features = int(index.numel())
        self.register_buffer("index", index, persistent=False)
        mask_grid = scatter_to_grid(torch.ones(1, self.n_features, dtype=torch.float64), index, self.grid_shape)
        conv = getattr(F, f"conv{ndim}d")
        weight = conv(mask_grid, _gaussian_window(self.win_size, self.sigma, ndim))[0, 0]
        weight = weight.clamp_min(0.0).to(torch.float32)
        if float(weight.sum()) <= 0:
            raise ValueError("no SSIM window overlaps the mask")
        self.register_buffer("window_weight", weight / weight.sum(), persistent=False)

    def ssim_map(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """MONAI's SSIM map, (B, *valid window positions), of two (B, V) masked vectors."""
        from monai.metrics.regression import compute_ssim_and_cs

        if recon.shape != target.shape or recon.ndim != 2 or recon.shape[1] != self.n_features:
            raise ValueError(f"expected recon and target of shape (B, {self.n_features}), "
                             f"got {tuple(recon.shape)} and {tuple(target.shape)}")
        if self.data_range is None:
            # Each subject on its own range: scale both images by 1/L_i and use L = 1, which
            # is SSIM with constants (k L_i)^2 (SSIM is invariant to a joint rescaling then).
            span = (target.amax(dim=1) - target.amin(dim=1)).detach().clamp_min(1e-6)
            recon, target, data_range = recon / span[:, None], target / span[:, None], 1.0
        else:
            data_range = float(self.data_range)
        ssim_map, _ = compute_ssim_and_cs(
            y_pred=scatter_to_grid(recon, self.index, self.grid_shape),
            y=scatter_to_grid(target, self.index, self.grid_shape),
            spatial_dims=self.ndim, kernel_size=[self.win_size] * self.ndim,
            kernel_sigma=[self.sigma] * self.ndim, data_range=data_range)
        return ssim_map[:, 0]

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """DSSIM = 1 - mask-weighted mean SSIM, in [0, 2] (0 for identical images), per subject.

        recon, target: (..., V); leading dimensions (subjects, and e.g. Pyro's vectorised
        particles) are kept: the result has shape (...). ``target`` is broadcast to ``recon``.
        """
        if recon.ndim < 1 or recon.shape[-1] != self.n_features or target.shape[-1:] != recon.shape[-1:]:
            raise ValueError(f"expected recon and target of shape (..., {self.n_features}), "
                             f"got {tuple(recon.shape)} and {tuple(target.shape)}")
        target = target.expand_as(recon)
        lead = recon.shape[:-1]
        ssim_map = self.ssim_map(recon.reshape(-1, recon.shape[-1]), target.reshape(-1, target.shape[-1]))
        weight = self.window_weight.to(ssim_map.dtype)
        ssim = (ssim_map * weight).flatten(1).sum(1)
        return (1.0 - ssim).to(recon.dtype).reshape(lead)


def dssim(recon: torch.Tensor, target: torch.Tensor, grid_shape: Sequence[int], mask=None,
          data_range: float | None = None, win_size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Structural dissimilarity 1 - SSIM for every subject, shape (B,); differentiable.

    recon, target: (B, V) masked feature vectors (or (..., V): the result is then (...)) (V = the mask's voxels in C order, or the
    whole grid when ``mask`` is None); grid_shape: the 2-D or 3-D grid (e.g.
    ``VolumeSpace.grid_shape``); mask: None, a boolean array on the grid, or flat indices.
    Raises ValueError when the grid is smaller than ``win_size`` along an axis. See ``DSSIM``
    for the mask weighting and ``data_range`` (None: each subject's target range). Building
    the weights costs one convolution of the mask; inside a training loop keep a ``DSSIM``.
    """
    module = DSSIM(grid_shape, mask, data_range=data_range, win_size=win_size, sigma=sigma)
    return module.to(recon.device)(recon, target)


# --------------------------------------------------------------------------- MMD


def _pairwise_sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Differences rather than the |a|^2 + |b|^2 - 2ab expansion: exact zeros on the diagonal
    # and no cancellation for nearby points.
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def mmd(samples_q: torch.Tensor, samples_p: torch.Tensor, kernel: str = "imq",
        bandwidth: float | Sequence[float] | str | None = None) -> torch.Tensor:
    """Unbiased estimate of MMD^2 between the distributions of two sample sets; differentiable.

    samples_q: (n, d), e.g. latent draws of a minibatch (the aggregate posterior q(z));
    samples_p: (m, d), e.g. draws of the prior N(0, I). n, m >= 2. The estimate is

        MMD^2_u = 1/(n(n-1)) sum_{i!=j} k(q_i, q_j) + 1/(m(m-1)) sum_{i!=j} k(p_i, p_j)
                  - 2/(nm) sum_{i,j} k(q_i, p_j),

    which has expectation exactly MMD^2 (so it can be slightly negative when q = p).

    Kernels, with scale C:
      "imq" (default): k(x, y) = C / (C + |x - y|^2), inverse multiquadratic, heavy-tailed, as
                       recommended by Tolstikhin et al. (2018, WAE-MMD);
      "rbf":           k(x, y) = exp(-|x - y|^2 / C), the Gaussian kernel of InfoVAE (Zhao et al.).
    bandwidth = C: None (default) gives C = 2 d, the expected squared distance between two
    draws of N(0, I_d) (WAE's choice for the IMQ kernel with a unit-variance prior); a float
    sets C; a sequence of floats sums the kernels at those scales (WAE's multi-scale variant,
    e.g. [0.1, 0.2, 0.5, 1, 2, 5, 10] x 2 d); "median" uses the median pairwise squared
    distance of the pooled samples (detached), the median heuristic.
    """
    if samples_q.ndim != 2 or samples_p.ndim != 2 or samples_q.shape[1] != samples_p.shape[1]:
        raise ValueError(f"mmd needs (n, d) and (m, d) samples, got {tuple(samples_q.shape)} "
                         f"and {tuple(samples_p.shape)}")
    n, m, d = samples_q.shape[0], samples_p.shape[0], samples_q.shape[1]
    if n < 2 or m < 2:
        raise ValueError(f"mmd needs at least 2 samples on each side, got {n} and {m}")
    if kernel not in ("imq", "rbf"):
        raise ValueError(f"unknown kernel {kernel!r} (known: imq, rbf)")
    samples_p = samples_p.to(samples_q.dtype)
    d_qq = _pairwise_sq_dists(samples_q, samples_q)
    d_pp = _pairwise_sq_dists(samples_p, samples_p)
    d_qp = _pairwise_sq_dists(samples_q, samples_p)
    if bandwidth is None:
        scales = [2.0 * d]
    elif isinstance(bandwidth, str):
        if bandwidth != "median":
            raise ValueError(f"bandwidth must be None, a positive number, a list of them or 'median', "
                             f"got {bandwidth!r}")
        pooled = torch.cat([samples_q, samples_p]).detach()
        dists = _pairwise_sq_dists(pooled, pooled)
        off = dists[~torch.eye(len(pooled), dtype=torch.bool, device=dists.device)]
        scales = [max(float(off.median()), 1e-12)]
    elif isinstance(bandwidth, (int, float)):
        scales = [float(bandwidth)]
    else:
        scales = [float(s) for s in bandwidth]
    if not scales or any(not (s > 0 and math.isfinite(s)) for s in scales):
        raise ValueError(f"bandwidth scales must be positive and finite, got {scales}")

    def k(sq: torch.Tensor) -> torch.Tensor:
        if kernel == "imq":
            return sum(c / (c + sq) for c in scales)
        return sum(torch.exp(-sq / c) for c in scales)

    k_qq, k_pp, k_qp = k(d_qq), k(d_pp), k(d_qp)
    within_q = (k_qq.sum() - k_qq.diagonal().sum()) / (n * (n - 1))
    within_p = (k_pp.sum() - k_pp.diagonal().sum()) / (m * (m - 1))
    return within_q + within_p - 2.0 * k_qp.mean()


# --------------------------------------------------------------------------- KL weight schedules

SCHEDULES = ("constant", "linear", "cyclical")


def kl_schedule(epoch: int, kind: str = "linear", *, max_weight: float = 1.0, warmup: int = 20,
                total_epochs: int | None = None, cycles: int = 4, ratio: float = 0.5) -> float:
    """The KL weight beta at ``epoch`` (0-based); a pure function of its arguments.

    kind:
      "constant": beta = max_weight.
      "linear":   beta = max_weight * min(1, (epoch + 1) / warmup) (warmup = 0: max_weight at
                  once), the linear warm-up the training loop uses (``kl_anneal_epochs``).
      "cyclical": cyclical annealing (Fu et al., NAACL 2019): ``total_epochs`` are cut into
                  ``cycles`` cycles of length L = total_epochs / cycles; within a cycle, with
                  tau = (epoch mod ceil(L)) / L, beta rises linearly from 0 to max_weight over
                  the first ``ratio`` of the cycle and stays at max_weight for the rest:
                  beta = max_weight * min(1, tau / ratio). After ``total_epochs`` beta stays at
                  max_weight.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if not max_weight >= 0:
        raise ValueError(f"max_weight must be >= 0, got {max_weight}")
    if kind == "constant":
        return float(max_weight)
    if kind == "linear":
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        return float(max_weight) if warmup == 0 else float(max_weight) * min(1.0, (epoch + 1) / warmup)
    if kind == "cyclical":
        if total_epochs is None or total_epochs < 1:
            raise ValueError(f"cyclical annealing needs total_epochs >= 1, got {total_epochs}")
        if cycles < 1:
            raise ValueError(f"cycles must be >= 1, got {cycles}")
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        if epoch >= total_epochs:
            return float(max_weight)
        period = total_epochs / cycles
        tau = (epoch % math.ceil(period)) / period
        return float(max_weight) * min(1.0, tau / ratio)
    raise ValueError(f"unknown schedule {kind!r} (known: {', '.join(SCHEDULES)})")
