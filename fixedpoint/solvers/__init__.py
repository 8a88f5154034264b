"""Solver configurations.  Each is a frozen dataclass validated at construction."""

from functools import partial
from typing import Callable

from fixedpoint.solvers.anderson import Anderson
from fixedpoint.solvers.auto import Auto
from fixedpoint.solvers.base import DEFAULT_TOLERANCES, Solver
from fixedpoint.solvers.newton import Newton, QuasiNewton
from fixedpoint.solvers.picard import Picard
from fixedpoint.solvers.sequential import Sequential

#: Solver names accepted by the command line, each with the configuration it builds.
#: ``damped`` is backtracking on full Newton: measured in docs/benchmarks.md, damping rescues
#: full Newton on strongly expanding weights and does not help quasi-Newton.
SOLVERS: dict[str, Callable[..., Solver]] = {
    "auto": Auto,
    "sequential": Sequential,
    "picard": Picard,
    "anderson": Anderson,
    "newton": Newton,
    "quasi-newton": QuasiNewton,
    "damped": partial(Newton, damping="backtracking"),
}

__all__ = [
    "Anderson", "Auto", "DEFAULT_TOLERANCES", "Newton", "Picard", "QuasiNewton", "SOLVERS", "Sequential", "Solver",
]
