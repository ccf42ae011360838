"""Ground truths to judge the KL estimators by: a large-sample Monte Carlo ``KL(q || p)`` and a 2-D trapezoid
quadrature for two-element latents."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Distribution

from ._common import LogProb

__all__ = ["reference_kl", "quadrature_kl_2d"]


def reference_kl(
    q: Distribution, prior: LogProb, num_samples: int, seed: int = 0, chunk_size: int = 65536
) -> tuple[Tensor, Tensor]:
    """Large-sample Monte Carlo ``KL(q || p) = E_q[log q(z) - log p(z)]``: ``(estimate, mcse)``.

    ``q``: a distribution over ``(..., C, T)`` with ``sample`` and ``log_prob`` (e.g.
    :class:`~pyro_vits.distributions.masked_normal.MaskedNormal`); both outputs have shape
    ``q.batch_shape``, float64; ``mcse = std / sqrt(num_samples)``. Seeded; the global RNG is left untouched.
    """
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}")
    if not isinstance(q, Distribution):
        raise TypeError(f"q must be a torch Distribution, got {type(q).__name__}")
    total = total_sq = 0.0
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, num_samples, chunk_size):
            z = q.sample((min(chunk_size, num_samples - start),))
            values = (q.log_prob(z) - prior.log_prob(z)).double()
            total = total + values.sum(0)
            total_sq = total_sq + (values**2).sum(0)
    mean = total / num_samples
    var = (total_sq - num_samples * mean**2) / (num_samples - 1)
    return mean, (var.clamp(min=0.0) / num_samples).sqrt()


def _trapezoid_2d(values: Tensor, step: float) -> float:
    weights = torch.ones(values.shape[0], dtype=values.dtype)
    weights[0] = weights[-1] = 0.5
    return float(step**2 * (weights[:, None] * weights[None, :] * values).sum())


def quadrature_kl_2d(
    q: Distribution, prior: LogProb, num_points: int = 201, width: float = 8.0, chunk_size: int = 65536
) -> tuple[float, float]:
    """``KL(q || p)`` for a 2-element latent (``C * T = 2``, e.g. ``(2, 1)``) by a 2-D trapezoid rule.

    The grid spans ``mean +- width * stddev`` of ``q`` per coordinate with ``num_points`` (odd) points;
    the integrand ``q (log q - log p)`` is smooth and Gaussian-tailed, so the rule converges
    exponentially in the step (``width = 8`` drops mass ``< 1e-14``). Returns ``(value, error)`` with
    ``error = |I(h) - I(2h)|``, a conservative bound on the step-``h`` error (``~1e-10`` at the defaults
    for the package's tests; float32 priors limit it to ``~1e-6``).
    """
    if not isinstance(q, Distribution):
        raise TypeError(f"q must be a torch Distribution, got {type(q).__name__}")
    if q.batch_shape != () or q.event_shape.numel() != 2:
        raise ValueError(
            f"q must have batch_shape () and 2 event elements, got {tuple(q.batch_shape)} and "
            f"{tuple(q.event_shape)}"
        )
    if not isinstance(num_points, int) or num_points < 5 or num_points % 2 == 0:
        raise ValueError(f"num_points must be an odd int >= 5, got {num_points!r}")
    mean, std = q.mean, q.stddev
    if not bool((std > 0).all()):
        raise ValueError("q must have positive stddev in both elements (no padded frame)")
    u = torch.linspace(-width, width, num_points, dtype=torch.float64)
    uu = torch.stack(torch.meshgrid(u, u, indexing="ij"), dim=-1).reshape(-1, 2)
    z_all = mean.reshape(2).double() + std.reshape(2).double() * uu
    z_all = z_all.to(mean.dtype).reshape((-1,) + q.event_shape)
    chunks = []
    with torch.no_grad():
        for z in z_all.split(chunk_size):
            log_q, log_p = q.log_prob(z).double(), prior.log_prob(z).double()
            chunks.append(torch.exp(log_q) * (log_q - log_p))
    density = torch.cat(chunks).reshape(num_points, num_points) * float(std.double().prod())
    step = 2 * width / (num_points - 1)
    fine, coarse = _trapezoid_2d(density, step), _trapezoid_2d(density[::2, ::2], 2 * step)
    return fine, abs(fine - coarse)
