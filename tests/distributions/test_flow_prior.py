"""FlowPrior: normalisation, the direct density, masking, shapes, validation, and use inside Pyro."""

from __future__ import annotations

import re

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from validation_helpers import HIDDEN, C, fields

from pyro_vits.distributions import FlowPrior, MaskedNormal, VITSFlow
from pyro_vits.flows import ResidualCouplingBlock

pytestmark = pytest.mark.usefixtures("single_thread")


def prior_params(shape, seed=0, dtype=torch.float64):
    """Seeded ``(m_p, logs_p)`` of the given ``(..., C, T)`` shape."""
    gen = torch.Generator().manual_seed(500 + seed)
    m_p = torch.randn(shape, generator=gen, dtype=dtype)
    logs_p = 0.3 * torch.randn(shape, generator=gen, dtype=dtype)
    return m_p, logs_p


def direct_log_prob(block, m_p, logs_p, z, mask=None, g=None):
    """``log N(f(z); m_p, exp(logs_p))`` over valid frames ``+ log|det df/dz|``, written out directly."""
    z_p, logdet = block.forward_and_logdet(z, mask, g)
    elem = torch.distributions.Normal(m_p, torch.exp(logs_p)).log_prob(z_p)
    if mask is not None:
        elem = elem * mask
    return elem.sum((-2, -1)) + logdet


def case_prior(case, seed=0):
    m_p, logs_p = prior_params(case.x.shape, seed)
    return FlowPrior(m_p, logs_p, case.block, case.mask, case.g), m_p, logs_p


# --------------------------------------------------------------------------- densities


@pytest.mark.parametrize("gin", [0, 3], ids=lambda g: f"gin{g}")
@pytest.mark.parametrize("mean_only", [True, False], ids=["mean", "affine"])
def test_density_integrates_to_one(mean_only, gin, make_block, assert_normalised_2d):
    """C=2, T=1: trapezoid quadrature of exp(log_prob) over a box holding all the mass."""
    block = make_block(mean_only, gin, channels=2, n_flows=2, seed=2, scale=0.25)
    g = torch.randn(gin, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64) if gin else None
    assert_normalised_2d(block, g, half_width=8.0, points=161, min_reshape=0.5, tol=1e-3)


def test_rsample_reverses_the_flow_and_log_prob_is_direct(flow_case):
    prior, m_p, logs_p = case_prior(flow_case)
    assert isinstance(prior, dist.TransformedDistribution)
    mask = flow_case.full_mask
    torch.manual_seed(0)
    z = prior.rsample()
    torch.manual_seed(0)
    z_p = (m_p + torch.exp(logs_p) * torch.randn(z.shape, dtype=z.dtype)) * mask
    z_expected = flow_case.block(z_p, flow_case.mask, flow_case.g, reverse=True)
    torch.testing.assert_close(z, z_expected, rtol=0, atol=0)
    expected = direct_log_prob(flow_case.block, m_p, logs_p, z, flow_case.mask, flow_case.g)
    for value in (z, z.clone()):  # through the transform cache, and recomputed
        torch.testing.assert_close(prior.log_prob(value), expected, rtol=0, atol=1e-12)


def test_padded_frames_contribute_nothing(masked_flow_case):
    """Noise in padded frames changes nothing, and each utterance scores like its truncated sequence."""
    case = masked_flow_case
    prior, m_p, logs_p = case_prior(case)
    log_p = prior.log_prob(case.x)
    assert torch.equal(prior.log_prob(case.with_pads(case.x, seed=1)), log_p)
    assert torch.equal(prior.log_prob(case.with_pads(case.x, seed=2)), log_p)
    base = MaskedNormal(m_p, torch.exp(logs_p), case.mask)
    assert torch.equal(base.log_prob(case.with_pads(case.x, seed=1)), base.log_prob(case.x))
    for b, length in enumerate(case.mask.sum((-2, -1)).long().tolist()):
        g_b = None if case.g is None else case.g[b]
        short = FlowPrior(m_p[b, :, :length], logs_p[b, :, :length], case.block, g=g_b)
        torch.testing.assert_close(short.log_prob(case.x[b, :, :length]), log_p[b], rtol=0, atol=1e-12)


def test_masked_normal_is_a_normal_on_valid_frames(length_mask):
    loc, log_scale = prior_params((2, 4, 5), seed=9)
    mask = length_mask([5, 2])
    base = MaskedNormal(loc, log_scale.exp(), mask)
    normal = torch.distributions.Normal(loc, log_scale.exp())
    z = base.rsample((3,))
    assert z.shape == (3, 2, 4, 5) and base.batch_shape == (2,) and base.event_shape == (4, 5)
    pads = (mask == 0).expand_as(z)
    assert torch.equal(z[pads], torch.zeros_like(z[pads]))
    expected = (normal.log_prob(z) * mask).sum((-2, -1))
    torch.testing.assert_close(base.log_prob(z), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(base.entropy(), (normal.entropy() * mask).sum((-2, -1)), rtol=0, atol=1e-12)
    torch.testing.assert_close(base.mean, loc * mask, rtol=0, atol=0)
    torch.testing.assert_close(base.variance, normal.variance * mask, rtol=0, atol=0)
    torch.testing.assert_close(base.expand((3, 2)).log_prob(z), base.log_prob(z), rtol=0, atol=0)


# --------------------------------------------------------------------------- shapes


SHAPES = {
    "batched": dict(m=(2, 4, 5), mask=(2,), g=(2,), batch=(2,)),
    "shared-params-batched-mask": dict(m=(4, 5), mask=(3,), g=None, batch=(3,)),
    "shared-params-batched-g": dict(m=(4, 5), mask=None, g=(3,), batch=(3,)),
    "unbatched": dict(m=(4, 5), mask=None, g=None, batch=()),
    "broadcast-mask-g": dict(m=(2, 1, 4, 5), mask=(3,), g=(1, 3), batch=(2, 3)),
}


@pytest.mark.parametrize("spec", SHAPES.values(), ids=list(SHAPES))
def test_batch_and_event_shapes(spec, make_block, length_mask):
    block = make_block(mean_only=False, gin=2)
    m_p, logs_p = prior_params(spec["m"])
    mask = None if spec["mask"] is None else length_mask([5, 4, 2][: spec["mask"][0]])
    g = None if spec["g"] is None else torch.randn(spec["g"] + (2, 1), dtype=torch.float64)
    prior = FlowPrior(m_p, logs_p, block, mask, g)
    batch = torch.Size(spec["batch"])
    assert prior.batch_shape == batch and prior.event_shape == (4, 5)
    z = prior.sample((6,))
    assert z.shape == (6,) + batch + (4, 5)
    assert prior.log_prob(z).shape == (6,) + batch
    assert prior.rsample().shape == batch + (4, 5)

    big = prior.expand((7,) + batch)
    assert isinstance(big, FlowPrior) and big.batch_shape == (7,) + batch and big.event_shape == (4, 5)
    assert big.rsample().shape == (7,) + batch + (4, 5)
    z = z[:1].expand((7,) + z.shape[1:])
    torch.testing.assert_close(big.log_prob(z), prior.log_prob(z), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- validation


def _bad_prior_kwargs():
    m, logs = prior_params((2, 4, 5))
    mask = torch.ones(2, 1, 5, dtype=torch.float64)
    return {
        "odd channels": (ValueError, dict(m_p=m[:, :3], logs_p=logs[:, :3])),
        "wrong channels": (ValueError, dict(m_p=torch.zeros(2, 6, 5), logs_p=torch.zeros(2, 6, 5))),
        "logs_p shape": (ValueError, dict(logs_p=logs[..., :4])),
        "mask without the 1 dim": (ValueError, dict(mask=mask[:, 0])),
        "mask T": (ValueError, dict(mask=mask[..., :4])),
        "mask 2 channels": (ValueError, dict(mask=mask.expand(2, 2, 5))),
        "mask batch": (ValueError, dict(mask=torch.ones(3, 1, 5))),
        "mask not 0/1": (ValueError, dict(mask=mask * 0.5)),
        "g channels": (ValueError, dict(g=torch.zeros(2, 3, 1))),
        "g length": (ValueError, dict(g=torch.zeros(2, 2, 5))),
        "g batch": (ValueError, dict(g=torch.zeros(3, 2, 1))),
        "m_p not a tensor": (TypeError, dict(m_p=m.tolist())),
        "flow not a block": (TypeError, dict(flow=torch.nn.Identity())),
    }


@pytest.mark.parametrize("name", list(_bad_prior_kwargs()))
def test_bad_inputs_raise(name, make_block):
    error, override = _bad_prior_kwargs()[name]
    m_p, logs_p = prior_params((2, 4, 5))
    kwargs = dict(m_p=m_p, logs_p=logs_p, flow=make_block(gin=2), mask=None, g=None) | override
    with pytest.raises(error):
        FlowPrior(**kwargs)


def test_g_for_an_unconditioned_flow_raises(make_block):
    m_p, logs_p = prior_params((4, 5))
    with pytest.raises(ValueError, match="gin=0"):
        FlowPrior(m_p, logs_p, make_block(gin=0), g=torch.zeros(1, 1))


# --------------------------------------------------------------------------- Pyro


def test_pyro_vectorised_elbo_and_model_log_density(make_block, length_mask):
    pyro.clear_param_store()
    block = make_block(mean_only=False, gin=2, n_flows=2, seed=4, scale=0.3)
    flow = VITSFlow(block)
    m_p, logs_p = prior_params((2, 4, 5))
    mask = length_mask([5, 3])
    g = torch.randn(2, 2, 1, generator=torch.Generator().manual_seed(8), dtype=torch.float64)

    def model():
        pyro.module("flow", flow)
        with pyro.plate("utterances", 2):
            return pyro.sample("z", FlowPrior(m_p, logs_p, flow, mask, g))

    def guide():
        loc = pyro.param("loc", lambda: 0.1 * torch.randn(2, 4, 5, dtype=torch.float64))
        scale = pyro.param("scale", lambda: torch.full((2, 4, 5), 0.5, dtype=torch.float64),
                           constraint=dist.constraints.positive)
        with pyro.plate("utterances", 2):
            return pyro.sample("z", MaskedNormal(loc, scale, mask))

    torch.manual_seed(0)
    elbo = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    loss = elbo.differentiable_loss(model, guide)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in block.parameters()] + [pyro.param("loc").grad]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert all(float(gr.abs().sum()) > 0 for gr in grads)

    with pyro.plate("particles", 3, dim=-2):
        guide_trace = poutine.trace(guide).get_trace()
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace()
    model_trace.compute_log_prob()
    z = guide_trace.nodes["z"]["value"]
    assert z.shape == (3, 2, 4, 5)
    with torch.no_grad():
        expected = FlowPrior(m_p, logs_p, block, mask, g).log_prob(z)
        torch.testing.assert_close(model_trace.nodes["z"]["log_prob"].detach(), expected, rtol=0, atol=1e-10)
        direct = direct_log_prob(block, m_p, logs_p, z, mask, g)
        torch.testing.assert_close(expected, direct, rtol=0, atol=1e-10)


def test_mismatched_shapes_of_m_p_logs_p_mask_and_z(small_data):
    d = small_data
    with pytest.raises(ValueError, match=r"m_p must have the shape of x \(6, 4, 8\), got \(6, 4, 7\)"):
        fields(d, m_p=d.m_p[..., :-1])
    with pytest.raises(ValueError, match=r"logs_p must have the shape of x \(6, 4, 8\), got \(6, 3, 8\)"):
        fields(d, logs_p=d.logs_p[:, :-1])
    with pytest.raises(ValueError, match=r"mask must have shape \(N=6, 1, T=8\), got \(6, 1, 7\)"):
        fields(d, mask=d.mask[..., :-1])
    flow = ResidualCouplingBlock(C, HIDDEN, 3, 1, 1)
    with pytest.raises(ValueError, match=r"m_p must have shape \(\.\.\., C=4, T\), got \(6, 3, 8\)"):
        FlowPrior(d.m_p[:, :3], d.logs_p[:, :3], flow)
    with pytest.raises(ValueError, match=r"logs_p must have the shape of m_p \(6, 4, 8\), got \(6, 4, 7\)"):
        FlowPrior(d.m_p, d.logs_p[..., :-1], flow)
    with pytest.raises(ValueError, match=r"mask must have shape \(\.\.\., 1, T=8\), got \(6, 2, 8\)"):
        FlowPrior(d.m_p, d.logs_p, flow, mask=torch.ones(6, 2, 8))
    prior = FlowPrior(d.m_p, d.logs_p, flow, d.mask, validate_args=False)
    message = re.escape("z must have shape (..., C, T) = (..., 4, 8), got (6, 4, 7)")
    with pytest.raises(ValueError, match=message):
        prior.log_prob(torch.zeros(6, 4, 7))
    normal = MaskedNormal(d.m_p, torch.ones_like(d.m_p), d.mask, validate_args=False)
    message = re.escape("value must have shape (..., C, T) = (..., 4, 8), got (6, 8, 4)")
    with pytest.raises(ValueError, match=message):
        normal.log_prob(torch.zeros(6, 8, 4))
    with pytest.raises(TypeError, match="z must be a Tensor, got list"):
        prior.log_prob([0.0])
