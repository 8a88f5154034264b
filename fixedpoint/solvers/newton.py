"""Newton's method on ``S = F(S)``: each step is a linear recurrence, solved by a parallel scan.

Linearising ``F`` at the iterate ``X`` gives ``y_t = G_t + J_t (y_{t−1} − X_{t−1})`` with
``G = F(X)`` and ``J_t = ∂f/∂s (X_{t−1}, x_t)``: the recurrence ``y_t = J_t y_{t−1} + b_t``,
``b_t = G_t − J_t X_{t−1}``, started from the exact predecessor of the active window.  Newton is
exact in one step for an affine cell and keeps finite termination (the window's first position
is exact after every step).

Safeguard: a sample whose Newton iterate is not finite takes the Picard step ``G`` instead; such
steps are counted per sample in the statistics (``picard_steps``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fixedpoint.scan import linear_recurrence
from fixedpoint.solvers.base import Solver
from fixedpoint.system import SequenceSystem


@dataclass
class NewtonState:
    """The system (for its Jacobians and inputs) and per-sample step counts."""

    system: SequenceSystem
    newton_steps: Tensor  # (B,)
    picard_steps: Tensor = field(default=None)  # type: ignore[assignment]


@dataclass(frozen=True)
class Newton(Solver):
    """Full-Jacobian Newton (DEER): ``O(T·B·S²)`` memory for the Jacobians, ``O(log T)``-deep scan.

    Args:
        rtol, atol: termination tolerances (see :class:`~fixedpoint.solvers.base.Solver`).
        chunk: positions per scan chunk (``None``: the whole window at once).
    """

    chunk: int | None = None

    def init(self, system: SequenceSystem, initial_guess: Tensor) -> tuple[Tensor, NewtonState]:
        zeros = torch.zeros(system.batch, dtype=torch.long, device=initial_guess.device)
        return initial_guess, NewtonState(system, zeros, zeros.clone())

    def step(
        self, iterate: Tensor, image: Tensor, state: NewtonState, predecessor: Tensor | None = None
    ) -> tuple[Tensor, NewtonState]:
        system = state.system
        window = iterate.shape[0]
        if predecessor is None:
            predecessor = system.initial_state
        previous = torch.cat((predecessor.unsqueeze(0), iterate[:-1]))  # X_{t−1}, (n, B, S)
        jacobians = system.cell.jacobian(previous, system.projected_inputs[system.seq_len - window :])
        values = image - (jacobians @ previous.unsqueeze(-1)).squeeze(-1)
        newton = linear_recurrence(jacobians, values, predecessor, chunk=self.chunk)
        finite = torch.isfinite(newton).flatten(2).all(2).all(0)  # (B,)
        state.newton_steps += finite.long()
        state.picard_steps += (~finite).long()
        return torch.where(finite[None, :, None], newton, image), state

    def statistics(self, state: NewtonState) -> dict[str, Any]:
        return {"newton_steps": state.newton_steps.tolist(), "picard_steps": state.picard_steps.tolist()}
