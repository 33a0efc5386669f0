"""The producer's block-release bookkeeping (kvship.integrations.ledger) against random
orders of events, as vLLM's steps can deliver them: each saved request is reported
finished sending exactly once, never before its layers were all handed over, its save
ended and the engine finished it; a cancelled one never; nothing stays tracked."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvship.integrations.ledger import SaveLedger

EVENTS = ("ended", "over", "finished")


@st.composite
def histories(draw: st.DrawFn) -> tuple[int, list[tuple[str, int]], set[int]]:
    """n requests; each gets ended/over/finished in a random interleaving, unless it is
    cancelled (then: cancel, maybe a late outcome, and the engine finishing it)."""
    n = draw(st.integers(1, 12))
    cancelled = set(draw(st.lists(st.integers(0, n - 1), unique=True)))
    events: list[tuple[str, int]] = [("started", i) for i in range(n)]
    tails: list[list[tuple[str, int]]] = []
    for i in range(n):
        if i in cancelled:
            late = [("over", i)] if draw(st.booleans()) else []
            tails.append([("cancelled", i), *late, ("finished", i)])
        else:
            tails.append([(e, i) for e in draw(st.permutations(EVENTS))])
    while any(tails):  # interleave the requests' sequences, each kept in its own order
        pick = draw(st.sampled_from([k for k, t in enumerate(tails) if t]))
        events.append(tails[pick].pop(0))
    return n, events, cancelled


@settings(max_examples=300, deadline=None)
@given(histories())
def test_each_saved_request_is_released_once_after_all_three(
    history: tuple[int, list[tuple[str, int]], set[int]],
) -> None:
    n, events, cancelled = history
    ledger = SaveLedger()
    seen: dict[int, set[str]] = {i: set() for i in range(n)}
    released: list[int] = []
    for kind, i in events:
        req, key = f"req-{i}", f"key-{i}"
        if kind == "started":
            ledger.started(req, key)
        elif kind == "ended":
            ledger.ended(req)
        elif kind == "over":
            ledger.over(key)
        elif kind == "cancelled":
            ledger.cancelled(key)
        seen[i].add(kind)
        finished = [req] if kind == "finished" else []
        for done in ledger.engine_finished(finished):
            j = int(done.split("-")[1])
            assert seen[j] >= set(EVENTS), (done, seen[j])
            released.append(j)
    assert sorted(released) == sorted(set(range(n)) - cancelled)  # each once, none cancelled
    assert ledger.tracked() == 0


def test_unsaved_requests_never_pile_up() -> None:
    ledger = SaveLedger()
    for k in range(1000):
        assert ledger.engine_finished([f"other-{k}"]) == set()
    assert ledger.tracked() == 0
    ledger.over("never-started")  # an outcome nobody tracks: ignored
    assert ledger.engine_finished(["x"]) == set()
