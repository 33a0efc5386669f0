"""The coded chunks' receive-buffer pool: reuse without sharing, and a bound on idle bytes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvship.daemon.scratch import SMALLEST, ScratchPool, size_class


def test_a_given_back_buffer_is_handed_out_again_for_the_same_size_class() -> None:
    pool = ScratchPool()
    first = pool.take(3_000_000)
    assert len(first) == 3_000_000 and len(first.obj) == 4 << 20
    buf = first.obj
    pool.give(first)
    again = pool.take(2_500_000)  # same class (4 MiB): the same buffer, no new allocation
    assert again.obj is buf and len(again) == 2_500_000
    assert pool.take(3_000_000).obj is not buf  # in use: never handed out twice


def test_idle_buffers_stay_within_the_limit_and_foreign_ones_are_not_kept() -> None:
    pool = ScratchPool(limit_bytes=8 << 20)
    views = [pool.take(4 << 20) for _ in range(3)]
    for view in views:
        pool.give(view)
    assert pool.idle_bytes == 8 << 20  # the third did not fit
    pool.give(memoryview(bytearray(3_000_000)))  # not a size class: someone else's
    pool.give(memoryview(b"x" * SMALLEST))  # read-only bytes are never written into
    assert pool.idle_bytes == 8 << 20


@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(min_value=1, max_value=5 << 20)),
        max_size=60,
    )
)
def test_no_two_outstanding_views_share_a_buffer(ops: list[tuple[bool, int]]) -> None:
    pool = ScratchPool(limit_bytes=16 << 20)
    out: list[memoryview] = []
    for give, nbytes in ops:
        if give and out:
            pool.give(out.pop(nbytes % len(out)))
        else:
            view = pool.take(nbytes)
            assert len(view) == nbytes and len(view.obj) == size_class(nbytes)
            out.append(view)
        assert len({id(v.obj) for v in out}) == len(out)
        assert 0 <= pool.idle_bytes <= pool.limit_bytes
