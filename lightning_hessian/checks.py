"""Argument checks shared across the package (no dependencies, so the pure-torch core may use them)."""

from __future__ import annotations

import math
from collections.abc import Collection
from numbers import Real
from typing import Any


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` unless it is not a positive ``int``; then a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_number(value: object, name: str, low: float = -math.inf, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a float unless it is not a finite real number in ``[low, high]`` (an end excluded with
    ``low_open`` / ``high_open``); then a ``ValueError`` naming ``name``."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and (low < value if low_open else low <= value) and (value < high if high_open else value <= high)):
        if math.isinf(high):
            where = "" if math.isinf(low) else f" {'>' if low_open else '>='} {low:g}"
        else:
            where = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number{where}, got {value!r}")
    return float(value)


def check_choice(value: object, name: str, choices: Collection[object]) -> Any:
    """Return ``value`` unless it is not one of ``choices``; then a ``ValueError`` naming ``name`` and the choices."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_seed(value: object, name: str = "seed") -> int:
    """Return ``value`` unless it is not an ``int >= 0`` (a bool is not); then a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def check_batch_key(value: object, name: str) -> int | str | None:
    """Return ``value`` unless it is not a batch position (``int``), a dict key (``str``) or None; then a
    ``ValueError`` naming ``name``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, str))):
        raise ValueError(f"{name} must be an int (tuple/list position), a str (dict key) or None, got {value!r}")
    return value
