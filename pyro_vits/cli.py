"""``pyro-vits``: the project's command line.

    pyro-vits fit --steps 2000 --device cuda --out runs/a  # teacher -> student (pyro_vits.apps.fit)
    pyro-vits fit --config fit.toml --steps 100             # file values are defaults, explicit flags win
    pyro-vits fit --resume runs/a                           # continue a stopped run from its checkpoint
    pyro-vits fit --init-flow G_100000.pth                  # start the prior flow from a VITS checkpoint
    pyro-vits study --preset quick                          # the KL-estimator study
    pyro-vits bench --quick                                 # the benchmarks

Each command is an application module (``build_parser(prog)``, ``main(argv)``; see :mod:`pyro_vits.apps`)
imported only when it runs; ``pyro-vits COMMAND --help`` lists its options with their defaults.
Exit codes: 0 done; 1 training stopped on a NaN/Inf loss or gradient (the last checkpoint is intact);
2 invalid input (an option or its value, a missing or malformed file, a refused run folder, no CUDA);
130 interrupted.

The argparse types and the config-file layering live in :mod:`pyro_vits.apps._args` (re-exported here).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import inspect
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType

from .apps import run_main
from .apps._args import (
    RUN_CONTROL,
    config_argv,
    configure_logging,
    device_name,
    even_positive_int,
    layered_argv,
    load_config_file,
    nonnegative_int,
    parse_with_config,
    positive_float,
    positive_int,
    unit_interval,
)

__all__ = [
    "COMMANDS",
    "RUN_CONTROL",
    "build_parser",
    "config_argv",
    "configure_logging",
    "device_name",
    "even_positive_int",
    "layered_argv",
    "load_config_file",
    "main",
    "nonnegative_int",
    "parse_with_config",
    "positive_float",
    "positive_int",
    "unit_interval",
]


@dataclass(frozen=True)
class Command:
    """A ``pyro-vits`` command: its one-line summary and the application modules that implement it (the
    first importable one runs)."""

    summary: str
    modules: tuple[str, ...]

    def module_name(self) -> str | None:
        return next((m for m in self.modules if _importable(m)), None)


def _importable(name: str) -> bool:
    """Whether module ``name`` can be imported, found without importing it or its parent package."""
    if name in sys.modules:
        return True
    parent, _, child = name.rpartition(".")
    try:
        spec = importlib.util.find_spec(parent)  # imports the parent's parents only
    except (ModuleNotFoundError, ValueError):
        return False
    locations = None if spec is None else spec.submodule_search_locations
    return bool(locations) and importlib.machinery.PathFinder.find_spec(child, list(locations)) is not None


TABLE: dict[str, Command] = {
    "fit": Command("fit a student VITS prior by SVI to a teacher's data", ("pyro_vits.apps.fit",)),
    "study": Command("the KL-estimator study", ("pyro_vits.apps.study",)),
    "bench": Command("time the Pyro KL step against the hand-written one", ("pyro_vits.apps.bench",)),
    "audit": Command("audit a VITS checkpoint's KL on real speech", ("pyro_vits.apps.audit",)),
    "corpus": Command("synthesise an LJSpeech-format corpus with espeak-ng", ("pyro_vits.apps.corpus",)),
    "fit-speech": Command("fit the prior and posterior on real speech", ("pyro_vits.apps.fit_speech",)),
    "speech-study": Command("train the KL-loss variants on speech and compare them",
                            ("pyro_vits.apps.speech_study",)),
    "refit-posterior": Command("refit VITS's enc_q against a trained voice", ("pyro_vits.apps.refit_posterior",)),
    "real-study": Command("VITS's KL regime on a real trained voice (docs/real_vits.md)",
                          ("pyro_vits.apps.real_study",)),
}
"""Every command with the module(s) behind it; :data:`COMMANDS` lists those installed."""

COMMANDS: dict[str, Command] = {name: c for name, c in TABLE.items() if c.module_name() is not None}
"""The commands of this installation."""


def _app(command: str) -> ModuleType:
    """The application module of ``command`` (one of :data:`COMMANDS`)."""
    return importlib.import_module(TABLE[command].module_name())


def _run_command(command: str, argv: list[str], top: argparse.Namespace) -> int | None:
    """Run ``command``'s application on ``argv`` (the top-level -q/-v forwarded where it has them)."""
    app = _app(command)
    prog = f"pyro-vits {command}"
    parameters = inspect.signature(app.build_parser).parameters
    parser = app.build_parser(prog) if parameters else app.build_parser()
    options = {o for action in parser._actions for o in action.option_strings}
    argv = argv + [flag for flag, on in (("--quiet", top.quiet), ("--verbose", top.verbose))
                   if on and flag in options]
    if "prog" in inspect.signature(app.main).parameters:
        return app.main(argv, prog=prog)
    return app.main(argv)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _version() -> str:
    try:
        return version("pyro_vits")
    except PackageNotFoundError:
        return "unknown"


def build_parser(prog: str | None = "pyro-vits") -> argparse.ArgumentParser:
    """The top-level parser: global options, then ``COMMAND`` and the command's own options."""
    paragraphs = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=_HelpFormatter,
        description="The VITS prior as a Pyro program: fit it, study its KL estimators, benchmark it.",
        epilog="commands:\n" + "\n".join(f"  {name:10s} {c.summary}" for name, c in COMMANDS.items())
        + "\n\nexamples:\n" + "\n\n".join(paragraphs[1:3]).replace("``", ""),
    )
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="only warnings and errors on stderr; no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug messages (fit: every logged record) and tracebacks of errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help=f"one of {', '.join(COMMANDS)}")
    parser.add_argument("args", nargs=argparse.REMAINDER, metavar="...",
                        help="the command's options (pyro-vits COMMAND --help)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pyro-vits`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code (see the module
    docstring) from :func:`pyro_vits.apps.run_main`, the one error boundary."""
    top = build_parser().parse_args(argv)
    configure_logging(top.quiet, top.verbose)
    def run(args: Sequence[str] | None) -> int | None:
        return _run_command(top.command, list(args or ()), top)

    return run_main(run, top.args, prog=f"pyro-vits {top.command}", verbose=top.verbose)


if __name__ == "__main__":
    sys.exit(main())
