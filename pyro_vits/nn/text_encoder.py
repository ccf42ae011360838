"""VITS's text encoder (``enc_p``): token ids -> per-token prior statistics ``m_p, logs_p``.

Parameter names follow VITS ``models.TextEncoder`` (``emb``, ``encoder.attn_layers.<i>`` with relative
positions ``emb_rel_k``/``emb_rel_v``, ``encoder.norm_layers_1.<i>``, ``encoder.ffn_layers.<i>``,
``encoder.norm_layers_2.<i>``, ``proj``) so a VITS generator's ``enc_p.*`` entries load strictly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._masks import sequence_mask
from .._validate import check_positive_ints
from .attention import Encoder

__all__ = ["TextEncoder"]

WINDOW_SIZE = 4
"""Relative-position window of VITS's text encoder attention."""


class TextEncoder(nn.Module):
    """``forward(x (B, T_text) long, x_lengths (B,)) -> (h, m_p, logs_p, x_mask)``.

    ``h (B, hidden, T_text)`` is the encoder output; ``m_p, logs_p (B, out_channels, T_text)`` the prior's
    mean and log-scale per token (VITS's ``inter_channels``), ``x_mask (B, 1, T_text)``; all 0 on padding.
    Math: ``emb(x) * sqrt(hidden)`` -> mask -> transformer :class:`~pyro_vits.nn.attention.Encoder`
    (relative window 4) -> ``proj`` 1x1 conv to ``2 out_channels`` -> mask -> split.
    """

    def __init__(
        self,
        n_vocab: int,
        out_channels: int,
        hidden_channels: int,
        filter_channels: int,
        n_heads: int,
        n_layers: int,
        kernel_size: int,
        p_dropout: float,
    ) -> None:
        super().__init__()
        check_positive_ints(
            n_vocab=n_vocab,
            out_channels=out_channels,
            hidden_channels=hidden_channels,
            filter_channels=filter_channels,
            n_heads=n_heads,
            n_layers=n_layers,
            kernel_size=kernel_size,
        )
        if not 0.0 <= p_dropout < 1.0:
            raise ValueError(f"p_dropout must be in [0, 1), got {p_dropout!r}")
        self.config = dict(
            n_vocab=n_vocab,
            out_channels=out_channels,
            hidden_channels=hidden_channels,
            filter_channels=filter_channels,
            n_heads=n_heads,
            n_layers=n_layers,
            kernel_size=kernel_size,
            p_dropout=p_dropout,
        )
        self.out_channels = out_channels
        self.hidden_channels = hidden_channels
        self.emb = nn.Embedding(n_vocab, hidden_channels)
        nn.init.normal_(self.emb.weight, 0.0, hidden_channels**-0.5)
        self.encoder = Encoder(
            hidden_channels,
            filter_channels,
            n_heads,
            n_layers,
            kernel_size,
            p_dropout,
            window_size=WINDOW_SIZE,
        )
        self.proj = nn.Conv1d(hidden_channels, 2 * out_channels, 1)

    def forward(self, x: Tensor, x_lengths: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if not isinstance(x, Tensor) or x.dim() != 2 or x.dtype != torch.long:
            raise ValueError(f"x must be a long tensor of token ids (B, T_text), got {x!r:.80}")
        if not isinstance(x_lengths, Tensor) or x_lengths.shape != x.shape[:1]:
            raise ValueError(f"x_lengths must be a tensor of shape (B={x.shape[0]},)")
        h = self.emb(x) * math.sqrt(self.hidden_channels)  # (B, T, H)
        h = h.transpose(1, -1)  # (B, H, T)
        x_mask = sequence_mask(x_lengths, h.shape[-1]).to(h.dtype)
        h = self.encoder(h * x_mask, x_mask)
        stats = self.proj(h) * x_mask
        m_p, logs_p = torch.split(stats, self.out_channels, dim=1)
        return h, m_p, logs_p, x_mask
