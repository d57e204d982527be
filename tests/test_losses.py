"""DSSIM, MMD and KL-weight schedules (inva_pyro.model.losses): values, shapes, gradients, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from inva_pyro.config import TrainingConfig
from inva_pyro.model.losses import DSSIM, dssim, kl_schedule, mask_indices, mmd
from inva_pyro.train.loop import kl_scale_at

GRIDS = [(16, 20), (9, 11, 7), (12, 8, 10)]  # 2-D, non-cubic 3-D volumes


def _smooth_images(n: int, shape, seed: int) -> torch.Tensor:
    """(n, *shape) smooth random images (structure for SSIM to see)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    raw = rng.standard_normal((n, *shape))
    smooth = ndimage.gaussian_filter(raw, sigma=(0, *([1.5] * len(shape))))
    return torch.as_tensor(smooth / smooth.std(), dtype=torch.float32)


def _masked(shape, seed: int = 0, share: float = 0.7):
    """A blob-shaped boolean mask (a thresholded smooth field) covering about ``share`` of the grid."""
    field = _smooth_images(1, shape, seed + 100)[0].numpy()
    return field > np.quantile(field, 1 - share)


@pytest.mark.parametrize("shape", GRIDS)
def test_dssim_zero_for_identical_and_positive_otherwise(shape):
    mask = _masked(shape)
    images = _smooth_images(4, shape, 0).reshape(4, -1)[:, mask.ravel()]
    same = dssim(images, images.clone(), shape, mask)
    assert same.shape == (4,)
    assert torch.allclose(same, torch.zeros(4), atol=1e-5)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    small = dssim(images + 0.2 * noise, images, shape, mask)
    large = dssim(images + 1.0 * noise, images, shape, mask)
    assert (small > 0.01).all() and (large > small).all() and (large <= 2).all()


@pytest.mark.parametrize("shape", GRIDS)
def test_dssim_gradients_flow_and_the_loss_falls(shape):
    mask = _masked(shape)
    target = _smooth_images(3, shape, 2).reshape(3, -1)[:, mask.ravel()]
    loss_module = DSSIM(shape, mask)
    recon = (target + torch.randn(target.shape, generator=torch.Generator().manual_seed(3))).requires_grad_()
    first = loss_module(recon, target)
    first.sum().backward()
    assert recon.grad is not None and torch.isfinite(recon.grad).all() and recon.grad.abs().sum() > 0
    optimiser = torch.optim.Adam([recon], lr=0.05)
    for _ in range(30):
        optimiser.zero_grad()
        loss = loss_module(recon, target).sum()
        loss.backward()
        optimiser.step()
    assert loss_module(recon, target).sum() < 0.5 * first.sum().detach()


def test_dssim_full_grid_matches_monai_mean_ssim():
    from monai.metrics.regression import compute_ssim_and_cs

    shape = (9, 11, 7)
    a, b = _smooth_images(2, shape, 4), _smooth_images(2, shape, 5)
    ours = dssim(a.reshape(2, -1), b.reshape(2, -1), shape, data_range=3.0)
    ssim_map, _ = compute_ssim_and_cs(a[:, None], b[:, None], spatial_dims=3, kernel_size=[7] * 3,
                                      kernel_sigma=[1.5] * 3, data_range=3.0)
    assert torch.allclose(ours, 1 - ssim_map.flatten(1).mean(1), atol=1e-5)


def test_dssim_respects_the_mask():
    # A 16 x 16 brain inside a 40 x 40 grid: the windows wholly outside the mask (where both
    # images are 0 and SSIM is trivially 1) get weight 0, so the padded DSSIM stays close to the
    # brain-only DSSIM; an unweighted mean over the padded grid would be diluted towards 0.
    inner = (16, 16)
    target = _smooth_images(3, inner, 6).reshape(3, -1)
    recon = target + 0.5 * torch.randn(target.shape, generator=torch.Generator().manual_seed(7))
    alone = dssim(recon, target, inner)
    mask = np.zeros((40, 40), dtype=bool)
    mask[12:28, 12:28] = True
    padded = dssim(recon, target, (40, 40), mask)
    grid = lambda v: torch.zeros(3, 1600).index_copy(1, torch.as_tensor(np.flatnonzero(mask)), v)  # noqa: E731
    unweighted = dssim(grid(recon), grid(target), (40, 40), data_range=None)
    assert torch.allclose(padded, alone, rtol=0.35)
    assert (unweighted < 0.5 * padded).all()
    # boolean mask and flat indices are the same mask
    assert torch.allclose(dssim(recon, target, (40, 40), np.flatnonzero(mask)), padded)


def test_dssim_per_subject_range_makes_it_unit_free_and_batch_independent():
    shape = (12, 10)
    target = _smooth_images(3, shape, 8).reshape(3, -1)
    recon = target + 0.3 * torch.randn(target.shape, generator=torch.Generator().manual_seed(9))
    base = dssim(recon, target, shape)
    # a joint rescaling leaves SSIM unchanged when the constants follow the range
    assert torch.allclose(dssim(50 * recon, 50 * target, shape), base, atol=1e-5)
    assert torch.allclose(dssim(recon[1:2], target[1:2], shape), base[1:2], atol=1e-6)
    assert dssim(recon.double(), target.double(), shape).dtype == torch.float64


def test_dssim_refuses_grids_it_cannot_handle():
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        dssim(torch.zeros(2, 30), torch.zeros(2, 30), (5, 6))
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        DSSIM((20, 20, 4))
    assert DSSIM((20, 20, 4), win_size=3).grid_shape == (20, 20, 4)
    with pytest.raises(ValueError, match="2-D or 3-D"):
        DSSIM((64,))
    with pytest.raises(ValueError, match="entries"):
        DSSIM((8, 8), np.ones((7, 8), dtype=bool))
    with pytest.raises(ValueError, match="shape"):
        DSSIM((8, 8))(torch.zeros(2, 63), torch.zeros(2, 63))
    with pytest.raises(ValueError, match="empty"):
        mask_indices((8, 8), np.zeros((8, 8), dtype=bool))


# --------------------------------------------------------------------------- MMD


def test_mmd_matches_the_unbiased_formula():
    gen = torch.Generator().manual_seed(0)
    q, p = torch.randn(7, 3, generator=gen, dtype=torch.float64), torch.randn(5, 3, generator=gen, dtype=torch.float64)
    for kernel in ("imq", "rbf"):
        c = 6.0
        k = (lambda a, b: c / (c + ((a - b) ** 2).sum())) if kernel == "imq" else \
            (lambda a, b: torch.exp(-((a - b) ** 2).sum() / c))
        kqq = sum(k(q[i], q[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
        kpp = sum(k(p[i], p[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
        kqp = sum(k(q[i], p[j]) for i in range(7) for j in range(5)) / 35
        assert torch.allclose(mmd(q, p, kernel), kqq + kpp - 2 * kqp)  # default C = 2 d = 6


@pytest.mark.parametrize("kernel,bandwidth", [("imq", None), ("rbf", None), ("imq", "median"),
                                              ("imq", [0.5, 1.0, 2.0])])
def test_mmd_is_near_zero_for_one_distribution_and_positive_for_a_shift(kernel, bandwidth):
    gen = torch.Generator().manual_seed(1)
    reps, n, d = 30, 100, 4
    null = torch.stack([mmd(torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen), kernel, bandwidth)
                        for _ in range(reps)])
    shifted = torch.stack([mmd(torch.randn(n, d, generator=gen) + 0.7, torch.randn(n, d, generator=gen), kernel,
                               bandwidth) for _ in range(reps)])
    se = null.std() / reps ** 0.5
    assert abs(float(null.mean())) < 4 * float(se)         # unbiased: mean 0 within its standard error
    assert float(shifted.min()) > float(null.max())        # every shifted estimate beats every null one
    assert float(shifted.mean()) > 10 * float(null.std())


def test_mmd_gradients_flow_and_pull_the_samples_to_the_prior():
    gen = torch.Generator().manual_seed(2)
    noise, prior = torch.randn(128, 2, generator=gen), torch.randn(128, 2, generator=gen)
    shift = torch.tensor([1.5, -1.0], requires_grad=True)
    first = mmd(noise + shift, prior)
    first.backward()
    assert shift.grad.abs().sum() > 0
    optimiser = torch.optim.Adam([shift], lr=0.05)
    for _ in range(80):
        optimiser.zero_grad()
        loss = mmd(noise + shift, prior)
        loss.backward()
        optimiser.step()
    assert float(loss.detach()) < 0.1 * float(first.detach()) and shift.detach().abs().max() < 0.4


def test_mmd_refuses_bad_arguments():
    a = torch.randn(5, 3)
    with pytest.raises(ValueError, match="at least 2"):
        mmd(a[:1], a)
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        mmd(a, torch.randn(5, 2))
    with pytest.raises(ValueError, match="kernel"):
        mmd(a, a, kernel="laplace")
    with pytest.raises(ValueError, match="bandwidth"):
        mmd(a, a, bandwidth="mean")
    with pytest.raises(ValueError, match="positive"):
        mmd(a, a, bandwidth=-1.0)


# --------------------------------------------------------------------------- schedules


def test_linear_schedule_is_the_training_loops_warm_up():
    cfg = TrainingConfig(kl_weight=0.5, kl_anneal_epochs=4)
    assert [kl_schedule(e, "linear", max_weight=0.5, warmup=4) for e in range(7)] == \
        [kl_scale_at(e, cfg) for e in range(7)] == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5, 0.5]
    assert kl_schedule(0, "linear", warmup=0) == 1.0
    assert kl_schedule(9, "constant", max_weight=0.3) == 0.3


def test_cyclical_schedule_follows_fu_et_al():
    values = [kl_schedule(e, "cyclical", total_epochs=20, cycles=4, ratio=0.5) for e in range(22)]
    one_cycle = [0.0, 0.4, 0.8, 1.0, 1.0]
    assert values == pytest.approx(one_cycle * 4 + [1.0, 1.0])
    # one cycle with ratio 1 is a linear ramp from 0 over the whole run
    assert [kl_schedule(e, "cyclical", total_epochs=4, cycles=1, ratio=1.0, max_weight=2.0)
            for e in range(5)] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    # non-integer cycle length: still starts every cycle at 0 and never exceeds the maximum
    odd = [kl_schedule(e, "cyclical", total_epochs=10, cycles=3, ratio=0.5) for e in range(10)]
    assert odd[0] == 0.0 and odd[4] == 0.0 and odd[8] == 0.0 and max(odd) == 1.0


def test_schedule_refuses_bad_arguments():
    with pytest.raises(ValueError, match="total_epochs"):
        kl_schedule(0, "cyclical")
    with pytest.raises(ValueError, match="ratio"):
        kl_schedule(0, "cyclical", total_epochs=10, ratio=0.0)
    with pytest.raises(ValueError, match="cycles"):
        kl_schedule(0, "cyclical", total_epochs=10, cycles=0)
    with pytest.raises(ValueError, match="unknown schedule"):
        kl_schedule(0, "cosine")
    with pytest.raises(ValueError, match="epoch"):
        kl_schedule(-1)


def test_dssim_keeps_leading_dimensions_for_vectorised_particles():
    shape = (10, 9)
    target = _smooth_images(3, shape, 10).reshape(3, -1)
    recon = target + 0.3 * torch.randn((2, 3, 90), generator=torch.Generator().manual_seed(11))
    module = DSSIM(shape)
    both = module(recon, target)  # (particles, subjects, V) against (subjects, V)
    assert both.shape == (2, 3)
    assert torch.allclose(both[1], module(recon[1], target), atol=1e-6)
