"""``inva evaluate --by COLUMN``: metrics per group of a manifest column, against hand computations on a
small prediction and end to end on a tiny simulated cohort (metrics.json, the figure, the table, errors)."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from conftest import tiny_toml
from inva_pyro import cli
from inva_pyro.criticism.evaluation import evaluate_prediction
from inva_pyro.criticism.groups import EMPTY, metrics_by_group
from inva_pyro.predict.prediction import Prediction
from test_evaluation import LEVELS, gaussian_case


def weighted(groups: dict, key, level=None) -> float:
    """The subject-weighted average of a per-group figure."""
    n = np.array([g["n_subjects"] for g in groups.values()], float)
    values = np.array([g[key][level] if level else g[key] for g in groups.values()], float)
    return float(n @ values / n.sum())


# ----------------------------------------------------------------------------- the computation


def test_group_metrics_of_a_hand_made_prediction():
    """Group a misses by 1 everywhere, group b by 3; intervals mean +- 2 (uncalibrated, sd 1); the truth is
    half-way between, so the oracle MSE is 0.25 in a and 2.25 in b."""
    n_a, n_b, v = 2, 3, 4
    mean = np.zeros((n_a + n_b, v))
    miss = np.repeat([1.0] * n_a + [3.0] * n_b, v).reshape(-1, v)
    observed = mean + miss
    sd = np.ones_like(mean)
    raw = {0.5: (mean - 0.5, mean + 0.5), 0.9: (mean - 2.0, mean + 2.0)}
    pred = Prediction(subjects=[f"s{i}" for i in range(n_a + n_b)], outcome_name="y", levels=[0.5, 0.9],
                      mean=mean, raw_sd=sd, raw_intervals=raw, calibrator=None, observed=observed)
    groups = metrics_by_group(pred, ["a", "a", "b", "b", "b"], [0.5, 0.9], truth_mean=observed - miss / 2)
    assert list(groups) == ["a", "b"]
    a, b = groups["a"], groups["b"]
    assert (a["n_subjects"], b["n_subjects"]) == (2, 3)
    assert (a["mse"], b["mse"]) == (1.0, 9.0)
    assert (a["oracle_mse"], b["oracle_mse"]) == (0.25, 2.25)
    assert a["excess_error"] == pytest.approx(3.0) and b["excess_error"] == pytest.approx(3.0)
    assert a["coverage"] == {"0.5": 0.0, "0.9": 1.0} and b["coverage"] == {"0.5": 0.0, "0.9": 0.0}
    assert a["interval_width"] == {"0.5": 1.0, "0.9": 4.0} == b["interval_width"]
    crps = lambda w: w * (2 * stats.norm.cdf(w) - 1) + 2 * stats.norm.pdf(w) - 1 / np.sqrt(np.pi)  # noqa: E731
    assert a["crps"] == pytest.approx(crps(1.0)) and b["crps"] == pytest.approx(crps(3.0))
    pooled = pred.metrics(calibrated=True)
    for key in ("mse", "crps"):
        assert weighted(groups, key) == pytest.approx(pooled[key], rel=1e-12)


def test_group_order_numbers_and_empty_cells_and_no_truth():
    pred, _, _ = gaussian_case(n=12)
    values = ["10", "2", EMPTY, "2", "10", "10", "2", "2", "2", EMPTY, "10", "2"]
    groups = metrics_by_group(pred, values, LEVELS)
    assert list(groups) == ["2", "10", EMPTY]
    assert [g["n_subjects"] for g in groups.values()] == [6, 4, 2]
    assert "excess_error" not in groups["2"] and "oracle_mse" not in groups["2"]
    with pytest.raises(ValueError, match="group values"):
        metrics_by_group(pred, values[:-1], LEVELS)


def test_calibrated_pooled_metrics_are_the_weighted_average_of_the_groups(tmp_path):
    pred, subset, _ = gaussian_case(n=90)
    sites = ["north"] * 40 + ["south"] * 35 + ["east"] * 15
    metrics = evaluate_prediction(pred, subset, tmp_path, levels=LEVELS, inference_data=False, by=("site", sites))
    assert json.loads((tmp_path / "metrics.json").read_text())["by"] == metrics["by"]
    by = metrics["by"]
    assert by["column"] == "site" and {k: g["n_subjects"] for k, g in by["groups"].items()} == \
        {"east": 15, "north": 40, "south": 35}
    for key in metrics["coverage"]:
        assert weighted(by["groups"], "coverage", key) == pytest.approx(metrics["coverage"][key], abs=1e-12)
        assert weighted(by["groups"], "interval_width", key) == pytest.approx(metrics["interval_width"][key], rel=1e-12)
    assert weighted(by["groups"], "crps") == pytest.approx(metrics["crps"], rel=1e-12)
    assert weighted(by["groups"], "mse") == pytest.approx(metrics["mse"], rel=1e-12)
    assert (tmp_path / "coverage_by_group.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny simulated cohort whose manifest has a text column `site` (three groups among the test
    subjects, one of them empty cells) and a numeric column `age_band`; a run fitted on it."""
    from conftest import simulated_manifest
    root = tmp_path_factory.mktemp("by")
    manifest, table = simulated_manifest(root / "cohort", n_subjects=30, seed=3)
    test_rows = np.flatnonzero(table["split"] == "test")
    assert len(test_rows) >= 4
    table["site"] = ""
    table.loc[test_rows, "site"] = ["A", "B", ""] * (len(test_rows) // 3) + ["A", "B"][: len(test_rows) % 3]
    table.loc[table["split"] != "test", "site"] = "A"
    table["age_band"] = [str(60 + 10 * (i % 2)) for i in range(len(table))]
    table["notes"] = ""
    table.to_csv(manifest, index=False)
    preset = root / "tiny.toml"
    preset.write_text(tiny_toml(training={"epochs": 2, "batch_size": 8}, prediction={"num_samples": 20}))
    run = root / "run"
    assert cli.main(["fit", "--manifest", str(manifest), "--inputs", "x1,x2,x3", "--outcome", "y", "--model",
                     str(preset), "--device", "cpu", "--seed", "0", "--out", str(run)]) == 0
    return manifest, table.iloc[test_rows], run


def evaluate(fitted, out, *extra):
    manifest, _, run = fitted
    return cli.main(["evaluate", "--run", str(run), "--manifest", str(manifest), "--out", str(out),
                     "--psis-subjects", "0", *extra])


def test_evaluate_by_writes_groups_figure_and_table(fitted, tmp_path, capsys):
    manifest, test, run = fitted
    out, pred_dir = tmp_path / "eval", tmp_path / "pred"
    capsys.readouterr()
    assert evaluate(fitted, out, "--by", "site") == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    by = metrics["by"]
    expected = test["site"].replace("", EMPTY).value_counts().to_dict()
    assert by["column"] == "site" and list(by["groups"]) == ["A", "B", EMPTY]
    assert {k: g["n_subjects"] for k, g in by["groups"].items()} == expected
    for key in metrics["coverage"]:
        assert weighted(by["groups"], "coverage", key) == pytest.approx(metrics["coverage"][key], abs=1e-12)
    assert weighted(by["groups"], "crps") == pytest.approx(metrics["crps"], rel=1e-9)
    for group in by["groups"].values():
        assert group["oracle_mse"] > 0 and group["excess_error"] == pytest.approx(
            (group["mse"] - group["oracle_mse"]) / group["oracle_mse"])
    assert (out / "coverage_by_group.png").stat().st_size > 1000
    assert "by site" in printed and all(f"{k} " in printed for k in by["groups"])
    assert "coverage 0.9" in printed.split("by site")[1]

    # the MSE of each group, by hand from the written prediction maps (same seed: the same predictive mean)
    assert cli.main(["predict", "--run", str(run), "--manifest", str(manifest), "--out", str(pred_dir)]) == 0
    image = lambda path: np.asarray(nib.load(path).dataobj, dtype=np.float64)  # noqa: E731
    errors = {s: np.mean((image(manifest.parent / y) - image(pred_dir / f"{s}_y_mean.nii.gz")) ** 2)
              for s, y in zip(test["subject"], test["y"])}
    for value, group in by["groups"].items():
        members = test.loc[test["site"].replace("", EMPTY) == value, "subject"]
        assert group["mse"] == pytest.approx(np.mean([errors[s] for s in members]), rel=1e-4)


def test_evaluate_by_a_numeric_column(fitted, tmp_path):
    _, test, _ = fitted
    assert evaluate(fitted, tmp_path / "eval", "--by", "age_band") == 0
    groups = json.loads((tmp_path / "eval" / "metrics.json").read_text())["by"]["groups"]
    assert groups.keys() == set(test["age_band"]) and sum(g["n_subjects"] for g in groups.values()) == len(test)


def test_evaluate_without_by_writes_no_groups(fitted, tmp_path):
    assert evaluate(fitted, tmp_path / "eval") == 0
    assert "by" not in json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert not (tmp_path / "eval" / "coverage_by_group.png").exists()


@pytest.mark.parametrize("column, message", [("scanner", "no such column (columns: subject"),
                                              ("x2", "an image column"), ("y_true_mean", "an image column"),
                                              ("notes", "empty for every one of the")])
def test_evaluate_by_bad_column_is_one_line_exit_2_nothing_written(fitted, tmp_path, capsys, column, message):
    manifest = fitted[0]
    capsys.readouterr()
    assert evaluate(fitted, tmp_path / "eval", "--by", column) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"inva: error: {manifest}: --by {column}") and message in err and "\n" not in err
    assert not (tmp_path / "eval").exists() and list(tmp_path.iterdir()) == []
