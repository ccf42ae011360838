"""The benchmarked problem: VITS's prior flow, a batch of variable-length utterances, two guides, and VITS's
hand-written KL step on the same weights.

Sizes follow VITS (``configs/ljs_base.json``): prior flow C = hidden = 192, kernel 5, dilation 1, 4 WN layers,
4 couplings; posterior encoder ``enc_q`` with 513 linear-spectrogram channels and 16 WN layers; B = 8
utterances of at most T = 200 frames.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import pyro
import torch
from torch import Tensor

from ..flows import ResidualCouplingBlock
from ..models.guides import PosteriorEncoder

__all__ = [
    "FULL_SIZE",
    "QUICK_SIZE",
    "LEAK_SIZE",
    "GUIDES",
    "GUIDE_DESCRIPTIONS",
    "OPTIM",
    "Problem",
    "SpecBatch",
    "seed_all",
    "make_problem",
    "vits_posterior",
    "vits_kl_sum",
    "raw_loss",
]

FULL_SIZE = dict(channels=192, hidden=192, kernel_size=5, dilation_rate=1, n_layers=4, n_flows=4, T=200, B=8,
                 x_channels=513, enc_layers=16)
"""VITS's sizes (the committed numbers)."""
QUICK_SIZE = dict(channels=8, hidden=16, kernel_size=3, dilation_rate=1, n_layers=2, n_flows=2, T=24, B=3,
                  x_channels=10, enc_layers=2)
"""Tiny sizes for ``--quick`` (checks the machinery; its ratios mean nothing)."""
LEAK_SIZE = dict(channels=4, hidden=4, kernel_size=3, dilation_rate=1, n_layers=1, n_flows=1, T=8, B=2,
                 x_channels=4, enc_layers=1)
"""The leak check's flow: small, so that a step's cost is mostly Pyro's own."""
GUIDES = ("encoder", "free")
GUIDE_DESCRIPTIONS = {
    "encoder": "m_q, logs_q = PosteriorEncoder(x) (pyro_vits.models.guides, VITS enc_q: x_channels -> pre 1x1 -> WN "
               "(enc_layers) -> proj 1x1), computed once per step and shared by vectorised particles",
    "free": "m_q, logs_q learnable (B, C, T) tensors (no encoder): every particle's cost is the flow",
}
OPTIM = dict(lr=2e-4, betas=(0.8, 0.99), eps=1e-9)
"""VITS's optimiser hyper-parameters (AdamW there; Adam here, identical in both steps)."""


def seed_all(seed: int) -> None:
    """Seed Python, NumPy, torch and Pyro."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)


@dataclass
class Problem:
    """A flow, a batch ``mask (B, 1, T)``, prior stats ``m_p, logs_p (B, C, T)``, the free guide's initial
    ``m_q0, logs_q0 (B, C, T)`` and, for ``guide == "encoder"``, VITS's encoder and its input
    ``x (B, x_channels, T)`` (0 on padding)."""

    flow: ResidualCouplingBlock
    mask: Tensor
    m_p: Tensor
    logs_p: Tensor
    m_q0: Tensor
    logs_q0: Tensor
    size: dict = field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    guide: str = "free"
    encoder: PosteriorEncoder | None = None
    x: Tensor | None = None

    @property
    def B(self) -> int:
        return self.size["B"]


@dataclass
class SpecBatch:
    """What ``PosteriorEncoder.posterior`` reads from a batch: ``x (B, x_channels, T)`` and ``mask``
    (:class:`~pyro_vits.data.batch.Batch` requires ``x`` to have the latent's shape; VITS's encoder reads a
    513-channel spectrogram)."""

    x: Tensor
    mask: Tensor
    speaker: None = None

    @property
    def channels(self) -> int:
        return self.x.shape[1]


def make_problem(size: dict, device: str | torch.device = "cpu", seed: int = 0,
                 guide: str = "free") -> Problem:
    """Flow with VITS's layout (``post`` convs given small random weights so the flow is not the identity),
    B sequences of variable length (the longest T), seeded. ``guide="encoder"`` adds VITS's posterior
    encoder and a spectrogram; flow, mask and tensors are those of ``guide="free"`` with the same seed."""
    if guide not in GUIDES:
        raise ValueError(f"guide must be one of {GUIDES}, got {guide!r}")
    device = torch.device(device)
    seed_all(seed)
    flow = ResidualCouplingBlock(size["channels"], size["hidden"], size["kernel_size"], size["dilation_rate"],
                                 size["n_layers"], n_flows=size["n_flows"])
    with torch.no_grad():
        for layer in flow.flows[::2]:
            layer.post.weight.normal_(0.0, 0.02)
            layer.post.bias.normal_(0.0, 0.02)
    B, C, T = size["B"], size["channels"], size["T"]
    lengths = torch.randint(max(1, T // 2), T + 1, (B,))
    lengths[0] = T
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float32)[:, None, :]
    m_p = torch.randn(B, C, T)
    logs_p = 0.1 * torch.randn(B, C, T)
    m_q0 = m_p + 0.5 * torch.randn(B, C, T)
    logs_q0 = -0.5 + 0.1 * torch.randn(B, C, T)
    encoder = x = None
    if guide == "encoder":
        encoder = PosteriorEncoder(size["x_channels"], C, size["hidden"], size["kernel_size"],
                                   size["dilation_rate"], size["enc_layers"]).to(device)
        x = (torch.randn(B, size["x_channels"], T) * mask).to(device)
    return Problem(flow.to(device), mask.to(device), m_p.to(device), logs_p.to(device), m_q0.to(device),
                   logs_q0.to(device), dict(size), device, guide, encoder, x)


def vits_posterior(encoder: PosteriorEncoder, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """VITS ``PosteriorEncoder.forward`` up to the sample: ``pre -> mask -> WN -> proj -> mask -> split``."""
    h = encoder.pre(x) * mask
    h = encoder.enc(h, mask)
    stats = encoder.proj(h) * mask
    m_q, logs_q = torch.split(stats, encoder.channels, dim=1)
    return m_q, logs_q


def vits_kl_sum(z_p: Tensor, logs_q: Tensor, m_p: Tensor, logs_p: Tensor, z_mask: Tensor) -> Tensor:
    """VITS ``losses.kl_loss`` times ``sum(z_mask)`` as VITS writes it (no argument checks, no host sync):
    the masked sum of the per-element KL terms, nats."""
    kl = logs_p - logs_q - 0.5
    kl = kl + 0.5 * ((z_p - m_p) ** 2) * torch.exp(-2.0 * logs_p)
    return torch.sum(kl * z_mask)


def raw_loss(flow: ResidualCouplingBlock, m_q: Tensor, logs_q: Tensor, m_p: Tensor, logs_p: Tensor,
             mask: Tensor, eps: Tensor) -> Tensor:
    """VITS's posterior sample ``z = (m_q + eps exp(logs_q)) mask``, ``z_p = flow(z)``, summed KL."""
    z = (m_q + eps * torch.exp(logs_q)) * mask
    return vits_kl_sum(flow(z, mask), logs_q, m_p, logs_p, mask)
