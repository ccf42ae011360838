"""``torch.compile`` of the prior flow: forward + backward time against eager mode, and agreement."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from .._validate import first_line
from .problem import make_problem
from .timing import time_step

__all__ = ["compile_flow"]


def compile_flow(size: dict, device: torch.device, *, repeats: int, seed: int = 0, clock: str = "wall",
                 mode: str | None = None) -> dict[str, Any]:
    """Time ``forward_and_logdet`` + backward of the flow (``(B, C, T)`` posterior-like input, all parameters
    and the input get gradients) eagerly and through ``torch.compile(mode=mode)``, interleaved over
    ``repeats`` rounds; report the compile time, per-round ratios compiled / eager and the largest
    difference of outputs and gradients. A compile failure (no C++ compiler, an unsupported op) is
    reported under ``"error"``."""
    prob = make_problem(size, device, seed, "free")
    flow, mask = prob.flow, prob.mask
    params = list(flow.parameters())
    z0 = ((prob.m_q0 + torch.exp(prob.logs_q0) * torch.randn_like(prob.m_q0)) * mask).detach()

    def step(fn: Any) -> list[torch.Tensor]:
        z = z0.clone().requires_grad_()
        y, logdet = fn(z, mask)
        loss = (y * y).sum() + logdet.sum()
        return [y.detach(), *torch.autograd.grad(loss, [z, *params])]

    out: dict[str, Any] = {"what": "ResidualCouplingBlock.forward_and_logdet + backward", "mode": mode,
                           "torch": torch.__version__}
    try:
        compiled = torch.compile(flow.forward_and_logdet, mode=mode, dynamic=False)
        t0 = time.perf_counter()
        got = step(compiled)
        out["compile_s"] = time.perf_counter() - t0
    except Exception as err:  # noqa: BLE001 - the measurement reports why compile is not available
        out["error"] = first_line(err)
        return out
    expected = step(flow.forward_and_logdet)
    diffs = [float((a - b).abs().max()) for a, b in zip(got, expected)]
    scales = [float(b.abs().max()) for b in expected]
    out["max_abs_diff"] = max(diffs)
    out["max_rel_diff"] = max(d / s if s > 0 else d for d, s in zip(diffs, scales))
    out["match"] = all(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(s, 1.0))
                       for a, b, s in zip(got, expected, scales))
    eager_t, compiled_t, ratios = [], [], []
    for r in range(repeats):
        order = [("eager", flow.forward_and_logdet), ("compiled", compiled)]
        times = {}
        for name, fn in order if r % 2 == 0 else order[::-1]:
            times[name] = time_step(lambda fn=fn: step(fn), 1, device, clock)
        eager_t.append(times["eager"])
        compiled_t.append(times["compiled"])
        ratios.append(times["compiled"] / times["eager"])
    out.update(eager_s=statistics.median(eager_t), compiled_s=statistics.median(compiled_t),
               repeats=ratios, compiled_over_eager=statistics.median(ratios))
    return out
