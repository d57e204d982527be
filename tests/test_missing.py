"""Images not acquired (empty manifest cells): masks in the Pyro program, standardisation, fitting."""
from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from conftest import tiny_toml
from inva_pyro.data.cohort import Cohort
from inva_pyro.data.missing import input_presence, outcome_presence
from inva_pyro.data.preprocessing import Standardizer
from inva_pyro.errors import InputError
from inva_pyro.estimator import InVA
from inva_pyro.model.module import InVAModule


def with_gaps(inputs: dict, y: np.ndarray, seed: int = 0, p_input: float = 0.25, p_outcome: float = 0.5):
    """NaN rows: wm missing for a share of subjects, the outcome for another (never every input)."""
    rng = np.random.default_rng(seed)
    inputs = {k: v.astype(np.float32).copy() for k, v in inputs.items()}
    y = y.astype(np.float32).copy()
    inputs["wm"][rng.random(len(y)) < p_input] = np.nan
    y[rng.random(len(y)) < p_outcome] = np.nan
    return inputs, y


@pytest.mark.parametrize("structure", ["separate", "integrative", "joint"])
def test_elbo_with_masked_outcomes_is_the_sum_of_its_parts(make_preset, make_arrays, structure):
    """-loss = N/B sum_i [sum_k m_ik (log p(x_ik|.) ) + KL terms where they apply + o_i log p(y_i|.)]."""
    torch.manual_seed(0)
    inputs, y, _, _ = make_arrays(12, 3)
    inputs, y = with_gaps(inputs, y, seed=1, p_input=0.4, p_outcome=0.5)
    preset = make_preset({"structure": structure, "bayesian_output": False})
    module = InVAModule(["gm", "wm"], [64, 24], 64, preset.model).eval()  # eval: no dropout noise
    xs = [torch.as_tensor(inputs["gm"]), torch.as_tensor(inputs["wm"])]
    yt = torch.as_tensor(y)
    n_subjects, idx = 50, torch.arange(12)
    present = torch.as_tensor(input_presence(Cohort.from_arrays(inputs, y).all, ["gm", "wm"]))
    y_present = ~torch.isnan(yt).all(-1)
    assert 0 < int(y_present.sum()) < 12 and not bool(present.all())
    kwargs = dict(subjects=idx, n_subjects=n_subjects)

    pyro.set_rng_seed(7)
    loss = Trace_ELBO().differentiable_loss(module.model, module.guide, xs, yt, **kwargs)
    pyro.set_rng_seed(7)
    guide = poutine.trace(module.guide).get_trace(xs, yt, **kwargs)

    Normal = torch.distributions.Normal
    filled = [torch.nan_to_num(x) for x in xs]
    per_subject = torch.zeros(12)
    if structure == "joint":
        z = guide.nodes["subject_latent"]["value"]
        loc, scale = module.joint_posterior(module.encode(xs), present)
        per_subject += Normal(0.0, 1.0).log_prob(z).sum(-1) - Normal(loc, scale).log_prob(z).sum(-1)
        for k, x in enumerate(filled):
            per_subject += present[:, k] * Normal(*module.modality_decoders[k](z)).log_prob(x).sum(-1)
        outcome_counts = y_present
    else:
        for k, (name, x) in enumerate(zip(["gm", "wm"], filled)):
            h = guide.nodes[f"shallow_latent_{name}"]["value"]
            h_loc, h_scale = module.shallow_encoders[k](x)
            term = Normal(*module.modality_decoders[k](h)).log_prob(x).sum(-1) - Normal(h_loc, h_scale).log_prob(h).sum(-1)
            if structure == "integrative":
                z = guide.nodes[f"deep_latent_{name}"]["value"]
                term += Normal(0.0, 1.0).log_prob(z).sum(-1) - Normal(*module.shared_encoder(h)).log_prob(z).sum(-1)
                term += Normal(*module.shared_decoder(z)).log_prob(h).sum(-1)
            else:
                term += Normal(0.0, 1.0).log_prob(h).sum(-1)
            per_subject += present[:, k] * term
        outcome_counts = y_present & present.all(-1)  # the other structures cannot tell a missing input
    hidden, local_mean, sd, _ = module.outcome_parts(xs)
    mean = hidden @ module.output_weight.T + module.output_bias + local_mean
    per_subject += outcome_counts * Normal(mean, sd).log_prob(torch.nan_to_num(yt)).sum(-1)
    expected = -(n_subjects / 12) * per_subject.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-3)
    assert torch.isfinite(loss)


def test_inputs_hidden_for_training_can_stay_in_the_reconstruction_terms(make_preset, make_arrays):
    """reconstruct=: the guide and the predictor see the hidden inputs, the likelihood the full ones; the
    loss gains exactly the hidden images' log-likelihoods under the latent drawn without them."""
    torch.manual_seed(0)
    inputs, y, _, _ = make_arrays(12, 3)
    inputs, y = with_gaps(inputs, y, seed=1, p_input=0.4, p_outcome=0.5)
    module = InVAModule(["gm", "wm"], [64, 24], 64, make_preset({"structure": "joint", "bayesian_output": False}).model).eval()
    full = [torch.as_tensor(inputs["gm"]), torch.as_tensor(inputs["wm"])]
    has_wm = ~torch.isnan(full[1]).all(-1)
    hide = has_wm & (torch.arange(12) % 2 == 0)                 # gm hidden where wm can stand in
    hidden = [torch.where(hide[:, None], torch.full_like(full[0], float("nan")), full[0]), full[1]]
    kwargs = dict(subjects=torch.arange(12), n_subjects=50)
    losses = []
    for reconstruct in (None, full):
        pyro.set_rng_seed(7)
        losses.append(Trace_ELBO().differentiable_loss(module.model, module.guide, hidden, torch.as_tensor(y),
                                                       reconstruct=reconstruct, **kwargs))
    pyro.set_rng_seed(7)
    z = poutine.trace(module.guide).get_trace(hidden, torch.as_tensor(y), **kwargs).nodes["subject_latent"]["value"]
    gm = torch.distributions.Normal(*module.modality_decoders[0](z)).log_prob(full[0]).sum(-1)
    assert 0 < int(hide.sum()) < 12
    torch.testing.assert_close(losses[0] - losses[1], (50 / 12) * gm[hide].sum(), rtol=1e-5, atol=1e-3)


def test_standardisation_uses_present_values_only(make_arrays):
    inputs, y, _, _ = make_arrays(30, 0)
    inputs, y = with_gaps(inputs, y, seed=2)
    st = Standardizer.fit(Cohort.from_arrays(inputs, y).all)
    present = ~np.isnan(inputs["wm"]).all(1)
    np.testing.assert_allclose(st.input_mean["wm"], inputs["wm"][present].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st.outcome_scale, np.nanstd(y, axis=0), rtol=1e-5)
    out = st.transform_inputs(Cohort.from_arrays(inputs, y).all)["wm"]
    assert np.isnan(out[~present]).all() and np.isfinite(out[present]).all()


def gapped_cohort(make_arrays, n_train=60, n_val=16, n_test=12, seed=0):
    inputs, y, mean, sd = make_arrays(n_train + n_val + n_test, seed)
    inputs, y = with_gaps(inputs, y, seed=seed + 1)
    split = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    y[n_train:n_train + 3] = np.nan          # a few validation subjects lack the outcome too
    return Cohort.from_arrays(inputs, y, split=split, truth_mean=mean, truth_sd=sd)


def test_fit_uses_every_subject_and_only_non_joint_models_refuse_missing_inputs(make_preset, make_arrays):
    cohort = gapped_cohort(make_arrays)
    assert not outcome_presence(cohort.train).all() and not input_presence(cohort.test).all()
    joint = InVA(make_preset({"structure": "joint"})).fit(cohort.train, cohort.val, progress=False, device="cpu")
    assert joint.info["n_train"] == 60 and joint.info["n_train_labeled"] < 60
    assert joint.info["n_val"] == int(outcome_presence(cohort.val).sum()) < 16  # validation: subjects with the outcome
    pred = joint.predict(cohort.test, num_samples=50)
    assert np.isfinite(pred.mean).all() and np.isfinite(pred.raw_sd).all()
    default = InVA(make_preset()).fit(cohort.train, cohort.val, progress=False, device="cpu")
    assert np.isfinite(default.history["train_loss"]).all()
    with pytest.raises(InputError, match="lacks input 'wm'.*needs every input"):
        default.predict(cohort.test)
    complete = cohort.test.subset(input_presence(cohort.test).all(1))
    assert np.isfinite(default.predict(complete, num_samples=50).mean).all()


def test_too_few_validation_subjects_with_the_outcome_is_one_line(make_preset, make_arrays):
    cohort = gapped_cohort(make_arrays)
    val = cohort.val
    val.outcome[:] = np.nan
    val.outcome[0] = 0.0
    with pytest.raises(InputError) as caught:
        InVA(make_preset()).fit(cohort.train, val, progress=False, device="cpu")
    assert "1 validation subject(s) have the outcome" in str(caught.value) and "\n" not in str(caught.value)




def test_cli_empty_cells_lazy_and_in_memory_alike_and_bad_rows_exit_2(tmp_path, capsys, make_manifest):
    import json
    from inva_pyro import cli
    cohort = tmp_path / "cohort"
    table = make_manifest(cohort)[1]
    train = table.index[table["split"] == "train"]
    table.loc[train[:5], "y"] = np.nan                 # MRI-only training subjects
    table.loc[train[5:8], "x2"] = np.nan               # training subjects lacking an input
    test = table.index[table["split"] == "test"]
    table.to_csv(cohort / "complete_test.csv", index=False)  # test rows complete: every structure predicts them
    table.loc[test[:2], "x3"] = np.nan
    table.to_csv(cohort / "manifest.csv", index=False)
    histories = {}
    for structure, manifest in (("joint", "manifest.csv"), ("integrative", "complete_test.csv")):
        preset = tmp_path / f"{structure}.toml"
        preset.write_text(tiny_toml({"structure": structure}, {"epochs": 2, "batch_size": 8}, {"num_samples": 20}))
        for mode in ("memory", "lazy"):
            run = tmp_path / f"{structure}-{mode}"
            args = ["fit", "--manifest", str(cohort / manifest), "--inputs", "x1,x2,x3", "--outcome", "y",
                    "--model", str(preset), "--device", "cpu", "--out", str(run)] + (["--lazy"] if mode == "lazy" else [])
            assert cli.main(args) == 0
            histories[structure, mode] = json.loads((run / "history.json").read_text())
        np.testing.assert_allclose(histories[structure, "lazy"]["train_loss"],
                                   histories[structure, "memory"]["train_loss"], rtol=1e-5)
        assert np.isfinite(histories[structure, "memory"]["train_loss"]).all()
    out = tmp_path / "pred-joint"
    assert cli.main(["predict", "--run", str(tmp_path / "joint-memory"), "--manifest", str(cohort / "manifest.csv"),
                     "--out", str(out)]) == 0
    assert (out / "predictions.csv").exists()
    capsys.readouterr()
    # a model that needs every input refuses, with one line, a manifest whose predicted rows lack one...
    out = tmp_path / "pred-default"
    assert cli.main(["predict", "--run", str(tmp_path / "integrative-memory"), "--manifest",
                     str(cohort / "manifest.csv"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "lacks input 'x3'" in err and len(err.splitlines()) == 1 and not out.exists()
    # ... and fit refuses it before training, the default preset included: never a run that cannot predict its cohort
    for model in ([], ["--model", str(tmp_path / "integrative.toml")]):
        run = tmp_path / "refused"
        assert cli.main(["fit", "--manifest", str(cohort / "manifest.csv"), "--inputs", "x1,x2,x3", "--outcome", "y",
                         "--out", str(run), *model]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"inva: error: {cohort / 'manifest.csv'} (split 'test'): subject ") and "lacks input 'x3'" in err
        assert "--model inva-joint" in err and len(err.splitlines()) == 1 and not run.exists()
    table.loc[train[9], ["x1", "x2", "x3"]] = np.nan
    table.to_csv(cohort / "manifest.csv", index=False)
    assert cli.main(["fit", "--manifest", str(cohort / "manifest.csv"), "--inputs", "x1,x2,x3", "--outcome", "y",
                     "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no input image at all" in err and len(err.splitlines()) == 1 and not (tmp_path / "never").exists()


def test_prediction_without_an_input_has_wider_intervals_than_with_it(make_preset, make_arrays):
    # y depends on gm voxel by voxel (1.2 gm + noise of sd 0.75): without gm the residual sd is about
    # sqrt(0.75^2 + 1.2^2) = 1.4, nearly twice as wide; wm carries little about y.
    inputs, y, mean, sd = make_arrays(150, 4)
    inputs = {k: v.astype(np.float32) for k, v in inputs.items()}
    rng = np.random.default_rng(5)
    inputs["gm"][:100][rng.random(100) < 0.3] = np.nan        # training subjects lacking gm
    split = ["train"] * 100 + ["val"] * 30 + ["test"] * 20
    cohort = Cohort.from_arrays(inputs, y, split=split)
    model = InVA(make_preset({"structure": "joint"}, {"epochs": 30})).fit(cohort.train, cohort.val,
                                                                          progress=False, device="cpu")
    assert model.calibrator.pattern_scale["no gm"] > 1.3 > model.calibrator.pattern_scale["no wm"]
    test = cohort.test
    without = Cohort.from_arrays({"gm": np.full_like(test.inputs["gm"], np.nan), "wm": test.inputs["wm"]},
                                 test.outcome).all
    full, lacking = model.predict(test, num_samples=200), model.predict(without, num_samples=200)
    for level in (0.5, 0.9):
        width = lambda p: float(np.mean(p.intervals[level][1] - p.intervals[level][0]))  # noqa: E731
        assert width(lacking) > 1.3 * width(full)
    assert float(lacking.raw_sd.mean()) > float(full.raw_sd.mean())
    # calibrated for each pattern: 90% intervals cover about 90% of the test voxels either way
    for p in (full, lacking):
        lo, hi = p.intervals[0.9]
        assert abs(float(np.mean((p.observed >= lo) & (p.observed <= hi))) - 0.9) < 0.06


def test_each_missingness_pattern_gets_its_own_quantile_function():
    # Complete subjects: Gaussian errors. Subjects without gm: Laplace errors (heavier tails) twice as
    # wide. One scale per pattern would match their variance but not their shape: a Laplace variable
    # inside the Gaussian 50% interval of its own variance falls there with probability
    # 1 - exp(-0.674 sqrt 2) = 0.614; with the pattern's quantiles every level is nominal.
    from inva_pyro.predict.calibration import Calibrator
    from inva_pyro.predict.patterns import pattern_fit
    from inva_pyro.predict.prediction import Prediction
    rng = np.random.default_rng(11)
    shape = (200, 100)
    draw = {"complete": lambda: rng.normal(size=shape), "no gm": lambda: rng.laplace(scale=np.sqrt(2), size=shape)}
    z_complete = draw["complete"]()
    calibrator = Calibrator.fit(z_complete, np.zeros(shape), np.ones(shape))
    scale, quantiles = pattern_fit(z_complete, draw["no gm"]())
    assert abs(scale - 2.0) < 0.05                 # RMS of Laplace(sqrt 2) is 2; sd of the estimate ~0.01
    calibrator.pattern_scale["no gm"], calibrator.pattern_quantiles["no gm"] = scale, quantiles
    patterns = ["complete"] * shape[0] + ["no gm"] * shape[0]
    observed = np.concatenate([draw["complete"](), draw["no gm"]()])
    ones, zeros = np.ones_like(observed), np.zeros_like(observed)
    prediction = Prediction(subjects=[str(i) for i in range(len(observed))], outcome_name="y",
                            levels=[0.5, 0.8, 0.95], mean=zeros, raw_sd=ones, raw_intervals={},
                            calibrator=calibrator, observed=observed, patterns=patterns)
    n = shape[0] * shape[1]
    for level in prediction.levels:
        lo, hi = prediction.intervals[level]
        inside = (observed >= lo) & (observed <= hi)
        tolerance = 4 * np.sqrt(2 * level * (1 - level) / n)   # test and calibration draws both binomial
        for rows in (slice(0, shape[0]), slice(shape[0], None)):
            assert abs(inside[rows].mean() - level) < tolerance
    # the scale alone (the complete subjects' quantiles applied to s_p * sd) misses the shape
    scale_only = np.abs(observed[shape[0]:]) <= scale * calibrator.z(0.75)
    assert scale_only.mean() > 0.58
    pit = prediction.pit()[shape[0]:]
    assert abs(np.mean(pit < 0.25) - 0.25) < 0.02 and abs(np.mean(pit > 0.75) - 0.25) < 0.02
    back = Calibrator.from_dict(calibrator.to_dict())
    np.testing.assert_allclose(back.pattern_quantiles["no gm"], quantiles)
    old = {k: v for k, v in calibrator.to_dict().items() if k != "pattern_quantiles"}  # a run from before
    assert Calibrator.from_dict(old).pattern_quantiles == {} and Calibrator.from_dict(old).z(0.75, "no gm") == calibrator.z(0.75)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_hide_inputs_hides_at_the_rate_asked_and_never_every_input(device):
    from inva_pyro.data.missing import hide_inputs
    n, share = 20000, 0.3
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, 4, generator=gen) for _ in range(3)]
    xs[1][: n // 4] = float("nan")                        # a quarter of the subjects lack x2 already
    if device == "meta":
        out = hide_inputs([x.to("meta") for x in xs], share)
        assert all(o.device.type == "meta" and o.shape == (n, 4) for o in out)
        return
    torch.manual_seed(0)
    out = hide_inputs(xs, share)
    before = torch.stack([~torch.isnan(x).all(-1) for x in xs], -1)
    after = torch.stack([~torch.isnan(x).all(-1) for x in out], -1)
    assert after.any(-1).all() and not (after & ~before).any()      # never all hidden, nothing revealed
    for o, x in zip(out, xs):                                         # what is kept is unchanged
        kept = ~torch.isnan(o).all(-1)
        assert torch.equal(o[kept], x[kept])
    # A subject with K present inputs loses a given one with probability p - p^K / K (all K drawn
    # hidden, and that one not the one kept): 0.291 for K = 3, 0.255 for K = 2.
    for k, rows in ((3, before.all(-1)), (2, ~before[:, 1])):
        expected = share - share ** k / k
        for j in (0, 2):
            lost = 1 - after[rows, j].float().mean().item()
            assert abs(lost - expected) < 4 * np.sqrt(expected * (1 - expected) / rows.sum().item())


def test_hide_inputs_one_scheme_hides_one_input_chosen_uniformly():
    from inva_pyro.data.missing import hide_inputs
    n, share = 30000, 0.75
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(n, 4, generator=gen) for _ in range(3)]
    xs[1][: n // 4] = float("nan")                        # a quarter lack x2
    xs[1][n // 4: n // 4 + 100] = float("nan")
    xs[2][n // 4: n // 4 + 100] = float("nan")            # 100 have x1 alone: they keep it
    torch.manual_seed(0)
    out = hide_inputs(xs, share, scheme="one")
    before = torch.stack([~torch.isnan(x).all(-1) for x in xs], -1)
    after = torch.stack([~torch.isnan(x).all(-1) for x in out], -1)
    assert not (after & ~before).any() and after.any(-1).all()
    lost = (before & ~after).sum(-1)
    assert lost.max() == 1                                              # never more than one input
    assert torch.equal(after[n // 4: n // 4 + 100], before[n // 4: n // 4 + 100])
    # Binomial rates: with K present inputs each is hidden with probability share / K.
    for k, rows in ((3, before.all(-1)), (2, before.sum(-1) == 2)):
        m = rows.sum().item()
        hidden = 1 - after[rows].float().mean(0)
        for j in range(3):
            if before[rows, j].all():
                p = share / k
                assert abs(hidden[j].item() - p) < 4 * np.sqrt(p * (1 - p) / m)
    meta = hide_inputs([x.to("meta") for x in xs], share, scheme="one")   # drawn on the inputs' device
    assert all(o.device.type == "meta" and o.shape == (n, 4) for o in meta)
    with pytest.raises(ValueError, match="unknown input dropout scheme 'some'"):
        hide_inputs(xs, share, scheme="some")


def test_input_dropout_is_for_the_joint_structure_and_trains(make_preset, make_arrays):
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="input_dropout needs model.structure = 'joint'"):
        make_preset({"structure": "integrative"}, {"input_dropout": 0.2})
    with pytest.raises(ValidationError, match="reconstruct_hidden needs training.input_dropout > 0"):
        make_preset({"structure": "joint"}, {"reconstruct_hidden": True})
    inputs, y, _, _ = make_arrays(40, 4)
    cohort = Cohort.from_arrays({k: v.astype(np.float32) for k, v in inputs.items()}, y,
                                split=["train"] * 30 + ["val"] * 10)
    fits = [InVA(make_preset({"structure": "joint"}, {"epochs": 2, "input_dropout": p})).fit(
        cohort.train, cohort.val, seed=0, progress=False, device="cpu") for p in (0.0, 0.5, 0.5)]
    loss = [f.history["train_loss"] for f in fits]
    assert loss[1] == loss[2] and loss[1] != loss[0]   # seeded: the hidden inputs are drawn the same way
    one = InVA(make_preset({"structure": "joint"}, {"epochs": 2, "input_dropout": 0.5,
                                                    "input_dropout_scheme": "one"})).fit(
        cohort.train, cohort.val, seed=0, progress=False, device="cpu")
    assert one.history["train_loss"] != loss[1]         # the scheme reaches the training loop
    kept = InVA(make_preset({"structure": "joint"}, {"epochs": 2, "input_dropout": 0.5,
                                                     "reconstruct_hidden": True})).fit(
        cohort.train, cohort.val, seed=0, progress=False, device="cpu")
    assert kept.history["train_loss"] != loss[1] and np.isfinite(kept.history["train_loss"]).all()
