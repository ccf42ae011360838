"""ESPnet2 VITS's text encoder (``espnet2.gan_tts.vits.text_encoder.TextEncoder``): a Conformer.

Parameter names follow ESPnet (``emb``, ``encoder.encoders.<i>.{self_attn, feed_forward, feed_forward_macaron,
conv_module, norm_*}``, ``encoder.after_norm``, ``proj``) so an ESPnet generator's ``text_encoder.*`` entries
load strictly. Written from ESPnet's source (``espnet/nets/pytorch_backend/conformer/*``,
``transformer/attention.py`` ``RelPositionMultiHeadedAttention``, ``transformer/embedding.py``
``RelPositionalEncoding``); inference only (dropout is not applied).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["ConformerTextEncoder", "ACTIVATIONS"]

ACTIVATIONS = {"swish": nn.SiLU, "relu": nn.ReLU, "tanh": nn.Tanh, "selu": nn.SELU, "hardtanh": nn.Hardtanh}
"""ESPnet's ``get_activation`` names (its ``Swish`` is ``x * sigmoid(x)``, i.e. SiLU)."""


def _layer_norm(size: int) -> nn.LayerNorm:
    return nn.LayerNorm(size, eps=1e-12)  # ESPnet's LayerNorm


def rel_positions(length: int, d_model: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """ESPnet's ``RelPositionalEncoding`` table for ``length`` tokens: ``(1, 2 length - 1, d_model)``, row
    ``k`` encoding the relative position ``length - 1 - k`` (``sin`` on even, ``cos`` on odd channels)."""
    position = torch.arange(length - 1, -length, -1, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    pe = torch.zeros(2 * length - 1, d_model)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe.unsqueeze(0).to(dtype=dtype, device=device)


class RelPositionMultiHeadedAttention(nn.Module):
    """ESPnet's relative-position self-attention (Transformer-XL style, ``zero_triu=False``):
    ``forward(x (B, T, D), pos_emb (1, 2T-1, D), mask (B, 1, T)) -> (B, T, D)``."""

    def __init__(self, n_head: int, n_feat: int) -> None:
        super().__init__()
        if n_feat % n_head:
            raise ValueError(f"attention dim {n_feat} is not divisible by {n_head} heads")
        self.h, self.d_k = n_head, n_feat // n_head
        self.linear_q, self.linear_k = nn.Linear(n_feat, n_feat), nn.Linear(n_feat, n_feat)
        self.linear_v, self.linear_out = nn.Linear(n_feat, n_feat), nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(self.h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(self.h, self.d_k))

    def forward(self, x: Tensor, pos_emb: Tensor, mask: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = self.linear_q(x).view(B, T, self.h, self.d_k)  # (B, T, h, d_k)
        k = self.linear_k(x).view(B, T, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).view(B, T, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos_emb).view(1, -1, self.h, self.d_k).transpose(1, 2)  # (1, h, 2T-1, d_k)
        matrix_ac = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        matrix_bd = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))  # (B, h, T, 2T-1)
        # ESPnet's rel_shift: query i, key j reads relative position i - j (column T - 1 - i + j)
        index = (T - 1) - torch.arange(T, device=x.device)[:, None] + torch.arange(T, device=x.device)[None, :]
        matrix_bd = torch.gather(matrix_bd, -1, index.expand(B, self.h, T, T))
        scores = (matrix_ac + matrix_bd) / math.sqrt(self.d_k)
        pad = mask.unsqueeze(1).eq(0)  # (B, 1, 1, T)
        scores = scores.masked_fill(pad, torch.finfo(scores.dtype).min)
        attn = torch.softmax(scores, dim=-1).masked_fill(pad, 0.0)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(B, T, self.h * self.d_k)
        return self.linear_out(out)


class MultiLayeredConv1d(nn.Module):
    """ESPnet's position-wise conv feed-forward: ``w_2(relu(w_1(x)))`` over time, ``(B, T, D) -> (B, T, D)``."""

    def __init__(self, channels: int, hidden: int, kernel_size: int) -> None:
        super().__init__()
        self.w_1 = nn.Conv1d(channels, hidden, kernel_size, padding=(kernel_size - 1) // 2)
        self.w_2 = nn.Conv1d(hidden, channels, kernel_size, padding=(kernel_size - 1) // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(torch.relu(self.w_1(x.transpose(-1, 1)))).transpose(-1, 1)


class ConvolutionModule(nn.Module):
    """ESPnet's Conformer convolution: pointwise -> GLU -> depthwise -> BatchNorm -> activation -> pointwise,
    ``(B, T, D) -> (B, T, D)`` (no masking, as in ESPnet)."""

    def __init__(self, channels: int, kernel_size: int, activation: str) -> None:
        super().__init__()
        self.pointwise_conv1 = nn.Conv1d(channels, 2 * channels, 1)
        self.depthwise_conv = nn.Conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2,
                                        groups=channels)
        self.norm = nn.BatchNorm1d(channels)
        self.pointwise_conv2 = nn.Conv1d(channels, channels, 1)
        self.activation = ACTIVATIONS[activation]()

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.glu(self.pointwise_conv1(x.transpose(1, 2)), dim=1)
        x = self.activation(self.norm(self.depthwise_conv(x)))
        return self.pointwise_conv2(x).transpose(1, 2)


class EncoderLayer(nn.Module):
    """One Conformer block (ESPnet ``EncoderLayer``, ``concat_after=False``): optional macaron feed-forward
    (half step), self-attention, optional convolution module, feed-forward, ``norm_final``."""

    def __init__(self, size: int, heads: int, units: int, ff_kernel: int, macaron: bool, conv_kernel: int,
                 activation: str, normalize_before: bool) -> None:
        super().__init__()
        self.self_attn = RelPositionMultiHeadedAttention(heads, size)
        self.feed_forward = MultiLayeredConv1d(size, units, ff_kernel)
        self.feed_forward_macaron = MultiLayeredConv1d(size, units, ff_kernel) if macaron else None
        self.conv_module = ConvolutionModule(size, conv_kernel, activation) if conv_kernel else None
        self.norm_ff, self.norm_mha = _layer_norm(size), _layer_norm(size)
        if macaron:
            self.norm_ff_macaron = _layer_norm(size)
        if conv_kernel:
            self.norm_conv, self.norm_final = _layer_norm(size), _layer_norm(size)
        self.ff_scale = 0.5 if macaron else 1.0
        self.normalize_before = normalize_before

    def _residual(self, x: Tensor, norm: nn.Module, module, scale: float = 1.0) -> Tensor:
        out = x + scale * module(norm(x) if self.normalize_before else x)
        return out if self.normalize_before else norm(out)

    def forward(self, x: Tensor, pos_emb: Tensor, mask: Tensor) -> Tensor:
        """``x (B, T, D), pos_emb (1, 2T-1, D), mask (B, 1, T) -> (B, T, D)``."""
        if self.feed_forward_macaron is not None:
            x = self._residual(x, self.norm_ff_macaron, self.feed_forward_macaron, self.ff_scale)
        x = self._residual(x, self.norm_mha, lambda h: self.self_attn(h, pos_emb, mask))
        if self.conv_module is not None:
            x = self._residual(x, self.norm_conv, self.conv_module)
        x = self._residual(x, self.norm_ff, self.feed_forward, self.ff_scale)
        return self.norm_final(x) if self.conv_module is not None else x


class ConformerEncoder(nn.Module):
    """ESPnet's Conformer ``Encoder`` with ``input_layer=None`` and relative positions: ``x * sqrt(D)``, the
    blocks (``encoders``), then ``after_norm`` (when ``normalize_before``). ``(B, T, D), (B, 1, T) -> (B, T, D)``.
    """

    def __init__(self, size: int, heads: int, units: int, blocks: int, ff_kernel: int, macaron: bool,
                 conv_kernel: int, activation: str, normalize_before: bool) -> None:
        super().__init__()
        self.size = size
        self.encoders = nn.ModuleList(
            EncoderLayer(size, heads, units, ff_kernel, macaron, conv_kernel, activation, normalize_before)
            for _ in range(blocks)
        )
        self.after_norm = _layer_norm(size) if normalize_before else None

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x * math.sqrt(self.size)  # RelPositionalEncoding's xscale
        pos_emb = rel_positions(x.shape[1], self.size, x.dtype, x.device)
        for layer in self.encoders:
            x = layer(x, pos_emb, mask)
        return x if self.after_norm is None else self.after_norm(x)


class ConformerTextEncoder(nn.Module):
    """ESPnet2 VITS's ``TextEncoder`` with VITS's ``enc_p`` call contract:
    ``forward(x (B, T_text) long, x_lengths (B,)) -> (h (B, D, T_text), m_p, logs_p (B, D, T_text), x_mask
    (B, 1, T_text))``; ``m_p, logs_p`` are 0 on padding, ``h`` is not masked (as in ESPnet). Math:
    ``emb(x) * sqrt(D)`` -> :class:`ConformerEncoder` -> ``proj`` 1x1 conv to ``2 D`` -> mask -> split.
    ``conv_kernel=0``: no convolution module.
    """

    def __init__(self, n_vocab: int, hidden_channels: int, heads: int, units: int, blocks: int,
                 ff_kernel: int = 1, macaron: bool = True, conv_kernel: int = 7, activation: str = "swish",
                 normalize_before: bool = True) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.config = dict(n_vocab=n_vocab, hidden_channels=hidden_channels, heads=heads, units=units,
                           blocks=blocks, ff_kernel=ff_kernel, macaron=macaron, conv_kernel=conv_kernel,
                           activation=activation, normalize_before=normalize_before)
        self.hidden_channels = self.out_channels = hidden_channels
        self.emb = nn.Embedding(n_vocab, hidden_channels)
        nn.init.normal_(self.emb.weight, 0.0, hidden_channels**-0.5)
        self.encoder = ConformerEncoder(hidden_channels, heads, units, blocks, ff_kernel, macaron, conv_kernel,
                                        activation, normalize_before)
        self.proj = nn.Conv1d(hidden_channels, 2 * hidden_channels, 1)

    def forward(self, x: Tensor, x_lengths: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if not isinstance(x, Tensor) or x.dim() != 2 or x.dtype != torch.long:
            raise ValueError(f"x must be a long tensor of token ids (B, T_text), got {x!r:.80}")
        if not isinstance(x_lengths, Tensor) or x_lengths.shape != x.shape[:1]:
            raise ValueError(f"x_lengths must be a tensor of shape (B={x.shape[0]},)")
        h = self.emb(x) * math.sqrt(self.hidden_channels)  # (B, T, D)
        x_mask = (torch.arange(x.shape[1], device=x.device)[None, :] < x_lengths[:, None]).to(h.dtype)
        x_mask = x_mask.unsqueeze(1)  # (B, 1, T)
        h = self.encoder(h, x_mask).transpose(1, 2)  # (B, D, T)
        stats = self.proj(h) * x_mask
        m_p, logs_p = torch.split(stats, self.out_channels, dim=1)
        return h, m_p, logs_p, x_mask
