"""Peer authentication by pre-shared key (SPEC §6.4), on the sans-IO core alone: the
exchange step by step, every refusal with AUTH_FAILED, replays, tampering, and the
property that the secret never crosses the wire."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvship.protocol import (
    CAP_AUTH,
    CAP_STRIPING,
    ROLE_ENGINE,
    ROLE_PEER,
    AuthChallenge,
    AuthProof,
    Connection,
    ErrorCode,
    Hello,
    HelloAck,
    LocalProtocolError,
    Ping,
    ProtocolError,
    Role,
    State,
)
from kvship.protocol.auth import AUTH_PSK, NONCE_SIZE, PeerKey, hello_auth

SECRET = bytes(range(100, 132))
KEY = PeerKey("prefill-east", SECRET)
KEYS = {"prefill-east": SECRET, "other": b"o" * 32}
HELLO = Hello(ROLE_PEER, "prefill-a", capabilities=CAP_STRIPING)


def initiator(key: PeerKey | None = KEY) -> Connection:
    return Connection(role=Role.PEER, initiator=True, key=key)


def acceptor(keys: dict[str, bytes] | None = KEYS) -> Connection:
    return Connection(role=Role.PEER, initiator=False, keys=keys)


def feed(conn: Connection, data: bytes, *, bytewise: bool = False) -> list[object]:
    if not bytewise:
        return list(conn.receive_data(data))
    events: list[object] = []
    for i in range(len(data)):
        events += conn.receive_data(data[i : i + 1])
    return events


def handshake(i: Connection, a: Connection, *, bytewise: bool = False) -> list[bytes]:
    """Run the four steps; returns what went on the wire, in order."""
    hello = i.initiate(HELLO)
    assert [type(e) for e in feed(a, hello, bytewise=bytewise)] == [Hello]
    challenge = a.accept("decode-b", CAP_STRIPING)
    assert a.state is State.AWAIT_PROOF
    assert [type(e) for e in feed(i, challenge, bytewise=bytewise)] == [AuthChallenge]
    assert i.state is State.AWAIT_ACK
    proof = i.prove()
    assert [type(e) for e in feed(a, proof, bytewise=bytewise)] == [AuthProof]
    assert a.state is State.AWAIT_ACCEPT
    ack = a.accept()
    assert a.state is State.OPEN
    assert [type(e) for e in feed(i, ack, bytewise=bytewise)] == [HelloAck]
    assert i.state is State.OPEN
    return [hello, challenge, proof, ack]


@pytest.mark.parametrize("bytewise", [False, True])
def test_both_ends_prove_the_key(bytewise: bool) -> None:
    i, a = initiator(), acceptor()
    handshake(i, a, bytewise=bytewise)
    assert i.authenticated_key == a.authenticated_key == "prefill-east"
    assert i.negotiated.capabilities == a.negotiated.capabilities == CAP_STRIPING | CAP_AUTH


def test_a_pipelined_ping_waits_through_the_exchange() -> None:
    i, a = initiator(), acceptor()
    a.receive_data(i.initiate(HELLO))
    ping = i.send(Ping(7))  # SPEC §6.1: an initiator may pipeline PING after HELLO
    i.receive_data(a.accept())
    assert feed(a, ping) == [Ping(7)]
    assert a.state is State.AWAIT_PROOF
    a.receive_data(i.prove())
    i.receive_data(a.accept())
    assert a.state is i.state is State.OPEN


def refusal(conn: Connection, action: object) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        action() if callable(action) else conn.receive_data(action)  # type: ignore[arg-type]
    assert not isinstance(info.value, LocalProtocolError)
    assert conn.closed
    return info.value


def test_wrong_key_is_refused_by_the_acceptor() -> None:
    i, a = initiator(PeerKey("prefill-east", b"w" * 32)), acceptor()
    a.receive_data(i.initiate(HELLO))
    i.receive_data(a.accept())
    error = refusal(a, i.prove())
    assert error.code is ErrorCode.AUTH_FAILED and "does not verify" in error.message


def test_an_acceptor_without_the_key_is_refused_by_the_initiator() -> None:
    """Mutual: a daemon that does not hold the key gets no KV, however it answers."""
    i = initiator()
    impostor = acceptor({"prefill-east": b"i" * 32})
    impostor.receive_data(i.initiate(HELLO))
    i.receive_data(impostor.accept())  # its MAC is made with the wrong secret
    i.prove()
    ack = HelloAck(1, CAP_STRIPING | CAP_AUTH, 1 << 20, (1 << 20) + 64, 1 << 20, 4, "b")
    error = refusal(i, ack.encode())
    assert error.code is ErrorCode.AUTH_FAILED and "does not verify" in error.message


def test_a_forged_hello_ack_is_refused() -> None:
    """An acceptor that skips the challenge (no keys, or a man in the middle answering
    for it) cannot open an authenticated initiator."""
    i = initiator()
    i.initiate(HELLO)
    ack = HelloAck(1, CAP_STRIPING, 1 << 20, (1 << 20) + 64, 1 << 20, 4, "fake").encode()
    error = refusal(i, ack)
    assert error.code is ErrorCode.AUTH_FAILED and "without authenticating" in error.message


@pytest.mark.parametrize(
    ("hello", "why"),
    [
        (HELLO, "authentication required"),  # no key: auth_method 0
        (Hello(ROLE_PEER, "x", auth_method=7, auth=b"t"), "auth_method 7"),  # unknown method
        (Hello(ROLE_PEER, "x", auth_method=AUTH_PSK, auth=b"short"), "nonce and a key id"),
        (
            Hello(ROLE_PEER, "x", auth_method=AUTH_PSK, auth=hello_auth(b"n" * 32, "nobody")),
            "'nobody' is not accepted",
        ),
        (
            Hello(ROLE_PEER, "x", auth_method=AUTH_PSK, auth=hello_auth(b"n" * 32, "bad id!")),
            "nonce and a key id",
        ),
    ],
    ids=["no-key", "unknown-method", "short-auth", "unknown-key-id", "bad-key-id"],
)
def test_hellos_refused_before_any_challenge(hello: Hello, why: str) -> None:
    a = acceptor()
    a.receive_data(Connection(role=Role.PEER, initiator=True).initiate(hello))
    error = refusal(a, a.accept)
    assert error.code is ErrorCode.AUTH_FAILED and why in error.message


def test_an_acceptor_without_keys_refuses_a_keyed_hello() -> None:
    a = acceptor(None)
    a.receive_data(initiator().initiate(HELLO))
    error = refusal(a, a.accept)
    assert error.code is ErrorCode.AUTH_FAILED and "no keys configured" in error.message


def test_an_unkeyed_handshake_is_unchanged() -> None:
    i, a = initiator(None), acceptor(None)
    a.receive_data(i.initiate(HELLO))
    i.receive_data(a.accept("b", CAP_STRIPING | CAP_AUTH))
    assert i.state is a.state is State.OPEN
    assert i.authenticated_key == a.authenticated_key == ""
    assert not i.negotiated.capabilities & CAP_AUTH  # never granted without the exchange


def test_a_replayed_initiator_is_refused() -> None:
    """Bytes recorded from a good handshake, replayed to the acceptor: its new nonce makes
    the old proof worthless."""
    hello, _, proof, _ = handshake(initiator(), acceptor())
    a = acceptor()
    a.receive_data(hello)
    a.accept()
    error = refusal(a, proof)
    assert error.code is ErrorCode.AUTH_FAILED and "replayed" in error.message


def test_a_replayed_acceptor_is_refused() -> None:
    _, challenge, _, ack = handshake(initiator(), acceptor())
    i = initiator()
    i.initiate(HELLO)  # a new nonce
    i.receive_data(challenge)
    i.prove()
    error = refusal(i, ack)
    assert error.code is ErrorCode.AUTH_FAILED and "does not verify" in error.message


def test_a_downgraded_hello_ack_is_refused() -> None:
    """A man in the middle who rewrites HELLO_ACK (here: strips striping) breaks the
    acceptor's MAC, which covers the ACK it meant to send."""
    i, a = initiator(), acceptor()
    a.receive_data(i.initiate(HELLO))
    i.receive_data(a.accept("b", CAP_STRIPING))
    a.receive_data(i.prove())
    ack = HelloAck.decode(memoryview(a.accept())[8:])
    tampered = HelloAck(
        ack.version, CAP_AUTH, ack.initial_window, ack.max_frame, ack.max_chunk,
        ack.max_transfers, ack.node_name,
    ).encode()  # fmt: skip
    assert refusal(i, tampered).code is ErrorCode.AUTH_FAILED


def test_auth_frames_out_of_place() -> None:
    i = initiator(None)
    i.initiate(HELLO)
    error = refusal(i, AuthChallenge(b"n" * 32, b"m" * 32).encode())
    assert error.code is ErrorCode.PROTOCOL_ERROR and "offered no key" in error.message

    i, a = initiator(), acceptor()
    a.receive_data(i.initiate(HELLO))
    challenge = a.accept()
    i.receive_data(challenge)
    assert refusal(i, challenge).code is ErrorCode.PROTOCOL_ERROR  # a second challenge

    i, a = initiator(), acceptor()
    handshake(i, a)
    assert refusal(a, AuthProof(b"m" * 32).encode()).code is ErrorCode.PROTOCOL_ERROR

    i = initiator()
    i.initiate(HELLO)
    with pytest.raises(LocalProtocolError):
        i.prove()  # nothing to answer yet
    assert i.state is State.AWAIT_ACK
    with pytest.raises(LocalProtocolError):
        i.send(AuthProof(b"m" * 32))  # goes out by prove()


def test_an_engine_connection_authenticates_the_same_way() -> None:
    engine = Connection(role=Role.ENGINE, key=KEY)
    daemon = Connection(role=Role.DAEMON, keys=KEYS)
    daemon.receive_data(engine.initiate(Hello(ROLE_ENGINE, "engine")))
    engine.receive_data(daemon.accept())
    daemon.receive_data(engine.prove())
    engine.receive_data(daemon.accept())
    assert engine.authenticated_key == daemon.authenticated_key == "prefill-east"


key_ids = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)
secrets_ = st.binary(min_size=16, max_size=64)


@settings(max_examples=60, deadline=None)
@given(key_id=key_ids, mine=secrets_, theirs=secrets_, seed=st.binary(min_size=64, max_size=64))
def test_the_handshake_opens_iff_the_keys_match(
    key_id: str, mine: bytes, theirs: bytes, seed: bytes
) -> None:
    assume(len(set(mine)) >= 8 and len(set(theirs)) >= 8)  # key-like: not 16 zero bytes
    nonces = iter([seed[:NONCE_SIZE], seed[NONCE_SIZE:]])
    i = Connection(
        role=Role.PEER,
        initiator=True,
        key=PeerKey(key_id, mine),
        random_bytes=lambda n: next(nonces),
    )
    a = Connection(role=Role.PEER, initiator=False, keys={key_id: theirs})
    wire = []
    try:
        wire.append(i.initiate(HELLO))
        a.receive_data(wire[-1])
        wire.append(a.accept())
        i.receive_data(wire[-1])
        wire.append(i.prove())
        a.receive_data(wire[-1])
        wire.append(a.accept())
        i.receive_data(wire[-1])
        opened = True
    except ProtocolError as exc:
        assert exc.code is ErrorCode.AUTH_FAILED
        opened = False
    assert opened is (mine == theirs)
    for secret in {mine, theirs}:  # the key never crosses the wire, in any form we know
        for data in wire:
            assert secret not in data and secret.hex().encode() not in data


def fixed_pair() -> tuple[Connection, Connection]:
    """An initiator and an acceptor whose nonces are fixed: the same bytes every run."""
    i = Connection(role=Role.PEER, initiator=True, key=KEY, random_bytes=lambda n: b"i" * n)
    a = Connection(role=Role.PEER, initiator=False, keys=KEYS, random_bytes=lambda n: b"a" * n)
    return i, a


@settings(max_examples=300, deadline=None)
@given(step=st.integers(0, 3), data=st.data())
def test_any_altered_handshake_byte_fails_the_handshake(step: int, data: st.DataObject) -> None:
    """Flip one bit anywhere in one of the four messages: the handshake does not open,
    except for the header's flag byte, which a known frame type ignores (SPEC §3)."""
    wire = handshake(*fixed_pair())
    pos = data.draw(st.integers(0, len(wire[step]) - 1), label="byte")
    altered = bytearray(wire[step])
    altered[pos] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    ignorable = pos == (8 if step == 0 else 0) + 5  # HELLO comes after the 8-byte MAGIC
    i, a = fixed_pair()
    send = [
        lambda: i.initiate(HELLO),
        lambda: a.accept("decode-b", CAP_STRIPING),
        i.prove,
        a.accept,
    ]
    to = [a, i, a, i]
    try:
        for k in range(4):
            out = send[k]()
            to[k].receive_data(bytes(altered) if k == step else out)
    except ProtocolError as exc:
        assert not ignorable, exc
        assert exc.code in set(ErrorCode) and exc.message
        return
    opened = i.state is State.OPEN and a.state is State.OPEN
    assert opened is ignorable, (step, pos)
