"""The KL-estimator study behind ``docs/kl_estimators.md``: every number quoted there is computed here.

Each ``*_study(config, ...)`` returns a :class:`Sweep`: ``results``, a JSON-able dict of numbers with their
Monte-Carlo standard errors (ArviZ's, seeds as chains) and normalisations, plus the sweep's InferenceData
(draws ``(seed, draw, ...)``) and ``az.summary`` tables; :func:`run_study` runs them all and writes them.

Normalisations used in every result: *per utterance* = nats summed over an utterance's valid ``(C, T)``
elements; *per frame* = nats per valid frame, channels summed (VITS's ``kl_loss``); *per element*.
The 2-D settings have one frame of two channels per utterance, so per utterance = per frame there.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyro
import torch
from torch import Tensor

from . import _arviz_compat, diagnostics, plots
from ._validate import check_positive_ints
from .elbo import STL_ELBO, HybridEntropyELBO, IWAE_DReG
from .estimators import (
    CosFlowPrior,
    analytic_variances,
    batch_kl,
    kl_estimate,
    prob_negative,
    prob_negative_normal_approx,
    quadrature_kl_2d,
    reference_kl,
    sample_kl_estimates,
)
from .flows import ResidualCouplingBlock
from .guide import ObservationGuide, PosteriorEncoder
from .model import Batch, VITSPriorModel, evaluate, make_teacher, sample_dataset
from .prior import FlowPrior, MaskedNormal
from .train import fit

__all__ = [
    "StudyConfig",
    "PRESETS",
    "Sweep",
    "QUALITY_ESTIMATORS",
    "estimator_quality_study",
    "negative_batch_study",
    "variance_ratio_study",
    "fix_gradient_study",
    "logdet_study",
    "cos_density_grid",
    "training_data",
    "student",
    "prior_kl_to_teacher",
    "training_study",
    "timing_study",
    "SNR_ELBOS",
    "PARAM_GROUPS",
    "SNR_NOISE",
    "snr_study",
    "FIGURES",
    "run_study",
    "render_markdown",
    "DOCS_TABLES",
    "publish_docs",
]

Draws = dict[str, np.ndarray]


@dataclass
class Sweep:
    """One sweep's outcome: ``results`` (JSON-able numbers with MCSEs and units), ``inference_data``
    (netCDF stem -> InferenceData, seeds as chains) and ``tables`` (table stem -> ``az.summary`` frame)."""

    results: dict[str, Any]
    inference_data: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    def add_draws(
        self, stem: str, draws: Draws, config: StudyConfig, dims: Mapping[str, list[str]] | None = None,
        coords: Mapping[str, Any] | None = None, table: bool = True,
    ) -> None:
        """Store ``draws`` ``{name: (seed, draw, ...)}`` as InferenceData ``stem`` (``posterior`` group, the
        config as attributes) and, with ``table``, its ArviZ summary."""
        idata = diagnostics.sweep_to_inference_data(draws, dims=dims, coords=coords,
                                                    config={"sweep": stem, "config": config.to_dict()})
        self.inference_data[stem] = idata
        if table:
            self.tables[stem] = diagnostics.summary_table(idata)

    def draws(self, stem: str) -> dict[str, np.ndarray]:
        """The ``posterior`` arrays of InferenceData ``stem``."""
        data = _arviz_compat.group(self.inference_data[stem], "posterior")
        return {str(name): data[name].values for name in data.data_vars}


QUALITY_ESTIMATORS = ("vits", "mc", "k3", "clamp", "abs", "gaussian_closed_form")
"""Estimators compared at fixed parameters; ``clamp``/``abs`` act on the batch loss (VITS users' fixes)."""

_SAMPLED = ("vits", "mc", "k3", "gaussian_closed_form")
D64 = torch.float64

# The 2-D posterior of the estimator tests: q = N((0.3, -0.2), diag(0.8, 0.6)^2) on one 2-channel frame.
Q_LOC, Q_SCALE = (0.3, -0.2), (0.8, 0.6)
COS_A = 1.0  # the cos counterexample's amplitude
NEAR_A = 0.5  # "near convergence": q = N(0, I) against the cos prior with a = 0.5 (KL ~ 0.072 nats)
RATIO_OFFSET = 0.5  # (m_q - m_p) / sigma_p in the variance-ratio sweep


@dataclass(frozen=True)
class StudyConfig:
    """Sizes of every sweep. ``seeds`` are the chains of every InferenceData; ``particles`` the K values.

    ``estimator_draws``: one-particle draws per seed in the 2-D settings, ``vits_draws`` in the VITS-like
    one (``vits_batch = (B, C, T)``, flow width ``vits_hidden``, truth from ``reference_draws``);
    ``negative_batch_sizes`` / ``negative_replicates`` (per seed) the P(batch-mean KL < 0) sweep;
    ``ratio_grid`` the sigma_q / sigma_p values; ``gradient_batch`` /
    ``gradient_replicates`` the clamp/abs gradient study. Training: teacher and students of
    ``train_sizes = (C, hidden, T)``, ``train_utterances = (train, held out)``, ``batch_size`` utterances per
    step, ``train_budget = K x steps`` for every K, ``train_logs`` logged records per run, ClippedAdam's
    ``lr`` decayed geometrically to ``final_lr_ratio x lr`` over each run's steps,
    ``eval_samples`` importance samples for the final held-out IWAE log-likelihood and the prior KL,
    ``psis_samples`` per utterance for k-hat; gradient SNR from ``snr_repeats`` repeats per seed at
    ``snr_batch_sizes``; ``timing_steps`` steps per vectorised/sequential timing.
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
    timing_steps: int

    def __post_init__(self) -> None:
        for name in ("seeds", "particles", "negative_batch_sizes", "ratio_grid"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        if len(self.seeds) < 2:
            raise ValueError(f"seeds must hold at least 2 seeds (2 chains for R-hat), got {self.seeds}")
        for name in ("estimator_draws", "vits_draws"):
            if getattr(self, name) % max(self.particles) != 0:
                raise ValueError(f"{name} must be a multiple of max(particles)={max(self.particles)}")
        if any(r <= 0 for r in self.ratio_grid):
            raise ValueError(f"ratio_grid must be positive, got {self.ratio_grid}")
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


PRESETS: dict[str, StudyConfig] = {
    "quick": StudyConfig(
        name="quick", seeds=(0, 1), particles=(1, 2, 4, 8, 16), estimator_draws=1024, quadrature_points=101,
        reference_draws=2048, vits_draws=256, vits_batch=(2, 8, 16), vits_hidden=8,
        negative_batch_sizes=(1, 4, 16, 64), negative_replicates=256,
        ratio_grid=(0.3, 0.5, 1 / math.sqrt(2), 1.0, 1.5), ratio_draws=2048, gradient_batch=8,
        gradient_replicates=512, train_sizes=(4, 8, 12), train_utterances=(32, 8), batch_size=8,
        train_budget=64, train_logs=4, lr=1e-2, final_lr_ratio=0.05, eval_samples=32, psis_samples=64,
        snr_batch_sizes=(8,), snr_repeats=4, timing_steps=2,
    ),
    "docs": StudyConfig(
        name="docs", seeds=(0, 1, 2), particles=(1, 2, 4, 8, 16), estimator_draws=8192,
        quadrature_points=201, reference_draws=4096, vits_draws=1024, vits_batch=(4, 192, 96), vits_hidden=32,
        negative_batch_sizes=(1, 4, 16, 64, 256, 1024, 2048, 4096), negative_replicates=2048,
        ratio_grid=tuple(float(r) for r in np.round(np.geomspace(0.2, 2.0, 13), 4)) + (1 / math.sqrt(2),),
        ratio_draws=16384, gradient_batch=16, gradient_replicates=8192, train_sizes=(4, 16, 24),
        train_utterances=(256, 32), batch_size=16, train_budget=1280, train_logs=16, lr=1e-2,
        final_lr_ratio=0.05, eval_samples=256, psis_samples=400, snr_batch_sizes=(4, 16), snr_repeats=16,
        timing_steps=20,
    ),
}
"""``quick``: under a minute on one CPU core (the test suite runs it); ``docs``: the documentation numbers."""


def _check_config(config: Any) -> None:
    if not isinstance(config, StudyConfig):
        raise TypeError(f"config must be a StudyConfig (e.g. PRESETS['quick']), got {type(config).__name__}")



def _col(*values: float) -> Tensor:
    """One frame of ``len(values)`` channels: ``(C, 1)`` float64."""
    return torch.tensor(values, dtype=D64).reshape(-1, 1)


def _teacher_flow(
    channels: int, hidden: int, *, mean_only: bool = True, seed: int, **sizes: int
) -> ResidualCouplingBlock:
    """The frozen random VITS flow of :func:`~pyro_vits.model.make_teacher` in float64."""
    return make_teacher(channels, hidden, mean_only=mean_only, seed=seed, **sizes).flow.double()


# ---------------------------------------------------------------------------------------------------------
# Estimator quality at fixed parameters (Q1, Q3, Q6 values)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Setting:
    """``q = N(m_q, exp(logs_q))`` ``(B, C, T)`` against ``prior``; ``frames (B,)``; truth: nats per frame."""

    m_q: Tensor
    logs_q: Tensor
    prior: Any
    frames: Tensor
    truth: float
    truth_error: float
    truth_method: str
    description: str
    draws: int


def _setting_2d(prior: Any, config: StudyConfig, description: str) -> _Setting:
    m_q, logs_q = _col(*Q_LOC), _col(*Q_SCALE).log()
    points = config.quadrature_points
    truth, error = quadrature_kl_2d(MaskedNormal(m_q, logs_q.exp()), prior, num_points=points)
    method = f"2-D trapezoid quadrature ({points}^2 points, error bound)"
    frames = torch.ones(1, dtype=D64)
    return _Setting(m_q[None], logs_q[None], prior, frames, truth, error, method, description,
                    config.estimator_draws)


def _vits_setting(config: StudyConfig, device: torch.device) -> _Setting:
    """A VITS-sized teacher prior (float32 like VITS) on utterances from :func:`sample_dataset`; ``q`` is
    centred on the noisy observation ``x`` with ``sigma_q = sigma_p / 2``; truth by :func:`reference_kl`."""
    b, c, t = config.vits_batch
    teacher = make_teacher(c, config.vits_hidden, kernel_size=5, n_layers=4, seed=7).to(device)
    data = sample_dataset(teacher, b, t, seed=7)
    prior = teacher.prior(data)
    m_q, logs_q = data.x, (data.logs_p + math.log(0.5)) * data.mask
    truth, mcse = reference_kl(MaskedNormal(m_q, logs_q.exp(), data.mask), prior, config.reference_draws,
                               seed=7, chunk_size=256)
    frames = data.lengths.to(m_q)
    return _Setting(m_q, logs_q, prior, frames, float(truth.sum() / frames.sum()),
                    float(mcse.pow(2).sum().sqrt() / frames.sum()),
                    f"reference_kl ({config.reference_draws} draws, MCSE)",
                    f"VITS-sized mean-only teacher prior, (B, C, T) = {config.vits_batch}, hidden "
                    f"{config.vits_hidden}, sigma_q = sigma_p / 2", config.vits_draws)


def _quality_settings(config: StudyConfig, device: torch.device) -> dict[str, _Setting]:
    zero = _col(0.0, 0.0)
    coupling = FlowPrior(_col(0.1, -0.1), _col(0.2, -0.1), _teacher_flow(2, 8, kernel_size=3, seed=3))
    return {
        "cos2d": _setting_2d(CosFlowPrior(zero, zero, a=COS_A), config,
                             f"unit-Jacobian cos flow (a = {COS_A}), standard normal base"),
        "coupling2d": _setting_2d(coupling, config, "2-channel VITS mean-only coupling block"),
        "vits": _vits_setting(config, device),
    }


def _chunked_estimates(
    names: tuple[str, ...], m_q: Tensor, logs_q: Tensor, prior: Any, num: int, seed: int,
    elements: int = 1 << 22,
) -> dict[str, Tensor]:
    """:func:`sample_kl_estimates` in seeded chunks of about ``elements`` latent elements (bounded memory):
    ``{name: (num, ...)}``."""
    chunk = max(1, elements // m_q.numel())
    parts = [sample_kl_estimates(names, m_q, logs_q, prior, min(chunk, num - start), seed=seed * 7919 + i)
             for i, start in enumerate(range(0, num, chunk))]
    return {name: torch.cat([p[name] for p in parts]) for name in names}


def _particle_batch_loss(per_utt: Tensor, frames: Tensor, k: int, name: str) -> Tensor:
    """``(n, B)`` one-particle per-utterance draws -> ``(n // k,)`` K-particle batch losses per frame;
    ``clamp``/``abs`` fix the K-particle vits loss, as VITS users did."""
    per_utt = per_utt.reshape(per_utt.shape[0] // k, k, -1).mean(1)
    return batch_kl(name if name in ("clamp", "abs") else "mean", per_utt, frames)


def _by_seed(draws: list[Tensor]) -> np.ndarray:
    return torch.stack(draws).detach().cpu().double().numpy()


def _summary(arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """ArviZ mean/sd/MCSE/ESS/R-hat of each ``(seed, draw)`` array (seeds as chains; draw counts differ)."""
    keep = ("mean", "sd", "mcse_mean", "ess_bulk", "r_hat")
    out = {}
    for name, x in arrays.items():
        table = diagnostics.summary_table(diagnostics.sweep_to_inference_data({"x": x}))
        out[name] = {k: float(table.loc["x", k]) for k in keep}
    return out


def estimator_quality_study(config: StudyConfig, device: torch.device | str = "cpu") -> Sweep:
    """Bias (vs quadrature or :func:`reference_kl`), sd and P(estimate < 0) of every estimator in
    :data:`QUALITY_ESTIMATORS` with K particles, in nats per frame, for three settings (see ``description``).

    InferenceData ``quality_<setting>``: ``<estimator>`` -> one-particle batch losses per frame
    ``(seed, draw)`` (the deterministic closed form is left out).
    """
    _check_config(config)
    device = torch.device(device)
    results: dict[str, Any] = {}
    sweep = Sweep(results)
    for setting_name, s in _quality_settings(config, device).items():
        setting_draws: Draws = {}
        per_seed = [_chunked_estimates(_SAMPLED, s.m_q, s.logs_q, s.prior, s.draws, seed)
                    for seed in config.seeds]
        estimators: dict[str, Any] = {}
        for name in QUALITY_ESTIMATORS:
            base = "vits" if name in ("clamp", "abs") else name
            by_k = {k: _by_seed([_particle_batch_loss(d[base].reshape(s.draws, -1), s.frames, k, name)
                                 for d in per_seed]) for k in config.particles}
            if name == "gaussian_closed_form":  # deterministic: its error is exact
                value = float(by_k[1][0, 0])
                estimators[name] = {"value": value, "bias": value - s.truth, "bias_mcse": s.truth_error,
                                    "relative_error": (value - s.truth) / s.truth}
                continue
            setting_draws[name] = by_k[1]
            stats = _summary({f"K{k}": x for k, x in by_k.items()})
            estimators[name] = {}
            for k, x in by_k.items():
                st = stats[f"K{k}"]
                p_neg, p_se = prob_negative(x)
                estimators[name][str(k)] = {
                    **st, "bias": st["mean"] - s.truth,
                    "bias_mcse": math.hypot(st["mcse_mean"], s.truth_error), "p_negative": p_neg,
                    "p_negative_se": p_se, "num_draws": int(x.size),
                }
        results[setting_name] = {
            "description": s.description, "truth": s.truth, "truth_error": s.truth_error,
            "truth_method": s.truth_method, "frames": float(s.frames.sum()), "channels": int(s.m_q.shape[-2]),
            "unit": "nats per frame", "estimators": estimators,
        }
        sweep.add_draws(f"quality_{setting_name}", setting_draws, config)
    return sweep


# ---------------------------------------------------------------------------------------------------------
# P(batch-mean KL < 0) against batch size (Q5, Q9)
# ---------------------------------------------------------------------------------------------------------


def _near_convergence() -> tuple[Tensor, Tensor, CosFlowPrior]:
    """``q = N(0, I)`` on one 2-channel frame against the cos prior with ``a = NEAR_A``."""
    zero = _col(0.0, 0.0)
    return zero, zero, CosFlowPrior(zero, zero, a=NEAR_A)


def _skewness(x: np.ndarray) -> float:
    centred = x - x.mean()
    return float((centred**3).mean() / (centred**2).mean() ** 1.5)


def negative_batch_study(config: StudyConfig) -> Sweep:
    """P(batch-mean vits KL < 0) for batches of N utterances near convergence, measured (binomial SE)
    and by the normal approximation ``Phi(-sqrt(N) KL / sigma)`` with the measured per-utterance sigma.

    InferenceData ``negative``: ``N<n>`` -> batch means per frame ``(seed, negative_replicates)``.
    """
    _check_config(config)
    m_q, logs_q, prior = _near_convergence()
    q = MaskedNormal(m_q, logs_q.exp())
    truth, error = quadrature_kl_2d(q, prior, num_points=config.quadrature_points)
    n_max, reps = max(config.negative_batch_sizes), config.negative_replicates
    pools = [_chunked_estimates(("vits",), m_q, logs_q, prior, reps * n_max, seed)["vits"].reshape(-1)
             for seed in config.seeds]
    flat = torch.cat(pools).numpy()
    sigma, skew = float(flat.std(ddof=1)), _skewness(flat)
    draws: Draws = {}
    by_n = {}
    for n in config.negative_batch_sizes:
        means = _by_seed([pool[: reps * n].reshape(reps, n).mean(1) for pool in pools])
        draws[f"N{n}"] = means
        p, se = prob_negative(means)
        approx = float(prob_negative_normal_approx(truth, sigma, n))
        by_n[str(n)] = {
            "p_negative": p, "p_negative_se": se, "num_batches": int(means.size), "p_normal_approx": approx,
            "approx_over_measured": approx / p if p > 0 else None,
            "expected_negatives_normal_approx": approx * means.size,
            # exact one-sided 95 % upper bound when no batch was negative: (1 - p)^n = 0.05
            "p_upper_95": 1.0 - 0.05 ** (1.0 / means.size) if p == 0 else None,
        }
    curve_n = np.unique(np.geomspace(1, n_max, 200).round().astype(int))
    sweep = Sweep({
        "description": f"q = N(0, I) on one 2-channel frame per utterance, cos prior with a = {NEAR_A}",
        "truth": truth, "truth_error": error, "sigma": sigma, "skewness": skew,
        "unit": "nats per utterance (= per frame); probabilities",
        "pooled_mean": float(flat.mean()), "pooled_mean_se": float(flat.std(ddof=1) / math.sqrt(flat.size)),
        "one_utterance_p_negative": prob_negative(flat)[0], "by_batch_size": by_n,
        "normal_approx_curve": {"batch_size": curve_n.tolist(), "p_negative": [
            float(prob_negative_normal_approx(truth, sigma, int(n))) for n in curve_n]},
    })
    sweep.add_draws("negative", draws, config)
    return sweep


# ---------------------------------------------------------------------------------------------------------
# Hybrid (analytic entropy) vs full Monte Carlo variance over sigma_q / sigma_p (Q8)
# ---------------------------------------------------------------------------------------------------------


def _ratio_posteriors(ratios: np.ndarray) -> tuple[Tensor, Tensor]:
    """``(m_q, logs_q)`` ``(G, 2, 1)``: ``m_q = RATIO_OFFSET``, ``sigma_q = ratio`` (the base is N(0, I))."""
    zero = torch.zeros(len(ratios), 2, 1, dtype=D64)
    return zero + RATIO_OFFSET, zero + torch.tensor(np.log(ratios), dtype=D64)[:, None, None]


def _theory_ratio(ratios: np.ndarray) -> np.ndarray:
    """Var(vits) / Var(mc) from :func:`analytic_variances` for a Gaussian prior."""
    m_q, logs_q = _ratio_posteriors(ratios)
    var_vits, var_mc = analytic_variances(m_q, logs_q, torch.zeros_like(m_q), torch.zeros_like(logs_q))
    return (var_vits / var_mc).numpy()


def _log_crossing(ratios: np.ndarray, values: np.ndarray) -> float | None:
    """Where ``values`` crosses 1 (``log values`` linear in ``log ratios``); None if it does not."""
    order = np.argsort(ratios)
    r, v = np.log(ratios[order]), np.log(values[order])
    crossings = np.flatnonzero(np.sign(v[:-1]) != np.sign(v[1:]))
    if crossings.size == 0:
        return None
    i = crossings[0]
    return float(np.exp(r[i] - v[i] * (r[i + 1] - r[i]) / (v[i + 1] - v[i])))


def variance_ratio_study(config: StudyConfig) -> Sweep:
    """Var(vits) / Var(mc) of one-particle per-utterance estimates over ``sigma_q / sigma_p`` (one 2-channel
    frame, ``m_q - m_p = RATIO_OFFSET sigma_p``) for a Gaussian prior (theory: :func:`analytic_variances`)
    and the cos prior (``a = COS_A``). The ratio's SE is over seeds.

    InferenceData ``variance_ratio``: ``<prior>__<estimator>`` -> ``(seed, ratio_draws, ratio)``.
    """
    _check_config(config)
    ratios = np.sort(np.array(config.ratio_grid, dtype=float))
    m_q, logs_q = _ratio_posteriors(ratios)
    dense = np.geomspace(ratios[0], ratios[-1], 200)
    results: dict[str, Any] = {
        "ratios": ratios.tolist(), "offset": RATIO_OFFSET, "theory_ratio": _theory_ratio(ratios).tolist(),
        "theory_curve": {"ratios": dense.tolist(), "ratio": _theory_ratio(dense).tolist()},
        "theory_crossing": 1 / math.sqrt(2), "unit": "variance ratio Var(vits) / Var(mc), dimensionless",
    }
    draws: Draws = {}
    for prior_name, a in (("gaussian", 0.0), ("cos", COS_A)):
        prior = CosFlowPrior(_col(0.0, 0.0), _col(0.0, 0.0), a=a)
        per_seed = [sample_kl_estimates(("vits", "mc"), m_q, logs_q, prior, config.ratio_draws, seed=seed)
                    for seed in config.seeds]
        for name in ("vits", "mc"):
            draws[f"{prior_name}__{name}"] = _by_seed([d[name] for d in per_seed])
        ratio_by_seed = np.stack([(d["vits"].var(0) / d["mc"].var(0)).numpy() for d in per_seed])
        mean_ratio = ratio_by_seed.mean(0)
        results[prior_name] = {
            "ratio": mean_ratio.tolist(),
            "ratio_se": (ratio_by_seed.std(0, ddof=1) / math.sqrt(len(config.seeds))).tolist(),
            "var_vits": draws[f"{prior_name}__vits"].var(axis=(0, 1), ddof=1).tolist(),
            "var_mc": draws[f"{prior_name}__mc"].var(axis=(0, 1), ddof=1).tolist(),
            "crossing": _log_crossing(ratios, mean_ratio),
        }
    sweep = Sweep(results)
    sweep.add_draws("variance_ratio", draws, config, {name: ["ratio"] for name in draws}, {"ratio": ratios})
    return sweep


# ---------------------------------------------------------------------------------------------------------
# What clamp() and abs() do to the loss and its gradient (Q6)
# ---------------------------------------------------------------------------------------------------------

_GRAD_PARAMS = ("m_q[0]", "m_q[1]", "logs_q[0]", "logs_q[1]")


def _batch_gradients(prior: Any, batch: int, replicates: int, seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    """Per replicate batch: the batch loss and its gradient w.r.t. ``(m_q, logs_q)`` for each reduction:
    ``{reduction: (loss (R,), grad (R, 4))}``."""
    m_q0, logs_q0, _ = _near_convergence()
    m_q = m_q0.expand(replicates, 1, 2, 1).clone().requires_grad_(True)
    logs_q = logs_q0.expand(replicates, 1, 2, 1).clone().requires_grad_(True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        eps = torch.randn(replicates, batch, 2, 1, dtype=D64)
    z = m_q + logs_q.exp() * eps
    per_utt = kl_estimate("vits", z, m_q.expand_as(z), logs_q.expand_as(z), prior)
    frames = torch.ones(batch, dtype=D64)
    out = {}
    for reduction in ("mean", "clamp", "abs"):
        loss = batch_kl(reduction, per_utt, frames)
        grads = torch.autograd.grad(loss.sum(), (m_q, logs_q), retain_graph=True)
        out[reduction] = (loss.detach(), torch.cat([g.reshape(replicates, 2) for g in grads], -1))
    return out


def fix_gradient_study(config: StudyConfig) -> Sweep:
    """Near convergence (see :func:`negative_batch_study`), batches of ``gradient_batch`` utterances: the
    mean batch loss and gradient w.r.t. ``(m_q, logs_q)`` of VITS's loss (``mean``) and its ``clamp``/``abs``
    fixes. The unbiased ``mean`` gradient is the reference; reported per fix: value bias, the gradient's
    projection on the true gradient (1 = right size and direction), its cosine with it, and the share of
    batches whose gradient has a negative dot product with it (an uphill step).

    InferenceData ``fix_gradient``: ``<reduction>__loss`` ``(seed, R)``, ``<reduction>__grad``
    ``(seed, R, param)``.
    """
    _check_config(config)
    m_q, logs_q, prior = _near_convergence()
    per_seed = [_batch_gradients(prior, config.gradient_batch, config.gradient_replicates, seed)
                for seed in config.seeds]
    draws: Draws = {}
    for reduction in ("mean", "clamp", "abs"):
        draws[f"{reduction}__loss"] = _by_seed([d[reduction][0] for d in per_seed])
        draws[f"{reduction}__grad"] = _by_seed([d[reduction][1] for d in per_seed])
    truth = quadrature_kl_2d(MaskedNormal(m_q, logs_q.exp()), prior, num_points=config.quadrature_points)[0]
    true_grad = draws["mean__grad"].mean(axis=(0, 1))
    results: dict[str, Any] = {
        "batch_size": config.gradient_batch, "truth": truth, "params": list(_GRAD_PARAMS),
        "true_gradient": true_grad.tolist(), "unit": "nats per frame (loss and its gradient)",
    }
    for reduction in ("mean", "clamp", "abs"):
        loss, grad = draws[f"{reduction}__loss"], draws[f"{reduction}__grad"]
        stats = _summary({"loss": loss, **{p: grad[..., i] for i, p in enumerate(_GRAD_PARAMS)}})
        mean_grad = grad.mean(axis=(0, 1))
        results[reduction] = {
            "loss_mean": stats["loss"]["mean"], "loss_bias": stats["loss"]["mean"] - truth,
            "loss_bias_mcse": stats["loss"]["mcse_mean"],
            "gradient": mean_grad.tolist(), "gradient_mcse": [stats[p]["mcse_mean"] for p in _GRAD_PARAMS],
            "projection": float(mean_grad @ true_grad / (true_grad @ true_grad)),
            "cosine": float(mean_grad @ true_grad / (np.linalg.norm(mean_grad) * np.linalg.norm(true_grad))),
            "uphill_fraction": float(((grad @ true_grad) < 0).mean()),
            "zero_gradient_fraction": float((np.abs(grad).sum(-1) == 0).mean()),
        }
    results["p_negative_loss"] = prob_negative(draws["mean__loss"])[0]
    sweep = Sweep(results)
    dims = {f"{r}__grad": ["param"] for r in ("mean", "clamp", "abs")}
    sweep.add_draws("fix_gradient", draws, config, dims, {"param": list(_GRAD_PARAMS)})
    return sweep


# ---------------------------------------------------------------------------------------------------------
# Mean-only couplings have log|det| = 0 (Q2); the cos flow's density (Q3 figure)
# ---------------------------------------------------------------------------------------------------------


def logdet_study(num_inputs: int = 4, channels: int = 4, frames: int = 6, seed: int = 0) -> dict:
    """``log|det J|`` of random VITS blocks by autograd (dense ``(C T) x (C T)`` Jacobian) against the
    block's own ``logdet``: exactly 0 for mean-only couplings, data-dependent for affine ones."""
    check_positive_ints(num_inputs=num_inputs, channels=channels, frames=frames)
    if channels % 2:
        raise ValueError(f"channels must be even (couplings split them in halves), got {channels}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_inputs, channels, frames, generator=gen, dtype=D64)
    out: dict[str, Any] = {"inputs": num_inputs, "shape": [channels, frames]}
    for name, mean_only in (("mean_only", True), ("affine", False)):
        flow = _teacher_flow(channels, 8, kernel_size=3, mean_only=mean_only, seed=seed)
        autograd, reported = [], []
        for xi in x:
            jac = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0], xi)
            autograd.append(float(torch.linalg.slogdet(jac.reshape(channels * frames, -1))[1]))
            reported.append(float(flow.forward_and_logdet(xi[None])[1][0]))
        out[name] = {"autograd_logdet": autograd, "reported_logdet": reported,
                     "max_abs_difference": float(np.max(np.abs(np.subtract(autograd, reported))))}
    return out


def cos_density_grid(a: float = COS_A, num_points: int = 121, width: float = 3.5) -> dict[str, Any]:
    """Log-densities on a ``num_points``-square grid over ``[-width, width]^2`` of the cos-flow prior
    (``a``, standard-normal base) and of its Gaussian base: ``{"x": (P,), "log_prior": (P, P),
    "log_base": (P, P)}`` indexed ``[x1, x0]``."""
    check_positive_ints(num_points=num_points)
    if not width > 0:
        raise ValueError(f"width must be positive, got {width!r}")
    u = torch.linspace(-width, width, num_points, dtype=D64)
    x1, x0 = torch.meshgrid(u, u, indexing="ij")
    z = torch.stack([x0, x1], -1).reshape(-1, 2, 1)
    zero = _col(0.0, 0.0)
    grids = {"x": u.numpy()}
    for key, amp in (("log_prior", a), ("log_base", 0.0)):
        grids[key] = CosFlowPrior(zero, zero, a=amp).log_prob(z).reshape(num_points, num_points).numpy()
    return grids


# ---------------------------------------------------------------------------------------------------------
# Training at equal compute, VP vs NVP couplings, PSIS k-hat (Q4, Q7)
# ---------------------------------------------------------------------------------------------------------

TEACHER_SEED = 0
_TRACE_KEYS = ("step", "loss_nats", "elbo_per_frame", "kl_per_frame", "heldout_elbo_per_frame",
               "heldout_kl_per_frame", "heldout_loglik_iwae_per_frame", "wall_s", "it_per_s")
_SUMMARY_KEYS = ("elbo_per_frame", "kl_per_frame", "heldout_elbo_per_frame", "heldout_kl_per_frame",
                 "heldout_loglik_iwae_per_frame")
_POSTERIOR_UTTERANCES = 4  # held-out utterances whose guide draws go into each run's InferenceData


def training_data(
    config: StudyConfig, device: torch.device | str = "cpu"
) -> tuple[VITSPriorModel, Batch, Batch]:
    """The mean-only teacher (``train_sizes``, 2 WN layers, 4 couplings) and its training and held-out
    utterances, on ``device``; the same for every seed."""
    _check_config(config)
    c, hidden, frames = config.train_sizes
    teacher = make_teacher(c, hidden, kernel_size=5, n_layers=2, n_flows=4, seed=TEACHER_SEED)
    n_train, n_heldout = config.train_utterances
    train = sample_dataset(teacher, n_train, frames, seed=TEACHER_SEED + 1)
    heldout = sample_dataset(teacher, n_heldout, frames, seed=TEACHER_SEED + 2)
    return teacher.to(device), train.to(device), heldout.to(device)


def student(
    config: StudyConfig, teacher: VITSPriorModel, mean_only: bool
) -> tuple[VITSPriorModel, PosteriorEncoder]:
    """A student prior (the teacher's architecture and identity decoder, VITS's zero-initialised couplings,
    mean-only or affine) and a VITS posterior encoder guide (2 WN layers). Built under the global RNG."""
    _check_config(config)
    c, hidden, _ = config.train_sizes
    model = VITSPriorModel(c, hidden, 5, 1, 2, 4, mean_only=mean_only, sigma_x=teacher.sigma_x,
                           decoder="identity")
    return model, PosteriorEncoder(c, c, hidden, 5, n_layers=2)


def prior_kl_to_teacher(
    teacher: VITSPriorModel, model: VITSPriorModel, data: Batch, num_samples: int, seed: int = 0
) -> tuple[float, float]:
    """Monte Carlo ``KL(p_teacher(z) || p_model(z))`` of the two flow priors on ``data``'s conditioning, in
    nats per valid frame, and its MCSE: ``z ~ p_teacher``, mean of ``log p_teacher(z) - log p_model(z)``."""
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        p_teacher = teacher.prior(data)
        z = p_teacher.sample((num_samples,))
        per_draw = (p_teacher.log_prob(z) - model.prior(data).log_prob(z)).sum(-1).double() / data.num_frames
    return float(per_draw.mean()), float(per_draw.std() / math.sqrt(num_samples))


def _coupling(mean_only: bool) -> str:
    return "vp" if mean_only else "nvp"


def _svi_seconds(records: list[dict[str, float]]) -> list[float]:
    """Cumulative SVI-only wall time at each record (``fit``'s ``wall_s`` also counts evaluations)."""
    steps = [0] + [r["step"] for r in records]
    return np.cumsum([(b - a) / r["it_per_s"] for a, b, r in zip(steps, steps[1:], records)]).tolist()


def _fit(config: StudyConfig, data: tuple[VITSPriorModel, Batch, Batch], particles: int, mean_only: bool,
         seed: int, device: torch.device, steps: int, vectorize: bool = True, logs: int | None = None) -> Any:
    teacher, train, heldout = data
    pyro.set_rng_seed(seed)
    model, guide = student(config, teacher, mean_only)
    elbo = HybridEntropyELBO(num_particles=particles, vectorize_particles=vectorize, max_plate_nesting=1)
    return fit(model, guide, train, steps=steps, elbo=elbo, lr=config.lr,
               lrd=config.final_lr_ratio ** (1 / steps), batch_size=config.batch_size,
               device=device, seed=seed, log_every=steps // (logs or config.train_logs), progress=False,
               heldout=heldout, eval_samples=8, eval_size=config.train_utterances[1])


def _seed_record(
    config: StudyConfig, data: tuple[VITSPriorModel, Batch, Batch], result: Any, seed: int
) -> dict[str, Any]:
    teacher, _, heldout = data
    final = evaluate(result.model, result.guide, heldout, config.eval_samples, seed=seed)
    kl_teacher, kl_mcse = prior_kl_to_teacher(teacher, result.model, heldout, config.eval_samples, seed)
    khat = diagnostics.psis_khat_per_utterance(result.model, result.guide, heldout,
                                               num_samples=config.psis_samples, seed=seed)
    return {
        "seed": seed, "heldout_elbo_per_frame": final["elbo_per_frame"],
        "heldout_elbo_mcse": final["elbo_stderr_per_frame"],
        "heldout_loglik_iwae_per_frame": final["loglik_iwae_per_frame"],
        "heldout_kl_per_frame": final["kl_per_frame"],
        "prior_kl_to_teacher_per_frame": kl_teacher, "prior_kl_to_teacher_mcse": kl_mcse,
        "psis_khat": khat.tolist(), "khat_counts": diagnostics.khat_counts(khat),
        "wall_s": result.wall_s, "svi_wall_s": _svi_seconds(result.metrics)[-1],
    }


def _mean_se(values: list[float]) -> dict[str, float]:
    """Mean over seeds and its standard error (sd / sqrt(seeds))."""
    x = np.asarray(values, dtype=float)
    return {"mean": float(x.mean()), "se": float(x.std(ddof=1) / math.sqrt(x.size))}


def _trace_table(idata: Any) -> pd.DataFrame:
    """ArviZ summary of the logged ELBO/KL traces over the last half of the logged steps."""
    return diagnostics.summary_table(idata, "sample_stats", 0.5, _SUMMARY_KEYS)


def _run_results(config: StudyConfig, records: list[dict], fits: list[Any], idata: Any) -> dict[str, Any]:
    """Per-seed finals, their mean and SE over seeds, the trace curve (mean over seeds) and the ArviZ
    summary of the last half of the logged held-out traces (seeds as chains)."""
    metrics = [f.metrics for f in fits]
    draws = min(len(m) for m in metrics)
    curve = {key: np.mean([[r[key] for r in m[:draws]] for m in metrics], 0).tolist()
             for key in ("step", "heldout_elbo_per_frame", "heldout_kl_per_frame")}
    curve["svi_wall_s"] = np.mean([_svi_seconds(m)[:draws] for m in metrics], 0).tolist()
    curve["heldout_elbo_per_seed"] = [[r["heldout_elbo_per_frame"] for r in m[:draws]] for m in metrics]
    table = _trace_table(idata)
    trace = {key: {c: float(table.loc[key, c]) for c in ("mean", "sd", "mcse_mean", "ess_bulk", "r_hat")}
             for key in ("heldout_elbo_per_frame", "heldout_kl_per_frame")}
    finals = ("heldout_elbo_per_frame", "heldout_loglik_iwae_per_frame", "heldout_kl_per_frame",
              "prior_kl_to_teacher_per_frame", "svi_wall_s", "wall_s")
    khat = np.concatenate([r["psis_khat"] for r in records])
    best = int(np.argmax(curve["heldout_elbo_per_frame"]))
    return {
        "per_seed": records, "final": {k: _mean_se([r[k] for r in records]) for k in finals},
        "khat_counts": diagnostics.khat_counts(khat), "khat_median": float(np.median(khat)),
        "khat_max": float(khat.max()), "trace_tail_summary": trace, "curve": curve,
        "curve_best": {"heldout_elbo_per_frame": curve["heldout_elbo_per_frame"][best],
                       "step": int(curve["step"][best])},
    }


def training_study(config: StudyConfig, device: torch.device | str = "cpu") -> tuple[Sweep, dict[str, Any]]:
    """Fit students to the teacher's utterances with the VITS estimator (:class:`HybridEntropyELBO`) at
    equal compute ``K x steps = train_budget``: mean-only (VP) students for every K, affine (NVP) students
    at K = 1, each for every seed. Per configuration: held-out ELBO and IWAE log-likelihood
    (``eval_samples`` particles), KL(q || p), KL(p_teacher || p_student) of the priors, PSIS k-hat of the
    guide per held-out utterance, SVI wall time; all nats per valid frame. The teacher's exact held-out
    log-likelihood is the reference.

    Returns the :class:`Sweep` (InferenceData ``training_K<k>_<vp|nvp>`` per configuration: traces as
    ``sample_stats`` with seeds as chains and logged steps as draws, guide draws of ``z`` for
    ``_POSTERIOR_UTTERANCES`` held-out utterances as ``posterior``) and the fitted ``(model, guide)`` of
    each configuration's first seed.
    """
    _check_config(config)
    device = torch.device(device)
    data = training_data(config, device)
    teacher, _, heldout = data
    truth = evaluate(teacher, ObservationGuide.for_teacher(teacher), heldout, config.eval_samples, seed=0)
    shown = heldout.subset(torch.arange(min(_POSTERIOR_UTTERANCES, heldout.n), device=device))
    results: dict[str, Any] = {
        "teacher_heldout_loglik_per_frame": truth["loglik_iwae_per_frame"],
        "heldout_frames": heldout.num_frames, "budget": config.train_budget,
        "unit": "nats per valid frame (channels summed); seconds", "runs": {},
    }
    sweep = Sweep(results)
    fitted = {}
    for particles, mean_only in [(k, True) for k in config.particles] + [(1, False)]:
        name = f"K{particles}_{_coupling(mean_only)}"
        steps = config.train_budget // particles
        fits = [_fit(config, data, particles, mean_only, seed, device, steps) for seed in config.seeds]
        records = [_seed_record(config, data, f, seed) for f, seed in zip(fits, config.seeds)]
        z = np.stack([diagnostics.guide_samples(f.model, f.guide, shown, num_samples=config.psis_samples,
                                                seed=seed)["z"] for f, seed in zip(fits, config.seeds)])
        run_config = {"particles": particles, "coupling": _coupling(mean_only), "steps": steps,
                      "seeds": list(config.seeds), "fit_config": fits[0].config,
                      "psis_khat": [r["psis_khat"] for r in records]}
        idata = diagnostics.run_to_inference_data(
            [f.metrics for f in fits], keys=_TRACE_KEYS, posterior={"z": z},
            observed_data={"x": shown.x.cpu().numpy(), "mask": shown.mask[:, 0].cpu().numpy()},
            dims={"z": ["utterance", "channel", "frame"], "x": ["utterance", "channel", "frame"],
                  "mask": ["utterance", "frame"]},
            config=run_config,
        )
        sweep.inference_data[f"training_{name}"] = idata
        sweep.tables[f"training_{name}"] = _trace_table(idata)
        results["runs"][name] = {"particles": particles, "coupling": _coupling(mean_only), "steps": steps,
                                 **_run_results(config, records, fits, idata)}
        fitted[name] = (fits[0].model, fits[0].guide)
    return sweep, fitted


def timing_study(config: StudyConfig, device: torch.device | str = "cpu") -> Sweep:
    """Milliseconds per SVI step with K particles, vectorised vs sequential (``timing_steps`` steps from a
    fresh student, one logged window, seed 0). ``draws``: none (single timings)."""
    _check_config(config)
    device = torch.device(device)
    data = training_data(config, device)
    out: dict[str, Any] = {"unit": "milliseconds per SVI step", "steps": config.timing_steps,
                           "by_particles": {}}
    for k in config.particles:
        row = {}
        for label, vectorize in (("vectorized", True), ("sequential", False)):
            result = _fit(config, data, k, True, 0, device, config.timing_steps, vectorize=vectorize, logs=1)
            row[label] = 1e3 / result.metrics[-1]["it_per_s"]
        row["speedup"] = row["sequential"] / row["vectorized"]
        out["by_particles"][str(k)] = row
    return Sweep(out)


# ---------------------------------------------------------------------------------------------------------
# Gradient signal-to-noise ratio against K (Q7)
# ---------------------------------------------------------------------------------------------------------

SNR_ELBOS = {"vits": HybridEntropyELBO, "stl": STL_ELBO, "iwae_dreg": IWAE_DReG}
"""ELBO estimators whose gradient SNR is measured: VITS's (its gradient is ``Trace_ELBO``'s), sticking the
landing, and the importance-weighted bound with doubly reparameterised gradients."""
PARAM_GROUPS = {"prior_flow": "model$$$flow.", "guide": "guide$$$"}


def _debiased_snr(stats: diagnostics.GradientStats) -> float:
    """``||E g|| / sqrt(tr Cov g)`` with ``||mean||^2`` debiased by ``tr Cov / R`` (the noise a mean of R
    draws keeps), floored at 0."""
    ratio = stats.mean_norm**2 / stats.total_variance - 1.0 / stats.num_repeats
    return math.sqrt(max(ratio, 0.0))


SNR_NOISE = ("fixed", "minibatch")
"""Gradient noise sources: ``fixed``: the same B utterances every repeat (particle noise only);
``minibatch``: B utterances subsampled from the training set each repeat (particle + subsampling noise)."""


def snr_study(config: StudyConfig, model: Any, guide: Any, data: Batch) -> Sweep:
    """Gradient SNR per parameter group (:data:`PARAM_GROUPS`) for each estimator in :data:`SNR_ELBOS`,
    K in ``particles``, batch size B in ``snr_batch_sizes`` and noise source in :data:`SNR_NOISE`, at fixed
    (trained) parameters, via :func:`~pyro_vits.diagnostics.gradient_stats` with ``snr_repeats`` repeats per
    seed. Reported: the debiased vector SNR ``||E g|| / sqrt(tr Cov g)`` (mean and SE over seeds) and the
    SNR per unit of compute ``SNR_K / sqrt(K)`` (K particles cost K one-particle steps; flat in K = the
    particles buy exactly their cost, falling = they buy less).

    InferenceData ``snr``: ``<elbo>__<noise>__B<b>__K<k>__<group>`` -> SNR ``(1, seed)`` (one chain, one
    draw per seed: there is nothing to run ESS/R-hat on).
    """
    _check_config(config)
    draws: Draws = {}
    out: dict[str, Any] = {"unit": "dimensionless", "repeats_per_seed": config.snr_repeats, "by_elbo": {}}
    for elbo_name, elbo_cls in SNR_ELBOS.items():
        for noise in SNR_NOISE:
            for b in config.snr_batch_sizes:
                fixed = data.subset(torch.arange(b, device=data.x.device)) if noise == "fixed" else data
                rows: dict[str, Any] = {}
                for k in config.particles:
                    elbo = elbo_cls(num_particles=k, vectorize_particles=True, max_plate_nesting=1)
                    per_seed = []
                    for seed in config.seeds:
                        pyro.clear_param_store()
                        per_seed.append(diagnostics.gradient_stats(
                            model, guide, elbo, fixed, num_repeats=config.snr_repeats,
                            param_groups=PARAM_GROUPS, seed=seed,
                            subsample_size=None if noise == "fixed" else b))
                    rows[str(k)] = {}
                    for group in PARAM_GROUPS:
                        snr = [_debiased_snr(stats[group]) for stats in per_seed]
                        draws[f"{elbo_name}__{noise}__B{b}__K{k}__{group}"] = np.array(snr)[None]
                        per_sqrt_k = float(np.mean(snr)) / math.sqrt(k)
                        rows[str(k)][group] = {**_mean_se(snr), "per_sqrt_k": per_sqrt_k}
                out["by_elbo"].setdefault(elbo_name, {}).setdefault(noise, {})[f"B{b}"] = rows
    pyro.clear_param_store()
    sweep = Sweep(out)
    sweep.add_draws("snr", draws, config, table=False)
    return sweep


# ---------------------------------------------------------------------------------------------------------
# The whole study: results.json, netCDF, summary tables, figures; the docs' markdown
# ---------------------------------------------------------------------------------------------------------

FIGURES = (
    "estimator_histograms", "negative_vs_batch_size", "variance_ratio", "snr_vs_particles",
    "elbo_vs_wall_time", "vp_vs_nvp", "psis_khat", "cos_flow_density",
)
"""The PNG files (``figures/<name>.png``) :func:`run_study` writes."""


def _derived(results: Mapping[str, Any], config: StudyConfig) -> dict[str, Any]:
    """Headline comparisons quoted by the docs (each from the numbers above it in ``results``)."""
    k_max, b_max = str(max(config.particles)), f"B{max(config.snr_batch_sizes)}"
    runs = results["training"]["runs"]
    by_elbo = results["snr"]["by_elbo"]
    snr = by_elbo["vits"]
    gain = {noise: {group: snr[noise][b_max][k_max][group]["mean"] / snr[noise][b_max]["1"][group]["mean"]
                    for group in PARAM_GROUPS} for noise in SNR_NOISE}
    stl_gain = {noise: by_elbo["stl"][noise][b_max]["1"]["guide"]["mean"]
                / snr[noise][b_max]["1"]["guide"]["mean"] for noise in SNR_NOISE}
    vp = {k: runs[f"K{k}_vp"]["final"] for k in config.particles}
    return {
        "snr_gain_kmax": gain,
        "stl_over_vits_guide_snr_k1": stl_gain,
        "best_k_heldout_elbo": max(vp, key=lambda k: vp[k]["heldout_elbo_per_frame"]["mean"]),
        "best_k_prior_kl": min(vp, key=lambda k: vp[k]["prior_kl_to_teacher_per_frame"]["mean"]),
        "sqrt_kmax": math.sqrt(max(config.particles)),
        "elbo_gap_k1_minus_kmax": runs["K1_vp"]["final"]["heldout_elbo_per_frame"]["mean"]
        - runs[f"K{k_max}_vp"]["final"]["heldout_elbo_per_frame"]["mean"],
        "elbo_gap_vp_minus_nvp": runs["K1_vp"]["final"]["heldout_elbo_per_frame"]["mean"]
        - runs["K1_nvp"]["final"]["heldout_elbo_per_frame"]["mean"],
        "loglik_gap_teacher_minus_k1": results["training"]["teacher_heldout_loglik_per_frame"]
        - runs["K1_vp"]["final"]["heldout_loglik_iwae_per_frame"]["mean"],
    }


def _figures(results: Mapping[str, Any], sweeps: Mapping[str, Sweep], grid: Mapping[str, Any],
             config: StudyConfig, folder: Path) -> None:
    quality = results["quality"]
    hist = {s: sweeps["quality"].draws(f"quality_{s}") for s in quality}
    plots.plot_estimator_histograms(
        hist, {s: quality[s]["truth"] for s in quality},
        {s: quality[s]["estimators"]["gaussian_closed_form"]["value"] for s in quality},
        folder / "estimator_histograms.png")
    plots.plot_negative_vs_batch_size(results["negative"], folder / "negative_vs_batch_size.png")
    plots.plot_variance_ratio(results["variance_ratio"], folder / "variance_ratio.png")
    plots.plot_snr_vs_particles(results["snr"], f"B{max(config.snr_batch_sizes)}",
                                folder / "snr_vs_particles.png")
    runs = results["training"]["runs"]
    teacher = results["training"]["teacher_heldout_loglik_per_frame"]
    plots.plot_elbo_vs_wall_time({k: runs[f"K{k}_vp"]["curve"] for k in config.particles}, teacher,
                                 folder / "elbo_vs_wall_time.png")
    couplings = {"VP (mean-only)": runs["K1_vp"]["curve"], "NVP (affine)": runs["K1_nvp"]["curve"]}
    plots.plot_coupling_comparison(couplings, folder / "vp_vs_nvp.png")
    plots.plot_khat({name: np.concatenate([r["psis_khat"] for r in run["per_seed"]]).tolist()
                     for name, run in runs.items()}, diagnostics.KHAT_THRESHOLDS, folder / "psis_khat.png")
    plots.plot_cos_density(grid, COS_A, folder / "cos_flow_density.png")


def run_study(
    config: StudyConfig, out_dir: str | Path, device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every sweep of ``config`` and write to ``out_dir``: ``results.json`` (all numbers, JSON),
    ``netcdf/<stem>.nc`` (every sweep's and training configuration's InferenceData, seeds as chains),
    ``tables/<name>.{csv,md}`` (``az.summary``) and ``figures/<name>.png`` (:data:`FIGURES`). The 2-D
    sweeps run on the CPU; the VITS-sized setting and the training on ``device``. Returns the results."""
    _check_config(config)
    device = torch.device(device)
    out = Path(out_dir)
    for sub in ("netcdf", "tables", "figures"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"config": config.to_dict(), "device": str(device), "wall_s": {},
                               "versions": {"torch": torch.__version__, "pyro": pyro.__version__}}
    sweeps: dict[str, Sweep] = {}
    started = time.perf_counter()

    def timed(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        log(f"[{config.name}] {name} ...")
        start = time.perf_counter()
        value = fn(*args)
        results["wall_s"][name] = time.perf_counter() - start
        return value

    sweeps["quality"] = timed("quality", estimator_quality_study, config, device)
    sweeps["negative"] = timed("negative", negative_batch_study, config)
    sweeps["variance_ratio"] = timed("variance_ratio", variance_ratio_study, config)
    sweeps["fix_gradient"] = timed("fix_gradient", fix_gradient_study, config)
    sweeps["training"], fitted = timed("training", training_study, config, device)
    sweeps["timing"] = timed("timing", timing_study, config, device)
    model, guide = fitted["K1_vp"]
    sweeps["snr"] = timed("snr", snr_study, config, model, guide, training_data(config, device)[1])
    results.update({name: sweep.results for name, sweep in sweeps.items()})
    results["logdet"] = timed("logdet", logdet_study)
    results["derived"] = _derived(results, config)

    for sweep in sweeps.values():
        for stem, idata in sweep.inference_data.items():
            _arviz_compat.save(idata, out / "netcdf" / f"{stem}.nc")
        for stem, table in sweep.tables.items():
            diagnostics.write_summary(table, out / "tables" / stem)
    timed("figures", _figures, results, sweeps, cos_density_grid(), config, out / "figures")
    results["wall_s"]["total"] = time.perf_counter() - started
    text = json.dumps(results, indent=1, sort_keys=True, default=_json_default)
    (out / "results.json").write_text(text + "\n")
    return results


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _child(value: Any, part: str, path: str) -> Any:
    """``value[part]`` (mapping) or ``value[int(part)]`` (list); ``KeyError`` naming ``path`` otherwise."""
    if isinstance(value, Mapping) and part in value:
        return value[part]
    if isinstance(value, list) and re.fullmatch(r"-?\d+", part) and -len(value) <= int(part) < len(value):
        return value[int(part)]
    raise KeyError(f"placeholder {{{{ {path} }}}}: no key {part!r}")


_PLACEHOLDER = re.compile(r"\{\{\s*([^{}:\s]+)\s*(?::\s*([^{}]*?))?\s*\}\}")


def render_markdown(template: str, results: Mapping[str, Any]) -> str:
    """Replace every ``{{ dotted.path:format }}`` in ``template`` by ``format(results[dotted][path], format)``
    (e.g. ``{{ quality.cos2d.truth:.4f }}``; an integer part indexes a list); a path that does not resolve
    raises ``KeyError`` naming it."""
    if not isinstance(template, str):
        raise TypeError(f"template must be a str, got {type(template).__name__}")

    def lookup(match: re.Match[str]) -> str:
        path, spec = match.group(1), match.group(2) or ""
        value: Any = results
        for part in path.split("."):
            value = _child(value, part, path)
        return format(value, spec)

    return _PLACEHOLDER.sub(lookup, template)


DOCS_TABLES = ("quality_cos2d", "quality_coupling2d", "quality_vits", "negative", "training_K1_vp",
               f"training_K{max(PRESETS['docs'].particles)}_vp", "training_K1_nvp")
"""The summary tables :func:`publish_docs` copies next to the write-up."""


def publish_docs(out_dir: str | Path, docs_dir: str | Path) -> Path:
    """Copy a :func:`run_study` output's ``results.json``, figures and :data:`DOCS_TABLES` (markdown) into
    ``docs_dir`` (``figures/``, ``tables/``) and render ``docs_dir/kl_estimators.template.md`` into
    ``docs_dir/kl_estimators.md`` (:func:`render_markdown`). Returns the rendered file's path."""
    out, docs = Path(out_dir), Path(docs_dir)
    template = docs / "kl_estimators.template.md"
    for path in (out / "results.json", template):
        if not path.exists():
            raise ValueError(f"missing {path}: run run_study into out_dir and keep the template in docs_dir")
    results = json.loads((out / "results.json").read_text())
    rendered = render_markdown(template.read_text(), results)
    for sub in ("figures", "tables"):
        (docs / sub).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "results.json", docs / "results.json")
    for name in FIGURES:
        shutil.copyfile(out / "figures" / f"{name}.png", docs / "figures" / f"{name}.png")
    for name in DOCS_TABLES:
        if (out / "tables" / f"{name}.md").exists():
            shutil.copyfile(out / "tables" / f"{name}.md", docs / "tables" / f"{name}.md")
    target = docs / "kl_estimators.md"
    target.write_text(rendered)
    return target
