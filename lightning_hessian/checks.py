"""Argument checks shared across the package (no dependencies, so the pure-torch core may use them)."""

from __future__ import annotations

import math
from numbers import Real


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
