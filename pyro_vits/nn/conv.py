"""Weight-normalised 1-D convolutions as VITS builds them."""

from __future__ import annotations

from torch import nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["weight_normed_conv1d"]


def weight_normed_conv1d(in_ch: int, out_ch: int, kernel_size: int = 1, dilation: int = 1) -> nn.Conv1d:
    """``nn.Conv1d`` with "same" padding for odd kernels, weight-normalised over dim 0 (parameters
    ``parametrizations.weight.original0`` = g ``(out, 1, 1)`` and ``original1`` = v ``(out, in, k)``)."""
    padding = (kernel_size * dilation - dilation) // 2
    conv = nn.Conv1d(in_ch, out_ch, kernel_size, dilation=dilation, padding=padding)
    return weight_norm(conv, name="weight")
