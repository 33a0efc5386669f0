"""kvship.ratelimit on a virtual clock: accuracy, bursts, run-time limits, priority,
fairness, cancellation, link+global combination, and rate parsing.

No test sleeps for real: every bucket uses a :class:`VirtualClock`, which jumps to the next
sleeper's deadline whenever all tasks wait.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvship.ratelimit import (
    MAX_BURST,
    MAX_CATCH_UP_S,
    MAX_RATE,
    RateError,
    Scheduler,
    SchedulerClosed,
    TokenBucket,
    VirtualClock,
    format_rate,
    parse_burst,
    parse_rate,
)

KiB = 1024
MiB = 1024 * 1024


# ------------------------------------------------------------------ helpers
@dataclass
class Log:
    """Grants as (virtual time, transfer, priority, bytes), in grant order."""

    clock: VirtualClock
    grants: list[tuple[float, str, str, int]] = field(default_factory=list)

    def bytes(self, until: float = math.inf, since: float = -math.inf, key: str | None = None):
        return sum(
            n for t, k, _, n in self.grants if since <= t <= until and (key is None or k == key)
        )

    def keys(self) -> list[str]:
        return [k for _, k, _, _ in self.grants]


def max_window(grants: Sequence[tuple[float, int]], width: float = 1.0) -> int:
    """Most bytes granted in any window [t, t + width] (float slack of 1 ns)."""
    times = sorted(grants)
    best, total, j = 0, 0, 0
    for i, (t, _) in enumerate(times):
        while j < len(times) and times[j][0] <= t + width - 1e-9:
            total += times[j][1]
            j += 1
        best = max(best, total)
        total -= times[i][1]
    return best


async def producer(
    sched: Scheduler, log: Log, key: str, chunk: int, count: int, priority: str = "bulk"
) -> None:
    """One transfer sending ``count`` chunks, one acquire at a time."""
    for _ in range(count):
        await sched.acquire(key, chunk, priority)
        log.grants.append((log.clock(), key, priority, chunk))


async def stop(tasks: Sequence[asyncio.Task[object]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def link(vc: VirtualClock, rate: float | None, burst: int) -> TokenBucket:
    return TokenBucket(rate, burst, clock=vc)


# ------------------------------------------------------------------ bucket basics
def test_bucket_starts_full_refills_and_caps_at_burst() -> None:
    vc = VirtualClock()
    b = TokenBucket(1000, 500, clock=vc)
    assert b.level() == 500 and b.try_take(500) and not b.try_take(1)
    assert b.delay(100) == pytest.approx(0.1)
    vc.jump(0.25)
    assert b.level() == pytest.approx(250)
    vc.jump(100)
    assert b.level() == 500  # never more than the burst, however long it idled


def test_request_above_burst_waits_for_full_bucket_then_goes_into_debt() -> None:
    vc = VirtualClock()
    b = TokenBucket(1000, 1000, clock=vc)
    b.take(400)
    assert b.delay(4000) == pytest.approx(0.4)  # needs a full bucket, not 4000 tokens
    vc.jump(0.4)
    assert b.try_take(4000)
    assert b.level() == pytest.approx(-3000)
    assert b.delay(1) == pytest.approx(3.001)  # the debt is paid first


def test_unlimited_bucket_never_waits() -> None:
    vc = VirtualClock()
    for rate in (None, math.inf):
        b = TokenBucket(rate, 1, clock=vc)
        assert b.unlimited and b.delay(10 * MiB) == 0.0
        b.take(10 * MiB)
        assert b.ready(10 * MiB)


@pytest.mark.parametrize(
    ("rate", "burst", "field_name"),
    [
        (0, 100, "rate_bytes_per_s"),
        (-1, 100, "rate_bytes_per_s"),
        (math.nan, 100, "rate_bytes_per_s"),
        (MAX_RATE * 1.01, 100, "rate_bytes_per_s"),
        ("1gbit", 100, "rate_bytes_per_s"),
        (True, 100, "rate_bytes_per_s"),
        (1000, 0, "burst_bytes"),
        (1000, -5, "burst_bytes"),
        (1000, 1.5, "burst_bytes"),
        (1000, math.inf, "burst_bytes"),
        (1000, MAX_BURST + 1, "burst_bytes"),
        (1000, "4MiB", "burst_bytes"),
    ],
)
def test_bad_limits_are_refused_and_change_nothing(rate, burst, field_name) -> None:
    with pytest.raises(RateError, match=field_name) as err:
        TokenBucket(rate, burst)
    assert err.value.field == field_name and isinstance(err.value, ValueError)
    vc = VirtualClock()
    b = TokenBucket(1000, 500, clock=vc)
    b.take(200)
    with pytest.raises(RateError, match=field_name):
        b.set_limits(rate, burst)
    assert (b.rate, b.burst, b.level()) == (1000, 500, 300)


def test_set_limits_keeps_level_clamped_and_keeps_debt() -> None:
    vc = VirtualClock()
    b = TokenBucket(1000, 1000, clock=vc)
    b.take(200)
    b.set_limits(2000, 500)
    assert b.level() == 500  # clamped to the new burst
    b.set_limits(2000, 4000)
    assert b.level() == 500  # a larger burst does not add tokens
    b.take(1500)
    b.set_limits(None, 100)
    assert b.unlimited and b.ready(10**9)
    b.set_limits(100, 100)
    assert b.level() == 100  # leaving "unlimited" starts full


# ------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("with_global", [False, True])
async def test_rate_accuracy_over_10_virtual_seconds(with_global: bool) -> None:
    vc = VirtualClock()
    rate, burst = 1_000_000.0, 256 * KiB
    glob = TokenBucket(50 * rate, 64 * MiB, clock=vc) if with_global else None
    sched = Scheduler(link(vc, rate, burst), glob, sleep=vc.sleep)
    log = Log(vc)
    chunks = {"a": 64 * KiB, "b": 32 * KiB, "c": 48 * KiB}
    tasks = [asyncio.create_task(producer(sched, log, k, c, 10_000)) for k, c in chunks.items()]
    await vc.advance_to(10.0)
    await stop(tasks)

    expected = rate * 10 + burst
    got = log.bytes(until=10.0)
    assert abs(got - expected) <= 0.01 * expected
    assert expected - got <= max(chunks.values())  # in fact within one chunk
    window = max_window([(t, n) for t, _, _, n in log.grants])
    assert window <= rate + burst
    assert window >= rate  # and it does use the link
    # fair once all three are backlogged ("a" alone took the burst at t=0, before the others)
    shares = Counter({k: log.bytes(key=k, since=1e-9) for k in chunks})
    assert max(shares.values()) - min(shares.values()) <= max(chunks.values())


async def test_burst_is_granted_at_once_then_the_rate_paces() -> None:
    vc = VirtualClock()
    sched = Scheduler(link(vc, 1000, 4000), sleep=vc.sleep)
    log = Log(vc)
    task = asyncio.create_task(producer(sched, log, "t", 1000, 10))
    await vc.advance(0)
    assert [t for t, *_ in log.grants] == [0, 0, 0, 0]  # the full burst, right away
    await vc.run(task)
    assert [t for t, *_ in log.grants][4:] == pytest.approx([1, 2, 3, 4, 5, 6])
    await vc.advance(100)  # idle: the bucket refills to the burst, no further
    task = asyncio.create_task(producer(sched, log, "t", 1000, 5))
    await vc.run(task)
    times = [t - 106 for t, *_ in log.grants[10:]]
    assert times == pytest.approx([0, 0, 0, 0, 1])


async def test_chunks_larger_than_the_burst_keep_the_long_run_rate() -> None:
    vc = VirtualClock()
    rate, burst, chunk = 1000.0, 1000, 4000
    sched = Scheduler(link(vc, rate, burst), sleep=vc.sleep)
    log = Log(vc)
    task = asyncio.create_task(producer(sched, log, "t", chunk, 1000))
    await vc.advance_to(40.0)
    await stop([task])
    got = log.bytes(until=40.0)
    assert abs(got - rate * 40) <= chunk  # debt is paid back: no drift
    assert max_window([(t, n) for t, _, _, n in log.grants]) <= rate + max(burst, chunk)


@pytest.mark.parametrize("chunk", [1000, 4000])
async def test_late_timers_cost_no_throughput(chunk: int) -> None:
    """A real event loop wakes sleepers late; with burst == chunk (or chunk > burst) a
    naive bucket would overflow meanwhile and lose rate x lateness per grant."""
    vc = VirtualClock()
    rate, burst, late = 50_000.0, 1000, 0.004  # lateness within MAX_CATCH_UP_S

    async def late_sleep(delay: float) -> None:
        await vc.sleep(delay + late)

    sched = Scheduler(link(vc, rate, burst), sleep=late_sleep)
    log = Log(vc)
    task = asyncio.create_task(producer(sched, log, "t", chunk, 10_000))
    await vc.advance_to(10.0)
    await stop([task])
    assert abs(log.bytes(until=10.0) - (rate * 10 + burst)) <= chunk
    grants = [(t, n) for t, _, _, n in log.grants]
    assert max_window(grants) <= rate * (1 + late) + max(burst, chunk)


async def test_a_long_stall_is_not_caught_up_on() -> None:
    """Lateness beyond MAX_CATCH_UP_S counts as idle time: the bucket spills as usual, so a
    stalled loop cannot send more than a full bucket plus the catch-up allowance."""
    vc = VirtualClock()
    rate, burst, stall = 10_000.0, 1000, 0.5

    async def stalled_sleep(delay: float) -> None:
        await vc.sleep(delay + stall)

    sched = Scheduler(link(vc, rate, burst), sleep=stalled_sleep)
    log = Log(vc)
    task = asyncio.create_task(producer(sched, log, "t", 1000, 10_000))
    await vc.advance_to(10.0)
    await stop([task])
    per_wake = rate * MAX_CATCH_UP_S + burst  # at most this much per stalled wake-up
    wakes = Counter(t for t, *_ in log.grants[1:])
    assert max(wakes.values()) * 1000 <= per_wake  # (catching up fully would give 2000)


# ------------------------------------------------------------------ run-time limits
async def test_set_limits_mid_stream_takes_effect_and_loses_no_waiter() -> None:
    vc = VirtualClock()
    bucket = link(vc, 10_000, 2000)
    sched = Scheduler(bucket, sleep=vc.sleep)
    log = Log(vc)
    n_per = 150
    tasks = [asyncio.create_task(producer(sched, log, k, 1000, n_per)) for k in "abcd"]
    # and one transfer with 40 acquires waiting at once (one task per chunk)
    tasks += [asyncio.create_task(producer(sched, log, "e", 500, 1)) for _ in range(40)]
    await vc.advance_to(5.0)
    bucket.set_limits(40_000, 8000)  # faster
    await vc.advance_to(10.0)
    bucket.set_limits(2_000, 500)  # slower, and a burst below the chunk size
    await vc.advance_to(20.0)
    assert not all(t.done() for t in tasks)
    bucket.set_limits(None, 1)  # lift the limit: everyone left goes now
    await vc.advance(0)

    assert all(t.done() and not t.cancelled() for t in tasks)  # nobody lost
    assert len(log.grants) == 4 * n_per + 40
    assert abs(log.bytes(until=5.0) - (10_000 * 5 + 2000)) <= 1000
    assert abs(log.bytes(since=5.0 + 1e-9, until=10.0) - 40_000 * 5) <= 1000
    assert abs(log.bytes(since=10.0 + 1e-9, until=20.0 - 1e-9) - 2_000 * 10) <= 1000


async def test_lower_burst_while_a_big_request_waits_and_raise_rate_wakes_it() -> None:
    vc = VirtualClock()
    bucket = link(vc, 100, 1000)
    sched = Scheduler(bucket, sleep=vc.sleep)
    bucket.take(1000)
    task = asyncio.create_task(sched.acquire("t", 800))
    await vc.advance(1)
    bucket.set_limits(100, 300)  # now above the burst: needs a full bucket (300)
    await vc.advance(1.999)
    assert not task.done()  # 100 B at t=1, full (300 B) at t=3
    await vc.advance(0.001)
    assert task.done()
    assert bucket.level() == pytest.approx(300 - 800)
    waiter = asyncio.create_task(sched.acquire("t", 100))
    await vc.advance(0)
    assert not waiter.done()
    bucket.set_limits(1_000_000, 300)  # pays the debt in ~0.5 ms
    await vc.advance(0.01)
    assert waiter.done()


# ------------------------------------------------------------------ priority & fairness
async def test_latency_requests_go_before_any_bulk_request() -> None:
    vc = VirtualClock()
    bucket = link(vc, 1000, 100)
    sched = Scheduler(bucket, sleep=vc.sleep)
    bucket.take(100)
    log = Log(vc)
    tasks = [asyncio.create_task(producer(sched, log, f"bulk{i}", 100, 3)) for i in range(2)]
    await vc.advance(0.25)  # two bulk grants happen
    tasks += [asyncio.create_task(producer(sched, log, "lat", 100, 4, "latency"))]
    await vc.run(asyncio.gather(*tasks))
    prios = [p for _, _, p, _ in log.grants]
    assert prios == ["bulk"] * 2 + ["latency"] * 4 + ["bulk"] * 4


async def test_fair_share_even_if_one_transfer_queued_100_chunks_first() -> None:
    vc = VirtualClock()
    bucket = link(vc, 1000, 100)
    sched = Scheduler(bucket, sleep=vc.sleep)
    bucket.take(100)
    order: list[str] = []

    async def one(key: str) -> None:
        await sched.acquire(key, 100)
        order.append(key)

    tasks = [asyncio.create_task(one("A")) for _ in range(100)]
    await vc.advance(0)
    tasks += [asyncio.create_task(one("B")) for _ in range(100)]
    await vc.run(asyncio.gather(*tasks))
    assert order[:100] == ["A", "B"] * 50


class _Recorder:
    """A Scheduler whose ``on_grant`` hook notes, at each grant decision, the order and
    whether a latency request was still waiting when a bulk one went."""

    def __init__(self, bucket: TokenBucket, vc: VirtualClock) -> None:
        self.sched = Scheduler(bucket, sleep=vc.sleep, on_grant=self._on_grant)
        self.violations = 0
        self.order: list[tuple[str, str, int]] = []

    def _on_grant(self, key, nbytes: int, priority: str, when: float) -> None:
        if priority == "bulk" and self.sched.waiting("latency"):
            self.violations += 1
        self.order.append((key, priority, nbytes))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    k=st.integers(2, 5),
    equal_chunks=st.booleans(),
)
def test_fair_share_property(data: st.DataObject, k: int, equal_chunks: bool) -> None:
    """k transfers queue chunks in a random interleaving; while all are backlogged their
    granted bytes never differ by more than one (largest) chunk."""
    chunk = (
        [1000] * k
        if equal_chunks
        else data.draw(st.lists(st.integers(200, 4000), min_size=k, max_size=k))
    )
    counts = data.draw(st.lists(st.integers(3, 25), min_size=k, max_size=k))
    order = data.draw(st.permutations([i for i in range(k) for _ in range(counts[i])]))
    rate = data.draw(st.sampled_from([1000.0, 12_345.0, 1e6]))

    async def scenario() -> list[tuple[str, str, int]]:
        vc = VirtualClock()
        bucket = TokenBucket(rate, max(chunk), clock=vc)
        rec = _Recorder(bucket, vc)
        bucket.take(bucket.burst)  # empty: everything queues before the first grant
        tasks = [asyncio.create_task(rec.sched.acquire(f"t{i}", chunk[i])) for i in order]
        await vc.run(asyncio.gather(*tasks))
        return rec.order

    grants = asyncio.run(scenario())
    assert len(grants) == len(order)
    served = dict.fromkeys((f"t{i}" for i in range(k)), 0)
    left = Counter({f"t{i}": counts[i] for i in range(k)})
    for key, _, n in grants:
        served[key] += n
        left[key] -= 1
        if all(left[t] > 0 for t in served):  # still all backlogged
            assert max(served.values()) - min(served.values()) <= max(chunk)


@settings(max_examples=40, deadline=None)
@given(
    plan=st.lists(
        st.tuples(st.sampled_from("abc"), st.sampled_from(["latency", "bulk"]), st.floats(0, 3)),
        min_size=1,
        max_size=40,
    )
)
def test_priority_property(plan: list[tuple[str, str, float]]) -> None:
    """Requests arriving at random times: no bulk request is ever granted while a latency
    one waits on the same link; every request is granted."""

    async def scenario() -> _Recorder:
        vc = VirtualClock()
        rec = _Recorder(TokenBucket(1000, 300, clock=vc), vc)

        async def arrive(key: str, prio: str, at: float) -> None:
            await vc.sleep(at)
            await rec.sched.acquire(key, 100, prio)

        await vc.run(asyncio.gather(*(arrive(*p) for p in plan)))
        return rec

    rec = asyncio.run(scenario())
    assert rec.violations == 0
    assert len(rec.order) == len(plan)


# ------------------------------------------------------------------ cancellation
async def test_cancelling_a_waiter_leaks_nothing_and_blocks_nobody() -> None:
    vc = VirtualClock()
    bucket = link(vc, 1000, 1000)
    sched = Scheduler(bucket, sleep=vc.sleep)
    bucket.take(1000)
    big = asyncio.create_task(sched.acquire("big", 900))  # head of the line
    small = asyncio.create_task(sched.acquire("small", 100))
    await vc.advance(0.05)
    big.cancel()
    await vc.advance(0.05)  # small needs 100 B: due at t=0.1 now that big is gone
    assert big.cancelled() and small.done()
    assert bucket.level() == pytest.approx(0)
    assert sched.waiting() == 0


async def test_cancel_after_grant_but_before_resuming_gives_tokens_back() -> None:
    vc = VirtualClock()
    bucket = link(vc, 1000, 500)
    glob = TokenBucket(1000, 500, clock=vc)
    hook: list[tuple[str, int, str, float]] = []
    sched = Scheduler(bucket, glob, sleep=vc.sleep, on_grant=lambda *a: hook.append(a))
    bucket.take(500)
    glob.take(500)
    task = asyncio.create_task(sched.acquire("t", 400))
    await vc.advance(0)
    vc.jump(0.4)  # tokens accrue, nobody woke yet
    bucket.set_limits(1000, 500)  # re-plan: grants the waiter right now
    assert sched.granted_bytes["bulk"] == 400
    task.cancel()  # ... but its task never gets to use the grant
    await vc.advance(0)
    assert task.cancelled()
    assert bucket.level() == pytest.approx(400) and glob.level() == pytest.approx(400)
    assert sched.granted_bytes["bulk"] == 0
    assert hook == [("t", 400, "bulk", 0.4), ("t", -400, "bulk", 0.4)]  # grant, then refund


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 30),
    cancel=st.sets(st.integers(0, 29)),
    at=st.floats(0, 2),
)
def test_random_cancellations_keep_the_rate(n: int, cancel: set[int], at: float) -> None:
    """Cancel any subset of waiters at any time: the others get exactly the tokens that
    accrue (nothing leaks, nothing is double-spent)."""

    async def scenario() -> tuple[list[float], float, float]:
        vc = VirtualClock()
        bucket = TokenBucket(1000, 100, clock=vc)
        sched = Scheduler(bucket, sleep=vc.sleep)
        bucket.take(100)
        done: list[float] = []

        async def one(i: int) -> None:
            await sched.acquire(f"t{i % 3}", 100)
            done.append(vc())

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await vc.advance(at)
        for i in cancel:
            if i < n:
                tasks[i].cancel()
        await vc.run(asyncio.gather(*tasks, return_exceptions=True))
        return done, bucket.level(), vc()

    done, level, now = asyncio.run(scenario())
    # back-to-back at 0.1 s per grant: any gap would be leaked tokens
    assert done == pytest.approx([0.1 * (i + 1) for i in range(len(done))])
    # and the bucket holds exactly what accrued since the last grant
    assert level == pytest.approx(min(100.0, (now - (done[-1] if done else 0.0)) * 1000))


async def test_close_fails_waiters_and_refuses_new_requests() -> None:
    vc = VirtualClock()
    bucket = link(vc, 1000, 100)
    sched = Scheduler(bucket, sleep=vc.sleep, name="peer-x")
    bucket.take(100)
    task = asyncio.create_task(sched.acquire("t", 100))
    await vc.advance(0)
    sched.close()
    with pytest.raises(SchedulerClosed, match="peer-x"):
        await task
    with pytest.raises(SchedulerClosed):
        await sched.acquire("t", 1)


async def test_a_failing_on_grant_hook_does_not_stop_the_link(caplog) -> None:
    vc = VirtualClock()

    def broken(*_: object) -> None:
        raise ZeroDivisionError

    sched = Scheduler(link(vc, 1000, 100), sleep=vc.sleep, on_grant=broken, name="p")
    await vc.run(asyncio.gather(*(sched.acquire("t", 100) for _ in range(5))))
    assert vc() == pytest.approx(0.4) and sched.granted_requests["bulk"] == 5
    assert "on_grant hook of scheduler 'p' failed" in caplog.text


async def test_acquire_rejects_bad_arguments() -> None:
    sched = Scheduler(TokenBucket(1000, 100))
    with pytest.raises(ValueError, match="priority"):
        await sched.acquire("t", 10, "urgent")
    with pytest.raises(ValueError, match="nbytes"):
        await sched.acquire("t", -1)
    await sched.acquire("t", 0)  # nothing to send: no wait
    with pytest.raises(ValueError, match="clock"):
        Scheduler(TokenBucket(1, 1), TokenBucket(1, 1, clock=VirtualClock()))


# ------------------------------------------------------------------ link + global
@pytest.mark.parametrize(("link_rate", "global_rate"), [(10_000, 4_000), (4_000, 10_000)])
async def test_the_lower_of_link_and_global_governs(link_rate: int, global_rate: int) -> None:
    vc = VirtualClock()
    glob = TokenBucket(global_rate, 1000, clock=vc)
    sched = Scheduler(link(vc, link_rate, 1000), glob, sleep=vc.sleep)
    log = Log(vc)
    task = asyncio.create_task(producer(sched, log, "t", 500, 10_000))
    await vc.advance_to(10.0)
    await stop([task])
    assert abs(log.bytes(until=10.0) - (4_000 * 10 + 1000)) <= 500


async def test_links_share_the_global_bucket_and_a_slow_link_blocks_nobody() -> None:
    vc = VirtualClock()
    glob = TokenBucket(10_000, 2000, clock=vc)
    fast_a = Scheduler(link(vc, None, 1), glob, sleep=vc.sleep, name="a")
    fast_b = Scheduler(link(vc, None, 1), glob, sleep=vc.sleep, name="b")
    # burst = 2 chunks: while the slow link's next chunk queues at the global bucket its
    # own tokens keep accruing instead of spilling over a full bucket (docs/ratelimit.md)
    slow = Scheduler(link(vc, 1_000, 1000), glob, sleep=vc.sleep, name="slow")
    logs = {name: Log(vc) for name in ("a", "b", "slow")}
    tasks = [
        asyncio.create_task(producer(s, logs[s.name], f"{s.name}{i}", 500, 10_000))
        for s in (fast_a, fast_b, slow)
        for i in range(2)
    ]
    await vc.advance_to(20.0)
    await stop(tasks)
    got = {name: log.bytes(until=20.0) for name, log in logs.items()}
    assert abs(got["slow"] - (1_000 * 20 + 1000)) <= 500  # its own limit, not less
    # the rest of the global rate is split evenly between the two fast links (once both
    # wait: at t=0 link "a" started first and took the global burst alone)
    assert abs(logs["a"].bytes(since=1e-9) - logs["b"].bytes(since=1e-9)) <= 500
    assert abs(sum(got.values()) - (10_000 * 20 + 2000)) <= 1000
    everything = [(t, n) for log in logs.values() for t, _, _, n in log.grants]
    assert max_window(everything) <= 10_000 + 2000


async def test_latency_on_one_link_goes_before_bulk_on_another_at_the_global_bucket() -> None:
    vc = VirtualClock()
    glob = TokenBucket(1000, 100, clock=vc)
    a = Scheduler(link(vc, None, 1), glob, sleep=vc.sleep)
    b = Scheduler(link(vc, None, 1), glob, sleep=vc.sleep)
    glob.take(100)
    log = Log(vc)
    tasks = [asyncio.create_task(producer(a, log, "bulk-on-a", 100, 6))]
    await vc.advance(0.15)  # a's first bulk chunk went at t=0.1
    tasks.append(asyncio.create_task(producer(b, log, "lat-on-b", 100, 3, "latency")))
    await vc.run(asyncio.gather(*tasks))
    assert log.keys() == ["bulk-on-a"] + ["lat-on-b"] * 3 + ["bulk-on-a"] * 5
    assert [t for t, *_ in log.grants] == pytest.approx([0.1 * (i + 1) for i in range(9)])


async def test_global_limit_change_wakes_waiters_on_every_link() -> None:
    vc = VirtualClock()
    glob = TokenBucket(100, 100, clock=vc)
    scheds = [Scheduler(link(vc, None, 1), glob, sleep=vc.sleep) for _ in range(3)]
    glob.take(100)
    tasks = [asyncio.create_task(s.acquire("t", 100)) for s in scheds]
    await vc.advance(0.5)
    assert not any(t.done() for t in tasks)
    glob.set_limits(10_000, 100)
    await vc.advance(0.05)
    assert all(t.done() for t in tasks)


# ------------------------------------------------------------------ parse / format
@pytest.mark.parametrize(
    ("text", "bytes_per_s"),
    [
        ("1gbit", 125e6),
        ("100mbit", 12.5e6),
        ("1.5Gbit/s", 187.5e6),
        ("125MB/s", 125e6),
        ("10gbps", 1.25e9),
        ("10 Gbit/s", 1.25e9),
        ("512MiB/s", 512 * MiB),
        ("1Mibit", MiB / 8),
        ("800kbps", 100e3),
        ("4096", 4096.0),
        ("2.5e6", 2.5e6),
        ("1e3B/s", 1000.0),
        ("3 bytes/s", 3.0),
        ("64kbit/s", 8000.0),
        ("unlimited", math.inf),
        (1000, 1000.0),
    ],
)
def test_parse_rate(text: str, bytes_per_s: float) -> None:
    assert parse_rate(text) == pytest.approx(bytes_per_s)


@pytest.mark.parametrize(
    "text",
    ["", "fast", "0", "0mbit", "-5mbit", "-1", "1 gigabit", "10 Gbit/h", "nan", "inf", "1e400",
     "20tbit", "1.5.2mbit", "mbit", "12M", True, None, [1]],
)  # fmt: skip
def test_parse_rate_refuses_junk_zero_negative_absurd(text: object) -> None:
    with pytest.raises(RateError, match="link_rate"):
        parse_rate(text, field="link_rate")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("rate", "text"),
    [(125e6, "1Gbit/s"), (187.5e6, "1.5Gbit/s"), (12.5e6, "100Mbit/s"), (1.25e12, "10Tbit/s"),
     (100.0, "800bit/s"), (0.05, "0.4bit/s"), (math.inf, "unlimited"), (None, "unlimited")],
)  # fmt: skip
def test_format_rate(rate: float, text: str) -> None:
    assert format_rate(rate) == text
    assert parse_rate(text) == pytest.approx(rate if rate is not None else math.inf)


@given(st.floats(min_value=1e-3, max_value=MAX_RATE))
def test_format_parse_round_trip(rate: float) -> None:
    assert parse_rate(format_rate(rate)) == pytest.approx(rate, rel=1e-11)


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, "x", True])
def test_format_rate_refuses_bad_values(bad: object) -> None:
    with pytest.raises(RateError):
        format_rate(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "size"),
    [("4MiB", 4 * MiB), ("1MB", 10**6), ("65536", 65536), ("512 KiB", 512 * KiB),
     ("2 bytes", 2), ("64GiB", MAX_BURST), (4096, 4096)],
)  # fmt: skip
def test_parse_burst(text: str, size: int) -> None:
    assert parse_burst(text) == size


@pytest.mark.parametrize("text", ["0", "-4MiB", "4Mb", "4mbit", "65GiB", "0.5", "4M", "x", ""])
def test_parse_burst_refuses_bad_sizes(text: str) -> None:
    with pytest.raises(RateError, match="burst"):
        parse_burst(text)


# ------------------------------------------------------------------ the virtual clock
async def test_virtual_clock_runs_sleepers_in_order_and_detects_deadlock() -> None:
    vc = VirtualClock(5.0)
    seen: list[tuple[str, float]] = []

    async def sleeper(name: str, delay: float) -> None:
        await vc.sleep(delay)
        seen.append((name, vc()))

    await vc.run(asyncio.gather(sleeper("b", 2), sleeper("a", 1), sleeper("c", 2)))
    assert seen == [("a", 6.0), ("b", 7.0), ("c", 7.0)]
    with pytest.raises(RuntimeError, match="deadlock"):
        await vc.run(asyncio.get_running_loop().create_future())
    with pytest.raises(TimeoutError):
        await vc.run(vc.sleep(10), limit=10.0)
    assert vc() == 10.0
