"""The VITS flow prior as a Pyro ``TransformedDistribution`` and the masked Normal it is built on."""

from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution, TransformedDistribution, constraints
from torch import Tensor
from torch.distributions import Distribution

from .flows import ResidualCouplingBlock
from .transforms import CosFlow, FlowTransform, VITSFlow

__all__ = ["MaskedNormal", "FlowPrior", "CosFlowPrior", "check_mask"]

_HALF_LOG_2PI_E = 0.5 * math.log(2 * math.pi * math.e)


def check_mask(mask: Tensor, like: Tensor, name: str = "mask") -> Tensor:
    """Validate a 0/1 mask of shape ``(..., 1, T)`` against ``like (..., C, T)``; returns it as float."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(mask).__name__}")
    if mask.dim() < 2 or mask.shape[-2] != 1 or mask.shape[-1] != like.shape[-1]:
        raise ValueError(f"{name} must have shape (..., 1, T={like.shape[-1]}), got {tuple(mask.shape)}")
    mask = mask.to(like.dtype)
    if not torch.jit.is_tracing() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must contain only 0 and 1")
    return mask


def _broadcast_batch(shape: torch.Size, other: torch.Size, name: str) -> torch.Size:
    try:
        return torch.broadcast_shapes(shape, other)
    except RuntimeError as err:
        raise ValueError(
            f"the leading dims {tuple(other)} of {name} do not broadcast with the batch shape {tuple(shape)}"
        ) from err


def _check_event(value: Tensor, event_shape: torch.Size, name: str) -> None:
    """``value`` must be a tensor ending in the event shape ``(C, T)``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")
    if value.shape[-2:] != event_shape:
        raise ValueError(f"{name} must have shape (..., C, T) = (..., {', '.join(map(str, event_shape))}), "
                         f"got {tuple(value.shape)}")


class MaskedNormal(TorchDistribution):
    """Diagonal Normal over ``(..., C, T)`` with event shape ``(C, T)`` and a frame mask ``(..., 1, T)``.

    Padded frames contribute exactly 0 to ``log_prob`` and ``entropy``, and samples there are exactly 0.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(
        self, loc: Tensor, scale: Tensor, mask: Tensor | None = None, validate_args: bool | None = None
    ) -> None:
        if loc.dim() < 2:
            raise ValueError(f"loc must have shape (..., C, T), got {tuple(loc.shape)}")
        loc, scale = torch.broadcast_tensors(loc, scale)
        if mask is None:
            mask = loc.new_ones(loc.shape[:-2] + (1, loc.shape[-1]))
        elif validate_args or (validate_args is None and Distribution._validate_args):
            mask = check_mask(mask, loc)  # a data-dependent scan: a host sync on CUDA, so only when validating
        self.loc, self.scale, self.mask = loc, scale, mask.to(loc.dtype)
        batch_shape = _broadcast_batch(loc.shape[:-2], mask.shape[:-2], "mask")
        super().__init__(batch_shape, loc.shape[-2:], validate_args=validate_args)

    def expand(self, batch_shape: torch.Size, _instance: MaskedNormal | None = None) -> MaskedNormal:
        new = self._get_checked_instance(MaskedNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new.scale = self.scale.expand(batch_shape + self.event_shape)
        new.mask = self.mask.expand(batch_shape + (1, self.event_shape[-1]))
        super(MaskedNormal, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> Tensor:
        """``loc`` ``(..., C, T)``, 0 on padded frames."""
        return self.loc * self.mask

    @property
    def variance(self) -> Tensor:
        """``scale^2`` ``(..., C, T)``, 0 on padded frames."""
        return self.scale.pow(2) * self.mask

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        """Reparameterised draws ``sample_shape + batch_shape + (C, T)``, exactly 0 on padded frames."""
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return (self.loc + self.scale * eps) * self.mask

    def log_prob(self, value: Tensor) -> Tensor:
        """``value (..., C, T) -> (...)``: nats per utterance, summed over the valid frames."""
        _check_event(value, self.event_shape, "value")
        if self._validate_args:
            self._validate_sample(value)
        z = (value - self.loc) / self.scale
        elem = -0.5 * z * z - torch.log(self.scale) - 0.5 * math.log(2 * math.pi)
        return torch.where(self.mask > 0, elem, 0.0).sum((-2, -1))

    def entropy(self) -> Tensor:
        """``batch_shape``: nats per utterance, summed over the valid frames."""
        elem = torch.log(self.scale) + _HALF_LOG_2PI_E
        return torch.where(self.mask > 0, elem, 0.0).sum((-2, -1)).expand(self.batch_shape)


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
    """``p(z) = N(f(z); m_p, exp(logs_p))`` with ``f`` = :class:`~pyro_vits.transforms.CosFlow`, event
    ``(2, T)``: a unit-Jacobian flow prior that is not Gaussian (``a = 0``: the Gaussian base itself).

    Mirrors :class:`~pyro_vits.prior.FlowPrior` (attributes ``m_p, logs_p, mask, g (None), flow``);
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
