"""KL estimators against independent truths: 2-D quadrature, Gaussian closed forms, hand formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pyro_vits.distributions import CosFlow, CosFlowPrior, FlowPrior, MaskedNormal
from pyro_vits.flows import ResidualCouplingBlock
from pyro_vits.kl import (
    KL_ESTIMATORS,
    analytic_variance,
    analytic_variances,
    batch_kl,
    format_negative_count,
    kl_estimate,
    prob_negative,
    prob_negative_gaussian,
    prob_negative_normal_approx,
    prob_negative_saddlepoint,
    prob_negative_upper_bound,
    quadrature_kl_2d,
    reference_kl,
    sample_kl_estimates,
    vits_kl,
)

N = 20_000
D64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


def coupling_block(channels: int, seed: int | None, post_std: float = 0.6) -> ResidualCouplingBlock:
    """Float64 mean-only VITS block; ``seed=None`` keeps the zero ``post`` layers (exact identity)."""
    torch.manual_seed(0 if seed is None else seed)
    block = ResidualCouplingBlock(channels, 8, 3, 1, 2, n_flows=4).double()
    if seed is not None:
        with torch.no_grad():
            for layer in block.flows[::2]:
                layer.post.weight.normal_(0.0, post_std)
                layer.post.bias.normal_(0.0, post_std / 2)
    return block


def col(*values: float) -> torch.Tensor:
    """A ``(C, 1)`` float64 column: one frame of C channels."""
    return torch.tensor(values, dtype=D64).reshape(-1, 1)


def length_mask(lengths: list[int], t: int) -> torch.Tensor:
    return (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).to(D64).unsqueeze(1)


def randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=D64)


def mcse(x: torch.Tensor) -> float:
    return float(x.std() / math.sqrt(x.numel()))


# The cos example of the report: a = 1, q = N((0.3, -0.2), (0.8, 0.6)), p = N(0, I) pushed through f^{-1}.
M_Q, LOGS_Q = col(0.3, -0.2), col(0.8, 0.6).log()


def priors_2d() -> dict[str, object]:
    return {
        "cos": CosFlowPrior(col(0.0, 0.0), col(0.0, 0.0), a=1.0),
        "coupling": FlowPrior(col(0.1, -0.1), col(0.2, -0.1), coupling_block(2, seed=3)),
    }


@pytest.fixture(scope="module")
def truths_2d() -> dict[str, float]:
    q = MaskedNormal(M_Q, LOGS_Q.exp())
    return {name: quadrature_kl_2d(q, prior)[0] for name, prior in priors_2d().items()}


# ------------------------------------------------------------------------------------------- vits_kl


def vits_kl_by_hand(z_p, logs_q, m_p, logs_p, lengths) -> float:
    total, frames = 0.0, 0
    for b, length in enumerate(lengths):
        for c in range(z_p.shape[1]):
            for t in range(length):
                lp, lq = float(logs_p[b, c, t]), float(logs_q[b, c, t])
                gap = float(z_p[b, c, t]) - float(m_p[b, c, t])
                total += lp - lq - 0.5 + 0.5 * gap**2 * math.exp(-2 * lp)
        frames += length
    return total / frames


def test_vits_kl_matches_hand_formula_and_ignores_padding():
    gen = torch.Generator().manual_seed(0)
    lengths = [7, 4, 1]
    z_p, logs_q, m_p, logs_p = (torch.randn(3, 4, 7, generator=gen) for _ in range(4))
    mask = length_mask(lengths, 7).float()
    value = vits_kl(z_p, logs_q, m_p, logs_p, mask)
    assert value.dtype == torch.float32 and value.shape == ()
    assert float(value) == pytest.approx(vits_kl_by_hand(z_p, logs_q, m_p, logs_p, lengths), rel=1e-6)
    fills = (9.0, -50.0, math.inf, math.nan)
    inputs = (z_p, logs_q, m_p, logs_p)
    padded = [torch.where(mask > 0, t, torch.full_like(t, v)) for t, v in zip(inputs, fills)]
    assert torch.equal(vits_kl(*padded, mask), value)


def test_vits_kl_is_the_vits_estimator_per_frame():
    """kl_estimate("vits") per utterance, batch-averaged per frame, is VITS's kl_loss on z_p = f(z)."""
    lengths, t = [6, 3], 6
    mask = length_mask(lengths, t)
    gen = torch.Generator().manual_seed(1)
    m_q, logs_q, m_p = (randn(gen, 2, 4, t) for _ in range(3))
    logs_p = 0.3 * randn(gen, 2, 4, t)
    prior = FlowPrior(m_p, logs_p, coupling_block(4, seed=5), mask)
    z = MaskedNormal(m_q, logs_q.exp(), mask).sample()
    per_utt = kl_estimate("vits", z, m_q, logs_q, prior).detach()
    with torch.no_grad():
        expected = vits_kl(prior.flow(z, mask), logs_q, m_p, logs_p, mask).double()
    assert float(batch_kl("mean", per_utt, mask.sum((-2, -1)))) == pytest.approx(float(expected), rel=1e-6)


def test_input_validation_names_the_argument():
    prior = CosFlowPrior(col(0.0, 0.0), col(0.0, 0.0))
    z = torch.zeros(2, 1, dtype=D64)
    with pytest.raises(ValueError, match="one of .*'vits'.*'gaussian_closed_form'"):
        kl_estimate("kl", z, M_Q, LOGS_Q, prior)
    with pytest.raises(TypeError, match="z must be a Tensor"):
        kl_estimate("vits", [0.0, 0.0], M_Q, LOGS_Q, prior)
    with pytest.raises(ValueError, match="m_q"):
        kl_estimate("vits", z, torch.zeros(3, 1, dtype=D64), LOGS_Q, prior)
    with pytest.raises(TypeError, match="prior must have a log_prob"):
        kl_estimate("mc", z, M_Q, LOGS_Q, object())
    with pytest.raises(TypeError, match="m_p and logs_p"):
        kl_estimate("gaussian_closed_form", z, M_Q, LOGS_Q, MaskedNormal(M_Q, LOGS_Q.exp()))
    with pytest.raises(ValueError, match="mask must equal prior.mask"):
        kl_estimate("vits", z, M_Q, LOGS_Q, prior, mask=torch.zeros(1, 1, dtype=D64))
    with pytest.raises(ValueError, match="z_mask"):
        vits_kl(z, z, z, z, torch.ones(2, 1))
    with pytest.raises(ValueError, match="reduction must be one of"):
        batch_kl("max", torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="n_frames"):
        batch_kl("clamp", torch.zeros(3), torch.ones(2))
    with pytest.raises(ValueError, match="n must be"):
        prob_negative_normal_approx(0.1, 1.0, 0)


# ------------------------------------------------------------------------------------------- CosFlow


def test_cos_flow_is_a_unit_jacobian_bijection_and_its_prior_density():
    gen = torch.Generator().manual_seed(2)
    x = randn(gen, 5, 2, 3)
    flow = CosFlow(a=0.7)
    y = flow(x)
    assert torch.allclose(y[:, 1], x[:, 1] + 0.7 * torch.cos(x[:, 0])) and torch.equal(y[:, 0], x[:, 0])
    assert torch.allclose(flow.inv(y), x, atol=1e-14)
    jac = torch.autograd.functional.jacobian(flow, x[0, :, :1])
    assert float(torch.linalg.det(jac.reshape(2, 2))) == pytest.approx(1.0)
    assert torch.equal(flow.log_abs_det_jacobian(x, y), torch.zeros(5, dtype=D64))

    m_p, logs_p = randn(gen, 2, 3), 0.2 * randn(gen, 2, 3)
    mask = length_mask([2], 3)[0]
    prior = CosFlowPrior(m_p, logs_p, a=0.7, mask=mask)
    expected = torch.distributions.Normal(m_p, logs_p.exp()).log_prob(flow(x))[..., :2].sum((-2, -1))
    assert torch.allclose(prior.log_prob(x * mask), expected)
    sample = prior.sample((4,))
    assert sample.shape == (4, 2, 3) and torch.equal(sample[..., 2], torch.zeros(4, 2, dtype=D64))


# ------------------------------------------------------------------------------------------- ground truths


def test_quadrature_is_exact_for_gaussians_and_agrees_with_reference_mc(truths_2d):
    q = MaskedNormal(M_Q, LOGS_Q.exp())
    identity = FlowPrior(col(0.4, -0.3), col(0.1, 0.2), coupling_block(2, seed=None))
    closed = kl_estimate("gaussian_closed_form", M_Q, M_Q, LOGS_Q, identity)
    value, error = quadrature_kl_2d(q, identity)
    assert value == pytest.approx(float(closed), abs=1e-9) and error < 1e-8
    for name, prior in priors_2d().items():
        estimate, se = reference_kl(q, prior, num_samples=50_000, seed=4)
        assert abs(float(estimate) - truths_2d[name]) < 4 * float(se)


# ------------------------------------------------------------------------------------------- unbiasedness


@pytest.mark.parametrize("prior_name", ["cos", "coupling"])
def test_vits_and_mc_are_unbiased_on_non_gaussian_priors(prior_name, truths_2d):
    prior, truth = priors_2d()[prior_name], truths_2d[prior_name]
    est = sample_kl_estimates(("vits", "mc", "gaussian_closed_form"), M_Q, LOGS_Q, prior, N, seed=11)
    for name in ("vits", "mc"):
        assert est[name].shape == (N,)
        assert abs(float(est[name].mean()) - truth) < 4 * mcse(est[name]), name
    if prior_name == "cos":  # the flow makes p non-Gaussian although log|det| = 0
        assert abs(float(est["gaussian_closed_form"][0]) - truth) > 10 * mcse(est["vits"])


def test_clamp_and_abs_are_biased_up_where_negatives_occur():
    """q = N(0, I) against the cos prior with a = 0.3: KL = a^2 (1 + e^-2) / 4 ~ 0.026, std ~ 1."""
    prior = CosFlowPrior(col(0.0, 0.0), col(0.0, 0.0), a=0.3)
    m_q, logs_q = col(0.0, 0.0), col(0.0, 0.0)
    truth = quadrature_kl_2d(MaskedNormal(m_q, logs_q.exp()), prior)[0]
    assert truth == pytest.approx(0.09 * (1 + math.exp(-2)) / 4, rel=1e-8)
    est = sample_kl_estimates(("vits", "mc", "k3", "clamp", "abs"), m_q, logs_q, prior, N, seed=12)
    assert prob_negative(est["vits"])[0] > 0.3
    for name in ("vits", "mc", "k3"):
        assert abs(float(est[name].mean()) - truth) < 4 * mcse(est[name]), name
    for name in ("clamp", "abs"):
        assert float(est[name].mean()) - truth > 10 * mcse(est[name]), name
    batches = est["vits"].reshape(-1, 8)  # VITS's fix acts on the batch mean (T = 1 frame per utterance)
    frames = torch.ones(8, dtype=D64)
    for reduction in ("clamp", "abs"):
        fixed = batch_kl(reduction, batches, frames)
        assert float(fixed.mean()) - truth > 10 * mcse(fixed), reduction
    plain = batch_kl("mean", batches, frames)
    assert abs(float(plain.mean()) - truth) < 4 * mcse(plain)


def test_identity_flow_estimators_agree_with_closed_form():
    """Post weights zero: the VITS block is the identity and the Gaussian closed form is the truth."""
    mask = length_mask([6, 4], 6)
    gen = torch.Generator().manual_seed(3)
    m_p, logs_p = randn(gen, 2, 4, 6), 0.3 * randn(gen, 2, 4, 6)
    m_q, logs_q = m_p + 0.1 * randn(gen, 2, 4, 6), logs_p + 0.08 * randn(gen, 2, 4, 6)
    prior = FlowPrior(m_p, logs_p, coupling_block(4, seed=None), mask)
    est = sample_kl_estimates(("vits", "mc", "k3", "gaussian_closed_form"), m_q, logs_q, prior, N, seed=13)
    closed = est["gaussian_closed_form"][0]
    assert est["vits"].shape == (N, 2) and bool((est["k3"] >= 0).all())
    for name in ("vits", "mc", "k3"):
        for b in range(2):
            assert abs(float(est[name][:, b].mean() - closed[b])) < 4 * mcse(est[name][:, b]), (name, b)


def test_k3_is_zero_at_q_equals_p_and_follows_its_formula():
    prior = CosFlowPrior(col(0.0, 0.0), col(0.0, 0.0), a=0.0)
    z = torch.randn(100, 2, 1, dtype=D64)
    assert torch.equal(kl_estimate("k3", z, col(0.0, 0.0), col(0.0, 0.0), prior), torch.zeros(100, dtype=D64))
    m_q, logs_q = col(0.1, -0.3), col(0.1, 0.2)
    log_r = -kl_estimate("mc", z, m_q, logs_q, prior)
    k3 = kl_estimate("k3", z, m_q, logs_q, prior)
    assert torch.allclose(k3, log_r.exp() - 1 - log_r, rtol=1e-10, atol=0)


# ------------------------------------------------------------------------------------------- variances


def gaussian_prior(m_p: torch.Tensor, logs_p: torch.Tensor) -> CosFlowPrior:
    """A Gaussian prior on ``(2, T)``: the cos flow with ``a = 0`` is the identity."""
    return CosFlowPrior(m_p, logs_p, a=0.0)


@pytest.mark.parametrize("case", ["narrow_q", "q_near_p"])
def test_hybrid_vs_mc_variance_matches_analytic(case):
    gen = torch.Generator().manual_seed(4)
    m_p, logs_p = randn(gen, 2, 3), 0.2 * randn(gen, 2, 3)
    if case == "narrow_q":  # s_q = 0.5 s_p < s_p / sqrt(2): the analytic entropy helps
        m_q, logs_q = m_p + 0.5, logs_p + math.log(0.5)
    else:  # q ~ p: log q - log p nearly cancels, the hybrid keeps variance 1/2 per element
        m_q, logs_q = m_p + 0.1, logs_p.clone()
    est = sample_kl_estimates(("vits", "mc"), m_q, logs_q, gaussian_prior(m_p, logs_p), N, seed=14)
    var_vits, var_mc = analytic_variances(m_q, logs_q, m_p, logs_p)
    for name, analytic in (("vits", var_vits), ("mc", var_mc)):
        x = est[name] - est[name].mean()
        se_var = float((x**2).std() / math.sqrt(N))
        assert abs(float(x.var()) - float(analytic)) < 4 * se_var, name
    ratio = float(var_vits / var_mc)
    assert (ratio < 1) if case == "narrow_q" else (ratio > 1)
    assert (float(est["vits"].var() / est["mc"].var()) < 1) == (ratio < 1)


def test_prob_negative_normal_approx_matches_empirical():
    """Batches of 8 utterances of 2 x 50 elements, q = p shifted by 0.1: P(batch-mean KL < 0) ~ 0.42."""
    m_p, logs_p = torch.zeros(2, 50, dtype=D64), torch.zeros(2, 50, dtype=D64)
    m_q, logs_q = m_p + 0.1, logs_p
    prior = gaussian_prior(m_p, logs_p)
    per_utt = sample_kl_estimates(("vits",), m_q, logs_q, prior, 4000 * 8, seed=15)["vits"].reshape(4000, 8)
    batch_means = batch_kl("mean", per_utt, torch.full((8,), 50.0, dtype=D64))
    p_hat, se = prob_negative(batch_means)
    kl = float(kl_estimate("gaussian_closed_form", m_q, m_q, logs_q, prior))
    sigma = math.sqrt(float(analytic_variances(m_q, logs_q, m_p, logs_p)[0]))
    p_approx = float(prob_negative_normal_approx(kl, sigma, 8))
    assert 0.3 < p_approx < 0.5 and abs(p_hat - p_approx) < 4 * se
    assert se == pytest.approx(math.sqrt(p_hat * (1 - p_hat) / 4000))
    assert prob_negative(np.array([-1.0, 1.0, 2.0, -3.0])) == (0.5, 0.25)


def test_zero_counts_get_an_upper_bound_not_a_zero():
    """Clopper-Pearson one-sided bounds: 1 - 0.05^(1/n) for 0 of n, scipy's beta quantile otherwise."""
    from scipy.stats import beta

    assert prob_negative_upper_bound(0, 96) == pytest.approx(1 - 0.05 ** (1 / 96))
    assert prob_negative_upper_bound(0, 96) == pytest.approx(0.0307, abs=1e-4)
    for count, total in ((1, 20), (3, 100), (50, 5120)):
        want = beta.ppf(0.95, count + 1, total - count)
        assert prob_negative_upper_bound(count, total) == pytest.approx(want, rel=1e-9)
    assert prob_negative_upper_bound(5, 5) == 1.0
    assert format_negative_count(0, 96) == "0 / 96 (P ≤ 0.031, 95 % bound)"
    assert format_negative_count(3, 100) == "3 / 100 = 0.03"
    for bad in ((-1, 10), (11, 10), (0, 10, 1.0)):
        with pytest.raises(ValueError):
            prob_negative_upper_bound(*bad)


def test_every_estimator_runs_on_both_2d_priors():
    for prior in priors_2d().values():
        est = sample_kl_estimates(KL_ESTIMATORS, M_Q, LOGS_Q, prior, 16, seed=0)
        assert all(v.shape == (16,) and bool(torch.isfinite(v).all()) for v in est.values())


# ------------------------------------------------------------------------------------------- control variate,
# element-wise abs, the gradient identity


def abs_elementwise_by_hand(z_p, logs_q, m_p, logs_p, logdet, mask) -> torch.Tensor:
    """The patch proposed in the thread, per utterance: ``sum_valid |logs_p - logs_q - 0.5| + 0.5 (z_p -
    m_p)^2 exp(-2 logs_p)``, minus the flow's log-determinant (written from the patch, not the package)."""
    elem = (logs_p - logs_q - 0.5).abs() + 0.5 * (z_p - m_p) ** 2 * torch.exp(-2 * logs_p)
    return (elem * mask).sum((-2, -1)) - logdet


def affine_prior_case(seed: int = 6):
    torch.manual_seed(seed)
    block = ResidualCouplingBlock(2, 8, 3, 1, 2, n_flows=2, mean_only=False).double()
    with torch.no_grad():
        for layer in block.flows[::2]:
            layer.post.weight.normal_(0.0, 0.3)
            layer.post.bias.normal_(0.0, 0.1)
    gen = torch.Generator().manual_seed(seed)
    m_p, logs_p = randn(gen, 2, 4), 0.3 * randn(gen, 2, 4)
    mask = length_mask([3], 4)[0]
    return block, FlowPrior(m_p, logs_p, block, mask), mask


def test_abs_elementwise_is_the_thread_patch_with_the_logdet():
    block, prior, mask = affine_prior_case()
    gen = torch.Generator().manual_seed(7)
    m_q, logs_q = randn(gen, 2, 4), 0.5 * randn(gen, 2, 4) - 0.3
    z = (m_q + logs_q.exp() * randn(gen, 5, 2, 4)) * mask
    z_p, logdet = block.forward_and_logdet(z, mask)
    expected = abs_elementwise_by_hand(z_p, logs_q, prior.m_p, prior.logs_p, logdet, mask)
    got = kl_estimate("abs_elementwise", z, m_q, logs_q, prior)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    d = (prior.logs_p - logs_q - 0.5) * mask
    bias = float((2 * (-d).clamp(min=0)).sum())
    torch.testing.assert_close(got - kl_estimate("vits", z, m_q, logs_q, prior),
                               torch.full((5,), bias, dtype=D64), rtol=1e-10, atol=1e-10)


def test_vits_mc_and_control_variate_have_identical_gradients_draw_by_draw():
    """log q(z) + H(q) = sum (1 - e^2)/2 does not depend on the parameters under reparameterisation, so
    the three estimators' gradients w.r.t. q's and the flow's parameters agree for every draw."""
    block, prior, mask = affine_prior_case(seed=8)
    gen = torch.Generator().manual_seed(9)
    eps = randn(gen, 2, 4)
    grads = {}
    for name in ("vits", "mc", "control_variate"):
        m_q = torch.linspace(-0.5, 0.5, 8, dtype=D64).reshape(2, 4).requires_grad_(True)
        logs_q = torch.full((2, 4), -0.4, dtype=D64, requires_grad=True)
        block.zero_grad()
        value = kl_estimate(name, (m_q + logs_q.exp() * eps) * mask, m_q, logs_q, prior)
        value.backward()
        grads[name] = torch.cat([m_q.grad.reshape(-1), logs_q.grad.reshape(-1)]
                                + [p.grad.reshape(-1) for p in block.parameters() if p.grad is not None])
    for name in ("mc", "control_variate"):
        torch.testing.assert_close(grads[name], grads["vits"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["vits", "mc", "control_variate"])
def test_analytic_variances_of_the_quadratic_estimators(name):
    gen = torch.Generator().manual_seed(10)
    m_p, logs_p = randn(gen, 2, 3), 0.2 * randn(gen, 2, 3)
    m_q, logs_q = m_p + 0.4, logs_p + math.log(0.8)
    est = sample_kl_estimates((name,), m_q, logs_q, gaussian_prior(m_p, logs_p), N, seed=11)[name]
    analytic = float(analytic_variance(name, m_q, logs_q, m_p, logs_p))
    x = est - est.mean()
    assert abs(float(x.var()) - analytic) < 4 * float((x**2).std() / math.sqrt(N))
    closed = float(kl_estimate("gaussian_closed_form", m_q, m_q, logs_q, gaussian_prior(m_p, logs_p)))
    assert abs(float(est.mean()) - closed) < 4 * float(est.std() / math.sqrt(N))
    a2, b2 = torch.exp(2 * (logs_q - logs_p)), (m_q - m_p) ** 2 * torch.exp(-2 * logs_p)
    by_hand = {"vits": a2 * b2 + a2**2 / 2, "mc": a2 * b2 + (a2 - 1) ** 2 / 2, "control_variate": a2 * b2}
    assert analytic == pytest.approx(float(by_hand[name].sum()), rel=1e-12)


# ------------------------------------------------------------------------------------------- tails


def test_saddlepoint_tail_matches_the_exact_chi_square_tail():
    """All elements ``a = sigma_q / sigma_p``, ``b = 0``: the vits sum is ``n (-log a - 1/2) + a^2/2
    chi2_n``, whose CDF is a regularised incomplete gamma."""
    for a, n in ((0.9, 50), (0.8, 1000), (0.95, 1920)):
        threshold = 2 * n * (math.log(a) + 0.5) / a**2
        exact = float(torch.special.gammainc(torch.tensor(n / 2, dtype=D64), torch.tensor(threshold / 2,
                                                                                       dtype=D64)))
        assert prob_negative_gaussian("vits", np.full(n, a)) == pytest.approx(exact, rel=1e-4)
        assert prob_negative_gaussian("vits", [a], frames=n) == pytest.approx(exact, rel=1e-4)
    log_p = prob_negative_gaussian("vits", np.full(192, 0.9), frames=40_000, log=True)
    assert -1e5 < log_p < -700  # far below float64's smallest number, still finite in log space


def test_saddlepoint_tail_matches_simulation_for_every_quadratic_estimator():
    a, b = torch.tensor([0.9, 1.2], dtype=D64), torch.tensor([0.3, 0.1], dtype=D64)
    m_p, logs_p = torch.zeros(2, 100, dtype=D64), torch.zeros(2, 100, dtype=D64)
    m_q, logs_q = b[:, None].expand(2, 100), a.log()[:, None].expand(2, 100)
    draws = sample_kl_estimates(("vits", "mc", "control_variate"), m_q, logs_q, gaussian_prior(m_p, logs_p),
                                20_000, seed=12)
    for name, x in draws.items():
        p, se = prob_negative(x)
        exact = prob_negative_gaussian(name, a, b, frames=100)
        assert abs(p - exact) < 4 * max(se, math.sqrt(exact * (1 - exact) / x.numel())), name
    assert prob_negative_gaussian("control_variate", [1.0], [0.0]) == 0.0  # q = p: exactly the KL, 0


def test_empirical_saddlepoint_and_validation():
    values = np.random.default_rng(0).standard_normal(20_000) + 0.1
    p = prob_negative_saddlepoint(values, n=100)
    assert p == pytest.approx(float(prob_negative_normal_approx(0.1, 1.0, 100)), abs=0.02)
    assert prob_negative_saddlepoint([1.0, 2.0]) == 0.0 and prob_negative_saddlepoint([-1.0, -2.0]) == 1.0
    assert prob_negative_saddlepoint([-1.0, 1.0], [0.25, 0.75], n=1) == pytest.approx(0.25, abs=0.1)
    with pytest.raises(ValueError, match="weights"):
        prob_negative_saddlepoint([1.0, -1.0], [0.5, 0.6])
    with pytest.raises(ValueError, match="sigma_ratio"):
        prob_negative_gaussian("vits", [0.0])
    with pytest.raises(ValueError, match="one of"):
        prob_negative_gaussian("k3", [1.0])
    with pytest.raises(ValueError, match="method"):
        prob_negative_gaussian("vits", [1.0], method="exact")
    with pytest.raises(TypeError, match="m_p and logs_p"):
        kl_estimate("control_variate", torch.zeros(2, 1, dtype=D64), M_Q, LOGS_Q,
                    MaskedNormal(M_Q, LOGS_Q.exp()))
