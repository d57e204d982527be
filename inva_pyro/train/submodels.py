"""Pattern submodels: a joint model's specialist for the subjects lacking one input (docs/model.md).

A joint model predicts a subject lacking input k from the product of the other inputs' experts. On the
semi-supervised design that costs some accuracy against a model never given k when k carries what no
other input shows (docs/results.md, "Training on subsets one input at a time"): the encoders the
inputs share are a compromise between the patterns. The pattern submodel (Fletcher Mercaldo & Blume
2020, Biostatistics 21:236) is the standard answer in prediction with missing inputs: fit the same
model on the inputs of the pattern only, and predict the pattern's subjects with it.

``fit_pattern_submodels`` fits, for each input k, the parent's preset on every training subject without
input k (subjects left with no input dropped), with the parent's seed and standardisation, so that both
models speak the same units. It keeps a submodel only where it beats the joint model on the validation
subjects that have every input, k hidden from the joint model: the choice is made on data that neither
model's weights were fitted to (both stopped early on them, on equal terms). The predictive then routes
each subject lacking exactly k to the kept submodel (``predict/predictive.py``, ``PatternRoutes``).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from ..data.missing import drop_input, input_presence
from ..predict.patterns import impose
from .loop import Batchable, validation_mse


@dataclasses.dataclass
class SubmodelChoice:
    """What decided the submodel without ``input``: validation MSEs (standardised units) on ``n_val`` subjects."""
    input: str
    val_mse_joint: float
    val_mse_submodel: float
    n_val: int
    predictor: str

    @property
    def used(self) -> bool:
        return self.val_mse_submodel < self.val_mse_joint

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "used": self.used}


def fit_pattern_submodels(parent, train_set, val, val_early, *, fit_kwargs: dict, progress: bool = True):
    """({input: fitted submodel} for the submodels kept, [SubmodelChoice per input]).

    ``parent``: the fitted joint InVA; ``val``: its validation subjects before the calibration split (each
    submodel splits them alike); ``val_early``: the part that stopped the parent early, where the choice is
    made; ``fit_kwargs``: the parent's fit arguments (seed, device, outcome_name, space, input_spaces)."""
    names = list(parent.info["inputs"])
    complete = val_early.subset(np.flatnonzero(input_presence(val_early, names).all(1)))
    xs, y = parent._tensors(complete)
    preset = parent.preset.model_copy(deep=True)
    preset.training.pattern_submodels = False
    sizes = dict(zip(names, parent.info["input_sizes"]))
    kept, choices = {}, []
    for k, name in enumerate(names):
        if progress:
            print(f"pattern submodel without '{name}' ({k + 1} of {len(names)})", file=sys.stderr, flush=True)
        others = [n for n in names if n != name]
        own = preset.model_copy(deep=True)
        if own.model.predictor == "local" and not any(sizes[n] == parent.info["n_outcome"] for n in others):
            own.model.predictor = "paper"  # the local pathway needs an input on the outcome's voxels
        submodel = type(parent)(own)
        spaces = {n: s for n, s in (fit_kwargs.get("input_spaces") or {}).items() if n in others}
        submodel.fit(drop_input(train_set, name), drop_input(val, name), progress=progress,
                     standardizer=parent.standardizer.without(name), **{**fit_kwargs, "input_spaces": spaces},
                     extra_info={"submodel_of_joint": True, "without": name})
        hidden = impose(xs, [j != k for j in range(len(names))])
        joint = validation_mse(parent.module, Batchable(hidden, y)) if len(y) else float("nan")
        alone = validation_mse(submodel.module, Batchable([x for j, x in enumerate(xs) if j != k], y)) if len(y) \
            else float("nan")
        choice = SubmodelChoice(name, joint, alone, int(len(y)), own.model.predictor)
        choices.append(choice)
        if choice.used:
            kept[name] = submodel
    return kept, choices


def submodel_folder(run_dir, name: str):
    """Where the submodel without input ``name`` lives in its parent's run folder."""
    return Path(run_dir) / "submodels" / f"without-{name}"

