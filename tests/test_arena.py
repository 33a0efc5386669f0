"""Unit tests of the shared-memory arena and its ring allocator (kvship.staging.arena)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from kvship.staging import Arena, RingAllocator
from kvship.staging.arena import SHM_DIR

pytestmark = pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason=f"no {SHM_DIR}")


@pytest.fixture
def arena() -> Iterator[Arena]:
    a = Arena.create(4096)
    yield a
    a.close()


# ------------------------------------------------------------------ Arena
def test_create_makes_a_private_kvship_file_under_dev_shm(arena: Arena) -> None:
    assert os.path.dirname(arena.path) == SHM_DIR
    assert os.path.basename(arena.path).startswith("kvship-")
    st_ = os.stat(arena.path)
    assert st_.st_size == 4096 and st_.st_mode & 0o777 == 0o600
    assert len(arena.buffer) == arena.size == 4096


@pytest.mark.parametrize("size", [0, -1])
def test_create_refuses_non_positive_sizes(size: int) -> None:
    with pytest.raises(ValueError):
        Arena.create(size)


def test_attach_shares_the_bytes(arena: Arena) -> None:
    other = Arena.attach(arena.path, 4096)
    try:
        arena.view(100, 5)[:] = b"hello"
        assert bytes(other.view(100, 5)) == b"hello"
        other.view(4091, 5)[:] = b"world"
        assert bytes(arena.view(4091, 5)) == b"world"
    finally:
        other.close()
    assert os.path.exists(arena.path), "an attached side must not unlink the creator's file"


def test_unlink_keeps_the_mapping(arena: Arena) -> None:
    other = Arena.attach(arena.path, 4096)
    try:
        arena.unlink()
        assert not os.path.exists(arena.path)
        arena.view(0, 3)[:] = b"abc"
        assert bytes(other.view(0, 3)) == b"abc"
        arena.unlink()  # idempotent
    finally:
        other.close()


def test_close_unlinks_and_tolerates_live_views() -> None:
    a = Arena.create(8192)
    kept = a.view(0, 16)  # an engine still holds a layer view
    a.close()
    assert not os.path.exists(a.path)
    kept[:4] = b"\x01\x02\x03\x04"  # the memory stays valid while referenced
    assert bytes(kept[:4]) == b"\x01\x02\x03\x04"
    kept.release()


@pytest.mark.parametrize(
    ("offset", "length"),
    [(-1, 1), (0, -1), (0, 4097), (4096, 1), (4000, 97), (2**63, 1)],
)
def test_view_bounds(arena: Arena, offset: int, length: int) -> None:
    with pytest.raises(ValueError):
        arena.view(offset, length)


def test_view_edges(arena: Arena) -> None:
    assert len(arena.view(0, 4096)) == 4096
    assert len(arena.view(4096, 0)) == 0
    assert len(arena.view(4095, 1)) == 1


def test_attach_refuses_a_file_outside_dev_shm(tmp_path: Path) -> None:
    outside = tmp_path / "kvship-outside"
    outside.write_bytes(bytes(4096))
    with pytest.raises(ValueError, match="not a kvship file"):
        Arena.attach(str(outside), 4096)


def test_attach_refuses_dot_dot_escapes(arena: Arena, tmp_path: Path) -> None:
    target = tmp_path / "kvship-x"
    target.write_bytes(bytes(4096))
    sneaky = f"{SHM_DIR}/../..{target}"
    assert os.path.exists(sneaky)
    with pytest.raises(ValueError):
        Arena.attach(sneaky, 4096)


def test_attach_refuses_a_symlink_leading_out(tmp_path: Path) -> None:
    target = tmp_path / "kvship-target"
    target.write_bytes(bytes(4096))
    link = Path(SHM_DIR) / f"kvship-link-{os.getpid()}"
    link.symlink_to(target)
    try:
        with pytest.raises(ValueError):
            Arena.attach(str(link), 4096)
    finally:
        link.unlink()


def test_attach_refuses_non_kvship_names_and_subdirectories(tmp_path: Path) -> None:
    plain = Path(SHM_DIR) / f"not-kvship-{os.getpid()}"
    plain.write_bytes(bytes(4096))
    try:
        with pytest.raises(ValueError):
            Arena.attach(str(plain), 4096)
    finally:
        plain.unlink()
    with pytest.raises(ValueError):
        Arena.attach(f"{SHM_DIR}/sub/kvship-x", 4096)


@pytest.mark.parametrize("size", [4095, 4097, 0])
def test_attach_refuses_a_size_mismatch(arena: Arena, size: int) -> None:
    with pytest.raises(ValueError, match="announced"):
        Arena.attach(arena.path, size)


def test_attach_of_a_missing_file_is_an_os_error() -> None:
    with pytest.raises(OSError):
        Arena.attach(f"{SHM_DIR}/kvship-does-not-exist-{os.getpid()}", 4096)


# ---------------------------------------------------------- RingAllocator
def test_ring_allocates_in_order_until_full() -> None:
    ring = RingAllocator(100)
    assert [ring.allocate(30), ring.allocate(30), ring.allocate(40)] == [0, 30, 60]
    assert ring.in_use == 100
    assert ring.allocate(1) is None


@pytest.mark.parametrize("length", [0, -5, 101])
def test_ring_refuses_impossible_lengths(length: int) -> None:
    with pytest.raises(ValueError):
        RingAllocator(100).allocate(length)


def test_ring_whole_capacity() -> None:
    ring = RingAllocator(100)
    assert ring.allocate(100) == 0
    assert ring.allocate(1) is None
    ring.release(0, 100)
    assert ring.in_use == 0 and ring.allocate(100) == 0


def test_ring_release_checks_the_region() -> None:
    ring = RingAllocator(100)
    ring.allocate(10)
    with pytest.raises(ValueError):
        ring.release(5, 10)  # never handed out
    with pytest.raises(ValueError):
        ring.release(50, 10)  # beyond anything live
    ring.release(0, 10)
    with pytest.raises(ValueError):
        ring.release(0, 10)  # twice
    assert ring.in_use == 0


def test_ring_failed_release_changes_nothing() -> None:
    """A refused release (wrong length) must leave the region live and releasable."""
    ring = RingAllocator(100)
    ring.allocate(10)
    with pytest.raises(ValueError):
        ring.release(0, 9)
    assert ring.in_use == 10
    ring.release(0, 10)  # raises "no such region" today
    assert ring.in_use == 0 and ring.allocate(100) == 0


def test_ring_out_of_order_release() -> None:
    ring = RingAllocator(100)
    a, b, c = ring.allocate(30), ring.allocate(30), ring.allocate(30)
    assert (a, b, c) == (0, 30, 60)
    ring.release(b, 30)  # middle first: counted free, reclaimed only with its neighbours
    assert ring.in_use == 60
    assert ring.allocate(20) is None  # 10 B at the end, nothing before the oldest
    ring.release(a, 30)  # the oldest: a and b's space come back at the front
    assert ring.in_use == 30
    assert ring.allocate(50) == 0  # 10 B at the end do not fit: wrap to the front
    assert ring.allocate(10) == 50  # up to the oldest live region (c at 60)
    assert ring.allocate(1) is None
    assert ring.in_use == 90


def test_ring_wraps_around() -> None:
    ring = RingAllocator(100)
    first, _second = ring.allocate(40), ring.allocate(40)
    ring.release(first, 40)
    assert ring.allocate(30) == 0  # 20 B left at the end: wrap to the front
    assert ring.allocate(10) == 30  # fills up to the oldest live region exactly
    assert ring.allocate(1) is None
    assert ring.in_use == 80


def test_ring_frees_from_the_newest_end() -> None:
    ring = RingAllocator(100)
    ring.allocate(30)
    ring.allocate(30)
    c = ring.allocate(30)
    ring.release(c, 30)  # the newest: its space is reusable at once
    assert ring.allocate(40) == 60
    ring.release(60, 40)
    ring.release(30, 30)
    assert ring.in_use == 30
    assert ring.allocate(70) == 30


def test_ring_freeing_both_ends_of_a_wrapped_ring() -> None:
    ring = RingAllocator(100)
    a, b, c = ring.allocate(40), ring.allocate(40), ring.allocate(20)
    ring.release(a, 40)
    d = ring.allocate(30)  # wraps to 0
    assert d == 0
    ring.release(d, 30)  # newest end
    ring.release(b, 40)  # oldest end
    assert ring.in_use == 20
    assert ring.allocate(80) == 0  # only c (80..100) is live
    ring.release(c, 20)
    ring.release(0, 80)
    assert ring.in_use == 0
    assert ring.allocate(100) == 0  # empty again: the whole ring


# -------------------------------------------------- hypothesis state test
class RingMachine(RuleBasedStateMachine):
    """Random allocate/release sequences: live regions never overlap, always lie inside
    the ring, ``in_use`` is exact, and an empty ring can always serve any length."""

    regions = Bundle("regions")

    @initialize(capacity=st.integers(1, 512))
    def setup(self, capacity: int) -> None:
        self.capacity = capacity
        self.ring = RingAllocator(capacity)
        self.live: dict[int, int] = {}

    @rule(target=regions, data=st.data())
    def allocate(self, data: st.DataObject) -> tuple[int, int] | None:
        length = data.draw(st.integers(1, self.capacity))
        offset = self.ring.allocate(length)
        if offset is None:
            assert self.live, f"an empty ring refused {length} of {self.capacity} B"
            return None
        assert offset >= 0 and offset + length <= self.capacity
        for other, other_len in self.live.items():
            assert offset + length <= other or other + other_len <= offset, (
                f"{offset}+{length} overlaps live {other}+{other_len}"
            )
        self.live[offset] = length
        return (offset, length)

    @rule(region=consumes(regions))
    def release(self, region: tuple[int, int] | None) -> None:
        if region is None:
            return
        offset, length = region
        assert self.live.pop(offset) == length
        self.ring.release(offset, length)

    @rule()
    def release_unknown(self) -> None:
        free = next((o for o in range(self.capacity) if o not in self.live), None)
        if free is not None:
            with pytest.raises(ValueError):
                self.ring.release(free, 1)

    @invariant()
    def in_use_is_exact(self) -> None:
        if hasattr(self, "ring"):
            assert self.ring.in_use == sum(self.live.values())


RingMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_ring_state_machine = RingMachine.TestCase


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as two users")
def test_an_arena_shared_with_a_group_maps_for_another_user_of_it() -> None:
    """A daemon running as another user (systemd's User=kvship) maps the engine's arena
    through the engine socket's group; without the group it could not open the file."""
    import subprocess
    import sys

    nobody = 65534
    arena = Arena.create(1 << 20, group=nobody)
    try:
        st = os.stat(arena.path)
        assert (st.st_gid, st.st_mode & 0o777) == (nobody, 0o660)
        arena.view(0, 5)[:] = b"hello"
        probe = (
            "import os; from kvship.staging import Arena; "  # imports first: /root is private
            "os.setgroups([]); os.setgid(65534); os.setuid(65534); "
            f"a = Arena.attach({arena.path!r}, {1 << 20}); print(bytes(a.view(0, 5)).decode())"
        )
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "hello"
        private = Arena.create(4096)
        try:
            assert os.stat(private.path).st_mode & 0o777 == 0o600
        finally:
            private.close()
    finally:
        arena.close()
