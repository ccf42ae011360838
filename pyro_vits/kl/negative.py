"""How often is the loss negative? Empirical ``P(X < 0)``, the normal approximation, and exact saddlepoint
tails (Lugannani-Rice) for a Gaussian prior's quadratic-form estimators and for known one-utterance laws."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .._validate import check_positive_ints
from .quadratic import quadratic_form

__all__ = ["prob_negative", "prob_negative_upper_bound", "format_negative_count",
           "prob_negative_normal_approx", "prob_negative_gaussian", "prob_negative_saddlepoint"]


def prob_negative(samples: Tensor | np.ndarray) -> tuple[float, float]:
    """Empirical ``P(X < 0)`` over all elements of ``samples`` and its binomial standard error."""
    if isinstance(samples, Tensor):
        samples = samples.detach().cpu().numpy()
    values = np.asarray(samples, dtype=float).ravel()
    if values.size == 0:
        raise ValueError("samples must not be empty")
    p = float(np.mean(values < 0))
    return p, math.sqrt(p * (1 - p) / values.size)


def prob_negative_upper_bound(count: int, total: int, level: float = 0.95) -> float:
    """One-sided (Clopper-Pearson) upper confidence bound on P(X < 0) when ``count`` of ``total`` independent
    draws were negative: the ``p`` with ``P(Binomial(total, p) <= count) = 1 - level`` (bisection on the
    exact binomial CDF). With ``count = 0`` it is ``1 - (1 - level)^(1 / total)`` (e.g. 0.031 for 0 of 96).
    Report it with the count whenever the count is 0: a zero count is not a zero probability."""
    check_positive_ints(total=total)
    if not (isinstance(count, int) and 0 <= count <= total) or not 0 < level < 1:
        raise ValueError(f"need 0 <= count <= total and 0 < level < 1, got {count}, {total}, {level}")
    if count == total:
        return 1.0
    if count == 0:
        return 1.0 - (1.0 - level) ** (1.0 / total)

    def cdf(p: float) -> float:
        log_terms = [math.lgamma(total + 1) - math.lgamma(k + 1) - math.lgamma(total - k + 1)
                     + k * math.log(p) + (total - k) * math.log1p(-p) for k in range(count + 1)]
        top = max(log_terms)
        return math.exp(top) * sum(math.exp(t - top) for t in log_terms)

    lo, hi = count / total, 1.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cdf(mid) > 1 - level else (lo, mid)
    return 0.5 * (lo + hi)


def format_negative_count(count: int, total: int, level: float = 0.95) -> str:
    """``count`` negatives of ``total`` draws as text: ``"3 / 96 = 0.031"``, and for a zero count its
    :func:`prob_negative_upper_bound`, ``"0 / 96 (P ≤ 0.031, 95 % bound)"``."""
    bound = prob_negative_upper_bound(count, total, level)
    if count:
        return f"{count} / {total} = {count / total:.3g}"
    return f"0 / {total} (P ≤ {bound:.2g}, {100 * level:g} % bound)"


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
    """P(batch loss < 0) for a Gaussian prior: the loss sums estimator ``name``
    (:data:`~pyro_vits.kl.estimators.QUADRATIC_ESTIMATORS`) over ``frames`` frames, each frame holding one
    element per entry of ``sigma_ratio`` (e.g. ``(C,)`` per-channel ``sigma_q / sigma_p``) with standardised
    offsets ``offset = (m_q - m_p) / sigma_p`` (broadcast with it). Every element is a quadratic form in
    Gaussian noise (:func:`~pyro_vits.kl.quadratic.quadratic_form`), so the sum's CGF is exact:
    ``method="saddlepoint"`` gives the Lugannani-Rice tail (relative error O(1 / elements)), ``"normal"``
    ``Phi(-mean / sd)`` with the exact mean and sd. ``log``: return ``log P`` (tails below 1e-308 do not
    underflow). The sign of the batch loss per frame is that of the sum.
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
