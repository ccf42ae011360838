"""``pyro-vits``: the project's command line.

    pyro-vits fit --steps 2000 --device cuda --out runs/a  # examples/fit_vits_prior.py: teacher -> student
    pyro-vits fit --config fit.toml --steps 100             # file values are defaults, explicit flags win
    pyro-vits fit --resume runs/a                           # continue a stopped run from its checkpoint
    pyro-vits fit --init-flow G_100000.pth                  # start the prior flow from a VITS checkpoint
    pyro-vits study --preset quick                          # the KL-estimator study
    pyro-vits bench --quick                                 # benchmarks/run.py

``fit``, ``study`` and ``bench`` run the repository's scripts (a source checkout installed with
``pip install -e .``); ``pyro-vits COMMAND --help`` lists each command's options with their defaults.
Exit codes: 0 done; 1 training stopped on a NaN/Inf loss or gradient (the last checkpoint is intact);
2 invalid input (an option or its value, a missing or malformed file, a refused run folder, no CUDA);
130 interrupted.

The argparse types and the config-file layering here are shared with the example scripts.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import ModuleType
from typing import Any

from tqdm.auto import tqdm

__all__ = [
    "COMMANDS",
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

logger = logging.getLogger("pyro_vits")

REPO = Path(__file__).resolve().parents[1]
# options of a saved run that describe how it was invoked, not what it computes: never replayed by --resume
RUN_CONTROL = frozenset({"config", "resume", "overwrite", "init_flow", "quiet", "verbose"})
USAGE_ERRORS = (ValueError, TypeError, FileExistsError, FileNotFoundError, NotADirectoryError,
                IsADirectoryError, PermissionError)


# --------------------------------------------------------------------------------------------------
# argparse value types: each names what it expects (argparse prefixes the option)
# --------------------------------------------------------------------------------------------------


def _typed(text: str, convert: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Any:
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    return _typed(text, int, lambda v: v >= 1, "a positive int")


def nonnegative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    return _typed(text, int, lambda v: v >= 0, "a non-negative int")


def even_positive_int(text: str) -> int:
    """argparse type: an even int >= 2 (VITS's couplings split the channels in halves)."""
    return _typed(text, int, lambda v: v >= 2 and v % 2 == 0,
                  "an even positive int (couplings split it in halves)")


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    return _typed(text, float, lambda v: 0 < v < float("inf"), "a positive float")


def unit_interval(text: str) -> float:
    """argparse type: a float in (0, 1]."""
    return _typed(text, float, lambda v: 0 < v <= 1, "a float in (0, 1]")


def device_name(text: str) -> str:
    """argparse type: ``auto``, ``cpu``, ``cuda`` or ``cuda:<i>``, usable here (a missing CUDA fails now)."""
    from .train import resolve_device  # torch/pyro only once a device is parsed

    try:
        resolve_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


# --------------------------------------------------------------------------------------------------
# Config files and saved runs as layers of defaults
# --------------------------------------------------------------------------------------------------


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML (``.toml``) or JSON (``.json``) file of ``option = value`` pairs."""
    path = Path(path)
    if path.suffix not in (".toml", ".json"):
        raise ValueError(f"config file {path} must end in .toml or .json")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        values = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except ValueError as err:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"config file {path} is not valid {path.suffix[1:].upper()}: {err}") from err
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a table of option = value, "
                         f"got {type(values).__name__}")
    return values


def _saved_run_options(run_dir: str | Path) -> dict[str, Any]:
    """The options a ``fit`` run was started with (``config.json``'s ``extra``)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume {run_dir}: it has no config.json "
                                "(not a pyro-vits fit run folder)")
    try:
        extra = json.loads(path.read_text()).get("extra")
    except (ValueError, AttributeError) as err:
        raise ValueError(f"cannot resume {run_dir}: {path} is not a fit config ({err})") from err
    if not isinstance(extra, dict):
        raise ValueError(f"cannot resume {run_dir}: {path} holds no saved options ('extra')")
    return extra


Actions = dict[str, argparse.Action]


def _options(parser: argparse.ArgumentParser) -> tuple[Actions, Actions]:
    """``(by long option name without '--', by dest)`` of the user-settable options; a dest with several
    options maps to its ``--x/--no-x`` action if it has one, else to its first."""
    by_option: dict[str, argparse.Action] = {}
    by_dest: dict[str, argparse.Action] = {}
    for action in parser._actions:  # argparse has no public accessor
        if not action.option_strings or action.help == argparse.SUPPRESS or isinstance(
                action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        for option in action.option_strings:
            if option.startswith("--"):
                by_option[option[2:]] = action
        if action.dest not in by_dest or isinstance(action, argparse.BooleanOptionalAction):
            by_dest[action.dest] = action
    return by_option, by_dest


def _long_flag(action: argparse.Action) -> str:
    return next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])


def _tokens(action: argparse.Action, value: Any, option: str | None, where: str) -> list[str]:
    """Command-line tokens setting ``action`` to ``value``, checked like a typed flag. ``option``: the
    option name the value was given under (``x = true`` means ``--x``), or None for a dest."""
    flag = _long_flag(action)
    if value is None:
        return []
    if action.nargs == 0 and not isinstance(value, bool) and (option or isinstance(
            action, argparse.BooleanOptionalAction)):
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if isinstance(action, argparse.BooleanOptionalAction):
        negated = option is not None and option.startswith("no-") and f"--{option}" in action.option_strings
        return [flag if value != negated else "--no-" + flag[2:]]
    if action.nargs == 0:  # store_true / store_false / store_const
        if option is not None:
            return [f"--{option}"] if value else []
        if value == action.const or value == action.default:
            return [flag] if value == action.const else []
        raise ValueError(f"{where} must be {action.const!r} or {action.default!r}, got {value!r}")
    many = action.nargs not in (None, "?")
    items = value if many and isinstance(value, list) else [value]
    texts = []
    for item in items:
        if isinstance(item, (bool, dict, list)) and action.type is not None:
            raise ValueError(f"{where}: expected a value for {flag}, got {item!r}")
        text = repr(item) if isinstance(item, float) else str(item)
        try:
            converted = action.type(text) if action.type is not None else text
        except (argparse.ArgumentTypeError, TypeError, ValueError) as err:
            raise ValueError(f"{where} {err}") from None
        if action.choices is not None and converted not in action.choices:
            raise ValueError(f"{where} must be one of {list(action.choices)}, got {item!r}")
        texts.append(text)
    return [flag, *texts] if many else [f"{flag}={texts[0]}"]


def config_argv(parser: argparse.ArgumentParser, values: Mapping[str, Any], source: str,
                skip: Sequence[str] = (), strict: bool = True) -> list[str]:
    """``values`` (keyed by long option name or dest, ``-`` or ``_``) as command-line tokens for ``parser``,
    each value checked by its option's type and choices. ``skip``: dests left out; unknown names raise
    ValueError (``strict``) or are skipped with a log message."""
    by_option, by_dest = _options(parser)
    argv: list[str] = []
    for key, value in values.items():
        name = str(key).replace("_", "-")
        action = by_option.get(name)
        dest_action = by_dest.get(name.replace("-", "_"))
        if (action or dest_action) is None:
            if strict:
                raise ValueError(f"{source}: unknown option {key!r}; known: {', '.join(sorted(by_option))}")
            logger.debug("%s: option %r is not known to %s; ignored", source, key, parser.prog)
            continue
        if (action or dest_action).dest in skip:
            continue
        argv += _tokens(action or dest_action, value, name if action else None, f"{source}: {key}")
    return argv


def _explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The dests set by ``argv``'s own option tokens (exact names, ``--x`` or ``--x=v``)."""
    dest_of = {o: a.dest for a in parser._actions for o in a.option_strings}
    return {dest_of[t.split("=", 1)[0]] for t in argv if t.startswith("-") and t.split("=", 1)[0] in dest_of}


def _pop_option(argv: Sequence[str], flag: str) -> tuple[str | None, list[str]]:
    """The value of ``flag`` in ``argv`` (the last one) and ``argv`` without it."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument(flag, default=None)
    known, rest = pre.parse_known_args(list(argv))
    return getattr(known, flag.lstrip("-").replace("-", "_")), rest


def layered_argv(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``argv`` preceded by tokens for the defaults it selects: a ``--config FILE`` (dropped from ``argv``
    unless ``parser`` has ``--config``) and, when ``parser`` has ``--resume RUN_DIR``, that run's saved
    options (over the file's). Options ``argv`` sets itself are not layered: explicit flags win."""
    dests = {a.dest for a in parser._actions}
    config, rest = _pop_option(argv, "--config")
    argv = list(argv) if "config" in dests else rest
    layers = []
    if config is not None:
        values = load_config_file(config)
        for key in ("config", "resume"):
            if key in values:
                raise ValueError(f"config file {config}: {key!r} cannot be set in a config file; "
                                 f"pass --{key}")
        layers += config_argv(parser, values, f"config file {config}", skip=_explicit_dests(parser, argv))
    resume = _pop_option(argv, "--resume")[0] if "resume" in dests else None
    if resume is not None:
        saved = _saved_run_options(resume)
        skip = _explicit_dests(parser, argv) | RUN_CONTROL
        layers += config_argv(parser, saved, f"{resume}/config.json", skip=skip, strict=False)
    return layers + argv


def parse_with_config(parser: argparse.ArgumentParser,
                      argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args`` of :func:`layered_argv` (``argv`` defaults to ``sys.argv[1:]``)."""
    argv = sys.argv[1:] if argv is None else argv
    return parser.parse_args(layered_argv(parser, argv))


# --------------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------------


class _TqdmHandler(logging.StreamHandler):
    """Writes records to stderr through ``tqdm.write`` so that progress bars stay intact."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise
            self.handleError(record)


def configure_logging(quiet: bool = False, verbose: bool = False) -> None:
    """Show the ``pyro_vits`` logger on stderr: warnings and errors with ``quiet``, debug records with
    ``verbose``, else information too."""
    if quiet and verbose:
        raise ValueError("--quiet and --verbose exclude each other")
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.addHandler(handler)


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------


def _load_script(relative: str, command: str) -> ModuleType:
    """The repository script ``relative`` as a module (loaded once per path)."""
    path = REPO / relative
    if not path.is_file():
        raise FileNotFoundError(f"pyro-vits {command} runs {relative} from a source checkout "
                                f"(pip install -e .), and there is none at {path}")
    name = f"_pyro_vits_script_{abs(hash(str(path)))}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses in the script look their module up while it executes
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def _run_fit(argv: list[str], top: argparse.Namespace) -> None:
    example = _load_script("examples/fit_vits_prior.py", "fit")
    args = parse_with_config(example.build_parser("pyro-vits fit"), argv)
    args.quiet, args.verbose = args.quiet or top.quiet, args.verbose or top.verbose
    configure_logging(args.quiet, args.verbose)
    example.main(args)


def _run_study(argv: list[str], top: argparse.Namespace) -> None:
    study = importlib.import_module("pyro_vits.study")
    if callable(getattr(study, "build_parser", None)) and callable(getattr(study, "main", None)):
        parser = study.build_parser()
        parser.prog = "pyro-vits study"
        study.main(parse_with_config(parser, argv))
        return
    example = _load_script("examples/compare_kl_estimators.py", "study")
    config, argv = _pop_option(argv, "--config")
    if config is not None:
        raise ValueError("study --config needs pyro_vits.study.build_parser(), which this version lacks")
    example.main(example.parse_args(argv))


def _run_bench(argv: list[str], top: argparse.Namespace) -> None:
    bench = _load_script("benchmarks/run.py", "bench")
    make_parser = getattr(bench, "build_parser", None) or getattr(bench, "_parser", None)
    if make_parser is not None:
        argv = layered_argv(make_parser(), argv)
        device = getattr(make_parser().parse_args(argv), "device", None)
        if device is not None:  # a missing CUDA is a usage error (exit code 2) here as in fit and study
            from .train import resolve_device

            resolve_device(device)
    elif _pop_option(argv, "--config")[0] is not None:
        raise ValueError("bench --config needs benchmarks/run.py to expose its argument parser")
    bench.main(argv)


@dataclass(frozen=True)
class Command:
    summary: str
    run: Callable[[list[str], argparse.Namespace], None]


COMMANDS: dict[str, Command] = {
    "fit": Command("fit a student VITS prior by SVI to a teacher's data (examples/fit_vits_prior.py)",
                   _run_fit),
    "study": Command("the KL-estimator study (pyro_vits.study; examples/compare_kl_estimators.py)",
                     _run_study),
    "bench": Command("time the Pyro KL step against the hand-written one (benchmarks/run.py)", _run_bench),
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _version() -> str:
    try:
        return version("pyro_vits")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: global options, then ``COMMAND`` and the command's own options."""
    paragraphs = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(
        prog="pyro-vits", formatter_class=_HelpFormatter,
        description="The VITS prior as a Pyro program: fit it, study its KL estimators, benchmark it.",
        epilog="commands:\n" + "\n".join(f"  {name:6s} {c.summary}" for name, c in COMMANDS.items())
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
    """Run ``pyro-vits`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    top = build_parser().parse_args(argv)
    configure_logging(top.quiet, top.verbose)
    try:
        COMMANDS[top.command].run(list(top.args), top)
    except Exception as err:
        from .train import NonFiniteError  # torch/pyro only once a command runs

        if isinstance(err, NonFiniteError):
            logger.error("pyro-vits %s: %s", top.command, err)
            return 1
        if not isinstance(err, USAGE_ERRORS):
            raise
        logger.error("pyro-vits %s: %s", top.command, err)
        logger.debug("traceback:", exc_info=True)
        return 2
    except KeyboardInterrupt:
        logger.error("pyro-vits %s: interrupted", top.command)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
