"""The run folder: its file names (the contract between training, diagnostics and the applications),
the refuse/overwrite policy, and atomic writes.

::

    <run>/config.json          every effective setting (see FitConfig.record)
    <run>/metrics.jsonl        one JSON object per logged step
    <run>/checkpoint.pt        parameters, optimiser and random states, the loop's position
    <run>/inference_data.nc    ArviZ InferenceData of the run; summary.csv / summary.md its summary
    <run>/figures/*.png
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CHECKPOINT", "CONFIG", "FIGURES", "INFERENCE_DATA", "METRICS", "RUN_FILES", "SUMMARY",
    "append_record", "atomic_write", "check_out_dir", "prepare_run_dir", "write_json",
]

logger = logging.getLogger("pyro_vits.train")

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
INFERENCE_DATA = "inference_data.nc"
SUMMARY = "summary"  # summary.csv and summary.md
FIGURES = "figures"
RUN_FILES = (CONFIG, METRICS, CHECKPOINT)
"""The files :func:`~pyro_vits.train.fit` writes (and, unless resuming, deletes before a new run)."""


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write ``path`` via a temporary file in the same folder and ``os.replace``: a reader (or a crash)
    sees either the previous file or the complete new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented, key-sorted JSON, written atomically."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=True))


def append_record(out: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line to ``out/metrics.jsonl``."""
    with open(out / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a run folder that exists and is not empty, unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir {out} exists and is not a directory")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
        raise FileExistsError(
            f"out_dir {out} is not empty ({shown}); refusing to overwrite it: pass overwrite=True "
            f"(--overwrite) to replace its run files, or resume=True (--resume {out}) to continue the run"
        )


def _remove_run_files(out: Path, keep_checkpoint: bool) -> None:
    """Delete the temporary files of interrupted writes in ``out`` and, unless ``keep_checkpoint``, the run
    files (config.json and metrics.jsonl are rewritten either way)."""
    for name in RUN_FILES:
        if not keep_checkpoint:
            (out / name).unlink(missing_ok=True)
        for tmp in out.glob(f".{name}.*.tmp"):
            tmp.unlink()


def prepare_run_dir(out: Path, config: Mapping[str, Any], records: Iterable[Mapping[str, Any]], *,
                    resume: bool, overwrite: bool) -> None:
    """Create ``out``, clear its run files (keeping the checkpoint when ``resume``), write ``config.json``
    and ``metrics.jsonl`` with the ``records`` logged so far."""
    if overwrite and out.is_dir() and any(out.iterdir()):
        logger.warning("overwriting the run files in %s", out)
    out.mkdir(parents=True, exist_ok=True)
    _remove_run_files(out, keep_checkpoint=resume)
    write_json(out / CONFIG, config)
    lines = [json.dumps(r) + "\n" for r in records]
    atomic_write(out / METRICS, lambda f: f.writelines(lines))
