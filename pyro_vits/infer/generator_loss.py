"""VITS's generator loss without its adversarial, feature-matching and duration terms, as a Pyro ``ELBO``
object that :func:`~pyro_vits.train.fit` trains with (the refit of :mod:`pyro_vits.models.refit`).

For a minibatch of ``B`` utterances with ``F_b`` valid frames (the latent site's frame mask)::

    L = -sum(observed log-factors) / F_b + batch_kl(estimator, kl_b, n_b)

The first term sums the model's observed sample sites (``pyro.factor`` sites included) *without* the
plate's subsampling scale ``N / B``; for the refit's ``recon`` factor (``-c_mel * l1_b * F_b / B`` per
utterance) it is ``c_mel * mean_b l1_b``, VITS's ``c_mel * F.l1_loss(y_mel, y_hat_mel)``. ``kl_b`` (nats per
utterance, ``(B,)``) is the registered KL estimator ``estimator``
(:data:`~pyro_vits.kl.estimators.ESTIMATORS`) of the latent site, with ``q`` the guide's
:class:`~pyro_vits.distributions.masked_normal.MaskedNormal` and ``p`` the model's
:class:`~pyro_vits.distributions.aligned.AlignedFlowPrior` aligned by MAS for *each draw*
(:class:`~pyro_vits.distributions.aligned.DrawAlignedPrior`: VITS's ``m_p, logs_p`` after ``attn``); the
batch reduction is :func:`~pyro_vits.kl.estimators.batch_kl`: VITS's ``kl_loss`` (``sum_b kl_b / sum_b
n_b``), clamped / made absolute for the ``clamp`` / ``abs`` fixes. With the ``vits`` estimator ``L`` is
exactly VITS's ``45 * l1 + kl_loss`` on the same draws.

``kl_particles = K``: ``kl_b`` averages the estimator over the guide's draw (the one the decoder sees) and
``K - 1`` more reparameterised draws of ``q`` through the flow and MAS only (no decoder); the batch reduction
applies to that average.

**Data parallel.** Under :class:`~pyro_vits.infer.distributed.DataParallel` each process holds a share of
the combined minibatch and its sites carry ``poutine.scale(share)``: ``L`` of its own utterances is then
multiplied by that share (read from the latent site's scale and plate), so the processes' gradients,
averaged, are the average of their ``L`` gradients — what VITS's DistributedDataParallel training does (each
GPU's ``kl_loss`` normalised by its own frames). Alone, the share is 1 and ``L`` is left as it is.

``shared_alignment=True``: the ``K - 1`` extra draws reuse the first draw's MAS
alignment instead of searching their own (cheaper; biased upward, since each draw's own path maximises its
prior density: the study measures by how much)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro.poutine as poutine
import torch
from pyro.infer import ELBO
from pyro.poutine import Trace
from torch import Tensor

from .._validate import check_positive_ints
from ..distributions.aligned import AlignedFlowPrior
from ..distributions.masked_normal import MaskedNormal
from ..kl.estimators import ESTIMATORS, batch_kl, kl_estimate

__all__ = ["VITSGeneratorLoss"]


class VITSGeneratorLoss(ELBO):
    """The module docstring's ``L`` (nats: per-frame KL plus ``c_mel``-weighted mel L1) for ``fit``.

    ``estimator``: a key of :data:`~pyro_vits.kl.estimators.ESTIMATORS`; ``kl_particles``: ``K >= 1``;
    ``latent``: the name of the sample site that is ``AlignedFlowPrior`` in the model and ``MaskedNormal``
    in the guide; ``shared_alignment``: see the module docstring. One particle per step
    (``num_particles = 1``)."""

    def __init__(self, estimator: str = "vits", kl_particles: int = 1, latent: str = "z",
                 shared_alignment: bool = False) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {tuple(ESTIMATORS)}, got {estimator!r}")
        check_positive_ints(kl_particles=kl_particles)
        super().__init__(num_particles=1, max_plate_nesting=1, vectorize_particles=False)
        self.estimator, self.kl_particles, self.latent = estimator, kl_particles, latent
        self.shared_alignment = bool(shared_alignment)

    def terms(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """``{"recon": 0-d, "kl": 0-d, "kl_per_utterance": (B,), "frames": (B,), "loss": 0-d}`` of one
        draw: ``loss = recon + kl`` (nats, the module docstring's normalisation)."""
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        prior, q = model_trace.nodes[self.latent]["fn"], guide_trace.nodes[self.latent]["fn"]
        if not isinstance(prior, AlignedFlowPrior) or not isinstance(q, MaskedNormal):
            raise TypeError(f"site {self.latent!r} must be an AlignedFlowPrior in the model and a MaskedNormal "
                            f"in the guide, got {type(prior).__name__} and {type(q).__name__}")
        frames = prior.mask.sum(dim=(-2, -1))
        est = ESTIMATORS[self.estimator]
        name = "vits" if est.batch_reduction is not None else self.estimator
        z = guide_trace.nodes[self.latent]["value"]
        per_utt = self._particles(name, z, q, prior)
        kl = batch_kl(self.estimator if est.batch_reduction is not None else "mean", per_utt, frames)
        recon = -sum(_observed_log_prob(site) for name, site in model_trace.nodes.items()
                     if site["type"] == "sample" and site["is_observed"] and name != self.latent)
        recon = recon / frames.sum()
        share = _share(model_trace, self.latent, z.shape[0])
        loss = recon + kl if share == 1.0 else share * (recon + kl)
        return dict(recon=recon, kl=kl, kl_per_utterance=per_utt, frames=frames, loss=loss)

    def _particles(self, name: str, z: Tensor, q: MaskedNormal, prior: AlignedFlowPrior) -> Tensor:
        """Per-utterance KL ``(B,)``: estimator ``name`` averaged over ``z (B, C, T)`` and the extra draws."""
        m_q, logs_q = q.loc, q.scale.log()
        if self.kl_particles == 1:
            return kl_estimate(name, z, m_q, logs_q, prior.for_draws(z), prior.mask)
        extra = q.rsample(torch.Size([self.kl_particles - 1]))
        if not self.shared_alignment:
            z = torch.cat([z.unsqueeze(0), extra])
            return kl_estimate(name, z, m_q, logs_q, prior.for_draws(z), prior.mask).mean(0)
        first = prior.for_draws(z)
        own = kl_estimate(name, z, m_q, logs_q, first, prior.mask)
        shared = kl_estimate(name, extra, m_q, logs_q, prior.for_draws(extra, first.path), prior.mask)
        return (own + shared.sum(0)) / self.kl_particles

    def _get_trace(self, model: Callable, guide: Callable, args: Any, kwargs: Any) -> Any:
        raise NotImplementedError("VITSGeneratorLoss traces in terms()")

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> Tensor:
        return self.terms(model, guide, *args, **kwargs)["loss"]

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return float(loss.detach())


def _share(trace: Trace, latent: str, batch: int) -> float:
    """This process's share of the combined minibatch: the latent site's scale divided by its plate's
    subsampling factor ``size / batch`` (``size`` from the plate's subsample site; 1 within 1e-9 is 1: one
    process)."""
    site = trace.nodes[latent]
    plates = [trace.nodes.get(f.name) for f in site["cond_indep_stack"] if f.vectorized]
    size = plates[0]["fn"].size if plates and plates[0] is not None else batch
    share = float(site["scale"]) * batch / size
    return 1.0 if abs(share - 1.0) < 1e-9 else share


def _observed_log_prob(site: dict) -> Tensor:
    """An observed site's summed log-density, masked (``poutine.mask``) but not scaled (``N / B``)."""
    log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    if site["mask"] is not None:
        log_p = torch.where(torch.as_tensor(site["mask"], dtype=torch.bool), log_p, 0.0)
    return log_p.sum()
