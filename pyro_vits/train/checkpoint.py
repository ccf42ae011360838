"""Checkpoints of a :func:`~pyro_vits.train.fit` run: parameters, optimiser, every random state and the
loop's position (:class:`Progress`), written atomically and read back with ``torch.load(weights_only=True)``;
resuming restores them so that a CPU continuation is bit-identical to an uninterrupted run. Also reads a
VITS generator checkpoint's prior flow (:func:`read_vits_flow`)."""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pyro.optim.clipped_adam import ClippedAdam
from torch import Tensor, nn

from .._io import atomic_write
from .._rundir import CHECKPOINT
from .._validate import first_line
from ..flows import ResidualCouplingBlock
from ..vits.flow_checkpoint import read_vits_checkpoint
from .config import RESUME_KEYS

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_KEYS", "Progress", "first_line", "load_checkpoint",
           "read_vits_flow", "restore", "resumed_config", "save_checkpoint"]

logger = logging.getLogger("pyro_vits.train")

CHECKPOINT_FORMAT = 1
CHECKPOINT_KEYS = ("format", "step", "model", "guide", "optimizer", "param_store", "losses", "metrics",
                   "window_first", "skipped", "wall_s", "rng", "config")
Named = list[tuple[str, Tensor]]  # (name, tensor) pairs of trainable parameters


@dataclass
class Progress:
    """The loop's position and history, as a checkpoint records them besides the parameters."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)
    window_first: int = 0
    skipped: int = 0
    wall_s: float = 0.0


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a :func:`~pyro_vits.train.fit` checkpoint (a file, or a run folder holding ``checkpoint.pt``)
    with ``torch.load(weights_only=True)`` onto the CPU and check its layout."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, foreign pickle, ...: all mean "not a usable checkpoint"
        raise ValueError(f"cannot read checkpoint {path} ({first_line(err)})") from err
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path} is not a resumable pyro_vits checkpoint: it lacks {missing}")
    if state["format"] != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} has checkpoint format {state['format']!r}; this version reads "
                         f"{CHECKPOINT_FORMAT}")
    return state


def read_vits_flow(
    path: str | os.PathLike, dilation_rate: int | None = None
) -> tuple[ResidualCouplingBlock, int]:
    """The prior flow of a VITS-family generator checkpoint file and the number of speakers of its ``emb_g``
    (0 when it has none): :func:`~pyro_vits.vits.read_vits_checkpoint`, which also returns ``emb_g``."""
    found = read_vits_checkpoint(path, dilation_rate)
    return found.flow, found.n_speakers


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


def save_checkpoint(out: Path, progress: Progress, model: nn.Module, guide: nn.Module, optim: ClippedAdam,
                    extra: Named, config: Mapping[str, Any], dev: torch.device) -> None:
    """Replace ``out/checkpoint.pt`` atomically with the run's complete state."""
    checkpoint = dict(
        format=CHECKPOINT_FORMAT, step=progress.step, model=model.state_dict(), guide=guide.state_dict(),
        optimizer=optim.state_dict(), param_store={name: p.detach() for name, p in extra},
        losses=torch.tensor(progress.losses, dtype=torch.float64), metrics=progress.metrics,
        window_first=progress.window_first, skipped=progress.skipped, wall_s=progress.wall_s,
        rng=_rng_state(dev), config=json.loads(json.dumps(config)),
    )
    atomic_write(out / CHECKPOINT, lambda f: torch.save(checkpoint, f), mode="wb")
    logger.debug("step %d: wrote %s", progress.step, out / CHECKPOINT)


def restore(checkpoint: Mapping[str, Any], model: nn.Module, guide: nn.Module, optim: ClippedAdam,
            extra: Named, dev: torch.device) -> Progress:
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
    return Progress(step=int(checkpoint["step"]), losses=checkpoint["losses"].tolist(),
                    metrics=[dict(r) for r in checkpoint["metrics"]],
                    window_first=int(checkpoint["window_first"]), skipped=int(checkpoint["skipped"]),
                    wall_s=float(checkpoint["wall_s"]))


def resumed_config(saved: Mapping[str, Any], config: dict[str, Any], step: int) -> dict[str, Any]:
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
