"""Pyro transform wrappers of the VITS flow (event_dim=2, leading dims, masks, cached logdet)."""

from __future__ import annotations

import math
import numbers

import torch
from pyro.distributions import constraints
from pyro.distributions.conditional import ConditionalTransformModule
from torch import Tensor
from torch.distributions import Transform

from ..flows import ResidualCouplingBlock

__all__ = ["FlowTransform", "VITSFlow", "CosFlow"]


class FlowTransform(Transform):
    """The flow's training direction ``f: z (..., C, T) -> z_p`` conditioned on ``mask``/``g``.

    ``log_abs_det_jacobian(z, z_p)`` has shape ``(...)``; it is an exact zero tensor for mean-only
    couplings, and otherwise reuses the value computed by the last call in either direction.
    Use ``.inv`` for VITS's inference direction ``z_p -> z``.
    """

    domain = constraints.independent(constraints.real, 2)
    codomain = constraints.independent(constraints.real, 2)
    bijective = True

    def __init__(
        self,
        flow: ResidualCouplingBlock,
        mask: Tensor | None = None,
        g: Tensor | None = None,
        cache_size: int = 1,
    ) -> None:
        if not isinstance(flow, ResidualCouplingBlock):
            raise TypeError(f"flow must be a ResidualCouplingBlock, got {type(flow).__name__}")
        super().__init__(cache_size=cache_size)
        self.flow = flow
        self.mask = mask
        self.g = g
        self._cached_ldj: tuple[Tensor, Tensor, Tensor] | None = None

    def with_cache(self, cache_size: int = 1) -> FlowTransform:
        if self._cache_size == cache_size:
            return self
        return FlowTransform(self.flow, self.mask, self.g, cache_size=cache_size)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, FlowTransform)
            and other.flow is self.flow
            and other.mask is self.mask
            and other.g is self.g
        )

    def _call(self, x: Tensor) -> Tensor:
        y, ldj = self.flow.forward_and_logdet(x, self.mask, self.g)
        self._cached_ldj = (x, y, ldj)
        return y

    def _inverse(self, y: Tensor) -> Tensor:
        x, neg_ldj = self.flow.forward_and_logdet(y, self.mask, self.g, reverse=True)
        self._cached_ldj = (x, y, -neg_ldj)
        return x

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """``log|det dy/dx|`` of ``x, y (..., C, T)``: ``(...)`` nats per utterance (valid frames only)."""
        if self.flow.mean_only:
            lead = x.shape[:-2]
            for extra in (self.mask, self.g):
                if extra is not None:
                    lead = torch.broadcast_shapes(lead, extra.shape[:-2])
            return x.new_zeros(lead)
        cached = self._cached_ldj
        if cached is not None and cached[0] is x and cached[1] is y:
            return cached[2]
        return self.flow.forward_and_logdet(x, self.mask, self.g)[1]


class VITSFlow(ConditionalTransformModule):
    """Pyro conditional transform module owning a :class:`ResidualCouplingBlock` (as ``.flow``).

    ``VITSFlow(block).condition(g, mask=mask)`` returns the :class:`FlowTransform` ``z -> z_p``.
    """

    def __init__(self, flow: ResidualCouplingBlock) -> None:
        if not isinstance(flow, ResidualCouplingBlock):
            raise TypeError(f"flow must be a ResidualCouplingBlock, got {type(flow).__name__}")
        super().__init__()
        self.flow = flow

    def condition(self, context: Tensor | None = None, mask: Tensor | None = None) -> FlowTransform:
        """``context``: speaker embedding ``g (..., gin, 1)`` or None; ``mask (..., 1, T)``."""
        return FlowTransform(self.flow, mask=mask, g=context)


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
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not math.isfinite(a):
            raise ValueError(f"a must be a finite real number, got {a!r}")
        if mask is not None and (not isinstance(mask, Tensor) or mask.dim() < 2 or mask.shape[-2] != 1):
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask must be None or a Tensor of shape (..., 1, T), got {got}")
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
        """Exact zeros ``(...)`` for ``x, y (..., 2, T)`` (unit Jacobian)."""
        if self.mask is None:
            return x.new_zeros(x.shape[:-2])
        return x.new_zeros(torch.broadcast_shapes(x.shape[:-2], self.mask.shape[:-2]))
