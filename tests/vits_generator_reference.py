"""A VITS generator (``SynthesizerTrn``'s latent path plus stand-ins for ``dec``/``dp``) written for the tests
from the published equations with VITS's key names, old-style weight norm (``weight_g``/``weight_v``), and
saved the way VITS's ``utils.save_checkpoint`` does. Not imported from the package."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import weight_norm as _old_weight_norm

WINDOW = 4


def weight_norm(conv: nn.Conv1d) -> nn.Conv1d:
    """The (deprecated) API VITS uses: state-dict keys ``weight_g`` / ``weight_v``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return _old_weight_norm(conv)


def seq_mask(lengths, frames):
    return (torch.arange(frames)[None, :] < lengths[:, None]).float().unsqueeze(1)


class RefLayerNorm(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x):  # normalise each frame over channels
        mean = x.mean(1, keepdim=True)
        var = ((x - mean) ** 2).mean(1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * self.gamma[:, None] + self.beta[:, None]


class RefAttention(nn.Module):
    """Multi-head self-attention, Shaw et al. relative keys/values clipped to |i - j| <= 4 (zero beyond)."""

    def __init__(self, channels, n_heads):
        super().__init__()
        self.n_heads, self.d = n_heads, channels // n_heads
        self.conv_q, self.conv_k, self.conv_v, self.conv_o = (
            nn.Conv1d(channels, channels, 1) for _ in range(4)
        )
        self.emb_rel_k = nn.Parameter(torch.randn(1, 2 * WINDOW + 1, self.d) * self.d**-0.5)
        self.emb_rel_v = nn.Parameter(torch.randn(1, 2 * WINDOW + 1, self.d) * self.d**-0.5)

    def table(self, emb, t):
        """(T, T, d): emb[j - i + 4] where |j - i| <= 4, zeros elsewhere."""
        out = torch.zeros(t, t, self.d)
        for i in range(t):
            for j in range(max(0, i - WINDOW), min(t, i + WINDOW + 1)):
                out[i, j] = emb[0, j - i + WINDOW]
        return out

    def forward(self, x, attn_mask):
        b, c, t = x.shape

        def heads(h):
            return h.view(b, self.n_heads, self.d, t).transpose(2, 3)  # (b, h, t, d)

        q, k, v = heads(self.conv_q(x)) / math.sqrt(self.d), heads(self.conv_k(x)), heads(self.conv_v(x))
        scores = q @ k.transpose(-1, -2) + torch.einsum("bhid,ijd->bhij", q, self.table(self.emb_rel_k, t))
        scores = scores.masked_fill(attn_mask == 0, -1e4)
        p = torch.softmax(scores, -1)
        out = p @ v + torch.einsum("bhij,ijd->bhid", p, self.table(self.emb_rel_v, t))
        return self.conv_o(out.transpose(2, 3).reshape(b, c, t))


class RefFFN(nn.Module):
    def __init__(self, channels, filter_channels, kernel):
        super().__init__()
        self.kernel = kernel
        self.conv_1 = nn.Conv1d(channels, filter_channels, kernel)
        self.conv_2 = nn.Conv1d(filter_channels, channels, kernel)

    def forward(self, x, mask):
        pad = ((self.kernel - 1) // 2, self.kernel // 2)
        x = torch.relu(self.conv_1(F.pad(x * mask, pad)))
        return self.conv_2(F.pad(x * mask, pad)) * mask


class RefEncoder(nn.Module):
    def __init__(self, hidden, filter_channels, n_heads, n_layers, kernel):
        super().__init__()
        self.attn_layers = nn.ModuleList(RefAttention(hidden, n_heads) for _ in range(n_layers))
        self.norm_layers_1 = nn.ModuleList(RefLayerNorm(hidden) for _ in range(n_layers))
        self.ffn_layers = nn.ModuleList(RefFFN(hidden, filter_channels, kernel) for _ in range(n_layers))
        self.norm_layers_2 = nn.ModuleList(RefLayerNorm(hidden) for _ in range(n_layers))

    def forward(self, x, mask):
        attn_mask = mask.unsqueeze(2) * mask.unsqueeze(-1)
        x = x * mask
        for attn, norm_1, ffn, norm_2 in zip(
            self.attn_layers, self.norm_layers_1, self.ffn_layers, self.norm_layers_2
        ):
            x = norm_1(x + attn(x, attn_mask))
            x = norm_2(x + ffn(x, mask))
        return x * mask


class RefTextEncoder(nn.Module):
    def __init__(self, n_vocab, out_channels, hidden, filter_channels, n_heads, n_layers, kernel):
        super().__init__()
        self.hidden, self.out_channels = hidden, out_channels
        self.emb = nn.Embedding(n_vocab, hidden)
        self.encoder = RefEncoder(hidden, filter_channels, n_heads, n_layers, kernel)
        self.proj = nn.Conv1d(hidden, 2 * out_channels, 1)

    def forward(self, x, lengths):
        h = (self.emb(x) * math.sqrt(self.hidden)).transpose(1, 2)
        mask = seq_mask(lengths, x.shape[1])
        h = self.encoder(h * mask, mask)
        m, logs = torch.split(self.proj(h) * mask, self.out_channels, 1)
        return h, m, logs, mask


class RefWN(nn.Module):
    def __init__(self, hidden, kernel, n_layers, gin):
        super().__init__()
        self.hidden, self.n_layers = hidden, n_layers
        if gin:
            self.cond_layer = weight_norm(nn.Conv1d(gin, 2 * hidden * n_layers, 1))
        self.in_layers = nn.ModuleList(
            weight_norm(nn.Conv1d(hidden, 2 * hidden, kernel, padding=kernel // 2)) for _ in range(n_layers)
        )
        self.res_skip_layers = nn.ModuleList(
            weight_norm(nn.Conv1d(hidden, 2 * hidden if i < n_layers - 1 else hidden, 1))
            for i in range(n_layers)
        )

    def forward(self, x, mask, g=None):
        out, h = 0, self.hidden
        cond = self.cond_layer(g) if g is not None else None
        for i in range(self.n_layers):
            a = self.in_layers[i](x) + (cond[:, 2 * h * i : 2 * h * (i + 1)] if cond is not None else 0)
            res_skip = self.res_skip_layers[i](torch.tanh(a[:, :h]) * torch.sigmoid(a[:, h:]))
            if i < self.n_layers - 1:
                x = (x + res_skip[:, :h]) * mask
                out = out + res_skip[:, h:]
            else:
                out = out + res_skip
        return out * mask


class RefPosteriorEncoder(nn.Module):
    def __init__(self, spec, inter, hidden, gin):
        super().__init__()
        self.inter = inter
        self.pre = nn.Conv1d(spec, hidden, 1)
        self.enc = RefWN(hidden, 5, 16, gin)
        self.proj = nn.Conv1d(hidden, 2 * inter, 1)

    def forward(self, y, lengths, g=None):
        mask = seq_mask(lengths, y.shape[-1])
        m, logs = torch.split(self.proj(self.enc(self.pre(y) * mask, mask, g)) * mask, self.inter, 1)
        return m, logs, mask


class RefCoupling(nn.Module):
    def __init__(self, channels, hidden, gin):
        super().__init__()
        self.half = channels // 2
        self.pre = nn.Conv1d(self.half, hidden, 1)
        self.enc = RefWN(hidden, 5, 4, gin)
        self.post = nn.Conv1d(hidden, self.half, 1)  # mean-only

    def forward(self, x, mask, g=None):
        x0, x1 = x[:, : self.half], x[:, self.half :]
        shift = self.post(self.enc(self.pre(x0) * mask, mask, g)) * mask
        return torch.cat([x0, shift + x1 * mask], 1)


class RefFlip(nn.Module):
    pass


class RefFlow(nn.Module):
    def __init__(self, channels, hidden, gin, n_flows=4):
        super().__init__()
        self.flows = nn.ModuleList()
        for _ in range(n_flows):
            self.flows.extend([RefCoupling(channels, hidden, gin), RefFlip()])

    def forward(self, z, mask, g=None):
        for layer in self.flows:
            z = torch.flip(z, [1]) if isinstance(layer, RefFlip) else layer(z, mask, g)
        return z


class RefGenerator(nn.Module):
    """The keys of VITS's SynthesizerTrn: enc_p, enc_q, flow, emb_g, plus stand-ins for dec and dp."""

    def __init__(
        self,
        n_vocab=20,
        spec=17,
        inter=6,
        hidden=8,
        filter_channels=12,
        n_heads=2,
        n_layers=2,
        kernel=3,
        n_speakers=0,
        gin=0,
    ):
        super().__init__()
        self.enc_p = RefTextEncoder(n_vocab, inter, hidden, filter_channels, n_heads, n_layers, kernel)
        self.enc_q = RefPosteriorEncoder(spec, inter, hidden, gin)
        self.flow = RefFlow(inter, hidden, gin)
        self.dec = nn.Conv1d(inter, 1, 7)
        self.dp = nn.Conv1d(hidden, 1, 3)
        if n_speakers > 1:
            self.emb_g = nn.Embedding(n_speakers, gin)


def randomized(module: nn.Module, seed: int, scale: float = 0.3) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen))
    return module


def save_like_vits(model: nn.Module, path) -> None:
    """VITS utils.save_checkpoint: {'model', 'iteration', 'optimizer', 'learning_rate'}."""
    optimizer = torch.optim.AdamW(model.parameters(), 2e-4, betas=(0.8, 0.99), eps=1e-9)
    torch.save(
        {
            "model": model.state_dict(),
            "iteration": 1000,
            "optimizer": optimizer.state_dict(),
            "learning_rate": 2e-4,
        },
        path,
    )


def vits_config(gen_kwargs: dict, sampling_rate=8000, filter_length=32, hop_length=8) -> dict:
    """A VITS config.json for a RefGenerator built with ``gen_kwargs``."""
    defaults = dict(
        n_vocab=20,
        spec=17,
        inter=6,
        hidden=8,
        filter_channels=12,
        n_heads=2,
        n_layers=2,
        kernel=3,
        n_speakers=0,
        gin=0,
    )
    kw = {**defaults, **gen_kwargs}
    return {
        "train": {"segment_size": 8192},
        "data": {
            "sampling_rate": sampling_rate,
            "filter_length": filter_length,
            "hop_length": hop_length,
            "win_length": filter_length,
            "add_blank": True,
            "n_speakers": kw["n_speakers"],
            "cleaned_text": True,
        },
        "model": {
            "inter_channels": kw["inter"],
            "hidden_channels": kw["hidden"],
            "filter_channels": kw["filter_channels"],
            "n_heads": kw["n_heads"],
            "n_layers": kw["n_layers"],
            "kernel_size": kw["kernel"],
            "p_dropout": 0.1,
            "gin_channels": kw["gin"],
        },
    }
