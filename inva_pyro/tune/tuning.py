"""Hyperparameter search with Optuna (``inva tune``): one study, many trials, a preset at the end.

Every trial is an ordinary ``InVA.fit`` of the base preset with the sampled settings
(``search_space.py``) on the cohort's training subjects, scored on its validation subjects
(calibrated CRPS by default, or MSE; never the test subjects). The per-epoch validation MSE that
drives early stopping is reported to Optuna through the training loop's ``on_epoch_end`` hook, so
the pruner can stop a trial whose curve falls behind the others.

The study lives in an Optuna storage: SQLite in the study folder by default (a file, nothing to
start), or any database URL Optuna accepts, so that several ``inva tune`` processes, on several
machines, add trials to one study. ``--trials N`` runs until the study has N finished trials
(complete, pruned or failed), counted across every process: a rerun resumes an interrupted study
and several workers share one budget. Every running trial beats a heartbeat into the storage; a
trial whose worker died (killed, out of memory, a machine lost) stops beating, and the next process
that opens the study marks it failed and queues its settings again once (Optuna's
``RetryHeartbeatStaleTrialCallback``), so a crash neither leaves a trial "running" forever nor loses it.
"""
from __future__ import annotations

import contextlib
import io
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Callable

import optuna
from optuna.trial import TrialState

from ..config import Preset, preset_to_toml
from ..criticism.diagnostics import PosteriorCollapseWarning
from ..data.cohort import Cohort
from ..data.io import atomic_write_text
from ..errors import InputError
from ..train.loop import TrainingDiverged
from .search_space import Param, apply, sample

OBJECTIVES = ("crps", "mse")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
STORAGE_ATTEMPTS = 5
HEARTBEAT_S = 60     # a running trial's worker writes a heartbeat this often
GRACE_S = 300        # a trial without one for this long is a dead worker's


def default_storage(out_dir: Path) -> str:
    return f"sqlite:///{Path(out_dir).resolve() / 'study.db'}"


def make_pruner(name: str, epochs: int | None) -> optuna.pruners.BasePruner:
    """The pruner by name; warm-up epochs skip the noisy start (KL annealing, first steps)."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=10)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=5, max_resource=epochs or "auto")
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner {name!r}")


def open_study(storage: str, study_name: str, objective: str, pruner: optuna.pruners.BasePruner,
               sampler_seed: int) -> optuna.Study:
    """Create the study, or load it (a rerun, or another worker's); its objective must not change."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}")
    from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
    # Several workers share one SQLite file: wait for its lock rather than fail ("database is locked").
    engine = {"connect_args": {"timeout": 120}} if storage.startswith("sqlite:") else None
    # Workers started together race to create the schema of a new database: the loser's insert of the
    # schema version fails although the schema is then there, so it tries again (a few times, with a pause).
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since v2.8
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                rdb = optuna.storages.RDBStorage(
                    storage, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
            study = optuna.create_study(storage=rdb,
                                        study_name=study_name, direction="minimize", pruner=pruner,
                                        load_if_exists=True)
            break
        except (ImportError, ValueError, SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
            if attempt + 1 == STORAGE_ATTEMPTS or not isinstance(exc, (IntegrityError, OperationalError)):
                raise InputError(f"--storage {storage}: cannot open the study ({exc})") from None
            time.sleep(0.2 * (attempt + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial: failed, its settings queued again
    # A rerun must not replay the first run's random proposals: the sampler's seed moves on with
    # the trials already there (still reproducible for a given seed and study).
    study.sampler = optuna.samplers.TPESampler(seed=sampler_seed + len(study.trials))
    known = study.user_attrs.get("objective")
    if known is None:
        study.set_user_attr("objective", objective)
    elif known != objective:
        raise InputError(f"study '{study_name}': it minimises validation {known}, not {objective}; "
                         "use another --study-name or --objective " + known)
    return study


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def optimize(study: optuna.Study, cohort: Cohort, base: Preset, space: dict[str, Param], *, trials: int,
             epochs: int | None = None, seed: int = 0, device: str = "auto",
             report: Callable[[str], None] = print) -> None:
    """Run trials until the study has ``trials`` finished ones (this process's share of them).

    A trial whose training diverges (a learning rate too high) is recorded as failed and the
    study goes on; its settings are in trials.csv.
    """
    remaining = trials - finished_trials(study)
    if remaining <= 0:
        return
    objective = study.user_attrs["objective"]

    def run_trial(trial: optuna.Trial) -> float:
        preset = apply(base, sample(trial, space))
        if epochs:
            preset.training.epochs = epochs
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("preset", preset.model_dump())
        return fit_and_score(trial, preset, cohort, objective, seed, device)

    def line(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        report(describe(trial, objective))

    study.optimize(run_trial, n_trials=remaining, catch=(TrainingDiverged,),
                   callbacks=[optuna.study.MaxTrialsCallback(trials, states=FINISHED), line])


def fit_and_score(trial: optuna.Trial, preset: Preset, cohort: Cohort, objective: str, seed: int,
                  device: str) -> float:
    """Fit on the training subjects and score on the validation ones; prunable after every epoch."""
    from ..estimator import InVA

    def prune_check(state) -> None:
        trial.report(state.history["val_mse"][-1], state.epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {state.epoch}")

    # Collapse is a property of a trial's settings, recorded in trials.csv, not a warning per trial.
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore", PosteriorCollapseWarning)
        model = InVA(preset).fit(cohort.train, cohort.val, seed=seed, device=device, progress=False,
                                 on_epoch_end=prune_check)
    metrics = model.predict(cohort.val, seed=seed).metrics()
    trial.set_user_attr("collapsed_modalities", ",".join(model.history["collapse"]["collapsed_modalities"]))
    trial.set_user_attr("val_mse", metrics["mse"])
    trial.set_user_attr("val_crps", metrics["crps"])
    trial.set_user_attr("epochs", len(model.history["epoch"]))
    trial.set_user_attr("best_epoch", model.history["best_epoch"])
    return metrics[objective]


def describe(trial: optuna.trial.FrozenTrial, objective: str) -> str:
    """The progress line of a finished trial: number, outcome, settings."""
    settings = ", ".join(f"{key.split('.', 1)[1]}={_short(value)}" for key, value in trial.params.items())
    if trial.state == TrialState.COMPLETE:
        outcome = f"{objective} {trial.value:.5g}"
    elif trial.state == TrialState.PRUNED:
        outcome = f"pruned after epoch {trial.last_step}"
    else:
        outcome = "failed (training diverged)" if trial.state == TrialState.FAIL else trial.state.name.lower()
    return f"trial {trial.number}: {outcome}; {settings}"


def best_preset(study: optuna.Study) -> Preset | None:
    """The best complete trial's preset (exactly what it trained), or None before any completes."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    preset = Preset.model_validate(best.user_attrs["preset"])
    preset.name = "tuned"
    preset.description = (f"inva tune: trial {best.number} of study '{study.study_name}', validation "
                          f"{study.user_attrs['objective']} {best.value:.5g}")
    return preset


def write_outputs(study: optuna.Study, out_dir: Path, report: Callable[[str], None] = print) -> list[str]:
    """best.toml, trials.csv and the figures; returns the names written.

    Each file is written atomically, so a worker reading the folder while another rewrites it
    never sees half a file.
    """
    from .study_figures import write_figures

    out_dir = Path(out_dir)
    written = []
    preset = best_preset(study)
    if preset is not None:
        atomic_write_text(out_dir / "best.toml", preset_to_toml(preset))
        written.append("best.toml")
    table = study.trials_dataframe(attrs=("number", "value", "state", "duration", "params", "user_attrs"))
    table = table.drop(columns=[c for c in table.columns if c == "user_attrs_preset"])
    atomic_write_text(out_dir / "trials.csv", table.to_csv(index=False))
    written.append("trials.csv")
    return written + write_figures(study, out_dir, report)


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
