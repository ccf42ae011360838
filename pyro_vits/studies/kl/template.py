"""The docs' template engine: ``{{ dotted.path:format }}`` placeholders filled from the results JSON."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["render_markdown"]


def _child(value: Any, part: str, path: str) -> Any:
    """``value[part]`` (mapping) or ``value[int(part)]`` (list); ``KeyError`` naming ``path`` otherwise."""
    if isinstance(value, Mapping) and part in value:
        return value[part]
    if isinstance(value, list) and re.fullmatch(r"-?\d+", part) and -len(value) <= int(part) < len(value):
        return value[int(part)]
    raise KeyError(f"placeholder {{{{ {path} }}}}: no key {part!r}")


_PLACEHOLDER = re.compile(r"\{\{\s*([^{}:\s]+)\s*(?::\s*([^{}]*?))?\s*\}\}")


def render_markdown(template: str, results: Mapping[str, Any]) -> str:
    """Replace every ``{{ dotted.path:format }}`` in ``template`` by ``format(results[dotted][path], format)``
    (e.g. ``{{ quality.cos2d.truth:.4f }}``; an integer part indexes a list; ``\\.`` is a dot inside a key,
    as in ``{{ regime.by_kl.0\\.1.channels }}``); a path that does not resolve raises ``KeyError`` naming it."""
    if not isinstance(template, str):
        raise TypeError(f"template must be a str, got {type(template).__name__}")

    def lookup(match: re.Match[str]) -> str:
        path, spec = match.group(1), match.group(2) or ""
        value: Any = results
        for part in re.split(r"(?<!\\)\.", path):
            value = _child(value, part.replace("\\.", "."), path)
        return format(value, spec)

    return _PLACEHOLDER.sub(lookup, template)
