"""The daemon's logs: plain lines or JSON objects, structured event fields, and repeats
rate-limited.

Log calls name what an event is about with ``extra=``: a transfer's ``transfer_id``
(16 hex digits, as /v1/transfers shows it), ``request_id`` and ``peer`` (see
:func:`transfer_fields`), an error ``code`` ... Both formats print those fields: the plain
one as `` key=value`` after the message, the JSON one as keys of the line's object.

A failure that repeats (a peer that keeps failing, the same error code again and again)
carries a ``cause`` (not printed): :class:`RepeatFilter` lets the first line of each
(logger, cause) through per interval and counts the rest; the next line that goes through
for that cause, or the periodic flush, says how many were held back (``suppressed=N``,
"(N more like this in the last 10 s)").
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import IO, Any

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REPEAT_INTERVAL_S = 10.0  # one line per cause per this long
REPEAT_MAX_CAUSES = 1024  # causes tracked at once; past it the oldest is forgotten

# Attributes every LogRecord has: whatever else a record holds came from ``extra=``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_HIDDEN = frozenset({"cause"})  # the rate limiter's key: in code + peer already
_FLUSHED = "_kvship_repeat_flush"  # marks a record the flush re-emits (lets it pass)


def transfer_fields(
    transfer_id: int, request_id: str, peer: str, **more: object
) -> dict[str, object]:
    """``extra=`` of a log line about a transfer: its ids as /v1/transfers shows them."""
    return {"transfer_id": f"{transfer_id:016x}", "request_id": request_id, "peer": peer, **more}


def event_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a log call added with ``extra=`` (in the order given)."""
    return {
        k: v
        for k, v in record.__dict__.items()
        if k not in _STANDARD and k not in _HIDDEN and not k.startswith("_")
    }


def _message(record: logging.LogRecord) -> str:
    message = record.getMessage()
    suppressed = getattr(record, "suppressed", 0)
    if suppressed:
        interval = getattr(record, "_kvship_repeat_s", REPEAT_INTERVAL_S)
        message += f" ({suppressed} more like this in the last {interval:g} s)"
    return message


def _plain_value(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


class PlainFormatter(logging.Formatter):
    """``%(asctime)s %(levelname)s %(name)s: %(message)s`` then `` key=value`` per event
    field (values with spaces, quotes or ``=`` in double quotes), then any traceback."""

    def __init__(self, fmt: str = PLAIN_FORMAT) -> None:
        super().__init__(fmt)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _message(record)
        line = super().formatMessage(record)
        fields = event_fields(record)
        if fields:
            line += "".join(f" {k}={_plain_value(v)}" for k, v in fields.items())
        return line


def rfc3339(created: float) -> str:
    """``2025-01-31T12:00:00.123Z``: UTC, millisecond precision."""
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message``, the event
    fields, and ``exc`` (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": _message(record),
        }
        for key, value in event_fields(record).items():
            out.setdefault(key, value)  # a field never overwrites the four above
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


class _Window:
    __slots__ = ("count", "last", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.count = 0  # records held back in this window
        self.last: logging.LogRecord | None = None  # the latest one held back


class RepeatFilter(logging.Filter):
    """Rate-limits repeated failures: per (logger, ``cause``) one record per ``interval_s``.

    Records without a ``cause`` always pass. The first of a cause's interval passes; the
    rest of it are counted and held back. When the next one passes after the interval it
    carries ``suppressed=N``; :meth:`flush` (a timer calls it, and :meth:`close`) re-emits
    the last record held back of each ended interval with ``suppressed`` = the others, so
    no count is lost when the failures stop: lines shown + the sum of ``suppressed`` =
    every event. At most ``max_causes`` are tracked (the oldest is dropped); the clock is
    monotonic and injectable.
    """

    def __init__(
        self,
        interval_s: float = REPEAT_INTERVAL_S,
        max_causes: int = REPEAT_MAX_CAUSES,
        clock: Callable[[], float] = time.monotonic,
        emit: Callable[[logging.LogRecord], object] | None = None,
    ) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.max_causes = max_causes
        self.clock = clock
        self.emit = emit  # where flush() sends its records (the handler's handle)
        self._windows: OrderedDict[tuple[str, str], _Window] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self._windows)

    def filter(self, record: logging.LogRecord) -> bool:
        cause = getattr(record, "cause", None)
        if cause is None or getattr(record, _FLUSHED, False):
            return True
        key = (record.name, str(cause))
        evicted: list[_Window] = []
        with self._lock:
            now = self.clock()
            window = self._windows.get(key)
            if window is not None and now - window.start < self.interval_s:
                window.count += 1
                window.last = record
                return False
            if window is not None and window.count:
                self._mark(record, window.count)
            self._windows[key] = _Window(now)
            self._windows.move_to_end(key)
            while len(self._windows) > self.max_causes:
                evicted.append(self._windows.popitem(last=False)[1])
        if evicted:
            self._report(evicted)  # a forgotten cause's count still gets out
        return True

    def _mark(self, record: logging.LogRecord, suppressed: int) -> None:
        setattr(record, "suppressed", suppressed)  # noqa: B010 (not a LogRecord attribute)
        setattr(record, "_kvship_repeat_s", self.interval_s)  # noqa: B010

    def _report(self, windows: list[_Window]) -> int:
        """Emit the last record each window held back, standing for the others."""
        n = 0
        for window in windows:
            if window.last is None:
                continue
            record = copy.copy(window.last)
            record.exc_info = record.exc_text = record.stack_info = None  # shown the first time
            setattr(record, _FLUSHED, True)
            if window.count > 1:
                self._mark(record, window.count - 1)
            if self.emit is not None:
                self.emit(record)
            n += 1
        return n

    def flush(self, *, everything: bool = False) -> int:
        """Close every interval that has ended (all of them with ``everything``): re-emit
        the last record each held back, with ``suppressed`` = how many more it stands for.
        Returns the number of records emitted."""
        with self._lock:
            now = self.clock()
            ended = [
                k
                for k, w in self._windows.items()
                if everything or now - w.start >= self.interval_s
            ]
            windows = [self._windows.pop(k) for k in ended]
        return self._report(windows)

    def start(self, every_s: float | None = None) -> None:
        """Flush from a background thread every ``every_s`` (half the interval)."""
        if self._timer is not None:
            return
        period = every_s if every_s is not None else self.interval_s / 2

        def run() -> None:
            while not self._stop.wait(period):
                self.flush()

        self._timer = threading.Thread(target=run, name="kvship-log-repeats", daemon=True)
        self._timer.start()

    def close(self) -> None:
        """Stop the timer and report every count still pending."""
        self._stop.set()
        if self._timer is not None:
            self._timer.join(timeout=5)
            self._timer = None
        self.flush(everything=True)


_installed: tuple[logging.Handler, RepeatFilter] | None = None


def setup_logging(level: str, fmt: str, stream: IO[str] = sys.stderr) -> RepeatFilter:
    """Log to ``stream`` (stderr: the journal, under systemd) at ``level`` in ``fmt``
    ("plain" | "json"), repeated failures rate-limited. Replaces what an earlier call set
    up. Returns the rate limiter: :meth:`RepeatFilter.close` it at exit."""
    global _installed
    if fmt not in ("plain", "json"):
        raise ValueError(f"log format {fmt!r}: plain | json")
    root = logging.getLogger()
    if _installed is not None:
        old_handler, old_filter = _installed
        old_filter.close()
        root.removeHandler(old_handler)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    repeats = RepeatFilter(emit=handler.handle)
    handler.addFilter(repeats)
    root.addHandler(handler)
    root.setLevel(level.upper())
    repeats.start()
    _installed = (handler, repeats)
    return repeats
