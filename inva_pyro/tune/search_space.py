"""The hyperparameter search space of ``inva tune``: declared once here, overridable from TOML.

The settings are the ones the VAE tutorial says a VAE's results hinge on: latent sizes, the KL
weight and its annealing, the MMD weight, learning rate, hidden sizes, batch size, dropout and
weight decay. Each is a preset key (``model.*`` or ``training.*``), so a trial is the base preset
with the sampled keys replaced, validated by the same pydantic classes as any preset: a trial
can never run a setting ``inva fit`` would refuse.

A TOML file changes the space key by key (docs/bids_to_tuned.md)::

    [model]
    shallow_dim = [4, 8, 16]                            # a list: categorical choices
    dropout = {low = 0.0, high = 0.3}                   # a range (integers when both ends are)
    [training]
    learning_rate = {low = 1e-4, high = 1e-2, log = true}
    batch_size = 32                                     # a single value: fixed, not searched
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from pydantic import ValidationError

from ..config import ModelConfig, Preset, TrainingConfig, read_toml
from ..errors import InputError


@dataclass(frozen=True)
class Choice:
    """One of a few values (sizes, or 'off plus a few useful weights')."""
    values: tuple


@dataclass(frozen=True)
class Range:
    """A value between ``low`` and ``high``; integer when both ends are integers."""
    low: float
    high: float
    log: bool = False
    step: float | None = None


@dataclass(frozen=True)
class Fixed:
    """A value set for every trial (not searched)."""
    value: Any


Param = Union[Choice, Range, Fixed]

DEFAULT_SPACE: dict[str, Param] = {
    "model.shallow_dim": Choice((4, 8, 16, 32)),
    "model.deep_dim": Choice((2, 4, 8, 16)),
    "model.hidden": Choice((64, 128, 256, 512)),
    "model.shared_hidden": Choice((32, 64, 128)),
    "model.dropout": Range(0.0, 0.5),
    # InfoVAE's lambda per subject: useful values are 100s to 1000s (docs/toolkit.md), 0 is off.
    "model.mmd_weight": Choice((0.0, 100.0, 1000.0)),
    # lambda of the predictor's spatial smoothing prior (model/smoothing.py): 0 is off; inva uses 100, inva-joint 1000.
    "model.spatial_smoothing": Choice((0.0, 100.0, 1000.0, 10000.0)),
    "training.kl_weight": Range(0.05, 1.0, log=True),
    "training.kl_anneal_epochs": Range(0, 50),
    "training.learning_rate": Range(3e-4, 1e-2, log=True),
    "training.batch_size": Choice((16, 32, 64)),
    "training.weight_decay": Range(1e-6, 1e-2, log=True),
}

_TABLES = {"model": ModelConfig, "training": TrainingConfig}


def load_space(path: Path | None, base: Preset, neighbour_graph: bool = True) -> dict[str, Param]:
    """The default space with the TOML file's keys replacing or adding entries; every value checked.
    Without a neighbour graph on the outcome (region tables) the spatial prior does nothing, so unless
    the file asks for it, ``spatial_smoothing`` is fixed at 0 instead of searched."""
    space = dict(DEFAULT_SPACE)
    if not neighbour_graph:
        space["model.spatial_smoothing"] = Fixed(0.0)
    if path is not None:
        space.update(_read_space_file(Path(path)))
    where = str(path) if path is not None else "search space"
    for key, param in space.items():  # refuse values a preset would refuse, before any trial runs
        for value in _extremes(param):
            apply(base, {key: value}, where)
    return space


def sample(trial, space: dict[str, Param]) -> dict[str, Any]:
    """One trial's settings, drawn by the study's sampler (fixed values as they are)."""
    values = {}
    for key, param in space.items():
        if isinstance(param, Fixed):
            values[key] = param.value
        elif isinstance(param, Choice):
            values[key] = trial.suggest_categorical(key, list(param.values))
        elif _is_int(param):
            values[key] = trial.suggest_int(key, int(param.low), int(param.high), log=param.log,
                                            step=int(param.step or 1))
        else:
            values[key] = trial.suggest_float(key, param.low, param.high, log=param.log, step=param.step)
    return values


def apply(base: Preset, values: dict[str, Any], where: str = "search space") -> Preset:
    """``base`` with the dotted keys of ``values`` replaced, validated as a whole preset."""
    raw = base.model_dump()
    for key, value in values.items():
        table, name = key.split(".", 1)
        raw[table][name] = value
    try:
        return Preset.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first["loc"] if x not in ("inva",))
        raise InputError(f"{where}: {loc}: {first['msg']}") from None


def _read_space_file(path: Path) -> dict[str, Param]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: search-space file not found") from None
    raw = read_toml(data, str(path))
    space: dict[str, Param] = {}
    for table, entries in raw.items():
        if table not in _TABLES or not isinstance(entries, dict):
            raise InputError(f"{path}: [{table}]: unknown table (a search space has [model] and [training])")
        for name, spec in entries.items():
            if name not in _TABLES[table].model_fields or name == "family":
                raise InputError(f"{path}: {table}.{name}: unknown setting")
            space[f"{table}.{name}"] = _param(spec, f"{path}: {table}.{name}")
    return space


def _param(spec: Any, where: str) -> Param:
    if isinstance(spec, list):
        if not spec:
            raise InputError(f"{where}: an empty list of choices")
        return Choice(tuple(spec))
    if isinstance(spec, dict):
        unknown = set(spec) - {"low", "high", "log", "step"}
        if unknown or not {"low", "high"} <= set(spec):
            raise InputError(f"{where}: a range is {{low = ..., high = ..., log = false, step = ...}}")
        low, high = spec["low"], spec["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low > high:
            raise InputError(f"{where}: a range needs numbers low <= high")
        if spec.get("log") and low <= 0:
            raise InputError(f"{where}: a log range needs low > 0")
        return Range(low, high, bool(spec.get("log", False)), spec.get("step"))
    return Fixed(spec)


def _is_int(param: Range) -> bool:
    return isinstance(param.low, int) and isinstance(param.high, int)


def _extremes(param: Param) -> tuple:
    if isinstance(param, Choice):
        return param.values
    if isinstance(param, Range):
        return (param.low, param.high)
    return (param.value,)
