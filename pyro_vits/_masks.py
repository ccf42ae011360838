"""Frame masks ``(..., 1, T)`` (1 = a real frame, 0 = padding): built from lengths and checked, for every layer."""

from __future__ import annotations

import torch
from torch import Tensor

from ._validate import check_nonnegative_ints

__all__ = ["check_mask", "sequence_mask"]


def check_mask(mask: Tensor, like: Tensor, name: str = "mask") -> Tensor:
    """Validate a 0/1 mask of shape ``(..., 1, T)`` against ``like (..., C, T)``; returns it as float."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(mask).__name__}")
    if mask.dim() < 2 or mask.shape[-2] != 1 or mask.shape[-1] != like.shape[-1]:
        raise ValueError(f"{name} must have shape (..., 1, T={like.shape[-1]}), got {tuple(mask.shape)}")
    mask = mask.to(like.dtype)
    if not torch.jit.is_tracing() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must contain only 0 and 1")
    return mask


def sequence_mask(lengths: Tensor, frames: int) -> Tensor:
    """``(N,)`` lengths (frames) -> ``(N, 1, frames)`` float mask, 1 where ``t < length``."""
    if not isinstance(lengths, Tensor) or lengths.dim() != 1:
        got = tuple(lengths.shape) if isinstance(lengths, Tensor) else type(lengths).__name__
        raise ValueError(f"lengths must be a 1-D Tensor (N,), got {got}")
    check_nonnegative_ints(frames=frames)
    return (torch.arange(frames, device=lengths.device) < lengths[:, None]).unsqueeze(1).float()
