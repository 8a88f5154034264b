"""``Auto``: the fastest exact method for the device and the problem size.

The rule, from the benchmarks in docs/benchmarks.md:

- On a CPU ``torch.nn``'s compiled sequential kernel is the fastest exact method at every size
  measured (parallel methods evaluate the cell tens of times per position on a few cores), so
  ``Auto`` runs :class:`Sequential` with ``kernel="fused"``.
- On CUDA with ``T ≤ calibration_steps`` the same holds: the sequential kernel is short.
- On CUDA with longer ``T``, a short calibration times the fused kernel on the first
  ``calibration_steps`` positions (extrapolated linearly to ``T``) and one quasi-Newton iteration
  on the whole sequence, and picks quasi-Newton when the iterations it is expected to need are
  predicted to be faster.  The expected count is predicted from the prefix the fused kernel just
  solved (:mod:`fixedpoint.predictability`: the Lyapunov exponent's window growth; on a barely
  predictable trained network it is about ``T``, so the fused kernel wins), or fixed by
  ``expected_iterations``.  The calibration is part of the solve's wall time.

The choice is cached per (device, cell, ``H``, input size, ``B``, dtype, ``T`` rounded up to a
power of two, the ``Auto`` configuration) and per weight tensor (the same ``W_hh`` object: a model
keeps its choice across calls and training steps), so only the first solve of a shape pays for the
calibration; each timing is warm (the second of two runs).  :func:`clear_cache` forgets every choice.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from fixedpoint.predictability import predictability
from fixedpoint.residual import StopTest
from fixedpoint.runtime import timed
from fixedpoint.solvers.base import Solver, check_integer
from fixedpoint.solvers.newton import Newton
from fixedpoint.solvers.sequential import Sequential
from fixedpoint.system import SequenceSystem


@dataclass(frozen=True)
class Auto(Solver):
    """Choose the solver per system; the statistics' ``method`` says which ran.

    Args:
        rtol, atol: passed on to the chosen solver.
        calibration_steps: positions the fused kernel is timed on (CUDA only).
        expected_iterations: quasi-Newton iterations the cost model assumes (CUDA only); ``None``
            (default): predicted from the calibration prefix (an estimate; docs/predictability.md).
    """

    calibration_steps: int = 256
    expected_iterations: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_integer("calibration_steps", self.calibration_steps)
        check_integer("expected_iterations", self.expected_iterations, allow_none=True)

    def resolve(self, system: SequenceSystem) -> Solver:
        fused = Sequential(rtol=self.rtol, atol=self.atol, kernel="fused")
        steps = system.seq_len
        if not _calibrates(system) or steps <= self.calibration_steps:
            return fused
        quasi = Newton(rtol=self.rtol, atol=self.atol, jacobian="diagonal")
        key = _cache_key(self, system)
        cached = _CHOICES.get(key)
        if cached is not None and cached[0]() is system.cell.weight_hh:
            return quasi if cached[1] == quasi.name else fused
        choice = self._calibrate(system, fused, quasi)
        _CHOICES[key] = (weakref.ref(system.cell.weight_hh), choice.name)
        return choice

    def _calibrate(self, system: SequenceSystem, fused: Sequential, quasi: Newton) -> Solver:
        """Time the fused kernel on a prefix and one quasi-Newton iteration, predict the
        iterations, and choose (module docstring)."""
        steps = system.seq_len
        device = system.inputs.device
        prefix = SequenceSystem(system.cell, system.inputs[: self.calibration_steps], system.initial_state)
        solved = []
        _, sequential_seconds = timed(lambda: solved.append(fused.solve_directly(prefix)), device, warm=True)
        sequential_seconds *= steps / self.calibration_steps
        expected = self.expected_iterations
        if expected is None:
            direct = solved[0]
            states = direct.states if direct.states is not None else prefix.states_from_hidden(direct.hidden)
            rtol, atol = quasi.tolerances(system.inputs.dtype)
            along = predictability(system, states, rtol=rtol, atol=atol)
            expected = int(along.predicted_iterations["quasi-newton"].max())

        def one_iteration() -> None:  # what the driver does per iteration, through the solver's interface
            guess, state = quasi.init(system, torch.zeros(system.state_shape, dtype=system.inputs.dtype, device=device))
            rtol, atol = quasi.tolerances(guess.dtype)
            image, _ = quasi.evaluate(system, guess, 0, state, StopTest(rtol, atol))
            quasi.step(system, guess, image, state, system.initial_state)

        _, iteration_seconds = timed(one_iteration, device, warm=True)
        return quasi if quasi_newton_pays(expected, iteration_seconds, sequential_seconds) else fused


def quasi_newton_pays(expected_iterations: int, iteration_seconds: float, sequential_seconds: float) -> bool:
    """``Auto``'s rule on CUDA: quasi-Newton when its expected iterations take less time than the
    fused sequential kernel takes for the whole sequence."""
    return expected_iterations * iteration_seconds < sequential_seconds


#: Auto's choices: cache key → (a weak reference to the ``W_hh`` it was made for, solver name).
_CHOICES: dict[tuple, tuple[weakref.ref, str]] = {}


def clear_cache() -> None:
    """Forget every choice :class:`Auto` has cached (the next solve of each shape calibrates)."""
    _CHOICES.clear()


def _cache_key(auto: Auto, system: SequenceSystem) -> tuple:
    cell = system.cell
    steps, batch, _ = system.state_shape
    bucket = 1 << max(0, steps - 1).bit_length()  # T rounded up to a power of two
    return (str(system.inputs.device), cell.kind, getattr(cell, "nonlinearity", None), cell.hidden_size,
            cell.input_size, batch, cell.dtype, bucket, auto)


def _calibrates(system: SequenceSystem) -> bool:
    """Whether ``system`` is on a device where the choice is timed (CUDA; see the module docstring).
    A seam for the tests, which run the calibration path on a CPU."""
    return system.inputs.device.type == "cuda"
