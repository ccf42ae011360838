"""The applications behind ``pyro-vits <command>`` and ``python examples/<script>.py``.

Contract: every application module ``pyro_vits.apps.<name>`` (and ``pyro_vits.apps.study``) defines
``build_parser(prog: str | None = None) -> argparse.ArgumentParser`` and ``main(argv: Sequence[str] | None =
None) -> int``. ``main`` raises user errors (:data:`USAGE_ERRORS`) instead of printing them;
:func:`run_main` is the one error boundary that turns them into one line on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

USAGE_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, FileExistsError, FileNotFoundError,
                                                 NotADirectoryError, IsADirectoryError, PermissionError,
                                                 KeyError)
"""Exceptions that mean "bad input": one line on stderr, exit code 2 (a traceback only with ``-v``)."""

logger = logging.getLogger("pyro_vits")


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
             prog: str = "pyro-vits", verbose: bool = False) -> int:
    """Run ``main(argv)`` behind the error boundary; returns the process exit code.

    A user error (:data:`USAGE_ERRORS`) → ``prog: error: message`` on stderr and 2 (with ``verbose`` or
    ``-v``/``--verbose`` in ``argv`` also the traceback); a ``FloatingPointError`` (training stopped on a
    NaN/Inf: :class:`pyro_vits.train.NonFiniteError`) → the same line and 1; ``KeyboardInterrupt`` → 130;
    anything else propagates (a bug).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = verbose or "-v" in args or "--verbose" in args
    try:
        code = main(args)
    except (*USAGE_ERRORS, FloatingPointError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if isinstance(err, KeyError):
            message = f"missing key {message}"
        print(f"{prog}: error: {message}", file=sys.stderr)
        if verbose:
            logger.error("traceback:", exc_info=True)
        return 1 if isinstance(err, FloatingPointError) else 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0 if code is None else int(code)
