"""inva-pyro: Integrative Variational Autoencoders (InVA) in Pyro.

Predict an outcome image (e.g. PET) from several input images (e.g. MRI-derived maps) with
calibrated voxel-wise posterior predictive uncertainty.
"""
from .data.cohort import Cohort, Subset
from .config import Preset, load_preset
from .errors import InputError
from .estimator import InVA
from .predict.prediction import Prediction

__all__ = ["Cohort", "Subset", "InVA", "Prediction", "Preset", "load_preset", "InputError"]
__version__ = "0.1.0"
