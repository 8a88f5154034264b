"""Solver configurations.  Each is a frozen dataclass validated at construction."""

from fixedpoint.solvers.anderson import Anderson
from fixedpoint.solvers.base import DEFAULT_TOLERANCES, Solver
from fixedpoint.solvers.newton import Newton, QuasiNewton
from fixedpoint.solvers.picard import Picard
from fixedpoint.solvers.sequential import Sequential

#: Solver names accepted by the command line.
SOLVERS: dict[str, type[Solver]] = {
    "sequential": Sequential, "picard": Picard, "anderson": Anderson, "newton": Newton,
    "quasi-newton": QuasiNewton,
}

__all__ = ["Anderson", "DEFAULT_TOLERANCES", "Newton", "Picard", "QuasiNewton", "SOLVERS", "Sequential", "Solver"]
