"""Sizes as users write them on the command line (``1GiB``, ``512MiB``, ``4g``)."""

from __future__ import annotations

_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``1GiB``, ``512MiB``, ``4g``, ``1000000`` -> bytes (binary prefixes)."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in _UNITS:
        return int(float(t[:-1]) * _UNITS[t[-1]])
    return int(t)
