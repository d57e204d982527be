"""The InVA Pyro program: generative model and guide (docs/design.md).

Subjects i, input modalities k = 1..K, inputs x_ki in R^{V_k}, outcome y_i in R^{V_y}, and optionally
covariates c_i and a site s_i with embedding e_s (conditions.py):

    z_ki ~ Normal(0, I_q)                                deep latent
    h_ki ~ Normal(f_shared(z_ki, c_i), s_shared(.))      shared decoder (same weights for every k)
    x_ki ~ Normal(g_k(h_ki, c_i, e_s), sigma_k)          modality-specific decoder
    W, b ~ Normal(0, tau^2)                              Bayesian output layer of the predictor (optional)
    y_i  ~ Normal(a_s + b_s m(F_i, c_i, e_s; W, b), b_s s(.))   predictor, heteroscedastic per voxel
           (low-rank-plus-diagonal across voxels once ``outcome_covariance`` is fitted: covariance.py)

F_i are the paper's predictor inputs: for every k the means and sds of q(h_ki|x_ki) and of q(z_ki|h_ki) at
the shallow mean. The guide is amortised: q(h_ki|x_ki) is modality-specific, q(z_ki|h_ki) shared, q(W, b)
a mean-field Normal. KL weights enter through ``poutine.scale``; minibatches through the subsampled
``subjects`` plate, so every ELBO estimate is scaled to the full training size. No training or I/O here.

Options from the VAE tutorial (docs/toolkit.md): a Laplace likelihood for the inputs; a DSSIM term per
input image, ``pyro.factor(-w V DSSIM(g_k(h_ki), x_ki))``; an InfoVAE term ``pyro.factor(-lambda N
MMD(q(z), p(z)))`` on the top latent level over the minibatch; an extra weight on the deep level's KL;
convolutional encoders/decoders. Peer structures (``cfg.structure``): ``separate`` drops the shared level
(h_ki ~ Normal(0, I_p)); ``concatenated`` is one plain VAE on the inputs concatenated; both keep the same
predictor. Structure ``joint`` (docs/model.md, "Missing inputs"): one subject latent z_i ~ Normal(0, I_p)
shared by every modality, x_ki ~ g_k(z_i); q(z_i | inputs present) is the product of the modality experts
and the prior expert (``experts.py``); the local pathway sees each local input where present and its
reconstruction g_k(E[z]) where not, with a presence channel.

Images not acquired (``data/missing.py``) arrive as rows of NaN, split once per step into zero-filled values
and presence. Every missingness mask is on a site's distribution (``.mask``): an input's reconstruction
counts only where it is present, the latents of a modality-specific VAE only where its input is, the
outcome only where it is present (and, outside ``joint``, every input too: the other predictors cannot tell
a missing input from a zero one), an observed covariate's likelihood only where it was acquired. Every
structure shares one ``outcome`` site, ``outcome_distribution``, so the program diagnostics score is the
one that predicts.
"""
from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from ..config import ModelConfig
from ..data.missing import fill_missing
from .conditions import ConditionNetwork, Conditions
from .values import EncodedInputs, OutcomeParts
from .conv import ConvDecoder, ConvEncoder
from .covariance import OutcomeCovariance
from .experts import product_of_experts, stack_experts
from .losses import DSSIM, mmd
from .networks import GaussianNet, MeanFieldNormal, ModalityDecoder, Predictor
from .smoothing import neighbour_table, smoothness_log_prior


def weighted(weight: float | torch.Tensor):
    """Scale the log-densities of the sites inside by ``weight``; a weight of 0 drops them (mask).
    A 0-d device tensor scales as it is, whatever its value (a CUDA graph replays one program while
    the KL weight changes between epochs: train/graphs.py)."""
    if isinstance(weight, torch.Tensor):
        return poutine.scale(scale=weight)
    return poutine.scale(scale=weight) if weight > 0 else poutine.mask(mask=False)


def standard_normal(like: torch.Tensor, batch: int, dim: int) -> dist.Normal:
    """Normal(0, I) over (batch, dim), both parameters on ``like``'s device: a Python 1.0 would become
    a tensor copied from the host at every step (forbidden inside a CUDA graph capture)."""
    return dist.Normal(like.new_zeros(batch, dim), like.new_ones(batch, dim))


class InVAModule(nn.Module):
    def __init__(self, input_names: list[str], input_sizes: list[int], n_outcome: int, cfg: ModelConfig,
                 input_grids: list | None = None, neighbour_pairs=None,
                 covariate_spec: list[tuple[str, str, int]] | None = None, n_sites: int = 0):
        """``input_grids[k]``: (grid shape, flat mask indices) of input k's image, or None (no grid).
        ``neighbour_pairs``: (E, 2) outcome features that touch, for ``spatial_smoothing`` (None: no graph).
        ``covariate_spec``: (name, kind, encoded width) of each covariate the program conditions on;
        ``n_sites``: the number of training sites (0: no site) (conditions.py)."""
        super().__init__()
        if not input_names:
            raise ValueError("InVA needs at least one input modality")
        self.input_names = list(input_names)
        self.input_sizes = [int(v) for v in input_sizes]
        self.cfg = cfg
        p, q = cfg.shallow_dim, cfg.deep_dim
        self.hierarchical = cfg.structure == "integrative"
        self.joint = cfg.structure == "joint"
        self.vae_names = ["concat"] if cfg.structure == "concatenated" else self.input_names
        vae_sizes = [sum(input_sizes)] if cfg.structure == "concatenated" else list(input_sizes)
        grids = list(input_grids) if input_grids is not None else [None] * len(vae_sizes)
        self.conditioning = (ConditionNetwork(covariate_spec or [], n_sites, cfg.site_embedding)
                             if covariate_spec or n_sites else None)
        cov_dim = self.conditioning.covariate_dim if self.conditioning else 0
        condition_dim = cov_dim + (self.conditioning.site_dim if self.conditioning else 0)
        if cfg.network == "conv" or cfg.dssim_weight > 0:
            flat = [name for name, g in zip(self.vae_names, grids) if g is None or len(g[0]) not in (2, 3)]
            if flat:
                raise ValueError(f"network 'conv' and dssim_weight need 2-D or 3-D image grids; "
                                 f"{', '.join(flat)} has none")
        if cfg.network == "conv":
            self.shallow_encoders = nn.ModuleList(ConvEncoder(*g, p, cfg.conv_channels, cfg.hidden) for g in grids)
            self.modality_decoders = nn.ModuleList(ConvDecoder(*g, p + condition_dim, cfg.conv_channels, cfg.hidden)
                                                   for g in grids)
        else:
            self.shallow_encoders = nn.ModuleList(GaussianNet(v, cfg.hidden, p) for v in vae_sizes)
            self.modality_decoders = nn.ModuleList(ModalityDecoder(p + condition_dim, cfg.hidden, v) for v in vae_sizes)
        self.likelihood = dist.Laplace if cfg.reconstruction == "laplace" else dist.Normal
        self.dssim_terms = (nn.ModuleList(DSSIM(*g, win_size=cfg.dssim_window) for g in grids)
                            if cfg.dssim_weight > 0 else None)
        if self.hierarchical:
            self.shared_encoder = GaussianNet(p, cfg.shared_hidden, q)
            self.shared_decoder = GaussianNet(q + cov_dim, cfg.shared_hidden, p)
        # The local pathway sees, at each outcome voxel, the inputs defined on the same voxels.
        self.local_modalities = [k for k, v in enumerate(input_sizes) if v == n_outcome] if cfg.predictor == "local" else []
        if cfg.predictor == "local" and not self.local_modalities:
            raise ValueError("predictor 'local' needs at least one input with as many features as the outcome")
        stats_per_vae = 2 * (p + q) if self.hierarchical else 2 * p
        n_stats = 2 * p if self.joint else len(vae_sizes) * stats_per_vae
        # joint: each local input comes with a presence channel
        n_local = len(self.local_modalities) * (2 if self.joint else 1)
        self.predictor = Predictor(n_stats + condition_dim, n_outcome, cfg, n_local)
        shape = (n_outcome, cfg.predictor_hidden)
        if cfg.bayesian_output:
            self.output_weight_q = MeanFieldNormal(shape)
            self.output_bias_q = MeanFieldNormal((n_outcome,))
        else:
            self.output_weight = nn.Parameter(0.01 * torch.randn(shape))
            self.output_bias = nn.Parameter(torch.zeros(n_outcome))
        self.outcome_covariance = OutcomeCovariance(n_outcome)  # low-rank spatial error, fitted after training
        # Not saved with the weights: rebuilt from the outcome space whenever the module is built.
        table, degree = neighbour_table(neighbour_pairs if neighbour_pairs is not None else [], n_outcome)
        self.register_buffer("neighbour_table", table, persistent=False)
        self.register_buffer("neighbour_degree", degree, persistent=False)
        self.n_neighbour_pairs = int(degree.sum().item()) // 2  # a host int: no device read per step

    # ---- deterministic pieces shared by model, guide and prediction -------------------------------
    def vae_inputs(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.cat(xs, dim=-1)] if len(self.vae_names) != len(xs) else xs

    @staticmethod
    def split_missing(xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(zero-filled inputs, (B, K) bool presence) from inputs whose missing rows are NaN."""
        filled, present = zip(*(fill_missing(x) for x in xs))
        return list(filled), torch.stack(present, dim=-1)

    def vae_presence(self, present: torch.Tensor) -> torch.Tensor:
        """(B, number of VAEs): a VAE's latents count where any of its inputs is present."""
        return present.any(dim=-1, keepdim=True) if len(self.vae_names) != present.shape[-1] else present

    def encode_inputs(self, xs: list[torch.Tensor], conditions: Conditions | None = None) -> EncodedInputs:
        """One encoder pass over inputs whose missing rows are NaN (they are encoded as zeros; masks drop them),
        with the subjects' ``conditions`` (without them, covariates read as not acquired and the site as
        pooled)."""
        values, present = self.split_missing(xs)
        experts = [encoder(x) for encoder, x in zip(self.shallow_encoders, self.vae_inputs(values))]
        if self.conditioning is None:
            return EncodedInputs(values, present, experts)
        conditions = self.conditioning.complete(conditions, values[0])
        return EncodedInputs(values, present, experts, conditions,
                             self.conditioning.covariate_vector(conditions.covariates),
                             self.conditioning.site_vector(conditions.site),
                             self.conditioning.site_affine(conditions.site))

    def encode(self, xs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(loc, scale) of q(h_k | x_k) for every modality: the amortised shallow posteriors (the
        experts of ``joint``)."""
        return self.encode_inputs(xs).experts

    def decode(self, k: int, latent: torch.Tensor, encoded: EncodedInputs | None = None):
        """(mean, scale) of input k given its latent (..., B, p) and the subjects' conditions (from ``encoded``;
        without it, covariates not acquired and the pooled site)."""
        condition = self._condition_for(latent, encoded, site=True)
        return self.modality_decoders[k](latent if condition is None else torch.cat([latent, condition], dim=-1))

    def shared_prior(self, z: torch.Tensor, encoded: EncodedInputs | None = None):
        """(loc, scale) of p(h | z, covariates): the shared decoder (structure ``integrative``)."""
        condition = self._condition_for(z, encoded, site=False)
        return self.shared_decoder(z if condition is None else torch.cat([z, condition], dim=-1))

    def _condition_for(self, latent: torch.Tensor, encoded: EncodedInputs | None, site: bool):
        """The condition vector that goes with ``latent`` (its leading dims), or None without conditions."""
        if self.conditioning is None:
            return None
        if encoded is None:  # no subjects' conditions: covariates not acquired, the pooled site
            conditions = self.conditioning.complete(None, latent.reshape(-1, latent.shape[-1])[:1])
            encoded = EncodedInputs([], latent.new_zeros(0), [], conditions,
                                    self.conditioning.covariate_vector(conditions.covariates),
                                    self.conditioning.site_vector(conditions.site))
        condition = encoded.condition(site=site)
        return None if condition is None else condition.expand(*latent.shape[:-1], condition.shape[-1])

    def joint_posterior(self, encoded, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of q(z | inputs present): the product of the experts present and the prior."""
        return product_of_experts(*stack_experts(encoded), present)

    def latent_statistics(self, encoded, present: torch.Tensor | None = None) -> torch.Tensor:
        """The paper's predictor input: [mean, sd] of q(h|x) and of q(z|h=mean) for every modality
        (``joint``: [mean, sd] of the joint posterior over the inputs ``present``)."""
        if self.joint:
            if present is None:
                present = encoded[0][0].new_ones(encoded[0][0].shape[0], len(encoded), dtype=torch.bool)
            return torch.cat(self.joint_posterior(encoded, present), dim=-1)
        stats = []
        for h_loc, h_scale in encoded:
            stats += [h_loc, h_scale]
            if self.hierarchical:
                stats += list(self.shared_encoder(h_loc))
        return torch.cat(stats, dim=-1)

    def local_inputs(self, xs: list[torch.Tensor], present: torch.Tensor | None = None,
                     joint_loc: torch.Tensor | None = None, encoded: EncodedInputs | None = None) -> torch.Tensor | None:
        """(B, V, channels) local inputs (zero-filled ``xs``). ``joint``: where input k is missing
        its reconstruction from the joint posterior mean stands in, and presence channels follow."""
        if not self.local_modalities:
            return None
        if not self.joint:
            return torch.stack([xs[k] for k in self.local_modalities], dim=-1)
        values, flags = [], []
        for k in self.local_modalities:
            here = present[:, k:k + 1]
            values.append(torch.where(here, xs[k], self.decode(k, joint_loc, encoded)[0]))
            flags.append(here.to(xs[k].dtype).expand_as(xs[k]))
        return torch.stack(values + flags, dim=-1)

    def outcome_parts(self, xs: list[torch.Tensor], encoded: EncodedInputs | None = None,
                      conditions: Conditions | None = None) -> OutcomeParts:
        """All of the outcome distribution except the output layer (NaN rows of ``xs``: missing)."""
        encoded = encoded if encoded is not None else self.encode_inputs(xs, conditions)
        joint_loc = None
        if self.joint:
            joint_loc, joint_scale = self.joint_posterior(encoded.experts, encoded.present)
            stats = torch.cat([joint_loc, joint_scale], dim=-1)
        else:
            stats = self.latent_statistics(encoded.experts)
        condition = encoded.condition()
        hidden = self.predictor.hidden(stats if condition is None else torch.cat([stats, condition], dim=-1))
        local = self.local_inputs(encoded.values, encoded.present, joint_loc, encoded)
        local_mean, sd = self.predictor.deterministic_parts(hidden, local)
        parts = OutcomeParts(hidden, local_mean, sd, encoded.affine)
        return parts._replace(sd=parts.gain() * sd) if encoded.affine is not None else parts

    def outcome_distribution(self, mean: torch.Tensor, sd: torch.Tensor):
        """y_i given mean and sd: independent Normal, or low-rank-plus-diagonal once fitted (covariance.py)."""
        return self.outcome_covariance.distribution(mean, sd)

    def output_layer_posterior(self) -> tuple[dist.Distribution, dist.Distribution]:
        return (dist.Normal(self.output_weight_q.loc, self.output_weight_q.scale).to_event(2),
                dist.Normal(self.output_bias_q.loc, self.output_bias_q.scale).to_event(1))

    def output_prior(self, like: torch.Tensor) -> dist.Normal:
        """Normal(0, tau^2) over a tensor shaped like ``like``, on its device and dtype (a prior built
        from Python floats would live on the CPU and fail against CUDA draws)."""
        zero = like.new_zeros(())
        return dist.Normal(zero, zero + self.cfg.output_prior_scale).expand(like.shape)

    def output_layer_mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.bayesian_output:
            return self.output_weight_q.loc, self.output_bias_q.loc
        return self.output_weight, self.output_bias

    def smoothness_prior(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """The GMRF prior of every per-voxel predictor map on the outcome's neighbour graph (smoothing.py),
        as the named factor ``predictor_smoothness``; nothing without a strength or a graph."""
        if self.cfg.spatial_smoothing <= 0 or not self.n_neighbour_pairs:
            return
        maps = [weight, bias, *self.predictor.voxel_maps()]
        pyro.factor("predictor_smoothness", smoothness_log_prior(
            maps, self.neighbour_table, self.neighbour_degree, self.cfg.spatial_smoothing,
            self.cfg.output_prior_scale))

    # ---- the Pyro program --------------------------------------------------------------------------
    # Both programs take the inputs with missing rows as NaN, and the subjects' ``conditions`` (covariates,
    # site; conditions.py). ``encoded`` (= self.encode_inputs(xs, conditions): the zero-filled values, their
    # presence, the experts and the condition vectors) may be passed in so that model and guide share one
    # encoder pass: the predictor conditions on the same summaries of x that parameterise q(h | x).
    def model(self, xs, y=None, *, subjects, n_subjects, conditions=None, encoded=None, kl_scale=1.0,
              prediction_scale=1.0, extra_terms=True, reconstruct=None, outcome=True):
        """p(W, b) p(covariates) p(latents | covariates) p(x | latents, covariates, site)
        p(y | x, latents, covariates, site; W, b) for the minibatch ``subjects`` of ``n_subjects``.
        ``extra_terms``: the DSSIM and MMD training penalties. ``reconstruct`` (structure ``joint``): the
        inputs whose reconstruction terms count, when they differ from ``xs``, the inputs the guide and the
        predictor see (inputs hidden for training, still observed). ``outcome=False`` leaves out the output layer
        and the outcome: the inputs' part of the program (novelty scores, the guide's Pareto k)."""
        encoded = encoded if encoded is not None else self.encode_inputs(xs, conditions)
        if outcome:
            weight, bias = self._output_layer()
            parts = self.outcome_parts(encoded.values, encoded)
        with pyro.plate("subjects", n_subjects, subsample=subjects):
            if encoded.covariate_vector is not None:
                self.conditioning.covariate_likelihood(encoded.conditions.covariates)
            latents_and_inputs = self._subject_latent if self.joint else self._modality_latents
            top_latents = latents_and_inputs(encoded, kl_scale, extra_terms, reconstruct)
            if outcome:
                self._outcome(parts.mean(weight, bias), parts.sd, y, encoded.present, prediction_scale)
        if extra_terms and self.cfg.mmd_weight > 0 and encoded.values[0].shape[0] >= 2:
            # A divergence between distributions, not a sum over subjects: outside the plate, weighted per subject.
            for name, z in zip(["subject"] if self.joint else self.vae_names, top_latents):
                pyro.factor(f"mmd_{name}", -self.cfg.mmd_weight * n_subjects *
                            mmd(z, torch.randn_like(z), self.cfg.mmd_kernel, self.cfg.mmd_bandwidth))

    def _output_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) ~ Normal(0, tau^2) (Bayesian output layer) or the point weights, under the smoothness prior."""
        if self.cfg.bayesian_output:
            weight = pyro.sample("output_weight", self.output_prior(self.output_weight_q.loc).to_event(2))
            bias = pyro.sample("output_bias", self.output_prior(self.output_bias_q.loc).to_event(1))
        else:
            weight, bias = self.output_weight, self.output_bias
        self.smoothness_prior(weight, bias)
        return weight, bias

    def _modality_latents(self, encoded: EncodedInputs, kl_scale, extra_terms, reconstruct) -> list[torch.Tensor]:
        """Structures ``integrative`` (z_k -> h_k -> x_k, the shared level given the covariates), ``separate``
        and ``concatenated`` (h_k -> x_k): one chain of latents per VAE, counted where its input is present.
        Returns the top latents."""
        xs, present = encoded.values, encoded.present
        batch, cfg, top = xs[0].shape[0], self.cfg, []
        vae_present = self.vae_presence(present)
        for k, (name, x) in enumerate(zip(self.vae_names, self.vae_inputs(xs))):
            with weighted(kl_scale):
                if self.hierarchical:
                    with weighted(cfg.deep_kl_weight):
                        z = pyro.sample(f"deep_latent_{name}",
                                        standard_normal(x, batch, cfg.deep_dim).to_event(1).mask(vae_present[:, k]))
                    h_prior = dist.Normal(*self.shared_prior(z, encoded))
                else:
                    h_prior = standard_normal(x, batch, cfg.shallow_dim)
                h = pyro.sample(f"shallow_latent_{name}", h_prior.to_event(1).mask(vae_present[:, k]))
            self._reconstruction(name, k, self.decode(k, h, encoded), x, self._feature_presence(present, k, x),
                                 extra_terms)
            top.append(z if self.hierarchical else h)
        return top

    def _subject_latent(self, encoded: EncodedInputs, kl_scale, extra_terms, reconstruct) -> list[torch.Tensor]:
        """Structure ``joint``: one subject latent z -> every x_k, each counted where present."""
        xs, present = encoded.values, encoded.present
        with weighted(kl_scale):
            z = pyro.sample("subject_latent", standard_normal(xs[0], xs[0].shape[0], self.cfg.shallow_dim).to_event(1))
        targets, observed = (xs, present) if reconstruct is None else self.split_missing(reconstruct)
        for k, (name, x) in enumerate(zip(self.vae_names, targets)):
            self._reconstruction(name, k, self.decode(k, z, encoded), x, observed[:, k:k + 1].expand_as(x),
                                 extra_terms)
        return [z]

    def _reconstruction(self, name: str, k: int, x_params, x, observed: torch.Tensor, extra_terms: bool) -> None:
        """x_k ~ likelihood(g_k(latent)) on its ``observed`` (B, V) features, and its DSSIM term."""
        x_mean, x_scale = x_params
        pyro.sample(f"input_{name}", self.likelihood(x_mean, x_scale).mask(observed).to_event(1), obs=x)
        if extra_terms and self.dssim_terms is not None:
            term = -self.cfg.dssim_weight * x.shape[-1] * self.dssim_terms[k](x_mean, x)
            pyro.factor(f"dssim_{name}", torch.where(observed.any(-1), term, torch.zeros_like(term)))

    def _outcome(self, mean, sd, y, present, prediction_scale) -> None:
        """y_i ~ outcome_distribution(mean, sd): the one outcome site of every structure, counted where the
        outcome is present (outside ``joint``, with every input too: those predictors cannot tell a missing
        input from a zero one)."""
        outcome = self.outcome_distribution(mean, sd)
        if y is not None:
            y, observed = fill_missing(y)
            outcome = outcome.mask(observed if self.joint else observed & present.all(dim=-1))
        with poutine.scale(scale=prediction_scale):
            pyro.sample("outcome", outcome, obs=y)

    def guide(self, xs, y=None, *, subjects, n_subjects, conditions=None, encoded=None, kl_scale=1.0,
              prediction_scale=1.0, reconstruct=None):
        """q(W, b) q(latents | x): amortised, with the arguments of ``model``."""
        if self.cfg.bayesian_output:
            weight_q, bias_q = self.output_layer_posterior()
            pyro.sample("output_weight", weight_q)
            pyro.sample("output_bias", bias_q)
        encoded = encoded if encoded is not None else self.encode_inputs(xs, conditions)
        present = encoded.present
        with pyro.plate("subjects", n_subjects, subsample=subjects), weighted(kl_scale):
            if self.joint:
                pyro.sample("subject_latent", dist.Normal(*self.joint_posterior(encoded.experts, present)).to_event(1))
                return
            vae_present = self.vae_presence(present)
            for k, (name, (h_loc, h_scale)) in enumerate(zip(self.vae_names, encoded.experts)):
                h = pyro.sample(f"shallow_latent_{name}",
                                dist.Normal(h_loc, h_scale).to_event(1).mask(vae_present[:, k]))
                if self.hierarchical:
                    with weighted(self.cfg.deep_kl_weight):
                        pyro.sample(f"deep_latent_{name}",
                                    dist.Normal(*self.shared_encoder(h)).to_event(1).mask(vae_present[:, k]))

    def _feature_presence(self, present: torch.Tensor, k: int, x: torch.Tensor) -> torch.Tensor:
        """(B, V) bool: which features of VAE k's input are observed (the concatenated VAE spans inputs)."""
        if len(self.vae_names) == present.shape[-1]:
            return present[:, k:k + 1].expand_as(x)
        return torch.cat([present[:, j:j + 1].expand(-1, size) for j, size in enumerate(self.input_sizes)], dim=-1)
