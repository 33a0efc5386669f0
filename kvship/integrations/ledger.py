"""When a producer engine may free a request's blocks: the bookkeeping of its saves.

Engine-neutral (vLLM's ``get_finished`` contract, stated without vLLM): a request whose
blocks the engine holds for its save is reported "finished sending" exactly once, when
three things hold, in any order: every layer was handed over (``ended``), the save is over
(``over``: acknowledged or failed, possibly before it ended), and the engine finished the
request (``engine_finished``). A save cancelled because its request went before its prefill
ended (the engine freed those blocks itself) is forgotten, and so is its late outcome.
Only requests with a save are tracked, so finished ids of other requests never pile up.
"""

from __future__ import annotations

from collections.abc import Iterable


class SaveLedger:
    def __init__(self) -> None:
        self._req_of: dict[str, str] = {}  # save key -> request id
        self._saving: set[str] = set()
        self._ended: set[str] = set()
        self._over: set[str] = set()
        self._finished: set[str] = set()
        self._cancelled: set[str] = set()  # keys whose outcome is to be ignored

    def started(self, req_id: str, key: str) -> None:
        self._req_of[key] = req_id
        self._saving.add(req_id)

    def ended(self, req_id: str) -> None:
        """Every layer of the request was handed to the save."""
        if req_id in self._saving:
            self._ended.add(req_id)

    def over(self, key: str) -> None:
        """The save of ``key`` ended (acknowledged or failed), or could not start."""
        req_id = self._req_of.pop(key, None)
        if key in self._cancelled:
            self._cancelled.discard(key)
        elif req_id is not None and req_id in self._saving:
            self._over.add(req_id)

    def cancelled(self, key: str) -> None:
        """The request went before its save ended: forget it (its outcome may still come)."""
        req_id = self._req_of.get(key)
        if req_id is not None:
            self._forget(req_id)
            self._cancelled.add(key)

    def engine_finished(self, req_ids: Iterable[str]) -> set[str]:
        """Note the engine's finished requests; returns those now finished sending."""
        self._finished.update(r for r in req_ids if r in self._saving)
        done = self._over & self._ended & self._finished
        for req_id in done:
            self._forget(req_id)
        return done

    def tracked(self) -> int:
        """Requests with a save not reported yet (a leak shows here)."""
        return len(self._saving)

    def _forget(self, req_id: str) -> None:
        for states in (self._saving, self._ended, self._over, self._finished):
            states.discard(req_id)
