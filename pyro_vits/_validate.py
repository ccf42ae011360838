"""Argument checks shared by the public functions."""

from __future__ import annotations

from typing import Any

__all__ = ["check_nonnegative_ints", "check_positive_ints"]


def check_positive_ints(*, allow_none: bool = False, **values: Any) -> None:
    """Raise ``ValueError`` naming the first of ``values`` that is not a positive int (bools rejected;
    None accepted when ``allow_none``)."""
    for name, value in values.items():
        if value is None and allow_none:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


def check_nonnegative_ints(**values: Any) -> None:
    """Raise ``ValueError`` naming the first of ``values`` that is not a non-negative int (bools rejected)."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
