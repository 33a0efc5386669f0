"""``host:port`` addresses as users write them (IPv6 in brackets): the one parser every
layer uses, so a daemon, the client and the CLI accept and print the same forms."""

from __future__ import annotations


def split_hostport(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6addr]:port`` -> (host, port), with a clear error otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"address {address!r} is not host:port, [v6]:port or a socket path")
    return host.strip("[]"), int(port)


def join_hostport(host: str, port: int) -> str:
    """The inverse: brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
