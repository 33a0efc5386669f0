"""Peer authentication by pre-shared key (SPEC §6.4): the frames, the keys, the MACs.

Method 1, ``AUTH_PSK`` (HMAC-SHA256 challenge–response, mutual), costs one more round
trip than an unauthenticated handshake and proves both ends hold the same key without
the key ever crossing the wire:

1. initiator → HELLO, ``auth_method`` 1, ``auth`` = its 32-byte nonce ‖ the key id
2. acceptor → AUTH_CHALLENGE: its own nonce and ``mac_a``, over both nonces, the HELLO
   and the HELLO_ACK it is about to send (so the negotiated version, capabilities and
   limits are bound to the key: a man in the middle cannot downgrade them)
3. initiator → AUTH_PROOF: ``mac_i`` over the acceptor's nonce and the HELLO
4. acceptor verifies ``mac_i`` → HELLO_ACK; the initiator verifies ``mac_a`` on it

Fresh nonces on both sides make every transcript unique: a recorded handshake replayed to
an acceptor fails at step 4 (its nonce differs), one replayed to an initiator at its check
of ``mac_a``. The labels differ per direction, so one side's MAC is never the other's.
The key authenticates the handshake only; what follows is protected by TLS or not at all
(docs/security.md).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from .base import FixedFrame
from .constants import FrameType
from .errors import ErrorCode, ProtocolError

AUTH_PSK = 1  # auth_method: HMAC-SHA256 challenge-response over a pre-shared key
NONCE_SIZE = 32
MAC_SIZE = 32
MIN_SECRET = 16  # bytes; `kvship keygen` makes 32
KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

_LABEL_ACCEPTOR = b"kvship-auth-v1 acceptor\x00"
_LABEL_INITIATOR = b"kvship-auth-v1 initiator\x00"
_LEN = struct.Struct(">I")


@dataclass(frozen=True)
class PeerKey:
    """One pre-shared key: its public id (names it in HELLO and logs) and its secret."""

    key_id: str
    secret: bytes = field(repr=False)  # never printed, never logged

    def __post_init__(self) -> None:
        if not KEY_ID.fullmatch(self.key_id):
            raise ValueError(f"key id {self.key_id!r}: 1-64 of A-Z a-z 0-9 . _ -")
        if len(self.secret) < MIN_SECRET:
            raise ValueError(f"key {self.key_id!r}: secret of {len(self.secret)} B < 16 B")


@dataclass(frozen=True, slots=True)
class AuthChallenge(FixedFrame):
    """The acceptor's nonce and its proof that it holds the key (SPEC §5.18)."""

    TYPE: ClassVar[int] = FrameType.AUTH_CHALLENGE
    NAME: ClassVar[str] = "AUTH_CHALLENGE"
    FIXED: ClassVar[struct.Struct] = struct.Struct(f">{NONCE_SIZE}s{MAC_SIZE}s")
    FIELDS: ClassVar[tuple[str | None, ...]] = ("nonce", "mac")
    nonce: bytes
    mac: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class AuthProof(FixedFrame):
    """The initiator's proof that it holds the key, over the acceptor's nonce (§5.19)."""

    TYPE: ClassVar[int] = FrameType.AUTH_PROOF
    NAME: ClassVar[str] = "AUTH_PROOF"
    FIXED: ClassVar[struct.Struct] = struct.Struct(f">{MAC_SIZE}s")
    FIELDS: ClassVar[tuple[str | None, ...]] = ("mac",)
    mac: bytes = field(repr=False)


def hello_auth(nonce: bytes, key_id: str) -> bytes:
    """HELLO's ``auth`` for method 1: the initiator's nonce, then the key id (UTF-8)."""
    return nonce + key_id.encode()


def parse_hello_auth(auth: bytes) -> tuple[bytes, str]:
    """(nonce, key id) of a method-1 HELLO ``auth``; AUTH_FAILED if it is not one."""
    key_id = auth[NONCE_SIZE:].decode("utf-8", "replace")
    if len(auth) <= NONCE_SIZE or not KEY_ID.fullmatch(key_id):
        raise ProtocolError(
            ErrorCode.AUTH_FAILED,
            "HELLO auth must be a 32-byte nonce and a key id (1-64 of A-Z a-z 0-9 . _ -)",
        )
    return auth[:NONCE_SIZE], key_id


def _framed(*parts: bytes) -> bytes:
    """Each part with its length first, so no two transcripts concatenate alike."""
    return b"".join(_LEN.pack(len(p)) + p for p in parts)


def _mac_key(secret: bytes) -> bytes:
    """HMAC keys the secret itself, SHA-256 of it: HMAC pads a short key with zeros, so
    ``k`` and ``k + b"\\0"`` would be the same key (hypothesis found it)."""
    return hashlib.sha256(secret).digest()


def acceptor_mac(secret: bytes, nonce_a: bytes, hello_body: bytes, ack_body: bytes) -> bytes:
    message = _LABEL_ACCEPTOR + _framed(nonce_a, hello_body, ack_body)
    return hmac.digest(_mac_key(secret), message, hashlib.sha256)


def initiator_mac(secret: bytes, nonce_a: bytes, hello_body: bytes) -> bytes:
    message = _LABEL_INITIATOR + _framed(nonce_a, hello_body)
    return hmac.digest(_mac_key(secret), message, hashlib.sha256)


def same_mac(got: bytes, want: bytes) -> bool:
    """Constant-time compare: how long it takes says nothing about where they differ."""
    return hmac.compare_digest(got, want)


def lookup(keys: Mapping[str, bytes], key_id: str) -> bytes:
    secret = keys.get(key_id)
    if secret is None:
        raise ProtocolError(ErrorCode.AUTH_FAILED, f"key id {key_id!r} is not accepted here")
    return secret
