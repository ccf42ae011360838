"""ELBO classes against closed forms (linear-Gaussian model) and VITS's loss computed by hand."""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, RenyiELBO, Trace_ELBO
from pyro.optim import Adam
from validation_helpers import build, quick_fit

from pyro_vits.distributions import FlowPrior, MaskedNormal
from pyro_vits.flows import ResidualCouplingBlock
from pyro_vits.infer import (
    STL_ELBO,
    HybridEntropyELBO,
    IWAE_DReG,
    analytic_entropy,
    evaluate,
    gradient_stats,
    make_elbo,
)
from pyro_vits.kl import vits_kl

D64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")
PARTICLES = [(1, False), (4, True), (3, False)]

# --------------------------------------------------------- linear-Gaussian: z ~ N(theta, I), x ~ N(z, S^2 I)

S = 0.7
X = torch.tensor([0.5, -1.0, 2.0], dtype=D64)
POST_LOC = X / (1 + S**2)
POST_LOG_SCALE = torch.full((3,), 0.5 * math.log(S**2 / (1 + S**2)), dtype=D64)
GROUPS = {"loc": "loc", "log_scale": "log_scale", "theta": "theta"}


def lg_model(x: torch.Tensor) -> None:
    theta = pyro.param("theta", torch.zeros(3, dtype=D64))
    z = pyro.sample("z", dist.Normal(theta, 1.0).to_event(1))
    pyro.sample("x", dist.Normal(z, S).to_event(1), obs=x)


def lg_guide_at(loc0: torch.Tensor, log_scale0: torch.Tensor) -> Callable[[torch.Tensor], None]:
    def guide(x: torch.Tensor) -> None:
        loc, log_scale = pyro.param("loc", loc0.clone()), pyro.param("log_scale", log_scale0.clone())
        pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    return guide


OFF_LOC, OFF_LOG_SCALE = POST_LOC + torch.tensor([0.4, -0.3, 0.2], dtype=D64), POST_LOG_SCALE + 0.3


def analytic_loss_grads(loc: torch.Tensor, log_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradient of -ELBO at theta = 0, with ELBO = sum_d -((x-mu)^2+s^2)/(2S^2) - (mu^2+s^2)/2 + log s + c."""
    var = torch.exp(2 * log_scale)
    return {"loc": -(X - loc) / S**2 + loc, "log_scale": var / S**2 + var - 1, "theta": -loc}


def analytic_elbo(loc: torch.Tensor, log_scale: torch.Tensor) -> float:
    var = torch.exp(2 * log_scale)
    lik = -0.5 * math.log(2 * math.pi * S**2) - ((X - loc) ** 2 + var) / (2 * S**2)
    prior = -0.5 * math.log(2 * math.pi) - (loc**2 + var) / 2
    return float((lik + prior + log_scale + 0.5 * math.log(2 * math.pi * math.e)).sum())


LOG_PX = float(dist.Normal(0.0, math.sqrt(1 + S**2)).log_prob(X).sum())


@pytest.fixture(autouse=True)
def fresh_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.mark.parametrize("elbo_cls", [Trace_ELBO, HybridEntropyELBO, STL_ELBO])
@pytest.mark.parametrize("particles", PARTICLES, ids=lambda p: f"K{p[0]}-{'vec' if p[1] else 'seq'}")
def test_gradients_are_unbiased_for_the_closed_form(elbo_cls, particles):
    num_particles, vectorize = particles
    elbo = elbo_cls(num_particles=num_particles, vectorize_particles=vectorize)
    guide = lg_guide_at(OFF_LOC, OFF_LOG_SCALE)
    stats = gradient_stats(lg_model, guide, elbo, X, num_repeats=200, param_groups=GROUPS, seed=1)
    for name, expected in analytic_loss_grads(OFF_LOC, OFF_LOG_SCALE).items():
        assert (abs(stats[name].mean - expected.numpy()) < 4 * stats[name].mcse).all(), name


def test_hybrid_gradient_equals_trace_gradient_sample_by_sample():
    """For a Gaussian guide d/dphi log q(z(eps, phi)) = d/dphi (-H(q)): the surrogates differ by a
    constant, so the gradients agree draw by draw."""
    guide = lg_guide_at(OFF_LOC, OFF_LOG_SCALE)
    stats = {
        cls: gradient_stats(lg_model, guide, cls(), X, num_repeats=5, param_groups={"all": ""}, seed=2)
        for cls in (Trace_ELBO, HybridEntropyELBO)
    }
    assert stats[Trace_ELBO]["all"].mean == pytest.approx(stats[HybridEntropyELBO]["all"].mean, abs=1e-12)


@pytest.mark.parametrize(
    "elbo", [STL_ELBO(), STL_ELBO(num_particles=3, vectorize_particles=True),
             IWAE_DReG(num_particles=4, vectorize_particles=True), IWAE_DReG(num_particles=3)],
    ids=["stl", "stl-K3-vec", "dreg-K4-vec", "dreg-K3-seq"],
)
def test_path_estimators_have_zero_guide_gradient_variance_at_the_posterior(elbo):
    guide = lg_guide_at(POST_LOC, POST_LOG_SCALE)
    groups = {"guide": lambda name: name in ("loc", "log_scale")}
    stats = gradient_stats(lg_model, guide, elbo, X, num_repeats=20, param_groups=groups)["guide"]
    assert stats.total_variance < 1e-24 and abs(stats.mean).max() < 1e-12
    trace = gradient_stats(lg_model, guide, Trace_ELBO(), X, num_repeats=20, param_groups=groups)["guide"]
    assert trace.total_variance > 1.0


# ------------------------------------------------------------------------------------------- IWAE / DReG


@pytest.mark.parametrize("vectorize", [True, False])
def test_dreg_reports_the_renyi_iwae_bound(vectorize):
    guide = lg_guide_at(OFF_LOC, OFF_LOG_SCALE)
    losses = []
    for cls in (IWAE_DReG, RenyiELBO):
        pyro.set_rng_seed(3)
        elbo = cls(num_particles=5, vectorize_particles=vectorize)
        losses.append([elbo.loss(lg_model, guide, X) for _ in range(3)])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_iwae_bound_exceeds_elbo_and_tends_to_log_px():
    guide = lg_guide_at(OFF_LOC, OFF_LOG_SCALE)
    elbo = analytic_elbo(OFF_LOC, OFF_LOG_SCALE)
    pyro.set_rng_seed(4)
    mean, se = {}, {}
    for k in (1, 10, 100, 1000):
        iwae = IWAE_DReG(num_particles=k, vectorize_particles=True)
        values = torch.tensor([-iwae.loss(lg_model, guide, X) for _ in range(120)], dtype=D64)
        mean[k], se[k] = float(values.mean()), float(values.std()) / math.sqrt(values.numel())
    assert abs(mean[1] - elbo) < 4 * se[1]
    assert all(mean[k] < LOG_PX + 4 * se[k] for k in mean)
    assert mean[10] > mean[1] and mean[10] - 4 * se[10] > elbo
    assert LOG_PX - mean[100] < (LOG_PX - mean[10]) / 3
    assert abs(mean[1000] - LOG_PX) < 4 * se[1000] and se[1000] < 0.005


def test_dreg_gradient_matches_iwae_gradient_with_less_variance():
    guide = lg_guide_at(OFF_LOC, OFF_LOG_SCALE)
    groups = {"guide": lambda name: name in ("loc", "log_scale"), "theta": "theta"}
    dreg, iwae = (
        gradient_stats(lg_model, guide, cls(num_particles=8, vectorize_particles=True), X,
                       num_repeats=300, param_groups=groups, seed=5)
        for cls in (IWAE_DReG, RenyiELBO)
    )
    for group in groups:
        se = (dreg[group].mcse ** 2 + iwae[group].mcse ** 2) ** 0.5
        assert (abs(dreg[group].mean - iwae[group].mean) < 4 * se).all(), group
    assert dreg["theta"].mean == pytest.approx(iwae["theta"].mean, abs=1e-12)  # same seed, same model term
    assert dreg["guide"].total_variance < 0.05 * iwae["guide"].total_variance


# ------------------------------------------------------------------------------------------- VITS-like model

B, C, T = 3, 2, 5
LENGTHS = torch.tensor([5, 3, 4])
MASK = (torch.arange(T)[None, :] < LENGTHS[:, None]).to(D64).unsqueeze(1)
DEC_SCALE = torch.tensor(0.5, dtype=D64)


def random_flow() -> ResidualCouplingBlock:
    torch.manual_seed(7)
    flow = ResidualCouplingBlock(C, 8, 3, 1, 2).double()
    with torch.no_grad():
        for layer in flow.flows[::2]:
            layer.post.weight.normal_(0.0, 0.5)
    return flow


_gen = torch.Generator().manual_seed(8)
M_P, LOGS_P, M_Q, LOGS_Q, X_OBS = (0.5 * torch.randn(B, C, T, generator=_gen, dtype=D64) for _ in range(5))
Plate = Callable[[], pyro.plate]


def utt_plate() -> pyro.plate:
    return pyro.plate("utt", B, dim=-1)


def decode(z: torch.Tensor) -> torch.Tensor:
    return 0.8 * z + 0.1


def vits_model_of(flow: ResidualCouplingBlock) -> Callable:
    """``z ~ FlowPrior(m_p, logs_p, flow, mask)``, ``x ~ MaskedNormal(0.8 z + 0.1, 0.5, mask)``; learnt
    ``m_p``, ``logs_p`` and flow."""

    def model(x: torch.Tensor, plate: Plate = utt_plate) -> None:
        pyro.module("flow", flow)
        m_p, logs_p = pyro.param("m_p", M_P.clone()), pyro.param("logs_p", LOGS_P.clone())
        with plate():
            z = pyro.sample("z", FlowPrior(m_p, logs_p, flow, MASK))
            pyro.sample("x", MaskedNormal(decode(z), DEC_SCALE, MASK), obs=x)

    return model


def vits_guide_of(kind: str) -> Callable:
    def guide(x: torch.Tensor, plate: Plate = utt_plate) -> None:
        m_q, logs_q = pyro.param("m_q", M_Q.clone()), pyro.param("logs_q", LOGS_Q.clone())
        with plate():
            if kind == "masked_normal":
                pyro.sample("z", MaskedNormal(m_q, logs_q.exp(), MASK))
            else:  # Pyro's own wrappers: Independent(MaskedDistribution(Normal))
                pyro.sample("z", dist.Normal(m_q, logs_q.exp()).mask(MASK.bool()).to_event(2))

    return guide


def by_hand_per_utterance(flow: ResidualCouplingBlock, eps: torch.Tensor) -> torch.Tensor:
    """``-(log-likelihood - VITS KL * frames)`` per utterance ``(B,)`` for ``z = m_q + s_q eps (B, C, T)``."""
    with torch.no_grad():
        z = (M_Q + LOGS_Q.exp() * eps) * MASK
        loglik = MaskedNormal(decode(z), DEC_SCALE, MASK).log_prob(X_OBS)
        z_p = flow(z, MASK)
        per_utt = [
            vits_kl(z_p[b : b + 1], LOGS_Q[b : b + 1], M_P[b : b + 1], LOGS_P[b : b + 1], MASK[b : b + 1])
            for b in range(B)
        ]
    return -(loglik - torch.stack(per_utt, dim=-1).double() * LENGTHS.to(D64))


@pytest.mark.parametrize("kind", ["masked_normal", "pyro_wrappers"])
@pytest.mark.parametrize("particles", PARTICLES, ids=lambda p: f"K{p[0]}-{'vec' if p[1] else 'seq'}")
def test_hybrid_loss_is_minus_loglik_plus_vits_kl(kind, particles):
    num_particles, vectorize = particles
    flow = random_flow()
    elbo = HybridEntropyELBO(num_particles=num_particles, vectorize_particles=vectorize, max_plate_nesting=2)
    pyro.set_rng_seed(9)
    loss = elbo.loss(vits_model_of(flow), vits_guide_of(kind), X_OBS)
    torch.manual_seed(9)
    shape = (num_particles, B, C, T) if vectorize else (B, C, T)
    draws = [torch.randn(shape, dtype=D64) for _ in range(1 if vectorize else num_particles)]
    eps = torch.cat(draws).reshape(num_particles, B, C, T)
    expected = sum(float(by_hand_per_utterance(flow, e).sum()) for e in eps) / num_particles
    assert loss == pytest.approx(expected, rel=1e-5)


def test_hybrid_honours_subsample_scale_and_poutine_mask():
    """Subsample 3 of 6 utterances (scale 2) and mask out utterance 1: loss = 2 * sum over {0, 2}."""
    keep = torch.tensor([True, False, True])
    flow = random_flow()

    def subsampled() -> pyro.plate:
        return pyro.plate("utt", 6, subsample=torch.arange(B), dim=-1)

    def masked(fn: Callable) -> Callable:
        return lambda x: poutine.mask(fn, mask=keep)(x, subsampled)

    pyro.set_rng_seed(10)
    model, guide = masked(vits_model_of(flow)), masked(vits_guide_of("masked_normal"))
    loss = HybridEntropyELBO().loss(model, guide, X_OBS)
    torch.manual_seed(10)
    per_utt = by_hand_per_utterance(flow, torch.randn(B, C, T, dtype=D64))
    assert loss == pytest.approx(2 * float(per_utt[keep].sum()), rel=1e-5)


def test_analytic_entropy_looks_through_pyro_wrappers():
    wrapped = dist.Normal(M_Q, LOGS_Q.exp()).mask(MASK.bool()).to_event(2).expand((4, B))
    expected = MaskedNormal(M_Q, LOGS_Q.exp(), MASK).entropy()
    assert torch.allclose(analytic_entropy(wrapped), expected.expand(4, B))
    assert analytic_entropy(dist.Delta(torch.zeros(2))) is None


@pytest.mark.parametrize("elbo_cls", [HybridEntropyELBO, STL_ELBO, IWAE_DReG])
def test_svi_trains_the_vits_like_model(elbo_cls):
    flow = random_flow()
    elbo = elbo_cls(num_particles=2, vectorize_particles=True)
    svi = SVI(vits_model_of(flow), vits_guide_of("masked_normal"), Adam({"lr": 0.05}), elbo)
    losses = [svi.step(X_OBS) for _ in range(40)]
    assert all(math.isfinite(v) for v in losses) and sum(losses[-10:]) < sum(losses[:10])
    assert not torch.equal(pyro.param("m_q").detach(), M_Q)
    assert not torch.equal(flow.flows[0].post.weight, random_flow().flows[0].post.weight)


def test_particles_k_below_one(small_data):
    with pytest.raises(ValueError, match="particles must be a positive int or None, got 0"):
        quick_fit(small_data, particles=0)
    with pytest.raises(ValueError, match="particles must be a positive int, got 0"):
        make_elbo("trace", particles=0)
    with pytest.raises(ValueError, match="num_samples must be a positive int, got 0"):
        evaluate(*build(), small_data, num_samples=0)
