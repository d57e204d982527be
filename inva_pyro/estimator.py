"""The user-facing InVA model: fit, predict, save and load (the Python API of CONTRACT.md)."""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pyro
import torch
from safetensors.torch import load_file, save_file

from .config import Preset, load_preset
from .data.cohort import Subset
from .data.io import atomic_write_text
from .data.missing import (check_labeled_val, input_presence, labeled, missingness_patterns, outcome_presence,
                           require_inputs)
from .data.preprocessing import Standardizer
from .data.spaces import space_from_dict
from .data.streaming import DiskBatches, DiskSubset
from .errors import InputError
from .model.module import InVAModule
from .predict.calibration import Calibrator
from .predict.joint import JointCalibration, fit_joint
from .predict.patterns import calibrate as calibrate_patterns
from .predict.prediction import Prediction
from .predict.predictive import posterior_predictive, seeded_generator
from .predict.routing import PatternRoutes
from .runs import RUN_FORMAT, calibration_split, holdout, package_versions
from .train import distributed
from .train.loop import CHECKPOINT, Batchable, train
from .train.submodels import fit_pattern_submodels, submodel_folder

VERSIONED = ("inva-pyro", "torch", "pyro-ppl", "numpy", "nibabel", "arviz")
# Training subjects the end-of-fit collapse check reads: enough for the across-subject variance of
# the latent means (relative sd sqrt(2 / 127), about 13%), and a bound on what a cohort streamed
# from disk holds in memory, whatever its size.
COLLAPSE_CHECK_SUBJECTS = 128


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available")
    return torch.device(device)


def fits_on_device(nbytes: int, device: torch.device, share: float = 0.5) -> bool:
    """Whether a cohort of ``nbytes`` should live on ``device``: CUDA devices only (the CPU path
    of ``--lazy`` keeps host memory bounded by the batch), and only within ``share`` of the
    memory free there, so the networks and their activations keep room."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= share * free


def _fit_worker(preset, train_set, val, run_dir, kwargs) -> None:
    """One rank of a multi-process fit (started by distributed.spawn)."""
    InVA(preset).fit(train_set, val, run_dir=run_dir, **kwargs)


class InVA:
    """Integrative VAE for image-on-image regression with calibrated predictive uncertainty."""

    def __init__(self, preset: Preset | None = None):
        self.preset = preset or Preset()
        self.module: InVAModule | None = None
        self.standardizer: Standardizer | None = None
        self.calibrator: Calibrator | None = None
        self.joint: JointCalibration | None = None
        self.history: dict | None = None
        self.submodels: dict[str, "InVA"] = {}  # pattern submodels, by the input each lacks (train/submodels.py)
        self.info: dict = {}
        self.device = torch.device("cpu")

    @classmethod
    def from_preset(cls, name_or_path: str | Path = "inva") -> "InVA":
        return cls(load_preset(name_or_path))

    # ---- fitting -----------------------------------------------------------------------------------
    def _build(self, input_names, input_sizes, n_outcome):
        spaces = self.info.get("input_spaces") or {}
        grids = []
        for name in input_names:  # (grid shape, flat mask indices) where an input is an image grid
            space = space_from_dict(spaces[name]) if name in spaces else None
            shape = getattr(space, "grid_shape", None)
            grids.append((shape, np.flatnonzero(space.mask)) if shape and len(shape) in (2, 3) else None)
        self.module = InVAModule(input_names, input_sizes, n_outcome, self.preset.model, grids,
                                 self._neighbour_pairs()).to(self.device)

    def _neighbour_pairs(self) -> np.ndarray | None:
        """The outcome space's neighbour graph, where ``spatial_smoothing`` asks for one (model/smoothing.py)."""
        space = self.info.get("space")
        if self.preset.model.spatial_smoothing <= 0 or not space:
            return None
        return space_from_dict(space).neighbour_pairs()

    def _tensors(self, subset: Subset, with_outcome: bool = True):
        inputs = self.standardizer.transform_inputs(subset)
        xs = [torch.as_tensor(inputs[name], device=self.device) for name in self.info["inputs"]]
        y = None
        if with_outcome and subset.outcome is not None:
            y = torch.as_tensor(self.standardizer.transform_outcome(subset.outcome), device=self.device)
        return xs, y

    def fit(self, train_set: Subset, val: Subset | None = None, *, seed: int = 0, device: str = "auto",
            run_dir: str | Path | None = None, progress: bool = True, resume: bool = False,
            on_epoch_end=None, outcome_name: str = "y", space=None, extra_info: dict | None = None,
            devices: int = 1, input_spaces: dict | None = None, standardizer: Standardizer | None = None) -> "InVA":
        """Train on ``train_set``; ``val`` drives early stopping and calibration.

        Without ``val`` a seeded share (``training.val_share``) of ``train_set`` is held out.
        With ``run_dir`` the run folder is written as training goes (a checkpoint per epoch), and
        ``resume=True`` continues the interrupted run found there. ``devices > 1`` trains in that
        many local processes (torch.distributed; see distributed.py); inside a ``torchrun`` job the
        process group is joined from the environment. ``standardizer``: use these statistics instead of
        fitting them on ``train_set`` (a pattern submodel speaks its parent's units).
        """
        if val is None or len(val) == 0:
            train_set, val = holdout(train_set, self.preset.training.val_share, seed)
        if train_set.outcome is None or val.outcome is None:
            raise InputError("fit needs an outcome column for the training and validation subjects")
        # Every training subject counts (reconstruction of its inputs present, the outcome where present);
        # validation subjects drive early stopping and calibration, so only those with the outcome are kept.
        check_labeled_val(val, outcome_name)
        val = labeled(val)
        if not outcome_presence(train_set).any():
            raise InputError(f"no training subject has the outcome '{outcome_name}'")
        kwargs = dict(seed=seed, device=device, resume=resume, progress=progress, outcome_name=outcome_name,
                      space=space, extra_info=extra_info, input_spaces=input_spaces, standardizer=standardizer)
        if devices > 1 and not distributed.is_distributed():
            return self._fit_spawned(devices, train_set, val, run_dir, kwargs)
        self.device = resolve_device(device)
        if distributed.launched_by_torchrun():
            if self.device.type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
                self.device = torch.device("cuda", torch.cuda.current_device())
            distributed.init_from_environment(self.device)
        pyro.set_rng_seed(seed)
        names = list(train_set.inputs)
        on_disk = isinstance(train_set, DiskSubset)  # read minibatch by minibatch (Cohort.from_manifest(lazy=True))
        if isinstance(val, DiskSubset):
            val = val.rows()  # validation subjects are used every epoch and for calibration: keep them in memory
        # (after the spawn: each worker splits alike) early stopping on one part, calibration on the other
        val_all = val
        val, calibration = calibration_split(val, self.preset.training.calibration_share, seed)
        if resume:
            self._load_config(Path(run_dir), weights=False)
        else:
            self.standardizer = standardizer or (Standardizer.fit_streaming(train_set) if on_disk
                                                 else Standardizer.fit(train_set))
            self.info = {"format": RUN_FORMAT, "family": "inva", "inputs": names,
                         "input_sizes": [int(train_set.inputs[n].shape[1]) for n in names],
                         "outcome": outcome_name, "n_outcome": int(train_set.outcome.shape[1]),
                         "seed": seed, "versions": package_versions(VERSIONED), "complete": False,
                         "space": space.to_dict() if space is not None else None,
                         "input_spaces": {n: sp.to_dict() for n, sp in (input_spaces or {}).items() if n in names},
                         "n_train": len(train_set), "n_val": len(val), "n_calibration": len(calibration),
                         "n_train_labeled": int(outcome_presence(train_set).sum()), **(extra_info or {})}
        self._build(self.info["inputs"], self.info["input_sizes"], self.info["n_outcome"])
        self.submodels = {}
        self.info["neighbour_pairs"] = self.module.n_neighbour_pairs
        if self.preset.model.spatial_smoothing > 0 and not self.module.n_neighbour_pairs:
            kind = (self.info.get("space") or {}).get("kind")
            why = (f"the outcome space ({kind}) has no neighbour graph (a volume or an fsaverage5 surface has one)"
                   if kind else "fit was given no outcome space (space=cohort.spaces[outcome])")
            warnings.warn(f"spatial_smoothing = {self.preset.model.spatial_smoothing:g} has no effect: {why}",
                          RuntimeWarning, stacklevel=2)
        writes = run_dir is not None and distributed.rank() == 0
        if writes and not resume:
            self._write_config(Path(run_dir))
        if on_disk:
            train_data = DiskBatches(train_set, self.standardizer, self.info["inputs"], self.device)
            if fits_on_device(train_data.nbytes(), self.device):  # read once, then train from device memory
                train_data = Batchable(*train_data.read_all())
        else:
            train_data = Batchable(*self._tensors(train_set))
        val_xs, val_y = self._tensors(val)
        state = train(self.module, train_data, Batchable(val_xs, val_y), self.preset.training, seed=seed,
                      checkpoint_dir=run_dir, resume=resume, progress=progress, on_epoch_end=on_epoch_end)
        self.history = dict(state.history, best_epoch=state.best_epoch, stopped_early=state.stopped_early,
                            devices=distributed.world_size())
        if self.preset.training.pattern_submodels and len(names) > 1:  # before calibrating: it calibrates them too
            self._fit_submodels(train_set, val_all, val, {k: v for k, v in kwargs.items() if k not in
                                                          ("resume", "progress", "extra_info", "standardizer")},
                                progress)
        if calibration is not val:
            val_xs, val_y = self._tensors(calibration)
        self._calibrate(calibration, val_xs, val_y, seed)
        if distributed.rank() == 0:
            from .criticism.diagnostics import warn_if_collapsed
            sample = train_data.take(torch.arange(min(len(train_data), COLLAPSE_CHECK_SUBJECTS), device=self.device))[0]
            sample = self.module.split_missing(sample)[0]  # images not acquired read as zeros here
            report = warn_if_collapsed(self.module, sample)  # PosteriorCollapseWarning and a line on stderr
            self.history["collapse"] = {"active_units": report["active_units"]["count"],
                                        "collapsed_modalities": report["collapsed_modalities"],
                                        "inactive_deep": report["inactive_deep"]}
        self.info["complete"] = True
        if writes:
            self.save(run_dir)
        return self

    def _fit_spawned(self, devices: int, train_set: Subset, val: Subset, run_dir, kwargs) -> "InVA":
        """Train in ``devices`` local processes; rank 0 writes the run folder, which is then loaded."""
        import tempfile
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(run_dir) if run_dir is not None else Path(scratch) / "run"
            distributed.spawn(_fit_worker, devices, self.preset, train_set, val, str(folder), kwargs)
            trained = InVA.load(folder, device=kwargs["device"] if kwargs["device"] != "auto" else "cpu")
        self.__dict__.update(trained.__dict__)
        return self

    def _fit_submodels(self, train_set, val_all, val_early, fit_kwargs: dict, progress: bool) -> None:
        self.submodels, records = fit_pattern_submodels(self, train_set, val_all, val_early,
                                                        fit_kwargs=fit_kwargs, progress=progress)
        self.info["pattern_submodels"] = [dataclasses.asdict(r) for r in records]

    @property
    def predictive_module(self):
        """What predicts: the module, or with pattern submodels, the routes to them (predict/routing.py)."""
        if not self.submodels:
            return self.module
        names = self.info["inputs"]
        return PatternRoutes(self.module, {names.index(n): m.module for n, m in self.submodels.items()})

    def _calibrate(self, val: Subset, val_xs, val_y, seed: int) -> None:
        cfg = self.preset.prediction
        # One predictive pass over every validation subject (the inputs each has) serves both calibrations.
        summary = posterior_predictive(self.predictive_module, val_xs, num_samples=cfg.num_samples, probs=[],
                                       generator=self._generator(seed + 1))
        self.calibrator = calibrate_patterns(self.predictive_module, val_xs, val_y, self.info["inputs"],
                                             num_samples=cfg.num_samples, method=cfg.calibration,
                                             generator=self._generator(seed + 2), summary=summary)
        self.joint = None
        if cfg.joint and len(val_y) >= 2:  # the spatial error covariance, on subjects never fitted
            factor, diag, self.joint = fit_joint(val_y, summary.mean, summary.sd,
                                                 rank=None if cfg.covariance_rank == "full" else cfg.covariance_rank,
                                                 coords=self._feature_coordinates(), seed=seed)
            self.module.outcome_covariance.set(factor, diag, self.joint.alpha, self.joint.beta)

    def _feature_coordinates(self) -> np.ndarray | None:
        """Positions of the outcome's features for volume cohorts (None for surfaces, regions, arrays)."""
        space = self.info.get("space")
        return space_from_dict(space).feature_coordinates() if space and space.get("kind") == "volume" else None

    def _generator(self, seed: int) -> torch.Generator:
        return seeded_generator(self.device, seed)

    # ---- prediction --------------------------------------------------------------------------------
    def predict(self, subset: Subset, num_samples: int | None = None, levels: list[float] | None = None,
                seed: int = 0, keep_samples: int = 0, space=None) -> Prediction:
        """Posterior predictive maps for every subject of ``subset`` (the outcome may be absent)."""
        if self.module is None:
            raise RuntimeError("fit or load the model first")
        missing = [n for n in self.info["inputs"] if n not in subset.inputs]
        if missing:
            raise InputError(f"the subjects lack the input(s) this model was trained on: {', '.join(missing)}")
        if isinstance(subset, DiskSubset):
            subset = subset.rows()
        if not self.module.joint:
            require_inputs(subset, self.info["inputs"], f"'{self.preset.name or self.preset.model.structure}'")
        cfg = self.preset.prediction
        levels = sorted(levels or cfg.levels)
        probs = sorted({p for lv in levels for p in ((1 - lv) / 2, (1 + lv) / 2)})
        xs, y = self._tensors(subset)
        joint_samples = keep_samples if self.joint is not None else 0  # then the kept draws are joint ones
        summary = posterior_predictive(self.predictive_module, xs, num_samples=num_samples or cfg.num_samples, probs=probs,
                                       observed=y, keep_samples=keep_samples - joint_samples,
                                       generator=self._generator(seed))
        st = self.standardizer
        if joint_samples:
            from .predict.joint import joint_draws
            summary.samples = np.concatenate(list(joint_draws(summary.mean, summary.sd, self.joint, joint_samples,
                                                              seed=seed)), 0)
        raw_intervals = {lv: (st.inverse_outcome_mean(summary.quantiles[(1 - lv) / 2]),
                              st.inverse_outcome_mean(summary.quantiles[(1 + lv) / 2])) for lv in levels}
        if space is None and self.info.get("space"):
            space = space_from_dict(self.info["space"])
        return Prediction(
            subjects=list(subset.subjects), outcome_name=self.info["outcome"], levels=levels,
            mean=st.inverse_outcome_mean(summary.mean), raw_sd=st.inverse_outcome_scale(summary.sd),
            raw_intervals=raw_intervals, calibrator=self.calibrator,
            raw_crps=None if summary.crps is None else st.inverse_outcome_scale(summary.crps),
            samples=None if summary.samples is None else st.inverse_outcome_mean(summary.samples),
            observed=subset.outcome, space=space, joint=self.joint,
            patterns=missingness_patterns(input_presence(subset, self.info["inputs"]), self.info["inputs"]))

    # ---- persistence -------------------------------------------------------------------------------
    def _write_config(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", json.dumps(self.preset.model_dump(), indent=2))
        atomic_write_text(run_dir / "run.json", json.dumps(self.info, indent=2))
        atomic_write_text(run_dir / "standardizer.json", json.dumps(self.standardizer.to_dict()))

    def save(self, run_dir: str | Path) -> Path:
        """Everything needed to predict later: config, weights, preprocessing, calibration, space."""
        run_dir = Path(run_dir)
        self._write_config(run_dir)
        state = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        tmp = run_dir / ".weights.safetensors.tmp"
        save_file(state, str(tmp))
        tmp.replace(run_dir / "weights.safetensors")
        atomic_write_text(run_dir / "calibration.json", json.dumps(self.calibrator.to_dict()))
        if self.joint is not None:
            tmp = run_dir / ".covariance.safetensors.tmp"
            save_file({k: v.detach().cpu().contiguous() for k, v in self.module.outcome_covariance.state().items()},
                      str(tmp))
            tmp.replace(run_dir / "covariance.safetensors")
            atomic_write_text(run_dir / "joint.json", json.dumps(self.joint.to_dict()))
        if self.history is not None:
            atomic_write_text(run_dir / "history.json", json.dumps(self.history))
        for name, submodel in self.submodels.items():
            submodel.save(submodel_folder(run_dir, name))
        return run_dir

    def _load_config(self, run_dir: Path, weights: bool = True) -> None:
        if not run_dir.is_dir():
            raise InputError(f"{run_dir}: run folder not found")
        try:
            self.info = json.loads((run_dir / "run.json").read_text())
        except FileNotFoundError:
            raise InputError(f"{run_dir}: not an inva run folder (no run.json)") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(f"{run_dir / 'run.json'}: corrupt (not valid JSON)") from None
        if not isinstance(self.info, dict) or self.info.get("format") != RUN_FORMAT:
            raise InputError(f"{run_dir}: not an inva run folder (run.json has no format '{RUN_FORMAT}')")
        try:
            self.preset = Preset.model_validate(json.loads((run_dir / "config.json").read_text()))
            self.standardizer = Standardizer.from_dict(json.loads((run_dir / "standardizer.json").read_text()))
        except Exception as exc:  # any damage to these files is the same user-facing problem
            raise InputError(f"{run_dir}: corrupt run folder ({type(exc).__name__}: {exc})".splitlines()[0]) from None
        if weights and not self.info.get("complete"):
            raise InputError(f"{run_dir}: training did not finish; continue it with `inva fit --resume {run_dir}`")

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "cpu") -> "InVA":
        run_dir = Path(run_dir)
        self = cls()
        self._load_config(run_dir)
        self.device = resolve_device(device)
        self._build(self.info["inputs"], self.info["input_sizes"], self.info["n_outcome"])
        try:
            # safetensors holds tensors only: loading a run never executes code from it.
            self.module.load_state_dict(load_file(str(run_dir / "weights.safetensors"), device=str(self.device)))
            self.calibrator = Calibrator.from_dict(json.loads((run_dir / "calibration.json").read_text()))
            if (run_dir / "covariance.safetensors").exists():  # runs from before the joint covariance have none
                state = load_file(str(run_dir / "covariance.safetensors"), device=str(self.device))
                self.module.outcome_covariance.load(state)
                self.joint = JointCalibration.from_parts(json.loads((run_dir / "joint.json").read_text()),
                                                         state["factor"].cpu().numpy(), state["diag"].cpu().numpy())
            history = run_dir / "history.json"
            self.history = json.loads(history.read_text()) if history.exists() else None
            self.submodels = {c["input"]: cls.load(submodel_folder(run_dir, c["input"]), device=device)
                              for c in self.info.get("pattern_submodels") or []}
        except Exception as exc:
            raise InputError(f"{run_dir}: corrupt run folder ({type(exc).__name__}: {exc})".splitlines()[0]) from None
        self.module.eval()
        return self

    @staticmethod
    def checkpoint_path(run_dir: str | Path) -> Path:
        return Path(run_dir) / CHECKPOINT
