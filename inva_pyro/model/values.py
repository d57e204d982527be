"""What the parts of the Pyro program hand to each other: one encoder pass over a minibatch, and the
outcome's distribution without the output layer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .conditions import Conditions


@dataclass
class EncodedInputs:
    """One encoder pass over a minibatch, shared by the model, the guide and the predictor: the inputs
    zero-filled where not acquired, their (B, K) presence, (loc, scale) of q(h_k | x_k) for every VAE, and
    the subjects' conditions (conditions.py) with the vectors the networks read: covariates (imputed, with
    indicators) and site embeddings; ``affine``: the outcome's per-site (offset, gain), or None."""
    values: list[torch.Tensor]
    present: torch.Tensor
    experts: list[tuple[torch.Tensor, torch.Tensor]]
    conditions: Conditions | None = None
    covariate_vector: torch.Tensor | None = None
    site_vector: torch.Tensor | None = None
    affine: tuple[torch.Tensor, torch.Tensor] | None = None

    def condition(self, *, site: bool = True) -> torch.Tensor | None:
        """The covariate vector and (with ``site``) the site embedding side by side; None without either."""
        parts = [v for v in (self.covariate_vector, self.site_vector if site else None) if v is not None]
        return torch.cat(parts, dim=-1) if parts else None


class OutcomeParts(NamedTuple):
    """Everything of y_i's distribution but the output layer (W, b): the predictor's hidden layer H (B, D),
    its local mean term (B, V), the noise sd (B, V; the site gain applied) and the site (offset, gain)."""
    hidden: torch.Tensor
    local_mean: torch.Tensor
    sd: torch.Tensor
    affine: tuple[torch.Tensor, torch.Tensor] | None = None

    def mean(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The outcome's mean given (W, b): a_s + b_s (H W^T + b + local mean)."""
        return self.scaled(self.hidden @ weight.transpose(-1, -2) + bias + self.local_mean)

    def scaled(self, mean: torch.Tensor) -> torch.Tensor:
        """a_s + b_s * mean, for a mean of the predictor on the standardised scale of the training sites."""
        if self.affine is None:
            return mean
        offset, gain = self.affine
        return offset + gain * mean

    def gain(self) -> torch.Tensor | float:
        return 1.0 if self.affine is None else self.affine[1]
