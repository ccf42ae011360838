"""gradient_stats against the exact gradient distribution of a conjugate model."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_vits.diagnostics import gradient_stats

D64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")

# z_d ~ N(0, 1), x_d ~ N(z_d, S^2), guide N(mu_d, sigma_d^2). With z = mu + sigma eps, Trace_ELBO's gradient
# of -ELBO w.r.t. mu is -(x - z)/S^2 + z (d/dmu log q(z(eps, mu)) = 0): Normal with mean -(x - mu)/S^2 + mu
# and variance sigma^2 (1 + 1/S^2)^2 per particle. "offset" is a parameter with a constant gradient (1) and
# "unused" one with none.
S = 0.8
X = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=D64)
MU = torch.tensor([0.1, -0.5, 1.0, 0.0], dtype=D64)
LOG_SIGMA = torch.tensor([-0.3, 0.0, -1.0, 0.2], dtype=D64)


def model(x: torch.Tensor) -> None:
    offset = pyro.param("offset", torch.tensor(1.0, dtype=D64))
    pyro.sample("y", dist.Normal(offset, 1.0), obs=torch.tensor(0.0, dtype=D64))
    with pyro.plate("d", 4):
        z = pyro.sample("z", dist.Normal(torch.zeros(4, dtype=D64), 1.0))
        pyro.sample("x", dist.Normal(z, S), obs=x)


def guide(x: torch.Tensor) -> None:
    pyro.param("unused", torch.zeros(2, dtype=D64))
    mu, log_sigma = pyro.param("mu", MU.clone()), pyro.param("log_sigma", LOG_SIGMA.clone())
    with pyro.plate("d", 4):
        pyro.sample("z", dist.Normal(mu, log_sigma.exp()))


@pytest.fixture(autouse=True)
def fresh_param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.mark.parametrize("num_particles", [1, 4])
def test_mean_and_variance_match_the_exact_gradient_distribution(num_particles):
    repeats = 400
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True)
    stats = gradient_stats(model, guide, elbo, X, num_repeats=repeats, param_groups={"mu": "mu"}, seed=3)
    stats = stats["mu"]
    mean = (-(X - MU) / S**2 + MU).numpy()
    variance = (torch.exp(2 * LOG_SIGMA) * (1 + 1 / S**2) ** 2 / num_particles).numpy()
    assert stats.names == ("mu",) and stats.num_repeats == repeats
    assert (abs(stats.mean - mean) < 4 * stats.mcse).all()
    assert (abs(stats.variance - variance) < 4 * variance * math.sqrt(2 / (repeats - 1))).all()
    assert np.allclose(stats.mcse, np.sqrt(stats.variance / repeats))
    assert np.allclose(stats.snr, abs(stats.mean) / np.sqrt(stats.variance))
    assert stats.mean_snr == pytest.approx(stats.snr.mean())
    assert stats.mean_norm == pytest.approx(np.linalg.norm(stats.mean))
    assert stats.norm_snr == pytest.approx(stats.mean_norm / math.sqrt(stats.variance.sum()))


def test_groups_zero_variance_rng_and_grads():
    groups = {
        "constant": "offset",
        "none": lambda name: name == "unused",
        "guide": lambda name: name in {"mu", "log_sigma"},
    }
    rng = torch.get_rng_state()
    stats = gradient_stats(model, guide, Trace_ELBO(), X, num_repeats=3, param_groups=groups)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for _, p in pyro.get_param_store().named_parameters())
    assert stats["guide"].names == ("mu", "log_sigma") and stats["guide"].mean.shape == (8,)
    constant, unused = stats["constant"], stats["none"]
    assert constant.mean.tolist() == [1.0] and constant.variance.tolist() == [0.0]
    assert constant.snr.tolist() == [math.inf] and math.isnan(constant.mean_snr)
    assert unused.mean.tolist() == [0.0, 0.0] and np.isnan(unused.snr).all()
    again = gradient_stats(model, guide, Trace_ELBO(), X, num_repeats=3, param_groups=groups)
    assert np.array_equal(again["guide"].mean, stats["guide"].mean)  # seeded


def test_invalid_arguments():
    with pytest.raises(ValueError, match="num_repeats"):
        gradient_stats(model, guide, Trace_ELBO(), X, num_repeats=1, param_groups={"g": "mu"})
    with pytest.raises(TypeError, match="param_groups"):
        gradient_stats(model, guide, Trace_ELBO(), X, num_repeats=2, param_groups={})
    with pytest.raises(TypeError, match=r"param_groups\['g'\]"):
        gradient_stats(model, guide, Trace_ELBO(), X, num_repeats=2, param_groups={"g": 3})
    with pytest.raises(ValueError, match="matches no parameter"):
        gradient_stats(model, guide, Trace_ELBO(), X, num_repeats=2, param_groups={"g": "flow$$$"})
