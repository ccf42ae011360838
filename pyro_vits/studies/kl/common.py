"""What every sweep shares: :class:`Sweep` (numbers + InferenceData + tables), seeded chunked estimator
draws, ArviZ summaries over seeds, and means with t-intervals."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ... import _arviz_compat
from ...infer import diagnostics
from ...kl import sample_kl_estimates
from .config import D64, StudyConfig

__all__ = ["Draws", "Sweep", "col", "by_seed", "summary", "mean_ci", "t_quantile", "solve_increasing",
           "chunked_estimates", "z_score"]

Draws = dict[str, np.ndarray]


@dataclass
class Sweep:
    """One sweep's outcome: ``results`` (JSON-able numbers with MCSEs and units), ``inference_data``
    (netCDF stem -> InferenceData, seeds as chains) and ``tables`` (table stem -> ``az.summary`` frame)."""

    results: dict[str, Any]
    inference_data: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    def add_draws(
        self, stem: str, draws: Draws, config: StudyConfig, dims: Mapping[str, list[str]] | None = None,
        coords: Mapping[str, Any] | None = None, table: bool = True,
    ) -> None:
        """Store ``draws`` ``{name: (seed, draw, ...)}`` as InferenceData ``stem`` (``posterior`` group, the
        config as attributes) and, with ``table``, its ArviZ summary."""
        idata = diagnostics.sweep_to_inference_data(draws, dims=dims, coords=coords,
                                                    config={"sweep": stem, "config": config.to_dict()})
        self.inference_data[stem] = idata
        if table:
            self.tables[stem] = diagnostics.summary_table(idata)

    def draws(self, stem: str) -> dict[str, np.ndarray]:
        """The ``posterior`` arrays of InferenceData ``stem``."""
        data = _arviz_compat.group(self.inference_data[stem], "posterior")
        return {str(name): data[name].values for name in data.data_vars}


def col(*values: float) -> Tensor:
    """One frame of ``len(values)`` channels: ``(C, 1)`` float64."""
    return torch.tensor(values, dtype=D64).reshape(-1, 1)


def by_seed(draws: list[Tensor]) -> np.ndarray:
    """Per-seed tensors stacked as a ``(seed, ...)`` float64 array."""
    return torch.stack(draws).detach().cpu().double().numpy()


def summary(arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """ArviZ mean/sd/MCSE/ESS/R-hat of each ``(seed, draw)`` array of i.i.d. draws (seeds as chains)."""
    keep = ("mean", "sd", "mcse_mean", "ess_bulk", "r_hat")
    out = {}
    for name, x in arrays.items():
        table = diagnostics.summary_table(diagnostics.sweep_to_inference_data({"x": x}))
        out[name] = {k: float(table.loc["x", k]) for k in keep}
    return out


def solve_increasing(f: Callable[[float], float], target: float, *, iterations: int) -> float:
    """The ``x >= 0`` where the increasing ``f`` reaches ``target``: double ``[0, 1]`` until it brackets the
    target, then ``iterations`` bisection steps; returns the last bracket's midpoint."""
    lo, hi = 0.0, 1.0
    while f(hi) < target:
        lo, hi = hi, 2 * hi
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return 0.5 * (lo + hi)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on its CDF, computed by
    the trapezoid rule on the density; accurate to ~1e-6 for ``df >= 1``, ``0.5 < p < 0.9995``)."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError(f"need 0.5 <= p < 1 and df >= 1, got p={p}, df={df}")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        t = np.linspace(0.0, x, 20001)
        density = np.exp(log_norm - (df + 1) / 2 * np.log1p(t * t / df))
        return 0.5 + float(np.sum((density[1:] + density[:-1]) / 2) * (t[1] - t[0]))

    return solve_increasing(cdf, p, iterations=50)


def mean_ci(values: Any) -> dict[str, float]:
    """Mean over seeds, its standard error (sd / sqrt(n)) and the 95 % t-interval half-width
    (``ci95 = t_{0.975, n-1} se``) with ``n`` the number of seeds."""
    x = np.asarray(values, dtype=float)
    se = float(x.std(ddof=1) / math.sqrt(x.size))
    return {"mean": float(x.mean()), "se": se, "ci95": t_quantile(0.975, x.size - 1) * se, "n": int(x.size)}


def z_score(measured: float, theory: float, se: float) -> float | None:
    """``(measured - theory) / se``; None when ``se`` is 0."""
    return (measured - theory) / se if se > 0 else None


def chunked_estimates(
    names: tuple[str, ...], m_q: Tensor, logs_q: Tensor, prior: Any, num: int, seed: int,
    elements: int = 1 << 22,
) -> dict[str, Tensor]:
    """:func:`~pyro_vits.kl.estimators.sample_kl_estimates` in seeded chunks of about ``elements`` latent
    elements (bounded memory): ``{name: (num, ...)}``."""
    chunk = max(1, elements // m_q.numel())
    parts = [sample_kl_estimates(names, m_q, logs_q, prior, min(chunk, num - start), seed=seed * 7919 + i)
             for i, start in enumerate(range(0, num, chunk))]
    return {name: torch.cat([p[name] for p in parts]) for name in names}
