"""A Normal over ``(..., C, T)`` latents whose padded frames contribute exactly 0."""

from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor
from torch.distributions import Distribution

from .._masks import check_mask

_HALF_LOG_2PI_E = 0.5 * math.log(2 * math.pi * math.e)


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
