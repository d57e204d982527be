"""The user-facing InVA model: fit, predict, save and load (the Python API; docs/design.md).

A thin conductor of the stages: the cohort's subsets (data) are standardised into tensors, the Pyro
program (model) is trained by SVI (train), calibrated and sampled (predict), checked (criticism), and
the run folder is written and read by ``runs.py``.
"""
from __future__ import annotations

import dataclasses
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pyro
import torch

from . import runs
from .config import Preset, load_preset
from .data.covariates import CovariateEncoder, SiteLevels
from .data.missing import (check_labeled_val, drop_input, input_presence, labeled, missingness_patterns,
                           outcome_presence, require_inputs)
from .data.preprocessing import Standardizer
from .data.site_intensity import outcome_site_start
from .data.spaces import space_from_dict
from .data.splits import calibration_split, holdout
from .data.streaming import DiskBatches, DiskSubset
from .data.subset import Subset
from .errors import InputError
from .model.conditions import Conditions, NewSiteWarning, encode_conditions
from .model.module import InVAModule
from .model.smoothing import unsmoothed_warning
from .predict.calibration import Calibrator, calibration_options, central_probs
from .predict.patterns import calibrate as calibrate_patterns
from .predict.prediction import Prediction
from .predict.predictive import posterior_predictive, seeded_generator
from .predict.routing import PatternRoutes, score_submodel
from .predict.spatial import SpatialCovariance, fit_spatial_covariance, spatial_draws
from .train import distributed
from .train.loop import Batchable, train

VERSIONED = ("inva-pyro", "torch", "pyro-ppl", "numpy", "nibabel", "arviz")
# Training subjects the end-of-fit collapse check reads: enough for the across-subject variance of
# the latent means (relative sd sqrt(2 / 127), about 13%), and a bound on what a cohort streamed
# from disk holds in memory, whatever its size.
COLLAPSE_CHECK_SUBJECTS = 128


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
        self.spatial_covariance: SpatialCovariance | None = None
        self.covariates: CovariateEncoder | None = None  # how the covariates a fit conditions on are encoded
        self.sites: SiteLevels | None = None              # the training sites (data/covariates.py)
        self.history: dict | None = None
        self.submodels: dict[str, "InVA"] = {}  # pattern submodels, by the input each lacks (predict/routing.py)
        self.info: dict = {}
        self.device = torch.device("cpu")

    @classmethod
    def from_preset(cls, name_or_path: str | Path = "inva") -> "InVA":
        return cls(load_preset(name_or_path))

    @property
    def needs_every_input(self) -> bool:
        """Whether a subject must have every input to be predicted (all structures but ``joint``)."""
        return self.preset.model.structure != "joint"

    def fit(self, train_set: Subset, val: Subset | None = None, *, seed: int = 0, device: str = "auto",
            devices: int = 1, run_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
            on_epoch_end=None, extra_info: dict | None = None, standardizer: Standardizer | None = None) -> "InVA":
        """Train on ``train_set``; ``val`` drives early stopping and calibration.

        The subsets name their outcome and carry the feature spaces (``Cohort.train`` etc. do), and the
        covariates and sites to condition on when the cohort was read with them. Without ``val`` a seeded
        share (``training.val_share``) of ``train_set`` is held out. With ``run_dir`` the run folder is written
        as training goes (a checkpoint per epoch); ``resume=True`` continues the interrupted run found there.
        ``devices > 1`` trains in that many local processes (train/distributed.py; inside a ``torchrun`` job
        the process group is joined from the environment). ``extra_info`` is recorded in run.json;
        ``standardizer``: these statistics, not ``train_set``'s (a pattern submodel speaks its parent's units).
        """
        train_set, val = self._checked_subsets(train_set, val, seed)
        kwargs = dict(seed=seed, device=device, resume=resume, progress=progress, extra_info=extra_info,
                      standardizer=standardizer)
        if devices > 1 and not distributed.is_distributed():
            return self._fit_spawned(devices, train_set, val, run_dir, kwargs)
        self.device = distributed.join_if_launched(distributed.resolve_device(device))
        pyro.set_rng_seed(seed)
        if isinstance(val, DiskSubset):
            val = val.rows()  # validation subjects are used every epoch and for calibration: keep them in memory
        val_all = val
        # (after the spawn: each worker splits alike) early stopping on one part, calibration on the other
        val, calibration = calibration_split(val, self.preset.training.calibration_share, seed)
        if resume:
            self._read_config(Path(run_dir))
        else:
            self._start(train_set, val, calibration, seed, standardizer, extra_info)
        self._build()
        if self.sites is not None and not resume:  # each site's outcome calibration starts at its moments
            self.module.conditioning.start_sites(*outcome_site_start(train_set, self.sites.levels, self.standardizer))
        unsmoothed = unsmoothed_warning(self.preset.model, self.module.n_neighbour_pairs, self.info.get("space"))
        if unsmoothed:
            warnings.warn(unsmoothed, RuntimeWarning, stacklevel=2)
        writes = run_dir is not None and distributed.rank() == 0
        if writes and not resume:
            runs.write_config(run_dir, self.preset, self.standardizer)
            runs.write_info(run_dir, self.info)
        train_data = self._training_data(train_set)
        state = train(self.module, train_data, Batchable(*self.tensors(val), self.conditions(val)), self.preset.training, seed=seed,
                      checkpoint_dir=run_dir, resume=resume, progress=progress, on_epoch_end=on_epoch_end)
        self.history = dict(state.history, best_epoch=state.best_epoch, stopped_early=state.stopped_early,
                            devices=distributed.world_size())
        self.submodels = {}
        if self.preset.training.pattern_submodels and len(train_set.inputs) > 1:  # before calibrating: it calibrates them too
            self._fit_submodels(train_set, val_all, val, seed=seed, device=device, progress=progress)
        self._calibrate(calibration, seed)
        if distributed.rank() == 0:
            self._check_fit(train_data, calibration)
        self.info["complete"] = True
        if writes:
            self.save(run_dir)
        return self

    def _checked_subsets(self, train_set: Subset, val: Subset | None, seed: int) -> tuple[Subset, Subset]:
        """(training subjects, labeled validation subjects), with a seeded hold-out when ``val`` is empty."""
        if val is None or len(val) == 0:
            train_set, val = holdout(train_set, self.preset.training.val_share, seed)
        if train_set.outcome is None or val.outcome is None:
            raise InputError("fit needs an outcome column for the training and validation subjects")
        # Every training subject counts (reconstruction of its inputs present, the outcome where present);
        # validation subjects drive early stopping and calibration, so only those with the outcome are kept.
        outcome = train_set.outcome_name or "y"
        check_labeled_val(val, outcome)
        if not outcome_presence(train_set).any():
            raise InputError(f"no training subject has the outcome '{outcome}'")
        return train_set, labeled(val)

    def _start(self, train_set, val: Subset, calibration: Subset, seed: int, standardizer, extra_info) -> None:
        """The standardisation and run.json of a new fit."""
        if standardizer is None:
            standardizer = Standardizer.fit_training(train_set, self.preset.training.site_intensity)
        self.standardizer = standardizer
        self.covariates = None if train_set.conditions is None else CovariateEncoder.fit(train_set.conditions)
        self.sites = None if train_set.sites is None else SiteLevels.fit(train_set.sites)
        self.info = runs.new_info("inva", train_set, seed=seed, versioned=VERSIONED, n_val=len(val),
                                  n_calibration=len(calibration), n_train_labeled=int(outcome_presence(train_set).sum()),
                                  covariates=self.covariates.names if self.covariates else [],
                                  site=self.sites.column if self.sites else None, site_units="image" if self.sites else None,
                                  **(extra_info or {}))

    def _build(self) -> None:
        """The Pyro module for run.json's inputs, on the model's device."""
        info, spaces, grids = self.info, self.info.get("input_spaces") or {}, []
        for name in info["inputs"]:  # (grid shape, flat mask indices) where an input is an image grid
            space = space_from_dict(spaces[name]) if name in spaces else None
            shape = getattr(space, "grid_shape", None)
            grids.append((shape, np.flatnonzero(space.mask)) if shape and len(shape) in (2, 3) else None)
        self.module = InVAModule(info["inputs"], info["input_sizes"], info["n_outcome"], self.preset.model, grids,
                                 self._neighbour_pairs(), covariate_spec=self.covariates.spec() if self.covariates else None,
                                 n_sites=len(self.sites.levels) if self.sites else 0).to(self.device)
        info["neighbour_pairs"] = self.module.n_neighbour_pairs
        if info.get("site_units") == "image":  # the site's outcome offset and gain act in image units
            self.module.conditioning.set_outcome_units(self.standardizer.outcome_mean, self.standardizer.outcome_scale)

    def _neighbour_pairs(self) -> np.ndarray | None:
        """The outcome space's neighbour graph, where ``spatial_smoothing`` asks for one (model/smoothing.py)."""
        space = self.info.get("space")
        if self.preset.model.spatial_smoothing <= 0 or not space:
            return None
        return space_from_dict(space).neighbour_pairs()

    def _training_data(self, train_set):
        """In-memory tensors, or minibatches read from disk (read once into device memory where they fit)."""
        conditions = self.conditions(train_set)
        if not isinstance(train_set, DiskSubset):
            return Batchable(*self.tensors(train_set), conditions)
        data = DiskBatches(train_set, self.standardizer, self.info["inputs"], self.device, conditions=conditions)
        if distributed.fits_on_device(data.nbytes(), self.device):
            return Batchable(*data.read_all(), conditions)
        return data

    def conditions(self, subset) -> Conditions | None:
        """The covariates (encoded as in training) and site numbers of ``subset``'s subjects, on the model's
        device; None for a model fitted without them (model/conditions.py)."""
        return encode_conditions(subset, self.covariates, self.sites, self.device)

    def tensors(self, subset: Subset, with_outcome: bool = True):
        """([x_k (n, V_k)], y (n, V_y) or None): ``subset`` standardised, on the model's device (NaN rows:
        images not acquired)."""
        inputs = self.standardizer.transform_inputs(subset)
        xs = [torch.as_tensor(inputs[name], device=self.device) for name in self.info["inputs"]]
        y = None
        if with_outcome and subset.outcome is not None:
            y = torch.as_tensor(self.standardizer.transform_outcome(subset.outcome), device=self.device)
        return xs, y

    def _fit_spawned(self, devices: int, train_set: Subset, val: Subset, run_dir, kwargs) -> "InVA":
        """Train in ``devices`` local processes; rank 0 writes the run folder, which is then loaded."""
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(run_dir) if run_dir is not None else Path(scratch) / "run"
            distributed.spawn(_fit_worker, devices, self.preset, train_set, val, str(folder), kwargs)
            trained = InVA.load(folder, device=kwargs["device"] if kwargs["device"] != "auto" else "cpu")
        self.__dict__.update(trained.__dict__)
        return self

    def _fit_submodels(self, train_set, val: Subset, val_early: Subset, *, seed: int, device: str,
                       progress: bool) -> None:
        """A pattern submodel per input k (predict/routing.py): this preset fitted without k, in this model's
        units, on every training subject left with an input; ``val``: the validation subjects before the
        calibration split (each submodel splits them alike); ``val_early``: where the records are made."""
        names, sizes = self.info["inputs"], dict(zip(self.info["inputs"], self.info["input_sizes"]))
        complete = val_early.subset(np.flatnonzero(input_presence(val_early, names).all(1)))
        xs, y = self.tensors(complete)
        records = []
        for k, name in enumerate(names):
            if progress:
                print(f"pattern submodel without '{name}' ({k + 1} of {len(names)})", file=sys.stderr, flush=True)
            preset = self.preset.model_copy(deep=True)
            preset.training.pattern_submodels = False
            if preset.model.predictor == "local" and not any(sizes[n] == self.info["n_outcome"] for n in names if n != name):
                preset.model.predictor = "paper"  # the local pathway needs an input on the outcome's voxels
            submodel = InVA(preset).fit(drop_input(train_set, name), drop_input(val, name), seed=seed, device=device,
                                        progress=progress, standardizer=self.standardizer.without(name),
                                        extra_info={"submodel_of_joint": True, "without": name})
            self.submodels[name] = submodel
            records.append(score_submodel(self.module, submodel.module, xs, y, k, name, preset.model.predictor))
        self.info["pattern_submodels"] = [dataclasses.asdict(r) for r in records]

    @property
    def predictive_module(self):
        """What predicts: the module, or with pattern submodels, the routes to them (predict/routing.py)."""
        if not self.submodels:
            return self.module
        names = self.info["inputs"]
        return PatternRoutes(self.module, {names.index(n): m.module for n, m in self.submodels.items()})

    def _calibrate(self, calibration: Subset, seed: int) -> None:
        """The voxel calibrator and the outcome's spatial covariance, on subjects never fitted."""
        cfg = self.preset.prediction
        xs, y = self.tensors(calibration)
        conditions, groups, options = self.conditions(calibration), self.groups(calibration), calibration_options(cfg)
        # One predictive pass over every calibration subject (the inputs each has) serves both calibrations.
        summary = posterior_predictive(self.predictive_module, xs, num_samples=cfg.num_samples, probs=[],
                                       generator=self._generator(seed + 1), conditions=conditions)
        self.calibrator = calibrate_patterns(self.predictive_module, xs, y, self.info["inputs"],
                                             num_samples=cfg.num_samples, method=cfg.calibration,
                                             generator=self._generator(seed + 2), summary=summary,
                                             conditions=conditions, groups=groups, **options)
        self.spatial_covariance = None
        if cfg.spatial_covariance and len(y) >= 2:
            factor, diag, self.spatial_covariance = fit_spatial_covariance(
                y, summary.mean, summary.sd, rank=None if cfg.covariance_rank == "full" else cfg.covariance_rank,
                coords=self._feature_coordinates(), seed=seed, groups=groups, **options)
            self.module.outcome_covariance.set(factor, diag, self.spatial_covariance.alpha,
                                               self.spatial_covariance.beta)

    def _feature_coordinates(self) -> np.ndarray | None:
        """Positions of the outcome's features for volume cohorts (None for surfaces, regions, arrays)."""
        space = self.info.get("space")
        return space_from_dict(space).feature_coordinates() if space and space.get("kind") == "volume" else None

    def _check_fit(self, train_data, calibration: Subset) -> None:
        """After training (criticism/): a PosteriorCollapseWarning and a line on stderr when latents carry
        nothing, and the validation subjects' input ELBOs that novelty scores are measured against."""
        from .criticism.diagnostics import warn_if_collapsed
        from .criticism.novelty import input_elbo, reference
        sample = train_data.take(torch.arange(min(len(train_data), COLLAPSE_CHECK_SUBJECTS), device=self.device))[0]
        report = warn_if_collapsed(self.module, self.module.split_missing(sample)[0])  # not acquired: zeros
        self.history["collapse"] = {"active_units": report["active_units"]["count"],
                                    "collapsed_modalities": report["collapsed_modalities"],
                                    "inactive_deep": report["inactive_deep"]}
        xs, _ = self.tensors(calibration, with_outcome=False)
        self.info["novelty_reference"] = reference(input_elbo(self.module, xs, self.conditions(calibration)))

    def novelty(self, subset: Subset) -> np.ndarray | None:
        """(n,) how unlike the fit's validation subjects each subject's inputs are, as a robust z score of the
        model's ELBO of them (criticism/novelty.py); None for a run from before novelty scores."""
        from .criticism.novelty import input_elbo, novelty
        if self.info.get("novelty_reference") is None:
            return None
        xs, _ = self.tensors(subset, with_outcome=False)
        return novelty(input_elbo(self.module, xs, self.conditions(subset)), self.info["novelty_reference"])

    def _generator(self, seed: int) -> torch.Generator:
        return seeded_generator(self.device, seed)

    # ---- prediction --------------------------------------------------------------------------------
    def predict(self, subset: Subset, num_samples: int | None = None, levels: list[float] | None = None,
                seed: int = 0, keep_samples: int = 0, space=None) -> Prediction:
        """Posterior predictive maps for every subject of ``subset`` (the outcome may be absent).
        ``keep_samples``: also keep that many draws of whole images (correlated as the fitted spatial
        covariance says, where the run has one)."""
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
        xs, y = self.tensors(subset)
        unseen = self.unseen_sites(subset)
        if unseen:
            warnings.warn(f"site(s) {', '.join(unseen)} not seen in training: predicted with the pooled site "
                          "(inva adapt fits a new site from a few of its subjects with the outcome)", NewSiteWarning,
                          stacklevel=2)
        correlated = keep_samples if self.spatial_covariance is not None else 0
        summary = posterior_predictive(self.predictive_module, xs, num_samples=num_samples or cfg.num_samples,
                                       probs=central_probs(levels), observed=y, keep_samples=keep_samples - correlated,
                                       generator=self._generator(seed), conditions=self.conditions(subset))
        if correlated:
            summary.samples = np.concatenate(list(spatial_draws(summary.mean, summary.sd, self.spatial_covariance,
                                                                correlated, seed=seed)), 0)
        st = self.standardizer
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
            observed=subset.outcome, space=space, spatial_covariance=self.spatial_covariance, groups=self.groups(subset),
            patterns=missingness_patterns(input_presence(subset, self.info["inputs"]), self.info["inputs"]))

    def groups(self, subset) -> list[str] | None:
        """Each subject's calibration group, its site (a site calibrated on none gets the pooled calibration)."""
        return None if self.sites is None or subset.sites is None else list(subset.sites.fillna("").astype(str))

    def unseen_sites(self, subset) -> list[str]:
        """The sites of ``subset`` that training never saw (predicted with the pooled site)."""
        return [] if self.sites is None or subset.sites is None else self.sites.unseen(subset.sites)

    # ---- persistence (runs.py) ---------------------------------------------------------------------
    def save(self, run_dir: str | Path) -> Path:
        """Everything needed to predict later: config, weights, preprocessing, calibration, spaces."""
        run_dir = Path(run_dir)
        runs.write_config(run_dir, self.preset, self.standardizer)
        runs.write_conditions(run_dir, self.covariates, self.sites)
        runs.write_tensors(run_dir, "weights.safetensors", self.module.state_dict())
        runs.write_json(run_dir, "calibration.json", self.calibrator.to_dict())
        if self.spatial_covariance is not None:
            runs.write_tensors(run_dir, "covariance.safetensors", self.module.outcome_covariance.state())
            runs.write_json(run_dir, "covariance.json", self.spatial_covariance.to_dict())
        if self.history is not None:
            runs.write_json(run_dir, "history.json", self.history)
        for name, submodel in self.submodels.items():
            submodel.save(runs.submodel_folder(run_dir, name))
        runs.write_info(run_dir, self.info)  # last: a folder whose run.json says complete is whole
        return run_dir

    def _read_config(self, run_dir: Path) -> None:
        self.info = runs.read_info(run_dir)
        self.preset, self.standardizer = runs.read_config(run_dir)
        self.covariates, self.sites = runs.read_conditions(run_dir)

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "cpu") -> "InVA":
        run_dir = Path(run_dir)
        self = cls()
        self._read_config(run_dir)
        if not self.info.get("complete"):
            raise InputError(f"{run_dir}: training did not finish; continue it with `inva fit --resume {run_dir}`")
        self.device = distributed.resolve_device(device)
        self._build()
        with runs.reading(run_dir):
            self.module.load_state_dict(runs.read_tensors(run_dir, "weights.safetensors", self.device))
            self.calibrator = Calibrator.from_dict(runs.read_json(run_dir, "calibration.json"))
            self._load_covariance(run_dir)
            self.history = runs.read_json(run_dir, "history.json", default=None)
            self.submodels = {c["input"]: cls.load(runs.submodel_folder(run_dir, c["input"]), device=device)
                              for c in self.info.get("pattern_submodels") or []}
        self.module.eval()
        return self

    def _load_covariance(self, run_dir: Path) -> None:
        if not (run_dir / "covariance.safetensors").exists():  # runs from before the spatial covariance have none
            return
        state = runs.read_tensors(run_dir, "covariance.safetensors", self.device)
        self.module.outcome_covariance.load(state)
        # runs written before its rename keep the covariance's calibration in joint.json
        name = "covariance.json" if (run_dir / "covariance.json").exists() else "joint.json"
        self.spatial_covariance = SpatialCovariance.from_parts(runs.read_json(run_dir, name),
                                                               state["factor"].cpu().numpy(), state["diag"].cpu().numpy())
