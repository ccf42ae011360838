"""Memory of a training step at K particles, a leak check over many steps, and the peak memory and time of
:func:`~pyro_vits.infer.evaluate.evaluate`, each measured in a fresh process.

On CPU peak memory is the growth of the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``)
over the measured call; on CUDA ``torch.cuda.max_memory_allocated``. Workers run as
``python -m pyro_vits.bench.memory '<job JSON>'`` (one JSON result on the last line of stdout) with glibc's
mmap threshold fixed at 128 KiB so that freed tensors leave the resident set.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyro
import torch

import pyro_vits

from .problem import make_problem
from .steps import PyroStep
from .timing import sync

__all__ = ["EVAL_SIZE", "QUICK_EVAL_SIZE", "Job", "run_job", "run_jobs", "start_jobs"]

EVAL_SIZE = dict(channels=192, hidden=192, kernel_size=5, n_layers=4, n_flows=4, enc_layers=16, frames=32,
                 utterances=32)
"""``evaluate`` at VITS's latent size: flow and encoder as VITS's, 32 held-out utterances of <= 32 frames
(``examples/fit_vits_prior.py``'s defaults for frames and held-out utterances)."""
QUICK_EVAL_SIZE = dict(channels=4, hidden=8, kernel_size=3, n_layers=1, n_flows=2, enc_layers=1, frames=8,
                       utterances=4)
Job = dict[str, Any]  # {"kind": "step" | "leak" | "eval", ...}: see run_job


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> bool:
    """Reset VmHWM (peak RSS) to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _peak(device: torch.device) -> Iterator[dict[str, Any]]:
    """Yields a dict that receives ``base_bytes``, ``peak_bytes`` and ``growth_bytes`` of the block."""
    out: dict[str, Any] = {}
    if device.type == "cuda":
        sync(device)
        out["base_bytes"] = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        sync(device)
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        out["hwm_reset"] = _reset_peak()
        out["base_bytes"] = _status_bytes("VmRSS")
        yield out
        out["peak_bytes"] = _status_bytes("VmHWM")
    out["growth_bytes"] = out["peak_bytes"] - out["base_bytes"]


@contextlib.contextmanager
def _saved_tensor_bytes() -> Iterator[list[int]]:
    """Yields a one-element list receiving the bytes of the distinct storages autograd saves for backward
    inside the block (device independent; the hooks keep no tensor alive)."""
    seen: dict[tuple[int, int], int] = {}
    out = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[(s.data_ptr(), s.nbytes())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out
    out[0] = int(sum(seen.values()))


def _step_memory(job: Job, device: torch.device) -> dict[str, Any]:
    prob = make_problem(job["size"], device, job["seed"], job["guide"])
    pyro.clear_param_store()
    step = PyroStep(prob, num_particles=job["k"], vectorize=True, kl_particles=job.get("kl_particles", 1))
    for _ in range(2):  # Adam states, grads, allocator caches
        step()
    gc.collect()
    with _saved_tensor_bytes() as saved, _peak(device) as out:
        step()
    return {"guide": job["guide"], "k": job["k"], **out, "autograd_saved_bytes": saved[0]}


def _leak(job: Job, device: torch.device) -> dict[str, Any]:
    prob = make_problem(job["size"], device, job["seed"], job["guide"])
    pyro.clear_param_store()
    step = PyroStep(prob, num_particles=1)
    steps = tuple(job["steps"])
    every = math.gcd(*steps)
    samples = {}
    t0 = time.perf_counter()
    for i in range(1, steps[-1] + 1):
        step()
        if i % every == 0:
            gc.collect()
            rec = {"rss_bytes": _status_bytes("VmRSS"), "gc_objects": len(gc.get_objects())}
            if device.type == "cuda":
                rec["cuda_allocated_bytes"] = torch.cuda.memory_allocated(device)
            samples[str(i)] = rec
    a, b = samples[str(steps[0])], samples[str(steps[1])]
    out = {"guide": job["guide"], "steps": steps[-1], "compared_steps": list(steps), "size": job["size"],
           "samples": samples, "rss_growth_bytes": b["rss_bytes"] - a["rss_bytes"],
           "gc_objects_growth": b["gc_objects"] - a["gc_objects"],
           "param_store_size": len(pyro.get_param_store()),
           "wall_s": time.perf_counter() - t0}
    if device.type == "cuda":
        out["cuda_growth_bytes"] = b["cuda_allocated_bytes"] - a["cuda_allocated_bytes"]
    return out


def _eval_memory(job: Job, device: torch.device) -> dict[str, Any]:
    from ..infer.evaluate import default_eval_chunk, evaluate
    from ..models.guides import PosteriorEncoder
    from ..models.prior_model import VITSPriorModel
    from ..models.teacher import make_teacher, sample_dataset

    s = job["size"]
    flow_sizes = dict(kernel_size=s["kernel_size"], n_layers=s["n_layers"], n_flows=s["n_flows"])
    teacher = make_teacher(s["channels"], s["hidden"], seed=job["seed"], **flow_sizes)
    data = sample_dataset(teacher, s["utterances"], s["frames"], seed=job["seed"] + 1).to(device)
    torch.manual_seed(job["seed"])
    model = VITSPriorModel(s["channels"], s["hidden"], **flow_sizes).to(device)
    guide = PosteriorEncoder(s["channels"], s["channels"], s["hidden"], s["kernel_size"],
                             n_layers=s["enc_layers"]).to(device)
    del teacher
    gc.collect()
    chunk = job["eval_chunk"]
    rows = default_eval_chunk(data.channels, data.frames) if chunk is None else chunk
    with _peak(device) as out:
        t0, c0 = time.perf_counter(), time.process_time()
        result = evaluate(model, guide, data, num_samples=job["samples"], seed=job["seed"], eval_chunk=chunk)
        out["wall_s"], out["cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
    return {"samples": job["samples"], "eval_chunk": rows, "chunked": chunk is None, **out,
            "elbo_per_frame": result["elbo_per_frame"],
            "loglik_iwae_per_frame": result["loglik_iwae_per_frame"]}


def run_job(job: Job) -> dict[str, Any]:
    """Run one job in this process: ``kind`` ``"step"`` (``size, seed, guide, k[, kl_particles]``: memory of
    one vectorised step), ``"leak"`` (``size, seed, guide, steps=(a, b)``: RSS and live objects at steps a
    and b) or ``"eval"`` (``size, seed, samples, eval_chunk``: peak memory and time of ``evaluate``)."""
    device = torch.device(job["device"])
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    runners: dict[str, Callable[[Job, torch.device], dict[str, Any]]] = {
        "step": _step_memory, "leak": _leak, "eval": _eval_memory}
    if job["kind"] not in runners:
        raise ValueError(f"job kind must be one of {sorted(runners)}, got {job['kind']!r}")
    return {"kind": job["kind"], **runners[job["kind"]](job, device)}


def run_jobs(jobs: list[Job]) -> list[dict[str, Any]]:
    """Each job in a fresh interpreter, one after the other (``python -m pyro_vits.bench.memory``)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    # the child imports this very package: the folder holding it goes first on its path
    home = os.path.dirname(os.path.dirname(os.path.abspath(pyro_vits.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [home, env.get("PYTHONPATH", "")]))
    outs = []
    for job in jobs:
        cmd = [sys.executable, "-m", "pyro_vits.bench.memory", json.dumps(job)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory job {job['kind']} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        outs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return outs


def _in_background(jobs: list[Job]) -> Callable[[], list[dict[str, Any]]]:
    """:func:`run_jobs` in a thread (its fresh interpreters run alongside the caller's timing, whose CPU
    clock they do not touch); the returned function joins it and returns the results or raises."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["outs"] = run_jobs(jobs)
        except BaseException as err:  # noqa: BLE001 - re-raised by the collector
            box["error"] = err

    thread = threading.Thread(target=target, name="pyro_vits-bench-memory", daemon=True)
    thread.start()

    def collect() -> list[dict[str, Any]]:
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["outs"]

    return collect


def _forked_entry(conn: Any, jobs: list[Job]) -> None:
    try:
        conn.send(("ok", [run_job(job) for job in jobs]))
    except BaseException:  # noqa: BLE001 - reported to the parent
        import traceback

        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def start_jobs(jobs: list[Job], concurrent: bool = False) -> Callable[[], list[dict[str, Any]]]:
    """Start ``jobs``; returns a function that waits for their results (in order).

    ``concurrent=False``: fresh interpreters, one after the other, started now from a thread (each job's
    memory is its own process's; the caller's CPU-clock timing is not charged for them). ``concurrent=True``
    (quick mode, CPU): one forked process runs them all now, without the start-up of fresh interpreters;
    call it before this process has run torch ops (no thread pool to fork).
    """
    if not jobs:
        return lambda: []
    if not concurrent or "fork" not in multiprocessing.get_all_start_methods():
        return _in_background(jobs)
    import torch._dynamo  # noqa: F401  torch.optim imports it on first use (~1.5 s): once, for both processes

    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_forked_entry, args=(send, jobs), daemon=True)
    proc.start()
    send.close()

    def collect() -> list[dict[str, Any]]:
        try:
            status, payload = recv.recv()
        except EOFError:
            status, payload = "error", "the worker exited without a result"
        proc.join()
        if status != "ok":
            raise RuntimeError(f"memory jobs failed (exit {proc.exitcode}):\n{payload}")
        return payload

    return collect


if __name__ == "__main__":
    print(json.dumps(run_job(json.loads(sys.argv[1]))))
