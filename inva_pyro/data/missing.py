"""Images that were not acquired: empty manifest cells (docs/cohorts.md).

A subject lacking an image has a row of NaN in that image's matrix (``Subset``), in its
standardised matrix and in the tensors built from it; a ``streaming.LazyMatrix`` knows which rows
have a file (``present``) without reading any. Images are checked for NaN when read, so a NaN row
always means "not acquired". The Pyro program (``model/module.py``) turns NaN rows into presence
masks and zero-filled tensors (``fill_missing``), so no NaN ever enters a computation.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import InputError

# At least this many validation subjects with the outcome: early stopping and calibration need it.
MIN_LABELED_VAL = 2


def row_present(matrix) -> np.ndarray:
    """(n,) bool: which rows of an (n, V) matrix hold an image (not a row of NaN)."""
    present = getattr(matrix, "present", None)
    if present is not None:
        return np.asarray(present, dtype=bool)
    array = np.asarray(matrix)
    return ~np.isnan(array).all(axis=1) if array.shape[1] else np.ones(len(array), dtype=bool)


def input_presence(subset, names=None) -> np.ndarray:
    """(n, K) bool: subject i has input k (``names``: the order of k, default the subset's)."""
    names = list(subset.inputs) if names is None else list(names)
    if not names:
        return np.ones((len(subset), 0), dtype=bool)
    return np.stack([row_present(subset.inputs[name]) for name in names], axis=1)


def outcome_presence(subset) -> np.ndarray:
    """(n,) bool: subject i has the outcome (all False when the subset has no outcome at all)."""
    if subset.outcome is None:
        return np.zeros(len(subset), dtype=bool)
    return row_present(subset.outcome)


def labeled(subset):
    """The subjects of ``subset`` that have the outcome."""
    return subset.subset(np.flatnonzero(outcome_presence(subset)))


def complete_cases(subset, names=None, outcome: bool = True):
    """The subjects with every input (and, with ``outcome``, the outcome): what a discriminative peer fits on."""
    keep = input_presence(subset, names).all(axis=1)
    if outcome:
        keep &= outcome_presence(subset)
    return subset.subset(np.flatnonzero(keep))


def drop_input(subset, name: str):
    """The subjects of ``subset`` as if input ``name`` did not exist: its column removed, and the subjects
    left with no input dropped (works on in-memory and on lazily read subsets)."""
    inputs = {k: v for k, v in subset.inputs.items() if k != name}
    if not inputs:
        raise ValueError(f"cannot drop '{name}': it is the only input")
    keep = input_presence(subset, list(inputs)).any(axis=1)
    spaces = {k: v for k, v in subset.spaces.items() if k != name}
    return dataclasses.replace(subset, inputs=inputs, spaces=spaces).subset(np.flatnonzero(keep))


def check_labeled_val(val, outcome_name: str = "outcome") -> None:
    """Validation subjects drive early stopping and calibration: they need the outcome."""
    n = int(outcome_presence(val).sum())
    if n < MIN_LABELED_VAL:
        raise InputError(f"{n} validation subject(s) have the outcome '{outcome_name}' (of {len(val)}); "
                         f"early stopping and calibration need at least {MIN_LABELED_VAL}: give more "
                         f"subjects with the outcome the split 'val'")


def require_inputs(subset, names, model_name: str, where: str | None = None) -> None:
    """A model that cannot do without an input refuses subjects lacking one (one line, after ``where``)."""
    presence = input_presence(subset, names)
    missing = np.argwhere(~presence)
    if len(missing):
        i, k = missing[0]
        raise InputError(f"{where + ': ' if where else ''}subject '{subset.subjects[i]}' lacks input '{list(names)[k]}' "
                         f"({int((~presence).any(axis=1).sum())} subject(s) lack an input); model "
                         f"{model_name} needs every input: fit a joint model (--model inva-joint) to predict "
                         f"from the inputs present")


def missingness_patterns(presence: np.ndarray, names) -> list[str]:
    """A label per subject: 'complete', or 'no ' + the inputs it lacks ('no fa+md')."""
    names = list(names)
    return ["complete" if row.all() else "no " + "+".join(n for n, p in zip(names, row) if not p)
            for row in np.asarray(presence, dtype=bool)]


def fill_missing(x):
    """(zero-filled tensor, (B,) bool presence) of a tensor whose missing rows are NaN (torch)."""
    import torch
    present = ~torch.isnan(x).all(dim=-1)
    return torch.nan_to_num(x, nan=0.0), present


def hide_inputs(xs: list, share: float, generator=None, scheme: str = "each") -> list:
    """The inputs with some present ones of each subject hidden (NaN rows), never every input of a
    subject: training on random subsets of the inputs, as MVAE does (Wu & Goodman 2018), teaches a
    joint model to predict from any subset.

    ``scheme`` "each": every present input is hidden with probability ``share`` (a random present one
    is kept where all would go). "one": with probability ``share`` one present input, chosen uniformly,
    is hidden (subjects with a single input keep it). Under "each" a given one-input-missing pattern
    gets at most share (1 - share)^(K-1) of the steps (0.148 at K = 3); under "one" it gets share / K.
    Drawn on the inputs' device, without a host synchronisation."""
    import torch
    present = torch.stack([~torch.isnan(x).all(dim=-1) for x in xs], dim=-1)              # (B, K)
    draws = torch.rand(present.shape, device=present.device, generator=generator)
    # the present input with the largest draw: a uniform choice among the present ones
    pick = torch.where(present, draws, torch.full_like(draws, -1.0)).argmax(dim=-1, keepdim=True)
    chosen = torch.zeros_like(present).scatter(-1, pick, True)
    if scheme == "one":
        subject_draw = torch.rand(present.shape[:1] + (1,), device=present.device, generator=generator)
        hide = chosen & (subject_draw < share) & (present.sum(dim=-1, keepdim=True) >= 2)
    elif scheme == "each":
        hide = present & (draws < share)
        lost = ~(present & ~hide).any(dim=-1, keepdim=True)
        hide &= ~(lost & chosen)  # the chosen one is kept where every present one would be hidden
    else:
        raise ValueError(f"unknown input dropout scheme {scheme!r} (known: each, one)")
    return [torch.where(h[:, None], torch.full_like(x, float("nan")), x) for x, h in zip(xs, hide.unbind(-1))]
