"""The run folder: its file names (the contract between training, diagnostics and the applications),
and the refuse/overwrite policy (the atomic writes are :mod:`pyro_vits._io`'s). A run folder is written
in place while the run goes on (it is not published whole, unlike :func:`pyro_vits._io.publish_folder`).

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
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from . import _io
from ._io import atomic_write, write_json

__all__ = [
    "CHECKPOINT", "CONFIG", "FIGURES", "INFERENCE_DATA", "METRICS", "RUN_FILES", "SUMMARY",
    "append_record", "check_out_dir", "prepare_run_dir",
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


def append_record(out: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line to ``out/metrics.jsonl``."""
    _io.append_record(out / METRICS, record)


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a run folder that exists and is not empty, unless ``overwrite``."""
    _io.check_folder(out, overwrite, what="out_dir", hint=(
        "refusing to overwrite it: pass overwrite=True (--overwrite) to replace its run files, or "
        f"resume=True (--resume {out}) to continue the run"))


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
