"""The quadratic-form view of the Gaussian-prior estimators (``vits``, ``mc``, ``control_variate``): per-element
coefficients in the noise and the exact variance they give."""

from __future__ import annotations

import torch
from torch import Tensor

from .._masks import check_mask
from ._common import _masked_sum, _same_event, _tensor
from .estimators import ESTIMATORS, QUADRATIC_ESTIMATORS

__all__ = ["quadratic_form", "analytic_variance", "analytic_variances"]


def quadratic_form(
    name: str, m_q: Tensor, logs_q: Tensor, m_p: Tensor, logs_p: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Per-element coefficients ``(c0, alpha, beta)`` of a Gaussian-prior (identity-flow) estimator as a
    quadratic form in its noise: ``X = c0 + alpha e + beta e^2``, ``e ~ N(0, 1)``; inputs broadcast
    ``(..., C, T)``, outputs of the broadcast shape; nats per element. Names:
    :data:`~pyro_vits.kl.estimators.QUADRATIC_ESTIMATORS` (each estimator's ``quadratic`` method).

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
    return torch.broadcast_tensors(*ESTIMATORS[name].quadratic(m_q, logs_q, m_p, logs_p))


def analytic_variance(
    name: str, m_q: Tensor, logs_q: Tensor, m_p: Tensor, logs_p: Tensor, mask: Tensor | None = None
) -> Tensor:
    """Variance of estimator ``name`` (:data:`~pyro_vits.kl.estimators.QUADRATIC_ESTIMATORS`) per utterance
    for Gaussian ``q`` and ``p`` (identity flow): ``sum_valid alpha^2 + 2 beta^2`` (:func:`quadratic_form`;
    elements are independent); inputs ``(..., C, T)``, ``mask (..., 1, T)``; returns ``(...)`` nats^2.

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
