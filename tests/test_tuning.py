"""`inva tune`: a study that writes a preset `inva fit` accepts, shared storage, pruning, bad input."""
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from conftest import tiny_toml
from inva_pyro import cli
from inva_pyro.config import load_preset, parse_preset, preset_names, preset_to_toml, read_toml
from inva_pyro.tune import tuning
from inva_pyro.tune.search_space import Fixed, Range, load_space

ROOT = Path(__file__).resolve().parent.parent
# Small sizes only, so that every trial takes a second or two.
SPACE = """
[model]
shallow_dim = [2, 3]
deep_dim = 2
hidden = [8, 12]
shared_hidden = 8
[training]
batch_size = 8
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 30-subject region cohort (small tables: fast fits), the tiny base preset and the small space."""
    folder = tmp_path_factory.mktemp("tune")
    cohort = folder / "cohort"
    assert cli.main(["simulate", "--design", "regions", "--n-subjects", "30", "--seed", "2", "--out", str(cohort)]) == 0
    (folder / "tiny.toml").write_text(tiny_toml(training={"epochs": 2, "batch_size": 8}, prediction={"num_samples": 20}))
    (folder / "space.toml").write_text(SPACE)
    return folder


def tune_args(setup: Path, out: Path, trials: int, *extra: str) -> list[str]:
    return ["tune", "--manifest", str(setup / "cohort" / "manifest.csv"), "--inputs", "thickness,area",
            "--outcome", "pet", "--model", str(setup / "tiny.toml"), "--space", str(setup / "space.toml"),
            "--trials", str(trials), "--epochs", "2", "--device", "cpu", "--out", str(out), *extra]


def test_study_writes_a_best_preset_that_fits_and_a_rerun_resumes(setup, tmp_path, capsys):
    study_dir = tmp_path / "study"
    assert cli.main(tune_args(setup, study_dir, 3)) == 0
    printed = capsys.readouterr().out
    assert sum(line.startswith("trial ") for line in printed.splitlines()) == 3
    assert {"best.toml", "trials.csv", "history.png", "importances.png", "study.db"} <= {
        p.name for p in study_dir.iterdir()}
    trials = pd.read_csv(study_dir / "trials.csv")
    assert len(trials) == 3 and set(trials["state"]) == {"COMPLETE"}
    best = load_preset(study_dir / "best.toml")
    assert best.name == "tuned" and best.training.epochs == 2 and best.model.deep_dim == 2
    assert best.model.shallow_dim in (2, 3) and best.model.hidden in (8, 12)
    assert f"{trials['value'].min():.5g}" in best.description  # the best trial's preset
    run = tmp_path / "run"
    assert cli.main(["fit", "--manifest", str(setup / "cohort" / "manifest.csv"), "--inputs", "thickness,area",
                     "--outcome", "pet", "--model", str(study_dir / "best.toml"), "--device", "cpu",
                     "--out", str(run)]) == 0
    assert (run / "weights.safetensors").exists()
    # --trials is the study's total: a rerun with 4 adds one trial to the three there.
    assert cli.main(tune_args(setup, study_dir, 4)) == 0
    assert "3 finished trials, running until 4" in capsys.readouterr().out
    trials = pd.read_csv(study_dir / "trials.csv")
    assert len(trials) == 4
    params = [c for c in trials.columns if c.startswith("params_")]
    assert trials.loc[3, params].tolist() != trials.loc[0, params].tolist()  # the sampler did not start over


def test_two_processes_share_one_sqlite_study(setup, tmp_path):
    study_dir = tmp_path / "shared"
    study_dir.mkdir()
    storage = f"sqlite:///{study_dir / 'shared.db'}"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    workers = [subprocess.Popen([sys.executable, "-m", "inva_pyro.cli",
                                 *tune_args(setup, tmp_path / f"out{i}", 8, "--storage", storage,
                                            "--sampler-seed", str(i))],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    results = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [r[1][-2000:] for r in results]
    study = optuna.load_study(study_name="inva", storage=storage)
    finished = study.get_trials(states=tuning.FINISHED)
    assert len(finished) >= 8
    assert len({t.user_attrs["worker"] for t in finished}) == 2  # both processes added trials


# The worker says its trial runs by creating a file, so the test never opens the database while the
# worker is still creating its tables (two processes creating one schema collide).
HANGING_WORKER = """
import pathlib, sys, time
from inva_pyro.tune import tuning
tuning.HEARTBEAT_S, tuning.GRACE_S = 1, 2
study = tuning.open_study(sys.argv[1], "crash", "crps", tuning.make_pruner("none", None), sampler_seed=0)
study.enqueue_trial({"x": 0.25})
def hang(trial):
    trial.suggest_float("x", 0, 1)
    pathlib.Path(sys.argv[2]).touch()
    time.sleep(600)
study.optimize(hang, n_trials=1)
"""


def test_a_killed_workers_trial_is_failed_and_queued_again(tmp_path, monkeypatch):
    storage = f"sqlite:///{tmp_path / 'crash.db'}"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    running = tmp_path / "running"
    worker = subprocess.Popen([sys.executable, "-c", HANGING_WORKER, storage, str(running)], env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not running.exists() and worker.poll() is None:
            time.sleep(0.2)  # wait for its trial to run
        assert worker.poll() is None, "the worker ended before its trial ran"
    finally:
        worker.kill()  # SIGKILL: no chance to tell the storage
        worker.wait()
    assert [t.state for t in optuna.load_study(study_name="crash", storage=storage).trials] == [TrialState.RUNNING]
    time.sleep(3)  # past the grace period without a heartbeat
    monkeypatch.setattr(tuning, "HEARTBEAT_S", 1)
    monkeypatch.setattr(tuning, "GRACE_S", 2)
    study = tuning.open_study(storage, "crash", "crps", tuning.make_pruner("none", None), sampler_seed=0)
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].params == {"x": 0.25}  # the same settings, queued again
    assert tuning.finished_trials(study) == 1


def test_pruning_stops_a_trial_whose_curve_is_bad(small_cohort, make_preset, tmp_path):
    base = make_preset(training={"epochs": 6})
    space = {"training.learning_rate": Range(1e-7, 2e-2, log=True)}
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)
    study = tuning.open_study(tuning.default_storage(tmp_path), "prune", "crps", pruner, sampler_seed=0)
    for learning_rate in (2e-2, 2e-2, 1e-7):  # two good curves, then one that barely moves
        study.enqueue_trial({"training.learning_rate": learning_rate})
    tuning.optimize(study, small_cohort, base, space, trials=3, seed=0, device="cpu", report=lambda line: None)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert study.trials[2].last_step < 6
    assert "pruned after epoch" in tuning.describe(study.trials[2], "crps")


@pytest.mark.parametrize("space_text, problem", [
    ("[model]\nshalow_dim = [2, 4]\n", "model.shalow_dim: unknown setting"),
    ("[optimizer]\nlr = 0.1\n", "[optimizer]: unknown table"),
    ("[model]\ndropout = {low = 0.0, high = 1.5}\n", "model.dropout: Input should be less than 1"),
    ("[training]\nlearning_rate = {low = 0.0, high = 0.1, log = true}\n", "a log range needs low > 0"),
])
def test_bad_search_space_ends_with_one_line_and_writes_nothing(setup, tmp_path, capsys, space_text, problem):
    bad = tmp_path / "bad.toml"
    bad.write_text(space_text)
    args = tune_args(setup, tmp_path / "study", 2)
    args[args.index("--space") + 1] = str(bad)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"inva: error: {bad}: ") and err.count("\n") == 1 and problem in err
    assert not (tmp_path / "study").exists()


def test_a_peer_preset_cannot_be_tuned(setup, tmp_path, capsys):
    args = tune_args(setup, tmp_path / "study", 2)
    args[args.index("--model") + 1] = "ridge"
    assert cli.main(args) == 2
    assert "none of the settings tune searches" in capsys.readouterr().err
    assert not (tmp_path / "study").exists()


def test_default_space_is_valid_for_the_default_preset():
    space = load_space(None, load_preset("inva"))
    assert {"model.shallow_dim", "model.deep_dim", "training.kl_weight", "training.kl_anneal_epochs",
            "model.mmd_weight", "training.learning_rate", "model.hidden", "training.batch_size",
            "model.dropout", "training.weight_decay", "model.spatial_smoothing"} <= set(space)
    # a region table has no neighbour graph: the spatial prior is fixed off rather than searched
    assert load_space(None, load_preset("inva"), neighbour_graph=False)["model.spatial_smoothing"] == Fixed(0.0)


@pytest.mark.parametrize("name", preset_names())
def test_presets_survive_a_toml_round_trip(name):
    preset = load_preset(name)
    assert parse_preset(read_toml(preset_to_toml(preset).encode(), name)) == preset
