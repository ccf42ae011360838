"""A Normal over ``(..., C, T)`` latents whose padded frames contribute exactly 0."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .masked_loc_scale import MaskedLocScale

__all__ = ["MaskedNormal"]


class MaskedNormal(MaskedLocScale):
    """Diagonal Normal over ``(..., C, T)`` with event shape ``(C, T)`` and a frame mask ``(..., 1, T)``.

    Padded frames contribute exactly 0 to ``log_prob`` and ``entropy``, and samples there are exactly 0.
    ``log_prob``, ``entropy``, ``rsample``, ``mean``, ``variance``, ``expand``: see
    :class:`~pyro_vits.distributions.masked_loc_scale.MaskedLocScale`.
    """

    standard_entropy = 0.5 * math.log(2 * math.pi * math.e)
    standard_variance = 1.0

    def _log_density(self, z: Tensor, log_scale: Tensor) -> Tensor:
        return -0.5 * z * z - log_scale - 0.5 * math.log(2 * math.pi)

    def _standard(self, shape: torch.Size) -> Tensor:
        return torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
