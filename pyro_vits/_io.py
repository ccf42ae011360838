"""Atomic publishing: a file (:func:`atomic_write`, :func:`write_json`), one JSON line (:func:`append_record`)
and a whole folder (:func:`publish_folder`, refusing an occupied one with :func:`check_folder`).

A reader, or a crash, sees either the previous file or folder or the complete new one, never a part."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["append_record", "atomic_write", "check_folder", "publish_folder", "write_json"]


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


def append_record(path: Path, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line to the file ``path``."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


REPLACE_HINT = "pass overwrite=True (--overwrite) to replace it"


def check_folder(out: Path, overwrite: bool, *, what: str = "out", hint: str = REPLACE_HINT) -> None:
    """Refuse ``out`` when it is not a folder (``NotADirectoryError``) or, unless ``overwrite``, a non-empty
    folder (``FileExistsError``: ``<what> <out> is not empty (<its first entries>); <hint>``)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{what} {out} exists and is not a directory")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
        raise FileExistsError(f"{what} {out} is not empty ({shown}); {hint}")


@contextmanager
def publish_folder(out: str | os.PathLike, *, overwrite: bool = False, what: str = "out",
                   hint: str = REPLACE_HINT) -> Iterator[Path]:
    """Build a folder and publish it as ``out``: yields a fresh temporary sibling folder; when the block ends
    it is renamed to ``out`` (an existing ``out`` is first renamed aside, then removed); when the block
    raises it is removed and ``out`` is untouched. ``out`` is checked first (:func:`check_folder`): a
    non-empty one is replaced only with ``overwrite``."""
    out = Path(out)
    check_folder(out, overwrite, what=what, hint=hint)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would outlive the rename
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.rename(out, old / out.name)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)
