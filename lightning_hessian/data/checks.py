"""Argument checks shared by the datamodules."""

from __future__ import annotations


def check_positive_int(name: str, value: object) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is a positive ``int``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
