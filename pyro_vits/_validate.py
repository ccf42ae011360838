"""Argument checks and error summaries shared by the public functions."""

from __future__ import annotations

from typing import Any

__all__ = ["check_nonnegative_ints", "check_positive_ints", "first_line"]


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


def first_line(err: BaseException, limit: int | None = None) -> str:
    """``"<ErrorType>: <line>"``: the informative line of an error message (torch's weights-only refusals put
    theirs last, after a generic preamble), cut to ``limit`` characters when given."""
    lines = [line.strip() for line in str(err).strip().splitlines()]
    line = next((x for x in lines if x.startswith("WeightsUnpickler error:")), lines[0] if lines else "")
    return f"{type(err).__name__}: {line[:limit]}"
