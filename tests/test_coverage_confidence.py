"""``[prediction] coverage_confidence``: intervals whose coverage is at least nominal with a chosen probability
over the draw of the validation subjects (predict/conformal.py): the exact order-statistic rule for one score
per subject, the subject-level bootstrap-t rule for many correlated scores per subject, the region
calibration's families, serialisation and settings."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats

from inva_pyro.config import PredictionConfig
from inva_pyro.predict.calibration import Calibrator, calibration_options
from inva_pyro.predict.conformal import CANDIDATE_LEVELS, order_statistic_level
from inva_pyro.predict.spatial import SpatialCovariance, fit_spatial_covariance

LEVELS = [0.5, 0.8, 0.9, 0.95]
CONFIDENCE = 0.9


def _normal_coverage(calibrator, level: float) -> float:
    """True coverage of the fitted standardised interval when the scores are N(0, 1)."""
    lo, hi = calibrator.interval_z(level)
    return float(stats.norm.cdf(hi) - stats.norm.cdf(lo))


@pytest.mark.parametrize("n", [20, 60, 100])
def test_order_statistic_rule_is_the_largest_j_that_holds(n):
    """[z_(j), z_(n+1-j)] covers Beta(n + 1 - 2j, 2j): the rule takes the largest j (narrowest interval) whose
    probability of covering at least the level is the confidence, and says when even the range does not."""
    for level in LEVELS:
        p, ok = order_statistic_level(level, CONFIDENCE, n)
        holds = [j for j in range(1, n // 2 + 1) if stats.beta.sf(level, n + 1 - 2 * j, 2 * j) >= CONFIDENCE]
        assert ok == bool(holds)
        j = max(holds) if holds else 1
        assert p == pytest.approx((n + 1 - 2 * j) / (n - 1))
        # np.quantile's linear rule puts the j-th order statistic at (j - 1) / (n - 1)
        scores = np.sort(np.random.default_rng(n).standard_normal(n))
        assert np.quantile(scores, (1 - p) / 2) == pytest.approx(scores[j - 1])
    assert order_statistic_level(0.95, CONFIDENCE, 60)[1] is False     # 60 scores cannot hold 95% at 0.9
    assert order_statistic_level(0.95, CONFIDENCE, 100)[1] is True


def test_one_score_per_subject_holds_with_the_exact_probability():
    """2,000 calibration sets of 60 N(0, 1) scores (one per subject, the whole-mask case): the share of sets
    whose interval covers at least the level is the Beta probability of the chosen order statistics, within
    4 binomial sds over the 2,000 sets; without the confidence, fewer than half do (an average-coverage
    interval from 60 scores is below nominal more often than not)."""
    rng = np.random.default_rng(0)
    n, sets = 60, 2000
    held = {lv: 0 for lv in LEVELS}
    plain = {lv: 0 for lv in LEVELS}
    for _ in range(sets):
        z = rng.standard_normal(n)
        calibrator = Calibrator.fit(z, np.zeros(n), np.ones(n), confidence=CONFIDENCE)
        for lv in LEVELS:
            held[lv] += _normal_coverage(calibrator, lv) >= lv
            plain[lv] += _normal_coverage(calibrator.with_confidence(None), lv) >= lv
    for lv in LEVELS:
        p, _ = order_statistic_level(lv, CONFIDENCE, n)
        j = round((n + 1 - p * (n - 1)) / 2)
        exact = stats.beta.sf(lv, n + 1 - 2 * j, 2 * j)
        assert abs(held[lv] / sets - exact) < 4 * np.sqrt(exact * (1 - exact) / sets), (lv, held[lv] / sets, exact)
        if lv < 0.95:                                            # (95% cannot hold with 60 scores: the range)
            assert exact >= CONFIDENCE
        assert plain[lv] / sets < 0.5


def test_voxels_hold_per_fit_with_subjects_as_the_units():
    """150 calibration sets of 60 subjects x 40 voxels whose errors share a subject-level part (half the
    variance): the share of sets covering at least the level is the confidence 0.9 within 4 binomial sds over
    150 sets. Treating voxels as exchangeable units (2,400 one-score 'subjects') is over-confident, and
    intervals right on average hold about half of the time (both fail that bound: the test can fail)."""
    rng = np.random.default_rng(1)
    n, n_vox, shared, sets = 60, 40, 0.5, 150
    counts = {name: {lv: 0 for lv in LEVELS} for name in ("subjects", "voxels", "plain")}
    widths = {name: [] for name in ("subjects", "plain")}
    for _ in range(sets):
        z = np.sqrt(shared) * rng.standard_normal((n, 1)) + np.sqrt(1 - shared) * rng.standard_normal((n, n_vox))
        by_subject = Calibrator.fit(z, np.zeros_like(z), np.ones_like(z), confidence=CONFIDENCE)
        flat = z.reshape(-1)
        by_voxel = Calibrator.fit(flat, np.zeros_like(flat), np.ones_like(flat), confidence=CONFIDENCE)
        for name, calibrator in (("subjects", by_subject), ("voxels", by_voxel),
                                 ("plain", by_subject.with_confidence(None))):
            for lv in LEVELS:
                counts[name][lv] += _normal_coverage(calibrator, lv) >= lv
        for name, calibrator in (("subjects", by_subject), ("plain", by_subject.with_confidence(None))):
            widths[name].append(np.subtract(*calibrator.interval_z(0.9)[::-1]))
    bound = 4 * np.sqrt(CONFIDENCE * (1 - CONFIDENCE) / sets)
    for lv in LEVELS:
        assert abs(counts["subjects"][lv] / sets - CONFIDENCE) < bound, (lv, counts["subjects"][lv] / sets)
        assert counts["voxels"][lv] / sets < CONFIDENCE - bound
        assert counts["plain"][lv] / sets < 0.7
    # what it costs: a wider interval, by less than a tenth here
    assert 1.0 < np.mean(widths["subjects"]) / np.mean(widths["plain"]) < 1.1


def _region_data(n: int, seed: int):
    rng = np.random.default_rng(seed)
    sd = np.exp(0.2 * rng.standard_normal((n, 64)))
    errors = sd * (0.4 * rng.standard_normal((n, 1)) + rng.standard_normal((n, 64)))
    return sd, errors


def test_region_calibration_families_and_whole_mask():
    """Per family: the whole mask (one score per subject) by order statistics, families of several regions by
    the bootstrap-t rule; every interval at least as wide as without; without the confidence, unchanged."""
    coords = np.argwhere(np.ones((8, 8))).astype(float)
    sd, errors = _region_data(80, seed=2)
    _, _, plain = fit_spatial_covariance(torch.as_tensor(errors), np.zeros_like(errors), sd, coords=coords, seed=0)
    _, _, held = fit_spatial_covariance(torch.as_tensor(errors), np.zeros_like(errors), sd, coords=coords, seed=0,
                                        confidence=CONFIDENCE)
    assert held.family_scores[-1] == 1 and held.family_fraction[-1] == 1.0
    fractions = [1 / 32, 1 / 8, 0.3, 1.0]
    for lv in LEVELS:
        assert held.central_level(lv, len(held.family_scores) - 1) == order_statistic_level(lv, CONFIDENCE, 80)[0]
        assert all(held.central_level(lv, k) > lv for k in range(len(held.family_scores) - 1))
        lo, hi = held.interval_z(lv, fractions)
        lo0, hi0 = plain.interval_z(lv, fractions)
        assert np.all(lo <= lo0) and np.all(hi >= hi0) and np.any(hi - lo > hi0 - lo0)
        for a, b in zip(held.with_confidence(None).interval_z(lv, fractions), (lo0, hi0)):
            np.testing.assert_array_equal(a, b)
    back = SpatialCovariance.from_parts(json.loads(json.dumps(held.to_dict())), held.factor, held.diag)
    assert back.coverage_confidence == CONFIDENCE
    np.testing.assert_allclose(back.interval_z(0.9, fractions)[1], held.interval_z(0.9, fractions)[1], atol=1e-4)
    new_keys = ("family_scores", "family_coverage", "family_t", "n_subjects", "group", "coverage")
    old = {k: v for k, v in plain.to_dict().items() if not k.startswith(new_keys)}
    loaded = SpatialCovariance.from_parts(old, plain.factor, plain.diag)
    np.testing.assert_allclose(loaded.interval_z(0.9, fractions)[1], plain.interval_z(0.9, fractions)[1], atol=1e-5)
    with pytest.raises(ValueError, match="refit"):
        loaded.with_confidence(CONFIDENCE)


def test_a_group_is_held_on_its_own_evidence():
    """With groups, a site's interval holds on the subjects its shrunk quantiles rest on: a site of 20 of 200
    subjects (weight near 1) gets a wider margin than the pooled calibration at the same level."""
    rng = np.random.default_rng(3)
    z = rng.standard_normal((200, 30)) + 0.5 * rng.standard_normal((200, 1))
    groups = ["small"] * 20 + ["large"] * 180
    calibrator = Calibrator.fit(z, np.zeros_like(z), np.ones_like(z), "quantile", groups, confidence=CONFIDENCE)
    info = calibrator.group_info["small"]
    assert info["weight"] > 0.5 and info["effective_subjects"] < 60
    for lv in LEVELS:
        assert calibrator.central_level(lv, "small") > calibrator.central_level(lv) > lv
        assert calibrator.central_level(lv, "never seen") == calibrator.central_level(lv)


def test_settings_and_round_trip():
    assert PredictionConfig().coverage_confidence is None
    assert calibration_options(PredictionConfig(coverage_confidence=0.9)) == {
        "confidence": 0.9, "group_spread": 0.04, "group_min_subjects": 5}
    for bad in (0.3, 1.0):
        with pytest.raises(ValueError):
            PredictionConfig(coverage_confidence=bad)
    z = np.random.default_rng(4).standard_normal((30, 20))
    calibrator = Calibrator.fit(z, np.zeros_like(z), np.ones_like(z), confidence=0.8)
    back = Calibrator.from_dict(json.loads(json.dumps(calibrator.to_dict())))
    for lv in LEVELS:
        assert back.central_level(lv) == pytest.approx(calibrator.central_level(lv), abs=0.0021)   # one candidate
    assert back.coverage_confidence == 0.8 and calibrator.central_level(0.9) > 0.9
    with pytest.raises(ValueError, match="between 0.5 and 0.99"):
        calibrator.with_confidence(1.5)
    assert np.all(np.diff(CANDIDATE_LEVELS) < 0)                    # candidates widest first


def test_the_study_script_runs_quick(tmp_path):
    """analysis/coverage_confidence.py --quick: one tiny fit, 3 draws per size, the JSON and the table."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "analysis" / "coverage_confidence.py"
    spec = importlib.util.spec_from_file_location("analysis_coverage_confidence", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "coverage_confidence.json").read_text())
    assert result["exact_region_coverage"] and set(result["summary"]) == {"12", "20"}
    for family in ("voxels", "r8", "all"):
        for cell in result["summary"]["20"][family].values():
            assert 0 <= cell["without"]["coverage_mean"] <= 1 and cell["width_ratio"] >= 1.0
    assert "whole mask" in (tmp_path / "coverage_confidence.md").read_text()
