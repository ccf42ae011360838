"""A Laplace over ``(..., C, T)`` (e.g. a log-mel spectrogram) whose padded frames contribute exactly 0."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .masked_loc_scale import MaskedLocScale

__all__ = ["MaskedLaplace"]


class MaskedLaplace(MaskedLocScale):
    """Element-wise Laplace ``p(x) = exp(-|x - loc| / scale) / (2 scale)`` over ``(..., C, T)``, event shape
    ``(C, T)``, frame mask ``(..., 1, T)``: ``log_prob`` is ``-sum |x - loc| / scale - log(2 scale)`` over the
    valid frames (an L1 loss with weight ``1 / scale`` plus a constant).

    Padded frames contribute exactly 0 to ``log_prob`` and ``entropy``, and samples there are exactly 0.
    ``log_prob``, ``entropy``, ``rsample``, ``mean``, ``variance``, ``expand``: see
    :class:`~pyro_vits.distributions.masked_loc_scale.MaskedLocScale`.
    """

    standard_entropy = 1.0 + math.log(2.0)
    standard_variance = 2.0

    def _log_density(self, z: Tensor, log_scale: Tensor) -> Tensor:
        return -z.abs() - log_scale - math.log(2.0)

    def _standard(self, shape: torch.Size) -> Tensor:
        """Inverse-CDF draws from ``u ~ U(-1, 1)`` (as ``torch.distributions.Laplace``)."""
        u = torch.empty(shape, dtype=self.loc.dtype, device=self.loc.device)
        u.uniform_(torch.finfo(self.loc.dtype).eps - 1, 1)
        return -torch.sign(u) * torch.log1p(-u.abs())
