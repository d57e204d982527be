"""Split-conformal building blocks shared by the voxel calibration (``calibration.py``) and the region
calibration (``spatial.py``): quantile functions per group (site) shrunk towards the pooled one, and the
interval level that holds with a chosen probability for a single fit (docs/calibration.md).

Both calibrations keep a quantile function Q of standardised scores on the grid ``PROBS``; the central
interval of level P is [Q((1 - P) / 2), Q((1 + P) / 2)]. Validation subjects are the exchangeable units:
a subject gives many correlated scores (its voxels, its regions), so every rule here is stated per subject.

**Per-subject coverage.** c_i(P') is the share of subject i's scores inside the pooled interval of level
P'. Its across-subject variance, relative to that of a single Bernoulli score P'(1 - P'), is the design
effect d(P') (1 for one score per subject, about 1 / L for L independent scores).

**Coverage that holds per fit** (training-conditional conformal, Vovk 2012). For one score per subject the
interval between the j-th smallest and the j-th largest of n exchangeable scores covers a new score with a
probability distributed as Beta(n + 1 - 2j, 2j) over calibration sets; the narrowest j whose probability
of covering at least P is ``confidence`` is exact. With many scores per subject the same Beta rule is used
with n / d(P') subjects in place of n (a mean of n subjects' coverages has variance d P'(1 - P') / n): the
centre of the coverage distribution is the in-sample level, its spread that of n / d independent scores.

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
SHRINKAGE_LEVEL = 0.8


def quantile_function(scores: np.ndarray) -> np.ndarray:
    """Q on ``PROBS`` of the finite ``scores``."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    return np.quantile(scores[np.isfinite(scores)], PROBS)


def subject_coverage(scores: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """(n, J) share of each subject's finite scores (rows of ``scores``, (n, L)) inside every candidate
    central interval of ``quantiles``; NaN for a subject without scores."""
    scores = np.asarray(scores, dtype=np.float64).reshape(len(scores), -1)
    half = N_QUANTILES // 2
    out = np.full((len(scores), half), np.nan)
    for i, row in enumerate(scores):
        row = np.sort(row[np.isfinite(row)])
        if row.size:
            inside = np.searchsorted(row, quantiles[::-1][:half], "right") - np.searchsorted(row, quantiles[:half], "left")
            out[i] = inside / row.size
    return out


def design_effect(coverage: np.ndarray, scores_per_subject: float) -> np.ndarray:
    """(J,) across-subject variance of the per-subject coverage over P'(1 - P') at each candidate, between
    1 / L (independent scores) and 1 (one score per subject, or scores that move together)."""
    coverage = coverage[np.isfinite(coverage).all(1)]
    if scores_per_subject <= 1 or len(coverage) < 2:
        return np.ones(coverage.shape[1])
    p = coverage.mean(0)
    ratio = coverage.var(0, ddof=1) / np.maximum(p * (1 - p), 1e-12)
    return np.clip(ratio, 1.0 / scores_per_subject, 1.0)


def confident_level(level: float, confidence: float, n_subjects: float, n_scores: float,
                    design: np.ndarray | None = None) -> tuple[float, bool]:
    """The narrowest central level P' of the empirical quantile function (of ``n_scores`` scores from
    ``n_subjects`` subjects) whose interval covers at least ``level`` with probability ``confidence`` over
    calibration sets, and whether any does (if none, the widest interval the scores allow).

    Without ``design`` the scores are one per subject and the candidates are the order statistics:
    [z_(j), z_(n+1-j)], at P' = (n + 1 - 2j) / (n - 1) of ``np.quantile``'s linear rule, covers
    Beta(n + 1 - 2j, 2j), exactly. With ``design`` (J,) on ``CANDIDATE_LEVELS`` the coverage of a candidate
    is taken as Beta with mean its expected in-sample coverage and n_subjects / d(P') units (module doc)."""
    if design is None:
        n = int(round(n_subjects))
        j = np.arange(1, max(n // 2, 1) + 1)
        candidates = np.clip((n + 1 - 2 * j) / max(n - 1, 1), 0.0, 1.0)
        units, centre = float(n), (n + 1 - 2 * j) / (n + 1)
    else:
        candidates, units = CANDIDATE_LEVELS, n_subjects / np.asarray(design)
        centre = candidates * (n_scores - 1) / (n_scores + 1)   # np.quantile's interval between order statistics
    centre = np.clip(centre, 1e-9, 1 - 1e-9)
    holds = stats.beta.sf(level, centre * (units + 1), (1 - centre) * (units + 1)) >= confidence
    if not holds[0]:
        return float(candidates[0]), False
    # the narrowest candidate with every wider one holding too (noise in d cannot open a gap)
    last = len(holds) if holds.all() else int(np.argmin(holds))
    return float(candidates[last - 1]), True


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
