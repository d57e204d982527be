"""Shared helpers for the model and training tests: tiny presets and toy cohorts.

Everything here is small on purpose (tens of subjects, tens of features, hidden sizes < 20) so
that the statistical tests can afford many Monte-Carlo repetitions within seconds on one core.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from inva_pyro.data.cohort import Cohort
from inva_pyro.config import Preset, preset_to_toml

# No spatial prior unless a test asks for one: toy features have no geometry to smooth over.
TINY_MODEL = dict(shallow_dim=3, deep_dim=2, hidden=16, shared_hidden=8, predictor_hidden=6,
                  local_hidden=8, local_channels=2, voxel_embedding=2, context_dim=3, dropout=0.1,
                  spatial_smoothing=0.0)
TINY_TRAINING = dict(epochs=6, batch_size=16, learning_rate=5e-3, kl_anneal_epochs=3, patience=100)
TINY_PREDICTION = dict(num_samples=200)


def tiny_preset(model: dict | None = None, training: dict | None = None,
                prediction: dict | None = None) -> Preset:
    """The tests' one tiny preset, with the settings a test changes."""
    return Preset.model_validate({"name": "tiny", "model": {**TINY_MODEL, **(model or {})},
                                  "training": {**TINY_TRAINING, **(training or {})},
                                  "prediction": {**TINY_PREDICTION, **(prediction or {})}})


def tiny_toml(model: dict | None = None, training: dict | None = None, prediction: dict | None = None) -> str:
    """The tiny preset as the text of a preset file (``inva fit --model FILE`` in command-line tests)."""
    return preset_to_toml(tiny_preset(model, training, prediction))


GRID = (8, 8)                   # outcome and "gm" live on an 8 x 8 grid (64 features)
N_WM = 24                       # a second input of a different size


def toy_arrays(n: int, seed: int, noise_sd: float = 0.5):
    """Inputs gm (n, 64), wm (n, 24) and outcome (n, 64) with a known Gaussian truth.

    gm, wm ~ iid N(0, 1); y_iv = 2 + 1.5 (0.8 gm_iv + 0.4 tanh(mean_j wm_ij)) + 1.5 noise_sd eps_iv,
    eps iid N(0, 1): the true predictive of y_iv is Normal(m_iv, (1.5 noise_sd)^2), and given the
    inputs the outcome voxels are independent.
    """
    rng = np.random.default_rng(seed)
    n_vox = GRID[0] * GRID[1]
    gm = rng.standard_normal((n, n_vox))
    wm = rng.standard_normal((n, N_WM))
    mean = 2.0 + 1.5 * (0.8 * gm + 0.4 * np.tanh(wm.mean(axis=1, keepdims=True)))
    sd = np.full_like(mean, 1.5 * noise_sd)
    y = mean + sd * rng.standard_normal(mean.shape)
    return {"gm": gm, "wm": wm}, y, mean, sd


def toy_cohort(n_train: int, n_val: int, n_test: int, seed: int = 0) -> Cohort:
    n = n_train + n_val + n_test
    inputs, y, mean, sd = toy_arrays(n, seed)
    split = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    return Cohort.from_arrays(inputs, y, split=split, truth_mean=mean, truth_sd=sd)


def simulated_manifest(folder, n_subjects: int = 30, seed: int = 3):
    """``inva simulate --design paper`` into ``folder``: (its manifest path, the manifest as strings)."""
    import pandas as pd
    from inva_pyro import cli
    assert cli.main(["simulate", "--design", "paper", "--n-subjects", str(n_subjects), "--seed", str(seed),
                     "--out", str(folder)]) == 0
    return folder / "manifest.csv", pd.read_csv(folder / "manifest.csv", dtype=str)


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    # Bit-for-bit comparisons (save/load, seeds, resume) and the time budget both want one thread.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def small_cohort() -> Cohort:
    return toy_cohort(40, 16, 12, seed=1)


# The helpers as fixtures, so that test modules need not import conftest.
@pytest.fixture(scope="session")
def make_preset():
    return tiny_preset


@pytest.fixture(scope="session")
def make_cohort():
    return toy_cohort


@pytest.fixture(scope="session")
def make_arrays():
    return toy_arrays


@pytest.fixture(scope="session")
def make_manifest():
    return simulated_manifest
