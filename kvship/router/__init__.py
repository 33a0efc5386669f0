"""The live PrfaaS router: per request, prefill locally or in the remote cluster, and why.

``policy`` holds the rule (:class:`Router`, its inputs and :class:`Decision`); ``retune`` the
empirical planner that re-tunes t from recent lengths; ``scenario`` the link-drop simulation;
``command`` the ``kvship route`` command and ``kvship simulate --scenario link-drop``.
"""

from kvship.router.policy import (
    Decision,
    LinkView,
    RemoteView,
    RouteError,
    Router,
    RouteRequest,
)
from kvship.router.retune import EmpiricalPlanner, Tuned

__all__ = [
    "Decision",
    "EmpiricalPlanner",
    "LinkView",
    "RemoteView",
    "RouteError",
    "RouteRequest",
    "Router",
    "Tuned",
]
