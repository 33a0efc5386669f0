"""The connection's transitions are one table (kvship.protocol.states.TRANSITIONS): every
(state, event) pair is walked here on a real Connection. An allowed pair leads to the state
the table names; any other is refused: a frame received with PROTOCOL_ERROR (BAD_MAGIC while
the preface is due) and the connection closed, a frame this side tried to send with
LocalProtocolError and nothing changed."""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable

import pytest

from kvship.protocol import (
    MAGIC,
    ROLE_PEER,
    TRANSITIONS,
    AuthChallenge,
    AuthProof,
    Connection,
    Credit,
    ErrorCode,
    Event,
    GoAway,
    Hello,
    HelloAck,
    LocalProtocolError,
    Ping,
    ProtocolError,
    State,
)
from kvship.protocol import connection as connection_module
from kvship.protocol.auth import PeerKey
from test_protocol_connection import pair

HELLO = Hello(ROLE_PEER, "walker")
ACK = HelloAck(1, 0, 1024, 2048, 1024, 4, "acceptor")


def initiator_idle() -> Connection:
    return Connection(initiator=True)


def initiator_awaiting_ack() -> Connection:
    conn = Connection(initiator=True)
    conn.initiate(HELLO)
    return conn


def acceptor_fresh() -> Connection:
    return Connection(initiator=False)


def acceptor_after_magic() -> Connection:
    conn = Connection(initiator=False)
    conn.receive_data(MAGIC)
    return conn


def acceptor_after_hello() -> Connection:
    conn = Connection(initiator=False)
    conn.receive_data(MAGIC + HELLO.encode())
    return conn


KEY = PeerKey("walker", b"k" * 32)


def acceptor_awaiting_proof() -> Connection:
    initiator = Connection(initiator=True, key=KEY)
    conn = Connection(initiator=False, keys={KEY.key_id: KEY.secret})
    conn.receive_data(initiator.initiate(HELLO))
    conn.accept()  # AUTH_CHALLENGE
    return conn


def closed() -> Connection:
    _, server = pair()
    server.receive_data(GoAway(0).encode())
    return server


# Each state, reached by every way there is (OPEN: either end).
MAKERS: dict[State, list[Callable[[], Connection]]] = {
    State.IDLE: [initiator_idle],
    State.AWAIT_ACK: [initiator_awaiting_ack],
    State.AWAIT_PREFACE: [acceptor_fresh],
    State.AWAIT_HELLO: [acceptor_after_magic],
    State.AWAIT_ACCEPT: [acceptor_after_hello],
    State.AWAIT_PROOF: [acceptor_awaiting_proof],
    State.OPEN: [lambda: pair()[0], lambda: pair()[1]],
    State.CLOSED: [closed],
}

# What makes each event happen. RECV_FRAME / SEND_FRAME use CREDIT: every role sends it.
DO: dict[Event, Callable[[Connection], object]] = {
    Event.RECV_PREFACE: lambda c: c.receive_data(MAGIC),
    Event.RECV_HELLO: lambda c: c.receive_data(HELLO.encode()),
    Event.RECV_HELLO_ACK: lambda c: c.receive_data(ACK.encode()),
    Event.RECV_PING: lambda c: c.receive_data(Ping(1).encode()),
    Event.RECV_GOAWAY: lambda c: c.receive_data(GoAway(0).encode()),
    Event.RECV_FRAME: lambda c: c.receive_data(Credit(1).encode()),
    Event.SEND_HELLO: lambda c: c.initiate(HELLO),
    Event.SEND_HELLO_ACK: lambda c: c.accept(),
    Event.SEND_PING: lambda c: c.send(Ping(1)),
    Event.SEND_GOAWAY: lambda c: c.send(GoAway(0)),
    Event.SEND_FRAME: lambda c: c.send(Credit(1)),
    Event.RECV_AUTH_CHALLENGE: lambda c: c.receive_data(
        AuthChallenge(b"n" * 32, b"m" * 32).encode()
    ),
    Event.RECV_AUTH_PROOF: lambda c: c.receive_data(AuthProof(b"m" * 32).encode()),
    Event.SEND_AUTH_CHALLENGE: lambda c: c.accept(),
    Event.SEND_AUTH_PROOF: lambda c: c.prove(),
    Event.EOF: lambda c: c.receive_eof(),
    Event.ERROR: lambda c: c.close(ProtocolError(ErrorCode.INTERNAL_ERROR, "test")),
}

# The authentication exchange's allowed steps also depend on what the connection holds (a
# key, a nonce received): tests/test_protocol_auth.py walks them; here only its refusals.
AUTH_EVENTS = {
    Event.RECV_AUTH_CHALLENGE,
    Event.RECV_AUTH_PROOF,
    Event.SEND_AUTH_CHALLENGE,
    Event.SEND_AUTH_PROOF,
}

CASES = [
    pytest.param(state, event, make, id=f"{state.name}-{event.name}-{i}")
    for state, makers in MAKERS.items()
    for i, make in enumerate(makers)
    for event in Event
    if not (event in AUTH_EVENTS and (state, event) in TRANSITIONS)
]


def expected_refusal(state: State, event: Event) -> ErrorCode | None:
    """The code a refused pair gets; None where the bytes are just discarded."""
    if event.sending:
        return ErrorCode.PROTOCOL_ERROR
    if state is State.CLOSED:
        return None  # bytes after the close are discarded (SPEC §5.10)
    if state is State.AWAIT_PREFACE:
        return ErrorCode.BAD_MAGIC  # the first 8 bytes are compared with MAGIC, whatever
    return ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize(("state", "event", "make"), CASES)
def test_every_state_and_event(state: State, event: Event, make: Callable[[], Connection]) -> None:
    conn = make()
    assert conn.state is state
    allowed = TRANSITIONS.get((state, event))
    if event is Event.RECV_PREFACE and state is not State.AWAIT_PREFACE:
        # The preface is read only where it is due: elsewhere these 8 bytes are a frame
        # header (of a 2.3 GB body): the size limit refuses them first.
        assert allowed is None
        if state is State.CLOSED:
            assert DO[event](conn) == []
        else:
            with pytest.raises(ProtocolError) as info:
                DO[event](conn)
            assert info.value.code is ErrorCode.FRAME_TOO_LARGE
        return
    if allowed is not None:
        DO[event](conn)
        assert conn.state is allowed
        return
    code = expected_refusal(state, event)
    if code is None:
        assert DO[event](conn) == [] and conn.state is State.CLOSED
        return
    with pytest.raises(ProtocolError) as info:
        DO[event](conn)
    assert info.value.code is code, info.value
    if event.sending:
        assert isinstance(info.value, LocalProtocolError)
        assert conn.state is state  # nothing changed: the application may go on
    else:
        assert not isinstance(info.value, LocalProtocolError)
        assert conn.state is State.CLOSED


def test_table_matches_spec_6_1() -> None:
    """The rows of SPEC §6.1 (with the PING pipelining decision), one by one."""
    S, E = State, Event
    rows = {
        (S.AWAIT_PREFACE, E.RECV_PREFACE): S.AWAIT_HELLO,
        (S.AWAIT_HELLO, E.RECV_HELLO): S.AWAIT_ACCEPT,
        (S.AWAIT_ACCEPT, E.SEND_HELLO_ACK): S.OPEN,
        (S.AWAIT_ACCEPT, E.SEND_GOAWAY): S.CLOSED,
        (S.AWAIT_ACCEPT, E.RECV_PING): S.AWAIT_ACCEPT,
        (S.IDLE, E.SEND_HELLO): S.AWAIT_ACK,
        (S.AWAIT_ACK, E.SEND_PING): S.AWAIT_ACK,
        (S.AWAIT_ACK, E.RECV_HELLO_ACK): S.OPEN,
        (S.AWAIT_ACK, E.RECV_GOAWAY): S.CLOSED,
        (S.OPEN, E.RECV_GOAWAY): S.CLOSED,
        (S.OPEN, E.SEND_GOAWAY): S.CLOSED,
    }
    for key, state in rows.items():
        assert TRANSITIONS[key] is state, key
    forbidden = [
        (S.AWAIT_HELLO, E.RECV_FRAME),  # any other frame before HELLO
        (S.AWAIT_HELLO, E.RECV_PING),
        (S.AWAIT_ACCEPT, E.RECV_FRAME),  # only PING before HELLO_ACK
        (S.AWAIT_ACK, E.SEND_FRAME),
        (S.AWAIT_ACK, E.RECV_FRAME),
        (S.AWAIT_ACK, E.RECV_PING),  # the acceptor's first frame is HELLO_ACK
        (S.OPEN, E.RECV_HELLO),
        (S.OPEN, E.RECV_HELLO_ACK),
    ]
    for key in forbidden:
        assert key not in TRANSITIONS, key
    for state in State:  # any protocol error, from anywhere, closes
        assert TRANSITIONS[(state, E.ERROR)] is S.CLOSED
        assert TRANSITIONS[(state, E.EOF)] is S.CLOSED
    # nothing leaves CLOSED
    assert {v for (s, _), v in TRANSITIONS.items() if s is S.CLOSED} == {S.CLOSED}


def test_the_state_is_only_set_from_the_table() -> None:
    """``Connection`` assigns its state in one way: a value looked up in TRANSITIONS (or the
    first state). Nothing outside the core can assign it."""
    tree = ast.parse(inspect.getsource(connection_module))
    sources = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr == "_state":
                    sources.append(ast.unparse(node.value))
    assert sources, "found no assignment"
    for source in sources:
        assert (
            source == "state"  # from self._step(event), i.e. TRANSITIONS
            or source.startswith("TRANSITIONS[")
            or source.startswith("self._step(")
            or source == "State.IDLE if initiator else State.AWAIT_PREFACE"
        ), source
    _, server = pair()
    with pytest.raises(AttributeError):
        server.state = State.CLOSED  # type: ignore[misc]
