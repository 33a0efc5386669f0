"""Who may send what (kvship.protocol.roles.MAY_SEND), both directions, every frame type.

For each side of a connection (peer initiator, peer acceptor, engine, engine-facing daemon)
and each frame type: a frame the table gives that side goes out through its core and in
through the other end's core without complaint (in a context where it makes sense); one it
does not give is refused by the sending core (LocalProtocolError, nothing changes) and,
sent anyway, by the receiving core (PROTOCOL_ERROR, the connection closes).
"""

from __future__ import annotations

from typing import Any

import pytest

from kvship.protocol import (
    CAP_CODECS,
    CAP_DEDUP,
    CAP_HOLD,
    CAP_RESUME,
    CAP_SHM,
    CAP_SKIP,
    CAP_STRIPING,
    MAGIC,
    ROLE_ENGINE,
    ROLE_PEER,
    Abort,
    Ack,
    Chunk,
    ChunkMeta,
    Complete,
    Connection,
    Credit,
    End,
    ErrorCode,
    FrameType,
    GoAway,
    Have,
    Hello,
    Hold,
    LayerReady,
    LayerSpec,
    LocalProtocolError,
    Open,
    Ping,
    Pong,
    ProtocolError,
    Release,
    Resume,
    Role,
    ShmAttach,
    ShmAttached,
    ShmChunk,
    Side,
    Skip,
    Subscribe,
    chunk_checksum,
)
from kvship.protocol.roles import MAY_SEND
from test_protocol_send import snapshot

PEER_CAPS = CAP_STRIPING | CAP_CODECS | CAP_DEDUP | CAP_RESUME | CAP_HOLD
LAYERS = (LayerSpec("uint8", (8,), 8),)
DATA = b"01234567"
META = ChunkMeta(1, 0, 0, 0, 8, chunk_checksum(DATA))


def connect(side: Side) -> tuple[Connection, Connection]:
    """(``side``'s connection, the other end's), after the handshake, everything offered."""
    if side in (Side.PEER_INITIATOR, Side.PEER_ACCEPTOR):
        a = Connection(role=Role.PEER, initiator=True)
        b = Connection(role=Role.PEER, initiator=False)
        hello = Hello(ROLE_PEER, "a", capabilities=PEER_CAPS)
    else:
        a, b = Connection(role=Role.ENGINE), Connection(role=Role.DAEMON)
        hello = Hello(ROLE_ENGINE, "engine", capabilities=CAP_SHM | CAP_SKIP)
    b.receive_data(a.initiate(hello))
    a.receive_data(b.accept("b"))
    assert a.side is not None and b.side is a.side.other
    return (a, b) if a.side is side else (b, a)


def put_open(tid: int = 1) -> Open:
    return Open(tid, "put", LAYERS, 8, peer="decode:7100")


def peer_open(tid: int = 1) -> Open:
    return Open(tid, "peer", LAYERS, 8)


def delivery(tid: int = 1) -> Open:
    return Open(tid, "delivery", LAYERS, 8)


Step = tuple[str, Any]  # ("me" | "them", frame): who sends it, in order
S = Side
T = FrameType

# Per (side, frame type) the table allows: what comes first, then the frame itself.
LEGAL: dict[tuple[Side, int], tuple[list[Step], Any]] = {
    (S.PEER_INITIATOR, T.OPEN): ([], peer_open()),
    (S.PEER_INITIATOR, T.CHUNK): ([("me", peer_open())], Chunk(META, DATA)),
    (S.PEER_INITIATOR, T.END): ([("me", peer_open())], End(1, 0, 0)),
    (S.PEER_ACCEPTOR, T.COMPLETE): (
        [("them", peer_open()), ("them", End(1, 0, 0))],
        Complete(1, 8, 0),
    ),
    (S.PEER_ACCEPTOR, T.HAVE): ([("them", peer_open())], Have(1, 0, False)),
    (S.PEER_ACCEPTOR, T.ACK): ([("them", peer_open())], Ack(1, (0,))),
    (S.PEER_ACCEPTOR, T.RESUME): ([("them", peer_open())], Resume.of(1, 1, {0})),
    (S.PEER_ACCEPTOR, T.HOLD): ([("them", peer_open())], Hold(1, True)),
    (S.ENGINE, T.OPEN): ([], put_open()),
    (S.ENGINE, T.CHUNK): ([("me", put_open())], Chunk(META, DATA)),
    (S.ENGINE, T.END): ([("me", put_open())], End(1, 0, 0)),
    (S.ENGINE, T.SUBSCRIBE): ([], Subscribe("req", 0)),
    (S.ENGINE, T.SHM_ATTACH): ([], ShmAttach(1 << 20, "/dev/shm/a")),
    (S.ENGINE, T.SHM_CHUNK): (
        [
            ("me", ShmAttach(1 << 20, "/dev/shm/a")),
            ("them", ShmAttached(1 << 20)),
            ("me", put_open()),
        ],
        ShmChunk(META, 0),
    ),
    (S.ENGINE, T.RELEASE): (
        [("me", ShmAttach(1 << 20, "/dev/shm/a")), ("them", ShmAttached(1 << 20))],
        Release(0, 8),
    ),
    (S.DAEMON, T.OPEN): ([("them", Subscribe("req", 0))], delivery()),
    (S.DAEMON, T.CHUNK): ([("them", Subscribe("req", 0)), ("me", delivery())], Chunk(META, DATA)),
    (S.DAEMON, T.END): ([("them", Subscribe("req", 0)), ("me", delivery())], End(1, 0, 0)),
    (S.DAEMON, T.COMPLETE): (
        [("them", put_open()), ("them", End(1, 0, 0))],  # relaying the put's COMPLETE
        Complete(1, 8, 0),
    ),
    (S.DAEMON, T.SHM_ATTACHED): ([("them", ShmAttach(1 << 20, "/dev/shm/a"))], ShmAttached(1)),
    (S.DAEMON, T.LAYER_READY): (
        [
            ("them", ShmAttach(1 << 20, "/dev/shm/a")),
            ("me", ShmAttached(1 << 20)),
            ("them", Subscribe("req", 0)),
            ("me", delivery()),
        ],
        LayerReady(1, 0, 4096, 8),
    ),
    (S.DAEMON, T.SKIP): ([("them", put_open())], Skip(1, (0,))),
    (S.DAEMON, T.RELEASE): (
        [("them", ShmAttach(1 << 20, "/dev/shm/a")), ("me", ShmAttached(1 << 20))],
        Release(0, 8),
    ),
}
for _side in Side:
    LEGAL[(_side, T.CREDIT)] = ([], Credit(1))
    LEGAL[(_side, T.ABORT)] = ([], Abort(77, int(ErrorCode.CANCELLED), "x"))
    LEGAL[(_side, T.PING)] = ([], Ping(1))
    LEGAL[(_side, T.PONG)] = ([], Pong(1))
    LEGAL[(_side, T.GOAWAY)] = ([], GoAway(0, "bye"))

# A sample of every frame type, for the refusals (the role check comes before any other).
SAMPLES: dict[int, Any] = {
    T.OPEN: peer_open(),
    T.CHUNK: Chunk(META, DATA),
    T.END: End(1, 0, 0),
    T.COMPLETE: Complete(1, 8, 0),
    T.HAVE: Have(1, 0, False),
    T.ACK: Ack(1, (0,)),
    T.RESUME: Resume.of(1, 1, set()),
    T.HOLD: Hold(1, True),
    T.SUBSCRIBE: Subscribe("req", 0),
    T.SHM_ATTACH: ShmAttach(1 << 20, "/dev/shm/a"),
    T.SHM_ATTACHED: ShmAttached(1 << 20),
    T.SHM_CHUNK: ShmChunk(META, 0),
    T.LAYER_READY: LayerReady(1, 0, 4096, 8),
    T.RELEASE: Release(0, 8),
    T.SKIP: Skip(1, (0,)),
}
FRAME_TYPES = [t for t in SAMPLES] + [T.CREDIT, T.ABORT, T.PING, T.PONG, T.GOAWAY]


def exchange(me: Connection, them: Connection, steps: list[Step]) -> None:
    for who, frame in steps:
        src, dst = (me, them) if who == "me" else (them, me)
        dst.receive_data(src.send(frame))


def test_the_table_is_what_the_legal_cases_cover() -> None:
    for side in Side:
        handshake = {T.HELLO, T.HELLO_ACK, T.AUTH_CHALLENGE, T.AUTH_PROOF}  # test_protocol_auth
        assert {t for (s, t) in LEGAL if s is side} == MAY_SEND[side] - handshake


@pytest.mark.parametrize(
    ("side", "ftype"),
    [(s, t) for s in Side for t in FRAME_TYPES],
    ids=lambda v: v.name if isinstance(v, Side) else f"0x{v:02x}",
)
def test_role_table(side: Side, ftype: int) -> None:
    me, them = connect(side)
    if (side, ftype) in LEGAL:
        steps, frame = LEGAL[(side, ftype)]
        exchange(me, them, steps)
        events = them.receive_data(me.send(frame))
        assert events == [frame]
        return
    frame = SAMPLES[ftype]
    before = snapshot(me)
    with pytest.raises(LocalProtocolError) as info:
        me.send(frame)
    assert info.value.code is ErrorCode.PROTOCOL_ERROR
    assert snapshot(me) == before and not me.closed
    # sent anyway: the receiving core refuses it, naming the frame
    with pytest.raises(ProtocolError) as info:
        them.receive_data(frame.encode())
    assert info.value.code is ErrorCode.PROTOCOL_ERROR
    assert them.closed


def test_complete_from_a_transfers_sender_is_refused() -> None:
    """On a peer connection the initiator sends the transfers: its COMPLETE or HAVE is a
    PROTOCOL_ERROR, with a message that says who may send it."""
    for frame in (Complete(1, 8, 0), Have(1, 0)):
        sender, receiver = connect(Side.PEER_INITIATOR)
        receiver.receive_data(sender.send(peer_open()))
        with pytest.raises(ProtocolError, match="only the peer acceptor") as info:
            receiver.receive_data(frame.encode())
        assert info.value.code is ErrorCode.PROTOCOL_ERROR


def test_subscribe_on_a_peer_connection() -> None:
    _, acceptor = connect(Side.PEER_INITIATOR)
    with pytest.raises(ProtocolError, match="SUBSCRIBE") as info:
        acceptor.receive_data(Subscribe("r", 0).encode())
    assert info.value.code is ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("frame", "needs"),
    [
        (Have(1, 0), CAP_DEDUP),
        (ShmAttach(1, "/dev/shm/x"), CAP_SHM),
        (ShmChunk(META, 0), CAP_SHM),
        (Release(0, 8), CAP_SHM),
    ],
)
def test_frames_need_their_capability(frame: Any, needs: int) -> None:
    """HAVE only with CAP_DEDUP, the arena's frames only with CAP_SHM (both directions)."""
    if needs == CAP_DEDUP:
        initiator = Connection(role=Role.PEER, initiator=True)
        acceptor = Connection(role=Role.PEER, initiator=False)
        acceptor.receive_data(initiator.initiate(Hello(ROLE_PEER, capabilities=CAP_STRIPING)))
        initiator.receive_data(acceptor.accept("b"))
        me, them = acceptor, initiator
    else:
        me, them = Connection(role=Role.ENGINE), Connection(role=Role.DAEMON)
        them.receive_data(me.initiate(Hello(ROLE_ENGINE)))  # offers no CAP_SHM (TCP)
        me.receive_data(them.accept("daemon"))
    with pytest.raises(LocalProtocolError, match="capability") as info:
        me.send(frame)
    assert info.value.code is ErrorCode.PROTOCOL_ERROR
    with pytest.raises(ProtocolError, match="capability"):
        them.receive_data(frame.encode())


def test_skip_needs_its_capability() -> None:
    """SKIP (daemon -> engine) only where the engine offered CAP_SKIP: an older engine
    never sees one (§9.1.1)."""
    engine, daemon = Connection(role=Role.ENGINE), Connection(role=Role.DAEMON)
    daemon.receive_data(engine.initiate(Hello(ROLE_ENGINE, capabilities=CAP_SHM)))
    engine.receive_data(daemon.accept("daemon", CAP_SHM | CAP_SKIP))
    with pytest.raises(LocalProtocolError, match="capability"):
        daemon.send(Skip(1, (0,)))
    with pytest.raises(ProtocolError, match="capability"):
        engine.receive_data(Skip(1, (0,)).encode())


def test_only_an_engine_names_a_peer() -> None:
    """OPEN's meta.peer is the engine's destination (§5.3): from anyone else, refused."""
    for side in (Side.PEER_INITIATOR, Side.DAEMON):
        me, them = connect(side)
        if side is Side.DAEMON:
            exchange(me, them, [("them", Subscribe("r", 0))])
        with pytest.raises(LocalProtocolError, match="names a peer"):
            me.send(put_open())
        with pytest.raises(ProtocolError, match="names a peer"):
            them.receive_data(put_open().encode())


def test_listener_role_is_enforced_on_hello() -> None:
    """A peer listener refuses an engine's HELLO and the engine listener a peer's (§9)."""
    for role, hello_role in ((Role.PEER, ROLE_ENGINE), (Role.DAEMON, ROLE_PEER)):
        conn = Connection(role=role, initiator=False)
        with pytest.raises(ProtocolError, match="listener") as info:
            conn.receive_data(MAGIC + Hello(hello_role).encode())
        assert info.value.code is ErrorCode.PROTOCOL_ERROR
    open_one = Connection(initiator=False)  # no role given: the HELLO decides
    open_one.receive_data(MAGIC + Hello(ROLE_ENGINE).encode())
    assert open_one.role is Role.DAEMON and open_one.side is Side.DAEMON
    with pytest.raises(LocalProtocolError):
        Connection(role=Role.PEER, initiator=True).initiate(Hello(ROLE_ENGINE))
    with pytest.raises(ValueError):
        Connection(role=Role.ENGINE, initiator=False)
    with pytest.raises(ValueError):
        Connection(role=Role.PEER)


def test_engine_subscriptions_one_at_a_time() -> None:
    """§9.3: one SUBSCRIBE awaiting its OPEN per connection; the daemon's OPEN (or an
    ABORT that names no transfer of the engine's, NOT_FOUND) answers it; an OPEN nobody
    asked for is refused by the engine."""
    engine, daemon = connect(Side.ENGINE)
    daemon.receive_data(engine.send(Subscribe("r", 0)))
    with pytest.raises(LocalProtocolError, match="SUBSCRIBE already"):
        engine.send(Subscribe("s", 0))
    engine.receive_data(daemon.send(Abort(0, int(ErrorCode.NOT_FOUND), "nothing came")))
    daemon.receive_data(engine.send(Subscribe("s", 0)))
    engine.receive_data(daemon.send(delivery(5)))
    daemon.receive_data(engine.send(Subscribe("t", 0)))  # answered: the next may go
    engine.receive_data(daemon.send(delivery(6)))
    with pytest.raises(ProtocolError, match="without a SUBSCRIBE"):
        engine.receive_data(delivery(7).encode())


def test_arena_attach_rules() -> None:
    engine, daemon = connect(Side.ENGINE)
    with pytest.raises(LocalProtocolError, match="before SHM_ATTACH"):
        engine.send(ShmChunk(META, 0))
    with pytest.raises(LocalProtocolError, match="without an SHM_ATTACH"):
        daemon.send(ShmAttached(1))
    daemon.receive_data(engine.send(ShmAttach(1 << 20, "/dev/shm/a")))
    with pytest.raises(LocalProtocolError, match="twice"):
        engine.send(ShmAttach(1 << 20, "/dev/shm/b"))
    engine.receive_data(daemon.send(ShmAttached(1 << 20)))
    with pytest.raises(LocalProtocolError, match="without an SHM_ATTACH"):
        daemon.send(ShmAttached(1 << 20))
    with pytest.raises(ProtocolError, match="twice"):
        daemon.receive_data(ShmAttach(1, "/dev/shm/c").encode())
    # the receiving side's view: SHM_CHUNK before any SHM_ATTACH
    _, fresh = connect(Side.ENGINE)
    fresh.receive_data(put_open().encode())
    with pytest.raises(ProtocolError, match="before SHM_ATTACH"):
        fresh.receive_data(ShmChunk(META, 0).encode())


def test_layer_ready_fits_the_delivery() -> None:
    daemon, engine = connect(Side.DAEMON)
    exchange(daemon, engine, [("them", Subscribe("r", 0)), ("me", delivery())])
    zero_ok = Open(2, "r2", (LayerSpec("uint8", (0,), 0),), 8)
    with pytest.raises(LocalProtocolError, match="before SHM_ATTACH"):  # no arena yet
        daemon.send(LayerReady(1, 0, 4096, 8))
    with pytest.raises(LocalProtocolError) as info:
        daemon.send(LayerReady(1, 1, 0, 8))  # no layer 1
    assert info.value.code is ErrorCode.LAYOUT_MISMATCH
    with pytest.raises(LocalProtocolError) as info:
        daemon.send(LayerReady(1, 0, 0, 7))  # layer 0 has 8 bytes
    assert info.value.code is ErrorCode.LAYOUT_MISMATCH
    with pytest.raises(LocalProtocolError) as info:
        daemon.send(LayerReady(9, 0, 0, 8))
    assert info.value.code is ErrorCode.UNKNOWN_TRANSFER
    # a 0-byte layer needs no arena (the reference daemon hands it over on TCP too)
    exchange(daemon, engine, [("me", End(1, 0, 0)), ("them", Subscribe("r2", 0))])
    exchange(daemon, engine, [("me", zero_ok), ("me", LayerReady(2, 0, 0, 0))])
    for bad, code in ((LayerReady(2, 3, 0, 0), ErrorCode.LAYOUT_MISMATCH),):
        with pytest.raises(ProtocolError) as err:
            engine.receive_data(bad.encode())
        assert err.value.code is code


def test_delivery_ends_with_complete_from_its_sender() -> None:
    """On an engine connection the daemon's COMPLETE also ends its own delivery (§9.3),
    with or without END first; the engine's core then holds nothing of it."""
    daemon, engine = connect(Side.DAEMON)
    exchange(daemon, engine, [("them", Subscribe("r", 0)), ("me", delivery(3))])
    assert engine.open_transfers == 1 and daemon.sending_transfers == 1
    exchange(daemon, engine, [("me", Complete(3, 8, 0))])  # no END: the SPEC's path
    assert engine.open_transfers == 0 and daemon.sending_transfers == 0
    exchange(daemon, engine, [("them", Subscribe("r", 0)), ("me", delivery(4))])
    exchange(daemon, engine, [("me", End(4, 0, 0)), ("me", Complete(4, 8, 0))])  # the reference
    assert engine.open_transfers == 0 and daemon.sending_transfers == 0


def test_complete_before_end_is_refused() -> None:
    sender, receiver = connect(Side.PEER_INITIATOR)
    receiver.receive_data(sender.send(peer_open()))
    with pytest.raises(LocalProtocolError, match="before its END"):
        receiver.send(Complete(1, 8, 0))
    with pytest.raises(ProtocolError, match="before its END"):
        sender.receive_data(Complete(1, 8, 0).encode())
    # after END it goes through, and the sender's core forgets the transfer
    sender2, receiver2 = connect(Side.PEER_INITIATOR)
    receiver2.receive_data(sender2.send(peer_open()) + sender2.send(End(1, 0, 0)))
    assert sender2.receive_data(receiver2.send(Complete(1, 8, 0))) == [Complete(1, 8, 0)]
    with pytest.raises(LocalProtocolError) as info:  # gone: as if never opened
        sender2.chunk_header(META, 8)
    assert info.value.code is ErrorCode.UNKNOWN_TRANSFER
