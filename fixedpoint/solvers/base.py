"""What every solver shares: a frozen, validated configuration and a two-method protocol.

A solver never loops.  The driver in :mod:`fixedpoint.solve` owns the loop, the tolerance test,
the non-finite check, the exact-prefix bookkeeping, result codes, traces and timing; a solver
only says where to start (:meth:`Solver.init`) and how to turn an iterate ``X`` and its image
``G = F(X)`` into the next iterate (:meth:`Solver.step`).
"""

from __future__ import annotations

import math
from abc import ABC
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from fixedpoint.errors import InputError
from fixedpoint.residual import Measurement, StopTest
from fixedpoint.system import SequenceSystem

#: Default ``(rtol, atol)`` per dtype.  float64: 1e-12, a few hundred ulps of O(1) states, so the
#: solution agrees with the sequential loop to ~1e-12 at contraction rates up to ~0.9.  float32:
#: 1e-6, about 8 ulps, the smallest that Picard reaches reliably before rounding noise dominates.
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-6, 1e-6),
}


def check_number(
    name: str,
    value: object,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> None:
    """Raise :class:`InputError` unless ``value`` is a real number in the given interval."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise InputError(f"{name} must be a finite number in {interval}, got {value!r}{hint}")


def check_integer(name: str, value: object, low: int = 1, *, allow_none: bool = False) -> None:
    """Raise :class:`InputError` unless ``value`` is an integer ``≥ low`` (or ``None`` if allowed)."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise InputError(f"{name} must be an integer ≥ {low}{' or None' if allow_none else ''}, got {value!r}")


def counted(events: Tensor, active: Tensor | None) -> Tensor:
    """``events (B,)`` bool as counts to add to a per-sample counter: none after the stop."""
    return events.long() if active is None else (events & active).long()


@dataclass
class DirectSolution:
    """What a direct (non-iterative) solver returns.

    Attributes:
        hidden: outputs ``h_t (T, B, H)``.
        final: the last state ``s_T (B, S)``.
        states: ``(T, B, S)``, or ``None`` when only ``hidden`` and ``final`` were computed (the
            LSTM memory sequence is then reconstructed on first use).
    """

    hidden: Tensor
    final: Tensor
    states: Tensor | None


@dataclass(frozen=True)
class Solver(ABC):
    """Base configuration: ``rtol``/``atol`` of the termination test (``None``: dtype default).

    The driver stops when every position satisfies ``|F(S) − S| < atol + rtol·|F(S)|``
    elementwise, and then returns ``F(S)``.
    """

    rtol: float | None = None
    atol: float | None = None
    #: Whether iterates from zero stay in the state box where a certified contraction ``L``
    #: holds, so that the a-posteriori bound ``L/(1−L)·‖F(X) − X‖`` applies to the last step
    #: (Picard's do; a Newton or Anderson step can leave the box).
    stays_in_certified_box: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for name in ("rtol", "atol"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), 0, hint="; None means the dtype default")
        if self.rtol == 0 and self.atol == 0:
            raise InputError("rtol and atol cannot both be 0: the test could never pass")

    def tolerances(self, dtype: torch.dtype) -> tuple[float, float]:
        """``(rtol, atol)`` with ``None`` replaced by the defaults for ``dtype``."""
        rtol, atol = DEFAULT_TOLERANCES[dtype]
        return (rtol if self.rtol is None else float(self.rtol), atol if self.atol is None else float(self.atol))

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    def resolve(self, system: SequenceSystem) -> "Solver":
        """The configuration that actually runs on ``system``; :class:`Auto` chooses one here."""
        return self

    def solve_directly(self, system: SequenceSystem) -> DirectSolution | None:
        """A direct solver's answer, computed without iterating; ``None`` for iterative ones."""
        return None

    def init(self, system: SequenceSystem, initial_guess: Tensor) -> tuple[Tensor, Any]:
        """The first iterate ``(T, B, S)`` and the solver's private state."""
        return initial_guess, None

    def evaluate(
        self, system: SequenceSystem, iterate: Tensor, start: int, state: Any, test: StopTest
    ) -> tuple[Tensor, Measurement]:
        """``F(X)`` at positions ``start … T−1`` of the iterate ``X (T, B, S)`` and the driver's
        measurement of it (:func:`~fixedpoint.residual.measure_window`): the driver's one
        evaluation per iteration.  A solver that needs more at the same point (a Jacobian) may
        compute it here from the same products and keep it in ``state`` for :meth:`step`."""
        return system.apply_measured(iterate, start, test)

    def step(
        self,
        system: SequenceSystem,
        iterate: Tensor,
        image: Tensor,
        state: Any,
        predecessor: Tensor | None = None,
        active: Tensor | None = None,
    ) -> tuple[Tensor, Any]:
        """Next iterate from ``X`` and ``G = F(X)`` on the active window ``(n, B, S)`` of
        ``system``'s iterate (the problem is passed to every step, as to :meth:`evaluate`; a
        solver's state holds only what the solver itself accumulates).

        The window is the positions not yet known to be exact; it shrinks at the front as the
        exact prefix grows.  ``predecessor (B, S)`` is the exact state just before the window
        (``s_0``, or the last exact position).  ``active`` is ``None`` or a 0-dim bool tensor,
        ``False`` when the driver has already stopped (on the device, not yet read back): the
        step's result is then discarded, and counters must not count it (:func:`counted`).
        Returns the next iterate on the same window and the state.
        """

    def statistics(self, state: Any) -> dict[str, Any]:
        """Solver-specific counters for :class:`fixedpoint.solve.Stats` (e.g. safeguard steps)."""
        return {}
