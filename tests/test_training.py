"""SVI training, the estimator's fit/predict/save/load, seeds, checkpoints and resumption, and
calibrated coverage end to end on a problem with a known Gaussian truth.

Bit-for-bit claims (save/load, same seed, resume) are checked with exact equality; statistical
claims with tolerances derived from standard errors (see each test's docstring).
"""
from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO
from safetensors.torch import load_file

from inva_pyro.errors import InputError
from inva_pyro.estimator import InVA
from inva_pyro.model.module import InVAModule
from inva_pyro.train.loop import CHECKPOINT, Batchable, TrainingDiverged, train
from inva_pyro.train.optimizer import param_groups


def standardised(cohort):
    """Train / val Batchables standardised with the training statistics."""
    from inva_pyro.data.preprocessing import Standardizer

    st = Standardizer.fit(cohort.train)

    def batchable(subset):
        inputs = st.transform_inputs(subset)
        return Batchable([torch.as_tensor(inputs[n]) for n in ("gm", "wm")],
                         torch.as_tensor(st.transform_outcome(subset.outcome)))
    return batchable(cohort.train), batchable(cohort.val)


def new_module(preset, data: Batchable, seed=0):
    pyro.set_rng_seed(seed)
    return InVAModule(["gm", "wm"], [x.shape[1] for x in data.inputs], data.outcome.shape[1], preset.model)


def state_of(model_or_module):
    module = getattr(model_or_module, "module", model_or_module)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_predictions_equal(p, q):
    np.testing.assert_array_equal(p.mean, q.mean)
    np.testing.assert_array_equal(p.raw_sd, q.raw_sd)
    np.testing.assert_array_equal(p.sd, q.sd)
    assert p.levels == q.levels
    for lv in p.levels:
        for a, b in zip(p.intervals[lv], q.intervals[lv]):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(p.raw_intervals[lv], q.raw_intervals[lv]):
            np.testing.assert_array_equal(a, b)


def fit(preset, cohort, seed=0, **kw):
    return InVA(preset).fit(cohort.train, cohort.val, seed=seed, device="cpu", progress=False, **kw)


# ---- 2. a training step changes every parameter group -------------------------------------------
@pytest.mark.parametrize("predictor", ["local", "paper"])
def test_a_training_step_reaches_every_parameter(make_preset, small_cohort, predictor):
    preset = make_preset(model={"predictor": predictor}, training={"epochs": 1, "batch_size": 1000})
    train_data, val_data = standardised(small_cohort)
    module = new_module(preset, train_data)
    names = [n for n, _ in module.named_parameters()]
    # Every part of the program is there to be trained.
    for prefix in ("shallow_encoders.0.", "shallow_encoders.1.", "shared_encoder.", "shared_decoder.",
                   "modality_decoders.0.", "modality_decoders.1.", "predictor.trunk.", "predictor.scale_head.",
                   "output_weight_q.loc", "output_weight_q.raw_scale", "output_bias_q.loc", "output_bias_q.raw_scale"):
        assert any(n.startswith(prefix) for n in names), prefix
    if predictor == "local":
        assert {"predictor.voxel_code", "predictor.mean_mix", "predictor.scale_mix"} <= set(names)
        assert any(n.startswith("predictor.voxel_net.") for n in names)

    # One gradient of the ELBO: finite, and non-zero for every parameter tensor.
    module.train()
    idx = torch.arange(len(train_data))
    xs, y = train_data.take(idx)
    loss = Trace_ELBO().differentiable_loss(module.model, module.guide, xs, y, subjects=idx, n_subjects=len(idx))
    loss.backward()
    for name, p in module.named_parameters():
        assert p.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} has a zero gradient"
    module.zero_grad(set_to_none=True)

    # One step of the real loop (one epoch, one batch) moves every parameter tensor.
    before = state_of(module)
    params = dict(module.named_parameters())
    state = train(module, train_data, val_data, preset.training, progress=False)
    assert state.epoch == 1
    for name in params:
        assert not torch.equal(before[name], params[name].detach()), f"{name} did not change"


def test_weight_decay_spares_variational_parameters(make_preset, small_cohort):
    train_data, _ = standardised(small_cohort)
    module = new_module(make_preset(), train_data)
    decay, no_decay = param_groups(module, 1e-2)
    ids = {id(p) for p in no_decay["params"]}
    for name, p in module.named_parameters():
        if "_q." in name or name.endswith("raw_sigma") or p.ndim < 2:
            assert id(p) in ids, name
    assert decay["weight_decay"] == 1e-2 and no_decay["weight_decay"] == 0.0


# ---- 3. the ELBO falls ------------------------------------------------------------------------
def test_elbo_falls(make_preset, small_cohort):
    """Over 40 Adam steps the loss falls by far more than its Monte-Carlo noise.

    Each recorded loss averages 4 particles. With a and b the means of the first and last five
    losses and s_a, s_b their sample sds, SE(a - b) = sqrt(s_a^2/5 + s_b^2/5) overstates the noise
    (the trend inside each window adds to s). We ask for a fall of more than 4 SE and of at least
    10% of the initial loss.
    """
    preset = make_preset()
    data, _ = standardised(small_cohort)
    module = new_module(preset, data, seed=2)
    module.train()
    elbo = Trace_ELBO(num_particles=4)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    idx = torch.arange(len(data))
    xs, y = data.take(idx)
    losses = []
    for _ in range(40):
        loss = elbo.differentiable_loss(module.model, module.guide, xs, y, subjects=idx, n_subjects=len(idx))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = np.array(losses[:5]), np.array(losses[-5:])
    se = math.sqrt(first.var(ddof=1) / 5 + last.var(ddof=1) / 5)
    drop = first.mean() - last.mean()
    assert np.all(np.isfinite(losses))
    assert drop > 4 * se, (first, last)
    assert drop > 0.1 * abs(first.mean()), (first, last)


# ---- 5. save / load ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted(make_preset, small_cohort):
    return fit(make_preset(), small_cohort, seed=0)


def _check_data_only_run_folder(run, allow=()):
    files = sorted(p.name for p in run.iterdir() if p.name not in allow)
    assert "weights.safetensors" in files
    assert {"config.json", "run.json", "standardizer.json", "calibration.json"} <= set(files)
    # Data formats only: tensors in safetensors, everything else JSON; no pickle of any kind.
    assert all(name.endswith((".json", ".safetensors")) for name in files), files
    assert not list(run.rglob("*.pkl"))
    load_file(str(run / "weights.safetensors"))
    for name in files:
        if name.endswith(".json"):
            json.loads((run / name).read_text())


def _load_without_pickle(run, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loading a run used pickle")
    with monkeypatch.context() as patch:
        patch.setattr(torch, "load", refuse)
        patch.setattr(pickle, "load", refuse)
        patch.setattr(pickle, "loads", refuse)
        return InVA.load(run)


def _check_same_model(fitted, loaded, subset):
    assert_states_equal(state_of(fitted), state_of(loaded))
    assert loaded.preset == fitted.preset
    assert loaded.calibrator.method == fitted.calibrator.method
    assert loaded.calibrator.tau == fitted.calibrator.tau
    np.testing.assert_array_equal(loaded.calibrator.z_quantiles, fitted.calibrator.z_quantiles)
    assert_predictions_equal(fitted.predict(subset, seed=3), loaded.predict(subset, seed=3))


def test_save_and_load_give_identical_predictions(fitted, small_cohort, tmp_path, monkeypatch):
    """fit (no run folder) -> save(dir) -> load(dir): the same model, the same predictions."""
    run = tmp_path / "run"
    fitted.save(run)
    _check_data_only_run_folder(run)
    assert not list(run.rglob("*.pt"))
    loaded = _load_without_pickle(run, monkeypatch)
    _check_same_model(fitted, loaded, small_cohort.test)


def test_run_folder_written_by_fit_loads_with_identical_predictions(make_preset, small_cohort, tmp_path, monkeypatch):
    run = tmp_path / "run"
    fitted = fit(make_preset(training={"epochs": 3}), small_cohort, seed=0, run_dir=run)
    # checkpoint.pt is only for resuming (torch.load(weights_only=True)); loading never reads it.
    _check_data_only_run_folder(run, allow=(CHECKPOINT,))
    loaded = _load_without_pickle(run, monkeypatch)
    _check_same_model(fitted, loaded, small_cohort.test)
    (run / CHECKPOINT).unlink()
    _check_same_model(fitted, InVA.load(run), small_cohort.test)


# ---- 6. seeds ---------------------------------------------------------------------------------
def test_one_seed_gives_identical_runs(fitted, make_preset, small_cohort):
    again = fit(make_preset(), small_cohort, seed=0)
    other = fit(make_preset(), small_cohort, seed=1)
    assert_states_equal(state_of(fitted), state_of(again))
    assert fitted.history == again.history
    test = small_cohort.test
    p, q, r = fitted.predict(test, seed=5), again.predict(test, seed=5), other.predict(test, seed=5)
    assert_predictions_equal(p, q)
    a, b = state_of(fitted), state_of(other)
    assert all(not torch.equal(a[k], b[k]) for k in a), [k for k in a if torch.equal(a[k], b[k])]
    assert not np.array_equal(p.mean, r.mean)
    # The prediction seed matters too (the output layer and the noise are sampled).
    assert not np.array_equal(p.raw_intervals[0.9][0], fitted.predict(test, seed=6).raw_intervals[0.9][0])


# ---- 8. an interrupted fit resumes bit for bit -----------------------------------------------
class Interrupt(Exception):
    pass


def test_interrupted_fit_resumes_from_its_checkpoint(make_preset, small_cohort, tmp_path):
    preset = make_preset()                       # 6 epochs, dropout on: the RNG state matters
    reference = fit(preset, small_cohort, seed=4, run_dir=tmp_path / "reference")

    def stop_after_3(state):
        if state.epoch == 3:
            raise Interrupt

    run = tmp_path / "run"
    with pytest.raises(Interrupt):
        fit(preset, small_cohort, seed=4, run_dir=run, on_epoch_end=stop_after_3)
    ckpt = torch.load(run / CHECKPOINT, weights_only=True)
    assert ckpt["epoch"] == 3
    assert not json.loads((run / "run.json").read_text())["complete"]
    with pytest.raises(InputError, match="did not finish"):
        InVA.load(run)

    resumed = InVA(preset).fit(small_cohort.train, small_cohort.val, seed=4, device="cpu", progress=False,
                               run_dir=run, resume=True)
    assert resumed.history["epoch"] == list(range(1, preset.training.epochs + 1))
    assert resumed.history == reference.history
    assert_states_equal(state_of(reference), state_of(resumed))
    assert_states_equal(state_of(reference), state_of(InVA.load(run)))
    assert torch.load(run / CHECKPOINT, weights_only=True)["epoch"] == preset.training.epochs
    test = small_cohort.test
    assert_predictions_equal(reference.predict(test, seed=1), resumed.predict(test, seed=1))


# ---- 9. divergence ----------------------------------------------------------------------------
def _diverging_fit(make_preset, small_cohort, run, poison):
    preset = make_preset()
    model = InVA(preset)

    def after_epoch(state):
        if state.epoch == 2:
            with torch.no_grad():
                poison(model.module)

    with pytest.raises(TrainingDiverged) as info:
        model.fit(small_cohort.train, small_cohort.val, seed=0, device="cpu", progress=False,
                  run_dir=run, on_epoch_end=after_epoch)
    return model, str(info.value)


def _check_last_good_checkpoint(model, run):
    ckpt = torch.load(run / CHECKPOINT, weights_only=True)
    assert ckpt["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["module"].values())
    fresh = InVAModule(model.info["inputs"], model.info["input_sizes"], model.info["n_outcome"], model.preset.model)
    fresh.load_state_dict(ckpt["module"])


def test_nan_parameter_stops_training_and_keeps_the_last_good_checkpoint(make_preset, small_cohort, tmp_path):
    run = tmp_path / "run"
    model, message = _diverging_fit(make_preset, small_cohort, run,
                                    lambda m: m.predictor.scale_head.bias.fill_(float("nan")))
    assert "loss" in message and "nan" in message.lower()
    assert str(run / CHECKPOINT) in message
    _check_last_good_checkpoint(model, run)


def test_nan_stops_training_when_losses_are_checked_every_few_steps(make_preset, small_cohort, tmp_path,
                                                                    monkeypatch):
    """The GPU path: losses looked at every 4 steps (not every step) and before each checkpoint."""
    from inva_pyro.train import loop
    monkeypatch.setattr(loop, "finite_check_steps", lambda device: 4)
    run = tmp_path / "run"
    model, message = _diverging_fit(make_preset, small_cohort, run,
                                    lambda m: m.predictor.scale_head.bias.fill_(float("nan")))
    assert "the loss became nan in epoch 3" in message
    assert str(run / CHECKPOINT) in message
    _check_last_good_checkpoint(model, run)


def test_infinite_loss_stops_training_and_keeps_the_last_good_checkpoint(make_preset, small_cohort, tmp_path):
    run = tmp_path / "run"
    model, message = _diverging_fit(make_preset, small_cohort, run,
                                    lambda m: m.output_bias_q.loc.fill_(1e30))
    assert "loss" in message and "inf" in message.lower()
    assert "epoch 3" in message
    assert str(run / CHECKPOINT) in message
    _check_last_good_checkpoint(model, run)


# ---- 10. checkpoints hold data only -------------------------------------------------------------
def test_checkpoint_loads_with_weights_only(make_preset, small_cohort, tmp_path):
    preset = make_preset(training={"epochs": 2})
    model = fit(preset, small_cohort, seed=0, run_dir=tmp_path)
    ckpt = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert {"module", "optimizer", "epoch", "rng", "history", "best_module"} <= set(ckpt)
    assert ckpt["epoch"] == 2
    assert_states_equal(model.module.state_dict(), dict(ckpt["best_module"]))


# ---- 7a. calibrated coverage end to end --------------------------------------------------------
def test_calibrated_coverage_on_a_known_gaussian_truth(make_preset, make_cohort):
    """y_iv = m(x_i)_v + 1.5 * 0.5 * eps_iv (conftest.toy_arrays); fit, calibrate on val, test.

    Voxels within a subject are not independent given the fitted model (all share the subject's
    latent summary), so subjects are the independent units: with c_i the fraction of subject i's
    voxels inside its interval, the test coverage is mean_i c_i with SE s_test/sqrt(n_test) (s the
    between-subject sd of c_i). The calibration is itself estimated on n_val subjects; the error
    it leaves is that of a val-set mean of the same kind, SE ~ s_val/sqrt(n_val) (s_val from
    re-predicting val). Tolerance: 4 sqrt(SE_test^2 + SE_val^2) + 1/(n_val V) (quantile grid).
    """
    cohort = make_cohort(60, 40, 40, seed=2)
    preset = make_preset(training={"epochs": 25, "kl_anneal_epochs": 5}, prediction={"num_samples": 300})
    model = fit(preset, cohort, seed=0)
    test, val = cohort.test, cohort.val
    pred, pred_val = model.predict(test, seed=1), model.predict(val, seed=2)
    n_vox = test.outcome.shape[1]
    for lv in (0.5, 0.8, 0.9, 0.95):
        lo, hi = pred.intervals[lv]
        c_test = np.mean((test.outcome >= lo) & (test.outcome <= hi), axis=1)
        lo, hi = pred_val.intervals[lv]
        c_val = np.mean((val.outcome >= lo) & (val.outcome <= hi), axis=1)
        se = math.sqrt(c_test.var(ddof=1) / len(c_test) + c_val.var(ddof=1) / len(c_val))
        tol = 4 * se + 1 / (len(val) * n_vox)
        assert abs(c_test.mean() - lv) < tol, (lv, c_test.mean(), tol)
    # The calibrated sd is on the scale of the true sd (0.75), not collapsed.
    ratio = np.median(pred.sd / test.truth_sd)
    assert 0.5 < ratio < 2.0, ratio


# ---- mixed precision ------------------------------------------------------------------------------
def test_mixed_precision_runs_the_networks_in_bfloat16_and_learns_as_float32_does(make_preset, small_cohort):
    """training.mixed_precision: the networks run in bfloat16 inside the step, the weights stay
    float32, and the fit reaches the float32 fit's validation error. bfloat16 keeps 8 bits of
    mantissa (relative rounding 2^-9 ~ 0.2%), far below the validation MSE's own sampling noise
    (relative sd sqrt(2 / (n_val x V)) ~ 2% here), so a 10% tolerance cannot be met by chance
    alone; a fit that did not learn (or diverged) misses it by far."""
    from inva_pyro.train.loop import autocast

    runs = {}
    for mixed in (False, True):
        preset = make_preset(training={"epochs": 15, "patience": 15, "mixed_precision": mixed})
        runs[mixed] = fit(preset, small_cohort)
    module = runs[True].module
    assert all(p.dtype == torch.float32 for p in module.parameters())
    features = torch.randn(2, module.predictor.trunk[0].in_features)
    with autocast(torch.device("cpu"), True):
        assert module.predictor.trunk(features).dtype == torch.bfloat16
    first, best = runs[True].history["val_mse"][0], min(runs[True].history["val_mse"])
    assert best < 0.8 * first
    assert best == pytest.approx(min(runs[False].history["val_mse"]), rel=0.10)


def test_pyro_validation_checks_the_first_step_of_a_fit_and_is_restored_after(make_preset, small_cohort, monkeypatch):
    """The program is validated once (its structure does not change between steps); the user's
    global setting is back in force after the fit."""
    from pyro.infer.util import is_validation_enabled

    seen, program = [], InVAModule.model

    def model(self, *args, **kwargs):
        if kwargs.get("outcome", True):  # a training step (the novelty scores after the fit leave the outcome out)
            seen.append(is_validation_enabled())
        return program(self, *args, **kwargs)

    monkeypatch.setattr(InVAModule, "model", model)
    fit(make_preset(training={"epochs": 2}), small_cohort)
    steps = 2 * math.ceil(len(small_cohort.train) / 16)
    assert len(seen) == steps
    assert seen == [True] + [False] * (steps - 1)
    assert is_validation_enabled()


def test_calibration_split_is_seeded_disjoint_and_refuses_too_few(make_cohort):
    from inva_pyro.errors import InputError
    from inva_pyro.data.splits import calibration_split

    val = make_cohort(4, 10, 2).val
    assert calibration_split(val, 0.0, 0) == (val, val)
    stop, calib = calibration_split(val, 0.3, 5)
    assert (len(stop), len(calib)) == (7, 3)
    assert set(stop.subjects).isdisjoint(calib.subjects) and set(stop.subjects) | set(calib.subjects) == set(val.subjects)
    again = calibration_split(val, 0.3, 5)[1]
    assert list(again.subjects) == list(calib.subjects)
    assert list(calibration_split(val, 0.3, 6)[1].subjects) != list(calib.subjects)
    with pytest.raises(InputError, match="calibration_share 0.9 leaves 1 for early stopping and 9 for calibration"):
        calibration_split(val, 0.9, 0)


def test_fit_calibrates_on_the_calibration_share_only(make_cohort, make_preset, monkeypatch):
    """Early stopping sees one part of the validation subjects, the calibrator the other."""
    from inva_pyro import InVA

    cohort = make_cohort(20, 10, 2)
    seen = {}
    original = InVA._calibrate

    def spy(self, calibration, seed):
        seen["calibration"] = list(calibration.subjects)
        seen["rows"] = len(calibration)
        return original(self, calibration, seed)

    monkeypatch.setattr(InVA, "_calibrate", spy)
    model = InVA(make_preset(training={"epochs": 1, "calibration_share": 0.4})).fit(cohort.train, cohort.val, seed=3,
                                                                                    progress=False)
    assert model.info["n_calibration"] == 4 and model.info["n_val"] == 6
    assert seen["rows"] == 4 and set(seen["calibration"]) < set(cohort.val.subjects)
