"""kvshipd configuration: a TOML file (daemon/kvshipd.toml documents every key) + CLI flags.

Flags override the file, the file overrides the defaults. Every value is checked here,
so a bad config fails at start with a message naming the key, never mid-transfer.
"""

from __future__ import annotations

import grp
import json
import tempfile
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..addresses import split_hostport
from ..ratelimit import RateError, parse_burst, parse_rate
from .trust import KeyFile, PeerKeys, TlsContexts, TrustError, exposed, read_token

MIB = 1024 * 1024
MAX_CHUNK = 4 * MIB  # engines choose chunk sizes up to this, or the window if smaller


class ConfigError(ValueError):
    """A config file or flag with a missing, mistyped or out-of-range value."""


def _key(default: Any, doc: str) -> Any:
    """A config key: its default and its one-paragraph description (docs/operations.md's
    reference table is generated from these; a test keeps the two equal)."""
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class Config:
    node_name: str = _key(
        "kvshipd", "Name this daemon gives itself in handshakes, logs and /healthz."
    )
    peer_listen: str = _key(
        "127.0.0.1:7470",
        "Peer data plane: other kvshipd connect here (host:port, [v6]:port). A non-loopback "
        "address needs auth_key_file or TLS (or insecure = true).",
    )
    engine_socket: str = _key(
        "/run/kvship/kvshipd.sock",
        "Local engine API on a Unix socket: engines share a staging arena in shared memory "
        '(one memcpy per byte). Its directory is created if missing. "" = off.',
    )
    engine_listen: str = _key(
        "127.0.0.1:7471",
        'Engine API over TCP, for engines on other hosts (chunks inline). "" = off.',
    )
    control_listen: str = _key(
        "127.0.0.1:7472",
        "Control plane (HTTP): /healthz, /metrics, /v1/transfers, /v1/links, /v1/route, "
        '/v1/lookup. "" = off.',
    )
    peers: str = _key(
        "",
        "Peer daemons (host:port, comma-separated; a TOML list works too) connected at start "
        "and kept connected, reconnecting with backoff: a request's first transfer to them "
        "pays no connect, handshake or router warm-up.",
    )
    connections_per_peer: int = _key(
        4, "TCP connections per destination daemon; chunk i of a transfer goes on i mod N."
    )
    max_connections_per_peer: int = _key(
        16,
        "Where the kernel's send-buffer cap (net.ipv4.tcp_wmem max) binds, a link opens "
        "more connections, up to this: enough for its rate limit (or, unlimited, its "
        "interface's speed) at the RTT its first connections measured. At or below "
        "connections_per_peer: never more.",
    )
    window_bytes: int = _key(
        8 * MIB,
        "Flow-control window per connection (64 KiB .. 2 GiB); chunks are at most 4 MiB or "
        "this. The window each connection starts with; it grows from here to "
        "window_max_bytes with the connection's measured bandwidth x RTT.",
    )
    window_max_bytes: int = _key(
        64 * MIB,
        "The most a connection's window grows to (2x what it carried in its last round "
        "trip, as TCP's receive autotuning). All connections together grow by at most "
        "staging_bytes past window_bytes. = window_bytes: fixed windows.",
    )
    warmup_bytes: int = _key(
        2 * MIB,
        "PAD bytes each new peer connection sends before its first transfer (within the "
        "link's rate limit; it stops when a transfer starts): TCP starts a connection that "
        "never carried data at 10 segments, so a link's first small transfer paid ~6 RTTs "
        "of slow start. 0: none.",
    )
    unacked_copy_min_rtt_s: float = _key(
        0.005,
        "Sent chunks wait for the receiver's ACK (resume may send them again). Past half "
        "the engine's arena they are copied into daemon memory so the engine can stage the "
        "next ones, on links whose kernel RTT is at least this; below it the ACK returns "
        "about as soon as a copy is made, and the chunk keeps its arena space. 0: copy "
        "past half the arena at any RTT.",
    )
    max_transfers_per_connection: int = _key(64, "Transfers one connection may carry at once.")
    peer_rate: str = _key(
        "unlimited",
        "Token bucket of each peer link, in bytes on the wire (after compression): "
        '"10gbit", "1.5Gbit/s", "125MB/s" or "unlimited". Live: PUT /v1/links/{peer}, SIGHUP.',
    )
    peer_burst: str = _key("16MiB", "Burst of each link's bucket (keep at least two chunks).")
    egress_rate: str = _key("unlimited", "Token bucket of all peer links together.")
    egress_burst: str = _key("16MiB", "Burst of the egress bucket.")
    compression: str = _key(
        "auto",
        "Chunk compression towards peers: raw | zstd | split (split16 for 2-byte dtypes, "
        "zstd for the rest) | auto (split's codecs, only while the link is the bottleneck).",
    )
    compress_level: int = _key(1, "zstd level of the zstd codec (1..19).")
    compress_workers: int = _key(2, "Threads that compress and decompress chunks (1..64).")
    store_bytes: int = _key(
        512 * MIB,
        "Prefix dedup block stores: KV kept for later requests that share a prefix, all "
        "models together (LRU, blocks in use pinned).",
    )
    staging_bytes: int = _key(
        64 * MIB,
        "Received KV held in daemon memory (all transfers) when no engine arena can take it; "
        "past it senders get no credit, except what finishes the layer an engine waits for "
        "(then the transfer filling it is paused: HOLD). At least window_bytes, and at least "
        "the largest layer a peer sends (an OPEN with a larger layer is refused: "
        "TRANSFER_TOO_LARGE).",
    )
    subscribe_timeout_s: float = _key(30.0, "Default wait of an engine's receive() for a transfer.")
    retention_s: float = _key(
        120.0, "A received transfer nobody claims, or one that stalls, is dropped after this."
    )
    connect_timeout_s: float = _key(10.0, "Connecting to a peer daemon gives up after this.")
    resume_timeout_s: float = _key(
        60.0,
        "A transfer whose peer connections are lost resumes on new ones (reconnecting with "
        "backoff, sending only what the receiver lacks) for up to this long; then both "
        "sides fail it (TIMEOUT) and both engines hear why.",
    )
    drain_timeout_s: float = _key(
        30.0, "On SIGTERM: running transfers may finish for up to this long."
    )
    auth_key_file: str = _key(
        "",
        "Pre-shared keys (TOML, mode 0600; docs/security.md): peers must prove one in the "
        'handshake (HMAC challenge-response, both ways), and this daemon proves its own. "" = '
        "no authentication.",
    )
    auth_key_id: str = _key(
        "",
        'Key this daemon proves when it connects to peers (an id in auth_key_file; "" = the '
        "file's only key). The file's [peers] table may name another key per peer.",
    )
    allow_senders: str = _key(
        "",
        "Key ids that may connect and send KV into this daemon (comma-separated, or a TOML "
        'list); "" = every key in auth_key_file.',
    )
    tls_cert: str = _key(
        "",
        "TLS 1.3 on peer links, mutual: this daemon's certificate chain (PEM). With tls_key "
        'and tls_ca; reloaded on SIGHUP. "" = no TLS.',
    )
    tls_key: str = _key("", "Private key of tls_cert (PEM; mode 0600).")
    tls_ca: str = _key(
        "",
        "CA bundle (PEM) peers' certificates must chain to; a peer's certificate must also "
        "name the host this daemon dials (SAN DNS or IP).",
    )
    insecure: bool = _key(
        False,
        "Allow a non-loopback peer_listen without auth_key_file or TLS, or a non-loopback "
        "engine_listen: anyone who reaches the port can push KV into the store. Warned at "
        "start and in /healthz.",
    )
    control_token_file: str = _key(
        "",
        "File (mode 0600) with the bearer token mutating control endpoints (PUT /v1/links/...) "
        'need from non-loopback clients; "" = those endpoints are loopback only.',
    )
    engine_socket_group: str = _key(
        "",
        'Group given the engine socket (mode 0660), so engines in it may connect; "" = the '
        "daemon's own group.",
    )
    log_level: str = _key("info", "debug | info | warning | error.")
    log_format: str = _key(
        "plain", "plain (human lines) | json (one JSON object per line, for log pipelines)."
    )

    def validate(self) -> Config:
        def need(cond: bool, key: str, why: str) -> None:
            if not cond:
                raise ConfigError(f"{key}: {why} (got {getattr(self, key)!r})")

        need(bool(self.node_name) and len(self.node_name) <= 255, "node_name", "1..255 chars")
        need(1 <= self.connections_per_peer <= 64, "connections_per_peer", "must be 1..64")
        need(1 <= self.max_connections_per_peer <= 64, "max_connections_per_peer", "1..64")
        need(64 * 1024 <= self.window_bytes < 2**31, "window_bytes", "must be 64 KiB .. 2 GiB")
        need(
            self.window_bytes <= self.window_max_bytes < 2**31,
            "window_max_bytes",
            "must be window_bytes .. 2 GiB",
        )
        need(
            1 <= self.max_transfers_per_connection <= 4096,
            "max_transfers_per_connection",
            "1..4096",
        )
        need(
            self.compression in ("raw", "zstd", "split", "auto"),
            "compression",
            "raw|zstd|split|auto",
        )
        need(1 <= self.compress_level <= 19, "compress_level", "must be 1..19")
        for key in ("peer_rate", "egress_rate"):
            try:
                parse_rate(getattr(self, key), key)
            except RateError as exc:
                raise ConfigError(str(exc)) from None
        for key in ("peer_burst", "egress_burst"):
            try:
                parse_burst(getattr(self, key), key)
            except RateError as exc:
                raise ConfigError(str(exc)) from None
        need(1 <= self.compress_workers <= 64, "compress_workers", "must be 1..64")
        need(0 <= self.warmup_bytes <= 1 << 30, "warmup_bytes", "must be 0 .. 1 GiB")
        need(0 <= self.unacked_copy_min_rtt_s <= 1, "unacked_copy_min_rtt_s", "must be 0 .. 1 s")
        need(self.store_bytes >= 4 * MIB, "store_bytes", "must be >= 4 MiB")
        need(self.staging_bytes >= self.window_bytes, "staging_bytes", "must be >= window_bytes")
        for key in (
            "subscribe_timeout_s",
            "retention_s",
            "connect_timeout_s",
            "resume_timeout_s",
            "drain_timeout_s",
        ):
            need(0 < getattr(self, key) <= 86400, key, "must be > 0 and at most a day")
        need(
            self.log_level.lower() in ("debug", "info", "warning", "error"),
            "log_level",
            "debug|info|warning|error",
        )
        need(self.log_format in ("plain", "json"), "log_format", "plain|json")
        for peer in self.peer_list:
            try:
                split_hostport(peer)
            except ValueError:
                need(False, "peers", f"{peer!r} is not host:port or [v6]:port")
        for key in ("peer_listen", "engine_listen", "control_listen"):
            value = getattr(self, key)
            if value or key == "peer_listen":
                try:
                    split_hostport(value)
                except ValueError:
                    need(False, key, "must be host:port or [v6]:port")
        need(
            bool(self.engine_socket or self.engine_listen),
            "engine_socket",
            "engine_socket or engine_listen must be set",
        )
        tls = (self.tls_cert, self.tls_key, self.tls_ca)
        need(all(tls) or not any(tls), "tls_cert", "tls_cert, tls_key and tls_ca go together")
        need(
            bool(self.auth_key_file) or not (self.auth_key_id or self.allow_senders),
            "auth_key_id" if self.auth_key_id else "allow_senders",
            "needs auth_key_file",
        )
        if not self.insecure:
            need(
                not exposed(self.peer_listen) or self.protected,
                "peer_listen",
                "not loopback, and neither auth_key_file nor TLS is set: anyone who reaches "
                "it could push KV into this daemon's store. Configure auth_key_file and/or "
                "tls_cert (docs/security.md), or set insecure = true",
            )
            need(
                not exposed(self.engine_listen),
                "engine_listen",
                "not loopback: engines authenticate by reaching loopback or the Unix socket "
                "only. Keep it on loopback, or set insecure = true",
            )
        return self

    @property
    def protected(self) -> bool:
        """Peers authenticate (a key file) or the link is mutual TLS."""
        return bool(self.auth_key_file or self.tls_cert)

    @property
    def exposure_warnings(self) -> list[str]:
        """What ``insecure = true`` let through: said at start and in /healthz."""
        out = []
        if exposed(self.peer_listen) and not self.protected:
            out.append(
                f"peer_listen {self.peer_listen} takes unauthenticated peers (insecure = true)"
            )
        if exposed(self.engine_listen):
            out.append(
                f"engine_listen {self.engine_listen} takes any engine on the network "
                "(insecure = true)"
            )
        return out

    @property
    def sender_list(self) -> list[str]:
        return _listed(self.allow_senders)

    @property
    def peer_list(self) -> list[str]:
        return _listed(self.peers)


def _listed(value: str) -> list[str]:
    """A comma-separated key's items (a TOML list was joined with commas on reading)."""
    return [item.strip() for item in value.split(",") if item.strip()]


_TYPES = {f.name: f.type for f in fields(Config)}
_CASTS: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}
_LISTS = ("peers", "allow_senders")  # str keys a TOML list may give


def _coerce(key: str, value: Any) -> Any:
    if key in _LISTS and isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ",".join(value)  # peers = ["a:7470", "b:7470"]
    kind = _CASTS[str(_TYPES[key])]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
    return value


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- TOML file (table [kvshipd] or top level) <- ``overrides`` (CLI flags)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        data = data.get("kvshipd", data)
        for key, value in data.items():
            if key not in _TYPES:
                raise ConfigError(f"{path}: unknown key {key!r}")
            try:
                values[key] = _coerce(key, value)
            except ConfigError as exc:
                raise ConfigError(f"{path}: {exc}") from None
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in _TYPES:
            raise ConfigError(f"unknown setting {key!r}")
        values[key] = _coerce(key, value)
    try:
        return replace(Config(), **values).validate()
    except ConfigError as exc:
        where = f"{path} (or its flags)" if path is not None else "flags"
        raise ConfigError(f"{where}: {exc}") from None


def preflight(config: Config) -> None:
    """What the config needs of the machine, checked before any port is bound: the key,
    token and TLS files load; the engine socket's group exists, and its directory exists
    (it is created, as a start would) and takes a new file."""
    try:
        load_trust(config)
    except TrustError as exc:
        raise ConfigError(str(exc)) from None
    if config.engine_socket_group:
        try:
            grp.getgrnam(config.engine_socket_group)
        except KeyError:
            raise ConfigError(
                f"engine_socket_group: no group {config.engine_socket_group!r}"
            ) from None
    if not config.engine_socket:
        return
    directory = Path(config.engine_socket).parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".kvshipd-check-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"engine_socket: cannot make the socket in {directory}: {exc.strerror or exc}"
        ) from None


@dataclass(frozen=True)
class Trust:
    """The secrets and contexts the config names, loaded."""

    accepted_keys: dict[str, bytes] | None  # peer listener: None = no authentication
    peer_keys: PeerKeys | None  # what this daemon proves when it connects
    tls: TlsContexts | None
    control_token: str  # "" = mutating control endpoints are loopback only


def load_trust(config: Config, reuse: TlsContexts | None = None) -> Trust:
    """Read the key, token and TLS files (TrustError naming the file if one is bad).
    ``reuse``: TLS contexts a listener holds (SIGHUP): the files load into them, after
    everything else read well, rather than into new ones."""
    accepted = peer_keys = None
    if config.auth_key_file:
        keys = KeyFile.load(config.auth_key_file)
        accepted = keys.accepted(config.sender_list)
        peer_keys = PeerKeys(keys, keys.own(config.auth_key_id))
    token = read_token(config.control_token_file) if config.control_token_file else ""
    tls = None
    if config.tls_cert and reuse is not None:
        reuse.reload(config.tls_cert, config.tls_key, config.tls_ca)
        tls = reuse
    elif config.tls_cert:
        tls = TlsContexts(config.tls_cert, config.tls_key, config.tls_ca)
    return Trust(accepted, peer_keys, tls, token)


def reference_markdown() -> str:
    """The config reference table of docs/operations.md, made from the code."""
    rows = ["| key | type | default | what it does |", "|---|---|---|---|"]
    for f in fields(Config):
        default = json.dumps(f.default)
        rows.append(f"| `{f.name}` | {f.type} | `{default}` | {f.metadata['doc']} |")
    return "\n".join(rows) + "\n"
