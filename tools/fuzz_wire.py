#!/usr/bin/env python3
"""Long fuzzing of the kvship wire protocol (issue 11, item 6): the nightly entry point.

Coverage-guided with atheris (libFuzzer) where it is installed (``make fuzz`` builds
``.venv-fuzz`` with it), else a plain seeded random mutator over the same targets, so the
tool imports and runs in the test venv too. Targets (``--target``):

``peer-acceptor``  ``Connection(role=Role.PEER, initiator=False)``: the daemon's peer listener
``engine-daemon``  ``Connection(role=Role.DAEMON)``: the daemon's engine listener
``initiator``      ``Connection(role=Role.PEER, initiator=True)`` after ``initiate(HELLO)``,
                   fed an acceptor's reply
``engine-client``  ``Connection(role=Role.ENGINE)`` (a kvship.Client), fed its daemon's reply
``decoders``       every decoder of ``kvship.protocol.frames.DECODERS`` on raw bodies

A connection input is ``ctl offer grant seed stream...``: ``ctl`` picks the prefix (none,
MAGIC, or a valid MAGIC + HELLO / HELLO_ACK the harness builds, so the fuzzer starts past the
handshake), how the stream is split into reads (whole, random cuts, byte by byte, small
steps), EOF at the end, whether the harness answers frames as a daemon would (PONG, CREDIT,
COMPLETE, HAVE, ACK, SHM_ATTACHED, deliveries ...) and the limits; ``offer`` the
capabilities the harness's HELLO offers and ``grant`` those ``accept()`` allows (one bit per
capability of ``KNOWN_CAPS``, in order). With ``--auth`` (peer-acceptor, initiator) both ends
hold a pre-shared key and the prefix is a whole authenticated handshake (fixed nonces).
``seeds()`` builds a seed corpus with the project's own encoders (and protocol/vectors).
The stream is fed the way kvship.aio.FramedProtocol feeds it (``read_buffer``,
``buffer_updated``, ``next_frames``: one frame handed over at a time; a HELLO is answered
with ``accept()``, as kvshipd does).

Invariants (anything else is a crash, saved with a reproducer under ``--crash-dir``):
only ``ProtocolError`` leaves the receiving side (and the connection is closed then, its
GOAWAY carrying the same code); ``LocalProtocolError`` only from this side's own calls;
no call takes longer than ``--call-timeout`` nor allocates past ``--memory-limit-mb``
(MemoryError); and, on every ``--check-every``-th input, the same stream fed whole, byte by
byte, in other cuts (and through ``receive_data`` where the handshake allows) gives the same
events, error code, state, windows and answers. A decoded frame must re-encode and decode
to itself.

``--replay-daemon`` starts two real kvshipd on loopback, sends every corpus file (and
``--generated`` mutated inputs) to the victim's peer listener and its engine TCP listener,
each on its own connection, checks after every batch that the daemon lives and /healthz
answers, and at the end that a good transfer still goes through bit-exact.

    python tools/fuzz_wire.py --target peer-acceptor --runs 100000 --max-seconds 600 --json
    python tools/fuzz_wire.py --replay-daemon --corpus build/fuzz/corpus/peer-acceptor --json
    python tools/fuzz_wire.py --target decoders --reproduce build/fuzz/crashes/decoders/crash-...

The last line with ``--json`` is one JSON object (target, runs, wall_s, execs_per_s,
crashes, coverage, corpus_size, ...); the exit status is 1 when anything crashed. Every loop
is bounded in count and in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

CHILD_ENV = "KVSHIP_FUZZ_CHILD"  # set by the parent for the atheris child (JSON config)
if __name__ == "__main__" and os.environ.get(CHILD_ENV):
    import atheris  # only in .venv-fuzz: instrument kvship.protocol as it is imported

    with atheris.instrument_imports(include=["kvship.protocol"]):
        import kvship.protocol  # noqa: F401

# E402: these imports come after the instrumenting one above, on purpose.
import kvship.protocol as P  # noqa: E402
from kvship.protocol import (  # noqa: E402
    CAP_CODECS,
    CAP_DEDUP,
    CAP_SHM,
    CAP_STRIPING,
    FLAG_IGNORABLE,
    HEADER_SIZE,
    KNOWN_CAPS,
    MAGIC,
    ROLE_ENGINE,
    ROLE_PEER,
    Abort,
    Chunk,
    ChunkMeta,
    Complete,
    Connection,
    Credit,
    End,
    ErrorCode,
    Frame,
    GoAway,
    Have,
    Hello,
    HelloAck,
    LayerReady,
    LayerSpec,
    Limits,
    LocalProtocolError,
    Open,
    Ping,
    Pong,
    ProtocolError,
    ReceivedChunk,
    Release,
    Role,
    ShmAttach,
    ShmAttached,
    ShmChunk,
    State,
    Subscribe,
    chunk_checksum,
    chunk_table,
    digest_of_checksums,
    frame_header,
)
from kvship.protocol.frames import DECODERS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "protocol" / "vectors"
BUILD = ROOT / "build" / "fuzz"
TARGETS = ("peer-acceptor", "engine-daemon", "initiator", "engine-client", "decoders")
INITIATORS = ("initiator", "engine-client")  # fed what their acceptor answers
REPLAY = "replay-daemon"
MAX_LEN = 8192  # bytes of one fuzz input (libFuzzer -max_len; the mutator's cap)
MAX_CORPUS = 4000  # inputs the random mutator keeps (new outcome classes)
MAX_KEPT = 100  # crashes kept (with a reproducer file) beyond the first of each kind
KIB, MIB = 1024, 1024 * 1024

# Limits the harness's connection runs with (ctl bits 6-7). Small ones keep hostile length
# fields from allocating 16 MiB bodies on most inputs; one profile is kvshipd's own.
LIMIT_PROFILES = (
    Limits(max_frame=4 * KIB + 64, max_chunk=4 * KIB, max_transfers=4, initial_window=MIB),
    Limits(max_frame=4 * KIB + 64, max_chunk=4 * KIB, max_transfers=2, initial_window=64),
    Limits(max_chunk=4 * MIB, max_transfers=64, initial_window=8 * MIB),  # kvshipd defaults
    Limits(max_frame=512 + 64, max_chunk=512, max_transfers=1, initial_window=512),
)
ALL_CAPS = CAP_SHM | CAP_STRIPING | CAP_CODECS | CAP_DEDUP  # the seeds' default offer
# Frame classes that exist only with peer authentication (the auth issue): looked up by
# name so the tool works before and after it lands.
AUTH_CHALLENGE = getattr(P, "AuthChallenge", None)
AUTH_PROOF = getattr(P, "AuthProof", None)
CAP_AUTH_BIT = int(getattr(P.constants, "CAP_AUTH", 0))
AUTH_TARGETS = ("peer-acceptor", "initiator")  # --auth: a pre-shared key on both ends
FUZZ_KEY_ID, FUZZ_SECRET = "fuzz-key", b"kvship-fuzz-secret-0123456789abc"


def _fixed_random(n: int) -> bytes:
    """Nonces for --auth: fixed, so the harness's own handshake replays bit for bit."""
    return bytes((i * 37 + 11) & 0xFF for i in range(n))


def auth_kwargs(target: str) -> dict[str, Any]:
    """Connection kwargs of ``target``'s end with the fuzz key (the keyring of --auth)."""
    if target not in AUTH_TARGETS:
        raise ValueError(f"--auth is for {' and '.join(AUTH_TARGETS)}, not {target}")
    if target == "initiator":
        from kvship.protocol.auth import PeerKey

        return {"key": PeerKey(FUZZ_KEY_ID, FUZZ_SECRET), "random_bytes": _fixed_random}
    return {"keys": {FUZZ_KEY_ID: FUZZ_SECRET}, "random_bytes": _fixed_random}


@lru_cache(maxsize=512)
def auth_handshake(limits: int, offer: int, grant: int) -> tuple[bytes, bytes]:
    """A whole authenticated handshake between two real ends (SPEC §6.4): what the
    initiator sends (MAGIC, HELLO, AUTH_PROOF) and what the acceptor answers
    (AUTH_CHALLENGE, HELLO_ACK), each as one stream."""
    initiator = Connection(role=Role.PEER, initiator=True, **auth_kwargs("initiator"))
    acceptor = Connection(
        role=Role.PEER,
        initiator=False,
        limits=LIMIT_PROFILES[limits],
        **auth_kwargs("peer-acceptor"),
    )
    hello = initiator.initiate(hello_for(ROLE_PEER, offer))
    acceptor.receive_data(hello)
    challenge = acceptor.accept("fuzz-acceptor", grant)
    initiator.receive_data(challenge)
    proof = initiator.prove()
    acceptor.receive_data(proof)
    ack = acceptor.accept()
    initiator.receive_data(ack)
    if initiator.state is not State.OPEN or acceptor.state is not State.OPEN:
        raise RuntimeError("the harness's authenticated handshake did not complete")
    return hello + proof, challenge + ack


# Every frame class the machine may hand out: the decoders' own (so frames the protocol adds
# later count too), and the chunks it streams.
FRAME_CLASSES = (
    ReceivedChunk,
    *sorted({getattr(d, "__self__", Hello) for d in DECODERS.values()}, key=lambda c: c.TYPE),
)
# Capability bits the caps bytes map onto, in order: every one the protocol knows now.
CAP_BITS = tuple(1 << i for i in range(64) if KNOWN_CAPS >> i & 1)[:8]
ACK = getattr(P, "Ack", None)  # CAP_RESUME's frames, where the protocol has them
RESUME_FRAME = getattr(P, "Resume", None)
CAP_RESUME = int(getattr(P.constants, "CAP_RESUME", 0))


# ------------------------------------------------------------------ input format
@dataclass(frozen=True)
class Plan:
    """What one connection input asks for (see the module docstring)."""

    prefix: int  # 0 raw, 1 MAGIC only, 2-3 MAGIC + a valid HELLO (initiator: a HELLO_ACK)
    split: int  # 0 whole, 1 random cuts, 2 byte by byte, 3 small steps
    eof: bool
    respond: bool
    limits: int  # index into LIMIT_PROFILES
    offer: int  # capabilities the harness's HELLO offers
    grant: int  # capabilities accept() allows
    seed: int  # for the cuts / steps
    body: bytes

    @classmethod
    def of(cls, data: bytes) -> Plan:
        ctl, offer, grant, seed = (data + b"\0\0\0\0")[:HEAD]
        return cls(
            ctl & 3,
            (ctl >> 2) & 3,
            bool(ctl & 0x10),
            bool(ctl & 0x20),
            ctl >> 6,
            _caps(offer),
            _caps(grant),
            seed,
            bytes(data[HEAD:]),
        )


HEAD = 4  # ctl, offer, grant, seed


def _caps(byte: int) -> int:
    return sum(bit for i, bit in enumerate(CAP_BITS) if byte >> i & 1)


def _caps_byte(caps: int) -> int:
    return sum(1 << i for i, bit in enumerate(CAP_BITS) if caps & bit)


def make_input(
    body: bytes = b"",
    *,
    prefix: int = 2,
    split: int = 0,
    eof: bool = False,
    respond: bool = False,
    limits: int = 0,
    offer: int = ALL_CAPS,
    grant: int = ALL_CAPS,
    seed: int = 0,
) -> bytes:
    """A connection input (the inverse of :meth:`Plan.of`)."""
    ctl = prefix | split << 2 | int(eof) << 4 | int(respond) << 5 | limits << 6
    return bytes([ctl, _caps_byte(offer), _caps_byte(grant), seed & 0xFF]) + body


def hello_for(role: int, offer: int) -> Hello:
    name = "fuzz-peer" if role == ROLE_PEER else "fuzz-engine"
    return Hello(role, name, capabilities=offer)


@lru_cache(maxsize=512)
def hello_ack_bytes(role: int, limits: int, offer: int, grant: int) -> bytes:
    """A valid HELLO_ACK answering an initiator target's HELLO (made by a real acceptor)."""
    acceptor = Connection(
        role=Role.PEER if role == ROLE_PEER else Role.DAEMON,
        initiator=False,
        limits=LIMIT_PROFILES[limits],
    )
    acceptor.receive_data(MAGIC + hello_for(role, offer).encode())
    return acceptor.accept("fuzz-acceptor", grant)


def role_of(target: str) -> int:
    """The HELLO role of the target's connection."""
    return ROLE_ENGINE if target in ("engine-daemon", "engine-client") else ROLE_PEER


def stream_of(target: str, plan: Plan, auth: bool = False) -> bytes:
    """The bytes the connection under test receives for ``plan`` (``auth``: the harness's
    prefix is an authenticated handshake with the fuzz key)."""
    if auth and plan.prefix >= 2:
        to_acceptor, to_initiator = auth_handshake(plan.limits, plan.offer, plan.grant)
        return (to_initiator if target in INITIATORS else to_acceptor) + plan.body
    role = role_of(target)
    if target in INITIATORS:
        head = b""
        if plan.prefix >= 2:
            head = hello_ack_bytes(role, plan.limits, plan.offer, plan.grant)
        return head + plan.body
    head = {0: b"", 1: MAGIC}.get(plan.prefix, MAGIC + hello_for(role, plan.offer).encode())
    return head + plan.body


def pieces_of(stream: bytes, split: int, seed: int) -> list[bytes]:
    """``stream`` cut into the reads ``split`` asks for (deterministic in ``seed``)."""
    if split == 0 or not stream:
        return [stream]
    if split == 2:
        return [stream[i : i + 1] for i in range(len(stream))]
    rng = random.Random(seed * 7919 + len(stream))
    if split == 1:
        cuts = sorted(rng.randrange(len(stream) + 1) for _ in range(rng.randint(1, 8)))
        bounds = [0, *cuts, len(stream)]
        return [stream[a:b] for a, b in itertools.pairwise(bounds)]
    out, pos = [], 0
    while pos < len(stream):
        n = rng.randint(1, 16)
        out.append(stream[pos : pos + n])
        pos += n
    return out


# ----------------------------------------------------------------- the harness
class Crash(Exception):
    """An invariant broke (not a stray exception): ``kind`` says which."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class Hang(BaseException):
    """The per-call alarm fired (a BaseException: the protocol's ``except Exception``
    around its decoders must not swallow it)."""


@dataclass
class Outcome:
    """What one feeding of a stream gave: compared across splits."""

    events: list[Any] = field(default_factory=list)
    error: int | None = None  # the ProtocolError code that ended it
    error_where: str = ""
    out: bytearray = field(default_factory=bytearray)  # what this side sent back
    refused: int = 0  # this side's own calls refused with LocalProtocolError
    state: str = ""
    windows: tuple[int, ...] = ()

    def signature(self) -> tuple[Any, ...]:
        return (
            tuple(self.events),
            self.error,
            self.error_where,
            bytes(self.out),
            self.refused,
            self.state,
            self.windows,
        )

    def klass(self) -> tuple[Any, ...]:
        """A coarse class for the random mutator's corpus: error code and event kinds."""
        kinds = tuple(type(e).__name__ for e in self.events[:12])
        return (self.error, self.error_where, self.state, kinds)


def snapshot(frame: Frame) -> Any:
    if isinstance(frame, Chunk):
        return ("CHUNK", frame.meta, bytes(frame.data))
    return frame


def _tiny_transfer(tid: int, request_id: str, sizes: Sequence[int], chunk: int) -> Open:
    return Open(tid, request_id, tuple(LayerSpec("uint8", (n,), n) for n in sizes), chunk)


def _chunks_of(op: Open, data_seed: int = 0) -> list[tuple[ChunkMeta, bytes]]:
    starts = chunk_table(op.layers, op.chunk_size)
    out = []
    for layer, spec in enumerate(op.layers):
        for index in range(starts[layer], starts[layer + 1]):
            offset = (index - starts[layer]) * op.chunk_size
            length = min(op.chunk_size, spec.nbytes - offset)
            data = bytes((index * 31 + j + data_seed) & 0xFF for j in range(length))
            meta = ChunkMeta(op.transfer_id, index, layer, offset, length, chunk_checksum(data))
            out.append((meta, data))
    return out


class Harness:
    """Runs one input against one target and checks the invariants.

    ``auth``: the Connection under test holds the fuzz key (acceptor: a keyring of it;
    initiator: the key) and the harness's prefix is a whole authenticated handshake.
    ``conn_kwargs`` go to the Connection under test as well (another keyring, say).
    """

    def __init__(
        self,
        target: str,
        *,
        call_timeout: float = 2.0,
        check_every: int = 8,
        conn_kwargs: dict[str, Any] | None = None,
        alarm: bool = True,
        auth: bool = False,
    ) -> None:
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; one of {', '.join(TARGETS)}")
        self.target = target
        self.call_timeout = call_timeout
        self.check_every = max(0, check_every)
        self.auth = auth
        self.conn_kwargs = {**(auth_kwargs(target) if auth else {}), **(conn_kwargs or {})}
        self.alarm = (
            alarm
            and hasattr(signal, "setitimer")
            and threading.current_thread() is threading.main_thread()
        )
        self.runs = 0
        self.split_checks = 0
        self.max_call_s = 0.0
        self.errors: Counter[str] = Counter()
        self.crashes: list[dict[str, Any]] = []  # the first MAX_KEPT of them
        self.crash_count = 0
        self.crash_keys: set[str] = set()
        self.on_crash: Callable[[bytes, dict[str, Any]], None] | None = None
        self._decoder_types = sorted(DECODERS)

    # --------------------------------------------------------------- entry
    def execute(self, data: bytes) -> Outcome | None:
        """Run ``data``; record (never raise) a crash. Returns the outcome, if any."""
        self.runs += 1
        start = time.perf_counter()
        outcome: Outcome | None = None
        try:
            with self._alarm():
                if self.target == "decoders":
                    self._decode(data)
                else:
                    outcome = self._connection(data, check=self._check_now())
        except Hang:
            self._record(data, "timeout", f"over {self.call_timeout} s (alarm)", "")
        except MemoryError:  # past --memory-limit-mb: an allocation the input asked for
            self._record(data, "memory", "MemoryError", traceback.format_exc())
        except Crash as exc:
            self._record(data, exc.kind, str(exc), traceback.format_exc())
        except Exception as exc:  # the finding the fuzzer is for
            self._record(data, "exception", f"{type(exc).__name__}: {exc}", traceback.format_exc())
        elapsed = time.perf_counter() - start
        self.max_call_s = max(self.max_call_s, elapsed)
        if elapsed > self.call_timeout and not self.alarm:
            self._record(data, "slow", f"{elapsed:.3f} s > {self.call_timeout} s", "")
        return outcome

    def _check_now(self) -> bool:
        return bool(self.check_every) and self.runs % self.check_every == 0

    @contextlib.contextmanager
    def _alarm(self) -> Iterator[None]:
        if not self.alarm:
            yield
            return

        def fire(signum: int, frame: object) -> None:
            raise Hang()

        previous = signal.signal(signal.SIGALRM, fire)
        signal.setitimer(signal.ITIMER_REAL, self.call_timeout)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    def _record(self, data: bytes, kind: str, message: str, tb: str) -> None:
        where = _crash_site(tb)
        key = f"{kind}|{message.split(':')[0] if kind == 'exception' else kind}|{where}"
        crash = {
            "kind": kind,
            "message": message[:500],
            "where": where,
            "hex": data.hex(),
            "sha1": hashlib.sha1(data).hexdigest(),
            "new": key not in self.crash_keys,
            "traceback": tb[-4000:],
        }
        self.crash_keys.add(key)
        self.crash_count += 1
        if len(self.crashes) < MAX_KEPT or crash["new"]:
            self.crashes.append(crash)
            if self.on_crash is not None:  # saves a reproducer: each new kind, a few more
                self.on_crash(data, crash)

    # ------------------------------------------------------------- decoders
    def _decode(self, data: bytes) -> None:
        if not data:
            return
        types = self._decoder_types
        ftype = data[0] if data[0] in DECODERS else types[data[0] % len(types)]
        decode = DECODERS[ftype]
        try:
            frame = decode(memoryview(data[1:]))
        except ProtocolError as exc:
            self.errors[exc.code.name] += 1
            if not isinstance(exc.code, ErrorCode):
                raise Crash("bad-code", f"ProtocolError code {exc.code!r}") from None
            return
        try:
            encoded = frame.encode()
        except Exception as exc:
            raise Crash("re-encode", f"0x{ftype:02x} decoded {frame!r}: {exc!r}") from exc
        length, etype = int.from_bytes(encoded[:4], "big"), encoded[4]
        if etype != ftype or length != len(encoded) - HEADER_SIZE:
            raise Crash("re-encode", f"0x{ftype:02x} re-encoded with header {encoded[:8].hex()}")
        try:
            again = decode(memoryview(encoded)[HEADER_SIZE:])
        except ProtocolError as exc:
            raise Crash(
                "roundtrip", f"0x{ftype:02x} {frame!r} re-encoded does not decode: {exc}"
            ) from exc
        if again != frame:
            raise Crash("roundtrip", f"0x{ftype:02x} {frame!r} came back as {again!r}")

    # ----------------------------------------------------------- connections
    def _connection(self, data: bytes, *, check: bool) -> Outcome:
        plan = Plan.of(data)
        stream = stream_of(self.target, plan, self.auth)
        main = self._feed(plan, pieces_of(stream, plan.split, plan.seed))
        if check:
            self.split_checks += 1
            self._compare_splits(plan, stream, main)
        return main

    def _compare_splits(self, plan: Plan, stream: bytes, main: Outcome) -> None:
        want = main.signature()
        others = {"whole": 0, "cuts": 1, "steps": 3}
        if len(stream) <= 2048:
            others["bytewise"] = 2
        for name, split in others.items():
            if split == plan.split and split != 1:
                continue
            got = self._feed(plan, pieces_of(stream, split, plan.seed + 1))
            if got.signature() != want:
                raise Crash("split-mismatch", f"{name} differs: {_diff(main, got)}")
        if plan.respond or plan.prefix < 2 or self.target in INITIATORS or self.auth:
            return
        for name, split in (("receive_data whole", 0), ("receive_data bytewise", 2)):
            got = self._feed_receive_data(plan, stream, split)
            if got is not None and got.signature()[1:] != want[1:]:
                raise Crash("split-mismatch", f"{name} differs: {_diff(main, got)}")

    def _node_name(self) -> str:
        return "fuzz-daemon" if self.target == "engine-daemon" else "fuzz-acceptor"

    def _new(self, plan: Plan) -> Connection:
        limits = LIMIT_PROFILES[plan.limits]
        if self.target == "peer-acceptor":
            return Connection(role=Role.PEER, initiator=False, limits=limits, **self.conn_kwargs)
        if self.target == "engine-daemon":
            return Connection(role=Role.DAEMON, limits=limits, **self.conn_kwargs)
        if self.target == "engine-client":
            return Connection(role=Role.ENGINE, **self.conn_kwargs)
        return Connection(role=Role.PEER, initiator=True, **self.conn_kwargs)

    def _feed(self, plan: Plan, pieces: Iterable[bytes]) -> Outcome:
        """Feed like kvship.aio.FramedProtocol: frames handed over one at a time."""
        conn = self._new(plan)
        result = Outcome()
        react = self._reactor(conn, plan, result)
        where = "recv"
        try:
            if self.target in INITIATORS:
                where = "initiate"
                result.out += conn.initiate(hello_for(role_of(self.target), plan.offer))
                if plan.respond:
                    self._local(result, conn.send, Ping(0x5157))  # pipelined after HELLO
            for piece in pieces:
                pos = 0
                while pos < len(piece) and not conn.closed:
                    where = "recv"
                    buf = conn.read_buffer()
                    n = min(len(buf), len(piece) - pos)
                    buf[:n] = piece[pos : pos + n]
                    pos += n
                    frames = conn.buffer_updated(n)
                    while True:
                        for frame in frames:
                            where = "react"
                            react(frame)
                            where = "recv"
                        if not conn.pending or conn.closed:
                            break
                        frames = conn.next_frames()
                if conn.closed:
                    break
            if plan.eof and not conn.closed:
                where = "eof"
                conn.receive_eof()
                if not conn.closed:
                    raise Crash("invariant", f"not closed after receive_eof ({conn.state})")
        except LocalProtocolError as exc:
            if where != "react":
                raise Crash("invariant", f"LocalProtocolError from {where}: {exc}") from exc
            raise Crash("invariant", f"LocalProtocolError escaped a reaction: {exc}") from exc
        except ProtocolError as exc:
            self._check_failed(conn, exc, where)
            result.error, result.error_where = int(exc.code), where
        self._check_state(conn, plan)
        result.state = conn.state.name
        result.windows = (
            conn.recv_window,
            conn.send_credit,
            conn.open_transfers,
            conn.sending_transfers,
        )
        return result

    def _feed_receive_data(self, plan: Plan, stream: bytes, split: int) -> Outcome | None:
        """The same stream through receive_data (prefix first, accept, then the rest)."""
        conn = self._new(plan)
        result = Outcome()
        head = len(stream) - len(plan.body)
        where = "recv"
        try:
            events = conn.receive_data(stream[:head])
            if conn.state is not State.AWAIT_ACCEPT:
                return None  # the harness's HELLO did not get there (auth, say)
            result.events += [snapshot(e) for e in events]
            where = "react"
            result.out += conn.accept(self._node_name(), plan.grant)
            if conn.state is not State.OPEN:
                return None
            where = "recv"
            for piece in pieces_of(stream[head:], split, plan.seed):
                if conn.closed:
                    break
                result.events += [snapshot(e) for e in conn.receive_data(piece)]
            if plan.eof and not conn.closed:
                where = "eof"
                conn.receive_eof()
        except LocalProtocolError as exc:
            raise Crash("invariant", f"LocalProtocolError from receive_data: {exc}") from exc
        except ProtocolError as exc:
            self._check_failed(conn, exc, where)
            result.error, result.error_where = int(exc.code), where
        result.state = conn.state.name
        result.windows = (
            conn.recv_window,
            conn.send_credit,
            conn.open_transfers,
            conn.sending_transfers,
        )
        return result

    def _check_failed(self, conn: Connection, exc: ProtocolError, where: str) -> None:
        self.errors[exc.code.name] += 1
        if not isinstance(exc.code, ErrorCode):
            raise Crash("bad-code", f"ProtocolError code {exc.code!r} from {where}")
        if not conn.closed:
            raise Crash("invariant", f"ProtocolError {exc} from {where} left {conn.state}")
        goaway = conn.goaway_for(exc)
        decoded = GoAway.decode(memoryview(goaway)[HEADER_SIZE:])
        if decoded.code != exc.code:
            raise Crash("invariant", f"GOAWAY for {exc.code.name} carries {decoded.code}")

    def _check_state(self, conn: Connection, plan: Plan) -> None:
        limits = conn.limits
        if conn.recv_window < 0 or conn.send_credit < 0:
            raise Crash("invariant", f"window {conn.recv_window}, credit {conn.send_credit}")
        if conn.open_transfers > limits.max_transfers:
            raise Crash("invariant", f"{conn.open_transfers} transfers > {limits.max_transfers}")

    def _local(self, result: Outcome, call: Callable[..., bytes], *args: Any) -> None:
        """One of this side's calls: LocalProtocolError is allowed (and counted)."""
        try:
            result.out += call(*args)
        except LocalProtocolError:
            result.refused += 1

    def _reactor(self, conn: Connection, plan: Plan, result: Outcome) -> Callable[[Frame], None]:
        """What kvshipd (or, for the initiator target, a sending daemon) does per frame."""
        local = self._local
        tid_base = 0x5151_0000

        def deliver(request_id: str) -> None:
            op = _tiny_transfer(tid_base + len(result.events), request_id, (24,), 16)
            local(result, conn.send, op)
            sums = []
            for meta, data in _chunks_of(op):
                sums.append(meta.checksum)
                try:
                    result.out += conn.chunk_header(meta, len(data)) + data
                except LocalProtocolError:
                    result.refused += 1
            local(result, conn.send, End(op.transfer_id, len(sums), digest_of_checksums(sums)))

        def react(frame: Frame) -> None:
            if not type(frame).__module__.startswith("kvship.protocol") or not isinstance(
                frame, FRAME_CLASSES
            ):
                raise Crash("invariant", f"event of type {type(frame)!r}")
            result.events.append(snapshot(frame))
            if isinstance(frame, Hello):
                result.out += conn.accept(self._node_name(), plan.grant)  # may fail
                return
            if AUTH_PROOF is not None and isinstance(frame, AUTH_PROOF):
                result.out += conn.accept()  # the proof verified: the HELLO_ACK (§6.4)
                return
            if AUTH_CHALLENGE is not None and isinstance(frame, AUTH_CHALLENGE):
                local(result, conn.prove)
                return
            if not plan.respond:
                return
            if isinstance(frame, Ping):
                local(result, conn.send, Pong(frame.opaque))
            elif isinstance(frame, ReceivedChunk):
                if len(frame.data):
                    local(result, conn.grant, len(frame.data))
                if ACK is not None and conn.negotiated.capabilities & CAP_RESUME:
                    local(result, conn.send, ACK(frame.meta.transfer_id, (frame.meta.chunk_index,)))
            elif isinstance(frame, End):
                local(result, conn.send, Complete(frame.transfer_id, 0, frame.digest))
            elif isinstance(frame, Open):
                if conn.negotiated.capabilities & CAP_DEDUP:
                    local(result, conn.send, Have(frame.transfer_id, 0))
            elif isinstance(frame, Abort):
                conn.forget(frame.transfer_id)
            elif isinstance(frame, Subscribe):
                deliver(frame.request_id)
            elif isinstance(frame, ShmAttach):
                local(result, conn.send, ShmAttached(frame.size))
            elif isinstance(frame, ShmChunk):
                local(result, conn.send, Release(frame.arena_offset, frame.meta.raw_length))
            elif isinstance(frame, HelloAck):
                if self.target == "engine-client":  # a kvship.Client: receive, attach, put
                    local(result, conn.send, Subscribe("req-1", 100))
                    if conn.negotiated.capabilities & CAP_SHM:
                        local(result, conn.send, ShmAttach(1 << 20, "/kvship-fuzz"))
                    send_transfer(ENGINE_PUT)
                else:
                    send_transfer(_tiny_transfer(5, "fuzz-req", (24, 8), 16))

        def send_transfer(op: Open) -> None:
            local(result, conn.send, op)
            sums = []
            for meta, data in _chunks_of(op):
                sums.append(meta.checksum)
                try:
                    result.out += conn.chunk_header(meta, len(data)) + data
                except LocalProtocolError:
                    result.refused += 1
            local(result, conn.send, End(op.transfer_id, len(sums), digest_of_checksums(sums)))

        return react


ENGINE_PUT = Open(7, "put-7", (LayerSpec("uint8", (24,), 24),), 16, peer="127.0.0.1:1")


def _diff(a: Outcome, b: Outcome) -> str:
    sa, sb = a.signature(), b.signature()
    names = ("events", "error", "where", "out", "refused", "state", "windows")
    parts = []
    for name, x, y in zip(names, sa, sb, strict=True):
        if x != y:
            parts.append(f"{name} {_short(x)} != {_short(y)}")
    return "; ".join(parts)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 300 else text[:300] + "..."


def _crash_site(tb: str) -> str:
    """The innermost kvship frame of a traceback (file:line function), for dedup."""
    sites = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', tb)
    for path, line, func in reversed(sites):
        if "/kvship/" in path:
            return f"{path.split('/kvship/', 1)[1]}:{line} {func}"
    return ""


# -------------------------------------------------------------------- seeds
def _frames_pool() -> list[bytes]:
    """Whole frames the mutator inserts (each valid on its own, or nearly)."""
    op = _tiny_transfer(1, "r", (40, 8), 16)
    chunk_meta, chunk_data = _chunks_of(op)[0]
    meta = ChunkMeta(1, 0, 0, 0, 16, 0)
    frames = [
        Ping(1).encode(),
        Pong(1).encode(),
        Credit(1).encode(),
        Credit(2**31 - 1).encode(),
        GoAway(0, "bye").encode(),
        Abort(1, int(ErrorCode.CANCELLED), "x").encode(),
        End(1, 3, 0).encode(),
        Complete(1, 48, 0).encode(),
        Complete(5, 32, 0).encode(),
        op.encode(),
        Chunk(chunk_meta, chunk_data).encode(),
        Have(1, 0).encode(),
        Have(5, 1, True).encode(),
        Subscribe("r", 10).encode(),
        ShmAttach(1 << 20, "/kvship-fuzz").encode(),
        ShmAttached(1 << 20).encode(),
        ShmChunk(meta, 0).encode(),
        LayerReady(1, 0, 0, 0).encode(),
        Release(0, 16).encode(),
        Hello(ROLE_PEER, "x").encode(),
        Hello(ROLE_ENGINE, "x").encode(),
        HelloAck(1, 0, 4096, 4096 + 64, 4096, 4, "y").encode(),
        frame_header(0x1F, 5, FLAG_IGNORABLE) + b"skip!",
        frame_header(0x7E, 0, FLAG_IGNORABLE),
        frame_header(0x0E, 64) + bytes(64),  # AUTH_CHALLENGE's size (the auth issue)
        frame_header(0x0F, 32) + bytes(32),  # AUTH_PROOF's
    ]
    if ACK is not None:
        frames += [ACK(1, (0,)).encode(), ACK(5, (0, 2)).encode()]
    if RESUME_FRAME is not None:
        frames += [RESUME_FRAME.of(5, 3, {0, 2}).encode(), RESUME_FRAME.of(1, 4, set()).encode()]
    return frames


def _sent_stream(role: int, caps: int) -> bytes:
    """A whole transfer as the project's own sending side puts it on the wire with ``caps``
    negotiated (so fields that depend on them, END's open_check say, are right)."""
    conn = Connection(role=Role.PEER if role == ROLE_PEER else Role.ENGINE, initiator=True)
    conn.initiate(hello_for(role, caps))
    conn.receive_data(hello_ack_bytes(role, 0, caps, caps))
    op = ENGINE_PUT if role == ROLE_ENGINE else _tiny_transfer(0x31, "req-sent", (40, 8), 16)
    out = conn.send(op)
    sums = []
    for meta, data in _chunks_of(op):
        out += conn.chunk_header(meta, len(data)) + data
        sums.append(meta.checksum)
    return out + conn.send(End(op.transfer_id, len(sums), digest_of_checksums(sums)))


def _vectors() -> list[bytes]:
    """The golden vectors' bytes (protocol/vectors/*.json): streams and single frames."""
    out = []
    for path in sorted(VECTORS.glob("*.json")) if VECTORS.is_dir() else []:
        try:
            out.append(bytes.fromhex(json.loads(path.read_text())["hex"]))
        except (ValueError, KeyError, OSError):
            continue
    return out


def _transfer_stream(tid: int, sizes: Sequence[int], chunk: int, *, order: int = 0) -> bytes:
    op = _tiny_transfer(tid, f"req-{tid}", sizes, chunk)
    chunks = _chunks_of(op)
    if order:
        random.Random(order).shuffle(chunks)
    body = [op.encode(), *(Chunk(m, d).encode() for m, d in chunks)]
    sums = [m.checksum for m, _ in sorted(chunks, key=lambda c: c[0].chunk_index)]
    body.append(End(tid, len(chunks), digest_of_checksums(sums)).encode())
    return b"".join(body)


def seeds(target: str) -> list[bytes]:
    """A seed corpus of valid (and nearly valid) inputs built with the project's encoders."""
    vectors = _vectors()
    pool = _frames_pool()
    if target == "decoders":
        out = [bytes([f[4]]) + f[HEADER_SIZE:] for f in pool + vectors if len(f) >= HEADER_SIZE]
        out += [bytes([t]) for t in sorted(DECODERS)]
        return [s for s in out if s[0] in DECODERS] + [b""]
    out: list[bytes] = []
    ctl_variants = [
        {},
        {"respond": True},
        {"split": 2, "eof": True},
        {"split": 1, "respond": True, "limits": 1},
        {"limits": 2, "respond": True, "eof": True},
        {"limits": 3, "split": 3},
    ]
    if target == "engine-client":
        delivery = _tiny_transfer(0x77, "req-1", (24,), 16)
        parts = _chunks_of(delivery)
        sums = [m.checksum for m, _ in parts]
        chunks = b"".join(Chunk(m, d).encode() for m, d in parts)
        end = End(0x77, len(parts), digest_of_checksums(sums)).encode()
        answers = [
            delivery.encode() + chunks + end,
            delivery.encode() + chunks + Complete(0x77, 24, digest_of_checksums(sums)).encode(),
            ShmAttached(1 << 20).encode()
            + delivery.encode()
            + chunks
            + LayerReady(0x77, 0, 0, 24).encode()
            + end,
            ShmAttached(1 << 20).encode() + Release(0, 16).encode(),
            Abort(0, int(ErrorCode.NOT_FOUND), "no such request").encode(),
            Complete(7, 24, 0).encode() + Credit(4096).encode(),
            Abort(7, int(ErrorCode.PEER_UNREACHABLE), "x").encode(),
            Ping(1).encode() + GoAway(0, "bye").encode(),
        ]
        for body in [b"", *answers, b"".join(answers[:2])]:
            out += [make_input(body, **kw) for kw in ctl_variants]
            out.append(make_input(body, respond=True, offer=CAP_SHM, grant=CAP_SHM))
        out += [make_input(f, prefix=0) for f in pool]
        return out
    if target == "initiator":
        answers = [
            Complete(5, 32, 0).encode(),
            Abort(5, int(ErrorCode.CHECKSUM_MISMATCH), "x").encode(),
            Have(5, 0).encode(),
            Credit(4096).encode(),
            Ping(1).encode() + Pong(0x5157).encode(),
            GoAway(0, "bye").encode(),
            frame_header(0x1E, 3, FLAG_IGNORABLE) + b"abc",
        ]
        for body in [b"", *answers, b"".join(answers)]:
            out += [make_input(body, **kw) for kw in ctl_variants]
        ack = HelloAck(1, ALL_CAPS, MIB, 4 * KIB + 64, 4 * KIB, 4, "raw").encode()
        out += [make_input(ack + a, prefix=0, respond=True) for a in answers]
        out += [make_input(f, prefix=0) for f in pool]
        return out
    transfers = [
        _transfer_stream(1, (40, 8), 16),
        _transfer_stream(2, (40, 8, 0, 33), 16, order=3),
        _transfer_stream(3, (1,), 4) + Ping(9).encode() + _transfer_stream(4, (64,), 32),
        _transfer_stream(6, (100,), 16)[: -(End.FIXED.size + HEADER_SIZE)]
        + Abort(6, int(ErrorCode.CANCELLED), "stop").encode()
        + Chunk(*_chunks_of(_tiny_transfer(6, "req-6", (100,), 16))[0]).encode()
        + End(6, 7, 0).encode(),  # late frames of an aborted transfer: dropped
        _tiny_transfer(8, "req-8", (16,), 16).encode() * 2,  # opened twice
        _tiny_transfer(8, "req-8", (16,), 16).encode()
        + _tiny_transfer(9, "req-9", (16,), 16).encode(),  # past max_transfers (profile 3)
    ]
    if target == "engine-daemon":
        put = ENGINE_PUT
        sums = [m.checksum for m, _ in _chunks_of(put)]
        put_stream = (
            put.encode()
            + b"".join(Chunk(m, d).encode() for m, d in _chunks_of(put))
            + End(7, len(sums), digest_of_checksums(sums)).encode()
        )
        shm_meta = ChunkMeta(7, 0, 0, 0, 16, 0)
        transfers = [
            put_stream,
            Subscribe("req-1", 100).encode(),
            Subscribe("req-1", 100).encode() + Complete(0x5151_0001, 24, 0).encode(),
            ShmAttach(1 << 20, "/kvship-fuzz").encode() * 2,
            LayerReady(99, 0, 0, 0).encode(),
            ShmAttach(1 << 20, "/kvship-fuzz").encode()
            + put.encode()
            + ShmChunk(shm_meta, 0).encode()
            + ShmChunk(ChunkMeta(7, 1, 0, 16, 8, 0), 16).encode()
            + End(7, 2, 0).encode()
            + Release(0, 16).encode(),
            *transfers,
        ]
    for body in [b"", *transfers]:
        out += [make_input(body, **kw) for kw in ctl_variants]
    every = KNOWN_CAPS & ~CAP_AUTH_BIT  # all the protocol has (the key is --auth's business)
    for caps in {ALL_CAPS, every, 0}:
        sent = _sent_stream(role_of(target), caps)
        out += [make_input(sent, offer=caps, grant=caps, **kw) for kw in ctl_variants]
    for f in pool:
        out.append(make_input(f))
        out.append(make_input(f, respond=True, eof=True))
    for v in vectors:  # whole streams (with their own preface and HELLO) raw; frames after ours
        if v.startswith(MAGIC):
            out.append(make_input(v, prefix=0))
        else:
            out.append(make_input(v, respond=True))
    out.append(make_input(b"", prefix=0))
    out.append(make_input(Hello(ROLE_PEER, "h").encode(), prefix=1))
    return out


# ---------------------------------------------------------------- the mutator
INTERESTING_U32 = (
    0,
    1,
    7,
    8,
    39,
    40,
    41,
    0x7F,
    0x80,
    0xFF,
    0x100,
    4096,
    4096 + 64,
    0xFFFF,
    0x10000,
    0x10001,
    2**31 - 1,
    2**31,
    2**32 - 1,
)


class Mutator:
    """A plain seeded mutator (bit flips, interesting integers, frame insertion, splicing,
    truncation): the fallback where atheris is not installed."""

    def __init__(self, rng: random.Random, pool: list[bytes], max_len: int = MAX_LEN) -> None:
        self.rng = rng
        self.pool = pool
        self.frames = _frames_pool()
        self.max_len = max_len

    def __call__(self) -> bytes:
        rng = self.rng
        if rng.random() < 0.03 or not self.pool:
            return rng.randbytes(rng.randint(0, 300))
        data = bytearray(rng.choice(self.pool))
        for _ in range(rng.randint(1, 4)):
            self._mutate(data)
        return bytes(data[: self.max_len])

    def _mutate(self, data: bytearray) -> None:
        rng = self.rng
        op = rng.randrange(11)
        n = len(data)
        pos = rng.randrange(n + 1)
        if op == 0 and n:
            data[pos % n] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            data[pos % n] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2:
            data[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and n > HEAD:
            del data[pos : pos + rng.randint(1, 16)]
        elif op == 4 and n:
            start = rng.randrange(n)
            data[pos:pos] = data[start : start + rng.randint(1, 64)]
        elif op == 5 and n >= 4:
            at = rng.randrange(n - 3)
            value = rng.choice(INTERESTING_U32)
            if rng.random() < 0.3:
                value = (value + rng.randint(-2, 2)) % 2**32
            data[at : at + 4] = value.to_bytes(4, "big")
        elif op == 6:
            frame = rng.choice(self.frames)
            at = len(data) if rng.random() < 0.5 else max(HEAD, pos)
            data[at:at] = frame
        elif op == 7 and self.pool:
            other = rng.choice(self.pool)
            data[max(HEAD, pos) :] = other[HEAD + rng.randrange(max(1, len(other) - HEAD)) :]
        elif op == 8 and n >= HEAD:
            data[rng.randrange(HEAD)] = rng.randrange(256)
        elif op == 9 and n > HEAD:
            del data[max(HEAD, pos) :]
        elif op == 10 and n > HEADER_SIZE + HEAD:
            at = rng.randrange(HEAD, n - 3)  # a frame's type byte or flags
            data[at] = rng.choice((*sorted(DECODERS), 0x04, 0x0E, 0x0F, 0x80, 0xFF))


# --------------------------------------------------------------- fuzz drivers
def protocol_fingerprint() -> str:
    """sha1 of kvship/protocol/*.py as they are now (what a run fuzzed)."""
    digest = hashlib.sha1()
    for path in sorted((ROOT / "kvship" / "protocol").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _corpus_files(dirs: Sequence[Path], limit: int = 100_000) -> list[Path]:
    files: list[Path] = []
    for d in dirs:
        if d.is_dir():
            files += sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))
    return files[:limit]


def _write_seeds(corpus: Path, target: str) -> int:
    """Put the target's seeds into ``corpus`` (those it lacks); returns how many."""
    corpus.mkdir(parents=True, exist_ok=True)
    added = 0
    for data in seeds(target):
        path = corpus / f"seed-{hashlib.sha1(data).hexdigest()[:16]}"
        if not path.exists():
            path.write_bytes(data)
            added += 1
    return added


def _crash_writer(crash_dir: Path, target: str) -> Callable[[bytes, dict[str, Any]], None]:
    def save(data: bytes, crash: dict[str, Any]) -> None:
        crash_dir.mkdir(parents=True, exist_ok=True)
        path = crash_dir / f"crash-{crash['sha1']}"
        path.write_bytes(data)
        info = {k: v for k, v in crash.items() if k != "new"} | {"target": target}
        path.with_suffix(".json").write_text(json.dumps(info, indent=1))
        crash["file"] = str(path)

    return save


def _crash_summary(crashes: list[dict[str, Any]], limit: int = 20) -> list[dict[str, Any]]:
    unique = [c for c in crashes if c.get("new")]
    return [
        {
            "kind": c["kind"],
            "message": c["message"][:300],
            "where": c["where"],
            "file": c.get("file", ""),
            "hex": c["hex"][:1024],
        }
        for c in unique[:limit]
    ]


def fuzz_random(
    target: str,
    *,
    runs: int,
    max_seconds: float,
    corpus: Path | None,
    crash_dir: Path,
    seed: int,
    call_timeout: float = 2.0,
    check_every: int = 8,
    conn_kwargs: dict[str, Any] | None = None,
    auth: bool = False,
) -> dict[str, Any]:
    """The fallback fuzzer: seeded random mutation of the seeds and the corpus; inputs that
    reach a new outcome class (error code, event kinds, state) join the corpus."""
    harness = Harness(
        target,
        call_timeout=call_timeout,
        check_every=check_every,
        conn_kwargs=conn_kwargs,
        auth=auth,
    )
    harness.on_crash = _crash_writer(crash_dir, target)
    pool = seeds(target)
    if corpus is not None:
        _write_seeds(corpus, target)
        pool += [p.read_bytes()[:MAX_LEN] for p in _corpus_files([corpus], MAX_CORPUS)]
    rng = random.Random(seed)
    mutate = Mutator(rng, pool)
    classes: set[tuple[Any, ...]] = set()
    added, n_seeds = 0, len(pool)
    start = time.monotonic()
    deadline = start + max_seconds
    for i in range(runs):
        if i % 64 == 0 and time.monotonic() > deadline:
            break
        data = pool[i] if i < n_seeds else mutate()  # every seed once, then mutants
        outcome = harness.execute(data)
        if outcome is None:
            continue
        klass = outcome.klass()
        if klass not in classes:
            classes.add(klass)
            if i >= n_seeds and len(pool) < MAX_CORPUS:
                pool.append(data)
                added += 1
                if corpus is not None:
                    (corpus / f"rnd-{hashlib.sha1(data).hexdigest()[:16]}").write_bytes(data)
    wall = time.monotonic() - start
    corpus_size = len(_corpus_files([corpus])) if corpus is not None else len(pool)
    return {
        "target": target,
        "auth": auth,
        "engine": "random",
        "runs": harness.runs,
        "wall_s": round(wall, 3),
        "execs_per_s": round(harness.runs / wall, 1) if wall > 0 else 0.0,
        "crashes": harness.crash_count,
        "unique_crashes": _crash_summary(harness.crashes),
        "coverage": {"cov": None, "ft": None, "outcome_classes": len(classes)},
        "corpus_size": corpus_size,
        "corpus_added": added,
        "split_checks": harness.split_checks,
        "max_call_s": round(harness.max_call_s, 4),
        "protocol_errors": dict(harness.errors.most_common()),
        "seed": seed,
        "protocol_sha": protocol_fingerprint(),
    }


_STATUS = re.compile(
    r"^#(\d+)\s+(INITED|NEW|REDUCE|pulse|DONE|RELOAD)\s+(?:cov: (\d+) ft: (\d+) )?corp: (\d+)/"
)


def fuzz_atheris(
    target: str,
    *,
    runs: int,
    max_seconds: float,
    corpus: Path,
    crash_dir: Path,
    seed: int,
    call_timeout: float = 2.0,
    check_every: int = 8,
    log_path: Path | None = None,
    extra_args: Sequence[str] = (),
    memory_limit_mb: int = 0,
    auth: bool = False,
) -> dict[str, Any]:
    """libFuzzer through atheris, in a child process (libFuzzer ends it with exit(), so
    the child reports through a stats file and its log, which this side parses)."""
    _write_seeds(corpus, target)
    crash_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_path or BUILD / f"{target}{'-auth' if auth else ''}-libfuzzer.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stats_path = log_path.with_suffix(".stats.json")
    stats_path.unlink(missing_ok=True)
    config = {
        "target": target,
        "call_timeout": call_timeout,
        "check_every": check_every,
        "crash_dir": str(crash_dir),
        "stats": str(stats_path),
        "memory_limit_mb": memory_limit_mb,
        "auth": auth,
    }
    libfuzzer = [
        f"-runs={runs}",
        f"-max_total_time={max(1, int(max_seconds))}",
        f"-seed={seed or 1}",
        f"-timeout={max(1, int(call_timeout * 3 + 0.999))}",
        f"-max_len={MAX_LEN}",
        "-rss_limit_mb=4096",
        "-print_final_stats=1",
        f"-artifact_prefix={crash_dir}/",
        *extra_args,
        str(corpus),
    ]
    env = {**os.environ, CHILD_ENV: json.dumps(config)}
    start = time.monotonic()
    rc: int | None
    with open(log_path, "wb") as log:
        child = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *libfuzzer],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            rc = child.wait(timeout=max_seconds + 120)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            rc = None
    wall = time.monotonic() - start
    text = log_path.read_text(errors="replace")
    status = [m for m in map(_STATUS.match, text.splitlines()) if m]
    cov = ft = None
    for m in status:
        if m.group(3) is not None:
            cov, ft = int(m.group(3)), int(m.group(4))
    done = re.search(r"^Done (\d+) runs in (\d+) second", text, re.M)
    executed = re.search(r"^stat::number_of_executed_units: (\d+)", text, re.M)
    stats: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        stats = json.loads(stats_path.read_text())
    runs_done = int(executed.group(1)) if executed else int(stats.get("runs", 0))
    if not executed and status:
        runs_done = max(runs_done, int(status[-1].group(1)))
    crashes = list(stats.get("crashes", []))
    count = int(stats.get("crash_count", 0))
    kept = len(crashes)
    artifacts = re.findall(r"Test unit written to (\S+)", text)
    fatal = re.findall(r"==\d+== ERROR: libFuzzer: (.+)|^=== Uncaught Python exception", text, re.M)
    for path in artifacts:
        with contextlib.suppress(OSError):
            data = Path(path).read_bytes()
            crashes.append(
                {
                    "kind": "libfuzzer",
                    "message": (fatal[0] if fatal and fatal[0] else "libFuzzer artifact"),
                    "where": "",
                    "file": path,
                    "hex": data.hex()[:1024],
                    "new": True,
                }
            )
    if rc not in (0, None) and not artifacts and not crashes:
        crashes.append(
            {"kind": "child", "message": f"exit {rc}: {text[-500:]}", "where": "", "hex": ""}
        )
    if rc is None:
        crashes.append(
            {"kind": "child", "message": "killed: past max_seconds", "where": "", "hex": ""}
        )
    return {
        "target": target,
        "auth": auth,
        "engine": "atheris",
        "runs": runs_done,
        "wall_s": round(wall, 3),
        "execs_per_s": round(runs_done / wall, 1) if wall > 0 else 0.0,
        "fuzz_s": int(done.group(2)) if done else None,
        "crashes": count + len(crashes) - kept,
        "unique_crashes": _crash_summary([c | {"new": c.get("new", True)} for c in crashes]),
        "coverage": {"cov": cov, "ft": ft},
        "corpus_size": len(_corpus_files([corpus])),
        "split_checks": stats.get("split_checks"),
        "max_call_s": stats.get("max_call_s"),
        "protocol_errors": stats.get("protocol_errors", {}),
        "seed": seed,
        "libfuzzer_rc": rc,
        "log": str(log_path),
        "protocol_sha": protocol_fingerprint(),
    }


def atheris_child(config: dict[str, Any]) -> None:
    """Inside the atheris child: TestOneInput is the harness; crashes are recorded and
    the fuzzing goes on (the stats file says what happened, libFuzzer's log the rest)."""
    import atheris

    harness = Harness(
        config["target"],
        call_timeout=config["call_timeout"],
        check_every=config["check_every"],
        alarm=False,  # libFuzzer's -timeout owns SIGALRM
        auth=bool(config.get("auth")),
    )
    save = _crash_writer(Path(config["crash_dir"]), config["target"])
    stats_path = Path(config["stats"])
    last_flush = [0.0]

    def flush() -> None:
        info = {
            "runs": harness.runs,
            "crash_count": harness.crash_count,
            "split_checks": harness.split_checks,
            "max_call_s": round(harness.max_call_s, 4),
            "protocol_errors": dict(harness.errors.most_common()),
            "crashes": [
                {k: c.get(k) for k in ("kind", "message", "where", "file", "hex", "new")}
                for c in harness.crashes[:200]
            ],
        }
        tmp = stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(stats_path)
        last_flush[0] = time.monotonic()

    def on_crash(data: bytes, crash: dict[str, Any]) -> None:
        save(data, crash)
        sys.stderr.write(f"kvship-fuzz: CRASH {crash['kind']}: {crash['message'][:200]}\n")
        flush()

    harness.on_crash = on_crash
    limit_memory(int(config.get("memory_limit_mb", 0)))

    def one(data: bytes) -> None:
        harness.execute(data)
        if time.monotonic() - last_flush[0] > 0.5:
            flush()

    flush()
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()


def limit_memory(megabytes: int) -> None:
    """Cap this process's address space (RLIMIT_AS), so that an input which makes the
    machine allocate gigabytes fails fast with MemoryError (a crash of kind ``memory``)
    instead of swapping or stalling the run. 0: no cap."""
    if megabytes <= 0:
        return
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    want = megabytes * MIB
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    resource.setrlimit(resource.RLIMIT_AS, (want, hard))


def reproduce(target: str, path: Path, call_timeout: float, auth: bool = False) -> dict[str, Any]:
    """Run one saved input; print its traceback, if it crashes."""
    data = path.read_bytes()
    harness = Harness(target, call_timeout=call_timeout, check_every=1, auth=auth)
    harness.runs = -1  # so that the split check runs on this one (runs % 1 == 0)
    outcome = harness.execute(data)
    for crash in harness.crashes:
        sys.stderr.write(crash["traceback"] or crash["message"])
        sys.stderr.write("\n")
    return {
        "target": target,
        "engine": "reproduce",
        "runs": 1,
        "crashes": harness.crash_count,
        "unique_crashes": _crash_summary(harness.crashes),
        "outcome": None if outcome is None else _short(outcome.klass()),
        "hex": data.hex()[:1024],
    }


# ----------------------------------------------------------- against kvshipd
def wire_for(listener: str, data: bytes) -> bytes:
    """A fuzz input as the bytes to write to a daemon's ``listener`` (peer or engine)."""
    plan = Plan.of(data)
    return stream_of("engine-daemon" if listener == "engine" else "peer-acceptor", plan)


def exchange(address: str, payload: bytes, timeout: float) -> str:
    """Connect, write ``payload``, send EOF, read until the daemon closes: ``closed``,
    ``reset`` (closed with our bytes unread: fine), ``stuck`` (still open after
    ``timeout``) or ``refused`` (nobody listens)."""
    host, _, port = address.rpartition(":")
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except OSError:
        return "refused"
    deadline = time.monotonic() + timeout
    with sock:
        sock.settimeout(timeout)
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except TimeoutError:
            return "stuck"
        except OSError:
            pass  # closed before taking it all: read what it said
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                return "stuck"
            except OSError:
                return "reset"
            if not data:
                return "closed"
        return "stuck"


def _healthy(daemon: Any, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(daemon.url("/healthz"), timeout=timeout) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


async def good_transfer(
    src: Any, dst: Any, *, n_layers: int = 4, layer_bytes: int = 64 * KIB
) -> bool:
    """src -> dst while an engine on dst receives: bit-exact, digests equal (a compact
    tests/conftest.py good_transfer, without pytest)."""
    import numpy as np

    from kvship import Client

    request_id = f"fuzz-good-{secrets.token_hex(6)}"
    rng = np.random.default_rng(7)
    arrays = [rng.integers(0, 256, layer_bytes, dtype=np.uint8) for _ in range(n_layers)]
    tokens = list(range(17))
    layout = tuple(LayerSpec(a.dtype.name, tuple(a.shape), a.nbytes) for a in arrays)
    async with (
        Client(dst.addresses["engine_socket"]) as recv_client,
        Client(src.addresses["engine_socket"]) as send_client,
    ):

        async def receive() -> tuple[dict[int, Any], Any]:
            receiver = await recv_client.receive(request_id, timeout=20)
            got: dict[int, Any] = {}
            async for layer, array in receiver.layers(copy=True):
                got[layer] = array
            return got, receiver

        receiving = asyncio.create_task(receive())
        try:
            sender = await send_client.send(request_id, layout, peer=dst.peer, token_ids=tokens)
            try:
                for i, array in enumerate(arrays):
                    await sender.put(i, array)
                result = await sender.finish(30)
            except BaseException:
                await sender.abort()
                raise
            got, receiver = await asyncio.wait_for(receiving, 30)
        finally:
            receiving.cancel()
            await asyncio.gather(receiving, return_exceptions=True)
    return (
        sorted(got) == list(range(n_layers))
        and all(got[i].tobytes() == a.tobytes() for i, a in enumerate(arrays))
        and list(receiver.token_ids) == tokens
        and bool(receiver.complete)
        and receiver.digest == result.digest
    )


def _new_tracebacks(daemon: Any, seen: dict[str, int]) -> int:
    """Tracebacks ``daemon`` logged since the last look (a batch that made one is saved)."""
    path = daemon.log_path
    if path is None or not path.exists():
        return 0
    with open(path, "rb") as fh:
        fh.seek(seen.get(str(path), 0))
        text = fh.read()
        seen[str(path)] = fh.tell()
    return text.count(b"Traceback")


def _metric_lines(text: str, name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(rf'{name}\{{code="([A-Z_]+)"\}} ([0-9.e+]+)$', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def replay_daemon(
    *,
    corpus_dirs: Sequence[Path],
    generated: int,
    max_seconds: float,
    crash_dir: Path,
    seed: int,
    batch: int = 64,
    workers: int = 8,
    io_timeout: float = 10.0,
    max_files: int = 20_000,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Every corpus file and ``generated`` mutants against a real kvshipd (see the module
    docstring). A daemon that died or stopped answering is restarted, once per batch."""
    from kvship.bench.spawn import DaemonProcess

    files = _corpus_files(list(corpus_dirs), max_files)
    inputs: list[tuple[str, bytes]] = [(p.name, p.read_bytes()[:MAX_LEN]) for p in files]
    rng = random.Random(seed)
    pools = seeds("peer-acceptor") + seeds("engine-daemon") + [d for _, d in inputs]
    mutate = Mutator(rng, pools)
    inputs += [(f"gen-{i}", mutate()) for i in range(generated)]
    jobs = [(name, listener, data) for name, data in inputs for listener in ("peer", "engine")]
    # absolute: kvship takes a socket path only as one (a relative one is not an address)
    root = Path(workdir or tempfile.mkdtemp(prefix="kvship-fuzz-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    src = DaemonProcess("fuzz-src", root).start()
    victims = [DaemonProcess("fuzz-victim", root).start()]
    victim = victims[0]
    results: Counter[str] = Counter()
    crashes = hangs = unhealthy = batches = sent = 0
    suspects: list[str] = []
    start = time.monotonic()
    deadline = start + max_seconds
    good = False
    errors: dict[str, float] = {}
    tracebacks = 0
    log_seen: dict[str, int] = {}  # log path -> bytes of it looked at
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for lo in range(0, len(jobs), batch):
                if time.monotonic() > deadline:
                    break
                part = jobs[lo : lo + batch]
                addresses = {k: victim.addresses[k] for k in ("peer", "engine")}
                wires = [
                    (addresses[listener], wire_for(listener, data)) for _, listener, data in part
                ]
                outcomes = list(pool.map(lambda w: exchange(w[0], w[1], io_timeout), wires))
                batches += 1
                sent += len(part)
                results.update(outcomes)
                stuck = outcomes.count("stuck")
                hangs += stuck
                dead = victim.proc is None or victim.proc.poll() is not None
                sick = not dead and not _healthy(victim)
                logged = _new_tracebacks(victim, log_seen)
                if dead or sick or stuck or logged:
                    crashes += int(dead)
                    unhealthy += int(sick)
                    save = crash_dir / f"daemon-batch-{batches}"
                    save.mkdir(parents=True, exist_ok=True)
                    for name, listener, data in part:
                        (save / f"{listener}-{name}").write_bytes(data)
                    suspects.append(str(save))
                if dead or sick:
                    victim.stop()
                    victim = DaemonProcess(f"fuzz-victim-{len(victims)}", root).start()
                    victims.append(victim)
        if victim.proc is not None and victim.proc.poll() is None:
            with contextlib.suppress(OSError):
                errors = _metric_lines(victim.metrics_text(), "kvship_protocol_errors_total")
            try:
                good = asyncio.run(asyncio.wait_for(good_transfer(src, victim), 60))
            except Exception as exc:
                sys.stderr.write(f"kvship-fuzz: good transfer failed: {exc!r}\n")
                good = False
    finally:
        for daemon in (src, *victims):
            daemon.stop(timeout=10)
    for daemon in victims:
        if daemon.log_path is not None and daemon.log_path.exists():
            tracebacks += daemon.log_path.read_text(errors="replace").count("Traceback")
    wall = time.monotonic() - start
    return {
        "target": REPLAY,
        "engine": "kvshipd",
        "runs": sent,
        "inputs": len(inputs),
        "corpus_files": len(files),
        "generated": generated,
        "wall_s": round(wall, 3),
        "execs_per_s": round(sent / wall, 1) if wall > 0 else 0.0,
        "batches": batches,
        "crashes": crashes + hangs + unhealthy + int(not good) + tracebacks,
        "daemon_crashes": crashes,
        "daemon_hangs": hangs + unhealthy,
        "stuck_connections": hangs,
        "healthz_failures": unhealthy,
        "connection_results": dict(results),
        "good_transfer": good,
        "daemon_tracebacks": tracebacks,
        "protocol_errors": errors,
        "suspects": suspects[:20],
        "corpus_size": len(files),
        "coverage": None,
        "daemon_logs": [str(d.log_path) for d in victims],
        "protocol_sha": protocol_fingerprint(),
    }


# ----------------------------------------------------------------------- CLI
def _have_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=TARGETS, default="peer-acceptor")
    parser.add_argument("--runs", type=int, default=100_000, help="inputs to execute")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="wall-clock bound")
    parser.add_argument(
        "--corpus",
        type=Path,
        action="append",
        help="corpus folder (fuzzing: the target's, default build/fuzz/corpus/TARGET; "
        "--replay-daemon: any number, default the peer-acceptor and engine-daemon ones)",
    )
    parser.add_argument("--crash-dir", type=Path, help="default build/fuzz/crashes/TARGET")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--auth",
        action="store_true",
        help=f"{' and '.join(AUTH_TARGETS)}: both ends hold a pre-shared key; the harness's "
        "prefix is a whole authenticated handshake (corpus and crashes: TARGET-auth)",
    )
    parser.add_argument("--engine", choices=("auto", "atheris", "random"), default="auto")
    parser.add_argument("--call-timeout", type=float, default=2.0, help="seconds per input")
    parser.add_argument(
        "--check-every", type=int, default=8, help="split-invariant check every N-th input"
    )
    parser.add_argument(
        "--memory-limit-mb",
        type=int,
        default=2048,
        help="address-space cap of the fuzzing process (0: none); above it, MemoryError",
    )
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    parser.add_argument("--replay-daemon", action="store_true", help="replay against kvshipd")
    parser.add_argument(
        "--generated", type=int, default=500, help="--replay-daemon: mutants to add"
    )
    parser.add_argument("--batch", type=int, default=64, help="--replay-daemon: health check every")
    parser.add_argument(
        "--workdir", type=Path, help="--replay-daemon: daemon logs etc. (default: a temp dir)"
    )
    parser.add_argument("--reproduce", type=Path, help="run one saved input and exit")
    parser.add_argument("--log", type=Path, help="libFuzzer's log (default build/fuzz/TARGET-...)")
    parser.add_argument(
        "--libfuzzer-arg", action="append", default=[], help="passed on to libFuzzer"
    )
    args = parser.parse_args(argv)
    if args.runs < 0 or args.max_seconds <= 0:
        parser.error("--runs must be >= 0 and --max-seconds > 0")
    if args.auth and (args.replay_daemon or args.target not in AUTH_TARGETS):
        parser.error(f"--auth is for --target {' or '.join(AUTH_TARGETS)}")
    name = args.target + ("-auth" if args.auth else "")
    if not args.replay_daemon:  # (the daemons would inherit the cap)
        limit_memory(args.memory_limit_mb)
    if args.reproduce:
        summary = reproduce(args.target, args.reproduce, args.call_timeout, args.auth)
    elif args.replay_daemon:
        corpora = args.corpus or [BUILD / "corpus" / t for t in ("peer-acceptor", "engine-daemon")]
        summary = replay_daemon(
            corpus_dirs=corpora,
            generated=args.generated,
            max_seconds=args.max_seconds,
            crash_dir=args.crash_dir or BUILD / "crashes" / REPLAY,
            seed=args.seed,
            batch=args.batch,
            workdir=args.workdir,
        )
    else:
        corpus = (args.corpus or [BUILD / "corpus" / name])[0]
        crash_dir = args.crash_dir or BUILD / "crashes" / name
        engine = args.engine
        if engine == "auto":
            engine = "atheris" if _have_atheris() else "random"
        common: dict[str, Any] = {
            "runs": args.runs,
            "max_seconds": args.max_seconds,
            "corpus": corpus,
            "crash_dir": crash_dir,
            "seed": args.seed,
            "call_timeout": args.call_timeout,
            "check_every": args.check_every,
            "auth": args.auth,
        }
        if engine == "atheris":
            summary = fuzz_atheris(
                args.target,
                **common,
                log_path=args.log,
                extra_args=args.libfuzzer_arg,
                memory_limit_mb=args.memory_limit_mb,
            )
        else:
            summary = fuzz_random(args.target, **common)
    if args.json:
        print(json.dumps(summary, sort_keys=False))
    else:
        keys = ("target", "engine", "runs", "wall_s", "execs_per_s", "crashes", "coverage")
        print(" ".join(f"{k}={summary.get(k)}" for k in keys))
        for crash in summary.get("unique_crashes", []):
            print(f"  {crash['kind']}: {crash['message'][:200]} {crash.get('file', '')}")
    return 1 if summary.get("crashes") else 0


if __name__ == "__main__":
    child = os.environ.get(CHILD_ENV)
    if child:
        atheris_child(json.loads(child))
    else:
        sys.exit(main())
