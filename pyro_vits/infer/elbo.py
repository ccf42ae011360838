"""Pyro ELBOs for VITS's KL question: the VITS (analytic-entropy) estimator, STL, and IWAE with DReG.

All classes work with :class:`pyro.infer.SVI`, masks (``MaskedNormal``, ``.mask()``, ``poutine.mask``),
subsampling plates / ``poutine.scale`` and ``vectorize_particles=True/False``.

- :class:`HybridEntropyELBO`: ``-E[log p(x, z)] - H(q)`` with the guide's analytic entropy; with a
  ``MaskedNormal`` guide and a flow prior its KL part is exactly VITS's ``kl_loss`` times the frame count.
- :class:`STL_ELBO`: "sticking the landing" (Roeder et al. 2017): the ELBO value of ``Trace_ELBO``, but the
  surrogate evaluates ``log q(z)`` with the guide's distribution parameters detached.
- :class:`IWAE_DReG`: the importance-weighted bound (``RenyiELBO(alpha=0)``'s value) with the doubly
  reparameterised gradient (Tucker et al. 2018) for the guide.
- :class:`MC_ELBO`: ``Trace_ELBO``'s full Monte-Carlo estimator, written with the same hook as the two above
  so that it also takes ``kl_particles``.

``kl_particles=K`` (:class:`HybridEntropyELBO`, :class:`STL_ELBO`, :class:`MC_ELBO`): the expected
log-likelihood keeps the usual particles (``num_particles``), while each reparameterised latent site's KL
part ``log q(z) - log p(z)`` (or ``-H(q) - log p(z)``) is averaged over the site's own draw and ``K - 1``
more reparameterised draws ``z' ~ q`` (``rsample``, one vectorised call of the site's distributions: for a
``FlowPrior`` the flow runs once on all ``K - 1`` draws, never the likelihood). The estimate and its
gradient stay unbiased (each draw's term has the same expectation); ``K = 1`` is the plain estimator.
Sites downstream of ``z`` (the likelihood) see only the original draw. See :func:`kl_particle_sites`.

:data:`ELBOS` names them (with Pyro's ``Trace_ELBO`` as ``"trace"``) for configs and command lines;
:func:`make_elbo` builds one by name.

STL and DReG stop the gradient through *all* tensors a guide site's distribution holds, so a structured
guide whose site parameters depend on upstream latent samples also loses that path (exact for mean-field
and data-amortised guides such as VITS's posterior encoder).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from pyro.distributions import Independent, MaskedDistribution
from pyro.distributions.torch_distribution import ExpandedDistribution
from pyro.distributions.util import is_identically_zero, scale_and_mask, sum_rightmost
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO
from pyro.infer.trace_elbo import _compute_log_r
from pyro.infer.util import get_dependent_plate_dims, torch_item
from pyro.poutine import Trace
from pyro.util import warn_if_nan
from torch import Tensor
from torch.distributions import Distribution, TransformedDistribution

from .._validate import check_positive_ints

__all__ = [
    "ELBOS",
    "KL_PARTICLE_ELBOS",
    "HybridEntropyELBO",
    "STL_ELBO",
    "MC_ELBO",
    "IWAE_DReG",
    "analytic_entropy",
    "detach_distribution",
    "kl_particle_sites",
    "make_elbo",
]

Site = dict[str, Any]


def analytic_entropy(fn: Distribution) -> Tensor | None:
    """Entropy of ``fn`` with shape ``fn.batch_shape``, looking through Pyro's ``Independent``,
    ``MaskedDistribution`` (masked entries count 0, like their ``log_prob``) and ``ExpandedDistribution``;
    ``None`` where ``fn`` has no analytic entropy."""
    if isinstance(fn, MaskedDistribution):
        base = analytic_entropy(fn.base_dist)
        return None if base is None else scale_and_mask(base, mask=fn._mask)
    if isinstance(fn, ExpandedDistribution):
        base = analytic_entropy(fn.base_dist)
        return None if base is None else base.expand(fn.batch_shape)
    if isinstance(fn, Independent):
        base = analytic_entropy(fn.base_dist)
        return None if base is None else sum_rightmost(base, fn.reinterpreted_batch_ndims)
    try:
        return fn.entropy().expand(fn.batch_shape)
    except NotImplementedError:
        return None


def detach_distribution(fn: Distribution) -> Distribution:
    """A shallow copy of ``fn`` whose tensor attributes (recursively through wrapped distributions) are
    detached: ``log_prob`` then depends on its argument only. Transformed distributions are refused, as
    their transforms may hold parameters this cannot reach."""
    if isinstance(fn, TransformedDistribution):
        raise NotImplementedError(
            f"cannot detach the parameters of {type(fn).__name__}: its transforms may hold parameters"
        )
    new = copy.copy(fn)
    for key, value in vars(fn).items():
        if isinstance(value, Tensor):
            setattr(new, key, value.detach())
        elif isinstance(value, Distribution):
            setattr(new, key, detach_distribution(value))
    return new


def _is_reparameterized(site: Site) -> bool:
    return not site["is_observed"] and is_identically_zero(site["score_parts"].score_function)


def _stl_log_prob(site: Site) -> Tensor:
    """``log q(z)`` of a guide site with the distribution's parameters detached, scaled and masked like
    ``site["log_prob"]``; the gradient reaches the guide only through ``z``."""
    log_prob = detach_distribution(site["fn"]).log_prob(site["value"])
    return scale_and_mask(log_prob, site["scale"], site["mask"])


def _extra_site(site: Site, value: Tensor, fn: Distribution | None = None) -> Site:
    """A copy of ``site`` for ``value`` = ``(K - 1, *batch, *event)`` extra draws of it: ``fn`` expanded to
    the extra leading dim, ``log_prob`` scaled and masked like the site's, ``(K - 1, *batch)``."""
    fn = site["fn"] if fn is None else fn
    log_prob = scale_and_mask(fn.log_prob(value), site["scale"], site["mask"])
    expanded = fn.expand(value.shape[:1] + fn.batch_shape)
    return {**site, "fn": expanded, "value": value, "log_prob": log_prob, "log_prob_sum": log_prob.sum()}


def kl_particle_sites(model_trace: Trace, guide_trace: Trace,
                      kl_particles: int) -> dict[str, tuple[Site, Site]]:
    """``K - 1 = kl_particles - 1`` extra reparameterised draws for every latent site that is sampled by a
    reparameterised guide site: ``{name: (model_extra, guide_extra)}``, pseudo-sites (see
    :func:`_extra_site`) whose ``value`` is ``(K - 1, *batch, *event)`` drawn by one ``rsample`` of the
    guide site's distribution and whose ``log_prob`` is the model's / the guide's on those draws (one
    vectorised evaluation each: a ``FlowPrior`` runs its flow once). Empty when ``kl_particles == 1``.
    A site whose guide distribution depends on upstream latents is redrawn given the upstream values of
    this particle, so its averaged term is unbiased for the same conditional expectation."""
    if kl_particles == 1:
        return {}
    extra = {}
    for name, site in guide_trace.nodes.items():
        model_site = model_trace.nodes.get(name)
        if (site["type"] != "sample" or not _is_reparameterized(site) or model_site is None
                or model_site["is_observed"]):
            continue
        value = site["fn"].rsample(torch.Size([kl_particles - 1]))
        extra[name] = (_extra_site(model_site, value), _extra_site(site, value))
    return extra


class _GuideTermELBO(Trace_ELBO):
    """``Trace_ELBO`` whose reparameterised guide sites contribute ``_guide_term(site)``.

    ``_guide_term`` returns ``(value, surrogate)``: scalar estimates of that site's ``E_q[log q]``, the first
    reported as the loss, the second differentiated. Other guide sites (observed, score-function) are
    treated exactly as by ``Trace_ELBO``. ``kl_particles`` (positive int, default 1): each reparameterised
    latent site's ``log p(z)`` and guide term average over that many draws (see the module docstring);
    the other keyword arguments are ``Trace_ELBO``'s.
    """

    def __init__(self, *args: Any, kl_particles: int = 1, **kwargs: Any) -> None:
        check_positive_ints(kl_particles=kl_particles)
        super().__init__(*args, **kwargs)
        self.kl_particles = kl_particles

    def _guide_term(self, site: Site) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _differentiable_loss_particle(self, model_trace: Trace, guide_trace: Trace) -> tuple[float, Tensor]:
        elbo: float = 0.0
        surrogate: Tensor | float = 0.0
        log_r = None
        extra = kl_particle_sites(model_trace, guide_trace, self.kl_particles)
        k = self.kl_particles
        for name, site in model_trace.nodes.items():
            if site["type"] == "sample":
                log_p = site["log_prob_sum"]
                if name in extra:
                    log_p = (log_p + extra[name][0]["log_prob_sum"]) / k
                elbo = elbo + torch_item(log_p)
                surrogate = surrogate + log_p
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if _is_reparameterized(site):
                value, site_surrogate = self._guide_term(site)
                if name in extra:
                    extra_value, extra_surrogate = self._guide_term(extra[name][1])
                    value, site_surrogate = (value + extra_value) / k, (site_surrogate + extra_surrogate) / k
                elbo = elbo - torch_item(value)
                surrogate = surrogate - site_surrogate
                continue
            _, score_function_term, entropy_term = site["score_parts"]
            elbo = elbo - torch_item(site["log_prob_sum"])
            if not is_identically_zero(entropy_term):
                surrogate = surrogate - entropy_term.sum()
            if not is_identically_zero(score_function_term):
                if log_r is None:
                    log_r = _compute_log_r(model_trace, guide_trace)
                downstream = log_r.sum_to(site["cond_indep_stack"])
                surrogate = surrogate + (downstream * score_function_term).sum()
        return -elbo, -surrogate

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The estimate this class reports (``-ELBO`` with its guide terms), averaged over particles."""
        with torch.no_grad():
            loss = sum(
                self._differentiable_loss_particle(model_trace, guide_trace)[0]
                for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs)
            ) / self.num_particles
        warn_if_nan(loss, "loss")
        return loss


class MC_ELBO(_GuideTermELBO):
    """Full Monte Carlo ``-E_q[log p(x, z) - log q(z)]``: ``Trace_ELBO``'s value and gradient for
    reparameterised guides, plus the ``kl_particles`` option."""

    def _guide_term(self, site: Site) -> tuple[Tensor, Tensor]:
        return site["log_prob_sum"], site["log_prob_sum"]


class HybridEntropyELBO(_GuideTermELBO):
    """``loss = -E_q[log p(x, z)] - H(q)``: Monte Carlo for the model, the analytic entropy for each
    reparameterised guide site that has one (see :func:`analytic_entropy`; honours the site's plate /
    ``poutine.scale`` scale and ``poutine.mask`` mask). Sites without an analytic entropy fall back to
    ``Trace_ELBO``'s ``-log q(z)``. For Gaussian ``q`` the gradient equals ``Trace_ELBO``'s sample by sample;
    only the reported value (VITS's estimator) differs.
    """

    def _guide_term(self, site: Site) -> tuple[Tensor, Tensor]:
        entropy = analytic_entropy(site["fn"])
        if entropy is None:
            return site["log_prob_sum"], site["log_prob_sum"]
        neg_entropy = -scale_and_mask(entropy, site["scale"], site["mask"]).sum()
        return neg_entropy, neg_entropy


class STL_ELBO(_GuideTermELBO):
    """Sticking-the-landing ELBO: the same value as ``Trace_ELBO``; the surrogate uses ``log q(z)`` with
    detached distribution parameters (:func:`detach_distribution`), dropping the zero-mean score term.
    The guide gradient is then exactly 0 when ``q`` equals the posterior."""

    def _guide_term(self, site: Site) -> tuple[Tensor, Tensor]:
        return site["log_prob_sum"], _stl_log_prob(site).sum()


def _align(weights: Tensor, batch_dim: int, event_dim: int) -> Tensor:
    """Right-align ``weights`` (plate dims, keepdim) with a site value's ``batch + event`` shape."""
    while weights.dim() > batch_dim:
        if weights.shape[0] != 1:
            raise ValueError(f"importance weights {tuple(weights.shape)} do not fit a site's batch dims")
        weights = weights[0]
    return weights.reshape(weights.shape + (1,) * event_dim)


class IWAE_DReG(RenyiELBO):
    """Importance-weighted bound ``E[log (1/K) sum_k w_k]`` with ``w_k = p(x, z_k) / q(z_k)`` and
    ``K = num_particles``, with doubly reparameterised guide gradients
    ``sum_k w~_k^2 (d log w_k / dz_k) (dz_k / dphi)`` (``w~``: normalised weights; ``log q`` with detached
    parameters) and the usual ``sum_k w~_k d log w_k / dtheta`` for model parameters. It is
    ``RenyiELBO(alpha=0)`` (same traces, same ``loss``: weights per position of the plates shared by all
    sample sites, e.g. per utterance) with another gradient estimator. Needs reparameterised guide sites.
    """

    def __init__(
        self,
        num_particles: int = 2,
        max_plate_nesting: float = float("inf"),
        vectorize_particles: bool = False,
        strict_enumeration_warning: bool = True,
    ) -> None:
        super().__init__(
            alpha=0,
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            strict_enumeration_warning=strict_enumeration_warning,
        )

    def _log_weights(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> tuple[Tensor, Tensor, int, list[tuple[Site, int | None]]]:
        """``(log_w, surrogate_log_w, particle_dim, guide_sites)``: ``log_w`` detached, with the full
        ``log q``; the surrogate with STL ``log q``; ``guide_sites`` pairs each reparameterised site with its
        particle index (None when vectorised)."""
        vectorized = self.vectorize_particles and self.num_particles > 1
        log_ws, surrogates, sites = [], [], []
        for k, (model_trace, guide_trace) in enumerate(self._get_traces(model, guide, args, kwargs)):
            plate_sum = _plate_sum(get_dependent_plate_dims(model_trace.nodes.values()))
            log_w: Tensor | float = 0.0
            surrogate: Tensor | float = 0.0
            for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
                for site in trace.nodes.values():
                    if site["type"] != "sample":
                        continue
                    log_w = log_w + sign * plate_sum(site["log_prob"].detach())
                    if sign > 0:
                        surrogate = surrogate + plate_sum(site["log_prob"])
                    elif _is_reparameterized(site):
                        surrogate = surrogate - plate_sum(_stl_log_prob(site))
                        sites.append((site, None if vectorized else k))
                    else:
                        raise NotImplementedError(
                            f"IWAE_DReG needs reparameterised guide sites; {site['name']!r} is not"
                        )
            log_ws.append(torch.as_tensor(log_w))
            surrogates.append(torch.as_tensor(surrogate))
        if vectorized:
            return log_ws[0], surrogates[0], -self.max_plate_nesting, sites
        shape = torch.broadcast_shapes(*(w.shape for w in log_ws))
        log_w, surrogate = (torch.stack([t.expand(shape) for t in ts]) for ts in (log_ws, surrogates))
        return log_w, surrogate, -log_w.dim(), sites

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> Tensor:
        """``-`` bound, whose backward gives the DReG gradient (gradient hooks on the guide samples scale
        their incoming gradient by ``w~``)."""
        log_w, surrogate, dim, sites = self._log_weights(model, guide, args, kwargs)
        weights = torch.softmax(log_w, dim)
        for site, k in sites:
            value = site["value"]
            if value.requires_grad:
                w = weights if k is None else weights.select(dim, k)
                event_dim = len(site["fn"].event_shape)
                value.register_hook(_scale_by(_align(w, value.dim() - event_dim, event_dim)))
        bound = (torch.logsumexp(log_w, dim) - math.log(self.num_particles)).sum()
        surrogate_bound = (weights * surrogate).sum()
        return -(bound + surrogate_bound - surrogate_bound.detach())

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        loss_value = torch_item(loss)
        warn_if_nan(loss_value, "loss")
        return loss_value


def _plate_sum(sum_dims: list[int]) -> Callable[[Tensor], Tensor]:
    def plate_sum(log_prob: Tensor) -> Tensor:
        dims = [d for d in sum_dims if d >= -log_prob.dim()]
        return log_prob.sum(dims, keepdim=True) if dims else log_prob

    return plate_sum


def _scale_by(weights: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda grad: grad * weights


ELBOS: dict[str, type[ELBO]] = {
    "trace": Trace_ELBO, "vits": HybridEntropyELBO, "stl": STL_ELBO, "iwae_dreg": IWAE_DReG,
}
"""The ELBO classes by name (the KL *estimators* on tensors are :mod:`pyro_vits.kl.estimators`' registry)."""


KL_PARTICLE_ELBOS: dict[str, type[ELBO]] = {"trace": MC_ELBO, "vits": HybridEntropyELBO, "stl": STL_ELBO}
"""The classes :func:`make_elbo` builds for ``kl_particles > 1`` (``trace``: :class:`MC_ELBO`, the same
estimator as ``Trace_ELBO``); ``iwae_dreg`` weights whole particles and has no separate KL term."""


def make_elbo(elbo: str = "trace", particles: int = 1, vectorize: bool = True,
              kl_particles: int = 1) -> ELBO:
    """The ELBO named ``elbo`` (a key of :data:`ELBOS`) with ``particles`` particles per step and
    ``max_plate_nesting=1``: ``trace`` (``Trace_ELBO``), ``vits`` (:class:`HybridEntropyELBO`, VITS's
    analytic-entropy estimator), ``stl``, ``iwae_dreg``. ``kl_particles > 1`` averages each particle's KL
    term over that many draws through the prior only (:data:`KL_PARTICLE_ELBOS`; not for ``iwae_dreg``);
    ``kl_particles=1`` gives exactly the plain class."""
    if elbo not in ELBOS:
        raise ValueError(f"elbo must be one of {tuple(ELBOS)}, got {elbo!r}")
    check_positive_ints(particles=particles, kl_particles=kl_particles)
    if kl_particles == 1:
        return ELBOS[elbo](num_particles=particles, vectorize_particles=vectorize, max_plate_nesting=1)
    if elbo not in KL_PARTICLE_ELBOS:
        raise ValueError(f"kl_particles > 1 needs an ELBO in {tuple(KL_PARTICLE_ELBOS)}, "
                         f"got {elbo!r}")
    return KL_PARTICLE_ELBOS[elbo](num_particles=particles, vectorize_particles=vectorize,
                                   max_plate_nesting=1, kl_particles=kl_particles)
