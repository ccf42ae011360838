"""Weight-normalised 1-D convolutions as VITS builds them, and its gated activation."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["weight_normed_conv1d", "gated_activation"]


def weight_normed_conv1d(in_ch: int, out_ch: int, kernel_size: int = 1, dilation: int = 1) -> nn.Conv1d:
    """``nn.Conv1d`` with "same" padding for odd kernels, weight-normalised over dim 0 (parameters
    ``parametrizations.weight.original0`` = g ``(out, 1, 1)`` and ``original1`` = v ``(out, in, k)``)."""
    padding = (kernel_size * dilation - dilation) // 2
    conv = nn.Conv1d(in_ch, out_ch, kernel_size, dilation=dilation, padding=padding)
    return weight_norm(conv, name="weight")


def gated_activation(x: Tensor, cond: Tensor | None, layer: int, channels: int) -> Tensor:
    """VITS's ``fused_add_tanh_sigmoid_multiply``: ``x (B, 2H, T)`` plus layer ``layer``'s slice of the
    speaker conditioning ``cond (B, 2H * n_layers, 1)`` (if any), then ``tanh(first H) * sigmoid(last H)``
    -> ``(B, H, T)`` with ``H = channels``."""
    if cond is not None:
        x = x + cond[:, 2 * channels * layer : 2 * channels * (layer + 1)]
    return torch.tanh(x[:, :channels]) * torch.sigmoid(x[:, channels:])
