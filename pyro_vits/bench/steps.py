"""One training step of VITS's KL term, written by hand (VITS) and as a Pyro program, in the variants the
benchmark times: K vectorised or sequential particles, K KL particles, validation off, one torch optimiser,
and the flow run per particle.

Every step is a callable without arguments that runs zero-grad, forward, backward and an optimiser step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro.infer import ELBO, SVI, Trace_ELBO
from torch import Tensor
from torch.nn.utils import parametrize

from ..distributions.flow_prior import FlowPrior
from ..distributions.masked_normal import MaskedNormal
from ..flows import ResidualCouplingBlock, flatten_leading
from ..infer.elbo import MC_ELBO
from .problem import OPTIM, Problem, SpecBatch, raw_loss, vits_posterior

__all__ = [
    "Step",
    "RawStep",
    "PyroStep",
    "TorchOptimStep",
    "RowChunkedCouplingBlock",
    "make_model_guide",
    "with_row_chunked_flow",
    "without_validation",
]

Step = Callable[[], Any]


class RawStep:
    """Hand-written VITS KL step: zero_grad, [encoder,] forward, backward, ``torch.optim.Adam`` step."""

    def __init__(self, prob: Problem) -> None:
        self.prob = prob
        if prob.encoder is not None:
            params = [*prob.flow.parameters(), *prob.encoder.parameters()]
        else:
            self.m_q = prob.m_q0.clone().requires_grad_()
            self.logs_q = prob.logs_q0.clone().requires_grad_()
            params = [*prob.flow.parameters(), self.m_q, self.logs_q]
        self.opt = torch.optim.Adam(params, **OPTIM)

    def __call__(self) -> Tensor:
        p = self.prob
        self.opt.zero_grad(set_to_none=True)
        if p.encoder is not None:
            m_q, logs_q = vits_posterior(p.encoder, p.x, p.mask)
        else:
            m_q, logs_q = self.m_q, self.logs_q
        loss = raw_loss(p.flow, m_q, logs_q, p.m_p, p.logs_p, p.mask, torch.randn_like(m_q))
        loss.backward()
        self.opt.step()
        return loss.detach()


def make_model_guide(prob: Problem, prefix: str = "") -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    """Minimal Pyro model/guide taking ``(m_p, logs_p, mask)``: ``z ~ FlowPrior`` under a batch plate and
    ``z ~ MaskedNormal(m_q, exp(logs_q), mask)``. ``prefix`` names the free guide's tensors (one pair per
    step); the modules are registered as ``"<guide>.flow"`` / ``"<guide>.enc_q"``."""
    flow, B, encoder = prob.flow, prob.B, prob.encoder
    spec = SpecBatch(prob.x, prob.mask) if encoder is not None else None

    def model(m_p: Tensor, logs_p: Tensor, mask: Tensor) -> Tensor:
        pyro.module(prob.guide + ".flow", flow)
        with pyro.plate("batch", B, dim=-1):
            return pyro.sample("z", FlowPrior(m_p, logs_p, flow, mask))

    def guide(m_p: Tensor, logs_p: Tensor, mask: Tensor) -> Tensor:
        if encoder is not None:
            pyro.module(prob.guide + ".enc_q", encoder)
            m_q, logs_q = encoder.posterior(spec)  # once per call: vectorised particles share it
        else:
            m_q = pyro.param(prefix + "m_q", lambda: prob.m_q0.clone())
            logs_q = pyro.param(prefix + "logs_q", lambda: prob.logs_q0.clone())
        with pyro.plate("batch", B, dim=-1):
            return pyro.sample("z", MaskedNormal(m_q, torch.exp(logs_q), mask))

    return model, guide


class PyroStep:
    """``SVI.step`` with ``pyro.optim.Adam`` and ``Trace_ELBO(num_particles=K, vectorize_particles=...)``,
    or, with ``kl_particles > 1``, :class:`~pyro_vits.infer.elbo.MC_ELBO` (the same estimator) with one particle
    and ``kl_particles`` draws for the KL term."""

    def __init__(self, prob: Problem, num_particles: int = 1, vectorize: bool = False, name: str = "",
                 kl_particles: int = 1) -> None:
        self.prob = prob
        self.model, self.guide = make_model_guide(prob, prefix=name + "." if name else "")
        self.elbo: ELBO = (
            Trace_ELBO(num_particles=num_particles, vectorize_particles=vectorize, max_plate_nesting=1)
            if kl_particles == 1 else
            MC_ELBO(num_particles=num_particles, vectorize_particles=vectorize, max_plate_nesting=1,
                    kl_particles=kl_particles)
        )
        self.svi = SVI(self.model, self.guide, pyro.optim.Adam(dict(OPTIM)), self.elbo)

    def __call__(self) -> float:
        p = self.prob
        return self.svi.step(p.m_p, p.logs_p, p.mask)


class TorchOptimStep:
    """``Trace_ELBO.differentiable_loss`` + one ``torch.optim.Adam`` over all parameters
    (``zero_grad(set_to_none=True)``), instead of SVI's per-parameter optimisers."""

    def __init__(self, prob: Problem, name: str = "topt") -> None:
        self.prob = prob
        self.model, self.guide = make_model_guide(prob, prefix=name + ".")
        self.elbo = Trace_ELBO(max_plate_nesting=1)
        with pyro.poutine.trace(param_only=True) as tr:
            self.guide(prob.m_p, prob.logs_p, prob.mask)
            self.model(prob.m_p, prob.logs_p, prob.mask)
        params = [site["value"].unconstrained() for site in tr.trace.nodes.values()]
        self.opt = torch.optim.Adam(params, **OPTIM)

    def __call__(self) -> Tensor:
        p = self.prob
        self.opt.zero_grad(set_to_none=True)
        loss = self.elbo.differentiable_loss(self.model, self.guide, p.m_p, p.logs_p, p.mask)
        loss.backward()
        self.opt.step()
        return loss.detach()


def without_validation(step: Step) -> Step:
    """``step`` run under ``pyro.validation_enabled(False)`` (Pyro's checks and torch's distribution
    argument checks, including the mask scan of ``MaskedNormal``, are off)."""
    def run() -> Any:
        with pyro.validation_enabled(False):
            return step()

    return run


class RowChunkedCouplingBlock(ResidualCouplingBlock):
    """A :class:`ResidualCouplingBlock` whose ``forward_and_logdet`` runs the flattened leading rows in
    chunks of the mask's own rows (the data batch B: K vectorised particles of B sequences become K calls
    of B rows instead of one of K*B), under ``parametrize.cached()`` so that each weight-normed conv's weight
    is computed once per call. Same values and gradients; only the convolutions' batch size differs."""

    def forward_and_logdet(self, x: Tensor, x_mask: Tensor | None = None, g: Tensor | None = None,
                           reverse: bool = False) -> tuple[Tensor, Tensor]:
        if x_mask is None:
            return super().forward_and_logdet(x, x_mask, g, reverse)
        rows = math.prod(x_mask.shape[:-2])
        h, mask, g, lead = flatten_leading(x, x_mask, g)
        if not 0 < rows < h.shape[0]:
            return super().forward_and_logdet(x, x_mask, g, reverse)
        ys, logdets = [], []
        with parametrize.cached():
            for i in range(0, h.shape[0], rows):
                g_i = None if g is None else g[i: i + rows]
                y, ld = super().forward_and_logdet(h[i: i + rows], mask[i: i + rows], g_i, reverse)
                ys.append(y)
                logdets.append(ld)
        y, logdet = torch.cat(ys), torch.cat(logdets)
        return y.reshape(lead + y.shape[-2:]), logdet.reshape(lead)


def with_row_chunked_flow(prob: Problem) -> Problem:
    """``prob`` with its flow replaced by a :class:`RowChunkedCouplingBlock` holding a copy of its weights."""
    chunked = RowChunkedCouplingBlock(**prob.flow.config).to(prob.device)
    chunked.load_state_dict(prob.flow.state_dict())
    return dataclasses.replace(prob, flow=chunked, guide=prob.guide + "_rowchunked")
