"""The sans-IO kvship connection: bytes in, frames (events) out; frames in, bytes out.

No sockets, no asyncio, no threads: the IO layer feeds bytes with :meth:`receive_data`,
or, for zero-copy receives, asks :meth:`read_buffer` where the next bytes should land
and reports them with :meth:`buffer_updated`. A CHUNK's data lands in whatever buffer
the ``payload_sink`` callback hands out (an arena slot, say), so a chunk crosses user
space without being copied by the protocol layer; the sink's ``tag`` for that buffer
comes back on the chunk event (:attr:`~.frames.Chunk.tag`).

The machine checks both directions, like h11:

* what the peer sends: preface, version negotiation, frame-size limits, frame order
  (:data:`~.states.TRANSITIONS`), who may send which frame (:data:`~.roles.MAY_SEND`),
  transfer bookkeeping per stripe, chunk geometry and flow-control credit. A violation
  raises :class:`ProtocolError`; the connection is dead from then on (``closed``), and
  :meth:`close` gives the GOAWAY to send.
* what this side sends (:meth:`send`, :meth:`chunk_header`, :meth:`grant`, ...): the same
  rules. A frame this side may not send now raises :class:`LocalProtocolError` (with the
  code the peer would answer) before anything changes; the connection goes on.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from .auth import (
    AUTH_PSK,
    NONCE_SIZE,
    AuthChallenge,
    AuthProof,
    PeerKey,
    acceptor_mac,
    hello_auth,
    initiator_mac,
    lookup,
    parse_hello_auth,
    same_mac,
)
from .constants import (
    AUTH_NONE,
    CAP_AUTH,
    CAP_OPEN_CHECK,
    CAP_RESUME,
    CAP_SHM,
    CAP_STRIPING,
    HANDSHAKE_MAX_BODY,
    HEADER,
    HEADER_SIZE,
    KNOWN_CAPS,
    MAGIC,
    MAX_CHUNKS,
    MAX_WINDOW,
    MIN_VERSION,
    PROTOCOL_VERSION,
    FrameType,
    frame_name,
)
from .digest import chunk_checksum
from .errors import ErrorCode, LocalProtocolError, ProtocolError
from .frames import (
    DECODERS,
    FLAG_IGNORABLE,
    Abort,
    Chunk,
    ChunkMeta,
    Complete,
    Credit,
    End,
    Frame,
    GoAway,
    Hello,
    HelloAck,
    LayerReady,
    Open,
    Ping,
    ReceivedChunk,
    Release,
    ShmAttach,
    ShmAttached,
    ShmChunk,
    Subscribe,
)
from .geometry import chunk_table
from .roles import MAY_NAME_PEER, MAY_SEND, NEEDS_CAP, Role, Side
from .states import TRANSITIONS, Event, State
from .transfers import FORGOTTEN_MAX, Receiving, Recent, Sending, check_chunk

__all__ = [
    "FORGOTTEN_MAX",
    "MAX_CHUNKS",
    "Connection",
    "Limits",
    "PayloadSink",
    "Role",
    "Side",
    "State",
]

KIB = 1024
MIB = 1024 * KIB
BULK_READ = 64 * KIB  # bytes one read may take outside a chunk's data


@dataclass(frozen=True, slots=True)
class Limits:
    """What this side accepts; the acceptor announces its limits in HELLO_ACK."""

    max_frame: int = 16 * MIB + 64  # body bytes, any frame
    max_chunk: int = 4 * MIB  # raw bytes of one chunk
    max_transfers: int = 64  # transfers open at once on one connection
    initial_window: int = 16 * MIB  # chunk bytes the peer may send before a CREDIT


PayloadSink = Callable[[ChunkMeta, int], tuple[memoryview, object]]
"""``sink(meta, wire_length) -> (buffer, tag)``: a writable buffer of exactly
``wire_length`` bytes for a chunk's data, and a tag the chunk event carries
(``chunk.tag``), e.g. whether the buffer is an engine's arena or daemon memory."""


def _default_sink(meta: ChunkMeta, wire_length: int) -> tuple[memoryview, object]:
    return memoryview(bytearray(wire_length)), None


class _Read:
    PREFACE, HEADER, BODY, CHUNK_META, CHUNK_DATA = range(5)
    NAMES = ("PREFACE", "HEADER", "BODY", "CHUNK_META", "CHUNK_DATA")


# The engine API's shared-memory arena on this connection (§9.2).
_NO_ARENA, _ARENA_ASKED, _ARENA_MAPPED = 0, 1, 2

_EVENTS_IN = {
    FrameType.HELLO: Event.RECV_HELLO,
    FrameType.HELLO_ACK: Event.RECV_HELLO_ACK,
    FrameType.PING: Event.RECV_PING,
    FrameType.GOAWAY: Event.RECV_GOAWAY,
    FrameType.AUTH_CHALLENGE: Event.RECV_AUTH_CHALLENGE,
    FrameType.AUTH_PROOF: Event.RECV_AUTH_PROOF,
}
_HANDSHAKE_FRAMES = (FrameType.HELLO, FrameType.HELLO_ACK)
_EVENTS_OUT = {
    FrameType.HELLO: Event.SEND_HELLO,
    FrameType.HELLO_ACK: Event.SEND_HELLO_ACK,
    FrameType.PING: Event.SEND_PING,
    FrameType.GOAWAY: Event.SEND_GOAWAY,
}
_ENCODE_ERRORS = (ValueError, TypeError, ArithmeticError, struct.error, RecursionError)


@dataclass(slots=True)
class _Negotiated:
    version: int = 0
    capabilities: int = 0
    peer_limits: Limits = field(default_factory=Limits)
    peer_name: str = ""
    peer_role: int = 0


class Connection:
    """One kvship connection, either end. See the module docstring.

    ``role`` says what this side is: :attr:`Role.PEER` (either end; give ``initiator``),
    :attr:`Role.ENGINE` (initiator) or :attr:`Role.DAEMON` (the engine listener's
    acceptor). Without it the role is learnt from the HELLO: the one ``initiate()``
    sends, or the one an acceptor receives (which then takes either role); with it, an
    acceptor refuses a HELLO of the other role (``PROTOCOL_ERROR``, SPEC §9).

    Authentication (SPEC §6.4, :mod:`.auth`): an initiator given ``key`` offers it in its
    HELLO, answers the acceptor's AUTH_CHALLENGE (the IO layer sends :meth:`prove`) and
    checks the acceptor's proof on HELLO_ACK. An acceptor given ``keys`` (key id ->
    secret) requires a HELLO that offers one of them: :meth:`accept` then sends
    AUTH_CHALLENGE first, and once the AUTH_PROOF event came (verified here), HELLO_ACK.
    Either end refuses what does not verify with ``AUTH_FAILED``. ``random_bytes`` makes
    the nonces (a test vector fixes it).
    """

    def __init__(
        self,
        *,
        initiator: bool | None = None,
        role: Role | None = None,
        limits: Limits | None = None,
        payload_sink: PayloadSink | None = None,
        key: PeerKey | None = None,
        keys: Mapping[str, bytes] | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if role is Role.ENGINE or role is Role.DAEMON:
            implied = role is Role.ENGINE
            if initiator is not None and initiator is not implied:
                end = "initiator" if implied else "acceptor"
                raise ValueError(f"the {role.value} end of an engine connection is its {end}")
            initiator = implied
        if initiator is None:
            raise ValueError("Connection needs initiator=True/False (or an engine role)")
        self.initiator = initiator
        self._role = role
        self._side = None if role is None else Side.of(role, initiator)
        self.limits = limits or Limits()
        self.payload_sink: PayloadSink = payload_sink or _default_sink
        self._state = State.IDLE if initiator else State.AWAIT_PREFACE
        self.negotiated = _Negotiated()
        self.send_credit = 0  # chunk bytes we may still send
        self.recv_window = 0  # chunk bytes the peer may still send us
        self._receiving: dict[int, Receiving] = {}
        # Transfers ended by an ABORT (ours or the peer's): chunks the peer had already
        # put on the wire keep arriving for a while and are dropped, not a protocol error.
        self._forgotten = Recent()
        self._sending: dict[int, Sending] = {}
        self._ended = Recent()  # END sent, COMPLETE (or ABORT) not seen yet
        self._dropped = Recent()  # ABORT sent or received: late CHUNK/END go out unchecked
        self._subscribing = False  # engine: a SUBSCRIBE waits for its OPEN (or ABORT)
        self._arena = _NO_ARENA
        self._goaway_sent = False
        self._read = _Read.HEADER if initiator else _Read.PREFACE
        self._scratch = memoryview(bytearray(ChunkMeta.FIXED.size))
        self._buf: memoryview = self._scratch[: HEADER_SIZE if initiator else len(MAGIC)]
        self._filled = 0
        # One read takes up to BULK_READ bytes at a frame boundary (or inside a small
        # field), so a burst of small frames costs one system call; a chunk's data still
        # goes straight to its sink. Bytes of such a read not parsed yet are pending.
        self._bulk = memoryview(bytearray(BULK_READ))
        self._bulk_handed = False
        self._pending: memoryview | None = None
        self._body = bytearray()  # a large body's pieces so far
        self._frame_type = 0
        self._frame_flags = 0
        self._body_length = 0
        self._chunk_meta: ChunkMeta | None = None
        self._chunk_tag: object = None
        self._hello: Hello | None = None  # the HELLO offered (initiator) or received
        self._hello_body = b""  # its body as it went on the wire: the MACs cover it
        self._last_body = b""  # the body of the HELLO or HELLO_ACK just decoded
        self._key = key  # initiator: prove this key
        self._keys = keys  # acceptor: require one of these
        self._random = random_bytes
        self._auth = _AuthExchange()
        self.authenticated_key = ""  # the key id both ends proved (SPEC §6.4), "" = none
        self._open_check = 0  # of the OPEN just encoded or decoded (CAP_OPEN_CHECK)

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> State:
        return self._state

    @property
    def closed(self) -> bool:
        return self._state is State.CLOSED

    @property
    def role(self) -> Role | None:
        """What this side is (None until a HELLO told, where the constructor did not)."""
        return self._role

    @property
    def side(self) -> Side | None:
        """Which end this is (None until the role is known)."""
        return self._side

    def _take_role(self, role: Role) -> None:
        self._role = role
        self._side = Side.of(role, self.initiator)

    @property
    def open_transfers(self) -> int:
        """Transfers the peer opened here that are still open (they hold its slots)."""
        return len(self._receiving)

    @property
    def sending_transfers(self) -> int:
        """Transfers this side opened here and has not ENDed or ABORTed."""
        return len(self._sending)

    def _fail(self, code: ErrorCode, message: str) -> ProtocolError:
        self._state = TRANSITIONS[(self._state, Event.ERROR)]
        return ProtocolError(code, message)

    def _step(self, event: Event, what: str) -> State:
        """The state ``event`` leads to, or the error the table gives."""
        state = TRANSITIONS.get((self._state, event))
        if state is not None:
            return state
        why = _why_not(self._state, event, what)
        if event.sending:
            raise LocalProtocolError(ErrorCode.PROTOCOL_ERROR, why)
        raise self._fail(ErrorCode.PROTOCOL_ERROR, why)

    # ------------------------------------------------------------- handshake
    def initiate(self, hello: Hello) -> bytes:
        """The connecting side's first bytes: the preface and HELLO."""
        if not self.initiator:
            raise LocalProtocolError(ErrorCode.PROTOCOL_ERROR, "only an initiator sends HELLO")
        state = self._step(Event.SEND_HELLO, "HELLO")
        if self._key is not None:
            nonce = self._random(NONCE_SIZE)
            hello = replace(
                hello,
                auth_method=AUTH_PSK,
                auth=hello_auth(nonce, self._key.key_id),
                capabilities=hello.capabilities | CAP_AUTH,
            )
        data = self._encoded(hello, HANDSHAKE_MAX_BODY)
        role = Role.of_hello(hello.role, True)
        if self.role is not None and role is not self.role:
            raise LocalProtocolError(
                ErrorCode.PROTOCOL_ERROR, f"HELLO role {hello.role} on a {self.role.value} side"
            )
        self._take_role(role)
        self._hello = hello
        self._hello_body = data[HEADER_SIZE:]
        self._state = state
        return MAGIC + data

    def accept(self, node_name: str = "", capabilities: int = KNOWN_CAPS) -> bytes:
        """Answer the HELLO the peer sent (after the application checked it): HELLO_ACK.

        Where this side requires authentication (``keys``) the first call returns
        AUTH_CHALLENGE instead; call it again after the AUTH_PROOF event for the HELLO_ACK
        (then the arguments of the first call hold). An ``auth_method`` this side does not
        know, or cannot honour, fails the connection (:class:`ProtocolError`
        ``AUTH_FAILED``, SPEC §6.4): send :meth:`close`'s GOAWAY.
        """
        state = self._step(Event.SEND_HELLO_ACK, "HELLO_ACK")
        auth = self._auth
        if auth.ack is not None:  # the proof verified: now the HELLO_ACK
            data, caps = auth.ack
            auth.ack = None
            self._acked(caps, state)
            return data
        hello = self._hello
        assert hello is not None
        secret = self._check_auth_method(hello)
        neg = self.negotiated
        caps = neg.capabilities & capabilities & ~CAP_AUTH
        if secret is not None:
            caps |= neg.capabilities & CAP_AUTH
        limits = self.limits
        ack = HelloAck(
            neg.version,
            caps,
            limits.initial_window,
            limits.max_frame,
            limits.max_chunk,
            limits.max_transfers,
            node_name,
        )
        data = self._encoded(ack, HANDSHAKE_MAX_BODY)
        if secret is None:
            self._acked(caps, state)
            return data
        state = self._step(Event.SEND_AUTH_CHALLENGE, "AUTH_CHALLENGE")
        nonce = self._random(NONCE_SIZE)
        mac = acceptor_mac(secret, nonce, self._hello_body, data[HEADER_SIZE:])
        challenge = self._encoded(AuthChallenge(nonce, mac), HANDSHAKE_MAX_BODY)
        auth.secret, auth.nonce, auth.pending_ack = secret, nonce, (data, caps)
        self._state = state
        return challenge

    def _check_auth_method(self, hello: Hello) -> bytes | None:
        """The secret of the key the HELLO names, None without authentication, or the
        AUTH_FAILED refusal (SPEC §6.4)."""
        method = hello.auth_method
        if method not in (AUTH_NONE, AUTH_PSK):
            raise self._fail(
                ErrorCode.AUTH_FAILED,
                f"auth_method {method} is not one this side knows (0 none, 1 pre-shared key)",
            )
        if self._keys is None:
            if method == AUTH_PSK:
                raise self._fail(
                    ErrorCode.AUTH_FAILED,
                    "this side has no keys configured: it cannot authenticate a pre-shared key",
                )
            return None
        if method == AUTH_NONE:
            raise self._fail(
                ErrorCode.AUTH_FAILED,
                "authentication required: HELLO without auth_method 1 (pre-shared key)",
            )
        try:
            _, key_id = parse_hello_auth(hello.auth)
            secret = lookup(self._keys, key_id)
        except ProtocolError as exc:
            raise self._fail(exc.code, exc.message) from None
        self._auth.key_id = key_id
        return secret

    def _acked(self, caps: int, state: State) -> None:
        """The acceptor sent HELLO_ACK: the connection is open on the acceptor's limits."""
        neg = self.negotiated
        neg.capabilities = caps
        neg.peer_limits = self.limits  # both ends enforce the acceptor's limits
        self.recv_window = self.send_credit = self.limits.initial_window
        self._state = state

    def prove(self) -> bytes:
        """The initiator's AUTH_PROOF, the answer to the AUTH_CHALLENGE event."""
        state = self._step(Event.SEND_AUTH_PROOF, "AUTH_PROOF")
        auth = self._auth
        if self._key is None or not auth.nonce or auth.proved:
            raise LocalProtocolError(
                ErrorCode.PROTOCOL_ERROR, "AUTH_PROOF answers one AUTH_CHALLENGE, once"
            )
        mac = initiator_mac(self._key.secret, auth.nonce, self._hello_body)
        data = self._encoded(AuthProof(mac), HANDSHAKE_MAX_BODY)
        auth.proved = True
        self._state = state
        return data

    def _on_hello(self, hello: Hello, state: State) -> None:
        version = min(PROTOCOL_VERSION, hello.max_version)
        if version < max(MIN_VERSION, hello.min_version):
            raise self._fail(
                ErrorCode.UNSUPPORTED_VERSION,
                f"peer speaks versions {hello.min_version}..{hello.max_version}, "
                f"this side {MIN_VERSION}..{PROTOCOL_VERSION}",
            )
        role = Role.of_hello(hello.role, False)
        if self.role is not None and role is not self.role:
            raise self._fail(
                ErrorCode.PROTOCOL_ERROR,
                f"HELLO role {hello.role} ({_HELLO_ROLES.get(hello.role)}) on "
                f"{'a peer' if self.role is Role.PEER else 'an engine'} listener",
            )
        self._take_role(role)
        self._hello = hello
        self._hello_body = self._last_body
        neg = self.negotiated
        neg.version = version
        neg.capabilities = hello.capabilities & KNOWN_CAPS
        neg.peer_name = hello.node_name
        neg.peer_role = hello.role
        self._state = state

    def _on_hello_ack(self, ack: HelloAck, state: State) -> None:
        lo, hi, offered = MIN_VERSION, PROTOCOL_VERSION, KNOWN_CAPS
        if self._hello is not None:  # the ACK may only pick from what our HELLO offered
            lo, hi = max(lo, self._hello.min_version), min(hi, self._hello.max_version)
            offered &= self._hello.capabilities
        if not lo <= ack.version <= hi:
            raise self._fail(
                ErrorCode.UNSUPPORTED_VERSION, f"peer chose version {ack.version}, not offered"
            )
        if self._key is not None:
            self._check_acceptor(self._key)
        neg = self.negotiated
        neg.version = ack.version
        neg.capabilities = ack.capabilities & offered
        neg.peer_name = ack.node_name
        # Never above this side's own frame limit: an acceptor announcing 4 GiB frames
        # must not make this side take one (found by fuzzing).
        neg.peer_limits = Limits(
            min(ack.max_frame, self.limits.max_frame),
            min(ack.max_chunk, self.limits.max_frame - ChunkMeta.FIXED.size),
            ack.max_transfers,
            ack.initial_window,
        )
        # The initiator enforces the acceptor's limits in both directions.
        self.limits = neg.peer_limits
        self.send_credit = self.recv_window = ack.initial_window
        self._state = state

    def _check_acceptor(self, key: PeerKey) -> None:
        """On HELLO_ACK: the acceptor proved ``key`` over both nonces and this very ACK."""
        auth = self._auth
        if not auth.proved:
            raise self._fail(
                ErrorCode.AUTH_FAILED,
                "the acceptor answered without authenticating (it has no key configured)",
            )
        want = acceptor_mac(key.secret, auth.nonce, self._hello_body, self._last_body)
        if not same_mac(auth.mac, want):
            raise self._fail(
                ErrorCode.AUTH_FAILED,
                f"the acceptor's proof for key {key.key_id!r} does not verify: it does not "
                "hold that key, or the handshake was altered",
            )
        self.authenticated_key = key.key_id

    # ---------------------------------------------------------------- sending
    def send(self, frame: Frame) -> bytes:
        """The bytes of ``frame``, if this side may send it now (else LocalProtocolError).

        For CHUNK prefer :meth:`chunk_header` (the data then goes out from its own buffer).
        HELLO and HELLO_ACK go out through :meth:`initiate` and :meth:`accept`.
        """
        if isinstance(frame, Chunk):
            return self.chunk_header(frame.meta, len(frame.data)) + bytes(frame.data)
        name = frame_name(frame.TYPE)
        if isinstance(frame, Hello | HelloAck | AuthChallenge | AuthProof):
            api = {Hello: "initiate()", AuthProof: "prove()"}.get(type(frame), "accept()")
            raise LocalProtocolError(ErrorCode.PROTOCOL_ERROR, f"{name} goes out by {api}")
        state = self._step(_EVENTS_OUT.get(frame.TYPE, Event.SEND_FRAME), name)
        limit = self.limits.max_frame if self._state is State.OPEN else HANDSHAKE_MAX_BODY
        if isinstance(frame, End) and self.negotiated.capabilities & CAP_OPEN_CHECK:
            sending = self._sending.get(frame.transfer_id)
            if sending is not None:
                frame = replace(frame, open_check=sending.open_check)
        data = self._encoded(frame, limit)
        if isinstance(frame, Open):
            self._open_check = open_check(data[HEADER_SIZE:])
        effect = self._check_out(frame)
        if effect is not None:
            effect()
        if isinstance(frame, GoAway):
            self._goaway_sent = True
        self._state = state
        return data

    def chunk_header(self, meta: ChunkMeta, wire_length: int) -> bytes:
        """Header + meta of a CHUNK whose ``wire_length`` data bytes the caller sends next.

        Debits the send credit: the IO layer must wait for CREDIT when ``send_credit`` is
        short (a slow receiver bounds the sender's memory this way).
        """
        self._step(Event.SEND_FRAME, "CHUNK")
        self._may_send(FrameType.CHUNK)
        try:
            header = Chunk.header(meta, wire_length)
        except _ENCODE_ERRORS as exc:
            raise LocalProtocolError(ErrorCode.MALFORMED_FRAME, f"CHUNK: {exc}") from None
        count = self._check_chunk_out(meta, wire_length, "CHUNK")
        if wire_length > self.send_credit:
            raise LocalProtocolError(
                ErrorCode.FLOW_CONTROL,
                f"CHUNK of {wire_length} B exceeds the credit of {self.send_credit} B",
            )
        self.send_credit -= wire_length
        if count is not None:
            count()
        return header

    def grant(self, increment: int) -> bytes:
        """Give the peer ``increment`` more bytes of credit (after consuming chunk data)."""
        if increment <= 0:
            raise ValueError("credit increment must be positive")
        return self.send(Credit(increment))

    def forget(self, transfer_id: int) -> None:
        """Stop tracking ``transfer_id`` here, both ways (after an ABORT on another stripe).

        Sending ABORT through :meth:`send` does this for the connection it goes on. Late
        CHUNK and END frames of a forgotten transfer still parse, count against flow
        control and come out as events, so the application can drop them and return the
        credit; late ones this side sends go out unchecked.
        """
        was_sending = self._sending.pop(transfer_id, None) is not None
        if was_sending:
            self._dropped.add(transfer_id)
        self._ended.discard(transfer_id)
        if self._receiving.pop(transfer_id, None) is not None or not was_sending:
            self._forgotten.add(transfer_id)

    def is_forgotten(self, transfer_id: int) -> bool:
        return transfer_id in self._forgotten

    def goaway_for(self, error: ProtocolError) -> bytes:
        """Bytes that tell the peer why we close (valid even after the machine failed)."""
        return GoAway(int(error.code), error.message).encode()

    def close(self, error: ProtocolError | None = None) -> bytes:
        """This side closes the connection: the GOAWAY to send last (``error``'s code, or
        NO_ERROR), or b"" if one went out already. The machine is CLOSED afterwards."""
        data = b""
        if not self._goaway_sent and not (self.initiator and self._state is State.IDLE):
            data = self.goaway_for(error or ProtocolError(ErrorCode.NO_ERROR, "closing"))
            self._goaway_sent = True
        self._state = TRANSITIONS[(self._state, Event.ERROR)]
        return data

    def _encoded(self, frame: Frame, limit: int) -> bytes:
        """``frame``'s bytes, if the peer's decoder would take them (else LocalProtocolError)."""
        name = frame_name(frame.TYPE)
        try:
            data = frame.encode()
            if isinstance(frame, Open):
                frame.check()  # what decode would say, without parsing the JSON again
            else:
                DECODERS[frame.TYPE](memoryview(data)[HEADER_SIZE:])
        except ProtocolError as exc:
            raise LocalProtocolError(exc.code, f"{name}: {exc.message}") from None
        except _ENCODE_ERRORS as exc:
            raise LocalProtocolError(
                ErrorCode.MALFORMED_FRAME, f"{name} does not encode: {exc!r}"
            ) from None
        if len(data) - HEADER_SIZE > limit:
            raise LocalProtocolError(
                ErrorCode.FRAME_TOO_LARGE, f"{name} of {len(data) - HEADER_SIZE} B > {limit} B"
            )
        return data

    def _may_send(self, frame_type: int) -> None:
        side = self._side
        assert side is not None  # known once the handshake went this far
        if frame_type not in MAY_SEND[side]:
            raise LocalProtocolError(
                ErrorCode.PROTOCOL_ERROR, f"{side.value} does not send {frame_name(frame_type)}"
            )
        cap = NEEDS_CAP.get(frame_type, 0)
        if cap and not self.negotiated.capabilities & cap:
            raise LocalProtocolError(
                ErrorCode.PROTOCOL_ERROR,
                f"{frame_name(frame_type)} without the capability {cap:#x}",
            )

    def _check_out(self, frame: Frame) -> Callable[[], None] | None:
        """Check ``frame`` against the roles and the transfers; returns what sending it
        changes (applied only once every check passed), or None."""
        if isinstance(frame, GoAway | Ping):
            return None
        self._may_send(frame.TYPE)
        local = _local  # raise with the code the peer would answer
        if isinstance(frame, Open):
            return self._check_open_out(frame)
        if isinstance(frame, ShmChunk):
            self._need_arena("SHM_CHUNK", local)
            return self._check_chunk_out(frame.meta, frame.meta.raw_length, "SHM_CHUNK")
        if isinstance(frame, End):
            return self._check_end_out(frame)
        if isinstance(frame, Abort):
            return lambda: self._aborted(frame.transfer_id)
        if isinstance(frame, Credit):
            if self.recv_window + frame.increment > MAX_WINDOW:
                raise local(
                    ErrorCode.FLOW_CONTROL,
                    f"CREDIT {frame.increment} takes the window above 2^31-1",
                )

            def credit() -> None:
                self.recv_window += frame.increment

            return credit
        if isinstance(frame, Complete):
            return self._check_complete_out(frame)
        if isinstance(frame, Subscribe):
            if self._subscribing:
                raise local(
                    ErrorCode.PROTOCOL_ERROR,
                    "a SUBSCRIBE already waits for its OPEN on this connection (§9.3)",
                )
            return self._subscribed
        if isinstance(frame, ShmAttach):
            if self._arena != _NO_ARENA:
                raise local(ErrorCode.PROTOCOL_ERROR, "SHM_ATTACH twice")
            return self._arena_asked
        if isinstance(frame, ShmAttached):
            if self._arena != _ARENA_ASKED:
                raise local(ErrorCode.PROTOCOL_ERROR, "SHM_ATTACHED without an SHM_ATTACH")
            return self._arena_mapped
        if isinstance(frame, LayerReady):
            transfer = self._sending.get(frame.transfer_id)
            if transfer is None and frame.transfer_id not in self._dropped:
                raise local(
                    ErrorCode.UNKNOWN_TRANSFER,
                    f"LAYER_READY for transfer {frame.transfer_id:#x} not open",
                )
            self._check_layer_ready(frame, transfer, local)
        elif isinstance(frame, Release):
            self._need_arena("RELEASE", local)
        return None

    def _subscribed(self) -> None:
        self._subscribing = True

    def _arena_asked(self) -> None:
        self._arena = _ARENA_ASKED

    def _arena_mapped(self) -> None:
        self._arena = _ARENA_MAPPED

    def _check_open_out(self, frame: Open) -> Callable[[], None]:
        self._check_open(frame, self.side, _local)
        tid = frame.transfer_id
        if tid in self._sending:
            raise LocalProtocolError(
                ErrorCode.PROTOCOL_ERROR, f"transfer {tid:#x} is open here already"
            )
        if len(self._sending) >= self.limits.max_transfers:
            raise LocalProtocolError(
                ErrorCode.TOO_MANY_TRANSFERS,
                f"{len(self._sending)} transfers open here: the peer takes "
                f"{self.limits.max_transfers} (END or ABORT one first)",
            )

        def opened() -> None:
            self._sending[tid] = Sending.of(frame, self._open_check)
            self._ended.discard(tid)
            self._dropped.discard(tid)

        return opened

    def _check_chunk_out(
        self, meta: ChunkMeta, wire_length: int, name: str
    ) -> Callable[[], None] | None:
        tid = meta.transfer_id
        transfer = self._sending.get(tid)
        if transfer is None:
            if tid in self._dropped:  # ABORTed meanwhile: the receiver drops it (§7.3)
                if wire_length > self.limits.max_chunk:
                    raise LocalProtocolError(
                        ErrorCode.MALFORMED_FRAME, f"{name} of {wire_length} B > max_chunk"
                    )
                return None
            when = "after its END" if tid in self._ended else "before its OPEN"
            raise LocalProtocolError(
                ErrorCode.UNKNOWN_TRANSFER, f"{name} of transfer {tid:#x} {when}"
            )
        try:
            check_chunk(
                transfer.open, transfer.starts, meta, wire_length, self.negotiated.capabilities
            )
        except ProtocolError as exc:
            raise LocalProtocolError(exc.code, f"{name}: {exc.message}") from None
        if transfer.was_sent(meta.chunk_index):
            raise LocalProtocolError(
                ErrorCode.PROTOCOL_ERROR,
                f"chunk {meta.chunk_index} of transfer {tid:#x} sent twice here",
            )
        return lambda: transfer.mark_sent(meta.chunk_index)

    def _check_end_out(self, frame: End) -> Callable[[], None] | None:
        tid = frame.transfer_id
        transfer = self._sending.get(tid)
        if transfer is None:
            if tid in self._dropped:
                return None
            when = "a second END" if tid in self._ended else "END before its OPEN"
            raise LocalProtocolError(ErrorCode.UNKNOWN_TRANSFER, f"{when} of {tid:#x}")
        if frame.chunks_on_stripe != transfer.chunks_sent:
            raise LocalProtocolError(
                ErrorCode.PROTOCOL_ERROR,
                f"END says {frame.chunks_on_stripe} chunks, {transfer.chunks_sent} went here",
            )

        def ended() -> None:
            del self._sending[tid]
            self._ended.add(tid)

        return ended

    def _check_complete_out(self, frame: Complete) -> Callable[[], None] | None:
        tid = frame.transfer_id
        if self.side is Side.DAEMON and (tid in self._sending or tid in self._ended):
            # A delivery to the engine ends with COMPLETE from its sender (§9.3).
            def delivered() -> None:
                self._sending.pop(tid, None)
                self._ended.discard(tid)

            return delivered
        if tid in self._receiving:
            raise LocalProtocolError(
                ErrorCode.PROTOCOL_ERROR, f"COMPLETE of transfer {tid:#x} before its END"
            )
        return None

    def _aborted(self, tid: int) -> None:
        """An ABORT went out or came in: the transfer ends here, whichever way it went."""
        if self._receiving.pop(tid, None) is not None:
            self._forgotten.add(tid)
        if self._sending.pop(tid, None) is not None:
            self._dropped.add(tid)
        self._ended.discard(tid)

    # ------------------------------------------------ rules of both directions
    def _check_open(self, frame: Open, sender: Side | None, error: _Raise) -> None:
        """OPEN's rules that do not depend on the direction's table."""
        if frame.peer and sender is not MAY_NAME_PEER:
            raise error(ErrorCode.PROTOCOL_ERROR, "only an engine's OPEN names a peer")
        if frame.n_stripes > 1 and not self.negotiated.capabilities & CAP_STRIPING:
            raise error(ErrorCode.PROTOCOL_ERROR, "striped OPEN without CAP_STRIPING")
        if frame.resume and not self.negotiated.capabilities & CAP_RESUME:
            raise error(ErrorCode.PROTOCOL_ERROR, "resuming OPEN without CAP_RESUME")
        if frame.n_chunks > MAX_CHUNKS:
            raise error(
                ErrorCode.TRANSFER_TOO_LARGE,
                f"transfer of {frame.n_chunks} chunks; at most {MAX_CHUNKS} (raise chunk_size)",
            )
        if frame.chunk_size > self.limits.max_chunk:
            raise error(
                ErrorCode.FRAME_TOO_LARGE,
                f"chunk_size {frame.chunk_size} > max_chunk {self.limits.max_chunk}",
            )

    def _need_arena(self, name: str, error: _Raise) -> None:
        if self._arena == _NO_ARENA:
            raise error(ErrorCode.PROTOCOL_ERROR, f"{name} before SHM_ATTACH (§9.2)")

    def _check_layer_ready(
        self, frame: LayerReady, transfer: Sending | Receiving | None, error: _Raise
    ) -> None:
        if transfer is not None:
            layers = transfer.open.layers
            if frame.layer >= len(layers) or frame.nbytes != layers[frame.layer].nbytes:
                raise error(
                    ErrorCode.LAYOUT_MISMATCH,
                    f"LAYER_READY of layer {frame.layer} with {frame.nbytes} B does not fit "
                    "the layout",
                )
        if frame.nbytes:
            if not self.negotiated.capabilities & CAP_SHM:
                raise error(ErrorCode.PROTOCOL_ERROR, "LAYER_READY without CAP_SHM")
            self._need_arena("LAYER_READY", error)

    # -------------------------------------------------------------- receiving
    def read_buffer(self) -> memoryview:
        """Where the next received bytes go: the rest of a chunk's data in its sink, else
        a bulk buffer that may take many small frames at once (then call
        :meth:`buffer_updated`, and :meth:`next_frames` while :attr:`pending`)."""
        if self._state is State.CLOSED:
            raise RuntimeError("connection is closed")
        if self._pending is not None:
            raise RuntimeError("bytes of the last read are pending: call next_frames() first")
        if self._read == _Read.CHUNK_DATA:
            self._bulk_handed = False
            return self._buf[self._filled :]
        self._bulk_handed = True
        return self._bulk

    def buffer_updated(self, nbytes: int) -> list[Frame]:
        """``nbytes`` were written into :meth:`read_buffer`; returns the first frame they
        complete (as a list: empty while none is complete). Frames are handed over one at
        a time so that a caller acts on each (answers a HELLO, registers an OPEN) before
        the bytes after it are parsed, as if each had arrived alone."""
        if not self._bulk_handed:
            return self._field_updated(nbytes)
        self._bulk_handed = False
        if nbytes:
            self._pending = self._bulk[:nbytes]
        return self.next_frames()

    @property
    def pending(self) -> bool:
        """Bytes of the last read wait to be parsed (:meth:`next_frames`)."""
        return self._pending is not None

    def next_frames(self) -> list[Frame]:
        """Parse pending bytes up to the next frame they complete (see buffer_updated)."""
        src, self._pending = self._pending, None
        if src is None:
            return []
        events, used = self._feed(src, one_frame=True)
        if used < len(src) and self._state is not State.CLOSED:
            self._pending = src[used:]
        return events

    def _feed(self, src: memoryview, *, one_frame: bool = False) -> tuple[list[Frame], int]:
        """Copy ``src`` into the field buffers, field by field, until it is used up (or,
        ``one_frame``, until a frame completes) or the connection closed: the frames and
        how many bytes were used."""
        events: list[Frame] = []
        pos = 0
        while pos < len(src) and self._state is not State.CLOSED and not (one_frame and events):
            dst = self._buf[self._filled :]
            n = min(len(dst), len(src) - pos)
            dst[:n] = src[pos : pos + n]
            pos += n
            events.extend(self._field_updated(n))
        return events, pos

    def _field_updated(self, nbytes: int) -> list[Frame]:
        self._filled += nbytes
        if self._filled < len(self._buf):
            return []
        return self._field_done()

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Feed any amount of bytes (copying them into the read buffers).

        Bytes after the connection closed (a GOAWAY, or an error) are discarded: a peer
        sends nothing after GOAWAY, and trailing garbage must not surface as anything
        but the events before it.
        """
        if self._pending is not None:
            raise RuntimeError("bytes of the last read are pending: call next_frames() first")
        events, _ = self._feed(memoryview(data).cast("B"))
        return events

    def receive_eof(self) -> None:
        """The peer closed its side: fine between frames, an error inside one (parse the
        pending bytes first)."""
        at_boundary = self._filled == 0 and self._read in (_Read.HEADER, _Read.PREFACE)
        if self._state is not State.CLOSED and not at_boundary:
            raise self._fail(
                ErrorCode.MALFORMED_FRAME,
                f"stream truncated inside a frame ({_Read.NAMES[self._read]})",
            )
        self._state = TRANSITIONS[(self._state, Event.EOF)]

    def _expect(self, read: int, buf: memoryview) -> None:
        self._read = read
        self._buf = buf
        self._filled = 0

    def _field_done(self) -> list[Frame]:
        read = self._read
        if read == _Read.PREFACE:
            if bytes(self._buf) != MAGIC:
                raise self._fail(ErrorCode.BAD_MAGIC, "connection preface is not kvship's")
            self._state = self._step(Event.RECV_PREFACE, "the preface")
            self._expect(_Read.HEADER, self._scratch[:HEADER_SIZE])
            return []
        if read == _Read.HEADER:
            return self._on_header()
        if read == _Read.BODY:
            piece = self._buf
            if len(piece) == self._body_length:  # the whole body came in one piece
                self._expect(_Read.HEADER, self._scratch[:HEADER_SIZE])
                return self._on_body(piece)
            self._body += piece
            missing = self._body_length - len(self._body)
            if missing:
                self._expect(_Read.BODY, memoryview(bytearray(min(missing, BULK_READ))))
                return []
            body, self._body = self._body, bytearray()
            self._expect(_Read.HEADER, self._scratch[:HEADER_SIZE])
            return self._on_body(memoryview(body))
        if read == _Read.CHUNK_META:
            return self._on_chunk_meta()
        # CHUNK_DATA
        meta, data, tag = self._chunk_meta, self._buf, self._chunk_tag
        self._chunk_meta, self._chunk_tag = None, None
        self._expect(_Read.HEADER, self._scratch[:HEADER_SIZE])
        assert meta is not None
        return [ReceivedChunk(meta, data, tag)]

    def _on_header(self) -> list[Frame]:
        length, ftype, flags, reserved = HEADER.unpack_from(self._buf)
        limit = self.limits.max_frame if self._state is State.OPEN else HANDSHAKE_MAX_BODY
        if length > limit:
            raise self._fail(
                ErrorCode.FRAME_TOO_LARGE, f"frame type 0x{ftype:02x} of {length} B > {limit} B"
            )
        if reserved:
            raise self._fail(ErrorCode.MALFORMED_FRAME, "reserved header bits are set")
        self._frame_type, self._frame_flags, self._body_length = ftype, flags, length
        if ftype == FrameType.CHUNK:
            # Checked on the header: a CHUNK's data goes straight to the sink's buffer.
            if self._state is not State.OPEN:
                raise self._fail(ErrorCode.PROTOCOL_ERROR, "CHUNK before the handshake")
            self._may_receive(FrameType.CHUNK)
            if length < ChunkMeta.FIXED.size:
                raise self._fail(ErrorCode.MALFORMED_FRAME, f"CHUNK body of {length} B < 40 B")
            self._expect(_Read.CHUNK_META, self._scratch[: ChunkMeta.FIXED.size])
            return []
        if length == 0:
            self._expect(_Read.HEADER, self._scratch[:HEADER_SIZE])
            return self._on_body(memoryview(b""))
        # The body buffer grows as its bytes arrive (a piece of at most BULK_READ at a
        # time): a header that announces megabytes commits no memory the peer did not send.
        self._body = bytearray()
        self._expect(_Read.BODY, memoryview(bytearray(min(length, BULK_READ))))
        return []

    def _on_body(self, body: memoryview) -> list[Frame]:
        ftype = self._frame_type
        decode = DECODERS.get(ftype)
        if decode is None:
            if self._frame_flags & FLAG_IGNORABLE and self._state is State.OPEN:
                return []
            raise self._fail(ErrorCode.UNKNOWN_FRAME, f"unknown frame type 0x{ftype:02x}")
        if ftype in _HANDSHAKE_FRAMES:
            self._last_body = bytes(body)  # the MACs cover it as it came (SPEC §6.4)
        elif ftype == FrameType.OPEN:
            self._open_check = open_check(body)
        try:
            frame = decode(body)
        except ProtocolError as exc:
            raise self._fail(exc.code, exc.message) from None
        except Exception as exc:  # a decoder bug must not escape as anything else
            raise self._fail(ErrorCode.MALFORMED_FRAME, f"frame 0x{ftype:02x}: {exc!r}") from exc
        return self._dispatch(frame)

    def _may_receive(self, frame_type: int) -> None:
        side = self._side
        assert side is not None
        sender = side.other
        if frame_type not in MAY_SEND[sender]:
            raise self._fail(
                ErrorCode.PROTOCOL_ERROR,
                f"{frame_name(frame_type)} from {sender.value}: only "
                + " or ".join(s.value for s in Side if frame_type in MAY_SEND[s])
                + " may send it",
            )
        cap = NEEDS_CAP.get(frame_type, 0)
        if cap and not self.negotiated.capabilities & cap:
            raise self._fail(
                ErrorCode.PROTOCOL_ERROR,
                f"{frame_name(frame_type)} without the capability {cap:#x}",
            )

    def _dispatch(self, frame: Frame) -> list[Frame]:
        name = frame_name(frame.TYPE)
        state = self._step(_EVENTS_IN.get(frame.TYPE, Event.RECV_FRAME), name)
        if isinstance(frame, Hello):
            self._on_hello(frame, state)
            return [frame]
        if isinstance(frame, HelloAck):
            self._on_hello_ack(frame, state)
            return [frame]
        if isinstance(frame, AuthChallenge):
            self._on_challenge(frame, state)
            return [frame]
        if isinstance(frame, AuthProof):
            self._on_proof(frame, state)
            return [frame]
        if not isinstance(frame, GoAway | Ping):
            self._may_receive(frame.TYPE)
        remote = self._fail
        if isinstance(frame, Open):
            self._on_open(frame)
        elif isinstance(frame, End):
            self._on_end(frame)
        elif isinstance(frame, ShmChunk):
            self._need_arena("SHM_CHUNK", remote)
            self._check_chunk(frame.meta, frame.meta.raw_length)
        elif isinstance(frame, Abort):
            tid = frame.transfer_id
            if self._subscribing and tid not in self._sending and tid not in self._ended:
                self._subscribing = False  # it answers the SUBSCRIBE (§9.3: NOT_FOUND)
            self._aborted(tid)
        elif isinstance(frame, Credit):
            if self.send_credit + frame.increment > MAX_WINDOW:
                raise remote(ErrorCode.FLOW_CONTROL, "credit above 2^31-1")
            self.send_credit += frame.increment
        elif isinstance(frame, Complete):
            self._on_complete(frame)
        elif isinstance(frame, ShmAttach):
            if self._arena != _NO_ARENA:
                raise remote(ErrorCode.PROTOCOL_ERROR, "SHM_ATTACH twice")
            self._arena_asked()
        elif isinstance(frame, ShmAttached):
            if self._arena != _ARENA_ASKED:
                raise remote(ErrorCode.PROTOCOL_ERROR, "SHM_ATTACHED without an SHM_ATTACH")
            self._arena_mapped()
        elif isinstance(frame, LayerReady):
            transfer = self._receiving.get(frame.transfer_id)
            if transfer is None and frame.transfer_id not in self._forgotten:
                raise remote(
                    ErrorCode.UNKNOWN_TRANSFER,
                    f"LAYER_READY for transfer {frame.transfer_id:#x} not open",
                )
            self._check_layer_ready(frame, transfer, remote)
        elif isinstance(frame, Release):
            self._need_arena("RELEASE", remote)
        self._state = state
        return [frame]

    def _on_challenge(self, frame: AuthChallenge, state: State) -> None:
        auth = self._auth
        if self._key is None:
            raise self._fail(
                ErrorCode.PROTOCOL_ERROR, "AUTH_CHALLENGE, but this side offered no key"
            )
        if auth.nonce:
            raise self._fail(ErrorCode.PROTOCOL_ERROR, "a second AUTH_CHALLENGE")
        auth.nonce, auth.mac = frame.nonce, frame.mac
        self._state = state

    def _on_proof(self, frame: AuthProof, state: State) -> None:
        auth = self._auth
        assert auth.secret is not None and auth.pending_ack is not None  # AWAIT_PROOF
        want = initiator_mac(auth.secret, auth.nonce, self._hello_body)
        if not same_mac(frame.mac, want):
            raise self._fail(
                ErrorCode.AUTH_FAILED,
                f"the proof for key {auth.key_id!r} does not verify (a wrong key, or a "
                "replayed handshake)",
            )
        auth.ack, auth.pending_ack, auth.secret = auth.pending_ack, None, None
        self.authenticated_key = auth.key_id
        self._state = state

    def _on_open(self, frame: Open) -> None:
        self._check_open(frame, self.side.other if self.side else None, self._fail)
        if self.side is Side.ENGINE and not self._subscribing:
            raise self._fail(ErrorCode.PROTOCOL_ERROR, "OPEN without a SUBSCRIBE (§9.3)")
        if frame.transfer_id in self._receiving:
            raise self._fail(
                ErrorCode.PROTOCOL_ERROR, f"transfer {frame.transfer_id:#x} opened twice"
            )
        if len(self._receiving) >= self.limits.max_transfers:
            raise self._fail(
                ErrorCode.TOO_MANY_TRANSFERS, f"more than {self.limits.max_transfers} transfers"
            )
        self._subscribing = False
        self._forgotten.discard(frame.transfer_id)
        self._receiving[frame.transfer_id] = Receiving(
            frame, chunk_table(frame.layers, frame.chunk_size), open_check=self._open_check
        )

    def _on_end(self, frame: End) -> None:
        incoming = self._receiving.pop(frame.transfer_id, None)
        if incoming is None and frame.transfer_id in self._forgotten:
            return
        if incoming is None:
            raise self._fail(
                ErrorCode.UNKNOWN_TRANSFER, f"END for transfer {frame.transfer_id:#x} not open"
            )
        if incoming.chunks_seen != frame.chunks_on_stripe:
            raise self._fail(
                ErrorCode.PROTOCOL_ERROR,
                f"END says {frame.chunks_on_stripe} chunks on this stripe, "
                f"{incoming.chunks_seen} arrived",
            )
        if (
            self.negotiated.capabilities & CAP_OPEN_CHECK
            and frame.open_check != incoming.open_check
        ):
            raise self._fail(
                ErrorCode.CHECKSUM_MISMATCH,
                f"the OPEN of transfer {frame.transfer_id:#x} arrived altered: its END's "
                f"open_check {frame.open_check:#010x}, the OPEN here {incoming.open_check:#010x}",
            )

    def _on_complete(self, frame: Complete) -> None:
        tid = frame.transfer_id
        if self.side is Side.ENGINE and tid in self._receiving:
            del self._receiving[tid]  # a delivery the daemon ended without END (§9.3)
            return
        if tid in self._sending:
            raise self._fail(
                ErrorCode.PROTOCOL_ERROR, f"COMPLETE of transfer {tid:#x} before its END"
            )
        self._ended.discard(tid)  # done; unknown ids are ignored (ended elsewhere, aborted)

    def _check_chunk(self, meta: ChunkMeta, wire_length: int) -> None:
        incoming = self._receiving.get(meta.transfer_id)
        if incoming is None and meta.transfer_id in self._forgotten:
            if wire_length > self.limits.max_chunk:
                raise self._fail(ErrorCode.MALFORMED_FRAME, "bad chunk for an ended transfer")
            return
        if incoming is None:
            raise self._fail(
                ErrorCode.UNKNOWN_TRANSFER, f"chunk for transfer {meta.transfer_id:#x} not open"
            )
        try:
            check_chunk(
                incoming.open, incoming.starts, meta, wire_length, self.negotiated.capabilities
            )
        except ProtocolError as exc:
            raise self._fail(exc.code, exc.message) from None
        incoming.chunks_seen += 1

    def _on_chunk_meta(self) -> list[Frame]:
        meta = ChunkMeta.unpack(self._buf)
        wire_length = self._body_length - ChunkMeta.FIXED.size
        self._check_chunk(meta, wire_length)
        if wire_length > self.recv_window:
            raise self._fail(
                ErrorCode.FLOW_CONTROL,
                f"chunk of {wire_length} B exceeds the {self.recv_window} B credit window",
            )
        self.recv_window -= wire_length
        self._chunk_meta = meta
        if wire_length == 0:  # pragma: no cover - a zero-length chunk is never generated
            self._expect(_Read.HEADER, self._scratch[:HEADER_SIZE])
            return [ReceivedChunk(meta, memoryview(b""))]
        buf, self._chunk_tag = self.payload_sink(meta, wire_length)
        if len(buf) != wire_length:
            raise RuntimeError(f"payload sink gave {len(buf)} B for a {wire_length} B chunk")
        self._expect(_Read.CHUNK_DATA, buf)
        return []


@dataclass(slots=True)
class _AuthExchange:
    """Where the pre-shared-key handshake stands (SPEC §6.4), either end."""

    key_id: str = ""  # acceptor: the key the HELLO named
    secret: bytes | None = field(default=None, repr=False)  # acceptor, until the proof
    nonce: bytes = b""  # the acceptor's nonce (sent, or received by the initiator)
    mac: bytes = field(default=b"", repr=False)  # initiator: the acceptor's proof
    proved: bool = False  # initiator: AUTH_PROOF sent
    pending_ack: tuple[bytes, int] | None = None  # acceptor: HELLO_ACK held until proof
    ack: tuple[bytes, int] | None = None  # acceptor: proof verified, HELLO_ACK to send


def open_check(body: bytes | memoryview) -> int:
    """END's ``open_check`` (SPEC §7.4): low 32 bits of xxh3-64 of an OPEN body."""
    return chunk_checksum(body) & 0xFFFFFFFF


_Raise = Callable[[ErrorCode, str], ProtocolError]
_HELLO_ROLES = {1: "peer", 2: "engine"}


def _local(code: ErrorCode, message: str) -> LocalProtocolError:
    return LocalProtocolError(code, message)


def _why_not(state: State, event: Event, what: str) -> str:
    """Why the table refuses ``event`` in ``state``, in words."""
    if state is State.CLOSED:
        return f"{what}: the connection is closed"
    if state is State.IDLE:
        return f"{what} before initiate() sent HELLO"
    if state in (State.AWAIT_PREFACE, State.AWAIT_HELLO):
        return f"{what} before HELLO"
    if state is State.AWAIT_ACCEPT:
        if event.sending:
            return f"{what} before accept() answered the HELLO"
        return f"{what} before HELLO_ACK: the initiator may only pipeline PING"
    if state is State.AWAIT_ACK:
        if event.sending:
            return f"{what} before HELLO_ACK: only PING may be pipelined after HELLO"
        return f"{what} before HELLO_ACK"
    return f"{what} after the handshake"
