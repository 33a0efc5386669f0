"""FramedProtocol's writes on a real socket: control frames sent in one loop turn leave
together, in order, before anything written after them, and none is lost when the
connection closes right after them."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kvship.aio import open_connection
from kvship.protocol import (
    ROLE_ENGINE,
    Connection,
    Frame,
    Hello,
    Ping,
    Pong,
    Role,
)


async def _raw_acceptor(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, got: asyncio.Future[list[Frame]]
) -> None:
    """The other end as a bare sans-IO core: answers the HELLO, collects every frame
    until EOF."""
    core = Connection(role=Role.of_hello(ROLE_ENGINE, False), initiator=False)
    frames: list[Frame] = []
    answered = False
    while data := await reader.read(65536):
        for frame in core.receive_data(data):
            if isinstance(frame, Hello) and not answered:
                writer.write(core.accept("raw"))
                answered = True
            else:
                frames.append(frame)
    got.set_result(frames)
    writer.close()


async def test_frames_of_one_turn_leave_in_order_and_survive_a_close(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    got: asyncio.Future[list[Frame]] = loop.create_future()
    path = str(tmp_path / "raw.sock")
    server = await asyncio.start_unix_server(lambda r, w: _raw_acceptor(r, w, got), path)
    async with server:
        proto = await open_connection(
            path, Hello(ROLE_ENGINE, "writer"), lambda p, f: None, timeout=10
        )
        for n in range(5):
            proto.send(Ping(n))
        proto.write(proto.conn.send(Ping(99)))  # a direct write goes after the queued ones
        proto.send(Ping(100))
        proto.close()  # in the same turn: nothing queued may be lost
        frames = await asyncio.wait_for(got, 10)
    assert [f.opaque for f in frames if isinstance(f, Ping)] == [0, 1, 2, 3, 4, 99, 100]
    assert not any(isinstance(f, Pong) for f in frames)
