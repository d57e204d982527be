"""Convolutional encoder/decoder (inva_pyro.model.conv): shapes on non-cubic grids with masks, training."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from inva_pyro.model.conv import ConvDecoder, ConvEncoder, stage_shapes
from inva_pyro.model.losses import DSSIM

SHAPE = (9, 11, 7)  # non-cubic, odd sizes


def _mask(shape, share: float = 0.6, seed: int = 0) -> np.ndarray:
    """An ellipsoid-ish brain mask: the ``share`` of grid points nearest the centre (scaled axes)."""
    axes = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    radius = sum(a ** 2 for a in axes) + 0.05 * np.random.default_rng(seed).random(shape)
    return radius <= np.quantile(radius, share)


@pytest.mark.parametrize("shape", [SHAPE, (13, 10), (1, 5, 3), (8, 9, 10), (16, 20)])
def test_shapes_match_the_mlp_interfaces(shape):
    torch.manual_seed(0)
    mask = _mask(shape)
    index = np.flatnonzero(mask)
    encoder = ConvEncoder(shape, index, latent_dim=5, channels=(4, 8, 8), hidden=16)
    decoder = ConvDecoder(shape, index, latent_dim=5, channels=(4, 8, 8), hidden=16)
    x = torch.randn(3, index.size)
    loc, scale = encoder(x)
    assert loc.shape == scale.shape == (3, 5) and (scale > 0).all()
    mean, sigma = decoder(loc)
    assert mean.shape == (3, index.size) and sigma.shape == (index.size,) and (sigma > 0).all()
    # the decoder's stages land exactly on the encoder's sizes, back to the input grid
    assert stage_shapes(shape, 3)[0] == tuple(shape)


def test_boolean_mask_and_indices_agree_and_weights_exclude_the_index():
    torch.manual_seed(1)
    mask = _mask(SHAPE)
    a = ConvEncoder(SHAPE, mask, 4, (4, 8))
    b = ConvEncoder(SHAPE, np.flatnonzero(mask), 4, (4, 8))
    b.load_state_dict(a.state_dict())
    assert not any("index" in key or "mask_grid" in key for key in a.state_dict())
    x = torch.randn(2, int(mask.sum()))
    assert torch.equal(a(x)[0], b(x)[0])


def test_refuses_bad_grids():
    with pytest.raises(ValueError, match="2-D or 3-D"):
        ConvEncoder((64,), None, 3)
    with pytest.raises(ValueError, match="channels"):
        ConvDecoder((8, 8), None, 3, channels=())
    with pytest.raises(ValueError, match=r"expected x of shape"):
        ConvEncoder((8, 8), None, 3)(torch.zeros(2, 63))


def _structured_volumes(n: int, shape, mask: np.ndarray, seed: int) -> torch.Tensor:
    """n volumes with 3 smooth spatial patterns and subject weights, plus a little noise, masked."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    patterns = ndimage.gaussian_filter(rng.standard_normal((3, *shape)), sigma=(0, 2, 2, 2))
    patterns /= patterns.reshape(3, -1).std(axis=1)[:, None, None, None]
    images = np.einsum("nk,k...->n...", rng.standard_normal((n, 3)), patterns)
    images += 0.1 * rng.standard_normal(images.shape)
    return torch.as_tensor(images.reshape(n, -1)[:, mask.ravel()], dtype=torch.float32)


def test_a_conv_autoencoder_learns_masked_volumes():
    torch.manual_seed(0)
    mask = _mask(SHAPE)
    index = np.flatnonzero(mask)
    x = _structured_volumes(32, SHAPE, mask, seed=0)
    encoder = ConvEncoder(SHAPE, index, latent_dim=4, channels=(4, 8), hidden=16)
    decoder = ConvDecoder(SHAPE, index, latent_dim=4, channels=(4, 8), hidden=16)
    params = list(encoder.parameters()) + list(decoder.parameters())
    optimiser = torch.optim.Adam(params, lr=5e-3)

    def loss_fn():
        loc, _ = encoder(x)
        mean, _ = decoder(loc)
        return ((mean - x) ** 2).mean()

    with torch.no_grad():
        first = float(loss_fn())
    for _ in range(50):
        optimiser.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        last = float(loss_fn())
    # 0.39 with this seed (0.24 and 0.56 with data/initialisation seeds 1 and 2)
    assert last < 0.7 * first

    # the DSSIM term backpropagates into the decoder's weights too
    optimiser.zero_grad()
    mean, _ = decoder(encoder(x[:4])[0])
    DSSIM(SHAPE, mask)(mean, x[:4]).sum().backward()
    grads = [p.grad for p in decoder.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
