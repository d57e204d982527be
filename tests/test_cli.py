"""End-to-end command line: simulate -> fit -> predict -> evaluate, errors and resume."""
import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import tiny_toml
from inva_pyro import cli
from inva_pyro.criticism.metrics import level_key



@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "cohort"
    assert cli.main(["simulate", "--design", "paper", "--n-subjects", "30", "--seed", "3", "--out", str(out)]) == 0
    return out


def tiny_preset(tmp_path, epochs=3):
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_toml(training={"epochs": epochs, "batch_size": 8}, prediction={"num_samples": 20}))
    return path


def fit_args(cohort_dir, preset, out):
    return ["fit", "--manifest", str(cohort_dir / "manifest.csv"), "--inputs", "x1,x2,x3", "--outcome", "y",
            "--model", str(preset), "--device", "cpu", "--seed", "0", "--out", str(out)]


def test_simulate_writes_cohort_with_truth(cohort_dir):
    spec = json.loads((cohort_dir / "cohort.json").read_text())
    assert spec["inputs"] == ["x1", "x2", "x3"] and spec["outcome"] == "y" and spec["mask"] is None
    manifest = pd.read_csv(cohort_dir / "manifest.csv")
    assert len(manifest) == 30 and set(manifest["split"]) == {"train", "val", "test"}
    img = nib.load(cohort_dir / manifest.loc[0, "y_true_sd"])
    assert img.shape == (32, 32, 1) and np.all(np.asarray(img.dataobj) > 0)


def test_fit_predict_evaluate_round_trip(cohort_dir, tmp_path, capsys):
    run, pred_dir, eval_dir = tmp_path / "run", tmp_path / "pred", tmp_path / "eval"
    assert cli.main(fit_args(cohort_dir, tiny_preset(tmp_path), run)) == 0
    assert {"run.json", "config.json", "weights.safetensors", "calibration.json"} <= {p.name for p in run.iterdir()}

    manifest = cohort_dir / "manifest.csv"
    assert cli.main(["predict", "--run", str(run), "--manifest", str(manifest), "--out", str(pred_dir),
                     "--levels", "0.5,0.9"]) == 0
    listing = pd.read_csv(pred_dir / "predictions.csv")
    test_subjects = pd.read_csv(manifest).query("split == 'test'")["subject"].tolist()
    assert sorted(set(listing["subject"])) == sorted(test_subjects)
    assert set(listing["map"]) == {"mean", "sd", "lo50", "hi50", "lo90", "hi90"}
    reference = nib.load(cohort_dir / pd.read_csv(manifest).loc[0, "x1"])
    for name in listing["path"]:
        img = nib.load(pred_dir / name)
        assert img.shape == reference.shape
        np.testing.assert_allclose(img.affine, reference.affine)
    subject = test_subjects[0]
    lo = np.asarray(nib.load(pred_dir / f"{subject}_y_lo90.nii.gz").dataobj)
    hi = np.asarray(nib.load(pred_dir / f"{subject}_y_hi90.nii.gz").dataobj)
    assert np.all(hi > lo)

    assert cli.main(["evaluate", "--run", str(run), "--manifest", str(manifest), "--out", str(eval_dir)]) == 0
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    contract = {"n_subjects", "n_features", "mse", "mae", "corr", "ssim", "coverage", "interval_width",
                "crps", "nll", "oracle_mse", "oracle_crps"}
    assert contract <= set(metrics)
    assert metrics["n_subjects"] == len(test_subjects) and metrics["n_features"] == 1024
    assert set(metrics["coverage"]) == {level_key(x) for x in (0.5, 0.8, 0.9, 0.95)}
    assert metrics["oracle_mse"] > 0 and metrics["oracle_crps"] > 0
    for png in ("calibration_curve.png", "pit_histogram.png", "subject_maps.png", "sd_vs_error.png"):
        assert (eval_dir / png).stat().st_size > 1000
    assert metrics["diagnostics"]["psis"]["num_particles"] == 1000
    # the guide's k-hats are the slow part on whole-brain images: fewer subjects and particles, or none
    for extra, expected in ((["--psis-subjects", "3", "--psis-particles", "50"], (3, 50)), (["--psis-subjects", "0"], None)):
        assert cli.main(["evaluate", "--run", str(run), "--manifest", str(manifest), "--out",
                         str(tmp_path / "eval_psis"), *extra]) == 0
        psis = json.loads((tmp_path / "eval_psis" / "metrics.json").read_text())["diagnostics"].get("psis")
        assert (psis and (len(psis["khat"]), psis["num_particles"])) == (expected or None)
        shutil.rmtree(tmp_path / "eval_psis")


def test_bad_input_exits_2_with_one_line_and_no_output(cohort_dir, tmp_path, capsys):
    run = tmp_path / "run"
    args = fit_args(cohort_dir, tiny_preset(tmp_path), run)
    args[args.index("x1,x2,x3")] = "x1,nope"
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("inva: error: ") and "nope" in err and "\n" not in err
    assert not run.exists()

    assert cli.main(["predict", "--run", str(tmp_path / "missing"), "--manifest", str(cohort_dir / "manifest.csv"),
                     "--out", str(tmp_path / "p")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "run.json").write_text('{"format": "something-else"}')
    assert cli.main(["predict", "--run", str(foreign), "--manifest", str(cohort_dir / "manifest.csv"),
                     "--out", str(tmp_path / "p")]) == 2
    assert "not an inva run folder" in capsys.readouterr().err


def test_fit_refuses_non_empty_out_without_overwrite(cohort_dir, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(fit_args(cohort_dir, tiny_preset(tmp_path), out)) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").exists()


def test_resume_continues_an_interrupted_fit(cohort_dir, tmp_path, monkeypatch):
    import inva_pyro.estimator as estimator

    run = tmp_path / "run"
    real_train = estimator.train

    def interrupted(*args, **kwargs):
        def stop(state):
            if state.epoch == 2:
                raise KeyboardInterrupt
        return real_train(*args, **{**kwargs, "on_epoch_end": stop})

    monkeypatch.setattr(estimator, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main(fit_args(cohort_dir, tiny_preset(tmp_path, epochs=4), run))
    assert not json.loads((run / "run.json").read_text())["complete"]
    monkeypatch.setattr(estimator, "train", real_train)

    assert cli.main(["fit", "--resume", str(run)]) == 0
    history = json.loads((run / "history.json").read_text())
    assert history["epoch"] == [1, 2, 3, 4]
    assert json.loads((run / "run.json").read_text())["complete"]


def test_lazy_fit_from_disk_matches_in_memory_fit(cohort_dir, tmp_path):
    # Reading minibatches from disk changes where the numbers come from, not the numbers.
    runs = {}
    for mode in ("memory", "lazy"):
        run = tmp_path / mode
        args = fit_args(cohort_dir, tiny_preset(tmp_path, epochs=2), run) + (["--lazy", "--cache-subjects", "4"]
                                                                             if mode == "lazy" else [])
        assert cli.main(args) == 0
        runs[mode] = json.loads((run / "history.json").read_text())
    np.testing.assert_allclose(runs["lazy"]["val_mse"], runs["memory"]["val_mse"], rtol=1e-5)
    np.testing.assert_allclose(runs["lazy"]["train_loss"], runs["memory"]["train_loss"], rtol=1e-5)


def test_fit_batch_size_overrides_the_preset(cohort_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(fit_args(cohort_dir, tiny_preset(tmp_path, epochs=1), run) + ["--batch-size", "5"]) == 0
    assert json.loads((run / "config.json").read_text())["training"]["batch_size"] == 5
    capsys.readouterr()
    assert cli.main(fit_args(cohort_dir, tiny_preset(tmp_path), tmp_path / "bad") + ["--batch-size", "0"]) == 2
    assert capsys.readouterr().err.strip() == "inva: error: --batch-size 0: must be at least 1"
    assert not (tmp_path / "bad").exists()


def test_fit_calibration_share_keeps_calibration_subjects_out_of_early_stopping(cohort_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(fit_args(cohort_dir, tiny_preset(tmp_path, epochs=1), run) + ["--calibration-share", "0.5"]) == 0
    info = json.loads((run / "run.json").read_text())
    assert json.loads((run / "config.json").read_text())["training"]["calibration_share"] == 0.5
    shared = tmp_path / "shared"
    assert cli.main(fit_args(cohort_dir, tiny_preset(tmp_path, epochs=1), shared)) == 0
    both = json.loads((shared / "run.json").read_text())
    assert both["n_val"] == both["n_calibration"]
    assert info["n_val"] + info["n_calibration"] == both["n_val"] and abs(info["n_val"] - info["n_calibration"]) <= 1
    capsys.readouterr()
    assert cli.main(fit_args(cohort_dir, tiny_preset(tmp_path), tmp_path / "bad") + ["--calibration-share", "1"]) == 2
    assert capsys.readouterr().err.strip() == "inva: error: --calibration-share 1.0: must be at least 0 and below 1"
    assert not (tmp_path / "bad").exists()
