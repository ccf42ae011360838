"""How often is the batch loss negative? (Q5, Q9): measured against exact saddlepoint tails near
convergence, and the P(batch loss < 0) calculator over KL x batch frames in a 192-channel Gaussian setting
where most channels are nearly collapsed, checked by simulation."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..._validate import check_positive_ints
from ...distributions.flow_prior import CosFlowPrior
from ...distributions.masked_normal import MaskedNormal
from ...kl import (
    QUADRATIC_ESTIMATORS,
    kl_estimate,
    names,
    prob_negative,
    prob_negative_gaussian,
    prob_negative_normal_approx,
    prob_negative_saddlepoint,
    quadrature_kl_2d,
)
from .common import Draws, Sweep, by_seed, chunked_estimates, col, solve_increasing
from .config import D64, NEAR_A, StudyConfig, check_config

__all__ = ["near_convergence", "one_utterance_quadrature", "exact_tail", "negative_batch_study",
           "regime_profile", "regime_study", "NEGATIVE_ESTIMATORS"]

NEGATIVE_ESTIMATORS = names(unbiased=True, can_be_negative=True)
"""Estimators whose P(batch loss < 0) is measured near convergence: the unbiased ones that can be negative
(``k3`` is never negative)."""


def near_convergence() -> tuple[Tensor, Tensor, CosFlowPrior]:
    """``q = N(0, I)`` on one 2-channel frame against the cos prior with ``a = NEAR_A``."""
    zero = col(0.0, 0.0)
    return zero, zero, CosFlowPrior(zero, zero, a=NEAR_A)


def one_utterance_quadrature(name: str, nodes: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The near-convergence one-utterance estimate ``name`` on a 2-D Gauss-Hermite rule for ``e ~ N(0, I)``:
    ``(values (nodes^2,), weights summing to 1)``, evaluated by :func:`kl_estimate` itself."""
    check_positive_ints(nodes=nodes)
    m_q, logs_q, prior = near_convergence()
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    grid = torch.tensor(np.stack(np.meshgrid(x, x, indexing="ij"), -1).reshape(-1, 2, 1), dtype=D64)
    with torch.no_grad():
        values = kl_estimate(name, m_q + logs_q.exp() * grid, m_q, logs_q, prior).numpy()
    weights = np.outer(w, w).ravel()
    return values, weights / weights.sum()


def exact_tail(name: str, n: int) -> float:
    """P(mean of ``n`` one-utterance estimates ``name`` < 0) near convergence: the saddlepoint tail of the
    exact (quadrature) one-utterance distribution (relative error O(1/n))."""
    return prob_negative_saddlepoint(*one_utterance_quadrature(name), n=n)


def _skewness(x: np.ndarray) -> float:
    centred = x - x.mean()
    return float((centred**3).mean() / (centred**2).mean() ** 1.5)


def _row(means: np.ndarray, exact: float, approx: float) -> dict[str, Any]:
    """Measured P(< 0) of ``means`` against the exact tail (z with the exact binomial SE)."""
    p, se = prob_negative(means)
    count = int(round(p * means.size))
    theory_se = math.sqrt(exact * (1 - exact) / means.size)
    return {
        "p_negative": p, "p_negative_se": se, "num_batches": int(means.size), "num_negative": count,
        "p_exact": exact, "z_vs_exact": (p - exact) / theory_se if theory_se > 0 else None,
        "expected_negatives_exact": exact * means.size, "p_none_given_exact": (1 - exact) ** means.size,
        "p_normal_approx": approx, "normal_over_exact": approx / exact if exact > 0 else None,
        "expected_negatives_normal_approx": approx * means.size,
    }


def negative_batch_study(config: StudyConfig) -> Sweep:
    """P(batch-mean KL < 0) for batches of N utterances near convergence for each of
    :data:`NEGATIVE_ESTIMATORS`: measured (binomial SE), exact (:func:`exact_tail`) and by the normal
    approximation ``Phi(-sqrt(N) KL / sigma)`` with the measured per-utterance sigma.

    InferenceData ``negative``: ``<estimator>__N<n>`` -> batch means per frame ``(seed, negative_replicates)``.
    """
    check_config(config)
    m_q, logs_q, prior = near_convergence()
    truth, error = quadrature_kl_2d(MaskedNormal(m_q, logs_q.exp()), prior, num_points=config.quadrature_points)
    n_max, reps = max(config.negative_batch_sizes), config.negative_replicates
    pools = [chunked_estimates(NEGATIVE_ESTIMATORS, m_q, logs_q, prior, reps * n_max, seed)
             for seed in config.seeds]
    draws: Draws = {}
    out: dict[str, Any] = {
        "description": f"q = N(0, I) on one 2-channel frame per utterance, cos prior with a = {NEAR_A}",
        "truth": truth, "truth_error": error, "unit": "nats per utterance (= per frame); probabilities",
        "exact_method": "Lugannani-Rice saddlepoint of the one-utterance distribution on a 64 x 64 "
                        "Gauss-Hermite rule", "by_estimator": {},
    }
    for name in NEGATIVE_ESTIMATORS:
        flat = torch.cat([pool[name].reshape(-1) for pool in pools]).numpy()
        sigma = float(flat.std(ddof=1))
        by_n = {}
        for n in config.negative_batch_sizes:
            means = by_seed([pool[name][: reps * n].reshape(reps, n).mean(1) for pool in pools])
            draws[f"{name}__N{n}"] = means
            approx = float(prob_negative_normal_approx(truth, sigma, n)) if sigma > 0 else 0.0
            by_n[str(n)] = _row(means, exact_tail(name, n), approx)
        curve_n = np.unique(np.geomspace(1, n_max, 60).round().astype(int))
        out["by_estimator"][name] = {
            "sigma": sigma, "skewness": _skewness(flat) if sigma > 0 else 0.0,
            "pooled_mean": float(flat.mean()), "pooled_mean_se": float(sigma / math.sqrt(flat.size)),
            "by_batch_size": by_n,
            "curve": {"batch_size": curve_n.tolist(),
                      "p_exact": [exact_tail(name, int(n)) for n in curve_n],
                      "p_normal_approx": [float(prob_negative_normal_approx(truth, sigma, int(n)))
                                          if sigma > 0 else 0.0 for n in curve_n]},
        }
    sweep = Sweep(out)
    sweep.add_draws("negative", draws, config)
    return sweep


# ---------------------------------------------------------------------------------------------------------
# The P(batch loss < 0) calculator in a VITS-like regime: C = 192 channels, most nearly collapsed
# ---------------------------------------------------------------------------------------------------------

_ACTIVE = 16  # channels carrying most of the KL; the others are 10x closer to collapse


def regime_profile(kl_per_frame: float, channels: int = 192, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(sigma_q / sigma_p, (m_q - m_p) / sigma_p)`` ``(C,)`` of a Gaussian setting with the
    given KL (nats per frame): channel ``c`` has ``a = exp(-s u_c w_c)``, ``b = s v_c w_c`` with fixed random
    ``u ~ |N(0, 1)|``, ``v ~ N(0, 1)``, ``w = 1`` on 16 channels and 0.1 on the rest (nearly collapsed),
    and the scale ``s`` solved for the KL."""
    check_positive_ints(channels=channels)
    if not (isinstance(kl_per_frame, (int, float)) and 0 < kl_per_frame < 1e6):
        raise ValueError(f"kl_per_frame must be a positive number (nats per frame), got {kl_per_frame!r}")
    rng = np.random.default_rng(seed)
    u, v = np.abs(rng.standard_normal(channels)), rng.standard_normal(channels)
    w = np.where(np.arange(channels) < _ACTIVE, 1.0, 0.1)

    def profile(s: float) -> tuple[np.ndarray, np.ndarray]:
        return np.exp(-s * u * w), s * v * w

    def kl(s: float) -> float:
        a, b = profile(s)
        return float(np.sum(-np.log(a) + (a * a + b * b) / 2 - 0.5))

    return profile(solve_increasing(kl, kl_per_frame, iterations=100))


class _GaussianPrior(MaskedNormal):
    """``N(m_p, exp(logs_p))`` on ``(..., C, T)`` with the ``m_p``/``logs_p`` attributes of a flow prior."""

    def __init__(self, m_p: Tensor, logs_p: Tensor) -> None:
        super().__init__(m_p, logs_p.exp(), validate_args=False)
        self.m_p, self.logs_p = m_p, logs_p


def _simulate(a: np.ndarray, b: np.ndarray, frames: int, batches: int, seed: int) -> dict[str, Tensor]:
    """``batches`` batch losses (nats per frame) of ``frames`` frames each by :func:`kl_estimate` with
    ``q = N(b, a^2)`` per channel against ``N(0, 1)``, in chunks: ``{estimator: (batches,)}``."""
    c = a.size
    m_q = torch.tensor(b, dtype=D64)[:, None].expand(c, frames)
    logs_q = torch.tensor(np.log(a), dtype=D64)[:, None].expand(c, frames)
    prior = _GaussianPrior(torch.zeros(c, frames, dtype=D64), torch.zeros(c, frames, dtype=D64))
    chunk = max(1, (1 << 21) // (c * frames))
    out: dict[str, list[Tensor]] = {name: [] for name in QUADRATIC_ESTIMATORS}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for start in range(0, batches, chunk):
            eps = torch.randn(min(chunk, batches - start), c, frames, generator=gen, dtype=D64)
            z = m_q + logs_q.exp() * eps
            for name in QUADRATIC_ESTIMATORS:
                out[name].append(kl_estimate(name, z, m_q, logs_q, prior) / frames)
    return {name: torch.cat(values) for name, values in out.items()}


def regime_study(config: StudyConfig) -> Sweep:
    """P(batch loss < 0) for a batch of F frames (``regime_frames``) at KL = ``regime_kls`` nats per frame
    in the ``regime_channels``-channel setting of :func:`regime_profile`, for each of
    :data:`~pyro_vits.kl.estimators.QUADRATIC_ESTIMATORS`: exact saddlepoint tail and normal approximation
    (:func:`~pyro_vits.kl.negative.prob_negative_gaussian`), and a simulation check at
    ``regime_sim_frames`` frames (``regime_sim_batches`` batches per seed).

    InferenceData ``regime``: ``<estimator>__KL<kl>`` -> simulated batch losses ``(seed, batch)``.
    """
    check_config(config)
    c = config.regime_channels
    out: dict[str, Any] = {"channels": c, "active_channels": _ACTIVE, "kls": list(config.regime_kls),
                           "frames": list(config.regime_frames), "sim_frames": config.regime_sim_frames,
                           "unit": "probabilities; log10 P", "by_kl": {}}
    draws: Draws = {}
    for kl in config.regime_kls:
        a, b = regime_profile(kl, c)
        row: dict[str, Any] = {"max_sigma_gap": float(np.max(1 - a)), "max_offset": float(np.max(np.abs(b))),
                               "collapsed_share": float(np.mean(1 - a < 0.01)), "by_estimator": {}}
        sims = [_simulate(a, b, config.regime_sim_frames, config.regime_sim_batches, seed)
                for seed in config.seeds]
        for name in QUADRATIC_ESTIMATORS:
            cells = {}
            for frames in config.regime_frames:
                log_p = prob_negative_gaussian(name, a, b, frames=frames, log=True)
                log_n = prob_negative_gaussian(name, a, b, frames=frames, method="normal", log=True)
                cells[str(frames)] = {"p": math.exp(log_p), "log10_p": log_p / math.log(10),
                                      "p_normal": math.exp(log_n), "log10_p_normal": log_n / math.log(10)}
            losses = by_seed([s[name] for s in sims])
            draws[f"{name}__KL{kl:g}"] = losses
            exact = prob_negative_gaussian(name, a, b, frames=config.regime_sim_frames)
            sim = _row(losses, exact, prob_negative_gaussian(name, a, b, frames=config.regime_sim_frames,
                                                             method="normal"))
            sim["mean"], sim["mean_se"] = float(losses.mean()), float(losses.std(ddof=1) / math.sqrt(losses.size))
            cells["simulation"] = sim
            row["by_estimator"][name] = cells
        out["by_kl"][f"{kl:g}"] = row
    sweep = Sweep(out)
    sweep.add_draws("regime", draws, config, table=False)
    return sweep
