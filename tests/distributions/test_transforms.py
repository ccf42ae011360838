"""FlowTransform / VITSFlow: the Pyro transform view of the flow over every configuration."""

from __future__ import annotations

import pytest
import torch
from pyro.distributions.conditional import ConditionalTransformModule
from torch.distributions import Transform

from pyro_vits.distributions import FlowTransform, VITSFlow

pytestmark = pytest.mark.usefixtures("single_thread")


def _lead_shape(case):
    shape = case.x.shape[:-2]
    for extra in (case.mask, case.g):
        if extra is not None:
            shape = torch.broadcast_shapes(shape, extra.shape[:-2])
    return shape


def test_transform_properties(flow_case):
    t = FlowTransform(flow_case.block, flow_case.mask, flow_case.g)
    assert isinstance(t, Transform)
    assert t.bijective
    assert t.domain.event_dim == t.codomain.event_dim == t.event_dim == 2
    assert t.inv.domain.event_dim == t.inv.codomain.event_dim == 2
    assert t.inv.inv is t
    assert t == FlowTransform(flow_case.block, flow_case.mask, flow_case.g)
    assert t != FlowTransform(flow_case.block, torch.ones_like(flow_case.full_mask), flow_case.g)
    assert t.with_cache(0)._cache_size == 0 and t.with_cache(1) is t


def test_transform_matches_block_in_both_directions(flow_case, make_case, monkeypatch):
    case = make_case(flow_case.cfg, seed=4, batch_shape=(3, flow_case.x.shape[0]))  # (S, B, C, T)
    t = FlowTransform(case.block, case.mask, case.g)
    y_block, ld_block = case.block.forward_and_logdet(case.x, case.mask, case.g)
    lead = _lead_shape(case)
    calls = []
    original = case.block.forward_and_logdet

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(case.block, "forward_and_logdet", counted)

    y = t(case.x)
    torch.testing.assert_close(y, y_block, rtol=0, atol=0)
    ld = t.log_abs_det_jacobian(case.x, y)  # the value cached by the forward call
    assert len(calls) == 1
    ld_fresh = t.log_abs_det_jacobian(case.x.clone(), y.clone())  # recomputed
    y_in = y_block.clone()
    x_back = t.inv(y_in)
    n_calls = len(calls)
    ld_after_inverse = t.log_abs_det_jacobian(x_back, y_in)  # cached by the inverse call
    ld_inv = t.inv.log_abs_det_jacobian(y_in, x_back)
    assert len(calls) == n_calls
    for value in (ld, ld_fresh, ld_after_inverse, -ld_inv):
        assert value.shape == lead
        torch.testing.assert_close(value, ld_block, rtol=0, atol=1e-12)
    if case.cfg.mean_only:
        assert torch.equal(ld, torch.zeros(lead, dtype=ld.dtype))
    valid = case.full_mask.expand_as(case.x) > 0
    torch.testing.assert_close(x_back[valid], case.x[valid], rtol=0, atol=1e-12)


def test_mean_only_logdet_broadcasts_over_mask_and_g(make_block, length_mask):
    block = make_block(mean_only=True, gin=2)
    mask, g = length_mask([5, 2]), torch.randn(2, 2, 1, dtype=torch.float64)
    z = torch.randn(4, 5, dtype=torch.float64)  # unbatched z, batched conditioning
    t = FlowTransform(block, mask, g)
    assert t(z).shape == (2, 4, 5)
    assert torch.equal(t.log_abs_det_jacobian(z, t(z)), torch.zeros(2, dtype=torch.float64))


def test_vits_flow_conditions_to_flow_transform(flow_case):
    module = VITSFlow(flow_case.block)
    assert isinstance(module, ConditionalTransformModule)
    assert set(module.parameters()) == set(flow_case.block.parameters())
    t = module.condition(flow_case.g, mask=flow_case.mask)
    assert isinstance(t, FlowTransform) and t.flow is flow_case.block
    assert t.g is flow_case.g and t.mask is flow_case.mask
    torch.testing.assert_close(t(flow_case.x), flow_case.block(flow_case.x, flow_case.mask, flow_case.g))


def test_non_block_flows_are_rejected():
    for bad in (torch.nn.Identity(), None):
        with pytest.raises(TypeError, match="ResidualCouplingBlock"):
            FlowTransform(bad)
        with pytest.raises(TypeError, match="ResidualCouplingBlock"):
            VITSFlow(bad)
