"""fixedpoint: the fixed-point view of recurrent networks.

A recurrence ``s_t = f(s_{t−1}, x_t)`` over a sequence is one equation system ``S = F(S)``;
this package builds it for ``torch.nn``'s Elman, GRU and LSTM cells and solves it exactly and
in parallel over the sequence.
"""

from fixedpoint.cells import Cell, ElmanCell, GRUCell, LSTMCell
from fixedpoint.errors import InputError, NoConvergence
from fixedpoint.network import Network, load_network
from fixedpoint.solve import NetworkSolution, Result, Solution, Stats, solve, solve_network
from fixedpoint.solvers import Anderson, Auto, Newton, Picard, QuasiNewton, Sequential, Solver
from fixedpoint.system import SequenceSystem

from fixedpoint import nn  # noqa: E402  (drop-in modules; imports the rest of the package)

__all__ = [
    "Anderson", "Auto", "Cell", "ElmanCell", "GRUCell", "InputError", "LSTMCell", "Network",
    "NetworkSolution", "Newton", "NoConvergence", "Picard", "QuasiNewton", "Result", "Sequential", "SequenceSystem",
    "Solution", "Solver", "Stats", "load_network", "nn", "solve", "solve_network",
]
__version__ = "0.1.0"
