"""Monotonic alignment search (MAS), VITS's hard alignment of spectrogram frames to text tokens.

Shapes follow VITS's ``models.SynthesizerTrn.forward``: latents ``z_p (B, C, T_spec)``, text-side prior
``m_p, logs_p (B, C, T_text)``, and the alignment scores ``neg_cent`` / path / mask ``(B, T_spec, T_text)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["maximum_path", "neg_cent", "expand_prior", "attention_mask", "alignment_lengths"]

_MAX_NEG_VAL = np.float32(-1e9)  # VITS's ``max_neg_val``: the score of an unreachable cell


def alignment_lengths(scores: Tensor, mask: Tensor, name: str = "neg_cent") -> tuple[Tensor, Tensor]:
    """Check a MAS score array ``scores (B, T_spec, T_text)`` (called ``name`` in errors) and its valid-pair
    ``mask`` of the same shape; returns each utterance's frame and token counts, ``(B,)`` long each.
    ``ValueError`` for an utterance without ``1 <= tokens <= frames`` (no monotonic alignment exists)."""
    for label, value in ((name, scores), ("mask", mask)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{label} must be a Tensor, got {type(value).__name__}")
        if value.dim() != 3:
            raise ValueError(f"{label} must have shape (B, T_spec, T_text), got {tuple(value.shape)}")
    if mask.shape != scores.shape:
        raise ValueError(f"mask must have {name}'s shape {tuple(scores.shape)}, got {tuple(mask.shape)}")
    frames, tokens = mask[:, :, 0].sum(1).long(), mask[:, 0, :].sum(1).long()
    bad = torch.nonzero((tokens < 1) | (tokens > frames)).flatten()
    if bad.numel():
        b = int(bad[0])
        raise ValueError(f"utterance {b} of the batch has {int(tokens[b])} text tokens for {int(frames[b])} "
                         "frames: a monotonic alignment needs 1 <= tokens <= frames")
    return frames, tokens


def _forward_pass(value: np.ndarray, t_spec: np.ndarray, t_text: np.ndarray) -> None:
    """In place, float32: ``value[b, y, x] += max(value[b, y-1, x-1], value[b, y-1, x])`` over the band of
    cells a monotonic path from (0, 0) to (t_spec-1, t_text-1) can visit; cells outside keep their score."""
    batch, frames, tokens = value.shape
    x = np.arange(tokens)
    for y in range(frames):
        # band of row y: max(0, t_text + y - t_spec) <= x < min(t_text, y + 1), only for rows y < t_spec
        band = (
            (x >= np.maximum(0, t_text + y - t_spec)[:, None])
            & (x < np.minimum(t_text, y + 1)[:, None])
            & (y < t_spec)[:, None]
        )
        if y == 0:
            v_prev = np.where(x == 0, np.float32(0.0), _MAX_NEG_VAL)[None, :]
            v_cur = np.full((1, tokens), _MAX_NEG_VAL, dtype=np.float32)
        else:
            above = value[:, y - 1, :]
            v_prev = np.concatenate([np.full((batch, 1), _MAX_NEG_VAL, dtype=np.float32), above[:, :-1]], 1)
            v_cur = np.where(x == y, _MAX_NEG_VAL, above)
        value[:, y, :] = np.where(band, value[:, y, :] + np.maximum(v_prev, v_cur), value[:, y, :])


def _backtrack(value: np.ndarray, t_spec: np.ndarray, t_text: np.ndarray) -> np.ndarray:
    """From (t_spec-1, t_text-1) back to row 0: step to token ``x-1`` when forced (``x == y``) or when
    ``value[y-1, x] < value[y-1, x-1]`` (ties stay on ``x``), as VITS does."""
    batch, frames, _ = value.shape
    path = np.zeros(value.shape, dtype=np.float32)
    rows = np.arange(batch)
    index = t_text - 1
    for y in range(frames - 1, -1, -1):
        active = y < t_spec
        path[rows[active], y, index[active]] = 1.0
        if y == 0:
            break
        above = value[:, y - 1, :]
        stay = above[rows, index]
        step = above[rows, np.maximum(index - 1, 0)]
        move = active & (index != 0) & ((index == y) | (stay < step))
        index = np.where(move, index - 1, index)
    return path


def maximum_path(neg_cent: Tensor, mask: Tensor) -> Tensor:
    """VITS's ``monotonic_align.maximum_path``: the monotonic alignment maximising the summed score.

    ``neg_cent (B, T_spec, T_text)``: the score of aligning frame ``y`` to token ``x`` (cast to float32 as
    in VITS); ``mask (B, T_spec, T_text)``: 1 on valid (frame, token) pairs; utterance ``b`` has
    ``T_spec_b = mask[b, :, 0].sum()`` frames and ``T_text_b = mask[b, 0, :].sum()`` tokens. Returns the
    0/1 path of the same shape, dtype and device as ``neg_cent``: every valid frame is assigned exactly one
    token, token indices never decrease, and every token gets at least one frame. Same recursion, float32
    accumulation and tie-breaking as VITS's Cython kernel, vectorised over the batch in numpy (a loop over
    frames). Requires ``1 <= T_text_b <= T_spec_b`` (VITS reads memory outside the score array otherwise).
    """
    frames, tokens = alignment_lengths(neg_cent, mask)
    scores = neg_cent.detach().cpu().numpy().astype(np.float32)
    t_spec, t_text = frames.cpu().numpy(), tokens.cpu().numpy()
    _forward_pass(scores, t_spec, t_text)
    path = _backtrack(scores, t_spec, t_text)
    return torch.from_numpy(path).to(device=neg_cent.device, dtype=neg_cent.dtype)


def neg_cent(z_p: Tensor, m_p: Tensor, logs_p: Tensor) -> Tensor:
    """VITS's alignment score: ``log N(z_p[:, :, y]; m_p[:, :, x], exp(logs_p[:, :, x]))`` summed over
    channels, ``(B, C, T_spec), (B, C, T_text), (B, C, T_text) -> (B, T_spec, T_text)`` nats, computed as
    VITS's four terms (constant and scale, two matrix products, the mean's square). No gradient."""
    for name, value in (("z_p", z_p), ("m_p", m_p), ("logs_p", logs_p)):
        if not isinstance(value, Tensor) or value.dim() != 3:
            raise ValueError(f"{name} must be a (B, C, T) Tensor, got {getattr(value, 'shape', value)!r}")
    if m_p.shape != logs_p.shape or m_p.shape[:2] != z_p.shape[:2]:
        raise ValueError(
            f"m_p and logs_p must have shape (B, C, T_text) with (B, C) = {tuple(z_p.shape[:2])} "
            f"of z_p, got {tuple(m_p.shape)} and {tuple(logs_p.shape)}"
        )
    with torch.no_grad():
        s_p_sq_r = torch.exp(-2 * logs_p)
        const = torch.sum(-0.5 * math.log(2 * math.pi) - logs_p, [1], keepdim=True)
        quad = torch.matmul(-0.5 * (z_p**2).transpose(1, 2), s_p_sq_r)
        cross = torch.matmul(z_p.transpose(1, 2), m_p * s_p_sq_r)
        mean_sq = torch.sum(-0.5 * (m_p**2) * s_p_sq_r, [1], keepdim=True)
        return const + quad + cross + mean_sq


def attention_mask(x_mask: Tensor, y_mask: Tensor) -> Tensor:
    """``x_mask (B, 1, T_text), y_mask (B, 1, T_spec) -> (B, T_spec, T_text)`` valid-pair mask."""
    return (x_mask.unsqueeze(2) * y_mask.unsqueeze(-1)).squeeze(1)


def expand_prior(path: Tensor, m_p: Tensor, logs_p: Tensor) -> tuple[Tensor, Tensor]:
    """Per-frame prior from per-token statistics along ``path (B, T_spec, T_text)``:
    ``(B, C, T_text) -> (B, C, T_spec)`` each (padded frames get 0)."""
    m_frames = torch.matmul(path, m_p.transpose(1, 2)).transpose(1, 2)
    logs_frames = torch.matmul(path, logs_p.transpose(1, 2)).transpose(1, 2)
    return m_frames, logs_frames


def even_alignment(mask: Tensor, text_mask: Tensor) -> Tensor:
    """The monotonic path that spreads each utterance's ``L`` symbols evenly over its ``T`` frames: frame
    ``t`` -> symbol ``floor(t L / T)``. ``mask (..., 1, T)``, ``text_mask (..., 1, L)`` -> ``(..., T, L)``."""
    frames, symbols = mask.sum(-1, keepdim=True), text_mask.sum(-1, keepdim=True)  # (..., 1, 1)
    t = torch.arange(mask.shape[-1], device=mask.device, dtype=mask.dtype)
    token = torch.floor(t * symbols[..., 0] / frames[..., 0].clamp(min=1))  # (..., T)
    path = token.unsqueeze(-1) == torch.arange(text_mask.shape[-1], device=mask.device, dtype=mask.dtype)
    return path.to(mask.dtype) * mask.transpose(-1, -2) * text_mask
