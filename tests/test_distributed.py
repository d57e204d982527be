"""Multi-process training (torch.distributed, gloo, 2 CPU processes)."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from inva_pyro import InVA
from inva_pyro.data.cohort import Cohort
from conftest import tiny_preset
from inva_pyro.train.distributed import spawn

PRESET = dict(training={"epochs": 8, "batch_size": 8}, prediction={"num_samples": 20})


def tiny_cohort(seed=0, n=48, v=36):
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=(n, v)), rng.normal(size=(n, v))
    y = np.tanh(x1) + 0.5 * x2 + 0.3 * rng.normal(size=(n, v))
    split = ["train"] * 32 + ["val"] * 16
    return Cohort.from_arrays({"x1": x1, "x2": x2}, y, split=split)


def rank_worker(out_dir):
    """One rank: fit in the process group, then record its own weights and validation curve."""
    cohort = tiny_cohort()
    model = InVA(tiny_preset(**PRESET)).fit(cohort.train, cohort.val, seed=0, device="cpu", progress=False)
    rank = os.environ["RANK"]
    save_file({k: v.contiguous() for k, v in model.module.state_dict().items()}, f"{out_dir}/rank{rank}.safetensors")
    with open(f"{out_dir}/rank{rank}.json", "w") as fh:
        json.dump(model.history, fh)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    spawn(rank_worker, 2, str(out))
    return out


def test_parameters_agree_across_ranks(two_rank_run):
    rank0 = load_file(str(two_rank_run / "rank0.safetensors"))
    rank1 = load_file(str(two_rank_run / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0, msg=name)
    history = json.loads((two_rank_run / "rank0.json").read_text())
    assert history["devices"] == 2


def test_two_processes_fit_like_one_within_seed_spread(two_rank_run):
    # Sharding changes only which Monte-Carlo noise each subject's ELBO term gets, so the
    # two-process fit is another draw from the distribution of single-process fits: its final
    # validation MSE must fall within the seed-to-seed spread of single-process fits (4 sd).
    cohort = tiny_cohort()
    single = [InVA(tiny_preset(**PRESET)).fit(cohort.train, cohort.val, seed=s, device="cpu",
                                                      progress=False).history["val_mse"][-1] for s in range(4)]
    two = json.loads((two_rank_run / "rank0.json").read_text())["val_mse"][-1]
    spread = max(np.std(single, ddof=1), 1e-3 * np.mean(single))
    assert abs(two - np.mean(single)) < 4 * spread, (two, single)
    assert two < json.loads((two_rank_run / "rank0.json").read_text())["val_mse"][0]  # it learned


def test_fit_with_devices_writes_a_loadable_run(tmp_path):
    cohort = tiny_cohort()
    model = InVA(tiny_preset(**PRESET)).fit(cohort.train, cohort.val, seed=0, device="cpu",
                                                   progress=False, run_dir=tmp_path / "run", devices=2)
    assert model.history["devices"] == 2
    reloaded = InVA.load(tmp_path / "run")
    a = model.predict(cohort.val, num_samples=10, seed=1)
    b = reloaded.predict(cohort.val, num_samples=10, seed=1)
    np.testing.assert_array_equal(a.mean, b.mean)


def test_two_processes_fit_a_cohort_with_empty_cells(tmp_path):
    # MRI-only subjects and a missing input: every rank masks its shard's terms the same way.
    cohort = tiny_cohort()
    inputs = {name: np.array(m) for name, m in cohort.all.inputs.items()}
    y = np.array(cohort.all.outcome)
    y[[1, 4, 7, 10, 13]] = np.nan
    inputs["x2"][[2, 5, 20, 40]] = np.nan
    cohort = Cohort.from_arrays(inputs, y, split=["train"] * 32 + ["val"] * 16)
    preset = tiny_preset({"structure": "joint"}, {**PRESET["training"], "epochs": 3, "pattern_submodels": True},
                         PRESET["prediction"])
    model = InVA(preset).fit(cohort.train, cohort.val, seed=0, device="cpu", progress=False,
                             run_dir=tmp_path / "run", devices=2)
    assert np.isfinite(model.history["train_loss"]).all() and model.info["n_train_labeled"] == 27
    assert np.isfinite(model.predict(cohort.val, num_samples=10).mean).all()
    # the pattern submodels were fitted in the same process group, saved by rank 0 and loaded with the run
    assert set(model.submodels) == {"x1", "x2"} and model.submodels["x2"].history["devices"] == 2
    lacking_x2 = dataclasses.replace(cohort.val, inputs={**cohort.val.inputs,
                                                         "x2": np.full_like(cohort.val.inputs["x2"], np.nan)})
    assert np.isfinite(model.predict(lacking_x2, num_samples=10).mean).all()
