"""The masked location-scale family over ``(..., C, T)``: the shape checks and masking that
:class:`~pyro_vits.distributions.masked_normal.MaskedNormal` and
:class:`~pyro_vits.distributions.masked_laplace.MaskedLaplace` share."""

from __future__ import annotations

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor
from torch.distributions import Distribution

from .._masks import check_mask

__all__ = ["MaskedLocScale"]


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


class MaskedLocScale(TorchDistribution):
    """``x = loc + scale * eps`` element-wise over ``(..., C, T)`` with ``eps`` a standard density ``f``,
    event shape ``(C, T)`` and a frame mask ``(..., 1, T)``.

    Padded frames contribute exactly 0 to ``log_prob`` and ``entropy``, and samples there are exactly 0. A
    family states ``f`` by :meth:`_log_density` (element-wise ``log f(z) - log scale``), :meth:`_standard`
    (draws of ``eps``), ``standard_entropy`` (nats) and ``standard_variance``.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True
    standard_entropy: float
    standard_variance: float

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

    def expand(self, batch_shape: torch.Size, _instance: MaskedLocScale | None = None) -> MaskedLocScale:
        new = self._get_checked_instance(type(self), _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new.scale = self.scale.expand(batch_shape + self.event_shape)
        new.mask = self.mask.expand(batch_shape + (1, self.event_shape[-1]))
        super(MaskedLocScale, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _log_density(self, z: Tensor, log_scale: Tensor) -> Tensor:
        """Element-wise ``log f(z) - log_scale`` (nats), ``z = (x - loc) / scale``."""
        raise NotImplementedError

    def _standard(self, shape: torch.Size) -> Tensor:
        """Draws of ``eps ~ f`` of ``shape`` (``loc``'s dtype and device)."""
        raise NotImplementedError

    @property
    def mean(self) -> Tensor:
        """``loc`` ``(..., C, T)``, 0 on padded frames."""
        return self.loc * self.mask

    @property
    def variance(self) -> Tensor:
        """``standard_variance * scale^2`` ``(..., C, T)``, 0 on padded frames."""
        return self.scale.pow(2) * self.standard_variance * self.mask

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        """Reparameterised draws ``sample_shape + batch_shape + (C, T)``, exactly 0 on padded frames."""
        eps = self._standard(self._extended_shape(sample_shape))
        return (self.loc + self.scale * eps) * self.mask

    def log_prob(self, value: Tensor) -> Tensor:
        """``value (..., C, T) -> (...)``: nats per utterance, summed over the valid frames."""
        _check_event(value, self.event_shape, "value")
        if self._validate_args:
            self._validate_sample(value)
        elem = self._log_density((value - self.loc) / self.scale, torch.log(self.scale))
        return torch.where(self.mask > 0, elem, 0.0).sum((-2, -1))

    def entropy(self) -> Tensor:
        """``batch_shape``: nats per utterance, summed over the valid frames."""
        elem = torch.log(self.scale) + self.standard_entropy
        return torch.where(self.mask > 0, elem, 0.0).sum((-2, -1)).expand(self.batch_shape)
