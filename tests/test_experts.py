"""The product of Gaussian experts (MVAE) against its closed form."""
import torch

from inva_pyro.model.experts import product_of_experts


def test_product_of_gaussian_experts_matches_its_closed_form():
    g = torch.Generator().manual_seed(0)
    locs = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)          # (B, K, D)
    scales = 0.2 + torch.rand(5, 3, 4, generator=g, dtype=torch.float64)
    present = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 1], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    loc, scale = product_of_experts(locs, scales, present)
    normal = torch.distributions.Normal
    # the product's log density minus the sum of the present experts' and the prior's is constant in x
    xs = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None, None]
    product = normal(loc, scale).log_prob(xs)                                # (7, B, D)
    parts = normal(0.0, 1.0).log_prob(xs) + (normal(locs, scales).log_prob(xs[..., None, :])
                                             * present[..., None]).sum(-2)
    gap = product - parts
    torch.testing.assert_close(gap, gap[:1].expand_as(gap), rtol=0, atol=1e-10)
    # by hand for subject 1 (experts 0 and 2): precision-weighted mean and summed precisions
    t = 1 + scales[1, 0] ** -2 + scales[1, 2] ** -2
    torch.testing.assert_close(scale[1], t ** -0.5)
    torch.testing.assert_close(loc[1], (locs[1, 0] * scales[1, 0] ** -2 + locs[1, 2] * scales[1, 2] ** -2) / t)
    # no expert present: the prior; fewer experts: never narrower
    torch.testing.assert_close(loc[3], torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(scale[3], torch.ones(4, dtype=torch.float64))
    all_loc, all_scale = product_of_experts(locs, scales)
    assert (all_scale <= scale + 1e-12).all()
    # a prior other than N(0, I)
    loc2, scale2 = product_of_experts(locs[:1, :1], scales[:1, :1], prior_loc=2.0, prior_scale=0.5)
    t2 = 4 + scales[0, 0] ** -2
    torch.testing.assert_close(loc2[0], (2.0 * 4 + locs[0, 0] * scales[0, 0] ** -2) / t2)
    torch.testing.assert_close(scale2[0], t2 ** -0.5)
