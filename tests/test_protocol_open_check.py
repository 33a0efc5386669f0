"""END's open_check (SPEC §7.4, CAP_OPEN_CHECK): an OPEN altered on the way (a flipped token
id, layer or request id, which no chunk checksum covers) fails at its END."""

from __future__ import annotations

import pytest

from kvship.protocol import (
    CAP_OPEN_CHECK,
    CAP_STRIPING,
    ROLE_PEER,
    ChunkMeta,
    Connection,
    End,
    ErrorCode,
    Hello,
    LayerSpec,
    Open,
    ProtocolError,
    Role,
    chunk_checksum,
    digest_of_checksums,
)

DATA = bytes(range(16))
OPEN = Open(5, "req", (LayerSpec("uint8", (16,), 16),), 16, token_ids=(1, 2, 3))


def pair(caps: int) -> tuple[Connection, Connection]:
    a = Connection(role=Role.PEER, initiator=True)
    b = Connection(role=Role.PEER, initiator=False)
    b.receive_data(a.initiate(Hello(ROLE_PEER, "a", capabilities=caps)))
    a.receive_data(b.accept("b", caps))
    return a, b


def transfer(a: Connection, b: Connection, alter: int | None) -> None:
    opened = bytearray(a.send(OPEN))
    if alter is not None:
        opened[alter] ^= 0x01
    b.receive_data(bytes(opened))
    meta = ChunkMeta(5, 0, 0, 0, 16, chunk_checksum(DATA))
    b.receive_data(a.chunk_header(meta, 16) + DATA)
    b.receive_data(a.send(End(5, 1, digest_of_checksums([meta.checksum]))))


def test_an_intact_open_passes() -> None:
    a, b = pair(CAP_STRIPING | CAP_OPEN_CHECK)
    transfer(a, b, None)
    assert not b.closed


@pytest.mark.parametrize("where", [8 + 36 + 3, 8 + 36 + 12 + 15], ids=["token", "request_id"])
def test_an_altered_open_fails_at_its_end(where: int) -> None:
    a, b = pair(CAP_STRIPING | CAP_OPEN_CHECK)
    with pytest.raises(ProtocolError) as info:
        transfer(a, b, where)
    assert (
        info.value.code is ErrorCode.CHECKSUM_MISMATCH and "arrived altered" in info.value.message
    )


def test_without_the_capability_end_writes_zero() -> None:
    a, b = pair(CAP_STRIPING)
    transfer(a, b, 8 + 36 + 3)  # undetected here: what the capability is for
    assert not b.closed
