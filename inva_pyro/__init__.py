"""inva-pyro: Integrative Variational Autoencoders (InVA) in Pyro.

Predict an outcome image (e.g. PET) from several input images (e.g. MRI-derived maps) with
calibrated voxel-wise posterior predictive uncertainty.

The public names are imported on first use, so that ``inva --help`` and ``import inva_pyro.cli`` do
not load torch, pyro or arviz.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "Cohort": "inva_pyro.data.cohort",
    "Subset": "inva_pyro.data.subset",
    "InVA": "inva_pyro.estimator",
    "Prediction": "inva_pyro.predict.prediction",
    "Preset": "inva_pyro.config",
    "load_preset": "inva_pyro.config",
    "InputError": "inva_pyro.errors",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'inva_pyro' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
