"""A synthetic "teacher": a frozen random VITS prior (:func:`make_teacher`) and utterances drawn from its
joint (:func:`sample_dataset`), the data whose true log-likelihood the experiments compare against."""

from __future__ import annotations

import math

import torch

from .._masks import sequence_mask
from .._validate import check_positive_ints
from ..data.batch import Batch
from .prior_model import VITSPriorModel

__all__ = ["make_teacher", "sample_dataset"]


def make_teacher(
    channels: int,
    hidden_channels: int,
    kernel_size: int = 5,
    dilation_rate: int = 1,
    n_layers: int = 2,
    n_flows: int = 4,
    *,
    n_speakers: int = 0,
    gin_channels: int = 0,
    mean_only: bool = True,
    sigma_x: float = 0.1,
    post_std: float = 2.0,
    seed: int = 0,
) -> VITSPriorModel:
    """A frozen random :class:`VITSPriorModel` with an identity decoder to generate data from.

    VITS zero-initialises each coupling's ``post`` conv (identity flow, Gaussian prior); here its weights
    are ``N(0, (post_std / sqrt(hidden))^2)`` (the log-scale half of affine couplings 4x smaller, for
    stability), so each coupling shifts by O(``post_std``) nonlinearly and the prior is clearly
    non-Gaussian. Built under ``seed`` without touching the global RNG; parameters have no gradients.
    """
    if not post_std > 0:
        raise ValueError(f"post_std must be positive, got {post_std!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        teacher = VITSPriorModel(
            channels, hidden_channels, kernel_size, dilation_rate, n_layers, n_flows, n_speakers=n_speakers,
            gin_channels=gin_channels, mean_only=mean_only, sigma_x=sigma_x, decoder="identity",
            name="teacher",
        )
        with torch.no_grad():
            for layer in teacher.flow.flows[::2]:
                std = torch.full((layer.post.out_channels, 1, 1), post_std / math.sqrt(hidden_channels))
                std[layer.half_channels:] /= 4
                layer.post.weight.normal_().mul_(std)
                layer.post.bias.normal_().mul_(std[:, 0, 0])
    return teacher.requires_grad_(False).eval()


def sample_dataset(
    teacher: VITSPriorModel,
    n: int,
    frames: int,
    *,
    seed: int,
    min_frames: int | None = None,
    phone_frames: float = 4.0,
) -> Batch:
    """Draw ``n`` utterances of at most ``frames`` frames from ``teacher``'s joint.

    Lengths are uniform on ``[min_frames, frames]`` (default ``frames // 2``, at least 1). ``m_p, logs_p``
    mimic VITS's duration-expanded text encoder: piecewise constant over "phones" of geometric length (mean
    ``phone_frames``), ``m_p ~ N(0, 1)``, ``logs_p ~ U[-0.5, 0.5]`` per phone and channel. Then
    ``z ~ p_teacher(z)``, ``x = dec(z) + sigma_x * eps``; padded frames of every field are exactly 0.
    Uses ``seed`` without touching the global RNG; tensors are on the teacher's device and dtype.
    """
    min_frames = max(1, frames // 2) if min_frames is None else min_frames
    check_positive_ints(n=n)
    if not (isinstance(frames, int) and isinstance(min_frames, int) and 1 <= min_frames <= frames):
        raise ValueError(f"need 1 <= min_frames <= frames, got min_frames={min_frames!r}, frames={frames!r}")
    if not phone_frames >= 1:
        raise ValueError(f"phone_frames must be >= 1, got {phone_frames!r}")
    param = next(teacher.parameters())
    device, dtype, c = param.device, param.dtype, teacher.channels
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        lengths = torch.randint(min_frames, frames + 1, (n,), device=device)
        mask = sequence_mask(lengths, frames).to(dtype)
        new_phone = torch.rand(n, 1, frames, device=device) < 1.0 / phone_frames
        new_phone[..., 0] = False
        phone = new_phone.cumsum(-1).expand(n, c, frames)
        m_p = torch.randn(n, c, frames, device=device, dtype=dtype).gather(-1, phone) * mask
        logs_p = (torch.rand(n, c, frames, device=device, dtype=dtype) - 0.5).gather(-1, phone) * mask
        speaker = torch.randint(teacher.n_speakers, (n,), device=device) if teacher.n_speakers else None
        data = Batch(torch.zeros_like(m_p), m_p, logs_p, mask, lengths, speaker)
        z = teacher.prior(data).sample()
        data.x = teacher.likelihood(z, data).sample()
    return data
