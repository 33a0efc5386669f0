"""What every ``kvship`` command shares: error types with exit codes, sizes, progress bars."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from tqdm import tqdm

from ..addresses import split_hostport
from ..units import parse_size

T = TypeVar("T")

EXIT_RUNTIME = 1  # the command was fine, the world was not (daemon down, transfer failed)
EXIT_USAGE = 2  # the user's input was wrong (flags, files, sizes)


class CliError(Exception):
    """An expected failure: main() prints its message as one line and exits ``exit_code``."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(CliError):
    """Bad flags, files or sizes: exit 2, like argparse itself."""

    exit_code = EXIT_USAGE


def size_arg(text: str) -> int:
    """argparse ``type=`` for sizes (``64MiB``, ``1g``, ``4096``), with a readable error."""
    try:
        value = parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (examples: 4096, 64MiB, 1GiB)"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return value


def hostport_arg(text: str) -> str:
    """argparse ``type=`` for ``host:port`` / ``[v6]:port``, checked before anything starts."""
    try:
        split_hostport(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def human_bytes(n: float) -> str:
    """``67108864`` -> ``64 MiB``, ``2359296`` -> ``2.25 MiB`` (binary units, like size flags)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" or abs(n) >= 100 else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def gbps(nbytes: int, seconds: float) -> float:
    """Goodput in GB/s (10^9, as link speeds are quoted)."""
    return nbytes / seconds / 1e9 if seconds > 0 else 0.0


def progress(total: int, desc: str, quiet: bool) -> tqdm:
    """A byte progress bar on stderr, off for --json and when stderr is not a terminal."""
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=quiet or not sys.stderr.isatty(),
        leave=False,
    )


def print_json(obj: Any) -> None:
    print(json.dumps(obj))


def print_fields(rows: list[tuple[str, Any]]) -> None:
    """Aligned ``name  value`` lines: the human-readable form of a summary."""
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine on uvloop (the daemon's loop too)."""
    import uvloop

    return uvloop.run(coro)
