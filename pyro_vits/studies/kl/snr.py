"""Gradient signal-to-noise ratio against K (Q7), and IWAE-DReG checked on a linear-Gaussian model whose
ELBO gradient and exact posterior are known (why its guide SNR falls with K here, unlike in Tucker et
al. 2019)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import RenyiELBO
from torch import Tensor

from ...data.batch import Batch
from ...infer import diagnostics
from ...infer.elbo import STL_ELBO, HybridEntropyELBO, IWAE_DReG
from .common import Draws, Sweep, mean_ci
from .config import D64, StudyConfig, check_config

__all__ = ["SNR_ELBOS", "PARAM_GROUPS", "SNR_NOISE", "snr_study", "dreg_linear_gaussian_study"]

SNR_ELBOS = {"vits": HybridEntropyELBO, "stl": STL_ELBO, "iwae_dreg": IWAE_DReG}
"""ELBO estimators whose gradient SNR is measured: VITS's (its gradient is ``Trace_ELBO``'s), sticking the
landing, and the importance-weighted bound with doubly reparameterised gradients."""
PARAM_GROUPS = {"prior_flow": "model$$$flow.", "guide": "guide$$$"}
SNR_NOISE = ("fixed", "minibatch")
"""Gradient noise sources: ``fixed``: the same B utterances every repeat (particle noise only);
``minibatch``: B utterances subsampled from the training set each repeat (particle + subsampling noise)."""


def _debiased_snr(stats: diagnostics.GradientStats) -> float:
    """``||E g|| / sqrt(tr Cov g)`` with ``||mean||^2`` debiased by ``tr Cov / R`` (the noise a mean of R
    draws keeps), floored at 0."""
    ratio = stats.mean_norm**2 / stats.total_variance - 1.0 / stats.num_repeats
    return math.sqrt(max(ratio, 0.0))


def snr_study(config: StudyConfig, model: Any, guide: Any, data: Batch) -> Sweep:
    """Gradient SNR per parameter group (:data:`PARAM_GROUPS`) for each estimator in :data:`SNR_ELBOS`,
    K in ``particles``, batch size B in ``snr_batch_sizes`` and noise source in :data:`SNR_NOISE`, at fixed
    (trained) parameters, via :func:`~pyro_vits.infer.diagnostics.gradient_stats` with ``snr_repeats`` repeats per
    seed. Reported: the debiased vector SNR ``||E g|| / sqrt(tr Cov g)`` (mean, SE and t-interval over
    seeds) and the SNR per unit of compute ``SNR_K / sqrt(K)``.

    InferenceData ``snr``: ``<elbo>__<noise>__B<b>__K<k>__<group>`` -> SNR ``(1, seed)``.
    """
    check_config(config)
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
                        rows[str(k)][group] = {**mean_ci(snr), "per_sqrt_k": float(np.mean(snr)) / math.sqrt(k)}
                out["by_elbo"].setdefault(elbo_name, {}).setdefault(noise, {})[f"B{b}"] = rows
    pyro.clear_param_store()
    sweep = Sweep(out)
    sweep.add_draws("snr", draws, config, table=False)
    return sweep


# ---------------------------------------------------------------------------------------------------------
# IWAE-DReG on a linear-Gaussian model: z ~ N(0, I_D), x | z ~ N(z, I_D); posterior N(x / 2, I / 2)
# ---------------------------------------------------------------------------------------------------------

_GUIDE_SHIFT, _GUIDE_SCALE = 0.3, 1.3  # the guide's offset from the posterior mean and scale factor


def _lg_model(x: Tensor) -> None:
    z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
    pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def _lg_guide(x: Tensor) -> None:
    loc = pyro.param("loc", x / 2 + _GUIDE_SHIFT)
    log_scale = pyro.param("log_scale", torch.full_like(x, math.log(_GUIDE_SCALE * math.sqrt(0.5))))
    pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def _lg_stats(elbo: Any, x: Tensor, repeats: int, seed: int, at_posterior: bool = False) -> Any:
    pyro.clear_param_store()
    if at_posterior:
        pyro.param("loc", x / 2)
        pyro.param("log_scale", torch.full_like(x, math.log(math.sqrt(0.5))))
    return diagnostics.gradient_stats(_lg_model, _lg_guide, elbo, x, num_repeats=repeats,
                                      param_groups={"guide": lambda name: True}, seed=seed)["guide"]


def dreg_linear_gaussian_study(config: StudyConfig) -> Sweep:
    """IWAE-DReG against closed forms on ``z ~ N(0, I_D), x | z ~ N(z, I_D)`` (``D`` in ``dreg_dims``) with
    the guide ``N(x/2 + 0.3, (1.3^2 / 2) I)``, ``dreg_repeats`` gradient draws per seed:

    - K = 1: DReG's mean guide gradient equals the exact ELBO gradient ``(2 m - x, 2 s^2 - 1)`` per
      coordinate (``max_abs_z`` over coordinates and seeds-pooled draws);
    - at the exact posterior the DReG guide gradient is exactly 0 for every draw and K (``max_abs_at_posterior``);
    - for every K, DReG's mean gradient equals the plain reparameterised IWAE gradient's (``RenyiELBO(0)``,
      same bound; ``max_abs_z_vs_iwae``), and both SNRs (debiased vector SNR, mean over seeds).
    """
    check_config(config)
    out: dict[str, Any] = {"guide": "N(x/2 + 0.3, (1.3^2 / 2) I)", "repeats_per_seed": config.dreg_repeats,
                           "by_dim": {}, "unit": "dimensionless (SNR); z-scores"}
    for d in config.dreg_dims:
        x = torch.linspace(-1.0, 1.0, d, dtype=D64) if d > 1 else torch.tensor([0.7], dtype=D64)
        m, s2 = x / 2 + _GUIDE_SHIFT, torch.full_like(x, 0.5 * _GUIDE_SCALE**2)
        exact = torch.cat([2 * m - x, 2 * s2 - 1]).numpy()
        rows: dict[str, Any] = {}
        for k in config.particles:
            row: dict[str, Any] = {}
            for name, cls in (("dreg", IWAE_DReG), ("iwae", RenyiELBO)):
                elbo = (cls(num_particles=k, vectorize_particles=True, max_plate_nesting=0) if name == "dreg"
                        else RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=0))
                stats = [_lg_stats(elbo, x, config.dreg_repeats, seed) for seed in config.seeds]
                row[f"{name}_snr"] = mean_ci([_debiased_snr(s) for s in stats])
                row[f"{name}_mean"] = np.mean([s.mean for s in stats], 0)
                row[f"{name}_mcse"] = np.sqrt(np.mean([s.mcse**2 for s in stats], 0) / len(stats))
            se = np.sqrt(row["dreg_mcse"] ** 2 + row["iwae_mcse"] ** 2)
            row["max_abs_z_vs_iwae"] = float(np.max(np.abs(row["dreg_mean"] - row["iwae_mean"]) / se))
            if k == 1:
                row["max_abs_z_vs_exact_elbo_gradient"] = float(np.max(np.abs(row["dreg_mean"] - exact)
                                                                       / row["dreg_mcse"]))
            at_post = _lg_stats(IWAE_DReG(num_particles=k, vectorize_particles=True, max_plate_nesting=0), x,
                                8, 0, at_posterior=True)
            row["max_abs_at_posterior"] = float(np.max(np.abs(at_post.mean)) + np.max(at_post.variance))
            for key in ("dreg_mean", "iwae_mean", "dreg_mcse", "iwae_mcse"):
                row[key] = row[key].tolist()
            rows[str(k)] = row
        out["by_dim"][str(d)] = rows
    pyro.clear_param_store()
    return Sweep(out)
