"""The sequential loop as a solver: the ground truth every parallel path is checked against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from fixedpoint.solvers.base import Solver
from fixedpoint.system import SequenceSystem


@dataclass(frozen=True)
class Sequential(Solver):
    """``s_t = f(s_{t−1}, x_t)`` for ``t = 1 … T``, one position after another.

    Its first iterate is already the solution; the driver's first residual check confirms it
    (one parallel evaluation of ``F``), so a sequential solve reports one iteration.
    """

    def init(self, system: SequenceSystem, initial_guess: Tensor) -> tuple[Tensor, Any]:
        return system.sequential(), None

    def step(
        self, iterate: Tensor, image: Tensor, state: Any, predecessor: Tensor | None = None
    ) -> tuple[Tensor, Any]:
        # Reached only when a tolerance below rounding level fails the first check: refine by
        # Picard steps, which cannot make an exact solution worse.
        return image, state
