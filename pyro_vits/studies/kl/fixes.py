"""What ``clamp()``, ``abs()`` and the element-wise ``abs`` patch do to the loss, its gradient and the
optimum of sigma_q (Q6); the gradient identity of ``vits``, ``mc`` and ``control_variate`` (Q5, Q8)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..._validate import check_positive_ints
from ...distributions.flow_prior import CosFlowPrior
from ...distributions.masked_normal import MaskedNormal
from ...kl import ESTIMATORS, batch_kl, kl_estimate, names, quadrature_kl_2d
from .common import Draws, Sweep, by_seed, col, summary
from .config import D64, RATIO_OFFSET, StudyConfig, check_config
from .negative import exact_tail, near_convergence

__all__ = ["FIXES", "fix_gradient_study", "sigma_optimum_study", "gradient_identity"]

FIXES = ("mean",) + names(fix=True)
"""Losses compared: VITS's plain batch mean and every fix of the registry (``fix``): ``clamp``/``abs`` (a
``batch_reduction`` of the batch mean) and the element-wise ``abs`` patch (its own per-utterance formula)."""
_GRAD_PARAMS = ("m_q[0]", "m_q[1]", "logs_q[0]", "logs_q[1]")


def _losses(prior: Any, m_q: Tensor, logs_q: Tensor, eps: Tensor) -> dict[str, Tensor]:
    """Batch losses ``(R,)`` of every :data:`FIXES` for ``z = m_q + exp(logs_q) eps`` (``eps (R, B, C, T)``)."""
    z = m_q + logs_q.exp() * eps
    m, s = m_q.expand_as(z), logs_q.expand_as(z)
    frames = torch.ones(eps.shape[1], dtype=eps.dtype)
    per_utt = kl_estimate("vits", z, m, s, prior)
    out = {}
    for name in FIXES:
        fix = ESTIMATORS.get(name)
        if fix is None or fix.batch_reduction is not None:  # the plain mean, or a fix of vits's batch mean
            out[name] = batch_kl(name, per_utt, frames)
        else:
            out[name] = batch_kl("mean", kl_estimate(name, z, m, s, prior), frames)
    return out


def _noise(shape: tuple[int, ...], seed: int) -> Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.randn(shape, dtype=D64)


def _batch_gradients(prior: Any, batch: int, replicates: int, seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    """Per replicate batch: the batch loss and its gradient w.r.t. ``(m_q, logs_q)`` for each of
    :data:`FIXES`: ``{fix: (loss (R,), grad (R, 4))}``."""
    m_q0, logs_q0, _ = near_convergence()
    m_q = m_q0.expand(replicates, 1, 2, 1).clone().requires_grad_(True)
    logs_q = logs_q0.expand(replicates, 1, 2, 1).clone().requires_grad_(True)
    losses = _losses(prior, m_q, logs_q, _noise((replicates, batch, 2, 1), seed))
    out = {}
    for name, loss in losses.items():
        grads = torch.autograd.grad(loss.sum(), (m_q, logs_q), retain_graph=True)
        out[name] = (loss.detach(), torch.cat([g.reshape(replicates, 2) for g in grads], -1))
    return out


def fix_gradient_study(config: StudyConfig) -> Sweep:
    """Near convergence (:func:`~pyro_vits.studies.kl.negative.near_convergence`), batches of ``gradient_batch``
    utterances: the mean batch loss and gradient w.r.t. ``(m_q, logs_q)`` of each of :data:`FIXES`. The
    unbiased ``mean`` gradient is the reference; per fix: value bias, the gradient's projection on the true
    gradient (1 = right size and direction; for ``clamp`` the effective KL weight), its cosine, the share of
    uphill batches (negative dot product) and of zero-gradient batches.

    InferenceData ``fix_gradient``: ``<fix>__loss`` ``(seed, R)``, ``<fix>__grad`` ``(seed, R, param)``.
    """
    check_config(config)
    m_q, logs_q, prior = near_convergence()
    per_seed = [_batch_gradients(prior, config.gradient_batch, config.gradient_replicates, seed)
                for seed in config.seeds]
    draws: Draws = {}
    for name in FIXES:
        draws[f"{name}__loss"] = by_seed([d[name][0] for d in per_seed])
        draws[f"{name}__grad"] = by_seed([d[name][1] for d in per_seed])
    truth = quadrature_kl_2d(MaskedNormal(m_q, logs_q.exp()), prior, num_points=config.quadrature_points)[0]
    true_grad = draws["mean__grad"].mean(axis=(0, 1))
    p_neg = float((draws["mean__loss"] < 0).mean())
    results: dict[str, Any] = {
        "batch_size": config.gradient_batch, "truth": truth, "params": list(_GRAD_PARAMS),
        "true_gradient": true_grad.tolist(), "unit": "nats per frame (loss and its gradient)",
        "p_negative_loss": p_neg, "p_negative_loss_se": math.sqrt(p_neg * (1 - p_neg) / draws["mean__loss"].size),
        "p_negative_exact": exact_tail("vits", config.gradient_batch),
    }
    for name in FIXES:
        loss, grad = draws[f"{name}__loss"], draws[f"{name}__grad"]
        stats = summary({"loss": loss, **{p: grad[..., i] for i, p in enumerate(_GRAD_PARAMS)}})
        mean_grad = grad.mean(axis=(0, 1))
        results[name] = {
            "loss_mean": stats["loss"]["mean"], "loss_bias": stats["loss"]["mean"] - truth,
            "loss_bias_mcse": stats["loss"]["mcse_mean"],
            "gradient": mean_grad.tolist(), "gradient_mcse": [stats[p]["mcse_mean"] for p in _GRAD_PARAMS],
            "projection": float(mean_grad @ true_grad / (true_grad @ true_grad)),
            "cosine": float(mean_grad @ true_grad / (np.linalg.norm(mean_grad) * np.linalg.norm(true_grad))),
            "uphill_fraction": float(((grad @ true_grad) < 0).mean()),
            "zero_gradient_fraction": float((np.abs(grad).sum(-1) == 0).mean()),
        }
    sweep = Sweep(results)
    dims = {f"{r}__grad": ["param"] for r in FIXES}
    sweep.add_draws("fix_gradient", draws, config, dims, {"param": list(_GRAD_PARAMS)})
    return sweep


def sigma_optimum_study(config: StudyConfig, points: int = 25) -> Sweep:
    """Where each of :data:`FIXES` puts the optimum of ``sigma_q`` for a Gaussian prior: the expected
    gradient of the batch loss w.r.t. a shared ``logs_q`` (``gradient_replicates`` batches of
    ``gradient_batch`` one-frame, 2-channel utterances, ``m_q - m_p = RATIO_OFFSET sigma_p``) on a grid of
    ``sigma_q / sigma_p``, and its zero crossing. Theory: 1 for the unbiased loss, ``e^(-1/2)`` for
    ``abs_elementwise`` (its per-element loss ``|log a + 1/2| + a^2 / 2`` falls for ``a < e^(-1/2)`` and
    rises above). No InferenceData (means and MCSEs only)."""
    check_config(config)
    check_positive_ints(points=points)
    zero = col(0.0, 0.0)
    prior = CosFlowPrior(zero, zero, a=0.0)
    grid = np.geomspace(0.3, 1.5, points)
    reps, batch = config.gradient_replicates, config.gradient_batch
    by_fix: dict[str, dict[str, list[float]]] = {name: {"mean": [], "mcse": []} for name in FIXES}
    for i, ratio in enumerate(grid):
        grads = {name: [] for name in FIXES}
        for seed in config.seeds:
            logs_q = torch.full((reps, 1, 1, 1), math.log(ratio), dtype=D64, requires_grad=True)
            losses = _losses(prior, zero + RATIO_OFFSET, logs_q, _noise((reps, batch, 2, 1), 1000 * seed + i))
            for name, loss in losses.items():
                grads[name].append(torch.autograd.grad(loss.sum(), logs_q, retain_graph=True)[0].reshape(-1))
        for name in FIXES:
            g = torch.cat(grads[name]).numpy()
            by_fix[name]["mean"].append(float(g.mean()))
            by_fix[name]["mcse"].append(float(g.std(ddof=1) / math.sqrt(g.size)))
    out: dict[str, Any] = {"ratios": grid.tolist(), "offset": RATIO_OFFSET, "batch_size": batch,
                           "theory_optimum": {"mean": 1.0, "abs_elementwise": math.exp(-0.5)},
                           "unit": "d(batch loss)/d(logs_q), nats per frame", "by_fix": by_fix, "optimum": {}}
    for name in FIXES:
        g = np.asarray(by_fix[name]["mean"])
        cross = np.flatnonzero((g[:-1] < 0) & (g[1:] >= 0))
        if cross.size:
            j = cross[0]
            x0, x1 = np.log(grid[j]), np.log(grid[j + 1])
            out["optimum"][name] = float(np.exp(x0 - g[j] * (x1 - x0) / (g[j + 1] - g[j])))
        else:
            out["optimum"][name] = None
    return Sweep(out)


def gradient_identity(draws: int = 64, seed: int = 0) -> dict[str, float]:
    """The largest absolute difference, draw by draw, between the gradients of ``mc`` / ``control_variate``
    and of ``vits`` w.r.t. ``(m_q, logs_q)`` on the cos-prior setting (float64; reparameterised draws)."""
    check_positive_ints(draws=draws)
    m_q0, logs_q0 = col(0.3, -0.2), col(0.8, 0.6).log()
    prior = CosFlowPrior(col(0.1, 0.0), col(0.2, -0.1), a=1.0)
    eps = _noise((draws, 2, 1), seed)
    grads = {}
    group = names(gradient_group="vits")
    for name in group:
        m_q, logs_q = (v.expand(draws, 2, 1).clone().requires_grad_(True) for v in (m_q0, logs_q0))
        value = kl_estimate(name, m_q + logs_q.exp() * eps, m_q, logs_q, prior)
        grads[name] = torch.cat(torch.autograd.grad(value.sum(), (m_q, logs_q)), -1)
    return {f"{name}_max_abs_difference": float((grads[name] - grads["vits"]).abs().max())
            for name in group if name != "vits"} | {"draws": draws}
