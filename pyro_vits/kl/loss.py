"""VITS's KL loss: VITS's own ``kl_loss`` (:func:`vits_kl`) and a drop-in function for it with any KL
estimator and extra KL particles through the flow only.

In VITS's ``train.py`` (``z, z_p, m_p, logs_p, m_q, logs_q`` come out of ``net_g``, ``z_mask`` is the
spectrogram mask) the KL line changes from ``kl_loss(z_p, logs_q, m_p, logs_p, z_mask)`` to::

    from pyro_vits.kl.loss import vits_kl_loss
    loss_kl = vits_kl_loss(z, m_q, logs_q, m_p, logs_p, z_mask, net_g.module.flow,
                           kl_particles=8) * hps.train.c_kl

(``g=net_g.module.emb_g(speakers).unsqueeze(-1)`` for a multi-speaker model). The decoder, HiFi-GAN and the
discriminators still use the one ``z``; the ``K - 1`` extra draws of ``z ~ q`` only pass through the prior
flow, in one vectorised call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._masks import check_mask
from .._validate import check_positive_ints
from ..distributions.flow_prior import FlowPrior
from ..distributions.transforms import VITSFlow
from ..flows import ResidualCouplingBlock
from ._common import _same_event, _tensor
from .estimators import KL_ESTIMATORS, kl_estimate

__all__ = ["vits_kl", "vits_kl_loss", "draw_posterior"]


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


def draw_posterior(m_q: Tensor, logs_q: Tensor, z_mask: Tensor, num: int) -> Tensor:
    """``num`` reparameterised draws ``z = (m_q + eps exp(logs_q)) z_mask`` (VITS's posterior sample,
    ``eps`` from the global RNG): ``(..., C, T) -> (num, ..., C, T)``."""
    check_positive_ints(num=num)
    shape = (num,) + torch.broadcast_shapes(m_q.shape, logs_q.shape)
    eps = torch.randn(shape, dtype=m_q.dtype, device=m_q.device)
    return (m_q + eps * torch.exp(logs_q)) * z_mask


def vits_kl_loss(
    z: Tensor,
    m_q: Tensor,
    logs_q: Tensor,
    m_p: Tensor,
    logs_p: Tensor,
    z_mask: Tensor,
    flow: ResidualCouplingBlock | VITSFlow,
    g: Tensor | None = None,
    estimator: str = "vits",
    kl_particles: int = 1,
) -> Tensor:
    """VITS's normalised KL loss, a 0-d tensor in nats per valid frame (batch sum / ``z_mask.sum()``).

    ``z``: the posterior sample VITS already drew, ``(B, C, T)`` (any ``(..., C, T)``); ``m_q, logs_q`` its
    posterior and ``m_p, logs_p`` the (duration-expanded) prior statistics, all ``(..., C, T)``;
    ``z_mask (..., 1, T)``; ``flow`` VITS's prior flow (``net_g.flow``); ``g (..., gin, 1)`` or None.
    ``estimator``: ``"vits"`` (VITS's formula on ``z_p = flow(z)``, minus the flow's log-determinant, which is
    exactly 0 for VITS's mean-only couplings) or any other
    :data:`~pyro_vits.kl.estimators.KL_ESTIMATORS` name of :func:`~pyro_vits.kl.estimators.kl_estimate` (with the
    :class:`~pyro_vits.distributions.flow_prior.FlowPrior` of these statistics). ``kl_particles = K``: the estimate is averaged
    over ``z`` and ``K - 1`` more draws from
    ``q`` (:func:`draw_posterior`), all through the flow in one call; unbiased for any ``K``, gradients
    reach ``m_q``, ``logs_q``, the prior statistics and the flow. With ``estimator="vits"``, ``K = 1`` and
    a mean-only flow the result is VITS's ``kl_loss(flow(z, z_mask, g=g), logs_q, m_p, logs_p, z_mask)``
    bit for bit.
    """
    check_positive_ints(kl_particles=kl_particles)
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    if isinstance(flow, VITSFlow):
        flow = flow.flow
    if not isinstance(flow, ResidualCouplingBlock):
        raise TypeError(f"flow must be a ResidualCouplingBlock or VITSFlow, got {type(flow).__name__}")
    for name, value in (("z", z), ("m_q", m_q), ("logs_q", logs_q), ("m_p", m_p), ("logs_p", logs_p)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")
        if value.dim() < 2 or value.shape[-2:] != z.shape[-2:]:
            raise ValueError(f"{name} must have shape (..., C, T) = (..., {z.shape[-2]}, {z.shape[-1]}) "
                             f"like z, got {tuple(value.shape)}")
    z_mask = check_mask(z_mask, z, "z_mask")
    zs = z if kl_particles == 1 else torch.cat([z.unsqueeze(0), draw_posterior(m_q, logs_q, z_mask,
                                                                              kl_particles - 1)])
    if estimator == "vits":
        z_p, logdet = flow.forward_and_logdet(zs, z_mask, g)
        loss = vits_kl(z_p, logs_q, m_p, logs_p, z_mask)
        if not flow.mean_only:
            loss = loss - logdet.sum() / z_mask.sum()
    else:
        prior = FlowPrior(m_p, logs_p, flow, z_mask, g, validate_args=False)
        loss = kl_estimate(estimator, zs, m_q, logs_q, prior, z_mask).sum() / z_mask.sum()
    return loss if kl_particles == 1 else loss / kl_particles
