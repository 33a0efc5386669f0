"""SyncClient: the same API for engines whose scheduler is not async (a loop in a thread)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

from ..protocol import LayerSpec
from .api import Client
from .receiver import Receiver
from .sender import Sender, SendResult

T = TypeVar("T")


class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="kvship", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class SyncSender:
    def __init__(self, loop: _Loop, sender: Sender) -> None:
        self._loop, self._sender = loop, sender

    def put(self, layer: int, array: Any) -> None:
        self._loop.run(self._sender.put(layer, array))

    def finish(self, timeout: float | None = None) -> SendResult:
        return self._loop.run(self._sender.finish(timeout))

    def abort(self) -> None:
        self._loop.run(self._sender.abort())


class SyncReceiver:
    def __init__(self, loop: _Loop, receiver: Receiver) -> None:
        self._loop, self._receiver = loop, receiver
        self.layout = receiver.layout
        self.token_ids = receiver.token_ids

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        """Layers as they arrive; each array is a copy you own."""
        agen = self._receiver.layers(copy=True)
        while True:
            try:
                yield self._loop.run(agen.__anext__())
            except StopAsyncIteration:
                return

    def all(self) -> list[np.ndarray]:
        return self._loop.run(self._receiver.all())


class SyncClient:
    """Blocking wrapper of :class:`Client`; runs its own event loop in a daemon thread."""

    def __init__(self, address: str | None = None, **kwargs: Any) -> None:
        self._client = Client(address, **kwargs)
        self._loop = _Loop()

    def send(self, request_id: str, layout: Sequence[LayerSpec], **kwargs: Any) -> SyncSender:
        return SyncSender(
            self._loop, self._loop.run(self._client.send(request_id, layout, **kwargs))
        )

    def send_arrays(self, request_id: str, arrays: Sequence[Any], **kwargs: Any) -> SendResult:
        return self._loop.run(self._client.send_arrays(request_id, arrays, **kwargs))

    def receive(self, request_id: str, *, timeout: float | None = 30.0) -> SyncReceiver:
        receiver = self._loop.run(self._client.receive(request_id, timeout=timeout))
        return SyncReceiver(self._loop, receiver)

    def close(self) -> None:
        self._loop.stop()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
