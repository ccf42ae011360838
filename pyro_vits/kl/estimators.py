"""Estimators of VITS's KL term KL(q || p): one class per estimator, one registry (:data:`ESTIMATORS`).

Shapes follow the rest of the package: latents ``(..., C, T)``, masks ``(..., 1, T)`` (1 = real frame).
A *per-utterance* value is in nats summed over the valid ``(C, T)`` elements and has shape ``(...)``;
VITS's loss divides the batch sum by the number of valid frames (:func:`~pyro_vits.kl.loss.vits_kl`,
:func:`batch_kl`).

``q = N(m_q, exp(logs_q))`` is VITS's posterior, ``p`` the flow prior
``p(z) = N(f(z); m_p, exp(logs_p)) |det df/dz|`` (:class:`~pyro_vits.distributions.flow_prior.FlowPrior`, or
:class:`~pyro_vits.distributions.flow_prior.CosFlowPrior`, or any object with ``log_prob(z) -> (...)``).

Each estimator is a :class:`KLEstimator` subclass declaring its per-utterance formula
(:meth:`KLEstimator.estimate` on the shared :class:`EstimatorInputs`) and its properties; every consumer
(the audit, the studies, the figures, VITS's loss) selects estimators by these properties (:func:`names`).
Adding an estimator is one class and one line of :data:`ESTIMATORS`.

**Gradients.** With ``z = m_q + exp(logs_q) e`` (reparameterised), ``log q(z) + H(q) = sum (1 - e^2) / 2``
does not depend on ``(m_q, logs_q)``, so ``"vits"``, ``"mc"`` and ``"control_variate"`` have *identical
gradients draw by draw* (``gradient_group = "vits"``): they differ only in the logged value (its variance and
how often it is negative).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.distributions import Distribution

from .._masks import check_mask
from .._validate import check_positive_ints
from ..distributions.masked_normal import MaskedNormal
from ._common import LogProb, _differs, _masked_sum, _same_event, _tensor

__all__ = [
    "KLEstimator",
    "EstimatorInputs",
    "PlotStyle",
    "ESTIMATORS",
    "names",
    "KL_ESTIMATORS",
    "QUADRATIC_ESTIMATORS",
    "BATCH_REDUCTIONS",
    "LogProb",
    "kl_estimate",
    "sample_kl_estimates",
    "batch_kl",
]


@dataclass(frozen=True)
class PlotStyle:
    """How the study's figures draw an estimator: ``label`` in prose (e.g. ``"hybrid"`` for ``vits``),
    ``kind`` ``"histogram"`` (its draws' histogram), ``"mean line"`` (a line at its mean) or None (not among
    the estimator histograms' draws), and its matplotlib ``colour``."""

    label: str
    kind: str | None = None
    colour: str | None = None


@dataclass(frozen=True)
class EstimatorInputs:
    """What every estimator's formula reads, computed once per call: the draw ``z (..., C, T)``, the posterior
    ``m_q, logs_q`` and ``q = N(m_q, exp(logs_q))`` (a :class:`MaskedNormal`), the ``prior``, the float
    ``mask (..., 1, T)`` and ``log_p = prior.log_prob(z)`` (None when only deterministic estimators run)."""

    z: Tensor
    m_q: Tensor
    logs_q: Tensor
    prior: LogProb
    mask: Tensor
    q: Distribution
    log_p: Tensor | None

    def vits(self) -> Tensor:
        """VITS's hybrid estimate ``-H(q) - log p(z)`` per utterance."""
        return -self.q.entropy() - self.log_p


class KLEstimator:
    """One KL estimator: its name, per-utterance formula and properties (class attributes).

    - ``unbiased``: ``E_q[estimate] = KL(q || p)`` for any prior;
    - ``can_be_negative``: a draw can come out below 0;
    - ``needs_prior_scales``: reads the prior's base ``m_p``/``logs_p`` (``TypeError`` without them);
    - ``deterministic``: ignores ``z`` (no ``log p(z)`` is evaluated for it);
    - ``gradient_group``: estimators of one group have identical gradients draw by draw (None: alone);
    - ``fix``: a patch VITS users applied to VITS's loss against negative values;
    - ``quadratic``: None, or a method ``(m_q, logs_q, m_p, logs_p) -> (c0, alpha, beta)`` per element: the
      estimator as ``c0 + alpha e + beta e^2`` in its noise ``e ~ N(0, 1)`` for a Gaussian prior;
    - ``batch_reduction``: None, or a method on VITS's batch-mean loss (the fix acts on the batch loss; its
      per-utterance formula applies it to one utterance's ``vits`` estimate);
    - ``penalty``: None, or a method ``(logs_q, logs_p, mask) -> (...)``: what a fix adds to ``vits`` per
      utterance, from the posterior's and the (aligned) prior's log-scales only;
    - ``plot``: a :class:`PlotStyle`.
    """

    name: ClassVar[str]
    unbiased: ClassVar[bool]
    can_be_negative: ClassVar[bool]
    needs_prior_scales: ClassVar[bool] = False
    deterministic: ClassVar[bool] = False
    gradient_group: ClassVar[str | None] = None
    fix: ClassVar[bool] = False
    plot: ClassVar[PlotStyle]
    quadratic: Any = None
    batch_reduction: Any = None
    penalty: Any = None

    def estimate(self, x: EstimatorInputs) -> Tensor:
        """The estimate per utterance ``(...)`` in nats."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _k3(log_r: Tensor) -> Tensor:
    """``(r - 1) - log r`` from ``log r`` without cancellation: a Taylor series where ``|log r| < 1e-2``."""
    series = log_r**2 * (1 / 2 + log_r * (1 / 6 + log_r * (1 / 24 + log_r * (1 / 120 + log_r / 720))))
    return torch.where(log_r.abs() < 1e-2, series, torch.expm1(log_r) - log_r)


def _prior_scales(prior: LogProb, name: str) -> tuple[Tensor, Tensor]:
    """The prior's base ``(m_p, logs_p)``; ``TypeError`` naming estimator ``name`` if it has none."""
    m_p, logs_p = getattr(prior, "m_p", None), getattr(prior, "logs_p", None)
    if not isinstance(m_p, Tensor) or not isinstance(logs_p, Tensor):
        raise TypeError(
            f"{name!r} needs a prior with Tensor attributes m_p and logs_p "
            f"(FlowPrior, CosFlowPrior), got {type(prior).__name__}"
        )
    return m_p, logs_p


def _gaussian_terms(m_q: Tensor, logs_q: Tensor, m_p: Tensor, logs_p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(a^2, alpha, c0)`` of ``vits`` per element for a Gaussian prior (``a = s_q / s_p``, ``b = (m_q - m_p)
    / s_p``): ``alpha = a b``, ``c0 = -log a - 1/2 + b^2 / 2`` (:func:`~pyro_vits.kl.quadratic.quadratic_form`)."""
    log_a = logs_q - logs_p
    a2, b = torch.exp(2 * log_a), (m_q - m_p) * torch.exp(-logs_p)
    alpha = torch.exp(log_a) * b
    c0 = -log_a - 0.5 + b**2 / 2
    return a2, alpha, c0


class Vits(KLEstimator):
    """``-H(q) - log p(z)``: analytic entropy plus one-sample cross-entropy (VITS's loss times the frame
    count, with the flow's log-determinant included). Quadratic form: ``beta = a^2 / 2``."""

    name, unbiased, can_be_negative, gradient_group = "vits", True, True, "vits"
    plot = PlotStyle("hybrid", "histogram", "C0")

    def estimate(self, x: EstimatorInputs) -> Tensor:
        return x.vits()

    def quadratic(self, m_q: Tensor, logs_q: Tensor, m_p: Tensor, logs_p: Tensor) -> tuple[Tensor, ...]:
        a2, alpha, c0 = _gaussian_terms(m_q, logs_q, m_p, logs_p)
        return c0 + 0.0, alpha, a2 / 2


class MonteCarlo(KLEstimator):
    """``log q(z) - log p(z)``: vits ``+ (1 - e^2) / 2``, so ``beta = (a^2 - 1) / 2`` and ``c0`` larger by 1/2."""

    name, unbiased, can_be_negative, gradient_group = "mc", True, True, "vits"
    plot = PlotStyle("full MC", "histogram", "C1")

    def estimate(self, x: EstimatorInputs) -> Tensor:
        return x.q.log_prob(x.z) - x.log_p

    def quadratic(self, m_q: Tensor, logs_q: Tensor, m_p: Tensor, logs_p: Tensor) -> tuple[Tensor, ...]:
        a2, alpha, c0 = _gaussian_terms(m_q, logs_q, m_p, logs_p)
        return c0 + 0.5, alpha, (a2 - 1) / 2


class ControlVariate(KLEstimator):
    """``vits + sum c (log q(z) + H(q))`` per element with ``c = sigma_q^2 / sigma_p^2`` (prior base scales,
    held constant). ``log q + H = (1 - e^2) / 2`` has mean 0, so it stays unbiased; for a Gaussian prior this
    ``c`` minimises the variance, to ``a^2 b^2`` per element (``beta = 0``, ``c0`` = the KL per element)."""

    name, unbiased, can_be_negative, gradient_group = "control_variate", True, True, "vits"
    needs_prior_scales = True
    plot = PlotStyle("control variate", "histogram", "C2")

    def estimate(self, x: EstimatorInputs) -> Tensor:
        _, logs_p = _prior_scales(x.prior, self.name)
        c = torch.exp(2 * (x.logs_q - logs_p)).detach()
        eps = (x.z - x.m_q) * torch.exp(-x.logs_q)
        return x.vits() + _masked_sum(c * 0.5 * (1 - eps**2), x.mask)

    def quadratic(self, m_q: Tensor, logs_q: Tensor, m_p: Tensor, logs_p: Tensor) -> tuple[Tensor, ...]:
        a2, alpha, c0 = _gaussian_terms(m_q, logs_q, m_p, logs_p)
        return c0 + a2 / 2, alpha, torch.zeros_like(a2)


class K3(KLEstimator):
    """``(r - 1) - log r`` with ``r = p(z)/q(z)``. Unbiased (``E_q r = 1``) and ``>= 0``; its variance is
    infinite unless ``sigma_q > sigma_p / sqrt(2)`` in every element (Gaussian tails)."""

    name, unbiased, can_be_negative = "k3", True, False
    plot = PlotStyle("k3", "histogram", "C3")

    def estimate(self, x: EstimatorInputs) -> Tensor:
        return _k3(-(x.q.log_prob(x.z) - x.log_p))


class Clamp(KLEstimator):
    """``max(vits, 0)``; VITS users clamped the batch loss (``batch_reduction``). Biased upward."""

    name, unbiased, can_be_negative, fix = "clamp", False, False, True
    plot = PlotStyle("clamp", "mean line", "C4")

    def batch_reduction(self, loss: Tensor) -> Tensor:
        return loss.clamp(min=0.0)

    def estimate(self, x: EstimatorInputs) -> Tensor:
        return self.batch_reduction(x.vits())


class Abs(KLEstimator):
    """``|vits|``; VITS users took the batch loss's absolute value (``batch_reduction``). Biased upward."""

    name, unbiased, can_be_negative, fix = "abs", False, False, True
    plot = PlotStyle("abs", "mean line", "C5")

    def batch_reduction(self, loss: Tensor) -> Tensor:
        return loss.abs()

    def estimate(self, x: EstimatorInputs) -> Tensor:
        return self.batch_reduction(x.vits())


class AbsElementwise(KLEstimator):
    """The patch proposed for VITS, ``abs`` on the log-scale term only: ``sum_valid |logs_p - logs_q - 1/2| +
    (f(z) - m_p)^2 exp(-2 logs_p) / 2`` minus the flow's log-determinant, i.e. ``vits + sum_valid (|d| - d)``
    with ``d = logs_p - logs_q - 1/2`` (:meth:`penalty`). Biased by ``2 sum max(-d, 0)`` (deterministic); it
    moves the optimum of ``sigma_q`` from ``sigma_p`` to ``sigma_p e^(-1/2)`` for a Gaussian prior. Per
    element ``|d| + (f(z) - m_p)^2 exp(-2 logs_p) / 2 >= 0``, so it is never negative for a volume-preserving
    flow (VITS's mean-only couplings, the cos flow); only a flow's log-determinant can pull it below 0."""

    name, unbiased, can_be_negative, fix = "abs_elementwise", False, False, True
    needs_prior_scales = True
    plot = PlotStyle("element-wise abs", "mean line", "C6")

    @staticmethod
    def penalty(logs_q: Tensor, logs_p: Tensor, mask: Tensor) -> Tensor:
        """``sum_valid (|d| - d)``, ``d = logs_p - logs_q - 1/2``: what the patch adds to ``vits``."""
        d = logs_p - logs_q - 0.5
        return _masked_sum(d.abs() - d, mask)

    def estimate(self, x: EstimatorInputs) -> Tensor:
        _, logs_p = _prior_scales(x.prior, self.name)
        return x.vits() + self.penalty(x.logs_q, logs_p, x.mask)


class GaussianClosedForm(KLEstimator):
    """``KL(N(m_q, s_q) || N(m_p, s_p))`` ignoring the flow (``z`` unused): exact only when the flow is the
    identity (so not unbiased for a flow prior)."""

    name, unbiased, can_be_negative, deterministic = "gaussian_closed_form", False, False, True
    needs_prior_scales = True
    plot = PlotStyle("closed form", None, "red")

    def estimate(self, x: EstimatorInputs) -> Tensor:
        m_p, logs_p = _prior_scales(x.prior, self.name)
        var_ratio = torch.exp(2 * (x.logs_q - logs_p))
        scaled_gap2 = (x.m_q - m_p) ** 2 * torch.exp(-2 * logs_p)
        closed = _masked_sum(logs_p - x.logs_q + 0.5 * (var_ratio + scaled_gap2) - 0.5, x.mask)
        return closed.expand(torch.broadcast_shapes(closed.shape, x.z.shape[:-2]))


def _registry(estimators: list[KLEstimator]) -> dict[str, KLEstimator]:
    registry = {est.name: est for est in estimators}
    if len(registry) != len(estimators):
        raise ValueError("estimator names must be unique")
    for est in estimators:
        if est.fix and est.batch_reduction is None and est.penalty is None:
            raise TypeError(f"fix {est.name!r} must declare a batch_reduction or a penalty")
    return registry


ESTIMATORS: dict[str, KLEstimator] = _registry([
    Vits(),
    MonteCarlo(),
    ControlVariate(),
    K3(),
    Clamp(),
    Abs(),
    AbsElementwise(),
    GaussianClosedForm(),
])
"""The one registry of KL estimators, by name, in the order tables, figures and reports list them."""

_FLAGS = ("unbiased", "can_be_negative", "needs_prior_scales", "deterministic", "fix")
_METHODS = ("quadratic", "batch_reduction")


def names(**properties: object) -> tuple[str, ...]:
    """The registered names, in registry order, whose properties all match: booleans for ``unbiased``,
    ``can_be_negative``, ``needs_prior_scales``, ``deterministic``, ``fix``; ``quadratic=True`` /
    ``batch_reduction=True`` select those that have one (False: those that have none); ``gradient_group``
    a group name; ``plot`` a :class:`PlotStyle` kind (``"histogram"``, ``"mean line"``)."""
    for key in properties:
        if key not in _FLAGS + _METHODS + ("gradient_group", "plot"):
            raise ValueError(f"properties must be estimator properties, got {key!r}")

    def value(est: KLEstimator, key: str) -> object:
        if key in _METHODS:
            return getattr(est, key) is not None
        return est.plot.kind if key == "plot" else getattr(est, key)

    return tuple(name for name, est in ESTIMATORS.items()
                 if all(value(est, key) == want for key, want in properties.items()))


KL_ESTIMATORS = tuple(ESTIMATORS)
"""Names accepted by :func:`kl_estimate` (:data:`ESTIMATORS`' keys)."""

QUADRATIC_ESTIMATORS = names(quadratic=True)
"""Estimators that are a quadratic form in Gaussian noise for a Gaussian prior
(:func:`~pyro_vits.kl.quadratic.quadratic_form`)."""

BATCH_REDUCTIONS = ("mean",) + names(batch_reduction=True)
"""Names accepted by :func:`batch_kl`: the plain mean and each estimator's ``batch_reduction``."""


def kl_estimate(
    name: str, z: Tensor, m_q: Tensor, logs_q: Tensor, prior: LogProb, mask: Tensor | None = None
) -> Tensor:
    """One-sample estimate of ``KL(q || p)`` per utterance: ``z (..., C, T) -> (...)`` nats.

    ``z`` is a draw from ``q = N(m_q, exp(logs_q))`` (``m_q``, ``logs_q`` broadcast to ``z``); ``mask``
    ``(..., 1, T)`` defaults to ``prior.mask`` when the prior has one. Names (:data:`KL_ESTIMATORS`), each
    described by its class in :data:`ESTIMATORS`: ``"vits"`` (:class:`Vits`), ``"mc"``
    (:class:`MonteCarlo`), ``"control_variate"`` (:class:`ControlVariate`), ``"k3"`` (:class:`K3`),
    ``"clamp"`` / ``"abs"`` (:class:`Clamp`, :class:`Abs`), ``"abs_elementwise"``
    (:class:`AbsElementwise`), ``"gaussian_closed_form"`` (:class:`GaussianClosedForm`).
    """
    return _estimates((name,), z, m_q, logs_q, prior, mask)[name]


def _check_inputs(
    z: Tensor, m_q: Tensor, logs_q: Tensor, prior: LogProb, mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Validated ``z`` and the ``(..., 1, T)`` float mask (``prior.mask`` by default)."""
    z = _tensor(z, "z")
    _same_event(_tensor(m_q, "m_q"), z, "m_q", "z")
    _same_event(_tensor(logs_q, "logs_q"), z, "logs_q", "z")
    if not callable(getattr(prior, "log_prob", None)):
        raise TypeError(f"prior must have a log_prob method, got {type(prior).__name__}")
    prior_mask = getattr(prior, "mask", None)
    if mask is None:
        mask = prior_mask if isinstance(prior_mask, Tensor) else z.new_ones(z.shape[:-2] + (1, z.shape[-1]))
    mask = check_mask(mask, z)
    if isinstance(prior_mask, Tensor) and _differs(mask, prior_mask):
        raise ValueError("mask must equal prior.mask (the prior's padded frames are fixed at construction)")
    return z, mask


def _estimates(
    selected: tuple[str, ...], z: Tensor, m_q: Tensor, logs_q: Tensor, prior: LogProb, mask: Tensor | None
) -> dict[str, Tensor]:
    """Validate, then evaluate each named estimator on ``z`` with one evaluation of ``log p(z)``."""
    for name in selected:
        if name not in ESTIMATORS:
            raise ValueError(f"name must be one of {KL_ESTIMATORS}, got {name!r}")
    z, mask = _check_inputs(z, m_q, logs_q, prior, mask)
    q = MaskedNormal(m_q, torch.exp(logs_q), mask, validate_args=False)
    needs_log_p = any(not ESTIMATORS[name].deterministic for name in selected)
    x = EstimatorInputs(z, m_q, logs_q, prior, mask, q, prior.log_prob(z) if needs_log_p else None)
    return {name: ESTIMATORS[name].estimate(x) for name in selected}


def sample_kl_estimates(
    names: tuple[str, ...] | list[str],
    m_q: Tensor,
    logs_q: Tensor,
    prior: LogProb,
    num_samples: int,
    seed: int = 0,
    mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """Draw ``num_samples`` ``z ~ q`` (seeded, global RNG untouched) and evaluate each named estimator on
    the same draws (one ``log p`` evaluation, no autograd graph): ``{name: (num_samples, ...)}``."""
    check_positive_ints(num_samples=num_samples)
    m_q, logs_q = _tensor(m_q, "m_q"), _tensor(logs_q, "logs_q")
    if mask is None and isinstance(getattr(prior, "mask", None), Tensor):
        mask = prior.mask
    q = MaskedNormal(m_q, torch.exp(logs_q), mask)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        z = q.sample((num_samples,))
    with torch.no_grad():
        return _estimates(tuple(names), z, m_q, logs_q, prior, q.mask)


def batch_kl(reduction: str, per_utt_kl: Tensor, n_frames: Tensor) -> Tensor:
    """VITS's batch loss from per-utterance KL estimates: ``(..., B), (B,) -> (...)`` nats per frame.

    ``"mean"``: ``sum_b kl_b / sum_b n_b`` (what :func:`~pyro_vits.kl.loss.vits_kl` returns); ``"clamp"`` /
    ``"abs"`` (each estimator's ``batch_reduction``): that batch mean clamped at 0 / made absolute, the fixes
    VITS users applied to negative losses. Leading dims of ``per_utt_kl`` are independent replicate batches.
    """
    if reduction not in BATCH_REDUCTIONS:
        raise ValueError(f"reduction must be one of {BATCH_REDUCTIONS}, got {reduction!r}")
    if not isinstance(per_utt_kl, Tensor) or not isinstance(n_frames, Tensor):
        raise TypeError("per_utt_kl and n_frames must be Tensors")
    if per_utt_kl.dim() < 1 or n_frames.shape != per_utt_kl.shape[-1:]:
        raise ValueError(f"n_frames must be a Tensor of shape (B={per_utt_kl.shape[-1]},)")
    mean = per_utt_kl.sum(-1) / n_frames.to(per_utt_kl).sum()
    return mean if reduction == "mean" else ESTIMATORS[reduction].batch_reduction(mean)
