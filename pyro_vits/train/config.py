"""The settings of a :func:`~pyro_vits.train.fit` run as one validated, frozen dataclass (:class:`FitConfig`),
built from keywords, a mapping or a TOML/JSON file (``pyro-vits fit`` builds it from its options:
:func:`pyro_vits.apps.fit.fit_config`), and the ``config.json`` record of a run (:meth:`FitConfig.record`)."""

from __future__ import annotations

import numbers
import os
import platform
import sys
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import pyro
import torch
from pyro.infer import ELBO
from torch import nn

from .._configfile import load_config_file
from .._validate import check_positive_ints
from ..infer.elbo import ELBOS

__all__ = ["ELBO_FIELDS", "NAN_POLICIES", "RESUME_KEYS", "FitConfig", "geometric_lrd"]

NAN_POLICIES = ("stop", "skip")
# the fields that choose fit's default ELBO (None when an ELBO object is passed to fit)
ELBO_FIELDS = ("elbo", "particles", "vectorize", "kl_particles")
# config entries a resumed run must share with its checkpoint (optimiser and schedule continue as saved)
RESUME_KEYS = ("model", "guide", "elbo", "data", "heldout", "batch_size", "seed")
UNITS = "*_per_frame: nats per valid frame, channels summed; loss_nats: nats; wall_s: seconds"


def geometric_lrd(final_lr_ratio: float, steps: int) -> float:
    """``ClippedAdam``'s per-step decay ``lrd`` that takes the learning rate to ``final_lr_ratio`` times its
    initial value over ``steps`` steps."""
    check_positive_ints(steps=steps)
    ratio = final_lr_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"final_lr_ratio must be in (0, 1], got {ratio!r}")
    return ratio ** (1 / steps)


def _kl_particles(elbo: ELBO) -> dict[str, int]:
    """``{"kl_particles": K}`` for an ELBO with ``K > 1`` KL particles, else nothing (older records)."""
    k = getattr(elbo, "kl_particles", 1)
    return {} if k == 1 else {"kl_particles": k}


@dataclass(frozen=True)
class FitConfig:
    """How :func:`~pyro_vits.train.fit` runs: ``fit(model, guide, data, config)`` (each field is described
    there).

    ``elbo`` names the ELBO (a key of :data:`pyro_vits.infer.elbo.ELBOS`; None: ``"trace"``) that ``fit``
    builds with ``particles`` (None: 1), ``vectorize`` (None: True) and ``kl_particles`` (None: 1), see
    :func:`~pyro_vits.infer.elbo.make_elbo`; leave the four None when passing ``fit`` an ELBO object.
    Checked on construction: ``steps``, ``log_every``, ``eval_samples``, ``eval_size`` positive ints;
    ``batch_size``, ``checkpoint_every``, ``eval_chunk``, ``particles``, ``kl_particles`` positive ints or
    None; ``elbo`` a known name or None; ``lr > 0``; ``lrd`` in (0, 1]; ``nan_policy`` in
    :data:`NAN_POLICIES`; ``resume``/``checkpoint_every`` need ``out_dir``; ``resume`` and ``overwrite``
    exclude each other.
    """

    steps: int
    elbo: str | None = None
    particles: int | None = None
    vectorize: bool | None = None
    kl_particles: int | None = None
    lr: float = 1e-3
    clip_norm: float = 10.0
    lrd: float = 1.0
    batch_size: int | None = None
    seed: int = 0
    log_every: int = 50
    eval_samples: int = 8
    eval_size: int = 64
    eval_chunk: int | None = None
    checkpoint_every: int | None = None
    nan_policy: str = "stop"
    out_dir: Path | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        check_positive_ints(steps=self.steps, log_every=self.log_every, eval_samples=self.eval_samples,
                            eval_size=self.eval_size)
        check_positive_ints(batch_size=self.batch_size, checkpoint_every=self.checkpoint_every,
                            eval_chunk=self.eval_chunk, allow_none=True)
        check_positive_ints(particles=self.particles, kl_particles=self.kl_particles, allow_none=True)
        if self.elbo is not None and self.elbo not in ELBOS:
            raise ValueError(f"elbo must be one of {tuple(ELBOS)} or None, got {self.elbo!r}")
        if self.vectorize is not None and not isinstance(self.vectorize, bool):
            raise ValueError(f"vectorize must be a bool or None, got {self.vectorize!r}")
        if not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        for name in ("lr", "clip_norm", "lrd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not 0 < self.lrd <= 1:
            raise ValueError(f"lrd (the learning rate's per-step decay factor) must be in (0, 1], got "
                             f"{self.lrd!r}")
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}")
        if self.out_dir is not None and not isinstance(self.out_dir, Path):
            if not isinstance(self.out_dir, (str, os.PathLike)):
                raise TypeError(f"out_dir must be a path or None, got {type(self.out_dir).__name__}")
            object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.out_dir is None and (self.resume or self.checkpoint_every is not None):
            raise ValueError("resume and checkpoint_every need out_dir (the run folder)")
        if self.resume and self.overwrite:
            raise ValueError("resume=True continues the run in out_dir and overwrite=True would delete it: "
                             "pass one")

    # --- builders -------------------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config") -> FitConfig:
        """From ``{field: value}`` (``-`` or ``_`` in names); unknown names raise ValueError."""
        known = {f.name for f in fields(cls)}
        settings = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"{source}: unknown fit setting(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(**settings)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> FitConfig:
        """From a TOML (``.toml``) or JSON (``.json``) table of settings."""
        return cls.from_mapping(load_config_file(path), f"config file {path}")

    # --- the run's record -----------------------------------------------------------------------------

    def record(self, *, elbo: ELBO, model: nn.Module, guide: nn.Module, data: Any, heldout: Any,
               device: torch.device, extra: Mapping[str, Any] | None,
               parallel: Mapping[str, Any] | None) -> dict[str, Any]:
        """What ``config.json`` holds: these settings, the ELBO, model, guide and data descriptions, the
        device, ``extra`` (under ``"extra"``), ``parallel`` (under ``"distributed"``), versions, the time."""
        config: dict[str, Any] = dict(
            steps=self.steps, lr=self.lr, clip_norm=self.clip_norm, lrd=self.lrd,
            optimizer="pyro.optim.clipped_adam.ClippedAdam", batch_size=self.batch_size, device=str(device),
            seed=self.seed, log_every=self.log_every, eval_samples=self.eval_samples,
            eval_size=self.eval_size, checkpoint_every=self.checkpoint_every, nan_policy=self.nan_policy,
            elbo=dict(type=type(elbo).__name__, num_particles=elbo.num_particles,
                      vectorize_particles=elbo.vectorize_particles, max_plate_nesting=elbo.max_plate_nesting,
                      **_kl_particles(elbo)),
            model=dict(type=type(model).__name__, **getattr(model, "config", {})),
            guide=dict(type=type(guide).__name__, **getattr(guide, "config", {})),
            data=data.describe(), heldout=None if heldout is None else heldout.describe(),
            extra=dict(extra or {}), units=UNITS,
            versions=dict(torch=str(torch.__version__), pyro=pyro.__version__, python=sys.version.split()[0],
                          platform=platform.platform()),
            created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        if self.eval_chunk is not None:
            config["eval_chunk"] = self.eval_chunk
        if parallel is not None:
            config["distributed"] = dict(parallel)
        return config
