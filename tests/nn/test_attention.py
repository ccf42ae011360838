"""pyro_vits.nn.attention against references of VITS's transformer pieces.

``vits_reference`` (the flows' functional reference) covers LayerNorm, FFN, Encoder and FFT; the attention
options are also checked against ``ref_attention`` below, which works position by position from the published
equations (scaled dot-product attention, Shaw et al. relative keys/values in a clipped window with zeros
beyond it). Both read the weights by VITS's parameter names from a state dict; neither imports pyro_vits.
"""

from __future__ import annotations

import math

import pytest
import torch
from vits_reference import ref_conv, ref_encoder, ref_ffn, ref_fft

from pyro_vits.nn import FFN, FFT, Encoder, LayerNorm, MultiHeadAttention

pytestmark = pytest.mark.usefixtures("single_thread")
DTYPE = torch.float64


# --------------------------------------------------------------------------- reference


def ref_attention(x, mask, sd, name, n_heads, window=None, proximal=False, block=None):
    """Self-attention of ``x (B, C, T)``; ``mask (B|1, T, T)`` or None; literal loops over positions."""
    q, k, v = (ref_conv(x, sd, f"{name}.conv_{s}") for s in "qkv")
    b_size, channels, t = x.shape
    d = channels // n_heads
    out = torch.zeros_like(x)
    for b in range(b_size):
        for h in range(n_heads):
            qh, kh, vh = (m[b, h * d : (h + 1) * d] for m in (q, k, v))  # (d, T)
            rel = h if window is not None and sd[f"{name}.emb_rel_k"].shape[0] > 1 else 0
            scores = torch.empty(t, t, dtype=x.dtype)
            for i in range(t):
                for j in range(t):
                    s = qh[:, i] @ kh[:, j] / math.sqrt(d)
                    if window is not None and abs(j - i) <= window:
                        s = s + qh[:, i] @ sd[f"{name}.emb_rel_k"][rel, j - i + window] / math.sqrt(d)
                    if proximal:
                        s = s - math.log1p(abs(i - j))
                    if mask is not None and (mask[b if mask.shape[0] > 1 else 0, i, j] == 0
                                             or (block is not None and abs(i - j) > block)):
                        s = torch.tensor(-1e4, dtype=x.dtype)
                    scores[i, j] = s
            p = torch.softmax(scores, -1)
            for i in range(t):
                o = vh @ p[i]
                if window is not None:
                    for j in range(t):
                        if abs(j - i) <= window:
                            o = o + p[i, j] * sd[f"{name}.emb_rel_v"][rel, j - i + window]
                out[b, h * d : (h + 1) * d, i] = o
    return ref_conv(out, sd, f"{name}.conv_o")


# --------------------------------------------------------------------------- helpers


def inputs(channels, lengths, t, gin=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), channels, t, generator=gen, dtype=DTYPE)
    mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).to(DTYPE).unsqueeze(1)
    g = torch.randn(len(lengths), gin, 1, generator=gen, dtype=DTYPE) if gin else None
    return x, mask, g


def state(module):
    return {k: v.detach() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("t", [3, 11], ids=lambda t: f"T{t}")  # shorter and longer than the window
@pytest.mark.parametrize("window", [4, None], ids=["rel4", "abs"])
@pytest.mark.parametrize("gin", [0, 3], ids=lambda g: f"gin{g}")
def test_encoder_matches_reference(t, window, gin, randomize):
    enc = Encoder(8, 12, 2, 3, kernel_size=3, window_size=window, gin_channels=gin, cond_layer_idx=1)
    randomize(enc.to(DTYPE), seed=1, scale=0.4).eval()
    x, mask, g = inputs(8, [t, max(1, t - 2)], t, gin)
    with torch.no_grad():
        y = enc(x, mask, g)
        y_ref = ref_encoder(x, mask, state(enc), "", 2, g, cond_idx=1)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    assert float(y.abs().max()) > 0.1


def test_encoder_default_api_is_vits(randomize):
    enc = Encoder(6, 10, 2, 2)  # VITS: kernel_size=1, p_dropout=0, window_size=4, no speaker input
    names = set(enc.state_dict())
    assert "attn_layers.0.emb_rel_k" in names and "ffn_layers.1.conv_2.weight" in names
    assert "norm_layers_2.1.gamma" in names and not any(n.startswith("spk_emb_linear") for n in names)
    assert enc.attn_layers[0].emb_rel_k.shape == (1, 9, 3)
    randomize(enc.to(DTYPE), seed=2).eval()
    x, mask, _ = inputs(6, [7, 4], 7)
    with torch.no_grad():
        torch.testing.assert_close(enc(x, mask), ref_encoder(x, mask, state(enc), "", 2),
                                   rtol=0, atol=1e-10)


def test_encoder_padded_frames_do_not_change_valid_outputs(randomize):
    enc = randomize(Encoder(8, 12, 2, 2, kernel_size=3).to(DTYPE), seed=3).eval()
    x, mask, _ = inputs(8, [9, 5], 9)
    noisy = torch.where(mask > 0, x, 5 * torch.randn(x.shape, dtype=DTYPE))
    with torch.no_grad():
        y, y_noisy = enc(x, mask), enc(noisy, mask)
    torch.testing.assert_close(y_noisy, y, rtol=0, atol=1e-12)
    assert torch.equal(y[1, :, 5:], torch.zeros_like(y[1, :, 5:]))


@pytest.mark.parametrize("variant", ["per-head+proximal", "block"])
def test_attention_options_match_reference(variant, randomize):
    per_head = variant == "per-head+proximal"
    attn = MultiHeadAttention(8, 6, 2, window_size=2, heads_share=not per_head,
                              proximal_bias=per_head, block_length=None if per_head else 1)
    randomize(attn.to(DTYPE), seed=4, scale=0.4).eval()
    x, mask, _ = inputs(8, [6, 4], 6)
    attn_mask = mask * mask.transpose(1, 2)
    with torch.no_grad():
        y = attn(x, x, attn_mask.unsqueeze(1))
        y_ref = ref_attention(x, attn_mask, prefixed(attn, "a"), "a", 2, window=2, proximal=per_head,
                              block=None if per_head else 1)
    assert attn.emb_rel_k.shape[0] == (2 if per_head else 1)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True], ids=["same", "causal"])
def test_ffn_gelu_matches_reference(causal, randomize):
    ffn = randomize(FFN(4, 5, 7, 4, activation="gelu", causal=causal).to(DTYPE), seed=5).eval()
    x, mask, _ = inputs(4, [6, 3], 6)
    with torch.no_grad():
        torch.testing.assert_close(ffn(x, mask), ref_ffn(x, mask, prefixed(ffn, "f"), "f", causal, gelu=True),
                                   rtol=0, atol=1e-12)


def prefixed(module, prefix):
    return {f"{prefix}.{k}": v for k, v in state(module).items()}


@pytest.mark.parametrize("gin", [0, 3], ids=lambda g: f"gin{g}")
def test_fft_matches_reference(gin, randomize):
    fft = FFT(8, 12, 4, n_layers=2, kernel_size=3, isflow=True, gin_channels=gin)
    randomize(fft.to(DTYPE), seed=6, scale=0.4).eval()
    names = set(fft.state_dict())
    assert ("cond_layer.parametrizations.weight.original1" in names) == bool(gin)
    x, mask, g = inputs(8, [7, 4], 7, gin)
    with torch.no_grad():
        y = fft(x, mask, g)
        y_ref = ref_fft(x, mask, state(fft), "", 4, g)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)


def test_layer_norm_and_bad_arguments():
    norm = LayerNorm(3)
    assert set(norm.state_dict()) == {"gamma", "beta"}
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(6, 6, 4)
    with pytest.raises(ValueError, match="cond_layer_idx"):
        Encoder(8, 8, 2, 2, gin_channels=3)  # VITS2's default cond_layer_idx=2 needs n_layers > 2
    with pytest.raises(ValueError, match="activation"):
        FFN(2, 2, 2, 1, activation="swish")
    with pytest.raises(ValueError, match="window_size"):
        Encoder(8, 8, 2, 2, window_size=0)
