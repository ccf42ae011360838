"""Estimators of VITS's KL term KL(q || p) and the ground truths to judge them by.

Shapes follow the rest of the package: latents ``(..., C, T)``, masks ``(..., 1, T)`` (1 = real frame).
A *per-utterance* value is in nats summed over the valid ``(C, T)`` elements and has shape ``(...)``;
VITS's loss divides the batch sum by the number of valid frames (:func:`vits_kl`, :func:`batch_kl`).

``q = N(m_q, exp(logs_q))`` is VITS's posterior, ``p`` the flow prior
``p(z) = N(f(z); m_p, exp(logs_p)) |det df/dz|`` (:class:`~pyro_vits.distributions.flow_prior.FlowPrior`, or
:class:`~pyro_vits.distributions.flow_prior.CosFlowPrior`, or any object with ``log_prob(z) -> (...)``).

**Gradients.** With ``z = m_q + exp(logs_q) e`` (reparameterised), ``log q(z) + H(q) = sum (1 - e^2) / 2``
does not depend on ``(m_q, logs_q)``, so ``"vits"``, ``"mc"`` and ``"control_variate"`` have *identical
gradients draw by draw*: they differ only in the logged value (its variance and how often it is negative).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution

from .._validate import check_mask, check_positive_ints
from ..distributions.masked_normal import MaskedNormal

__all__ = [
    "KL_ESTIMATORS",
    "QUADRATIC_ESTIMATORS",
    "BATCH_REDUCTIONS",
    "LogProb",
    "vits_kl",
    "kl_estimate",
    "sample_kl_estimates",
    "batch_kl",
    "quadratic_form",
    "analytic_variance",
    "analytic_variances",
    "reference_kl",
    "quadrature_kl_2d",
    "prob_negative",
    "prob_negative_normal_approx",
    "prob_negative_gaussian",
    "prob_negative_saddlepoint",
]

KL_ESTIMATORS = ("vits", "mc", "control_variate", "k3", "clamp", "abs", "abs_elementwise",
                 "gaussian_closed_form")
"""Names accepted by :func:`kl_estimate` (the one registry of KL-estimator names)."""

QUADRATIC_ESTIMATORS = ("vits", "mc", "control_variate")
"""Estimators that are a quadratic form in Gaussian noise for a Gaussian prior (:func:`quadratic_form`)."""

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


def _prior_scales(prior: LogProb, name: str) -> tuple[Tensor, Tensor]:
    """The prior's base ``(m_p, logs_p)``; ``TypeError`` naming estimator ``name`` if it has none."""
    m_p, logs_p = getattr(prior, "m_p", None), getattr(prior, "logs_p", None)
    if not isinstance(m_p, Tensor) or not isinstance(logs_p, Tensor):
        raise TypeError(
            f"{name!r} needs a prior with Tensor attributes m_p and logs_p "
            f"(FlowPrior, CosFlowPrior), got {type(prior).__name__}"
        )
    return m_p, logs_p


def _masked_sum(elem: Tensor, mask: Tensor) -> Tensor:
    """``sum`` over the valid ``(C, T)`` elements: ``(..., C, T), (..., 1, T) -> (...)``."""
    elem, mask = torch.broadcast_tensors(elem, mask)
    return torch.where(mask > 0, elem, 0.0).sum((-2, -1))


def _gaussian_closed_form(m_q: Tensor, logs_q: Tensor, prior: LogProb, mask: Tensor) -> Tensor:
    m_p, logs_p = _prior_scales(prior, "gaussian_closed_form")
    var_ratio, scaled_gap2 = torch.exp(2 * (logs_q - logs_p)), (m_q - m_p) ** 2 * torch.exp(-2 * logs_p)
    return _masked_sum(logs_p - logs_q + 0.5 * (var_ratio + scaled_gap2) - 0.5, mask)


def kl_estimate(
    name: str, z: Tensor, m_q: Tensor, logs_q: Tensor, prior: LogProb, mask: Tensor | None = None
) -> Tensor:
    """One-sample estimate of ``KL(q || p)`` per utterance: ``z (..., C, T) -> (...)`` nats.

    ``z`` is a draw from ``q = N(m_q, exp(logs_q))`` (``m_q``, ``logs_q`` broadcast to ``z``); ``mask``
    ``(..., 1, T)`` defaults to ``prior.mask`` when the prior has one. Names (:data:`KL_ESTIMATORS`):

    - ``"vits"``: ``-H(q) - log p(z)``: analytic entropy plus one-sample cross-entropy (VITS's loss times
      the frame count, with the flow's log-determinant included). Unbiased, can be negative.
    - ``"mc"``: ``log q(z) - log p(z)``. Unbiased, can be negative.
    - ``"control_variate"``: ``vits + sum c (log q(z) + H(q))`` per element with ``c = sigma_q^2 /
      sigma_p^2`` (prior base scales, held constant). ``log q + H = (1 - e^2) / 2`` has mean 0, so it stays
      unbiased; for a Gaussian prior this ``c`` minimises the variance, to ``a^2 b^2`` per element
      (:func:`analytic_variance`). Same gradient as ``vits`` (module docstring). Needs ``prior.logs_p``.
    - ``"k3"``: ``(r - 1) - log r`` with ``r = p(z)/q(z)``. Unbiased (``E_q r = 1``) and ``>= 0``; its
      variance is infinite unless ``sigma_q > sigma_p / sqrt(2)`` in every element (Gaussian tails).
    - ``"clamp"`` / ``"abs"``: ``max(vits, 0)`` / ``|vits|`` of the whole estimate: biased upward.
    - ``"abs_elementwise"``: the patch proposed for VITS, ``abs`` on the log-scale term only:
      ``sum_valid |logs_p - logs_q - 1/2| + (f(z) - m_p)^2 exp(-2 logs_p) / 2``, minus the flow's
      log-determinant, i.e. ``vits + sum_valid (|d| - d)`` with ``d = logs_p - logs_q - 1/2``. Biased by
      ``2 sum max(-d, 0)`` (deterministic); it moves the optimum of ``sigma_q`` from ``sigma_p`` to
      ``sigma_p e^(-1/2)`` for a Gaussian prior. Needs ``prior.logs_p``.
    - ``"gaussian_closed_form"``: ``KL(N(m_q, s_q) || N(m_p, s_p))`` ignoring the flow (``z`` unused):
      exact only when the flow is the identity.
    """
    return _estimates((name,), z, m_q, logs_q, prior, mask)[name]


def _check_inputs(
    z: Tensor, m_q: Tensor, logs_q: Tensor, prior: LogProb, mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Validated ``z`` and the ``(..., 1, T)`` float mask (``prior.mask`` by default)."""
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
    return z, mask


def _estimates(
    names: tuple[str, ...], z: Tensor, m_q: Tensor, logs_q: Tensor, prior: LogProb, mask: Tensor | None
) -> dict[str, Tensor]:
    """Validate, then evaluate each named estimator on ``z`` with one evaluation of ``log p(z)``."""
    for name in names:
        if name not in KL_ESTIMATORS:
            raise ValueError(f"name must be one of {KL_ESTIMATORS}, got {name!r}")
    z, mask = _check_inputs(z, m_q, logs_q, prior, mask)
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
        elif name == "control_variate":
            _, logs_p = _prior_scales(prior, name)
            c = torch.exp(2 * (logs_q - logs_p)).detach()
            eps = (z - m_q) * torch.exp(-logs_q)
            estimates[name] = -q.entropy() - log_p + _masked_sum(c * 0.5 * (1 - eps**2), mask)
        elif name == "abs_elementwise":
            _, logs_p = _prior_scales(prior, name)
            d = logs_p - logs_q - 0.5
            estimates[name] = -q.entropy() - log_p + _masked_sum(d.abs() - d, mask)
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


def quadratic_form(
    name: str, m_q: Tensor, logs_q: Tensor, m_p: Tensor, logs_p: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Per-element coefficients ``(c0, alpha, beta)`` of a Gaussian-prior (identity-flow) estimator as a
    quadratic form in its noise: ``X = c0 + alpha e + beta e^2``, ``e ~ N(0, 1)``; inputs broadcast
    ``(..., C, T)``, outputs of the broadcast shape; nats per element. Names: :data:`QUADRATIC_ESTIMATORS`.

    With ``z = m_q + s_q e``, ``a = s_q / s_p`` and ``b = (m_q - m_p) / s_p``, ``(z - m_p) / s_p = b + a e``:

    - vits: ``-log a - 1/2 + (b + a e)^2 / 2``: ``c0 = -log a - 1/2 + b^2/2``, ``alpha = a b``,
      ``beta = a^2 / 2``;
    - mc: vits ``+ (1 - e^2) / 2`` (``log q + H``): ``beta = (a^2 - 1) / 2``, ``c0`` larger by 1/2;
    - control_variate: vits ``+ a^2 (1 - e^2) / 2``: ``beta = 0``, ``c0 = KL`` per element.

    Mean ``c0 + beta`` (= the KL for every name), variance ``alpha^2 + 2 beta^2``.
    """
    if name not in QUADRATIC_ESTIMATORS:
        raise ValueError(f"name must be one of {QUADRATIC_ESTIMATORS}, got {name!r}")
    for arg, value in (("m_q", m_q), ("logs_q", logs_q), ("m_p", m_p), ("logs_p", logs_p)):
        _same_event(_tensor(value, arg), m_q, arg, "m_q")
    log_a = logs_q - logs_p
    a2, b = torch.exp(2 * log_a), (m_q - m_p) * torch.exp(-logs_p)
    alpha = torch.exp(log_a) * b
    c0 = -log_a - 0.5 + b**2 / 2
    beta = {"vits": a2 / 2, "mc": (a2 - 1) / 2, "control_variate": torch.zeros_like(a2)}[name]
    c0 = c0 + {"vits": 0.0, "mc": 0.5, "control_variate": a2 / 2}[name]
    return torch.broadcast_tensors(c0, alpha, beta)


def analytic_variance(
    name: str, m_q: Tensor, logs_q: Tensor, m_p: Tensor, logs_p: Tensor, mask: Tensor | None = None
) -> Tensor:
    """Variance of estimator ``name`` (:data:`QUADRATIC_ESTIMATORS`) per utterance for Gaussian ``q`` and
    ``p`` (identity flow): ``sum_valid alpha^2 + 2 beta^2`` (:func:`quadratic_form`; elements are
    independent); inputs ``(..., C, T)``, ``mask (..., 1, T)``; returns ``(...)`` nats^2.

    Per element (``a = s_q / s_p``, ``b = (m_q - m_p) / s_p``): vits ``a^2 b^2 + a^4 / 2``; mc
    ``a^2 b^2 + (a^2 - 1)^2 / 2``; control_variate ``a^2 b^2`` (the least variance of ``vits + c (log q +
    H)`` over ``c``: ``Cov(a^2 e^2 / 2, (1 - e^2) / 2) = -a^2 / 2`` and ``Var((1 - e^2) / 2) = 1/2`` give
    ``c* = a^2``, removing the ``e^2`` term). The ratio vits/mc is ``< 1`` iff ``s_q < s_p / sqrt(2)``.
    """
    _, alpha, beta = quadratic_form(name, m_q, logs_q, m_p, logs_p)
    var = alpha**2 + 2 * beta**2
    mask = var.new_ones(var.shape[:-2] + (1, var.shape[-1])) if mask is None else check_mask(mask, var)
    return _masked_sum(var, mask)


def analytic_variances(
    m_q: Tensor, logs_q: Tensor, m_p: Tensor, logs_p: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(var_vits, var_mc)`` per utterance: :func:`analytic_variance` of ``"vits"`` and ``"mc"``."""
    return (analytic_variance("vits", m_q, logs_q, m_p, logs_p, mask),
            analytic_variance("mc", m_q, logs_q, m_p, logs_p, mask))


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


# Saddlepoint tails: P(S < 0) for a sum S of independent terms with a known cumulant generating function.
# ``cgf(t) -> (K, K', K'')`` of S (float64); the tail is Lugannani-Rice's, relative error O(1/n) for a sum
# of n terms, uniformly far into the tail (where a normal approximation is off by orders of magnitude).

_Cgf = Callable[[float], tuple[float, float, float]]


def _saddlepoint(cgf: _Cgf, x: float, bounds: tuple[float, float]) -> float:
    """The ``t`` in ``bounds`` (the open domain of ``K``) with ``K'(t) = x``; ``-inf``/``inf`` when ``x``
    lies beyond the support's end on that side (``K'`` stays on one side of ``x``)."""
    below = x < cgf(0.0)[1]
    edge = bounds[0] if below else bounds[1]
    inner, outer = 0.0, -1.0 if below else 1.0
    while (cgf(outer)[1] > x) == below:  # expand towards the edge until the root is bracketed
        inner = outer
        if math.isfinite(edge):
            outer = 0.5 * (outer + edge) if abs(outer - edge) > 1e-15 * abs(edge) else None
        else:
            outer = 2 * outer if abs(outer) < 1e12 else None
        if outer is None:
            return -math.inf if below else math.inf
    for _ in range(200):
        mid = 0.5 * (inner + outer)
        if (cgf(mid)[1] > x) == below:
            inner = mid
        else:
            outer = mid
    return 0.5 * (inner + outer)


def _log_lugannani_rice(cgf: _Cgf, x: float, bounds: tuple[float, float]) -> float:
    """``log P(S < x)`` by the Lugannani-Rice formula ``Phi(w) + phi(w) (1/w - 1/u)`` (log space in the
    lower tail); the normal approximation within ``|w| < 1e-5`` of the mean, where the formula is 0/0."""
    _, mean, var = cgf(0.0)
    t = _saddlepoint(cgf, x, bounds)
    if math.isinf(t):
        return -math.inf if t < 0 else 0.0
    k, _, k2 = cgf(t)
    w = math.copysign(math.sqrt(max(2 * (t * x - k), 0.0)), t)
    u = t * math.sqrt(k2)
    if abs(w) < 1e-5 or abs(u) < 1e-8:
        return float(torch.special.log_ndtr(torch.tensor((x - mean) / math.sqrt(var), dtype=torch.float64)))
    log_phi = -0.5 * w * w - 0.5 * math.log(2 * math.pi)
    log_cdf = float(torch.special.log_ndtr(torch.tensor(w, dtype=torch.float64)))
    if w > 0:
        return math.log(min(max(math.exp(log_cdf) + math.exp(log_phi) * (1 / w - 1 / u), 0.0), 1.0))
    correction = math.exp(log_cdf - log_phi) + 1 / w - 1 / u  # Mills ratio + 1/w - 1/u > 0 in the tail
    return log_phi + math.log(correction) if correction > 0 else log_cdf


def _quadratic_cgf(c0: np.ndarray, alpha: np.ndarray, beta: np.ndarray, copies: int) -> tuple[_Cgf, tuple]:
    """CGF of ``copies x sum_i (c0_i + alpha_i e_i + beta_i e_i^2)`` and its domain ``1 - 2 beta_i t > 0``."""
    pos, neg = beta[beta > 0], beta[beta < 0]
    bounds = (float((0.5 / neg).max()) if neg.size else -math.inf,
              float((0.5 / pos).min()) if pos.size else math.inf)
    a2 = alpha**2

    def cgf(t: float) -> tuple[float, float, float]:
        u = 1 - 2 * beta * t
        k = t * c0 + 0.5 * t * t * a2 / u - 0.5 * np.log(u)
        k1 = c0 + a2 * t * (1 - beta * t) / u**2 + beta / u
        k2 = a2 / u**3 + 2 * beta**2 / u**2
        return copies * float(k.sum()), copies * float(k1.sum()), copies * float(k2.sum())

    return cgf, bounds


def _as_float64(value: object, name: str) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    try:
        out = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be numeric (a float, an array or a Tensor)") from err
    if not np.isfinite(out).all():
        raise ValueError(f"{name} must be finite")
    return out


def prob_negative_gaussian(
    name: str, sigma_ratio: object, offset: object = 0.0, frames: int = 1, method: str = "saddlepoint",
    log: bool = False,
) -> float:
    """P(batch loss < 0) for a Gaussian prior: the loss sums estimator ``name`` (:data:`QUADRATIC_ESTIMATORS`)
    over ``frames`` frames, each frame holding one element per entry of ``sigma_ratio`` (e.g. ``(C,)``
    per-channel ``sigma_q / sigma_p``) with standardised offsets ``offset = (m_q - m_p) / sigma_p``
    (broadcast with it). Every element is a quadratic form in Gaussian noise (:func:`quadratic_form`), so the
    sum's CGF is exact: ``method="saddlepoint"`` gives the Lugannani-Rice tail (relative error O(1 /
    elements)), ``"normal"`` ``Phi(-mean / sd)`` with the exact mean and sd. ``log``: return ``log P``
    (tails below 1e-308 do not underflow). The sign of the batch loss per frame is that of the sum.
    """
    check_positive_ints(frames=frames)
    if method not in ("saddlepoint", "normal"):
        raise ValueError(f"method must be 'saddlepoint' or 'normal', got {method!r}")
    a, b = np.broadcast_arrays(_as_float64(sigma_ratio, "sigma_ratio"), _as_float64(offset, "offset"))
    if a.size == 0 or not (a > 0).all():
        raise ValueError("sigma_ratio must be non-empty and positive")
    shape = (1, a.size)
    tensors = [torch.tensor(v.reshape(shape)) for v in (b, np.log(a))]
    c0, alpha, beta = (v.reshape(-1).numpy() for v in quadratic_form(name, *tensors, *map(torch.zeros_like,
                                                                                               tensors)))
    cgf, bounds = _quadratic_cgf(c0, alpha, beta, frames)
    if method == "normal":
        _, mean, var = cgf(0.0)
        if var == 0:
            log_p = 0.0 if mean < 0 else -math.inf
        else:
            log_p = float(torch.special.log_ndtr(torch.tensor(-mean / math.sqrt(var), dtype=torch.float64)))
    elif not (alpha.any() or beta.any()):  # a constant: the KL itself
        log_p = 0.0 if c0.sum() < 0 else -math.inf
    else:
        log_p = _log_lugannani_rice(cgf, 0.0, bounds)
    return log_p if log else math.exp(log_p)


def prob_negative_saddlepoint(values: object, weights: object = None, n: int = 1, log: bool = False) -> float:
    """P(sum of ``n`` i.i.d. copies of X < 0) by the Lugannani-Rice saddlepoint tail, for X taking
    ``values`` with probabilities ``weights`` (1-D, summing to 1; uniform when None). Pass quadrature nodes
    and weights for a known one-utterance distribution, or measured draws for an empirical saddlepoint
    (then tails beyond the draws' range come out 0). ``log``: return ``log P``.
    """
    check_positive_ints(n=n)
    x = _as_float64(values, "values").ravel()
    if x.size == 0:
        raise ValueError("values must not be empty")
    w = np.full(x.size, 1.0 / x.size) if weights is None else _as_float64(weights, "weights").ravel()
    if w.shape != x.shape or (w < 0).any() or not math.isclose(float(w.sum()), 1.0, rel_tol=1e-9):
        raise ValueError("weights must be non-negative, one per value, and sum to 1")
    log_w = np.log(np.where(w > 0, w, 1.0)) + np.where(w > 0, 0.0, -np.inf)

    def cgf(t: float) -> tuple[float, float, float]:
        s = log_w + t * x
        top = s.max()
        p = np.exp(s - top)
        total = p.sum()
        p /= total
        m1 = float(p @ x)
        return n * (float(top) + math.log(total)), n * m1, n * float(p @ (x - m1) ** 2)

    if x[w > 0].min() >= 0:
        log_p = -math.inf
    elif x[w > 0].max() < 0:
        log_p = 0.0
    else:
        log_p = _log_lugannani_rice(cgf, 0.0, (-math.inf, math.inf))
    return log_p if log else math.exp(log_p)
