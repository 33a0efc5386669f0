"""Run the checks against a target and report: a pass/fail table or one JSON object."""

from __future__ import annotations

import asyncio
import fnmatch
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .checks import Check, Ctx, Listener, Target, plan
from .link import CheckFailed, CheckSkipped

PASS, FAIL, SKIP = "pass", "fail", "skip"


@dataclass(frozen=True)
class Result:
    name: str
    section: str
    result: str  # "pass" | "fail" | "skip"
    detail: str
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["seconds"] = round(self.seconds, 3)
        return d


@dataclass
class Report:
    target: str
    checks: list[Result] = field(default_factory=list)

    def count(self, result: str) -> int:
        return sum(1 for c in self.checks if c.result == result)

    @property
    def passed(self) -> int:
        return self.count(PASS)

    @property
    def failed(self) -> int:
        return self.count(FAIL)

    @property
    def skipped(self) -> int:
        return self.count(SKIP)

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def by_name(self) -> dict[str, Result]:
        return {c.name: c for c in self.checks}

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "passed": self.passed,
            "failed": self.failed,
            "skipped": self.skipped,
            "checks": [c.to_json() for c in self.checks],
        }

    def table(self) -> str:
        """The human-readable form: one line per check, then the totals."""
        name_w = max((len(c.name) for c in self.checks), default=4)
        sec_w = max((len(c.section) for c in self.checks), default=4)
        lines = [f"kvship conformance: {self.target}", ""]
        lines.append(f"{'RESULT':<6}  {'CHECK':<{name_w}}  {'SPEC':<{sec_w}}  DETAIL")
        for c in self.checks:
            lines.append(
                f"{c.result.upper():<6}  {c.name:<{name_w}}  {c.section:<{sec_w}}  {c.detail}"
            )
        lines += [
            "",
            f"{self.passed} passed, {self.failed} failed, {self.skipped} skipped",
        ]
        return "\n".join(lines)


def check_name(c: Check, listener: Listener, target: Target) -> str:
    """A check's name in the report: the listener in brackets when it runs on several."""
    runs_on = [x for x in target.listeners if c.applies(x)]
    return c.name if len(runs_on) == 1 else f"{c.name}[{listener.label}]"


async def run_one(c: Check, listener: Listener, target: Target, name: str) -> Result:
    timeout = target.timeout * c.slow
    ctx = Ctx(target, listener)
    started = time.monotonic()
    try:
        detail = await asyncio.wait_for(c.func(ctx), timeout)
        result = PASS
    except CheckFailed as exc:
        result, detail = FAIL, str(exc)
    except CheckSkipped as exc:
        result, detail = SKIP, str(exc)
    except TimeoutError:
        result, detail = FAIL, f"no answer within {timeout:g} s"
    except Exception as exc:  # a bug in the kit (or the target broke it): report, go on
        result, detail = FAIL, f"kit error: {type(exc).__name__}: {exc}"
    finally:
        ctx.close()
    return Result(
        name, c.section, result, " ".join(str(detail).split()), time.monotonic() - started
    )


async def run(
    target: Target,
    only: Sequence[str] = (),
    progress: Callable[[Result], None] | None = None,
) -> Report:
    """Run every check that applies to ``target`` (those matching one of the ``only``
    globs, if given), one after another; the final liveness checks always run."""
    if not target.listeners:
        raise ValueError("nothing to test: give a peer and/or an engine address")
    report = Report(target.describe())
    for c, listener in plan(target):
        name = check_name(c, listener, target)
        if (
            only
            and not c.name.startswith("final.")
            and not any(
                fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(c.name, pattern)
                for pattern in only
            )
        ):
            continue
        result = await run_one(c, listener, target, name)
        report.checks.append(result)
        if progress is not None:
            progress(result)
    return report


def run_sync(target: Target, only: Sequence[str] = ()) -> Report:
    """:func:`run` on a fresh event loop (for callers without one)."""
    return asyncio.run(run(target, only))
