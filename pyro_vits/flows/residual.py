"""VITS's residual coupling flow, with VITS's parameter names.

Shapes: latents ``(..., C, T)`` with any number of leading batch dims, masks ``(..., 1, T)``
(1 = real frame, broadcast against the leading dims), speaker conditioning ``g`` ``(..., gin, 1)``.
The direction ``z -> z_p`` (``reverse=False``) is VITS's training direction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._validate import check_nonnegative_ints, check_positive_ints
from ..nn.wavenet import WN


class AffineCoupling(nn.Module):
    """Coupling ``x = [x0, x1] -> [x0, m(x0) + x1 * exp(logs(x0))]`` on ``(N, C, T)``; returns
    ``(y, logdet (N,))``.

    Subclasses build the conditioner :meth:`stats` (``(N, C/2, T) -> (N, C/2 * (2 - mean_only), T)``, masked)
    ending in the zero-initialised 1x1 convolution ``post``. ``mean_only=True``: ``logs = 0`` (volume
    preserving, logdet exactly 0); otherwise logdet is the sum of the valid ``logs`` (negated in reverse).
    """

    def __init__(self, channels: int, mean_only: bool) -> None:
        super().__init__()
        if channels % 2 != 0:
            raise ValueError(f"channels must be even (the coupling splits them in halves), got {channels}")
        self.half_channels = channels // 2
        self.mean_only = mean_only

    def _post_conv(self, in_channels: int) -> nn.Conv1d:
        """The zero-initialised ``post`` from ``in_channels`` to the ``C/2 * (2 - mean_only)`` stats."""
        return zero_conv1x1(in_channels, self.half_channels * (1 if self.mean_only else 2))

    def stats(self, x0: Tensor, x_mask: Tensor, g: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward(
        self, x: Tensor, x_mask: Tensor, g: Tensor | None = None, reverse: bool = False
    ) -> tuple[Tensor, Tensor]:
        x0, x1 = torch.split(x, [self.half_channels] * 2, 1)
        stats = self.stats(x0, x_mask, g)
        if self.mean_only:
            x1 = (x1 - stats) * x_mask if reverse else stats + x1 * x_mask
            logdet = x.new_zeros(x.shape[0])
        else:
            m, logs = torch.split(stats, [self.half_channels] * 2, 1)
            if reverse:
                x1 = (x1 - m) * torch.exp(-logs) * x_mask
            else:
                x1 = m + x1 * torch.exp(logs) * x_mask
            logdet = torch.sum(logs, [1, 2])
            if reverse:
                logdet = -logdet
        return torch.cat([x0, x1], 1), logdet


def zero_conv1x1(in_ch: int, out_ch: int) -> nn.Conv1d:
    """The 1x1 ``post`` convolution, zero-initialised so that a fresh coupling is the identity."""
    conv = nn.Conv1d(in_ch, out_ch, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ResidualCouplingLayer(AffineCoupling):
    """VITS residual coupling layer: ``stats = post(WN(pre(x0) * mask, g)) * mask``."""

    def __init__(
        self,
        channels: int,
        hidden_channels: int,
        kernel_size: int,
        dilation_rate: int,
        n_layers: int,
        gin_channels: int = 0,
        mean_only: bool = True,
    ) -> None:
        super().__init__(channels, mean_only)
        self.pre = nn.Conv1d(self.half_channels, hidden_channels, 1)
        self.enc = WN(hidden_channels, kernel_size, dilation_rate, n_layers, gin_channels=gin_channels)
        self.post = self._post_conv(hidden_channels)

    def stats(self, x0: Tensor, x_mask: Tensor, g: Tensor | None) -> Tensor:
        h = self.enc(self.pre(x0) * x_mask, x_mask, g=g)
        return self.post(h) * x_mask


class Flip(nn.Module):
    """Reverses the channel order; ``(N, C, T) -> ((N, C, T), zeros (N,))``."""

    def forward(
        self, x: Tensor, x_mask: Tensor | None = None, g: Tensor | None = None, reverse: bool = False
    ) -> tuple[Tensor, Tensor]:
        return torch.flip(x, [1]), x.new_zeros(x.shape[0])


def flatten_leading(
    x: Tensor, x_mask: Tensor, g: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None, torch.Size]:
    """Broadcast mask/g against ``x (..., C, T)`` and flatten the leading dims to one batch dim."""
    if x.dim() < 2:
        raise ValueError(f"x must have shape (..., C, T), got {tuple(x.shape)}")
    if x_mask.dim() < 2 or x_mask.shape[-2] != 1 or x_mask.shape[-1] != x.shape[-1]:
        raise ValueError(f"x_mask must have shape (..., 1, T={x.shape[-1]}), got {tuple(x_mask.shape)}")
    lead = torch.broadcast_shapes(x.shape[:-2], x_mask.shape[:-2])
    if g is not None:
        if g.dim() < 2 or g.shape[-1] != 1:
            raise ValueError(f"g must have shape (..., gin, 1), got {tuple(g.shape)}")
        lead = torch.broadcast_shapes(lead, g.shape[:-2])
        g = g.expand(lead + g.shape[-2:]).reshape((-1,) + g.shape[-2:])
    x = x.expand(lead + x.shape[-2:]).reshape((-1,) + x.shape[-2:])
    x_mask = x_mask.to(x.dtype).expand(lead + x_mask.shape[-2:]).reshape((-1, 1, x.shape[-1]))
    return x, x_mask, g, lead


class ResidualCouplingBlock(nn.Module):
    """VITS prior flow f: ``n_flows`` x [ResidualCouplingLayer, Flip] on ``(..., C, T)``.

    ``forward(x, x_mask, g, reverse)`` returns ``y`` like VITS; ``forward_and_logdet`` also returns
    ``log|det dy/dx|`` over the valid frames, of shape ``(...)`` (exact zeros when ``mean_only``).

    This class is also the base of every prior flow in :mod:`pyro_vits.flows` (VITS2's and Bert-VITS2's
    transformer couplings subclass it), so :class:`~pyro_vits.distributions.flow_prior.FlowPrior` and the transforms accept any
    of them. The contract: ``flows`` is a ModuleList of layers ``(x, x_mask, g, reverse) -> (y, logdet (N,))``
    applied in order (reversed for ``reverse=True``); ``channels``, ``gin_channels``; ``mean_only`` is True
    exactly when every layer is volume preserving; ``config`` holds the constructor arguments.
    """

    def __init__(
        self,
        channels: int,
        hidden_channels: int,
        kernel_size: int,
        dilation_rate: int,
        n_layers: int,
        n_flows: int = 4,
        gin_channels: int = 0,
        mean_only: bool = True,
    ) -> None:
        super().__init__()
        check_positive_ints(
            channels=channels,
            hidden_channels=hidden_channels,
            kernel_size=kernel_size,
            dilation_rate=dilation_rate,
            n_layers=n_layers,
            n_flows=n_flows,
        )
        check_nonnegative_ints(gin_channels=gin_channels)
        config = dict(
            channels=channels,
            hidden_channels=hidden_channels,
            kernel_size=kernel_size,
            dilation_rate=dilation_rate,
            n_layers=n_layers,
            n_flows=n_flows,
            gin_channels=gin_channels,
            mean_only=mean_only,
        )
        layers: list[nn.Module] = []
        for _ in range(n_flows):
            layers += [
                ResidualCouplingLayer(
                    channels, hidden_channels, kernel_size, dilation_rate, n_layers, gin_channels, mean_only
                ),
                Flip(),
            ]
        self._init_stack(config, layers, mean_only)

    def _init_stack(self, config: dict[str, Any], layers: Sequence[nn.Module], mean_only: bool) -> None:
        """Set the contract attributes (shared by the subclasses, which build other layers)."""
        self.channels = config["channels"]
        self.gin_channels = config["gin_channels"]
        self.mean_only = mean_only
        self.config = config
        self.flows = nn.ModuleList(layers)

    def forward_and_logdet(
        self, x: Tensor, x_mask: Tensor | None = None, g: Tensor | None = None, reverse: bool = False
    ) -> tuple[Tensor, Tensor]:
        """``x (..., C, T)`` -> ``(y (..., C, T), log|det dy/dx| (...))``."""
        if x.dim() < 2 or x.shape[-2] != self.channels:
            raise ValueError(f"x must have shape (..., C={self.channels}, T), got {tuple(x.shape)}")
        if x_mask is None:
            x_mask = x.new_ones(x.shape[:-2] + (1, x.shape[-1]))
        if g is not None and g.shape[-2] != self.gin_channels:
            raise ValueError(f"g must have shape (..., gin={self.gin_channels}, 1), got {tuple(g.shape)}")
        h, mask, g, lead = flatten_leading(x, x_mask, g)
        logdet = h.new_zeros(h.shape[0])
        for flow in reversed(self.flows) if reverse else self.flows:
            h, ld = flow(h, mask, g=g, reverse=reverse)
            if not self.mean_only:
                logdet = logdet + ld
        return h.reshape(lead + h.shape[-2:]), logdet.reshape(lead)

    def forward(
        self, x: Tensor, x_mask: Tensor | None = None, g: Tensor | None = None, reverse: bool = False
    ) -> Tensor:
        return self.forward_and_logdet(x, x_mask, g, reverse)[0]
