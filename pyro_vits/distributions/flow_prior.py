"""The VITS flow prior as a Pyro ``TransformedDistribution`` and the masked Normal it is built on."""

from __future__ import annotations

import torch
from pyro.distributions import TransformedDistribution
from torch import Tensor

from ..flows import ResidualCouplingBlock
from .masked_loc_scale import _broadcast_batch, _check_event
from .masked_normal import MaskedNormal
from .transforms import CosFlow, FlowTransform, VITSFlow


class FlowPrior(TransformedDistribution):
    """VITS prior ``p(z) = N(f(z); m_p, exp(logs_p)) |det df/dz|`` over ``(..., C, T)``, event ``(C, T)``.

    ``rsample()`` runs the flow in reverse (VITS inference, ``z_p -> z``); ``log_prob(z)`` runs it
    forward once. Padded frames (``mask == 0``) contribute exactly 0. ``flow`` is a
    :class:`ResidualCouplingBlock` or a :class:`VITSFlow`; ``g`` is ``(..., gin, 1)`` or None.
    """

    arg_constraints: dict = {}

    def __init__(
        self,
        m_p: Tensor,
        logs_p: Tensor,
        flow: ResidualCouplingBlock | VITSFlow,
        mask: Tensor | None = None,
        g: Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        if isinstance(flow, VITSFlow):
            flow = flow.flow
        if not isinstance(flow, ResidualCouplingBlock):
            raise TypeError(f"flow must be a ResidualCouplingBlock or VITSFlow, got {type(flow).__name__}")
        for name, value in (("m_p", m_p), ("logs_p", logs_p)):
            if not isinstance(value, Tensor):
                raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")
        if m_p.dim() < 2 or m_p.shape[-2] != flow.channels:
            raise ValueError(f"m_p must have shape (..., C={flow.channels}, T), got {tuple(m_p.shape)}")
        if logs_p.shape != m_p.shape:
            raise ValueError(f"logs_p must have the shape of m_p {tuple(m_p.shape)}, got {tuple(logs_p.shape)}")
        if g is not None and (flow.gin_channels == 0 or g.dim() < 2 or g.shape[-2:] != (flow.gin_channels, 1)):
            raise ValueError(
                f"g must have shape (..., gin={flow.gin_channels}, 1) for this flow, got {tuple(g.shape)}"
            )
        base = MaskedNormal(m_p, torch.exp(logs_p), mask, validate_args=validate_args)
        if g is not None:  # g's leading dims are batch dims of the prior too
            batch_shape = _broadcast_batch(base.batch_shape, g.shape[:-2], "g")
            if batch_shape != base.batch_shape:
                base = base.expand(batch_shape)
        self.m_p, self.logs_p, self.mask, self.g, self.flow = m_p, logs_p, base.mask, g, flow
        super().__init__(base, [FlowTransform(flow, base.mask, g).inv], validate_args=validate_args)

    def log_prob(self, value: Tensor) -> Tensor:
        """``z (..., C, T) -> (...)``: ``log N(f(z); m_p, exp(logs_p)) + log|det df/dz|`` in nats per
        utterance (valid frames only)."""
        _check_event(value, self.event_shape, "z")
        return super().log_prob(value)

    def expand(self, batch_shape: torch.Size, _instance: FlowPrior | None = None) -> FlowPrior:
        new = self._get_checked_instance(FlowPrior, _instance)
        new.m_p, new.logs_p, new.mask, new.g, new.flow = self.m_p, self.logs_p, self.mask, self.g, self.flow
        return super().expand(batch_shape, _instance=new)


class CosFlowPrior(TransformedDistribution):
    """``p(z) = N(f(z); m_p, exp(logs_p))`` with ``f`` = :class:`~pyro_vits.distributions.transforms.CosFlow`, event
    ``(2, T)``: a unit-Jacobian flow prior that is not Gaussian (``a = 0``: the Gaussian base itself).

    Mirrors :class:`~pyro_vits.distributions.flow_prior.FlowPrior` (attributes ``m_p, logs_p, mask, g (None), flow``);
    ``rsample`` draws ``z_p`` from the base and returns ``f^{-1}(z_p)``.
    """

    arg_constraints: dict = {}

    def __init__(
        self, m_p: Tensor, logs_p: Tensor, a: float = 1.0, mask: Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        for name, value in (("m_p", m_p), ("logs_p", logs_p)):
            if not isinstance(value, Tensor):
                raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")
        if m_p.dim() < 2 or m_p.shape[-2] != 2:
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
