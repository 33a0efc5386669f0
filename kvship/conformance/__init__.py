"""A conformance kit for kvship wire protocol v1 (protocol/SPEC.md).

``kvship conformance --peer HOST:PORT --engine ADDR`` runs the SPEC's rules against any
implementation listening there. The kit has its own frame codec (:mod:`.wire`), chunk
codecs and prefix key chain (:mod:`.payload`), written from the SPEC's text and proven
against the golden vectors, and imports nothing of the reference implementation.

    from kvship.conformance import Target, run
    report = await run(Target(peer="127.0.0.1:7470", engines=("/run/kvship/kvshipd.sock",)))
    assert report.ok, report.table()
"""

from __future__ import annotations

from .checks import CHECKS, FINAL, Check, Listener, Target
from .report import Report, Result, run, run_sync

__all__ = ["CHECKS", "FINAL", "Check", "Listener", "Report", "Result", "Target", "run", "run_sync"]
