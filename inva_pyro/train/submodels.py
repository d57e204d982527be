"""Pattern submodels: a joint model's companion for the subjects lacking one input (docs/model.md).

A joint model predicts a subject lacking input k from the product of the other inputs' experts. On the
semi-supervised design that cost some accuracy against a model never given k when k carries what no
other input shows (docs/results.md, "Training on subsets one input at a time"): the encoders the
inputs share are a compromise between the patterns. The pattern submodel (Fletcher Mercaldo & Blume
2020, Biostatistics 21:236) is the standard answer in prediction with missing inputs: fit the same
model on the inputs of the pattern only.

``fit_pattern_submodels`` fits, for each input k, the parent's preset on every training subject without
input k (subjects left with no input dropped), with the parent's seed and standardisation, so that both
models speak the same units. A subject lacking exactly k is then predicted by the equal-weight mixture of
the two (``predict/routing.py`` says why a mixture and not a choice). What each model and the mixture's
mean score on the complete validation subjects, k hidden, is recorded (``run.json``, ``pattern_submodels``).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

from ..data.missing import drop_input, input_presence
from ..predict.patterns import impose
from .loop import predictive_mean


@dataclasses.dataclass
class SubmodelRecord:
    """The submodel without ``input``: validation MSEs (standardised units) on the ``n_val`` complete
    validation subjects of the joint model with the input hidden, of the submodel, of their mixture's mean."""
    input: str
    predictor: str
    n_val: int
    val_mse_joint: float
    val_mse_submodel: float
    val_mse_mixture: float


def fit_pattern_submodels(parent, train_set, val, val_early, *, fit_kwargs: dict, progress: bool = True):
    """({input: fitted submodel}, [SubmodelRecord per input]).

    ``parent``: the fitted joint InVA; ``val``: its validation subjects before the calibration split (each
    submodel splits them alike); ``val_early``: the part that stopped the parent early, where the record is
    made; ``fit_kwargs``: the parent's fit arguments (seed, device, outcome_name, space, input_spaces)."""
    names = list(parent.info["inputs"])
    complete = val_early.subset(np.flatnonzero(input_presence(val_early, names).all(1)))
    xs, y = parent._tensors(complete)
    sizes = dict(zip(names, parent.info["input_sizes"]))
    submodels, records = {}, []
    for k, name in enumerate(names):
        if progress:
            print(f"pattern submodel without '{name}' ({k + 1} of {len(names)})", file=sys.stderr, flush=True)
        others = [n for n in names if n != name]
        preset = parent.preset.model_copy(deep=True)
        preset.training.pattern_submodels = False
        if preset.model.predictor == "local" and not any(sizes[n] == parent.info["n_outcome"] for n in others):
            preset.model.predictor = "paper"  # the local pathway needs an input on the outcome's voxels
        submodel = type(parent)(preset)
        spaces = {n: s for n, s in (fit_kwargs.get("input_spaces") or {}).items() if n in others}
        submodel.fit(drop_input(train_set, name), drop_input(val, name), progress=progress,
                     standardizer=parent.standardizer.without(name), **{**fit_kwargs, "input_spaces": spaces},
                     extra_info={"submodel_of_joint": True, "without": name})
        submodels[name] = submodel
        scores = [float("nan")] * 3
        if len(y):
            parent.module.eval()
            submodel.module.eval()
            joint = predictive_mean(parent.module, impose(xs, [j != k for j in range(len(names))]))
            alone = predictive_mean(submodel.module, [x for j, x in enumerate(xs) if j != k])
            scores = [float(((m - y) ** 2).mean()) for m in (joint, alone, (joint + alone) / 2)]
        records.append(SubmodelRecord(name, preset.model.predictor, int(len(y)), *scores))
    return submodels, records


def submodel_folder(run_dir, name: str):
    """Where the submodel without input ``name`` lives in its parent's run folder."""
    return Path(run_dir) / "submodels" / f"without-{name}"

