"""Stochastic variational inference for :class:`~pyro_vits.models.prior_model.VITSPriorModel` and a guide.

:func:`fit` runs ``elbo.loss_and_grads`` (default ``Trace_ELBO``) with Pyro's ``ClippedAdam`` over the model's
and guide's parameters (and any other ``pyro.param`` they declare), logs Monte-Carlo measures (nats per valid
frame, see :func:`~pyro_vits.infer.evaluate.evaluate`) every ``log_every`` steps and, with ``out_dir``, writes
``config.json``, ``metrics.jsonl`` (one JSON object per logged step) and ``checkpoint.pt`` (atomically, every
``checkpoint_every`` steps and at the end). ``resume=True`` continues a stopped run; on CPU the continuation
is bit-identical to an uninterrupted run. A step whose loss or gradient is NaN/Inf stops the run with a
:class:`NonFiniteError` naming the step, the parameters and the sample sites, or is skipped
(``nan_policy="skip"``).

Parts, each depending only on those above it:

- :mod:`~pyro_vits.train.config`: :class:`FitConfig`, the validated settings and ``config.json``'s record;
- :mod:`~pyro_vits.train.checkpoint`: save/load/resume with every random state; :func:`read_vits_flow`;
- :mod:`~pyro_vits.train.guard`: the NaN/Inf guard (:class:`NonFiniteError`);
- :mod:`~pyro_vits.train.parallel`: the data-parallel strategy protocol that
  :class:`pyro_vits.infer.distributed.DistributedContext` implements (training never imports it);
- :mod:`~pyro_vits.train.loop`: :func:`fit`.
"""

from __future__ import annotations

from .._device import resolve_device
from ..infer.elbo import ELBOS, make_elbo
from .checkpoint import load_checkpoint, read_vits_flow
from .config import NAN_POLICIES, FitConfig, geometric_lrd
from .guard import NonFiniteError
from .loop import METRIC_KEYS, FitResult, RunInterrupted, fit
from .parallel import DataParallel

__all__ = [
    "ELBOS",
    "METRIC_KEYS",
    "NAN_POLICIES",
    "DataParallel",
    "FitConfig",
    "FitResult",
    "NonFiniteError",
    "RunInterrupted",
    "fit",
    "geometric_lrd",
    "load_checkpoint",
    "make_elbo",
    "read_vits_flow",
    "resolve_device",
]

