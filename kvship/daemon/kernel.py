"""What the kernel lets one TCP connection carry: its socket buffer caps.

A connection never has more unacknowledged bytes in flight than its send buffer, so on a
link of round trip RTT it carries at most ``send buffer / RTT``, whatever kvship's window
says (with the default ``net.ipv4.tcp_wmem`` max of 4 MiB: 0.4 Gbit/s at 80 ms). The daemon
reads the caps once, says at start when they bind, and shows the bound per link.
"""

from __future__ import annotations

import fcntl
import math
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc/sys/net")
SYS_NET = Path("/sys/class/net")
_SIOCGIFADDR = 0x8915


def _read_ints(path: Path) -> list[int] | None:
    try:
        return [int(x) for x in path.read_text().split()]
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class TcpBuffers:
    """The autotuning caps (the max of ``tcp_wmem`` / ``tcp_rmem``) in bytes; None where
    the kernel does not say (not Linux, or no /proc)."""

    send_max: int | None
    receive_max: int | None

    @classmethod
    def read(cls, root: Path = PROC) -> TcpBuffers:
        wmem = _read_ints(root / "ipv4" / "tcp_wmem")
        rmem = _read_ints(root / "ipv4" / "tcp_rmem")
        return cls(wmem[-1] if wmem else None, rmem[-1] if rmem else None)

    def advice(self, window_bytes: int) -> list[str]:
        """One line per cap below the per-connection window, naming the sysctl to raise."""
        out = []
        for cap, name, side in (
            (self.send_max, "net.ipv4.tcp_wmem", "send"),
            (self.receive_max, "net.ipv4.tcp_rmem", "receive"),
        ):
            if cap is not None and cap < window_bytes:
                out.append(
                    f"the kernel caps a TCP {side} buffer at {cap} B ({name} max), below the "
                    f"{window_bytes} B window per connection: on a long-RTT link each "
                    f"connection carries at most {cap} B per round trip; raise {name} (its "
                    f"third value) to at least {window_bytes}"
                )
        return out

    def bound_Bps(self, connections: int, rtt_s: float | None) -> float | None:
        """The most a link of ``connections`` can carry at ``rtt_s`` by the send cap."""
        if self.send_max is None or not rtt_s or rtt_s <= 0:
            return None
        return connections * self.send_max / rtt_s

    def connections_for(self, rate_Bps: float | None, rtt_s: float | None) -> int | None:
        """How many connections carry ``rate_Bps`` at ``rtt_s`` under the send cap (None
        where the cap, the rate or the RTT is unknown)."""
        if self.send_max is None or not rate_Bps or not rtt_s or rtt_s <= 0:
            return None
        return math.ceil(rate_Bps * rtt_s / self.send_max)


def interface_speed_Bps(sock: socket.socket) -> float | None:
    """The speed the kernel reports for the interface ``sock`` leaves by (IPv4: the one
    holding its local address), in bytes/s: what a link with no rate limit may reach.
    None where it does not say (loopback, IPv6, virtual devices without a speed)."""
    try:
        local = sock.getsockname()[0]
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    if sock.family != socket.AF_INET:
        return None
    for name in names:
        try:
            req = struct.pack("256s", name.encode()[:15])
            addr = socket.inet_ntoa(fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, req)[20:24])
        except OSError:
            continue
        if addr != local:
            continue
        try:
            mbit = int((SYS_NET / name / "speed").read_text())
        except (OSError, ValueError):
            return None
        return mbit * 1e6 / 8 if mbit > 0 else None
    return None
