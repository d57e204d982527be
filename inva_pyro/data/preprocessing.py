"""Per-feature standardisation, fitted on training subjects and kept for the way back.

Networks train best on features with zero mean and unit variance, and voxel intensities
differ by orders of magnitude between modalities (tissue probabilities vs. PET counts).
Statistics come from the training subset only, so nothing leaks from validation or test, and
from the images present only: a subject's row of NaN (an image not acquired, ``missing.py``)
is skipped, and stays NaN after ``transform_*``.

Saving, two equivalent forms with the same keys ("input_mean.gm", "input_scale.gm", ...,
"outcome_mean", "outcome_scale"):
- ``state_dict()`` / ``from_state_dict``: flat ``{key: float32 ndarray}``, for
  ``safetensors.numpy.save_file`` or ``np.savez``; compact for whole-brain maps
  (~10^5-10^6 features per statistic).
- ``to_dict()`` / ``from_dict``: the same with lists, for ``json.dumps``; exact (float32
  values survive the round trip) but several times larger on disk.
Neither holds ``site_intensity`` (each site's gain and offset field, site_intensity.py): a run folder keeps
it beside them, in ``site_intensity.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .cohort import Subset
from .site_intensity import SiteIntensity
from ..errors import InputError

# A feature that is (nearly) constant across training subjects, e.g. a voxel at the edge
# of the mask that is zero in everyone, has scale ~0: dividing by it would blow rounding
# noise (or a new subject's slightly different value) up to enormous z-scores. Scales are
# floored at this fraction of the typical (median) scale, so the floor follows the data's
# units: 1e-3 of a PET's typical sd or of a tissue probability's alike.
RELATIVE_SCALE_FLOOR = 1e-3

_INPUT_MEAN = "input_mean."
_INPUT_SCALE = "input_scale."


def _mean_and_scale(matrix: np.ndarray, name: str = "image") -> tuple[np.ndarray, np.ndarray]:
    matrix = np.asarray(matrix, dtype=np.float64)  # float64 sums: many subjects, large values
    matrix = matrix[~np.isnan(matrix).all(axis=1)] if matrix.shape[1] else matrix  # present images only
    if len(matrix) == 0:
        raise InputError(f"'{name}': no training subject has this image (every cell is empty)")
    return _floored(matrix.mean(axis=0), matrix.std(axis=0))


class _RunningMoments:
    """Per-feature mean and variance over chunks of rows (Chan et al.'s parallel Welford update).

    Merging chunk statistics rather than summing x and x^2 avoids the cancellation that
    sum-of-squares suffers for large values with small spread (PET counts, say).
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def update(self, chunk: np.ndarray) -> None:
        chunk = np.asarray(chunk, dtype=np.float64)
        chunk = chunk[~np.isnan(chunk).all(axis=1)]  # images not acquired (missing.py) do not count
        k = chunk.shape[0]
        if k == 0:
            return
        chunk_mean = chunk.mean(axis=0)
        chunk_m2 = ((chunk - chunk_mean) ** 2).sum(axis=0)
        if self.mean is None:
            self.n, self.mean, self.m2 = k, chunk_mean, chunk_m2
            return
        total = self.n + k
        delta = chunk_mean - self.mean
        self.mean = self.mean + delta * (k / total)
        self.m2 = self.m2 + chunk_m2 + delta ** 2 * (self.n * k / total)
        self.n = total

    def result(self, name: str = "image") -> tuple[np.ndarray, np.ndarray]:
        if self.mean is None:
            raise InputError(f"'{name}': no training subject has this image (every cell is empty)")
        return _floored(self.mean, np.sqrt(self.m2 / self.n))  # population sd, as in fit()


def _floored(mean: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    positive = scale[scale > 0]
    typical = float(np.median(positive)) if positive.size else 1.0
    scale = np.maximum(scale, RELATIVE_SCALE_FLOOR * typical)
    return mean.astype(np.float32), scale.astype(np.float32)


@dataclass
class Standardizer:
    """Per-feature ``mean`` and ``scale`` of every input and of the outcome.

    ``input_mean``/``input_scale``: name -> (V_k,) float32; ``outcome_mean``/
    ``outcome_scale``: (V_y,) float32, or None when fitted without an outcome. ``site_intensity``: each
    site's inputs brought to one scale before standardising (site_intensity.py), or None.
    """

    input_mean: dict[str, np.ndarray]
    input_scale: dict[str, np.ndarray]
    outcome_mean: np.ndarray | None = None
    outcome_scale: np.ndarray | None = None
    site_intensity: SiteIntensity | None = None

    @classmethod
    def fit_training(cls, subset, site_intensity: bool = False) -> "Standardizer":
        """``fit``, or ``fit_streaming`` for subjects read from disk; with ``site_intensity`` and subjects
        that have sites, each site's intensities are fitted first and the statistics are of harmonised inputs."""
        harmoniser = SiteIntensity.fit(subset) if site_intensity and subset.sites is not None else None
        if hasattr(subset, "chunks"):
            return cls.fit_streaming(subset, site_intensity=harmoniser)
        return cls.fit(subset, site_intensity=harmoniser)

    @classmethod
    def fit(cls, subset: Subset, site_intensity: SiteIntensity | None = None) -> "Standardizer":
        """Statistics of a training Subset (population sd, floored; see RELATIVE_SCALE_FLOOR), of its
        inputs as ``site_intensity`` harmonises them where given."""
        if len(subset) == 0:
            raise ValueError("cannot fit a Standardizer on an empty subset")
        input_mean, input_scale = {}, {}
        for name, matrix in subset.inputs.items():
            if site_intensity is not None:
                matrix = site_intensity.transform(name, np.asarray(matrix), subset.sites)
            input_mean[name], input_scale[name] = _mean_and_scale(matrix, name)
        outcome_mean = outcome_scale = None
        if subset.outcome is not None:
            outcome_mean, outcome_scale = _mean_and_scale(subset.outcome, "outcome")
        return cls(input_mean, input_scale, outcome_mean, outcome_scale, site_intensity)

    def without(self, name: str) -> "Standardizer":
        """The same statistics with input ``name`` left out (a model fitted without that input)."""
        return Standardizer({n: m for n, m in self.input_mean.items() if n != name},
                            {n: s for n, s in self.input_scale.items() if n != name},
                            self.outcome_mean, self.outcome_scale, self.site_intensity)

    @classmethod
    def fit_streaming(cls, subset, chunk_size: int = 64, site_intensity: SiteIntensity | None = None) -> "Standardizer":
        """The same statistics as ``fit``, from a ``streaming.DiskSubset`` read ``chunk_size``
        subjects at a time, so memory holds one chunk whatever the number of subjects."""
        if len(subset) == 0:
            raise ValueError("cannot fit a Standardizer on an empty subset")
        inputs = {name: _RunningMoments() for name in subset.inputs}
        outcome = _RunningMoments() if subset.outcome is not None else None
        for chunk in subset.chunks(chunk_size):
            for name, moments in inputs.items():
                matrix = chunk.inputs[name]
                if site_intensity is not None:
                    matrix = site_intensity.transform(name, np.asarray(matrix), chunk.sites)
                moments.update(matrix)
            if outcome is not None:
                outcome.update(chunk.outcome)
        input_mean, input_scale = {}, {}
        for name, moments in inputs.items():
            input_mean[name], input_scale[name] = moments.result(name)
        outcome_mean = outcome_scale = None
        if outcome is not None:
            outcome_mean, outcome_scale = outcome.result("outcome")
        return cls(input_mean, input_scale, outcome_mean, outcome_scale, site_intensity)

    @property
    def input_names(self) -> list[str]:
        return list(self.input_mean)

    def transform_inputs(self, subset: Subset) -> dict[str, np.ndarray]:
        """Standardised (n, V_k) float32 matrices for every input the Standardizer was fitted on."""
        missing = [name for name in self.input_mean if name not in subset.inputs]
        if missing:
            raise InputError(f"input '{missing[0]}' is missing (the model was trained on: "
                             f"{', '.join(self.input_mean)})")
        out = {}
        for name, mean in self.input_mean.items():
            matrix = np.asarray(subset.inputs[name])  # a streaming LazyMatrix is read here
            if matrix.shape[-1] != mean.shape[0]:
                raise InputError(f"input '{name}' has {matrix.shape[-1]} features; "
                                 f"the model was trained on {mean.shape[0]}")
            if self.site_intensity is not None:
                matrix = self.site_intensity.transform(name, matrix, subset.sites)
            out[name] = ((matrix - mean) / self.input_scale[name]).astype(np.float32)
        return out

    def transform_outcome(self, y: np.ndarray) -> np.ndarray:
        """Standardise outcome values (..., V_y), e.g. ``subset.outcome`` or a true mean map."""
        mean, scale = self._outcome_stats()
        return ((np.asarray(y, dtype=np.float32) - mean) / scale).astype(np.float32)

    def inverse_outcome_mean(self, m: np.ndarray) -> np.ndarray:
        """Back to image units for a location (mean, quantile, sample): ``m * scale + mean``."""
        mean, scale = self._outcome_stats()
        return (np.asarray(m, dtype=np.float32) * scale + mean).astype(np.float32)

    def inverse_outcome_scale(self, s: np.ndarray) -> np.ndarray:
        """Back to image units for a spread (sd, interval width): ``s * scale``, no shift."""
        _, scale = self._outcome_stats()
        return (np.asarray(s, dtype=np.float32) * scale).astype(np.float32)

    def _outcome_stats(self) -> tuple[np.ndarray, np.ndarray]:
        if self.outcome_mean is None or self.outcome_scale is None:
            raise ValueError("this Standardizer was fitted without an outcome")
        return self.outcome_mean, self.outcome_scale

    # ----- persistence --------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat name -> float32 array dict (see the module docstring for the keys)."""
        state = {}
        for name in self.input_mean:
            state[_INPUT_MEAN + name] = self.input_mean[name]
            state[_INPUT_SCALE + name] = self.input_scale[name]
        if self.outcome_mean is not None:
            state["outcome_mean"] = self.outcome_mean
            state["outcome_scale"] = self.outcome_scale
        return {key: np.ascontiguousarray(value, dtype=np.float32) for key, value in state.items()}

    def to_dict(self) -> dict[str, list[float]]:
        """JSON-able form of ``state_dict()`` (lists of floats)."""
        return {key: value.tolist() for key, value in self.state_dict().items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, list[float]]) -> "Standardizer":
        """Rebuild from ``to_dict()`` output (e.g. after ``json.loads``)."""
        return cls.from_state_dict(d)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, np.ndarray]) -> "Standardizer":
        """Rebuild from ``state_dict()`` output (numpy arrays or CPU tensors)."""
        arrays = {key: np.asarray(value, dtype=np.float32) for key, value in state.items()}
        names = [key[len(_INPUT_MEAN):] for key in arrays if key.startswith(_INPUT_MEAN)]
        if not names or any(_INPUT_SCALE + name not in arrays for name in names):
            raise ValueError("not a Standardizer state: need input_mean.NAME and input_scale.NAME")
        if ("outcome_mean" in arrays) != ("outcome_scale" in arrays):
            raise ValueError("not a Standardizer state: outcome_mean and outcome_scale go together")
        return cls(
            input_mean={name: arrays[_INPUT_MEAN + name] for name in names},
            input_scale={name: arrays[_INPUT_SCALE + name] for name in names},
            outcome_mean=arrays.get("outcome_mean"),
            outcome_scale=arrays.get("outcome_scale"),
        )
