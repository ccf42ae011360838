"""The applications behind ``pyro-vits <command>`` and ``python examples/<script>.py``.

Contract: every application module ``pyro_vits.apps.<name>`` (and ``pyro_vits.apps.study``) defines
``build_parser(prog: str | None = None) -> argparse.ArgumentParser`` and ``main(argv: Sequence[str] | None =
None) -> int``. ``main`` raises user errors (:data:`USAGE_ERRORS`) instead of printing them;
:func:`run_main` is the one error boundary that turns them into one line on stderr and exit code 2.
"""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Callable, Sequence

from .._io import _wraps_os_error

USAGE_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, FileExistsError, FileNotFoundError,
                                                 NotADirectoryError, IsADirectoryError, PermissionError,
                                                 KeyError, ImportError)
"""Exceptions that mean "bad input" (``ImportError``: a missing optional package, e.g. a voice's): one line
on stderr, exit code 2 (a traceback only with ``-v``)."""

logger = logging.getLogger("pyro_vits")

_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG, errno.EIO})


def os_error_message(err: BaseException) -> str:
    """One line for a file-system error: the path (when known) and the reason."""
    if not isinstance(err, OSError):
        cause = err.__cause__ or err.__context__
        err = cause if isinstance(cause, OSError) else OSError(str(err).splitlines()[0])
    reason = err.strerror or (str(err).splitlines()[0] if str(err) else type(err).__name__)
    if err.filename is None:
        return reason
    if str(err.filename) in reason:
        return reason
    return f"cannot write {err.filename}: {reason}" if err.errno in _WRITE_ERRNOS else f"{err.filename}: {reason}"


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
             prog: str = "pyro-vits", verbose: bool = False) -> int:
    """Run ``main(argv)`` behind the error boundary; returns the process exit code.

    A user error (:data:`USAGE_ERRORS`) → ``prog: error: message`` on stderr and 2 (with ``verbose`` or
    ``-v``/``--verbose`` in ``argv`` also the traceback); a ``FloatingPointError`` (training stopped on a
    NaN/Inf: :class:`pyro_vits.train.NonFiniteError`) → the same line and 1; a file-system error
    (``OSError``, or torch's ``RuntimeError`` wrapping one: a read-only folder, a full disk) → one line
    naming the path and the reason, 2; ``KeyboardInterrupt`` → one line and 130 (a
    :class:`~pyro_vits.train.RunInterrupted` from SIGINT/SIGTERM during ``fit``: how to resume, and 130/143);
    anything else propagates (a bug).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = verbose or "-v" in args or "--verbose" in args
    try:
        code = main(args)
    except (*USAGE_ERRORS, FloatingPointError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if isinstance(err, OSError) and err.strerror is not None:
            message = os_error_message(err)
        if isinstance(err, KeyError):
            message = f"missing key {message}"
        print(f"{prog}: error: {message}", file=sys.stderr)
        if verbose:
            logger.error("traceback:", exc_info=True)
        return 1 if isinstance(err, FloatingPointError) else 2
    except (OSError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not _wraps_os_error(err):
            raise  # a bug
        print(f"{prog}: error: {os_error_message(err)}", file=sys.stderr)
        if verbose:
            logger.error("traceback:", exc_info=True)
        return 2
    except KeyboardInterrupt as err:
        # pyro_vits.train.RunInterrupted (SIGINT/SIGTERM during fit) says where the run is saved
        print(f"{prog}: {str(err) or 'interrupted'}", file=sys.stderr)
        return int(getattr(err, "exit_code", 130))
    return 0 if code is None else int(code)
