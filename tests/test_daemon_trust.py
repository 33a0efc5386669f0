"""Trust between real daemons (docs/security.md): pre-shared keys, mutual TLS, the refusals
of who does not hold them, safe defaults and the control plane's guard. Real kvshipd
subprocesses on loopback; the wire bytes are captured by a relay in between."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import signal
import ssl
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from conftest import (
    LogMark,
    RawPeer,
    error_count,
    off_loop,
    parse_frames,
    random_layers,
    receive_all,
    same_bytes,
    send_layers,
    wait_for_condition,
)
from kvship import Client
from kvship.bench.pki import make_pki
from kvship.bench.spawn import DaemonProcess
from kvship.cli.keygen import key_file_text
from kvship.daemon.config import Config, ConfigError, load_config
from kvship.daemon.control import VIEW_KEY, guard_changes
from kvship.errors import KvshipError
from kvship.protocol import (
    MAGIC,
    ROLE_PEER,
    Connection,
    ErrorCode,
    FrameType,
    Hello,
    Role,
)
from kvship.protocol.auth import AUTH_PSK, PeerKey, hello_auth

SECRET = bytes.fromhex("5e" * 8 + "a7" * 8 + "c3" * 16)


def key_file(directory: Path, key_id: str = "cluster", secret: bytes = SECRET) -> Path:
    path = directory / f"{key_id}-{secret[:2].hex()}.toml"
    path.write_text(key_file_text(key_id, secret))
    path.chmod(0o600)
    return path


@contextlib.contextmanager
def daemons(workdir: Path, *args_each: list[str]) -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    try:
        for i, args in enumerate(args_each):
            started.append(DaemonProcess(f"d{i}", workdir, args).start())
        yield started
    finally:
        for daemon in started:
            daemon.stop(timeout=10)


class Relay:
    """A loopback TCP relay that keeps every byte it forwards, both ways."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.forward = bytearray()  # initiator -> acceptor, all connections
        self.backward = bytearray()
        self.streams: list[bytearray] = []  # what each connection sent forward
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Relay:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        sent = bytearray()
        self.streams.append(sent)
        for task in (
            asyncio.create_task(self._pipe(reader, up_writer, (self.forward, sent))),
            asyncio.create_task(self._pipe(up_reader, writer, (self.backward,))),
        ):
            self.tasks.add(task)

    @staticmethod
    async def _pipe(
        src: asyncio.StreamReader, dst: asyncio.StreamWriter, keep: tuple[bytearray, ...]
    ) -> None:
        try:
            while data := await src.read(65536):
                for buf in keep:
                    buf += data
                dst.write(data)
                await dst.drain()
        except ConnectionError:
            pass
        finally:
            dst.close()


async def ship(src: DaemonProcess, dst: DaemonProcess, peer: str, seed: int = 1) -> None:
    """Send 3 random layers src -> peer (which leads to dst); dst's engine gets them bit-exact."""
    arrays = random_layers(3, 96 * 1024, seed)
    request_id = f"trust-{seed}-{os.getpid()}"
    async with Client(dst.socket_path) as rx, Client(src.socket_path) as tx:
        receiving = asyncio.create_task(receive_all(rx, request_id))
        try:
            await asyncio.wait_for(send_layers(tx, request_id, arrays, peer), 30)
            got, _ = await asyncio.wait_for(receiving, 30)
        finally:
            receiving.cancel()
            await asyncio.gather(receiving, return_exceptions=True)
    assert sorted(got) == [0, 1, 2]
    assert all(same_bytes(got[i], arrays[i]) for i in range(3))


async def test_keyed_daemons_ship_and_the_key_never_crosses_the_wire(tmp_path: Path) -> None:
    keys = ["--auth-key-file", str(key_file(tmp_path))]
    with daemons(tmp_path, keys, keys) as (a, b):
        async with Relay(b.peer) as relay:
            await ship(a, b, relay.address)
        health = b.get_json("/healthz")
        assert health["security"]["peer_auth"] == "psk" and health["insecure"] is False
        assert health["security"]["accepted_keys"] == ["cluster"]
        wire = bytes(relay.forward + relay.backward)
        assert FrameType.AUTH_CHALLENGE in wire and MAGIC in wire
        for form in (SECRET, SECRET.hex().encode(), SECRET.hex().upper().encode()):
            assert form not in wire
        assert SECRET.hex() not in b.log_tail() + a.log_tail()

        # The recorded handshake of one of those connections, replayed: refused.
        frames, _ = parse_frames(relay.streams[0][len(MAGIC) :])
        hello, proof = (frame_bytes(t, body) for t, body in frames[:2])
        assert frames[1][0] == FrameType.AUTH_PROOF
        before, mark = error_count(b, "AUTH_FAILED"), LogMark.of(b)
        peer = await RawPeer.connect(b.peer)
        try:
            await peer.send(MAGIC + hello + proof)
            goaway = await peer.goaway()
        finally:
            peer.close()
        assert goaway.code == ErrorCode.AUTH_FAILED and "replayed" in goaway.message
        assert FrameType.HELLO_ACK not in [t for t, _ in peer.frames]
        await wait_for_condition(off_loop(lambda: error_count(b, "AUTH_FAILED") == before + 1))
        await mark.wait_for_async("AUTH_FAILED")


NOBODY = hello_auth(b"n" * 32, "nobody")


def wrong_key_hello() -> tuple[Connection, bytes]:
    conn = Connection(role=Role.PEER, initiator=True, key=PeerKey("cluster", b"w" * 32))
    return conn, conn.initiate(Hello(ROLE_PEER, "intruder"))


async def test_every_refusal_is_auth_failed_counted_and_logged_once(tmp_path: Path) -> None:
    keys = ["--auth-key-file", str(key_file(tmp_path))]
    with daemons(tmp_path, keys, keys) as (a, b):
        before, mark = error_count(b, "AUTH_FAILED"), LogMark.of(b)
        cases = {
            "no key": MAGIC + Hello(ROLE_PEER, "x").encode(),
            "unknown method": MAGIC + Hello(ROLE_PEER, "x", auth_method=9, auth=b"t").encode(),
            "unknown key id": MAGIC
            + Hello(
                ROLE_PEER, "x", auth_method=AUTH_PSK, auth=hello_auth(b"n" * 32, "nobody")
            ).encode(),
        }
        for what, data in cases.items():
            peer = await RawPeer.connect(b.peer)
            try:
                await peer.send(data)
                goaway = await peer.goaway()
            finally:
                peer.close()
            assert goaway.code == ErrorCode.AUTH_FAILED, (what, goaway)
        # wrong key: the core proves it, and fails on the daemon's side
        conn, hello = wrong_key_hello()
        peer = await RawPeer.connect(b.peer)
        try:
            await peer.send(hello)
            frame = await peer.read_frame()
            assert frame is not None and frame[0] == FrameType.AUTH_CHALLENGE
            conn.receive_data(frame_bytes(*frame))
            await peer.send(conn.prove())
            goaway = await peer.goaway()
        finally:
            peer.close()
        assert goaway.code == ErrorCode.AUTH_FAILED and "does not verify" in goaway.message
        await wait_for_condition(off_loop(lambda: error_count(b, "AUTH_FAILED") == before + 4))
        # one line for the four (same host, same code), the rest held back
        await mark.wait_for_async("AUTH_FAILED")
        await asyncio.sleep(0.3)
        assert sum("AUTH_FAILED" in line for line in mark.since().splitlines()) == 1
        await ship(a, b, b.peer, seed=2)  # the daemon serves its real peer all along


def frame_bytes(ftype: int, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + bytes([ftype, 0, 0, 0]) + body


async def test_a_sender_with_the_wrong_key_fails_clearly(tmp_path: Path) -> None:
    good = ["--auth-key-file", str(key_file(tmp_path))]
    bad = ["--auth-key-file", str(key_file(tmp_path, secret=b"\x11" * 32))]
    with daemons(tmp_path, bad, good) as (a, b):
        with pytest.raises(KvshipError) as info:
            await ship(a, b, b.peer, seed=3)
        assert "AUTH_FAILED" in str(info.value), info.value
        assert error_count(b, "AUTH_FAILED") >= 1


async def test_mutual_tls_ships_bit_exact_and_reloads_on_sighup(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    with daemons(tmp_path, pki.flags(), pki.flags()) as (a, b):
        await ship(a, b, b.peer, seed=4)
        assert b.get_json("/healthz")["security"]["tls"] is True
        # plain TCP to the TLS listener: no kvship handshake happens
        peer = await RawPeer.connect(b.peer)
        try:
            await peer.send(MAGIC + Hello(ROLE_PEER, "plain").encode())
            assert await peer.read_frame() is None
        finally:
            peer.close()
        # a client certificate from another CA: refused in the TLS handshake
        other = make_pki(tmp_path / "other", "other")
        assert not await tls_handshake_ok(b.peer, other.cert, other.key, pki.ca)
        assert await tls_handshake_ok(b.peer, pki.cert, pki.key, pki.ca)
        serial = await server_serial(b.peer, pki)
        # new certificate at the same paths, SIGHUP: new connections get it
        fresh = make_pki(tmp_path / "fresh")
        for src, dst in ((fresh.cert, pki.cert), (fresh.key, pki.key), (fresh.ca, pki.ca)):
            Path(dst).write_bytes(Path(src).read_bytes())
        assert b.proc is not None
        mark = LogMark.of(b)
        b.proc.send_signal(signal.SIGHUP)
        await mark.wait_for_async("reloaded")
        assert await server_serial(b.peer, pki) != serial


async def tls_handshake_ok(address: str, cert: str, key: str, ca: str) -> bool:
    ctx = ssl.create_default_context(cafile=ca)
    ctx.load_cert_chain(cert, key)
    host, _, port = address.rpartition(":")
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, int(port), ssl=ctx), 10
        )
        writer.write(MAGIC + Hello(ROLE_PEER, "probe").encode())
        ok = bool(await asyncio.wait_for(reader.read(8), 10))  # TLS 1.3: refusal shows here
        writer.close()
        return ok
    except (ssl.SSLError, ConnectionError):
        return False


async def server_serial(address: str, pki: object) -> int:
    ctx = ssl.create_default_context(cafile=pki.ca)
    ctx.load_cert_chain(pki.cert, pki.key)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # we only read the certificate it presents
    host, _, port = address.rpartition(":")
    _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port), ssl=ctx), 10)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return hash(der)


def test_an_exposed_listener_needs_keys_tls_or_insecure(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="peer_listen: not loopback"):
        load_config(None, {"peer_listen": "0.0.0.0:7470"})
    with pytest.raises(ConfigError, match="engine_listen: not loopback"):
        load_config(None, {"engine_listen": "[::]:7471"})
    keyed = load_config(
        None, {"peer_listen": "0.0.0.0:7470", "auth_key_file": str(key_file(tmp_path))}
    )
    assert keyed.exposure_warnings == []
    loose = load_config(None, {"peer_listen": "0.0.0.0:7470", "insecure": True})
    assert loose.exposure_warnings and "unauthenticated" in loose.exposure_warnings[0]
    assert Config().peer_listen.startswith("127.0.0.1:")  # the default stays home
    run = subprocess.run(
        [sys.executable, "-m", "kvship.daemon.main", "--check-config", "/dev/null",
         "--peer-listen", "0.0.0.0:7470", "--engine-socket", str(tmp_path / "k.sock")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2 and "insecure = true" in run.stderr


def test_a_key_file_others_may_read_is_refused(tmp_path: Path) -> None:
    path = key_file(tmp_path)
    path.chmod(0o644)
    run = subprocess.run(
        [sys.executable, "-m", "kvship.daemon.main", "--check-config", "/dev/null",
         "--auth-key-file", str(path), "--engine-socket", str(tmp_path / "k.sock")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2 and "chmod 600" in run.stderr
    assert SECRET.hex() not in run.stderr


def test_engine_socket_mode_and_group(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    with daemons(tmp_path, ["--engine-socket-group", group]) as (d,):
        st = os.stat(d.socket_path)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid()


class _Transport:
    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.peer if name == "peername" else default

    def is_closing(self) -> bool:
        return False


@pytest.mark.parametrize(
    ("remote", "header", "status"),
    [
        ("127.0.0.1", "", 200),  # loopback: changes allowed
        ("::1", "", 200),
        ("10.1.2.3", "", 403),  # from the network without the token
        ("10.1.2.3", "Bearer wrong-token-0123456789", 403),
        ("10.1.2.3", "Bearer right-token-0123456789", 200),
    ],
)
async def test_control_changes_need_loopback_or_the_token(
    remote: str, header: str, status: int
) -> None:
    from kvship.daemon.metrics import Metrics

    class View:
        metrics = Metrics()

        @staticmethod
        def control_token() -> str:
            return "right-token-0123456789"

    app = web.Application()
    app[VIEW_KEY] = View()  # type: ignore[assignment]
    headers = {"Authorization": header} if header else {}
    request = make_mocked_request(
        "PUT", "/v1/links/x:1", headers=headers, app=app, transport=_Transport((remote, 5555))
    )

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response({"changed": True})

    response = await guard_changes(request, handler)
    assert response.status == status
    get = make_mocked_request("GET", "/v1/links", app=app, transport=_Transport((remote, 1)))
    assert (await guard_changes(get, handler)).status == 200  # reads stay open


async def test_allow_senders_and_a_key_rotation_on_sighup(tmp_path: Path) -> None:
    """A key in the file but not in allow_senders may not send; SIGHUP re-reads the file:
    the new allow-list lets it in, with no restart and the old link untouched."""
    two = tmp_path / "two.toml"
    two.write_text(key_file_text("cluster", SECRET) + 'other = "' + ("ab" * 32) + '"\n')
    two.chmod(0o600)
    config = tmp_path / "decode.toml"
    head = f'auth_key_file = "{two}"\nauth_key_id = "other"\n'
    config.write_text(head + 'allow_senders = ["other"]\n')
    sender = ["--auth-key-file", str(key_file(tmp_path))]
    with daemons(tmp_path, sender, ["--config", str(config)]) as (a, b):
        with pytest.raises(KvshipError) as info:
            await ship(a, b, b.peer, seed=5)
        assert "AUTH_FAILED" in str(info.value) and "not accepted" in str(info.value)
        config.write_text(head + 'allow_senders = ["other", "cluster"]\n')
        assert b.proc is not None
        mark = LogMark.of(b)
        b.proc.send_signal(signal.SIGHUP)
        await mark.wait_for_async("reloaded")
        await ship(a, b, b.peer, seed=6)
        assert b.get_json("/healthz")["security"]["accepted_keys"] == ["cluster", "other"]
