"""The SVI loop: :func:`fit` and the state of one run in progress (:class:`_Run`)."""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.optim.clipped_adam import ClippedAdam
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._device import cuda_devices, resolve_device
from .._io import check_writable
from .._rundir import CHECKPOINT, RUN_FILES, append_record, check_out_dir, prepare_run_dir
from ..data.batch import FitData
from ..infer.elbo import make_elbo
from ..infer.evaluate import evaluate
from .checkpoint import Named, Progress, load_checkpoint, restore, resumed_config, save_checkpoint
from .config import ELBO_FIELDS, FitConfig
from .guard import NonFiniteGuard, defers_checks, torch_rng
from .parallel import DataParallel, parallel_device

__all__ = ["METRIC_KEYS", "FitResult", "RunInterrupted", "fit"]

logger = logging.getLogger("pyro_vits.train")

METRIC_KEYS = ("elbo_per_frame", "elbo_stderr_per_frame", "kl_per_frame", "recon_per_frame",
               "loglik_iwae_per_frame")


class RunInterrupted(KeyboardInterrupt):
    """:func:`fit` stopped by SIGINT or SIGTERM between two steps, after writing its checkpoint (when it has a
    run folder). ``signum``: the signal; ``exit_code``: 128 + it (130, 143), what the error boundary
    returns; ``out_dir``/``step``: where and at which step the run was saved (``out_dir`` None: not saved).
    The message, one line, says how to resume."""

    def __init__(self, signum: int, step: int, out_dir: Path | None) -> None:
        self.signum, self.step, self.out_dir, self.exit_code = signum, step, out_dir, 128 + signum
        name = signal.Signals(signum).name
        where = (f"the run is saved in {out_dir} at step {step}; continue it with --resume {out_dir}"
                 if out_dir is not None else "the run had no out_dir: nothing was saved")
        super().__init__(f"interrupted by {name} after step {step}; {where}")


class _StopRequests:
    """While active (main thread, no process group): SIGINT and SIGTERM set :attr:`signum` instead of
    stopping the process; a second one stops it at once (``KeyboardInterrupt``). The previous handlers are
    restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"interrupted again by {signal.Signals(signum).name}: stopped at once")
        self.signum = signum
        logger.info("%s: stopping after the current step (send it again to stop at once)",
                       signal.Signals(signum).name)

    @contextmanager
    def active(self, enabled: bool) -> Iterator[_StopRequests]:
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in self.SIGNALS}
        try:
            for s in self.SIGNALS:
                signal.signal(s, self._handle)
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)


@dataclass
class FitResult:
    """Outcome of :func:`fit`.

    ``losses``: the ELBO's loss (negative ELBO in nats, a minibatch estimate scaled to the whole data set)
    at every step (NaN/Inf for skipped steps); ``metrics``: the logged records (as in ``metrics.jsonl``);
    ``config``: as in ``config.json``; ``out_dir``: where files went, or None; ``skipped_steps``: steps
    whose update was dropped (``nan_policy="skip"``); ``resumed_from``: the checkpoint's step, or None.
    """

    model: nn.Module
    guide: nn.Module
    losses: list[float]
    metrics: list[dict[str, float]]
    config: dict[str, Any]
    device: torch.device
    wall_s: float
    out_dir: Path | None
    skipped_steps: int = 0
    resumed_from: int | None = None


def fit(
    model: nn.Module,
    guide: nn.Module,
    data: FitData,
    config: FitConfig,
    *,
    elbo: ELBO | None = None,
    heldout: FitData | None = None,
    distributed: DataParallel | None = None,
    device: str | torch.device = "auto",
    extra_config: Mapping[str, Any] | None = None,
) -> FitResult:
    """Fit ``model`` and ``guide`` (both called as ``f(batch, subsample_size=...)``) to ``data`` by SVI with
the settings ``config`` (a :class:`~pyro_vits.train.config.FitConfig`, checked when it is built).

    ``data``/``heldout``: :class:`~pyro_vits.data.batch.Batch` or any :class:`~pyro_vits.data.batch.FitData`.
    ``elbo`` defaults to the ELBO ``config`` names: :func:`~pyro_vits.infer.elbo.make_elbo`'s
    ``config.elbo`` (``"trace"``: ``Trace_ELBO``) with ``config.particles`` (1), ``config.vectorize`` (True) and
    ``config.kl_particles`` (1); when an ``elbo`` is passed, those four must be left None in ``config``.
    ``config.eval_chunk`` bounds the logged evaluations' memory (see :func:`~pyro_vits.infer.evaluate.evaluate`).
    ``ClippedAdam`` multiplies the learning rate by ``config.lrd`` after every step and clamps gradient
    entries to ``[-clip_norm, clip_norm]``. ``config.batch_size`` utterances are subsampled per step (None:
    all). The parameter store is cleared and ``pyro.set_rng_seed(config.seed)`` called first; model, guide
    and data are moved to ``device``; on CPU the run is bit-for-bit reproducible. Every ``config.log_every``
    steps (and at the last) a record is logged: ``step``, ``loss_nats`` (mean finite loss over the window),
    ``*_per_frame`` from :func:`~pyro_vits.infer.evaluate.evaluate` with ``eval_samples`` particles on the
    first ``eval_size`` training utterances (``heldout_*`` on ``heldout``), ``skipped_steps`` (so far),
    ``wall_s`` (since the start) and ``it_per_s`` (SVI steps only). ``extra_config`` is stored under
    ``"extra"`` in ``config.json``.

    Run folder ``config.out_dir`` (:mod:`pyro_vits._rundir`): refused when it exists and is not empty, unless
    ``overwrite`` (its run files are deleted first) or ``resume`` (the run continues from its
    ``checkpoint.pt`` with the same model, guide, data and ELBO, up to ``steps``; the optimiser, its
    learning-rate schedule and the random states continue as saved). ``checkpoint_every`` steps (and at the
    end) the checkpoint is replaced atomically. SIGINT or SIGTERM (main thread, not ``distributed``) stops the
    run after the current step: the checkpoint is written whatever ``checkpoint_every`` is, then
    :class:`RunInterrupted` (a ``KeyboardInterrupt``) is raised; ``resume`` continues it bit for bit on CPU.
    A NaN/Inf loss or gradient raises
    :class:`~pyro_vits.train.guard.NonFiniteError` (``nan_policy="stop"``; the last checkpoint is untouched)
    or drops that step's update (``"skip"``, counted in ``skipped_steps``).

    ``distributed`` (a :class:`~pyro_vits.train.parallel.DataParallel` strategy such as
    :class:`~pyro_vits.infer.distributed.DistributedContext`, every rank of a ``torchrun`` launch calling ``fit``
    alike): data-parallel SVI, ``batch_size`` being the combined minibatch of all ranks; the process runs on
    the strategy's device (``device`` must be ``"auto"`` or of its type). Only rank 0 writes ``out_dir``,
    evaluates and logs records (other ranks return no ``metrics`` and ``out_dir=None``); ``losses`` are the
    combined minibatch's on every rank.
    """
    for name, value in (("data", data), ("heldout", heldout)):
        if not (isinstance(value, FitData) or (name == "heldout" and value is None)):
            raise TypeError(f"{name} must be a pyro_vits Batch (or implement pyro_vits.data.batch.FitData), "
                            f"got {type(value).__name__}")
    if not isinstance(config, FitConfig):
        raise TypeError(f"config must be a pyro_vits.train.FitConfig, got {type(config).__name__}")
    cfg = config
    elbo = _default_elbo(elbo, cfg)
    if distributed is not None and not isinstance(distributed, DataParallel):
        raise TypeError(f"distributed must be a DataParallel strategy, got {type(distributed).__name__}")
    dev = resolve_device(device) if distributed is None else parallel_device(device, distributed)
    data.check_finite("data")
    if heldout is not None:
        heldout.check_finite("heldout")
    checkpoint = load_checkpoint(cfg.out_dir / CHECKPOINT) if cfg.resume else None
    if cfg.out_dir is not None and not cfg.resume:
        check_out_dir(cfg.out_dir, cfg.overwrite)
    if cfg.out_dir is not None and (distributed is None or distributed.is_main):
        check_writable(cfg.out_dir, what="out_dir")

    run = _Run(model, guide, data, heldout, elbo, cfg, dev, distributed, extra_config, checkpoint)
    bar = tqdm(range(run.state.step + 1, cfg.steps + 1), initial=run.state.step, total=cfg.steps,
               disable=not (cfg.progress and run.main), desc="SVI", unit="step", dynamic_ncols=True)
    stop = _StopRequests()
    try:
        with stop.active(distributed is None):
            for step in bar:
                run.step(step)
                if run.main and (step % cfg.log_every == 0 or step == cfg.steps):
                    record = run.log(step)
                    bar.set_postfix(elbo=f"{record['elbo_per_frame']:.3f}",
                                    kl=f"{record['kl_per_frame']:.3f}")
                if run.out is not None and (step == cfg.steps or stop.signum is not None or (
                        cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
                    run.save()
                if stop.signum is not None:
                    raise RunInterrupted(stop.signum, run.state.step,
                                         run.out if run.saved_step == run.state.step else None)
    except RunInterrupted:
        raise
    except OSError:  # e.g. a full disk: a run that never saved a checkpoint leaves nothing behind
        run.discard_unsaved()
        raise
    except KeyboardInterrupt:
        run.interrupted()
        raise
    finally:
        bar.close()
    if distributed is not None:
        distributed.barrier()  # every rank returns once rank 0's run files are complete
    return run.result()


def _default_elbo(elbo: ELBO | None, cfg: FitConfig) -> ELBO:
    chosen = {name: getattr(cfg, name) for name in ELBO_FIELDS}
    if elbo is None:
        return make_elbo(cfg.elbo or "trace", cfg.particles or 1, True if cfg.vectorize is None else cfg.vectorize,
                         cfg.kl_particles or 1)
    if not isinstance(elbo, ELBO):
        raise TypeError(f"elbo must be a pyro.infer.ELBO, got {type(elbo).__name__} (an ELBO by name: "
                        "FitConfig(elbo=...))")
    if any(value is not None for value in chosen.values()):
        raise ValueError("particles/vectorize/kl_particles configure the default Trace_ELBO; set them on the "
                         "elbo you pass")
    return elbo


def _prime(model: nn.Module, guide: nn.Module, data: FitData, subsample_size: int | None,
           dev: torch.device) -> None:
    """Run guide and model once (no gradients, random state untouched) so that ``pyro.module`` and
    ``pyro.param`` register every parameter before the optimiser is built."""
    with torch.random.fork_rng(devices=cuda_devices(dev)), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(data, subsample_size=subsample_size)
        poutine.replay(model, trace=guide_trace)(data, subsample_size=subsample_size)


def _trainable(model: nn.Module, guide: nn.Module) -> tuple[Named, Named]:
    """``(named, extra)``: every trainable tensor named ``<pyro name>.<parameter>`` (model's, then guide's,
    each once), then the param store's other entries as ``param_store.<name>``; ``extra`` lists the latter
    under their store names."""
    named: dict[int, tuple[str, Tensor]] = {}
    owned = []
    for module, default in ((model, "model"), (guide, "guide")):
        prefix = getattr(module, "pyro_name", default)
        owned.append(f"{prefix}$$$")
        for name, p in module.named_parameters():
            if p.requires_grad:
                named.setdefault(id(p), (f"{prefix}.{name}", p))
    extra = [(name, p) for name, p in pyro.get_param_store().named_parameters()
             if id(p) not in named and not name.startswith(tuple(owned)) and p.requires_grad]
    return list(named.values()) + [(f"param_store.{name}", p) for name, p in extra], extra


class _Run:
    """One :func:`fit` in progress: set up (seed, device, parameters, optimiser, config, resume, run
    folder) on construction; then :meth:`step`, :meth:`log`, :meth:`save` per step and :meth:`result`."""

    def __init__(self, model: nn.Module, guide: nn.Module, data: FitData, heldout: FitData | None,
                 elbo: ELBO, cfg: FitConfig, dev: torch.device, strategy: DataParallel | None,
                 extra_config: Mapping[str, Any] | None, checkpoint: Mapping[str, Any] | None) -> None:
        pyro.set_rng_seed(cfg.seed)
        pyro.clear_param_store()
        self.model, self.guide, self.elbo, self.cfg, self.dev = model.to(dev), guide.to(dev), elbo, cfg, dev
        self.data = data.to(dev)
        self.heldout = None if heldout is None else heldout.to(dev)
        self.subsample_size = None if cfg.batch_size is None or cfg.batch_size >= data.n else cfg.batch_size
        self.eval_data = self.data.subset(torch.arange(min(cfg.eval_size, data.n), device=dev))
        _prime(model, guide, self.data, self.subsample_size, dev)
        # the data-parallel hook: the strategy's ELBO step; only the main process writes and logs
        self.parallel = None if strategy is None else strategy.data_parallel(
            model, guide, elbo, self.data, self.subsample_size, cfg.seed)
        self.main = strategy is None or strategy.is_main
        self.out = cfg.out_dir if self.main else None
        self.step_args: tuple[Any, int | None] = (self.data, self.subsample_size)  # what a re-trace runs on
        named, self.extra = _trainable(model, guide)
        self.optim = ClippedAdam([p for _, p in named], lr=cfg.lr, clip_norm=cfg.clip_norm, lrd=cfg.lrd)
        self.guard = NonFiniteGuard(model, guide, elbo, named, self.optim, dev, cfg.nan_policy)
        # CUDA + "stop": losses and NaN checks stay on the device between logging / checkpoint steps
        self.deferred = self.parallel is None and defers_checks(dev, cfg.nan_policy)
        self.config = cfg.record(elbo=elbo, model=model, guide=guide, data=self.data, heldout=self.heldout,
                                 device=dev, extra=extra_config,
                                 parallel=None if strategy is None else strategy.describe())
        self.state = Progress()
        self.resumed_from = None if checkpoint is None else int(checkpoint["step"])
        if checkpoint is not None:
            self.config = resumed_config(checkpoint["config"], self.config, int(checkpoint["step"]))
            if checkpoint["step"] > cfg.steps:
                raise ValueError(f"the checkpoint is at step {checkpoint['step']}, beyond steps={cfg.steps}")
            self.state = restore(checkpoint, model, guide, self.optim, self.extra, dev)
            logger.info("resuming %s at step %d of %d", self.out, self.state.step, cfg.steps)
        self.saved_step = self.state.step if checkpoint is not None else None
        self.created = self.out is not None and not self.out.exists()
        if self.out is not None:
            prepare_run_dir(self.out, self.config, self.state.metrics, resume=cfg.resume,
                            overwrite=cfg.overwrite)
        logger.info("SVI on %s: %d utterances, steps %d..%d, %s with %d particle(s)", dev, data.n,
                    self.state.step + 1, cfg.steps, type(elbo).__name__, elbo.num_particles)
        self.start = time.perf_counter() - self.state.wall_s
        self.window_start = time.perf_counter()
        self.timed_from = self.state.step

    def step(self, step: int) -> None:
        """One SVI step: loss and gradients, then the guarded update."""
        if self.parallel is not None:  # seeds this rank's noise for the step, picks its utterances
            self.step_args = (self.parallel.begin(step), None)
        rng = torch_rng(self.dev)
        with warnings.catch_warnings():  # Pyro's "Encountered NaN": the guard names step and sites
            warnings.filterwarnings("ignore", "Encountered NaN", UserWarning, r".*[\\/]pyro[\\/]")
            if self.deferred:
                loss_t = self.elbo.differentiable_loss(self.model, self.guide, self.data,
                                                       subsample_size=self.subsample_size)
                if loss_t.requires_grad:
                    loss_t.backward()
            else:
                loss = (self.elbo.loss_and_grads(self.model, self.guide, self.data,
                                                 subsample_size=self.subsample_size)
                        if self.parallel is None else self.parallel.loss_and_grads())
        if self.deferred:
            self.guard.defer(step, loss_t, self.step_args, rng)
        else:
            if not self.guard.step(step, loss, self.step_args, rng, self.state.skipped, self._kept()):
                self.state.skipped += 1
            self.state.losses.append(loss)
        self.optim.zero_grad(set_to_none=True)
        self.state.step = step

    def _kept(self) -> str:
        return (f"; the last checkpoint ({self.out / CHECKPOINT}, step {self.saved_step}) is intact"
                if self.saved_step is not None and self.out is not None else "")

    def flush(self) -> None:
        """Read the deferred steps' losses back (raises on a non-finite step); a no-op otherwise."""
        self.state.losses.extend(self.guard.flush(self._kept()))

    def log(self, step: int) -> dict[str, float]:
        """The record of the window ending at ``step`` (evaluated now), appended to ``metrics.jsonl``."""
        self.flush()
        window_s = time.perf_counter() - self.window_start
        window = [x for x in self.state.losses[self.state.window_first:] if math.isfinite(x)]
        record: dict[str, float] = {"step": step,
                                    "loss_nats": sum(window) / len(window) if window else math.nan}
        with warnings.catch_warnings():  # a diverging "skip" run: the NaN shows in the record itself
            warnings.filterwarnings("ignore", "Encountered NaN", UserWarning, r".*[\\/]pyro[\\/]")
            result = evaluate(self.model, self.guide, self.eval_data, self.cfg.eval_samples, self.cfg.seed,
                              eval_chunk=self.cfg.eval_chunk)
            record.update({k: result[k] for k in METRIC_KEYS})
            if self.heldout is not None:
                result = evaluate(self.model, self.guide, self.heldout, self.cfg.eval_samples, self.cfg.seed,
                                  eval_chunk=self.cfg.eval_chunk)
                record.update({f"heldout_{k}": result[k] for k in METRIC_KEYS})
        record["skipped_steps"] = self.state.skipped
        record["wall_s"] = time.perf_counter() - self.start
        record["it_per_s"] = (step - max(self.state.window_first, self.timed_from)) / window_s
        self.state.metrics.append(record)
        if self.out is not None:
            append_record(self.out, record)
        logger.debug("step %d: %s", step, record)
        self.state.window_first = step
        self.window_start = time.perf_counter()
        return record

    def save(self) -> None:
        """Replace the checkpoint with the state after the current step."""
        self.flush()
        self.state.wall_s = time.perf_counter() - self.start
        save_checkpoint(self.out, self.state, self.model, self.guide, self.optim, self.extra, self.config,
                        self.dev)
        self.saved_step = self.state.step

    def discard_unsaved(self) -> None:
        """After a failed write: when no checkpoint of this run exists, remove its config and metrics (and
        the folder, when this run created it and it is empty): there is nothing to resume."""
        if self.out is None or self.saved_step is not None:
            return
        for name in RUN_FILES:
            (self.out / name).unlink(missing_ok=True)
        if self.created and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()

    def interrupted(self) -> None:
        logger.warning("interrupted after step %d; %s", self.state.step,
                       f"resume from the checkpoint at step {self.saved_step} in {self.out}"
                       if self.saved_step is not None else "no checkpoint was written")

    def result(self) -> FitResult:
        self.flush()
        return FitResult(self.model, self.guide, self.state.losses, self.state.metrics, self.config, self.dev,
                         time.perf_counter() - self.start, self.out, self.state.skipped, self.resumed_from)
