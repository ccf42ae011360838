"""The NaN/Inf guard of an SVI step: is the step's loss and every gradient finite, and if not, which
parameters and which sample sites went non-finite (:class:`NonFiniteGuard`)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.optim.clipped_adam import ClippedAdam
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn

from .._device import cuda_devices
from .._validate import first_line
from ..infer.evaluate import _vectorised

__all__ = ["NonFiniteError", "NonFiniteGuard", "defers_checks", "grads_finite", "torch_rng"]

logger = logging.getLogger("pyro_vits.train")
Named = list[tuple[str, Tensor]]


class NonFiniteError(FloatingPointError):
    """A step's loss or gradient was NaN/Inf under ``nan_policy="stop"``; ``step`` is its number."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


def grads_finite(params: Sequence[Tensor]) -> bool:
    """One fused check that every gradient entry is finite (max-abs norms: a NaN/Inf entry propagates)."""
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.stack(torch._foreach_norm(grads, math.inf)).isfinite().all())


def _finite_on_device(loss: Tensor, params: Sequence[Tensor]) -> Tensor:
    """0-d bool tensor on the loss's device: the loss and every gradient entry are finite (no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    finite = torch.isfinite(loss)
    if grads:
        finite = finite & torch.stack(torch._foreach_norm(grads, math.inf)).isfinite().all()
    return finite


def defers_checks(dev: torch.device, policy: str) -> bool:
    """Whether :func:`~pyro_vits.train.fit` keeps each step's loss and finiteness on the device and reads them
    back only when it logs or checkpoints (:meth:`NonFiniteGuard.defer`): on CUDA under ``policy="stop"``,
    where a read-back per step stalls the GPU's queue. ``"skip"`` must decide every update, and on CPU the
    read-back costs nothing, so both keep the per-step check."""
    return dev.type == "cuda" and policy == "stop"


def torch_rng(dev: torch.device) -> list[Tensor]:
    """The torch (and CUDA) random states a step starts from, for re-tracing it."""
    return [torch.get_rng_state(), *([torch.cuda.get_rng_state(dev)] if dev.type == "cuda" else [])]


def _listed(names: Sequence[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _nonfinite_sites(model: nn.Module, guide: nn.Module, data: Any, subsample_size: int | None,
                     rng: list[Tensor], dev: torch.device, elbo: ELBO) -> str:
    """Re-trace a step with its random numbers (its first particle) and name the sample sites whose value
    or log-density is NaN/Inf."""
    k = elbo.num_particles if elbo.vectorize_particles else 1
    bad = []
    try:
        with torch.random.fork_rng(devices=cuda_devices(dev)), torch.no_grad():
            torch.set_rng_state(rng[0])
            if dev.type == "cuda":
                torch.cuda.set_rng_state(rng[1], dev)
            guide_trace = poutine.trace(_vectorised(guide, k)).get_trace(data, subsample_size=subsample_size)
            replayed = poutine.replay(_vectorised(model, k), trace=guide_trace)
            model_trace = poutine.trace(replayed).get_trace(data, subsample_size=subsample_size)
            for who, trace in (("guide", guide_trace), ("model", model_trace)):
                for name, site in trace.nodes.items():
                    if site["type"] != "sample" or site_is_subsample(site):
                        continue
                    if not bool(torch.isfinite(site["value"]).all()):
                        bad.append(f"{who} site {name!r} (its value)")
                    elif not bool(torch.isfinite(site["fn"].log_prob(site["value"])).all()):
                        bad.append(f"{who} site {name!r} (its log-density)")
    except Exception as err:  # a diagnosis only: report, never mask the original problem
        return f"re-tracing the step to find the site failed ({first_line(err)})"
    if not bad:
        return "no sample site is non-finite in a re-trace of the step"
    return f"non-finite sample sites: {_listed(bad)}"


def _nonfinite_report(step: int, loss: float, named: Named, sites: Callable[[], str]) -> str:
    """What went wrong at ``step``: the loss, parameters with non-finite values or gradients, the sites."""
    parts = [f"step {step}: loss = {loss}"]
    bad_values = [name for name, p in named if not bool(torch.isfinite(p).all())]
    if bad_values:
        parts.append(f"non-finite values in {_listed(bad_values)}")
    bad_grads = [name for name, p in named if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    if bad_grads:
        parts.append(f"non-finite gradient of {_listed(bad_grads)}")
    parts.append(sites())
    return "; ".join(parts)


class NonFiniteGuard:
    """Applies a step's update only when its loss and every gradient are finite (:meth:`step`); otherwise
    raises :class:`NonFiniteError` (``policy="stop"``) or drops the update with a warning (``"skip"``),
    naming the step, the parameters (``named``) and the sample sites of a re-trace of the step."""

    def __init__(self, model: nn.Module, guide: nn.Module, elbo: ELBO, named: Named, optim: ClippedAdam,
                 dev: torch.device, policy: str) -> None:
        self.model, self.guide, self.elbo, self.named = model, guide, elbo, named
        self.optim, self.dev, self.policy = optim, dev, policy
        self.params = [p for _, p in named]
        self._pending: list[tuple[int, Tensor, Tensor, tuple[Any, int | None], list[Tensor]]] = []

    def step(self, step: int, loss: float, step_args: tuple[Any, int | None], rng: list[Tensor],
             skipped: int, kept: str = "") -> bool:
        """``optim.step()`` and True when finite; else report step ``step`` (re-traced on ``step_args`` =
        ``(data, subsample_size)`` from the random states ``rng``), clear the gradients and raise (``kept``
        notes the intact checkpoint) or, under ``"skip"``, warn (``skipped`` steps so far) and return
        False. The caller clears the gradients after every step."""
        if math.isfinite(loss) and grads_finite(self.params):
            self.optim.step()
            return True
        report = _nonfinite_report(step, loss, self.named, lambda: _nonfinite_sites(
            self.model, self.guide, *step_args, rng, self.dev, self.elbo))
        self.optim.zero_grad(set_to_none=True)
        if self.policy == "stop":
            raise NonFiniteError(f"{report}; training stopped (nan_policy='stop'){kept}", step)
        logger.warning("%s; update skipped (nan_policy='skip', %d so far)", report, skipped + 1)
        return False

    def defer(self, step: int, loss: Tensor, step_args: tuple[Any, int | None], rng: list[Tensor]) -> None:
        """``optim.step()`` without reading anything back: the step's loss (a 0-d tensor) and whether it and
        every gradient are finite stay on the device until :meth:`flush` (``policy="stop"`` only)."""
        if self.policy != "stop":
            raise ValueError(f"deferred checks need nan_policy='stop', got {self.policy!r}")
        loss = torch.as_tensor(loss, device=self.dev).detach()
        self._pending.append((step, loss, _finite_on_device(loss, self.params), step_args, rng))
        self.optim.step()

    def flush(self, kept: str = "") -> list[float]:
        """The deferred steps' losses as floats (one read-back); raises :class:`NonFiniteError` naming the
        first non-finite step (its sites re-traced from its random states; the parameters are those after
        the steps since, as the run stops before any checkpoint)."""
        pending, self._pending = self._pending, []
        if not pending:
            return []
        rows = [torch.stack([loss.double(), ok.double()]) for _, loss, ok, _, _ in pending]
        values = torch.stack(rows).tolist()
        bad = next((i for i, (_, ok) in enumerate(values) if not ok), None)
        if bad is not None:
            step, loss, _, step_args, rng = pending[bad]
            report = _nonfinite_report(step, float(loss), self.named, lambda: _nonfinite_sites(
                self.model, self.guide, *step_args, rng, self.dev, self.elbo))
            raise NonFiniteError(f"{report}; training stopped at step {pending[-1][0]} "
                                 f"(nan_policy='stop'){kept}", step)
        return [loss for loss, _ in values]
