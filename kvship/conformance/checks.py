"""The SPEC's rules as checks against a live implementation.

Each check is an ``async`` function of a :class:`Ctx` (the listener under test and the
target's other addresses) that opens its own connection(s), does one thing the SPEC
rules on, and returns a one-line detail when the implementation did what the SPEC says.
It raises :class:`~.link.CheckFailed` when it did not and :class:`~.link.CheckSkipped`
when the check does not apply (a capability the target does not offer, a listener it
was not given). :func:`plan` lays the checks out over the listeners; :mod:`.report` runs
them, each bounded by a per-check timeout.

The implementation under test is the *receiver* on its peer listener (the kit plays a
sending daemon) and the *daemon* on its engine listeners (the kit plays an engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import os
import random
import secrets
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import payload, wire
from .link import CheckFailed, CheckSkipped, Frame, Link, describe_all, is_unix
from .wire import Fields

KIB = 1024
MIB = 1024 * KIB
FLOW_BUDGET = 256 * MIB  # most bytes the flow-control check sends to exhaust a receiver
NODE_NAME = "kvship-conformance"
READ_SHARE = 0.6  # of the per-check timeout: the longest a single read waits


# ------------------------------------------------------------------------ targets
@dataclass(frozen=True)
class Listener:
    kind: str  # "peer" | "engine"
    address: str

    @property
    def unix(self) -> bool:
        return is_unix(self.address)

    @property
    def label(self) -> str:
        if self.kind == "peer":
            return "peer"
        return "engine unix" if self.unix else "engine tcp"

    @property
    def role(self) -> int:
        return wire.ROLE_PEER if self.kind == "peer" else wire.ROLE_ENGINE


@dataclass(frozen=True)
class Target:
    """What to test: a peer listener and/or engine listeners (the round-trip checks need a
    peer and an engine address of the *same* daemon)."""

    peer: str | None = None
    engines: tuple[str, ...] = ()
    unreachable: str = "127.0.0.1:1"  # a host:port nothing answers on (refused at once)
    timeout: float = 5.0  # per check, seconds

    @property
    def listeners(self) -> list[Listener]:
        out = [Listener("peer", self.peer)] if self.peer else []
        return out + [Listener("engine", a) for a in self.engines]

    def describe(self) -> str:
        parts = [f"peer {self.peer}"] if self.peer else []
        parts += [f"engine {a}" for a in self.engines]
        return ", ".join(parts)


class Ctx:
    """One check's view: its listener, the target, and the links it opened (closed after)."""

    def __init__(self, target: Target, listener: Listener) -> None:
        self.target = target
        self.listener = listener
        # How long one read waits for an answer: under the check's own limit, so a check
        # that waits in vain still has time to say what it saw.
        self.timeout = target.timeout * READ_SHARE
        self.links: list[Link] = []
        self.cleanup: list[Callable[[], None]] = []

    async def connect(self, address: str | None = None) -> Link:
        link = await Link.open(address or self.listener.address, self.timeout)
        self.links.append(link)
        return link

    async def hello(
        self,
        caps: int = wire.BASE_CAPS,
        *,
        address: str | None = None,
        role: int | None = None,
        **fields: Any,
    ) -> Link:
        """A connection with a completed handshake (the listener's role unless told)."""
        link = await self.connect(address)
        await link.handshake(
            hello_fields(self.listener.role if role is None else role, caps, **fields)
        )
        return link

    async def peer(self, caps: int = wire.BASE_CAPS) -> Link:
        """A handshaken connection to the target's peer listener, as a sending daemon."""
        if not self.target.peer:
            raise CheckSkipped("needs --peer")
        return await self.hello(caps, address=self.target.peer, role=wire.ROLE_PEER)

    def close(self) -> None:
        for link in self.links:
            link.close()
        for undo in self.cleanup:
            with contextlib.suppress(Exception):
                undo()


CheckFn = Callable[[Ctx], Awaitable[str]]


@dataclass(frozen=True)
class Check:
    name: str
    section: str  # the SPEC section(s) it checks
    func: CheckFn
    where: str  # "any" | "peer" | "engine" | "engine_unix" | "engine_tcp"
    slow: float = 1.0  # its timeout, in per-check timeouts
    doc: str = ""

    def applies(self, listener: Listener) -> bool:
        if self.where == "any":
            return True
        if self.where == "peer":
            return listener.kind == "peer"
        if self.where == "engine":
            return listener.kind == "engine"
        if self.where == "engine_unix":
            return listener.kind == "engine" and listener.unix
        if self.where == "engine_tcp":
            return listener.kind == "engine" and not listener.unix
        raise ValueError(self.where)


CHECKS: list[Check] = []
FINAL: list[Check] = []


def check(
    name: str, section: str, where: str = "any", *, slow: float = 1.0, final: bool = False
) -> Callable[[CheckFn], CheckFn]:
    def register(func: CheckFn) -> CheckFn:
        entry = Check(name, section, func, where, slow, (func.__doc__ or "").strip())
        (FINAL if final else CHECKS).append(entry)
        return func

    return register


def plan(target: Target) -> list[tuple[Check, Listener]]:
    """Every (check, listener) pair to run, in order: the checks (listener by listener),
    then the final liveness checks on every listener."""
    runs = [(c, listener) for c in CHECKS for listener in target.listeners if c.applies(listener)]
    runs += [(c, listener) for c in FINAL for listener in target.listeners if c.applies(listener)]
    return runs


# ------------------------------------------------------------------------ helpers
def hello_fields(role: int, caps: int = wire.BASE_CAPS, **over: Any) -> Fields:
    fields: Fields = {
        "role": role,
        "min_version": wire.PROTOCOL_VERSION,
        "max_version": wire.PROTOCOL_VERSION,
        "auth_method": wire.AUTH_NONE,
        "capabilities": caps,
        "node_name": NODE_NAME,
        "auth": b"",
    }
    fields.update(over)
    return fields


def new_tid() -> int:
    return secrets.randbits(63) | 1


def new_request_id() -> str:
    return f"conformance-{secrets.token_hex(8)}"


async def expect_goaway(link: Link, code: str, timeout: float | None = None) -> str:
    """Read until the target closes: its last frame must be GOAWAY(``code``)."""
    try:
        frames = await link.until_closed(timeout)
    except TimeoutError:
        state = "the connection stayed open"
        with contextlib.suppress(CheckFailed, TimeoutError):
            await asyncio.wait_for(expect_alive(link), min(1.0, link.timeout / 3))
            state = "the frame was ignored: the connection stayed open and answers PING"
        raise CheckFailed(f"expected GOAWAY {code}; {state}") from None
    goaways = [f for f in frames if f.name == "GOAWAY"]
    if not goaways:
        raise CheckFailed(f"expected GOAWAY {code}; closed with {describe_all(frames[-3:])}")
    last = goaways[-1]
    if last is not frames[-1]:
        raise CheckFailed(f"frames after GOAWAY: {describe_all(frames[-3:])}")
    got = wire.error_name(last.fields["code"])
    if got != code:
        raise CheckFailed(f"got {last.describe()}, expected GOAWAY {code}")
    return f"GOAWAY {code}"


async def expect_refusal(link: Link, hello: Fields, code: str) -> str:
    """MAGIC + ``hello``: the target must refuse it with GOAWAY(``code``), no HELLO_ACK."""
    await link.send(wire.MAGIC + wire.encode("HELLO", hello))
    try:
        first = await link.next(credits=True)
    except TimeoutError:
        raise CheckFailed(f"no answer to the HELLO (expected GOAWAY {code})") from None
    if first is not None and first.name == "HELLO_ACK":
        raise CheckFailed(f"HELLO_ACK instead of GOAWAY {code}")
    if first is not None:
        link.unread(first)
    return await expect_goaway(link, code)


async def expect_frame(
    link: Link, want: Callable[[Frame], bool], what: str, timeout: float | None = None
) -> Frame:
    """The first frame ``want`` accepts (others are passed over); GOAWAY or EOF first fails."""
    seen: list[Frame] = []
    while True:
        try:
            frame = await link.next(timeout)
        except TimeoutError:
            raise CheckFailed(f"no {what} within the timeout (got {describe_all(seen)})") from None
        if frame is None:
            raise CheckFailed(f"the target closed before {what} (got {describe_all(seen)})")
        if want(frame):
            return frame
        if frame.name == "GOAWAY":
            raise CheckFailed(f"got {frame.describe()} instead of {what}")
        seen.append(frame)


async def expect_abort(link: Link, tid: int, code: str) -> Frame:
    """ABORT(``tid``, ``code``) on ``link``; COMPLETE or another code for it fails."""

    def mine(f: Frame) -> bool:
        return f.name in ("ABORT", "COMPLETE") and f.fields["transfer_id"] == tid

    frame = await expect_frame(link, mine, f"ABORT {code} of transfer {tid:#x}")
    if frame.name != "ABORT" or wire.error_name(frame.fields["code"]) != code:
        raise CheckFailed(f"got {frame.describe()}, expected ABORT {code}")
    return frame


async def expect_alive(link: Link) -> None:
    """PING -> the PONG echoing it: the connection (and the target) still serves."""
    opaque = secrets.randbits(64)
    await link.send_frame("PING", {"opaque": opaque})

    def pong(f: Frame) -> bool:
        return f.name == "PONG" and f.fields["opaque"] == opaque

    await expect_frame(link, pong, "the PONG of a PING")


async def expect_error(link: Link, tid: int, code: str) -> str:
    """``code`` for transfer ``tid``: an ABORT of it, or a GOAWAY (the SPEC lets a daemon
    treat a connection-scope error as one transfer's, §12)."""
    while True:
        try:
            frame = await link.next()
        except TimeoutError:
            raise CheckFailed(f"neither ABORT nor GOAWAY {code} within the timeout") from None
        if frame is None:
            raise CheckFailed(f"closed without GOAWAY {code}")
        if frame.name == "GOAWAY":
            got = wire.error_name(frame.fields["code"])
            if got != code:
                raise CheckFailed(f"got {frame.describe()}, expected {code}")
            return f"GOAWAY {code}"
        if frame.name in ("ABORT", "COMPLETE") and frame.fields["transfer_id"] == tid:
            if frame.name != "ABORT" or wire.error_name(frame.fields["code"]) != code:
                raise CheckFailed(f"got {frame.describe()}, expected {code}")
            return f"ABORT {code}"


async def expect_abort_and_goaway(link: Link, tid: int, code: str) -> str:
    """ABORT(``tid``, ``code``) and then GOAWAY(``code``) closing the connection (§7.4: a
    coded chunk that does not decode)."""
    try:
        frames = await link.until_closed()
    except TimeoutError:
        raise CheckFailed(
            f"connection still open; got {describe_all(link.received[-3:])} "
            f"(expected ABORT + GOAWAY {code})"
        ) from None
    aborts = [f for f in frames if f.name == "ABORT" and f.fields["transfer_id"] == tid]
    if not aborts or wire.error_name(aborts[0].fields["code"]) != code:
        raise CheckFailed(f"no ABORT {code} of the transfer; got {describe_all(frames)}")
    if not frames or frames[-1].name != "GOAWAY":
        raise CheckFailed(f"ABORT but no GOAWAY; got {describe_all(frames)}")
    if wire.error_name(frames[-1].fields["code"]) != code:
        raise CheckFailed(f"got {frames[-1].describe()}, expected GOAWAY {code}")
    return f"ABORT + GOAWAY {code}"


def bf16_like(n: int, rng: random.Random) -> bytes:
    """Bytes shaped like bf16 KV: a few exponent bytes, noisy mantissas (split16 shrinks it)."""
    out = bytearray(rng.randbytes(n))
    out[1::2] = bytes(rng.choice((0x3C, 0x3D, 0xBC, 0xBD)) for _ in range(len(out[1::2])))
    return bytes(out)


def text_like(n: int) -> bytes:
    unit = b"kvship conformance: every chunk of this layer compresses well. "
    return (unit * (n // len(unit) + 1))[:n]


class Transfer:
    """A transfer the kit sends: layers of bytes, chunked by §7.2, digested by §8."""

    def __init__(
        self,
        layers: Sequence[bytes],
        chunk_size: int,
        *,
        dtype: str = "uint8",
        token_ids: Sequence[int] = (),
        extra: Fields | None = None,
        tid: int | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> None:
        self.tid = new_tid() if tid is None else tid
        self.priority = priority
        self.request_id = request_id or new_request_id()
        self.data = [bytes(x) for x in layers]
        self.chunk_size = chunk_size
        self.dtype = dtype
        self.token_ids = list(token_ids)
        self.extra = extra or {}
        sizes = [len(x) for x in self.data]
        self.places = wire.chunk_places(sizes, chunk_size)
        self.checksums = [
            wire.checksum(self.data[layer][off : off + n]) for _, layer, off, n in self.places
        ]
        self.digest = wire.digest(self.checksums)
        self.total_bytes = sum(sizes)

    @property
    def n_chunks(self) -> int:
        return len(self.places)

    def layer_fields(self) -> list[Fields]:
        size = payload.DTYPE_SIZES.get(self.dtype, 1)
        return [
            {"dtype": self.dtype, "shape": [len(x) // size], "nbytes": len(x)} for x in self.data
        ]

    def open_fields(self, **over: Any) -> Fields:
        fields: Fields = {
            "transfer_id": self.tid,
            "request_id": self.request_id,
            "layers": self.layer_fields(),
            "chunk_size": self.chunk_size,
            "token_ids": self.token_ids,
            "extra": self.extra,
            "priority": self.priority,
        }
        fields.update(over)
        return fields

    def open(self, **over: Any) -> bytes:
        frame = wire.encode("OPEN", self.open_fields(**over))
        self.open_body = frame[wire.HEADER_SIZE :]  # END's open_check covers it (§7.4)
        return frame

    def raw(self, index: int) -> bytes:
        _, layer, off, n = self.places[index]
        return self.data[layer][off : off + n]

    def meta(self, index: int, **over: Any) -> Fields:
        _, layer, off, n = self.places[index]
        meta: Fields = {
            "transfer_id": self.tid,
            "chunk_index": index,
            "layer": layer,
            "offset": off,
            "raw_length": n,
            "checksum": self.checksums[index],
            "codec": wire.CODEC_RAW,
        }
        meta.update(over)
        return meta

    def chunk(self, index: int, codec: int = wire.CODEC_RAW, **over: Any) -> bytes:
        """A whole CHUNK frame (coded if ``codec``); ``over`` may make its meta lie."""
        raw = self.raw(index)
        data = raw if codec == wire.CODEC_RAW else payload.encode_chunk(raw, codec)
        if codec != wire.CODEC_RAW and len(data) >= len(raw):
            raise RuntimeError(f"the kit's codec {codec} did not shrink chunk {index}")
        return wire.encode("CHUNK", {"meta": self.meta(index, codec=codec, **over), "data": data})

    def again(self) -> Transfer:
        """The same layers, tokens and extra under a new transfer id and request id."""
        return Transfer(
            self.data,
            self.chunk_size,
            dtype=self.dtype,
            token_ids=self.token_ids,
            extra=self.extra,
            priority=self.priority,
        )

    def end(
        self,
        chunks_on_stripe: int | None = None,
        digest: int | None = None,
        open_check: int = 0,
    ) -> bytes:
        return wire.encode(
            "END",
            {
                "transfer_id": self.tid,
                "chunks_on_stripe": self.n_chunks if chunks_on_stripe is None else chunks_on_stripe,
                "digest": self.digest if digest is None else digest,
                "open_check": open_check,
            },
        )

    def open_check(self) -> int:
        """END's ``open_check`` with CAP_OPEN_CHECK: low 32 bits of xxh3-64 of the OPEN
        body this transfer last sent (§7.4)."""
        return wire.checksum(self.open_body) & 0xFFFFFFFF


async def push(
    link: Link, transfer: Transfer, indices: Sequence[int], codec: int = wire.CODEC_RAW
) -> None:
    """Send chunks as a good sender does: never beyond credit (§10), waiting for CREDIT."""
    for i in indices:
        frame = transfer.chunk(i, codec)
        w = len(frame) - wire.HEADER_SIZE - wire.CHUNK_META_SIZE
        if not await link.wait_credit(w):
            raise CheckFailed(
                f"no CREDIT: {link.credit} B of window left for a {w} B chunk, none granted "
                f"(§10: the receiver grants credit for the bytes it consumed)"
            )
        link.credit -= w
        await link.send(frame)


async def expect_complete(link: Link, transfer: Transfer, digest: int | None = None) -> str:
    """COMPLETE of ``transfer`` with its total_bytes and ``digest`` (default: its own)."""
    want = transfer.digest if digest is None else digest

    def mine(f: Frame) -> bool:
        return f.name in ("COMPLETE", "ABORT") and f.fields["transfer_id"] == transfer.tid

    frame = await expect_frame(link, mine, f"COMPLETE of transfer {transfer.tid:#x}")
    if frame.name != "COMPLETE":
        raise CheckFailed(f"got {frame.describe()} instead of COMPLETE")
    got = frame.fields
    if got["total_bytes"] != transfer.total_bytes or got["digest"] != want:
        raise CheckFailed(
            f"COMPLETE says {got['total_bytes']} B digest {got['digest']:#018x}; "
            f"sent {transfer.total_bytes} B digest {want:#018x}"
        )
    return f"COMPLETE {transfer.total_bytes} B, digest {want:#018x}"


async def send_whole(
    link: Link, transfer: Transfer, codec: int = wire.CODEC_RAW, **open_over: Any
) -> str:
    await link.send(transfer.open(**open_over))
    await push(link, transfer, range(transfer.n_chunks), codec)
    await link.send(transfer.end())
    return await expect_complete(link, transfer)


def small_transfer(**kw: Any) -> Transfer:
    """Two layers of random bytes, 3 chunks: the control transfer of many checks."""
    return Transfer([os.urandom(3000), os.urandom(1000)], 2048, **kw)


def need(link: Link, cap: int, name: str) -> None:
    if not link.has(cap):
        raise CheckSkipped(f"the target did not negotiate {name}")


# ====================================================================== handshake §2, §6
@check("handshake.hello_ack", "§5.2 §6.2 §6.3 §11")
async def _hello_ack(ctx: Ctx) -> str:
    """HELLO_ACK: version 1, capabilities within what was offered and known, sane limits."""
    offered = wire.CAP_STRIPING | wire.CAP_CODECS | wire.CAP_SHM
    link = await ctx.hello(offered)
    ack = link.limits
    problems = []
    if ack["version"] != wire.PROTOCOL_VERSION:
        problems.append(f"version {ack['version']}")
    if ack["capabilities"] & ~offered:
        problems.append(f"capabilities {ack['capabilities']:#x} not within offered {offered:#x}")
    if ack["capabilities"] & wire.CAP_SHM and not ctx.listener.unix:
        problems.append("CAP_SHM on a TCP listener (§6.3: only on Unix sockets)")
    if ack["max_frame"] < ack["max_chunk"] + wire.CHUNK_META_SIZE:
        problems.append("max_frame < max_chunk + 40")
    if ack["initial_window"] < 1:
        problems.append("initial_window 0")
    if ack["max_chunk"] > ack["initial_window"]:
        problems.append("max_chunk > initial_window (§5.2: a chunk must fit the window)")
    if ack["max_chunk"] > 4 * MIB:
        problems.append("max_chunk above 4 MiB (§5.2)")
    if problems:
        raise CheckFailed("; ".join(problems))
    return (
        f"v{ack['version']} caps {ack['capabilities']:#x} window {ack['initial_window']} "
        f"max_frame {ack['max_frame']} max_chunk {ack['max_chunk']} "
        f"max_transfers {ack['max_transfers']} ({ack['node_name']!r})"
    )


@check("handshake.version_range", "§6.2")
async def _version_range(ctx: Ctx) -> str:
    """HELLO offering versions 1..7: the acceptor picks min(its max, 7) = 1."""
    link = await ctx.hello(max_version=7)
    if link.limits["version"] != 1:
        raise CheckFailed(f"chose version {link.limits['version']}, expected 1")
    return "version 1 chosen from 1..7"


@check("handshake.unknown_capabilities_masked", "§6.3 §13")
async def _unknown_caps(ctx: Ctx) -> str:
    """Every bit offered: unknown bits (9-63) are masked off, never an error; CAP_AUTH is
    never granted without the pre-shared-key exchange (§6.4)."""
    link = await ctx.hello(2**64 - 1)
    caps = link.limits["capabilities"]
    if caps & ~wire.KNOWN_CAPS:
        raise CheckFailed(f"HELLO_ACK capabilities {caps:#x} carry unknown bits")
    if caps & wire.CAP_SHM and not ctx.listener.unix:
        raise CheckFailed(f"HELLO_ACK capabilities {caps:#x}: CAP_SHM on TCP (§6.3)")
    if caps & wire.CAP_AUTH:
        raise CheckFailed(f"HELLO_ACK capabilities {caps:#x}: CAP_AUTH without a key (§6.4)")
    if caps & wire.CAP_DEDUP and ctx.listener.kind == "engine":
        raise CheckFailed(f"HELLO_ACK capabilities {caps:#x}: CAP_DEDUP to an engine (§7.6)")
    return f"HELLO_ACK capabilities {caps:#x}"


@check("handshake.no_capabilities", "§6.3")
async def _no_caps(ctx: Ctx) -> str:
    """Nothing offered: HELLO_ACK names no capability (the intersection)."""
    link = await ctx.hello(0)
    if link.limits["capabilities"]:
        raise CheckFailed(f"HELLO_ACK capabilities {link.limits['capabilities']:#x}, offered 0")
    return "HELLO_ACK capabilities 0"


@check("handshake.bad_magic", "§2")
async def _bad_magic(ctx: Ctx) -> str:
    link = await ctx.connect()
    await link.send(b"GET / HT")  # 8 bytes: a text protocol knocking
    return await expect_goaway(link, "BAD_MAGIC")


@check("handshake.eof_inside_preface", "§12")
async def _eof_preface(ctx: Ctx) -> str:
    link = await ctx.connect()
    await link.send(wire.MAGIC[:5])
    link.half_close()
    return await expect_goaway(link, "MALFORMED_FRAME")


@check("handshake.unsupported_version", "§6.2")
async def _unsupported_version(ctx: Ctx) -> str:
    link = await ctx.connect()
    hello = hello_fields(ctx.listener.role, min_version=2, max_version=3)
    return await expect_refusal(link, hello, "UNSUPPORTED_VERSION")


@check("handshake.min_above_max", "§5.1")
async def _min_above_max(ctx: Ctx) -> str:
    link = await ctx.connect()
    hello = hello_fields(ctx.listener.role, min_version=2, max_version=1)
    return await expect_refusal(link, hello, "MALFORMED_FRAME")


@check("handshake.bad_role", "§5.1")
async def _bad_role(ctx: Ctx) -> str:
    """A HELLO role that is neither PEER nor ENGINE."""
    link = await ctx.connect()
    return await expect_refusal(link, hello_fields(3), "MALFORMED_FRAME")


@check("handshake.wrong_role", "§9 §12.1")
async def _wrong_role(ctx: Ctx) -> str:
    """ENGINE on the peer listener / PEER on an engine listener."""
    other = wire.ROLE_ENGINE if ctx.listener.role == wire.ROLE_PEER else wire.ROLE_PEER
    link = await ctx.connect()
    return await expect_refusal(link, hello_fields(other), "PROTOCOL_ERROR")


@check("handshake.unknown_auth_method", "§6.4 §12.1")
async def _unknown_auth(ctx: Ctx) -> str:
    """auth_method 200 (reserved, unknown to v1): GOAWAY AUTH_FAILED instead of HELLO_ACK."""
    link = await ctx.connect()
    hello = hello_fields(ctx.listener.role, auth_method=200, auth=b"conformance-token")
    return await expect_refusal(link, hello, "AUTH_FAILED")


@check("handshake.frame_before_hello", "§6.1")
async def _frame_before_hello(ctx: Ctx) -> str:
    """PING as the first frame: anything but HELLO in AWAIT_HELLO."""
    link = await ctx.connect()
    await link.send(wire.MAGIC + wire.encode("PING", {"opaque": 1}))
    return await expect_goaway(link, "PROTOCOL_ERROR")


@check("handshake.chunk_before_handshake", "§5.4 §6.1")
async def _chunk_before_handshake(ctx: Ctx) -> str:
    link = await ctx.connect()
    header = wire.HEADER.pack(48, wire.FRAME_TYPES["CHUNK"], 0, 0)
    await link.send(wire.MAGIC + header)  # rejected on its header
    return await expect_goaway(link, "PROTOCOL_ERROR")


@check("handshake.unknown_frame_before_handshake", "§6.1 §13")
async def _unknown_before_handshake(ctx: Ctx) -> str:
    """An unknown type with FLAG_IGNORABLE before the handshake: UNKNOWN_FRAME anyway."""
    link = await ctx.connect()
    await link.send(wire.MAGIC + wire.frame(0x7E, b"abc", wire.FLAG_IGNORABLE))
    return await expect_goaway(link, "UNKNOWN_FRAME")


@check("handshake.oversized_before_handshake", "§11")
async def _oversized_handshake(ctx: Ctx) -> str:
    """A HELLO header of 65537 body bytes (HANDSHAKE_MAX_BODY + 1), rejected on the header."""
    link = await ctx.connect()
    header = wire.HEADER.pack(wire.HANDSHAKE_MAX_BODY + 1, wire.FRAME_TYPES["HELLO"], 0, 0)
    await link.send(wire.MAGIC + header)
    return await expect_goaway(link, "FRAME_TOO_LARGE")


@check("handshake.pipelined_ping", "§6.1")
async def _pipelined_ping(ctx: Ctx) -> str:
    """MAGIC + HELLO + PING in one write: HELLO_ACK, then the PONG."""
    link = await ctx.connect()
    opaque = secrets.randbits(64)
    hello = hello_fields(ctx.listener.role)
    await link.send(
        wire.MAGIC + wire.encode("HELLO", hello) + wire.encode("PING", {"opaque": opaque})
    )
    first = await expect_frame(link, lambda f: True, "HELLO_ACK")
    if first.name != "HELLO_ACK":
        raise CheckFailed(f"got {first.describe()} before HELLO_ACK")
    second = await expect_frame(link, lambda f: f.name != "CREDIT", "the PONG")
    if second.name != "PONG" or second.fields["opaque"] != opaque:
        raise CheckFailed(f"got {second.describe()}, expected the pipelined PING's PONG")
    return "HELLO_ACK, then PONG"


@check("handshake.second_hello", "§6.1")
async def _second_hello(ctx: Ctx) -> str:
    link = await ctx.hello()
    await link.send_frame("HELLO", hello_fields(ctx.listener.role))
    return await expect_goaway(link, "PROTOCOL_ERROR")


@check("handshake.hello_ack_after_handshake", "§6.1")
async def _hello_ack_after(ctx: Ctx) -> str:
    link = await ctx.hello()
    ack = {
        "version": 1,
        "capabilities": 0,
        "initial_window": 65536,
        "max_frame": 1088,
        "max_chunk": 1024,
        "max_transfers": 1,
    }
    await link.send_frame("HELLO_ACK", ack)
    return await expect_goaway(link, "PROTOCOL_ERROR")


# ================================================================== frames §3, §5, §13
@check("frame.ping_pong", "§5.9")
async def _ping(ctx: Ctx) -> str:
    link = await ctx.hello()
    await expect_alive(link)
    return "PONG echoes the PING's opaque"


@check("frame.reserved_header", "§3")
async def _reserved_header(ctx: Ctx) -> str:
    link = await ctx.hello()
    head = wire.frame(wire.FRAME_TYPES["PING"], bytes(8), reserved=1)[: wire.HEADER_SIZE]
    await link.send(head)  # refused on the header: no body after it
    return await expect_goaway(link, "MALFORMED_FRAME")


@check("frame.reserved_flag_bits", "§3")
async def _reserved_flags(ctx: Ctx) -> str:
    """Flag bits 0-6 set on a PING: ignored, the PING is answered."""
    link = await ctx.hello()
    opaque = secrets.randbits(64)
    await link.send(wire.encode("PING", {"opaque": opaque}, flags=0x7F))
    pong = await expect_frame(link, lambda f: f.name == "PONG", "the PONG")
    if pong.fields["opaque"] != opaque:
        raise CheckFailed("PONG does not echo the PING")
    return "PONG"


@check("frame.type_zero", "§4")
async def _type_zero(ctx: Ctx) -> str:
    link = await ctx.hello()
    await link.send(wire.frame(0x00, b""))
    return await expect_goaway(link, "UNKNOWN_FRAME")


@check("frame.unknown_type", "§13")
async def _unknown_type(ctx: Ctx) -> str:
    """An unassigned type (0x7E) without FLAG_IGNORABLE after the handshake."""
    link = await ctx.hello()
    await link.send(wire.frame(0x7E, b"future"))
    return await expect_goaway(link, "UNKNOWN_FRAME")


@check("frame.unknown_type_ignorable", "§13")
async def _unknown_ignorable(ctx: Ctx) -> str:
    """Unknown types 0x7E and 0x11 (reserved, not yet assigned) with FLAG_IGNORABLE are
    skipped: the PING after them is answered."""
    link = await ctx.hello()
    await link.send(
        wire.frame(0x7E, b"future frame", wire.FLAG_IGNORABLE)
        + wire.frame(0x11, b"", wire.FLAG_IGNORABLE)
    )
    await expect_alive(link)
    return "skipped, PING answered"


@check("frame.ignorable_known_type", "§13")
async def _ignorable_known(ctx: Ctx) -> str:
    """FLAG_IGNORABLE on a known type: decoded anyway (a PING is still answered)."""
    link = await ctx.hello()
    opaque = secrets.randbits(64)
    await link.send(wire.encode("PING", {"opaque": opaque}, flags=wire.FLAG_IGNORABLE))
    pong = await expect_frame(link, lambda f: f.name == "PONG", "the PONG")
    if pong.fields["opaque"] != opaque:
        raise CheckFailed("PONG does not echo the PING")
    return "PONG"


@check("frame.bad_utf8", "§1")
async def _bad_utf8(ctx: Ctx) -> str:
    """An ABORT whose message is not UTF-8."""
    link = await ctx.hello()
    body = wire.encode_body("ABORT", {"transfer_id": 1, "code": 15})[:-2] + b"\x00\x02\xc3\x28"
    await link.send(wire.frame(wire.FRAME_TYPES["ABORT"], body))
    return await expect_goaway(link, "MALFORMED_FRAME")


@check("frame.oversized", "§3 §11")
async def _oversized(ctx: Ctx) -> str:
    """A header announcing max_frame + 1 body bytes after the handshake (header only)."""
    link = await ctx.hello()
    n = link.limits["max_frame"] + 1
    if n > 0xFFFFFFFF:
        raise CheckSkipped("max_frame is the u32 maximum")
    await link.send(wire.HEADER.pack(n, wire.FRAME_TYPES["PING"], 0, 0))
    return await expect_goaway(link, "FRAME_TOO_LARGE")


@check("frame.eof_between_frames", "§12")
async def _eof_between(ctx: Ctx) -> str:
    """EOF after a whole frame is a normal close: no error GOAWAY."""
    link = await ctx.hello()
    await link.send_frame("PING", {"opaque": 5})
    link.half_close()
    try:
        frames = await link.until_closed()
    except TimeoutError:
        raise CheckFailed("the target kept the connection open after EOF") from None
    bad = [f for f in frames if f.name == "GOAWAY" and f.fields["code"] != 0]
    if bad:
        raise CheckFailed(f"got {bad[0].describe()} for a clean EOF")
    return "closed cleanly"


@check("frame.goaway_closes", "§5.10")
async def _goaway_closes(ctx: Ctx) -> str:
    """GOAWAY(NO_ERROR) then a PING in one write (the kit keeps its side open): the target
    closes on receipt, and the PING after the GOAWAY is discarded (no PONG)."""
    link = await ctx.hello()
    goaway = wire.encode("GOAWAY", {"code": 0, "message": "conformance kit done"})
    await link.send(goaway + wire.encode("PING", {"opaque": 9}))
    try:
        frames = await link.until_closed()
    except TimeoutError:
        raise CheckFailed(
            "the target did not close the connection on receiving GOAWAY "
            f"(got {describe_all(link.received[-3:])})"
        ) from None
    bad = [
        f for f in frames
        if f.name == "PONG" or (f.name == "GOAWAY" and f.fields["code"] != 0)
    ]  # fmt: skip
    if bad:
        raise CheckFailed(f"sent {describe_all(bad)} after receiving GOAWAY")
    return "closed on receipt, nothing answered after it"


def _sample_bodies() -> dict[str, bytes]:
    """One valid body of every frame type (the bounds checks cut or extend them)."""
    meta = {
        "transfer_id": 7,
        "chunk_index": 0,
        "layer": 0,
        "offset": 0,
        "raw_length": 8,
        "checksum": 1,
        "codec": 0,
    }
    samples: dict[str, Fields] = {
        "HELLO": hello_fields(wire.ROLE_PEER),
        "HELLO_ACK": {
            "version": 1,
            "capabilities": 0,
            "initial_window": 65536,
            "max_frame": 1088,
            "max_chunk": 1024,
            "max_transfers": 1,
            "node_name": "x",
        },
        "OPEN": {
            "transfer_id": 7,
            "request_id": "conformance-bounds",
            "layers": [{"dtype": "uint8", "shape": [8], "nbytes": 8}],
            "chunk_size": 8,
            "token_ids": [1, 2],
        },
        "END": {"transfer_id": 7, "chunks_on_stripe": 1, "digest": 1},
        "COMPLETE": {"transfer_id": 7, "total_bytes": 8, "digest": 1},
        "CREDIT": {"increment": 1},
        "ABORT": {"transfer_id": 7, "code": 15, "message": "m"},
        "PING": {"opaque": 1},
        "PONG": {"opaque": 1},
        "GOAWAY": {"code": 0, "message": "m"},
        "HAVE": {"transfer_id": 7, "blocks": 0, "states": 0},
        "SUBSCRIBE": {"request_id": "conformance-bounds", "timeout_ms": 1},
        "SHM_ATTACH": {"size": 4096, "path": "/dev/shm/kvship-conformance"},
        "SHM_ATTACHED": {"size": 4096},
        "SHM_CHUNK": {"meta": meta, "arena_offset": 0},
        "LAYER_READY": {"transfer_id": 7, "layer": 0, "arena_offset": 0, "nbytes": 8},
        "RELEASE": {"arena_offset": 0, "length": 8},
    }
    return {name: wire.encode_body(name, fields) for name, fields in samples.items()}


SAMPLE_BODIES = _sample_bodies()


def _bounds_check(name: str) -> CheckFn:
    ftype = wire.FRAME_TYPES[name]
    body = SAMPLE_BODIES[name]

    async def run(ctx: Ctx) -> str:
        cases = [
            ("truncated", wire.frame(ftype, body[:-1]), False, "MALFORMED_FRAME"),
            ("extended", wire.frame(ftype, body + b"\x00"), False, "MALFORMED_FRAME"),
            (
                "eof inside",
                wire.frame(ftype, body)[: wire.HEADER_SIZE + 3],
                True,
                "MALFORMED_FRAME",
            ),
        ]
        done = []
        for case, data, eof, code in cases:
            link = await ctx.hello()
            await link.send(data)
            if eof:
                link.half_close()
            try:
                await expect_goaway(link, code)
            except CheckFailed as exc:
                raise CheckFailed(f"{case} {name}: {exc}") from None
            done.append(f"{case} → {code}")
        link = await ctx.hello()
        n = link.limits["max_frame"] + 1
        if n <= 0xFFFFFFFF:
            await link.send(wire.HEADER.pack(n, ftype, 0, 0))
            try:
                await expect_goaway(link, "FRAME_TOO_LARGE")
            except CheckFailed as exc:
                raise CheckFailed(f"oversized {name}: {exc}") from None
            done.append("oversized → FRAME_TOO_LARGE")
        return ", ".join(done)

    run.__doc__ = f"{name} one byte short, one byte long, cut by EOF, and above max_frame."
    return run


for _name in SAMPLE_BODIES:
    check(f"bounds.{_name}", "§3 §5 §11 §12")(_bounds_check(_name))


@check("bounds.CHUNK", "§5.4 §11 §12", "peer")
async def _bounds_chunk(ctx: Ctx) -> str:
    """CHUNK: header < 40 B; data one byte short / long of raw_length (refused on the
    ChunkMeta, before the data); EOF inside the data; above max_frame."""
    done = []
    link = await ctx.hello()
    await link.send(wire.HEADER.pack(39, wire.FRAME_TYPES["CHUNK"], 0, 0))
    try:
        await expect_goaway(link, "MALFORMED_FRAME")
    except CheckFailed as exc:
        raise CheckFailed(f"39-byte CHUNK header: {exc}") from None
    done.append("length 39 → MALFORMED_FRAME")
    for case, delta in (("truncated", -1), ("extended", 1)):
        link = await ctx.hello()
        t = Transfer([os.urandom(64)], 64)
        meta = wire.pack_chunk_meta(t.meta(0))
        header = wire.HEADER.pack(
            wire.CHUNK_META_SIZE + 64 + delta, wire.FRAME_TYPES["CHUNK"], 0, 0
        )
        await link.send(t.open() + header + meta)
        try:
            await expect_goaway(link, "MALFORMED_FRAME")
        except CheckFailed as exc:
            raise CheckFailed(f"{case} CHUNK data: {exc}") from None
        done.append(f"{case} data → MALFORMED_FRAME")
    link = await ctx.hello()
    t = Transfer([os.urandom(64)], 64)
    await link.send(t.open() + t.chunk(0)[: wire.HEADER_SIZE + wire.CHUNK_META_SIZE + 10])
    link.half_close()
    try:
        await expect_goaway(link, "MALFORMED_FRAME")
    except CheckFailed as exc:
        raise CheckFailed(f"EOF inside CHUNK data: {exc}") from None
    done.append("eof inside → MALFORMED_FRAME")
    link = await ctx.hello()
    await link.send(wire.HEADER.pack(link.limits["max_frame"] + 1, wire.FRAME_TYPES["CHUNK"], 0, 0))
    try:
        await expect_goaway(link, "FRAME_TOO_LARGE")
    except CheckFailed as exc:
        raise CheckFailed(f"oversized CHUNK: {exc}") from None
    done.append("oversized → FRAME_TOO_LARGE")
    return ", ".join(done)


# ====================================================================== OPEN meta §5.3
def _meta_check(name: str, meta: bytes, doc: str) -> None:
    async def run(ctx: Ctx) -> str:
        link = await ctx.peer()
        fields = small_transfer().open_fields(meta_raw=meta)
        await link.send_frame("OPEN", fields)
        return await expect_goaway(link, "MALFORMED_FRAME")

    run.__doc__ = doc
    check(f"open.{name}", "§5.3", "peer")(run)


_LAYER = (
    b'{"dtype":"uint8","shape":[3000],"nbytes":3000},{"dtype":"uint8","shape":[1000],"nbytes":1000}'
)
_meta_check(
    "meta_duplicate_key",
    b'{"request_id":"a","request_id":"b","layers":[' + _LAYER + b"]}",
    "meta with a duplicate key",
)
_meta_check(
    "meta_nan",
    b'{"request_id":"conformance-nan","layers":[' + _LAYER + b'],"extra":{"x":NaN}}',
    "meta with NaN (not JSON)",
)
_meta_check(
    "meta_lone_surrogate",
    b'{"request_id":"conf\\ud800","layers":[' + _LAYER + b"]}",
    "a request_id holding a lone surrogate",
)
_meta_check(
    "meta_bool_shape",
    b'{"request_id":"conformance-bool","layers":[{"dtype":"uint8","shape":[true],"nbytes":3000},'
    b'{"dtype":"uint8","shape":[1000],"nbytes":1000}]}',
    "a shape holding true (not an integer)",
)
_meta_check(
    "meta_not_object",
    b'["conformance"]',
    "meta that is a JSON array",
)
_meta_check(
    "meta_utf16",
    '{"request_id":"conformance-utf16","layers":[]}'.encode("utf-16"),
    "meta in UTF-16",
)


@check("open.meta_any_valid_form", "§5.3 §13", "peer")
async def _meta_any_form(ctx: Ctx) -> str:
    """Meta with whitespace, other key order and unknown keys (top level and per layer) is
    accepted: the transfer completes."""
    link = await ctx.peer()
    t = small_transfer()
    layers = ", ".join(
        f'{{ "future" : [1, 2], "nbytes" : {len(x)}, "shape" : [{len(x)}], "dtype" : "uint8" }}'
        for x in t.data
    )
    meta = (
        f'{{ "x-future" : {{"a": null}}, "layers" : [ {layers} ], '
        f'"request_id" : "{t.request_id}" }}'
    )
    return await send_whole(link, t, meta_raw=meta.encode())


@check("open.check_verified", "§5.5 §7.4", "peer")
async def _open_check(ctx: Ctx) -> str:
    """With CAP_OPEN_CHECK, END carries the low 32 bits of xxh3-64 of its stripe's OPEN
    body: the right value completes the transfer, a wrong one (an OPEN altered on the way)
    gets GOAWAY CHECKSUM_MISMATCH."""
    link = await ctx.peer(wire.BASE_CAPS | wire.CAP_OPEN_CHECK)
    need(link, wire.CAP_OPEN_CHECK, "CAP_OPEN_CHECK")
    t = small_transfer()
    await link.send(t.open())
    await push(link, t, range(t.n_chunks), wire.CODEC_RAW)
    await link.send(t.end(open_check=t.open_check()))
    await expect_complete(link, t)
    t2 = small_transfer()
    await link.send(t2.open())
    await push(link, t2, range(t2.n_chunks), wire.CODEC_RAW)
    await link.send(t2.end(open_check=t2.open_check() ^ 1))
    return "right check: COMPLETE; " + await expect_goaway(link, "CHECKSUM_MISMATCH")


@check("open.lying_total_bytes", "§5.3")
async def _lying_total(ctx: Ctx) -> str:
    """OPEN whose total_bytes is not the sum of its layers."""
    link = await ctx.hello()
    t = small_transfer()
    await link.send(t.open(total_bytes=t.total_bytes + 1, peer=ctx.target.unreachable))
    return await expect_goaway(link, "MALFORMED_FRAME")


# ================================================================= transfers §7, §8, §10
@check("transfer.complete", "§7.3 §7.4 §8", "peer")
async def _complete(ctx: Ctx) -> str:
    """OPEN + CHUNKs (out of order, a 0-byte layer included) + END: COMPLETE, same digest."""
    link = await ctx.peer()
    t = Transfer([os.urandom(5000), b"", os.urandom(4096), os.urandom(1)], 2048)
    await link.send(t.open())
    order = list(range(t.n_chunks))
    random.shuffle(order)
    await push(link, t, order)
    await link.send(t.end())
    return await expect_complete(link, t)


@check("transfer.empty", "§7.2 §8", "peer")
async def _empty(ctx: Ctx) -> str:
    """A transfer of only 0-byte layers: no chunk, digest of the empty string."""
    link = await ctx.peer()
    t = Transfer([b"", b""], 4096)
    await link.send(t.open())
    await link.send(t.end(0))
    return await expect_complete(link, t)


@check("transfer.digest_mismatch", "§7.4", "peer")
async def _digest_mismatch(ctx: Ctx) -> str:
    """END with the wrong digest: ABORT DIGEST_MISMATCH, the connection still serves."""
    link = await ctx.peer()
    t = small_transfer()
    await link.send(t.open())
    await push(link, t, range(t.n_chunks))
    await link.send(t.end(digest=t.digest ^ 1))
    await expect_abort(link, t.tid, "DIGEST_MISMATCH")
    await expect_alive(link)
    return "ABORT DIGEST_MISMATCH, connection kept"


@check("transfer.missing_chunks", "§7.4", "peer")
async def _missing_chunks(ctx: Ctx) -> str:
    """Every stripe ENDed (counting right) but a chunk never came: ABORT PROTOCOL_ERROR."""
    link = await ctx.peer()
    t = small_transfer()
    await link.send(t.open())
    await push(link, t, [0, 1])
    await link.send(t.end(chunks_on_stripe=2))
    await expect_abort(link, t.tid, "PROTOCOL_ERROR")
    return "ABORT PROTOCOL_ERROR"


@check("transfer.end_count_mismatch", "§5.5 §7.3", "peer")
async def _end_count(ctx: Ctx) -> str:
    link = await ctx.peer()
    t = small_transfer()
    await link.send(t.open())
    await push(link, t, range(t.n_chunks))
    await link.send(t.end(chunks_on_stripe=t.n_chunks + 1))
    return await expect_goaway(link, "PROTOCOL_ERROR")


@check("transfer.chunk_before_open", "§5.4 §7.3", "peer")
async def _chunk_before_open(ctx: Ctx) -> str:
    link = await ctx.peer()
    t = small_transfer()
    await link.send(t.chunk(0)[: wire.HEADER_SIZE + wire.CHUNK_META_SIZE])  # refused on its meta
    return await expect_goaway(link, "UNKNOWN_TRANSFER")


@check("transfer.chunk_after_end", "§7.3", "peer")
async def _chunk_after_end(ctx: Ctx) -> str:
    """A chunk of a transfer already ENDed on this connection: UNKNOWN_TRANSFER (only an
    ABORTed transfer's late chunks are dropped quietly)."""
    link = await ctx.peer()
    t = small_transfer()
    await send_whole(link, t)
    await link.send(t.chunk(0)[: wire.HEADER_SIZE + wire.CHUNK_META_SIZE])  # refused on its meta
    return await expect_goaway(link, "UNKNOWN_TRANSFER")


@check("transfer.end_before_open", "§5.5", "peer")
async def _end_before_open(ctx: Ctx) -> str:
    link = await ctx.peer()
    await link.send(small_transfer().end())
    return await expect_goaway(link, "UNKNOWN_TRANSFER")


@check("transfer.layout_mismatch", "§5.4 §7.2", "peer")
async def _layout_mismatch(ctx: Ctx) -> str:
    """Chunks outside the declared layout: wrong layer, wrong offset, wrong raw_length,
    index beyond n_chunks (each refused on its ChunkMeta, before its data)."""
    cases = {
        "wrong layer": {"layer": 1},
        "wrong offset": {"offset": 8},
        "wrong raw_length": {"raw_length": 100},
        "index beyond n_chunks": {"chunk_index": 3, "layer": 1},
    }
    for case, over in cases.items():
        link = await ctx.peer()
        t = small_transfer()
        meta = t.meta(0, **over)
        header = wire.HEADER.pack(
            wire.CHUNK_META_SIZE + meta["raw_length"], wire.FRAME_TYPES["CHUNK"], 0, 0
        )
        await link.send(t.open() + header + wire.pack_chunk_meta(meta))
        try:
            await expect_goaway(link, "LAYOUT_MISMATCH")
        except CheckFailed as exc:
            raise CheckFailed(f"{case}: {exc}") from None
    return "GOAWAY LAYOUT_MISMATCH for " + ", ".join(cases)


@check("transfer.duplicate_chunk", "§7.2", "peer")
async def _duplicate_chunk(ctx: Ctx) -> str:
    link = await ctx.peer()
    t = small_transfer()
    await link.send(t.open())
    await push(link, t, [0, 0])
    return await expect_goaway(link, "PROTOCOL_ERROR")


@check("transfer.request_already_arriving", "§12.1", "peer")
async def _request_arriving(ctx: Ctx) -> str:
    """A second OPEN (another transfer_id) for a request_id that is arriving: ABORT
    PROTOCOL_ERROR of that OPEN; the connection stays."""
    link = await ctx.peer()
    first = small_transfer()
    second = small_transfer(request_id=first.request_id)
    await link.send(first.open() + second.open())
    await expect_abort(link, second.tid, "PROTOCOL_ERROR")
    await expect_alive(link)
    return "ABORT PROTOCOL_ERROR, connection kept"


@check("transfer.duplicate_open", "§7.3", "peer")
async def _duplicate_open(ctx: Ctx) -> str:
    link = await ctx.peer()
    t = small_transfer()
    await link.send(t.open() + t.open())
    return await expect_goaway(link, "PROTOCOL_ERROR")


@check("transfer.chunk_size_above_max_chunk", "§7.3 §11", "peer")
async def _chunk_size_too_big(ctx: Ctx) -> str:
    link = await ctx.peer()
    max_chunk = link.limits["max_chunk"]
    if max_chunk >= 0xFFFFFFFF:
        raise CheckSkipped("max_chunk is the u32 maximum")
    t = Transfer([b"x"], max_chunk + 1)
    await link.send(t.open())
    return await expect_goaway(link, "FRAME_TOO_LARGE")


@check("transfer.too_many_chunks", "§7.3 §11", "peer")
async def _too_many_chunks(ctx: Ctx) -> str:
    """OPEN declaring MAX_CHUNKS + 1 chunks (chunk_size 1): TRANSFER_TOO_LARGE."""
    link = await ctx.peer()
    n = wire.MAX_CHUNKS + 1
    fields = {
        "transfer_id": new_tid(),
        "request_id": new_request_id(),
        "layers": [{"dtype": "uint8", "shape": [n], "nbytes": n}],
        "chunk_size": 1,
    }
    await link.send_frame("OPEN", fields)
    return await expect_goaway(link, "TRANSFER_TOO_LARGE")


@check("transfer.layer_above_staging", "§11 §12.1", "peer")
async def _layer_above_staging(ctx: Ctx) -> str:
    """OPEN with a layer far larger than any receiver stages (up to 1 TiB):
    ABORT TRANSFER_TOO_LARGE for that transfer, the connection still serves."""
    link = await ctx.peer()
    chunk = link.limits["max_chunk"]
    nbytes = min(1 << 40, wire.MAX_CHUNKS * chunk)
    tid = new_tid()
    fields = {
        "transfer_id": tid,
        "request_id": new_request_id(),
        "layers": [{"dtype": "uint8", "shape": [1024, nbytes // 1024], "nbytes": nbytes}],
        "chunk_size": chunk,
    }
    await link.send_frame("OPEN", fields)
    await expect_abort(link, tid, "TRANSFER_TOO_LARGE")
    await expect_alive(link)
    return f"ABORT TRANSFER_TOO_LARGE for a {nbytes} B layer, connection kept"


@check("transfer.too_many_transfers", "§7.3 §11", "peer")
async def _too_many_transfers(ctx: Ctx) -> str:
    """max_transfers + 1 OPENs on one connection: TOO_MANY_TRANSFERS."""
    link = await ctx.peer()
    n = link.limits["max_transfers"]
    if n > 10_000:
        raise CheckSkipped(f"max_transfers {n} is more than the kit opens")
    opens = b"".join(Transfer([b"x"], 1).open() for _ in range(n + 1))
    await link.send(opens)
    return f"{await expect_goaway(link, 'TOO_MANY_TRANSFERS')} at OPEN {n + 1}"


@check("transfer.striped_without_capability", "§7.3", "peer")
async def _striped_without_cap(ctx: Ctx) -> str:
    link = await ctx.peer(caps=0)
    t = small_transfer()
    await link.send(t.open(n_stripes=2, stripe=0))
    return await expect_goaway(link, "PROTOCOL_ERROR")


@check("transfer.checksum_mismatch", "§7.4 §8 §12.1", "peer")
async def _checksum_mismatch(ctx: Ctx) -> str:
    """A raw chunk whose bytes do not match its checksum: ABORT CHECKSUM_MISMATCH of that
    transfer only; the connection still serves (§7.4)."""
    link = await ctx.peer()
    t = small_transfer()
    await link.send(t.open() + t.chunk(0, checksum=t.checksums[0] ^ 0xFF))
    await expect_abort(link, t.tid, "CHECKSUM_MISMATCH")
    await expect_alive(link)
    return "ABORT CHECKSUM_MISMATCH, connection kept"


@check("transfer.sender_abort", "§5.8 §7.3 §10", "peer")
async def _sender_abort(ctx: Ctx) -> str:
    """The sender ABORTs (with an unknown code) after one chunk; a chunk already in flight
    is read, credited and dropped; the connection still serves; an ABORT of an unknown
    transfer is ignored."""
    link = await ctx.peer()
    t = small_transfer()
    await link.send(t.open() + t.chunk(0))
    await link.send_frame("ABORT", {"transfer_id": t.tid, "code": 999, "message": "kit aborts"})
    late = t.chunk(1)
    await link.send(late)
    await link.send_frame("ABORT", {"transfer_id": new_tid(), "code": 15, "message": "unknown"})
    await expect_alive(link)
    sent = len(t.raw(0)) + len(t.raw(1))
    if not await link.wait_credit(link.limits["initial_window"]):
        raise CheckFailed(
            f"{link.credit_received} B of CREDIT back for {sent} B of chunk data "
            "(§7.3/§10: dropped chunks are credited too)"
        )
    return f"late chunk dropped, {sent} B credited, connection kept"


@check("transfer.credit_returned", "§10", "peer", slow=2.0)
async def _credit_returned(ctx: Ctx) -> str:
    """Chunks worth more than the initial window (up to 32 MiB) go through on credit the
    receiver returns as it consumes them; COMPLETE follows."""
    link = await ctx.peer()
    window = link.limits["initial_window"]
    chunk = min(link.limits["max_chunk"], 1 * MIB)
    total = min(window + 2 * chunk, 32 * MIB)
    layers = [os.urandom(chunk) for _ in range(-(-total // chunk))]
    t = Transfer(layers, chunk)
    result = await send_whole(link, t)
    if not await link.wait_credit(window):
        raise CheckFailed(
            f"{link.credit_received} B of CREDIT for {t.total_bytes} B sent; the window did not "
            f"refill to {window} B"
        )
    return f"{t.total_bytes} B over a {window} B window, all credited back; {result}"


@check("transfer.chunk_beyond_credit", "§10", "peer", slow=4.0)
async def _beyond_credit(ctx: Ctx) -> str:
    """Fill the receiver until it stops granting credit (nobody claims the transfer, so its
    staging fills), then send a chunk the remaining window does not cover: FLOW_CONTROL."""
    link = await ctx.peer()
    chunk = min(link.limits["max_chunk"], 4 * MIB)
    n_layers = FLOW_BUDGET // chunk
    data = os.urandom(chunk)
    t = Transfer([data] * n_layers, chunk)
    await link.send(t.open())
    quiet = min(1.0, ctx.timeout / 2)  # no CREDIT for this long: the receiver stopped
    for i in range(t.n_chunks):
        if link.credit < chunk and not await link.wait_credit(chunk, quiet):
            if link.eof:
                raise CheckFailed(
                    f"the target closed after {i} chunks: {describe_all(link.received[-2:])}"
                )
            # The receiver stopped granting: this chunk goes beyond its window.
            await link.send(t.chunk(i)[: wire.HEADER_SIZE + wire.CHUNK_META_SIZE])
            code = await expect_goaway(link, "FLOW_CONTROL")
            return f"{code} after {i} chunks ({i * chunk // MIB} MiB) stalled the window"
        link.credit -= chunk
        await link.send(t.chunk(i))
    raise CheckSkipped(
        f"the receiver kept granting credit for {FLOW_BUDGET // MIB} MiB (it stages more than "
        "the kit sends)"
    )


@check("flow.credit_zero", "§5.7 §10", "any")
async def _credit_zero(ctx: Ctx) -> str:
    link = await ctx.hello()
    await link.send(wire.frame(wire.FRAME_TYPES["CREDIT"], bytes(4)))
    return await expect_goaway(link, "FLOW_CONTROL")


@check("flow.credit_overflow", "§10", "engine")
async def _credit_overflow(ctx: Ctx) -> str:
    """CREDIT taking the target's send window above 2^31-1."""
    link = await ctx.hello()
    await link.send_frame("CREDIT", {"increment": wire.MAX_WINDOW})
    return await expect_goaway(link, "FLOW_CONTROL")


@check("transfer.striping", "§7.5", "peer")
async def _striping(ctx: Ctx) -> str:
    """One transfer over 3 connections (chunk i on stripe i mod 3): COMPLETE on stripe 0."""
    links = [await ctx.peer() for _ in range(3)]
    for link in links:
        need(link, wire.CAP_STRIPING, "CAP_STRIPING")
    t = Transfer([os.urandom(10_000), os.urandom(7_000)], 1024)
    for s, link in enumerate(links):
        await link.send(t.open(n_stripes=3, stripe=s))
    for s, link in enumerate(links):
        await push(link, t, range(s, t.n_chunks, 3))
    for s, link in enumerate(links):
        await link.send(t.end(chunks_on_stripe=len(range(s, t.n_chunks, 3))))
    return await expect_complete(links[0], t) + " on stripe 0 of 3"


@check("transfer.striping_disagreement", "§7.5", "peer")
async def _striping_disagree(ctx: Ctx) -> str:
    """The same stripe opened twice on two connections: PROTOCOL_ERROR."""
    a, b = await ctx.peer(), await ctx.peer()
    need(a, wire.CAP_STRIPING, "CAP_STRIPING")
    t = small_transfer()
    await a.send(t.open(n_stripes=2, stripe=0))
    await expect_alive(a)
    await b.send(t.open(n_stripes=2, stripe=0))
    return await expect_goaway(b, "PROTOCOL_ERROR")


def _codec_check(codec: int, name: str) -> CheckFn:
    async def run(ctx: Ctx) -> str:
        link = await ctx.peer()
        need(link, wire.CAP_CODECS, "CAP_CODECS")
        rng = random.Random(codec)
        if codec == wire.CODEC_SPLIT16:
            t = Transfer([bf16_like(8192, rng), bf16_like(5001, rng)], 4096, dtype="bfloat16")
        else:
            t = Transfer([text_like(8192), text_like(5001)], 4096)
        return f"{name}: " + await send_whole(link, t, codec)

    run.__doc__ = f"Every chunk coded with {name} (§5.4.1 format): decoded, verified, COMPLETE."
    return run


check("codec.zstd", "§5.4 §5.4.1", "peer")(_codec_check(wire.CODEC_ZSTD, "zstd"))
check("codec.split16", "§5.4 §5.4.1", "peer")(_codec_check(wire.CODEC_SPLIT16, "split16"))


@check("codec.not_negotiated", "§5.4", "peer")
async def _codec_not_negotiated(ctx: Ctx) -> str:
    """A zstd chunk on a connection whose HELLO offered no CAP_CODECS."""
    link = await ctx.peer(caps=0)
    t = Transfer([text_like(4096)], 4096)
    chunk = t.chunk(0, wire.CODEC_ZSTD)
    await link.send(t.open() + chunk[: wire.HEADER_SIZE + wire.CHUNK_META_SIZE])  # its meta
    return await expect_goaway(link, "UNSUPPORTED_CODEC")


@check("codec.unknown", "§5.4 §13", "peer")
async def _codec_unknown(ctx: Ctx) -> str:
    """codec 7 (reserved): UNSUPPORTED_CODEC, refused on the ChunkMeta."""
    link = await ctx.peer()
    t = Transfer([text_like(4096)], 4096)
    meta = wire.pack_chunk_meta(t.meta(0, codec=7))
    header = wire.HEADER.pack(wire.CHUNK_META_SIZE + 100, wire.FRAME_TYPES["CHUNK"], 0, 0)
    await link.send(t.open() + header + meta)
    return await expect_goaway(link, "UNSUPPORTED_CODEC")


@check("codec.not_smaller", "§5.4", "peer")
async def _codec_not_smaller(ctx: Ctx) -> str:
    """A codec-1 chunk whose data is not shorter than raw_length: MALFORMED_FRAME."""
    link = await ctx.peer()
    need(link, wire.CAP_CODECS, "CAP_CODECS")
    t = Transfer([os.urandom(256)], 256)
    meta = wire.pack_chunk_meta(t.meta(0, codec=wire.CODEC_ZSTD))
    header = wire.HEADER.pack(wire.CHUNK_META_SIZE + 256, wire.FRAME_TYPES["CHUNK"], 0, 0)
    await link.send(t.open() + header + meta)
    return await expect_goaway(link, "MALFORMED_FRAME")


@check("codec.zstd_checksum_mismatch", "§7.4 §8", "peer")
async def _codec_checksum(ctx: Ctx) -> str:
    """A zstd chunk that decodes, but not to its checksum: ABORT CHECKSUM_MISMATCH of that
    transfer only; the connection still serves (§7.4)."""
    link = await ctx.peer()
    need(link, wire.CAP_CODECS, "CAP_CODECS")
    t = Transfer([text_like(4096)], 4096)
    await link.send(t.open() + t.chunk(0, wire.CODEC_ZSTD, checksum=t.checksums[0] ^ 1))
    await expect_abort(link, t.tid, "CHECKSUM_MISMATCH")
    await expect_alive(link)
    return "ABORT CHECKSUM_MISMATCH, connection kept"


@check("codec.zstd_without_content_size", "§5.4.1", "peer")
async def _codec_no_size(ctx: Ctx) -> str:
    """A zstd frame whose header does not carry the content size: the chunk does not
    decode, ABORT + GOAWAY MALFORMED_FRAME."""
    link = await ctx.peer()
    need(link, wire.CAP_CODECS, "CAP_CODECS")
    t = Transfer([text_like(4096)], 4096)
    data = payload.zstd_frame(t.raw(0), content_size=False)
    chunk = wire.encode("CHUNK", {"meta": t.meta(0, codec=wire.CODEC_ZSTD), "data": data})
    await link.send(t.open() + chunk)
    return await expect_abort_and_goaway(link, t.tid, "MALFORMED_FRAME")


# ============================================================================ dedup §7.6
DEDUP_MODEL: Fields = {
    "name": "conformance-tiny",
    "model_id": "kvship-conformance/tiny-hybrid",
    "tp_rank": 0,
    "layers": [
        {"kind": "full", "block_tokens": 16, "kv_heads": 1, "head_dim": 8, "dtype": "bfloat16",
         "repeat": 2},
        {"kind": "linear", "shapes": [[4, 8], [6]], "dtype": "bfloat16", "repeat": 1},
    ],
}  # fmt: skip


def dedup_transfer(
    keys: Callable[[list[bytes]], list[bytes]] | None = None, chunk_blocks: int = 1
) -> Transfer:
    """A transfer of DEDUP_MODEL for 40 fresh random tokens (2 full blocks + a tail), with
    its manifest (``keys`` may tamper with the key list), in chunks of ``chunk_blocks``
    blocks."""
    tokens = [secrets.randbits(32) for _ in range(40)]
    block_keys = payload.block_keys(DEDUP_MODEL, 0, tokens)
    if keys is not None:
        block_keys = keys(block_keys)
    sizes = payload.layer_nbytes(DEDUP_MODEL, len(tokens))
    rng = random.Random()
    bb = payload.block_bytes(payload.expand_layers(DEDUP_MODEL)[0])
    extra = {"dedup": payload.manifest(DEDUP_MODEL, 0, block_keys)}
    layers = [bf16_like(n, rng) for n in sizes]
    return Transfer(layers, chunk_blocks * bb, dtype="bfloat16", token_ids=tokens, extra=extra)


@check("dedup.have", "§7.6", "peer")
async def _dedup_have(ctx: Ctx) -> str:
    """OPEN with a valid manifest of a fresh prompt: HAVE(blocks 0, states 0), then the
    whole transfer completes."""
    link = await ctx.peer()
    need(link, wire.CAP_DEDUP, "CAP_DEDUP")
    t = dedup_transfer()
    await link.send(t.open())

    def have(f: Frame) -> bool:
        return f.name in ("HAVE", "ABORT") and f.fields["transfer_id"] == t.tid

    frame = await expect_frame(link, have, "HAVE")
    if frame.name != "HAVE":
        raise CheckFailed(f"got {frame.describe()} instead of HAVE")
    if frame.fields["blocks"] or frame.fields["states"]:
        raise CheckFailed(f"HAVE {frame.fields} for a prompt no one sent before")
    await push(link, t, range(t.n_chunks))
    await link.send(t.end())
    return "HAVE(0, 0); " + await expect_complete(link, t)


def _lying_keys(keys: list[bytes]) -> list[bytes]:
    return [keys[0], bytes(16)]


@check("dedup.keys_lie", "§7.6", "peer")
async def _dedup_lie(ctx: Ctx) -> str:
    """A manifest whose second key is not the chain over the token ids: ABORT
    LAYOUT_MISMATCH."""
    link = await ctx.peer()
    need(link, wire.CAP_DEDUP, "CAP_DEDUP")
    t = dedup_transfer(_lying_keys)
    await link.send(t.open())
    await expect_abort(link, t.tid, "LAYOUT_MISMATCH")
    return "ABORT LAYOUT_MISMATCH"


@check("dedup.key_count", "§7.6", "peer")
async def _dedup_count(ctx: Ctx) -> str:
    """A manifest with one key fewer than ⌊tokens / block_tokens⌋: ABORT LAYOUT_MISMATCH."""
    link = await ctx.peer()
    need(link, wire.CAP_DEDUP, "CAP_DEDUP")
    t = dedup_transfer(lambda keys: keys[:-1])
    await link.send(t.open())
    await expect_abort(link, t.tid, "LAYOUT_MISMATCH")
    return "ABORT LAYOUT_MISMATCH"


@check("dedup.unknown_layout_key", "§7.6.1", "peer")
async def _dedup_unknown_key(ctx: Ctx) -> str:
    """A layer group with a key §7.6.1 does not list: refused, ABORT LAYOUT_MISMATCH."""
    link = await ctx.peer()
    need(link, wire.CAP_DEDUP, "CAP_DEDUP")
    t = dedup_transfer()
    t.extra["dedup"]["model"] = json.loads(json.dumps(DEDUP_MODEL))
    t.extra["dedup"]["model"]["layers"][0]["sliding_window"] = 4096
    await link.send(t.open())
    await expect_abort(link, t.tid, "LAYOUT_MISMATCH")
    return "ABORT LAYOUT_MISMATCH"


@check("dedup.without_capability", "§7.6.5", "peer")
async def _dedup_without_cap(ctx: Ctx) -> str:
    """Without CAP_DEDUP a manifest (here with lying keys) is opaque extra: no HAVE, no
    check, the transfer completes."""
    link = await ctx.peer(caps=wire.CAP_STRIPING)
    t = dedup_transfer(_lying_keys)
    result = await send_whole(link, t)
    haves = [f for f in link.received if f.name == "HAVE"]
    if haves:
        raise CheckFailed(f"HAVE {haves[0].fields} on a connection without CAP_DEDUP")
    return "no HAVE; " + result


@check("dedup.geometry", "§7.6", "peer")
async def _dedup_geometry(ctx: Ctx) -> str:
    """A manifest whose layers do not have the model's sizes: ABORT LAYOUT_MISMATCH."""
    link = await ctx.peer()
    need(link, wire.CAP_DEDUP, "CAP_DEDUP")
    t = dedup_transfer()
    t = Transfer(
        [t.data[0] + bytes(512), *t.data[1:]],
        t.chunk_size,
        dtype="bfloat16",
        token_ids=t.token_ids,
        extra=t.extra,
    )
    await link.send(t.open())
    await expect_abort(link, t.tid, "LAYOUT_MISMATCH")
    return "ABORT LAYOUT_MISMATCH"


# ======================================================================= roles §4.1
def _role_frames() -> dict[str, bytes]:
    """A valid instance of each frame, for the role checks."""
    return {name: wire.frame(wire.FRAME_TYPES[name], body) for name, body in SAMPLE_BODIES.items()}


# (listener kind, frame): what the kit, as that connection's initiator, may not send (§4.1).
# (CREDIT is allowed from either side of every connection, §4.1.) SHM_CHUNK on a peer
# connection goes after an OPEN, so only the role can refuse it.
ROLE_REFUSALS = {
    "peer": (
        "COMPLETE", "HAVE", "SUBSCRIBE", "SHM_ATTACH", "SHM_ATTACHED", "SHM_CHUNK",
        "LAYER_READY", "RELEASE",
    ),
    "engine": ("COMPLETE", "HAVE", "SHM_ATTACHED", "LAYER_READY"),
}  # fmt: skip


def _role_check(kind: str, name: str) -> CheckFn:
    async def run(ctx: Ctx) -> str:
        link = await ctx.hello()
        t = Transfer([os.urandom(64)], 64)
        fields: Fields = {
            "COMPLETE": {"transfer_id": t.tid, "total_bytes": t.total_bytes, "digest": t.digest},
            "HAVE": {"transfer_id": t.tid, "blocks": 0, "states": 0},
            "SHM_CHUNK": {"meta": t.meta(0), "arena_offset": 0},
            "LAYER_READY": {"transfer_id": t.tid, "layer": 0, "arena_offset": 0, "nbytes": 0},
        }
        if name in fields:
            opened = t.open(peer=ctx.target.unreachable) if kind == "engine" else t.open()
            frame = opened + wire.encode(name, fields[name])
        else:
            frame = _role_frames()[name]
        await link.send(frame)
        return await expect_goaway(link, "PROTOCOL_ERROR")

    who = "the transfer's sender (initiator)" if kind == "peer" else "the engine"
    run.__doc__ = f"{name} from {who} on {kind} connection: GOAWAY PROTOCOL_ERROR."
    return run


for _kind, _frames in ROLE_REFUSALS.items():
    for _name in _frames:
        _side = "from_sender" if _kind == "peer" else "from_engine"
        check(f"roles.{_name.lower()}_{_side}", "§4.1", _kind)(_role_check(_kind, _name))


# ======================================================================== engine API §9
@check("engine.subscribe_not_found", "§9.3", "engine")
async def _subscribe_not_found(ctx: Ctx) -> str:
    """SUBSCRIBE to a request nobody sends, 300 ms: ABORT NOT_FOUND with transfer_id 0."""
    link = await ctx.hello()
    request_id = new_request_id()
    await link.send_frame("SUBSCRIBE", {"request_id": request_id, "timeout_ms": 300})
    frame = await expect_frame(link, lambda f: f.name in ("ABORT", "OPEN"), "ABORT NOT_FOUND")
    if frame.name != "ABORT" or wire.error_name(frame.fields["code"]) != "NOT_FOUND":
        raise CheckFailed(f"got {frame.describe()}, expected ABORT NOT_FOUND")
    if frame.fields["transfer_id"] != 0:
        raise CheckFailed(
            f"ABORT NOT_FOUND carries transfer_id {frame.fields['transfer_id']}, not 0"
        )
    if request_id not in frame.fields["message"]:
        raise CheckFailed(f"the NOT_FOUND message does not name the request: {frame.describe()}")
    await expect_alive(link)
    return "ABORT NOT_FOUND, transfer_id 0"


@check("engine.open_without_peer", "§9.1 §12.1", "engine")
async def _open_without_peer(ctx: Ctx) -> str:
    link = await ctx.hello()
    t = small_transfer()
    await link.send(t.open())
    await expect_abort(link, t.tid, "PROTOCOL_ERROR")
    return "ABORT PROTOCOL_ERROR"


@check("engine.peer_unreachable", "§9.1 §12.1", "engine")
async def _peer_unreachable(ctx: Ctx) -> str:
    """A send to a destination nothing answers on: ABORT PEER_UNREACHABLE."""
    link = await ctx.hello()
    t = small_transfer()
    await link.send(t.open(peer=ctx.target.unreachable))
    await push(link, t, range(t.n_chunks))
    await link.send(t.end())
    await expect_abort(link, t.tid, "PEER_UNREACHABLE")
    return f"ABORT PEER_UNREACHABLE ({ctx.target.unreachable})"


def _engine_send_peer(ctx: Ctx) -> str:
    if not ctx.target.peer:
        raise CheckSkipped("needs --peer (a destination the daemon can reach)")
    return ctx.target.peer


@check("engine.checksum_mismatch", "§7.4 §12.1", "engine")
async def _engine_checksum(ctx: Ctx) -> str:
    """An engine chunk whose bytes do not match its checksum: ABORT CHECKSUM_MISMATCH of
    that transfer only; the engine connection stays up (no GOAWAY on the engine hop)."""
    peer = _engine_send_peer(ctx)
    link = await ctx.hello()
    t = small_transfer()
    lie = t.checksums[0] ^ 1
    await link.send(t.open(peer=peer) + t.chunk(0, checksum=lie))
    await push(link, t, range(1, t.n_chunks))
    await link.send(t.end(digest=wire.digest([lie, *t.checksums[1:]])))  # the claimed ones
    await expect_abort(link, t.tid, "CHECKSUM_MISMATCH")
    await expect_alive(link)
    return "ABORT CHECKSUM_MISMATCH, connection kept"


@check("engine.digest_mismatch", "§9.1 §12.1", "engine")
async def _engine_digest(ctx: Ctx) -> str:
    peer = _engine_send_peer(ctx)
    link = await ctx.hello()
    t = small_transfer()
    await link.send(t.open(peer=peer))
    await push(link, t, range(t.n_chunks))
    await link.send(t.end(digest=t.digest ^ 1))
    await expect_abort(link, t.tid, "DIGEST_MISMATCH")
    return "ABORT DIGEST_MISMATCH"


@check("engine.end_before_all_chunks", "§9.1 §12.1", "engine")
async def _engine_early_end(ctx: Ctx) -> str:
    peer = _engine_send_peer(ctx)
    link = await ctx.hello()
    t = small_transfer()
    await link.send(t.open(peer=peer))
    await push(link, t, [0])
    await link.send(t.end(chunks_on_stripe=1))
    await expect_abort(link, t.tid, "PROTOCOL_ERROR")
    return "ABORT PROTOCOL_ERROR"


@check("engine.duplicate_chunk", "§7.2 §12.1", "engine")
async def _engine_duplicate(ctx: Ctx) -> str:
    """An engine put sends chunk 0 twice: ABORT PROTOCOL_ERROR of that transfer."""
    peer = _engine_send_peer(ctx)
    link = await ctx.hello()
    t = small_transfer()
    await link.send(t.open(peer=peer))
    await push(link, t, [0, 0])
    await expect_abort(link, t.tid, "PROTOCOL_ERROR")
    return "ABORT PROTOCOL_ERROR"


@check("engine.cancel", "§9.1", "engine")
async def _engine_cancel(ctx: Ctx) -> str:
    """The engine ABORTs its put: the daemon sends nothing more for it; the connection goes
    on (PING answered)."""
    peer = _engine_send_peer(ctx)
    link = await ctx.hello()
    t = small_transfer()
    await link.send(t.open(peer=peer) + t.chunk(0))
    await link.send_frame("ABORT", {"transfer_id": t.tid, "code": 15, "message": "kit cancels"})
    await expect_alive(link)
    await asyncio.sleep(min(0.3, ctx.timeout / 4))
    await expect_alive(link)
    about = [
        f for f in link.received
        if f.name in ("COMPLETE", "ABORT") and f.fields["transfer_id"] == t.tid
    ]  # fmt: skip
    if about:
        raise CheckFailed(f"after the engine's ABORT the daemon sent {describe_all(about)}")
    return "nothing more for the transfer, connection kept"


@check("engine.release_never_handed_out", "§9.2", "engine")
async def _release_unknown(ctx: Ctx) -> str:
    link = await ctx.hello()
    await link.send_frame("RELEASE", {"arena_offset": 4096, "length": 4096})
    return await expect_goaway(link, "PROTOCOL_ERROR")


@check("engine.shm_attach_without_cap", "§9.2", "engine_tcp")
async def _attach_without_cap(ctx: Ctx) -> str:
    """SHM_ATTACH on a connection without CAP_SHM (TCP)."""
    link = await ctx.hello()
    if link.has(wire.CAP_SHM):
        raise CheckFailed("CAP_SHM negotiated on a TCP listener")
    await link.send_frame("SHM_ATTACH", {"size": 1 * MIB, "path": "/dev/shm/kvship-conformance"})
    return await expect_goaway(link, "PROTOCOL_ERROR")


class ShmArena:
    """An arena file the kit creates (the engine's side of §9.2)."""

    def __init__(self, size: int, directory: str = "/dev/shm", prefix: str = "kvship-") -> None:
        fd, self.path = tempfile.mkstemp(prefix=f"{prefix}conformance-", dir=directory)
        try:
            os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.size = size

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with contextlib.suppress(BufferError, ValueError):
            self.map.close()


def _arena(ctx: Ctx, size: int, directory: str = "/dev/shm", prefix: str = "kvship-") -> ShmArena:
    try:
        arena = ShmArena(size, directory, prefix)
    except OSError as exc:
        raise CheckSkipped(f"cannot create an arena in {directory}: {exc}") from None
    ctx.cleanup.append(arena.close)
    return arena


@check("engine.shm_attach_outside_dev_shm", "§5.12 §9.2 §12.1", "engine_unix")
async def _attach_outside(ctx: Ctx) -> str:
    """SHM_ATTACH of a real, mappable file outside /dev/shm/kvship-*: PROTOCOL_ERROR."""
    link = await ctx.hello()
    need(link, wire.CAP_SHM, "CAP_SHM")
    arena = _arena(ctx, 64 * KIB, tempfile.gettempdir())
    await link.send_frame("SHM_ATTACH", {"size": arena.size, "path": arena.path})
    return await expect_goaway(link, "PROTOCOL_ERROR")


@check("engine.shm_attach_path_rules", "§5.12 §9.2", "engine_unix")
async def _attach_rules(ctx: Ctx) -> str:
    """SHM_ATTACH refused (PROTOCOL_ERROR) for: a size other than the file's, a /dev/shm
    file not named kvship-*, a /dev/shm/kvship-* symlink to a file outside /dev/shm."""
    outside = _arena(ctx, 64 * KIB, tempfile.gettempdir())
    link_path = f"/dev/shm/kvship-conformance-link-{secrets.token_hex(4)}"
    try:
        os.symlink(outside.path, link_path)
    except OSError as exc:
        raise CheckSkipped(f"cannot create {link_path}: {exc}") from None
    ctx.cleanup.append(lambda: os.unlink(link_path))
    good = _arena(ctx, 64 * KIB)
    cases = {
        "size other than the file's": (good.path, 2 * good.size),
        "not named kvship-*": (_arena(ctx, 64 * KIB, prefix="").path, 64 * KIB),
        "symlink out of /dev/shm": (link_path, outside.size),
    }
    for case, (path, size) in cases.items():
        link = await ctx.hello()
        need(link, wire.CAP_SHM, "CAP_SHM")
        await link.send_frame("SHM_ATTACH", {"size": size, "path": path})
        try:
            await expect_goaway(link, "PROTOCOL_ERROR")
        except CheckFailed as exc:
            raise CheckFailed(f"{case}: {exc}") from None
    return "GOAWAY PROTOCOL_ERROR for " + ", ".join(cases)


@check("engine.shm_chunk_before_attach", "§9.2", "engine_unix")
async def _shm_chunk_before_attach(ctx: Ctx) -> str:
    link = await ctx.hello()
    need(link, wire.CAP_SHM, "CAP_SHM")
    t = small_transfer()
    shm_chunk = wire.encode("SHM_CHUNK", {"meta": t.meta(0), "arena_offset": 0})
    await link.send(t.open(peer=ctx.target.peer or ctx.target.unreachable) + shm_chunk)
    return await expect_goaway(link, "PROTOCOL_ERROR")


@check("engine.shm_chunk_outside_arena", "§9.2 §12.1", "engine_unix")
async def _shm_chunk_outside(ctx: Ctx) -> str:
    """SHM_CHUNK naming a region past the end of the attached arena: PROTOCOL_ERROR."""
    link = await ctx.hello()
    need(link, wire.CAP_SHM, "CAP_SHM")
    arena = _arena(ctx, 64 * KIB)
    await link.send_frame("SHM_ATTACH", {"size": arena.size, "path": arena.path})
    await expect_frame(link, lambda f: f.name == "SHM_ATTACHED", "SHM_ATTACHED")
    t = small_transfer()
    shm_chunk = wire.encode("SHM_CHUNK", {"meta": t.meta(0), "arena_offset": arena.size - 16})
    await link.send(t.open(peer=ctx.target.peer or ctx.target.unreachable) + shm_chunk)
    return await expect_goaway(link, "PROTOCOL_ERROR")


@check("engine.shm_attach_twice", "§9.2", "engine_unix")
async def _attach_twice(ctx: Ctx) -> str:
    link = await ctx.hello()
    need(link, wire.CAP_SHM, "CAP_SHM")
    arena = _arena(ctx, 1 * MIB)
    await link.send_frame("SHM_ATTACH", {"size": arena.size, "path": arena.path})
    frame = await expect_frame(link, lambda f: f.name == "SHM_ATTACHED", "SHM_ATTACHED")
    if frame.fields["size"] != arena.size:
        raise CheckFailed(f"SHM_ATTACHED size {frame.fields['size']}, attached {arena.size}")
    await link.send_frame("SHM_ATTACH", {"size": arena.size, "path": arena.path})
    return "SHM_ATTACHED, then " + await expect_goaway(link, "PROTOCOL_ERROR")


# ===================================================================== round trips §9.3
async def _receive(
    ctx: Ctx, link: Link, t: Transfer, arena: ShmArena | None
) -> tuple[str, list[str]]:
    """Read a SUBSCRIBE's delivery of ``t`` on ``link``: OPEN, the layers (CHUNK frames or
    LAYER_READY), COMPLETE; every byte and the digest checked. Returns a summary and the
    problems found."""
    problems: list[str] = []
    opened = await expect_frame(link, lambda f: f.name in ("OPEN", "ABORT"), "the OPEN")
    if opened.name != "OPEN":
        raise CheckFailed(f"got {opened.describe()} instead of the delivery's OPEN")
    o = opened.fields
    tid = o["transfer_id"]
    if o["request_id"] != t.request_id:
        problems.append(f"OPEN request_id {o['request_id']!r}")
    if [x["nbytes"] for x in o["layers"]] != [len(x) for x in t.data]:
        problems.append(f"OPEN layers {o['layers']}")
    if o["token_ids"] != t.token_ids:
        problems.append("OPEN token_ids differ")
    if o["extra"] != t.extra:
        problems.append(f"OPEN extra {o['extra']} != {t.extra}")
    if o["priority"] != t.priority:
        problems.append(f"OPEN priority {o['priority']}, the sender's was {t.priority} (§9.3)")
    if o["n_stripes"] != 1:
        problems.append(f"OPEN n_stripes {o['n_stripes']} (§9.3: 1)")
    got = [bytearray(len(x)) for x in t.data]
    starts = wire.chunk_table([len(x) for x in t.data], o["chunk_size"])
    checksums = [0] * starts[-1]
    inline = by_ref = 0
    end: Fields | None = None
    while True:
        frame = await expect_frame(
            link,
            lambda f: f.name in ("CHUNK", "LAYER_READY", "COMPLETE", "ABORT", "END"),
            "COMPLETE",
        )
        if frame.fields.get("transfer_id", frame.fields.get("meta", {}).get("transfer_id")) != tid:
            problems.append(f"{frame.describe()} for transfer {tid:#x}?")
            continue
        if frame.name == "CHUNK":
            m, data = frame.fields["meta"], frame.fields["data"]
            if m["codec"] != wire.CODEC_RAW:
                data = payload.decode_chunk(data, m["codec"], m["raw_length"])
            if wire.checksum(data) != m["checksum"]:
                problems.append(f"chunk {m['chunk_index']} checksum")
            got[m["layer"]][m["offset"] : m["offset"] + len(data)] = data
            if 0 <= m["chunk_index"] < len(checksums):
                checksums[m["chunk_index"]] = m["checksum"]
            await link.send_frame("CREDIT", {"increment": len(frame.fields["data"])})
            inline += 1
        elif frame.name == "LAYER_READY":
            f = frame.fields
            layer, off, n = f["layer"], f["arena_offset"], f["nbytes"]
            if arena is None and (n or off):
                # A 0-byte layer's LAYER_READY(0, 0) needs no arena (the reference sends one).
                problems.append("LAYER_READY without an arena")
                continue
            if n != len(t.data[layer]):
                problems.append(f"LAYER_READY layer {layer} of {n} B")
                continue
            if n:
                assert arena is not None
                got[layer][:] = arena.map[off : off + n]
            for index in range(starts[layer], starts[layer + 1]):
                start = (index - starts[layer]) * o["chunk_size"]
                checksums[index] = wire.checksum(got[layer][start : start + o["chunk_size"]])
            if n:
                await link.send_frame("RELEASE", {"arena_offset": off, "length": n})
            by_ref += 1
        elif frame.name == "END":
            end = frame.fields
        elif frame.name == "ABORT":
            raise CheckFailed(f"delivery ended with {frame.describe()}")
        else:
            c = frame.fields
            if end is None:
                problems.append("COMPLETE without END before it (§9.3 step 4)")
            elif end["chunks_on_stripe"] != inline or end["digest"] != c["digest"]:
                problems.append(
                    f"END says {end['chunks_on_stripe']} chunks, digest {end['digest']:#x}; "
                    f"{inline} inline chunks came, COMPLETE's digest is {c['digest']:#x}"
                )
            if c["total_bytes"] != t.total_bytes:
                problems.append(f"COMPLETE total_bytes {c['total_bytes']}")
            if c["digest"] != wire.digest(checksums):
                problems.append("COMPLETE digest is not the digest of the delivered chunks")
            if o["chunk_size"] == t.chunk_size and c["digest"] != t.digest:
                problems.append("COMPLETE digest differs from the sender's")
            break
    for i, data in enumerate(t.data):
        if bytes(got[i]) != data:
            problems.append(f"layer {i} bytes differ")
    return f"{inline} inline chunks, {by_ref} LAYER_READY", problems


async def _subscribe(ctx: Ctx, t: Transfer) -> tuple[Link, ShmArena | None]:
    link = await ctx.hello()
    arena = None
    if ctx.listener.unix and link.has(wire.CAP_SHM):
        arena = _arena(ctx, 4 * MIB)
        await link.send_frame("SHM_ATTACH", {"size": arena.size, "path": arena.path})
        await expect_frame(link, lambda f: f.name == "SHM_ATTACHED", "SHM_ATTACHED")
    timeout_ms = int(ctx.timeout * 1000)
    await link.send_frame("SUBSCRIBE", {"request_id": t.request_id, "timeout_ms": timeout_ms})
    await expect_alive(link)  # the SUBSCRIBE is in before the transfer starts
    return link, arena


def _roundtrip_transfer() -> Transfer:
    rng = random.Random()
    return Transfer(
        [rng.randbytes(70_000), b"", rng.randbytes(4096), rng.randbytes(33)],
        16 * KIB,
        token_ids=[rng.randrange(2**32) for _ in range(21)],
        extra={"conformance": {"kit": True, "n": 1}},
        priority=1,
    )


@check("roundtrip.peer_to_engine", "§7 §9.3", "engine", slow=2.0)
async def _roundtrip(ctx: Ctx) -> str:
    """The kit sends a transfer to --peer as a daemon and receives it on this engine
    listener with SUBSCRIBE (LAYER_READY with an arena on a Unix socket, CHUNKs inline over
    TCP): every byte and the digest match."""
    if not ctx.target.peer:
        raise CheckSkipped("needs --peer of the same daemon")
    t = _roundtrip_transfer()
    engine, arena = await _subscribe(ctx, t)
    peer = await ctx.peer()
    sent = await send_whole(peer, t)
    summary, problems = await _receive(ctx, engine, t, arena)
    if problems:
        raise CheckFailed("; ".join(problems))
    return f"{sent}; delivered: {summary}"


@check("roundtrip.engine_put", "§9.1 §9.3", "engine", slow=2.0)
async def _engine_put(ctx: Ctx) -> str:
    """An engine put (OPEN with peer = --peer, inline CHUNKs, END) on this listener reaches
    the daemon behind --peer, and a SUBSCRIBE here receives it: COMPLETE on both."""
    if not ctx.target.peer:
        raise CheckSkipped("needs --peer of the same daemon")
    t = _roundtrip_transfer()
    receiver, arena = await _subscribe(ctx, t)
    sender = await ctx.hello()
    sent = await send_whole(sender, t, peer=ctx.target.peer)
    summary, problems = await _receive(ctx, receiver, t, arena)
    if problems:
        raise CheckFailed("; ".join(problems))
    return f"sender: {sent}; delivered: {summary}"


def skipped_chunks(t: Transfer, model: Fields, blocks: int, states: bool) -> set[int]:
    """§7.6.5 "skip": the chunks the sender leaves out after HAVE(blocks, states)."""
    starts = wire.chunk_table([len(x) for x in t.data], t.chunk_size)
    skip: set[int] = set()
    for i, layer in enumerate(payload.expand_layers(model)):
        n = starts[i + 1] - starts[i]
        if layer["kind"] == "full":
            k = min(n, blocks * payload.block_bytes(layer) // t.chunk_size)
        else:
            k = n if states else 0
        skip.update(range(starts[i], starts[i] + k))
    return skip


async def _send_dedup(link: Link, t: Transfer) -> tuple[Fields, str]:
    """OPEN with the manifest, wait for HAVE, send what it does not skip, END: COMPLETE
    with the peer hop's digest (skipped slots 0)."""
    await link.send(t.open())

    def have(f: Frame) -> bool:
        return f.name in ("HAVE", "ABORT") and f.fields["transfer_id"] == t.tid

    frame = await expect_frame(link, have, "HAVE")
    if frame.name != "HAVE":
        raise CheckFailed(f"got {frame.describe()} instead of HAVE")
    skip = skipped_chunks(
        t, t.extra["dedup"]["model"], frame.fields["blocks"], frame.fields["states"]
    )
    sent = [i for i in range(t.n_chunks) if i not in skip]
    await push(link, t, sent)
    digest = wire.digest([0 if i in skip else c for i, c in enumerate(t.checksums)])
    await link.send(t.end(chunks_on_stripe=len(sent), digest=digest))
    return frame.fields, await expect_complete(link, t, digest)


@check("roundtrip.dedup", "§7.6 §8 §9.3", "engine", slow=3.0)
async def _dedup_roundtrip(ctx: Ctx) -> str:
    """A dedup transfer delivered to this engine listener fills the store; the same prompt
    again gets HAVE(2 blocks, states 1), travels without the skipped chunks (their digest
    slots 0), and is delivered whole from the store with the real checksums' digest; a
    skipped chunk sent anyway is a second copy (PROTOCOL_ERROR)."""
    if not ctx.target.peer:
        raise CheckSkipped("needs --peer of the same daemon")
    first = dedup_transfer()
    peer = await ctx.peer()
    need(peer, wire.CAP_DEDUP, "CAP_DEDUP")
    engine, arena = await _subscribe(ctx, first)
    have, _ = await _send_dedup(peer, first)
    if have["blocks"] or have["states"]:
        raise CheckFailed(f"HAVE {have} for a prompt never sent before")
    _, problems = await _receive(ctx, engine, first, arena)
    if problems:
        raise CheckFailed("first delivery: " + "; ".join(problems))
    second = first.again()
    engine, arena = await _subscribe(ctx, second)
    have, complete = await _send_dedup(peer, second)
    want = {"transfer_id": second.tid, "blocks": 2, "states": True}
    if have != want:
        raise CheckFailed(f"second transfer: HAVE {have}, expected {want} (the store holds it)")
    summary, problems = await _receive(ctx, engine, second, arena)
    if problems:
        raise CheckFailed("second delivery: " + "; ".join(problems))
    third = first.again()
    await peer.send(third.open())
    frame = await expect_frame(peer, lambda f: f.name == "HAVE", "HAVE")
    if frame.fields["blocks"] != 2:
        raise CheckFailed(f"third transfer: HAVE {frame.fields}")
    await push(peer, third, [0])  # skipped by that HAVE
    # §7.6.5/§7.2: a second copy, PROTOCOL_ERROR (GOAWAY, or ABORT of just this transfer:
    # its sender may simply have stopped waiting for HAVE).
    refused = await expect_error(peer, third.tid, "PROTOCOL_ERROR")
    return f"HAVE(2, 1), {complete}, delivered from the store ({summary}); skipped chunk: {refused}"


def tail_cuts(t: Transfer, model: Fields, blocks: int) -> dict[int, int]:
    """§7.6.5 "tail": chunk index -> held bytes at its start, after HAVE(blocks)."""
    starts = wire.chunk_table([len(x) for x in t.data], t.chunk_size)
    cuts: dict[int, int] = {}
    for i, layer in enumerate(payload.expand_layers(model)):
        if layer["kind"] != "full":
            continue
        held = blocks * payload.block_bytes(layer)
        for index in range(starts[i], starts[i + 1]):
            _, _, off, n = t.places[index]
            if off < held < off + n:
                cuts[index] = held - off
    return cuts


def tail_frame(t: Transfer, index: int, cut: int) -> tuple[bytes, int]:
    """CHUNK ``index`` from byte ``cut`` on, and its tail's own checksum (its digest slot)."""
    data = t.raw(index)[cut:]
    _, _, off, _ = t.places[index]
    checksum = wire.checksum(data)
    meta = t.meta(index, offset=off + cut, raw_length=len(data), checksum=checksum)
    return wire.encode("CHUNK", {"meta": meta, "data": data}), checksum


@check("roundtrip.dedup_tail", "§7.6.5 §8 §9.3", "engine", slow=3.0)
async def _dedup_tail_roundtrip(ctx: Ctx) -> str:
    """With CAP_DEDUP_TAIL, chunks of 3 blocks and 2 blocks held: each full layer's chunk
    travels from its third block on (its tail, under the tail's checksum; digest slot the
    same), the linear state not at all, and the engine gets the whole layers with the real
    checksums' digest; a whole chunk where HAVE made a tail fails that transfer
    (PROTOCOL_ERROR), and the connection still serves."""
    if not ctx.target.peer:
        raise CheckSkipped("needs --peer of the same daemon")
    first = dedup_transfer(chunk_blocks=3)
    peer = await ctx.peer(wire.BASE_CAPS | wire.CAP_DEDUP_TAIL)
    need(peer, wire.CAP_DEDUP, "CAP_DEDUP")
    need(peer, wire.CAP_DEDUP_TAIL, "CAP_DEDUP_TAIL")
    engine, arena = await _subscribe(ctx, first)
    await _send_dedup(peer, first)
    _, problems = await _receive(ctx, engine, first, arena)
    if problems:
        raise CheckFailed("first delivery: " + "; ".join(problems))
    second = first.again()
    model = second.extra["dedup"]["model"]
    engine, arena = await _subscribe(ctx, second)
    await peer.send(second.open())
    frame = await expect_frame(peer, lambda f: f.name in ("HAVE", "ABORT"), "HAVE")
    if frame.name != "HAVE" or frame.fields["blocks"] != 2:
        raise CheckFailed(f"second transfer: {frame.describe()}, expected HAVE(2, 1)")
    skip = skipped_chunks(second, model, 2, frame.fields["states"])
    cuts = tail_cuts(second, model, 2)
    if not cuts:
        raise CheckFailed("the kit's transfer has no chunk straddling 2 blocks")
    sums = list(second.checksums)
    sent = 0
    for index in range(second.n_chunks):
        if index in skip:
            sums[index] = 0
            continue
        if index in cuts:
            frame_bytes, sums[index] = tail_frame(second, index, cuts[index])
        else:
            frame_bytes = second.chunk(index)
        w = len(frame_bytes) - wire.HEADER_SIZE - wire.CHUNK_META_SIZE
        if not await peer.wait_credit(w):
            raise CheckFailed(f"no CREDIT for a {w} B chunk")
        peer.credit -= w
        await peer.send(frame_bytes)
        sent += 1
    digest = wire.digest(sums)
    await peer.send(second.end(chunks_on_stripe=sent, digest=digest))
    complete = await expect_complete(peer, second, digest)
    summary, problems = await _receive(ctx, engine, second, arena)
    if problems:
        raise CheckFailed("second delivery: " + "; ".join(problems))
    third = first.again()
    await peer.send(third.open())
    await expect_frame(peer, lambda f: f.name == "HAVE", "HAVE")
    whole = min(cuts)
    await push(peer, third, [whole])  # whole, where HAVE made it a tail
    refused = await expect_error(peer, third.tid, "PROTOCOL_ERROR")
    await expect_alive(peer)
    return (
        f"{len(cuts)} tails, {complete}, delivered ({summary}); a whole chunk for a tail: "
        f"{refused}, connection kept"
    )


# ======================================================================== liveness §12
@check("final.still_serving", "§12", final=True)
async def _still_serving(ctx: Ctx) -> str:
    """After every hostile check: a fresh handshake and a PING still work."""
    link = await ctx.hello()
    await expect_alive(link)
    return f"HELLO_ACK from {link.limits['node_name']!r}, PONG"
