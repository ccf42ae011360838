"""Estimators of VITS's KL term KL(q || p) and the ground truths to judge them by.

Shapes follow the rest of the package: latents ``(..., C, T)``, masks ``(..., 1, T)`` (1 = real frame).
A *per-utterance* value is in nats summed over the valid ``(C, T)`` elements and has shape ``(...)``;
VITS's loss divides the batch sum by the number of valid frames (:func:`vits_kl`, :func:`batch_kl`).

``q = N(m_q, exp(logs_q))`` is VITS's posterior, ``p`` the flow prior
``p(z) = N(f(z); m_p, exp(logs_p)) |det df/dz|`` (:class:`~pyro_vits.prior.FlowPrior`, or
:class:`CosFlowPrior`, or any object with ``log_prob(z) -> (...)``).
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch
from pyro.distributions import TransformedDistribution, constraints
from torch import Tensor
from torch.distributions import Distribution, Transform

from ._validate import check_positive_ints
from .prior import MaskedNormal, check_mask

__all__ = [
    "ESTIMATORS",
    "BATCH_REDUCTIONS",
    "LogProb",
    "CosFlow",
    "CosFlowPrior",
    "vits_kl",
    "kl_estimate",
    "sample_kl_estimates",
    "batch_kl",
    "analytic_variances",
    "reference_kl",
    "quadrature_kl_2d",
    "prob_negative",
    "prob_negative_normal_approx",
]

ESTIMATORS = ("vits", "mc", "k3", "clamp", "abs", "gaussian_closed_form")
"""Names accepted by :func:`kl_estimate`."""

BATCH_REDUCTIONS = ("mean", "clamp", "abs")
"""Names accepted by :func:`batch_kl`."""


class LogProb(Protocol):
    """Anything with ``log_prob(z (..., C, T)) -> (...)``, e.g. a prior distribution."""

    def log_prob(self, value: Tensor) -> Tensor: ...


def _differs(mask: Tensor, other: Tensor) -> bool:
    return not torch.equal(*torch.broadcast_tensors(mask, other.to(mask)))


def _tensor(value: object, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")
    if value.dim() < 2:
        raise ValueError(f"{name} must have shape (..., C, T), got {tuple(value.shape)}")
    return value


def _same_event(value: Tensor, like: Tensor, name: str, like_name: str) -> None:
    if value.shape[-2:] != like.shape[-2:]:
        raise ValueError(
            f"{name} must have (C, T) = {tuple(like.shape[-2:])} like {like_name}, got {tuple(value.shape)}"
        )
    try:
        torch.broadcast_shapes(value.shape, like.shape)
    except RuntimeError as err:
        raise ValueError(
            f"{name} {tuple(value.shape)} does not broadcast with {like_name} {tuple(like.shape)}"
        ) from err


# ---------------------------------------------------------------------------------------------------------
# A 2-D flow with unit Jacobian whose prior is not Gaussian
# ---------------------------------------------------------------------------------------------------------


class CosFlow(Transform):
    """``f: (x0, x1) -> (x0, x1 + a cos(x0))`` per frame on ``(..., 2, T)``; ``log|det| = 0`` exactly.

    Volume preserving like VITS's mean-only couplings, yet ``f`` maps a Gaussian to a non-Gaussian,
    so a Gaussian-Gaussian closed-form KL is wrong for the prior it defines. The shift is multiplied
    by ``mask (..., 1, T)`` so padded frames map 0 to 0, as in the VITS flow.
    """

    domain = constraints.independent(constraints.real, 2)
    codomain = constraints.independent(constraints.real, 2)
    bijective = True

    def __init__(self, a: float = 1.0, mask: Tensor | None = None, cache_size: int = 0) -> None:
        super().__init__(cache_size=cache_size)
        self.a = float(a)
        self.mask = mask

    def with_cache(self, cache_size: int = 1) -> CosFlow:
        return self if self._cache_size == cache_size else CosFlow(self.a, self.mask, cache_size)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CosFlow) and other.a == self.a and other.mask is self.mask

    def _shift(self, x0: Tensor) -> Tensor:
        shift = self.a * torch.cos(x0)
        return shift if self.mask is None else shift * self.mask[..., 0, :]

    def _call(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[-2] != 2:
            raise ValueError(f"x must have shape (..., 2, T), got {tuple(x.shape)}")
        return torch.stack([x[..., 0, :], x[..., 1, :] + self._shift(x[..., 0, :])], dim=-2)

    def _inverse(self, y: Tensor) -> Tensor:
        if y.dim() < 2 or y.shape[-2] != 2:
            raise ValueError(f"y must have shape (..., 2, T), got {tuple(y.shape)}")
        return torch.stack([y[..., 0, :], y[..., 1, :] - self._shift(y[..., 0, :])], dim=-2)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        if self.mask is None:
            return x.new_zeros(x.shape[:-2])
        return x.new_zeros(torch.broadcast_shapes(x.shape[:-2], self.mask.shape[:-2]))


class CosFlowPrior(TransformedDistribution):
    """``p(z) = N(f(z); m_p, exp(logs_p))`` with ``f`` = :class:`CosFlow`, event ``(2, T)``.

    Mirrors :class:`~pyro_vits.prior.FlowPrior` (attributes ``m_p, logs_p, mask, g (None), flow``);
    ``rsample`` draws ``z_p`` from the base and returns ``f^{-1}(z_p)``.
    """

    arg_constraints: dict = {}

    def __init__(
        self, m_p: Tensor, logs_p: Tensor, a: float = 1.0, mask: Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        m_p, logs_p = _tensor(m_p, "m_p"), _tensor(logs_p, "logs_p")
        if m_p.shape[-2] != 2:
            raise ValueError(f"m_p must have shape (..., 2, T), got {tuple(m_p.shape)}")
        if logs_p.shape != m_p.shape:
            raise ValueError(f"logs_p must have m_p's shape {tuple(m_p.shape)}, got {tuple(logs_p.shape)}")
        base = MaskedNormal(m_p, torch.exp(logs_p), mask, validate_args=validate_args)
        self.m_p, self.logs_p, self.mask, self.g = m_p, logs_p, base.mask, None
        self.flow = CosFlow(a, base.mask)
        super().__init__(base, [self.flow.inv], validate_args=validate_args)

    def expand(self, batch_shape: torch.Size, _instance: CosFlowPrior | None = None) -> CosFlowPrior:
        new = self._get_checked_instance(CosFlowPrior, _instance)
        new.m_p, new.logs_p, new.mask, new.g, new.flow = self.m_p, self.logs_p, self.mask, self.g, self.flow
        return super().expand(batch_shape, _instance=new)


# ---------------------------------------------------------------------------------------------------------
# VITS's loss and the per-utterance estimators
# ---------------------------------------------------------------------------------------------------------


def vits_kl(z_p: Tensor, logs_q: Tensor, m_p: Tensor, logs_p: Tensor, z_mask: Tensor) -> Tensor:
    """VITS ``losses.kl_loss``: ``sum((logs_p - logs_q - 1/2 + (z_p - m_p)^2 exp(-2 logs_p) / 2) mask)``
    divided by ``sum(mask)``.

    Inputs ``(B, C, T)`` (any broadcastable ``(..., C, T)``), ``z_mask (B, 1, T)``; all cast to float32 as
    in VITS; returns a 0-d tensor in nats per valid frame. ``z_p = f(z)``, ``z ~ q``. Padded frames are
    selected out (``torch.where``), so even non-finite padded values leave the result unchanged.
    """
    z_p = _tensor(z_p, "z_p").float()
    for name, value in (("logs_q", logs_q), ("m_p", m_p), ("logs_p", logs_p)):
        _same_event(_tensor(value, name), z_p, name, "z_p")
    mask = check_mask(_tensor(z_mask, "z_mask"), z_p, "z_mask")
    logs_q, m_p, logs_p = logs_q.float(), m_p.float(), logs_p.float()
    kl = logs_p - logs_q - 0.5 + 0.5 * (z_p - m_p) ** 2 * torch.exp(-2.0 * logs_p)
    kl, full_mask = torch.broadcast_tensors(kl, mask)
    return torch.where(full_mask > 0, kl, 0.0).sum() / mask.sum()


def _k3(log_r: Tensor) -> Tensor:
    """``(r - 1) - log r`` from ``log r`` without cancellation: a Taylor series where ``|log r| < 1e-2``."""
    series = log_r**2 * (1 / 2 + log_r * (1 / 6 + log_r * (1 / 24 + log_r * (1 / 120 + log_r / 720))))
    return torch.where(log_r.abs() < 1e-2, series, torch.expm1(log_r) - log_r)


def _gaussian_closed_form(m_q: Tensor, logs_q: Tensor, prior: LogProb, mask: Tensor) -> Tensor:
    m_p, logs_p = getattr(prior, "m_p", None), getattr(prior, "logs_p", None)
    if not isinstance(m_p, Tensor) or not isinstance(logs_p, Tensor):
        raise TypeError(
            "'gaussian_closed_form' needs a prior with Tensor attributes m_p and logs_p "
            f"(FlowPrior, CosFlowPrior), got {type(prior).__name__}"
        )
    var_ratio, scaled_gap2 = torch.exp(2 * (logs_q - logs_p)), (m_q - m_p) ** 2 * torch.exp(-2 * logs_p)
    elem = logs_p - logs_q + 0.5 * (var_ratio + scaled_gap2) - 0.5
    elem, mask = torch.broadcast_tensors(elem, mask)
    return torch.where(mask > 0, elem, 0.0).sum((-2, -1))


def kl_estimate(
    name: str, z: Tensor, m_q: Tensor, logs_q: Tensor, prior: LogProb, mask: Tensor | None = None
) -> Tensor:
    """One-sample estimate of ``KL(q || p)`` per utterance: ``z (..., C, T) -> (...)`` nats.

    ``z`` is a draw from ``q = N(m_q, exp(logs_q))`` (``m_q``, ``logs_q`` broadcast to ``z``); ``mask``
    ``(..., 1, T)`` defaults to ``prior.mask`` when the prior has one. Names (:data:`ESTIMATORS`):

    - ``"vits"``: ``-H(q) - log p(z)``: analytic entropy plus one-sample cross-entropy (VITS's loss times
      the frame count, with the flow's log-determinant included). Unbiased, can be negative.
    - ``"mc"``: ``log q(z) - log p(z)``. Unbiased, can be negative.
    - ``"k3"``: ``(r - 1) - log r`` with ``r = p(z)/q(z)``. Unbiased (``E_q r = 1``) and ``>= 0``.
    - ``"clamp"`` / ``"abs"``: ``max(vits, 0)`` / ``|vits|`` per value: biased upward.
    - ``"gaussian_closed_form"``: ``KL(N(m_q, s_q) || N(m_p, s_p))`` ignoring the flow (``z`` unused):
      exact only when the flow is the identity.
    """
    return _estimates((name,), z, m_q, logs_q, prior, mask)[name]


def _estimates(
    names: tuple[str, ...], z: Tensor, m_q: Tensor, logs_q: Tensor, prior: LogProb, mask: Tensor | None
) -> dict[str, Tensor]:
    """Validate, then evaluate each named estimator on ``z`` with one evaluation of ``log p(z)``."""
    for name in names:
        if name not in ESTIMATORS:
            raise ValueError(f"name must be one of {ESTIMATORS}, got {name!r}")
    z = _tensor(z, "z")
    _same_event(_tensor(m_q, "m_q"), z, "m_q", "z")
    _same_event(_tensor(logs_q, "logs_q"), z, "logs_q", "z")
    if not callable(getattr(prior, "log_prob", None)):
        raise TypeError(f"prior must have a log_prob method, got {type(prior).__name__}")
    prior_mask = getattr(prior, "mask", None)
    if mask is None:
        mask = prior_mask if isinstance(prior_mask, Tensor) else z.new_ones(z.shape[:-2] + (1, z.shape[-1]))
    mask = check_mask(mask, z)
    if isinstance(prior_mask, Tensor) and _differs(mask, prior_mask):
        raise ValueError("mask must equal prior.mask (the prior's padded frames are fixed at construction)")

    q = MaskedNormal(m_q, torch.exp(logs_q), mask, validate_args=False)
    log_p = prior.log_prob(z) if set(names) - {"gaussian_closed_form"} else None
    estimates = {}
    for name in names:
        if name == "gaussian_closed_form":
            closed = _gaussian_closed_form(m_q, logs_q, prior, mask)
            estimates[name] = closed.expand(torch.broadcast_shapes(closed.shape, z.shape[:-2]))
        elif name in ("mc", "k3"):
            log_ratio = q.log_prob(z) - log_p
            estimates[name] = log_ratio if name == "mc" else _k3(-log_ratio)
        else:
            vits = -q.entropy() - log_p
            estimates[name] = {"clamp": vits.clamp(min=0.0), "abs": vits.abs()}.get(name, vits)
    return estimates


def sample_kl_estimates(
    names: tuple[str, ...] | list[str],
    m_q: Tensor,
    logs_q: Tensor,
    prior: LogProb,
    num_samples: int,
    seed: int = 0,
    mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """Draw ``num_samples`` ``z ~ q`` (seeded, global RNG untouched) and evaluate each named estimator on
    the same draws (one ``log p`` evaluation, no autograd graph): ``{name: (num_samples, ...)}``."""
    check_positive_ints(num_samples=num_samples)
    m_q, logs_q = _tensor(m_q, "m_q"), _tensor(logs_q, "logs_q")
    if mask is None and isinstance(getattr(prior, "mask", None), Tensor):
        mask = prior.mask
    q = MaskedNormal(m_q, torch.exp(logs_q), mask)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        z = q.sample((num_samples,))
    with torch.no_grad():
        return _estimates(tuple(names), z, m_q, logs_q, prior, q.mask)


def batch_kl(reduction: str, per_utt_kl: Tensor, n_frames: Tensor) -> Tensor:
    """VITS's batch loss from per-utterance KL estimates: ``(..., B), (B,) -> (...)`` nats per frame.

    ``"mean"``: ``sum_b kl_b / sum_b n_b`` (what :func:`vits_kl` returns); ``"clamp"`` / ``"abs"``: that
    batch mean clamped at 0 / made absolute, the fixes VITS users applied to negative losses. Leading
    dims of ``per_utt_kl`` are independent replicate batches.
    """
    if reduction not in BATCH_REDUCTIONS:
        raise ValueError(f"reduction must be one of {BATCH_REDUCTIONS}, got {reduction!r}")
    if not isinstance(per_utt_kl, Tensor) or not isinstance(n_frames, Tensor):
        raise TypeError("per_utt_kl and n_frames must be Tensors")
    if per_utt_kl.dim() < 1 or n_frames.shape != per_utt_kl.shape[-1:]:
        raise ValueError(f"n_frames must be a Tensor of shape (B={per_utt_kl.shape[-1]},)")
    mean = per_utt_kl.sum(-1) / n_frames.to(per_utt_kl).sum()
    if reduction == "clamp":
        return mean.clamp(min=0.0)
    return mean.abs() if reduction == "abs" else mean


def analytic_variances(
    m_q: Tensor, logs_q: Tensor, m_p: Tensor, logs_p: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r"""Variances of the ``"vits"`` and ``"mc"`` estimators for Gaussian ``q`` and ``p`` (identity flow).

    Inputs ``(..., C, T)``, ``mask (..., 1, T)``; returns ``(var_vits, var_mc)`` of shape ``(...)``.

    Derivation, per element: write ``z = m_q + s_q e`` with ``e ~ N(0, 1)``, ``a = s_q / s_p`` and
    ``b = (m_q - m_p) / s_p``, so ``(z - m_p) / s_p = b + a e``. Up to constants,

    - vits: ``-H(q) - log p(z) = c + (b + a e)^2 / 2 = c' + a b e + a^2 e^2 / 2``, hence
      ``Var = a^2 b^2 + a^4 / 2`` (``Var e = 1``, ``Var e^2 = 2``, ``Cov(e, e^2) = 0``);
    - mc: ``log q(z) - log p(z) = c - e^2 / 2 + (b + a e)^2 / 2 = c' + a b e + (a^2 - 1) e^2 / 2``, hence
      ``Var = a^2 b^2 + (a^2 - 1)^2 / 2``.

    Elements are independent, so per-utterance variances are sums over valid elements. The ratio
    vits/mc is ``< 1`` iff ``a^4 < (a^2 - 1)^2`` iff ``s_q < s_p / sqrt(2)``; at ``q = p`` the mc
    estimator is exactly 0 while the vits one keeps variance ``1/2`` per element.
    """
    for name, value in (("m_q", m_q), ("logs_q", logs_q), ("m_p", m_p), ("logs_p", logs_p)):
        _same_event(_tensor(value, name), m_q, name, "m_q")
    a2 = torch.exp(2 * (logs_q - logs_p))
    b2 = (m_q - m_p) ** 2 * torch.exp(-2 * logs_p)
    var_vits, var_mc = a2 * b2 + a2**2 / 2, a2 * b2 + (a2 - 1) ** 2 / 2
    mask = var_vits.new_ones(var_vits.shape[:-2] + (1, var_vits.shape[-1])) if mask is None else mask
    mask = check_mask(mask, var_vits)

    def total(elem: Tensor) -> Tensor:
        elem, m = torch.broadcast_tensors(elem, mask)
        return torch.where(m > 0, elem, 0.0).sum((-2, -1))

    return total(var_vits), total(var_mc)


# ---------------------------------------------------------------------------------------------------------
# Ground truths
# ---------------------------------------------------------------------------------------------------------


def reference_kl(
    q: Distribution, prior: LogProb, num_samples: int, seed: int = 0, chunk_size: int = 65536
) -> tuple[Tensor, Tensor]:
    """Large-sample Monte Carlo ``KL(q || p) = E_q[log q(z) - log p(z)]``: ``(estimate, mcse)``.

    ``q``: a distribution over ``(..., C, T)`` with ``sample`` and ``log_prob`` (e.g. :class:`MaskedNormal`);
    both outputs have shape ``q.batch_shape``, float64; ``mcse = std / sqrt(num_samples)``. Seeded; the
    global RNG is left untouched.
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


# ---------------------------------------------------------------------------------------------------------
# How often is the loss negative?
# ---------------------------------------------------------------------------------------------------------


def prob_negative(samples: Tensor | np.ndarray) -> tuple[float, float]:
    """Empirical ``P(X < 0)`` over all elements of ``samples`` and its binomial standard error."""
    if isinstance(samples, Tensor):
        samples = samples.detach().cpu().numpy()
    values = np.asarray(samples, dtype=float).ravel()
    if values.size == 0:
        raise ValueError("samples must not be empty")
    p = float(np.mean(values < 0))
    return p, math.sqrt(p * (1 - p) / values.size)


def prob_negative_normal_approx(kl: float | Tensor, sigma: float | Tensor, n: int) -> Tensor:
    """``P(mean of n estimates < 0) ~= Phi(-sqrt(n) KL / sigma)`` (CLT), for per-estimate mean ``kl``
    and standard deviation ``sigma``; broadcasts, returns float64."""
    check_positive_ints(n=n)
    kl_t, sigma_t = torch.as_tensor(kl, dtype=torch.float64), torch.as_tensor(sigma, dtype=torch.float64)
    if not bool((sigma_t > 0).all()):
        raise ValueError("sigma must be positive")
    return torch.special.ndtr(-math.sqrt(n) * kl_t / sigma_t)
