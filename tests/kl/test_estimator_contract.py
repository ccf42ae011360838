"""The contract every registered KL estimator keeps: its declared properties hold for its formula.

Loops over :data:`pyro_vits.kl.ESTIMATORS`, so a new estimator (one class, one registry line) is checked
without touching this file: unbiased ones match the closed-form Gaussian KL within 4 MCSE, the sign
property holds near convergence, gradient groups have identical gradients draw by draw, quadratic forms
reproduce the estimate, the KL and the variance, batch reductions act on VITS's batch mean.
"""

from __future__ import annotations

import math

import pytest
import torch

from pyro_vits.distributions import CosFlowPrior
from pyro_vits.kl import (
    BATCH_REDUCTIONS,
    ESTIMATORS,
    KL_ESTIMATORS,
    QUADRATIC_ESTIMATORS,
    KLEstimator,
    batch_kl,
    kl_estimate,
    names,
    quadratic_form,
    sample_kl_estimates,
)

D64 = torch.float64
N = 20_000
pytestmark = pytest.mark.usefixtures("single_thread")


def setting(near: bool = False) -> tuple[torch.Tensor, ...]:
    """``(m_q, logs_q, m_p, logs_p)`` on ``(2, 3)``: a moderate gap (``sigma_q / sigma_p`` in [0.8, 1.25], where
    every estimator has finite variance), or ``near`` convergence (q within 2 % of p)."""
    gen = torch.Generator().manual_seed(5)
    m_p, logs_p = torch.randn(2, 3, generator=gen, dtype=D64), 0.3 * torch.randn(2, 3, generator=gen, dtype=D64)
    gap = 0.02 if near else 0.2
    dm, ds = torch.rand(2, 3, generator=gen, dtype=D64) - 0.5, torch.rand(2, 3, generator=gen, dtype=D64) - 0.5
    return m_p + gap * dm * logs_p.exp(), logs_p + gap * ds, m_p, logs_p


def gaussian_kl(m_q, logs_q, m_p, logs_p) -> float:
    """Closed-form ``KL(N(m_q, s_q) || N(m_p, s_p))`` summed over elements (torch.distributions)."""
    q, p = torch.distributions.Normal(m_q, logs_q.exp()), torch.distributions.Normal(m_p, logs_p.exp())
    return float(torch.distributions.kl_divergence(q, p).sum())


def gaussian_prior(m_p, logs_p) -> CosFlowPrior:
    return CosFlowPrior(m_p, logs_p, a=0.0)  # the cos flow with a = 0 is the identity


def test_the_registry_is_one_consistent_table():
    assert KL_ESTIMATORS == tuple(ESTIMATORS) and QUADRATIC_ESTIMATORS == names(quadratic=True)
    assert BATCH_REDUCTIONS == ("mean",) + names(batch_reduction=True)
    assert names() == KL_ESTIMATORS
    for name, est in ESTIMATORS.items():
        assert isinstance(est, KLEstimator) and est.name == name
        for flag in ("unbiased", "can_be_negative", "needs_prior_scales", "deterministic", "fix"):
            assert isinstance(getattr(est, flag), bool), (name, flag)
        assert est.plot.kind in ("histogram", "mean line", None) and est.plot.label
        assert not (est.unbiased and est.deterministic and est.can_be_negative)
    with pytest.raises(ValueError, match="properties must be estimator properties, got 'signed'"):
        names(signed=True)


@pytest.mark.parametrize("name", names(unbiased=True))
def test_unbiased_estimators_match_the_closed_form_kl(name):
    m_q, logs_q, m_p, logs_p = setting()
    draws = sample_kl_estimates((name,), m_q, logs_q, gaussian_prior(m_p, logs_p), N, seed=1)[name]
    mcse = float(draws.std() / math.sqrt(N))
    assert abs(float(draws.mean()) - gaussian_kl(m_q, logs_q, m_p, logs_p)) < 4 * mcse


@pytest.mark.parametrize("name", names(deterministic=True))
def test_deterministic_estimators_ignore_the_draw(name):
    m_q, logs_q, m_p, logs_p = setting()
    draws = sample_kl_estimates((name,), m_q, logs_q, gaussian_prior(m_p, logs_p), 64, seed=1)[name]
    assert torch.equal(draws, draws[:1].expand_as(draws))


@pytest.mark.parametrize("prior_a", [0.0, 1.0], ids=["gaussian", "cos"])
@pytest.mark.parametrize("name", KL_ESTIMATORS)
def test_sign_near_convergence_is_as_declared(name, prior_a):
    m_q, logs_q, m_p, logs_p = setting(near=True)
    prior = CosFlowPrior(m_p, logs_p, a=prior_a)  # the cos flow has a unit Jacobian (volume-preserving)
    draws = sample_kl_estimates((name,), m_q, logs_q, prior, 2000, seed=2)[name]
    if ESTIMATORS[name].can_be_negative:
        assert bool((draws < 0).any()), f"{name} declares can_be_negative but no draw was negative"
    else:
        assert bool((draws >= 0).all()), f"{name} declares non-negative but min {float(draws.min())}"


def gradients(name: str, eps: torch.Tensor, prior: CosFlowPrior) -> torch.Tensor:
    """Per draw, the gradient of estimate ``name`` w.r.t. ``(m_q, logs_q)`` at ``z = m_q + exp(logs_q) eps``."""
    m_q0, logs_q0, _, _ = setting()
    draws = eps.shape[0]
    m_q, logs_q = (v.expand(draws, *v.shape).clone().requires_grad_(True) for v in (m_q0, logs_q0))
    value = kl_estimate(name, m_q + logs_q.exp() * eps, m_q, logs_q, prior)
    return torch.cat(torch.autograd.grad(value.sum(), (m_q, logs_q)), -1)


GROUPS = sorted({est.gradient_group for est in ESTIMATORS.values() if est.gradient_group is not None})


@pytest.mark.parametrize("group", GROUPS)
def test_a_gradient_group_has_identical_gradients_draw_by_draw(group):
    members = names(gradient_group=group)
    assert len(members) >= 2
    _, _, m_p, logs_p = setting()
    eps = torch.randn(64, 2, 3, generator=torch.Generator().manual_seed(3), dtype=D64)
    prior = CosFlowPrior(m_p, logs_p, a=1.0)  # a non-Gaussian prior: the identity is the reparameterisation's
    reference = gradients(members[0], eps, prior)
    for name in members[1:]:
        torch.testing.assert_close(gradients(name, eps, prior), reference, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", QUADRATIC_ESTIMATORS)
def test_quadratic_forms_give_the_estimate_the_kl_and_the_variance(name):
    m_q, logs_q, m_p, logs_p = setting()
    c0, alpha, beta = quadratic_form(name, m_q, logs_q, m_p, logs_p)
    kl = gaussian_kl(m_q, logs_q, m_p, logs_p)
    assert float((c0 + beta).sum()) == pytest.approx(kl, rel=1e-12, abs=1e-12)
    prior = gaussian_prior(m_p, logs_p)
    z = m_q + logs_q.exp() * torch.randn(N, 2, 3, generator=torch.Generator().manual_seed(4), dtype=D64)
    with torch.no_grad():
        draws = kl_estimate(name, z, m_q, logs_q, prior)
    e = (z - m_q) * torch.exp(-logs_q)
    torch.testing.assert_close((c0 + alpha * e + beta * e**2).sum((-2, -1)), draws, rtol=1e-9, atol=1e-9)
    variance = float((alpha**2 + 2 * beta**2).sum())
    centred = draws - draws.mean()
    sample_var, m4 = float(centred.pow(2).mean()), float(centred.pow(4).mean())
    se = math.sqrt(max(m4 - sample_var**2, 0.0) / N)  # SE of the sample variance
    assert abs(sample_var - variance) < 5 * se


@pytest.mark.parametrize("name", names(batch_reduction=True))
def test_batch_reductions_act_on_the_vits_batch_mean(name):
    m_q, logs_q, m_p, logs_p = setting(near=True)
    prior = gaussian_prior(m_p, logs_p)
    draws = sample_kl_estimates(("vits", name), m_q, logs_q, prior, 256, seed=5)
    reduce = ESTIMATORS[name].batch_reduction
    torch.testing.assert_close(draws[name], reduce(draws["vits"]), rtol=0, atol=0)
    per_utt, frames = draws["vits"].reshape(32, 8), torch.ones(8, dtype=D64)
    torch.testing.assert_close(batch_kl(name, per_utt, frames), reduce(batch_kl("mean", per_utt, frames)))
