"""What every peer model shares: the InVA interface, run.json, saving and loading.

A peer is fitted on the same ``Subset`` objects as :class:`inva_pyro.estimator.InVA` and returns
the same :class:`inva_pyro.predict.prediction.Prediction`, so ``inva evaluate``, the figures and the
simulation study treat every family alike. A subclass implements four hooks:

- ``_fit_model(train, val, seed, space, progress)``: fit (``space``: the outcome's), then set ``self.calibrator``;
- ``_predictive(subset, levels, num_samples, seed, keep_samples)``: mean, raw sd, raw intervals
  (and optionally draws) in outcome units;
- ``_arrays()`` / ``_set_arrays(arrays)``: the fitted state as named numpy arrays
  (``weights.safetensors``); ``_save_extra(run_dir)`` / ``_load_extra(run_dir)`` for anything else.

Run folders are written and read by ``runs.py`` (no pickle anywhere), with the fit time in run.json.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar

import numpy as np

from .. import runs
from ..config import FAMILY_CONFIGS, Preset, load_preset
from ..data.missing import check_labeled_val, complete_cases, require_inputs
from ..data.preprocessing import Standardizer
from ..data.spaces import space_from_dict
from ..data.splits import holdout
from ..data.subset import Subset
from ..errors import InputError
from ..predict.calibration import Calibrator
from ..predict.prediction import Prediction

VERSIONED = ("inva-pyro", "numpy", "scipy", "scikit-learn", "stochtree", "safetensors")


class PeerModel:
    """Base class of the peer families (see the module docstring for the hooks)."""

    family: ClassVar[str] = ""

    def __init__(self, preset: Preset | None = None):
        if preset is None:
            preset = Preset(name=self.family, model=FAMILY_CONFIGS[self.family]())
        if preset.model.family != self.family:
            raise ValueError(f"{type(self).__name__} needs a '{self.family}' preset, got '{preset.model.family}'")
        self.preset = preset
        self.standardizer: Standardizer | None = None
        self.calibrator: Calibrator | None = None
        self.history: dict | None = None
        self.info: dict = {}

    @classmethod
    def from_preset(cls, name_or_path: str | Path | None = None) -> "PeerModel":
        return cls(load_preset(name_or_path or cls.family))

    @property
    def config(self):
        return self.preset.model

    @property
    def needs_every_input(self) -> bool:
        """A peer predicts only subjects with every input."""
        return True

    # ---- fitting -----------------------------------------------------------------------------------
    def fit(self, train_set: Subset, val: Subset | None = None, *, seed: int = 0, device: str = "auto",
            devices: int = 1, run_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
            on_epoch_end=None, extra_info: dict | None = None):
        """Fit on ``train_set`` (a Subset that knows its outcome and spaces); ``val`` (or a seeded
        ``training.val_share`` of ``train_set``) gives the predictive intervals. ``device`` is accepted for
        interface parity: peers run on the CPU, in one process (``bart`` spreads its voxels over ``n_jobs``
        local worker processes)."""
        if devices != 1:
            raise InputError(f"--devices {devices}: a '{self.family}' model runs in one process on the CPU")
        if resume:
            raise InputError(f"{run_dir}: a '{self.family}' fit has no checkpoints to resume; fit it again")
        if train_set.conditions is not None or train_set.sites is not None:
            raise InputError(f"a '{self.family}' model conditions on no covariates or sites (--covariates, --site): "
                             "fit an InVA preset")
        if val is None or len(val) == 0:
            train_set, val = holdout(train_set, self.preset.training.val_share, seed)
        if train_set.outcome is None or val.outcome is None:
            raise InputError("fit needs the outcome for every training and validation subject")
        # A discriminative peer learns from complete cases only: subjects with every input and the outcome.
        train_set, val = complete_cases(_materialised(train_set)), complete_cases(_materialised(val))
        if len(train_set) < 2:
            raise InputError(f"a '{self.family}' model fits on subjects with every input and the outcome; "
                             f"the training subjects have {len(train_set)}")
        check_labeled_val(val, train_set.outcome_name or "y")
        self.standardizer = Standardizer.fit(train_set)
        self.info = runs.new_info(self.family, train_set, seed=seed, versioned=VERSIONED, n_val=len(val),
                                  **(extra_info or {}))
        start = time.perf_counter()
        self._fit_model(train_set, val, seed=seed, space=train_set.outcome_space, progress=progress)
        self.info["fit_seconds"] = round(time.perf_counter() - start, 3)
        if run_dir is not None:
            self.save(run_dir)
        return self

    def _fit_model(self, train: Subset, val: Subset, *, seed: int, space, progress: bool) -> None:
        raise NotImplementedError

    def _standardised_inputs(self, subset: Subset) -> np.ndarray:
        """(n, sum V_k) float64: every input standardised with the training statistics, concatenated."""
        inputs = self.standardizer.transform_inputs(subset)
        return np.concatenate([inputs[name] for name in self.info["inputs"]], axis=1).astype(np.float64)

    # ---- prediction --------------------------------------------------------------------------------
    def predict(self, subset: Subset, num_samples: int | None = None, levels: list[float] | None = None,
                seed: int = 0, keep_samples: int = 0, space=None) -> Prediction:
        """Predictive maps for every subject of ``subset`` (the outcome may be absent)."""
        if not self.info.get("inputs") or self.calibrator is None:
            raise RuntimeError("fit or load the model first")
        missing = [n for n in self.info["inputs"] if n not in subset.inputs]
        if missing:
            raise InputError(f"the subjects lack the input(s) this model was trained on: {', '.join(missing)}")
        require_inputs(subset, self.info["inputs"], f"'{self.family}'")
        for name, size in zip(self.info["inputs"], self.info["input_sizes"]):
            if subset.inputs[name].shape[1] != size:
                raise InputError(f"input '{name}' has {subset.inputs[name].shape[1]} features; "
                                 f"the model was trained on {size}")
        cfg = self.preset.prediction
        levels = sorted(levels or cfg.levels)
        mean, raw_sd, raw_intervals, samples = self._predictive(
            subset, levels, num_samples or cfg.num_samples, seed, keep_samples)
        if space is None and self.info.get("space"):
            space = space_from_dict(self.info["space"])
        f32 = lambda a: np.asarray(a, dtype=np.float32)
        return Prediction(
            subjects=list(subset.subjects), outcome_name=self.info["outcome"], levels=levels,
            mean=f32(mean), raw_sd=f32(raw_sd),
            raw_intervals={lv: (f32(lo), f32(hi)) for lv, (lo, hi) in raw_intervals.items()},
            calibrator=self.calibrator, samples=None if samples is None else f32(samples),
            observed=subset.outcome, space=space)

    def _predictive(self, subset: Subset, levels: list[float], num_samples: int, seed: int, keep_samples: int):
        raise NotImplementedError

    # ---- persistence -------------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def _save_extra(self, run_dir: Path) -> None:
        pass

    def _load_extra(self, run_dir: Path) -> None:
        pass

    def save(self, run_dir: str | Path) -> Path:
        """Everything needed to predict later, as JSON and safetensors (nothing executable; runs.py)."""
        if self.calibrator is None:
            raise RuntimeError("fit the model before saving it")
        run_dir = Path(run_dir)
        self.info["complete"] = True
        runs.write_config(run_dir, self.preset, self.standardizer)
        runs.write_tensors(run_dir, "weights.safetensors", self._arrays())
        self._save_extra(run_dir)
        runs.write_json(run_dir, "calibration.json", self.calibrator.to_dict())
        runs.write_info(run_dir, self.info)  # last: marks the folder whole
        return run_dir

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "cpu") -> "PeerModel":
        run_dir = Path(run_dir)
        info = runs.read_info(run_dir)
        if info.get("family") != cls.family:
            raise InputError(f"{run_dir}: a '{info.get('family')}' run, not a '{cls.family}' run")
        if not info.get("complete"):
            raise InputError(f"{run_dir}: the fit did not finish; fit it again")
        preset, standardizer = runs.read_config(run_dir)
        self = cls(preset)
        self.info, self.standardizer = info, standardizer
        with runs.reading(run_dir):
            self._set_arrays(runs.read_tensors(run_dir, "weights.safetensors"))
            self._load_extra(run_dir)
            self.calibrator = Calibrator.from_dict(runs.read_json(run_dir, "calibration.json"))
        return self


def _materialised(subset):
    """An in-memory Subset (a lazily read one is read here: peers hold their data in memory)."""
    return subset.rows() if hasattr(subset, "rows") else subset
