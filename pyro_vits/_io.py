"""Atomic publishing: a file (:func:`atomic_write`, :func:`write_json`), one JSON line (:func:`append_record`)
and a whole folder (:func:`publish_folder`, refusing an occupied one with :func:`check_folder`).

A reader, or a crash, sees either the previous file or folder or the complete new one, never a part."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["append_record", "atomic_write", "check_folder", "check_writable", "naming_path", "publish_folder",
           "write_json"]


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write ``path`` via a temporary file in the same folder and ``os.replace``: a reader (or a crash)
    sees either the previous file or the complete new one."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise naming_path(err, path) from err
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(err, OSError) or _wraps_os_error(err):
            raise naming_path(err, path) from err
        raise


def _wraps_os_error(err: BaseException) -> bool:
    """Whether ``err`` is a ``RuntimeError`` reporting a failed write (``torch.save``'s stream writer wraps the
    file's ``OSError``, e.g. a full disk, in one)."""
    if not isinstance(err, RuntimeError):
        return False
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError):
            return True
        cause = cause.__cause__ or cause.__context__
    text = str(err)
    return any(key in text for key in ("PytorchStreamWriter", "inline_container", "file write failed"))


def naming_path(err: BaseException, path: str | os.PathLike) -> OSError:
    """``err`` (an ``OSError``, or a ``RuntimeError`` wrapping one) as an ``OSError`` whose ``filename`` is
    ``path`` when it names none: the error boundary prints ``cannot write <path>: <reason>``."""
    if isinstance(err, OSError) and err.filename is not None:
        return err
    if isinstance(err, OSError):
        code, reason = err.errno or errno.EIO, err.strerror or str(err) or type(err).__name__
    else:
        cause = err.__cause__ or err.__context__
        code = getattr(cause, "errno", None) or errno.EIO
        reason = getattr(cause, "strerror", None) or str(err).splitlines()[0] or "write failed"
    return OSError(code, reason, str(path))


def check_writable(out: str | os.PathLike, *, what: str = "out") -> None:
    """Fail now (``PermissionError``/``OSError`` naming the folder) when ``out`` cannot be written: a probe file
    is created and removed in ``out`` or, when it does not exist yet, in its nearest existing parent.
    Commands call it before any work."""
    out = Path(out)
    folder = out
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"{what} {out}: {folder} exists and is not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".pyro-vits-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or str(err)
        raise type(err)(err.errno, f"{what} {out} is not writable ({reason})") from err


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
