"""Multi-process data-parallel SVI: Pyro's ``ELBOModule`` in ``torch.nn.parallel.DistributedDataParallel``.

Launch one process per CPU share or GPU with ``torchrun`` (gloo on CPU, nccl on CUDA)::

    torchrun --nproc_per_node 2 examples/fit_vits_prior.py --distributed --device cpu
    torchrun --nproc_per_node 2 -m pyro_vits.cli fit --distributed        # the same, as pyro-vits fit

and pass the context to :func:`~pyro_vits.train.fit` (``fit(..., distributed=ctx)``):
:class:`DistributedContext` is the :class:`~pyro_vits.train.parallel.DataParallel` strategy ``fit`` plugs in
(this module does not import the training loop, nor it this module). Every process holds
the whole data set and the same model and guide (seeded identically; ``DistributedDataParallel``'s
constructor broadcasts rank 0's parameters anyway).

**The step.** ``batch_size`` is the *combined* minibatch of all ranks. At step ``s`` every rank draws the
same ``B`` utterance ids from a generator seeded by ``(seed, s)`` (:func:`minibatch_indices`) and takes its
contiguous slice of ``b_r`` of them (:func:`shard`; sizes differ by at most 1). Its loss is
``Trace_ELBO(...)(model, guide)`` (Pyro's ``ELBOModule``) called with ``subsample=<its ids>``, under
``poutine.scale(b_r / B)``, wrapped in ``DistributedDataParallel``, and ``world_size * loss`` is
back-propagated.

**Why the gradient equals the single-process gradient on the combined batch.** The ``"utterances"`` plate
of size ``N`` with ``b_r`` subsampled ids scales every site's log-density by ``N / b_r``;
``poutine.scale(b_r / B)`` turns that into ``N / B``, exactly the scale of a single process that subsamples
all ``B`` utterances. So rank ``r``'s loss ``L_r`` is the single-process loss's terms for its utterances,
and ``sum_r L_r`` is the single-process loss ``L`` (per utterance and particle; for ``IWAE_DReG``, whose
bound is nonlinear in the scaled log-weights, matching the scale *per site* rather than rescaling the loss
is what makes this exact). ``DistributedDataParallel`` *averages* gradients over the ``W`` ranks, hence the
factor ``W``: ``(1/W) sum_r grad(W L_r) = grad L``. Equal per-rank batches (``B`` divisible by ``W``) are
not required. The reported loss is ``sum_r L_r`` (one all-reduce per step, overlapped with the backward
pass), the same combined-batch estimate scaled to the whole data set that a single process reports.
After the all-reduce every rank holds bit-identical gradients, so ``ClippedAdam`` keeps bit-identical
parameters on every rank, and the NaN/Inf guard (loss and gradients) decides the same everywhere.

**Random numbers.** Parameters: all ranks seed identically. Sample noise: before step ``s`` rank ``r``
seeds torch with :func:`noise_seed` ``(seed, s, r)``: different per rank, deterministic, and independent of
how many steps ran before, so a resumed distributed run continues exactly as an uninterrupted one and the
combined minibatches do not depend on the number of ranks. (A distributed run is therefore not the same
random stream as a single-process one with the same seed; its gradient is the same in distribution.)

**Files and logs.** Only rank 0 writes the run folder (config, metrics, checkpoints; the example adds
figures and the ``.nc``), evaluates the logged measures and logs; :func:`init_distributed` raises the
``pyro_vits`` loggers of the other ranks to ERROR. Every rank reads a checkpoint to resume.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyro
import torch
import torch.distributed as dist
from pyro import poutine
from pyro.infer import ELBO
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .._device import resolve_device
from .._validate import check_positive_ints
from ..data.batch import FitData

__all__ = [
    "DataParallelELBO",
    "DistributedContext",
    "distributed_context",
    "init_distributed",
    "is_main_process",
    "launched_by_torchrun",
    "minibatch_indices",
    "noise_seed",
    "rank",
    "shard",
    "teardown",
    "world_size",
]

logger = logging.getLogger(__name__)

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_SEED_MOD = 2**64  # SeedSequence takes non-negative entropy; seeds may be negative ints


# --------------------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------------------


def launched_by_torchrun() -> bool:
    """Whether the variables ``torchrun`` sets for its workers (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``) are all present."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def rank() -> int:
    """This process's rank: the process group's, else ``$RANK``, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    """The number of processes: the process group's, else ``$WORLD_SIZE``, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """Rank 0 (or no distributed launch): the process that writes files and logs."""
    return rank() == 0


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in an initialised process group (see :func:`init_distributed`)."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: writes the run folder and logs."""
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        """What a run's ``config.json`` records under ``"distributed"``."""
        return dict(world_size=self.world_size, backend=self.backend,
                    sharding="contiguous slices of each combined minibatch",
                    minibatch_seed="(seed, step)", noise_seed="(seed, step, rank)")

    def barrier(self) -> None:
        dist.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` (picklable), on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def data_parallel(self, model: nn.Module, guide: nn.Module, elbo: ELBO, data: FitData,
                      batch_size: int | None, seed: int) -> DataParallelELBO:
        """The data-parallel ELBO step for ``model``/``guide`` on ``data`` (see :class:`DataParallelELBO`)."""
        return DataParallelELBO(self, model, guide, elbo, data, batch_size, seed)


def _device(device: str | torch.device, local_rank: int) -> torch.device:
    """``cpu``, or ``cuda:<LOCAL_RANK>`` for ``cuda``/``auto`` with CUDA available."""
    if str(device) not in ("auto", "cpu", "cuda"):
        raise ValueError(f"with distributed training the device must be 'auto', 'cpu' or 'cuda' (each "
                         f"process then uses cuda:<LOCAL_RANK>), got {device!r}")
    resolved = resolve_device(str(device))  # "auto" -> cuda/cpu; "cuda" without CUDA -> ValueError
    if resolved.type == "cpu":
        return resolved
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) "
                         "exist: start at most one process per GPU (torchrun --nproc_per_node)")
    return torch.device("cuda", local_rank)


def init_distributed(device: str | torch.device = "auto", *, timeout_s: float = 600.0,
                     quiet_workers: bool = True) -> DistributedContext:
    """Join the process group ``torchrun`` describes in its environment variables (``init_method="env://"``).

    ``device``: ``"cpu"`` (backend gloo), ``"cuda"`` (nccl; this process uses ``cuda:$LOCAL_RANK``) or
    ``"auto"`` (CUDA when available). ``timeout_s`` bounds each collective's wait for the other ranks.
    ``quiet_workers``: ranks other than 0 show only errors of the ``pyro_vits`` loggers.
    """
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise ValueError(f"distributed training runs under torchrun (e.g. torchrun --nproc_per_node 2 "
                         f"examples/fit_vits_prior.py --distributed), which sets {', '.join(missing)}; to "
                         "train in one process leave --distributed out (--no-distributed overrides a resumed "
                         "run's)")
    local_rank = int(os.environ["LOCAL_RANK"])
    dev = _device(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    elif dist.get_backend() != backend:
        raise ValueError(f"the process group uses {dist.get_backend()}, but {dev} needs {backend}")
    ctx = DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, backend, dev)
    if quiet_workers and not ctx.is_main:
        logging.getLogger("pyro_vits").setLevel(logging.ERROR)
    logger.info("process group: %d process(es), backend %s, rank 0 on %s", ctx.world_size, backend, dev)
    return ctx


def teardown() -> None:
    """Leave and destroy the process group (nothing when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed_context(device: str | torch.device = "auto", **kwargs: Any) -> Iterator[DistributedContext]:
    """``with distributed_context("cpu") as ctx: ...``: :func:`init_distributed`, then :func:`teardown`."""
    ctx = init_distributed(device, **kwargs)
    try:
        yield ctx
    finally:
        teardown()


# --------------------------------------------------------------------------------------------------
# Sharding and seeds
# --------------------------------------------------------------------------------------------------


def _seed_from(*words: int) -> int:
    return int(np.random.SeedSequence([w % _SEED_MOD for w in words]).generate_state(1, np.uint64)[0])


def minibatch_indices(seed: int, step: int, n: int, batch_size: int | None) -> Tensor:
    """The combined minibatch of ``step``: ``batch_size`` distinct ids of ``0..n-1`` (a CPU long tensor),
    the same on every rank; all ``n`` in order when ``batch_size`` is None or at least ``n``."""
    check_positive_ints(n=n)
    check_positive_ints(allow_none=True, batch_size=batch_size)
    if batch_size is None or batch_size >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(_seed_from(seed, step, 0))
    return torch.randperm(n, generator=generator)[:batch_size]


def shard(indices: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s contiguous slice of ``indices (M,)``: ``(M // world_size,)`` or one more
    (``torch.tensor_split``: sizes differ by at most 1)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return torch.tensor_split(indices, world_size)[rank]


def noise_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of rank ``rank``'s sample noise at ``step`` (distinct per rank, reproducible)."""
    return _seed_from(seed, step, 1, rank)


# --------------------------------------------------------------------------------------------------
# The data-parallel ELBO step
# --------------------------------------------------------------------------------------------------


class DataParallelELBO:
    """``elbo(model, guide)`` (Pyro's ``ELBOModule``) in ``DistributedDataParallel``, one rank's share.

    Built after the model and guide have run once (their ``pyro.module`` registration done): it calls the
    ``ELBOModule`` once more without gradients (Pyro creates some parameters lazily), refuses ``pyro.param``
    entries outside the two modules (``DistributedDataParallel`` synchronises module parameters only), waits
    for every rank, then wraps it (which broadcasts rank 0's parameters and checks that shapes agree).
    Per step: :meth:`begin` seeds this rank's noise and picks its utterances; :meth:`loss_and_grads` runs
    the forward and backward passes and returns the combined-batch loss. See the module's docstring for why
    the gradient is the single-process gradient on the combined minibatch.
    """

    def __init__(self, ctx: DistributedContext, model: nn.Module, guide: nn.Module, elbo: ELBO, data: FitData,
                 batch_size: int | None, seed: int) -> None:
        combined = data.n if batch_size is None else min(batch_size, data.n)
        if combined < ctx.world_size:
            raise ValueError(f"the combined minibatch ({combined} utterances) must hold at least one "
                             f"utterance per process ({ctx.world_size}): raise batch_size or start fewer "
                             "processes")
        self.ctx, self.data, self.batch_size, self.seed = ctx, data, batch_size, seed
        self.combined = combined
        self.elbo_module = elbo(model, guide)
        self._idx = self._shard_indices(0)
        cuda = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            self.elbo_module(data, subsample=self._idx)
        owned = {id(p) for p in self.elbo_module.parameters()}
        foreign = [name for name, p in pyro.get_param_store().named_parameters()
                   if p.requires_grad and id(p) not in owned]
        if foreign:
            raise ValueError(f"distributed training synchronises the parameters of the model and guide "
                             f"modules only; these pyro.param entries are outside them: {sorted(foreign)}")
        ctx.barrier()  # every rank has checked its inputs (and run folder) before rank 0 writes anything
        self.module = DistributedDataParallel(self.elbo_module, device_ids=None)

    def _shard_indices(self, step: int) -> Tensor:
        ids = minibatch_indices(self.seed, step, self.data.n, self.batch_size)
        return shard(ids, self.ctx.rank, self.ctx.world_size).to(self.data.device)

    def begin(self, step: int) -> FitData:
        """Seed this rank's noise for ``step`` and pick its utterances; returns them as a batch (for a
        re-trace of the step by the NaN/Inf guard)."""
        self._idx = self._shard_indices(step)
        torch.manual_seed(noise_seed(self.seed, step, self.ctx.rank))
        return self.data.subset(self._idx)

    def loss_and_grads(self) -> float:
        """Forward and backward passes of the step :meth:`begin` prepared; every rank's ``.grad`` then holds
        the combined minibatch's gradient. Returns the combined minibatch's loss (the sum over ranks)."""
        with poutine.scale(scale=len(self._idx) / self.combined):
            loss = self.module(self.data, subsample=self._idx)
        total = loss.detach().to(torch.float64).reshape(1)
        work = dist.all_reduce(total, async_op=True)
        if loss.requires_grad:
            (loss * self.ctx.world_size).backward()
        work.wait()
        return float(total)

