"""VITS2's and Bert-VITS2's transformer coupling flows, with the upstream parameter names.

Written from the published architectures (VITS2, Kong et al. 2023, Fig. 1b and its reference implementation's
module layout; Bert-VITS2's ``TransformerCouplingBlock``). Every block here is a
:class:`~pyro_vits.flows.residual.ResidualCouplingBlock` (same call convention: ``forward(x, x_mask, g=None,
reverse=False)``, ``forward_and_logdet``; leading batch dims; ``log|det|`` over valid frames).

VITS2's ``ResidualCouplingTransformersBlock`` has five ``transformer_flow_type`` s; each flow step is:

- ``pre_conv``: ``[ResidualCouplingTransformersLayer, Flip]``: ``x0' = x0 + Encoder(x0)`` (at width C/2), then
  the VITS coupling conditioner on ``x0'``. The layer also owns an unused ``post_transformer`` (as upstream).
- ``pre_conv2``: ``[ResidualCouplingTransformersLayer2, Flip]``: ``h = pre(x0); h = h + Encoder(h)`` (at the
  hidden width), then WN and ``post``.
- ``fft``: ``[FFTransformerCouplingLayer, Flip]``: ``h = pre(x0); h = h + FFT(h, g)``, then ``post``.
- ``mono_layer_inter_residual``: ``[ResidualCouplingLayer, Flip, MonoTransformerFlowLayer]`` with a mean-only
  coupling ``x1 + post(x0 + Encoder(x0))``.
- ``mono_layer_post_residual``: the same with the residual form of Fig. 1b: ``y0 = 2 x0``,
  ``y1 = 2 x1 + post(Encoder(x0))`` on valid frames (``y1 = x1`` on padded ones, as upstream); its
  ``log|det| = C log 2`` per valid frame, so that block is not volume preserving (``mean_only`` False).

Bert-VITS2's ``TransformerCouplingBlock`` (``share_parameter=False``): ``[TransformerCouplingLayer, Flip]``
with ``h = Encoder(pre(x0), g)`` (relative window 4, speaker added at layer ``cond_layer_idx``) and ``post``.

Dropout is not used: a prior flow must be a deterministic bijection (upstream's ``p_dropout`` acts only in
training mode; loaded checkpoints are evaluated as upstream evaluates them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._validate import check_nonnegative_ints, check_positive_ints
from ..nn import FFT, Encoder
from ..nn.wavenet import WN
from .residual import AffineCoupling, Flip, ResidualCouplingBlock, ResidualCouplingLayer, zero_conv1x1

__all__ = [
    "TRANSFORMER_FLOW_TYPES",
    "ResidualCouplingTransformersLayer",
    "ResidualCouplingTransformersLayer2",
    "FFTransformerCouplingLayer",
    "MonoTransformerFlowLayer",
    "ResidualCouplingTransformersBlock",
    "TransformerCouplingLayer",
    "TransformerCouplingBlock",
]

TRANSFORMER_FLOW_TYPES = (
    "pre_conv",
    "pre_conv2",
    "fft",
    "mono_layer_inter_residual",
    "mono_layer_post_residual",
)
TRANSFORMER_KEYS = ("n_heads", "n_layers", "kernel_size", "filter_channels", "window_size")


def _encoder(width: int, spec: Mapping[str, Any]) -> Encoder:
    """An :class:`Encoder` of ``width`` channels; ``filter_channels`` None means ``width`` (upstream's
    choice)."""
    return Encoder(
        width,
        spec["filter_channels"] or width,
        spec["n_heads"],
        spec["n_layers"],
        spec["kernel_size"],
        0.0,
        spec["window_size"],
    )


class ResidualCouplingTransformersLayer(ResidualCouplingLayer):
    """VITS2 ``pre_conv``: ``stats = post(WN(pre(x0 + pre_transformer(x0)) * mask, g)) * mask``."""

    def __init__(
        self,
        channels: int,
        hidden_channels: int,
        kernel_size: int,
        dilation_rate: int,
        n_layers: int,
        gin_channels: int = 0,
        mean_only: bool = True,
        *,
        transformer: Mapping[str, Any],
    ) -> None:
        super().__init__(
            channels, hidden_channels, kernel_size, dilation_rate, n_layers, gin_channels, mean_only
        )
        self.pre_transformer = _encoder(self.half_channels, transformer)
        self.post_transformer = _encoder(hidden_channels, transformer)  # unused upstream, kept for its keys

    def stats(self, x0: Tensor, x_mask: Tensor, g: Tensor | None) -> Tensor:
        x0 = self.pre_transformer(x0 * x_mask, x_mask) + x0
        return super().stats(x0, x_mask, g)


class ResidualCouplingTransformersLayer2(AffineCoupling):
    """VITS2 ``pre_conv2``: ``h = pre(x0) * mask``, ``h = h + pre_transformer(h)``,
    ``stats = post(WN(h, g))``."""

    def __init__(
        self,
        channels: int,
        hidden_channels: int,
        kernel_size: int,
        dilation_rate: int,
        n_layers: int,
        gin_channels: int = 0,
        mean_only: bool = True,
        *,
        transformer: Mapping[str, Any],
    ) -> None:
        super().__init__(channels, mean_only)
        self.pre = nn.Conv1d(self.half_channels, hidden_channels, 1)
        self.pre_transformer = _encoder(hidden_channels, transformer)
        self.enc = WN(hidden_channels, kernel_size, dilation_rate, n_layers, gin_channels=gin_channels)
        self.post = self._post_conv(hidden_channels)

    def stats(self, x0: Tensor, x_mask: Tensor, g: Tensor | None) -> Tensor:
        h = self.pre(x0) * x_mask
        h = h + self.pre_transformer(h * x_mask, x_mask)
        return self.post(self.enc(h, x_mask, g=g)) * x_mask


class FFTransformerCouplingLayer(AffineCoupling):
    """VITS2 ``fft``: ``h = pre(x0) * mask``, ``stats = post(h + enc(h, g)) * mask`` with a causal
    :class:`FFT`."""

    def __init__(
        self,
        channels: int,
        hidden_channels: int,
        gin_channels: int = 0,
        mean_only: bool = True,
        *,
        transformer: Mapping[str, Any],
    ) -> None:
        super().__init__(channels, mean_only)
        t = transformer
        self.pre = nn.Conv1d(self.half_channels, hidden_channels, 1)
        self.enc = FFT(
            hidden_channels,
            t["filter_channels"] or hidden_channels,
            t["n_heads"],
            t["n_layers"],
            t["kernel_size"],
            0.0,
            isflow=True,
            gin_channels=gin_channels,
        )
        self.post = self._post_conv(hidden_channels)

    def stats(self, x0: Tensor, x_mask: Tensor, g: Tensor | None) -> Tensor:
        h = self.pre(x0) * x_mask
        return self.post(self.enc(h, x_mask, g=g) + h) * x_mask


class MonoTransformerFlowLayer(nn.Module):
    """VITS2's mean-only transformer coupling without WN (no speaker input); see the module docstring.

    ``residual_connection=False``: ``y1 = x1 + post(x0 + pre_transformer(x0))`` (logdet 0);
    ``True``: ``y = x + [x0, m + x1]`` with ``m = post(pre_transformer(x0))`` (logdet ``C log 2`` per valid
    frame).
    """

    def __init__(
        self, channels: int, residual_connection: bool = False, *, transformer: Mapping[str, Any]
    ) -> None:
        super().__init__()
        if channels % 2 != 0:
            raise ValueError(f"channels must be even (the coupling splits them in halves), got {channels}")
        self.half_channels = channels // 2
        self.residual_connection = residual_connection
        self.pre_transformer = _encoder(self.half_channels, transformer)
        self.post = zero_conv1x1(self.half_channels, self.half_channels)

    def forward(
        self, x: Tensor, x_mask: Tensor, g: Tensor | None = None, reverse: bool = False
    ) -> tuple[Tensor, Tensor]:
        x0, x1 = torch.split(x, [self.half_channels] * 2, 1)
        if not self.residual_connection:
            m = self.post(self.pre_transformer(x0 * x_mask, x_mask) + x0) * x_mask
            x1 = (x1 - m) * x_mask if reverse else m + x1 * x_mask
            return torch.cat([x0, x1], 1), x.new_zeros(x.shape[0])
        if reverse:
            x0 = x0 / 2
            m = self.post(self.pre_transformer(x0, x_mask)) * x_mask
            y = torch.cat([x0, (x1 - m) / 2 * x_mask], 1)
        else:
            m = self.post(self.pre_transformer(x0, x_mask)) * x_mask
            y = x + torch.cat([x0, m + x1 * x_mask], 1)
        logdet = math.log(2.0) * x.shape[1] * x_mask.sum((1, 2))
        return y, -logdet if reverse else logdet


def _transformer_spec(
    flow_type: str,
    kernel_size: int,
    dilation_rate: int,
    n_layers: int,
    half: int,
    hidden: int,
    override: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Upstream's transformer sizes for ``flow_type`` (``fft``: ``n_heads = n_layers``,
    ``n_layers = dilation_rate``,
    as VITS2 passes them positionally), updated by ``override``."""
    if flow_type == "pre_conv2":
        spec = dict(n_heads=2, n_layers=1, kernel_size=kernel_size, filter_channels=None, window_size=4)
    elif flow_type == "fft":
        spec = dict(
            n_heads=n_layers,
            n_layers=dilation_rate,
            kernel_size=kernel_size,
            filter_channels=768,
            window_size=None,
        )
    else:
        spec = dict(n_heads=2, n_layers=2, kernel_size=3, filter_channels=None, window_size=None)
    unknown = set(override or {}) - set(TRANSFORMER_KEYS)
    if unknown:
        raise ValueError(f"transformer accepts the keys {TRANSFORMER_KEYS}, got {sorted(unknown)}")
    spec.update(override or {})
    check_positive_ints(n_heads=spec["n_heads"], n_layers=spec["n_layers"], kernel_size=spec["kernel_size"])
    check_positive_ints(
        allow_none=True, filter_channels=spec["filter_channels"], window_size=spec["window_size"]
    )
    width = half if flow_type != "pre_conv2" and flow_type != "fft" else hidden
    if width % spec["n_heads"]:
        raise ValueError(
            f"the {flow_type} transformer width {width} is not divisible by n_heads={spec['n_heads']}"
        )
    return spec


def _vits2_step(flow_type: str, wn_args: tuple, spec: Mapping[str, Any]) -> list[nn.Module]:
    """The modules of one flow step of VITS2's block, in upstream's order (see the module docstring)."""
    channels, hidden_channels, _, _, _, gin_channels, mean_only = wn_args
    if flow_type == "pre_conv":
        return [ResidualCouplingTransformersLayer(*wn_args, transformer=spec), Flip()]
    if flow_type == "pre_conv2":
        return [ResidualCouplingTransformersLayer2(*wn_args, transformer=spec), Flip()]
    if flow_type == "fft":
        fft = FFTransformerCouplingLayer(channels, hidden_channels, gin_channels, mean_only, transformer=spec)
        return [fft, Flip()]
    mono = MonoTransformerFlowLayer(channels, flow_type == "mono_layer_post_residual", transformer=spec)
    return [ResidualCouplingLayer(*wn_args), Flip(), mono]


class ResidualCouplingTransformersBlock(ResidualCouplingBlock):
    """VITS2's prior flow (``models.ResidualCouplingTransformersBlock`` with ``use_transformer_flows=True``).

    Arguments as upstream plus ``transformer``: overrides of the transformer sizes (keys
    ``n_heads, n_layers, kernel_size, filter_channels, window_size``; defaults are upstream's constants for
    the type, e.g. ``pre_conv``: 2 heads, 2 layers, kernel 3, no relative window). ``mean_only=False`` gives
    affine couplings for the WN/FFT types (upstream always uses mean-only couplings).
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
        transformer_flow_type: str = "pre_conv",
        *,
        mean_only: bool = True,
        transformer: Mapping[str, Any] | None = None,
    ) -> None:
        nn.Module.__init__(self)  # the WN stack of the base class is replaced by the layers below
        check_positive_ints(channels=channels, hidden_channels=hidden_channels, kernel_size=kernel_size,
                            dilation_rate=dilation_rate, n_layers=n_layers, n_flows=n_flows)
        check_nonnegative_ints(gin_channels=gin_channels)
        if transformer_flow_type not in TRANSFORMER_FLOW_TYPES:
            raise ValueError(f"transformer_flow_type must be one of {TRANSFORMER_FLOW_TYPES}, "
                             f"got {transformer_flow_type!r}")
        if transformer_flow_type.startswith("mono_layer") and not mean_only:
            raise ValueError(f"{transformer_flow_type} flows are mean-only upstream; mean_only must be True")
        if channels % 2:
            raise ValueError(f"channels must be even (the coupling splits them in halves), got {channels}")
        spec = _transformer_spec(transformer_flow_type, kernel_size, dilation_rate, n_layers, channels // 2,
                                 hidden_channels, transformer)
        wn_args = (channels, hidden_channels, kernel_size, dilation_rate, n_layers, gin_channels, mean_only)
        layers = [m for _ in range(n_flows) for m in _vits2_step(transformer_flow_type, wn_args, spec)]
        config = dict(channels=channels, hidden_channels=hidden_channels, kernel_size=kernel_size,
                      dilation_rate=dilation_rate, n_layers=n_layers, n_flows=n_flows,
                      gin_channels=gin_channels, mean_only=mean_only,
                      transformer_flow_type=transformer_flow_type, transformer=spec)
        self._init_stack(config, layers, mean_only and transformer_flow_type != "mono_layer_post_residual")


class TransformerCouplingLayer(AffineCoupling):
    """Bert-VITS2 coupling: ``stats = post(enc(pre(x0) * mask, g)) * mask`` with a relative-window
    :class:`Encoder`."""

    def __init__(
        self,
        channels: int,
        hidden_channels: int,
        kernel_size: int,
        n_layers: int,
        n_heads: int,
        filter_channels: int,
        mean_only: bool = True,
        gin_channels: int = 0,
        *,
        window_size: int | None = 4,
        cond_layer_idx: int = 2,
    ) -> None:
        super().__init__(channels, mean_only)
        self.pre = nn.Conv1d(self.half_channels, hidden_channels, 1)
        self.enc = Encoder(
            hidden_channels,
            filter_channels,
            n_heads,
            n_layers,
            kernel_size,
            0.0,
            window_size,
            gin_channels=gin_channels,
            cond_layer_idx=cond_layer_idx,
        )
        self.post = self._post_conv(hidden_channels)

    def stats(self, x0: Tensor, x_mask: Tensor, g: Tensor | None) -> Tensor:
        return self.post(self.enc(self.pre(x0) * x_mask, x_mask, g=g)) * x_mask


class TransformerCouplingBlock(ResidualCouplingBlock):
    """Bert-VITS2's prior flow (``models.TransformerCouplingBlock``, ``share_parameter=False``):
    ``n_flows`` x [:class:`TransformerCouplingLayer`, Flip]. Upstream's arguments without ``p_dropout`` (see
    the     module docstring) and ``share_parameter`` (its shared branch does not build upstream)."""

    def __init__(
        self,
        channels: int,
        hidden_channels: int,
        filter_channels: int,
        n_heads: int,
        n_layers: int,
        kernel_size: int,
        n_flows: int = 4,
        gin_channels: int = 0,
        *,
        mean_only: bool = True,
        window_size: int | None = 4,
        cond_layer_idx: int = 2,
    ) -> None:
        nn.Module.__init__(self)  # the WN stack of the base class is replaced by the layers below
        check_positive_ints(
            channels=channels,
            hidden_channels=hidden_channels,
            filter_channels=filter_channels,
            n_heads=n_heads,
            n_layers=n_layers,
            kernel_size=kernel_size,
            n_flows=n_flows,
        )
        check_nonnegative_ints(gin_channels=gin_channels)
        layers: list[nn.Module] = []
        for _ in range(n_flows):
            layers += [
                TransformerCouplingLayer(
                    channels,
                    hidden_channels,
                    kernel_size,
                    n_layers,
                    n_heads,
                    filter_channels,
                    mean_only,
                    gin_channels,
                    window_size=window_size,
                    cond_layer_idx=cond_layer_idx,
                ),
                Flip(),
            ]
        config = dict(
            channels=channels,
            hidden_channels=hidden_channels,
            filter_channels=filter_channels,
            n_heads=n_heads,
            n_layers=n_layers,
            kernel_size=kernel_size,
            n_flows=n_flows,
            gin_channels=gin_channels,
            mean_only=mean_only,
            window_size=window_size,
            cond_layer_idx=cond_layer_idx,
        )
        self._init_stack(config, layers, mean_only)
