"""Split-conformal building blocks shared by the voxel calibration (``calibration.py``) and the region
calibration (``spatial.py``): quantile functions per group (site) shrunk towards the pooled one, and the
interval level that holds with a chosen probability for a single fit (docs/calibration.md).

Both calibrations keep a quantile function Q of standardised scores on the grid ``PROBS``; the central
interval of level P is [Q((1 - P) / 2), Q((1 + P) / 2)]. Validation subjects are the exchangeable units:
a subject gives many correlated scores (its voxels, its regions), so every rule here is stated per subject.

**Per-subject coverage.** c_i(P') is the share of subject i's scores inside the pooled interval of level
P'; the coverage of that interval for a new subject is the mean of c over subjects.

**Coverage that holds per fit** (training-conditional conformal, Vovk 2012). For one score per subject the
interval between the j-th smallest and the j-th largest of n exchangeable scores covers a new score with a
probability distributed as Beta(n + 1 - 2j, 2j) over calibration sets; the narrowest j whose probability
of covering at least P is ``confidence`` is exact (``order_statistic_level``). With many correlated scores
per subject, subjects are resampled (``bootstrap_t``): each resample's pooled interval of level P' is
scored on the validation subjects, and the studentised error T = (its coverage - its in-sample coverage)
/ (sd of c_i / sqrt(n)) gives the lower bound P' + t_(1-confidence) sd(c) / sqrt(n) on the coverage of
the interval fitted on the validation subjects; the narrowest P' whose bound reaches P is kept
(``bootstrap_level``). Studentising with the per-subject sd lets the bound follow how much one subject's
errors move together (a subject-level error, a smooth error field), and the bootstrap-t follows the skew
of c_i that a normal bound misses when n is 60 to 100. It assumes exchangeable subjects, as
split-conformal calibration does.

**Groups.** A group g (a site) with n_g validation subjects gets Q_g = w_g Q_own + (1 - w_g) Q_pooled with
w_g = n_g / (n_g + n0), and the pooled function alone below ``min_subjects``. n0 = v / spread^2 is the
normal-normal (James-Stein) weight: v is the within-group variance of the per-subject coverage of the
pooled 80% interval (how noisy one subject's evidence is) and ``spread`` the prior sd of a group's
coverage of that interval around the pooled one (how different sites are).
"""
from __future__ import annotations

import numpy as np
from scipy import stats

from ..config import PredictionConfig

N_QUANTILES = 1000
PROBS = (np.arange(N_QUANTILES) + 0.5) / N_QUANTILES
# Candidate central intervals [Q(PROBS[a]), Q(PROBS[M - 1 - a])], a = 0 .. M/2 - 1: widest first.
CANDIDATE_LEVELS = PROBS[::-1][: N_QUANTILES // 2] - PROBS[: N_QUANTILES // 2]
# Groups: the prior sd of a site's coverage of the pooled 80% interval, and the fewest subjects whose own
# calibration is used at all (``[prediction]`` defaults; docs/calibration.md says why).
GROUP_SPREAD = PredictionConfig.model_fields["group_spread"].default
MIN_GROUP_SUBJECTS = PredictionConfig.model_fields["group_min_subjects"].default
# Coverage that holds per fit: subject resamples, and the tails (1 - confidence) of the studentised error kept.
BOOTSTRAP_DRAWS = 400
TAIL_PROBS = np.array([0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5])
SHRINKAGE_LEVEL = 0.8


def quantile_function(scores: np.ndarray) -> np.ndarray:
    """Q on ``PROBS`` of the finite ``scores``."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    return np.quantile(scores[np.isfinite(scores)], PROBS)


def subject_cdf(scores: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """(n, M) share of each subject's finite scores (rows of ``scores``, (n, L)) at or below every value of
    ``quantiles``; NaN for a subject without scores."""
    scores = np.asarray(scores, dtype=np.float64).reshape(len(scores), -1)
    out = np.full((len(scores), len(quantiles)), np.nan)
    for i, row in enumerate(scores):
        row = np.sort(row[np.isfinite(row)])
        if row.size:
            out[i] = np.searchsorted(row, quantiles, "right") / row.size
    return out


def _candidate_coverage(cdf: np.ndarray) -> np.ndarray:
    """(..., J) coverage of every candidate central interval from CDFs (..., M) at its ends."""
    half = cdf.shape[-1] // 2
    return cdf[..., ::-1][..., :half] - cdf[..., :half]


def subject_coverage(scores: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """(n, J) share of each subject's scores inside every candidate central interval of ``quantiles``."""
    return _candidate_coverage(subject_cdf(scores, quantiles))


def bootstrap_t(cdf: np.ndarray, quantiles: np.ndarray, draws: int = BOOTSTRAP_DRAWS,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(sd of c_i per candidate (J,), quantiles of the studentised error at ``TAIL_PROBS`` (T, J)) from the
    subjects' CDFs ``cdf`` (n, M) at the pooled ``quantiles`` (module doc); subjects resampled ``draws`` times."""
    cdf = cdf[np.isfinite(cdf).all(1)]
    n = len(cdf)
    coverage = _candidate_coverage(cdf)
    spread = coverage.std(0, ddof=1)
    pooled = cdf.mean(0)
    rng = np.random.default_rng([seed, 31])
    errors = np.empty((draws, coverage.shape[1]))
    for b in range(draws):
        weights = rng.multinomial(n, np.full(n, 1.0 / n)) / n
        resampled = np.maximum.accumulate(weights @ cdf)          # the resample's pooled CDF at ``quantiles``
        lo = np.interp(PROBS[: coverage.shape[1]], resampled, quantiles)
        hi = np.interp(PROBS[::-1][: coverage.shape[1]], resampled, quantiles)
        true = np.interp(hi, quantiles, pooled) - np.interp(lo, quantiles, pooled)
        own = _at(cdf, quantiles, hi) - _at(cdf, quantiles, lo)   # (n, J) c_i of the resample's intervals
        mean = weights @ own
        sd = np.sqrt(np.maximum(weights @ (own - mean) ** 2 * n / max(n - 1, 1), 1e-12))
        errors[b] = (true - mean) / (sd / np.sqrt(n))
    return spread, np.quantile(errors, TAIL_PROBS, axis=0)


def _at(cdf: np.ndarray, grid: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Every row of ``cdf`` (n, M), given on ``grid``, linearly interpolated at ``x`` (J,): (n, J)."""
    right = np.clip(np.searchsorted(grid, x), 1, len(grid) - 1)
    width = grid[right] - grid[right - 1]
    t = np.clip(np.divide(x - grid[right - 1], width, out=np.zeros_like(x), where=width > 0), 0.0, 1.0)
    return cdf[:, right - 1] * (1 - t) + cdf[:, right] * t


def _narrowest(candidates: np.ndarray, holds: np.ndarray) -> tuple[float, bool]:
    """The narrowest candidate (widest first) with it and every wider one holding; the widest if none does."""
    if not holds[0]:
        return float(candidates[0]), False
    last = len(holds) if holds.all() else int(np.argmin(holds))
    return float(candidates[last - 1]), True


def order_statistic_level(level: float, confidence: float, n: int) -> tuple[float, bool]:
    """One score per subject: the central level P' of ``np.quantile`` (linear rule) at the order statistics
    [z_(j), z_(n+1-j)], P' = (n + 1 - 2j) / (n - 1), with the largest j such that P(Beta(n + 1 - 2j, 2j)
    >= level) >= confidence; and whether any j does (if none, the range of the scores)."""
    j = np.arange(1, max(n // 2, 1) + 1)
    holds = stats.beta.sf(level, n + 1 - 2 * j, 2 * j) >= confidence
    return _narrowest(np.clip((n + 1 - 2 * j) / max(n - 1, 1), 0.0, 1.0), holds)


def beta_level(level: float, confidence: float, n_units: float) -> tuple[float, bool]:
    """One score per subject, ``n_units`` (not a whole number: a group's shrunk quantile function) worth of
    them: ``order_statistic_level``'s Beta rule at every candidate of ``CANDIDATE_LEVELS``."""
    centre = np.clip(CANDIDATE_LEVELS * (n_units - 1) / (n_units + 1), 1e-9, 1 - 1e-9)
    holds = stats.beta.sf(level, centre * (n_units + 1), (1 - centre) * (n_units + 1)) >= confidence
    return _narrowest(CANDIDATE_LEVELS, holds)


def bootstrap_level(level: float, confidence: float, n_subjects: float, spread: np.ndarray,
                    t_quantiles: np.ndarray) -> tuple[float, bool]:
    """Many scores per subject: the narrowest P' whose bootstrap-t lower bound P' + t sd / sqrt(n) reaches
    ``level``, t the (1 - confidence) quantile of the studentised error (``bootstrap_t``)."""
    tail = np.clip(1.0 - confidence, TAIL_PROBS[0], TAIL_PROBS[-1])
    k = int(np.clip(np.searchsorted(TAIL_PROBS, tail), 1, len(TAIL_PROBS) - 1))
    u = (tail - TAIL_PROBS[k - 1]) / (TAIL_PROBS[k] - TAIL_PROBS[k - 1])
    t = (1 - u) * t_quantiles[k - 1] + u * t_quantiles[k]
    return _narrowest(CANDIDATE_LEVELS, CANDIDATE_LEVELS + t * spread / np.sqrt(n_subjects) >= level)


def shrinkage_weight(n_group: int, prior_subjects: float, min_subjects: int = MIN_GROUP_SUBJECTS) -> float:
    """w_g = n_g / (n_g + n0), 0 below ``min_subjects``."""
    return 0.0 if n_group < min_subjects else float(n_group / (n_group + prior_subjects))


def prior_subjects(coverage_at_level: np.ndarray, groups: np.ndarray, spread: float = GROUP_SPREAD) -> float:
    """n0 = (within-group variance of the per-subject coverage) / spread^2 (module doc)."""
    keep = np.isfinite(coverage_at_level)
    c, g = coverage_at_level[keep], np.asarray(groups)[keep]
    labels, index = np.unique(g, return_inverse=True)
    means = np.bincount(index, weights=c) / np.bincount(index)
    dof = len(c) - len(labels)
    variance = float(np.sum((c - means[index]) ** 2) / dof) if dof > 0 else float(np.var(c))
    return variance / spread ** 2


def effective_subjects(n_group: int, n_all: int, weight: float) -> float:
    """Subjects worth of evidence in w Q_own + (1 - w) Q_pooled, the pooled function also holding the group's
    n_g subjects: 1 / (a^2 / n_g + b^2 / (n - n_g)), a = w + (1 - w) n_g / n, b = (1 - w) (n - n_g) / n."""
    a = weight + (1 - weight) * n_group / n_all
    b = (1 - weight) * (n_all - n_group) / n_all
    return 1.0 / (a * a / n_group + (b * b / (n_all - n_group) if n_all > n_group else 0.0))


def group_quantiles(scores: np.ndarray, groups, pooled: np.ndarray, *, spread: float = GROUP_SPREAD,
                    min_subjects: int = MIN_GROUP_SUBJECTS) -> dict[str, dict]:
    """Per group label: its shrunk quantile function ``quantiles``, ``weight`` w_g, ``subjects`` n_g and
    ``effective_subjects``; from ``scores`` (n, L), one row per subject, and the pooled Q ``pooled``."""
    scores = np.asarray(scores, dtype=np.float64).reshape(len(scores), -1)
    groups = np.asarray([str(g) for g in groups])
    if len(groups) != len(scores):
        raise ValueError(f"groups must give one label per subject ({len(scores)}), got {len(groups)}")
    a80 = int(np.argmin(np.abs(CANDIDATE_LEVELS - SHRINKAGE_LEVEL)))
    coverage = subject_coverage(scores, pooled)[:, a80]
    n0 = prior_subjects(coverage, groups, spread)
    n_all = int(np.isfinite(coverage).sum())
    out = {}
    for label in dict.fromkeys(groups.tolist()):
        rows = groups == label
        n_group = int(np.isfinite(coverage[rows]).sum())
        weight = shrinkage_weight(n_group, n0, min_subjects)
        own = quantile_function(scores[rows]) if weight > 0 else pooled
        out[label] = {"quantiles": weight * own + (1 - weight) * pooled, "weight": weight, "subjects": n_group,
                      "effective_subjects": effective_subjects(n_group, n_all, weight) if weight > 0 else float(n_all),
                      "prior_subjects": n0}
    return out


def family_calibration(scores: list[np.ndarray], fractions: np.ndarray, groups=None, *, spread: float = GROUP_SPREAD,
                       min_subjects: int = MIN_GROUP_SUBJECTS) -> dict:
    """The region calibration's tables (``spatial.SpatialCovariance`` fields) from each family's scores (n, L_k),
    one row per subject, and its regions' mean share of the mask: the quantile functions sorted by region size,
    their mean, the bootstrap-t tables (NaN for one region per subject), and per group the shrunk functions."""
    quantiles = np.stack([quantile_function(z) for z in scores])
    order = np.argsort(fractions)
    scores, quantiles = [scores[k] for k in order], quantiles[order]
    empty = (np.full(N_QUANTILES // 2, np.nan), np.full((len(TAIL_PROBS), N_QUANTILES // 2), np.nan))
    tables = [bootstrap_t(subject_cdf(z, q), q) if z.shape[1] > 1 and len(z) > 1 else empty
              for z, q in zip(scores, quantiles)]
    out = {"z_quantiles": np.mean(quantiles[np.argsort(order)], axis=0),
           "family_fraction": np.asarray(fractions)[order], "family_quantiles": quantiles,
           "family_scores": np.array([z.shape[1] for z in scores]),
           "family_coverage_sd": np.stack([t[0] for t in tables]),
           "family_t_quantiles": np.stack([t[1] for t in tables]),
           "group_info": {}, "group_family_quantiles": {}}
    if groups is None:
        return out
    per_family = [group_quantiles(z, groups, q, spread=spread, min_subjects=min_subjects)
                  for z, q in zip(scores, quantiles)]
    for label in per_family[0]:
        rows = [table[label] for table in per_family]
        out["group_info"][label] = {"subjects": rows[0]["subjects"],
                                    **{key: [round(float(g[key]), 6) for g in rows]
                                       for key in ("weight", "effective_subjects", "prior_subjects")}}
        if rows[0]["weight"] > 0:
            out["group_family_quantiles"][label] = np.stack([g["quantiles"] for g in rows])
    return out
