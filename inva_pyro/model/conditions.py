"""What a subject's images are conditioned on besides its latent variables: covariates and site.

Covariates c_i (age, sex, APOE4, ...) enter the predictor and the shared level; the site s_i (scanner,
centre) enters the input decoders and the predictor through a learned site embedding e_s, and the outcome
through a site offset a_s and gain b_s (y_i = a_s + b_s * predictor, its noise sd scaled by b_s), so the
latents need not encode the scanner. A site numbered -1 (one training never saw) gets the pooled site: the
average of the training sites' embeddings, offsets and log gains.

The offset and gain act in the outcome's image units, where a scanner's calibration acts (a PET scale is a
gain around zero, not around the cohort's mean). The program works in standardised units, y' = (y - m_v)
/ t_v per feature v, where the same calibration reads y' -> b_s y' + (a_s k + (b_s - 1) m_v) / t_v, with a_s
counted in k, the outcome's typical (median) scale: an offset that varies over features as 1 / t_v and
m_v / t_v do. A scalar offset in standardised units, which runs fitted before this were given, cannot
represent it, and the networks then had to learn each site's pattern from its few subjects.

An empty covariate cell is a covariate not acquired. Each covariate has a learned prior (a Normal for a
numeric one, a Categorical for a categorical one), fitted by the likelihood of the cells present; an empty
cell is imputed with the prior's mean (the expected one-hot for a categorical one), and one indicator per
covariate tells the networks which cells were imputed.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

NUMERIC = "numeric"


class NewSiteWarning(UserWarning):
    """Subjects from a site the model was not fitted on: predicted with the pooled site."""


def encode_conditions(subset, covariates, sites, device) -> "Conditions | None":
    """The conditions of ``subset``'s subjects as tensors on ``device``: covariates encoded by ``covariates``
    (data/covariates.py ``CovariateEncoder``), sites numbered by ``sites`` (``SiteLevels``: -1 for a site
    they do not know); None when both are None (a model fitted without conditions)."""
    if covariates is None and sites is None:
        return None
    from ..errors import InputError
    where = "the subjects"
    encoded = site = None
    if covariates is not None:
        if subset.conditions is None:
            raise InputError(f"{where}: no covariates; this run was fitted with covariates {', '.join(covariates.names)}")
        encoded = torch.as_tensor(covariates.transform(subset.conditions, where), device=device)
    if sites is not None:
        if subset.sites is None:
            raise InputError(f"{where}: no site column; this run was fitted with sites from column '{sites.column}'")
        site = torch.as_tensor(sites.index(subset.sites), device=device)
    return Conditions(encoded, site)


@dataclass
class Conditions:
    """Per subject: ``covariates`` (n, W) as ``data.covariates.CovariateEncoder`` encodes them (NaN where not
    acquired) and ``site`` (n,) int64 site numbers (-1: the pooled site); either may be None."""
    covariates: torch.Tensor | None = None
    site: torch.Tensor | None = None

    def rows(self, index) -> "Conditions":
        take = lambda t: None if t is None else t[index]  # noqa: E731
        return Conditions(take(self.covariates), take(self.site))

    def to(self, device) -> "Conditions":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Conditions(move(self.covariates), move(self.site))


class ConditionNetwork(nn.Module):
    """The learned parts of the conditioning: the covariates' priors, the site embedding, offset and gain."""

    def __init__(self, covariate_spec: list[tuple[str, str, int]], n_sites: int, site_dim: int):
        super().__init__()
        self.spec = [(name, kind, int(width)) for name, kind, width in covariate_spec]
        self.n_sites = int(n_sites)
        width = sum(w for _, _, w in self.spec)
        # numeric: the prior's mean and log sd; categorical: the prior's logits (the log sd slots unused)
        self.covariate_loc = nn.Parameter(torch.zeros(width))
        self.covariate_log_scale = nn.Parameter(torch.zeros(width))
        self.covariate_dim = width + len(self.spec) if self.spec else 0  # values and one indicator each
        self.site_dim = site_dim if self.n_sites else 0
        self.site_embedding = nn.Parameter(torch.zeros(self.n_sites, site_dim))
        self.site_offset = nn.Parameter(torch.zeros(self.n_sites))
        self.site_log_gain = nn.Parameter(torch.zeros(self.n_sites))
        # (V,) m_v / t_v and k / t_v of the outcome (module docstring); empty: standardised units (older runs).
        # Not saved with the weights: they are the run's standardisation, set again when a run is loaded.
        self.register_buffer("outcome_location", torch.zeros(0), persistent=False)
        self.register_buffer("outcome_unit", torch.zeros(0), persistent=False)

    @torch.no_grad()
    def set_outcome_units(self, mean, scale) -> None:
        """The site offset and gain act in image units, given the outcome's standardisation (mean, scale)."""
        like = self.outcome_unit
        mean, scale = (torch.as_tensor(a, dtype=torch.float32, device=like.device) for a in (mean, scale))
        self.outcome_location, self.outcome_unit = mean / scale, scale.median() / scale

    @torch.no_grad()
    def start_sites(self, offset, log_gain) -> None:
        """Where SVI starts each site's outcome offset and log gain (e.g. from its subjects' outcome moments)."""
        for table, values in ((self.site_offset, offset), (self.site_log_gain, log_gain)):
            table.copy_(torch.as_tensor(values, dtype=table.dtype, device=table.device))

    def complete(self, conditions: Conditions | None, like: torch.Tensor) -> Conditions:
        """``conditions`` with what is not given filled in for ``like``'s rows: covariates not acquired, the pooled
        site (on ``like``'s device)."""
        conditions = conditions or Conditions()
        batch, width = like.shape[0], sum(w for _, _, w in self.spec)
        covariates = conditions.covariates
        if covariates is None and width:
            covariates = like.new_full((batch, width), float("nan"))
        site = conditions.site
        if site is None and self.n_sites:
            site = torch.full((batch,), -1, dtype=torch.long, device=like.device)
        return Conditions(covariates, site)

    @torch.no_grad()
    def add_sites(self, count: int) -> None:
        """``count`` more sites, each starting as the pooled site (the training sites' average)."""
        for name in ("site_embedding", "site_offset", "site_log_gain"):
            table = getattr(self, name)
            rows = table.mean(0, keepdim=True).expand(count, *table.shape[1:])
            setattr(self, name, nn.Parameter(torch.cat([table, rows], dim=0)))
        self.n_sites += count

    def site_parameters(self) -> list[nn.Parameter]:
        """What adapting the module to a new site fits: the site tables (the rows of the new sites)."""
        return [self.site_embedding, self.site_offset, self.site_log_gain]

    def _slices(self):
        start = 0
        for name, kind, width in self.spec:
            yield name, kind, slice(start, start + width)
            start += width

    def covariate_vector(self, covariates: torch.Tensor | None) -> torch.Tensor | None:
        """(B, covariate_dim): covariates with empty cells imputed by their prior's mean, and the indicators."""
        if not self.spec:
            return None
        values, flags = [], []
        for _, kind, cols in self._slices():
            value = covariates[:, cols]
            present = ~torch.isnan(value[:, :1])
            prior_mean = self.covariate_loc[cols] if kind == NUMERIC else F.softmax(self.covariate_loc[cols], -1)
            values.append(torch.where(present, value, prior_mean.expand_as(value)))
            flags.append((~present).to(value.dtype))
        return torch.cat(values + flags, dim=-1)

    def covariate_likelihood(self, covariates: torch.Tensor | None) -> None:
        """The observed covariate cells under their priors (inside the subjects' plate): fits the priors."""
        for name, kind, cols in self._slices():
            value = covariates[:, cols]
            present = ~torch.isnan(value[:, 0])
            value = torch.nan_to_num(value, nan=0.0)
            batch = value.shape[0]
            if kind == NUMERIC:
                prior = dist.Normal(self.covariate_loc[cols][0], self.covariate_log_scale[cols][0].exp())
                pyro.sample(f"covariate_{name}", prior.expand([batch]).mask(present), obs=value[:, 0])
            else:
                prior = dist.Categorical(logits=self.covariate_loc[cols])
                pyro.sample(f"covariate_{name}", prior.expand([batch]).mask(present), obs=value.argmax(-1))

    def _per_site(self, table: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        """Rows of ``table`` (K, ...) at ``site`` (B,); the average row where the site is -1 (pooled)."""
        pooled = table.mean(0, keepdim=True).expand(site.shape[0], *table.shape[1:])
        chosen = table[site.clamp(min=0)]
        known = (site >= 0).reshape(-1, *([1] * (table.dim() - 1)))
        return torch.where(known, chosen, pooled)

    def site_vector(self, site: torch.Tensor | None) -> torch.Tensor | None:
        """(B, site_dim) site embeddings."""
        return None if not self.n_sites else self._per_site(self.site_embedding, site)

    def site_affine(self, site: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """((B, V) offset, or (B, 1) in standardised units, and (B, 1) gain b_s) of the outcome in the program's
        units, or None without sites."""
        if not self.n_sites:
            return None
        offset = self._per_site(self.site_offset, site)[:, None]
        gain = self._per_site(self.site_log_gain, site).exp()[:, None]
        if self.outcome_unit.numel():  # (B, V): the calibration in image units, in standardised ones
            offset = offset * self.outcome_unit + (gain - 1.0) * self.outcome_location
        return offset, gain
