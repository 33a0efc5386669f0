"""FramedProtocol's writes on a real socket: control frames sent in one loop turn leave
together, in order, before anything written after them, and none is lost when the
connection closes right after them."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kvship.aio import FramedProtocol, open_connection
from kvship.protocol import (
    CAP_RESUME,
    ROLE_ENGINE,
    ROLE_PEER,
    Ack,
    Chunk,
    ChunkMeta,
    Connection,
    Credit,
    Frame,
    Hello,
    LayerSpec,
    Limits,
    Open,
    Ping,
    Pong,
    Role,
    chunk_checksum,
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


async def test_acks_and_credit_of_a_turn_leave_as_one_ack_and_one_credit() -> None:
    """A receiver's ACKs of one turn become one ACK frame per transfer, followed by the
    turn's credit as one CREDIT; a grant past an eighth of the window leaves at once, and
    takes the ACKs queued before it along (one write for a chunk's ACK and credit)."""
    loop = asyncio.get_running_loop()
    window = Limits().initial_window
    chunks_in: asyncio.Queue[Chunk] = asyncio.Queue()

    def on_frame(proto: FramedProtocol, frame: Frame) -> None:
        if isinstance(frame, Hello):
            proto.write(proto.conn.accept("receiver"))
        elif isinstance(frame, Chunk):
            chunks_in.put_nowait(frame)

    accepted: list[FramedProtocol] = []

    def acceptor() -> FramedProtocol:
        accepted.append(FramedProtocol(Connection(role=Role.PEER, initiator=False), on_frame))
        return accepted[-1]

    server = await loop.create_server(acceptor, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sender = Connection(role=Role.PEER, initiator=True)
        writer.write(sender.initiate(Hello(ROLE_PEER, "sender", capabilities=CAP_RESUME)))
        got: list[Frame] = []

        async def frames_until(count: int) -> None:
            while len(got) < count:
                got.extend(sender.receive_data(await reader.read(65536)))

        await frames_until(1)  # HELLO_ACK
        layers = (LayerSpec("uint8", (32,), 32),)
        writer.write(sender.send(Open(7, "sender", layers, 8)))
        for index in range(4):
            data = bytes([index]) * 8
            meta = ChunkMeta(7, index, 0, index * 8, 8, chunk_checksum(data))
            writer.write(sender.send(Chunk(meta, data)))
        received = [await asyncio.wait_for(chunks_in.get(), 10) for _ in range(4)]
        (proto,) = accepted

        for chunk in received[:3]:  # one turn: three ACKs, three small grants
            proto.ack(7, chunk.meta.chunk_index)
            proto.grant(8)
        await frames_until(3)
        proto.ack(7, 3)
        proto.grant(window // 8)  # past an eighth: leaves now, with the ACK queued before
        proto.send(Ping(5))
        await frames_until(6)
        writer.close()

    assert got[1:] == [Ack(7, (0, 1, 2)), Credit(24), Ack(7, (3,)), Credit(window // 8), Ping(5)]
