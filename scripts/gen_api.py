"""Write docs/api.md from the package's docstrings: ``python scripts/gen_api.py`` (``make docs-api``).

Every public module of ``pyro_vits`` (no leading underscore in its dotted name) gets a section: its
docstring's first paragraph, then each name of its ``__all__`` (or, without one, each public function and
class defined in it) with its signature and docstring; classes also list their public methods and
properties. ``--check`` exits 1 when the committed page differs from what the docstrings give.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api.md"

HEADER = """# pyro_vits API

Generated from the docstrings by `scripts/gen_api.py` (`make docs-api`); a test fails when this page is
stale. Conventions for every module:

- Latents are `(..., C, T)`: any leading batch dims (Pyro's vectorised particles add one), `C` channels,
  `T` frames. Masks are `(..., 1, T)`, 1 for a real frame, 0 for padding; padded frames contribute exactly 0
  to every log-density, entropy and KL. Speaker conditioning `g` is `(..., gin, 1)`.
- The flow's forward direction `z -> z_p` is VITS's training direction; `reverse=True` / `.inv` is inference.
- Units: *per utterance* = nats summed over an utterance's valid `(C, T)` elements (shape `(...)`);
  *per frame* = nats per valid frame with channels summed (VITS's `kl_loss` normalisation); *per element*.
- Public functions validate their inputs and raise `ValueError` / `TypeError` naming the argument.
- Everything random takes a `seed` and leaves the global RNG as it was unless stated otherwise.
"""


def public_modules() -> list[ModuleType]:
    """``pyro_vits`` and its public submodules, sorted by name."""
    import pyro_vits

    names = ["pyro_vits"] + [m.name for m in pkgutil.walk_packages(pyro_vits.__path__, "pyro_vits.")
                             if not any(part.startswith("_") for part in m.name.split("."))]
    return [importlib.import_module(name) for name in sorted(names)]


def _doc(obj: object) -> str:
    return inspect.cleandoc(obj.__doc__) if obj.__doc__ else ""


def _signature(obj: object) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""


def _names(module: ModuleType) -> list[str]:
    if hasattr(module, "__all__"):
        return [n for n in module.__all__ if not n.startswith("__")]
    return sorted(n for n, obj in vars(module).items()
                  if not n.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
                  and obj.__module__ == module.__name__)


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" if line else "" for line in text.splitlines())


def _members(cls: type) -> list[str]:
    lines = []
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, property):
            kind, target, sig = "property", member.fget, ""
        elif isinstance(member, (classmethod, staticmethod)):
            kind = "classmethod" if isinstance(member, classmethod) else "staticmethod"
            target = member.__func__
            sig = _signature(getattr(cls, name))
        elif inspect.isfunction(member):
            kind, target, sig = "method", member, _signature(member)
        else:
            continue
        summary = _doc(target).split("\n\n")[0].replace("\n", " ")
        lines.append(f"- `{name}{sig}`" + (f" ({kind})" if kind != "method" else "") +
                     (f": {summary}" if summary else ""))
    return lines


def _entry(module: ModuleType, name: str) -> str:
    obj = getattr(module, name)
    if inspect.isclass(obj):
        head = f"### class `{name}{_signature(obj)}`"
        if obj.__module__ != module.__name__:
            head += f" (from `{obj.__module__}`)"
        parts = [head, _doc(obj)]
        members = _members(obj)
        if members:
            parts.append("\n".join(members))
    elif callable(obj):
        head = f"### `{name}{_signature(obj)}`"
        if getattr(obj, "__module__", module.__name__) != module.__name__:
            head += f" (from `{obj.__module__}`)"
        parts = [head, _doc(obj)]
    else:
        keys = sorted(obj) if isinstance(obj, (set, frozenset)) else obj  # sets: no stable order otherwise
        listed = (isinstance(obj, (dict, tuple, list, set, frozenset))
                  and all(isinstance(k, str) for k in keys))
        parts = [f"### `{name}`", f"`{type(obj).__name__}`" + (f" of {len(obj)} entries: "
                 + ", ".join(f"`{k}`" for k in keys) if listed else "")]
    return "\n\n".join(p for p in parts if p)


def _home(module: ModuleType, name: str) -> str | None:
    """The public module that defines ``module.name`` when it is another one (documented there)."""
    home = getattr(getattr(module, name), "__module__", None)
    private = isinstance(home, str) and any(p.startswith("_") for p in home.split("."))
    if not isinstance(home, str) or home == module.__name__ or private:
        return None
    return home if home.startswith("pyro_vits") else None


def render() -> str:
    """The whole page."""
    sections = [HEADER.rstrip()]
    for module in public_modules():
        summary = _doc(module).split("\n\n")[0]
        parts = [f"## `{module.__name__}`", summary]
        names = _names(module)
        parts += [_entry(module, name) for name in names if _home(module, name) is None]
        elsewhere = [f"`{name}` (`{_home(module, name)}`)" for name in names if _home(module, name)]
        if elsewhere:
            parts.append("Also here: " + ", ".join(elsewhere) + ".")
        sections.append("\n\n".join(p for p in parts if p))
    return "\n\n".join(sections) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        stale = not OUT.is_file() or OUT.read_text() != text
        print(f"{OUT} is {'stale: run make docs-api' if stale else 'up to date'}")
        return int(stale)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
