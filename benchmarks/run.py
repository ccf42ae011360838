#!/usr/bin/env python
"""Cost of the Pyro formulation of VITS's KL step against the hand-written step, and of K particles.

    python benchmarks/run.py [--device cpu|cuda|auto] [--guide encoder|free|both] [--quick] [--repeats N]
                             [--threads N] [--clock auto|wall|cpu] [--out PATH] [--ablations] [--profile]

Every configuration is measured in the same process, interleaved: each round runs every configuration
once in a (seeded) shuffled order, and the raw/Pyro K=1 pair in A-B-B-A order, after warm-up steps.
Ratios are computed per round and summarised by their median, so slow drift of a shared machine
cancels out; on CPU with one torch thread steps are timed in process CPU seconds, which preemption by
other jobs does not inflate. Absolute times are reported but never judged. Memory is measured in one
fresh subprocess per guide and K (peak RSS growth over a step on CPU, ``torch.cuda.max_memory_allocated``
on CUDA), and a leak check runs 1,000 small steps per guide in a subprocess (RSS and live objects at step
100 vs step 1,000).

The Pyro step is ``SVI(model, guide, pyro.optim.Adam, Trace_ELBO(num_particles=K))`` with
``model: z ~ FlowPrior(m_p, logs_p, flow, mask)`` under ``pyro.plate`` over the batch and one of two guides:

* ``encoder`` (VITS): ``m_q, logs_q = PosteriorEncoder(x)`` (``pyro_vits.guide.PosteriorEncoder``, VITS's
  ``enc_q``: 513 linear-spectrogram channels, 16 WN layers), ``z ~ MaskedNormal(m_q, exp(logs_q), mask)``.
  The encoder runs once per step whatever K: vectorised particles share its output (the particle plate
  broadcasts it), sequential particles rerun it K times.
* ``free``: ``m_q``/``logs_q`` are learnable ``(B, C, T)`` tensors; every particle's cost is the flow.

The raw step is VITS's ``kl_loss`` written from its formula on the same weights and batch (with the same
encoder for ``encoder``). Both are minimal and written here (no project estimators are used).
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
from pyro_vits.guide import PosteriorEncoder  # noqa: E402
from pyro_vits.prior import FlowPrior, MaskedNormal  # noqa: E402

__all__ = [
    "FULL_SIZE",
    "QUICK_SIZE",
    "GUIDES",
    "Problem",
    "make_problem",
    "vits_posterior",
    "vits_kl_sum",
    "raw_loss",
    "make_model_guide",
    "RawStep",
    "PyroStep",
    "main",
]

# VITS prior flow (configs/ljs_base.json: inter/hidden 192, kernel 5, dilation 1, 4 WN layers, 4 flows) and
# posterior encoder enc_q (513 = n_fft/2 + 1 linear-spectrogram channels, hidden 192, kernel 5, dilation 1,
# 16 WN layers; the encoder shares hidden/kernel/dilation with the flow, as in VITS).
FULL_SIZE = dict(channels=192, hidden=192, kernel_size=5, dilation_rate=1, n_layers=4, n_flows=4, T=200, B=8,
                 x_channels=513, enc_layers=16)
# Tiny sizes for --quick (the test) and for the leak check.
QUICK_SIZE = dict(channels=8, hidden=16, kernel_size=3, dilation_rate=1, n_layers=2, n_flows=2, T=24, B=3,
                  x_channels=10, enc_layers=2)
# Smallest flow for the leak check (the per-step cost is then mostly Pyro's own).
LEAK_SIZE = dict(channels=4, hidden=4, kernel_size=3, dilation_rate=1, n_layers=1, n_flows=1, T=8, B=2,
                 x_channels=4, enc_layers=1)
PARTICLES = (1, 2, 4, 8)
# K at which the vectorised step is also timed with the flow run per particle (_chunked_flow, a proposal)
CHUNKED_K = (8,)
# "encoder": VITS's amortised guide, run once per step; "free": learnable (B, C, T) m_q/logs_q tensors.
GUIDES = ("encoder", "free")
GUIDE_DESCRIPTIONS = {
    "encoder": "m_q, logs_q = PosteriorEncoder(x) (pyro_vits.guide, VITS enc_q: x_channels -> pre 1x1 -> WN "
               "(enc_layers) -> proj 1x1), computed once per step and shared by vectorised particles",
    "free": "m_q, logs_q learnable (B, C, T) tensors (no encoder): every particle's cost is the flow",
}
# VITS's optimiser hyper-parameters (AdamW there; Adam here, identical in both steps).
OPTIM = dict(lr=2e-4, betas=(0.8, 0.99), eps=1e-9)
LEAK_STEPS = (100, 1000)
QUICK_LEAK_STEPS = (40, 200)  # --quick (the test): a per-step object leak still adds >= 160
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
    m_q0: torch.Tensor  # (B, C, T) initial posterior stats (the free guide's learnable tensors)
    logs_q0: torch.Tensor
    size: dict
    device: torch.device
    guide: str = "free"
    encoder: PosteriorEncoder | None = None  # guide == "encoder": VITS's enc_q
    x: torch.Tensor | None = None  # (B, x_channels, T) linear spectrogram (encoder input), 0 on padding

    @property
    def B(self) -> int:
        return self.size["B"]


@dataclass
class SpecBatch:
    """What ``PosteriorEncoder.posterior`` reads from a batch: ``x (B, x_channels, T)`` and ``mask``.

    (``pyro_vits.model.Batch`` requires ``x`` to have the latent's shape ``(B, C, T)``; VITS's encoder reads
    a 513-channel spectrogram.)
    """

    x: torch.Tensor
    mask: torch.Tensor
    speaker: None = None

    @property
    def channels(self) -> int:
        return self.x.shape[1]


def make_problem(
    size: dict, device: str | torch.device = "cpu", seed: int = 0, guide: str = "free"
) -> Problem:
    """Flow with VITS's layout, a batch of B sequences of variable length (longest = T), seeded.

    ``guide="encoder"`` adds VITS's posterior encoder and a spectrogram ``x``; the flow, mask and
    prior/free-guide tensors are the same as for ``guide="free"`` with the same seed.
    """
    if guide not in GUIDES:
        raise ValueError(f"guide must be one of {GUIDES}, got {guide!r}")
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
    encoder = x = None
    if guide == "encoder":
        encoder = PosteriorEncoder(
            size["x_channels"], C, size["hidden"], size["kernel_size"], size["dilation_rate"],
            size["enc_layers"],
        ).to(device)
        # log-magnitude-like spectrogram values; only the shapes matter for the cost
        x = (torch.randn(B, size["x_channels"], T) * mask).to(device)
    to = lambda t: t.to(device)  # noqa: E731
    return Problem(
        flow, to(mask), to(m_p), to(logs_p), to(m_q0), to(logs_q0), dict(size), device, guide, encoder, x
    )


def vits_posterior(
    encoder: PosteriorEncoder, x: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """VITS ``PosteriorEncoder.forward`` up to the sample: ``pre -> mask -> WN -> proj -> mask -> split``."""
    h = encoder.pre(x) * mask
    h = encoder.enc(h, mask)
    stats = encoder.proj(h) * mask
    m_q, logs_q = torch.split(stats, encoder.channels, dim=1)
    return m_q, logs_q


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

    def __call__(self) -> torch.Tensor:
        p = self.prob
        self.opt.zero_grad(set_to_none=True)
        if p.encoder is not None:
            m_q, logs_q = vits_posterior(p.encoder, p.x, p.mask)
        else:
            m_q, logs_q = self.m_q, self.logs_q
        eps = torch.randn_like(m_q)
        loss = raw_loss(p.flow, m_q, logs_q, p.m_p, p.logs_p, p.mask, eps)
        loss.backward()
        self.opt.step()
        return loss.detach()


def make_model_guide(prob: Problem, prefix: str = "") -> tuple[Callable, Callable]:
    """Minimal Pyro model/guide: ``z ~ FlowPrior`` under a batch plate; ``z ~ MaskedNormal`` guide.

    ``prefix`` names the free guide's tensors (one pair per step object). The modules are registered
    under ``"<guide>.flow"`` / ``"<guide>.enc_q"``, so problems of both guides can share a param store.
    """
    flow, B, encoder = prob.flow, prob.B, prob.encoder
    spec = SpecBatch(prob.x, prob.mask) if encoder is not None else None

    def model(m_p: torch.Tensor, logs_p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pyro.module(prob.guide + ".flow", flow)
        with pyro.plate("batch", B, dim=-1):
            return pyro.sample("z", FlowPrior(m_p, logs_p, flow, mask))

    def guide(m_p: torch.Tensor, logs_p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
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


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def _time(fn: Callable[[], Any], n: int, device: torch.device, clock: str = "wall") -> float:
    now = CLOCKS[clock]
    _sync(device)
    t0 = now()
    for _ in range(n):
        fn()
    _sync(device)
    return (now() - t0) / n


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


@contextlib.contextmanager
def _saved_tensor_bytes():
    """Yields a one-element list that receives the bytes of the distinct storages autograd saves for backward
    inside the block (device independent). The hooks keep no tensor alive."""
    seen: dict[tuple[int, int], int] = {}
    out = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[(s.data_ptr(), s.nbytes())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out
    out[0] = int(sum(seen.values()))


def _memory_worker(size: dict, device: torch.device, k: int, seed: int, guide: str) -> dict:
    prob = make_problem(size, device, seed, guide)
    pyro.clear_param_store()
    step = PyroStep(prob, num_particles=k, vectorize=True)
    for _ in range(2):  # Adam states, grads, allocator caches
        step()
    gc.collect()
    out: dict[str, Any] = {"guide": guide, "k": k}
    # one measured step (the third: steady state), which also records what autograd saves
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with _saved_tensor_bytes() as saved:
            step()
        _sync(device)
        out.update(base_bytes=base, peak_bytes=torch.cuda.max_memory_allocated(device))
    else:
        hwm_reset = _reset_hwm()
        base = _proc_status_kb("VmRSS") * 1024
        hwm_before = _proc_status_kb("VmHWM") * 1024
        with _saved_tensor_bytes() as saved:
            step()
        out.update(
            base_bytes=base,
            peak_bytes=_proc_status_kb("VmHWM") * 1024,
            hwm_reset=hwm_reset,
            hwm_before_bytes=hwm_before,
        )
    out["growth_bytes"] = out["peak_bytes"] - out["base_bytes"]
    out["autograd_saved_bytes"] = saved[0]
    return out


def _leak_worker(size: dict, device: torch.device, seed: int, guide: str, steps: tuple[int, int]) -> dict:
    prob = make_problem(size, device, seed, guide)
    pyro.clear_param_store()
    step = PyroStep(prob, num_particles=1)
    samples = {}
    every = math.gcd(*steps)
    t0 = time.perf_counter()
    for i in range(1, steps[-1] + 1):
        step()
        if i % every == 0:
            gc.collect()
            rec = {"rss_bytes": _proc_status_kb("VmRSS") * 1024, "gc_objects": len(gc.get_objects())}
            if device.type == "cuda":
                rec["cuda_allocated_bytes"] = torch.cuda.memory_allocated(device)
            samples[str(i)] = rec
    a, b = samples[str(steps[0])], samples[str(steps[1])]
    out = {
        "guide": guide,
        "steps": steps[-1],
        "compared_steps": list(steps),
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
    kind: str, size: dict, device: torch.device, seed: int, k: int, threads: int | None, guide: str
) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", kind, "--_size", json.dumps(size)]
    cmd += ["--device", device.type, "--seed", str(seed), "--_k", str(k), "--guide", guide]
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


def _run_worker(kind: str, size: dict, device: torch.device, seed: int, k: int, guide: str) -> dict:
    """``mem``: memory at K particles; ``leak``: the leak check over ``k`` steps (LEAK_STEPS[-1] or the
    quick QUICK_LEAK_STEPS[-1])."""
    if kind == "mem":
        return _memory_worker(size, device, k, seed, guide)
    if kind == "leak":
        steps = LEAK_STEPS if k == LEAK_STEPS[-1] else QUICK_LEAK_STEPS
        return _leak_worker(size, device, seed, guide, steps)
    raise ValueError(f"unknown worker {kind}")


def _forked_entry(
    conn: Any, jobs: list[tuple[str, dict, str, int]], device: str, seed: int, threads: int | None
) -> None:
    """Run ``(kind, size, guide, K)`` jobs one after the other; sends one result per job."""
    try:
        _set_malloc_thresholds()
        if threads:
            torch.set_num_threads(threads)
        dev = torch.device(device)
        outs = [_run_worker(kind, size, dev, seed, k, guide) for kind, size, guide, k in jobs]
        conn.send(("ok", outs))
    except BaseException:  # noqa: BLE001 - reported to the parent
        import traceback

        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def start_workers(
    specs: list[tuple[str, str, int]],
    size_for: dict[str, dict],
    device: torch.device,
    seed: int,
    threads: int | None = None,
    quick: bool = False,
) -> Callable[[], list[dict]]:
    """Run ``(kind, guide, K)`` workers in subprocesses; returns a function collecting their results (in
    the order of ``specs``).

    Full mode: fresh interpreters, one per spec, one at a time, started when collected (after the timing),
    with glibc's mmap threshold fixed at 128 KiB so that freed tensors are unmapped and leave the RSS.
    Quick mode on CPU: all run one after the other in one forked process (which pays torch's first-op
    warm-up once), forked now, before this process has run any torch op (so no OpenMP pool exists yet),
    and concurrently with the timing; its numbers only show that the machinery works.
    """
    if not specs:
        return lambda: []
    if quick and device.type == "cpu" and "fork" in multiprocessing.get_all_start_methods():
        # torch.optim imports torch._dynamo on first use (~1.5 s): import it once, here, for both processes
        import torch._dynamo  # noqa: F401

        ctx = multiprocessing.get_context("fork")
        jobs = [(kind, size_for[kind], guide, k) for kind, guide, k in specs]
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_forked_entry, args=(send, jobs, device.type, seed, threads), daemon=True)
        proc.start()
        send.close()

        def collect_forked() -> list[dict]:
            try:
                status, payload = recv.recv()
            except EOFError:
                status, payload = "error", "worker exited without a result"
            proc.join()
            if status != "ok":
                raise RuntimeError(f"memory/leak workers failed (exit {proc.exitcode}):\n{payload}")
            return payload

        return collect_forked

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    cmds = [_worker_cmd(kind, size_for[kind], device, seed, k, threads, guide) for kind, guide, k in specs]

    def collect() -> list[dict]:
        outs = []
        for (kind, guide, k), cmd in zip(specs, cmds):
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"worker {kind} {guide} K={k} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
                )
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


@contextlib.contextmanager
def _chunked_flow():
    """Proposal for ``pyro_vits.flows`` (not edited: a local monkeypatch, restored on exit).

    ``ResidualCouplingBlock.forward_and_logdet`` flattens the leading dims of ``x (..., C, T)`` into one
    conv batch: K vectorised particles of B sequences become one batch of K*B rows, whose activations
    (K*B*hidden*T floats per conv) leave the per-core cache. Here the flattened rows run in chunks of the
    mask's own rows (the data batch B: Pyro's particle plate broadcasts ``z`` to ``(K, B, C, T)`` but the
    flow's mask stays ``(B, 1, T)``), under ``torch.nn.utils.parametrize.cached()`` so that each
    weight-normed conv's weight is still computed once per call. Same values and gradients.
    """
    import pyro_vits.flows as flows_mod
    from torch.nn.utils import parametrize

    block = flows_mod.ResidualCouplingBlock
    original = block.forward_and_logdet

    def forward_and_logdet(self, x, x_mask=None, g=None, reverse=False):  # noqa: ANN001, ANN202
        if x_mask is None or x.dim() < 2:
            return original(self, x, x_mask, g, reverse)
        rows = math.prod(x_mask.shape[:-2])  # the mask's own (un-broadcast) rows
        h, mask, g, lead = flows_mod.flatten_leading(x, x_mask, g)
        if not 0 < rows < h.shape[0]:
            return original(self, x, x_mask, g, reverse)
        ys, logdets = [], []
        with parametrize.cached():
            for i in range(0, h.shape[0], rows):
                g_i = None if g is None else g[i : i + rows]
                y, ld = original(self, h[i : i + rows], mask[i : i + rows], g_i, reverse)
                ys.append(y)
                logdets.append(ld)
        y, logdet = torch.cat(ys), torch.cat(logdets)
        return y.reshape(lead + y.shape[-2:]), logdet.reshape(lead)

    block.forward_and_logdet = forward_and_logdet
    try:
        yield
    finally:
        block.forward_and_logdet = original


def _chunked_step(step: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with _chunked_flow():
            return step()

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
    probs: dict[str, Problem], repeats: int, warmup: int, inner: int, seed: int, ablations: bool = False,
    clock: str = "wall",
) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[tuple[str, str], list[float]]]]:
    """Interleaved timing rounds over every guide's configurations.

    Each round runs a seeded shuffle of blocks (the blocks of all guides mixed); inside a block the compared
    steps run back to back: ``raw | pyro_k1`` and ``pyro_k1 | ablation`` as A-B-B-A (B-A-A-B on odd
    rounds), and for each K ``pyro_k1, vec_kK, seq_kK[, vec_kK_chunked], pyro_k1`` (the middle reversed
    on odd rounds). Returns,
    per guide, per-config per-round seconds/step (mean of the round's measurements) and the within-block
    ratios per round. ``clock``: ``"wall"`` (``perf_counter``) or ``"cpu"`` (``process_time``: this
    process's CPU seconds, which a preempted single-threaded step does not accrue on a shared machine).
    """
    device = next(iter(probs.values())).device
    pyro.clear_param_store()
    configs: dict[tuple[str, str], Callable[[], Any]] = {}
    for g, prob in probs.items():
        configs[(g, "raw")] = RawStep(prob)
        configs[(g, "pyro_k1")] = PyroStep(prob, 1, name="k1")
        for k in PARTICLES:
            configs[(g, f"vec_k{k}")] = PyroStep(prob, k, vectorize=True, name=f"vec{k}")
            if k > 1:
                configs[(g, f"seq_k{k}")] = PyroStep(prob, k, vectorize=False, name=f"seq{k}")
            if k in CHUNKED_K:
                step = PyroStep(prob, k, vectorize=True, name=f"vecc{k}")
                configs[(g, f"vec_k{k}_chunked")] = _chunked_step(step)
        if ablations:
            for name, (_, factory) in ABLATIONS.items():
                configs[(g, name)] = factory(prob)
    for _ in range(warmup):
        for fn in configs.values():
            fn()
    _sync(device)

    blocks: list[tuple[str, str, str]] = []
    for g in probs:
        blocks += [(g, "pyro_k1", "raw"), (g, "vec_k1", "pyro_k1")]
        blocks += [(g, f"vec_k{k}", f"seq_k{k}") for k in PARTICLES[1:]]
        if ablations:
            blocks += [(g, name, "pyro_k1") for name in ABLATIONS]
    times: dict[str, dict[str, list[float]]] = {g: {} for g in probs}
    for g, name in configs:
        times[g][name] = []
    paired: dict[str, dict[tuple[str, str], list[float]]] = {g: {} for g in probs}

    rng = random.Random(seed)
    for r in range(repeats):
        rng.shuffle(blocks)
        round_t: dict[tuple[str, str], list[float]] = {key: [] for key in configs}
        for g, a, b in blocks:
            extra: list[str] = []
            if a.startswith("vec_k") and b.startswith("seq_k"):
                extra = [f"{a}_chunked"] if (g, f"{a}_chunked") in configs else []
                mid = [a, b, *extra] if r % 2 == 0 else [*extra, b, a]
                seq = ["pyro_k1", *mid, "pyro_k1"]
            else:
                seq = [a, b, b, a] if r % 2 == 0 else [b, a, a, b]
            t: dict[str, list[float]] = {name: [] for name in set(seq)}
            for name in seq:
                t[name].append(_time(configs[(g, name)], inner, device, clock))
                round_t[(g, name)].append(t[name][-1])
            mean = {name: statistics.fmean(v) for name, v in t.items()}
            pairs = [(a, "pyro_k1"), (b, "pyro_k1"), (a, b)] if "seq" in b else [(a, b)]
            for c in extra:
                pairs += [(c, "pyro_k1"), (c, b), (c, a)]
            for num, den in pairs:
                paired[g].setdefault((num, den), []).append(mean[num] / mean[den])
        for (g, name), v in round_t.items():
            times[g][name].append(statistics.fmean(v))
        line = "; ".join(
            f"{g} " + ", ".join(f"{a}/{b} {paired[g][(a, b)][-1]:.3f}" for a, b in
                                [("pyro_k1", "raw"), ("vec_k4", "pyro_k1"), ("vec_k8", "seq_k8")])
            for g in probs
        )
        print(f"  round {r + 1}/{repeats}: {line}", flush=True)
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
    name: str, description: str, value: float | None, threshold: float, op: str, applicable: bool,
    guide: str | None = None,
) -> dict:
    ok = None
    if applicable and value is not None and math.isfinite(value):
        ok = bool(value <= threshold) if op == "<=" else bool(value < threshold)
    return {
        "name": name,
        "guide": guide,
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
    p.add_argument(
        "--guide",
        default="both",
        choices=[*GUIDES, "both"],
        help="encoder: VITS's PosteriorEncoder guide; free: learnable m_q/logs_q tensors; both (default): "
        "both, the particle-scaling targets judged on the encoder guide",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes (for tests); ratios are not meaningful")
    p.add_argument("--repeats", type=int, default=None, help="timing rounds (default 5, quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per config (default 1)")
    p.add_argument("--inner", type=int, default=None, help="steps per timed call (1 on CPU, 5 on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's; 1 if --quick)"
    )
    p.add_argument(
        "--clock",
        default="auto",
        choices=["auto", "wall", "cpu"],
        help="step timer: wall (perf_counter) or cpu (process_time, this process's CPU seconds); auto: cpu "
        "on a CPU device with 1 torch thread (a shared machine's preemption then costs nothing), else wall",
    )
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>.json)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-K memory subprocesses")
    p.add_argument("--no-leak", action="store_true", help="skip the leak check")
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


def _guide_ratios(times: dict[str, list[float]], paired: dict[tuple[str, str], list[float]],
                  ablations: bool) -> dict:
    def ratio(num: str, den: str, description: str) -> dict:
        return _ratio(times, paired, num, den, description)

    ratios = {"pyro_k1_over_raw": ratio("pyro_k1", "raw", "Pyro SVI step (K=1) / raw VITS KL step")}
    for k in PARTICLES:
        ratios[f"vec_k{k}_over_k1"] = ratio(f"vec_k{k}", "pyro_k1", f"vectorised K={k} / K=1 step")
    for k in PARTICLES[1:]:
        ratios[f"seq_k{k}_over_k1"] = ratio(f"seq_k{k}", "pyro_k1", f"sequential K={k} / K=1 step")
        ratios[f"vec_over_seq_k{k}"] = ratio(f"vec_k{k}", f"seq_k{k}", f"vectorised / sequential, K={k}")
    for k in CHUNKED_K:
        c = f"vec_k{k}_chunked"
        desc = f"vectorised K={k}, flow run per particle (proposal)"
        ratios[f"{c}_over_k1"] = ratio(c, "pyro_k1", f"{desc} / K=1 step")
        ratios[f"{c}_over_seq_k{k}"] = ratio(c, f"seq_k{k}", f"{desc} / sequential K={k}")
        ratios[f"{c}_over_vec_k{k}"] = ratio(c, f"vec_k{k}", f"{desc} / vectorised K={k}")
    if ablations:
        for name, (desc, _) in ABLATIONS.items():
            ratios[f"{name}_over_k1"] = ratio(name, "pyro_k1", f"K=1 with {desc} / K=1 default")
            ratios[f"{name}_over_raw"] = ratio(name, "raw", f"K=1 with {desc} / raw (unpaired)")
    return ratios


def _particle_checks(ratios: dict, guide: str, suffix: str, device: torch.device) -> list[dict]:
    cpu, cuda = device.type == "cpu", device.type == "cuda"
    checks = [
        _target(
            "vectorised_k4_cpu" + suffix,
            f"vectorised K=4 step <= 3.2x the K=1 step (CPU; {guide} guide)",
            ratios["vec_k4_over_k1"]["median"],
            3.2,
            "<=",
            cpu,
            guide,
        ),
        _target(
            "vectorised_k8_gpu" + suffix,
            f"vectorised K=8 step <= 2.8x the K=1 step (GPU; {guide} guide)",
            ratios["vec_k8_over_k1"]["median"],
            2.8,
            "<=",
            cuda,
            guide,
        ),
    ]
    for k in PARTICLES[1:]:
        checks.append(
            _target(
                f"vectorised_beats_sequential_k{k}" + suffix,
                f"vectorised K={k} faster than sequential K={k} ({guide} guide)",
                ratios[f"vec_over_seq_k{k}"]["median"],
                1.0,
                "<",
                True,
                guide,
            )
        )
    return checks


def main(argv: Sequence[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    device = resolve_device(args.device)
    threads = args.threads or (1 if args.quick and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    if args._worker:
        guide = "encoder" if args.guide == "both" else args.guide
        res = _run_worker(args._worker, json.loads(args._size), device, args.seed, args._k, guide)
        print(json.dumps(res))
        return res

    t_start = time.perf_counter()
    guides = list(GUIDES) if args.guide == "both" else [args.guide]
    primary = guides[0]  # the particle-scaling targets are judged on it (encoder when selected)
    size = QUICK_SIZE if args.quick else FULL_SIZE
    repeats = args.repeats or (2 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else 1
    inner = args.inner or (5 if device.type == "cuda" else 1)
    leak_steps = QUICK_LEAK_STEPS if args.quick else LEAK_STEPS
    clock = args.clock
    if clock == "auto":
        clock = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    if clock == "cpu" and device.type == "cuda":
        raise SystemExit("--clock cpu measures host CPU time only; use --clock wall on CUDA")
    out_path = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"{device.type}.json"

    result: dict[str, Any] = {
        "schema": 2,
        "mode": "quick" if args.quick else "full",
        **environment(device),
        "size": size,
        "guides": guides,
        "primary_guide": primary,
        "guide_descriptions": {g: GUIDE_DESCRIPTIONS[g] for g in guides},
        "particles": list(PARTICLES),
        "repeats": repeats,
        "warmup": warmup,
        "inner_steps": inner,
        "clock": clock,
        "seed": args.seed,
        "optimizer": {k: list(v) if isinstance(v, tuple) else v for k, v in OPTIM.items()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_start": list(os.getloadavg()),
    }
    print(f"device: {result['device']['name']} ({device.type}, {torch.get_num_threads()} threads)")
    print(f"torch {torch.__version__}, pyro {pyro.__version__}; size {size}; guides {guides}")
    print(f"{repeats} rounds, {warmup} warm-up steps per config, {clock} clock")

    specs = [] if args.no_memory else [("mem", g, k) for g in guides for k in PARTICLES]
    specs += [] if args.no_leak else [("leak", g, leak_steps[-1]) for g in guides]
    # quick mode: workers run concurrently with the (then meaningless) timing to keep the test short
    collect_workers = start_workers(
        specs, {"mem": size, "leak": LEAK_SIZE}, device, args.seed, threads, quick=args.quick
    )
    probs = {g: make_problem(size, device, args.seed, g) for g in guides}
    seed_all(args.seed)
    times, paired = measure(probs, repeats, warmup, inner, args.seed, ablations=args.ablations, clock=clock)
    if args.profile:
        result["profile"] = {}
        for g in guides:
            print(f"profile: torch.profiler, raw vs Pyro K=1, {g} guide ...", flush=True)
            result["profile"][g] = profile_steps(probs[g])
    result["timings"] = {
        g: {name: {"repeats_s": ts, "median_s": statistics.median(ts)} for name, ts in times[g].items()}
        for g in guides
    }
    ratios = {g: _guide_ratios(times[g], paired[g], args.ablations) for g in guides}
    result["ratios"] = ratios

    def suffix(g: str) -> str:
        return "" if g == primary else f"_{g}"

    targets = [
        _target(
            "pyro_step_overhead" + suffix(g),
            f"Pyro Trace_ELBO K=1 SVI step <= 1.05x the raw VITS KL step ({g} guide)",
            ratios[g]["pyro_k1_over_raw"]["median"],
            1.05,
            "<=",
            True,
            g,
        )
        for g in guides
    ]
    targets += _particle_checks(ratios[primary], primary, "", device)
    # the other guide's particle-scaling checks, and the chunked-flow proposal: reported, not judged
    reference = [c for g in guides if g != primary for c in _particle_checks(ratios[g], g, suffix(g), device)]
    for g in guides:
        for k in CHUNKED_K:
            reference.append(
                _target(
                    f"vectorised_chunked_beats_sequential_k{k}" + suffix(g),
                    f"proposal: vectorised K={k} with the flow run per particle faster than sequential K={k} "
                    f"({g} guide)",
                    ratios[g][f"vec_k{k}_chunked_over_seq_k{k}"]["median"],
                    1.0,
                    "<",
                    True,
                    g,
                )
            )

    outs = []
    if specs:
        print(f"memory/leak: {len(specs)} subprocesses ...", flush=True)
        outs = collect_workers()
    cuda = device.type == "cuda"
    if not args.no_memory:
        result["memory"] = {
            "method": (
                "torch.cuda.max_memory_allocated - memory_allocated over 1 step after 2 warm-up steps"
                if cuda
                else "VmHWM - VmRSS over 1 step after 2 warm-up steps (VmHWM reset via "
                "/proc/self/clear_refs; MALLOC_MMAP_THRESHOLD_=131072 so freed tensors leave the RSS); "
                "one subprocess per guide and K"
            ),
            "mode": "vectorised",
            "linear_bound": (
                f"growth(K) <= {RSS_LINEAR_SLACK} * K * growth(1) + {MEMORY_SLACK_BYTES // 2**20} MiB"
            ),
        }
        for g in guides:
            per_k = {str(o["k"]): o for o in outs if "growth_bytes" in o and o["guide"] == g}
            result["memory"][g] = per_k
            g1 = per_k["1"]["growth_bytes"]
            s1 = per_k["1"]["autograd_saved_bytes"]
            for k in PARTICLES[1:]:
                m = per_k[str(k)]
                gk = m["growth_bytes"]
                bound = RSS_LINEAR_SLACK * k * max(g1, 0) + MEMORY_SLACK_BYTES
                m["growth_over_k1"] = gk / g1 if g1 > 0 else None
                m["autograd_saved_over_k1"] = m["autograd_saved_bytes"] / s1 if s1 > 0 else None
                targets.append(
                    _target(
                        f"memory_linear_k{k}" + suffix(g),
                        f"peak memory growth at K={k} / ({RSS_LINEAR_SLACK} * {k} * growth at K=1 + "
                        f"{MEMORY_SLACK_BYTES // 2**20} MiB) ({g} guide)",
                        gk / bound,
                        1.0,
                        "<=",
                        True,
                        g,
                    )
                )
    if not args.no_leak:
        result["leak"] = {}
        for g in guides:
            leak = next(o for o in outs if "gc_objects_growth" in o and o["guide"] == g)
            result["leak"][g] = leak
            a, b = leak["compared_steps"]
            growth = leak["cuda_growth_bytes"] if cuda else leak["rss_growth_bytes"]
            targets.append(
                _target(
                    "no_memory_growth" + suffix(g),
                    f"{'CUDA allocated' if cuda else 'RSS'} growth (bytes) from step {a} to {b} "
                    f"<= {LEAK_TOLERANCE_BYTES // 2**20} MiB (one-off allocator growth of ~2 MiB seen "
                    f"on CPU; {g} guide)",
                    float(growth),
                    float(LEAK_TOLERANCE_BYTES),
                    "<=",
                    True,
                    g,
                )
            )
            targets.append(
                _target(
                    "no_python_object_growth" + suffix(g),
                    f"live Python objects (gc) growth from step {a} to {b} "
                    f"< {LEAK_MAX_OBJECTS} (a per-step leak would add >= {b - a}; {g} guide)",
                    float(leak["gc_objects_growth"]),
                    float(LEAK_MAX_OBJECTS),
                    "<",
                    True,
                    g,
                )
            )

    result["targets"] = targets
    result["reference_checks"] = reference
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
    guides = res["guides"]
    print()
    print(f"{'config':<22}" + "".join(f"{g + ' s/step':>16}" for g in guides))
    names = list(dict.fromkeys(n for g in guides for n in res["timings"][g]))
    for name in names:
        cells = [res["timings"][g].get(name, {}).get("median_s") for g in guides]
        print(f"{name:<22}" + "".join(f"{c:>16.4f}" if c is not None else f"{'':>16}" for c in cells))
    for g in guides:
        print(f"\n{g + ' guide ratio':<28}{'median':>8}{'min':>8}{'max':>8}")
        for name, r in res["ratios"][g].items():
            print(f"{name:<28}{r['median']:>8.3f}{min(r['repeats']):>8.3f}{max(r['repeats']):>8.3f}")
    if "memory" in res:
        print()
        print(f"{'guide':<9}{'K':>3}{'peak growth':>16}{'autograd saved':>18}")
        for g in guides:
            for k, m in res["memory"][g].items():
                print(f"{g:<9}{k:>3}{_fmt_bytes(m['growth_bytes']):>16}"
                      f"{_fmt_bytes(m['autograd_saved_bytes']):>18}")
    for g, prof in res.get("profile", {}).items():
        tot = prof["self_cpu_us_per_step"]
        print(
            f"\nprofile, {g} guide (self CPU per step): raw {tot['raw'] / 1e3:.1f} ms, "
            f"pyro {tot['pyro_k1'] / 1e3:.1f} ms"
        )
        print(f"{'op':<44}{'extra ms':>9}{'calls raw/pyro':>16}")
        for row in prof["top_extra_ops"][:12]:
            calls = f"{row['raw_calls']:g}/{row['pyro_calls']:g}"
            print(f"{row['op'][:43]:<44}{row['extra_us'] / 1e3:>9.2f}{calls:>16}")
    for g, lk in res.get("leak", {}).items():
        a, b = lk["compared_steps"]
        print(
            f"\nleak, {g} guide: RSS step {a}->{b}: {lk['rss_growth_bytes'] / 2**20:+.2f} MiB, "
            f"gc objects {lk['gc_objects_growth']:+d}"
        )
    print()
    for t in res["targets"] + res["reference_checks"]:
        ref = t in res["reference_checks"]
        flag = "n/a " if not t["applicable"] else ("pass" if ref and t["pass"] else "fail" if ref else
                                                   "PASS" if t["pass"] else "FAIL")
        value = "None" if t["value"] is None else f"{t['value']:.4g}"
        print(f"[{flag}] {t['name']:<42} {value} {t['op']} {t['threshold']:g}   ({t['description']})")
    print("(lower-case pass/fail: reference checks, not judged)")


if __name__ == "__main__":
    main()
