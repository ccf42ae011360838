"""The KL package's shared argument checks and the masked sum over valid ``(C, T)`` elements."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

__all__ = ["LogProb"]


class LogProb(Protocol):
    """Anything with ``log_prob(z (..., C, T)) -> (...)``, e.g. a prior distribution."""

    def log_prob(self, value: Tensor) -> Tensor: ...


def _differs(mask: Tensor, other: Tensor) -> bool:
    return not torch.equal(*torch.broadcast_tensors(mask, other.to(mask)))


def _tensor(value: object, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")
    if value.dim() < 2:
        raise ValueError(f"{name} must have shape (..., C, T), got {tuple(value.shape)}")
    return value


def _same_event(value: Tensor, like: Tensor, name: str, like_name: str) -> None:
    if value.shape[-2:] != like.shape[-2:]:
        raise ValueError(
            f"{name} must have (C, T) = {tuple(like.shape[-2:])} like {like_name}, got {tuple(value.shape)}"
        )
    try:
        torch.broadcast_shapes(value.shape, like.shape)
    except RuntimeError as err:
        raise ValueError(
            f"{name} {tuple(value.shape)} does not broadcast with {like_name} {tuple(like.shape)}"
        ) from err


def _masked_sum(elem: Tensor, mask: Tensor) -> Tensor:
    """``sum`` over the valid ``(C, T)`` elements: ``(..., C, T), (..., 1, T) -> (...)``."""
    elem, mask = torch.broadcast_tensors(elem, mask)
    return torch.where(mask > 0, elem, 0.0).sum((-2, -1))
