"""Estimator quality at fixed parameters (Q1, Q3, Q5, Q6 values, k3's variance): bias, sd and P(< 0) of
every estimator against quadrature or large-sample truths, in four settings."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...distributions.flow_prior import CosFlowPrior, FlowPrior
from ...distributions.masked_normal import MaskedNormal
from ...flows import ResidualCouplingBlock
from ...kl import ESTIMATORS, batch_kl, names, prob_negative, quadrature_kl_2d, reference_kl
from ...models.teacher import make_teacher, sample_dataset
from .common import Draws, Sweep, by_seed, chunked_estimates, col, summary
from .config import COS_A, D64, Q_LOC, Q_SCALE, StudyConfig, check_config

__all__ = ["QUALITY_ESTIMATORS", "estimator_quality_study", "teacher_flow"]

QUALITY_ESTIMATORS = names()
"""Estimators compared at fixed parameters: every one of :data:`~pyro_vits.kl.estimators.ESTIMATORS`; those
with a ``batch_reduction`` (``clamp``/``abs``, VITS users' fixes) act on the batch loss of ``vits`` draws."""

_SAMPLED = names(batch_reduction=False)
_BATCH_FIXES = names(batch_reduction=True)
K3_THRESHOLD = 1 / math.sqrt(2)  # E_q[(p/q)^2] < inf iff sigma_q > sigma_p / sqrt(2) (Gaussian tails)


def teacher_flow(
    channels: int, hidden: int, *, mean_only: bool = True, seed: int, **sizes: int
) -> ResidualCouplingBlock:
    """The frozen random VITS flow of :func:`~pyro_vits.models.teacher.make_teacher` in float64."""
    return make_teacher(channels, hidden, mean_only=mean_only, seed=seed, **sizes).flow.double()


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
    m_q, logs_q = col(*Q_LOC), col(*Q_SCALE).log()
    points = config.quadrature_points
    truth, error = quadrature_kl_2d(MaskedNormal(m_q, logs_q.exp()), prior, num_points=points)
    method = f"2-D trapezoid quadrature ({points}² points; ± = Richardson estimate |I(h) − I(2h)|)"
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
    zero = col(0.0, 0.0)
    coupling = FlowPrior(col(0.1, -0.1), col(0.2, -0.1), teacher_flow(2, 8, kernel_size=3, seed=3))
    return {
        "cos2d": _setting_2d(CosFlowPrior(zero, zero, a=COS_A), config,
                             f"unit-Jacobian cos flow f(x0, x1) = (x0, x1 + {COS_A:g} cos x0), N(0, I) base"),
        "cos2d_thread": _setting_2d(CosFlowPrior(zero, zero, a=-COS_A), config,
                                    "the thread's map z = (x0, cos x0 + x1) of a base draw x, i.e. "
                                    "f(z) = (z0, z1 - cos z0): the mirror image of cos2d"),
        "coupling2d": _setting_2d(coupling, config, "2-channel VITS mean-only coupling block"),
        "vits": _vits_setting(config, device),
    }


def _particle_batch_loss(per_utt: Tensor, frames: Tensor, k: int, name: str) -> Tensor:
    """``(n, B)`` one-particle per-utterance draws -> ``(n // k,)`` K-particle batch losses per frame;
    ``clamp``/``abs`` fix the K-particle vits loss, as VITS users did."""
    per_utt = per_utt.reshape(per_utt.shape[0] // k, k, -1).mean(1)
    return batch_kl(name if name in _BATCH_FIXES else "mean", per_utt, frames)


def _k3_facts(s: _Setting, per_seed: list[dict[str, Tensor]]) -> dict[str, Any]:
    """Whether k3 has finite variance here (``min sigma_q / sigma_p > 1/sqrt(2)``) and how often ``r = p/q``
    underflows so that ``k3 = mc - 1`` exactly (per utterance)."""
    logs_p = s.prior.logs_p
    mask = torch.broadcast_to(s.prior.mask if isinstance(getattr(s.prior, "mask", None), Tensor)
                              else torch.ones_like(s.logs_q[..., :1, :]), s.logs_q.shape) > 0
    ratio = float(torch.exp(s.logs_q - logs_p)[mask].min())
    k3 = torch.cat([d["k3"].reshape(-1) for d in per_seed]).double()
    mc = torch.cat([d["mc"].reshape(-1) for d in per_seed]).double()
    equal = (k3 - (mc - 1)).abs() <= 1e-6 * mc.abs().clamp(min=1.0)
    return {"min_sigma_ratio": ratio, "variance_finite": ratio > K3_THRESHOLD,
            "equals_mc_minus_1_fraction": float(equal.double().mean())}


def _estimator_rows(s: _Setting, config: StudyConfig, per_seed: list[dict[str, Tensor]],
                    setting_draws: Draws) -> dict[str, Any]:
    estimators: dict[str, Any] = {}
    for name in QUALITY_ESTIMATORS:
        base = "vits" if name in _BATCH_FIXES else name
        by_k = {k: by_seed([_particle_batch_loss(d[base].reshape(s.draws, -1), s.frames, k, name)
                            for d in per_seed]) for k in config.particles}
        if ESTIMATORS[name].deterministic:  # its error is exact
            value = float(by_k[1][0, 0])
            estimators[name] = {"value": value, "bias": value - s.truth, "bias_mcse": s.truth_error,
                                "relative_error": (value - s.truth) / s.truth}
            continue
        setting_draws[name] = by_k[1]
        stats = summary({f"K{k}": x for k, x in by_k.items()})
        estimators[name] = {}
        for k, x in by_k.items():
            st = stats[f"K{k}"]
            p_neg, p_se = prob_negative(x)
            bias_mcse = math.hypot(st["mcse_mean"], s.truth_error)
            estimators[name][str(k)] = {
                **st, "bias": st["mean"] - s.truth, "bias_mcse": bias_mcse,
                "bias_z": (st["mean"] - s.truth) / bias_mcse if bias_mcse > 0 else None,
                "p_negative": p_neg, "p_negative_se": p_se, "num_draws": int(x.size),
            }
    return estimators


def estimator_quality_study(config: StudyConfig, device: torch.device | str = "cpu") -> Sweep:
    """Bias (vs quadrature or :func:`reference_kl`), sd and P(estimate < 0) of every estimator in
    :data:`QUALITY_ESTIMATORS` with K particles, in nats per frame, for four settings (see ``description``),
    and k3's variance facts. ``sd`` of a batch loss is per batch (here, per frame of the whole batch).

    InferenceData ``quality_<setting>``: ``<estimator>`` -> one-particle batch losses per frame
    ``(seed, draw)`` (the deterministic closed form is left out).
    """
    check_config(config)
    device = torch.device(device)
    results: dict[str, Any] = {}
    sweep = Sweep(results)
    for setting_name, s in _quality_settings(config, device).items():
        setting_draws: Draws = {}
        per_seed = [chunked_estimates(_SAMPLED, s.m_q, s.logs_q, s.prior, s.draws, seed)
                    for seed in config.seeds]
        results[setting_name] = {
            "description": s.description, "truth": s.truth, "truth_error": s.truth_error,
            "truth_method": s.truth_method, "frames": float(s.frames.sum()), "channels": int(s.m_q.shape[-2]),
            "unit": "nats per frame (sd: per batch loss)",
            "estimators": _estimator_rows(s, config, per_seed, setting_draws), "k3": _k3_facts(s, per_seed),
        }
        sweep.add_draws(f"quality_{setting_name}", setting_draws, config)
    return sweep
