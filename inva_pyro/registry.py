"""Which class fits, saves and loads a model family (``[model] family`` in a preset).

Every family has the same interface as :class:`inva_pyro.estimator.InVA`:
``cls(preset)``, ``fit(train, val, *, seed, device, devices, run_dir, resume, progress, on_epoch_end, extra_info)``,
``predict(subset, num_samples, levels, seed) -> Prediction``, ``save(run_dir)``, ``cls.load(run_dir, device)``,
and the attributes ``info`` (run.json) and ``history``. The CLI and analysis scripts go through
this registry, so a new family is one entry here (and one config class in ``config.FAMILY_CONFIGS``).
The peers (``ridge``, ``bart``, ``tensor``) live in ``inva_pyro.peers``; the VAE peers are InVA
structures (``[model] structure``).
"""
from __future__ import annotations

from pathlib import Path

from .config import Preset, load_preset
from .errors import InputError
from .runs import read_info


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
    info = read_info(run_dir)
    family = info.get("family", "inva")
    if not isinstance(family, str):
        raise InputError(f"{run_dir}: not an inva run folder (run.json has no model family)")
    return model_class(family).load(run_dir, device=device)
