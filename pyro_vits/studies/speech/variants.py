"""The KL-loss variants of the VITS threads, trained on speech: ``vits`` vs ``clamp`` vs ``abs`` vs the
element-wise ``abs`` vs ``K = 4`` particles, at equal steps, several seeds.

Every variant trains :class:`~pyro_vits.models.speech.SpeechModel` with VITS's posterior encoder by
:func:`~pyro_vits.train.fit` (same data, sizes, learning rate, steps, seeds); only the KL term of the loss
differs. With ``KL_b = -H(q) - log p(z)`` summed over the minibatch (one draw, VITS's estimator):

- ``vits``: ``KL_b`` (:class:`~pyro_vits.infer.elbo.HybridEntropyELBO`, K = 1); ``vits_k4``: the same, K = 4 draws;
- ``clamp`` / ``abs``: ``max(KL_b, 0)`` / ``|KL_b|`` on the minibatch's KL, as VITS users patched
  ``kl_loss``;
- ``abs_elementwise``: the thread's patch ``|logs_p - logs_q - 1/2| + (z_p - m_p)^2 e^(-2 logs_p) / 2`` per
  element, i.e. ``KL_b + sum (|d| - d)`` with ``d = logs_p - logs_q - 1/2`` (aligned ``logs_p``).

Measured on the held-out utterances after training (nats per frame unless stated): the ELBO and KL with
``--eval-samples`` guide draws per utterance (:func:`~pyro_vits.infer.evaluate.evaluate`; 16 by default, the
page states how many its run used), the reconstruction error of ``dec(m_q)`` against the model's
observation over valid bins and frames (:data:`RECONSTRUCTION`: the RMS in dB against the log-magnitude
spectrogram for the ``gaussian-linear`` likelihood, the mean absolute error in log-mel units, VITS's mel L1,
for ``laplace-mel``), and P(logged KL < 0): the fraction of training-size minibatches whose one-draw VITS KL
is negative (reported as a count pooled over seeds, with a 95 % upper bound when it is 0).

Equal compute: each variant's cost per step relative to ``vits`` is measured in the same study
(:func:`cost_ratios`, CPU seconds per training step, paired by seed); a variant that costs ``r`` times as much
per step gets ``round(steps / r)`` steps (:func:`equal_compute_steps`), the compute of ``vits``'s ``steps``.
By default the variants retrained so are those whose ``r`` differs resolvably from 1 (:func:`unequal_cost`);
the others' equal-steps runs stand for them at equal compute.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pyro.infer import ELBO, Trace_ELBO
from pyro.infer.util import torch_item
from pyro.poutine import Trace
from torch import Tensor

from ..._validate import check_positive_ints
from ...data.speech_data import SpeechData
from ...distributions.masked_normal import MaskedNormal
from ...infer.elbo import HybridEntropyELBO
from ...kl import ESTIMATORS, aligned_log_priors, alignment_gap, names, posterior_mean_alignment
from ...models.speech import SpeechModel

__all__ = ["PATCHES", "VARIANTS", "RECONSTRUCTION", "KLVariantELBO", "variant_elbo", "reconstruction_error_db",
           "mel_l1_error", "negative_kl_fraction", "t_interval", "summarise", "paired_difference",
           "cost_ratios", "unequal_cost", "equal_compute_steps"]

PATCHES = names(fix=True)
"""The patched ``kl_loss`` variants of :class:`KLVariantELBO`: the registry's fixes (``clamp``, ``abs``,
``abs_elementwise``), each applied by its registry formula (``batch_reduction`` or ``penalty``)."""

VARIANTS = ("vits",) + PATCHES + ("vits_k4",)
"""Loss variants compared (module docstring)."""

DB_PER_NEPER = 20.0 / math.log(10.0)


class KLVariantELBO(Trace_ELBO):
    """One-particle ELBO for :class:`~pyro_vits.models.speech.SpeechModel` whose KL term is a patched VITS
    ``kl_loss`` (``variant`` in :data:`PATCHES`, see the module docstring). The loss
    is ``-log p(x | z) + KL_variant`` with the plate's subsampling scale; reported and differentiated alike.
    ``negative_steps`` counts the evaluations whose unpatched minibatch KL was negative (where ``clamp`` and
    ``abs`` act)."""

    def __init__(self, variant: str) -> None:
        if variant not in PATCHES:
            raise ValueError(f"variant must be one of {PATCHES}, got {variant!r}")
        super().__init__(num_particles=1, vectorize_particles=False, max_plate_nesting=1)
        self.variant = variant
        self.negative_steps = 0

    def _kl(self, model_trace: Trace, guide_trace: Trace) -> Tensor:
        q_site, p_site = guide_trace.nodes["z"], model_trace.nodes["z"]
        q, prior, z = q_site["fn"], p_site["fn"], q_site["value"]
        kl = -(q.entropy() * q_site["scale"]).sum() - p_site["log_prob_sum"]
        self.negative_steps += int(torch_item(kl) < 0)
        fix = ESTIMATORS[self.variant]
        if fix.batch_reduction is not None:  # clamp, abs: on the minibatch's KL
            return fix.batch_reduction(kl)
        with torch.no_grad():
            path = prior.alignment(prior.flow(z, prior.mask, prior.g))
        penalty = fix.penalty(torch.log(q.scale), prior.expanded(path)[1], prior.mask)
        return kl + (penalty * q_site["scale"]).sum()

    def _differentiable_loss_particle(self, model_trace: Trace, guide_trace: Trace) -> tuple[float, Tensor]:
        loss = self._kl(model_trace, guide_trace) - model_trace.nodes["x"]["log_prob_sum"]
        return torch_item(loss), loss


def variant_elbo(name: str) -> ELBO:
    """The ELBO that trains loss variant ``name`` (:data:`VARIANTS`)."""
    if name not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {name!r}")
    if name in ("vits", "vits_k4"):
        return HybridEntropyELBO(num_particles=4 if name == "vits_k4" else 1, vectorize_particles=True,
                                 max_plate_nesting=1)
    return KLVariantELBO(name)


@torch.no_grad()
def _mean_residual_power(model: SpeechModel, guide: Any, data: SpeechData, batch_size: int, power: int,
                         likelihood: str) -> float:
    """Mean over valid (bin, frame) elements of ``|dec(m_q) - x|^power``, ``x = model.observation(spec)``
    ``(B, F_x, T)`` in natural-log units; ``model`` must have ``likelihood``."""
    check_positive_ints(batch_size=batch_size)
    if model.config["likelihood"] != likelihood:
        raise ValueError(f"this measure is for the {likelihood!r} likelihood, the model has "
                         f"{model.config['likelihood']!r} (see RECONSTRUCTION)")
    total, count = 0.0, 0
    for start in range(0, data.n, batch_size):
        chunk = data.subset(torch.arange(start, min(start + batch_size, data.n), device=data.device))
        m_q, _ = guide.posterior(chunk)
        err = (model.likelihood(m_q, chunk).loc - model.observation(chunk.spec)) * chunk.mask
        total += float(err.abs().pow(power).sum())
        count += int(chunk.mask.sum()) * err.shape[-2]
    return total / count


def reconstruction_error_db(model: SpeechModel, guide: Any, data: SpeechData, batch_size: int = 16) -> float:
    """RMS over valid (bin, frame) elements of ``dec(m_q) - log|spec|``, in dB (20 log10 of magnitudes);
    ``gaussian-linear`` models."""
    mean_square = _mean_residual_power(model, guide, data, batch_size, 2, "gaussian-linear")
    return DB_PER_NEPER * math.sqrt(mean_square)


def mel_l1_error(model: SpeechModel, guide: Any, data: SpeechData, batch_size: int = 16) -> float:
    """VITS's mel L1: the mean over valid (mel bin, frame) elements of ``|dec(m_q) - log-mel|``, in log-mel
    units (natural log of the mel magnitude); ``laplace-mel`` models."""
    return _mean_residual_power(model, guide, data, batch_size, 1, "laplace-mel")


RECONSTRUCTION = {"gaussian-linear": ("heldout_recon_db", reconstruction_error_db),
                  "laplace-mel": ("heldout_mel_l1", mel_l1_error)}
"""Likelihood -> (the run record's field, the measure) of the reconstruction error."""


@torch.no_grad()
def negative_kl_fraction(model: SpeechModel, guide: Any, data: SpeechData, batch_size: int, batches: int,
                         seed: int = 0) -> dict[str, float]:
    """Draw ``batches`` random minibatches of ``batch_size`` utterances, one ``z ~ q`` each, and VITS's logged
    KL per frame ``(-H(q) - log p(z)) / frames``: returns the fraction below 0 (``prob_negative``), its
    binomial standard error, and the mean and sd of the logged KL per frame."""
    check_positive_ints(batch_size=batch_size, batches=batches)
    values = []
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(batches):
            idx = torch.randperm(data.n, generator=gen)[: min(batch_size, data.n)].to(data.device)
            batch = data.subset(idx)
            m_q, logs_q = guide.posterior(batch)
            z = (m_q + torch.randn_like(m_q) * torch.exp(logs_q)) * batch.mask
            entropy = (logs_q + 0.5 * math.log(2 * math.pi * math.e)) * batch.mask
            kl = -entropy.sum() - model.prior(batch).log_prob(z).sum()
            values.append(float(kl) / batch.num_frames)
    v = torch.tensor(values, dtype=torch.float64)
    p = float((v < 0).double().mean())
    return dict(prob_negative=p, prob_negative_se=math.sqrt(p * (1 - p) / batches),
                kl_per_frame_mean=float(v.mean()),
                kl_per_frame_sd=float(v.std()) if batches > 1 else math.nan)


@torch.no_grad()
def alignment_gap_per_frame(model: SpeechModel, guide: Any, data: SpeechData, draws: int = 8,
                            seed: int = 0) -> dict[str, Any]:
    """Q10's measurement on ``data``: :func:`~pyro_vits.kl.alignment_gap` of ``draws`` seeded draws
    ``z ~ q`` (nats per frame, each field ``(mean, MCSE)``: ``log q - log p`` with VITS's per-draw MAS, with
    the alignment of the posterior mean, and with the uniform mixture over monotonic alignments)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        prior = model.prior(data)
        m_q, logs_q = guide.posterior(data)
        q = MaskedNormal(m_q, logs_q.exp(), data.mask, validate_args=False)
        z = q.sample(torch.Size([draws]))
        priors = aligned_log_priors(prior, z, posterior_mean_alignment(prior, m_q))
        return alignment_gap(q.log_prob(z), priors, data.lengths)._asdict()


def t_interval(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean, standard error and the half-width of Student's t interval over independent runs (seeds)."""
    from scipy.stats import t

    n = len(values)
    if n < 2:
        raise ValueError(f"need at least 2 values for an interval, got {n}")
    x = torch.tensor(list(values), dtype=torch.float64)
    se = float(x.std()) / math.sqrt(n)
    return dict(mean=float(x.mean()), se=se, half_width=float(t.ppf(0.5 + level / 2, n - 1)) * se, n=n)


def summarise(runs: Sequence[Mapping[str, Any]], keys: Sequence[str]
              ) -> dict[str, dict[str, dict[str, float]]]:
    """``{variant: {key: t_interval over the variant's seeds}}`` from run records with ``variant`` and ``key``
    entries."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == variant]
        out[variant] = {k: t_interval([r[k] for r in mine]) for k in keys}
    return out


def paired_difference(runs: Sequence[Mapping[str, Any]], key: str, variant: str, baseline: str = "vits"
                      ) -> dict[str, float]:
    """``variant - baseline`` of ``key`` paired by seed (same data, initialisation and minibatches), as a
    :func:`t_interval` over the seeds both have."""
    base = {r["seed"]: r[key] for r in runs if r["variant"] == baseline}
    diffs = [r[key] - base[r["seed"]] for r in runs if r["variant"] == variant and r["seed"] in base]
    return t_interval(diffs)


def cost_ratios(runs: Sequence[Mapping[str, Any]], key: str = "cpu_s_per_step", baseline: str = "vits"
                ) -> dict[str, dict[str, float]]:
    """Each variant's cost per step over ``baseline``'s (``key`` of run records, e.g. CPU seconds per step),
    paired by seed: ``{variant: t_interval of the per-seed ratios}`` (``baseline`` itself included, 1 ± 0).
    Runs need ``variant``, ``seed`` and ``key``; each (variant, seed) once."""
    base = {r["seed"]: r[key] for r in runs if r["variant"] == baseline}
    if not base:
        raise ValueError(f"no {baseline!r} runs to measure the cost ratios against")
    out = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        ratios = [r[key] / base[r["seed"]] for r in runs if r["variant"] == variant and r["seed"] in base]
        out[variant] = t_interval(ratios)
    return out


def unequal_cost(ratios: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The variants of :func:`cost_ratios`'s output whose 95 % t-interval of the cost ratio excludes 1."""
    return [v for v, r in ratios.items() if abs(r["mean"] - 1.0) > r["half_width"]]


def equal_compute_steps(steps: int, ratio: float) -> int:
    """The steps a variant costing ``ratio`` times ``vits``'s per step gets for the compute of ``steps`` of
    ``vits``: ``round(steps / ratio)``, at least 1."""
    check_positive_ints(steps=steps)
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"ratio must be a positive finite number, got {ratio!r}")
    return max(1, round(steps / ratio))
