"""Mean-only couplings have log|det| = 0 (Q2); the cos flow's density (Q3 figure)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..._validate import check_positive_ints
from ...distributions.flow_prior import CosFlowPrior
from .common import col
from .config import COS_A, D64
from .quality import teacher_flow

__all__ = ["logdet_study", "cos_density_grid"]


def logdet_study(num_inputs: int = 4, channels: int = 4, frames: int = 6, seed: int = 0) -> dict:
    """``log|det J|`` of random VITS blocks at ``num_inputs`` random inputs ``(C, T)`` by autograd (the dense
    ``(C T) x (C T)`` Jacobian) against the block's own ``logdet``: exactly 0 for mean-only couplings,
    data-dependent for affine ones."""
    check_positive_ints(num_inputs=num_inputs, channels=channels, frames=frames)
    if channels % 2:
        raise ValueError(f"channels must be even (couplings split them in halves), got {channels}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_inputs, channels, frames, generator=gen, dtype=D64)
    out: dict[str, Any] = {"inputs": num_inputs, "shape": [channels, frames]}
    for name, mean_only in (("mean_only", True), ("affine", False)):
        flow = teacher_flow(channels, 8, kernel_size=3, mean_only=mean_only, seed=seed)
        autograd, reported = [], []
        for xi in x:
            jac = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0], xi)
            autograd.append(float(torch.linalg.slogdet(jac.reshape(channels * frames, -1))[1]))
            reported.append(float(flow.forward_and_logdet(xi[None])[1][0]))
        out[name] = {"autograd_logdet": autograd, "reported_logdet": reported,
                     "max_abs_difference": float(np.max(np.abs(np.subtract(autograd, reported))))}
    return out


def cos_density_grid(a: float = COS_A, num_points: int = 121, width: float = 3.5) -> dict[str, Any]:
    """Log-densities on a ``num_points``-square grid over ``[-width, width]^2`` of the cos-flow prior
    (``a``, standard-normal base) and of its Gaussian base: ``{"x": (P,), "log_prior": (P, P),
    "log_base": (P, P)}`` indexed ``[x1, x0]``."""
    check_positive_ints(num_points=num_points)
    if not width > 0:
        raise ValueError(f"width must be positive, got {width!r}")
    u = torch.linspace(-width, width, num_points, dtype=D64)
    x1, x0 = torch.meshgrid(u, u, indexing="ij")
    z = torch.stack([x0, x1], -1).reshape(-1, 2, 1)
    zero = col(0.0, 0.0)
    grids = {"x": u.numpy()}
    for key, amp in (("log_prior", a), ("log_base", 0.0)):
        grids[key] = CosFlowPrior(zero, zero, a=amp).log_prob(z).reshape(num_points, num_points).numpy()
    return grids
