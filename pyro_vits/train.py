"""Stochastic variational inference for :class:`~pyro_vits.model.VITSPriorModel` and a guide.

``fit`` runs ``elbo.loss_and_grads`` (default ``Trace_ELBO``) with Pyro's ``ClippedAdam`` over the
model's and guide's parameters, logs Monte-Carlo measures (nats per valid frame, see
:func:`~pyro_vits.model.evaluate`) every ``log_every`` steps and, with ``out_dir``, writes
``config.json``, ``metrics.jsonl`` (one JSON object per logged step) and ``checkpoint.pt``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer import ELBO, Trace_ELBO
from pyro.optim.clipped_adam import ClippedAdam
from torch import nn
from tqdm.auto import tqdm

from .model import Batch, evaluate

__all__ = ["FitResult", "fit", "resolve_device"]

METRIC_KEYS = (
    "elbo_per_frame", "elbo_stderr_per_frame", "kl_per_frame", "recon_per_frame", "loglik_iwae_per_frame"
)


@dataclass
class FitResult:
    """Outcome of :func:`fit`.

    ``losses``: the ELBO's loss (negative ELBO in nats, a minibatch estimate scaled to the whole data set)
    at every step; ``metrics``: the logged records (as in ``metrics.jsonl``); ``config``: as in
    ``config.json``; ``out_dir``: where files went, or None.
    """

    model: nn.Module
    guide: nn.Module
    losses: list[float]
    metrics: list[dict[str, float]]
    config: dict[str, Any]
    device: torch.device
    wall_s: float
    out_dir: Path | None


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:<i>"`` are checked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<i>', got {device!r}") from err
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<i>', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available (use 'cpu' or 'auto')")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write ``path`` via a temporary file in the same folder and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _json_dump(obj: Any) -> Callable[[Any], None]:
    return lambda f: json.dump(obj, f, indent=2, sort_keys=True)


def _describe(data: Batch | None) -> dict[str, Any] | None:
    if data is None:
        return None
    return dict(n=data.n, channels=data.channels, frames=data.frames, num_frames=data.num_frames,
                speakers=data.speaker is not None, dtype=str(data.x.dtype))


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


def fit(
    model: nn.Module,
    guide: nn.Module,
    data: Batch,
    *,
    steps: int,
    particles: int | None = None,
    vectorize: bool | None = None,
    lr: float = 1e-3,
    clip_norm: float = 10.0,
    lrd: float = 1.0,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    log_every: int = 50,
    progress: bool = True,
    heldout: Batch | None = None,
    elbo: ELBO | None = None,
    eval_samples: int = 8,
    eval_size: int = 64,
    extra_config: Mapping[str, Any] | None = None,
) -> FitResult:
    """Fit ``model`` and ``guide`` (both called as ``f(batch, subsample_size=...)``) to ``data`` by SVI.

    ``elbo`` defaults to ``Trace_ELBO(num_particles=particles or 1, vectorize_particles=vectorize (True),
    max_plate_nesting=1)``; when an ``elbo`` is passed, ``particles``/``vectorize`` must be left None.
    ``ClippedAdam`` multiplies the learning rate by ``lrd`` after every step and clamps gradient entries
    to ``[-clip_norm, clip_norm]``. ``batch_size`` utterances are subsampled per step (None: all).

    The parameter store is cleared and ``pyro.set_rng_seed(seed)`` called first; model, guide and data
    are moved to ``device``; on CPU a run is bit-for-bit reproducible, and logging (which evaluates on
    its own RNG stream) does not change the trajectory. Every ``log_every`` steps and at the last a
    record is logged: ``step``, ``loss_nats`` (mean loss over the window), the ``*_per_frame`` measures
    of :func:`evaluate` with ``eval_samples`` particles on the first ``eval_size`` training utterances
    (``heldout_*`` on ``heldout``), ``wall_s`` (since the start) and ``it_per_s`` (SVI steps only).
    ``extra_config`` is stored under ``"extra"`` in the config. The loop itself adds no per-step host
    syncs, but Pyro's ELBOs return the loss as a Python float, which syncs once per step on CUDA.
    """
    if not isinstance(data, Batch) or (heldout is not None and not isinstance(heldout, Batch)):
        raise TypeError("data (and heldout, when given) must be pyro_vits.model.Batch instances")
    _positive_int("steps", steps)
    _positive_int("log_every", log_every)
    _positive_int("eval_samples", eval_samples)
    _positive_int("eval_size", eval_size)
    _positive_int("batch_size", batch_size, allow_none=True)
    _positive_int("particles", particles, allow_none=True)
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not 0 < lrd <= 1:
        raise ValueError(f"lrd (the learning rate's per-step decay factor) must be in (0, 1], got {lrd!r}")
    if elbo is None:
        vectorize = True if vectorize is None else vectorize
        elbo = Trace_ELBO(num_particles=particles or 1, vectorize_particles=vectorize, max_plate_nesting=1)
    elif not isinstance(elbo, ELBO):
        raise TypeError(f"elbo must be a pyro.infer.ELBO, got {type(elbo).__name__}")
    elif particles is not None or vectorize is not None:
        raise ValueError("particles/vectorize configure the default Trace_ELBO; set them on the elbo you "
                         "pass instead")
    dev = resolve_device(device)

    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    model.to(dev)
    guide.to(dev)
    data = data.to(dev)
    heldout = None if heldout is None else heldout.to(dev)
    subsample_size = None if batch_size is None or batch_size >= data.n else batch_size
    eval_data = data.subset(torch.arange(min(eval_size, data.n), device=dev))
    params = list({id(p): p for m in (model, guide) for p in m.parameters() if p.requires_grad}.values())
    optim = ClippedAdam(params, lr=lr, clip_norm=clip_norm, lrd=lrd)

    config: dict[str, Any] = dict(
        steps=steps, lr=lr, clip_norm=clip_norm, lrd=lrd, optimizer="pyro.optim.clipped_adam.ClippedAdam",
        batch_size=batch_size, device=str(dev), seed=seed, log_every=log_every, eval_samples=eval_samples,
        eval_size=eval_size,
        elbo=dict(type=type(elbo).__name__, num_particles=elbo.num_particles,
                  vectorize_particles=elbo.vectorize_particles, max_plate_nesting=elbo.max_plate_nesting),
        model=dict(type=type(model).__name__, **getattr(model, "config", {})),
        guide=dict(type=type(guide).__name__, **getattr(guide, "config", {})),
        data=_describe(data), heldout=_describe(heldout), extra=dict(extra_config or {}),
        units="*_per_frame: nats per valid frame, channels summed; loss_nats: nats; wall_s: seconds",
        versions=dict(torch=torch.__version__, pyro=pyro.__version__, python=sys.version.split()[0],
                      platform=platform.platform()),
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    out = None if out_dir is None else Path(out_dir)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(out / "config.json", _json_dump(config))
        (out / "metrics.jsonl").write_text("")

    losses: list[float] = []
    metrics: list[dict[str, float]] = []
    start = window_start = time.perf_counter()
    window_first = 0
    bar = tqdm(range(1, steps + 1), disable=not progress, desc="SVI", unit="step", dynamic_ncols=True)
    for step in bar:
        losses.append(elbo.loss_and_grads(model, guide, data, subsample_size=subsample_size))
        optim.step()
        optim.zero_grad(set_to_none=True)
        if step % log_every and step != steps:
            continue
        window_s = time.perf_counter() - window_start
        window = losses[window_first:]
        record: dict[str, float] = {"step": step, "loss_nats": sum(window) / len(window)}
        result = evaluate(model, guide, eval_data, eval_samples, seed)
        record.update({k: result[k] for k in METRIC_KEYS})
        if heldout is not None:
            result = evaluate(model, guide, heldout, eval_samples, seed)
            record.update({f"heldout_{k}": result[k] for k in METRIC_KEYS})
        record["wall_s"] = time.perf_counter() - start
        record["it_per_s"] = len(window) / window_s
        metrics.append(record)
        if out is not None:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        bar.set_postfix(elbo=f"{record['elbo_per_frame']:.3f}", kl=f"{record['kl_per_frame']:.3f}")
        window_first = step
        window_start = time.perf_counter()
    bar.close()
    wall_s = time.perf_counter() - start

    if out is not None:
        checkpoint = dict(model=model.state_dict(), guide=guide.state_dict(), optimizer=optim.state_dict(),
                          step=steps, config=config)
        _atomic_write(out / "checkpoint.pt", lambda f: torch.save(checkpoint, f), mode="wb")
    return FitResult(model, guide, losses, metrics, config, dev, wall_s, out)
