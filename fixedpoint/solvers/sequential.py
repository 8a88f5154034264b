"""The sequential loop as a solver: the ground truth every parallel path is checked against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fixedpoint.errors import InputError
from fixedpoint.solvers.base import DirectSolution, Solver
from fixedpoint.system import SequenceSystem


@dataclass(frozen=True)
class Sequential(Solver):
    """``s_t = f(s_{t−1}, x_t)`` for ``t = 1 … T``, one position after another.

    A direct solver: the loop *is* the definition of the solution, so nothing is iterated and
    no residual is evaluated; the solve reports 0 iterations and the whole sequence exact.

    Args:
        kernel: ``"loop"`` runs the cell's :meth:`~fixedpoint.cells.Cell.step` from Python, the
            reference every parallel path is tested against; ``"fused"`` runs ``torch.nn``'s
            compiled kernel (cuDNN on CUDA), the fastest exact method on a CPU.
        rtol, atol: unused by the loop; kept so every solver takes them.
    """

    kernel: Literal["loop", "fused"] = "loop"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kernel not in ("loop", "fused"):
            raise InputError(f"kernel must be 'loop' or 'fused', got {self.kernel!r}")

    @property
    def name(self) -> str:
        return "sequential" if self.kernel == "loop" else "sequential-fused"

    def solve_directly(self, system: SequenceSystem) -> DirectSolution:
        if self.kernel == "fused":
            hidden, final = system.cell.fused_sequence(system.inputs, system.initial_state)
            return DirectSolution(hidden, final, None)
        states = system.sequential()
        return DirectSolution(system.cell.hidden_of(states), states[-1], states)
