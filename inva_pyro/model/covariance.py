"""The outcome's spatial error covariance: a low-rank-plus-diagonal Normal (docs/uncertainty.md).

Given the predictor's mean m_i and sd s_i (per voxel), subject i's outcome image is

    y_i = m_i + s_i * (alpha F u_i + beta sqrt(d) * e_i),    u_i ~ N(0, I_r),  e_i ~ N(0, I_V),

i.e. ``LowRankMultivariateNormal(m_i, alpha s_i * F, beta^2 s_i^2 d)``: F (V x r) is a loading matrix
of the standardised error, d (V,) its remaining per-voxel variance, and alpha, beta two scale factors
fitted so that voxels and means over regions are both calibrated (``predict/joint.py``). With r = 0
(no factor: a model before ``fit`` estimated it, or a run folder from before it existed) the outcome is
the independent ``Normal(m_i, s_i).to_event(1)`` of the original program.

The factor is not learnt by SVI on the training subjects, whose residuals shrink as the networks fit
them; it is estimated after training from validation residuals (``fit_factor``, probabilistic PCA,
Tipping & Bishop 1999), where the errors are those of new subjects. Its tensors are buffers that are
not part of ``weights.safetensors`` (``persistent=False``), so run folders written before it load
unchanged; ``InVA.save`` writes them to ``covariance.safetensors``.
"""
from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn


class OutcomeCovariance(nn.Module):
    def __init__(self, n_outcome: int):
        super().__init__()
        self.register_buffer("factor", torch.zeros(n_outcome, 0), persistent=False)
        self.register_buffer("diag", torch.ones(n_outcome), persistent=False)
        self.register_buffer("scales", torch.ones(2), persistent=False)   # (alpha, beta)

    @property
    def rank(self) -> int:
        return int(self.factor.shape[1])

    def set(self, factor: torch.Tensor, diag: torch.Tensor, alpha: float, beta: float) -> None:
        device, dtype = self.diag.device, self.diag.dtype
        self.factor = factor.to(device=device, dtype=dtype)
        self.diag = diag.to(device=device, dtype=dtype)
        self.scales = torch.stack([torch.as_tensor(float(alpha)), torch.as_tensor(float(beta))]).to(device, dtype)

    def distribution(self, mean: torch.Tensor, sd: torch.Tensor) -> dist.Distribution:
        """The outcome's distribution given mean and sd (batch, V): event shape (V,)."""
        if self.rank == 0:
            return dist.Normal(mean, sd).to_event(1)
        alpha, beta = self.scales[0], self.scales[1]
        return dist.LowRankMultivariateNormal(mean, alpha * sd.unsqueeze(-1) * self.factor,
                                              (beta * sd).square() * self.diag)

    def state(self) -> dict[str, torch.Tensor]:
        return {"factor": self.factor, "diag": self.diag, "scales": self.scales}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.set(state["factor"], state["diag"], float(state["scales"][0]), float(state["scales"][1]))


def fit_factor(residuals: torch.Tensor, rank: int | None, min_diag: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, d) of standardised residuals R (n, V).

    ``rank=None`` (``covariance_rank = "full"``): the sample second moment itself, F = R^T / sqrt(n) (rank n),
    with d = the per-voxel second moments as the diagonal target; alpha^2 F F^T + beta^2 diag(d) is then
    a shrinkage estimator (Ledoit & Wolf 2004) whose weights the calibration fits. Its key property:
    E[w^T F F^T w] = w^T Sigma w for every fixed region w, so no family of regions is favoured.

    ``rank=r`` (16 by default in ``fit``): probabilistic PCA on the second moments.

    Second moments, not covariances: a shared bias of the mean is an error component too. With the
    singular values S of R / sqrt(n), the leading r directions V_r get loadings
    V_r sqrt(S_r^2 - sigma^2), sigma^2 the mean of the remaining eigenvalues (Tipping & Bishop 1999);
    d_v = max(mean_i r_iv^2 - sum_k F_vk^2, min_diag) keeps each voxel's own second moment.
    """
    n, n_vox = residuals.shape
    second = residuals.square().mean(0)
    if rank is None:
        return residuals.T / n ** 0.5, second.clamp_min(min_diag)
    rank = max(0, min(int(rank), n - 1, n_vox - 1))
    if rank == 0:
        return residuals.new_zeros(n_vox, 0), second.clamp_min(min_diag)
    _, s, vh = torch.linalg.svd(residuals / n ** 0.5, full_matrices=False)
    eig = s.square()
    sigma2 = (eig.sum() - eig[:rank].sum()) / max(n_vox - rank, 1)
    factor = vh[:rank].T * (eig[:rank] - sigma2).clamp_min(0.0).sqrt()
    diag = (second - factor.square().sum(1)).clamp_min(min_diag)
    return factor, diag
