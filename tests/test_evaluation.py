"""``evaluate_prediction``: metrics.json against closed-form Gaussian cases, and the files a small
evaluation writes (figures, InferenceData, diagnostics).

Closed forms used (y ~ N(m, sigma^2), predictive N(m, s^2)):
    P(y in m +- z_P s) = 2 Phi(z_P s / sigma) - 1
    E CRPS = sqrt(2 (s^2 + sigma^2) / pi) - s / sqrt(pi)      (E|X - y| - E|X - X'| / 2)
    E NLL  = log(s sqrt(2 pi)) + sigma^2 / (2 s^2)
Tolerances: 4 binomial standard errors for coverages, 5 standard errors (from the per-entry
sample sd) for means of per-entry scores, plus 1/M for the M-atom calibrated distribution.
"""
from __future__ import annotations

import json
import math

import matplotlib.image
import numpy as np
import pytest
from scipy import stats

from inva_pyro import InVA

from inva_pyro.criticism import inference
from inva_pyro.predict.calibration import Calibrator
from inva_pyro.data.cohort import Subset
from inva_pyro.criticism.evaluation import CURVE_LEVELS, coverage_curve, evaluate_prediction
from inva_pyro.predict.prediction import Prediction
from inva_pyro.data.spaces import VolumeSpace

CONTRACT_KEYS = {"n_subjects", "n_features", "mse", "mae", "corr", "ssim", "coverage", "interval_width",
                 "crps", "nll", "oracle_mse", "oracle_crps"}
LEVELS = [0.5, 0.8, 0.9, 0.95]
GRID_SPACE = VolumeSpace(shape=(8, 8, 1), affine=np.eye(4), header=None, mask=np.ones((8, 8, 1), bool))


def expected_crps(s, sigma):
    return np.sqrt(2 * (s ** 2 + sigma ** 2) / np.pi) - s / np.sqrt(np.pi)


def gaussian_case(seed=0, n=200, v=64, shrink=0.5):
    """Truth N(m, sigma^2); a raw predictive that is over-confident by ``shrink``; a variance
    calibrator fitted on an independent validation set."""
    rng = np.random.default_rng(seed)
    draw = lambda: (rng.normal(0, 2, (n, v)), rng.uniform(0.5, 1.5, (n, v)))  # noqa: E731
    m, sigma = draw()
    y = m + sigma * rng.standard_normal((n, v))
    m_val, sigma_val = draw()
    y_val = m_val + sigma_val * rng.standard_normal((n, v))
    calibrator = Calibrator.fit(y_val, m_val, shrink * sigma_val, method="variance")
    levels = sorted(set(LEVELS) | set(CURVE_LEVELS))
    s = shrink * sigma
    raw = {lv: (m - stats.norm.ppf((1 + lv) / 2) * s, m + stats.norm.ppf((1 + lv) / 2) * s) for lv in levels}
    pred = Prediction(subjects=[f"s{i}" for i in range(n)], outcome_name="y", levels=levels, mean=m, raw_sd=s,
                      raw_intervals=raw, calibrator=calibrator, observed=y, space=GRID_SPACE)
    subset = Subset(subjects=pred.subjects, inputs={}, outcome=y, truth_mean=m, truth_sd=sigma)
    return pred, subset, sigma


def test_metrics_json_matches_closed_form_gaussian_coverage_and_crps(tmp_path):
    shrink = 0.5
    pred, subset, sigma = gaussian_case(shrink=shrink)
    metrics = evaluate_prediction(pred, subset, tmp_path, levels=LEVELS, inference_data=False)
    assert CONTRACT_KEYS <= set(metrics) and json.loads((tmp_path / "metrics.json").read_text()) == metrics
    n_entries = sigma.size
    tau = pred.calibrator.tau
    assert tau == pytest.approx(1 / shrink, rel=0.02)   # sqrt(mean z^2) over 12800 validation values
    for lv in LEVELS:
        key, z = format(lv, "g"), stats.norm.ppf((1 + lv) / 2)
        raw_expected = 2 * stats.norm.cdf(z * shrink) - 1
        cal_expected = 2 * stats.norm.cdf(z * shrink * tau) - 1     # given the fitted tau
        for got, want in ((metrics["raw"]["coverage"][key], raw_expected), (metrics["coverage"][key], cal_expected)):
            assert abs(got - want) < 4 * math.sqrt(want * (1 - want) / n_entries)
        assert metrics["interval_width"][key] == pytest.approx(2 * z * tau * shrink * sigma.mean(), rel=1e-3)
    # CRPS: raw is the closed-form Gaussian with s = shrink sigma; calibrated the 1000-atom
    # distribution of tau * Phi^-1, i.e. Gaussian with s = tau shrink sigma up to 1/M per unit sd
    for got, s, extra in ((metrics["raw"]["crps"], shrink * sigma, 0.0),
                          (metrics["crps"], tau * shrink * sigma, 1e-3 * sigma.mean()),
                          (metrics["oracle_crps"], sigma, 0.0)):
        want = expected_crps(s, sigma)
        per_entry_sd = np.std(want) + sigma.mean()      # CRPS values spread by about sigma around their means
        assert abs(got - want.mean()) < 5 * per_entry_sd / math.sqrt(n_entries) + extra
    s_cal = tau * shrink * sigma
    nll = np.log(s_cal * math.sqrt(2 * math.pi)) + sigma ** 2 / (2 * s_cal ** 2)
    assert metrics["nll"] == pytest.approx(nll.mean(), abs=5 * 1.0 / math.sqrt(n_entries) * 2)
    # the calibration curve has every level the prediction carries
    curve = coverage_curve(pred, calibrated=False)
    assert len(curve) == len(CURVE_LEVELS) and np.all(np.diff(curve) > 0)
    for name in ("calibration_curve.png", "pit_histogram.png", "coverage_map.png", "sd_vs_error.png",
                 "subject_maps.png"):
        assert matplotlib.image.imread(tmp_path / name).ndim == 3
    assert not (tmp_path / "inference_data.nc").exists()


def test_coverage_curve_falls_back_to_the_levels_a_prediction_has():
    pred, _, _ = gaussian_case(n=20)
    small = Prediction(subjects=pred.subjects, outcome_name="y", levels=LEVELS, mean=pred.mean, raw_sd=pred.raw_sd,
                       raw_intervals={lv: pred.raw_intervals[lv] for lv in LEVELS}, calibrator=pred.calibrator,
                       observed=pred.observed)
    assert len(coverage_curve(small, calibrated=True)) == len(LEVELS)


@pytest.fixture(scope="module")
def fitted(make_preset, make_cohort):
    cohort = make_cohort(40, 16, 12, seed=3)
    model = InVA(make_preset(training={"epochs": 4})).fit(cohort.train, cohort.val, seed=0, progress=False)
    return model, cohort


def test_evaluate_with_the_model_writes_figures_inference_data_and_diagnostics(fitted, tmp_path):
    model, cohort = fitted
    pred = model.predict(cohort.test, num_samples=60, levels=sorted(set(LEVELS) | set(CURVE_LEVELS)),
                         space=GRID_SPACE)
    metrics = evaluate_prediction(pred, cohort.test, tmp_path, history=model.history, levels=LEVELS, model=model,
                                  num_draws=40, n_features=16, psis_subjects=2, psis_particles=100)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert CONTRACT_KEYS <= set(on_disk) and set(on_disk["coverage"]) == {format(lv, "g") for lv in LEVELS}
    diag = on_disk["diagnostics"]
    assert set(diag["collapse"]["active_units"]["count"]) == {"gm", "wm"}
    assert len(diag["psis"]["khat"]) == 2
    assert diag["inference_data"]["file"] == "inference_data.nc" and diag["inference_data"]["n_features"] == 16
    assert diag["loo"]["n_values"] == len(cohort.test) * 16
    assert "figure_errors" not in diag
    for name in ("calibration_curve.png", "pit_histogram.png", "coverage_map.png", "sd_vs_error.png",
                 "subject_maps.png", "training_curves.png", "ppc.png", "ppc_pit.png", "latent_activity.png"):
        image = matplotlib.image.imread(tmp_path / name)
        assert image.shape[0] > 100 and image.shape[1] > 100, name
    idata = inference.load_inference_data(tmp_path / "inference_data.nc")
    assert {"posterior", "posterior_predictive", "observed_data", "log_likelihood"} <= set(idata.groups())
    assert idata.constant_data["grid_index"].shape == (16, 2)
    assert metrics["coverage"] == on_disk["coverage"]


def test_evaluate_without_the_model_writes_a_reduced_inference_data(fitted, tmp_path):
    model, cohort = fitted
    pred = model.predict(cohort.test, num_samples=40, levels=LEVELS)
    evaluate_prediction(pred, cohort.test, tmp_path, levels=LEVELS, num_draws=20, n_features=8)
    idata = inference.load_inference_data(tmp_path / "inference_data.nc")
    assert {"posterior_predictive", "observed_data"} <= set(idata.groups()) and "posterior" not in idata.groups()
    diag = json.loads((tmp_path / "metrics.json").read_text())["diagnostics"]
    assert "collapse" not in diag and "loo" not in diag
    assert (tmp_path / "ppc.png").exists() and (tmp_path / "ppc_pit.png").exists()


# ---- the analysis scripts, in their --quick modes -------------------------------------------------

def _script(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "analysis" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"analysis_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["calibration_study", "ppc", "region_calibration_limits", "semisupervised_limits"])
def test_analysis_scripts_have_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _script(name).main(["--help"])
    assert exit_info.value.code == 0 and "--quick" in capsys.readouterr().out


def test_calibration_study_quick(tmp_path):
    study = _script("calibration_study")
    assert study.main(["--quick", "--out", str(tmp_path)]) == 0
    for name in ("runs.csv", "summary.csv", "summary.md", "calibration_study.png", "across_runs.json", "across_runs.md"):
        assert (tmp_path / name).exists(), name
    summary = (tmp_path / "summary.md").read_text()
    assert "calibrated coverage" in summary and "CRPS / oracle" in summary
    across = json.loads((tmp_path / "across_runs.json").read_text())
    assert across["chains"] == 2 and across["summary"]["mean"]["rhat_median"] > 0
    # a re-run finds every run done and only rebuilds the tables
    assert study.main(["--quick", "--chains", "0", "--out", str(tmp_path)]) == 0
    assert len((tmp_path / "runs.csv").read_text().strip().splitlines()) == 1 + 2


def test_region_calibration_limits_quick(tmp_path):
    limits = _script("region_calibration_limits")
    assert limits.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "limits.json").read_text())
    assert result["pool"] == 60 and set(result["fitted"]) == {"r8", "r50", "all"}
    whole = result["replicates"]["12"]["all"]
    for level, cell in whole.items():   # the spread a 12-subject calibration must have, for a 48-subject test
        p = float(level)
        assert cell["sd_theory_one_region"] == pytest.approx(np.sqrt(p * (1 - p) * (1 / 14 + 1 / 48)))
        assert 0 <= cell["mean"] <= 1 and cell["sd"] >= 0
    assert result["energy"]["n_subjects"] == 60 and result["energy"]["difference_se"] > 0
    assert "whole mask" in (tmp_path / "limits.md").read_text()
    assert matplotlib.image.imread(tmp_path / "limits.png").ndim == 3


def test_region_calibration_limits_with_a_calibration_share(tmp_path):
    """Early stopping on one half of the validation subjects, calibration on the other: the reuse row is
    the same calibration refitted on the early-stopping half."""
    limits = _script("region_calibration_limits")
    assert limits.main(["--quick", "--calibration-share", "0.5", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "limits.json").read_text())
    assert (result["n_early_stopping"], result["n_calibration"]) == (6, 6)
    assert set(result["reuse"]) == {"r8", "r50", "all"}
    assert all(0 <= v <= 1 for family in result["reuse"].values() for v in family.values())
    assert "the early-stopping subjects, reused" in (tmp_path / "limits.md").read_text()


def test_energy_score_oracle_gains_only_from_real_correlation():
    """Draws from the observations' own process against independent draws with the same margins: with
    independent noise the two are one distribution (difference within 4 standard errors of 0); with
    noise shared by every voxel (fully correlated), the joint draws win by far more than 4 standard errors."""
    oracle = _script("energy_score_oracle")
    rng = np.random.default_rng(0)
    n, v = 200, 30
    mean, sd = rng.normal(size=(n, v)), np.full((n, v), 0.5)
    independent = lambda g, s: g.standard_normal((s, v))  # noqa: E731
    shared = lambda g, s: np.repeat(g.standard_normal((s, 1)), v, axis=1)  # noqa: E731
    same = oracle.oracle_energy(mean + 0.5 * rng.standard_normal((n, v)), mean, sd, independent, 100, 0)
    assert abs(same["difference"]) < 4 * same["difference_se"]
    common = oracle.oracle_energy(mean + 0.5 * rng.standard_normal((n, 1)), mean, sd, shared, 100, 0)
    assert common["difference"] < -4 * common["difference_se"] < 0


def test_ppc_report_quick(tmp_path, make_preset):
    from inva_pyro import Cohort
    from inva_pyro.data.simulate import write_cohort

    write_cohort(tmp_path / "cohort", "paper", 30, 0)
    cohort = Cohort.from_dir(tmp_path / "cohort")
    InVA(make_preset(training={"epochs": 3})).fit(cohort.train, cohort.val, seed=0, progress=False,
                                                   run_dir=tmp_path / "run")
    out = tmp_path / "report"
    assert _script("ppc").main(["--run", str(tmp_path / "run"), "--manifest", str(tmp_path / "cohort" / "manifest.csv"),
                                "--out", str(out), "--quick"]) == 0
    report = (out / "ppc_summary.md").read_text()
    assert "Posterior predictive p-values" in report and "Pareto k-hat" in report
    summary = json.loads((out / "ppc_summary.json").read_text())
    assert set(summary["pvalues"]) == {"outcome", "outcome_calibrated"}
    for name in ("ppc.png", "ppc_pit.png", "test_statistics.png", "calibration_curve.png", "latent_activity.png"):
        assert matplotlib.image.imread(out / name).ndim == 3, name
    assert set(inference.load_inference_data(out / "inference_data.nc").groups()) >= {"posterior", "log_likelihood"}
