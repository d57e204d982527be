"""Which class fits, saves and loads a model family (``[model] family`` in a preset).

Every family has the same interface as :class:`inva_pyro.estimator.InVA`:
``cls(preset)``, ``fit(train, val, *, seed, device, run_dir, progress, outcome_name, space, extra_info)``,
``predict(subset, num_samples, levels, seed) -> Prediction``, ``save(run_dir)``, ``cls.load(run_dir, device)``,
and the attributes ``info`` (run.json) and ``history``. The CLI and analysis scripts go through
this registry, so a new family is one entry here (and one config class in ``config.FAMILY_CONFIGS``).
The peers (``ridge``, ``bart``, ``tensor``) live in ``inva_pyro.peers``; the VAE peers are InVA
structures (``[model] structure``).
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import Preset, load_preset
from .errors import InputError


def _families() -> dict[str, type]:
    from .estimator import InVA
    from .peers import RidgeRegression, TensorRegression, VoxelBART
    return {"inva": InVA, "ridge": RidgeRegression, "bart": VoxelBART, "tensor": TensorRegression}


def model_class(family: str) -> type:
    families = _families()
    if family not in families:
        raise InputError(f"unknown model family '{family}' (known: {', '.join(sorted(families))})")
    return families[family]


def model_from_preset(name_or_path: str | Path | Preset):
    preset = name_or_path if isinstance(name_or_path, Preset) else load_preset(name_or_path)
    return model_class(preset.model.family)(preset)


def load_model(run_dir: str | Path, device: str = "cpu"):
    """Load any family's run folder (dispatching on ``family`` in its run.json)."""
    run_dir = Path(run_dir)
    try:
        info = json.loads((run_dir / "run.json").read_text())
    except FileNotFoundError:
        if not run_dir.is_dir():
            raise InputError(f"{run_dir}: run folder not found") from None
        raise InputError(f"{run_dir}: not an inva run folder (no run.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{run_dir / 'run.json'}: corrupt (not valid JSON)") from None
    family = info.get("family", "inva") if isinstance(info, dict) else None
    if not isinstance(family, str):
        raise InputError(f"{run_dir}: not an inva run folder (run.json has no model family)")
    return model_class(family).load(run_dir, device=device)
