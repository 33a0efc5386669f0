"""``kvship.Client``: what an inference engine embeds (async first, see SyncClient too)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine, Generator, Sequence
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

import aiohttp

from ..errors import DaemonUnavailable, KvshipError
from ..layout import layout_of
from ..layout.dedup import Manifest
from ..layout.model import FullAttention, ModelLayout
from ..layout.prefix import block_keys
from ..protocol import LayerSpec, Subscribe
from .connection import EngineConnection, default_address
from .receiver import Receiver, open_receiver
from .sender import Sender, SendResult

MIB = 1024 * 1024
PRIORITIES = {"bulk": 0, "latency": 1}  # OPEN.priority
CLOSE_WAIT = 2.0  # seconds aclose() waits for its sockets to be closed


class _Transfer(Protocol):
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


T = TypeVar("T", bound=_Transfer)


class Opening(Coroutine[Any, Any, T], Generic[T]):
    """What :meth:`Client.send` and :meth:`Client.receive` return: ``await`` it for the
    :class:`Sender`/:class:`Receiver`, or ``async with`` it, which closes the transfer
    on the way out (aborting it unless it finished). It is a coroutine, so
    ``asyncio.create_task``/``wait_for`` take it too (like aiohttp's ``session.get``).
    """

    __slots__ = ("_coro", "_value")

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._coro = coro
        self._value: T | None = None

    def send(self, value: Any) -> Any:
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, T]:
        return self._coro.__await__()

    async def __aenter__(self) -> T:
        self._value = await self._coro
        return self._value

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._value is not None:
            await self._value.__aexit__(exc_type, exc, tb)


class Client:
    """Talks to the local kvshipd (Unix socket path, or host:port for a remote engine host).

    On a Unix socket the client and daemon share a staging arena of shared memory per
    transfer, so KV crosses the engine<->daemon hop with one memcpy: ``arena_bytes`` for a
    send; for a receive, ``receive_arena_bytes`` made before subscribing (an engine that
    knows its model's layer size avoids any wait), or by default three of the largest
    layer, up to ``receive_arena_max``, made once the layout is known. Connections (and
    their arenas) are pooled, up to ``max_idle`` per direction, so a busy engine pays their
    set-up once.

    Close it: ``async with Client(...) as client`` or ``await client.aclose()`` closes
    every connection it made (pooled or still carrying a transfer: those transfers fail
    with :class:`~kvship.errors.DaemonConnectionLost`), unmaps their arenas, and closes
    the HTTP session :meth:`lookup` uses. A closed client opens nothing more.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        arena_bytes: int = 32 * MIB,
        receive_arena_max: int = 256 * MIB,
        receive_arena_bytes: int | None = None,
        chunk_bytes: int = 4 * MIB,
        use_shm: bool | None = None,
        connect_timeout: float = 10.0,
        max_idle: int = 4,
        control: str | None = None,
    ) -> None:
        if not 4096 <= chunk_bytes <= 4 * MIB:
            raise ValueError("chunk_bytes must be between 4 KiB and 4 MiB")
        self.address = address or default_address()
        self.arena_bytes = arena_bytes
        self.receive_arena_max = receive_arena_max
        self.receive_arena_bytes = receive_arena_bytes
        self.chunk_bytes = chunk_bytes
        self.use_shm = use_shm
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.control = control  # the daemon's control plane (host:port), for lookup()
        self._idle: dict[str, list[EngineConnection]] = {"send": [], "recv": []}
        self._live: set[EngineConnection] = set()  # every connection not closed yet
        self._http: aiohttp.ClientSession | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise KvshipError("this kvship.Client is closed")

    async def _connect(self, kind: str, arena_bytes: int) -> EngineConnection:
        """A warm connection from the pool (its arena already shared and faulted in), or a
        new one. Sends and receives pool apart: an arena serves one direction."""
        self._check_open()
        idle = self._idle[kind]
        while idle:
            conn = idle.pop()
            if conn.reusable:
                return conn
            conn.close()
        conn = await EngineConnection.open(
            self.address,
            arena_bytes=arena_bytes,
            use_shm=self.use_shm,
            timeout=self.connect_timeout,
        )
        if self._closed:  # closed while this one was connecting
            conn.close("the kvship.Client was closed")
            self._check_open()
        self._live.add(conn)
        conn.forget = self._forget
        conn.park = lambda c: self._park(kind, c)
        return conn

    def _forget(self, conn: EngineConnection) -> None:
        self._live.discard(conn)
        for idle in self._idle.values():
            if conn in idle:
                idle.remove(conn)

    def _park(self, kind: str, conn: EngineConnection) -> None:
        idle = self._idle[kind]
        if not self._closed and len(idle) < self.max_idle:
            idle.append(conn)
        else:
            conn.close()

    async def prepare(self, *, send: int = 1, receive: int = 0) -> None:
        """Open ``send`` / ``receive`` pooled connections now (arenas made, shared and
        faulted in), so an engine's first transfers pay no set-up on their critical path:
        call it at start. Receive arenas need ``receive_arena_bytes``; without it a
        receive connection is opened but its arena still waits for the first layout."""
        if send < 0 or receive < 0 or send + receive > 2 * self.max_idle:
            raise ValueError(f"prepare: 0..{2 * self.max_idle} connections, got {send}+{receive}")
        opened = await asyncio.gather(
            *(self._connect("send", max(self.chunk_bytes, self.arena_bytes)) for _ in range(send)),
            *(self._connect("recv", self.receive_arena_bytes or 0) for _ in range(receive)),
        )
        for i, conn in enumerate(opened):
            self._park("send" if i < send else "recv", conn)

    async def lookup(
        self,
        token_ids: Sequence[int],
        model: ModelLayout,
        *,
        peer: str | None = None,
        tp_rank: int = 0,
        timeout: float = 5.0,
    ) -> int:
        """How many leading tokens of this prompt have their KV held by a daemon's block
        store (what a scheduler needs to decide how much to prefill, cf. vLLM's
        ``get_num_new_matched_tokens``). ``peer``: that daemon's control plane
        (host:port); default: this client's (``Client(control=...)``). The keys are
        hashed here, once, so the daemon's side is a set walk. One HTTP session serves
        every lookup (made on the first, closed by :meth:`aclose`)."""
        control = peer or self.control
        if not control:
            raise ValueError("lookup needs a control-plane address: peer= or Client(control=)")
        self._check_open()
        keys = block_keys(token_ids, model, tp_rank)
        body = {"model": model.to_dict(), "tp_rank": tp_rank, "keys": [k.hex() for k in keys]}
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession()
        try:
            async with self._http.post(
                f"http://{control}/v1/lookup",
                json=body,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                answer = await resp.json(content_type=None)
                if resp.status != 200:
                    error = answer.get("error", resp.status) if isinstance(answer, dict) else answer
                    raise KvshipError(f"lookup refused by {control}: {error}")
        except (aiohttp.ClientError, OSError) as exc:  # TimeoutError is an OSError
            raise DaemonUnavailable(f"cannot reach kvshipd control plane {control}: {exc}") from exc
        except ValueError as exc:  # not JSON
            raise KvshipError(f"lookup: {control} answered something else: {exc}") from exc
        try:
            return int(answer["cached_tokens"])
        except (KeyError, TypeError, ValueError) as exc:
            raise KvshipError(f"lookup: unexpected answer from {control}: {answer!r}") from exc

    def close(self) -> None:
        """Close the idle pooled connections (and unmap their arenas) only. Sync, for
        callers without a loop at hand; :meth:`aclose` closes everything."""
        for idle in self._idle.values():
            while idle:
                idle.pop().close()

    async def aclose(self) -> None:
        """Close every connection this client made, pooled or busy (their transfers fail
        with :class:`~kvship.errors.DaemonConnectionLost`), and the lookup HTTP session.
        Idempotent."""
        self._closed = True
        conns = list(self._live)
        closing = [c.proto.closed for c in conns if c.proto is not None]
        for conn in conns:
            conn.close("the kvship.Client was closed")
        self._live.clear()
        self.close()
        http, self._http = self._http, None
        if http is not None:
            await http.close()
        pending = [f for f in closing if not f.done()]
        if pending:  # the sockets close on the loop's next turns: wait for that (bounded)
            await asyncio.wait(pending, timeout=CLOSE_WAIT)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def send(
        self,
        request_id: str,
        layout: Sequence[LayerSpec],
        *,
        peer: str,
        token_ids: Sequence[int] = (),
        priority: str = "bulk",
        model: ModelLayout | None = None,
        tp_rank: int = 0,
    ) -> Opening[Sender]:
        """Open a transfer of ``request_id`` to the daemon at ``peer`` (host:port):
        ``sender = await client.send(...)``, or ``async with client.send(...) as sender``
        (leaving the block without a successful ``finish`` aborts the transfer).

        ``layout``: one :class:`~kvship.protocol.LayerSpec` per layer, known before
        prefill runs (:func:`kvship.layout.layer_spec`/``uniform_layout`` from the model's
        geometry; :func:`kvship.layout.layout_of` when the arrays exist already).
        ``priority``: "latency" transfers go before "bulk" ones on a rate-limited link.
        ``model``: the model's KV geometry, with the layers in its order (full-attention
        layers as paged blocks, linear layers as their states): then the prompt's block
        keys travel with the transfer and the far daemon skips the prefix it already holds
        (prefix dedup; chunks are cut at block boundaries)."""
        return Opening(
            self._send(
                request_id,
                layout,
                peer=peer,
                token_ids=token_ids,
                priority=priority,
                model=model,
                tp_rank=tp_rank,
            )
        )

    async def _send(
        self,
        request_id: str,
        layout: Sequence[LayerSpec],
        *,
        peer: str,
        token_ids: Sequence[int],
        priority: str,
        model: ModelLayout | None,
        tp_rank: int,
    ) -> Sender:
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {sorted(PRIORITIES)}, got {priority!r}")
        if not layout:
            raise ValueError("layout has no layers")
        extra: dict[str, Any] = {}
        multiple, chunk_bytes = 1, self.chunk_bytes
        if model is not None:
            keys = tuple(block_keys(token_ids, model, tp_rank))
            extra = {"dedup": Manifest(model, tp_rank, keys).to_extra()}
            multiple = math.lcm(
                *(
                    kind.block_bytes
                    for kind in (model.layers[i] for i in model.full_layers)
                    if isinstance(kind, FullAttention)
                )
            )
            # Whole blocks per chunk (SPEC §7.6.2), as many as fit: the chunk straddling
            # the held prefix travels as its tail only (CAP_DEDUP_TAIL), so large chunks
            # cost no dedup savings (a link without it sends that chunk whole).
            chunk_bytes = max(multiple, chunk_bytes // multiple * multiple)
        conn = await self._connect("send", max(self.chunk_bytes, self.arena_bytes))
        try:
            return Sender(
                conn,
                request_id,
                layout,
                peer,
                token_ids,
                chunk_bytes,
                PRIORITIES[priority],
                extra=extra,
                chunk_multiple=multiple,
            )
        except BaseException:
            conn.close("the send could not start")
            raise

    async def send_arrays(
        self,
        request_id: str,
        arrays: Sequence[Any],
        *,
        peer: str,
        token_ids: Sequence[int] = (),
        timeout: float | None = None,
    ) -> SendResult:
        """Convenience: send a list of per-layer arrays and wait for the acknowledgement."""
        async with self.send(
            request_id, layout_of(arrays), peer=peer, token_ids=token_ids
        ) as sender:
            for i, array in enumerate(arrays):
                await sender.put(i, array)
            return await sender.finish(timeout)

    def receive(self, request_id: str, *, timeout: float | None = 30.0) -> Opening[Receiver]:
        """Subscribe to ``request_id`` at the local daemon; the :class:`Receiver` comes once
        its layout is known: ``rx = await client.receive(...)``, or ``async with
        client.receive(...) as rx`` (the connection is released on the way out).

        Waits up to ``timeout`` seconds for the transfer to start arriving, and (between
        layers) for each next layer; raises :class:`kvship.errors.RequestNotFound` if it
        never comes.
        """
        return Opening(self._receive(request_id, timeout))

    async def _receive(self, request_id: str, timeout: float | None) -> Receiver:
        conn = await self._connect("recv", self.receive_arena_bytes or 0)
        timeout_ms = 0 if timeout is None else max(1, int(timeout * 1000))
        try:
            conn.send(Subscribe(request_id, timeout_ms))
        except BaseException:
            conn.close("the receive could not start")
            raise
        return await open_receiver(conn, request_id, timeout, self.receive_arena_max)
