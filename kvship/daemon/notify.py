"""The systemd notification protocol (``sd_notify(3)``), standard library only.

Under ``Type=notify`` systemd hands the daemon a datagram socket in ``$NOTIFY_SOCKET`` and
waits for ``READY=1`` before it calls the unit started: units ordered after kvshipd then
start only once every listener is bound. ``RELOADING=1``/``READY=1`` bracket a SIGHUP
reload, ``STOPPING=1`` marks the drain, ``STATUS=`` is the line ``systemctl status`` shows,
and ``WATCHDOG=1`` pings keep ``WatchdogSec=`` from killing a daemon whose event loop still
turns. Outside systemd (no ``$NOTIFY_SOCKET``) every call does nothing.

Sending never raises: a lost notification must not take the data plane down with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("kvship.notify")

# A datagram to PID 1 normally goes at once; if its queue is full, wait this long at most
# rather than stall the event loop (then the message is dropped and logged).
SEND_TIMEOUT_S = 0.1
STATUS_EVERY_S = 5.0


def notify_address(value: str | None) -> str | None:
    """The ``AF_UNIX`` address in ``$NOTIFY_SOCKET``: a path, or an abstract name (a leading
    ``@`` stands for the NUL byte); None when unset or of a kind we do not speak (vsock)."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``$WATCHDOG_USEC``, as ``sd_watchdog_
    enabled(3)`` advises; None when no watchdog is asked of this process (unset, bad, or
    ``$WATCHDOG_PID`` names another process, e.g. a parent that exported it)."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    wanted_pid = environ.get("WATCHDOG_PID")
    if wanted_pid:
        try:
            if int(wanted_pid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


def monotonic_usec() -> int:
    """``CLOCK_MONOTONIC`` in µs, the clock systemd compares ``MONOTONIC_USEC=`` with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class SystemdNotifier:
    """Tells systemd where the daemon stands; every method is a no-op outside systemd."""

    def __init__(self, address: str | None, watchdog_s: float | None = None) -> None:
        self.address = address
        self.watchdog_s = watchdog_s if address is not None else None
        self._sock: socket.socket | None = None
        self._warned = False
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier:
        """The notifier systemd set up for this process (``$NOTIFY_SOCKET``,
        ``$WATCHDOG_USEC``, ``$WATCHDOG_PID``)."""
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET")
        address = notify_address(raw)
        if raw and address is None:
            log.warning("NOTIFY_SOCKET=%r: not a Unix socket address; not notifying", raw)
        return cls(address, watchdog_interval(env))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    # ------------------------------------------------------------ messages
    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines as one datagram; True if it went out."""
        if self.address is None:
            return False
        message = "\n".join(a.replace("\n", " ") for a in assignments).encode()
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.settimeout(SEND_TIMEOUT_S)
                self._sock = sock
            self._sock.sendto(message, self.address)
        except OSError as exc:
            # Once as a warning (a unit misconfigured, PID 1 gone), then quietly: a daemon
            # that cannot tell systemd still serves its transfers.
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            log.log(level, "sd_notify to %r failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Every listener is bound: systemd may start what is ordered after us."""
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self, status: str | None = None) -> bool:
        """A reload began; ``MONOTONIC_USEC`` is what ``Type=notify-reload`` (systemd ≥ 253)
        requires with it, older systemd ignores it. Follow with :meth:`ready`."""
        fields = ["RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}"]
        return self.notify(*fields, *([f"STATUS={status}"] if status else []))

    def stopping(self, status: str | None = None) -> bool:
        """The drain began: systemd shows the unit as deactivating, not failed."""
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        """The one line ``systemctl status`` shows."""
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        """Still alive (``WatchdogSec=``)."""
        return self.notify("WATCHDOG=1")

    # --------------------------------------------------------------- tasks
    async def run_watchdog(self) -> None:
        """Ping every ``WATCHDOG_USEC``/2 from the event loop itself: a loop that stalls
        (a blocking call, a busy callback) stops the pings and systemd restarts us."""
        if self.watchdog_s is None:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(self.watchdog_s)

    async def run_status(self, summary: Callable[[], str], every_s: float = STATUS_EVERY_S) -> None:
        """Refresh ``STATUS=`` with ``summary()`` every ``every_s`` seconds."""
        while True:
            await asyncio.sleep(every_s)
            try:
                text = summary()
            except Exception:  # a summary bug must not end the updates, nor the daemon
                log.debug("status summary failed", exc_info=True)
                continue
            self.status(text)

    def start(
        self, summary: Callable[[], str] | None = None, every_s: float = STATUS_EVERY_S
    ) -> None:
        """Start the watchdog pings (if systemd asked for them) and, given ``summary``,
        the status updates; call after :meth:`ready`, on the daemon's loop."""
        if self.address is None:
            return
        if self.watchdog_s is not None:
            self._tasks.append(asyncio.create_task(self.run_watchdog(), name="sd-watchdog"))
        if summary is not None:
            self._tasks.append(
                asyncio.create_task(self.run_status(summary, every_s), name="sd-status")
            )

    async def stop(self) -> None:
        """End the tasks and close the socket (the last thing before the daemon exits)."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
