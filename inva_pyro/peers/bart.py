"""``bart``: voxel-wise Bayesian additive regression trees (stochtree), one forest per outcome voxel.

What is fitted. For each outcome voxel v, independently,

    y_iv = f_v(u_iv) + sigma_v e_iv,   e_iv ~ N(0, 1),   f_v = sum_{t=1..T} g(u; tree_vt, leaves_vt)

with the BART prior (Chipman, George & McCulloch 2010: P(split at depth d) = alpha (1 + d)^-beta,
Normal leaves, inverse-gamma sigma_v^2), sampled by stochtree: ``num_gfr`` grow-from-root (XBART)
sweeps as a warm start, ``num_burnin`` discarded MCMC sweeps, then ``num_draws`` kept draws
(thinned by ``keep_every``). The features u_iv of subject i at voxel v are, for every input
defined on the outcome's voxels ("local" inputs, V_k = V_y):
- its value at v, and
- with ``neighbourhood`` r > 0 and a volume space, its mean over the (2r+1)^3 box around v
  restricted to the mask (a denoised local value).
Inputs of another size cannot be aligned with a voxel and are not used; at least one local input
is needed. Voxels are fitted in parallel worker processes (joblib, ``n_jobs``), each with its own
seed, so the result does not depend on the number of workers.

Predictive. Given the kept draws (f_v^(s), sigma_v^(s)), s = 1..S, the raw posterior predictive of
a new subject is the mixture (1/S) sum_s N(f_v^(s)(u), sigma_v^(s)^2): mean = mean_s f, raw sd^2 =
var_s f + mean_s sigma^2, raw central intervals = quantiles of ``num_samples`` Monte-Carlo draws of
the mixture. Recalibration is InVA's: ``Calibrator.fit`` on the validation subjects' z = (y - mean)
/ raw sd (the forests never saw them). sigma_v is constant over subjects, so the calibration is
what makes the intervals honest when the noise is heteroscedastic across subjects.

Saved: each voxel's model in stochtree's own JSON serialisation (``BARTModel.to_json``; one JSON
document per line of ``bart_forests.jsonl.gz``, in voxel order; reload one with
``BARTModel().from_json(line)``), and the neighbourhood index in ``weights.safetensors``.
Prediction does not go through ``BARTModel.predict``: the forests are flattened into node arrays
and traversed with numpy for all voxels, draws and subjects at once (tested to agree with
stochtree exactly; a split sends x <= threshold to the left child), which avoids re-parsing one
stochtree model per voxel at every prediction.
"""
from __future__ import annotations

import gzip
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..predict.calibration import Calibrator
from ..data.cohort import Subset
from ..errors import InputError
from ..predict.calibration import central_probs
from .base import PeerModel

FORESTS_FILE = "bart_forests.jsonl.gz"
SEED_STRIDE = 1_000_003


# ---- features ------------------------------------------------------------------------------------------
def neighbour_index(space, radius: int) -> np.ndarray | None:
    """(V, (2r+1)^3) int32 feature indices of each voxel's box neighbours inside the mask (-1: none).

    None when the space has no voxel grid (surfaces, regions) or ``radius`` is 0.
    """
    if radius <= 0 or space is None or getattr(space, "kind", None) != "volume":
        return None
    mask = np.asarray(space.mask, dtype=bool)
    lookup = np.full(mask.shape, -1, dtype=np.int64)
    lookup[mask] = np.arange(int(mask.sum()))
    coords = np.argwhere(mask)                       # C order, the order of the features
    columns = []
    for offset in itertools.product(range(-radius, radius + 1), repeat=3):
        c = coords + np.asarray(offset)
        inside = np.all((c >= 0) & (c < np.asarray(mask.shape)), axis=1)
        idx = np.full(len(coords), -1, dtype=np.int64)
        idx[inside] = lookup[tuple(c[inside].T)]
        if (idx >= 0).any():
            columns.append(idx)
    return np.stack(columns, axis=1).astype(np.int32)


def local_features(inputs: list[np.ndarray], neighbours: np.ndarray | None) -> np.ndarray:
    """(n, V, F) float64: each local input at the voxel, then (with ``neighbours``) its box mean."""
    values = [np.asarray(x, dtype=np.float64) for x in inputs]
    features = list(values)
    if neighbours is not None:
        valid = neighbours >= 0
        count = valid.sum(1)
        safe = np.where(valid, neighbours, 0)
        for x in values:
            features.append((x[:, safe] * valid).sum(-1) / count)
    return np.stack(features, axis=-1)


# ---- forests as arrays ---------------------------------------------------------------------------------
@dataclass
class Forests:
    """Every voxel's kept posterior draws as flat node arrays (V voxels x S draws x T trees).

    Trees are ordered voxel-major, then draw, then tree; ``root[j]`` is tree j's first node in the
    node arrays; a node is a leaf when ``left < 0``. f_v^(s)(u) = y_bar_v + y_std_v * sum_t leaf.
    """
    feature: np.ndarray     # (nodes,) int16 split feature
    threshold: np.ndarray   # (nodes,) float64
    left: np.ndarray        # (nodes,) int64 absolute child index, -1 for leaves
    right: np.ndarray       # (nodes,) int64
    value: np.ndarray       # (nodes,) float64 leaf value (standardised scale)
    root: np.ndarray        # (V * S * T,) int64
    y_bar: np.ndarray       # (V,)
    y_std: np.ndarray       # (V,)
    sigma2: np.ndarray      # (V, S) residual variance draws, outcome units
    num_draws: int
    num_trees: int

    @classmethod
    def from_json(cls, documents: list[str]) -> "Forests":
        return cls.concatenate([_flatten(json.loads(doc)) for doc in documents])

    @classmethod
    def concatenate(cls, parts: list["Forests"]) -> "Forests":
        offsets = np.cumsum([0] + [len(p.feature) for p in parts[:-1]])
        shift = lambda a, o: np.where(a >= 0, a + o, -1)
        return cls(
            feature=np.concatenate([p.feature for p in parts]),
            threshold=np.concatenate([p.threshold for p in parts]),
            left=np.concatenate([shift(p.left, o) for p, o in zip(parts, offsets)]),
            right=np.concatenate([shift(p.right, o) for p, o in zip(parts, offsets)]),
            value=np.concatenate([p.value for p in parts]),
            root=np.concatenate([p.root + o for p, o in zip(parts, offsets)]),
            y_bar=np.concatenate([p.y_bar for p in parts]), y_std=np.concatenate([p.y_std for p in parts]),
            sigma2=np.concatenate([p.sigma2 for p in parts]),
            num_draws=parts[0].num_draws, num_trees=parts[0].num_trees)

    @property
    def n_voxels(self) -> int:
        return len(self.y_bar)

    def draws(self, features: np.ndarray, voxels: slice) -> np.ndarray:
        """(n, v, S) posterior draws of f at ``features`` (n, v, F) for the voxels in ``voxels``."""
        S, T = self.num_draws, self.num_trees
        first, stop = voxels.start * S * T, voxels.stop * S * T
        roots = self.root[first:stop]
        n, n_vox = features.shape[0], voxels.stop - voxels.start
        tree_voxel = np.repeat(np.arange(n_vox), S * T)
        node = np.broadcast_to(roots, (n, len(roots))).copy()
        rows = np.arange(n)[:, None]
        flat = features.reshape(n, -1)                # (n, v * F): feature f of voxel j at j * F + f
        n_feat = features.shape[2]
        while True:
            left = self.left[node]
            internal = left >= 0
            if not internal.any():
                break
            column = tree_voxel * n_feat + np.maximum(self.feature[node], 0)
            go_left = flat[rows, column] <= self.threshold[node]
            node = np.where(internal, np.where(go_left, left, self.right[node]), node)
        leaves = self.value[node].reshape(n, n_vox, S, T).sum(-1)
        v = slice(voxels.start, voxels.stop)
        return self.y_bar[v, None] + self.y_std[v, None] * leaves


def _flatten(doc: dict) -> Forests:
    """One voxel's stochtree JSON document -> node arrays (numeric splits only)."""
    container = doc["forests"]["forest_0"]
    num_draws = int(doc["num_samples"])
    feature, threshold, left, right, value, root = [], [], [], [], [], []
    offset = 0
    num_trees = None
    for s in range(num_draws):
        forest = container[f"forest_{s}"]
        num_trees = int(forest["num_trees"])
        for t in range(num_trees):
            tree = forest[f"tree_{t}"]
            if tree["has_categorical_split"] or int(tree["output_dimension"]) != 1:
                raise ValueError("only numeric splits with scalar leaves are supported")
            root.append(offset)
            feature += tree["split_index"]
            threshold += tree["threshold"]
            value += tree["leaf_value"]
            left += [c + offset if c >= 0 else -1 for c in tree["left"]]
            right += [c + offset if c >= 0 else -1 for c in tree["right"]]
            offset += int(tree["num_nodes"])
    sigma2 = np.asarray(doc["parameters"]["sigma2_global_samples"], dtype=np.float64)
    if not doc.get("standardize", True):
        y_bar, y_std = 0.0, 1.0
    else:
        y_bar, y_std = float(doc["outcome_mean"]), float(doc["outcome_scale"])
    return Forests(feature=np.asarray(feature, np.int16), threshold=np.asarray(threshold, np.float64),
                   left=np.asarray(left, np.int64), right=np.asarray(right, np.int64),
                   value=np.asarray(value, np.float64), root=np.asarray(root, np.int64),
                   y_bar=np.array([y_bar]), y_std=np.array([y_std]), sigma2=sigma2[None, :],
                   num_draws=num_draws, num_trees=int(num_trees))


def _fit_voxels(features: np.ndarray, y: np.ndarray, seeds: list[int], params: dict) -> tuple[list[bytes], Forests]:
    """Worker: fit one stochtree BART model per voxel column; gzip'd JSON documents and flat arrays."""
    from stochtree import BARTModel

    documents, parts = [], []
    for j, seed in enumerate(seeds):
        model = BARTModel()
        model.sample(features[:, j, :], y[:, j], num_gfr=params["num_gfr"], num_burnin=params["num_burnin"],
                     num_mcmc=params["num_draws"],
                     general_params={"random_seed": int(seed), "num_threads": 1, "keep_every": params["keep_every"]},
                     mean_forest_params={k: params[k] for k in ("num_trees", "alpha", "beta", "min_samples_leaf",
                                                                "max_depth")})
        text = model.to_json()
        documents.append(gzip.compress(text.encode("utf-8") + b"\n", compresslevel=6))
        parts.append(_flatten(json.loads(text)))
    return documents, Forests.concatenate(parts)


# ---- the model ----------------------------------------------------------------------------------------
class VoxelBART(PeerModel):
    family = "bart"
    VOXEL_CHUNK = 32   # voxels traversed together at prediction time

    def __init__(self, preset=None):
        super().__init__(preset)
        self.forests: Forests | None = None
        self.documents: list[bytes] | None = None     # gzip members of stochtree JSON lines
        self.neighbours: np.ndarray | None = None

    def _local_inputs(self, subset: Subset) -> list[np.ndarray]:
        return [subset.inputs[name] for name in self.info["local_inputs"]]

    def _features(self, subset: Subset) -> np.ndarray:
        return local_features(self._local_inputs(subset), self.neighbours)

    def _fit_model(self, train: Subset, val: Subset, *, seed: int, space, progress: bool) -> None:
        from joblib import Parallel, delayed, effective_n_jobs
        from tqdm.auto import tqdm

        cfg = self.config
        n_out = self.info["n_outcome"]
        local = [n for n, size in zip(self.info["inputs"], self.info["input_sizes"]) if size == n_out]
        if not local:
            raise InputError("bart needs at least one input defined on the outcome's voxels "
                             f"(same number of features, {n_out}); none of {', '.join(self.info['inputs'])} is")
        self.info["local_inputs"] = local
        self.neighbours = neighbour_index(space, cfg.neighbourhood)
        self.info["neighbourhood"] = cfg.neighbourhood if self.neighbours is not None else 0
        features = self._features(train)
        y = np.asarray(train.outcome, dtype=np.float64)
        params = cfg.model_dump()
        seeds = [seed * SEED_STRIDE + v for v in range(n_out)]
        n_jobs = cfg.n_jobs
        n_chunks = min(n_out, 4 * effective_n_jobs(n_jobs))     # a few chunks per worker: balanced load
        bounds = np.linspace(0, n_out, n_chunks + 1).astype(int)
        chunks = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        tasks = Parallel(n_jobs=n_jobs, return_as="generator")(
            delayed(_fit_voxels)(features[:, c, :], y[:, c], seeds[c], params) for c in chunks)
        results = list(tqdm(tasks, total=len(chunks), desc=f"bart: {n_out} voxels", unit="chunk",
                            disable=not progress, file=sys.stderr))
        self.documents = [doc for docs, _ in results for doc in docs]
        self.forests = Forests.concatenate([f for _, f in results])
        mean, sd = self._moments(val)
        self.calibrator = Calibrator.fit(val.outcome.astype(np.float64), mean, sd,
                                         self.preset.prediction.calibration)

    def _chunks(self):
        for start in range(0, self.forests.n_voxels, self.VOXEL_CHUNK):
            yield slice(start, min(start + self.VOXEL_CHUNK, self.forests.n_voxels))

    def _draws(self, subset: Subset):
        """(voxels, f draws (n, v, S), sigma^2 draws (v, S)) for chunks of voxels in turn."""
        features = self._features(subset)
        for c in self._chunks():
            yield c, self.forests.draws(features[:, c, :], c), self.forests.sigma2[c]

    @staticmethod
    def _mixture_moments(f: np.ndarray, sigma2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and sd of (1/S) sum_s N(f_s, sigma_s^2): mean_s f, sqrt(var_s f + mean_s sigma^2)."""
        return f.mean(-1), np.sqrt(f.var(-1) + sigma2.mean(-1))

    def _moments(self, subset: Subset) -> tuple[np.ndarray, np.ndarray]:
        mean = np.empty((len(subset), self.forests.n_voxels))
        sd = np.empty_like(mean)
        for c, f, sigma2 in self._draws(subset):
            mean[:, c], sd[:, c] = self._mixture_moments(f, sigma2)
        return mean, sd

    def _predictive(self, subset, levels, num_samples, seed, keep_samples):
        mean = np.empty((len(subset), self.forests.n_voxels))
        sd = np.empty_like(mean)
        probs = central_probs(levels)
        quantiles = {p: np.empty_like(mean) for p in probs}
        keep = min(keep_samples, num_samples)
        samples = np.empty((keep, *mean.shape)) if keep else None
        for c, f, sigma2 in self._draws(subset):
            mean[:, c], sd[:, c] = self._mixture_moments(f, sigma2)
            # num_samples Monte-Carlo draws of the mixture (1/S) sum_s N(f_s, sigma_s^2) per subject and voxel
            rng = np.random.default_rng([seed, c.start])
            pick = rng.integers(0, f.shape[-1], size=(*f.shape[:2], num_samples))
            sigma = np.broadcast_to(np.sqrt(sigma2), f.shape)
            draws = (np.take_along_axis(f, pick, -1)
                     + np.take_along_axis(sigma, pick, -1) * rng.standard_normal(pick.shape))
            for p, values in zip(probs, np.quantile(draws, probs, axis=-1)):
                quantiles[p][:, c] = values
            if keep:
                samples[:, :, c] = np.moveaxis(draws[..., :keep], -1, 0)
        raw_intervals = {lv: (quantiles[(1 - lv) / 2], quantiles[(1 + lv) / 2]) for lv in levels}
        return mean, sd, raw_intervals, samples

    # ---- persistence -------------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {"n_voxels": np.array([self.forests.n_voxels], dtype=np.int64)}
        if self.neighbours is not None:
            arrays["neighbours"] = self.neighbours
        return arrays

    def _set_arrays(self, arrays) -> None:
        self.neighbours = arrays.get("neighbours")
        self._expected_voxels = int(arrays["n_voxels"][0])

    def _save_extra(self, run_dir: Path) -> None:
        # Each voxel's document is one gzip member ending in a newline; concatenated members are one
        # valid .gz file of JSON lines.
        tmp = run_dir / f".{FORESTS_FILE}.tmp"
        tmp.write_bytes(b"".join(self.documents))
        tmp.replace(run_dir / FORESTS_FILE)

    def _load_extra(self, run_dir: Path) -> None:
        blob = (run_dir / FORESTS_FILE).read_bytes()
        lines = [line for line in gzip.decompress(blob).decode("utf-8").splitlines() if line.strip()]
        if len(lines) != self._expected_voxels:
            raise ValueError(f"{FORESTS_FILE} has {len(lines)} forests for {self._expected_voxels} voxels")
        self.documents = [blob]
        self.forests = Forests.from_json(lines)
