"""What the applications share to read their command lines: argparse value types that name what they
expect, ``--config FILE`` (TOML/JSON) and ``--resume RUN_DIR`` as layers of defaults (explicit flags >
resumed run's options > config file > parser defaults), and logging to stderr through tqdm.

Torch-free at import time: a parser can be built (and ``--help`` shown) without loading torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .._configfile import load_config_file

__all__ = [
    "RUN_CONTROL",
    "config_argv",
    "configure_logging",
    "device_name",
    "even_positive_int",
    "layered_argv",
    "load_config_file",
    "nonnegative_int",
    "parse_with_config",
    "positive_float",
    "positive_int",
    "unit_interval",
]

logger = logging.getLogger("pyro_vits")

# options of a saved run that describe how it was invoked, not what it computes: never replayed by --resume
RUN_CONTROL = frozenset({"config", "resume", "overwrite", "init_flow", "quiet", "verbose"})


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
    from .._device import resolve_device

    try:
        resolve_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


# --------------------------------------------------------------------------------------------------
# Config files and saved runs as layers of defaults
# --------------------------------------------------------------------------------------------------


def _saved_run_options(run_dir: str | Path) -> dict[str, Any]:
    """The options a ``fit`` run was started with (``config.json``'s ``extra``)."""
    from .._rundir import CONFIG

    path = Path(run_dir) / CONFIG
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
