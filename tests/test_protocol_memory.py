"""Memory a peer can make the core commit (found by tools/fuzz_wire.py): only what it sent,
never what a header or a HELLO_ACK announces."""

from __future__ import annotations

import tracemalloc

import pytest

from kvship.protocol import (
    CAP_STRIPING,
    ROLE_PEER,
    Connection,
    ErrorCode,
    FrameType,
    Hello,
    HelloAck,
    ProtocolError,
    Role,
    frame_header,
)

MIB = 1 << 20


def test_an_acceptor_announcing_huge_frames_does_not_raise_the_initiators_limit() -> None:
    i = Connection(role=Role.PEER, initiator=True)
    i.initiate(Hello(ROLE_PEER, "i"))
    i.receive_data(HelloAck(1, 0, 1 << 20, 2**32 - 1, 4096, 4, "evil").encode())
    assert i.limits.max_frame <= 16 * MIB + 64
    with pytest.raises(ProtocolError) as info:
        i.receive_data(frame_header(FrameType.OPEN, 2**32 - 2))
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE


def test_a_header_announcing_megabytes_commits_only_what_arrives() -> None:
    i = Connection(role=Role.PEER, initiator=True)
    a = Connection(role=Role.PEER, initiator=False)
    a.receive_data(i.initiate(Hello(ROLE_PEER, "i", capabilities=CAP_STRIPING)))
    i.receive_data(a.accept("a", CAP_STRIPING))
    tracemalloc.start()
    try:
        a.receive_data(frame_header(FrameType.OPEN, 16 * MIB) + b"x" * 1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MIB, peak  # not the 16 MiB the header announced
    assert not a.closed  # still waiting for the rest: a body may be large
