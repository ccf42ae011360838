"""MaskedLaplace: a Laplace on valid frames, exactly 0 on padded ones (the pattern of MaskedNormal)."""

from __future__ import annotations

import pytest
import torch

from pyro_vits.distributions import MaskedLaplace, MaskedNormal
from pyro_vits.distributions.masked_loc_scale import MaskedLocScale


def test_masked_laplace_is_a_laplace_on_valid_frames(length_mask):
    gen = torch.Generator().manual_seed(4)
    loc = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64)
    scale = torch.rand(4, 1, generator=gen, dtype=torch.float64) + 0.5  # per channel, broadcast over frames
    mask = length_mask([5, 2])
    base = MaskedLaplace(loc, scale, mask)
    laplace = torch.distributions.Laplace(loc, scale.expand_as(loc))
    x = base.rsample((3,))
    assert x.shape == (3, 2, 4, 5) and base.batch_shape == (2,) and base.event_shape == (4, 5)
    pads = (mask == 0).expand_as(x)
    assert torch.equal(x[pads], torch.zeros_like(x[pads]))
    torch.testing.assert_close(base.log_prob(x), (laplace.log_prob(x) * mask).sum((-2, -1)), rtol=0, atol=1e-12)
    torch.testing.assert_close(base.entropy(), (laplace.entropy() * mask).sum((-2, -1)), rtol=0, atol=1e-12)
    torch.testing.assert_close(base.mean, loc * mask, rtol=0, atol=0)
    torch.testing.assert_close(base.variance, laplace.variance * mask, rtol=0, atol=1e-15)
    expanded = base.expand((3, 2))
    assert isinstance(expanded, MaskedLaplace)
    torch.testing.assert_close(expanded.log_prob(x), base.log_prob(x), rtol=0, atol=0)


def test_padded_frames_contribute_exactly_zero():
    loc, mask = torch.zeros(1, 3, 4), torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    base = MaskedLaplace(loc, torch.tensor(2.0), mask)
    x = torch.ones(1, 3, 4)
    far = x.clone()
    far[..., 2:] = 1e30  # anything on padded frames
    assert torch.equal(base.log_prob(far), base.log_prob(x))
    short = MaskedLaplace(loc[..., :2], torch.tensor(2.0))
    torch.testing.assert_close(base.log_prob(x), short.log_prob(x[..., :2]), rtol=0, atol=0)


def test_draws_are_reparameterised_laplace_draws():
    loc = torch.full((1, 1, 4000), 1.5, requires_grad=True)
    scale = torch.tensor(0.7, requires_grad=True)
    torch.manual_seed(0)
    x = MaskedLaplace(loc, scale).rsample((5,))
    assert float(x.detach().mean()) == pytest.approx(1.5, abs=0.03)
    assert float(x.detach().var()) == pytest.approx(2 * 0.7 ** 2, rel=0.05)
    x.sum().backward()
    assert float(loc.grad.sum()) == pytest.approx(5 * 4000)  # dx / dloc = 1


def test_both_are_masked_location_scale_families_and_not_each_other():
    loc = torch.zeros(2, 3)
    assert isinstance(MaskedLaplace(loc, torch.ones(())), MaskedLocScale)
    assert not isinstance(MaskedLaplace(loc, torch.ones(())), MaskedNormal)
    with pytest.raises(ValueError, match="value must have shape"):
        MaskedLaplace(loc, torch.ones(())).log_prob(torch.zeros(3, 2))
