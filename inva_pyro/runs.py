"""Run folders: the one place they are written and read, for every model family.

A run folder holds what predicting later needs, as JSON and safetensors (nothing executable):
``run.json`` (format, family, inputs and their sizes, outcome, spaces, seed, versions, ``complete``, the
fit's own record), ``config.json`` (the preset), ``standardizer.json``, ``weights.safetensors``,
``calibration.json``, and, where the family has them, ``site_intensity.json`` (each site's input gain and
offset field), ``covariance.safetensors`` with ``covariance.json``
(the outcome's spatial covariance), ``history.json`` (training curves) and ``submodels/without-NAME/``
(pattern submodels, each a run folder). ``run.json`` is written last, so a folder it calls complete is whole.
Every problem a user can meet here is one line naming the folder or the file.
"""
from __future__ import annotations

import contextlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from .config import Preset
from .data.io import atomic_write_text
from .data.preprocessing import Standardizer
from .data.site_intensity import SiteIntensity
from .errors import InputError

RUN_FORMAT = "inva-pyro-run/1"
_REQUIRED = object()


def package_versions(names) -> dict[str, str]:
    """Installed versions of ``names`` (and Python), for run.json: a run records what made it."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def new_info(family: str, train_set, *, seed: int, versioned, **record) -> dict:
    """run.json of a fit starting on ``train_set`` (a Subset that knows its outcome and spaces)."""
    names = list(train_set.inputs)
    space = train_set.outcome_space
    return {"format": RUN_FORMAT, "family": family, "inputs": names,
            "input_sizes": [int(train_set.inputs[n].shape[1]) for n in names],
            "outcome": train_set.outcome_name or "y", "n_outcome": int(train_set.outcome.shape[1]),
            "seed": seed, "versions": package_versions(versioned), "complete": False,
            "space": space.to_dict() if space is not None else None,
            "input_spaces": {n: s.to_dict() for n, s in train_set.spaces.items() if n in names},
            "n_train": len(train_set), **record}


def read_info(run_dir: str | Path) -> dict:
    """The checked run.json of ``run_dir``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: run folder not found")
    try:
        info = json.loads((run_dir / "run.json").read_text())
    except FileNotFoundError:
        raise InputError(f"{run_dir}: not an inva run folder (no run.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{run_dir / 'run.json'}: corrupt (not valid JSON)") from None
    if not isinstance(info, dict) or info.get("format") != RUN_FORMAT:
        raise InputError(f"{run_dir}: not an inva run folder (run.json has no format '{RUN_FORMAT}')")
    return info


def read_spaces(run_dir: str | Path, info: dict) -> dict:
    """The feature spaces a run was fitted in, by name (inputs and outcome): new subjects must be in them."""
    from .data.spaces import space_from_dict
    where = Path(run_dir) / "run.json"
    spaces = {n: space_from_dict(d, where) for n, d in (info.get("input_spaces") or {}).items()}
    if info.get("space"):
        spaces[info["outcome"]] = space_from_dict(info["space"], where)
    return spaces


@contextlib.contextmanager
def reading(run_dir: str | Path):
    """Any damage to a run folder's files is one user-facing problem: a corrupt run folder."""
    try:
        yield
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{run_dir}: corrupt run folder ({type(exc).__name__}: {exc})".splitlines()[0]) from None


def write_config(run_dir: str | Path, preset: Preset, standardizer: Standardizer) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir, "config.json", preset.model_dump(), indent=2)
    write_json(run_dir, "standardizer.json", standardizer.to_dict())
    if standardizer.site_intensity is not None:
        write_json(run_dir, "site_intensity.json", standardizer.site_intensity.to_dict())


def read_config(run_dir: str | Path) -> tuple[Preset, Standardizer]:
    with reading(run_dir):
        preset = Preset.model_validate(read_json(run_dir, "config.json"))
        standardizer = Standardizer.from_dict(read_json(run_dir, "standardizer.json"))
        if (Path(run_dir) / "site_intensity.json").exists():
            spaces = read_spaces(run_dir, read_info(run_dir))
            coordinates = {n: s.feature_coordinates() if hasattr(s, "feature_coordinates") else None
                           for n, s in spaces.items()}
            standardizer.site_intensity = SiteIntensity.from_dict(read_json(run_dir, "site_intensity.json"),
                                                                  coordinates)
        return preset, standardizer


def write_conditions(run_dir: str | Path, covariates, sites) -> None:
    """``covariates.json``: how a fit encoded its covariates and numbered its sites (none: no file)."""
    if covariates is not None or sites is not None:
        write_json(run_dir, "covariates.json", {"covariates": covariates.to_dict() if covariates else None,
                                                "site": sites.to_dict() if sites else None})


def read_conditions(run_dir: str | Path):
    """(CovariateEncoder or None, SiteLevels or None) of a run folder."""
    from .data.covariates import CovariateEncoder, SiteLevels
    with reading(run_dir):
        saved = read_json(run_dir, "covariates.json", default={})
        return (CovariateEncoder.from_dict(saved["covariates"]) if saved.get("covariates") else None,
                SiteLevels.from_dict(saved["site"]) if saved.get("site") else None)


def write_info(run_dir: str | Path, info: dict) -> None:
    write_json(run_dir, "run.json", info, indent=2)


def write_json(run_dir: str | Path, name: str, data: Any, indent: int | None = None) -> None:
    atomic_write_text(Path(run_dir) / name, json.dumps(data, indent=indent))


def read_json(run_dir: str | Path, name: str, default: Any = _REQUIRED) -> Any:
    """A JSON file of the run folder; ``default`` when it is absent (else absence is an error)."""
    path = Path(run_dir) / name
    if default is not _REQUIRED and not path.exists():
        return default
    return json.loads(path.read_text())


def write_tensors(run_dir: str | Path, name: str, tensors: dict) -> None:
    """Named torch tensors or numpy arrays as a safetensors file, written atomically."""
    path = Path(run_dir) / name
    tmp = path.with_name(f".{name}.tmp")
    if tensors and all(hasattr(t, "detach") for t in tensors.values()):
        from safetensors.torch import save_file
        save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, str(tmp))
    else:
        import numpy as np
        from safetensors.numpy import save_file
        save_file({k: np.ascontiguousarray(a) for k, a in tensors.items()}, str(tmp))
    tmp.replace(path)


def read_tensors(run_dir: str | Path, name: str, device=None) -> dict:
    """A safetensors file of the run folder: torch tensors on ``device``, or numpy arrays without one.
    safetensors holds tensors only: loading a run never executes code from it."""
    path = str(Path(run_dir) / name)
    if device is None:
        from safetensors.numpy import load_file
        return load_file(path)
    from safetensors.torch import load_file
    return load_file(path, device=str(device))


def submodel_folder(run_dir: str | Path, name: str) -> Path:
    """Where the pattern submodel without input ``name`` lives in its parent's run folder."""
    return Path(run_dir) / "submodels" / f"without-{name}"
