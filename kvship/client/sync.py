"""SyncClient: the same API for engines whose scheduler is not async (a loop in a thread)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import numpy as np

from ..errors import KvshipError, TransferError
from ..layout.model import ModelLayout
from ..protocol import ErrorCode, LayerSpec
from ..staging import StagingCopy
from .api import Client
from .receiver import Layer, Receiver, Targets
from .sender import Sender, SendResult

T = TypeVar("T")
CLOSE_TIMEOUT = 10.0  # seconds close() waits for the client to close on its loop


class _Loop:
    """An event loop running in its own (daemon) thread; ``run`` blocks on a coroutine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="kvship", daemon=True)
        self.thread.start()
        self.closed = False

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self.closed:
            coro.close()
            raise KvshipError("this kvship.SyncClient is closed")
        if threading.current_thread() is self.thread:  # would wait on itself forever
            coro.close()
            raise RuntimeError("SyncClient calls cannot be made from its own loop thread")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise TransferError(ErrorCode.TIMEOUT, f"no answer within {timeout} s") from exc

    def stop(self) -> None:
        """Stop the loop, join its thread, close the loop (its selector and self-pipe)."""
        if self.closed:
            return
        self.closed = True
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(CLOSE_TIMEOUT)
        if not self.thread.is_alive():
            self.loop.close()


class _ClosedByWith:
    """``with obj:`` closes it on the way out, however the block ends."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SyncSender(_ClosedByWith):
    """Blocking :class:`~kvship.client.Sender`; ``with`` it to abort it unless finished."""

    def __init__(self, loop: _Loop, sender: Sender) -> None:
        self._loop, self._sender = loop, sender
        self.request_id = sender.request_id
        self.layout = sender.layout

    def put(
        self, layer: int, array: Any, *, stream: Any = None, background: bool = False
    ) -> SyncCopy:
        """:meth:`Sender.put`: returns once the copy is queued (GPU, ``background``)."""
        return SyncCopy(
            self._loop,
            self._loop.run(self._sender.put(layer, array, stream=stream, background=background)),
        )

    def finish(self, timeout: float | None = None) -> SendResult:
        return self._loop.run(self._sender.finish(timeout))

    def abort(self) -> None:
        self._loop.run(self._sender.abort())

    @property
    def result(self) -> SendResult | None:
        return self._sender.result

    def close(self) -> None:
        """Abort the transfer unless it finished (what leaving ``with`` does)."""
        if self._sender.result is None and not self._loop.closed:
            self.abort()


class SyncReceiver(_ClosedByWith):
    """Blocking :class:`~kvship.client.Receiver`: iterate it for ``(layer, array)``, each
    array a copy you own. ``with`` it (or :meth:`close`) to release its connection."""

    def __init__(self, loop: _Loop, receiver: Receiver) -> None:
        self._loop, self._receiver = loop, receiver
        self.request_id = receiver.request_id
        self.layout = receiver.layout
        self.token_ids = receiver.token_ids

    @property
    def complete(self) -> bool:
        return self._receiver.complete

    @property
    def digest(self) -> int | None:
        return self._receiver.digest

    def __iter__(self) -> Iterator[Layer]:
        """Layers as they arrive; each array is a copy you own. Stopping early (break)
        closes the transfer's connection."""
        return self._iterate(self._receiver.layers(copy=True))

    def to_device(
        self, targets: Targets, *, stream: Any = None, background: bool = False
    ) -> Iterator[tuple[int, SyncCopy]]:
        """:meth:`Receiver.to_device`: ``(layer, copy)`` as each copy into its target is
        queued; ``copy.wait()`` blocks until the target holds the layer."""
        layers = self._receiver.to_device(targets, stream=stream, background=background)
        for layer, copy in self._iterate(layers):
            yield layer, SyncCopy(self._loop, copy)

    def _iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        finished = False
        try:
            while True:
                try:
                    yield self._loop.run(_anext(agen))
                except StopAsyncIteration:
                    finished = True
                    return
        finally:
            if not finished and not self._loop.closed:
                if threading.current_thread() is self._loop.thread:  # collected there
                    self._loop.loop.create_task(self._receiver.aclose())
                else:
                    self._loop.run(self._receiver.aclose())

    def all(self) -> list[np.ndarray[Any, np.dtype[Any]]]:
        return self._loop.run(self._receiver.all())

    def close(self) -> None:
        if not self._loop.closed:
            self._loop.run(self._receiver.aclose())


async def _anext(agen: AsyncIterator[T]) -> T:
    return await agen.__anext__()


class SyncCopy:
    """Blocking :class:`~kvship.staging.StagingCopy`: ``done()``, ``wait()``, ``event``."""

    def __init__(self, loop: _Loop, copy: StagingCopy) -> None:
        self._loop, self._copy = loop, copy
        self.nbytes = copy.nbytes

    @property
    def event(self) -> Any:
        return self._copy.event

    def done(self) -> bool:
        return self._copy.done()

    def wait(self) -> None:
        if not self._copy.done() or self._copy.error() is not None:
            self._loop.run(self._copy.wait())


class SyncClient(_ClosedByWith):
    """Blocking wrapper of :class:`Client` (same arguments and calls); runs its own event
    loop in a daemon thread.

    ``send``/``receive`` return their transfer at once, and work as context managers::

        with kvship.SyncClient(path) as client, client.send(rid, layout, peer=p) as s:
            ...

    :meth:`close` (or leaving ``with``) closes every connection and arena of the client,
    its lookup HTTP session, then stops the loop and joins its thread.
    """

    def __init__(self, address: str | None = None, **kwargs: Any) -> None:
        self._loop = _Loop()
        try:
            self._client = Client(address, **kwargs)
        except BaseException:
            self._loop.stop()
            raise

    @property
    def client(self) -> Client:
        """The async client underneath (it lives on this SyncClient's loop thread)."""
        return self._client

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop :attr:`client` lives on, for work of your own that must not block
        the caller: ``asyncio.run_coroutine_threadsafe(coro, sync.loop)``."""
        return self._loop.loop

    def send(self, request_id: str, layout: Sequence[LayerSpec], **kwargs: Any) -> SyncSender:
        sender = self._loop.run(self._client.send(request_id, layout, **kwargs))
        return SyncSender(self._loop, sender)

    def send_arrays(self, request_id: str, arrays: Sequence[Any], **kwargs: Any) -> SendResult:
        return self._loop.run(self._client.send_arrays(request_id, arrays, **kwargs))

    def receive(self, request_id: str, *, timeout: float | None = 30.0) -> SyncReceiver:
        receiver = self._loop.run(self._client.receive(request_id, timeout=timeout))
        return SyncReceiver(self._loop, receiver)

    def lookup(self, token_ids: Sequence[int], model: ModelLayout, **kwargs: Any) -> int:
        """:meth:`Client.lookup`, blocking."""
        return self._loop.run(self._client.lookup(token_ids, model, **kwargs))

    def close(self) -> None:
        """Close the client's connections, arenas and HTTP session, then stop the loop and
        its thread. Idempotent."""
        if self._loop.closed:
            return
        with contextlib.suppress(KvshipError):
            self._loop.run(self._client.aclose(), CLOSE_TIMEOUT)
        with contextlib.suppress(KvshipError):
            self._loop.run(_drain_tasks(), CLOSE_TIMEOUT)
        self._loop.stop()


async def _drain_tasks() -> None:
    """Let what closing started run out: cancel leftover tasks, close the async
    generators of abandoned iterations, give transports their connection_lost."""
    current = asyncio.current_task()
    others = [t for t in asyncio.all_tasks() if t is not current]
    for task in others:
        task.cancel()
    if others:
        await asyncio.wait(others, timeout=CLOSE_TIMEOUT)
    await asyncio.get_running_loop().shutdown_asyncgens()
    for _ in range(3):  # transports close on the next iterations
        await asyncio.sleep(0)
