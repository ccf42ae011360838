"""The run folder: its file names (the contract between training, diagnostics and the applications),
and the refuse/overwrite policy (the atomic writes are :mod:`pyro_vits._io`'s). A run folder is written
in place while the run goes on (it is not published whole, unlike :func:`pyro_vits._io.publish_folder`).

::

    <run>/config.json          every effective setting (see FitConfig.record)
    <run>/metrics.jsonl        one JSON object per logged step
    <run>/checkpoint.pt        parameters, optimiser and random states, the loop's position
    <run>/inference_data.nc    ArviZ InferenceData of the run; summary.csv / summary.md its summary
    <run>/figures/*.png
    <run>/vits/G_<step>.pth, <run>/vits/config.json   (fit-speech: the exported VITS generator)

:data:`RUN_OUTPUTS` lists them all: ``--overwrite`` (and a new run) deletes exactly these, nothing else.
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
    "CHECKPOINT", "CONFIG", "FIGURES", "INFERENCE_DATA", "METRICS", "RUN_FILES", "RUN_OUTPUTS", "SUMMARY",
    "append_record", "check_out_dir", "prepare_run_dir", "run_outputs",
]

logger = logging.getLogger("pyro_vits.train")

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
INFERENCE_DATA = "inference_data.nc"
SUMMARY = "summary"  # summary.csv and summary.md
FIGURES = "figures"
RUN_FILES = (CONFIG, METRICS, CHECKPOINT)
"""The files :func:`~pyro_vits.train.fit` writes."""
VITS_EXPORT = "vits"
RUN_OUTPUTS = (*RUN_FILES, INFERENCE_DATA, f"{SUMMARY}.csv", f"{SUMMARY}.md", f"{FIGURES}/*.png",
               f"{VITS_EXPORT}/G_*.pth", f"{VITS_EXPORT}/config.json")
"""The manifest of a run folder (names and globs relative to it): everything ``fit`` and the applications
that finish a run write there. A new run (``--overwrite``) deletes these and nothing else; a resumed one
deletes all but the checkpoint (they describe the run before it continued)."""


def run_outputs(out: Path) -> list[Path]:
    """The files of :data:`RUN_OUTPUTS` present in ``out`` (and the temporary files of interrupted writes)."""
    found = []
    for pattern in RUN_OUTPUTS:
        found += sorted(out.glob(pattern))
        head, _, tail = pattern.rpartition("/")
        found += sorted(out.glob(f"{head + '/' if head else ''}.{tail}.*.tmp"))
    return [p for p in found if p.is_file() or p.is_symlink()]


def append_record(out: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line to ``out/metrics.jsonl``."""
    _io.append_record(out / METRICS, record)


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a run folder that exists and is not empty, unless ``overwrite``."""
    _io.check_folder(out, overwrite, what="out_dir", hint=(
        "refusing to overwrite it: pass overwrite=True (--overwrite) to replace its run files, or "
        f"resume=True (--resume {out}) to continue the run"))


def _remove_run_files(out: Path, keep_checkpoint: bool) -> None:
    """Delete the files of :data:`RUN_OUTPUTS` in ``out`` (and the temporary files of interrupted writes),
    keeping the checkpoint when ``keep_checkpoint``; emptied ``figures/``, ``vits/`` folders go too."""
    for path in run_outputs(out):
        if not (keep_checkpoint and path == out / CHECKPOINT):
            path.unlink(missing_ok=True)
    for folder in (FIGURES, VITS_EXPORT):
        if (out / folder).is_dir() and not any((out / folder).iterdir()):
            (out / folder).rmdir()


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
