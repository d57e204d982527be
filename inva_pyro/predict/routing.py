"""Which model predicts which subject, for a joint model with pattern submodels.

A pattern submodel (Fletcher Mercaldo & Blume 2020, Biostatistics 21:236) is the joint model's preset fitted
once without input k, on every training subject without k, in the joint model's units (``InVA.fit`` does
it when ``[training] pattern_submodels`` is on): where k carries what no other input shows, the encoders
that a joint model shares between the patterns are a compromise, and a model never given k does better
on the subjects that lack it.

A subject lacking input k and no other is predicted by the equal-weight mixture of the joint model's
predictive (from the inputs it has) and that of the submodel fitted without k; every other subject by the
joint model alone. An equal-weight mixture, not a choice between the two: on the validation subjects that
stopped the submodel early its error is biased low, so a choice or a weight fitted there favours it, and
the average of two forecasts beats a fitted weight more often than not (the forecast-combination puzzle,
Claeskens et al. 2016). Its mean is the average of the two means, whose squared error is at most the
average of theirs, and less by a quarter of their mean squared disagreement.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..train.loop import predictive_mean
from .patterns import impose
from .predictive import KeptDraws, PredictiveSummary, mixture_predictive


@dataclass
class SubmodelRecord:
    """The submodel without ``input``: validation MSEs (standardised units) on the ``n_val`` complete
    validation subjects of the joint model with the input hidden, of the submodel, of their mixture's mean."""
    input: str
    predictor: str
    n_val: int
    val_mse_joint: float
    val_mse_submodel: float
    val_mse_mixture: float


def score_submodel(main, submodel, xs: list[torch.Tensor], y: torch.Tensor, k: int, name: str,
                   predictor: str) -> SubmodelRecord:
    """The record of the submodel without input ``k`` (named ``name``) on complete subjects ``xs``, ``y``."""
    scores = [float("nan")] * 3
    if len(y):
        main.eval()
        submodel.eval()
        joint = predictive_mean(main, impose(xs, [j != k for j in range(len(xs))]))
        alone = predictive_mean(submodel, [x for j, x in enumerate(xs) if j != k])
        scores = [float(((m - y) ** 2).mean()) for m in (joint, alone, (joint + alone) / 2)]
    return SubmodelRecord(name, predictor, int(len(y)), *scores)


@dataclass
class PatternRoutes:
    """The joint module ``main`` and ``submodels[k]``, the module fitted without input k. It stands in for a
    module wherever a predictive is drawn (``posterior_predictive`` calls ``routed_predictive``)."""
    main: object
    submodels: dict[int, object]
    joint = True

    @property
    def cfg(self):
        return self.main.cfg

    def route(self, inputs: list[torch.Tensor]) -> np.ndarray:
        """(n,) the input k that subject i lacks alone and has a submodel for, or -1 (the joint model alone)."""
        present = torch.stack([~torch.isnan(x).all(-1) for x in inputs], -1).cpu().numpy()
        route = np.full(len(present), -1)
        lacks_one = present.sum(1) == present.shape[1] - 1
        for k in self.submodels:
            route[lacks_one & ~present[:, k]] = k
        return route

    def routed_predictive(self, inputs: list[torch.Tensor], *, observed=None, conditions=None,
                          **kwargs) -> PredictiveSummary:
        route = self.route(inputs)
        parts = []
        for k in (-1, *sorted(self.submodels)):
            if not (route == k).any():
                continue
            rows = np.flatnonzero(route == k)
            index = torch.as_tensor(rows, device=inputs[0].device)
            xs = [x[index] for x in inputs]
            components = [(self.main, xs)]
            if k >= 0:
                components.append((self.submodels[k], [x for j, x in enumerate(xs) if j != k]))
            parts.append((rows, mixture_predictive(
                components, observed=None if observed is None else observed[index],
                conditions=None if conditions is None else conditions.rows(index), **kwargs)))
        return parts[0][1] if len(parts) == 1 else merge(parts, len(route))


def merge(parts: list[tuple[np.ndarray, PredictiveSummary]], n: int) -> PredictiveSummary:
    """The summaries of groups of subjects (rows, summary) as one, in subject order. Kept draws of (W, b)
    are the first group's (the joint model's, which every group's first component is)."""
    def rows_of(get, axis: int = -2):  # axis: the subjects' (from the end: a noise sd may gain a draw axis)
        values = [get(summary) for _, summary in parts]
        if values[0] is None:
            return None
        if len({v.ndim for v in values}) > 1:  # a mixture's noise sd differs by draw: (K, n, F) beside (n, F)
            k = max(v.shape[0] for v in values if v.ndim == 3)
            values = [v if v.ndim == 3 else np.broadcast_to(v, (k, *v.shape)) for v in values]
        shape = list(values[0].shape)
        shape[axis] = n
        out = np.empty(shape, dtype=values[0].dtype)
        for (rows, _), value in zip(parts, values):
            np.moveaxis(out, axis, 0)[rows] = np.moveaxis(value, axis, 0)
        return out

    first = parts[0][1]
    draws = None
    if first.draws is not None:
        draws = KeptDraws(
            features=first.draws.features, component_mean=rows_of(lambda s: s.draws.component_mean),
            noise_sd=rows_of(lambda s: s.draws.noise_sd), outcome=rows_of(lambda s: s.draws.outcome),
            output_weight=first.draws.output_weight, output_bias=first.draws.output_bias,
            image_loglik=rows_of(lambda s: s.draws.image_loglik, -1))
    return PredictiveSummary(
        mean=rows_of(lambda s: s.mean), sd=rows_of(lambda s: s.sd),
        quantiles={p: rows_of(lambda s, p=p: s.quantiles[p]) for p in first.quantiles},
        crps=rows_of(lambda s: s.crps), samples=rows_of(lambda s: s.samples), draws=draws)
