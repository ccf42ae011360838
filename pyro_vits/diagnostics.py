"""Diagnostics of variational estimators: gradient mean, variance and signal-to-noise ratio."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyro
import torch
from pyro.infer import ELBO

__all__ = ["GradientStats", "gradient_stats"]

ParamSelector = str | Callable[[str], bool]


@dataclass(frozen=True)
class GradientStats:
    """Statistics of one parameter group's loss gradient over ``num_repeats`` independent estimates.

    Arrays are over the group's ``P`` flattened coordinates (parameters in ``names`` order, each flattened
    row-major, gradients w.r.t. the param store's *unconstrained* values, of the loss = ``-ELBO``):
    ``mean``, ``variance`` (ddof=1), ``mcse = sqrt(variance / num_repeats)`` and ``snr = |mean| / std``
    (``inf`` where the variance is 0 and the mean is not, ``nan`` where both are). Scalars:
    ``mean_snr``: mean of ``snr`` over coordinates with positive variance (``nan`` if none);
    ``mean_norm = ||mean||``; ``total_variance = sum(variance)`` (trace of the covariance);
    ``norm_snr = mean_norm / sqrt(total_variance)``, the SNR of the gradient as a vector.
    """

    names: tuple[str, ...]
    num_repeats: int
    mean: np.ndarray
    variance: np.ndarray
    mcse: np.ndarray
    snr: np.ndarray
    mean_snr: float
    mean_norm: float
    total_variance: float
    norm_snr: float


def _matcher(selector: ParamSelector, group: str) -> Callable[[str], bool]:
    if isinstance(selector, str):
        return lambda name: name.startswith(selector)
    if callable(selector):
        return selector
    raise TypeError(f"param_groups[{group!r}] must be a name prefix (str) or a predicate, got {selector!r}")


def _flat_grad(param: torch.Tensor) -> np.ndarray:
    grad = torch.zeros_like(param) if param.grad is None else param.grad
    return grad.detach().cpu().double().numpy().ravel()


def _stats(names: tuple[str, ...], grads: np.ndarray) -> GradientStats:
    """``grads (R, P)`` -> :class:`GradientStats`."""
    repeats = grads.shape[0]
    mean, variance = grads.mean(0), grads.var(0, ddof=1)
    std = np.sqrt(variance)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.abs(mean) / std
        mean_norm, total_variance = float(np.linalg.norm(mean)), float(variance.sum())
        norm_snr = mean_norm / np.sqrt(total_variance)
    positive = variance > 0
    mean_snr = float(snr[positive].mean()) if positive.any() else float("nan")
    return GradientStats(
        names, repeats, mean, variance, np.sqrt(variance / repeats), snr, mean_snr, mean_norm, total_variance,
        float(norm_snr),
    )


def gradient_stats(
    model: Callable,
    guide: Callable,
    elbo: ELBO,
    *args: Any,
    num_repeats: int,
    param_groups: Mapping[str, ParamSelector],
    seed: int = 0,
    **kwargs: Any,
) -> dict[str, GradientStats]:
    """Run ``elbo.loss_and_grads(model, guide, *args, **kwargs)`` ``num_repeats`` times (parameters fixed,
    fresh samples each time) and summarise each group's gradient (:class:`GradientStats`).

    ``param_groups`` maps a group name to a Pyro param-store name prefix or a predicate on names (e.g.
    ``{"flow": "flow$$$", "guide": lambda n: n.startswith("m_q")}``); a parameter may be in several groups.
    Comparing ``elbo``s with 1 and K particles measures what K buys. Parameters are created on the first
    call if needed; a parameter that gets no gradient in a repeat counts as 0. The torch RNG is seeded
    with ``seed`` inside a forked RNG state (the global state is left as it was) and the ``.grad`` of
    param-store tensors is reset to None on return.
    """
    if not isinstance(num_repeats, int) or num_repeats < 2:
        raise ValueError(f"num_repeats must be an int >= 2, got {num_repeats!r}")
    if not isinstance(param_groups, Mapping) or not param_groups:
        raise TypeError("param_groups must be a non-empty mapping of group name -> prefix or predicate")
    matchers = {group: _matcher(selector, group) for group, selector in param_groups.items()}
    store = pyro.get_param_store()
    rows: list[dict[str, np.ndarray]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(num_repeats):
            for _, param in store.named_parameters():
                param.grad = None
            elbo.loss_and_grads(model, guide, *args, **kwargs)
            rows.append({name: _flat_grad(p) for name, p in store.named_parameters()})
    for _, param in store.named_parameters():
        param.grad = None
    result = {}
    for group, matches in matchers.items():
        names = tuple(name for name in rows[-1] if matches(name))
        if not names:
            raise ValueError(f"param_groups[{group!r}] matches no parameter of {list(rows[-1])}")
        grads = np.stack(
            [np.concatenate([row.get(n, np.zeros_like(rows[-1][n])) for n in names]) for row in rows]
        )
        result[group] = _stats(names, grads)
    return result
