"""Extra KL particles: the ELBOs' ``kl_particles`` and :func:`pyro_vits.kl.loss.vits_kl_loss`.

Truths: the linear-Gaussian closed form (unbiased values and gradients), the same estimator evaluated by hand on
the same draws (the K-particle estimate is the mean of K one-draw estimates), and VITS's ``kl_loss`` written
here from its published formula.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyro_vits.distributions import FlowPrior, MaskedNormal
from pyro_vits.flows import ResidualCouplingBlock
from pyro_vits.infer import MC_ELBO, STL_ELBO, HybridEntropyELBO, gradient_stats
from pyro_vits.kl import vits_kl_loss

D64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")
KL_CLASSES = [HybridEntropyELBO, STL_ELBO, MC_ELBO]


@pytest.fixture(autouse=True)
def fresh_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


# ----------------------------------------------------------- linear-Gaussian: z ~ N(theta, I), x ~ N(z, S^2 I)

S = 0.7
X = torch.tensor([0.5, -1.0, 2.0], dtype=D64)
LOC0 = X / (1 + S**2) + torch.tensor([0.4, -0.3, 0.2], dtype=D64)
LOG_SCALE0 = torch.full((3,), 0.5 * math.log(S**2 / (1 + S**2)) + 0.3, dtype=D64)


def lg_model(x: torch.Tensor) -> None:
    theta = pyro.param("theta", torch.zeros(3, dtype=D64))
    z = pyro.sample("z", dist.Normal(theta, 1.0).to_event(1))
    pyro.sample("x", dist.Normal(z, S).to_event(1), obs=x)


def lg_guide(x: torch.Tensor) -> None:
    loc, log_scale = pyro.param("loc", LOC0.clone()), pyro.param("log_scale", LOG_SCALE0.clone())
    pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def analytic_grads() -> dict[str, torch.Tensor]:
    """Gradient of -ELBO at theta = 0 (ELBO = sum -((x-mu)^2+s^2)/(2S^2) - (mu^2+s^2)/2 + log s + c)."""
    var = torch.exp(2 * LOG_SCALE0)
    return {"loc": -(X - LOC0) / S**2 + LOC0, "log_scale": var / S**2 + var - 1, "theta": -LOC0}


def analytic_elbo() -> float:
    var = torch.exp(2 * LOG_SCALE0)
    lik = -0.5 * math.log(2 * math.pi * S**2) - ((X - LOC0) ** 2 + var) / (2 * S**2)
    prior = -0.5 * math.log(2 * math.pi) - (LOC0**2 + var) / 2
    return float((lik + prior + LOG_SCALE0 + 0.5 * math.log(2 * math.pi * math.e)).sum())


@pytest.mark.parametrize("elbo_cls", KL_CLASSES)
@pytest.mark.parametrize("particles", [(1, False), (3, True), (2, False)], ids=["P1", "P3-vec", "P2-seq"])
def test_kl_particles_keep_values_and_gradients_unbiased(elbo_cls, particles):
    num_particles, vectorize = particles
    elbo = elbo_cls(num_particles=num_particles, vectorize_particles=vectorize, kl_particles=4)
    groups = {name: name for name in ("loc", "log_scale", "theta")}
    stats = gradient_stats(lg_model, lg_guide, elbo, X, num_repeats=200, param_groups=groups, seed=1)
    for name, expected in analytic_grads().items():
        assert (abs(stats[name].mean - expected.numpy()) < 4 * stats[name].mcse).all(), name
    pyro.set_rng_seed(2)
    values = torch.tensor([-elbo.loss(lg_model, lg_guide, X) for _ in range(200)], dtype=D64)
    assert abs(float(values.mean()) - analytic_elbo()) < 4 * float(values.std()) / math.sqrt(200)


def test_kl_particles_reduce_the_prior_gradient_variance_like_num_particles():
    """theta's gradient comes from the KL part only: K KL particles give it the variance of K particles."""
    groups = {"theta": "theta"}
    variance = {
        name: gradient_stats(lg_model, lg_guide, elbo, X, num_repeats=300, param_groups=groups,
                             seed=3)["theta"].total_variance
        for name, elbo in (("K1", MC_ELBO()), ("kl8", MC_ELBO(kl_particles=8)),
                           ("np8", Trace_ELBO(num_particles=8, vectorize_particles=True)))
    }
    assert variance["kl8"] < 0.25 * variance["K1"]
    assert 0.6 < variance["kl8"] / variance["np8"] < 1.6


@pytest.mark.parametrize("elbo_cls", KL_CLASSES)
def test_one_kl_particle_is_the_plain_estimator_bit_for_bit(elbo_cls):
    reference = Trace_ELBO if elbo_cls is MC_ELBO else elbo_cls
    results = []
    for elbo in (elbo_cls(kl_particles=1, num_particles=2), reference(num_particles=2)):
        pyro.clear_param_store()
        pyro.set_rng_seed(4)
        loss = elbo.loss_and_grads(lg_model, lg_guide, X)
        grads = [pyro.param(n).grad.clone() for n in ("loc", "log_scale", "theta")]
        results.append((loss, grads))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_kl_particles_must_be_a_positive_int():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="kl_particles"):
            HybridEntropyELBO(kl_particles=bad)


# ------------------------------------------------------------------------- VITS-like model: one flow, one decoder

B, C, T = 3, 2, 5
LENGTHS = torch.tensor([5, 3, 4])
MASK = (torch.arange(T)[None, :] < LENGTHS[:, None]).to(D64).unsqueeze(1)
_gen = torch.Generator().manual_seed(8)
M_P, LOGS_P, M_Q, LOGS_Q, X_OBS = (0.5 * torch.randn(B, C, T, generator=_gen, dtype=D64) for _ in range(5))


def random_flow(mean_only: bool = True) -> ResidualCouplingBlock:
    torch.manual_seed(7)
    flow = ResidualCouplingBlock(C, 8, 3, 1, 2, mean_only=mean_only).double()
    with torch.no_grad():
        for layer in flow.flows[::2]:
            layer.post.weight.normal_(0.0, 0.5)
    return flow


def decode(z: torch.Tensor) -> torch.Tensor:
    return 0.8 * z + 0.1


def vits_model_of(flow: ResidualCouplingBlock) -> Callable:
    def model(x: torch.Tensor) -> None:
        pyro.module("flow", flow)
        with pyro.plate("utt", B, dim=-1):
            z = pyro.sample("z", FlowPrior(M_P, LOGS_P, flow, MASK))
            pyro.sample("x", MaskedNormal(decode(z), torch.tensor(0.5, dtype=D64), MASK), obs=x)

    return model


def vits_guide(x: torch.Tensor) -> None:
    m_q, logs_q = pyro.param("m_q", M_Q.clone()), pyro.param("logs_q", LOGS_Q.clone())
    with pyro.plate("utt", B, dim=-1):
        pyro.sample("z", MaskedNormal(m_q, logs_q.exp(), MASK))


def kl_by_hand(kind: str, flow: ResidualCouplingBlock, z: torch.Tensor) -> torch.Tensor:
    """Per-draw KL terms summed over the batch, ``z (..., B, C, T) -> (...)``: ``mc`` log q - log p, ``vits``
    -H(q) - log p, with p(z) = N(f(z); m_p, s_p) |det df/dz| written out."""
    q = torch.distributions.Normal(M_Q, LOGS_Q.exp())
    z_p, logdet = flow.forward_and_logdet(z, MASK)
    log_p = (torch.distributions.Normal(M_P, LOGS_P.exp()).log_prob(z_p) * MASK).sum((-3, -2, -1)) + logdet.sum(-1)
    log_q = (q.entropy().neg() if kind == "vits" else q.log_prob(z)) * MASK
    return log_q.expand(z.shape).sum((-3, -2, -1)) - log_p


@pytest.mark.parametrize("elbo_cls", KL_CLASSES)
@pytest.mark.parametrize("particles", [(1, False), (2, True)], ids=["P1", "P2-vec"])
@pytest.mark.parametrize("mean_only", [True, False], ids=["mean", "affine"])
def test_kl_particles_average_the_kl_of_the_same_draws(elbo_cls, particles, mean_only):
    """loss = -log p(x | z_0) + (1/K) sum_k KL-term(z_k): the guide's draw z_0, then K - 1 draws in one call."""
    num_particles, vectorize = particles
    k, flow = 4, random_flow(mean_only)
    elbo = elbo_cls(num_particles=num_particles, vectorize_particles=vectorize, max_plate_nesting=1,
                    kl_particles=k)
    pyro.set_rng_seed(9)
    loss = elbo.loss(vits_model_of(flow), vits_guide, X_OBS)
    torch.manual_seed(9)
    lead = (num_particles,) if vectorize else ()
    eps0 = torch.randn(lead + (B, C, T), dtype=D64)
    eps = torch.cat([eps0.unsqueeze(0), torch.randn((k - 1,) + lead + (B, C, T), dtype=D64)])
    z = (M_Q + LOGS_Q.exp() * eps) * MASK
    with torch.no_grad():
        loglik = MaskedNormal(decode(z[0]), torch.tensor(0.5, dtype=D64), MASK).log_prob(X_OBS).sum(-1)
        kl = kl_by_hand("vits" if elbo_cls is HybridEntropyELBO else "mc", flow, z).mean(0)
    assert loss == pytest.approx(float((kl - loglik).mean()), rel=1e-6)


@pytest.mark.parametrize("elbo_cls", KL_CLASSES)
def test_svi_trains_with_kl_particles(elbo_cls):
    flow = random_flow()
    svi = SVI(vits_model_of(flow), vits_guide, Adam({"lr": 0.05}), elbo_cls(kl_particles=3, max_plate_nesting=1))
    losses = [svi.step(X_OBS) for _ in range(30)]
    assert all(math.isfinite(v) for v in losses) and sum(losses[-10:]) < sum(losses[:10])


# ------------------------------------------------------------------------------------------ vits_kl_loss


def vits_kl_loss_reference(z_p, logs_q, m_p, logs_p, z_mask):
    """VITS ``losses.kl_loss``, written from its formula."""
    kl = logs_p - logs_q - 0.5
    kl += 0.5 * ((z_p - m_p) ** 2) * torch.exp(-2.0 * logs_p)
    kl = torch.sum(kl * z_mask)
    return kl / torch.sum(z_mask)


def vits_inputs(gin: int = 0, b: int = 3, c: int = 6, t: int = 11):
    torch.manual_seed(11)
    flow = ResidualCouplingBlock(c, 16, 5, 1, 4, n_flows=4, gin_channels=gin)
    with torch.no_grad():
        for p in flow.parameters():
            p.normal_(0.0, 0.3)
    lengths = torch.tensor([t, t - 4, t - 7][:b])
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float().unsqueeze(1)
    m_q, logs_q, m_p = (torch.randn(b, c, t) * mask for _ in range(3))
    logs_q, logs_p = 0.3 * logs_q - 0.5, 0.3 * torch.randn(b, c, t) * mask
    z = (m_q + torch.randn(b, c, t) * torch.exp(logs_q)) * mask
    g = torch.randn(b, gin, 1) if gin else None
    return flow, z, m_q, logs_q, m_p, logs_p, mask, g


@pytest.mark.parametrize("gin", [0, 3])
def test_vits_kl_loss_is_vits_kl_loss_bit_for_bit(gin):
    flow, z, m_q, logs_q, m_p, logs_p, mask, g = vits_inputs(gin)
    expected = vits_kl_loss_reference(flow(z, mask, g=g), logs_q, m_p, logs_p, mask)
    got = vits_kl_loss(z, m_q, logs_q, m_p, logs_p, mask, flow, g=g)
    assert got.dtype == expected.dtype and got.shape == () and torch.equal(got, expected)


@pytest.mark.parametrize("estimator", ["vits", "mc", "control_variate", "k3", "gaussian_closed_form"])
def test_vits_kl_loss_with_particles_is_the_mean_over_the_same_draws(estimator):
    flow, z, m_q, logs_q, m_p, logs_p, mask, g = vits_inputs()
    k = 5
    torch.manual_seed(12)
    with torch.no_grad():
        got = vits_kl_loss(z, m_q, logs_q, m_p, logs_p, mask, flow, estimator=estimator, kl_particles=k)
    torch.manual_seed(12)
    extra = (m_q + torch.randn((k - 1,) + z.shape) * torch.exp(logs_q)) * mask
    with torch.no_grad():
        singles = [vits_kl_loss(zk, m_q, logs_q, m_p, logs_p, mask, flow, estimator=estimator)
                   for zk in torch.cat([z.unsqueeze(0), extra])]
    assert float(got) == pytest.approx(float(torch.stack(singles).mean()), rel=1e-5, abs=1e-6)


def test_vits_kl_loss_estimators_agree_in_expectation_and_particles_cut_the_variance():
    flow, z, m_q, logs_q, m_p, logs_p, mask, g = vits_inputs()
    torch.manual_seed(13)
    draws = {}
    for estimator, k in (("vits", 1), ("vits", 8), ("mc", 8)):
        with torch.no_grad():
            zs = (m_q + torch.randn((300,) + z.shape) * torch.exp(logs_q)) * mask
            draws[(estimator, k)] = torch.stack(
                [vits_kl_loss(zi, m_q, logs_q, m_p, logs_p, mask, flow, estimator=estimator, kl_particles=k)
                 for zi in zs]).double()
    mean = {key: float(v.mean()) for key, v in draws.items()}
    se = {key: float(v.std()) / math.sqrt(v.numel()) for key, v in draws.items()}
    for key in (("vits", 8), ("mc", 8)):
        assert abs(mean[key] - mean[("vits", 1)]) < 4 * math.hypot(se[key], se[("vits", 1)]), key
    assert float(draws[("vits", 8)].var()) < 0.3 * float(draws[("vits", 1)].var())


def test_vits_kl_loss_affine_flow_includes_the_log_determinant():
    flow, z, m_q, logs_q, m_p, logs_p, mask, _ = vits_inputs()
    affine = ResidualCouplingBlock(6, 16, 5, 1, 4, n_flows=4, mean_only=False)
    with torch.no_grad():
        for p in affine.parameters():
            p.normal_(0.0, 0.1)
    with torch.no_grad():
        z_p, logdet = affine.forward_and_logdet(z, mask)
        expected = vits_kl_loss_reference(z_p, logs_q, m_p, logs_p, mask) - logdet.sum() / mask.sum()
        got = vits_kl_loss(z, m_q, logs_q, m_p, logs_p, mask, affine)
    assert float(logdet.abs().sum()) > 1e-3 and float(got) == pytest.approx(float(expected), rel=1e-6)


def test_vits_kl_loss_gradients_reach_posterior_prior_and_flow():
    flow, z, m_q, logs_q, m_p, logs_p, mask, _ = vits_inputs()
    m_q, logs_q = m_q.requires_grad_(), logs_q.requires_grad_()
    m_p = m_p.requires_grad_()
    vits_kl_loss(z, m_q, logs_q, m_p, logs_p, mask, flow, kl_particles=3).backward()
    for tensor in (m_q, logs_q, m_p, flow.flows[0].pre.weight):
        assert tensor.grad is not None and float(tensor.grad.abs().sum()) > 0


def test_vits_kl_loss_validates_its_arguments():
    flow, z, m_q, logs_q, m_p, logs_p, mask, _ = vits_inputs()
    args = (z, m_q, logs_q, m_p, logs_p, mask)
    with pytest.raises(ValueError, match="kl_particles"):
        vits_kl_loss(*args, flow, kl_particles=0)
    with pytest.raises(ValueError, match="estimator"):
        vits_kl_loss(*args, flow, estimator="nope")
    with pytest.raises(TypeError, match="flow"):
        vits_kl_loss(*args, torch.nn.Identity())
    with pytest.raises(ValueError, match="m_p"):
        vits_kl_loss(z, m_q, logs_q, m_p[..., :-1], logs_p, mask, flow)
    with pytest.raises(ValueError, match="z_mask"):
        vits_kl_loss(*args[:5], mask[..., :-1], flow)


# ------------------------------------------------------------------------------------------ make_elbo / fit


def test_make_elbo_builds_kl_particle_elbos_and_refuses_iwae():
    from pyro_vits.infer import ELBOS, make_elbo

    assert type(make_elbo("trace", 2, kl_particles=1)) is ELBOS["trace"]
    for name, cls in (("trace", MC_ELBO), ("vits", HybridEntropyELBO), ("stl", STL_ELBO)):
        elbo = make_elbo(name, 2, True, kl_particles=4)
        assert type(elbo) is cls and elbo.kl_particles == 4 and elbo.num_particles == 2
    with pytest.raises(ValueError, match="kl_particles"):
        make_elbo("iwae_dreg", 2, kl_particles=3)
    with pytest.raises(ValueError, match="kl_particles"):
        make_elbo("vits", kl_particles=0)


def test_fit_takes_kl_particles_and_eval_chunk(tmp_path):
    from pyro_vits.models import PosteriorEncoder, VITSPriorModel, make_teacher, sample_dataset
    from pyro_vits.train import FitConfig, fit

    teacher = make_teacher(4, 8, kernel_size=3, n_layers=1, n_flows=2, seed=0)
    data = sample_dataset(teacher, 6, 8, seed=1)
    model = VITSPriorModel(4, 8, kernel_size=3, n_layers=1, n_flows=2)
    guide = PosteriorEncoder(4, 4, 8, kernel_size=3, n_layers=1)
    config = FitConfig(steps=3, log_every=3, kl_particles=3, eval_chunk=16, eval_samples=20, progress=False,
                       out_dir=tmp_path / "run")
    result = fit(model, guide, data, config, device="cpu")
    assert result.config["elbo"]["type"] == "MC_ELBO" and result.config["elbo"]["kl_particles"] == 3
    assert result.config["eval_chunk"] == 16 and all(math.isfinite(v) for v in result.losses)
    with pytest.raises(ValueError, match="kl_particles"):
        fit(model, guide, data, FitConfig(steps=1, kl_particles=2, progress=False), elbo=Trace_ELBO(), device="cpu")


def test_fit_command_line_has_kl_particles_and_eval_chunk():
    from pyro_vits.apps.fit import build_parser, fit_config

    args = build_parser().parse_args(["--kl-particles", "4", "--eval-chunk", "64"])
    assert args.kl_particles == 4 and fit_config(args, None).eval_chunk == 64
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--kl-particles", "0"])
