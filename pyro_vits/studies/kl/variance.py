"""Hybrid (analytic entropy) vs full Monte Carlo vs the control variate: one-draw variance over
sigma_q / sigma_p (Q8), each measured point with its pooled (delta-method) SE and its theory."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...distributions.flow_prior import CosFlowPrior
from ...kl import QUADRATIC_ESTIMATORS, analytic_variance, sample_kl_estimates
from .common import Draws, Sweep, by_seed, col, z_score
from .config import COS_A, D64, RATIO_OFFSET, StudyConfig, check_config

__all__ = ["VARIANCE_ESTIMATORS", "variance_ratio_study", "log_crossing", "ratio_se"]

VARIANCE_ESTIMATORS = QUADRATIC_ESTIMATORS
"""Estimators whose one-draw variance is measured: those with a Gaussian-prior quadratic form (exact theory)."""
_REFERENCE = "mc"
_COMPARED = tuple(name for name in VARIANCE_ESTIMATORS if name != _REFERENCE)
"""Estimators whose variance is reported as a ratio to :data:`_REFERENCE`'s (full Monte Carlo)."""


def _ratio_posteriors(ratios: np.ndarray) -> tuple[Tensor, Tensor]:
    """``(m_q, logs_q)`` ``(G, 2, 1)``: ``m_q = RATIO_OFFSET``, ``sigma_q = ratio`` (the base is N(0, I))."""
    zero = torch.zeros(len(ratios), 2, 1, dtype=D64)
    return zero + RATIO_OFFSET, zero + torch.tensor(np.log(ratios), dtype=D64)[:, None, None]


def _theory(name: str, ratios: np.ndarray) -> np.ndarray:
    """Var(``name``) / Var(mc) per utterance from :func:`analytic_variance` for a Gaussian prior."""
    m_q, logs_q = _ratio_posteriors(ratios)
    zeros = torch.zeros_like(m_q)
    var = analytic_variance(name, m_q, logs_q, zeros, zeros)
    return (var / analytic_variance(_REFERENCE, m_q, logs_q, zeros, zeros)).numpy()


def _same_1d(a: Any, b: Any, a_name: str, b_name: str) -> None:
    for name, value in ((a_name, a), (b_name, b)):
        if not isinstance(value, np.ndarray) or value.ndim != 1:
            raise ValueError(f"{name} must be a 1-D numpy array, got {getattr(value, 'shape', type(value))}")
    if a.shape != b.shape:
        raise ValueError(f"{a_name} {a.shape} and {b_name} {b.shape} must have the same shape")


def log_crossing(ratios: np.ndarray, values: np.ndarray) -> float | None:
    """Where ``values`` crosses 1 (``log values`` linear in ``log ratios``); None if it does not.
    ``ratios``, ``values``: positive, the same shape ``(R,)``."""
    _same_1d(ratios, values, "ratios", "values")
    order = np.argsort(ratios)
    r, v = np.log(ratios[order]), np.log(values[order])
    crossings = np.flatnonzero(np.sign(v[:-1]) != np.sign(v[1:]))
    if crossings.size == 0:
        return None
    i = crossings[0]
    return float(np.exp(r[i] - v[i] * (r[i + 1] - r[i]) / (v[i + 1] - v[i])))


def ratio_se(x: np.ndarray, y: np.ndarray) -> float:
    """Delta-method SE of ``var(x) / var(y)`` from ``n`` i.i.d. pairs ``(x_i, y_i)`` (pooled draws):
    ``Var(log R) = [m4x / vx^2 + m4y / vy^2 - 2 m22 / (vx vy) ... - 1 - 1 + 2] / n`` with central moments.
    ``x``, ``y``: the same shape ``(n,)``."""
    _same_1d(x, y, "x", "y")
    dx, dy = x - x.mean(), y - y.mean()
    vx, vy = float((dx**2).mean()), float((dy**2).mean())
    var_log = ((dx**4).mean() / vx**2 + (dy**4).mean() / vy**2 - 2 * (dx**2 * dy**2).mean() / (vx * vy)) / x.size
    return float(vx / vy * math.sqrt(max(var_log, 0.0)))


def variance_ratio_study(config: StudyConfig) -> Sweep:
    """Var(vits) / Var(mc) and Var(control_variate) / Var(mc) of one-particle per-utterance estimates over
    ``sigma_q / sigma_p`` (one 2-channel frame, ``m_q - m_p = RATIO_OFFSET sigma_p``) for a Gaussian prior
    (theory: :func:`analytic_variance`; every point's z-score against it) and the cos prior (``a =
    COS_A``). SEs are pooled over all seeds' i.i.d. draws (delta method).

    InferenceData ``variance_ratio``: ``<prior>__<estimator>`` -> ``(seed, ratio_draws, ratio)``.
    """
    check_config(config)
    ratios = np.sort(np.array(config.ratio_grid, dtype=float))
    m_q, logs_q = _ratio_posteriors(ratios)
    dense = np.geomspace(ratios[0], ratios[-1], 200)
    results: dict[str, Any] = {
        "ratios": ratios.tolist(), "offset": RATIO_OFFSET, "theory_crossing": 1 / math.sqrt(2),
        "theory": {name: _theory(name, ratios).tolist() for name in _COMPARED},
        "theory_curve": {"ratios": dense.tolist(),
                         **{name: _theory(name, dense).tolist() for name in _COMPARED}},
        "unit": "variance ratio Var(estimator) / Var(mc), dimensionless",
    }
    draws: Draws = {}
    for prior_name, a in (("gaussian", 0.0), ("cos", COS_A)):
        prior = CosFlowPrior(col(0.0, 0.0), col(0.0, 0.0), a=a)
        per_seed = [sample_kl_estimates(VARIANCE_ESTIMATORS, m_q, logs_q, prior, config.ratio_draws, seed=seed)
                    for seed in config.seeds]
        for name in VARIANCE_ESTIMATORS:
            draws[f"{prior_name}__{name}"] = by_seed([d[name] for d in per_seed])
        pooled = {name: draws[f"{prior_name}__{name}"].reshape(-1, len(ratios)) for name in VARIANCE_ESTIMATORS}
        row: dict[str, Any] = {}
        for name in _COMPARED:
            measured = pooled[name].var(0, ddof=1) / pooled[_REFERENCE].var(0, ddof=1)
            se = [ratio_se(pooled[name][:, i], pooled[_REFERENCE][:, i]) for i in range(len(ratios))]
            row[name] = {"ratio": measured.tolist(), "ratio_se": se, "crossing": log_crossing(ratios, measured)}
            if prior_name == "gaussian":
                z = [z_score(m, t, s) for m, t, s in zip(measured, results["theory"][name], se)]
                row[name]["z_vs_theory"] = z
                row[name]["max_abs_z"] = max(abs(v) for v in z if v is not None) if any(
                    v is not None for v in z) else None
        row["var"] = {name: pooled[name].var(0, ddof=1).tolist() for name in VARIANCE_ESTIMATORS}
        results[prior_name] = row
    sweep = Sweep(results)
    sweep.add_draws("variance_ratio", draws, config, {name: ["ratio"] for name in draws}, {"ratio": ratios})
    return sweep
