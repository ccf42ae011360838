#!/usr/bin/env python
"""Cost of the Pyro formulation of VITS's KL step against the hand-written step, and of K particles.

    python benchmarks/run.py [--device cpu|cuda|auto] [--quick] [--repeats N] [--out PATH] [--ablations]

Every configuration is measured in the same process, interleaved: each round runs every configuration
once in a (seeded) shuffled order, and the raw/Pyro K=1 pair in A-B-B-A order, after warm-up steps.
Ratios are computed per round and summarised by their median, so slow drift of a shared machine
cancels out. Absolute times are reported but never judged. Memory is measured in one fresh subprocess
per K (peak RSS growth over a step on CPU, ``torch.cuda.max_memory_allocated`` on CUDA), and a leak
check runs 1,000 small steps in a subprocess (RSS at step 100 vs step 1,000).

The Pyro step is ``SVI(model, guide, pyro.optim.Adam, Trace_ELBO(num_particles=K))`` with
``model: z ~ FlowPrior(m_p, logs_p, flow, mask)`` and ``guide: z ~ MaskedNormal(m_q, exp(logs_q), mask)``
under ``pyro.plate`` over the batch. The raw step is VITS's ``kl_loss`` written from its formula on the
same flow weights and batch. Both are minimal and written here (no project estimators are used).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import multiprocessing
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.infer import SVI, Trace_ELBO  # noqa: E402

from pyro_vits.flows import ResidualCouplingBlock  # noqa: E402
from pyro_vits.prior import FlowPrior, MaskedNormal  # noqa: E402

__all__ = [
    "FULL_SIZE",
    "QUICK_SIZE",
    "Problem",
    "make_problem",
    "vits_kl_sum",
    "raw_loss",
    "make_model_guide",
    "RawStep",
    "PyroStep",
    "main",
]

# VITS prior flow (configs/ljs_base.json: inter/hidden 192, kernel 5, dilation 1, 4 WN layers, 4 flows).
FULL_SIZE = dict(channels=192, hidden=192, kernel_size=5, dilation_rate=1, n_layers=4, n_flows=4, T=200, B=8)
# Tiny sizes for --quick (the test) and for the 1,000-step leak check.
QUICK_SIZE = dict(channels=8, hidden=16, kernel_size=3, dilation_rate=1, n_layers=2, n_flows=2, T=24, B=3)
# Smallest flow for the 1,000-step leak check (the per-step cost is then mostly Pyro's own).
LEAK_SIZE = dict(channels=4, hidden=4, kernel_size=3, dilation_rate=1, n_layers=1, n_flows=1, T=8, B=2)
PARTICLES = (1, 2, 4, 8)
# VITS's optimiser hyper-parameters (AdamW there; Adam here, identical in both steps).
OPTIM = dict(lr=2e-4, betas=(0.8, 0.99), eps=1e-9)
LEAK_STEPS = (100, 1000)
RSS_LINEAR_SLACK = 1.10  # growth(K) <= 1.10 * K * growth(1)
MEMORY_SLACK_BYTES = 1024 * 1024  # absolute slack for the linear-growth check (RSS page noise)
LEAK_TOLERANCE_BYTES = 4 * 1024 * 1024
LEAK_MAX_OBJECTS = 100


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)


# --------------------------------------------------------------------------------------------------
# Problem, raw VITS step, Pyro step
# --------------------------------------------------------------------------------------------------


@dataclass
class Problem:
    flow: ResidualCouplingBlock
    mask: torch.Tensor  # (B, 1, T) 0/1, variable lengths
    m_p: torch.Tensor  # (B, C, T) prior stats (fixed inputs, as if from the text encoder)
    logs_p: torch.Tensor
    m_q0: torch.Tensor  # (B, C, T) initial posterior stats (learnable in both steps)
    logs_q0: torch.Tensor
    size: dict
    device: torch.device

    @property
    def B(self) -> int:
        return self.size["B"]


def make_problem(size: dict, device: str | torch.device = "cpu", seed: int = 0) -> Problem:
    """Flow with VITS's layout, a batch of B sequences of variable length (longest = T), seeded."""
    device = torch.device(device)
    seed_all(seed)
    flow = ResidualCouplingBlock(
        size["channels"],
        size["hidden"],
        size["kernel_size"],
        size["dilation_rate"],
        size["n_layers"],
        n_flows=size["n_flows"],
    )
    # VITS zero-initialises each coupling's `post` conv (the flow starts as identity + flips); give it
    # small weights so the flow is non-trivial (costs are identical, the correctness check is stronger).
    with torch.no_grad():
        for layer in flow.flows[::2]:
            layer.post.weight.normal_(0.0, 0.02)
            layer.post.bias.normal_(0.0, 0.02)
    flow = flow.to(device)
    B, C, T = size["B"], size["channels"], size["T"]
    lengths = torch.randint(max(1, T // 2), T + 1, (B,))
    lengths[0] = T
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float32)[:, None, :]
    m_p = torch.randn(B, C, T)
    logs_p = 0.1 * torch.randn(B, C, T)
    m_q0 = m_p + 0.5 * torch.randn(B, C, T)
    logs_q0 = -0.5 + 0.1 * torch.randn(B, C, T)
    to = lambda x: x.to(device)  # noqa: E731
    return Problem(flow, to(mask), to(m_p), to(logs_p), to(m_q0), to(logs_q0), dict(size), device)


def vits_kl_sum(
    z_p: torch.Tensor, logs_q: torch.Tensor, m_p: torch.Tensor, logs_p: torch.Tensor, z_mask: torch.Tensor
) -> torch.Tensor:
    """VITS ``losses.kl_loss`` times ``sum(z_mask)``: the masked sum of the per-element KL terms."""
    kl = logs_p - logs_q - 0.5
    kl = kl + 0.5 * ((z_p - m_p) ** 2) * torch.exp(-2.0 * logs_p)
    return torch.sum(kl * z_mask)


def raw_loss(
    flow: ResidualCouplingBlock,
    m_q: torch.Tensor,
    logs_q: torch.Tensor,
    m_p: torch.Tensor,
    logs_p: torch.Tensor,
    mask: torch.Tensor,
    eps: torch.Tensor,
) -> torch.Tensor:
    """VITS's posterior sample ``z = (m_q + eps * exp(logs_q)) * mask``, ``z_p = flow(z)``, summed KL."""
    z = (m_q + eps * torch.exp(logs_q)) * mask
    z_p = flow(z, mask)
    return vits_kl_sum(z_p, logs_q, m_p, logs_p, mask)


class RawStep:
    """Hand-written VITS KL step: zero_grad, forward, backward, ``torch.optim.Adam`` step."""

    def __init__(self, prob: Problem) -> None:
        self.prob = prob
        self.m_q = prob.m_q0.clone().requires_grad_()
        self.logs_q = prob.logs_q0.clone().requires_grad_()
        self.opt = torch.optim.Adam([*prob.flow.parameters(), self.m_q, self.logs_q], **OPTIM)

    def __call__(self) -> torch.Tensor:
        p = self.prob
        self.opt.zero_grad(set_to_none=True)
        eps = torch.randn_like(self.m_q)
        loss = raw_loss(p.flow, self.m_q, self.logs_q, p.m_p, p.logs_p, p.mask, eps)
        loss.backward()
        self.opt.step()
        return loss.detach()


def make_model_guide(prob: Problem, prefix: str = "") -> tuple[Callable, Callable]:
    """Minimal Pyro model/guide: ``z ~ FlowPrior`` under a batch plate; ``z ~ MaskedNormal`` guide."""
    flow, B = prob.flow, prob.B

    def model(m_p: torch.Tensor, logs_p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pyro.module("flow", flow)
        with pyro.plate("batch", B, dim=-1):
            return pyro.sample("z", FlowPrior(m_p, logs_p, flow, mask))

    def guide(m_p: torch.Tensor, logs_p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m_q = pyro.param(prefix + "m_q", lambda: prob.m_q0.clone())
        logs_q = pyro.param(prefix + "logs_q", lambda: prob.logs_q0.clone())
        with pyro.plate("batch", B, dim=-1):
            return pyro.sample("z", MaskedNormal(m_q, torch.exp(logs_q), mask))

    return model, guide


class PyroStep:
    """``SVI.step`` with ``Trace_ELBO(num_particles=K, vectorize_particles=...)`` and ``pyro.optim.Adam``."""

    def __init__(
        self, prob: Problem, num_particles: int = 1, vectorize: bool = False, name: str = ""
    ) -> None:
        self.prob = prob
        self.model, self.guide = make_model_guide(prob, prefix=name + "." if name else "")
        self.elbo = Trace_ELBO(
            num_particles=num_particles, vectorize_particles=vectorize, max_plate_nesting=1
        )
        self.svi = SVI(self.model, self.guide, pyro.optim.Adam(dict(OPTIM)), self.elbo)

    def __call__(self) -> float:
        p = self.prob
        return self.svi.step(p.m_p, p.logs_p, p.mask)


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    return {
        "device": {
            "type": device.type,
            "name": device_name(device),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "pyro": pyro.__version__,
            "numpy": np.__version__,
            "cuda": torch.version.cuda,
        },
        "platform": platform.platform(),
        "pyro_validation": pyro.infer.util.is_validation_enabled(),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], n: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / n


# --------------------------------------------------------------------------------------------------
# Memory: one subprocess per K; leak check
# --------------------------------------------------------------------------------------------------


def _proc_status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_hwm() -> bool:
    """Reset VmHWM (peak RSS) to the current RSS (Linux >= 4.0, ``clear_refs`` value 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _saved_tensor_bytes(step: Callable[[], Any]) -> int:
    """Bytes of distinct storages autograd saves for backward during one step (device independent)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[(s.data_ptr(), s.nbytes())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return int(sum(seen.values()))


def _memory_worker(size: dict, device: torch.device, k: int, seed: int) -> dict:
    prob = make_problem(size, device, seed)
    pyro.clear_param_store()
    step = PyroStep(prob, num_particles=k, vectorize=True)
    for _ in range(2):  # Adam states, grads, allocator caches
        step()
    gc.collect()
    out: dict[str, Any] = {"k": k}
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(2):
            step()
        _sync(device)
        out.update(base_bytes=base, peak_bytes=torch.cuda.max_memory_allocated(device))
    else:
        hwm_reset = _reset_hwm()
        base = _proc_status_kb("VmRSS") * 1024
        hwm_before = _proc_status_kb("VmHWM") * 1024
        for _ in range(2):
            step()
        out.update(
            base_bytes=base,
            peak_bytes=_proc_status_kb("VmHWM") * 1024,
            hwm_reset=hwm_reset,
            hwm_before_bytes=hwm_before,
        )
    out["growth_bytes"] = out["peak_bytes"] - out["base_bytes"]
    out["autograd_saved_bytes"] = _saved_tensor_bytes(step)
    return out


def _leak_worker(size: dict, device: torch.device, seed: int) -> dict:
    prob = make_problem(size, device, seed)
    pyro.clear_param_store()
    step = PyroStep(prob, num_particles=1)
    samples = {}
    t0 = time.perf_counter()
    for i in range(1, LEAK_STEPS[-1] + 1):
        step()
        if i % 100 == 0:
            gc.collect()
            rec = {"rss_bytes": _proc_status_kb("VmRSS") * 1024, "gc_objects": len(gc.get_objects())}
            if device.type == "cuda":
                rec["cuda_allocated_bytes"] = torch.cuda.memory_allocated(device)
            samples[str(i)] = rec
    a, b = samples[str(LEAK_STEPS[0])], samples[str(LEAK_STEPS[1])]
    out = {
        "steps": LEAK_STEPS[-1],
        "size": size,
        "samples": samples,
        "rss_growth_bytes": b["rss_bytes"] - a["rss_bytes"],
        "gc_objects_growth": b["gc_objects"] - a["gc_objects"],
        "param_store_size": len(pyro.get_param_store()),
        "wall_s": time.perf_counter() - t0,
    }
    if device.type == "cuda":
        out["cuda_growth_bytes"] = b["cuda_allocated_bytes"] - a["cuda_allocated_bytes"]
    return out


def _worker_cmd(
    kind: str, size: dict, device: torch.device, seed: int, k: int, threads: int | None
) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", kind, "--_size", json.dumps(size)]
    cmd += ["--device", device.type, "--seed", str(seed), "--_k", str(k)]
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd


def _set_malloc_thresholds() -> None:
    """glibc: fixed 128 KiB mmap/trim thresholds (what MALLOC_MMAP_THRESHOLD_ does for a fresh process)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 131072)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 131072)  # M_TRIM_THRESHOLD


def _run_worker(kind: str, size: dict, device: torch.device, seed: int, k: int) -> dict:
    if kind == "mem":
        return _memory_worker(size, device, k, seed)
    if kind == "leak":
        return _leak_worker(size, device, seed)
    raise ValueError(f"unknown worker {kind}")


def _forked_entry(
    conn: Any, kind: str, size: dict, device: str, seed: int, k: int, threads: int | None
) -> None:
    try:
        _set_malloc_thresholds()
        if threads:
            torch.set_num_threads(threads)
        conn.send(("ok", _run_worker(kind, size, torch.device(device), seed, k)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        import traceback

        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def start_workers(specs: list[tuple[str, int]], size_for: dict[str, dict], device: torch.device, seed: int,
                  threads: int | None = None, quick: bool = False) -> Callable[[], list[dict]]:
    """Run ``(kind, K)`` workers, one subprocess each; returns a function collecting their results.

    Full mode: fresh interpreters, one at a time, started when collected (after the timing), with glibc's
    mmap threshold fixed at 128 KiB so that freed tensors are unmapped and leave the RSS. Quick mode on
    CPU: all are forked now, before this process has run any torch op (so no OpenMP pool exists yet),
    and run concurrently with the timing, which saves one interpreter start per worker.
    """
    if quick and device.type == "cpu" and "fork" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("fork")
        forked = []
        for kind, k in specs:
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_forked_entry,
                args=(send, kind, size_for[kind], device.type, seed, k, threads),
                daemon=True,
            )
            proc.start()
            send.close()
            forked.append((proc, recv))

        def collect_forked() -> list[dict]:
            outs = []
            for (kind, k), (proc, recv) in zip(specs, forked):
                try:
                    status, payload = recv.recv()
                except EOFError:
                    status, payload = "error", "worker exited without a result"
                proc.join()
                if status != "ok":
                    raise RuntimeError(f"worker {kind} K={k} failed (exit {proc.exitcode}):\n{payload}")
                outs.append(payload)
            return outs

        return collect_forked

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    cmds = [_worker_cmd(kind, size_for[kind], device, seed, k, threads) for kind, k in specs]

    def collect() -> list[dict]:
        outs = []
        for (kind, k), cmd in zip(specs, cmds):
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"worker {kind} K={k} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
            outs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        return outs

    return collect


# --------------------------------------------------------------------------------------------------
# Timing rounds
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _patched(validation: bool = True, mask_check: bool = True, grads_to_none: bool = False):
    """Local monkeypatches standing for proposed changes (restored on exit; pyro_vits is not edited).

    ``validation=False``: ``pyro.enable_validation(False)`` (Pyro checks and torch distribution args).
    ``mask_check=False``: ``MaskedNormal`` skips ``check_mask``'s 0/1 scan (a host sync on CUDA), as it
    would if it honoured the global validation flag. ``grads_to_none=True``: SVI leaves ``p.grad = None``
    after the optimiser step instead of allocating zeros (then backward writes grads instead of adding).
    """
    import pyro.infer.util as infer_util

    import pyro_vits.prior as prior_mod

    prev_val = infer_util.is_validation_enabled()
    prev_dist = torch.distributions.Distribution._validate_args
    prev_check, prev_zero = prior_mod.check_mask, infer_util.zero_grads
    try:
        if not validation:
            pyro.enable_validation(False)
        if not mask_check:
            prior_mod.check_mask = lambda mask, like, name="mask": mask.to(like.dtype)
        if grads_to_none:

            def zero_grads(tensors: Any) -> None:
                for t in tensors:
                    t.grad = None

            infer_util.zero_grads = zero_grads
        yield
    finally:
        pyro.enable_validation(prev_val)
        torch.distributions.Distribution.set_default_validate_args(prev_dist)
        prior_mod.check_mask, infer_util.zero_grads = prev_check, prev_zero


def _patched_step(step: Callable[[], Any], **patches: bool) -> Callable[[], Any]:
    def run() -> Any:
        with _patched(**patches):
            return step()

    return run


def _torch_optim_step(prob: Problem, name: str = "topt") -> Callable[[], Any]:
    """Trace_ELBO.differentiable_loss + one torch.optim.Adam over all params, ``zero_grad(set_to_none)``."""
    model, guide = make_model_guide(prob, prefix=name + ".")
    elbo = Trace_ELBO(max_plate_nesting=1)
    with pyro.poutine.trace(param_only=True) as tr:
        guide(prob.m_p, prob.logs_p, prob.mask)
        model(prob.m_p, prob.logs_p, prob.mask)
    params = [site["value"].unconstrained() for site in tr.trace.nodes.values()]
    opt = torch.optim.Adam(params, **OPTIM)

    def run() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = elbo.differentiable_loss(model, guide, prob.m_p, prob.logs_p, prob.mask)
        loss.backward()
        opt.step()
        return loss.detach()

    return run


# name -> (description, factory); each is the K=1 Pyro step with one proposed change (or all of them)
ABLATIONS: dict[str, tuple[str, Callable[[Problem], Callable[[], Any]]]] = {
    "abl_noval": (
        "pyro.enable_validation(False)",
        lambda p: _patched_step(PyroStep(p, name="abl_noval"), validation=False),
    ),
    "abl_nomaskcheck": (
        "MaskedNormal skips the 0/1 mask scan",
        lambda p: _patched_step(PyroStep(p, name="abl_nomaskcheck"), mask_check=False),
    ),
    "abl_gradsnone": (
        "SVI sets grads to None instead of zeros",
        lambda p: _patched_step(PyroStep(p, name="abl_gradsnone"), grads_to_none=True),
    ),
    "abl_torchoptim": (
        "differentiable_loss + one torch.optim.Adam (set_to_none)",
        lambda p: _torch_optim_step(p, name="abl_torchoptim"),
    ),
    "abl_lean": (
        "all of the above",
        lambda p: _patched_step(_torch_optim_step(p, name="abl_lean"), validation=False, mask_check=False),
    ),
}


def measure(
    prob: Problem, repeats: int, warmup: int, inner: int, seed: int, ablations: bool = False
) -> tuple[dict[str, list[float]], dict[tuple[str, str], list[float]]]:
    """Interleaved timing rounds.

    Each round runs a seeded shuffle of blocks; inside a block the compared steps run back to back:
    ``raw | pyro_k1`` and ``pyro_k1 | ablation`` as A-B-B-A (B-A-A-B on odd rounds), and for each K
    ``pyro_k1, vec_kK, seq_kK, pyro_k1`` (vec/seq swapped on odd rounds). Returns per-config per-round
    seconds/step (mean of the round's measurements) and the within-block ratios per round.
    """
    device = prob.device
    pyro.clear_param_store()
    configs: dict[str, Callable[[], Any]] = {"raw": RawStep(prob), "pyro_k1": PyroStep(prob, 1, name="k1")}
    for k in PARTICLES:
        configs[f"vec_k{k}"] = PyroStep(prob, k, vectorize=True, name=f"vec{k}")
        if k > 1:
            configs[f"seq_k{k}"] = PyroStep(prob, k, vectorize=False, name=f"seq{k}")
    if ablations:
        for name, (_, factory) in ABLATIONS.items():
            configs[name] = factory(prob)
    for _ in range(warmup):
        for fn in configs.values():
            fn()
    _sync(device)

    blocks: list[tuple[str, ...]] = [("pyro_k1", "raw"), ("vec_k1", "pyro_k1")]
    blocks += [(f"vec_k{k}", f"seq_k{k}") for k in PARTICLES[1:]]
    if ablations:
        blocks += [(name, "pyro_k1") for name in ABLATIONS]
    times: dict[str, list[float]] = {name: [] for name in configs}
    paired: dict[tuple[str, str], list[float]] = {}

    def add(num: str, den: str, value: float) -> None:
        paired.setdefault((num, den), []).append(value)

    rng = random.Random(seed)
    for r in range(repeats):
        rng.shuffle(blocks)
        round_t: dict[str, list[float]] = {name: [] for name in configs}
        for a, b in blocks:
            if a.startswith("vec_k") and b.startswith("seq_k"):
                mid = [a, b] if r % 2 == 0 else [b, a]
                seq = ["pyro_k1", *mid, "pyro_k1"]
            else:
                seq = [a, b, b, a] if r % 2 == 0 else [b, a, a, b]
            t = {name: [] for name in set(seq)}
            for name in seq:
                t[name].append(_time(configs[name], inner, device))
                round_t[name].append(t[name][-1])
            mean = {name: statistics.fmean(v) for name, v in t.items()}
            if "seq" in b:
                add(a, "pyro_k1", mean[a] / mean["pyro_k1"])
                add(b, "pyro_k1", mean[b] / mean["pyro_k1"])
                add(a, b, mean[a] / mean[b])
            else:
                add(a, b, mean[a] / mean[b])
        for name, v in round_t.items():
            times[name].append(statistics.fmean(v))
        line = ", ".join(f"{a}/{b} {v[-1]:.3f}" for (a, b), v in list(paired.items())[:4])
        print(f"  round {r + 1}/{repeats}: {line} ...", flush=True)
    return times, paired


def _ratio(
    times: dict[str, list[float]],
    paired: dict[tuple[str, str], list[float]],
    num: str,
    den: str,
    description: str,
) -> dict:
    if (num, den) in paired:
        per_round = paired[(num, den)]
    else:
        per_round = [a / b for a, b in zip(times[num], times[den])]
    return {
        "numerator": num,
        "denominator": den,
        "description": description,
        "paired": (num, den) in paired,
        "repeats": per_round,
        "median": statistics.median(per_round),
        "ratio_of_medians": statistics.median(times[num]) / statistics.median(times[den]),
    }


def profile_steps(prob: Problem, steps: int = 3, top: int = 20) -> dict:
    """torch.profiler self CPU time per op and step, raw vs Pyro K=1, sorted by the difference."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if prob.device.type == "cuda" else [])
    pyro.clear_param_store()
    steps_by_name = {"raw": RawStep(prob), "pyro_k1": PyroStep(prob, 1, name="prof")}
    per_op: dict[str, dict[str, tuple[float, float]]] = {}
    totals: dict[str, float] = {}
    for name, fn in steps_by_name.items():
        fn()
        fn()
        _sync(prob.device)
        with profile(activities=activities) as prof:
            for _ in range(steps):
                fn()
            _sync(prob.device)
        events = prof.key_averages()
        per_op[name] = {e.key: (e.self_cpu_time_total / steps, e.count / steps) for e in events}
        totals[name] = sum(e.self_cpu_time_total for e in events) / steps
    keys = set(per_op["raw"]) | set(per_op["pyro_k1"])
    rows = []
    for key in keys:
        r_us, r_n = per_op["raw"].get(key, (0.0, 0.0))
        p_us, p_n = per_op["pyro_k1"].get(key, (0.0, 0.0))
        rows.append({"op": key, "extra_us": p_us - r_us, "raw_us": r_us, "pyro_us": p_us, "raw_calls": r_n,
                     "pyro_calls": p_n})
    rows.sort(key=lambda row: -row["extra_us"])
    return {
        "steps": steps,
        "self_cpu_us_per_step": totals,
        "top_extra_ops": rows[:top],
        "top_saved_ops": sorted(rows, key=lambda row: row["extra_us"])[:5],
    }


def _target(
    name: str, description: str, value: float | None, threshold: float, op: str, applicable: bool
) -> dict:
    ok = None
    if applicable and value is not None and math.isfinite(value):
        ok = bool(value <= threshold) if op == "<=" else bool(value < threshold)
    return {
        "name": name,
        "description": description,
        "value": value,
        "op": op,
        "threshold": threshold,
        "applicable": applicable,
        "pass": ok,
    }


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    p.add_argument("--quick", action="store_true", help="tiny sizes (for tests); ratios are not meaningful")
    p.add_argument("--repeats", type=int, default=None, help="timing rounds (default 7, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per config (default 2, quick 1)")
    p.add_argument("--inner", type=int, default=None, help="steps per timed call (1 on CPU, 5 on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's; 1 if --quick)"
    )
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>.json)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-K memory subprocesses")
    p.add_argument("--no-leak", action="store_true", help="skip the 1,000-step leak check")
    p.add_argument(
        "--ablations", action="store_true", help="also time K=1 variants standing for proposed changes"
    )
    p.add_argument("--profile", action="store_true", help="torch.profiler per-op comparison, raw vs Pyro K=1")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_size", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_k", type=int, default=1, help=argparse.SUPPRESS)
    return p


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:8.1f} MiB"


def main(argv: Sequence[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    device = resolve_device(args.device)
    threads = args.threads or (1 if args.quick and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    if args._worker:
        res = _run_worker(args._worker, json.loads(args._size), device, args.seed, args._k)
        print(json.dumps(res))
        return res

    t_start = time.perf_counter()
    size = QUICK_SIZE if args.quick else FULL_SIZE
    repeats = args.repeats or (3 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    inner = args.inner or (5 if device.type == "cuda" else 1)
    out_path = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"{device.type}.json"

    result: dict[str, Any] = {
        "schema": 1,
        "mode": "quick" if args.quick else "full",
        **environment(device),
        "size": size,
        "particles": list(PARTICLES),
        "repeats": repeats,
        "warmup": warmup,
        "inner_steps": inner,
        "seed": args.seed,
        "optimizer": {k: list(v) if isinstance(v, tuple) else v for k, v in OPTIM.items()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_start": list(os.getloadavg()),
    }
    print(f"device: {result['device']['name']} ({device.type}, {torch.get_num_threads()} threads)")
    print(f"torch {torch.__version__}, pyro {pyro.__version__}; size {size}")
    print(f"{repeats} rounds, {warmup} warm-up steps per config")

    specs = [] if args.no_memory else [("mem", k) for k in PARTICLES]
    specs += [] if args.no_leak else [("leak", 1)]
    # quick mode: workers run concurrently with the (then meaningless) timing to keep the test short
    collect_workers = start_workers(
        specs, {"mem": size, "leak": LEAK_SIZE}, device, args.seed, threads, quick=args.quick
    )
    prob = make_problem(size, device, args.seed)
    seed_all(args.seed)
    times, paired = measure(prob, repeats, warmup, inner, args.seed, ablations=args.ablations)
    if args.profile:
        print("profile: torch.profiler, raw vs Pyro K=1 ...", flush=True)
        result["profile"] = profile_steps(prob)
    result["timings"] = {
        name: {"repeats_s": ts, "median_s": statistics.median(ts)} for name, ts in times.items()
    }

    def ratio(num: str, den: str, description: str) -> dict:
        return _ratio(times, paired, num, den, description)

    ratios = {"pyro_k1_over_raw": ratio("pyro_k1", "raw", "Pyro SVI step (K=1) / raw VITS KL step")}
    for k in PARTICLES:
        ratios[f"vec_k{k}_over_k1"] = ratio(f"vec_k{k}", "pyro_k1", f"vectorised K={k} / K=1 step")
    for k in PARTICLES[1:]:
        ratios[f"seq_k{k}_over_k1"] = ratio(f"seq_k{k}", "pyro_k1", f"sequential K={k} / K=1 step")
        ratios[f"vec_over_seq_k{k}"] = ratio(f"vec_k{k}", f"seq_k{k}", f"vectorised / sequential, K={k}")
    if args.ablations:
        for name, (desc, _) in ABLATIONS.items():
            ratios[f"{name}_over_k1"] = ratio(name, "pyro_k1", f"K=1 with {desc} / K=1 default")
            ratios[f"{name}_over_raw"] = ratio(name, "raw", f"K=1 with {desc} / raw (unpaired)")
    result["ratios"] = ratios

    cpu, cuda = device.type == "cpu", device.type == "cuda"
    targets = [
        _target(
            "pyro_step_overhead",
            "Pyro Trace_ELBO K=1 SVI step <= 1.05x the raw VITS KL step",
            ratios["pyro_k1_over_raw"]["median"],
            1.05,
            "<=",
            True,
        ),
        _target(
            "vectorised_k4_cpu",
            "vectorised K=4 step <= 3.2x the K=1 step (CPU)",
            ratios["vec_k4_over_k1"]["median"],
            3.2,
            "<=",
            cpu,
        ),
        _target(
            "vectorised_k8_gpu",
            "vectorised K=8 step <= 2.8x the K=1 step (GPU)",
            ratios["vec_k8_over_k1"]["median"],
            2.8,
            "<=",
            cuda,
        ),
    ]
    for k in PARTICLES[1:]:
        targets.append(
            _target(
                f"vectorised_beats_sequential_k{k}",
                f"vectorised K={k} faster than sequential K={k}",
                ratios[f"vec_over_seq_k{k}"]["median"],
                1.0,
                "<",
                True,
            )
        )

    if specs:
        print(f"memory/leak: {len(specs)} subprocesses ...", flush=True)
        outs = collect_workers()
    if not args.no_memory:
        per_k = {str(o["k"]): o for o in outs[: len(PARTICLES)]}
        g1 = per_k["1"]["growth_bytes"]
        s1 = per_k["1"]["autograd_saved_bytes"]
        result["memory"] = {
            "method": (
                "torch.cuda.max_memory_allocated - memory_allocated over 2 steps after 2 warm-up steps"
                if cuda
                else "VmHWM - VmRSS over 2 steps after 2 warm-up steps (VmHWM reset via "
                "/proc/self/clear_refs; MALLOC_MMAP_THRESHOLD_=131072 so freed tensors leave the RSS); "
                "one subprocess per K"
            ),
            "mode": "vectorised",
            "linear_bound": (
                f"growth(K) <= {RSS_LINEAR_SLACK} * K * growth(1) + {MEMORY_SLACK_BYTES // 2**20} MiB"
            ),
            "per_k": per_k,
        }
        for k in PARTICLES[1:]:
            m = per_k[str(k)]
            gk = m["growth_bytes"]
            bound = RSS_LINEAR_SLACK * k * max(g1, 0) + MEMORY_SLACK_BYTES
            m["growth_over_k1"] = gk / g1 if g1 > 0 else None
            m["autograd_saved_over_k1"] = m["autograd_saved_bytes"] / s1 if s1 > 0 else None
            targets.append(
                _target(
                    f"memory_linear_k{k}",
                    f"peak memory growth at K={k} / ({RSS_LINEAR_SLACK} * {k} * growth at K=1 + "
                    f"{MEMORY_SLACK_BYTES // 2**20} MiB)",
                    gk / bound,
                    1.0,
                    "<=",
                    True,
                )
            )
    if not args.no_leak:
        leak = outs[-1]
        result["leak"] = leak
        growth = leak["cuda_growth_bytes"] if cuda else leak["rss_growth_bytes"]
        targets.append(
            _target(
                "no_memory_growth_1000_steps",
                f"{'CUDA allocated' if cuda else 'RSS'} growth (bytes) "
                f"from step {LEAK_STEPS[0]} to {LEAK_STEPS[1]} "
                f"<= {LEAK_TOLERANCE_BYTES // 2**20} MiB (one-off allocator growth of ~2 MiB is seen on CPU)",
                float(growth),
                float(LEAK_TOLERANCE_BYTES),
                "<=",
                True,
            )
        )
        targets.append(
            _target(
                "no_python_object_growth_1000_steps",
                f"live Python objects (gc) growth from step {LEAK_STEPS[0]} to {LEAK_STEPS[1]} "
                f"< {LEAK_MAX_OBJECTS} (a per-step leak would add >= {LEAK_STEPS[1] - LEAK_STEPS[0]})",
                float(leak["gc_objects_growth"]),
                float(LEAK_MAX_OBJECTS),
                "<",
                True,
            )
        )

    result["targets"] = targets
    applicable = [t for t in targets if t["applicable"]]
    result["all_applicable_pass"] = all(t["pass"] for t in applicable)
    result["loadavg_end"] = list(os.getloadavg())
    result["wall_s"] = time.perf_counter() - t_start

    _print_report(result)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path}")
    return result


def _print_report(res: dict) -> None:
    print()
    print(f"{'config':<22}{'median s/step':>14}")
    for name, t in res["timings"].items():
        print(f"{name:<22}{t['median_s']:>14.4f}")
    print()
    print(f"{'ratio':<26}{'median':>8}{'min':>8}{'max':>8}")
    for name, r in res["ratios"].items():
        print(f"{name:<26}{r['median']:>8.3f}{min(r['repeats']):>8.3f}{max(r['repeats']):>8.3f}")
    if "memory" in res:
        print()
        print(f"{'K':>3}{'peak growth':>16}{'autograd saved':>18}")
        for k, m in res["memory"]["per_k"].items():
            print(f"{k:>3}{_fmt_bytes(m['growth_bytes']):>16}{_fmt_bytes(m['autograd_saved_bytes']):>18}")
    if "profile" in res:
        prof = res["profile"]
        tot = prof["self_cpu_us_per_step"]
        print(
            f"\nprofile (self CPU per step): raw {tot['raw'] / 1e3:.1f} ms, "
            f"pyro {tot['pyro_k1'] / 1e3:.1f} ms"
        )
        print(f"{'op':<44}{'extra ms':>9}{'calls raw/pyro':>16}")
        for row in prof["top_extra_ops"][:12]:
            calls = f"{row['raw_calls']:g}/{row['pyro_calls']:g}"
            print(f"{row['op'][:43]:<44}{row['extra_us'] / 1e3:>9.2f}{calls:>16}")
    if "leak" in res:
        lk = res["leak"]
        growth = lk["rss_growth_bytes"] / 2**20
        print(
            f"\nleak: RSS step {LEAK_STEPS[0]}->{LEAK_STEPS[1]}: {growth:+.2f} MiB, "
            f"gc objects {lk['gc_objects_growth']:+d}"
        )
    print()
    for t in res["targets"]:
        flag = "n/a " if not t["applicable"] else ("PASS" if t["pass"] else "FAIL")
        value = "None" if t["value"] is None else f"{t['value']:.4g}"
        print(f"[{flag}] {t['name']:<34} {value} {t['op']} {t['threshold']:g}   ({t['description']})")


if __name__ == "__main__":
    main()
