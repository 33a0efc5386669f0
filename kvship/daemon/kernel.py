"""What the kernel lets one TCP connection carry: its socket buffer caps.

A connection never has more unacknowledged bytes in flight than its send buffer, so on a
link of round trip RTT it carries at most ``send buffer / RTT``, whatever kvship's window
says (with the default ``net.ipv4.tcp_wmem`` max of 4 MiB: 0.4 Gbit/s at 80 ms). The daemon
reads the caps once, says at start when they bind, and shows the bound per link.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc/sys/net")


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
