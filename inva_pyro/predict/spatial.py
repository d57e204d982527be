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
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import sparse

from ..model.covariance import fit_factor

N_QUANTILES = 1000
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

    @property
    def rank(self) -> int:
        return int(self.factor.shape[1])

    def atoms(self, fraction: float | None = None) -> np.ndarray:
        """Quantile function of the standardised error of a region covering ``fraction`` of the mask:
        interpolated in log(fraction) between the families' (Mondrian conformal by region size);
        without ``fraction`` (or families), that of all families together."""
        if fraction is None or self.family_fraction is None:
            return self.z_quantiles
        x = np.log(np.clip(fraction, self.family_fraction[0], self.family_fraction[-1]))
        logs = np.log(self.family_fraction)
        k = int(np.clip(np.searchsorted(logs, x), 1, len(logs) - 1))
        t = 0.0 if logs[k] == logs[k - 1] else (x - logs[k - 1]) / (logs[k] - logs[k - 1])
        return (1 - t) * self.family_quantiles[k - 1] + t * self.family_quantiles[k]

    def z(self, prob: float, fraction: float | None = None) -> float:
        probs = (np.arange(N_QUANTILES) + 0.5) / N_QUANTILES
        return float(np.interp(prob, probs, self.atoms(fraction)))

    def z_regions(self, prob: float, fractions) -> np.ndarray:
        """z(prob) for regions covering ``fractions`` (L,) of the mask."""
        return np.array([self.z(prob, f) for f in np.atleast_1d(fractions)])

    def region_moments(self, mean: np.ndarray, sd: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, L) means and sds of the regions with averaging weights (L, V)."""
        return region_moments(mean, sd, weights, self.factor, self.diag, self.alpha, self.beta)

    def to_dict(self) -> dict:
        """Everything but the arrays F and d (``covariance.safetensors`` keeps those)."""
        out = {"alpha": self.alpha, "beta": self.beta, "rank": self.rank,
               "z_quantiles": self.z_quantiles.tolist(), "info": self.info}
        if self.family_fraction is not None:
            out.update(family_fraction=self.family_fraction.tolist(),
                       family_quantiles=np.round(self.family_quantiles, 6).tolist())
        return out

    @classmethod
    def from_parts(cls, d: dict, factor: np.ndarray, diag: np.ndarray) -> "SpatialCovariance":
        return cls(factor=np.asarray(factor, dtype=np.float64), diag=np.asarray(diag, dtype=np.float64),
                   alpha=float(d["alpha"]), beta=float(d["beta"]),
                   z_quantiles=np.asarray(d["z_quantiles"], dtype=np.float64), info=dict(d.get("info") or {}),
                   family_fraction=np.asarray(d["family_fraction"]) if "family_fraction" in d else None,
                   family_quantiles=np.asarray(d["family_quantiles"]) if "family_quantiles" in d else None)


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


def fit_spatial_covariance(observed: torch.Tensor, mean, sd, *, rank: int | None = None, coords: np.ndarray | None = None,
              folds: int = 2, seed: int = 0, final: str = "folds") -> tuple[torch.Tensor, torch.Tensor, SpatialCovariance]:
    """Fit (F, d) and the joint calibration on validation subjects (module doc).

    ``observed`` (n, V) tensor; ``mean``, ``sd`` (n, V) arrays of the raw predictive, same units.
    Cross-fitting: for each of ``folds`` seeded folds, (F, d) from the other subjects scores the fold's
    region errors; alpha, beta and the region quantiles come from all folds' scores. The returned
    (F, d) (tensors on ``observed``'s device, for the module): ``final="folds"`` (default), the average
    of the folds' covariances (F the folds' factors side by side over sqrt(folds), d their mean), the
    very estimates the calibration scores were standardised with; ``final="all"``, one fit on every
    validation subject, whose region variances differ systematically from the folds' when the factor
    is a PCA of a few dozen subjects (50 regions under-covered by 0.02 to 0.04: docs/uncertainty.md, 8).
    """
    device = observed.device
    y = observed.detach().double()
    m = torch.as_tensor(np.asarray(mean), dtype=torch.float64, device=device)
    s = torch.as_tensor(np.asarray(sd), dtype=torch.float64, device=device)
    residuals = (y - m) / s
    n, n_vox = residuals.shape
    folds = max(2, min(int(folds), n // 2)) if n >= 4 else min(2, n)
    fold_of = np.random.default_rng([seed, 13]).permutation(n) % folds
    e_all, s_all = (y - m).cpu().numpy(), s.cpu().numpy()
    families = region_families(n_vox, coords, seed)
    parts: dict[str, list] = {}
    fold_fits = []
    for k in range(folds):
        rows = np.flatnonzero(fold_of == k)
        train_rows = np.flatnonzero(fold_of != k) if folds > 1 else rows
        factor_t, diag_t = fit_factor(residuals[torch.as_tensor(train_rows, device=device)], rank)
        fold_fits.append((factor_t, diag_t))
        factor, diag = factor_t.cpu().numpy(), diag_t.cpu().numpy()
        e, s_k = e_all[rows], s_all[rows]
        parts.setdefault("voxel", []).append(_voxel_moments(e, s_k, factor, diag))
        for name, weights in families.items():
            err = np.asarray(weights @ e.T).T
            var_low, var_diag = region_variances(s_k, weights, factor, diag)
            parts.setdefault(name, []).append((err.ravel() ** 2, var_low.ravel(), var_diag.ravel()))
    joined = {name: tuple(np.concatenate([p[j] for p in pieces]) for j in range(3)) for name, pieces in parts.items()}
    alpha, beta, ratios = fit_scales(joined)
    probs = (np.arange(N_QUANTILES) + 0.5) / N_QUANTILES
    quantiles, fractions = [], []
    for name in families:
        fractions.append(float(np.mean(families[name].getnnz(axis=1))) / n_vox)
        e2, var_low, var_diag = joined[name]
        sign = np.concatenate([np.sign(np.asarray(families[name] @ e_all[fold_of == k].T).T).ravel()
                               for k in range(folds)])
        z = sign * np.sqrt(e2 / (alpha ** 2 * var_low + beta ** 2 * var_diag))
        quantiles.append(np.quantile(z, probs))
    if final == "folds":
        factor_t = torch.cat([f for f, _ in fold_fits], dim=1) / np.sqrt(len(fold_fits))
        diag_t = torch.stack([d for _, d in fold_fits]).mean(0)
    elif final == "all":
        factor_t, diag_t = fit_factor(residuals, rank)
    else:
        raise ValueError(f"final must be 'all' or 'folds', got {final!r}")
    info = {"n_subjects": int(n), "folds": int(folds), "rank": int(factor_t.shape[1]), "final": final,
            "mean_square_ratio": {k: round(v, 4) for k, v in ratios.items()}}
    order = np.argsort(fractions)
    calibration = SpatialCovariance(factor=factor_t.cpu().numpy(), diag=diag_t.cpu().numpy(), alpha=alpha,
                                   beta=beta, z_quantiles=np.mean(quantiles, axis=0), info=info,
                                   family_fraction=np.asarray(fractions)[order],
                                   family_quantiles=np.asarray(quantiles)[order])
    return factor_t.float(), diag_t.float(), calibration


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
