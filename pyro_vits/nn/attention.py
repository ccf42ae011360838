"""VITS's transformer pieces (``attentions.py`` of VITS, VITS2 and Bert-VITS2) with the upstream parameter
names.

Every module works channels-first: ``x (B, C, T)``, ``x_mask (B, 1, T)`` (1 = real frame, real frames form a
prefix), speaker conditioning ``g (B, gin, 1)``. Written from the published architecture (Vaswani et al. 2017;
Shaw et al. 2018 relative positions with a clipped window, zero beyond it; VITS 2021; VITS2 2023):

- :class:`LayerNorm`: layer norm over channels, parameters ``gamma``/``beta``, ``eps = 1e-5``.
- :class:`MultiHeadAttention`: 1x1 convolutions ``conv_q``/``conv_k``/``conv_v``/``conv_o``; scores
  ``q k^T / sqrt(d_k)`` plus, with ``window_size = w``, relative-key logits
  ``q . emb_rel_k[j - i + w] / sqrt(d_k)`` for ``|j - i| <= w`` (0 beyond) and relative values
  ``sum_j p_ij emb_rel_v[j - i + w]``; masked scores are set to ``-1e4`` as VITS does (not ``-inf``).
- :class:`FFN`: ``conv_2(act(conv_1(x)))`` with VITS's "same" (``(k-1)//2`` left, ``k//2`` right) or causal
  (``k-1`` left) zero padding and masking before each convolution; ``act`` is ReLU or VITS's
  ``x * sigmoid(1.702 x)`` GELU approximation.
- :class:`Encoder`: VITS's post-norm encoder (``attn_layers``/``norm_layers_1``/``ffn_layers``/
  ``norm_layers_2``); with ``gin_channels > 0`` VITS2's speaker conditioning adds ``spk_emb_linear(g)`` to the
  input of layer ``cond_layer_idx``.
- :class:`FFT`: the decoder-style block with causal self-attention (``self_attn_layers``/``norm_layers_0``/
  ``ffn_layers``/``norm_layers_1``) used by VITS2's ``fft`` flow; ``isflow`` with ``gin_channels > 0`` gates
  each layer's input with the speaker (``cond_pre``, weight-normed ``cond_layer``).

Dropout modules (``drop``) exist for parity; they are identities in ``eval()`` mode and with ``p_dropout=0``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import check_nonnegative_ints, check_positive_ints
from .conv import gated_activation, weight_normed_conv1d

__all__ = ["LayerNorm", "MultiHeadAttention", "FFN", "Encoder", "FFT"]

MASKED_SCORE = -1e4  # VITS's fill value for masked attention scores


class LayerNorm(nn.Module):
    """Layer norm over the channel dim of ``(B, C, T)``; parameters ``gamma (C,)``, ``beta (C,)``."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        check_positive_ints(channels=channels)
        self.channels = channels
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.transpose(1, -1), (self.channels,), self.gamma, self.beta, self.eps)
        return y.transpose(1, -1)


class MultiHeadAttention(nn.Module):
    """Multi-head attention ``(x (B, C, T_q), c (B, C, T_k), attn_mask (B|1, 1, T_q, T_k)) -> (B, out, T_q)``.

    ``window_size``: relative-position window (self-attention only); ``heads_share``: one relative table for
    all heads (``emb_rel_k``/``emb_rel_v`` of shape ``(1 or n_heads, 2 w + 1, C / n_heads)``);
    ``proximal_bias`` adds ``-log(1 + |i - j|)``; ``block_length`` (applied with a mask, as upstream) masks
    ``|i - j| > block_length``; ``proximal_init`` starts ``conv_k`` equal to ``conv_q``.
    """

    def __init__(
        self,
        channels: int,
        out_channels: int,
        n_heads: int,
        p_dropout: float = 0.0,
        window_size: int | None = None,
        heads_share: bool = True,
        block_length: int | None = None,
        proximal_bias: bool = False,
        proximal_init: bool = False,
    ) -> None:
        super().__init__()
        check_positive_ints(channels=channels, out_channels=out_channels, n_heads=n_heads)
        check_positive_ints(allow_none=True, window_size=window_size, block_length=block_length)
        if channels % n_heads:
            raise ValueError(f"channels ({channels}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.k_channels = channels // n_heads
        self.window_size = window_size
        self.block_length = block_length
        self.proximal_bias = proximal_bias
        self.conv_q = nn.Conv1d(channels, channels, 1)
        self.conv_k = nn.Conv1d(channels, channels, 1)
        self.conv_v = nn.Conv1d(channels, channels, 1)
        self.conv_o = nn.Conv1d(channels, out_channels, 1)
        self.drop = nn.Dropout(p_dropout)
        if window_size is not None:
            shape = (1 if heads_share else n_heads, 2 * window_size + 1, self.k_channels)
            self.emb_rel_k = nn.Parameter(torch.randn(shape) * self.k_channels**-0.5)
            self.emb_rel_v = nn.Parameter(torch.randn(shape) * self.k_channels**-0.5)
        for conv in (self.conv_q, self.conv_k, self.conv_v):
            nn.init.xavier_uniform_(conv.weight)
        if proximal_init:
            with torch.no_grad():
                self.conv_k.weight.copy_(self.conv_q.weight)
                self.conv_k.bias.copy_(self.conv_q.bias)

    def forward(self, x: Tensor, c: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        return self.conv_o(self._attend(self.conv_q(x), self.conv_k(c), self.conv_v(c), attn_mask))

    def _heads(self, h: Tensor) -> Tensor:
        """``(B, C, T) -> (B, heads, T, d_k)``."""
        return h.reshape(h.shape[0], self.n_heads, self.k_channels, h.shape[-1]).transpose(2, 3)

    def _relative_index(self, length: int, device: torch.device) -> Tensor:
        """``(T, T)`` table index ``j - i + w`` for ``|j - i| <= w``, else ``2 w + 1`` (the zero row)."""
        w = self.window_size
        pos = torch.arange(length, device=device)
        rel = pos[None, :] - pos[:, None]
        return torch.where(rel.abs() <= w, rel + w, torch.full_like(rel, 2 * w + 1))

    @staticmethod
    def _with_zero_row(emb: Tensor) -> Tensor:
        return torch.cat([emb, emb.new_zeros(emb.shape[0], 1, emb.shape[2])], 1).unsqueeze(0)

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> Tensor:
        b, channels, t_q = query.shape
        t_k = key.shape[-1]
        q = self._heads(query) / math.sqrt(self.k_channels)
        k, v = self._heads(key), self._heads(value)
        scores = torch.matmul(q, k.transpose(-2, -1))
        if self.window_size is not None or self.proximal_bias or self.block_length is not None:
            if t_q != t_k:
                raise ValueError(
                    f"relative positions, proximal bias and blocks need self-attention, got "
                    f"{t_q} queries and {t_k} keys"
                )
        index = None
        if self.window_size is not None:
            index = self._relative_index(t_q, q.device).expand(b, self.n_heads, t_q, t_q)
            rel_logits = torch.matmul(q, self._with_zero_row(self.emb_rel_k).transpose(-2, -1))
            scores = scores + torch.gather(rel_logits, -1, index)
        if self.proximal_bias:
            pos = torch.arange(t_q, device=q.device)
            scores = scores - torch.log1p((pos[None, :] - pos[:, None]).abs().to(scores.dtype))
        if mask is not None:
            scores = scores.masked_fill(mask == 0, MASKED_SCORE)
            if self.block_length is not None:
                band = torch.ones_like(scores).triu(-self.block_length).tril(self.block_length)
                scores = scores.masked_fill(band == 0, MASKED_SCORE)
        p_attn = self.drop(F.softmax(scores, dim=-1))
        out = torch.matmul(p_attn, v)
        if index is not None:
            width = 2 * self.window_size + 2
            rel_weights = p_attn.new_zeros(b, self.n_heads, t_q, width).scatter_add_(-1, index, p_attn)
            out = out + torch.matmul(rel_weights, self._with_zero_row(self.emb_rel_v))
        return out.transpose(2, 3).reshape(b, channels, t_q)


class FFN(nn.Module):
    """Position-wise convolutional feed-forward ``(B, C_in, T), mask (B, 1, T) -> (B, C_out, T)`` (masked)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        filter_channels: int,
        kernel_size: int,
        p_dropout: float = 0.0,
        activation: str | None = None,
        causal: bool = False,
    ) -> None:
        super().__init__()
        check_positive_ints(
            in_channels=in_channels,
            out_channels=out_channels,
            filter_channels=filter_channels,
            kernel_size=kernel_size,
        )
        if activation not in (None, "relu", "gelu"):
            raise ValueError(f"activation must be None, 'relu' or 'gelu', got {activation!r}")
        self.kernel_size = kernel_size
        self.activation = activation
        self.causal = causal
        self.conv_1 = nn.Conv1d(in_channels, filter_channels, kernel_size)
        self.conv_2 = nn.Conv1d(filter_channels, out_channels, kernel_size)
        self.drop = nn.Dropout(p_dropout)

    def _pad(self, x: Tensor) -> Tensor:
        k = self.kernel_size
        if k == 1:
            return x
        return F.pad(x, (k - 1, 0) if self.causal else ((k - 1) // 2, k // 2))

    def forward(self, x: Tensor, x_mask: Tensor) -> Tensor:
        h = self.conv_1(self._pad(x * x_mask))
        h = h * torch.sigmoid(1.702 * h) if self.activation == "gelu" else torch.relu(h)
        h = self.conv_2(self._pad(self.drop(h) * x_mask))
        return h * x_mask


class Encoder(nn.Module):
    """VITS's transformer encoder: ``forward(x (B, H, T), x_mask (B, 1, T), g (B, gin, 1) | None)``
    ``-> (B, H, T)``.

    Each of ``n_layers`` layers: ``x = norm_1(x + attn(x))``, ``x = norm_2(x + ffn(x))`` with key/query mask
    ``x_mask_i x_mask_j`` and relative positions in a window of ``window_size`` (None: absolute only). With
    ``gin_channels > 0`` (VITS2 / Bert-VITS2) and ``g`` given, ``spk_emb_linear(g)`` is added to the input of
    layer ``cond_layer_idx`` (must be ``< n_layers``). Output masked.
    """

    def __init__(
        self,
        hidden_channels: int,
        filter_channels: int,
        n_heads: int,
        n_layers: int,
        kernel_size: int = 1,
        p_dropout: float = 0.0,
        window_size: int | None = 4,
        *,
        gin_channels: int = 0,
        cond_layer_idx: int = 2,
    ) -> None:
        super().__init__()
        check_positive_ints(hidden_channels=hidden_channels, n_layers=n_layers)
        check_nonnegative_ints(gin_channels=gin_channels)
        self.hidden_channels = hidden_channels
        self.n_layers = n_layers
        self.gin_channels = gin_channels
        self.cond_layer_idx = n_layers
        if gin_channels > 0:
            if not isinstance(cond_layer_idx, int) or not 0 <= cond_layer_idx < n_layers:
                raise ValueError(
                    f"cond_layer_idx must be in [0, n_layers={n_layers}), got {cond_layer_idx!r}"
                )
            self.cond_layer_idx = cond_layer_idx
            self.spk_emb_linear = nn.Linear(gin_channels, hidden_channels)
        self.drop = nn.Dropout(p_dropout)
        self.attn_layers = nn.ModuleList(
            MultiHeadAttention(hidden_channels, hidden_channels, n_heads, p_dropout, window_size)
            for _ in range(n_layers)
        )
        self.norm_layers_1 = nn.ModuleList(LayerNorm(hidden_channels) for _ in range(n_layers))
        self.ffn_layers = nn.ModuleList(
            FFN(hidden_channels, hidden_channels, filter_channels, kernel_size, p_dropout)
            for _ in range(n_layers)
        )
        self.norm_layers_2 = nn.ModuleList(LayerNorm(hidden_channels) for _ in range(n_layers))

    def forward(self, x: Tensor, x_mask: Tensor, g: Tensor | None = None) -> Tensor:
        attn_mask = x_mask.unsqueeze(2) * x_mask.unsqueeze(-1)
        x = x * x_mask
        for i in range(self.n_layers):
            if i == self.cond_layer_idx and g is not None:
                x = (x + self.spk_emb_linear(g.transpose(1, 2)).transpose(1, 2)) * x_mask
            x = self.norm_layers_1[i](x + self.drop(self.attn_layers[i](x, x, attn_mask)))
            x = self.norm_layers_2[i](x + self.drop(self.ffn_layers[i](x, x_mask)))
        return x * x_mask


class FFT(nn.Module):
    """Causal transformer block ``forward(x (B, H, T), x_mask (B, 1, T), g (B, gin, 1) | None) -> (B, H, T)``.

    Each layer: (with ``g``) ``x = tanh(a + g_a) * sigmoid(b + g_b)`` where ``(a, b) = cond_pre(x)`` and
    ``(g_a, g_b)`` is the layer's slice of ``cond_layer(g)``; then ``x = norm_0(x + attn(x))`` with a causal
    (lower-triangular) mask and ``x = norm_1(x + ffn(x))`` with a causal FFN. Output masked. The speaker
    layers exist when ``isflow`` and ``gin_channels > 0``.
    """

    def __init__(
        self,
        hidden_channels: int,
        filter_channels: int,
        n_heads: int,
        n_layers: int = 1,
        kernel_size: int = 1,
        p_dropout: float = 0.0,
        proximal_bias: bool = False,
        proximal_init: bool = True,
        isflow: bool = False,
        *,
        gin_channels: int = 0,
    ) -> None:
        super().__init__()
        check_positive_ints(hidden_channels=hidden_channels, n_layers=n_layers)
        check_nonnegative_ints(gin_channels=gin_channels)
        self.hidden_channels = hidden_channels
        self.n_layers = n_layers
        self.gin_channels = gin_channels if isflow else 0
        if self.gin_channels:
            self.cond_pre = nn.Conv1d(hidden_channels, 2 * hidden_channels, 1)
            self.cond_layer = weight_normed_conv1d(gin_channels, 2 * hidden_channels * n_layers)
        self.drop = nn.Dropout(p_dropout)
        self.self_attn_layers = nn.ModuleList(
            MultiHeadAttention(
                hidden_channels,
                hidden_channels,
                n_heads,
                p_dropout,
                proximal_bias=proximal_bias,
                proximal_init=proximal_init,
            )
            for _ in range(n_layers)
        )
        self.norm_layers_0 = nn.ModuleList(LayerNorm(hidden_channels) for _ in range(n_layers))
        self.ffn_layers = nn.ModuleList(
            FFN(hidden_channels, hidden_channels, filter_channels, kernel_size, p_dropout, causal=True)
            for _ in range(n_layers)
        )
        self.norm_layers_1 = nn.ModuleList(LayerNorm(hidden_channels) for _ in range(n_layers))

    def forward(self, x: Tensor, x_mask: Tensor, g: Tensor | None = None) -> Tensor:
        hidden = self.hidden_channels
        cond = self.cond_layer(g) if g is not None and self.gin_channels else None
        length = x_mask.shape[-1]
        causal = torch.ones(length, length, dtype=x.dtype, device=x.device).tril()[None, None]
        x = x * x_mask
        for i in range(self.n_layers):
            if cond is not None:
                x = gated_activation(self.cond_pre(x), cond, i, hidden)
            x = self.norm_layers_0[i](x + self.drop(self.self_attn_layers[i](x, x, causal)))
            x = self.norm_layers_1[i](x + self.drop(self.ffn_layers[i](x, x_mask)))
        return x * x_mask
