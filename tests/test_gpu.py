"""The whole user path on a CUDA device: fit (in memory and ``--lazy``), predict, evaluate, latents,
demo, and a diverging fit. Skipped where CUDA is not available (tests/test_device.py checks device
cleanliness on the CPU, with meta tensors).

Tolerances: the same run loaded on the CPU and on the GPU has the same weights, so its encoder
means agree to float32 rounding (1e-4 absolute on standardised values of order 1, after a few
matrix products of width <= 64), and its posterior predictive means are Monte-Carlo estimates of
the same number: with S draws each, their difference has sd sqrt(2 / S) x the predictive sd, so
|difference| < 5 sqrt(2 / S) sd holds for every voxel of every subject but with probability
about 6e-7 per entry (1024 x 6 entries here).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from inva_pyro import cli
from inva_pyro.data.cohort import Cohort
from inva_pyro.estimator import InVA
from inva_pyro.train.loop import CHECKPOINT, TrainingDiverged

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

TINY = """
[model]
hidden = 32
shared_hidden = 16
predictor_hidden = 8
[training]
epochs = 3
batch_size = 8
[prediction]
num_samples = 20
"""


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "cohort"
    assert cli.main(["simulate", "--design", "paper", "--n-subjects", "40", "--seed", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    path = tmp_path_factory.mktemp("preset") / "tiny.toml"
    path.write_text(TINY)
    return path


def _fit(cohort_dir, preset, out, *extra):
    return cli.main(["fit", "--manifest", str(cohort_dir / "manifest.csv"), "--inputs", "x1,x2,x3", "--outcome", "y",
                     "--model", str(preset), "--device", "cuda", "--seed", "0", "--out", str(out), *extra])


@pytest.mark.parametrize("lazy", [False, True])
def test_fit_predict_evaluate_on_cuda(cohort_dir, preset, tmp_path, lazy):
    run = tmp_path / "run"
    assert _fit(cohort_dir, preset, run, *(["--lazy"] if lazy else [])) == 0
    manifest = str(cohort_dir / "manifest.csv")
    assert cli.main(["predict", "--run", str(run), "--manifest", manifest, "--out", str(tmp_path / "pred"),
                     "--device", "cuda"]) == 0
    assert cli.main(["evaluate", "--run", str(run), "--manifest", manifest, "--out", str(tmp_path / "eval"),
                     "--device", "cuda"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert math.isfinite(metrics["mse"]) and metrics["n_features"] == 1024
    assert all(0.0 <= c <= 1.0 for c in metrics["coverage"].values())
    assert all(math.isfinite(k) for k in metrics["diagnostics"]["psis"]["khat"])


def test_cuda_and_cpu_predictions_of_one_run_agree(cohort_dir, preset, tmp_path):
    run = tmp_path / "run"
    assert _fit(cohort_dir, preset, run) == 0
    test = Cohort.from_dir(cohort_dir).test
    S = 400
    on_gpu = InVA.load(run, device="cuda")
    assert next(on_gpu.module.parameters()).is_cuda
    gpu, cpu = on_gpu.predict(test, num_samples=S, seed=1), InVA.load(run, device="cpu").predict(test, num_samples=S, seed=1)
    bound = 5 * math.sqrt(2 / S) * np.maximum(gpu.raw_sd, cpu.raw_sd)
    assert np.all(np.abs(gpu.mean - cpu.mean) < bound)
    np.testing.assert_allclose(gpu.raw_sd, cpu.raw_sd, rtol=0.3)


def test_latents_on_cuda_match_the_cpu(cohort_dir, preset, tmp_path):
    from inva_pyro.criticism.latents import latent_table, latent_traversal

    run = tmp_path / "run"
    assert _fit(cohort_dir, preset, run) == 0
    subset = Cohort.from_dir(cohort_dir).all
    gpu, cpu = InVA.load(run, device="cuda"), InVA.load(run, device="cpu")
    a, b = latent_table(gpu, subset), latent_table(cpu, subset)
    assert list(a.columns) == list(b.columns)
    numeric = a.select_dtypes("number").columns
    np.testing.assert_allclose(a[numeric].to_numpy(), b[numeric].to_numpy(), atol=1e-4, rtol=1e-4)
    latent_traversal(gpu, gpu.module.vae_names[0], tmp_path / "traversal.png", subset=subset, difference=True)
    assert (tmp_path / "traversal.png").stat().st_size > 1000
    assert cli.main(["latents", "--run", str(run), "--manifest", str(cohort_dir / "manifest.csv"), "--device", "cuda",
                     "--out", str(tmp_path / "latents.csv"), "--traversal", str(tmp_path / "trav")]) == 0
    assert (tmp_path / "latents.csv").stat().st_size > 0


def test_nan_on_cuda_stops_training_with_the_last_good_checkpoint(cohort_dir, tmp_path, make_preset):
    """On a GPU the losses are looked at every 32 steps and before every checkpoint (loop.py)."""
    cohort = Cohort.from_dir(cohort_dir)
    model = InVA(make_preset(training={"epochs": 6, "batch_size": 4}))

    def after_epoch(state):
        if state.epoch == 2:
            with torch.no_grad():
                model.module.predictor.scale_head.bias.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match="the loss became nan in epoch 3") as info:
        model.fit(cohort.train, cohort.val, seed=0, device="cuda", progress=False, run_dir=tmp_path / "run",
                  on_epoch_end=after_epoch)
    assert str(tmp_path / "run" / CHECKPOINT) in str(info.value)
    ckpt = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    assert ckpt["epoch"] == 2 and all(torch.isfinite(v).all() for v in ckpt["module"].values())


def test_demo_on_cuda(tmp_path, capsys):
    assert cli.main(["demo", "--device", "cuda", "--n-subjects", "60", "--out", str(tmp_path / "demo")]) == 0
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert math.isfinite(metrics["mse"]) and metrics["mse"] < 10 * metrics["oracle_mse"]
    assert "inva demo" in capsys.readouterr().out


def test_streamed_minibatches_on_cuda(cohort_dir, make_preset):
    """--lazy reading to the GPU (pinned memory, non-blocking copies, prefetch) gives the CPU's rows,
    and the loop trains from it (the path of cohorts too large to live on the device)."""
    from inva_pyro.data.preprocessing import Standardizer
    from inva_pyro.data.streaming import DiskBatches
    from inva_pyro.model.module import InVAModule
    from inva_pyro.train.loop import Batchable, train

    cohort = Cohort.from_dir(cohort_dir, lazy=True, cache_subjects=0)
    names = cohort.input_names
    standardizer = Standardizer.fit_streaming(cohort.train)
    on_gpu, on_cpu = (DiskBatches(cohort.train, standardizer, names, device=d) for d in ("cuda", "cpu"))
    idx = torch.tensor([4, 0, 2])
    on_gpu.prefetch(idx)
    (xs, y), (xs_cpu, y_cpu) = on_gpu.take(idx), on_cpu.take(idx)
    assert xs[0].is_cuda and y.is_cuda
    for a, b in zip(xs + [y], xs_cpu + [y_cpu]):
        assert torch.equal(a.cpu(), b)
    preset = make_preset(training={"epochs": 2, "batch_size": 8})
    sizes = [cohort.train.inputs[n].shape[1] for n in names]
    module = InVAModule(names, sizes, sizes[0], preset.model).cuda()
    val_x, val_y = on_gpu.take(torch.arange(4))
    state = train(module, on_gpu, Batchable(val_x, val_y), preset.training, progress=False)
    assert state.epoch == 2 and all(math.isfinite(v) for v in state.history["train_loss"])


def _graph_fit(cohort_dir, make_preset, device="cuda", **training):
    """A fit through the loop, on the cohort in device memory: (state, weights)."""
    from inva_pyro.model.module import InVAModule
    from inva_pyro.train.loop import Batchable, train

    cohort = Cohort.from_dir(cohort_dir)
    names = cohort.input_names
    preset = make_preset(training={"epochs": 3, "batch_size": 8, **training})
    torch.manual_seed(0)
    module = InVAModule(names, [cohort.train.inputs[k].shape[1] for k in names], cohort.train.outcome.shape[1],
                        preset.model).to(device)

    def on_device(part):
        as_tensor = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
        return Batchable([as_tensor(part.inputs[k]) for k in names], as_tensor(part.outcome)).to(device)

    state = train(module, on_device(cohort.train), on_device(cohort.val), preset.training, seed=0, progress=False)
    return state, {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def test_training_steps_replay_as_cuda_graphs(cohort_dir, make_preset):
    """Each minibatch size runs once eagerly, then as a graph: 3 epochs of ceil(n / 8) steps, two sizes
    (n = 24 training subjects is not assumed: the counts come from the cohort). Seeded graph fits are
    identical, the loss falls, and without graphs the same fit replays nothing."""
    n = len(Cohort.from_dir(cohort_dir).train.outcome)
    steps_per_epoch, sizes = math.ceil(n / 8), 1 if n % 8 == 0 else 2
    state, weights = _graph_fit(cohort_dir, make_preset)
    assert state.graph_steps == 3 * steps_per_epoch - sizes
    assert state.history["train_loss"][-1] < state.history["train_loss"][0]
    again, weights_again = _graph_fit(cohort_dir, make_preset)
    assert all(torch.equal(weights[k], weights_again[k]) for k in weights)
    eager, _ = _graph_fit(cohort_dir, make_preset, cuda_graphs=False)
    assert eager.graph_steps == 0 and all(math.isfinite(v) for v in eager.history["val_mse"])
    bf16, _ = _graph_fit(cohort_dir, make_preset, mixed_precision=True)  # autocast recorded in the graphs
    assert bf16.graph_steps == 3 * steps_per_epoch - sizes and all(math.isfinite(v) for v in bf16.history["val_mse"])
