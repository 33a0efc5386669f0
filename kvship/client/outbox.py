"""Staged chunks on their way to the daemon: sent in staging order, each once its copy ended.

A put stages a layer in groups of chunks, one copy per group (a whole layer from a GPU:
one DMA). The copy may still run when the put returns; the outbox hands the group's
chunks to the daemon the moment it ends, without the engine waiting, and keeps the
order they were staged in (the daemon expects a transfer's chunks in order per
connection, and earlier layers should leave first).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..staging import StagingCopy


@dataclass(frozen=True, slots=True)
class StagedGroup:
    """Chunks ``first``, ``first + 1``, ... of ``layer``, back to back in the arena from
    ``slot``; ``copy`` fills them."""

    layer: int
    first: int  # chunk index of the first chunk
    offset: int  # its byte offset in the layer
    slot: int  # its arena offset
    lengths: tuple[int, ...]
    copy: StagingCopy


class Outbox:
    """``push`` staged groups; ``send`` gets each, in order, once its copy is over.

    ``fail`` is called once with the error of a copy (or of ``send``) that failed; the
    outbox then stops (the transfer is over). ``drain`` waits until every pushed group
    was sent and raises that error, if there was one."""

    def __init__(
        self,
        send: Callable[[StagedGroup], None],
        fail: Callable[[BaseException], object],
    ) -> None:
        self._send = send
        self._fail = fail
        self._groups: deque[StagedGroup] = deque()
        self._task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None

    def __len__(self) -> int:
        return len(self._groups)

    def push(self, group: StagedGroup) -> None:
        if self.error is not None:
            raise self.error
        self._groups.append(group)
        if self._task is None:
            self._flush()

    def _flush(self) -> None:
        """Send what is ready now; leave a task waiting for the first copy still running."""
        try:
            while self._groups and self._groups[0].copy.done():
                self._send_first()
        except Exception as exc:
            self._stop(exc)
            return
        if self._groups:
            self._task = asyncio.create_task(self._run())

    def _send_first(self) -> None:
        group = self._groups[0]
        error = group.copy.error()
        if error is not None:
            raise error
        self._groups.popleft()
        self._send(group)

    async def _run(self) -> None:
        try:
            while self._groups:
                await self._groups[0].copy.wait()
                self._send_first()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._stop(exc)
        finally:
            self._task = None

    def _stop(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
            self._groups.clear()
            self._fail(exc)

    async def drain(self) -> None:
        while self._task is not None:
            await asyncio.shield(self._task)
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        """Stop sending (the transfer is over); copies still running are not waited for
        here: the connection keeps its arena until they end."""
        self._groups.clear()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
