"""How often is the batch loss negative? (Q5, Q9): measured against the exact one-utterance tail and
saddlepoint tails of batch means near convergence, and the P(batch loss < 0) calculator over KL x batch
frames on an invented 192-channel Gaussian profile where most channels are nearly collapsed (a sensitivity
analysis, not a measurement of VITS), checked by simulation."""

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

__all__ = ["near_convergence", "one_utterance_quadrature", "one_utterance_tail", "saddlepoint_tail",
           "exact_tail", "negative_batch_study", "tail_fields", "refresh_exact_tails", "skew_example",
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


def _conditional_quadratic(name: str, e0: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The near-convergence estimate ``name`` given the first channel's noise ``e0`` ``(M,)`` as a quadratic
    ``c0 + alpha e1 + beta e1^2`` in the second's: ``(c0, alpha, beta)``, each ``(M,)``. Exact for a
    one-frame, 2-channel prior whose flow shifts channel 1 by a function of channel 0 (the cos flow, a
    mean-only coupling): ``log q`` and ``log N(f(z); m_p, sigma_p^2)`` are then quadratic in ``e1``. Read off
    :func:`kl_estimate` at ``e1 = -1, 0, 1``."""
    m_q, logs_q, prior = near_convergence()
    eps = torch.zeros(e0.size, 3, 2, 1, dtype=D64)
    eps[:, :, 0, 0] = torch.as_tensor(e0, dtype=D64)[:, None]
    eps[:, :, 1, 0] = torch.tensor([-1.0, 0.0, 1.0], dtype=D64)
    with torch.no_grad():
        v = kl_estimate(name, m_q + logs_q.exp() * eps, m_q, logs_q, prior).numpy()
    c0, alpha, beta = v[:, 1], (v[:, 2] - v[:, 0]) / 2, (v[:, 2] + v[:, 0]) / 2 - v[:, 1]
    return c0, alpha, np.where(np.abs(beta) > 1e-12 * (np.abs(alpha) + np.abs(c0) + 1), beta, 0.0)


def _ndtr(x: np.ndarray) -> np.ndarray:
    return torch.special.ndtr(torch.as_tensor(x, dtype=D64)).numpy()


def _prob_quadratic_negative(c0: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """``P(c0 + alpha e + beta e^2 < 0)`` for ``e ~ N(0, 1)``, element-wise over ``(M,)`` arrays: between the
    roots for ``beta > 0``, outside them for ``beta < 0`` (numerically stable roots), ``Phi`` for
    ``beta = 0``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        linear = np.where(alpha > 0, _ndtr(-c0 / alpha), _ndtr(c0 / alpha))
        linear = np.where(alpha == 0, (c0 < 0).astype(float), linear)
        disc = alpha**2 - 4 * beta * c0
        q = -0.5 * (alpha + np.where(alpha >= 0, 1.0, -1.0) * np.sqrt(np.maximum(disc, 0.0)))
        r1, r2 = q / beta, c0 / q
        between = np.where(disc > 0, np.abs(_ndtr(r1) - _ndtr(r2)), 0.0)
    return np.where(beta == 0, linear, np.where(beta > 0, between, 1 - between))


def one_utterance_tail(name: str, half_width: float = 12.0, nodes: int = 64) -> float:
    """Exact ``P(one-utterance estimate name < 0)`` near convergence (N = 1; no saddlepoint): given ``e0``
    the estimate is a quadratic in ``e1`` (:func:`_conditional_quadratic`), whose negative probability is
    closed-form; that is integrated against ``N(0, 1)`` over ``|e0| < half_width`` by Gauss-Legendre
    (``nodes`` per piece) on pieces split where the quadratic's discriminant or ``alpha`` changes sign (the
    kinks), with ``e0 = u + (v - u)(1 - cos t)/2`` so that square-root kinks at the ends integrate smoothly.
    Accurate to ~1e-10 (checked against adaptive quadrature and simulation in the tests)."""
    check_positive_ints(nodes=nodes)

    def switches(x: np.ndarray) -> np.ndarray:
        c0, alpha, beta = _conditional_quadratic(name, x)
        return np.stack([np.sign(alpha**2 - 4 * beta * c0), np.sign(alpha)])

    grid = np.linspace(-half_width, half_width, 4097)
    s = switches(grid)
    idx = np.flatnonzero((s[:, :-1] != s[:, 1:]).any(0))
    lo, hi = grid[idx], grid[idx + 1]
    for _ in range(60):  # bisection of every bracket at once
        mid = 0.5 * (lo + hi)
        left = (switches(mid) == switches(lo)).all(0)
        lo, hi = np.where(left, mid, lo), np.where(left, hi, mid)
    edges = np.concatenate([[-half_width], 0.5 * (lo + hi), [half_width]])
    t, w = np.polynomial.legendre.leggauss(nodes)
    theta, w = np.pi * (t + 1) / 2, w * np.pi / 2
    u, v = edges[:-1, None], edges[1:, None]
    x = (u + (v - u) * (1 - np.cos(theta)) / 2).ravel()
    jacobian = ((v - u) * np.sin(theta) / 2).ravel()
    density = np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return float(np.sum(np.tile(w, edges.size - 1) * jacobian * density
                        * _prob_quadratic_negative(*_conditional_quadratic(name, x))))


def saddlepoint_tail(name: str, n: int) -> float:
    """P(mean of ``n`` one-utterance estimates ``name`` < 0) near convergence by the Lugannani-Rice
    saddlepoint tail of the exact (quadrature) one-utterance distribution (relative error O(1/n))."""
    return prob_negative_saddlepoint(*one_utterance_quadrature(name), n=n)


def exact_tail(name: str, n: int) -> float:
    """P(mean of ``n`` one-utterance estimates ``name`` < 0) near convergence: for ``n = 1`` the exact value
    (:func:`one_utterance_tail`); for ``n >= 2`` :func:`saddlepoint_tail` (at ``n = 1`` that would give 0.607
    for ``vits`` against the exact 0.6032)."""
    check_positive_ints(n=n)
    return one_utterance_tail(name) if n == 1 else saddlepoint_tail(name, n)


def _skewness(x: np.ndarray) -> float:
    centred = x - x.mean()
    return float((centred**3).mean() / (centred**2).mean() ** 1.5)


def tail_fields(count: int, total: int, exact: float, approx: float) -> dict[str, Any]:
    """How ``count`` negative batches of ``total`` compare with the exact (or saddlepoint) tail ``exact`` and
    the normal approximation ``approx``: ``z_vs_exact`` (with the exact binomial SE), expected counts and
    the probability of seeing none."""
    p = count / total
    theory_se = math.sqrt(exact * (1 - exact) / total)
    return {
        "p_exact": exact, "z_vs_exact": (p - exact) / theory_se if theory_se > 0 else None,
        "expected_negatives_exact": exact * total, "p_none_given_exact": (1 - exact) ** total,
        "p_normal_approx": approx, "normal_over_exact": approx / exact if exact > 0 else None,
        "expected_negatives_normal_approx": approx * total,
    }


def _row(means: np.ndarray, exact: float, approx: float) -> dict[str, Any]:
    """Measured P(< 0) of ``means`` (binomial SE) and :func:`tail_fields`."""
    p, se = prob_negative(means)
    count = int(round(p * means.size))
    return {"p_negative": p, "p_negative_se": se, "num_batches": int(means.size), "num_negative": count,
            **tail_fields(count, int(means.size), exact, approx)}


def refresh_exact_tails(negative: dict[str, Any]) -> None:
    """Recompute, in place, every :func:`exact_tail` of a :func:`negative_batch_study` result (rows and
    curves) from its stored counts, after a change to the tail calculators (no sweep is rerun)."""
    for name, est in negative["by_estimator"].items():
        for n, row in est["by_batch_size"].items():
            row.update(tail_fields(row["num_negative"], row["num_batches"], exact_tail(name, int(n)),
                                   row["p_normal_approx"]))
        est["curve"]["p_exact"] = [exact_tail(name, int(n)) for n in est["curve"]["batch_size"]]
        est["p_saddlepoint_n1"] = saddlepoint_tail(name, 1)
    negative["exact_method"] = _EXACT_METHOD


def skew_example(sigma_ratio: float = 0.5, offset: float = 0.5) -> dict[str, Any]:
    """Why lower variance is not fewer negatives, for one element against a Gaussian prior (``a =
    sigma_q / sigma_p``, ``b = (m_q - m_p) / sigma_p``, ``e ~ N(0, 1)``): ``vits = -log a - 1/2 +
    (b + a e)^2 / 2`` is right-skewed and never below ``-log a - 1/2``; ``control_variate = KL + a b e`` is
    symmetric around the KL, negative with probability ``Phi(-KL / (a b))``. Returns the KL, ``vits``'s
    minimum, the control variate's z and P(< 0) of each quadratic estimator
    (:func:`~pyro_vits.kl.negative.prob_negative_gaussian`); nats per element."""
    a, b = float(sigma_ratio), float(offset)
    kl = -math.log(a) + (a * a + b * b) / 2 - 0.5
    return {"sigma_ratio": a, "offset": b, "kl_per_element": kl, "vits_min_per_element": -math.log(a) - 0.5,
            "control_variate_z": kl / (a * b),
            "p_negative": {name: prob_negative_gaussian(name, a, b) for name in QUADRATIC_ESTIMATORS}}


_EXACT_METHOD = ("N = 1: exact (one_utterance_tail, conditional quadrature); N >= 2: Lugannani-Rice "
                 "saddlepoint of the one-utterance distribution on a 64 x 64 Gauss-Hermite rule")


def negative_batch_study(config: StudyConfig) -> Sweep:
    """P(batch-mean KL < 0) for batches of N utterances near convergence for each of
    :data:`NEGATIVE_ESTIMATORS`: measured (binomial SE), "exact" (:func:`exact_tail`: exact at N = 1,
    saddlepoint above) and by the normal
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
        "exact_method": _EXACT_METHOD, "by_estimator": {},
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
            "p_saddlepoint_n1": saddlepoint_tail(name, 1),
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
    and the scale ``s`` solved for the KL. An invented profile (no VITS checkpoint was measured); ``a <= 1``
    in every channel, i.e. ``sigma_q <= sigma_p`` everywhere."""
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
