"""Rate and burst values: validation, parsing from config/API text, and formatting.

One validator is shared by the bucket, the config and the control plane, so that a bad
value is refused the same way (and with the same message) wherever it comes in.
"""

from __future__ import annotations

import math
import re
from numbers import Real

MAX_RATE = 1.25e12
"""Largest finite rate accepted, bytes/s (10 Tbit/s): anything above is a typo."""

MAX_BURST = 64 * 2**30
"""Largest burst accepted, bytes (64 GiB)."""

UNLIMITED = math.inf
"""The rate value that means "no limit" (``None`` is accepted as well)."""


class RateError(ValueError):
    """A rate or burst that cannot be used; ``field`` names the offending setting."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def check_rate(value: object, field: str = "rate_bytes_per_s") -> float:
    """``value`` as bytes/s (``math.inf`` for unlimited: ``None`` or ``inf``), or RateError."""
    if value is None:
        return UNLIMITED
    if isinstance(value, bool) or not isinstance(value, Real):
        raise RateError(field, f"must be a number of bytes/s, got {value!r}")
    rate = float(value)
    if math.isnan(rate):
        raise RateError(field, "must be a number, got NaN")
    if rate == math.inf:
        return UNLIMITED
    if rate <= 0:
        raise RateError(field, f"must be > 0, got {value!r}")
    if rate > MAX_RATE:
        raise RateError(field, f"{format_rate(rate)} is above the maximum {format_rate(MAX_RATE)}")
    return rate


def check_burst(value: object, field: str = "burst_bytes") -> int:
    """``value`` as a whole number of bytes in [1, 64 GiB], or RateError."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise RateError(field, f"must be a whole number of bytes, got {value!r}")
    burst = float(value)
    if not math.isfinite(burst) or burst != int(burst):
        raise RateError(field, f"must be a whole number of bytes, got {value!r}")
    if burst < 1:
        raise RateError(field, f"must be >= 1 byte, got {value!r}")
    if burst > MAX_BURST:
        raise RateError(field, f"{int(burst)} bytes is above the maximum {MAX_BURST} (64 GiB)")
    return int(burst)


# -------------------------------------------------------------------- parsing
_NUMBER = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([A-Za-z/]*)\s*$")
_DECIMAL = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_BINARY = {"ki": 2.0**10, "mi": 2.0**20, "gi": 2.0**30, "ti": 2.0**40}


def _prefix(text: str) -> float | None:
    low = text.lower()
    return _DECIMAL.get(low, _BINARY.get(low))


def _rate_unit(unit: str) -> float | None:
    """Bytes per unit for a rate unit such as ``Gbit/s``, ``gbps``, ``MB/s``; None if junk.

    ``bit``/``bits``/``b``/``bps`` are bits, ``B``/``byte``/``bytes``/``Bps`` are bytes; no
    unit at all means bytes/s. (Unlike ``tc``, ``mbps`` is megaBITS, as on network gear.)
    """
    if unit == "":
        return 1.0
    low = unit.lower()
    for per_second in ("/s", "/sec", "ps"):
        if low.endswith(per_second) and len(low) > len(per_second):
            unit, low = unit[: -len(per_second)], low[: -len(per_second)]
            break
    for base, scale in (("bits", 0.125), ("bit", 0.125), ("bytes", 1.0), ("byte", 1.0)):
        if low.endswith(base):
            prefix = _prefix(unit[: -len(base)])
            return None if prefix is None else prefix * scale
    if unit.endswith(("b", "B")):
        prefix = _prefix(unit[:-1])
        scale = 1.0 if unit.endswith("B") else 0.125
        return None if prefix is None else prefix * scale
    return None


def parse_rate(text: str | float | int, field: str = "rate") -> float:
    """Bytes/s from ``"1gbit"``, ``"100mbit"``, ``"1.5Gbit/s"``, ``"125MB/s"``, ``"10gbps"``,
    ``"512MiB/s"``, a plain number (bytes/s) or ``"unlimited"`` (``math.inf``).

    Raises RateError (naming ``field``) for junk, zero, negative or absurd (> 10 Tbit/s).
    """
    if isinstance(text, bool):
        raise RateError(field, f"cannot read a rate from {text!r}")
    if isinstance(text, int | float):
        return check_rate(text, field)
    if not isinstance(text, str):
        raise RateError(field, f"cannot read a rate from {text!r}")
    if text.strip().lower() in ("unlimited", "none", "off"):
        return UNLIMITED
    match = _NUMBER.match(text)
    scale = _rate_unit(match.group(2)) if match else None
    if match is None or scale is None:
        raise RateError(
            field,
            f"cannot read a rate from {text!r} (examples: 1gbit, 100mbit, 125MB/s, 10gbps, "
            "a number of bytes/s, or unlimited)",
        )
    value = float(match.group(1))
    if value <= 0:
        raise RateError(field, f"must be > 0, got {text!r}")
    if not math.isfinite(value * scale):  # "1e400": a typo, not "unlimited"
        raise RateError(field, f"{text!r} is above the maximum {format_rate(MAX_RATE)}")
    return check_rate(value * scale, field)


def parse_burst(text: str | int, field: str = "burst") -> int:
    """Bytes from ``"4MiB"``, ``"1MB"``, ``"65536"``, ``"512KiB"``; RateError unless in
    [1 byte, 64 GiB]."""
    if isinstance(text, bool):
        raise RateError(field, f"cannot read a size from {text!r}")
    if isinstance(text, int | float):
        return check_burst(text, field)
    if not isinstance(text, str):
        raise RateError(field, f"cannot read a size from {text!r}")
    match = _NUMBER.match(text)
    unit = match.group(2) if match else ""
    low = unit.lower()
    body: str | None = unit  # a bare number is bytes
    if low.endswith("bytes"):
        body = unit[:-5]
    elif low.endswith("byte"):
        body = unit[:-4]
    elif unit.endswith("B"):
        body = unit[:-1]
    elif unit:
        body = None  # "Mb", "mbit": bits are no size for a burst
    scale = None if body is None else _prefix(body)
    if match is None or scale is None:
        raise RateError(field, f"cannot read a size from {text!r} (examples: 4MiB, 1MB, 65536)")
    value = float(match.group(1)) * scale
    if not math.isfinite(value):
        raise RateError(field, f"{text!r} is above the maximum {MAX_BURST} (64 GiB)")
    if value <= 0:
        raise RateError(field, f"must be >= 1 byte, got {text!r}")
    if value != int(value):
        raise RateError(field, f"must be a whole number of bytes, got {text!r}")
    return check_burst(int(value), field)


def format_rate(bytes_per_s: float | None) -> str:
    """A short human form in bits/s with decimal prefixes (``"1.5Gbit/s"``) that
    :func:`parse_rate` reads back (to 12 significant digits); ``"unlimited"`` for inf/None."""
    if bytes_per_s is None or bytes_per_s == math.inf:
        return "unlimited"
    if isinstance(bytes_per_s, bool) or not isinstance(bytes_per_s, Real):
        raise RateError("rate", f"must be a number of bytes/s, got {bytes_per_s!r}")
    if math.isnan(bytes_per_s) or bytes_per_s <= 0:
        raise RateError("rate", f"must be > 0, got {bytes_per_s!r}")
    bits = float(bytes_per_s) * 8
    for prefix, factor in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3), ("", 1.0)):
        if bits >= factor or factor == 1.0:
            return f"{bits / factor:.12g}{prefix}bit/s"
    raise AssertionError("unreachable")  # pragma: no cover
