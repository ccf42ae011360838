"""Building blocks shared by the flows and encoders, with the upstream (VITS / VITS2 / Bert-VITS2) parameter
names so that their state dicts load strictly.

Shapes follow VITS: channels first, ``x (B, C, T)``, masks ``(B, 1, T)`` (1 = real frame).
"""

from __future__ import annotations

from .attention import FFN, FFT, Encoder, LayerNorm, MultiHeadAttention
from .conv import gated_activation, weight_normed_conv1d

__all__ = ["LayerNorm", "MultiHeadAttention", "FFN", "Encoder", "FFT", "weight_normed_conv1d", "gated_activation"]
