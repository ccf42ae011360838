"""VITS's prior with its monotonic alignment chosen per draw (MAS on ``z_p``): the one aligned flow prior."""

from __future__ import annotations

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor

from ..flows import ResidualCouplingBlock
from ..nn.alignment import attention_mask, even_alignment, expand_prior, maximum_path, neg_cent
from .flow_prior import FlowPrior
from .masked_normal import MaskedNormal


def _flat(value: Tensor, lead: torch.Size) -> Tensor:
    """``value (..., A, B)`` broadcast to ``lead + (A, B)`` and flattened to ``(-1, A, B)``."""
    return value.expand(lead + value.shape[-2:]).reshape((-1,) + value.shape[-2:])


class DrawAlignedPrior:
    """The frame-level prior of :class:`AlignedFlowPrior` for given draws ``z (..., C, T)``: each draw's own
    MAS ``path (..., T, L)``, the statistics it expands to, ``m_p, logs_p (..., C, T)``, ``mask``, ``g``, and
    ``log_prob(z)`` (nats per utterance) computed with the flow pass that chose the alignment. Another value
    goes through :class:`~pyro_vits.distributions.flow_prior.FlowPrior` under these statistics. It is what
    VITS's ``kl_loss`` reads (its ``m_p, logs_p`` after ``attn``), so KL estimators that need the prior's
    scales take it. ``path (..., T, L)``, when given, replaces the draws' own alignments (broadcast over
    the draws): e.g. one draw's path shared by further draws."""

    def __init__(self, z: Tensor, prior: AlignedFlowPrior, path: Tensor | None = None) -> None:
        z_p, logdet = prior.flow.forward_and_logdet(z, prior.mask, prior.g)
        self.path = prior.alignment(z_p) if path is None else path.expand(z.shape[:-2] + path.shape[-2:])
        self.m_p, self.logs_p = prior.expanded(self.path)
        self.mask, self.g, self._flow, self._z = prior.mask, prior.g, prior.flow, z
        base = MaskedNormal(self.m_p, torch.exp(self.logs_p), self.mask, validate_args=False)
        self._log_prob = base.log_prob(z_p) + logdet

    def log_prob(self, value: Tensor) -> Tensor:
        if value is self._z:
            return self._log_prob
        return FlowPrior(self.m_p, self.logs_p, self._flow, self.mask, self.g, validate_args=False).log_prob(value)


class AlignedFlowPrior(TorchDistribution):
    """VITS's text-conditioned prior over ``z (..., C, T)``, event ``(C, T)``: the flow prior of the
    per-symbol statistics expanded by the alignment that ``z`` itself selects (see the module docstring).

    ``m_p, logs_p (..., C, L)`` per symbol with ``text_mask (..., 1, L)``; ``mask (..., 1, T)`` frames;
    ``g (..., gin, 1)`` or None. ``log_prob(z)`` runs the flow once: ``z_p = f(z)`` feeds both the alignment
    (detached) and ``log N(z_p; A m_p, A s_p) + log|det df/dz|`` (nats per utterance, padded frames 0).
    """

    arg_constraints: dict = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(self, m_p: Tensor, logs_p: Tensor, text_mask: Tensor, flow: ResidualCouplingBlock,
                 mask: Tensor, g: Tensor | None = None, validate_args: bool | None = None) -> None:
        if not isinstance(flow, ResidualCouplingBlock):
            raise TypeError(f"flow must be a ResidualCouplingBlock, got {type(flow).__name__}")
        if m_p.dim() < 2 or m_p.shape[-2] != flow.channels or logs_p.shape != m_p.shape:
            raise ValueError(f"m_p and logs_p must both have shape (..., C={flow.channels}, L), got "
                             f"{tuple(m_p.shape)} and {tuple(logs_p.shape)}")
        if text_mask.shape[-2:] != (1, m_p.shape[-1]) or mask.dim() < 2 or mask.shape[-2] != 1:
            raise ValueError(f"text_mask must be (..., 1, L={m_p.shape[-1]}) and mask (..., 1, T), got "
                             f"{tuple(text_mask.shape)} and {tuple(mask.shape)}")
        shapes = [m_p.shape[:-2], text_mask.shape[:-2], mask.shape[:-2]]
        shapes += [] if g is None else [g.shape[:-2]]
        batch_shape = torch.broadcast_shapes(*shapes)
        self.m_p, self.logs_p, self.text_mask, self.flow, self.mask, self.g = (
            m_p, logs_p, text_mask.to(m_p.dtype), flow, mask.to(m_p.dtype), g)
        event_shape = torch.Size((flow.channels, mask.shape[-1]))
        super().__init__(batch_shape, event_shape, validate_args=validate_args)

    def expand(self, batch_shape: torch.Size, _instance: AlignedFlowPrior | None = None) -> AlignedFlowPrior:
        new = self._get_checked_instance(AlignedFlowPrior, _instance)
        batch_shape = torch.Size(batch_shape)
        for name in ("m_p", "logs_p", "text_mask", "mask"):
            value = getattr(self, name)
            setattr(new, name, value.expand(batch_shape + value.shape[-2:]))
        new.g = None if self.g is None else self.g.expand(batch_shape + self.g.shape[-2:])
        new.flow = self.flow
        super(AlignedFlowPrior, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def scores(self, z_p: Tensor) -> tuple[Tensor, Tensor]:
        """MAS's inputs for ``z_p (..., C, T)``: VITS's scores ``neg_cent(z_p, m_p, logs_p)`` (frame ``t``,
        symbol ``l``: ``log N(z_p[:, t]; m_p[:, l], exp(logs_p[:, l]))`` summed over channels, nats, no
        gradient, in the dtype ``z_p`` and ``m_p`` promote to) and the 0/1 valid-pair mask, each
        ``(..., T, L)`` with leading dims broadcast with the batch shape."""
        lead = torch.broadcast_shapes(z_p.shape[:-2], self.batch_shape)
        dtype = torch.promote_types(z_p.dtype, self.m_p.dtype)
        with torch.no_grad():
            cent = neg_cent(*(_flat(x.detach().to(dtype), lead) for x in (z_p, self.m_p, self.logs_p)))
            pairs = attention_mask(_flat(self.text_mask, lead), _flat(self.mask, lead))
        return cent.reshape(lead + cent.shape[-2:]), pairs.reshape(lead + pairs.shape[-2:])

    def alignment(self, z_p: Tensor) -> Tensor:
        """VITS's hard alignment for ``z_p (..., C, T)``: ``maximum_path`` of :meth:`scores`, a 0/1
        ``(..., T, L)`` tensor of ``m_p``'s dtype (leading dims broadcast with the batch shape)."""
        cent, pairs = self.scores(z_p)
        path = maximum_path(cent.reshape((-1,) + cent.shape[-2:]), pairs.reshape((-1,) + pairs.shape[-2:]))
        return path.reshape(cent.shape).to(self.m_p.dtype)

    def expanded(self, path: Tensor) -> tuple[Tensor, Tensor]:
        """Per-frame ``(m_p, logs_p)``, each ``(..., C, T)``, along ``path (..., T, L)``."""
        lead = torch.broadcast_shapes(path.shape[:-2], self.batch_shape)
        m, logs = expand_prior(_flat(path, lead), _flat(self.m_p, lead), _flat(self.logs_p, lead))
        return m.reshape(lead + m.shape[-2:]), logs.reshape(lead + logs.shape[-2:])

    def aligned(self, path: Tensor) -> FlowPrior:
        """The :class:`~pyro_vits.distributions.flow_prior.FlowPrior` of the statistics expanded by ``path (..., T, L)``."""
        return FlowPrior(*self.expanded(path), self.flow, self.mask, self.g, validate_args=False)

    def log_prob(self, value: Tensor) -> Tensor:
        if value.shape[-2:] != self.event_shape:
            raise ValueError(f"z must have shape (..., {self.event_shape[0]}, {self.event_shape[1]}), got "
                             f"{tuple(value.shape)}")
        return self.for_draws(value).log_prob(value)

    def for_draws(self, z: Tensor, path: Tensor | None = None) -> DrawAlignedPrior:
        """The frame-level prior each draw of ``z (..., C, T)`` selects (:class:`DrawAlignedPrior`), or the
        one ``path (..., T, L)`` gives."""
        return DrawAlignedPrior(z, self, path)

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        """A prior draw with the symbols spread evenly over the frames (:func:`even_alignment`)."""
        return self.aligned(even_alignment(self.mask, self.text_mask)).rsample(sample_shape)
