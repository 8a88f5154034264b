"""Picard (Jacobi) iteration ``S ← F(S)`` over the whole sequence, optionally damped."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from fixedpoint.solvers.base import Solver, check_number
from fixedpoint.system import SequenceSystem


@dataclass(frozen=True)
class Picard(Solver):
    """``S ← (1 − damping)·F(S) + damping·S``.

    ``damping = 0`` is the plain Jacobi sweep.  Every sweep makes one more position exact
    (finite termination); the driver stops recomputing that exact prefix, so ``T`` sweeps always
    suffice, damped or not.

    Args:
        rtol, atol: termination tolerances (see :class:`~fixedpoint.solvers.base.Solver`).
        damping: weight kept on the old iterate, in ``[0, 1)``.
    """

    damping: float = 0.0
    stays_in_certified_box: ClassVar[bool] = True  # a sweep maps the box into itself

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("damping", self.damping, 0, 1, high_open=True, hint="; 0 is the plain Jacobi sweep")

    def step(
        self,
        system: SequenceSystem,
        iterate: Tensor,
        image: Tensor,
        state: Any,
        predecessor: Tensor | None = None,
        active: Tensor | None = None,
    ) -> tuple[Tensor, Any]:
        if self.damping == 0:
            return image, state
        return image.lerp(iterate, self.damping), state
