"""Argument checks shared across the package (no dependencies, so the pure-torch core may use them)."""

from __future__ import annotations


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` unless it is not a positive ``int``; then a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value
