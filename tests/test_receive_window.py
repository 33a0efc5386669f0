"""Receive windows that follow the bandwidth-delay product (kvship.daemon.window), driven
by a simulated clock: a window that binds doubles each round trip, one that does not stays,
all of them together grow no further than their pool, and shrinking only keeps credit back."""

from __future__ import annotations

import heapq

from hypothesis import given, settings
from hypothesis import strategies as st

from kvship.daemon.window import MIN_ROUND_S, ReceiveWindow, WindowPool

MIB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def window(pool: WindowPool, clock: Clock, rtt: float | None = 0.08) -> ReceiveWindow:
    return ReceiveWindow(8 * MIB, 64 * MIB, pool, lambda: rtt, clock)


def simulate(
    w: ReceiveWindow, clock: Clock, seconds: float, rate_Bps: float = 1e12, rtt: float = 0.08
) -> list[tuple[float, int]]:
    """A sender that sends whatever credit it has, in 1 MiB chunks, over a link of
    ``rate_Bps`` and round trip ``rtt``: each chunk is consumed rtt/2 after it left (the
    rest of the round trip is the credit's way back, folded in here). (time, window) at
    each consumption."""
    arrivals: list[float] = []
    link_free = 0.0
    credit = w.window
    seen = []
    while True:
        while credit >= MIB:  # send what the credit allows, serialized at the rate
            link_free = max(link_free, clock.now) + MIB / rate_Bps
            heapq.heappush(arrivals, link_free + rtt)
            credit -= MIB
        clock.now = heapq.heappop(arrivals)
        if clock.now > seconds:
            return seen
        credit += w.adjust(MIB)
        seen.append((clock.now, w.window))


def test_a_window_that_binds_grows_to_twice_the_bdp_within_a_few_round_trips() -> None:
    for rate, rounds in ((1 << 30, 2), (1e12, 9)):  # BDP 80 MiB; unbounded
        clock, pool = Clock(), WindowPool(1 << 30)
        w = window(pool, clock)
        seen = simulate(w, clock, 1.5, rate_Bps=rate)
        reached = min(t for t, size in seen if size == 64 * MIB)  # window_max_bytes
        assert reached <= rounds * 0.08, (rate, reached)
        assert all(size == 64 * MIB for t, size in seen if t >= reached)  # and stays
        assert pool.lent == 56 * MIB


def test_a_window_settles_at_twice_what_the_rate_lets_through() -> None:
    clock, pool = Clock(), WindowPool(1 << 30)
    w = window(pool, clock)
    seen = simulate(w, clock, 1.5, rate_Bps=200 * MIB)  # BDP 16 MiB
    assert {round(size / MIB) for t, size in seen if t > 0.3} == {32}


def test_a_window_that_does_not_bind_stays_where_it_started() -> None:
    clock, pool = Clock(), WindowPool(1 << 30)
    w = window(pool, clock)
    seen = simulate(w, clock, 1.0, rate_Bps=30 * MIB)  # 2.4 MiB per RTT: the rate binds
    assert {size for _, size in seen} == {8 * MIB} and pool.lent == 0


def test_on_loopback_a_busy_connection_keeps_its_window() -> None:
    """0.1 ms RTT: the round is MIN_ROUND_S, and 2 x rate x RTT is far below 8 MiB."""
    clock, pool = Clock(), WindowPool(1 << 30)
    w = window(pool, clock, rtt=0.0001)
    for _ in range(2000):  # 4 GB/s for 0.5 s
        assert w.adjust(MIB) == MIB
        clock.now += MIB / 4e9
    assert w.window == 8 * MIB and MIN_ROUND_S > 0.0001


def test_no_rtt_reading_means_no_growth() -> None:
    clock, pool = Clock(), WindowPool(1 << 30)
    w = window(pool, clock, rtt=None)
    assert {size for _, size in simulate(w, clock, 1.0)} == {8 * MIB}


def test_windows_together_grow_no_further_than_their_pool_and_give_it_back() -> None:
    clock, pool = Clock(), WindowPool(40 * MIB)
    a, b = window(pool, clock), window(pool, clock)
    simulate(a, clock, 1.0)
    clock.now = 0.0
    simulate(b, clock, 1.0)
    assert pool.lent == 40 * MIB and a.extra == 40 * MIB - b.extra
    assert a.window + b.window == 16 * MIB + 40 * MIB
    a.close()
    assert pool.lent == b.extra and a.extra == 0


def test_a_window_shrinks_by_keeping_credit_back_never_below_zero() -> None:
    clock, pool = Clock(), WindowPool(1 << 30)
    w = window(pool, clock)
    simulate(w, clock, 1.0, rate_Bps=1 << 30)
    assert w.window == 64 * MIB
    grants = []
    for _ in range(200):  # then only 1 MiB per round trip: the window goes back to 8 MiB
        grants.append(w.adjust(MIB))
        clock.now += 0.08
    assert w.window == 8 * MIB and pool.lent == 0
    assert min(grants) == 0 and sum(grants) == 200 * MIB - 56 * MIB


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 8 * MIB), st.floats(0, 0.2), st.sampled_from([0, 1])),
        max_size=80,
    ),
    st.integers(0, 128 * MIB),
)
def test_credit_is_conserved_and_bounded(steps: list[tuple[int, float, int]], limit: int) -> None:
    """Whatever is consumed and when: every grant is >= 0, what was granted beyond what was
    consumed is each window's growth, within its bounds, and the pool lent exactly that."""
    clock, pool = Clock(), WindowPool(limit)
    windows = [window(pool, clock), window(pool, clock, rtt=0.01)]
    consumed = [0, 0]
    granted = [0, 0]
    for nbytes, dt, which in steps:
        clock.now += dt
        g = windows[which].adjust(nbytes)
        assert g >= 0
        consumed[which] += nbytes
        granted[which] += g
    for w, c, g in zip(windows, consumed, granted, strict=True):
        assert g - c == w.extra
        assert 0 <= w.extra <= 56 * MIB
    assert pool.lent == sum(w.extra for w in windows) <= limit
