"""The benchmark's record: environment, targets with pass/fail, the JSON file and a printed summary."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

__all__ = ["device_name", "device_slug", "environment", "target", "write_json", "format_report"]


def device_name(device: torch.device) -> str:
    """The CUDA card's name, or the CPU model from ``/proc/cpuinfo`` (else ``platform.processor()``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_slug(device: torch.device) -> str:
    """File stem of the results: ``cpu`` on CPU, the card's name in lower case with dashes on CUDA
    (``nvidia-h100-80gb-hbm3``)."""
    if device.type == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or "cuda"


def environment(device: torch.device) -> dict[str, Any]:
    return {
        "device": {"type": device.type, "name": device_name(device), "cpu_count": os.cpu_count(),
                   "torch_threads": torch.get_num_threads()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "pyro": pyro.__version__, "numpy": np.__version__, "cuda": torch.version.cuda},
        "platform": platform.platform(),
        "pyro_validation": pyro.infer.util.is_validation_enabled(),
    }


def target(name: str, description: str, value: float | None, threshold: float, op: str, applicable: bool,
           guide: str | None = None, explanation: str | None = None) -> dict[str, Any]:
    """A judged number: ``pass`` is ``value <op> threshold`` when ``applicable`` and ``value`` is finite,
    else None. ``op`` is ``"<="`` or ``"<"``."""
    if op not in ("<=", "<"):
        raise ValueError(f"op must be '<=' or '<', got {op!r}")
    ok = None
    if applicable and value is not None and math.isfinite(value):
        ok = bool(value <= threshold) if op == "<=" else bool(value < threshold)
    record = {"name": name, "guide": guide, "description": description, "value": value, "op": op,
              "threshold": threshold, "applicable": applicable, "pass": ok}
    if explanation is not None:
        record["explanation"] = explanation
    return record


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(obj, indent=2) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _mib(n: float) -> str:
    return f"{n / 2**20:8.1f} MiB"


def format_report(res: dict[str, Any]) -> str:
    """A plain-text summary: seconds per step, ratios, memory, the profiles' top lines, and the targets."""
    lines: list[str] = []
    add: Callable[[str], None] = lines.append
    guides = res["guides"]
    add(f"{'config':<24}" + "".join(f"{g + ' s/step':>16}" for g in guides))
    for name in dict.fromkeys(n for g in guides for n in res["timings"][g]):
        cells = [res["timings"][g].get(name, {}).get("median_s") for g in guides]
        add(f"{name:<24}" + "".join(f"{c:>16.4f}" if c is not None else f"{'':>16}" for c in cells))
    for g in guides:
        add(f"\n{g + ' guide ratio':<32}{'median':>8}{'min':>8}{'max':>8}")
        for name, r in res["ratios"][g].items():
            add(f"{name:<32}{r['median']:>8.3f}{min(r['repeats']):>8.3f}{max(r['repeats']):>8.3f}")
    for g, per_k in res.get("memory", {}).get("steps", {}).items():
        for k, m in per_k.items():
            add(f"memory {g:<8} K={k:<3}{_mib(m['growth_bytes'])} peak growth, "
                f"{_mib(m['autograd_saved_bytes'])} saved for backward")
    for e in res.get("eval_memory", {}).get("runs", []):
        chunks = f"eval_chunk {e['eval_chunk']}" if e["chunked"] else "unchunked"
        add(f"evaluate {e['samples']:>4} samples, {chunks:<18}: {_mib(e['growth_bytes'])} peak growth, "
            f"{e['wall_s']:.1f} s wall, {e['cpu_s']:.1f} s CPU")
    if "compile" in res:
        c = res["compile"]
        add("torch.compile: " + (c["error"] if "error" in c else
                                 f"compiled/eager {c['compiled_over_eager']:.3f}, "
                                 f"compile {c['compile_s']:.0f} s, "
                                 f"max rel diff {c['max_rel_diff']:.2e}"))
    for name, prof in res.get("profiles", {}).items():
        total = prof["self_cpu_us_per_step"]
        add(f"\nprofile {name} (self CPU ms per step): base {total['base'] / 1e3:.1f}, "
            f"other {total['other'] / 1e3:.1f}")
        for row in prof["top_extra_ops"][:6]:
            add(f"  {row['op'][:44]:<46}{row['extra_us'] / 1e3:>9.2f} ms  calls {row['base_calls']:g}/"
                f"{row['other_calls']:g}")
    add("")
    for t in res["targets"] + res["reference_checks"]:
        ref = t in res["reference_checks"]
        flag = "n/a " if not t["applicable"] else ("pass" if ref and t["pass"] else "fail" if ref else
                                                   "PASS" if t["pass"] else "FAIL")
        value = "None" if t["value"] is None else f"{t['value']:.4g}"
        add(f"[{flag}] {t['name']:<44} {value} {t['op']} {t['threshold']:g}   ({t['description']})")
    add("(lower-case pass/fail: reference checks, not judged)")
    return "\n".join(lines)
