"""Jointly calibrated predictive: the spatial error covariance fitted on validation subjects, region
moments in closed form, and streamed joint draws (docs/uncertainty.md, section 8).

With the predictive mean m_i and raw sd s_i of subject i (the streamed posterior predictive), the joint
predictive is

    y_i = m_i + s_i * (alpha F u_i + beta sqrt(d) * e_i),   u_i ~ N(0, I_r), e_i ~ N(0, I_V)

(``model/covariance.py``). A region R with averaging weights w_R (1/|R| on its features) then has mean
w_R . m_i and variance alpha^2 |F^T (w_R * s_i)|^2 + beta^2 sum_v w_Rv^2 s_iv^2 d_v, computed exactly,
without draws. Fitting (``fit_spatial_covariance``) on the validation subjects, cross-fitted over two seeded folds:

1. (F, d) from the standardised residuals (y - m) / s of the other fold (``fit_factor``: probabilistic
   PCA of their second moments, rank ``[prediction] covariance_rank``, 16 by default, or their sample
   second moment; shrunk towards its diagonal by the weights below); the model keeps the average of
   the folds' covariances (their factors side by side), so that predictions use the estimates the
   calibration below was fitted with;
2. on the fold itself, alpha, beta make the mean squared standardised error 1 for every family of
   regions (single voxels, random Voronoi partitions of the mask into 2 ... 128 cells in voxel
   coordinates, the whole mask): least squares on the log ratios.
   Then the quantile function Q_k of the standardised region errors e / sd_R of each family k gives
   the region intervals mean_R + sd_R Q(p), Q interpolated in log(region size) between the families
   (Mondrian split-conformal by region size): regions the calibration never saw get the quantiles of
   random regions of their size, so a misfit of alpha, beta for some sizes is corrected too.

Single voxels keep the voxel calibrator (``calibration.py``); the joint model describes their
variance too (the voxel family), so joint draws have calibrated marginal variances.

As the voxel calibrator, the region quantiles can be kept per group (site: each family's Q_k of the
group's subjects, shrunk towards the pooled one) and their intervals can hold with probability
``coverage_confidence`` per fit (``conformal.py``: exactly, by order statistics, for the whole mask, one
score per subject; by the subject-level rule for families of several regions per subject). Both leave
alpha, beta and the covariance pooled.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from scipy import sparse

from ..model.covariance import fit_factor
from .conformal import (GROUP_SPREAD, MIN_GROUP_SUBJECTS, PROBS, beta_level, bootstrap_level, family_calibration,
                        order_statistic_level)

PARTITION_CELLS = (2, 4, 8, 16, 32, 64, 128)
PARTITIONS_PER_SIZE = 2


@dataclass
class SpatialCovariance:
    factor: np.ndarray          # (V, r) loadings of the standardised error
    diag: np.ndarray            # (V,) remaining variance of the standardised error
    alpha: float                # scale of the low-rank part
    beta: float                 # scale of the diagonal part
    z_quantiles: np.ndarray     # (N_QUANTILES,) standardised region errors, Q((j + 0.5) / M), all families
    info: dict = field(default_factory=dict)
    family_fraction: np.ndarray | None = None     # (K,) mean share of the mask of a region of family k, sorted
    family_quantiles: np.ndarray | None = None    # (K, N_QUANTILES) Q of family k
    family_scores: np.ndarray | None = None       # (K,) regions per subject of family k (1: the whole mask)
    family_coverage_sd: np.ndarray | None = None  # (K, M/2) sd of per-subject coverage of family k (conformal.py)
    family_t_quantiles: np.ndarray | None = None  # (K, T, M/2) its bootstrap-t quantiles (NaN: one region)
    n_subjects: int = 0                           # validation subjects fitted (0: from before it was kept)
    group_family_quantiles: dict[str, np.ndarray] = field(default_factory=dict)  # group -> (K, N_QUANTILES), shrunk
    group_info: dict[str, dict] = field(default_factory=dict)   # group -> subjects, per-family weight, ...
    coverage_confidence: float | None = None

    @property
    def rank(self) -> int:
        return int(self.factor.shape[1])

    def _neighbours(self, fraction: float) -> tuple[int, int, float]:
        """The families k - 1, k around a region covering ``fraction`` of the mask, and its weight t on k."""
        x = np.log(np.clip(fraction, self.family_fraction[0], self.family_fraction[-1]))
        logs = np.log(self.family_fraction)
        k = int(np.clip(np.searchsorted(logs, x), 1, len(logs) - 1))
        t = 0.0 if logs[k] == logs[k - 1] else (x - logs[k - 1]) / (logs[k] - logs[k - 1])
        return k - 1, k, float(t)

    def atoms(self, fraction: float | None = None, group: str | None = None) -> np.ndarray:
        """Quantile function of the standardised error of a region covering ``fraction`` of the mask (of a
        subject of ``group``): interpolated in log(fraction) between the families' (Mondrian conformal by
        region size); without ``fraction`` (or families), that of all families together."""
        if fraction is None or self.family_fraction is None:
            return self.z_quantiles
        table = self.group_family_quantiles.get(group, self.family_quantiles)
        k0, k1, t = self._neighbours(fraction)
        return (1 - t) * table[k0] + t * table[k1]

    def z(self, prob: float, fraction: float | None = None, group: str | None = None) -> float:
        return float(np.interp(prob, PROBS, self.atoms(fraction, group)))

    def z_regions(self, prob: float, fractions, group: str | None = None) -> np.ndarray:
        """z(prob) for regions covering ``fractions`` (L,) of the mask."""
        return np.array([self.z(prob, f, group) for f in np.atleast_1d(fractions)])

    def central_level(self, level: float, family: int, group: str | None = None) -> float:
        """The central level of family ``family``'s quantile function reported at ``level``: ``level``, or with
        ``coverage_confidence`` the narrowest that holds with that probability (conformal.py)."""
        if self.coverage_confidence is None or self.family_t_quantiles is None or self.n_subjects < 2:
            return level
        grouped = group in self.group_family_quantiles
        n = self.group_info[group]["effective_subjects"][family] if grouped else self.n_subjects
        if self.family_scores[family] > 1:
            return bootstrap_level(level, self.coverage_confidence, n, self.family_coverage_sd[family],
                                   self.family_t_quantiles[family])[0]
        if grouped:
            return beta_level(level, self.coverage_confidence, n)[0]
        return order_statistic_level(level, self.coverage_confidence, self.n_subjects)[0]

    def interval_z(self, level: float, fractions, groups: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Standardised ends of the central ``level`` intervals of regions covering ``fractions`` (L,) of the
        mask: (L,) arrays, or (n, L) with ``groups`` (one per subject)."""
        fractions = np.atleast_1d(fractions)
        rows = [None] if groups is None or not self.group_family_quantiles else list(groups)
        ends = {g: self._interval_z(level, fractions, g) for g in dict.fromkeys(rows)}
        lo, hi = (np.stack([ends[g][side] for g in rows]) for side in (0, 1))
        return (lo[0], hi[0]) if groups is None or not self.group_family_quantiles else (lo, hi)

    def _interval_z(self, level: float, fractions: np.ndarray, group: str | None) -> tuple[np.ndarray, np.ndarray]:
        if self.coverage_confidence is None or self.family_fraction is None:
            return tuple(self.z_regions(prob, fractions, group) for prob in ((1 - level) / 2, (1 + level) / 2))
        table = self.group_family_quantiles.get(group, self.family_quantiles)
        lo, hi = np.empty(len(fractions)), np.empty(len(fractions))
        for i, fraction in enumerate(fractions):   # each neighbouring family at its own level, then interpolated
            k0, k1, t = self._neighbours(fraction)
            ends = [(np.interp((1 - p) / 2, PROBS, table[k]), np.interp((1 + p) / 2, PROBS, table[k]))
                    for k in (k0, k1) for p in [self.central_level(level, k, group)]]
            lo[i], hi[i] = ((1 - t) * ends[0][side] + t * ends[1][side] for side in (0, 1))
        return lo, hi

    def region_moments(self, mean: np.ndarray, sd: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, L) means and sds of the regions with averaging weights (L, V)."""
        return region_moments(mean, sd, weights, self.factor, self.diag, self.alpha, self.beta)

    def with_confidence(self, confidence: float | None) -> "SpatialCovariance":
        """This calibration with region intervals at ``coverage_confidence`` (None: right on average)."""
        if confidence is not None and (not 0.5 <= confidence <= 0.99 or self.family_t_quantiles is None):
            raise ValueError("coverage_confidence must be between 0.5 and 0.99 and needs a region calibration that "
                             f"kept its bootstrap tables (refit with this version), got {confidence}")
        return replace(self, coverage_confidence=confidence)

    def to_dict(self) -> dict:
        """Everything but the arrays F and d (``covariance.safetensors`` keeps those)."""
        out = {"alpha": self.alpha, "beta": self.beta, "rank": self.rank,
               "z_quantiles": self.z_quantiles.tolist(), "info": self.info}
        if self.family_fraction is not None:
            out.update(family_fraction=self.family_fraction.tolist(),
                       family_quantiles=np.round(self.family_quantiles, 6).tolist())
        if self.family_t_quantiles is not None:
            out.update(family_scores=self.family_scores.tolist(),
                       family_coverage_sd=np.round(np.nan_to_num(self.family_coverage_sd), 5).tolist(),
                       family_t_quantiles=np.round(np.nan_to_num(self.family_t_quantiles), 3).tolist(),
                       n_subjects=self.n_subjects, coverage_confidence=self.coverage_confidence,
                       group_family_quantiles={g: np.round(q, 6).tolist()
                                               for g, q in self.group_family_quantiles.items()},
                       group_info=self.group_info)
        return out

    @classmethod
    def from_parts(cls, d: dict, factor: np.ndarray, diag: np.ndarray) -> "SpatialCovariance":
        # covariance.json files from before groups and coverage_confidence lack their keys: pooled, on average
        optional = lambda key: np.asarray(d[key], dtype=np.float64) if d.get(key) is not None else None  # noqa: E731
        return cls(factor=np.asarray(factor, dtype=np.float64), diag=np.asarray(diag, dtype=np.float64),
                   alpha=float(d["alpha"]), beta=float(d["beta"]),
                   z_quantiles=np.asarray(d["z_quantiles"], dtype=np.float64), info=dict(d.get("info") or {}),
                   family_fraction=optional("family_fraction"), family_quantiles=optional("family_quantiles"),
                   family_scores=optional("family_scores"), family_coverage_sd=optional("family_coverage_sd"),
                   family_t_quantiles=optional("family_t_quantiles"),
                   n_subjects=int(d.get("n_subjects", 0)),
                   group_family_quantiles={str(g): np.asarray(q, dtype=np.float64)
                                           for g, q in (d.get("group_family_quantiles") or {}).items()},
                   group_info={str(g): dict(v) for g, v in (d.get("group_info") or {}).items()},
                   coverage_confidence=d.get("coverage_confidence"))


def label_weights(labels: np.ndarray) -> tuple[list[int], sparse.csr_matrix]:
    """Region ids (> 0) and their (L, V) sparse averaging weights from a feature label vector (0 = none)."""
    labels = np.asarray(labels).astype(np.int64)
    ids, inverse = np.unique(labels, return_inverse=True)
    keep = ids != 0
    rows = np.cumsum(keep) - 1                                   # region row of each unique id
    member = keep[inverse]
    counts = np.bincount(inverse, minlength=len(ids))
    cols = np.flatnonzero(member)
    weights = sparse.csr_matrix((1.0 / counts[inverse[cols]], (rows[inverse[cols]], cols)),
                                shape=(int(keep.sum()), labels.size))
    return [int(v) for v in ids[keep]], weights


def region_variances(sd, weights, factor, diag) -> tuple[np.ndarray, np.ndarray]:
    """(n, L) variances of region averages from the low-rank part (alpha = 1) and the diagonal (beta = 1)."""
    sd = np.asarray(sd, dtype=np.float64)
    weights = sparse.csr_matrix(weights)
    var_diag = np.asarray(weights.multiply(weights) @ (sd ** 2 * np.asarray(diag)).T).T
    var_low = np.zeros_like(var_diag)
    if factor.shape[1]:
        for i in range(sd.shape[0]):                              # sparse (L, V) @ (V, r) per subject
            var_low[i] = np.square(weights @ (sd[i][:, None] * factor)).sum(1)
    return var_low, var_diag


def region_moments(mean, sd, weights, factor, diag, alpha: float, beta: float):
    """Means (n, L) and sds (n, L) of region averages under the joint predictive."""
    weights = sparse.csr_matrix(weights)
    region_mean = np.asarray(weights @ np.asarray(mean, dtype=np.float64).T).T
    var_low, var_diag = region_variances(sd, weights, factor, diag)
    return region_mean, np.sqrt(alpha ** 2 * var_low + beta ** 2 * var_diag)


def independent_region_sd(sd, weights) -> np.ndarray:
    """Sds (n, L) of region averages if voxels were independent with sds ``sd`` (today's draws)."""
    weights = sparse.csr_matrix(weights)
    return np.sqrt(np.asarray(weights.multiply(weights) @ (np.asarray(sd, dtype=np.float64) ** 2).T).T)


def voronoi_labels(points: np.ndarray, n_cells: int, rng: np.random.Generator) -> np.ndarray:
    """Labels 1..k of the Voronoi cells of ``n_cells`` random feature positions (rows of ``points``)."""
    seeds = points[rng.choice(len(points), size=min(n_cells, len(points)), replace=False)]
    d2 = ((points[:, None, :] - seeds[None, :, :]) ** 2).sum(-1)
    return np.argmin(d2, axis=1) + 1


def region_families(n_features: int, coords: np.ndarray | None, seed: int) -> dict:
    """name -> (L, V) averaging weights of the regions the calibration uses: random Voronoi partitions
    in the features' coordinates (or, without coordinates, of feature index order, i.e. runs of
    consecutive features, as atlas tables and surface vertices are mostly ordered), and the whole mask."""
    rng = np.random.default_rng([seed, 12])
    points = (np.asarray(coords, dtype=np.float64) if coords is not None
              else np.arange(n_features, dtype=np.float64)[:, None])
    families = {}
    for name in ("coords" if coords is not None else "index",):
        for cells in PARTITION_CELLS:
            if cells > n_features // 2:
                continue
            blocks = [label_weights(voronoi_labels(points, cells, rng))[1] for _ in range(PARTITIONS_PER_SIZE)]
            families[f"{name}_{cells}"] = sparse.vstack(blocks).tocsr()
    families["all"] = sparse.csr_matrix(np.full((1, n_features), 1.0 / n_features))
    return families


def _voxel_moments(residuals, sd, factor, diag):
    """Per-voxel (squared error, low-rank variance, diagonal variance), each (n * V,)."""
    low = sd ** 2 * np.square(factor).sum(1)
    return residuals.ravel() ** 2, low.ravel(), (sd ** 2 * diag).ravel()


def fit_scales(parts: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[float, float, dict]:
    """alpha, beta minimising sum over families of log(mean(e^2 / (a^2 A + b^2 B)))^2."""
    from scipy import optimize

    def ratios(log_scales):
        a2, b2 = np.exp(log_scales)
        return {k: float(np.mean(e2 / np.maximum(a2 * low + b2 * dia, 1e-300))) for k, (e2, low, dia) in parts.items()}

    objective = lambda x: sum(np.log(r) ** 2 for r in ratios(x).values())  # noqa: E731
    best = min((optimize.minimize(objective, np.array(x0), method="Nelder-Mead",
                                  options={"xatol": 1e-4, "fatol": 1e-10, "maxiter": 2000})
                for x0 in ((0.0, 0.0), (1.0, -1.0), (-1.0, 1.0))), key=lambda r: r.fun)
    alpha, beta = np.sqrt(np.exp(best.x))
    return float(alpha), float(beta), ratios(best.x)


def fit_spatial_covariance(observed: torch.Tensor, mean, sd, *, rank: int | None = None,
                           coords: np.ndarray | None = None, folds: int = 2, seed: int = 0, final: str = "folds",
                           groups=None, confidence: float | None = None, group_spread: float = GROUP_SPREAD,
                           group_min_subjects: int = MIN_GROUP_SUBJECTS
                           ) -> tuple[torch.Tensor, torch.Tensor, SpatialCovariance]:
    """Fit (F, d) and the joint calibration on validation subjects (module doc).

    ``observed`` (n, V) tensor; ``mean``, ``sd`` (n, V) arrays of the raw predictive, same units.
    Cross-fitting: for each of ``folds`` seeded folds, (F, d) from the other subjects scores the fold's
    region errors; alpha, beta and the region quantiles come from all folds' scores. The returned
    (F, d) (tensors on ``observed``'s device, for the module): ``final="folds"`` (default), the average
    of the folds' covariances (F the folds' factors side by side over sqrt(folds), d their mean), the
    very estimates the calibration scores were standardised with; ``final="all"``, one fit on every
    validation subject, whose region variances differ systematically from the folds' when the factor
    is a PCA of a few dozen subjects (50 regions under-covered by 0.02 to 0.04: docs/uncertainty.md, 8).
    ``groups`` (a label per subject), ``confidence``, ``group_spread``, ``group_min_subjects``: region
    quantiles per group and intervals that hold per fit, as ``Calibrator.fit`` (``conformal.py``).
    """
    device = observed.device
    y = observed.detach().double()
    m = torch.as_tensor(np.asarray(mean), dtype=torch.float64, device=device)
    s = torch.as_tensor(np.asarray(sd), dtype=torch.float64, device=device)
    residuals = (y - m) / s
    n, n_vox = residuals.shape
    folds = max(2, min(int(folds), n // 2)) if n >= 4 else min(2, n)
    fold_of = np.random.default_rng([seed, 13]).permutation(n) % folds
    families = region_families(n_vox, coords, seed)
    errors = (y - m).cpu().numpy()
    joined, fold_fits = _cross_fitted_moments(residuals, errors, s.cpu().numpy(), families, fold_of, rank)
    alpha, beta, ratios = fit_scales(joined)
    if final == "folds":
        factor_t = torch.cat([f for f, _ in fold_fits], dim=1) / np.sqrt(len(fold_fits))
        diag_t = torch.stack([d for _, d in fold_fits]).mean(0)
    elif final == "all":
        factor_t, diag_t = fit_factor(residuals, rank)
    else:
        raise ValueError(f"final must be 'all' or 'folds', got {final!r}")
    info = {"n_subjects": int(n), "folds": int(folds), "rank": int(factor_t.shape[1]), "final": final,
            "mean_square_ratio": {k: round(v, 4) for k, v in ratios.items()}}
    scores = {name: _family_scores(weights, joined[name], errors, fold_of, alpha, beta)
              for name, weights in families.items()}
    fractions = np.array([float(np.mean(weights.getnnz(axis=1))) / n_vox for weights in families.values()])
    calibration = SpatialCovariance(factor=factor_t.cpu().numpy(), diag=diag_t.cpu().numpy(), alpha=alpha, beta=beta,
                                    info=info, n_subjects=int(n),
                                    **family_calibration(list(scores.values()), fractions, groups, spread=group_spread,
                                                         min_subjects=group_min_subjects))
    return factor_t.float(), diag_t.float(), calibration.with_confidence(confidence)


def _cross_fitted_moments(residuals: torch.Tensor, errors: np.ndarray, sd: np.ndarray, families: dict,
                          fold_of: np.ndarray, rank: int | None) -> tuple[dict, list]:
    """Per family (and ``voxel``): (squared errors, low-rank variances, diagonal variances) of every fold's
    regions under the factor of the other folds, joined fold by fold; and each fold's (F, d)."""
    folds = int(fold_of.max()) + 1
    parts: dict[str, list] = {}
    fold_fits = []
    for k in range(folds):
        rows = np.flatnonzero(fold_of == k)
        train_rows = np.flatnonzero(fold_of != k) if folds > 1 else rows
        factor_t, diag_t = fit_factor(residuals[torch.as_tensor(train_rows, device=residuals.device)], rank)
        fold_fits.append((factor_t, diag_t))
        factor, diag = factor_t.cpu().numpy(), diag_t.cpu().numpy()
        e, s_k = errors[rows], sd[rows]
        parts.setdefault("voxel", []).append(_voxel_moments(e, s_k, factor, diag))
        for name, weights in families.items():
            err = np.asarray(weights @ e.T).T
            var_low, var_diag = region_variances(s_k, weights, factor, diag)
            parts.setdefault(name, []).append((err.ravel() ** 2, var_low.ravel(), var_diag.ravel()))
    joined = {name: tuple(np.concatenate([p[j] for p in pieces]) for j in range(3)) for name, pieces in parts.items()}
    return joined, fold_fits


def _family_scores(weights, moments: tuple, errors: np.ndarray, fold_of: np.ndarray, alpha: float,
                   beta: float) -> np.ndarray:
    """(n, L) standardised region errors e_R / sd_R of a family, one row per subject (subject order)."""
    e2, var_low, var_diag = moments
    n_regions = weights.shape[0]
    scores = np.empty((len(fold_of), n_regions))
    offset = 0
    for k in range(int(fold_of.max()) + 1):   # the moments are joined fold by fold
        rows = np.flatnonzero(fold_of == k)
        size = len(rows) * n_regions
        sign = np.sign(np.asarray(weights @ errors[rows].T).T).ravel()
        z = sign * np.sqrt(e2[offset:offset + size] / (alpha ** 2 * var_low[offset:offset + size]
                                                       + beta ** 2 * var_diag[offset:offset + size]))
        scores[rows] = z.reshape(len(rows), n_regions)
        offset += size
    return scores


def spatial_draws(mean, sd, joint: SpatialCovariance, num: int, *, seed: int = 0, chunk: int = 64,
                independent: bool = False, device: str | torch.device = "cpu"):
    """Yield chunks (s, n, V) of draws of the joint predictive (numpy), ``num`` in all, seeded.

    ``independent=True``: draws with the same marginal variances but independent voxels (the
    comparison for multivariate scores).
    """
    gen = torch.Generator(device=device).manual_seed(int(seed))
    m = torch.as_tensor(np.asarray(mean), dtype=torch.float64, device=device)
    s = torch.as_tensor(np.asarray(sd), dtype=torch.float64, device=device)
    factor = torch.as_tensor(joint.factor, dtype=torch.float64, device=device)
    diag = torch.as_tensor(joint.diag, dtype=torch.float64, device=device)
    marginal = (joint.alpha ** 2 * factor.square().sum(1) + joint.beta ** 2 * diag).sqrt()
    drawn = 0
    while drawn < num:
        k = min(chunk, num - drawn)
        e = torch.randn((k, *m.shape), generator=gen, device=device, dtype=torch.float64)
        if independent:
            z = marginal * e
        else:
            u = torch.randn((k, m.shape[0], joint.rank), generator=gen, device=device, dtype=torch.float64)
            z = joint.alpha * u @ factor.T + joint.beta * diag.sqrt() * e
        yield (m + s * z).cpu().numpy()
        drawn += k
