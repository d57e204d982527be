"""Cohorts read from disk on demand, so memory is bounded by the batch and a cache, not by N.

``Cohort.from_manifest(..., lazy=True)`` checks every file up front (NIfTI headers, GIfTI vertex
counts, table rows) and returns ``DiskSubset`` views instead of matrices. A DiskSubset has the
fields of a ``cohort.Subset`` (``subjects``, ``inputs``, ``outcome``, ``truth_mean``, ``truth_sd``,
``covariates``), but its matrices are ``LazyMatrix`` objects: ``shape`` and ``len`` are known,
rows are read when indexed (``m[idx]``), through the column's space (for volumes: the mask's
bounding box through a nibabel proxy, so not even a whole file is held), and the last subjects
read stay in a shared LRU ``RowCache``.

- ``DiskSubset.rows(idx)`` gives an ordinary, materialised ``Subset`` of those rows;
- ``Standardizer.fit_streaming(disk_subset)`` fits the standardisation in chunks of rows;
- ``DiskBatches(disk_subset, standardizer, input_names, device)`` has the interface of
  ``training.Batchable`` (``len``, ``take(idx)``, ``to(device)``, ``device``): the SVI loop
  draws standardised minibatches from disk.

``np.asarray(lazy_matrix)`` still works (it reads every row), so code written for in-memory
subsets runs unchanged on a DiskSubset, only without the memory bound.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable, Sequence

import numpy as np
import pandas as pd

from .manifest import KIND_NOUN
from .subset import Subset

Source = Path | tuple[Path, ...]


class RowCache:
    """Least-recently-used cache of feature vectors, keyed by (column, file source, subject).

    ``capacity`` counts vectors; ``Cohort.from_manifest(lazy=True)`` sizes it as
    ``cache_subjects * number of image columns``. Capacity 0 disables caching.
    """

    def __init__(self, capacity: int):
        self.capacity = max(0, int(capacity))
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self.hits = self.misses = 0
        self._lock = threading.Lock()  # DiskBatches reads rows from several threads

    def get(self, key: Hashable) -> np.ndarray | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return value

    def put(self, key: Hashable, value: np.ndarray) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self._items.values())


class LazyMatrix:
    """An (n, V) float32 matrix whose rows are one image each, read from disk when indexed.

    ``m[i]`` is a (V,) row; ``m[idx]`` (a sequence, array, boolean mask or slice) is an
    (len(idx), V) ndarray; ``m.subset(idx)`` is another LazyMatrix over those rows (no read).
    """

    def __init__(self, name: str, sources: Sequence[Source], subjects: Sequence[str], space,
                 cache: RowCache):
        if len(sources) != len(subjects):
            raise ValueError("one source per subject")
        self.name = name
        self.sources = list(sources)
        self.subjects = list(subjects)
        self.space = space
        self.cache = cache
        self._what = f"{name} {KIND_NOUN[space.kind]}"

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.sources), self.space.n_features)

    @property
    def ndim(self) -> int:
        return 2

    dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.sources)

    def _positions(self, index) -> np.ndarray:
        if isinstance(index, slice):
            return np.arange(len(self))[index]
        idx = np.asarray(index)
        if idx.dtype == bool:
            return np.flatnonzero(idx)
        return idx.astype(np.int64).reshape(-1)

    @property
    def present(self) -> np.ndarray:
        """(n,) bool: which rows have an image file (the others read as NaN, see missing.py)."""
        return np.array([source is not None for source in self.sources], dtype=bool)

    def row(self, i: int) -> np.ndarray:
        source, subject = self.sources[i], self.subjects[i]
        if source is None:  # not acquired
            return np.full(self.space.n_features, np.nan, dtype=np.float32)
        # The source names the file(s); region tables are shared, so the subject is part of the key.
        key = (self.name, source, subject)
        vector = self.cache.get(key)
        if vector is None:
            vector = self.space.read(source, self._what, subject=subject)
            vector.setflags(write=False)  # shared through the cache: nobody may modify it
            self.cache.put(key, vector)
        return vector

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return self.row(int(index)).copy()
        positions = self._positions(index)
        out = np.empty((len(positions), self.space.n_features), dtype=np.float32)
        for k, i in enumerate(positions):
            out[k] = self.row(int(i))
        return out

    def subset(self, index) -> "LazyMatrix":
        positions = self._positions(index)
        return LazyMatrix(self.name, [self.sources[i] for i in positions],
                          [self.subjects[i] for i in positions], self.space, self.cache)

    def __array__(self, dtype=None, copy=None):
        # Reading everything is allowed (code written for in-memory matrices keeps working);
        # the memory bound then no longer holds.
        array = self[slice(None)]
        return array if dtype is None else array.astype(dtype)

    def __repr__(self) -> str:
        return f"LazyMatrix({self.name!r}, shape={self.shape})"


@dataclass
class DiskSubset:
    """Some subjects of a lazily read cohort; the fields of ``cohort.Subset`` with LazyMatrix
    matrices. ``subset(idx)`` is another view (nothing read); ``rows(idx)`` reads a Subset."""

    subjects: list[str]
    inputs: dict[str, LazyMatrix]
    outcome: LazyMatrix | None = None
    truth_mean: LazyMatrix | None = None
    truth_sd: LazyMatrix | None = None
    covariates: pd.DataFrame | None = None
    outcome_name: str | None = None
    spaces: dict = field(default_factory=dict)
    conditions: pd.DataFrame | None = None
    sites: pd.Series | None = None

    @classmethod
    def from_sources(cls, subjects: list[str], sources: dict[str, list[Source]], spaces: dict,
                     inputs: list[str], outcome: str | None, *, truth_mean: str | None = None,
                     truth_sd: str | None = None, covariates: pd.DataFrame | None = None,
                     cache: RowCache | None = None) -> "DiskSubset":
        cache = cache if cache is not None else RowCache(64 * len(sources))
        column = lambda name: None if name is None else LazyMatrix(  # noqa: E731
            name, sources[name], subjects, spaces[name], cache)
        return cls(subjects=list(subjects), inputs={name: column(name) for name in inputs},
                   outcome=column(outcome), truth_mean=column(truth_mean), truth_sd=column(truth_sd),
                   covariates=covariates, outcome_name=outcome,
                   spaces={name: spaces[name] for name in [*inputs, *([outcome] if outcome else [])]})

    @property
    def outcome_space(self):
        return self.spaces.get(self.outcome_name) if self.outcome_name is not None else None

    def __len__(self) -> int:
        return len(self.subjects)

    def _matrices(self) -> dict[str, LazyMatrix | None]:
        return {"outcome": self.outcome, "truth_mean": self.truth_mean, "truth_sd": self.truth_sd}

    @property
    def cache(self) -> RowCache:
        return next(iter(self.inputs.values())).cache

    def subset(self, indices) -> "DiskSubset":
        """A view on the rows at ``indices`` (positions, or a boolean mask); nothing is read."""
        idx = np.asarray(indices)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64).reshape(-1)
        return DiskSubset(
            subjects=[self.subjects[i] for i in idx],
            inputs={name: m.subset(idx) for name, m in self.inputs.items()},
            **{key: None if m is None else m.subset(idx) for key, m in self._matrices().items()},
            covariates=None if self.covariates is None else self.covariates.iloc[idx],
            outcome_name=self.outcome_name, spaces=dict(self.spaces),
            conditions=None if self.conditions is None else self.conditions.iloc[idx],
            sites=None if self.sites is None else self.sites.iloc[idx],
        )

    def rows(self, indices=None) -> Subset:
        """The rows at ``indices`` (default: all) read into an in-memory ``Subset``."""
        idx = np.arange(len(self)) if indices is None else np.asarray(indices)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64).reshape(-1)
        return Subset(
            subjects=[self.subjects[i] for i in idx],
            inputs={name: m[idx] for name, m in self.inputs.items()},
            **{key: None if m is None else m[idx] for key, m in self._matrices().items()},
            covariates=None if self.covariates is None else self.covariates.iloc[idx],
            outcome_name=self.outcome_name, spaces=dict(self.spaces),
            conditions=None if self.conditions is None else self.conditions.iloc[idx],
            sites=None if self.sites is None else self.sites.iloc[idx],
        )

    def chunks(self, size: int = 64):
        """Materialised Subsets of at most ``size`` consecutive rows, in order."""
        for start in range(0, len(self), size):
            yield self.rows(np.arange(start, min(start + size, len(self))))


class DiskBatches:
    """Standardised minibatches read from disk: the interface of ``training.Batchable``.

    ``take(idx)`` reads the subjects at ``idx`` (a tensor or array of row positions), applies
    ``standardizer`` and returns ``([x_k (B, V_k) for k in input_names], y (B, V_y))`` on
    ``device``; ``y`` is None when the subset has no outcome. Memory: two batches plus the cache.

    Files are read by ``workers`` threads at once (decompression and nibabel's reads release the
    GIL), and ``prefetch(idx)`` starts reading the next minibatch in the background while the
    current one trains; ``take`` of the same rows then waits for it. On CUDA the host batch is put
    in pinned (page-locked) memory by the reading thread and copied with ``non_blocking=True``, so
    the copy overlaps the step instead of stopping the host.
    """

    def __init__(self, subset: DiskSubset, standardizer, input_names: Sequence[str], device="cpu",
                 workers: int | None = None, conditions=None):
        """``conditions``: the subjects' conditions (covariates, sites) for every row, already on ``device``
        (small: kept whole, indexed like the images)."""
        import torch

        missing = [name for name in input_names if name not in subset.inputs]
        if missing:
            raise ValueError(f"the subset lacks input(s) {missing}")
        self.subset = subset
        self.standardizer = standardizer
        self.input_names = list(input_names)
        self.device = torch.device(device)
        self.workers = max(1, int(workers if workers is not None else min(8, os.cpu_count() or 1)))
        self._readers: ThreadPoolExecutor | None = None
        self._prefetcher: ThreadPoolExecutor | None = None
        self._pending = None  # (row positions, future) of the prefetched minibatch
        self.conditions = conditions

    def __len__(self) -> int:
        return len(self.subset)

    def conditions_of(self, idx):
        import torch

        if self.conditions is None:
            return None
        return self.conditions.rows(torch.as_tensor(self._positions(idx), device=self.device))

    @staticmethod
    def _positions(idx) -> np.ndarray:
        import torch

        if isinstance(idx, torch.Tensor):
            idx = idx.detach().cpu().numpy()  # the training loop passes host indices: no device sync
        return np.asarray(idx, dtype=np.int64).reshape(-1)

    def _rows(self, matrix: LazyMatrix, positions: np.ndarray) -> np.ndarray:
        if self.workers == 1 or len(positions) < 2:
            return matrix[positions]
        if self._readers is None:
            self._readers = ThreadPoolExecutor(self.workers, thread_name_prefix="inva-read")
        return np.stack(list(self._readers.map(matrix.row, positions.tolist())))

    def _read(self, positions: np.ndarray):
        """Host tensors of the standardised rows (pinned when the device is CUDA)."""
        import torch

        subset = self.subset
        rows = Subset(subjects=[subset.subjects[i] for i in positions],
                      inputs={name: self._rows(subset.inputs[name], positions) for name in self.input_names},
                      outcome=None if subset.outcome is None else self._rows(subset.outcome, positions))
        inputs = self.standardizer.transform_inputs(rows)
        tensors = [torch.from_numpy(inputs[name]) for name in self.input_names]
        y = None if rows.outcome is None else torch.from_numpy(self.standardizer.transform_outcome(rows.outcome))
        if self.device.type == "cuda":
            tensors = [t.pin_memory() for t in tensors]
            y = None if y is None else y.pin_memory()
        return tensors, y

    def prefetch(self, idx) -> None:
        """Start reading the rows at ``idx`` in the background (the next ``take``)."""
        positions = self._positions(idx)
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="inva-prefetch")
        self._pending = (positions, self._prefetcher.submit(self._read, positions))

    def take(self, idx):
        positions = self._positions(idx)
        pending, self._pending = self._pending, None
        if pending is not None and np.array_equal(pending[0], positions):
            xs, y = pending[1].result()
        else:
            xs, y = self._read(positions)
        non_blocking = self.device.type == "cuda"
        xs = [x.to(self.device, non_blocking=non_blocking) for x in xs]
        return xs, None if y is None else y.to(self.device, non_blocking=non_blocking)

    def to(self, device) -> "DiskBatches":
        return DiskBatches(self.subset, self.standardizer, self.input_names, device, self.workers)

    def nbytes(self) -> int:
        """Bytes of every standardised row of the inputs and the outcome (float32)."""
        sizes = [self.subset.inputs[name].shape[1] for name in self.input_names]
        if self.subset.outcome is not None:
            sizes.append(self.subset.outcome.shape[1])
        return 4 * len(self) * sum(sizes)

    def read_all(self, chunk: int = 64):
        """Every row read once, ``chunk`` subjects at a time (the next chunk read while the last
        is copied), into tensors on ``device``: ``([x_k (n, V_k)], y (n, V_y) or None)``. Host
        memory holds two chunks; the device holds the cohort (``training.Batchable(*...)``)."""
        import torch

        n = len(self)
        xs = [torch.empty(n, self.subset.inputs[name].shape[1], device=self.device) for name in self.input_names]
        y = None if self.subset.outcome is None else torch.empty(n, self.subset.outcome.shape[1], device=self.device)
        for start in range(0, n, chunk):
            part_x, part_y = self.take(np.arange(start, min(start + chunk, n)))
            if start + chunk < n:
                self.prefetch(np.arange(start + chunk, min(start + 2 * chunk, n)))
            for target, part in zip(xs, part_x):
                target[start:start + len(part)].copy_(part)
            if y is not None:
                y[start:start + len(part_y)].copy_(part_y)
        return xs, y

    def __del__(self):
        for pool in (self._readers, self._prefetcher):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
