"""VITS's HiFi-GAN decoder (``models.Generator`` with ``modules.ResBlock1`` / ``ResBlock2``) under its upstream
parameter names, so that a VITS ``dec.*`` state dict loads strictly.

Weights are plain ``weight`` tensors: a checkpoint's weight-normed ones (``weight_g``/``weight_v`` or
``parametrizations.weight.original0/1``) are folded into ``weight`` by the reader
(:func:`pyro_vits.vits.reader.fold_weight_norm`) before loading; ``weight_norm=True`` builds the module with
weight norm instead (torch parametrizations on the same layers as upstream).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm as _weight_norm

__all__ = ["LRELU_SLOPE", "ResBlock1", "ResBlock2", "Generator", "get_padding"]

LRELU_SLOPE = 0.1


def get_padding(kernel_size: int, dilation: int = 1) -> int:
    """VITS's ``commons.get_padding``: "same" padding of an odd kernel."""
    return (kernel_size * dilation - dilation) // 2


def _wn(module: nn.Module, on: bool) -> nn.Module:
    return _weight_norm(module) if on else module


def _conv(channels: int, kernel_size: int, dilation: int, weight_norm: bool) -> nn.Module:
    return _wn(nn.Conv1d(channels, channels, kernel_size, 1, dilation=dilation,
                         padding=get_padding(kernel_size, dilation)), weight_norm)


class ResBlock1(nn.Module):
    """``x += c2(lrelu(c1(lrelu(x))))`` for each dilation ``d`` (``c1`` dilated by ``d``, ``c2`` by 1)."""

    def __init__(self, channels: int, kernel_size: int = 3, dilation: Sequence[int] = (1, 3, 5),
                 weight_norm: bool = False) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(_conv(channels, kernel_size, d, weight_norm) for d in dilation)
        self.convs2 = nn.ModuleList(_conv(channels, kernel_size, 1, weight_norm) for _ in dilation)

    def forward(self, x: Tensor, x_mask: Tensor | None = None) -> Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            xt = F.leaky_relu(x, LRELU_SLOPE)
            if x_mask is not None:
                xt = xt * x_mask
            xt = F.leaky_relu(c1(xt), LRELU_SLOPE)
            if x_mask is not None:
                xt = xt * x_mask
            x = c2(xt) + x
        return x if x_mask is None else x * x_mask


class ResBlock2(nn.Module):
    """``x += c(lrelu(x))`` for each dilation ``d`` (``c`` dilated by ``d``)."""

    def __init__(self, channels: int, kernel_size: int = 3, dilation: Sequence[int] = (1, 3),
                 weight_norm: bool = False) -> None:
        super().__init__()
        self.convs = nn.ModuleList(_conv(channels, kernel_size, d, weight_norm) for d in dilation)

    def forward(self, x: Tensor, x_mask: Tensor | None = None) -> Tensor:
        for c in self.convs:
            xt = F.leaky_relu(x, LRELU_SLOPE)
            if x_mask is not None:
                xt = xt * x_mask
            x = c(xt) + x
        return x if x_mask is None else x * x_mask


class Generator(nn.Module):
    """VITS's HiFi-GAN decoder ``dec``: ``forward(x (B, initial_channel, T), g (B, gin, 1) | None) ->
    (B, 1, T * prod(upsample_rates))``.

    ``conv_pre`` (kernel 7) [+ ``cond(g)``], then per upsampling ``i``: leaky ReLU (0.1), ``ups.<i>``
    (``ConvTranspose1d``, stride ``upsample_rates[i]``, kernel ``upsample_kernel_sizes[i]``, padding
    ``(k - u) // 2``, channels halved), the mean of its ``len(resblock_kernel_sizes)`` residual blocks
    ``resblocks.<i * n + j>``; then leaky ReLU (torch's default slope 0.01, as upstream), ``conv_post`` (kernel
    7, no bias) and ``tanh``. ``resblock``: ``"1"`` (:class:`ResBlock1`) or ``"2"`` (:class:`ResBlock2`).
    """

    def __init__(
        self,
        initial_channel: int,
        resblock: str,
        resblock_kernel_sizes: Sequence[int],
        resblock_dilation_sizes: Sequence[Sequence[int]],
        upsample_rates: Sequence[int],
        upsample_initial_channel: int,
        upsample_kernel_sizes: Sequence[int],
        gin_channels: int = 0,
        *,
        weight_norm: bool = False,
    ) -> None:
        super().__init__()
        if str(resblock) not in ("1", "2"):
            raise ValueError(f"resblock must be '1' or '2', got {resblock!r}")
        if len(upsample_rates) != len(upsample_kernel_sizes) or not upsample_rates:
            raise ValueError(f"upsample_rates {list(upsample_rates)} and upsample_kernel_sizes "
                             f"{list(upsample_kernel_sizes)} must be non-empty and of the same length")
        if len(resblock_kernel_sizes) != len(resblock_dilation_sizes) or not resblock_kernel_sizes:
            raise ValueError(f"resblock_kernel_sizes {list(resblock_kernel_sizes)} and resblock_dilation_sizes "
                             f"{[list(d) for d in resblock_dilation_sizes]} must be non-empty and of the same length")
        self.num_kernels = len(resblock_kernel_sizes)
        self.num_upsamples = len(upsample_rates)
        self.upsample_rates = tuple(int(u) for u in upsample_rates)
        self.conv_pre = nn.Conv1d(initial_channel, upsample_initial_channel, 7, 1, padding=3)
        block = ResBlock1 if str(resblock) == "1" else ResBlock2
        self.ups = nn.ModuleList(
            _wn(nn.ConvTranspose1d(upsample_initial_channel // 2**i, upsample_initial_channel // 2 ** (i + 1),
                                   k, u, padding=(k - u) // 2), weight_norm)
            for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes))
        )
        self.resblocks = nn.ModuleList()
        ch = upsample_initial_channel
        for i in range(self.num_upsamples):
            ch = upsample_initial_channel // 2 ** (i + 1)
            for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes):
                self.resblocks.append(block(ch, k, d, weight_norm=weight_norm))
        self.conv_post = nn.Conv1d(ch, 1, 7, 1, padding=3, bias=False)
        if gin_channels:
            self.cond = nn.Conv1d(gin_channels, upsample_initial_channel, 1)

    @property
    def hop_length(self) -> int:
        """Output samples per input frame: ``prod(upsample_rates)``."""
        return int(torch.tensor(self.upsample_rates).prod())

    def forward(self, x: Tensor, g: Tensor | None = None) -> Tensor:
        x = self.conv_pre(x)
        if g is not None:
            if not hasattr(self, "cond"):
                raise ValueError("this decoder has no speaker conditioning (gin_channels=0): g must be None")
            x = x + self.cond(g)
        for i in range(self.num_upsamples):
            x = self.ups[i](F.leaky_relu(x, LRELU_SLOPE))
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            xs = blocks[0](x)
            for block in blocks[1:]:
                xs = xs + block(x)
            x = xs / self.num_kernels
        return torch.tanh(self.conv_post(F.leaky_relu(x)))
