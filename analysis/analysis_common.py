"""What several analysis scripts share: presets with settings changed, simulated cohorts, the ``paper``
design's patterns and factor posterior, the regions the calibration studies score.

Every script here runs as a file (``python analysis/NAME.py ...`` from the repository root) and tests
load scripts from their paths, so a script that uses this module puts its own folder on ``sys.path``
with this one line, the same in every script, and imports the module under one name::

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's shared module
    import analysis_common as common  # noqa: E402

Dependencies go one way: scripts import this module, and it imports no script. The one script that
imports another is ``simulation_study.py`` (``--scenario semisupervised`` runs
``semisupervised_study.py``), which nothing imports back.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

LEVELS = [0.5, 0.8, 0.9, 0.95]              # central intervals scored by the studies
TRAIN_SHARE = 0.6                           # simulate.default_split: 60% train, 20% val, 20% test

# --quick: tiny networks and few epochs or trees, by model family (dotted preset keys), for smoke runs.
TINY_NETWORKS = {"model.shallow_dim": 3, "model.deep_dim": 2, "model.hidden": 16, "model.shared_hidden": 8,
                 "model.predictor_hidden": 6, "model.local_hidden": 8, "model.local_channels": 2,
                 "model.voxel_embedding": 2, "model.context_dim": 3}
QUICK = {"inva": {**TINY_NETWORKS, "training.epochs": 2, "training.batch_size": 8},
         "bart": {"model.num_trees": 2, "model.num_gfr": 2, "model.num_draws": 5, "model.n_jobs": 1},
         "tensor": {"model.cv_folds": 3, "model.n_alphas": 5}}

# Ablations, by name where a script takes a preset: a preset of models/ with some settings changed. The
# VAE peers with the paper's predictor (latent statistics only, no local voxel pathway) isolate what the
# shared (integrative) level adds when the prediction must go through the latents, as in inva-paper.
# The inva-deep* variants change only the shared (deep) level, for the tuning in docs/results.md.
VARIANTS = {"vae-concat-paper": ("vae-concat", {"model.predictor": "paper"}),
            "vae-separate-paper": ("vae-separate", {"model.predictor": "paper"}),
            "inva-deep2": ("inva", {"model.deep_dim": 2}),
            "inva-deep4": ("inva", {"model.deep_dim": 4}),
            "inva-deep2-kl0.3": ("inva", {"model.deep_dim": 2, "model.deep_kl_weight": 0.3}),
            # the spatial smoothing prior of the predictor's maps (docs/model.md): off, or stronger, in inva;
            # on in the peers
            "inva-nosmooth": ("inva", {"model.spatial_smoothing": 0.0}),
            "inva-smooth1000": ("inva", {"model.spatial_smoothing": 1000.0}),
            "vae-concat-smooth": ("vae-concat", {"model.spatial_smoothing": 1000.0}),
            "vae-separate-smooth": ("vae-separate", {"model.spatial_smoothing": 1000.0})}


# --------------------------------------------------------------------------- presets

def preset_with(name: str, *changes: dict, quick: bool = False, by_family: dict | None = None):
    """The preset ``name`` (a name in models/, a TOML path or one of ``VARIANTS``) with settings changed.

    Settings are dotted keys ({"training.epochs": 3}), applied in this order: with ``quick``, the
    ``QUICK`` settings of the preset's model family; the variant's own; ``by_family[family]`` (settings
    only the presets of that family take, e.g. {"bart": {"model.n_jobs": 1}}); then each of ``changes``.
    The result is validated as a whole preset (``inva_pyro.tune.search_space.apply``).
    """
    from inva_pyro.config import load_preset
    from inva_pyro.tune.search_space import apply

    base, variant = VARIANTS.get(name, (name, {}))
    preset = load_preset(base)
    settings = dict(QUICK.get(preset.model.family, {})) if quick else {}
    settings.update(variant)
    settings.update((by_family or {}).get(preset.model.family, {}))
    for change in changes:
        settings.update(change)
    return apply(preset, settings, where=f"the settings of {name}")


# --------------------------------------------------------------------------- simulated cohorts

def simulated_cohort(out: Path, design: str, n_subjects: int, seed: int, **options):
    """The cohort of ``design`` (``write_cohort(folder, design, n_subjects, seed, **options)``), simulated
    once into OUT/cohorts/<design>-n<N>[-u<U>][-<option>...]-s<seed>, then read back with
    ``Cohort.from_dir`` as ``inva fit`` reads it. Re-runs reuse the folder."""
    from inva_pyro.data.cohort import Cohort
    from inva_pyro.data.simulate import write_cohort

    tags = "".join(f"-{_tag(key, value)}" for key, value in options.items() if value is not None)
    folder = Path(out) / "cohorts" / f"{design}-n{n_subjects}{tags}-s{seed}"
    if not (folder / "cohort.json").exists():
        write_cohort(folder, design, n_subjects, seed, **options)
    return Cohort.from_dir(folder, seed=seed)


def _tag(key: str, value) -> str:
    return {"unlabeled": f"u{value}", "voxel_mm": f"{value}mm"}.get(key, f"{key}-{value}")


def pixel_space(grid):
    """The paper design's 2-D grid as a volume of 2 mm pixels: its neighbours feed the smoothing prior, its
    coordinates the spatial covariance's random regions."""
    from inva_pyro.data.spaces import VolumeSpace
    grid = tuple(grid)
    return VolumeSpace(shape=(*grid, 1), affine=np.diag([2.0, 2.0, 2.0, 1.0]), header=None,
                       mask=np.ones((*grid, 1), dtype=bool))


def simulate_split(seed: int, cfg: dict):
    """One seed of the ``paper`` design in memory (or of the ``volume`` design, written to disk), with
    max(cfg["sizes"]) training, cfg["n_val"] validation and cfg["n_test"] test subjects: (cohort with every
    subject, {"train", "val", "test"}: index arrays).

    cfg: sizes, n_val, n_test, grid (None: the design's), noise ("independent" or "smooth"), design
    ("paper" or "volume"), and for the volume design voxel_mm and out (where the cohort is written).
    """
    import pandas as pd

    from inva_pyro.data.cohort import Cohort
    from inva_pyro.data.simulate import PAPER_GRID, default_split, simulate_paper

    n_total = max(cfg["sizes"]) + cfg["n_val"] + cfg["n_test"]
    noise = cfg.get("noise", "independent")
    if cfg.get("design") == "volume":
        cohort = simulated_cohort(cfg["out"], "volume", n_total, seed, voxel_mm=cfg["voxel_mm"], noise=noise)
        split = pd.read_csv(cohort.manifest_path)["split"].to_numpy()
        return cohort, {name: np.flatnonzero(split == name) for name in ("train", "val", "test")}
    grid = cfg.get("grid") or PAPER_GRID
    sim = simulate_paper(n_total, seed, grid=grid, noise=noise)
    flat = lambda a: np.asarray(a).reshape(n_total, -1)  # noqa: E731
    if n_total == 500 and cfg["n_val"] == cfg["n_test"] == 100:
        split = default_split(n_total, seed)          # exactly the design's own split
    else:
        rng = np.random.default_rng(seed + 1)
        split = np.array(["train"] * n_total, dtype=object)
        order = rng.permutation(n_total)
        split[order[:cfg["n_val"]]] = "val"
        split[order[cfg["n_val"]:cfg["n_val"] + cfg["n_test"]]] = "test"
    cohort = Cohort.from_arrays({k: flat(v) for k, v in sim["inputs"].items()}, flat(sim["outcome"]),
                                split=list(split), truth_mean=flat(sim["true_mean"]),
                                truth_sd=flat(sim["true_sd"]), outcome_name="y", seed=seed, space=pixel_space(grid))
    return cohort, {name: np.flatnonzero(split == name) for name in ("train", "val", "test")}



def pool_study_arguments(parser, n_cal: str) -> None:
    """The options of the studies that fit once and score a pool of fresh subjects: output folder, design,
    noise, seed, pool size and the calibration set sizes (``n_cal``: their default)."""
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--design", choices=["paper", "volume"], default="paper")
    parser.add_argument("--voxel-mm", type=int, default=6)
    parser.add_argument("--noise", choices=["independent", "smooth"], default="independent")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool", type=int, default=2000, help="fresh subjects predicted and scored (default 2000)")
    parser.add_argument("--n-cal", default=n_cal, help=f"calibration set sizes (default {n_cal})")


def prepare_run(args) -> None:
    """What a study does before its first fit: torch's thread count (``--threads``, when given) and the
    output folder."""
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)


def train_val_pool(seed: int, cfg: dict):
    """The cohort of ``simulate_split`` as (cohort, train, val, pool): the first ``cfg["sizes"][0]`` training
    subjects, the ``cfg["n_val"]`` validation subjects, and the rest a pool of fresh subjects (the volume
    design's written 60/20/20 split drawn again as train / val / pool)."""
    cohort, idx = simulate_split(seed, cfg)
    n_train, n_val = cfg["sizes"][0], cfg["n_val"]
    if cfg.get("design") == "volume":
        order = np.random.default_rng(seed + 1).permutation(len(cohort.all))
        idx = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    data = cohort.all
    return cohort, data.subset(idx["train"][:n_train]), data.subset(idx["val"]), data.subset(idx["test"])

def study_regions(space) -> dict[str, np.ndarray]:
    """Label vectors (C order) of the regions scored: 8 blocks (4 x 2; volume design: 8 Voronoi cells of
    seeded mask voxels) and 50 Voronoi cells of seeded points (none is one of the random partitions the
    calibration fits on)."""
    from inva_pyro.predict.spatial import voronoi_labels
    grid = space.grid_shape
    if len(grid) == 3:
        coords = np.argwhere(space.mask).astype(float)
        return {"r8": voronoi_labels(coords, 8, np.random.default_rng(2026)),
                "r50": voronoi_labels(coords, 50, np.random.default_rng(2026))}
    h, w = grid
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    blocks = (i * 4 // h) * 2 + (j * 2 // w) + 1
    coords = np.argwhere(np.ones(grid)).astype(float)
    return {"r8": blocks.ravel(), "r50": voronoi_labels(coords, 50, np.random.default_rng(2026))}


# --------------------------------------------------------------------------- the paper design's factors

def pattern_basis() -> tuple[list[str], np.ndarray]:
    """The ``paper`` design's spatial patterns as columns: constant, x and y gradients, S1, S2, C1, C2, C3."""
    from inva_pyro.data.simulate import paper_patterns

    p = paper_patterns()
    coords = p["coords"]
    maps = [np.ones(coords.shape[:-1]), coords[..., 0], coords[..., 1], *p["shared"], *p["specific"]]
    names = ["constant", "gradient_x", "gradient_y", "S1", "S2", "C1", "C2", "C3"]
    return names, np.stack([m.ravel() for m in maps], axis=1)


def input_design(k: int, patterns: dict) -> np.ndarray:
    """F_k (V, 5): input k's deviation is F_k theta plus noise, theta = (a_1, a_2, b_1, b_2, b_3)."""
    from inva_pyro.data.simulate.paper import LOADINGS

    design = np.zeros((patterns["coords"][..., 0].size, 5))
    for j in range(2):
        design[:, j] = LOADINGS[k, j] * patterns["shared"][j].ravel()
    design[:, 2 + k] = patterns["specific"][k].ravel()
    return design


def factor_posterior(deviations: list[np.ndarray], patterns: dict, field_sd: float | None = None,
                     white_sd: float | None = None, field_sigma: float | None = None, inputs=None):
    """theta | x for every subject of the ``paper`` design: means (n, 5) and the common covariance (5, 5).
    The noise settings default to the design's (``paper.FIELD_SD``, ``WHITE_SD``, ``FIELD_SIGMA``).
    ``inputs``: which inputs k the deviations are (default 0, 1, 2, ...): a subset gives the posterior
    given those inputs only."""
    from inva_pyro.data.simulate.common import smooth_noise_covariance
    from inva_pyro.data.simulate.paper import FIELD_SD, FIELD_SIGMA, WHITE_SD

    field_sd = FIELD_SD if field_sd is None else field_sd
    white_sd = WHITE_SD if white_sd is None else white_sd
    field_sigma = FIELD_SIGMA if field_sigma is None else field_sigma
    grid = patterns["coords"].shape[:2]
    noise_cov = field_sd ** 2 * smooth_noise_covariance(grid, field_sigma) + white_sd ** 2 * np.eye(int(np.prod(grid)))
    chol = np.linalg.cholesky(noise_cov)
    precision, linear = np.eye(5), 0.0
    for k, dev in zip(range(len(deviations)) if inputs is None else inputs, deviations):
        whitened = np.linalg.solve(chol, input_design(k, patterns))       # Sigma^-1/2 F_k
        precision = precision + whitened.T @ whitened
        linear = linear + np.linalg.solve(chol, dev.reshape(len(dev), -1).T).T @ whitened  # d' Sigma^-1 F_k
    covariance = np.linalg.inv(precision)
    return linear @ covariance, covariance
