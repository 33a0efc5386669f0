"""Shared fixtures and helpers for tests that run real kvshipd subprocesses.

* daemon pairs (``prefill`` -> ``decode``) started with :mod:`kvship.bench.spawn`, always
  stopped at teardown;
* a hostile raw peer (:class:`RawPeer`) that writes hand-made frames on a real socket and
  reads back what the daemon answers (HELLO_ACK, CREDIT, GOAWAY ...);
* :func:`good_transfer`, the control transfer each hostile test runs to show the daemon
  still serves everybody else, bit-exact.

Every wait here has a timeout and every loop is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import inspect
import secrets
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from kvship import Client
from kvship.bench.spawn import DaemonProcess, daemon_pair
from kvship.protocol import (
    CAP_STRIPING,
    HEADER_SIZE,
    MAGIC,
    ROLE_PEER,
    Chunk,
    ChunkMeta,
    FrameType,
    GoAway,
    Hello,
    HelloAck,
    LayerSpec,
    Open,
    chunk_checksum,
)

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py`` as a module (tools are scripts, not a package), once per run:
    registered in sys.modules, where dataclasses look their module up."""
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


HEADER = struct.Struct(">IBBH")  # length, type, flags, reserved (SPEC.md §3)
IO_TIMEOUT = 10.0  # seconds any single socket read may take before the test fails


# ---------------------------------------------------------------- daemons
@contextlib.contextmanager
def running_pair(
    workdir: Path, extra_args: Sequence[str] = ()
) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    """A started (prefill, decode) daemon pair that is always stopped afterwards."""
    a, b = daemon_pair(str(workdir), list(extra_args))
    try:
        yield a, b
    finally:
        for daemon in (a, b):
            daemon.stop(timeout=10)


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, ...]]:
    """One daemon pair shared by a whole test module (default settings)."""
    with running_pair(tmp_path_factory.mktemp("pair")) as pair:
        yield pair


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for "nobody there" tests)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


POLL_S = 0.02  # how often wait_until / wait_for_condition look again


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``predicate`` (bounded by ``timeout``); fail the test if it never holds.

    Blocking (``time.sleep`` between polls): for sync tests only. In an ``async def``
    test use :func:`wait_for_condition`, which lets the test's event loop run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(POLL_S)
    pytest.fail(f"timed out after {timeout} s waiting for {what or predicate}")


async def wait_for_condition(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, what: str = ""
) -> None:
    """The async :func:`wait_until`: poll ``predicate`` with ``asyncio.sleep`` between
    polls, so the loop keeps running the test's other tasks (a good transfer, a receiver);
    fail the test if it does not hold within ``timeout``.

    ``predicate`` may return an awaitable (then it is awaited): a check that does blocking
    I/O, such as a daemon's /metrics or /v1/..., runs off the loop that way, e.g.
    ``await wait_for_condition(off_loop(lambda: error_count(b, "BAD_MAGIC") == 1))``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        held = predicate()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if loop.time() >= deadline:
            break
        await asyncio.sleep(POLL_S)
    pytest.fail(f"timed out after {timeout} s waiting for {what or predicate}")


def off_loop(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """``check`` (blocking: reads a daemon over HTTP, a file ...) as a predicate for
    :func:`wait_for_condition` that runs in a worker thread, never on the loop."""
    return lambda: asyncio.to_thread(check)


@dataclass
class LogMark:
    """A position in a daemon's log; :meth:`since` returns what was logged after it."""

    daemon: DaemonProcess
    offset: int

    @classmethod
    def of(cls, daemon: DaemonProcess) -> LogMark:
        assert daemon.log_path is not None
        return cls(daemon, daemon.log_path.stat().st_size)

    def since(self) -> str:
        assert self.daemon.log_path is not None
        with open(self.daemon.log_path, "rb") as fh:
            fh.seek(self.offset)
            return fh.read().decode(errors="replace")

    def line_with(self, *needles: str) -> str | None:
        """The first new log line holding every needle, or None (no waiting)."""
        for line in self.since().splitlines():
            if all(n in line for n in needles):
                return line
        return None

    async def wait_for_async(self, *needles: str, timeout: float = 10.0) -> str:
        """The first new log line holding every needle, waited for (bounded): polls with
        ``asyncio.sleep`` and reads the log in a worker thread."""
        await wait_for_condition(
            off_loop(lambda: self.line_with(*needles) is not None),
            timeout,
            f"a log line with {needles!r} in {self.daemon.name}",
        )
        line = self.line_with(*needles)
        assert line is not None
        return line


def error_count(daemon: DaemonProcess, code: str) -> float:
    """``kvship_protocol_errors_total{code=...}`` from the daemon's /metrics."""
    return daemon.metric("kvship_protocol_errors_total", f'code="{code}"')


# --------------------------------------------------------- hand-made frames
def new_tid() -> int:
    """A random 63-bit transfer id, as a real daemon would pick."""
    return secrets.randbits(63) | 1


def peer_hello(name: str = "hostile", **kwargs: Any) -> bytes:
    """Preface + HELLO of a peer daemon (kwargs override Hello fields)."""
    fields: dict[str, Any] = {"capabilities": CAP_STRIPING, **kwargs}
    return MAGIC + Hello(ROLE_PEER, name, **fields).encode()


def u8_layers(*sizes: int) -> tuple[LayerSpec, ...]:
    """Flat uint8 layers of the given byte sizes."""
    return tuple(LayerSpec("uint8", (n,), n) for n in sizes)


def open_frame(
    tid: int, request_id: str, layer_sizes: Sequence[int], chunk_size: int, **kwargs: Any
) -> bytes:
    return Open(tid, request_id, u8_layers(*layer_sizes), chunk_size, **kwargs).encode()


def chunk_frame(
    tid: int,
    index: int,
    layer: int,
    offset: int,
    data: bytes,
    *,
    checksum: int | None = None,
    raw_length: int | None = None,
) -> bytes:
    """A whole CHUNK frame; ``checksum``/``raw_length`` may lie on purpose."""
    meta = ChunkMeta(
        tid,
        index,
        layer,
        offset,
        len(data) if raw_length is None else raw_length,
        chunk_checksum(data) if checksum is None else checksum,
    )
    return Chunk.header(meta, len(data)) + data


def parse_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Split a byte stream into (type, body) frames; returns them and the leftover bytes."""
    frames: list[tuple[int, bytes]] = []
    pos = 0
    while len(data) - pos >= HEADER_SIZE:
        length, ftype, _flags, _ = HEADER.unpack_from(data, pos)
        if len(data) - pos - HEADER_SIZE < length:
            break
        frames.append((ftype, data[pos + HEADER_SIZE : pos + HEADER_SIZE + length]))
        pos += HEADER_SIZE + length
    return frames, data[pos:]


async def frames_from(reader: asyncio.StreamReader) -> AsyncIterator[tuple[int, bytes]]:
    """What a daemon sends to a test's own peer listener: its preface skipped, then each
    (type, body) frame as it arrives; ends at EOF or a reset."""
    data, preface = b"", True
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        while chunk := await reader.read(1 << 16):
            data += chunk
            if preface:
                if len(data) < len(MAGIC):
                    continue
                data, preface = data[len(MAGIC) :], False
            frames, data = parse_frames(data)
            for frame in frames:
                yield frame


def goaway_of(frames: Sequence[tuple[int, bytes]]) -> GoAway | None:
    """The GOAWAY among ``frames`` (the last frame a daemon sends), decoded, or None."""
    for ftype, body in frames:
        if ftype == FrameType.GOAWAY:
            return GoAway.decode(memoryview(body))
    return None


# ---------------------------------------------------------- a hostile peer
class RawPeer:
    """A peer that writes exactly the bytes a test gives it, over a real TCP socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        host, port = writer.get_extra_info("sockname")[:2]
        self.local = f"{host}:{port}"  # what the daemon logs as this connection's peer
        self.ack: HelloAck | None = None
        self.frames: list[tuple[int, bytes]] = []

    @classmethod
    async def connect(cls, address: str) -> RawPeer:
        host, _, port = address.rpartition(":")
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), int(port)), IO_TIMEOUT
        )
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), IO_TIMEOUT)

    async def read_frame(self) -> tuple[int, bytes] | None:
        """The next whole frame, or None at EOF/reset."""
        try:
            head = await asyncio.wait_for(self.reader.readexactly(HEADER_SIZE), IO_TIMEOUT)
            length, ftype, _, _ = HEADER.unpack(head)
            body = await asyncio.wait_for(self.reader.readexactly(length), IO_TIMEOUT)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        self.frames.append((ftype, body))
        return ftype, body

    async def handshake(self, **hello: Any) -> HelloAck:
        """Preface + HELLO, then read the daemon's HELLO_ACK."""
        await self.send(peer_hello(**hello))
        frame = await self.read_frame()
        assert frame is not None, "daemon closed the connection during the handshake"
        ftype, body = frame
        assert ftype == FrameType.HELLO_ACK, f"expected HELLO_ACK, got frame 0x{ftype:02x}"
        self.ack = HelloAck.decode(memoryview(body))
        return self.ack

    async def until_closed(self, max_frames: int = 10_000) -> list[tuple[int, bytes]]:
        """Read frames until the daemon closes the connection (bounded in count and time)."""
        for _ in range(max_frames):
            if await self.read_frame() is None:
                return self.frames
        pytest.fail(f"daemon sent {max_frames} frames without closing")

    async def goaway(self) -> GoAway:
        """Read until the daemon closes; return its GOAWAY (the test fails without one)."""
        frames = await self.until_closed()
        goaway = goaway_of(frames)
        assert goaway is not None, f"connection closed without GOAWAY; frames: {frames!r}"
        return goaway

    async def half_close(self) -> None:
        """Send EOF (the daemon sees the stream end), keep reading."""
        if self.writer.can_write_eof():
            self.writer.write_eof()

    def close(self) -> None:
        self.writer.close()


def exchange(address: str, payload: bytes, timeout: float = IO_TIMEOUT) -> bytes:
    """Blocking: connect, write ``payload``, send EOF, read until the daemon closes."""
    host, _, port = address.rpartition(":")
    out = bytearray()
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except TimeoutError:
            raise
        except OSError:
            pass  # the daemon closed before taking all of it: read what it said
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break  # closed with our bytes still unread: fine for a fuzzer
            if not data:
                break
            out += data
        else:
            pytest.fail(f"daemon kept the connection open for {timeout} s after EOF")
    return bytes(out)


# ------------------------------------------------------ a good transfer
def random_layers(n_layers: int, layer_bytes: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, layer_bytes, dtype=np.uint8) for _ in range(n_layers)]


def same_bytes(got: np.ndarray, want: np.ndarray) -> bool:
    return (
        got.dtype == want.dtype
        and got.shape == want.shape
        and got.tobytes() == np.ascontiguousarray(want).tobytes()
    )


async def receive_all(
    client: Client,
    request_id: str,
    timeout: float = 20.0,
    on_layer: Callable[[int], Awaitable[None] | None] | None = None,
) -> tuple[dict[int, np.ndarray], Any]:
    """Subscribe to ``request_id`` and collect its layers (copies); returns them and the
    Receiver."""
    receiver = await client.receive(request_id, timeout=timeout)
    got: dict[int, np.ndarray] = {}
    async for layer, array in receiver.layers(copy=True):
        assert layer not in got, f"layer {layer} delivered twice"
        got[layer] = array
        if on_layer is not None:
            result = on_layer(layer)
            if result is not None:
                await result
    return got, receiver


async def send_layers(
    client: Client,
    request_id: str,
    arrays: Sequence[np.ndarray],
    peer: str,
    *,
    token_ids: Sequence[int] = (),
    pause: float = 0.0,
    timeout: float = 30.0,
) -> Any:
    """Put ``arrays`` layer by layer (optionally pausing between them), then finish."""
    layout = tuple(LayerSpec(a.dtype.name, tuple(a.shape), a.nbytes) for a in arrays)
    sender = await client.send(request_id, layout, peer=peer, token_ids=token_ids)
    try:
        for i, array in enumerate(arrays):
            await sender.put(i, array)
            if pause:
                await asyncio.sleep(pause)
        return await sender.finish(timeout)
    except BaseException:
        await sender.abort()
        raise


async def good_transfer(
    src: DaemonProcess,
    dst: DaemonProcess,
    *,
    n_layers: int = 4,
    layer_bytes: int = 256 * 1024,
    pause: float = 0.0,
    seed: int = 0,
    tcp: bool = False,
) -> tuple[str, Any]:
    """Ship random layers ``src`` -> ``dst`` while an engine on ``dst`` receives them;
    every layer and the token ids must arrive bit-exact and the digests match.

    Returns the request id and the sender's SendResult."""
    request_id = f"good-{secrets.token_hex(6)}"
    arrays = random_layers(n_layers, layer_bytes, seed)
    tokens = list(range(seed, seed + 17))
    engine = "engine" if tcp else "engine_socket"
    async with (
        Client(dst.addresses[engine]) as recv_client,
        Client(src.addresses[engine]) as send_client,
    ):
        receiving = asyncio.create_task(receive_all(recv_client, request_id))
        try:
            result = await asyncio.wait_for(
                send_layers(
                    send_client, request_id, arrays, dst.peer, token_ids=tokens, pause=pause
                ),
                60,
            )
            got, receiver = await asyncio.wait_for(receiving, 60)
        finally:
            receiving.cancel()
    assert sorted(got) == list(range(n_layers))
    for i, array in enumerate(arrays):
        assert same_bytes(got[i], array), f"layer {i} differs"
    assert list(receiver.token_ids) == tokens
    assert receiver.complete and receiver.digest == result.digest
    assert result.total_bytes == n_layers * layer_bytes
    return request_id, result
