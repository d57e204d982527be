"""Simulated cohorts with known truth.

Design ``paper`` (2-D, K = 3 inputs on a 32 x 32 grid, saved as 32 x 32 x 1 NIfTI images).
Grid points v with coordinates in [-1, 1]^2; bump(c, w)(v) = exp(-|v - c|^2 / (2 w^2)).
Per subject i: shared factors a_i ~ N(0, I_2), modality-specific factors b_ki ~ N(0, 1),
a smooth Gaussian random field e_ki (white noise smoothed with a Gaussian kernel of 1.5 px,
rescaled to unit variance) and white noise eps_ki ~ N(0, 1):

    x_ki(v) = mu_k(v) + sum_j L_kj a_ij S_j(v) + b_ki C_k(v) + 0.5 e_ki(v) + 0.2 eps_ki(v)

with S_1, S_2 shared bumps, C_k a bump specific to modality k, mu_k a smooth gradient and loadings
L = [[1.0, 0.5], [0.6, -0.8], [0.8, 0.8]]. The outcome depends nonlinearly on the shared factors,
on the specific factors and on local input values, with heteroscedastic noise:

    m_i(v) = mu_y(v) + 1.0 tanh(1.5 a_i1) S_1(v) + 0.5 (a_i2^2 - 1) S_2(v)
             + 0.6 b_1i C_1(v) + 0.6 tanh(2 b_2i) C_2(v)
             + 0.6 tanh(d_1i(v)) + 0.3 d_1i(v) d_3i(v)
    s_i(v) = 0.5 exp(0.25 d_2i(v)) (0.7 + 0.6 S_1(v))
    y_i(v) = m_i(v) + s_i(v) eta_i(v),     eta ~ N(0, 1)

where d_ki(v) = x_ki(v) - mu_k(v) is the local deviation of input k. The true mean m and sd s are
saved beside every outcome image. A covariate ``age`` drives a_1 (a_i1 = 0.8 age_z + 0.6 u_i) and
``site`` is a null covariate, independent of everything.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

DESIGNS = ("paper",)
PAPER_GRID = (32, 32)
LOADINGS = np.array([[1.0, 0.5], [0.6, -0.8], [0.8, 0.8]])


def _bump(coords: np.ndarray, centre: tuple[float, float], width: float) -> np.ndarray:
    d2 = ((coords - np.asarray(centre)) ** 2).sum(-1)
    return np.exp(-d2 / (2 * width ** 2))


def _smooth_field(rng: np.random.Generator, n: int, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    white = rng.standard_normal((n, *shape))
    smooth = ndimage.gaussian_filter(white, sigma=(0, *([sigma] * len(shape))), mode="wrap")
    return smooth / smooth.reshape(n, -1).std(axis=1).reshape(n, *([1] * len(shape)))


def simulate_paper(n_subjects: int, seed: int = 0, grid: tuple[int, int] = PAPER_GRID) -> dict:
    """Arrays of the ``paper`` design: inputs (n, H, W) each, outcome, true mean and sd, covariates."""
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1, 1, g) for g in grid]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    shared = [_bump(coords, (-0.4, 0.3), 0.35), _bump(coords, (0.4, -0.2), 0.4)]
    specific = [_bump(coords, (0.5, 0.55), 0.3), _bump(coords, (-0.5, -0.5), 0.3), _bump(coords, (0.0, 0.0), 0.3)]
    base = [1.0 + 0.3 * coords[..., 0], 0.5 - 0.2 * coords[..., 1], 0.3 * coords[..., 0] * coords[..., 1]]
    mu_y = 1.0 + 0.4 * coords[..., 1]

    age = rng.standard_normal(n_subjects)
    site = rng.integers(0, 2, n_subjects).astype(float)
    a = np.stack([0.8 * age + 0.6 * rng.standard_normal(n_subjects), rng.standard_normal(n_subjects)], axis=1)
    b = rng.standard_normal((3, n_subjects))
    expand = lambda v: v[:, None, None]

    deviations, inputs = [], {}
    for k in range(3):
        dev = (sum(LOADINGS[k, j] * expand(a[:, j]) * shared[j] for j in range(2))
               + expand(b[k]) * specific[k]
               + 0.5 * _smooth_field(rng, n_subjects, grid, 1.5)
               + 0.2 * rng.standard_normal((n_subjects, *grid)))
        deviations.append(dev)
        inputs[f"x{k + 1}"] = base[k] + dev
    d1, d2, d3 = deviations
    mean = (mu_y + 1.0 * np.tanh(1.5 * expand(a[:, 0])) * shared[0] + 0.5 * (expand(a[:, 1]) ** 2 - 1) * shared[1]
            + 0.6 * expand(b[0]) * specific[0] + 0.6 * np.tanh(2 * expand(b[1])) * specific[1]
            + 0.6 * np.tanh(d1) + 0.3 * d1 * d3)
    sd = 0.5 * np.exp(0.25 * d2) * (0.7 + 0.6 * shared[0])
    outcome = mean + sd * rng.standard_normal(mean.shape)
    covariates = pd.DataFrame({"age": 70 + 8 * age, "site": site})
    return {"inputs": inputs, "outcome": outcome, "true_mean": mean, "true_sd": sd, "covariates": covariates}


def default_split(n_subjects: int, seed: int) -> np.ndarray:
    """60% train / 20% val / 20% test, shuffled with the seed."""
    rng = np.random.default_rng(seed + 1)
    labels = np.array(["train"] * n_subjects, dtype=object)
    n_val = n_test = int(round(0.2 * n_subjects))
    order = rng.permutation(n_subjects)
    labels[order[:n_val]] = "val"
    labels[order[n_val:n_val + n_test]] = "test"
    return labels


def write_cohort(out: Path, design: str, n_subjects: int, seed: int) -> Path:
    """Simulate ``design`` and write it as a cohort folder (CONTRACT.md): images, manifest, truth."""
    import nibabel as nib

    from .io import atomic_dir

    if design not in DESIGNS:
        from .errors import InputError
        raise InputError(f"--design {design}: unknown design (known: {', '.join(DESIGNS)})")
    sim = simulate_paper(n_subjects, seed)
    split = default_split(n_subjects, seed)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])  # 2 mm pixels; the grid is one slice thick
    columns = list(sim["inputs"]) + ["y", "y_true_mean", "y_true_sd"]
    arrays = {**sim["inputs"], "y": sim["outcome"], "y_true_mean": sim["true_mean"], "y_true_sd": sim["true_sd"]}
    with atomic_dir(Path(out)) as tmp:
        (tmp / "images").mkdir()
        rows = []
        for i in range(n_subjects):
            subject = f"sub-{i + 1:04d}"
            row = {"subject": subject, "split": split[i]}
            for col in columns:
                rel = f"images/{subject}_{col}.nii.gz"
                img = nib.Nifti1Image(arrays[col][i][..., None].astype(np.float32), affine)
                nib.save(img, tmp / rel)
                row[col] = rel
            rows.append(row)
        manifest = pd.concat([pd.DataFrame(rows), sim["covariates"]], axis=1)
        manifest.to_csv(tmp / "manifest.csv", index=False)
        cohort = {"design": design, "inputs": list(sim["inputs"]), "outcome": "y", "mask": None,
                  "truth": {"mean": "y_true_mean", "sd": "y_true_sd"},
                  "covariates": list(sim["covariates"].columns), "seed": seed, "n_subjects": n_subjects}
        (tmp / "cohort.json").write_text(json.dumps(cohort, indent=2))
    return Path(out)
