"""VITS's residual coupling flow, with VITS's parameter names.

Shapes: latents ``(..., C, T)`` with any number of leading batch dims, masks ``(..., 1, T)``
(1 = real frame, broadcast against the leading dims), speaker conditioning ``g`` ``(..., gin, 1)``.
The direction ``z -> z_p`` (``reverse=False``) is VITS's training direction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from ._validate import check_positive_ints

__all__ = [
    "WN",
    "ResidualCouplingLayer",
    "Flip",
    "ResidualCouplingBlock",
    "load_vits_flow",
    "flatten_leading",
]


def _weight_normed_conv(in_ch: int, out_ch: int, kernel_size: int = 1, dilation: int = 1) -> nn.Conv1d:
    padding = (kernel_size * dilation - dilation) // 2
    conv = nn.Conv1d(in_ch, out_ch, kernel_size, dilation=dilation, padding=padding)
    return weight_norm(conv, name="weight")


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
            self.cond_layer = _weight_normed_conv(gin_channels, 2 * hidden_channels * n_layers)
        self.in_layers = nn.ModuleList(
            _weight_normed_conv(hidden_channels, 2 * hidden_channels, kernel_size, dilation_rate**i)
            for i in range(n_layers)
        )
        self.res_skip_layers = nn.ModuleList(
            _weight_normed_conv(hidden_channels, 2 * hidden_channels if i < n_layers - 1 else hidden_channels)
            for i in range(n_layers)
        )

    def forward(self, x: Tensor, x_mask: Tensor, g: Tensor | None = None) -> Tensor:
        hidden = self.hidden_channels
        output = torch.zeros_like(x)
        cond = self.cond_layer(g) if g is not None and self.gin_channels > 0 else None
        for i in range(self.n_layers):
            x_in = self.in_layers[i](x)
            if cond is not None:
                x_in = x_in + cond[:, 2 * hidden * i : 2 * hidden * (i + 1)]
            acts = torch.tanh(x_in[:, :hidden]) * torch.sigmoid(x_in[:, hidden:])
            res_skip = self.res_skip_layers[i](acts)
            if i < self.n_layers - 1:
                x = (x + res_skip[:, :hidden]) * x_mask
                output = output + res_skip[:, hidden:]
            else:
                output = output + res_skip
        return output * x_mask


class ResidualCouplingLayer(nn.Module):
    """VITS residual coupling layer on ``(N, C, T)``; returns ``(y, logdet (N,))``.

    ``mean_only=True``: ``x1 -> m(x0) + x1`` (volume preserving, logdet exactly 0).
    ``mean_only=False``: ``x1 -> m(x0) + x1 * exp(logs(x0))``, logdet = sum of valid ``logs``.
    """

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
        super().__init__()
        if channels % 2 != 0:
            raise ValueError(f"channels must be even (the coupling splits them in halves), got {channels}")
        self.half_channels = channels // 2
        self.mean_only = mean_only
        self.pre = nn.Conv1d(self.half_channels, hidden_channels, 1)
        self.enc = WN(hidden_channels, kernel_size, dilation_rate, n_layers, gin_channels=gin_channels)
        self.post = nn.Conv1d(hidden_channels, self.half_channels * (1 if mean_only else 2), 1)
        nn.init.zeros_(self.post.weight)
        nn.init.zeros_(self.post.bias)

    def forward(
        self, x: Tensor, x_mask: Tensor, g: Tensor | None = None, reverse: bool = False
    ) -> tuple[Tensor, Tensor]:
        x0, x1 = torch.split(x, [self.half_channels] * 2, 1)
        h = self.pre(x0) * x_mask
        h = self.enc(h, x_mask, g=g)
        stats = self.post(h) * x_mask
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
    ``log|det dy/dx|`` of shape ``(...)`` (exact zeros for mean-only couplings).
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
        check_positive_ints(channels=channels, hidden_channels=hidden_channels, kernel_size=kernel_size,
                            dilation_rate=dilation_rate, n_layers=n_layers, n_flows=n_flows)
        if not isinstance(gin_channels, int) or gin_channels < 0:
            raise ValueError(f"gin_channels must be a non-negative int, got {gin_channels!r}")
        self.channels = channels
        self.gin_channels = gin_channels
        self.mean_only = mean_only
        self.config = dict(
            channels=channels,
            hidden_channels=hidden_channels,
            kernel_size=kernel_size,
            dilation_rate=dilation_rate,
            n_layers=n_layers,
            n_flows=n_flows,
            gin_channels=gin_channels,
            mean_only=mean_only,
        )
        self.flows = nn.ModuleList()
        for _ in range(n_flows):
            self.flows.append(
                ResidualCouplingLayer(
                    channels, hidden_channels, kernel_size, dilation_rate, n_layers, gin_channels, mean_only
                )
            )
            self.flows.append(Flip())

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


def _to_parametrized_key(key: str) -> str:
    if key.endswith(".weight_g"):
        return key[: -len("weight_g")] + "parametrizations.weight.original0"
    if key.endswith(".weight_v"):
        return key[: -len("weight_v")] + "parametrizations.weight.original1"
    return key


def _flow_entries(obj: Mapping[str, Any]) -> dict[str, Tensor]:
    state = obj.get("model", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping):
        raise TypeError(f"expected a state dict or a checkpoint dict with 'model', got {type(obj).__name__}")
    entries = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            continue
        stripped = key[len("module.") :] if key.startswith("module.") else key
        if stripped.startswith("flow.flows."):
            entries[_to_parametrized_key(stripped[len("flow.") :])] = value
    if not entries:
        raise ValueError(
            "no flow found: expected keys 'flow.flows.<i>.…' (optionally under 'module.'), "
            f"got {len(state)} entries such as {list(state)[:3]}"
        )
    return entries


def load_vits_flow(obj: Mapping[str, Any], dilation_rate: int = 1) -> ResidualCouplingBlock:
    """Build and strictly load a :class:`ResidualCouplingBlock` from a VITS generator state dict.

    Accepts ``{"model": state_dict}`` checkpoints, ``module.`` prefixes, both weight-norm layouts
    (``weight_g/weight_v`` and ``parametrizations.weight.original0/1``) and both coupling numberings: VITS's
    ``flow.flows.0, 2, 4, …`` (``Flip`` modules in between) and coqui-TTS's ``flow.flows.0, 1, 2, …``
    (``ResidualCouplingBlocks`` flips in ``forward``, the same map). Sizes are inferred from shapes; the
    dilation rate is not stored in weights (VITS's prior flow uses 1).
    """
    entries = _flow_entries(obj)
    try:
        coupling_ids = sorted({int(k.split(".")[1]) for k in entries})
        if any(i % 2 for i in coupling_ids):  # coqui-TTS numbering: coupling i is VITS's flows.<2 i>
            entries = {f"flows.{2 * int(k.split('.')[1])}.{k.split('.', 2)[2]}": v
                       for k, v in entries.items()}
        pre_w = entries["flows.0.pre.weight"]
        post_w = entries["flows.0.post.weight"]
        in0 = entries["flows.0.enc.in_layers.0.parametrizations.weight.original1"]
    except (KeyError, ValueError) as err:
        raise ValueError(f"state dict has 'flow.' entries but not a VITS coupling layout: {err}") from err
    hidden, half = pre_w.shape[0], pre_w.shape[1]
    n_layers = len({k.split(".")[4] for k in entries if k.startswith("flows.0.enc.in_layers.")})
    cond = entries.get("flows.0.enc.cond_layer.parametrizations.weight.original1")
    block = ResidualCouplingBlock(
        channels=2 * half,
        hidden_channels=hidden,
        kernel_size=in0.shape[-1],
        dilation_rate=dilation_rate,
        n_layers=n_layers,
        n_flows=len(coupling_ids),
        gin_channels=0 if cond is None else cond.shape[1],
        mean_only=post_w.shape[0] == half,
    )
    try:
        block.load_state_dict(entries, strict=True)
    except RuntimeError as err:
        details = " ".join(str(err).split())  # torch lists the mismatches on tab-indented lines
        raise ValueError(f"flow entries do not match a VITS ResidualCouplingBlock: {details}") from err
    return block
