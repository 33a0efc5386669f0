"""The connection's states and every transition between them, as one table (SPEC §6.1).

``TRANSITIONS[(state, event)]`` is the next state; a pair the table lacks is refused:
a received frame with ``PROTOCOL_ERROR`` (:class:`~.errors.ProtocolError`, the
connection is closed), a frame this side tried to send with
:class:`~.errors.LocalProtocolError` (nothing changes). What else a frame must satisfy
(roles, transfers, credit) is checked once the table allowed it, see ``connection``.
"""

from __future__ import annotations

from enum import Enum, auto


class State(Enum):
    """Where a connection is (SPEC §6.1)."""

    __hash__ = object.__hash__  # members are singletons: the C hash, for the tables

    IDLE = auto()  # initiator: nothing sent yet (initiate() sends MAGIC + HELLO)
    AWAIT_PREFACE = auto()  # acceptor: waiting for MAGIC
    AWAIT_HELLO = auto()  # acceptor: waiting for HELLO
    AWAIT_ACCEPT = auto()  # acceptor: HELLO seen, the application has not answered yet
    AWAIT_PROOF = auto()  # acceptor: AUTH_CHALLENGE sent, waiting for AUTH_PROOF (§6.4)
    AWAIT_ACK = auto()  # initiator: HELLO sent, waiting for HELLO_ACK
    OPEN = auto()
    CLOSED = auto()


class Event(Enum):
    """What moves a connection: a frame received or sent, the end of the stream, an error."""

    __hash__ = object.__hash__  # members are singletons: the C hash, for the tables

    RECV_PREFACE = auto()  # the 8 bytes of MAGIC arrived
    RECV_HELLO = auto()
    RECV_HELLO_ACK = auto()
    RECV_PING = auto()
    RECV_GOAWAY = auto()
    RECV_AUTH_CHALLENGE = auto()
    RECV_AUTH_PROOF = auto()
    RECV_FRAME = auto()  # any other frame
    SEND_HELLO = auto()  # initiate()
    SEND_HELLO_ACK = auto()  # accept()
    SEND_PING = auto()
    SEND_GOAWAY = auto()  # send(GoAway(...)) or close()
    SEND_AUTH_CHALLENGE = auto()  # accept(), when the HELLO asked for authentication
    SEND_AUTH_PROOF = auto()  # prove()
    SEND_FRAME = auto()  # any other frame
    EOF = auto()  # the peer closed its side between frames
    ERROR = auto()  # a protocol error (ours to report with GOAWAY, or the peer's)

    @property
    def sending(self) -> bool:
        return self.name.startswith("SEND_")


S, E = State, Event

TRANSITIONS: dict[tuple[State, Event], State] = {
    # the initiator: MAGIC + HELLO, then PING only (pipelining) until HELLO_ACK
    (S.IDLE, E.SEND_HELLO): S.AWAIT_ACK,
    (S.AWAIT_ACK, E.SEND_PING): S.AWAIT_ACK,
    (S.AWAIT_ACK, E.RECV_AUTH_CHALLENGE): S.AWAIT_ACK,  # authenticating (§6.4): once
    (S.AWAIT_ACK, E.SEND_AUTH_PROOF): S.AWAIT_ACK,
    (S.AWAIT_ACK, E.RECV_HELLO_ACK): S.OPEN,
    (S.AWAIT_ACK, E.RECV_GOAWAY): S.CLOSED,  # refused
    (S.AWAIT_ACK, E.SEND_GOAWAY): S.CLOSED,  # gave up
    # the acceptor: MAGIC, HELLO, then the application accepts (HELLO_ACK) or refuses
    (S.AWAIT_PREFACE, E.RECV_PREFACE): S.AWAIT_HELLO,
    (S.AWAIT_PREFACE, E.SEND_GOAWAY): S.CLOSED,
    (S.AWAIT_HELLO, E.RECV_HELLO): S.AWAIT_ACCEPT,
    (S.AWAIT_HELLO, E.SEND_GOAWAY): S.CLOSED,
    (S.AWAIT_ACCEPT, E.RECV_PING): S.AWAIT_ACCEPT,  # pipelined: answered once accepted
    (S.AWAIT_ACCEPT, E.RECV_GOAWAY): S.CLOSED,  # the initiator gave up
    (S.AWAIT_ACCEPT, E.SEND_HELLO_ACK): S.OPEN,
    (S.AWAIT_ACCEPT, E.SEND_GOAWAY): S.CLOSED,  # refused (role, auth, draining)
    # ... or, when the HELLO asked for authentication, challenges it first (§6.4)
    (S.AWAIT_ACCEPT, E.SEND_AUTH_CHALLENGE): S.AWAIT_PROOF,
    (S.AWAIT_PROOF, E.RECV_AUTH_PROOF): S.AWAIT_ACCEPT,  # verified: accept() answers
    (S.AWAIT_PROOF, E.RECV_PING): S.AWAIT_PROOF,
    (S.AWAIT_PROOF, E.RECV_GOAWAY): S.CLOSED,
    (S.AWAIT_PROOF, E.SEND_GOAWAY): S.CLOSED,
    # both, once open
    (S.OPEN, E.RECV_PING): S.OPEN,
    (S.OPEN, E.RECV_FRAME): S.OPEN,
    (S.OPEN, E.RECV_GOAWAY): S.CLOSED,
    (S.OPEN, E.SEND_PING): S.OPEN,
    (S.OPEN, E.SEND_FRAME): S.OPEN,
    (S.OPEN, E.SEND_GOAWAY): S.CLOSED,
    # closing: end of stream between frames, or any protocol error, from any state
    **{(state, E.EOF): S.CLOSED for state in State},
    **{(state, E.ERROR): S.CLOSED for state in State},
}
"""Every allowed (state, event) and where it leads; anything else is refused."""


def next_state(state: State, event: Event) -> State | None:
    """Where ``event`` leads from ``state``, or None if the protocol forbids it there."""
    return TRANSITIONS.get((state, event))
