"""The one driver loop, and the layer-by-layer solve of a whole network.

:func:`solve` owns everything that is not a solver's update rule: validation, the maximum
number of steps, the termination test, the non-finite check, the exact prefix, per-sample
residual traces, result codes and timing.

Termination.  With ``X`` the iterate and ``G = F(X)``, the scaled residual of sample ``b`` is

    ``ρ_b = max_{t, j} |G − X|_{t,b,j} / (atol + rtol·|G_{t,b,j}|)``

and the solve stops when ``ρ_b < 1`` for every sample, returning ``G`` (one more Picard step
than ``X``, so never worse).  Defaults for ``rtol``/``atol`` depend on the dtype
(:data:`fixedpoint.solvers.base.DEFAULT_TOLERANCES`).

Forward error.  A residual below the tolerance does not make the error so small: on an expanding
or barely predictable network the residual is amplified along the sequence.  So after the test
passes the driver estimates the forward error by linearised propagation of the residual
(:mod:`fixedpoint.forward_error`), and while that estimate exceeds the tolerance it adds the
correction to the answer (mixed-precision iterative refinement, at most
:data:`MAX_REFINEMENTS` times, and only while each correction shrinks the next).

Exact prefix.  If positions ``< p`` of ``X`` are exact, so is position ``p`` of ``G``: its
predecessor is exact.  After every step the driver writes that exact value into the next
iterate and stops evaluating the prefix.  So every solver terminates after at most ``T``
iterations (finite termination), and the default ``max_steps`` is ``T``.

Host synchronisation.  Whether to stop (every sample converged, or a NaN/Inf) is decided on the
device every iteration and read back to the host once every ``check_every`` iterations; until
it is read, a stop freezes the answer on the device, and iterations after it are discarded
(``stats.speculative_iterations``).  Between checks the evaluated window keeps its shape and
the exact prefix is kept by writing its rows, not by slicing them away.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor

from fixedpoint.cells import all_finite, check_floating
from fixedpoint.errors import InputError, NoConvergence
from fixedpoint.lengths import check_lengths, last_states, padding_mask, reversal_within
from fixedpoint.network import Network
from fixedpoint.residual import StopTest
from fixedpoint.runtime import synchronize, true_float32
from fixedpoint.contraction import ContractionReport, Norm, a_posteriori_error_bound, certification, state_norms
from fixedpoint.forward_error import correction_and_residual, scaled_size
from fixedpoint.solvers import Picard, Solver
from fixedpoint.solvers.base import DirectSolution, check_integer
from fixedpoint.stack import run_stack
from fixedpoint.system import SequenceSystem


class Result(enum.Enum):
    """How a solve ended.  Each value is a message that says what to do about it."""

    successful = "converged: every position satisfies |F(S) − S| < atol + rtol·|F(S)|"
    max_steps_reached = (
        "max_steps was reached before the tolerance was met; raise max_steps (T steps always "
        "suffice, by finite termination) or loosen rtol/atol"
    )
    nonfinite = (
        "an iterate became NaN or Inf: either the exact solution overflows (solve with "
        "Sequential() to see), or the iterates overflowed on the way to a finite solution, as "
        "they can on expanding relu networks; then use Sequential()"
    )

    @property
    def message(self) -> str:
        return self.value


@dataclass
class Stats:
    """What a solve measured.

    Attributes:
        iterations: evaluations of ``F`` over the active window (0 for a direct solver such as
            :class:`~fixedpoint.solvers.Sequential`, which evaluates no residual).
        residual: ``(B,)`` final scaled residual ``ρ_b`` (< 1 when converged).
        residual_history: ``(k, B)`` scaled residual ``ρ_b`` at every iteration.
        max_abs_residual_history: ``(k, B)`` unscaled ``max |F(X) − X|`` at every iteration.
        exact_prefix: how many leading positions are exact by finite termination.
        positions_evaluated: positions of ``F`` evaluated in all, ``Σ (T − p)`` with ``p`` the
            exact prefix as of the last check (the exact prefix itself when ``check_every = 1``).
        rate: observed convergence rate, the geometric mean of the last (up to 5) ratios
            ``‖R_k‖_∞ / ‖R_{k−1}‖_∞`` of the batch-wide residual; ``None`` with < 2 iterations.
        wall_time: seconds, synchronised on CUDA.
        rtol, atol: the tolerances used.
        solver: ``method``, the name of the solver that ran (what :class:`Auto` chose), and
            its counters (Anderson: ``plain_steps`` per sample …).
        nonfinite_at: ``(iteration, position)`` of the first NaN/Inf, if any.
        lipschitz_certified: with ``certify``: the certified data-conditional ``L`` when < 1.
        predicted_iterations: with ``certify``: ``(B,)`` certified a-priori Picard iterations.
        error_bound: with ``certify``, ``L < 1`` and a Picard or sequential solve: ``(B,)``
            certified ``max_t ‖value_t − s*_t‖ ≤ L/(1−L)·max_t ‖F(X)_t − X_t‖`` (plus rounding).
        certify_time: seconds spent on the certificate, not counted in ``wall_time``.
        forward_error_estimate: ``(B,)`` estimated ``max_{t,j} |value − S*|`` per sample, by
            linearised propagation of the residual in float64 (an estimate, first order;
            :mod:`fixedpoint.forward_error`); ``None`` when not computed (``forward_error="off"``,
            a direct solve by default, or a non-finite one).
        refinements: corrections added to the answer because that estimate exceeded the tolerance.
        forward_error_time: seconds spent estimating and refining, counted in ``wall_time``.
        check_every: iterations between the driver's host synchronisations (``solve``'s
            ``check_every``); the stop is decided on the device every iteration and read then.
        speculative_iterations: iterations that ran after the stop and before the check read
            it (at most ``check_every − 1``); discarded: the answer and every other statistic
            are those of the stopping iteration.
    """

    iterations: int
    residual: Tensor
    residual_history: Tensor
    max_abs_residual_history: Tensor
    exact_prefix: int
    positions_evaluated: int
    rate: float | None
    wall_time: float
    rtol: float
    atol: float
    solver: dict[str, Any] = field(default_factory=dict)
    nonfinite_at: tuple[int, int] | None = None
    lipschitz_certified: float | None = None
    predicted_iterations: Tensor | None = None
    error_bound: Tensor | None = None
    certify_time: float = 0.0
    forward_error_estimate: Tensor | None = None
    refinements: int = 0
    forward_error_time: float = 0.0
    check_every: int = 1
    speculative_iterations: int = 0


#: Iterations between the driver's host synchronisations, per device type, when ``solve`` is
#: not told (``check_every=None``).  A CPU waits for nothing, so it checks every iteration and
#: never runs past the stop; on CUDA a check drains the queue of launched kernels, so the driver
#: checks every few iterations at the price of up to ``k − 1`` speculative ones (unmeasured on
#: a GPU so far: a first choice for ``make gpu-check`` to measure).
CHECK_EVERY = {"cpu": 1, "cuda": 4}


#: The driver's device-side stop code while no stop has happened (larger than any real code).
NO_STOP = 2**62


def resolve_check_every(check_every: int | None, device: torch.device) -> int:
    """``check_every`` if given (validated), else the device's default (:data:`CHECK_EVERY`)."""
    if check_every is None:
        return CHECK_EVERY.get(device.type, 1)
    check_integer("check_every", check_every)
    return check_every


#: ``"refine"``: estimate the forward error and refine the answer while the estimate exceeds the
#: tolerance; ``"estimate"``: estimate only; ``"off"``: neither.  See :func:`solve`.
ForwardError = Literal["refine", "estimate", "off"]

#: Most corrections the driver adds to one answer (each costs about one sequential pass).
MAX_REFINEMENTS = 3


class Solution:
    """``value`` is ``S`` of shape ``(T, B, S)``; ``result`` says whether it is the solution.

    A direct solve may leave part of ``value`` to be computed on first access (the LSTM memory
    sequence behind ``torch.nn``'s fused kernel); :attr:`hidden` and :attr:`final_state` never
    need it.
    """

    def __init__(
        self,
        value: Tensor | None,
        result: Result,
        stats: Stats,
        system: SequenceSystem,
        *,
        hidden: Tensor | None = None,
        final_state: Tensor | None = None,
    ) -> None:
        if value is None and (hidden is None or final_state is None):
            raise InputError("a Solution needs its value, or its hidden outputs and final state")
        self._value = value
        self._hidden = hidden
        self._final_state = final_state
        self.result = result
        self.stats = stats
        self.system = system

    @property
    def value(self) -> Tensor:
        """The states ``(T, B, S)``."""
        if self._value is None:
            self._value = self.system.states_from_hidden(self._hidden)
        return self._value

    @property
    def converged(self) -> bool:
        return self.result is Result.successful

    @property
    def hidden(self) -> Tensor:
        """The outputs ``h_t``, ``(T, B, H)``."""
        return self._hidden if self._hidden is not None else self.system.cell.hidden_of(self.value)

    @property
    def final_state(self) -> Tensor:
        """The last state ``s_T``, ``(B, S)``."""
        return self._final_state if self._final_state is not None else self.value[-1]

    def __repr__(self) -> str:
        return f"Solution(result={self.result.name}, shape={self.system.state_shape}, stats={self.stats!r})"


#: ``callback(iteration, iterate, image)``: called after every evaluation of ``F`` with the full
#: iterate ``X (T, B, S)`` and the image on the active window ``(T − p, B, S)``.  Both are the
#: driver's working buffers, overwritten later: reduce them at once or keep a ``.clone()``.
Callback = Callable[[int, Tensor, Tensor], None]


def solve(
    system: SequenceSystem,
    solver: Solver | None = None,
    *,
    initial_guess: Tensor | None = None,
    max_steps: int | None = None,
    throw: bool = True,
    callback: Callback | None = None,
    certify: Norm | None = None,
    forward_error: ForwardError | None = None,
    check_every: int | None = None,
) -> Solution:
    """Solve ``S = F(S)`` with ``solver`` (default :class:`~fixedpoint.solvers.Picard`).

    Args:
        system: the equation system.
        solver: a solver configuration.
        initial_guess: ``(T, B, S)`` first iterate (default zeros); not modified.  Ignored by
            :class:`~fixedpoint.solvers.Sequential`, which needs none.
        max_steps: most iterations (default ``T``, which always suffices).
        throw: raise :class:`~fixedpoint.errors.NoConvergence` unless the solve succeeded;
            with ``False`` the :class:`Solution` carries the result code instead.
        callback: see :data:`Callback`.
        certify: ``"2"`` or ``"inf"``: attach certified contraction numbers in that norm
            (:mod:`fixedpoint.contraction`) to the statistics.
        forward_error: ``"refine"``, ``"estimate"`` or ``"off"`` (:data:`ForwardError`).  Default
            ``None``: ``"refine"`` for an iterative solver, ``"off"`` for a direct one, which
            runs the recurrence itself (ask for ``"estimate"`` to learn how accurate that is).
            Refinement applies only to a solve that met its tolerance.
        check_every: read the device's verdict (converged, non-finite) back to the host every
            this many iterations; the verdict is decided on the device every iteration and the
            answer frozen at the stop, so only speed depends on it.  Default ``None``: per
            device (:data:`CHECK_EVERY`: 1 on a CPU).  ``certify`` implies 1.

    Returns:
        A :class:`Solution` whose ``value`` is the last image ``F(X)`` (also when ``max_steps``
        ran out); ``stats.residual`` is the scaled ``|F(X) − X|`` of that last ``X``.  After a
        non-finite image the value is the last finite iterate and the residual is ``inf``.  When
        the answer was refined, ``value`` is the refined answer and ``stats.residual`` its own
        scaled residual, evaluated in float64.
    """
    # Nothing to differentiate: skip autograd's bookkeeping (≈10 % of torch's fused LSTM kernel).
    # float32 means float32 on every path, cuDNN's and the parallel one's (no TF32).
    with contextlib.nullcontext() if _tracks_gradients(system) else torch.no_grad(), true_float32():
        return _solve(system, solver, initial_guess, max_steps, throw, callback, certify, forward_error, check_every)


def _tracks_gradients(system: SequenceSystem) -> bool:
    cell = system.cell
    tensors = (system.inputs, system.initial_state, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _solve(
    system: SequenceSystem,
    solver: Solver | None,
    initial_guess: Tensor | None,
    max_steps: int | None,
    throw: bool,
    callback: Callback | None,
    certify: Norm | None,
    forward_error: ForwardError | None,
    check_every: int | None,
) -> Solution:
    """Validate, certify (a pass of :mod:`fixedpoint.contraction`), then solve directly or by
    the iteration loop, and finish both the same way (:func:`_finish`)."""
    solver, max_steps = _checked_options(system, solver, initial_guess, max_steps, forward_error)
    device = system.initial_state.device
    rtol, atol = solver.tolerances(system.initial_state.dtype)
    report, certify_time = certification(system, certify, atol)

    synchronize(device)
    started = time.perf_counter()
    solver = solver.resolve(system)  # Auto's choice (and its calibration) is part of the solve
    direct = solver.solve_directly(system)
    if direct is not None:
        synchronize(device)
        return _direct_solution(
            system, solver, direct, time.perf_counter() - started, report, certify_time, throw, forward_error or "off"
        )
    if initial_guess is None:
        iterate = torch.zeros(system.state_shape, dtype=system.initial_state.dtype, device=device)
    else:
        iterate = initial_guess.clone()
    iterate, state = solver.init(system, iterate)
    # Certificates bound the step of the stopping iteration, which a deferred check would not keep.
    every = 1 if report is not None else resolve_check_every(check_every, device)
    run = _iterate(system, solver, iterate, state, max_steps, callback, every, rtol, atol, report is not None)
    forward = None
    if (forward_error or "refine") != "off" and run.result is not Result.nonfinite:
        refine = forward_error != "estimate" and run.result is Result.successful and run.exact_prefix < system.seq_len
        forward = _estimate_forward_error(system, run.iterate, refine, rtol, atol, run.exact_prefix)
    synchronize(device)
    stats = _iteration_stats(run, solver, time.perf_counter() - started, rtol, atol, forward)
    # The a-posteriori bound holds for the last step of iterates that stay where L was certified.
    bound_step = None
    certified_box = solver.stays_in_certified_box and initial_guess is None
    if report is not None and certified_box and run.result is not Result.nonfinite:
        bound_step = run.iterate.new_zeros(system.batch)
        if run.last_difference is not None and run.exact_prefix < system.seq_len:
            bound_step = state_norms(system.cell, run.last_difference, report.norm).amax(0)
    return _finish(Solution(run.iterate, run.result, stats, system), forward, report, certify_time, bound_step, throw)


def _checked_options(
    system: SequenceSystem,
    solver: Solver | None,
    initial_guess: Tensor | None,
    max_steps: int | None,
    forward_error: ForwardError | None,
) -> tuple[Solver, int]:
    """The solver (Picard by default) and the iteration limit (default ``T``), or :class:`InputError`."""
    solver = Picard() if solver is None else solver
    if not isinstance(solver, Solver):
        raise InputError(f"solver must be a Solver configuration such as Picard(), got {solver!r}")
    if forward_error not in (None, "refine", "estimate", "off"):
        raise InputError(f"forward_error must be 'refine', 'estimate', 'off' or None, got {forward_error!r}")
    max_steps = system.seq_len if max_steps is None else max_steps
    check_integer("max_steps", max_steps)
    if initial_guess is not None:
        check_floating("initial_guess", initial_guess)
        if tuple(initial_guess.shape) != system.state_shape:
            raise InputError(f"initial_guess must have shape {system.state_shape}, got {tuple(initial_guess.shape)}")
        if initial_guess.dtype != system.initial_state.dtype or initial_guess.device != system.initial_state.device:
            raise InputError("initial_guess must have the dtype and device of the system")
    return solver, max_steps


@dataclass
class _Run:
    """What the iteration loop leaves: the answer ``(T, B, S)`` (the last image ``F(X)``, or the
    last finite iterate), how it ended, and what the statistics are made of."""

    iterate: Tensor
    result: Result
    iterations: int
    exact_prefix: int
    scaled_history: list[Tensor]
    abs_history: list[Tensor]
    positions_evaluated: int
    speculative: int
    nonfinite_at: tuple[int, int] | None
    #: ``|F(X) − X|`` on the active window at the stop, kept for a certificate's error bound.
    last_difference: Tensor | None
    state: Any
    check_every: int


def _iterate(
    system: SequenceSystem,
    solver: Solver,
    iterate: Tensor,
    state: Any,
    max_steps: int,
    callback: Callback | None,
    every: int,
    rtol: float,
    atol: float,
    keep_difference: bool,
) -> _Run:
    """The loop: evaluate ``F`` on the active window, decide the stop on the device, read the
    decision every ``every`` iterations, step, and grow the exact prefix by one position.

    Longer than the rest on purpose: the stop protocol (decided on the device, read late, the
    answer frozen at the stop, the speculative iterations dropped) is one piece of state, and
    splitting it would pass that state between functions."""
    steps, batch, _ = system.state_shape
    device = iterate.device
    prefix = 0  # exact prefix p: one more position after every step (finite termination)
    start = 0  # first evaluated position: p as of the last check (rows start … p − 1 are exact)
    # The first stop, decided on the device: iteration·4 + kind (1 converged, 2 non-finite);
    # NO_STOP while none.  A minimum keeps the first.
    stop_code = torch.full((), NO_STOP, dtype=torch.long, device=device)
    finite_rows: list[tuple[int, Tensor]] = []  # per iteration: (start, which rows are finite)
    evaluated: list[int] = []
    last_difference = None
    scaled_history: list[Tensor] = []
    abs_history: list[Tensor] = []
    result = Result.max_steps_reached
    nonfinite_at = None
    stopped_at = 0
    iteration = 0
    while True:
        iteration += 1
        exact = prefix - start  # leading rows of the window known to be exact: F(X) is replaced by X there
        # F(X) on the window (T − start, B, S) and its measurement: (T − start,), (B,), (B,)
        image, (rows_finite, scaled, largest) = solver.evaluate(system, iterate, start, state, StopTest(rtol, atol, exact))
        evaluated.append(steps - start)
        if callback is not None:
            callback(iteration, iterate, image[exact:])
        finite = rows_finite.all()
        finite_rows.append((start, rows_finite))
        if keep_difference:  # the certificate bounds the error by the last step's norm
            last_difference = (image[exact:] - iterate[prefix:]).abs()
        scaled_history.append(scaled)
        abs_history.append(largest)
        kind = torch.where(finite, (scaled < 1).all().long(), 2)  # 0 go on, 1 converged, 2 non-finite
        stop_code = torch.minimum(stop_code, torch.where(kind > 0, iteration * 4 + kind, NO_STOP))
        last = iteration == max_steps or prefix + 1 == steps
        if every == 1 or iteration % every == 0 or last:
            code = int(stop_code)  # the check's one host synchronisation
            stopped_at, stop_kind = divmod(code, 4) if code != NO_STOP else (0, 0)
            if stopped_at:
                if stop_kind == 2:
                    result = Result.nonfinite
                    row_start, rows = finite_rows[stopped_at - 1]
                    nonfinite_at = (stopped_at, row_start + int(torch.argmin(rows.int())))
                else:
                    result = Result.successful
                    if stopped_at == iteration:
                        iterate[prefix:] = image[exact:]
                break
            checked = True
        else:
            checked = False
        if iteration == max_steps:  # return F(X), one Picard step beyond X, which the stats describe
            iterate[prefix:] = image[exact:]
            prefix += 1
            if prefix == steps:  # every position exact after all
                result = Result.successful
            break
        predecessor = system.initial_state if start == 0 else iterate[start - 1]
        active = None if checked else stop_code == NO_STOP
        next_window, state = solver.step(system, iterate[start:], image, state, predecessor, active)
        next_window[:exact] = iterate[start:prefix]
        next_window[exact] = image[exact]  # exact: its predecessor was exact
        if checked:
            iterate[start:] = next_window
        else:
            # An unread stop freezes the answer: F(X) where it converged, X where F(X) was not finite.
            # stop_code − 4·iteration is 1 (converged now), 2 (non-finite now), < 0 (stopped
            # before: keep X) or huge (no stop: take the step).
            since = stop_code - iteration * 4
            stepped = torch.where(since > 2, next_window, iterate[start:])
            iterate[start:] = torch.where(since == 1, image, stepped)
        prefix += 1
        if checked:
            start = prefix
        if prefix == steps:  # every position exact
            result = Result.successful
            break
    speculative = 0
    if stopped_at:
        # Iterations after the stop ran before the check read it: the statistics end at the stop.
        speculative = iteration - stopped_at
        iteration, prefix = stopped_at, stopped_at - 1
        scaled_history, abs_history, evaluated = scaled_history[:iteration], abs_history[:iteration], evaluated[:iteration]
        if result is Result.nonfinite:
            scaled_history[-1] = abs_history[-1] = iterate.new_full((batch,), float("inf"))
        if speculative:
            last_difference = None
    return _Run(iterate, result, iteration, prefix, scaled_history, abs_history, sum(evaluated), speculative,
                nonfinite_at, last_difference, state, every)


def _iteration_stats(
    run: _Run, solver: Solver, wall_time: float, rtol: float, atol: float, forward: "_ForwardError | None"
) -> Stats:
    """The statistics of an iterative solve from what its loop left."""
    batch, steps = run.iterate.shape[1], run.iterate.shape[0]
    if run.scaled_history:
        residual_history = torch.stack(run.scaled_history)
        abs_residual_history = torch.stack(run.abs_history)
    else:
        residual_history = abs_residual_history = run.iterate.new_zeros(0, batch)
    final_residual = residual_history[-1] if run.scaled_history else run.iterate.new_full((batch,), float("inf"))
    if run.result is Result.successful and run.exact_prefix == steps:
        final_residual = torch.zeros_like(final_residual)
    if forward is not None and forward.residual is not None:
        final_residual = forward.residual.to(final_residual.dtype)
    return Stats(
        iterations=run.iterations,
        residual=final_residual,
        residual_history=residual_history,
        max_abs_residual_history=abs_residual_history,
        exact_prefix=run.exact_prefix,
        positions_evaluated=run.positions_evaluated,
        rate=_observed_rate(abs_residual_history),
        wall_time=wall_time,
        rtol=rtol,
        atol=atol,
        solver={"method": solver.name, **solver.statistics(run.state)},
        nonfinite_at=run.nonfinite_at,
        check_every=run.check_every,
        speculative_iterations=run.speculative,
    )


def _finish(
    solution: Solution,
    forward: "_ForwardError | None",
    report: ContractionReport | None,
    certify_time: float,
    bound_step: Tensor | None,
    throw: bool,
) -> Solution:
    """What every solve does last, direct or iterative: attach the forward-error estimate and
    the certificate (with the a-posteriori bound on ``bound_step (B,)``, the last step's size in
    the certificate's norm, where one applies), and raise unless it succeeded when ``throw``."""
    stats = solution.stats
    if forward is not None:
        stats.forward_error_estimate = forward.estimate
        stats.refinements = forward.refinements
        stats.forward_error_time = forward.seconds
    if report is not None:
        stats.lipschitz_certified = report.certified
        stats.predicted_iterations = report.predicted_iterations
        stats.certify_time = certify_time
        if report.certified is not None and bound_step is not None:
            stats.error_bound = a_posteriori_error_bound(report.certified, bound_step)
    if throw and not solution.converged:
        raise NoConvergence(solution)
    return solution


@dataclass
class _ForwardError:
    """What :func:`_estimate_forward_error` found: ``estimate (B,)``, the refinements added, the
    scaled residual ``(B,)`` of the refined answer (``None`` when unrefined) and the seconds."""

    estimate: Tensor
    refinements: int
    residual: Tensor | None
    seconds: float


def _estimate_forward_error(
    system: SequenceSystem, states: Tensor, refine: bool, rtol: float, atol: float, exact_prefix: int = 0
) -> _ForwardError:
    """Estimate the forward error of ``states (T, B, S)`` and, with ``refine``, add corrections
    in place while the estimate exceeds the tolerance and each correction shrinks the next; a
    correction that does not (rounding dominates, or the linearisation no longer holds) is undone.
    The first ``exact_prefix`` positions are exact by finite termination and stay as they are."""
    started = time.perf_counter()
    correct = functools.partial(correction_and_residual, system, tolerances=(rtol, atol), exact_prefix=exact_prefix)
    correction, _, estimate = correct(states)
    size = float(correction.abs().max())
    residual = None
    refinements = 0
    while refine and refinements < MAX_REFINEMENTS and math.isfinite(size) and size > 0:
        if bool((scaled_size(correction, states, rtol, atol) < 1).all()):
            break
        saved = states.clone()
        states += correction.to(states.dtype)
        new_correction, new_residual, new_estimate = correct(states)
        new_size = float(new_correction.abs().max())
        if not new_size < size:
            states.copy_(saved)
            break
        correction, residual, estimate, size = new_correction, new_residual, new_estimate, new_size
        refinements += 1
    # The estimate includes the exact prefix's own rounding (the sequential loop's error), which
    # the correction leaves out: an answer exact in every position still has the loop's error.
    return _ForwardError(estimate.to(states.dtype), refinements, residual, time.perf_counter() - started)


def _direct_solution(
    system: SequenceSystem,
    solver: Solver,
    direct: DirectSolution,
    wall_time: float,
    report: ContractionReport | None,
    certify_time: float,
    throw: bool,
    forward_error: ForwardError,
) -> Solution:
    """A solver that returned the solution without iterating: no evaluation of ``F`` and no
    residual (0 iterations, empty histories), exact by construction unless the recurrence itself
    overflowed (``nonfinite_at = (0, position)``); the forward error is estimated (never refined:
    the answer is the recurrence's own) unless ``forward_error="off"``."""
    steps, batch, _ = system.state_shape
    states = direct.states if direct.states is not None else direct.hidden
    rtol, atol = solver.tolerances(states.dtype)
    nonfinite_at = None
    result = Result.successful
    # Bounded cells cannot overflow from finite inputs and weights (both are checked): skip the pass.
    if not system.cell.bounded and not (all_finite(states) and all_finite(direct.final)):
        bad = (~torch.isfinite(states).flatten(1).all(1)).nonzero()
        nonfinite_at = (0, int(bad[0]) if bad.numel() else steps - 1)
        result = Result.nonfinite
    residual = states.new_full((batch,), 0.0 if result is Result.successful else float("inf"))
    empty = states.new_zeros(0, batch)
    stats = Stats(
        iterations=0,
        residual=residual,
        residual_history=empty,
        max_abs_residual_history=empty,
        exact_prefix=steps if result is Result.successful else 0,
        positions_evaluated=0,
        rate=None,
        wall_time=wall_time,
        rtol=rtol,
        atol=atol,
        solver={"method": solver.name},
        nonfinite_at=nonfinite_at,
    )
    solution = Solution(direct.states, result, stats, system, hidden=direct.hidden, final_state=direct.final)
    forward = None
    if forward_error != "off" and result is Result.successful:
        forward = _estimate_forward_error(system, solution.value, False, rtol, atol)
        stats.wall_time += forward.seconds
    # Exact: no step is left for the a-posteriori bound to bound.
    bound_step = states.new_zeros(batch) if result is Result.successful else None
    return _finish(solution, forward, report, certify_time, bound_step, throw)


def _observed_rate(abs_history: Tensor, window: int = 5) -> float | None:
    norms = abs_history.amax(dim=1) if abs_history.numel() else abs_history.new_zeros(0)
    if norms.shape[0] < 2:
        return None
    recent = norms[-(window + 1) :]
    first, last = float(recent[0]), float(recent[-1])
    if first <= 0 or last <= 0:
        return None
    return (last / first) ** (1.0 / (recent.shape[0] - 1))


# -- whole networks ------------------------------------------------------------------------------
@dataclass
class NetworkSolution:
    """A stacked, possibly bidirectional network solved layer by layer.

    Attributes:
        output: ``(T, B, D·H)`` (``(B, T, D·H)`` when ``batch_first``), as ``torch.nn`` returns.
        h_n: ``(L·D, B, H)``.
        c_n: ``(L·D, B, H)`` for LSTM, else ``None``.
        layers: ``layers[l][d]`` is the :class:`Solution` of layer ``l``, direction ``d``.
        wall_time: seconds for the whole network.
    """

    output: Tensor
    h_n: Tensor
    c_n: Tensor | None
    layers: list[list[Solution]]
    wall_time: float

    @property
    def solutions(self) -> list[Solution]:
        return [solution for layer in self.layers for solution in layer]

    @property
    def result(self) -> Result:
        """The first unsuccessful result code, or ``successful``."""
        return next((s.result for s in self.solutions if not s.converged), Result.successful)

    @property
    def converged(self) -> bool:
        return self.result is Result.successful

    @property
    def iterations(self) -> int:
        """Iterations summed over every layer and direction (the work done)."""
        return sum(s.stats.iterations for s in self.solutions)


def solve_network(
    network: Network,
    inputs: Tensor,
    hx: Tensor | tuple[Tensor, Tensor] | None = None,
    solver: Solver | None = None,
    *,
    max_steps: int | None = None,
    throw: bool = True,
    callback: Callable[[int, int, int, Tensor, Tensor], None] | None = None,
    certify: Norm | None = None,
    forward_error: ForwardError | None = None,
    lengths: Tensor | Sequence[int] | None = None,
) -> NetworkSolution:
    """Solve every layer and direction of ``network`` on ``inputs``, like ``module(inputs, hx)``.

    Args:
        network: the stacked cells.
        inputs: ``(T, B, I)``, or ``(B, T, I)`` when ``network.batch_first``.
        hx: initial states as ``torch.nn`` takes them: ``h_0 (L·D, B, H)``, for LSTM
            ``(h_0, c_0)``; zeros when ``None``.
        solver, max_steps, throw, certify, forward_error: as for :func:`solve`, per layer and
            direction (each layer's forward error is estimated for the inputs it was given).
        callback: ``callback(layer, direction, iteration, iterate, image)``.
        lengths: ``(B,)`` real positions per sample of a batch padded at the end
            (:mod:`fixedpoint.lengths`), as ``torch.nn`` takes a ``PackedSequence``: each
            sample's final state is at its own last position, the reverse direction starts
            there, and the outputs past a sample's end are 0 (as ``pad_packed_sequence`` gives).
            The padded positions are evaluated like the others (their inputs are whatever the
            padding holds) and discarded.

    The reverse direction is the same system on the time-reversed input.  Layer ``l + 1``
    takes the solved outputs of layer ``l``, so it starts only when layer ``l`` is done.
    """
    # Long mostly by its docstring; the stack itself is run_stack's.
    check_floating("inputs", inputs)
    if inputs.dim() != 3:
        raise InputError(f"inputs must be 3-D, got shape {tuple(inputs.shape)}")
    sequence = inputs.transpose(0, 1) if network.batch_first else inputs
    batch = sequence.shape[1]
    initial = _initial_states(network, hx, batch)
    if lengths is not None:
        lengths = check_lengths(lengths, sequence.shape[0], batch, sequence.device)
    reverse_order = None if lengths is None else reversal_within(lengths, sequence.shape[0])
    synchronize(sequence.device)
    started = time.perf_counter()
    layers: list[list[Solution]] = [[] for _ in network.cells]

    def solve_layer(layer: int, direction: int, layer_input: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
        cell = network.cells[layer][direction]
        system = SequenceSystem.build(cell, layer_input, state, check_finite=False)  # checked above
        hook = None
        if callback is not None:
            hook = lambda k, x, g: callback(layer, direction, k, x, g)  # noqa: E731
        solution = solve(
            system, solver, max_steps=max_steps, throw=throw, callback=hook, certify=certify, forward_error=forward_error,
        )
        layers[layer].append(solution)
        return solution.hidden, solution.final_state if lengths is None else last_states(solution.value, lengths)

    layer_input, final_states = run_stack(
        network.num_layers, network.num_directions, sequence, initial, solve_layer, reverse_order=reverse_order
    )  # (T, B, D·H), (L·D, B, S)
    synchronize(sequence.device)
    # The certificates are analysis, not solving: their time is not the solve's.
    wall_time = time.perf_counter() - started - sum(s.stats.certify_time for layer in layers for s in layer)
    hidden_size = network.output_size
    if lengths is not None:
        layer_input = layer_input * padding_mask(lengths, layer_input.shape[0])
    output = layer_input.transpose(0, 1) if network.batch_first else layer_input
    c_n = final_states[..., hidden_size:] if network.kind == "lstm" else None
    return NetworkSolution(output, final_states[..., :hidden_size], c_n, layers, wall_time)


def _initial_states(network: Network, hx: Any, batch: int) -> list[Tensor | None]:
    """Per (layer, direction) initial state ``(B, S)`` from ``torch.nn``'s ``hx`` layout."""
    count = network.num_layers * network.num_directions
    if hx is None:
        return [None] * count
    expected = (count, batch, network.output_size)
    if network.kind == "lstm":
        if not (isinstance(hx, tuple) and len(hx) == 2):
            raise InputError("an LSTM takes hx = (h_0, c_0)")
        parts = hx
    else:
        if isinstance(hx, tuple):
            raise InputError(f"a {network.kind} network takes hx = h_0, a single tensor")
        parts = (hx,)
    for name, part in zip(("h_0", "c_0"), parts):
        check_floating(name, part)
        if name == "c_0":  # the memory has H units whatever the projection
            expected = (count, batch, network.hidden_size)
        if tuple(part.shape) != expected:
            raise InputError(f"{name} must have shape {expected}, got {tuple(part.shape)}")
    states = torch.cat(parts, dim=-1)  # (L·D, B, S)
    return list(states.unbind(0))
