"""The daemon's logs: the plain and JSON formats, the rate limiter of repeated failures
(with an injected clock), and a real daemon pair logging JSON with transfer ids and
rate-limited repeats."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    free_port,
    good_transfer,
    off_loop,
    random_layers,
    running_pair,
    wait_for_condition,
)
from kvship import Client
from kvship.daemon.logs import (
    JsonFormatter,
    PlainFormatter,
    RepeatFilter,
    rfc3339,
    setup_logging,
    transfer_fields,
)
from kvship.errors import PeerUnreachable

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
HEX16 = re.compile(r"^[0-9a-f]{16}$")


def record(
    msg: str = "transfer to %s failed: %s",
    args: tuple[Any, ...] = ("10.0.0.2:7470", "PEER_UNREACHABLE"),
    *,
    name: str = "kvship.out",
    level: int = logging.WARNING,
    exc: bool = False,
    **extra: Any,
) -> logging.LogRecord:
    """A record as ``logging.getLogger(name).log(level, msg, *args, extra=extra)`` makes."""
    exc_info = None
    if exc:
        try:
            raise RuntimeError("stripe went away")
        except RuntimeError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


FIELDS = transfer_fields(0xABC, "req-1", "10.0.0.2:7470", code="PEER_UNREACHABLE")


# -------------------------------------------------------------- formats
def test_transfer_fields_are_as_v1_transfers_shows_them() -> None:
    assert FIELDS == {
        "transfer_id": "0000000000000abc",
        "request_id": "req-1",
        "peer": "10.0.0.2:7470",
        "code": "PEER_UNREACHABLE",
    }


def test_plain_without_fields_is_the_classic_line() -> None:
    line = PlainFormatter().format(record("stopped", ()))
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING kvship\.out: stopped", line)


def test_plain_appends_key_value_fields() -> None:
    line = PlainFormatter().format(
        record(**FIELDS, cause="PEER_UNREACHABLE 10.0.0.2:7470", note='a "b"=c', n=3)
    )
    head, tail = line.split(": ", 1)
    assert head.endswith("WARNING kvship.out")
    assert tail == (
        "transfer to 10.0.0.2:7470 failed: PEER_UNREACHABLE"
        " transfer_id=0000000000000abc request_id=req-1 peer=10.0.0.2:7470"
        ' code=PEER_UNREACHABLE note="a \\"b\\"=c" n=3'
    )  # the rate limiter's cause is not printed; odd values are quoted
    assert "cause" not in line


def test_plain_traceback_comes_after_the_fields() -> None:
    lines = PlainFormatter().format(record(exc=True, **FIELDS)).splitlines()
    assert lines[0].endswith("code=PEER_UNREACHABLE")
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "RuntimeError: stripe went away"


def test_json_line_parses_back_with_every_field() -> None:
    rec = record(**FIELDS, cause="x", odd=Path("/x"))
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    obj = json.loads(line)
    assert list(obj)[:4] == ["time", "level", "logger", "message"]
    assert TIME.match(obj["time"]) and obj["time"] == rfc3339(rec.created)
    assert obj["level"] == "warning" and obj["logger"] == "kvship.out"
    assert obj["message"] == "transfer to 10.0.0.2:7470 failed: PEER_UNREACHABLE"
    assert {k: obj[k] for k in FIELDS} == FIELDS
    assert obj["odd"] == "/x"  # not JSON by itself: as text
    assert "cause" not in obj and "exc" not in obj


def test_json_exception_text() -> None:
    obj = json.loads(JsonFormatter().format(record(exc=True, **FIELDS)))
    assert obj["exc"].startswith("Traceback (most recent call last):")
    assert obj["exc"].rstrip().endswith("RuntimeError: stripe went away")


def test_json_field_never_overwrites_the_core_keys() -> None:
    obj = json.loads(JsonFormatter().format(record("hi", (), level=logging.INFO, time="x")))
    assert obj["message"] == "hi" and TIME.match(obj["time"]) and obj["level"] == "info"


def test_rfc3339_is_utc_with_milliseconds() -> None:
    assert rfc3339(0.0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(1_700_000_000.1239) == "2023-11-14T22:13:20.123Z"
    assert rfc3339(1_700_000_000.9999) == "2023-11-14T22:13:20.999Z"


# ---------------------------------------------------------- rate limit
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def limiter() -> Iterator[tuple[RepeatFilter, Clock, list[logging.LogRecord]]]:
    clock, emitted = Clock(), []
    yield RepeatFilter(10.0, 4, clock, emit=emitted.append), clock, emitted


def failure(i: int, cause: str = "PEER_UNREACHABLE 10.0.0.2:7470", **kw: Any) -> logging.LogRecord:
    return record(**transfer_fields(i, f"req-{i}", "10.0.0.2:7470"), cause=cause, **kw)


def test_records_without_a_cause_always_pass(limiter: Any) -> None:
    repeats, _, _ = limiter
    assert all(repeats.filter(record("hello", ())) for _ in range(100))
    assert len(repeats) == 0


def test_first_passes_the_rest_are_counted_then_reported(limiter: Any) -> None:
    repeats, clock, emitted = limiter
    assert repeats.filter(first := failure(0))
    assert not hasattr(first, "suppressed")
    for i in range(1, 8):  # 7 more within the interval: held back
        clock.now += 1
        assert not repeats.filter(failure(i))
    clock.now = 1000.0 + 10.0  # a new interval: the next one passes, with the count
    assert repeats.filter(nxt := failure(8))
    assert nxt.suppressed == 7
    assert "(7 more like this in the last 10 s)" in PlainFormatter().format(nxt)
    assert json.loads(JsonFormatter().format(nxt))["suppressed"] == 7
    assert not repeats.filter(failure(9))  # and the interval starts again
    assert emitted == []


def test_causes_and_loggers_are_limited_separately(limiter: Any) -> None:
    repeats, _, _ = limiter
    assert repeats.filter(failure(0))
    assert repeats.filter(failure(1, cause="PEER_UNREACHABLE 10.0.0.3:7470"))
    assert repeats.filter(failure(2, cause="CANCELLED 10.0.0.2:7470"))
    assert repeats.filter(failure(3, name="kvship.in"))
    assert not repeats.filter(failure(4))


def test_flush_reports_what_was_held_back_when_the_failures_stop(limiter: Any) -> None:
    repeats, clock, emitted = limiter
    assert repeats.filter(failure(0))
    for i in range(1, 5):
        assert not repeats.filter(failure(i))
    assert repeats.flush() == 0 and emitted == []  # the interval has not ended
    clock.now += 10.0
    assert repeats.flush() == 1
    (line,) = emitted
    assert line.request_id == "req-4"  # the last one held back, standing for 3 more
    assert line.suppressed == 3 and repeats.filter(line)  # it passes the filter itself
    assert len(repeats) == 0  # the interval is closed: the next failure passes, no count
    assert repeats.filter(nxt := failure(5)) and not hasattr(nxt, "suppressed")


def test_shown_plus_suppressed_is_every_event(limiter: Any) -> None:
    repeats, clock, emitted = limiter
    shown: list[logging.LogRecord] = []
    for i in range(100):
        clock.now += 0.7
        rec = failure(i)
        if repeats.filter(rec):
            shown.append(rec)
        if i % 30 == 0:
            repeats.flush()
    repeats.flush(everything=True)
    shown += emitted
    assert len(shown) < 20
    assert len(shown) + sum(getattr(r, "suppressed", 0) for r in shown) == 100


def test_one_held_back_is_emitted_without_a_count(limiter: Any) -> None:
    repeats, _, emitted = limiter
    repeats.filter(failure(0, exc=True))
    repeats.filter(failure(1, exc=True))
    repeats.flush(everything=True)
    (line,) = emitted
    assert line.request_id == "req-1" and not hasattr(line, "suppressed")
    assert line.exc_info is None  # the traceback was shown with the first one


def test_memory_is_bounded_and_forgotten_counts_still_get_out(limiter: Any) -> None:
    repeats, _, emitted = limiter  # at most 4 causes
    for peer in range(50):
        cause = f"PEER_UNREACHABLE 10.0.1.{peer}:7470"
        assert repeats.filter(failure(2 * peer, cause=cause))
        assert not repeats.filter(failure(2 * peer + 1, cause=cause))
        assert len(repeats) <= 4
    assert len(emitted) == 46  # each cause dropped had held one back: it was emitted
    assert {r.request_id for r in emitted} == {f"req-{2 * p + 1}" for p in range(46)}


def test_timer_flushes_and_close_reports_everything() -> None:
    emitted: list[logging.LogRecord] = []
    repeats = RepeatFilter(0.5, emit=emitted.append)
    repeats.start(every_s=0.01)
    try:
        for i in range(3):
            repeats.filter(failure(i))
        for _ in range(300):  # a sync test: a bounded wait for the timer thread
            if emitted:
                break
            time.sleep(0.01)
        assert emitted and emitted[0].suppressed == 1
        repeats.filter(failure(10))
        repeats.filter(failure(11, cause="other"))
        repeats.filter(failure(12, cause="other"))
    finally:
        repeats.close()
    assert emitted[-1].request_id == "req-12"  # close() reported the pending one
    assert repeats._timer is None


def test_setup_logging_installs_one_handler() -> None:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    buf = io.StringIO()
    try:
        setup_logging("info", "plain", io.StringIO())
        repeats = setup_logging("warning", "json", buf)  # replaces the first
        assert len(root.handlers) == len(handlers) + 1
        assert root.level == logging.WARNING
        log = logging.getLogger("kvship.test")
        log.info("not shown")
        for i in range(3):
            log.warning("failed %d", i, extra={"peer": "p", "cause": "c"})
        repeats.close()
        lines = [json.loads(line) for line in buf.getvalue().splitlines()]
        assert [(o["message"], o.get("suppressed")) for o in lines] == [
            ("failed 0", None),
            ("failed 2 (1 more like this in the last 10 s)", 1),
        ]
        with pytest.raises(ValueError):
            setup_logging("info", "xml")
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)


# ------------------------------------------------------------ end to end
def json_lines(path: Path | None) -> list[dict[str, Any]]:
    assert path is not None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line: one JSON object


async def test_daemon_logs_json_with_ids_and_limits_repeats(tmp_path: Path) -> None:
    """A pair with ``--log-format json``: a good transfer's lines (DEBUG) carry its ids on
    both daemons; sends to a peer where nothing listens fail, each failure line carries
    transfer_id/request_id/peer, the repeats are held back, and by the end the count of
    the held back ones is in the log: lines shown + suppressed = every failure."""
    args = ["--log-format", "json", "--log-level", "debug"]
    with running_pair(tmp_path, args) as (a, b):
        rid, _ = await good_transfer(a, b)
        nowhere = f"127.0.0.1:{free_port()}"
        failures = [f"nowhere-{i}" for i in range(6)]
        arrays = random_layers(1, 4096, seed=7)
        async with Client(a.socket_path) as client:
            for request_id in failures:
                with pytest.raises(PeerUnreachable):
                    await asyncio.wait_for(
                        client.send_arrays(request_id, arrays, peer=nowhere, timeout=10), 15
                    )

        def failed_lines() -> list[dict[str, Any]]:
            return [
                o
                for o in json_lines(a.log_path)
                if o["logger"] == "kvship.out" and o.get("request_id") in failures
                and "failed" in o["message"]
            ]  # fmt: skip

        await wait_for_condition(off_loop(lambda: bool(failed_lines())), what="a failure line")
        good_id = (await asyncio.to_thread(a.get_json, f"/v1/transfers/{rid}"))["transfer_id"]
        first_id = (await asyncio.to_thread(a.get_json, f"/v1/transfers/{failures[0]}"))[
            "transfer_id"
        ]
        for daemon in (a, b):  # SIGTERM: the daemon reports what it still held back
            await asyncio.to_thread(daemon.stop, 10)

    sent = [o for o in json_lines(a.log_path) if o.get("request_id") == rid]
    got = [o for o in json_lines(b.log_path) if o.get("request_id") == rid]
    for lines, message in ((sent, "transfer complete"), (got, "incoming transfer delivered")):
        done = [o for o in lines if o["message"].startswith(message)]
        assert len(done) == 1, lines
        assert done[0]["level"] == "debug" and done[0]["transfer_id"] == good_id
    assert {o["peer"] for o in sent} == {b.peer} and {o["peer"] for o in got} == {"prefill"}

    shown = failed_lines()
    assert shown[0]["request_id"] == failures[0] and shown[0]["transfer_id"] == first_id
    for line in shown:
        assert line["level"] == "warning" and TIME.match(line["time"])
        assert HEX16.match(line["transfer_id"]) and line["peer"] == nowhere
        assert line["code"] == "PEER_UNREACHABLE" and line["direction"] == "out"
    suppressed = [line.get("suppressed", 0) for line in shown]
    assert len(shown) < len(failures), shown  # repeats were held back ...
    assert len(shown) + sum(suppressed) == len(failures), shown  # ... and counted
    counted = [line for line in shown if line.get("suppressed")]
    assert counted and "more like this in the last 10 s" in counted[0]["message"]
