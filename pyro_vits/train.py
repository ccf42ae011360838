"""Stochastic variational inference for :class:`~pyro_vits.model.VITSPriorModel` and a guide.

``fit`` runs ``elbo.loss_and_grads`` (default ``Trace_ELBO``) with Pyro's ``ClippedAdam`` over the model's
and guide's parameters (and any other ``pyro.param`` they declare), logs Monte-Carlo measures (nats per valid
frame, see :func:`~pyro_vits.model.evaluate`) every ``log_every`` steps and, with ``out_dir``, writes
``config.json``, ``metrics.jsonl`` (one JSON object per logged step) and ``checkpoint.pt`` (atomically, every
``checkpoint_every`` steps and at the end). ``resume=True`` continues a stopped run; on CPU the continuation
is bit-identical to an uninterrupted run. A step whose loss or gradient is NaN/Inf stops the run with a
:class:`NonFiniteError` naming the step, the parameters and the sample sites, or is skipped
(``nan_policy="skip"``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO
from pyro.optim.clipped_adam import ClippedAdam
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._validate import check_positive_ints
from .elbo import IWAE_DReG, STL_ELBO, HybridEntropyELBO
from .flows import ResidualCouplingBlock, load_vits_flow
from .model import Batch, _vectorised, evaluate

if TYPE_CHECKING:
    from .distributed import DistributedContext

__all__ = [
    "ESTIMATORS",
    "NAN_POLICIES",
    "FitResult",
    "NonFiniteError",
    "fit",
    "geometric_lrd",
    "load_checkpoint",
    "make_elbo",
    "read_vits_flow",
    "resolve_device",
]

logger = logging.getLogger(__name__)

METRIC_KEYS = ("elbo_per_frame", "elbo_stderr_per_frame", "kl_per_frame", "recon_per_frame",
               "loglik_iwae_per_frame")
ESTIMATORS: dict[str, type[ELBO]] = {
    "trace": Trace_ELBO, "vits": HybridEntropyELBO, "stl": STL_ELBO, "iwae_dreg": IWAE_DReG,
}
NAN_POLICIES = ("stop", "skip")
CHECKPOINT = "checkpoint.pt"
RUN_FILES = ("config.json", "metrics.jsonl", CHECKPOINT)
CHECKPOINT_FORMAT = 1
CHECKPOINT_KEYS = ("format", "step", "model", "guide", "optimizer", "param_store", "losses", "metrics",
                   "window_first", "skipped", "wall_s", "rng", "config")
# config entries a resumed run must share with its checkpoint (optimiser and schedule continue as saved)
RESUME_KEYS = ("model", "guide", "elbo", "data", "heldout", "batch_size", "seed")
Named = list[tuple[str, Tensor]]  # (name, tensor) pairs of trainable parameters


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


class NonFiniteError(FloatingPointError):
    """A step's loss or gradient was NaN/Inf under ``nan_policy="stop"``; ``step`` is its number."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


@dataclass
class _Progress:
    """The loop's position and history, as a checkpoint records them besides the parameters."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)
    window_first: int = 0
    skipped: int = 0
    wall_s: float = 0.0


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


def _distributed_device(device: str | torch.device, context: DistributedContext) -> torch.device:
    """The context's device, after checking that ``device`` ("auto" or the same type) agrees with it."""
    if device != "auto" and resolve_device(device).type != context.device.type:
        raise ValueError(f"device={device!r} but this distributed process runs on {context.device}")
    return context.device


def make_elbo(estimator: str = "trace", particles: int = 1, vectorize: bool = True) -> ELBO:
    """The ELBO named ``estimator`` (a key of :data:`ESTIMATORS`) with ``particles`` particles per step and
    ``max_plate_nesting=1``: ``trace`` (``Trace_ELBO``), ``vits`` (:class:`~pyro_vits.elbo.HybridEntropyELBO`,
    VITS's analytic-entropy estimator), ``stl``, ``iwae_dreg``."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {tuple(ESTIMATORS)}, got {estimator!r}")
    check_positive_ints(particles=particles)
    return ESTIMATORS[estimator](num_particles=particles, vectorize_particles=vectorize, max_plate_nesting=1)


def geometric_lrd(final_lr_ratio: float, steps: int) -> float:
    """``ClippedAdam``'s per-step decay ``lrd`` that takes the learning rate to ``final_lr_ratio`` times its
    initial value over ``steps`` steps."""
    check_positive_ints(steps=steps)
    ratio = final_lr_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"final_lr_ratio must be in (0, 1], got {ratio!r}")
    return ratio ** (1 / steps)


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write ``path`` via a temporary file in the same folder and ``os.replace``: a reader (or a crash)
    sees either the previous file or the complete new one."""
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




def _first_line(err: BaseException) -> str:
    """The informative line of an error message (torch's weights-only refusals put theirs last)."""
    lines = [line.strip() for line in str(err).strip().splitlines()]
    line = next((x for x in lines if x.startswith("WeightsUnpickler error:")), lines[0] if lines else "")
    return f"{type(err).__name__}: {line}"


def _cuda_devices(dev: torch.device) -> list[torch.device]:
    return [dev] if dev.type == "cuda" else []


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a :func:`fit` checkpoint (a file, or a run folder holding ``checkpoint.pt``) with
    ``torch.load(weights_only=True)`` onto the CPU and check its layout."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, foreign pickle, ...: all mean "not a usable checkpoint"
        raise ValueError(f"cannot read checkpoint {path} ({_first_line(err)})") from err
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path} is not a resumable pyro_vits checkpoint: it lacks {missing}")
    if state["format"] != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has checkpoint format {state['format']!r}; this version reads "
                         f"{CHECKPOINT_FORMAT}")
    return state


def read_vits_flow(path: str | os.PathLike, dilation_rate: int = 1) -> tuple[ResidualCouplingBlock, int]:
    """The prior flow of a VITS generator checkpoint file (original or coqui-TTS layout, see
    :func:`~pyro_vits.flows.load_vits_flow`), loaded with ``weights_only=True``, and the number of speakers
    of its ``emb_g`` (0 when it has none)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no VITS checkpoint at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"cannot load {path} with torch.load(weights_only=True) ({_first_line(err)}); if it holds other "
            "Python objects, re-save its state dict: torch.save({'model': ckpt['model']}, 'generator.pth')"
        ) from err
    try:
        flow = load_vits_flow(obj, dilation_rate)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{path}: {err}") from err
    state = obj.get("model", obj)
    emb = next((v for k, v in state.items()
                if isinstance(k, str) and k.removeprefix("module.") == "emb_g.weight"), None)
    return flow, 0 if emb is None else int(emb.shape[0])


def _rng_state(dev: torch.device) -> dict[str, Any]:
    """Every random state a step may use, as tensors and lists (``weights_only``-loadable)."""
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return dict(
        torch=torch.get_rng_state(),
        cuda=list(torch.cuda.get_rng_state_all()) if dev.type == "cuda" else [],
        numpy=[np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_cached)],
        python=[py_version, list(py_internal), py_gauss],
    )


def _set_rng_state(state: Mapping[str, Any], dev: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if dev.type == "cuda" and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    elif state["cuda"] or dev.type == "cuda":
        logger.warning("the checkpoint's CUDA random state does not fit this run on %s: the continuation is "
                       "not bit-identical to an uninterrupted run", dev)
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _save_checkpoint(out: Path, progress: _Progress, model: nn.Module, guide: nn.Module, optim: ClippedAdam,
                     extra: Named, config: Mapping[str, Any], dev: torch.device) -> None:
    checkpoint = dict(
        format=CHECKPOINT_FORMAT, step=progress.step, model=model.state_dict(), guide=guide.state_dict(),
        optimizer=optim.state_dict(), param_store={name: p.detach() for name, p in extra},
        losses=torch.tensor(progress.losses, dtype=torch.float64), metrics=progress.metrics,
        window_first=progress.window_first, skipped=progress.skipped, wall_s=progress.wall_s,
        rng=_rng_state(dev), config=json.loads(json.dumps(config)),
    )
    _atomic_write(out / CHECKPOINT, lambda f: torch.save(checkpoint, f), mode="wb")
    logger.debug("step %d: wrote %s", progress.step, out / CHECKPOINT)


def _restore(checkpoint: Mapping[str, Any], model: nn.Module, guide: nn.Module, optim: ClippedAdam,
             extra: Named, dev: torch.device) -> _Progress:
    """Load parameters, optimiser state and random states; return the loop's position."""
    try:
        model.load_state_dict(checkpoint["model"])
        guide.load_state_dict(checkpoint["guide"])
    except RuntimeError as err:
        details = " ".join(str(err).split())  # torch lists the mismatches on tab-indented lines
        raise ValueError(f"the checkpoint's parameters do not fit this model/guide: {details}") from err
    saved = checkpoint["param_store"]
    if sorted(saved) != sorted(name for name, _ in extra):
        raise ValueError(f"the checkpoint's pyro.param entries {sorted(saved)} differ from this run's "
                         f"{sorted(name for name, _ in extra)}")
    with torch.no_grad():
        for name, p in extra:
            if saved[name].shape != p.shape:
                raise ValueError(f"pyro.param {name!r} has shape {tuple(p.shape)}, the checkpoint's "
                                 f"{tuple(saved[name].shape)}")
            p.copy_(saved[name])
    try:
        optim.load_state_dict(checkpoint["optimizer"])
    except (KeyError, RuntimeError, ValueError) as err:
        raise ValueError(f"the checkpoint's optimiser state does not fit these parameters: {err}") from err
    _set_rng_state(checkpoint["rng"], dev)
    return _Progress(step=int(checkpoint["step"]), losses=checkpoint["losses"].tolist(),
                     metrics=[dict(r) for r in checkpoint["metrics"]],
                     window_first=int(checkpoint["window_first"]), skipped=int(checkpoint["skipped"]),
                     wall_s=float(checkpoint["wall_s"]))


def _resumed_config(saved: Mapping[str, Any], config: dict[str, Any], step: int) -> dict[str, Any]:
    """``config`` for a run resumed from a checkpoint with ``saved`` config; refuses a different problem."""
    def norm(value: Any) -> Any:
        return json.loads(json.dumps(value))

    differ = [k for k in RESUME_KEYS if norm(saved.get(k)) != norm(config.get(k))]
    if differ:
        details = "; ".join(f"{k}: checkpoint {norm(saved.get(k))} vs now {norm(config.get(k))}"
                            for k in differ)
        raise ValueError(f"cannot resume: this run differs from the checkpoint's in {details}")
    resumed = [*saved.get("resumed", []), dict(step=step, utc=config["created_utc"])]
    return dict(config, created_utc=saved.get("created_utc"), resumed=resumed)


def _check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a run folder that exists and is not empty, unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir {out} exists and is not a directory")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
        raise FileExistsError(
            f"out_dir {out} is not empty ({shown}); refusing to overwrite it: pass overwrite=True "
            f"(--overwrite) to replace its run files, or resume=True (--resume {out}) to continue the run"
        )


def _remove_run_files(out: Path, keep_checkpoint: bool) -> None:
    """Delete the temporary files of interrupted writes in ``out`` and, unless ``keep_checkpoint``, the run
    files :func:`fit` writes (config.json and metrics.jsonl are rewritten either way)."""
    for name in RUN_FILES:
        if not keep_checkpoint:
            (out / name).unlink(missing_ok=True)
        for tmp in out.glob(f".{name}.*.tmp"):
            tmp.unlink()


# --------------------------------------------------------------------------------------------------
# Parameters and the non-finite guard
# --------------------------------------------------------------------------------------------------


def _prime(model: nn.Module, guide: nn.Module, data: Batch, subsample_size: int | None,
           dev: torch.device) -> None:
    """Run guide and model once (no gradients, random state untouched) so that ``pyro.module`` and
    ``pyro.param`` register every parameter before the optimiser is built."""
    with torch.random.fork_rng(devices=_cuda_devices(dev)), torch.no_grad():
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


def _grads_finite(params: Sequence[Tensor]) -> bool:
    """One fused check that every gradient entry is finite (max-abs norms: a NaN/Inf entry propagates)."""
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.stack(torch._foreach_norm(grads, math.inf)).isfinite().all())


def _listed(names: Sequence[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _nonfinite_sites(model: nn.Module, guide: nn.Module, data: Batch, subsample_size: int | None,
                     rng: list[Tensor], dev: torch.device, elbo: ELBO) -> str:
    """Re-trace a step with its random numbers (its first particle) and name the sample sites whose value
    or log-density is NaN/Inf."""
    k = elbo.num_particles if elbo.vectorize_particles else 1
    bad = []
    try:
        with torch.random.fork_rng(devices=_cuda_devices(dev)), torch.no_grad():
            torch.set_rng_state(rng[0])
            if dev.type == "cuda":
                torch.cuda.set_rng_state(rng[1], dev)
            guide_trace = poutine.trace(_vectorised(guide, k)).get_trace(data, subsample_size=subsample_size)
            replayed = poutine.replay(_vectorised(model, k), trace=guide_trace)
            model_trace = poutine.trace(replayed).get_trace(data, subsample_size=subsample_size)
            for who, trace in (("guide", guide_trace), ("model", model_trace)):
                for name, site in trace.nodes.items():
                    if site["type"] != "sample" or site_is_subsample(site):
                        continue
                    if not bool(torch.isfinite(site["value"]).all()):
                        bad.append(f"{who} site {name!r} (its value)")
                    elif not bool(torch.isfinite(site["fn"].log_prob(site["value"])).all()):
                        bad.append(f"{who} site {name!r} (its log-density)")
    except Exception as err:  # a diagnosis only: report, never mask the original problem
        return f"re-tracing the step to find the site failed ({_first_line(err)})"
    if not bad:
        return "no sample site is non-finite in a re-trace of the step"
    return f"non-finite sample sites: {_listed(bad)}"


def _nonfinite_report(step: int, loss: float, named: Named, sites: Callable[[], str]) -> str:
    """What went wrong at ``step``: the loss, parameters with non-finite values or gradients, the sites."""
    parts = [f"step {step}: loss = {loss}"]
    bad_values = [name for name, p in named if not bool(torch.isfinite(p).all())]
    if bad_values:
        parts.append(f"non-finite values in {_listed(bad_values)}")
    bad_grads = [name for name, p in named if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    if bad_grads:
        parts.append(f"non-finite gradient of {_listed(bad_grads)}")
    parts.append(sites())
    return "; ".join(parts)


def _torch_rng(dev: torch.device) -> list[Tensor]:
    return [torch.get_rng_state(), *([torch.cuda.get_rng_state(dev)] if dev.type == "cuda" else [])]


# --------------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------------


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
    checkpoint_every: int | None = None,
    nan_policy: str = "stop",
    resume: bool = False,
    overwrite: bool = False,
    distributed: DistributedContext | None = None,
) -> FitResult:
    """Fit ``model`` and ``guide`` (both called as ``f(batch, subsample_size=...)``) to ``data`` by SVI.

    ``elbo`` defaults to ``Trace_ELBO(num_particles=particles or 1, vectorize_particles=vectorize (True),
    max_plate_nesting=1)``; when an ``elbo`` is passed, ``particles``/``vectorize`` must be left None.
    ``ClippedAdam`` multiplies the learning rate by ``lrd`` after every step and clamps gradient entries to
    ``[-clip_norm, clip_norm]``. ``batch_size`` utterances are subsampled per step (None: all). The parameter
    store is cleared and ``pyro.set_rng_seed(seed)`` called first; model, guide and data are moved to
    ``device``; on CPU the run is bit-for-bit reproducible. Every ``log_every`` steps (and at the last) a
    record is logged: ``step``, ``loss_nats`` (mean finite loss over the window), ``*_per_frame`` from
    :func:`evaluate` with ``eval_samples`` particles on the first ``eval_size`` training utterances
    (``heldout_*`` on ``heldout``), ``skipped_steps`` (so far), ``wall_s`` (since the start) and ``it_per_s``
    (SVI steps only). ``extra_config`` is stored under ``"extra"`` in the config.

    Run folder ``out_dir``: refused when it exists and is not empty, unless ``overwrite`` (its run files are
    deleted first) or ``resume`` (the run continues from its ``checkpoint.pt`` with the same model, guide,
    data and ELBO, up to ``steps``; the optimiser, its learning-rate schedule and the random states continue
    as saved). ``checkpoint_every`` steps (and at the end) the checkpoint is replaced atomically.
    A NaN/Inf loss or gradient raises :class:`NonFiniteError` (``nan_policy="stop"``; the last checkpoint is
    untouched) or drops that step's update (``"skip"``, counted in ``skipped_steps``).

    ``distributed`` (a :class:`~pyro_vits.distributed.DistributedContext`, every rank of a ``torchrun``
    launch calling ``fit`` alike): data-parallel SVI, ``batch_size`` being the combined minibatch of all ranks
    (see :mod:`pyro_vits.distributed`); the process runs on the context's device (``device`` must be
    ``"auto"`` or of its type). Only rank 0 writes ``out_dir``, evaluates and logs records (other ranks
    return no ``metrics`` and ``out_dir=None``); ``losses`` are the combined minibatch's on every rank.
    """
    if not isinstance(data, Batch) or (heldout is not None and not isinstance(heldout, Batch)):
        raise TypeError("data (and heldout, when given) must be pyro_vits.model.Batch instances")
    check_positive_ints(steps=steps, log_every=log_every, eval_samples=eval_samples, eval_size=eval_size)
    check_positive_ints(batch_size=batch_size, particles=particles, checkpoint_every=checkpoint_every,
                        allow_none=True)
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not 0 < lrd <= 1:
        raise ValueError(f"lrd (the learning rate's per-step decay factor) must be in (0, 1], got {lrd!r}")
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    if elbo is None:
        elbo = make_elbo("trace", particles or 1, True if vectorize is None else vectorize)
    elif not isinstance(elbo, ELBO):
        raise TypeError(f"elbo must be a pyro.infer.ELBO, got {type(elbo).__name__}")
    elif particles is not None or vectorize is not None:
        raise ValueError("particles/vectorize configure the default Trace_ELBO; set them on the elbo you "
                         "pass")
    out = None if out_dir is None else Path(out_dir)
    if out is None and (resume or checkpoint_every is not None):
        raise ValueError("resume and checkpoint_every need out_dir (the run folder)")
    if resume and overwrite:
        raise ValueError("resume=True continues the run in out_dir and overwrite=True would delete it: "
                         "pass one")
    dev = resolve_device(device) if distributed is None else _distributed_device(device, distributed)
    data.check_finite("data")
    if heldout is not None:
        heldout.check_finite("heldout")
    checkpoint = load_checkpoint(out / CHECKPOINT) if resume else None
    if out is not None and not resume:
        _check_out_dir(out, overwrite)

    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    model.to(dev)
    guide.to(dev)
    data = data.to(dev)
    heldout = None if heldout is None else heldout.to(dev)
    subsample_size = None if batch_size is None or batch_size >= data.n else batch_size
    eval_data = data.subset(torch.arange(min(eval_size, data.n), device=dev))
    _prime(model, guide, data, subsample_size, dev)
    # --- data-parallel hook (pyro_vits.distributed): the DDP-wrapped ELBO; only rank 0 writes and logs ---
    parallel = None if distributed is None else distributed.data_parallel(model, guide, elbo, data,
                                                                          subsample_size, seed)
    main = distributed is None or distributed.is_main
    out = out if main else None
    step_args: tuple[Batch, int | None] = (data, subsample_size)  # what a re-trace of a step runs on
    # ---
    named, extra = _trainable(model, guide)
    params = [p for _, p in named]
    optim = ClippedAdam(params, lr=lr, clip_norm=clip_norm, lrd=lrd)

    config: dict[str, Any] = dict(
        steps=steps, lr=lr, clip_norm=clip_norm, lrd=lrd, optimizer="pyro.optim.clipped_adam.ClippedAdam",
        batch_size=batch_size, device=str(dev), seed=seed, log_every=log_every, eval_samples=eval_samples,
        eval_size=eval_size, checkpoint_every=checkpoint_every, nan_policy=nan_policy,
        elbo=dict(type=type(elbo).__name__, num_particles=elbo.num_particles,
                  vectorize_particles=elbo.vectorize_particles, max_plate_nesting=elbo.max_plate_nesting),
        model=dict(type=type(model).__name__, **getattr(model, "config", {})),
        guide=dict(type=type(guide).__name__, **getattr(guide, "config", {})),
        data=_describe(data), heldout=_describe(heldout), extra=dict(extra_config or {}),
        units="*_per_frame: nats per valid frame, channels summed; loss_nats: nats; wall_s: seconds",
        versions=dict(torch=str(torch.__version__), pyro=pyro.__version__, python=sys.version.split()[0],
                      platform=platform.platform()),
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    if distributed is not None:
        config["distributed"] = distributed.describe()
    state = _Progress()
    if checkpoint is not None:
        config = _resumed_config(checkpoint["config"], config, int(checkpoint["step"]))
        if checkpoint["step"] > steps:
            raise ValueError(f"the checkpoint is at step {checkpoint['step']}, beyond steps={steps}")
        state = _restore(checkpoint, model, guide, optim, extra, dev)
        logger.info("resuming %s at step %d of %d", out, state.step, steps)
    saved_step = state.step if checkpoint is not None else None
    if out is not None:
        if overwrite and out.is_dir() and any(out.iterdir()):
            logger.warning("overwriting the run files in %s", out)
        out.mkdir(parents=True, exist_ok=True)
        _remove_run_files(out, keep_checkpoint=resume)
        _atomic_write(out / "config.json", _json_dump(config))
        lines = [json.dumps(r) + "\n" for r in state.metrics]
        _atomic_write(out / "metrics.jsonl", lambda f: f.writelines(lines))
    logger.info("SVI on %s: %d utterances, steps %d..%d, %s with %d particle(s)", dev, data.n, state.step + 1,
                steps, type(elbo).__name__, elbo.num_particles)

    start = time.perf_counter() - state.wall_s
    window_start = time.perf_counter()
    timed_from = state.step
    bar = tqdm(range(state.step + 1, steps + 1), initial=state.step, total=steps,
               disable=not (progress and main), desc="SVI", unit="step", dynamic_ncols=True)
    try:
        for step in bar:
            if parallel is not None:  # seeds this rank's noise for the step, picks its utterances
                step_args = (parallel.begin(step), None)
            rng = _torch_rng(dev)
            with warnings.catch_warnings():  # Pyro's "Encountered NaN": the guard below names step and sites
                warnings.filterwarnings("ignore", "Encountered NaN", UserWarning, r".*[\\/]pyro[\\/]")
                loss = (elbo.loss_and_grads(model, guide, data, subsample_size=subsample_size)
                        if parallel is None else parallel.loss_and_grads())
            if math.isfinite(loss) and _grads_finite(params):
                optim.step()
            else:
                report = _nonfinite_report(step, loss, named, lambda: _nonfinite_sites(
                    model, guide, *step_args, rng, dev, elbo))
                optim.zero_grad(set_to_none=True)
                if nan_policy == "stop":
                    kept = (f"; the last checkpoint ({out / CHECKPOINT}, step {saved_step}) is intact"
                            if saved_step is not None and out is not None else "")
                    raise NonFiniteError(f"{report}; training stopped (nan_policy='stop'){kept}", step)
                state.skipped += 1
                logger.warning("%s; update skipped (nan_policy='skip', %d so far)", report, state.skipped)
            optim.zero_grad(set_to_none=True)
            state.losses.append(loss)
            state.step = step
            if main and (step % log_every == 0 or step == steps):
                window_s = time.perf_counter() - window_start
                window = [x for x in state.losses[state.window_first:] if math.isfinite(x)]
                record: dict[str, float] = {"step": step,
                                            "loss_nats": sum(window) / len(window) if window else math.nan}
                result = evaluate(model, guide, eval_data, eval_samples, seed)
                record.update({k: result[k] for k in METRIC_KEYS})
                if heldout is not None:
                    result = evaluate(model, guide, heldout, eval_samples, seed)
                    record.update({f"heldout_{k}": result[k] for k in METRIC_KEYS})
                record["skipped_steps"] = state.skipped
                record["wall_s"] = time.perf_counter() - start
                record["it_per_s"] = (step - max(state.window_first, timed_from)) / window_s
                state.metrics.append(record)
                if out is not None:
                    with open(out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                logger.debug("step %d: %s", step, record)
                bar.set_postfix(elbo=f"{record['elbo_per_frame']:.3f}", kl=f"{record['kl_per_frame']:.3f}")
                state.window_first = step
                window_start = time.perf_counter()
            if out is not None and (step == steps or (checkpoint_every and step % checkpoint_every == 0)):
                state.wall_s = time.perf_counter() - start
                _save_checkpoint(out, state, model, guide, optim, extra, config, dev)
                saved_step = step
    except KeyboardInterrupt:
        logger.warning("interrupted after step %d; %s", state.step,
                       f"resume from the checkpoint at step {saved_step} in {out}" if saved_step is not None
                       else "no checkpoint was written")
        raise
    finally:
        bar.close()
    if distributed is not None:
        distributed.barrier()  # every rank returns once rank 0's run files are complete
    return FitResult(model, guide, state.losses, state.metrics, config, dev, time.perf_counter() - start, out,
                     state.skipped, None if checkpoint is None else int(checkpoint["step"]))
