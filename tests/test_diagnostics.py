"""Posterior-collapse diagnostics and the guide's Pareto k-hat, on modules whose encoders and
decoders are replaced by probes with exactly known behaviour (a dead latent unit, a decoder that
outputs the mean image, an exact linear-Gaussian autoencoder).

Tolerances: a dead unit has activity and KL exactly 0; Monte-Carlo KL estimates are compared
with their closed form within 5 standard errors computed from the per-sample variance.
"""
from __future__ import annotations

import io
import json
import math
import warnings

import numpy as np
import pyro
import pytest
import torch
from torch import nn

from inva_pyro.criticism import diagnostics as D
from inva_pyro.model.module import InVAModule


class ProbeEncoder(nn.Module):
    """loc = x[..., :dim] * gains (a zero gain is a dead unit), scale = a constant."""

    def __init__(self, gains, scale=1.0):
        super().__init__()
        self.gains = torch.tensor(gains, dtype=torch.float32)
        self.scale = scale

    def forward(self, x):
        loc = x[..., :len(self.gains)] * self.gains
        return loc, torch.full_like(loc, self.scale)


class LinearEncoder(nn.Module):
    def __init__(self, matrix, scale=0.1):
        super().__init__()
        self.matrix, self.scale = matrix, scale

    def forward(self, x):
        loc = x @ self.matrix
        return loc, torch.full_like(loc, self.scale)


class LinearDecoder(nn.Module):
    def __init__(self, matrix):
        super().__init__()
        self.matrix = matrix

    def forward(self, h):
        return h @ self.matrix, torch.full((self.matrix.shape[1],), 0.1)


class MeanImageDecoder(nn.Module):
    """Ignores its latent input and outputs one image: the collapse of tutorial seed 001, fig. 2."""

    def __init__(self, image):
        super().__init__()
        self.image = image

    def forward(self, h):
        return self.image.expand(*h.shape[:-1], -1), torch.full_like(self.image, 0.5)


def build(make_preset, sizes=(20, 12), structure="integrative", p=3, q=2):
    pyro.set_rng_seed(0)
    cfg = make_preset(model={"structure": structure, "shallow_dim": p, "deep_dim": q, "dropout": 0.0}).model
    return InVAModule(["gm", "wm"][:len(sizes)], list(sizes), sizes[0], cfg)


def inputs(sizes=(20, 12), n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, v, generator=g) for v in sizes]


def healthy(make_preset, structure="separate", p=3, sizes=(20, 12), n=400, noise=0.1):
    """x_k = h_k A_k + noise, h_k ~ N(0, I_p), with encoders pinv(A_k) and decoders A_k (exact)."""
    g = torch.Generator().manual_seed(1)
    module = build(make_preset, sizes=sizes, structure=structure, p=p)
    xs, mats = [], []
    for k, v in enumerate(sizes):
        a = torch.randn(p, v, generator=g)
        xs.append(torch.randn(n, p, generator=g) @ a + noise * torch.randn(n, v, generator=g))
        module.shallow_encoders[k] = LinearEncoder(torch.linalg.pinv(a))
        module.modality_decoders[k] = LinearDecoder(a)
        mats.append(a)
    return module, xs, mats


def test_active_units_is_the_variance_of_posterior_means():
    rng = np.random.default_rng(0)
    locs = rng.standard_normal((500, 4)) * np.array([1.0, 0.2, 0.05, 0.0])
    activity, active = D.active_units(locs)
    np.testing.assert_allclose(activity, locs.var(axis=0, ddof=1))
    # true variances 1, 0.04, 0.0025, 0 against the threshold 0.01 (sample sds are ~6% off at n=500)
    assert active.tolist() == [True, True, False, False]


def test_a_dead_latent_unit_is_found_at_both_levels(make_preset):
    module = build(make_preset)
    module.shallow_encoders[0] = ProbeEncoder([1.0, 0.0, 1.0])   # gm: shallow unit 1 is dead
    module.shallow_encoders[1] = ProbeEncoder([1.0, 1.0, 1.0])
    module.shared_encoder = ProbeEncoder([1.0, 0.0])             # deep unit 1 is dead for every modality
    report = D.collapse_report(module, inputs())
    assert report["active_units"]["count"] == {"gm": {"shallow": 2, "deep": 1}, "wm": {"shallow": 3, "deep": 1}}
    assert report["active_units"]["activity"]["gm"]["shallow"][1] == 0.0
    assert report["active_units"]["activity"]["gm"]["deep"][1] == 0.0
    # q(z_1 | h) = N(0, 1) = p(z_1): its KL is exactly zero; the live deep unit carries information
    assert report["kl_per_dimension"]["gm"]["deep"][1] == pytest.approx(0.0, abs=1e-6)
    assert report["kl_per_dimension"]["gm"]["deep"][0] > 0.1
    assert report["inactive_deep"] == []   # (the untrained decoders make both look collapsed to the mean)
    json.dumps(report)  # JSON-able, as metrics.json needs


def test_kl_per_dimension_matches_the_closed_form(make_preset):
    # separate structure: p(h) = N(0, I), q(h|x) = N(m(x), s^2) with m = x[:, :3] * gains
    module = build(make_preset, structure="separate")
    gains, s = torch.tensor([1.0, 0.0, 0.5]), 0.5
    module.shallow_encoders[0] = ProbeEncoder(gains.tolist(), scale=s)
    xs = inputs()
    n_mc = 64
    got = np.array(D.kl_per_dimension(module, xs, num_samples=n_mc, seed=3)["gm"]["shallow"])
    m = (xs[0][:, :3] * gains).double().numpy()
    exact = (0.5 * (m ** 2 + s ** 2 - 1) - math.log(s)).mean(0)
    # per draw, log q - log p = -log s + ((s^2 - 1) eps^2 + 2 m s eps + m^2) / 2 with eps ~ N(0, 1):
    # variance ((s^2 - 1)/2)^2 * 2 + m^2 s^2 per subject
    var = (((s ** 2 - 1) / 2) ** 2 * 2 + m ** 2 * s ** 2).mean(0)
    se = np.sqrt(var / (n_mc * m.shape[0]))
    assert np.all(np.abs(got - exact) < 5 * se)
    assert "deep" not in D.kl_per_dimension(module, xs)["gm"]


def test_collapse_to_the_mean_image_is_detected_and_warned(make_preset, capsys):
    module, xs, _ = healthy(make_preset)
    module.modality_decoders[1] = MeanImageDecoder(xs[1].mean(0))
    with pytest.warns(D.PosteriorCollapseWarning, match="modality 'wm'"):
        report = D.warn_if_collapsed(module, xs)
    recon = report["reconstruction"]["wm"]
    assert recon["reconstruction_variance"] == pytest.approx(0.0, abs=1e-10)
    assert recon["ratio"] == pytest.approx(0.0, abs=1e-12) and recon["collapsed_to_mean"]
    assert recon["explained"] == pytest.approx(0.0, abs=1e-6)
    assert report["collapsed_modalities"] == ["wm"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("inva: warning: posterior collapse in modality 'wm'")


def test_a_working_autoencoder_does_not_warn(make_preset):
    # x = h A + 0.1 noise; encoder pinv(A), decoder A: an exact linear-Gaussian autoencoder
    p, v = 3, 20
    module, xs, (a, _) = healthy(make_preset, p=p, sizes=(v, 12))
    out = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error", D.PosteriorCollapseWarning)
        report = D.warn_if_collapsed(module, xs, stream=out)
    assert out.getvalue() == "" and D.collapse_messages(report) == []
    assert report["active_units"]["count"]["gm"] == {"shallow": p}
    # reconstructions are x projected on A's row space: ratio = (tr A'A + 0.01 p) / (tr A'A + 0.01 v)
    # in expectation; 400 subjects estimate each variance to a few percent
    tr = float((a ** 2).sum())
    expected = (tr + 0.01 * p) / (tr + 0.01 * v)
    assert report["reconstruction"]["gm"]["ratio"] == pytest.approx(expected, rel=0.1)


def test_inactive_deep_level_gets_its_own_message(make_preset):
    module, xs, _ = healthy(make_preset, structure="integrative")
    module.shared_encoder = ProbeEncoder([0.0, 0.0])                 # q(z|h) = prior for every h
    report = D.collapse_report(module, xs)
    assert report["collapsed_modalities"] == [] and report["inactive_deep"] == ["gm", "wm"]
    msgs = D.collapse_messages(report)
    assert len(msgs) == 2 and all("deep latent" in m for m in msgs)


def test_psis_khat_per_subject_is_reproducible_and_leaves_the_rng_alone(make_preset):
    module = build(make_preset)
    xs = inputs(n=10)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = D.psis_khat(module, xs, num_particles=200, max_subjects=3, seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    second = D.psis_khat(module, xs, num_particles=200, max_subjects=3, seed=1)
    assert first == second
    assert len(first["khat"]) == 3 and len(set(first["subjects"])) == 3
    assert all(math.isfinite(k) for k in first["khat"])


@pytest.mark.parametrize("chunk", [None, 64])
def test_psis_khat_is_small_when_the_guide_is_the_exact_posterior(make_preset, monkeypatch, chunk):
    """Also with the particles drawn 64 at a time (as whole-brain images are)."""
    if chunk:
        monkeypatch.setattr(D, "PSIS_CHUNK_VALUES", 6 * chunk)  # 6 input values per particle here
    # separate structure, p(h) = N(0, I), x = h A + noise (sd sigma): the exact posterior of h is
    # Gaussian, N(S A x / sigma^2, S) with S = (I + A A' / sigma^2)^-1. With that as the guide the
    # importance weights are constant, so their tail is not heavy: k-hat <= 0.5 (Yao et al. 2018).
    p, v, sigma = 2, 6, 1.0
    module = build(make_preset, sizes=(v,), structure="separate", p=p)
    g = torch.Generator().manual_seed(2)
    # a diagonal guide is exact only for a diagonal posterior covariance: orthogonal rows for A
    rows = torch.linalg.qr(torch.randn(v, p, generator=g)).Q.T          # (p, v), orthonormal rows
    a = torch.diag(torch.tensor([1.0, 0.6])) @ rows
    post_cov = torch.linalg.inv(torch.eye(p) + a @ a.T / sigma ** 2)    # diagonal

    class ExactPosterior(nn.Module):
        def forward(self, x):
            loc = x @ a.T @ post_cov / sigma ** 2
            return loc, torch.diagonal(post_cov).sqrt().expand_as(loc)

    class Decoder(nn.Module):
        def forward(self, h):
            return h @ a, torch.full((v,), sigma)

    module.shallow_encoders[0] = ExactPosterior()
    module.modality_decoders[0] = Decoder()
    x = torch.randn(6, p, generator=g) @ a + sigma * torch.randn(6, v, generator=g)
    report = D.psis_khat(module, [x], num_particles=1000, max_subjects=6, seed=0)
    assert report["max"] < 0.5


def test_psis_khat_ignores_kl_weights(make_preset):
    # the same networks with a different deep_kl_weight: the weights p/q, hence k-hat, are unchanged
    module = build(make_preset)
    xs = inputs(n=4)
    first = D.psis_khat(module, xs, num_particles=200, max_subjects=2, seed=0)
    if "deep_kl_weight" in type(module.cfg).model_fields:
        module.cfg = module.cfg.model_copy(update={"deep_kl_weight": 0.3})
    second = D.psis_khat(module, xs, num_particles=200, max_subjects=2, seed=0)
    assert first["khat"] == pytest.approx(second["khat"], rel=1e-6)
