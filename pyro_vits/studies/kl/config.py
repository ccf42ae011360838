"""The study's sizes (:class:`StudyConfig`), its presets and the settings shared by every sweep."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..._configfile import load_config_file

__all__ = ["StudyConfig", "PRESETS", "check_config", "load_config", "D64", "Q_LOC", "Q_SCALE", "COS_A",
           "NEAR_A", "RATIO_OFFSET", "TEACHER_SEED"]

D64 = torch.float64
# The 2-D posterior of the estimator tests: q = N((0.3, -0.2), diag(0.8, 0.6)^2) on one 2-channel frame.
Q_LOC, Q_SCALE = (0.3, -0.2), (0.8, 0.6)
COS_A = 1.0  # the cos counterexample's amplitude
NEAR_A = 0.5  # "near convergence": q = N(0, I) against the cos prior with a = 0.5 (KL ~ 0.072 nats)
RATIO_OFFSET = 0.5  # (m_q - m_p) / sigma_p in the variance-ratio sweep
TEACHER_SEED = 0


@dataclass(frozen=True)
class StudyConfig:
    """Sizes of every sweep. ``seeds`` are the chains of every InferenceData (and the replicates of every
    training comparison: t-intervals over seeds); ``particles`` the K values.

    ``estimator_draws``: one-particle draws per seed in the 2-D settings, ``vits_draws`` in the VITS-like
    one (``vits_batch = (B, C, T)``, flow width ``vits_hidden``, truth from ``reference_draws``);
    ``negative_batch_sizes`` / ``negative_replicates`` (per seed) the P(batch-mean KL < 0) sweep;
    ``regime_kls`` (nats per frame) x ``regime_frames`` the P(batch loss < 0) table of a ``regime_channels``
    channel Gaussian setting, checked by ``regime_sim_batches`` simulated batches of ``regime_sim_frames``
    frames per seed; ``ratio_grid`` the sigma_q / sigma_p values; ``gradient_batch`` /
    ``gradient_replicates`` the clamp/abs gradient study. Training: teacher and students of
    ``train_sizes = (C, hidden, T)``, ``train_utterances = (train, held out)``, ``batch_size`` utterances per
    step, ``train_budget = K x steps`` for every K, ``train_logs`` logged records per run (the early-stopping
    points), ClippedAdam's ``lr`` decayed geometrically to ``final_lr_ratio x lr`` over each run's steps
    (1.0: constant, the same schedule for every K), ``eval_samples`` importance samples for the final
    held-out IWAE log-likelihood and the prior KL, ``psis_samples`` per utterance for k-hat; gradient SNR
    from ``snr_repeats`` repeats per seed at ``snr_batch_sizes``; ``dreg_dims`` latent sizes and
    ``dreg_repeats`` gradient draws of the linear-Gaussian DReG check; ``timing_steps`` steps per timing.
    """

    name: str
    seeds: tuple[int, ...]
    particles: tuple[int, ...]
    estimator_draws: int
    quadrature_points: int
    reference_draws: int
    vits_draws: int
    vits_batch: tuple[int, int, int]
    vits_hidden: int
    negative_batch_sizes: tuple[int, ...]
    negative_replicates: int
    regime_kls: tuple[float, ...]
    regime_frames: tuple[int, ...]
    regime_channels: int
    regime_sim_frames: int
    regime_sim_batches: int
    ratio_grid: tuple[float, ...]
    ratio_draws: int
    gradient_batch: int
    gradient_replicates: int
    train_sizes: tuple[int, int, int]
    train_utterances: tuple[int, int]
    batch_size: int
    train_budget: int
    train_logs: int
    lr: float
    final_lr_ratio: float
    eval_samples: int
    psis_samples: int
    snr_batch_sizes: tuple[int, ...]
    snr_repeats: int
    dreg_dims: tuple[int, ...]
    dreg_repeats: int
    timing_steps: int

    def __post_init__(self) -> None:
        for name in ("seeds", "particles", "negative_batch_sizes", "ratio_grid", "regime_kls", "regime_frames",
                     "dreg_dims"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        if len(self.seeds) < 2:
            raise ValueError(f"seeds must hold at least 2 seeds (an SE over seeds needs 2), got {self.seeds}")
        for name in ("estimator_draws", "vits_draws"):
            if getattr(self, name) % max(self.particles) != 0:
                raise ValueError(f"{name} must be a multiple of max(particles)={max(self.particles)}")
        for name in ("ratio_grid", "regime_kls"):
            if any(r <= 0 for r in getattr(self, name)):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.final_lr_ratio <= 1:
            raise ValueError(f"final_lr_ratio must be in (0, 1], got {self.final_lr_ratio}")
        if self.train_budget % (max(self.particles) * self.train_logs) != 0:
            raise ValueError(f"train_budget must be a multiple of max(particles) * train_logs = "
                             f"{max(self.particles) * self.train_logs}, got {self.train_budget}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_seed(self, seed: int) -> StudyConfig:
        """The same sizes with seeds ``seed, seed + 1, ...`` (as many as before)."""
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        return replace(self, seeds=tuple(seed + i for i in range(len(self.seeds))))


_COMMON: dict[str, Any] = dict(
    particles=(1, 2, 4, 8, 16), regime_kls=(0.01, 0.1, 1.0, 2.0), regime_channels=192, lr=1e-2,
    final_lr_ratio=1.0,
)

PRESETS: dict[str, StudyConfig] = {
    "test": StudyConfig(
        name="test", seeds=(0, 1), estimator_draws=256, quadrature_points=51, reference_draws=512,
        vits_draws=64, vits_batch=(2, 8, 8), vits_hidden=4, negative_batch_sizes=(1, 4, 16),
        negative_replicates=64, regime_frames=(100, 1000), regime_sim_frames=20, regime_sim_batches=64,
        ratio_grid=(0.5, 1.0), ratio_draws=256, gradient_batch=4, gradient_replicates=64,
        train_sizes=(2, 4, 8), train_utterances=(8, 4), batch_size=4, train_budget=8, train_logs=2,
        eval_samples=8, psis_samples=16, snr_batch_sizes=(4,), snr_repeats=2, dreg_dims=(1,), dreg_repeats=32,
        timing_steps=1, **{**_COMMON, "particles": (1, 2)},
    ),
    "quick": StudyConfig(
        name="quick", seeds=(0, 1), estimator_draws=1024, quadrature_points=101, reference_draws=2048,
        vits_draws=256, vits_batch=(2, 8, 16), vits_hidden=8, negative_batch_sizes=(1, 4, 16, 64),
        negative_replicates=256, regime_frames=(1000, 10000, 40000), regime_sim_frames=100,
        regime_sim_batches=256, ratio_grid=(0.3, 0.5, 1 / math.sqrt(2), 1.0, 1.5), ratio_draws=2048,
        gradient_batch=8, gradient_replicates=512, train_sizes=(4, 8, 12), train_utterances=(32, 8),
        batch_size=8, train_budget=64, train_logs=4, eval_samples=32, psis_samples=64, snr_batch_sizes=(8,),
        snr_repeats=4, dreg_dims=(1, 16), dreg_repeats=256, timing_steps=2, **_COMMON,
    ),
    "docs": StudyConfig(
        name="docs", seeds=(0, 1, 2, 3, 4), estimator_draws=8192, quadrature_points=201, reference_draws=4096,
        vits_draws=512, vits_batch=(4, 192, 96), vits_hidden=32,
        negative_batch_sizes=(1, 4, 16, 64, 256, 1024, 2048, 4096), negative_replicates=1024,
        regime_frames=(1000, 10000, 40000), regime_sim_frames=1000, regime_sim_batches=64,
        ratio_grid=tuple(float(r) for r in np.round(np.geomspace(0.2, 2.0, 13), 4)) + (1 / math.sqrt(2),),
        ratio_draws=16384, gradient_batch=16, gradient_replicates=8192, train_sizes=(4, 16, 24),
        train_utterances=(256, 32), batch_size=16, train_budget=640, train_logs=8, eval_samples=128,
        psis_samples=200, snr_batch_sizes=(16,), snr_repeats=8, dreg_dims=(1, 16, 96), dreg_repeats=128,
        timing_steps=20, **_COMMON,
    ),
}
"""``test``: seconds (the test suite and the wheel check run it); ``quick``: about a minute on one CPU core;
``docs``: the documentation numbers (``make docs``)."""


def check_config(config: Any) -> None:
    """Raise ``TypeError`` unless ``config`` is a :class:`StudyConfig`."""
    if not isinstance(config, StudyConfig):
        raise TypeError(f"config must be a StudyConfig (e.g. PRESETS['quick']), got {type(config).__name__}")


def load_config(path: str | Path, base: StudyConfig | None = None) -> StudyConfig:
    """A :class:`StudyConfig` from a TOML or JSON file: the keys of a ``[study]`` table (or the top level)
    override ``base`` (default ``PRESETS['quick']``; a ``preset = "docs"`` key picks another); lists become
    tuples. Unknown keys raise ``ValueError`` naming them."""
    data = load_config_file(path)
    data = dict(data.get("study", data))
    preset = data.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    base = PRESETS[preset] if preset else (base or PRESETS["quick"])
    known = {f.name for f in fields(StudyConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown study config keys {unknown} in {path}")
    return replace(base, **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
