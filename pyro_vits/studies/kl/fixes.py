"""What ``clamp()``, ``abs()`` and the element-wise ``abs`` patch do to the loss, its gradient and the
optimum of sigma_q (Q6); the gradient identity of ``vits``, ``mc`` and ``control_variate`` (Q5, Q8)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..._validate import check_positive_ints
from ...distributions.flow_prior import CosFlowPrior
from ...distributions.masked_normal import MaskedNormal
from ...kl import ESTIMATORS, batch_kl, kl_estimate, names, quadrature_kl_2d
from .common import Draws, Sweep, by_seed, col, summary
from .config import D64, NEAR_A, RATIO_OFFSET, StudyConfig, check_config
from .negative import exact_tail, near_convergence

__all__ = ["FIXES", "fix_gradient_study", "sigma_optimum_study", "gradient_identity", "gradient_geometry",
           "near_convergence_gradients", "locate_crossing"]

FIXES = ("mean",) + names(fix=True)
"""Losses compared: VITS's plain batch mean and every fix of the registry (``fix``): ``clamp``/``abs`` (a
``batch_reduction`` of the batch mean) and the element-wise ``abs`` patch (its own per-utterance formula)."""
_GRAD_PARAMS = ("m_q[0]", "m_q[1]", "logs_q[0]", "logs_q[1]")


def _losses(prior: Any, m_q: Tensor, logs_q: Tensor, eps: Tensor, fixes: tuple[str, ...] = FIXES
            ) -> dict[str, Tensor]:
    """Batch losses ``(R,)`` (nats per frame) of each of ``fixes`` for ``z = m_q + exp(logs_q) eps``
    (``eps (R, B, C, T)``)."""
    z = m_q + logs_q.exp() * eps
    m, s = m_q.expand_as(z), logs_q.expand_as(z)
    frames = torch.ones(eps.shape[1], dtype=eps.dtype)
    per_utt = kl_estimate("vits", z, m, s, prior)
    out = {}
    for name in fixes:
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


def gradient_geometry(gradient: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """How a mean gradient ``(P,)`` relates to the true one ``(P,)``: ``projection`` ``<g, t> / |t|^2`` (1 =
    right size along the right direction), ``cosine``, and the part of ``g`` orthogonal to ``t`` as a
    fraction of ``|t|`` (``orthogonal_over_true``) and of ``|g|`` (``orthogonal_over_own`` = sine). A
    rescaled true gradient (a KL weight) has cosine 1 and orthogonal part 0."""
    g, t = np.asarray(gradient, dtype=float), np.asarray(true, dtype=float)
    projection = float(g @ t / (t @ t))
    orthogonal = float(np.linalg.norm(g - projection * t))
    return {"projection": projection, "cosine": float(g @ t / (np.linalg.norm(g) * np.linalg.norm(t))),
            "orthogonal_over_true": orthogonal / float(np.linalg.norm(t)),
            "orthogonal_over_own": orthogonal / float(np.linalg.norm(g))}


def _projection_se(grad: np.ndarray, true_grad: np.ndarray) -> float:
    """Delta-method MCSE of :func:`gradient_geometry`'s projection estimated from paired per-batch draws
    ``grad`` and ``true_grad`` ``(N, P)`` (each fix's gradient and the unbiased one on the same batches)."""
    g, t = grad.mean(0), true_grad.mean(0)
    tt, gt = t @ t, g @ t
    influence = (grad - g) @ (t / tt) + (true_grad - t) @ (g / tt - 2 * gt * t / tt**2)
    return float(influence.std(ddof=1) / math.sqrt(len(influence)))


def near_convergence_gradients(amplitude: float = NEAR_A) -> dict[str, Any]:
    """Closed forms of the expected gradients w.r.t. ``(m_q[0], m_q[1], logs_q[0], logs_q[1])`` (nats per
    frame) at the near-convergence point (``q = N(0, I)``, one 2-channel frame, cos prior of ``amplitude``
    ``a``, ``m_p = logs_p = 0``). With ``s = exp(logs_q)``,
    ``KL = (m0^2 + s0^2 + m1^2 + s1^2)/2 + a m1 cos(m0) e^(-s0^2/2) + a^2 (1 + cos(2 m0) e^(-2 s0^2))/4
    - logs_q[0] - logs_q[1] + const`` (``E cos z0 = cos m0 e^(-s0^2/2)``), so at the point
    ``grad KL = (0, a e^(-1/2), -a^2 e^(-2), 0)``. The element-wise ``abs`` adds ``|d| - d`` per element with
    ``d = logs_p - logs_q - 1/2 = -1/2 < 0``, i.e. ``2 logs_q + 1``: ``+2`` on each ``logs_q`` entry, for
    every draw, so its projection is ``1 + projection_gain (t[2] + t[3])`` with ``projection_gain =
    2 / |t|^2``. Returns ``true_gradient`` ``t``, ``abs_elementwise_gradient``, ``projection_gain`` and the
    patch's :func:`gradient_geometry` (``abs_elementwise``)."""
    a = float(amplitude)
    true = np.array([0.0, a * math.exp(-0.5), -a * a * math.exp(-2.0), 0.0])
    patched = true + np.array([0.0, 0.0, 2.0, 2.0])
    return {"params": list(_GRAD_PARAMS), "amplitude": a, "true_gradient": true.tolist(),
            "abs_elementwise_gradient": patched.tolist(), "projection_gain": float(2 / (true @ true)),
            "abs_elementwise": gradient_geometry(patched, true)}


def fix_gradient_study(config: StudyConfig) -> Sweep:
    """Near convergence (:func:`~pyro_vits.studies.kl.negative.near_convergence`), batches of ``gradient_batch``
    utterances: the mean batch loss and gradient w.r.t. ``(m_q, logs_q)`` of each of :data:`FIXES`. The
    unbiased ``mean`` gradient is the reference; per fix: value bias, the gradient's
    :func:`gradient_geometry` (projection with its delta-method MCSE, cosine, orthogonal part), the share of
    uphill batches (negative dot product) and of zero-gradient batches; ``closed_form``:
    :func:`near_convergence_gradients`. ``p_negative_saddlepoint``: P(batch loss < 0) by
    :func:`~pyro_vits.studies.kl.negative.exact_tail` (saddlepoint for batches of 2 or more).

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
        "batch_size": config.gradient_batch, "elements_per_batch": 2 * config.gradient_batch, "truth": truth,
        "params": list(_GRAD_PARAMS),
        "true_gradient": true_grad.tolist(), "unit": "nats per frame (loss and its gradient)",
        "p_negative_loss": p_neg, "p_negative_loss_se": math.sqrt(p_neg * (1 - p_neg) / draws["mean__loss"].size),
        "p_negative_saddlepoint": exact_tail("vits", config.gradient_batch),
        "closed_form": near_convergence_gradients(),
    }
    for name in FIXES:
        loss, grad = draws[f"{name}__loss"], draws[f"{name}__grad"]
        stats = summary({"loss": loss, **{p: grad[..., i] for i, p in enumerate(_GRAD_PARAMS)}})
        mean_grad = grad.mean(axis=(0, 1))
        results[name] = {
            "loss_mean": stats["loss"]["mean"], "loss_bias": stats["loss"]["mean"] - truth,
            "loss_bias_mcse": stats["loss"]["mcse_mean"],
            "gradient": mean_grad.tolist(), "gradient_mcse": [stats[p]["mcse_mean"] for p in _GRAD_PARAMS],
            **gradient_geometry(mean_grad, true_grad),
            "projection_se": _projection_se(grad.reshape(-1, 4), draws["mean__grad"].reshape(-1, 4)),
            "uphill_fraction": float(((grad @ true_grad) < 0).mean()),
            "zero_gradient_fraction": float((np.abs(grad).sum(-1) == 0).mean()),
        }
    sweep = Sweep(results)
    dims = {f"{r}__grad": ["param"] for r in FIXES}
    sweep.add_draws("fix_gradient", draws, config, dims, {"param": list(_GRAD_PARAMS)})
    return sweep


def _logs_gradients(prior: Any, ratio: float, noise: list[Tensor], fixes: tuple[str, ...]
                    ) -> dict[str, np.ndarray]:
    """Per batch, d(batch loss)/d(shared ``logs_q``) (nats per frame) at ``sigma_q / sigma_p = ratio``
    (Gaussian prior, ``m_q - m_p = RATIO_OFFSET sigma_p``) for each of ``fixes``, on the batches' noise
    ``noise`` (per seed ``(R, B, 2, 1)``; the same at every ratio): ``{fix: (seeds x R,)}``."""
    grads: dict[str, list[Tensor]] = {name: [] for name in fixes}
    for eps in noise:
        logs_q = torch.full((eps.shape[0], 1, 1, 1), math.log(ratio), dtype=D64, requires_grad=True)
        losses = _losses(prior, col(0.0, 0.0) + RATIO_OFFSET, logs_q, eps, fixes)
        for name, loss in losses.items():
            grads[name].append(torch.autograd.grad(loss.sum(), logs_q, retain_graph=True)[0].reshape(-1))
    return {name: torch.cat(g).numpy() for name, g in grads.items()}


def locate_crossing(gradient: Callable[[float], float], lo: float, hi: float, iterations: int = 44,
                    kink_gap: float = 1e-3) -> dict[str, Any]:
    """Where ``gradient`` (of ``sigma_q / sigma_p``) crosses from below 0 (at ``lo``) to at least 0 (at
    ``hi``), by bisection on ``log(sigma_q / sigma_p)`` (width ``log(hi / lo) / 2^iterations``), no
    interpolation. ``kind``: ``"kink"`` when the gradient jumps across 0 there (both one-sided values more
    than ``kink_gap`` from 0: the loss has a kink, its optimum is the kink itself), else ``"root"``. Returns
    ``optimum``, ``kind``, ``gradient_below`` and ``gradient_above`` (the values at the final bracket)."""
    below, above = gradient(lo), gradient(hi)
    if not below < 0 <= above:
        raise ValueError(f"gradient must be < 0 at lo and >= 0 at hi, got {below} and {above}")
    x0, x1 = math.log(lo), math.log(hi)
    for _ in range(iterations):
        mid = 0.5 * (x0 + x1)
        value = gradient(math.exp(mid))
        if value < 0:
            x0, below = mid, value
        else:
            x1, above = mid, value
    kind = "kink" if min(-below, above) > kink_gap else "root"
    return {"optimum": math.exp(0.5 * (x0 + x1)), "kind": kind, "gradient_below": below,
            "gradient_above": above}


def sigma_optimum_study(config: StudyConfig, points: int = 25) -> Sweep:
    """Where each of :data:`FIXES` puts the optimum of ``sigma_q`` for a Gaussian prior: the expected
    gradient of the batch loss w.r.t. a shared ``logs_q`` (``gradient_replicates`` batches of
    ``gradient_batch`` one-frame, 2-channel utterances per seed, ``m_q - m_p = RATIO_OFFSET sigma_p``) on a
    grid of ``sigma_q / sigma_p``, with the same batches at every ratio (common random numbers), and its
    crossing of 0 located by :func:`locate_crossing` on that same function. Theory: 1 for the unbiased loss;
    exactly ``e^(-1/2)`` for ``abs_elementwise``, a kink: per element its expected gradient is
    ``a^2 + sign(log a + 1/2)`` (``a = sigma_q / sigma_p``; ``|d|``, ``d = -log a - 1/2``, adds
    ``+1`` above ``e^(-1/2)`` and ``-1`` below), which jumps from ``e^(-1) - 1 < 0`` to ``e^(-1) + 1 > 0``
    there whatever the offset. No InferenceData (means and MCSEs only)."""
    check_config(config)
    check_positive_ints(points=points)
    zero = col(0.0, 0.0)
    prior = CosFlowPrior(zero, zero, a=0.0)
    grid = np.geomspace(0.3, 1.5, points)
    shape = (config.gradient_replicates, config.gradient_batch, 2, 1)
    noise = [_noise(shape, 1000 * seed) for seed in config.seeds]
    rows = [_logs_gradients(prior, float(r), noise, FIXES) for r in grid]
    by_fix = {name: {"mean": [float(g[name].mean()) for g in rows],
                     "mcse": [float(g[name].std(ddof=1) / math.sqrt(g[name].size)) for g in rows]}
              for name in FIXES}
    out: dict[str, Any] = {"ratios": grid.tolist(), "offset": RATIO_OFFSET, "batch_size": shape[1],
                           "prior": "Gaussian (cos flow with a = 0)", "elements_per_utterance": 2,
                           "theory_optimum": {"mean": 1.0, "abs_elementwise": math.exp(-0.5)},
                           "unit": "d(batch loss)/d(logs_q), nats per frame", "by_fix": by_fix, "optimum": {},
                           "crossing": {}}
    for name in FIXES:
        g = np.asarray(by_fix[name]["mean"])
        cross = np.flatnonzero((g[:-1] < 0) & (g[1:] >= 0))
        found = None if not cross.size else locate_crossing(
            lambda r, name=name: float(_logs_gradients(prior, r, noise, (name,))[name].mean()),
            float(grid[cross[0]]), float(grid[cross[0] + 1]))
        out["optimum"][name] = None if found is None else found["optimum"]
        out["crossing"][name] = found
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
