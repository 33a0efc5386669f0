"""Who may send what: the frame-direction table (SPEC §4, §5, §7, §9), as data.

A connection has two ends. Which one this side is follows from the HELLO ``role`` (PEER
or ENGINE) and from who connected:

========================= =================== ===============================================
side                      HELLO role, end     sends
========================= =================== ===============================================
``Side.PEER_INITIATOR``   PEER, initiator     transfers: OPEN, CHUNK, END (the sending daemon)
``Side.PEER_ACCEPTOR``    PEER, acceptor      their answers: COMPLETE, HAVE, ACK, RESUME, HOLD
``Side.ENGINE``           ENGINE, initiator   puts (OPEN, CHUNK / SHM_CHUNK, END), SUBSCRIBE,
                                              SHM_ATTACH, RELEASE (a kvship.Client)
``Side.DAEMON``           ENGINE, acceptor    deliveries (OPEN, CHUNK, LAYER_READY, END),
                                              COMPLETE (both ways: of the engine's puts and of
                                              its own deliveries), SHM_ATTACHED, RELEASE,
                                              SKIP (chunks of a put the engine may omit)
========================= =================== ===============================================

Everyone may send CREDIT, ABORT, PING, PONG and GOAWAY. A frame the table does not give
the peer's side is a ``PROTOCOL_ERROR``; one it does not give this side, a
:class:`~.errors.LocalProtocolError`. Some frames also need a negotiated capability.
"""

from __future__ import annotations

from enum import Enum

from .constants import (
    CAP_DEDUP,
    CAP_HOLD,
    CAP_RESUME,
    CAP_SHM,
    CAP_SKIP,
    ROLE_ENGINE,
    ROLE_PEER,
    FrameType,
)


class Role(Enum):
    """What a :class:`~.connection.Connection` is, for ``Connection(role=...)``."""

    __hash__ = object.__hash__  # members are singletons: the C hash, for the tables

    PEER = "peer"  # kvshipd <-> kvshipd (HELLO role 1); either end
    ENGINE = "engine"  # a kvship.Client (HELLO role 2): always the initiator
    DAEMON = "daemon"  # kvshipd on its engine listener: the acceptor of an engine connection

    @property
    def hello_role(self) -> int:
        return ROLE_PEER if self is Role.PEER else ROLE_ENGINE

    @classmethod
    def of_hello(cls, hello_role: int, initiator: bool) -> Role:
        if hello_role == ROLE_PEER:
            return cls.PEER
        return cls.ENGINE if initiator else cls.DAEMON


class Side(Enum):
    """One end of a connection: a role and whether it connected."""

    __hash__ = object.__hash__  # members are singletons: the C hash, for the tables

    PEER_INITIATOR = "the peer initiator (the sending daemon)"
    PEER_ACCEPTOR = "the peer acceptor (the receiving daemon)"
    ENGINE = "the engine"
    DAEMON = "the daemon (of an engine connection)"

    @classmethod
    def of(cls, role: Role, initiator: bool) -> Side:
        if role is Role.PEER:
            return cls.PEER_INITIATOR if initiator else cls.PEER_ACCEPTOR
        return cls.ENGINE if role is Role.ENGINE else cls.DAEMON

    @property
    def other(self) -> Side:
        return _OTHER[self]

    @property
    def initiator(self) -> bool:
        return self in (Side.PEER_INITIATOR, Side.ENGINE)


_OTHER = {
    Side.PEER_INITIATOR: Side.PEER_ACCEPTOR,
    Side.PEER_ACCEPTOR: Side.PEER_INITIATOR,
    Side.ENGINE: Side.DAEMON,
    Side.DAEMON: Side.ENGINE,
}

T = FrameType
_ANYONE = frozenset({T.CREDIT, T.ABORT, T.PING, T.PONG, T.GOAWAY})

MAY_SEND: dict[Side, frozenset[int]] = {
    Side.PEER_INITIATOR: _ANYONE | {T.HELLO, T.AUTH_PROOF, T.OPEN, T.CHUNK, T.END},
    Side.PEER_ACCEPTOR: _ANYONE
    | {T.HELLO_ACK, T.AUTH_CHALLENGE, T.COMPLETE, T.HAVE}
    | {T.ACK, T.RESUME, T.HOLD},
    Side.ENGINE: _ANYONE
    | {T.HELLO, T.AUTH_PROOF, T.OPEN, T.CHUNK, T.END}
    | {T.SUBSCRIBE, T.SHM_ATTACH, T.SHM_CHUNK, T.RELEASE},
    Side.DAEMON: _ANYONE
    | {T.HELLO_ACK, T.AUTH_CHALLENGE, T.OPEN, T.CHUNK, T.END, T.COMPLETE}
    | {T.SHM_ATTACHED, T.LAYER_READY, T.RELEASE, T.SKIP},
}
"""Frame types each side may send (the other side may receive them)."""

NEEDS_CAP: dict[int, int] = {
    T.HAVE: CAP_DEDUP,
    T.ACK: CAP_RESUME,
    T.RESUME: CAP_RESUME,
    T.HOLD: CAP_HOLD,
    T.SHM_ATTACH: CAP_SHM,
    T.SHM_ATTACHED: CAP_SHM,
    T.SHM_CHUNK: CAP_SHM,
    T.RELEASE: CAP_SHM,
    T.SKIP: CAP_SKIP,
}
"""Frames that exist only where a capability was negotiated (LAYER_READY of a non-empty
layer needs the arena, hence CAP_SHM, too: checked with the arena). CAP_CODECS gates
CHUNK codecs and CAP_STRIPING OPEN's ``n_stripes``, checked on those frames."""

MAY_NAME_PEER = Side.ENGINE
"""OPEN's ``meta.peer`` (the destination daemon) is for the engine's puts only (§5.3)."""
