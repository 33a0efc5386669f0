"""PrfaaS throughput planner and discrete-event simulator (pure computation).

``model`` holds profiles, the Θ/Λ formulas and the grid search; ``distribution`` the
prompt-length distribution; ``simulate`` the discrete-event simulator; ``report`` tables,
JSON and plots; ``command`` the ``kvship plan`` / ``kvship simulate`` subcommands.
"""

from kvship.plan.distribution import LengthDistribution, PlanError
from kvship.plan.model import (
    OperatingPoint,
    Plan,
    Profile,
    builtin_profiles,
    evaluate,
    load_profile,
    optimize,
    parse_profile,
    plan,
)
from kvship.plan.simulate import SimRequest, SimResult, SimState, StepSchedule, simulate

__all__ = [
    "LengthDistribution",
    "OperatingPoint",
    "Plan",
    "PlanError",
    "Profile",
    "SimRequest",
    "SimResult",
    "SimState",
    "StepSchedule",
    "builtin_profiles",
    "evaluate",
    "load_profile",
    "optimize",
    "parse_profile",
    "plan",
    "simulate",
]
