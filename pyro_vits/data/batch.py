"""Padded utterance batches: :class:`Batch` ``(N, C, T)`` with its ``(N, 1, T)`` mask, the shared
``"utterances"`` plate, and :class:`FitData`, what :func:`~pyro_vits.train.fit` needs of a data set."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import pyro
import torch
from torch import Tensor

from .._masks import check_mask, sequence_mask

__all__ = ["Batch", "FitData", "utterance_plate"]


@runtime_checkable
class FitData(Protocol):
    """What :func:`~pyro_vits.train.fit` (and the data-parallel step) use of a data set: ``n`` utterances on
    one ``device``, ``num_frames`` valid frames in all; ``subset(idx)`` (``idx (B,)`` long positions) and
    ``to(device)`` return the same kind of object; ``check_finite(name)`` raises ValueError on NaN/Inf;
    ``describe()`` is the JSON-able summary a run's ``config.json`` records under ``"data"``. The model and
    guide passed to ``fit`` receive it as their first argument. :class:`Batch` is the reference."""

    @property
    def n(self) -> int: ...

    @property
    def num_frames(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def subset(self, idx: Tensor) -> Any: ...

    def to(self, device: torch.device | str) -> Any: ...

    def check_finite(self, name: str = "batch") -> None: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass
class Batch:
    """A padded set of utterances.

    ``x, m_p, logs_p``: ``(N, C, T)``; ``mask``: ``(N, 1, T)`` 0/1 prefix mask; ``lengths``: ``(N,)`` long;
    ``speaker``: ``(N,)`` long or None; ``index``: ``(N,)`` long ids of the utterances in the dataset they
    were drawn from (defaults to ``arange(N)``; :class:`~pyro_vits.models.guides.LocalGuide` indexes by it).
    """

    x: Tensor
    m_p: Tensor
    logs_p: Tensor
    mask: Tensor
    lengths: Tensor
    speaker: Tensor | None = None
    index: Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("x", "m_p", "logs_p", "mask", "lengths"):
            if not isinstance(getattr(self, name), Tensor):
                raise TypeError(f"{name} must be a Tensor, got {type(getattr(self, name)).__name__}")
        if self.x.dim() != 3 or not self.x.is_floating_point():
            raise ValueError(f"x must be a floating (N, C, T) tensor, got {self.x.dtype} "
                             f"{tuple(self.x.shape)}")
        n, _, t = self.x.shape
        for name in ("m_p", "logs_p"):
            if getattr(self, name).shape != self.x.shape:
                raise ValueError(f"{name} must have the shape of x {tuple(self.x.shape)}, got "
                                 f"{tuple(getattr(self, name).shape)}")
        if self.mask.shape != (n, 1, t):
            raise ValueError(f"mask must have shape (N={n}, 1, T={t}), got {tuple(self.mask.shape)}")
        self.mask = check_mask(self.mask, self.x)
        if self.lengths.shape != (n,) or self.lengths.dtype != torch.long:
            raise ValueError(f"lengths must be a long tensor of shape ({n},), got {self.lengths.dtype} "
                             f"{tuple(self.lengths.shape)}")
        if not torch.equal(self.mask, sequence_mask(self.lengths, t).to(self.mask)):
            raise ValueError("mask must equal the prefix mask of lengths (frame t is valid iff t < length)")
        for name in ("speaker", "index"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, Tensor) or value.shape != (n,)
                                      or value.dtype != torch.long):
                raise ValueError(f"{name} must be None or a long tensor of shape ({n},), got {value!r}")
        if self.index is None:
            self.index = torch.arange(n, device=self.x.device)
        self.check_finite()

    def check_finite(self, name: str = "batch") -> None:
        """Raise ValueError if ``x``, ``m_p`` or ``logs_p`` holds NaN/Inf (one fused check; ``name`` labels
        the batch in the message)."""
        fields = ("x", "m_p", "logs_p")
        if bool(torch.stack([torch.isfinite(getattr(self, f)).all() for f in fields]).all()):
            return
        for f in fields:
            bad = ~torch.isfinite(getattr(self, f))
            if bool(bad.any()):
                n, c, t = bad.nonzero()[0].tolist()
                raise ValueError(f"{name}.{f} has {int(bad.sum())} non-finite value(s) (NaN/Inf), the first "
                                 f"at utterance {n}, channel {c}, frame {t}")

    @property
    def n(self) -> int:
        """Number of utterances N."""
        return self.x.shape[0]

    @property
    def channels(self) -> int:
        """Channels C of ``x``."""
        return self.x.shape[1]

    @property
    def frames(self) -> int:
        """Padded length T."""
        return self.x.shape[2]

    @property
    def device(self) -> torch.device:
        """The device of every tensor field."""
        return self.x.device

    def describe(self) -> dict[str, Any]:
        """``n``, ``channels``, ``frames``, ``num_frames``, ``speakers`` (bool) and ``dtype``: JSON-able."""
        return dict(n=self.n, channels=self.channels, frames=self.frames, num_frames=self.num_frames,
                    speakers=self.speaker is not None, dtype=str(self.x.dtype))

    @property
    def num_frames(self) -> int:
        """Number of valid frames (synchronises with the device)."""
        return int(self.lengths.sum())

    def _derive(self, fn: Callable[[Tensor], Tensor]) -> Batch:
        """Apply ``fn`` to every tensor field, skipping validation (the result derives from a valid batch)."""
        new = copy.copy(self)
        for name in ("x", "m_p", "logs_p", "mask", "lengths", "speaker", "index"):
            value = getattr(self, name)
            setattr(new, name, None if value is None else fn(value))
        return new

    def to(self, device: torch.device | str) -> Batch:
        """A copy with every tensor field on ``device``."""
        return self._derive(lambda t: t.to(device))

    def subset(self, idx: Tensor) -> Batch:
        """Utterances ``idx`` (``(B,)`` long, positions in this batch); ``index`` keeps the dataset ids."""
        return self._derive(lambda t: t[idx])


def utterance_plate(
    batch: FitData, subsample_size: int | None = None, subsample: Tensor | None = None
) -> pyro.plate:
    """The ``"utterances"`` plate (dim -1) over ``batch.n`` on ``batch.device``, shared by the model and every
    guide (any :class:`FitData`)."""
    return pyro.plate(
        "utterances", batch.n, subsample_size=subsample_size, subsample=subsample, dim=-1,
        device=batch.device,
    )
