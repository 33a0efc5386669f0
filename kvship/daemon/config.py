"""kvshipd configuration: a TOML file (daemon/kvshipd.toml documents every key) + CLI flags.

Flags override the file, the file overrides the defaults. Every value is checked here,
so a bad config fails at start with a message naming the key, never mid-transfer.
"""

from __future__ import annotations

import json
import tempfile
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..addresses import split_hostport
from ..ratelimit import RateError, parse_burst, parse_rate

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
        "0.0.0.0:7470", "Peer data plane: other kvshipd connect here (host:port, [v6]:port)."
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
    window_bytes: int = _key(
        8 * MIB,
        "Flow-control window per connection (64 KiB .. 2 GiB); chunks are at most 4 MiB or "
        "this. Size it to bandwidth x RTT / connections_per_peer.",
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
        "past it senders get no credit. At least window_bytes, and at least the largest layer a "
        "peer sends (an OPEN with a larger layer is refused: TRANSFER_TOO_LARGE).",
    )
    subscribe_timeout_s: float = _key(30.0, "Default wait of an engine's receive() for a transfer.")
    retention_s: float = _key(
        120.0, "A received transfer nobody claims, or one that stalls, is dropped after this."
    )
    connect_timeout_s: float = _key(10.0, "Connecting to a peer daemon gives up after this.")
    drain_timeout_s: float = _key(
        30.0, "On SIGTERM: running transfers may finish for up to this long."
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
        need(64 * 1024 <= self.window_bytes < 2**31, "window_bytes", "must be 64 KiB .. 2 GiB")
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
        need(self.store_bytes >= 4 * MIB, "store_bytes", "must be >= 4 MiB")
        need(self.staging_bytes >= self.window_bytes, "staging_bytes", "must be >= window_bytes")
        for key in ("subscribe_timeout_s", "retention_s", "connect_timeout_s", "drain_timeout_s"):
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
        return self

    @property
    def peer_list(self) -> list[str]:
        return [p.strip() for p in self.peers.split(",") if p.strip()]


_TYPES = {f.name: f.type for f in fields(Config)}
_CASTS: dict[str, type] = {"str": str, "int": int, "float": float}


def _coerce(key: str, value: Any) -> Any:
    if key == "peers" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ",".join(value)  # peers = ["a:7470", "b:7470"]
    kind = _CASTS[str(_TYPES[key])]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
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
    """What the config needs of the machine, checked before any port is bound: the engine
    socket's directory exists (it is created, as a start would) and takes a new file."""
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


def reference_markdown() -> str:
    """The config reference table of docs/operations.md, made from the code."""
    rows = ["| key | type | default | what it does |", "|---|---|---|---|"]
    for f in fields(Config):
        default = json.dumps(f.default)
        rows.append(f"| `{f.name}` | {f.type} | `{default}` | {f.metadata['doc']} |")
    return "\n".join(rows) + "\n"
