"""``kvship.Client``: what an inference engine embeds (async first, see SyncClient too)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import aiohttp

from ..errors import DaemonUnavailable, KvshipError
from ..layout import layout_of
from ..layout.dedup import Manifest
from ..layout.model import ModelLayout
from ..layout.prefix import block_keys
from ..protocol import LayerSpec, Subscribe
from .connection import EngineConnection, default_address
from .receiver import Receiver, open_receiver
from .sender import Sender, SendResult

MIB = 1024 * 1024
PRIORITIES = {"bulk": 0, "latency": 1}  # OPEN.priority
DEDUP_CHUNK_BLOCKS = 4


class Client:
    """Talks to the local kvshipd (Unix socket path, or host:port for a remote engine host).

    On a Unix socket the client and daemon share a staging arena of shared memory per
    transfer, so KV crosses the engine<->daemon hop with one memcpy: ``arena_bytes`` for a
    send; for a receive, ``receive_arena_bytes`` made before subscribing (an engine that
    knows its model's layer size avoids any wait), or by default three of the largest
    layer, up to ``receive_arena_max``, made once the layout is known. Connections (and
    their arenas) are pooled, up to ``max_idle`` per direction, so a busy engine pays their
    set-up once.
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

    async def _connect(self, kind: str, arena_bytes: int) -> EngineConnection:
        """A warm connection from the pool (its arena already shared and faulted in), or a
        new one. Sends and receives pool apart: an arena serves one direction."""
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
        conn.park = lambda c: self._park(kind, c)
        return conn

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
        hashed here, once, so the daemon's side is a set walk."""
        control = peer or self.control
        if not control:
            raise ValueError("lookup needs a control-plane address: peer= or Client(control=)")
        keys = block_keys(token_ids, model, tp_rank)
        body = {"model": model.to_dict(), "tp_rank": tp_rank, "keys": [k.hex() for k in keys]}
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http,
                http.post(f"http://{control}/v1/lookup", json=body) as resp,
            ):
                answer = await resp.json()
                if resp.status != 200:
                    raise KvshipError(f"lookup refused: {answer.get('error', resp.status)}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DaemonUnavailable(f"cannot reach kvshipd control plane {control}: {exc}") from exc
        return int(answer["cached_tokens"])

    def _park(self, kind: str, conn: EngineConnection) -> None:
        idle = self._idle[kind]
        if len(idle) < self.max_idle:
            idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Close the pooled connections (and unmap their arenas)."""
        for idle in self._idle.values():
            while idle:
                idle.pop().close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def send(
        self,
        request_id: str,
        layout: Sequence[LayerSpec],
        *,
        peer: str,
        token_ids: Sequence[int] = (),
        priority: str = "bulk",
        model: ModelLayout | None = None,
        tp_rank: int = 0,
    ) -> Sender:
        """Open a transfer of ``request_id`` to the daemon at ``peer`` (host:port).

        ``priority``: "latency" transfers go before "bulk" ones on a rate-limited link.
        ``model``: the model's KV geometry, with the layers in its order (full-attention
        layers as paged blocks, linear layers as their states): then the prompt's block
        keys travel with the transfer and the far daemon skips the prefix it already holds
        (prefix dedup; chunks are cut at block boundaries)."""
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {sorted(PRIORITIES)}, got {priority!r}")
        if not layout:
            raise ValueError("layout has no layers")
        extra, multiple, chunk_bytes = {}, 1, self.chunk_bytes
        if model is not None:
            keys = tuple(block_keys(token_ids, model, tp_rank))
            extra = {"dedup": Manifest(model, tp_rank, keys).to_extra()}
            multiple = math.lcm(*(model.layers[i].block_bytes for i in model.full_layers))
            # Dedup skips whole chunks: at most DEDUP_CHUNK_BLOCKS blocks per chunk, so the
            # chunk that straddles the held prefix wastes little.
            chunk_bytes = min(chunk_bytes, max(multiple, DEDUP_CHUNK_BLOCKS * multiple))
        conn = await self._connect("send", max(self.chunk_bytes, self.arena_bytes))
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
        sender = await self.send(request_id, layout_of(arrays), peer=peer, token_ids=token_ids)
        try:
            for i, array in enumerate(arrays):
                await sender.put(i, array)
            return await sender.finish(timeout)
        except BaseException:
            await sender.abort()
            raise

    async def receive(self, request_id: str, *, timeout: float | None = 30.0) -> Receiver:
        """Subscribe to ``request_id`` at the local daemon; returns once its layout is known.

        Waits up to ``timeout`` seconds for the transfer to start arriving, and (between
        layers) for each next layer; raises :class:`kvship.errors.RequestNotFound` if it
        never comes.
        """
        conn = await self._connect("recv", self.receive_arena_bytes or 0)
        assert conn.proto is not None
        timeout_ms = 0 if timeout is None else max(1, int(timeout * 1000))
        conn.proto.send(Subscribe(request_id, timeout_ms))
        return await open_receiver(conn, request_id, timeout, self.receive_arena_max)
