"""VITS's non-causal WaveNet (``modules.WN``): the coupling networks' and the posterior encoder's body."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .conv import gated_activation, weight_normed_conv1d


class WN(nn.Module):
    """WaveNet-style gated stack: ``(N, H, T), (N, 1, T), g (N, gin, 1) -> (N, H, T)``.

    Parameter names follow VITS ``modules.WN``: ``in_layers.i``, ``res_skip_layers.i``, ``cond_layer``.
    """

    def __init__(
        self, hidden_channels: int, kernel_size: int, dilation_rate: int, n_layers: int, gin_channels: int = 0
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.hidden_channels = hidden_channels
        self.n_layers = n_layers
        self.gin_channels = gin_channels
        if gin_channels > 0:
            self.cond_layer = weight_normed_conv1d(gin_channels, 2 * hidden_channels * n_layers)
        self.in_layers = nn.ModuleList(
            weight_normed_conv1d(hidden_channels, 2 * hidden_channels, kernel_size, dilation_rate**i)
            for i in range(n_layers)
        )
        self.res_skip_layers = nn.ModuleList(
            weight_normed_conv1d(
                hidden_channels, 2 * hidden_channels if i < n_layers - 1 else hidden_channels
            )
            for i in range(n_layers)
        )

    def forward(self, x: Tensor, x_mask: Tensor, g: Tensor | None = None) -> Tensor:
        hidden = self.hidden_channels
        output = torch.zeros_like(x)
        cond = self.cond_layer(g) if g is not None and self.gin_channels > 0 else None
        for i in range(self.n_layers):
            acts = gated_activation(self.in_layers[i](x), cond, i, hidden)
            res_skip = self.res_skip_layers[i](acts)
            if i < self.n_layers - 1:
                x = (x + res_skip[:, :hidden]) * x_mask
                output = output + res_skip[:, hidden:]
            else:
                output = output + res_skip
        return output * x_mask
