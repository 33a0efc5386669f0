"""Token-bucket rate limiting in bytes on the wire (after compression).

* :class:`TokenBucket` - the accounting: rate, burst, level; limits change at run time.
* :class:`Scheduler` - one per peer link: ``await acquire(transfer, nbytes, priority)``
  takes from the link bucket and the shared global egress bucket; ``latency`` before
  ``bulk``, byte-fair between transfers, FIFO between links at the global bucket.
* :func:`parse_rate` / :func:`format_rate` / :func:`parse_burst` - config and API text.
* :class:`VirtualClock` - deterministic time for tests and simulations.

See docs/ratelimit.md for the semantics and measured accuracy.
"""

from .bucket import TokenBucket
from .rates import (
    MAX_BURST,
    MAX_RATE,
    UNLIMITED,
    RateError,
    check_burst,
    check_rate,
    format_rate,
    parse_burst,
    parse_rate,
)
from .scheduler import BULK, LATENCY, MAX_CATCH_UP_S, Priority, Scheduler, SchedulerClosed
from .virtual import VirtualClock

__all__ = [
    "BULK",
    "LATENCY",
    "MAX_BURST",
    "MAX_CATCH_UP_S",
    "MAX_RATE",
    "UNLIMITED",
    "Priority",
    "RateError",
    "Scheduler",
    "SchedulerClosed",
    "TokenBucket",
    "VirtualClock",
    "check_burst",
    "check_rate",
    "format_rate",
    "parse_burst",
    "parse_rate",
]
