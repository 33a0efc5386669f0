"""Background tasks whose failures are logged, never silently dropped."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("kvship.tasks")


def spawn(coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
    task = asyncio.create_task(coro, name=name)
    task.add_done_callback(_report)
    return task


def _report(task: asyncio.Task[Any]) -> None:
    exc = None if task.cancelled() else task.exception()
    if exc is not None:
        name = task.get_name()
        # Task names are "<kind>-<id>...": one line per kind and exception type per interval.
        kind = name.split("-", 1)[0]
        log.error(
            "task %s failed",
            name,
            exc_info=exc,
            extra={"task": name, "cause": f"{kind} {type(exc).__name__}"},
        )
