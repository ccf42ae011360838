"""The data-parallel strategy :func:`~pyro_vits.train.fit` plugs in: what it needs of a process group.

``fit(..., distributed=strategy)`` runs on ``strategy.device``; only ``strategy.is_main`` writes the run
folder, evaluates and logs; ``strategy.data_parallel(...)`` returns the per-step object whose ``begin(step)``
picks this process's utterances and seeds its noise and whose ``loss_and_grads()`` leaves the combined
minibatch's gradient in every ``.grad``. :class:`pyro_vits.infer.distributed.DistributedContext` implements it
(``torch.distributed`` + ``DistributedDataParallel``); training never imports it.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from pyro.infer import ELBO
from torch import nn

from .._device import resolve_device

__all__ = ["DataParallel", "ParallelStep", "parallel_device"]


class ParallelStep(Protocol):
    """One process's share of every SVI step."""

    def begin(self, step: int) -> Any:
        """Seed this process's noise for ``step``; return its utterances (re-traced by the NaN/Inf guard)."""
        ...

    def loss_and_grads(self) -> float:
        """Forward and backward passes; returns the combined minibatch's loss (nats)."""
        ...


@runtime_checkable
class DataParallel(Protocol):
    """A process group that :func:`~pyro_vits.train.fit` trains in (every process calls ``fit`` alike)."""

    @property
    def device(self) -> torch.device: ...

    @property
    def is_main(self) -> bool: ...

    def describe(self) -> dict[str, Any]:
        """What ``config.json`` records under ``"distributed"``."""
        ...

    def barrier(self) -> None: ...

    def data_parallel(self, model: nn.Module, guide: nn.Module, elbo: ELBO, data: Any,
                      batch_size: int | None, seed: int) -> ParallelStep: ...


def parallel_device(device: str | torch.device, strategy: DataParallel) -> torch.device:
    """The strategy's device, after checking that ``device`` ("auto" or the same type) agrees with it."""
    if device != "auto" and resolve_device(device).type != strategy.device.type:
        raise ValueError(f"device={device!r} but this distributed process runs on {strategy.device}")
    return strategy.device
