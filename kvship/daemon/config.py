"""kvshipd configuration: a TOML file (daemon/kvshipd.toml documents every key) + CLI flags.

Flags override the file, the file overrides the defaults. Every value is checked here,
so a bad config fails at start with a message naming the key, never mid-transfer.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from ..ratelimit import RateError, parse_burst, parse_rate

MIB = 1024 * 1024
MAX_CHUNK = 4 * MIB  # engines choose chunk sizes up to this, or the window if smaller


class ConfigError(ValueError):
    """A config file or flag with a missing, mistyped or out-of-range value."""


@dataclass(frozen=True)
class Config:
    node_name: str = "kvshipd"
    # Peer data plane: other kvshipd connect here.
    peer_listen: str = "0.0.0.0:7470"
    # Local engine API: a Unix socket (shared-memory staging) and/or TCP ("" = off).
    engine_socket: str = "/run/kvship/kvshipd.sock"
    engine_listen: str = "127.0.0.1:7471"
    # Control plane (aiohttp): /healthz, /metrics, /v1/transfers.
    control_listen: str = "127.0.0.1:7472"
    connections_per_peer: int = 4
    window_bytes: int = 8 * MIB  # credit window per connection
    max_transfers_per_connection: int = 64
    # Token buckets in bytes on the wire (after compression): each peer link, and all of
    # them together ("egress"). Rates like "10gbit", "1.5Gbit/s", "125MB/s" or "unlimited";
    # bursts like "16MiB" (at least two chunks, see docs/ratelimit.md).
    peer_rate: str = "unlimited"
    peer_burst: str = "16MiB"
    egress_rate: str = "unlimited"
    egress_burst: str = "16MiB"
    # Chunk compression towards peers: raw | zstd | split (split16 for 2-byte dtypes, zstd
    # for the rest) | auto (split's codecs, only while the link is the bottleneck).
    compression: str = "auto"
    compress_level: int = 1  # zstd level of the zstd codec
    compress_workers: int = 2  # threads that compress and decompress chunks
    # Prefix dedup: KV blocks kept (LRU, content-addressed) for later requests that share a
    # prefix; up to 4 models share it.
    store_bytes: int = 512 * MIB
    staging_bytes: int = 64 * MIB  # received bytes held in daemon memory, all transfers
    subscribe_timeout_s: float = 30.0  # default wait of an engine's receive()
    retention_s: float = 120.0  # how long a received, unclaimed transfer is kept
    connect_timeout_s: float = 10.0
    drain_timeout_s: float = 30.0  # SIGTERM: how long running transfers may finish
    log_level: str = "info"

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
        need(bool(self.peer_listen), "peer_listen", "must be host:port")
        need(
            bool(self.engine_socket or self.engine_listen),
            "engine_socket",
            "engine_socket or engine_listen must be set",
        )
        return self


_TYPES = {f.name: f.type for f in fields(Config)}
_CASTS: dict[str, type] = {"str": str, "int": int, "float": float}


def _coerce(key: str, value: Any) -> Any:
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
            values[key] = _coerce(key, value)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in _TYPES:
            raise ConfigError(f"unknown setting {key!r}")
        values[key] = _coerce(key, value)
    return replace(Config(), **values).validate()
