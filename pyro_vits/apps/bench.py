"""``pyro-vits bench``: the cost of the Pyro formulation of VITS's KL step, of K particles and of K KL
particles, the memory of a step and of :func:`~pyro_vits.infer.evaluate.evaluate`, and ``torch.compile`` of the flow.

    pyro-vits bench [--device cpu|cuda|auto] [--guide encoder|free|both] [--quick] [--repeats N]
                    [--threads N] [--clock auto|wall|cpu] [--out PATH | --out-dir DIR] [--profile]
                    [--ablations] [--no-memory] [--no-leak] [--no-eval-memory] [--no-compile]

Every timed configuration runs in one process, interleaved (:mod:`pyro_vits.bench.timing`); ratios are
medians of per-round ratios, each with its target and pass/fail in the JSON written to ``--out`` (default
``<out-dir>/<device>.json``: ``cpu.json``, or the card's name on CUDA; ``<device>-quick.json`` with
``--quick``). ``--quick`` uses tiny sizes and finishes in seconds: it checks the machinery, its ratios mean
nothing. Configurations per guide:

- ``raw``: VITS's hand-written step; ``pyro_k1``: ``SVI`` + ``Trace_ELBO``, one particle;
- ``vec_kK`` / ``seq_kK``: ``num_particles=K`` vectorised / sequential;
- ``kl_kK``: one particle for the likelihood and ``kl_particles=K`` (:class:`~pyro_vits.infer.elbo.MC_ELBO`);
- ``vec_kK_rowchunked``: vectorised K with the flow run per particle
  (:class:`~pyro_vits.bench.steps.RowChunkedCouplingBlock`);
- ``--ablations``: K = 1 with validation off, with one ``torch.optim.Adam``, and with both.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyro
import torch

from .._device import resolve_device
from ..bench.compiled import compile_flow
from ..bench.memory import EVAL_SIZE, QUICK_EVAL_SIZE, Job, start_jobs
from ..bench.problem import (
    FULL_SIZE,
    GUIDE_DESCRIPTIONS,
    GUIDES,
    LEAK_SIZE,
    OPTIM,
    QUICK_SIZE,
    Problem,
    make_problem,
    seed_all,
)
from ..bench.report import device_slug, environment, format_report, target, write_json
from ..bench.steps import PyroStep, RawStep, Step, TorchOptimStep, with_row_chunked_flow, without_validation
from ..bench.timing import Block, measure, profile_difference, ratio
from . import run_main

__all__ = ["build_parser", "main", "run"]

logger = logging.getLogger(__name__)

PARTICLES = (1, 2, 4, 8)
KL_PARTICLES = (2, 4, 8)
ROW_CHUNKED_K = (4, 8)
EVAL_SAMPLES = (64, 256)  # default chunks at both; one vectorised call per utterance chunk at the first
UNCHUNKED = 2**62  # an eval_chunk no evaluation reaches: every sample of every utterance in one call
QUICK_EVAL_SAMPLES = (8, 32)
LEAK_STEPS = (100, 1000)
QUICK_LEAK_STEPS = (40, 200)
RSS_LINEAR_SLACK = 1.10  # growth(K) <= 1.10 * K * growth(1) + 1 MiB
MEMORY_SLACK_BYTES = 2**20
LEAK_TOLERANCE_BYTES = 4 * 2**20
LEAK_MAX_OBJECTS = 100
EVAL_MEMORY_BOUND = 2**30
EVAL_LINEAR_SLACK = 1.15  # time(256 samples) <= 1.15 * 4 * time(64 samples)
GPU_RUN_SECONDS = 480
ABLATIONS = {"abl_noval": "pyro.validation_enabled(False)",
             "abl_torchoptim": "Trace_ELBO.differentiable_loss + one torch.optim.Adam (set_to_none)",
             "abl_lean": "both of the above"}


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:<i> or auto (default)")
    p.add_argument("--guide", default="both", choices=[*GUIDES, "both"],
                   help="encoder: VITS's PosteriorEncoder; free: learnable m_q/logs_q; both (default): "
                        "targets judged on the encoder guide, the free guide's particle checks reported")
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds; ratios are not meaningful")
    p.add_argument("--repeats", type=int, default=None, help="timing rounds (default 3, quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up calls per configuration")
    p.add_argument("--inner", type=int, default=None,
                   help="steps per timed call (default 1 on CPU, 5 on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's; quick: 1)")
    p.add_argument("--clock", default="auto", choices=["auto", "wall", "cpu"],
                   help="wall (perf_counter) or cpu (process_time); auto: cpu on CPU with 1 thread, "
                        "else wall")
    p.add_argument("--out", default=None, help="JSON path (default: <out-dir>/<device>.json)")
    p.add_argument("--out-dir", default=".", help="folder of the default JSON path (default: .)")
    p.add_argument("--profile", action="store_true", help="torch.profiler differences behind the main ratios")
    p.add_argument("--ablations", action="store_true", help="also time K=1 variants (validation off, ...)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-K step memory")
    p.add_argument("--no-leak", action="store_true", help="skip the leak check")
    p.add_argument("--no-eval-memory", action="store_true", help="skip evaluate's memory and time")
    p.add_argument("--no-compile", action="store_true",
                   help="skip torch.compile (always skipped with --quick)")
    p.add_argument("--generator-step", action="store_true",
                   help="only the cost of K KL particles in VITS's generator step on a trained voice "
                        "(pyro_vits.bench.generator_step), merged into --out's generator_step entry")
    p.add_argument("--voice", default="joe", help="--generator-step: the voice (a VITS/Piper file, or 'joe')")
    p.add_argument("--corpus", default=None, help="--generator-step: an LJSpeech-format corpus in the voice's "
                   "symbols (its first utterances form the batch)")
    p.add_argument("--batch-size", type=int, default=8, help="--generator-step: utterances per step")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks for usage errors")
    return p


def _check_args(args: argparse.Namespace) -> None:
    for name in ("repeats", "inner", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")


# ------------------------------------------------------------------------------------------ configurations


def _configs(probs: dict[str, Problem], ablations: bool) -> dict[tuple[str, str], Step]:
    pyro.clear_param_store()
    configs: dict[tuple[str, str], Step] = {}
    for g, prob in probs.items():
        configs[(g, "raw")] = RawStep(prob)
        configs[(g, "pyro_k1")] = PyroStep(prob, 1, name="k1")
        for k in PARTICLES:
            configs[(g, f"vec_k{k}")] = PyroStep(prob, k, vectorize=True, name=f"vec{k}")
            if k > 1:
                configs[(g, f"seq_k{k}")] = PyroStep(prob, k, vectorize=False, name=f"seq{k}")
            if k in ROW_CHUNKED_K:
                configs[(g, f"vec_k{k}_rowchunked")] = PyroStep(with_row_chunked_flow(prob), k,
                                                                vectorize=True, name=f"vecc{k}")
        for k in KL_PARTICLES:
            configs[(g, f"kl_k{k}")] = PyroStep(prob, 1, name=f"kl{k}", kl_particles=k)
        if ablations:
            configs[(g, "abl_noval")] = without_validation(PyroStep(prob, 1, name="noval"))
            configs[(g, "abl_torchoptim")] = TorchOptimStep(prob, name="topt")
            configs[(g, "abl_lean")] = without_validation(TorchOptimStep(prob, name="lean"))
    return configs


def _abba(guide: str, a: str, b: str) -> Block:
    return Block(guide, [a, b, b, a], [(a, b)])


def _blocks(guides: Sequence[str], ablations: bool) -> list[Block]:
    blocks = []
    for g in guides:
        blocks += [_abba(g, "pyro_k1", "raw"), _abba(g, "vec_k1", "pyro_k1")]
        for k in PARTICLES[1:]:
            vec, seq, chunked = f"vec_k{k}", f"seq_k{k}", f"vec_k{k}_rowchunked"
            extra = [chunked] if k in ROW_CHUNKED_K else []
            pairs = [(vec, "pyro_k1"), (seq, "pyro_k1"), (vec, seq)]
            pairs += [p for c in extra for p in ((c, "pyro_k1"), (c, seq), (c, vec))]
            blocks.append(Block(g, ["pyro_k1", vec, seq, *extra, "pyro_k1"], pairs))
        blocks += [_abba(g, f"kl_k{k}", "pyro_k1") for k in KL_PARTICLES]
        if ablations:
            blocks += [_abba(g, name, "pyro_k1") for name in ABLATIONS]
    return blocks


def _guide_ratios(times: dict, paired: dict, g: str, ablations: bool) -> dict[str, dict[str, Any]]:
    def r(num: str, den: str, description: str) -> dict[str, Any]:
        return ratio(times, paired, g, num, den, description)

    out = {"pyro_k1_over_raw": r("pyro_k1", "raw", "Pyro SVI step (K=1) / raw VITS KL step")}
    for k in PARTICLES:
        out[f"vec_k{k}_over_k1"] = r(f"vec_k{k}", "pyro_k1", f"vectorised K={k} / K=1 step")
    for k in PARTICLES[1:]:
        out[f"seq_k{k}_over_k1"] = r(f"seq_k{k}", "pyro_k1", f"sequential K={k} / K=1 step")
        out[f"vec_over_seq_k{k}"] = r(f"vec_k{k}", f"seq_k{k}", f"vectorised / sequential, K={k}")
    for k in ROW_CHUNKED_K:
        c, desc = f"vec_k{k}_rowchunked", f"vectorised K={k}, flow run per particle"
        out[f"{c}_over_k1"] = r(c, "pyro_k1", f"{desc} / K=1 step")
        out[f"{c}_over_vec_k{k}"] = r(c, f"vec_k{k}", f"{desc} / vectorised K={k}")
        out[f"{c}_over_seq_k{k}"] = r(c, f"seq_k{k}", f"{desc} / sequential K={k}")
    for k in KL_PARTICLES:
        out[f"kl_k{k}_over_k1"] = r(f"kl_k{k}", "pyro_k1", f"one particle + {k} KL particles / K=1 step")
    if ablations:
        for name, desc in ABLATIONS.items():
            out[f"{name}_over_k1"] = r(name, "pyro_k1", f"K=1 with {desc} / K=1 default")
    return out


# ------------------------------------------------------------------------------------------------- targets


def _particle_targets(ratios: dict, g: str, suffix: str, device: torch.device) -> list[dict[str, Any]]:
    cpu, cuda = device.type == "cpu", device.type == "cuda"
    med = {name: r["median"] for name, r in ratios.items()}
    checks = [
        target("vectorised_k4_cpu" + suffix, f"vectorised K=4 step <= 3.2x the K=1 step (CPU; {g} guide)",
               med["vec_k4_over_k1"], 3.2, "<=", cpu, g),
        target("vectorised_k8_gpu" + suffix, f"vectorised K=8 step <= 2.8x the K=1 step (GPU; {g} guide)",
               med["vec_k8_over_k1"], 2.8, "<=", cuda, g),
        target("kl_particles_k8_cpu" + suffix, f"8 KL particles <= 1.6x the K=1 step (CPU; {g} guide)",
               med["kl_k8_over_k1"], 1.6, "<=", cpu, g),
        target("kl_particles_k8_gpu" + suffix, f"8 KL particles <= 1.3x the K=1 step (GPU; {g} guide)",
               med["kl_k8_over_k1"], 1.3, "<=", cuda, g),
    ]
    checks += [target(f"vectorised_beats_sequential_k{k}" + suffix,
                      f"vectorised K={k} faster than sequential K={k} ({g} guide)",
                      med[f"vec_over_seq_k{k}"], 1.0, "<", True, g) for k in PARTICLES[1:]]
    return checks


def _timing_targets(ratios: dict, timings: dict, guides: list[str], device: torch.device,
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    primary = guides[0]

    def suffix(g: str) -> str:
        return "" if g == primary else f"_{g}"

    targets = [target("pyro_step_overhead" + suffix(g),
                      f"Pyro Trace_ELBO K=1 SVI step <= 1.05x the raw VITS KL step ({g} guide)",
                      ratios[g]["pyro_k1_over_raw"]["median"], 1.05, "<=", True, g) for g in guides]
    targets += _particle_targets(ratios[primary], primary, "", device)
    targets.append(target("k1_step_gpu_s", f"Pyro K=1 step < 10 ms at B=8 (GPU; {primary} guide), seconds",
                          timings[primary]["pyro_k1"]["median_s"], 0.010, "<", device.type == "cuda",
                          primary))
    reference = [c for g in guides[1:] for c in _particle_targets(ratios[g], g, suffix(g), device)]
    reference += [target("rowchunked_vectorised_k4_cpu" + suffix(g),
                         f"vectorised K=4 with the flow run per particle <= 3.2x the K=1 step "
                         f"(CPU; {g} guide)",
                         ratios[g]["vec_k4_rowchunked_over_k1"]["median"], 3.2, "<=", device.type == "cpu", g)
                  for g in guides]
    return targets, reference


def _memory_targets(outs: list[dict], guides: list[str], device: torch.device,
                    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    section: dict[str, Any] = {
        "method": ("torch.cuda.max_memory_allocated - memory_allocated over 1 step after 2 warm-up steps"
                   if device.type == "cuda" else
                   "VmHWM - VmRSS over 1 step after 2 warm-up steps (VmHWM reset via /proc/self/clear_refs; "
                   "MALLOC_MMAP_THRESHOLD_=131072); one fresh process per guide and K"),
        "mode": "vectorised", "steps": {},
        "linear_bound": (f"growth(K) <= {RSS_LINEAR_SLACK} * K * growth(1) + "
                         f"{MEMORY_SLACK_BYTES // 2**20} MiB"),
    }
    targets = []
    for g in guides:
        per_k = {str(o["k"]): o for o in outs if o["kind"] == "step" and o["guide"] == g}
        section["steps"][g] = per_k
        g1 = per_k["1"]["growth_bytes"]
        for k in (int(k) for k in per_k if k != "1"):
            bound = RSS_LINEAR_SLACK * k * max(g1, 0) + MEMORY_SLACK_BYTES
            targets.append(target(f"memory_linear_k{k}" + ("" if g == guides[0] else f"_{g}"),
                                  f"peak memory growth at K={k} / (linear bound from K=1) ({g} guide)",
                                  per_k[str(k)]["growth_bytes"] / bound, 1.0, "<=", True, g))
    return section, targets


def _leak_targets(outs: list[dict], guides: list[str], device: torch.device,
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    section, targets = {}, []
    for g in guides:
        leak = next(o for o in outs if o["kind"] == "leak" and o["guide"] == g)
        section[g] = leak
        a, b = leak["compared_steps"]
        growth = leak["cuda_growth_bytes"] if device.type == "cuda" else leak["rss_growth_bytes"]
        s = "" if g == guides[0] else f"_{g}"
        targets.append(target("no_memory_growth" + s, f"memory growth (bytes) from step {a} to {b} <= "
                              f"{LEAK_TOLERANCE_BYTES // 2**20} MiB ({g} guide)", float(growth),
                              float(LEAK_TOLERANCE_BYTES), "<=", True, g))
        targets.append(target("no_python_object_growth" + s,
                              f"live Python objects growth from step {a} to {b} < {LEAK_MAX_OBJECTS} "
                              f"({g} guide)", float(leak["gc_objects_growth"]), float(LEAK_MAX_OBJECTS), "<",
                              True, g))
    return section, targets


def _eval_targets(outs: list[dict], size: dict, samples: tuple[int, int],
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    runs = [o for o in outs if o["kind"] == "eval"]
    chunked = {o["samples"]: o for o in runs if o["chunked"]}
    lo, hi = samples
    section = {"size": size, "runs": runs,
               "what": "evaluate(model, PosteriorEncoder guide, held-out data, num_samples) once, in a fresh "
                       "process; chunked: the default eval_chunk; unchunked: every sample of every "
                       "utterance in one vectorised call (the previous behaviour), at the smaller sample "
                       "count"}
    targets = [
        target("eval_peak_memory",
               f"evaluate's peak memory growth with {hi} samples, default chunks <= 1 GiB",
               float(chunked[hi]["growth_bytes"]), float(EVAL_MEMORY_BOUND), "<=", True),
        target("eval_time_linear", f"evaluate's CPU time at {hi} / {lo} samples (default chunks) <= "
               f"{EVAL_LINEAR_SLACK} x {hi // lo}", chunked[hi]["cpu_s"] / chunked[lo]["cpu_s"],
               EVAL_LINEAR_SLACK * hi / lo, "<=", True),
    ]
    return section, targets


# ---------------------------------------------------------------------------------------------------- run


def _jobs(args: argparse.Namespace, guides: list[str], size: dict, device: torch.device, threads: int | None,
          ) -> list[Job]:
    base = {"device": device.type, "seed": args.seed, "threads": threads}
    jobs: list[Job] = []
    if not args.no_memory:
        ks = (PARTICLES[0], PARTICLES[-1]) if args.quick else PARTICLES
        jobs += [{**base, "kind": "step", "size": size, "guide": g, "k": k} for g in guides for k in ks]
    if not args.no_leak:
        steps = list(QUICK_LEAK_STEPS if args.quick else LEAK_STEPS)
        jobs += [{**base, "kind": "leak", "size": LEAK_SIZE, "guide": g, "steps": steps} for g in guides]
    if not args.no_eval_memory:
        eval_size = QUICK_EVAL_SIZE if args.quick else EVAL_SIZE
        lo, hi = QUICK_EVAL_SAMPLES if args.quick else EVAL_SAMPLES
        jobs += [{**base, "kind": "eval", "size": eval_size, "samples": n, "eval_chunk": chunk}
                 for n, chunk in ((lo, None), (hi, None), (lo, UNCHUNKED))]
    return jobs


def _profiles(probs: dict[str, Problem], device: torch.device) -> dict[str, Any]:
    pyro.clear_param_store()
    out = {}
    for g, prob in probs.items():
        k1 = PyroStep(prob, 1, name="prof1")
        out[f"raw_vs_pyro_k1_{g}"] = profile_difference({"base": RawStep(prob), "other": k1}, device)
        out[f"pyro_k1_vs_kl_k8_{g}"] = profile_difference(
            {"base": k1, "other": PyroStep(prob, 1, name="profkl", kl_particles=8)}, device)
        out[f"pyro_k1_vs_vec_k4_{g}"] = profile_difference(
            {"base": k1, "other": PyroStep(prob, 4, vectorize=True, name="prof4")}, device)
    return out


def _explain_misses(result: dict[str, Any]) -> None:
    """Attach to each failed timing target the top line of the profile of its ratio (when profiled)."""
    profiles = result.get("profiles", {})
    which = {"kl_particles_k8": "pyro_k1_vs_kl_k8", "vectorised_k4": "pyro_k1_vs_vec_k4",
             "rowchunked_vectorised_k4": "pyro_k1_vs_vec_k4", "pyro_step_overhead": "raw_vs_pyro_k1"}
    for t in result["targets"] + result["reference_checks"]:
        prefix = next((p for p in which if t["name"].startswith(p)), None)
        prof = profiles.get(f"{which.get(prefix)}_{t['guide']}")
        if t["pass"] is False and prof:
            row = prof["top_extra_ops"][0]
            total = prof["self_cpu_us_per_step"]
            t["explanation"] = (f"profile: {row['op']} +{row['extra_us'] / 1e3:.1f} ms per step "
                                f"({row['base_calls']:g} -> {row['other_calls']:g} calls) of "
                                f"+{(total['other'] - total['base']) / 1e3:.1f} ms self CPU in all")


def _setup(args: argparse.Namespace) -> tuple[torch.device, int | None, str]:
    """Check ``args``, resolve the device, set the torch threads; ``(device, threads, clock)``."""
    _check_args(args)
    device = resolve_device(args.device)
    threads = args.threads or (1 if args.quick and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    clock = args.clock if args.clock != "auto" else (
        "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall")
    if clock == "cpu" and device.type == "cuda":
        raise ValueError("--clock cpu measures host CPU time only; use --clock wall on CUDA")
    return device, threads, clock


def _header(args: argparse.Namespace, device: torch.device, guides: list[str], clock: str, repeats: int,
            inner: int) -> dict[str, Any]:
    return {
        "schema": 3, "mode": "quick" if args.quick else "full", **environment(device),
        "size": QUICK_SIZE if args.quick else FULL_SIZE, "guides": guides, "primary_guide": guides[0],
        "guide_descriptions": {g: GUIDE_DESCRIPTIONS[g] for g in guides},
        "particles": list(PARTICLES), "kl_particles": list(KL_PARTICLES), "repeats": repeats,
        "warmup": args.warmup, "inner_steps": inner, "clock": clock, "seed": args.seed,
        "optimizer": {k: list(v) if isinstance(v, tuple) else v for k, v in OPTIM.items()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "loadavg_start": list(os.getloadavg()),
    }


def _compile_check(result: dict[str, Any], size: dict, device: torch.device, repeats: int, seed: int,
                   clock: str) -> dict[str, Any]:
    result["compile"] = c = compile_flow(size, device, repeats=repeats, seed=seed, clock=clock)
    return target("compile_flow_wins",
                  "torch.compile'd flow forward+backward / eager < 1, values within float tolerance",
                  c.get("compiled_over_eager") if c.get("match") else None, 1.0, "<", "error" not in c)


def _job_sections(args: argparse.Namespace, result: dict[str, Any], outs: list[dict], guides: list[str],
                  device: torch.device) -> list[dict[str, Any]]:
    """Fill the memory, leak and evaluate sections from the jobs' results; their targets."""
    targets = []
    if not args.no_memory:
        result["memory"], extra = _memory_targets(outs, guides, device)
        targets += extra
    if not args.no_leak:
        result["leak"], extra = _leak_targets(outs, guides, device)
        targets += extra
    if not args.no_eval_memory:
        samples = QUICK_EVAL_SAMPLES if args.quick else EVAL_SAMPLES
        result["eval_memory"], extra = _eval_targets(outs, QUICK_EVAL_SIZE if args.quick else EVAL_SIZE,
                                                     samples)
        targets += extra
    return targets


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark for parsed ``args`` and return the result (also printed); nothing is written."""
    device, threads, clock = _setup(args)
    t_start = time.perf_counter()
    guides = list(GUIDES) if args.guide == "both" else [args.guide]
    size = QUICK_SIZE if args.quick else FULL_SIZE
    repeats = args.repeats or (2 if args.quick else 3)
    inner = args.inner or (5 if device.type == "cuda" else 1)
    result = _header(args, device, guides, clock, repeats, inner)
    logger.info("device %s (%s, %d threads), %s clock, %d rounds", result["device"]["name"], device.type,
                torch.get_num_threads(), clock, repeats)
    collect = start_jobs(_jobs(args, guides, size, device, threads),
                         concurrent=args.quick and device.type == "cpu")
    probs = {g: make_problem(size, device, args.seed, g) for g in guides}
    seed_all(args.seed)
    times, paired = measure(_configs(probs, args.ablations), _blocks(guides, args.ablations), repeats=repeats,
                            warmup=args.warmup, inner=inner, seed=args.seed, device=device, clock=clock,
                            log=logger.info)
    result["timings"] = {g: {name: {"repeats_s": ts, "median_s": statistics.median(ts)}
                             for (guide, name), ts in times.items() if guide == g} for g in guides}
    result["ratios"] = {g: _guide_ratios(times, paired, g, args.ablations) for g in guides}
    targets, reference = _timing_targets(result["ratios"], result["timings"], guides, device)
    if args.profile:
        result["profiles"] = _profiles(probs, device)
    if not (args.quick or args.no_compile):
        reference.append(_compile_check(result, size, device, repeats, args.seed, clock))
    targets += _job_sections(args, result, collect(), guides, device)
    result["wall_s"] = time.perf_counter() - t_start
    targets.append(target("gpu_run_under_8_min", "the whole run takes < 480 s (GPU), seconds",
                          result["wall_s"], GPU_RUN_SECONDS, "<", device.type == "cuda" and not args.quick))
    result["targets"], result["reference_checks"] = targets, reference
    _explain_misses(result)
    result["all_applicable_pass"] = all(t["pass"] for t in targets if t["applicable"])
    result["loadavg_end"] = list(os.getloadavg())
    return result


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the benchmark, print the summary and write the JSON (atomically); 0 on success."""
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = resolve_device(args.device)  # a CPU-only machine asked for cuda fails here, before any work
    name = f"{device_slug(device)}{'-quick' if args.quick else ''}.json"
    out = Path(args.out) if args.out else Path(args.out_dir) / name
    if args.generator_step:
        return _generator_step(args, out)
    result = run(args)
    print(format_report(result))
    write_json(out, result)
    print(f"wrote {out}")
    return 0


def _generator_step(args: argparse.Namespace, out: Path) -> int:
    """``--generator-step``: time it on the voice and corpus, merge the entry into ``out`` (kept otherwise)."""
    from ..bench.generator_step import generator_step_bench
    from ..models.refit import refit_guide
    from ..vits.voice import RefitVoice

    if args.corpus is None:
        raise ValueError("--generator-step needs --corpus (an LJSpeech-format corpus)")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    torch.set_num_threads(args.threads or 1)
    voice = RefitVoice.load(args.voice)
    batch = voice.read(args.corpus, max_utterances=args.batch_size)
    c = voice.gen.config
    guide = refit_guide(voice.audio["n_fft"] // 2 + 1, c["inter_channels"], c["hidden_channels"],
                        emb_g=voice.gen.emb_g, seed=args.seed)
    entry = generator_step_bench(voice.model(), guide, batch, repeats=args.repeats or 5, warmup=args.warmup,
                                 seed=args.seed, log=logger.info)
    entry.update(voice=voice.path.name, corpus=str(args.corpus), versions=dict(torch=torch.__version__),
                 loadavg=list(os.getloadavg()))
    result = json.loads(out.read_text()) if out.is_file() else {}
    result["generator_step"] = entry
    write_json(out, result)
    ratios = ", ".join(f"{k} {v['median']:.3f}" for k, v in entry["ratios"].items())
    print(f"generator step ({batch.n} utterances, {entry['frames']} frames): {ratios}; MAS per particle "
          f"{entry['mas_per_particle_s']:.3f} s = {entry['mas_fraction_of_k1']:.1%} of a K = 1 step; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(lambda argv: main(argv, prog="pyro-vits bench"), prog="pyro-vits bench"))
