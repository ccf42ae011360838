"""Interleaved timing of steps in one process, paired ratios per round, and a per-op profile difference.

Each round runs every block once, blocks in a seeded shuffled order; a block runs its steps back to back in
its order on even rounds and reversed on odd rounds (A-B-B-A pairs cancel drift). Ratios are computed per
round within a block and summarised by their median, so slow drift of a shared machine cancels out. With
one torch thread on CPU the ``"cpu"`` clock (this process's CPU seconds) is not inflated by preemption.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .steps import Step

__all__ = ["CLOCKS", "Block", "sync", "time_step", "measure", "ratio", "profile_difference"]

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
Key = tuple[str, str]  # (guide, configuration name)


@dataclass
class Block:
    """Steps of one guide timed back to back (``order``, reversed on odd rounds) and the ``pairs``
    ``(numerator, denominator)`` whose per-round ratios are recorded."""

    guide: str
    order: list[str]
    pairs: list[tuple[str, str]] = field(default_factory=list)


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(fn: Step, n: int, device: torch.device, clock: str = "wall") -> float:
    """Seconds per call of ``fn`` over ``n`` calls (device synchronised before and after)."""
    now = CLOCKS[clock]
    sync(device)
    t0 = now()
    for _ in range(n):
        fn()
    sync(device)
    return (now() - t0) / n


def measure(configs: Mapping[Key, Step], blocks: Sequence[Block], *, repeats: int, warmup: int, inner: int,
            seed: int, device: torch.device, clock: str = "wall", log: Callable[[str], Any] = print,
            ) -> tuple[dict[Key, list[float]], dict[tuple[str, str, str], list[float]]]:
    """Run ``warmup`` calls of every config, then ``repeats`` rounds of ``blocks``.

    Returns per config its per-round seconds/step (mean over the round's measurements) and, per
    ``(guide, numerator, denominator)``, the within-block ratio of every round.
    """
    for _ in range(warmup):
        for fn in configs.values():
            fn()
    sync(device)
    times: dict[Key, list[float]] = {key: [] for key in configs}
    paired: dict[tuple[str, str, str], list[float]] = {}
    order = list(blocks)
    rng = random.Random(seed)
    for r in range(repeats):
        rng.shuffle(order)
        round_t: dict[Key, list[float]] = {key: [] for key in configs}
        for block in order:
            seq = block.order if r % 2 == 0 else block.order[::-1]
            t: dict[str, list[float]] = {name: [] for name in seq}
            for name in seq:
                t[name].append(time_step(configs[(block.guide, name)], inner, device, clock))
                round_t[(block.guide, name)].append(t[name][-1])
            for num, den in block.pairs:
                value = statistics.fmean(t[num]) / statistics.fmean(t[den])
                paired.setdefault((block.guide, num, den), []).append(value)
        for key, values in round_t.items():
            if values:
                times[key].append(statistics.fmean(values))
        log(f"  round {r + 1}/{repeats} done")
    return times, paired


def ratio(times: Mapping[Key, list[float]], paired: Mapping[tuple[str, str, str], list[float]], guide: str,
          num: str, den: str, description: str) -> dict[str, Any]:
    """``num / den`` for ``guide``: per-round ratios (paired within a block when they were), their median
    and the ratio of the medians of the per-round times."""
    key = (guide, num, den)
    per_round = paired.get(key) or [a / b for a, b in zip(times[(guide, num)], times[(guide, den)])]
    return {
        "numerator": num,
        "denominator": den,
        "description": description,
        "paired": key in paired,
        "repeats": per_round,
        "median": statistics.median(per_round),
        "ratio_of_medians": statistics.median(times[(guide, num)]) / statistics.median(times[(guide, den)]),
    }


def profile_difference(steps: Mapping[str, Step], device: torch.device, calls: int = 3,
                       top: int = 15) -> dict[str, Any]:
    """``torch.profiler`` self CPU time per op and call of two steps ``{"base": fn, "other": fn}``, sorted by
    what ``other`` spends more (microseconds per step)."""
    from torch.profiler import ProfilerActivity, profile

    if sorted(steps) != ["base", "other"]:
        raise ValueError(f"steps must have the keys 'base' and 'other', got {sorted(steps)}")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    per_op: dict[str, dict[str, tuple[float, float]]] = {}
    totals: dict[str, float] = {}
    for name, fn in steps.items():
        fn()
        sync(device)
        with profile(activities=activities) as prof:
            for _ in range(calls):
                fn()
            sync(device)
        events = prof.key_averages()
        per_op[name] = {e.key: (e.self_cpu_time_total / calls, e.count / calls) for e in events}
        totals[name] = sum(e.self_cpu_time_total for e in events) / calls
    rows = []
    for op in set(per_op["base"]) | set(per_op["other"]):
        b_us, b_n = per_op["base"].get(op, (0.0, 0.0))
        o_us, o_n = per_op["other"].get(op, (0.0, 0.0))
        rows.append({"op": op, "extra_us": o_us - b_us, "base_us": b_us, "other_us": o_us, "base_calls": b_n,
                     "other_calls": o_n})
    rows.sort(key=lambda row: -row["extra_us"])
    return {"calls": calls, "self_cpu_us_per_step": totals, "top_extra_ops": rows[:top],
            "top_saved_ops": sorted(rows, key=lambda row: row["extra_us"])[:5]}
