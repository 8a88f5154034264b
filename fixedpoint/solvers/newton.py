"""The Newton family on ``S = F(S)``: every step is a linear recurrence, solved by a parallel scan
or, where that is cheaper, one position after another.

Linearising ``F`` at the iterate ``X`` gives ``y_t = G_t + A_t (y_{t−1} − X_{t−1})`` with
``G = F(X)``: the recurrence ``y_t = A_t y_{t−1} + b_t``, ``b_t = G_t − A_t X_{t−1}``, started
from the exact predecessor of the active window.  ``A_t`` is

- the full Jacobian ``J_t = ∂f/∂s (X_{t−1}, x_t)`` (``jacobian="full"``, DEER): quadratic
  convergence, ``O(T·B·S²)`` memory and ``O(T·B·S³)`` work per step;
- its per-unit part (``jacobian="diagonal"``, quasi-DEER): the diagonal for Elman and GRU, the
  2×2 ``(h_j, c_j)`` blocks for LSTM, ``O(T·B·S)`` memory and work.

Both are exact in one step where ``F`` is affine with that structure, and both keep finite
termination: the driver writes the exact value of the window's first position after every step.

How the step's recurrence is solved does not change the iterate (to rounding), only its cost
(``recurrence``): ``"scan"`` forms ``A_t`` and runs the parallel scan (``O(log T)`` depth; with
dense ``J_t`` that is ``O(T·B·S³)`` work and ``O(T·B·S²)`` memory, what a GPU is for);
``"sequential"`` runs ``T`` dependent steps, for full Jacobians matrix-free with one product
``J_t v`` each (:meth:`~fixedpoint.cells.Cell.jacobian_product`, ``O(T·B·G·H²)`` work, no ``S×S``
matrix).  ``"auto"`` takes the loop for full Jacobians on a CPU from ``S = 24`` states on
(``SEQUENTIAL_FROM``; docs/newton.md §5 measures the crossover) and the scan everywhere else
(Levenberg–Marquardt: below).

Safe steps.  A sample whose Newton iterate is not finite, or (undamped) whose residual grew by
more than ``max_residual_growth`` since the previous iteration (to more than ``atol``), takes the
Picard step ``G`` instead.  With ``damping="backtracking"`` the step ``X + α(Y − X)`` is accepted per sample for
the largest ``α ∈ {1, ½, ¼, …}`` (at most ``max_backtracks`` halvings) that decreases the merit
``½ Σ_t ‖F(Z)_t − Z_t‖²`` by the Armijo factor ``1 − 2·10⁻⁴·α``, or that already meets the
tolerance; a sample with no such ``α`` takes the Picard step.  Every safe step and every halving
is counted per sample in the statistics; nothing is clipped or replaced silently.

Levenberg–Marquardt.  With ``damping="levenberg-marquardt"`` the step minimises the linearised
merit plus ``λ_b ‖δ‖²`` per sample, ``Σ_t ‖δ_t − A_t δ_{t−1} − r_t‖² + λ Σ_t ‖δ_t‖²``
(:func:`~fixedpoint.scan.regularized_recurrence`): ``λ = 0`` is the
(quasi-)Newton step, a large ``λ`` a short step along the merit's descent direction, and every
``λ`` gives a descent direction.  A sample takes the step when it lowers the merit ``½ Σ_t ‖r_t‖²``
(or meets the tolerance); otherwise ``λ`` grows fourfold (from at least ``regularization``) and
the step is recomputed, at most ``max_backtracks`` times, after which the sample keeps its
iterate: a step never raises the merit of its window.  After a taken step ``λ`` shrinks threefold
when the merit fell by more than three quarters of the linear model's prediction and doubles when
by less than a quarter (below ``1e-8`` it becomes 0, pure Newton).  ``recurrence="scan"`` solves
the step by block cyclic reduction, ``O(log T)`` levels; ``"sequential"`` by ELK's Kalman
smoother, its reference; ``"auto"`` by cyclic reduction except for dense steps on a CPU from
``S = 48`` (``SMOOTHER_FROM``) on, where the smoother is faster.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import Tensor

from fixedpoint.errors import InputError
from fixedpoint.residual import Measurement, StopTest
from fixedpoint.scan import (
    Structure,
    apply_transitions,
    linear_recurrence,
    linear_recurrence_sequential,
    regularized_recurrence,
    regularized_recurrence_sequential,
)
from fixedpoint.solvers.base import Solver, check_integer, check_number, counted
from fixedpoint.system import SequenceSystem

JacobianStructure = Literal["full", "diagonal"]
Damping = Literal["none", "backtracking", "levenberg-marquardt"]
Recurrence = Literal["auto", "scan", "sequential"]

#: Armijo constant of the backtracking test (the usual 1e-4 of Nocedal & Wright).
ARMIJO = 1e-4
#: Peak bytes of a dense Newton step per position, in units of one position's Jacobians
#: ``B·S²·itemsize``: the Jacobians, their copy in the scan, one round's products and the
#: concatenation that replaces them.
DENSE_MEMORY_FACTOR = 4
#: Fraction of the free memory that a dense Newton step may plan to use.
MEMORY_FRACTION = 0.5
#: State size from which ``recurrence="auto"`` solves a full-Jacobian step on a CPU by the
#: matrix-free loop: below it the dense scan's ``S³`` work is smaller than the loop's per-position
#: overhead (measured: docs/newton.md §5).
SEQUENTIAL_FROM = 24
#: State size from which ``recurrence="auto"`` computes a dense Levenberg–Marquardt step on a CPU by
#: the Kalman smoother rather than by cyclic reduction, whose ``S×S`` solves carry more right-hand
#: sides (measured: cyclic reduction 1.6× faster at ``S = 32``, the smoother 1.5× at ``S = 64``).
SMOOTHER_FROM = 48
#: Below this many positions per chunk a chunked dense scan is a slow sequential loop over
#: chunks; the guard refuses instead and names the cheaper solver.
MIN_CHUNK = 32


@dataclass
class NewtonState:
    """The chunk length chosen by the memory guard, how the step's recurrence is solved, and
    per-sample counters ``(B,)``."""

    chunk: int | None
    recurrence: Literal["scan", "sequential"]
    newton_steps: Tensor
    safe_steps: Tensor
    backtracks: Tensor
    last_residual: Tensor | None = None
    regularization: Tensor | None = None
    kept: Tensor | None = None
    #: quasi-Newton: ``(A, b)`` of the window's linearisation, computed with ``F`` by
    #: :meth:`Newton.evaluate` from the same product, for the step that follows.
    terms: tuple[Tensor, Tensor] | None = None
    #: ``max_{t,j} |F(X) − X|`` per sample ``(B,)``, from :meth:`Newton.evaluate`'s measurement:
    #: the undamped step's growth test reads it instead of measuring the residual again.
    largest_residual: Tensor | None = None


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device`` (CUDA: free memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


@dataclass(frozen=True)
class Newton(Solver):
    """Newton (``jacobian="full"``) or quasi-Newton (``"diagonal"``), optionally damped.

    Args:
        rtol, atol: termination tolerances (see :class:`~fixedpoint.solvers.base.Solver`).
        jacobian: ``"full"`` or ``"diagonal"`` (per unit; 2×2 blocks for LSTM).
        damping: ``"none"`` or ``"backtracking"`` on the merit ``½ Σ_t ‖r_t‖²``.
        recurrence: how a step's linear recurrence is solved: ``"scan"`` (parallel),
            ``"sequential"`` (one position after another; matrix-free for full Jacobians) or
            ``"auto"`` (default: sequential for full Jacobians on a CPU from ``S = 24`` on, the
            scan otherwise).  Levenberg–Marquardt: cyclic reduction (``"scan"``) or the Kalman
            smoother (``"sequential"``; ``"auto"`` for dense steps on a CPU from ``S = 48``).
        chunk: positions whose Jacobians (or, sequentially, their factors) are formed at once;
            ``None`` lets the memory guard decide (the whole window when it fits).
        memory_limit: bytes a full-Jacobian step may use; ``None``: half the free memory of the
            device at the start of the solve.
        max_backtracks: most step halvings per iteration with ``damping="backtracking"``.
        max_residual_growth: undamped only: a sample whose residual grew by more than this
            factor since the previous iteration, to more than ``atol``, takes a Picard step.
        regularization: ``damping="levenberg-marquardt"``: the starting ``λ`` (0: try the Newton
            step first) and the least ``λ`` after a refused step.
    """

    jacobian: JacobianStructure = "full"
    damping: Damping = "none"
    recurrence: Recurrence = "auto"
    chunk: int | None = None
    memory_limit: int | None = None
    max_backtracks: int = 8
    max_residual_growth: float = 1e3
    regularization: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.jacobian not in ("full", "diagonal"):
            raise InputError(f"jacobian must be 'full' or 'diagonal', got {self.jacobian!r}")
        if self.damping not in ("none", "backtracking", "levenberg-marquardt"):
            raise InputError(
                f"damping must be 'none', 'backtracking' or 'levenberg-marquardt', got {self.damping!r}"
            )
        if self.recurrence not in ("auto", "scan", "sequential"):
            raise InputError(f"recurrence must be 'auto', 'scan' or 'sequential', got {self.recurrence!r}")
        check_number("regularization", self.regularization, 0, low_open=True)
        check_integer("chunk", self.chunk, allow_none=True)
        check_integer("memory_limit", self.memory_limit, allow_none=True)
        check_integer("max_backtracks", self.max_backtracks, 0)
        check_number("max_residual_growth", self.max_residual_growth, 1)

    @property
    def name(self) -> str:
        base = "newton" if self.jacobian == "full" else "quasi-newton"
        if self.damping == "levenberg-marquardt":
            return f"lm-{base}"
        return base if self.damping == "none" else f"damped-{base}"

    def resolved_recurrence(self, device: torch.device, state_size: int) -> Literal["scan", "sequential"]:
        """What ``recurrence="auto"`` stands for on ``device`` with ``S = state_size`` (the
        module docstring)."""
        if self.recurrence != "auto":
            return self.recurrence
        if self.damping == "levenberg-marquardt":  # docs/newton.md §3
            smoother = self.jacobian == "full" and device.type != "cuda" and state_size >= SMOOTHER_FROM
            return "sequential" if smoother else "scan"
        loop = self.jacobian == "full" and device.type != "cuda" and state_size >= SEQUENTIAL_FROM
        return "sequential" if loop else "scan"

    # -- memory guard ----------------------------------------------------------------------------
    def plan_chunk(self, system: SequenceSystem) -> int | None:
        """Positions per chunk for a step that forms dense Jacobians (``None``: all at once), or
        refuse.  Only the scan and Levenberg–Marquardt form them; the matrix-free loop keeps
        ``O(B·G·H)`` numbers per position, as quasi-Newton does.

        Raises :class:`InputError` before anything is allocated when not even ``MIN_CHUNK``
        positions of Jacobians fit in the memory budget.
        """
        dense = self.jacobian == "full" and (
            self.damping == "levenberg-marquardt" or self.resolved_recurrence(system.inputs.device, system.state_shape[2]) == "scan"
        )
        if not dense:
            return self.chunk
        return plan_dense_chunk(
            system,
            self.chunk,
            self.memory_limit,
            what="dense Newton",
            advice="use quasi-Newton (Newton(jacobian='diagonal'), O(T·B·S) memory)",
        )

    # -- protocol --------------------------------------------------------------------------------
    def init(self, system: SequenceSystem, initial_guess: Tensor) -> tuple[Tensor, NewtonState]:
        chunk = self.plan_chunk(system)
        zeros = torch.zeros(system.batch, dtype=torch.long, device=initial_guess.device)
        recurrence = self.resolved_recurrence(initial_guess.device, system.state_shape[2])
        state = NewtonState(chunk, recurrence, zeros, zeros.clone(), zeros.clone())
        if self.damping == "levenberg-marquardt":
            if chunk is not None:
                raise InputError(
                    "levenberg-marquardt smooths over the whole window at once, and its dense Jacobians "
                    f"do not fit in memory (chunk {chunk} < T); use jacobian='diagonal' or raise memory_limit"
                )
            state.regularization = torch.full((system.batch,), 0.0, dtype=initial_guess.dtype,
                                              device=initial_guess.device)
            state.kept = zeros.clone()
        return initial_guess, state

    def evaluate(
        self, system: SequenceSystem, iterate: Tensor, start: int, state: NewtonState, test: StopTest
    ) -> tuple[Tensor, Measurement]:
        """``F(X)`` on the window and its measurement; quasi-Newton also forms its step's
        ``(A, b)`` there, from the same product with ``W_hh`` and, on CUDA, in the same kernel
        (:meth:`~fixedpoint.cells.Cell.measured_quasi_newton_terms`)."""
        state.terms = None
        if self.jacobian != "diagonal" or state.chunk is not None:
            image, measurement = system.apply_measured(iterate, start, test)
            state.largest_residual = measurement.largest
            return image, measurement
        predecessor = system.initial_state if start == 0 else iterate[start - 1]
        window = iterate[start:]
        previous = system.previous_states(window, predecessor)
        image, transitions, values, measurement = system.cell.measured_quasi_newton_terms(
            previous, system.projected_inputs[start:], window, test
        )
        state.terms = (transitions, values)
        state.largest_residual = measurement.largest
        return image, measurement

    def step(
        self,
        system: SequenceSystem,
        iterate: Tensor,
        image: Tensor,
        state: NewtonState,
        predecessor: Tensor | None = None,
        active: Tensor | None = None,
    ) -> tuple[Tensor, NewtonState]:
        if predecessor is None:
            predecessor = system.initial_state
        largest, state.largest_residual = state.largest_residual, None
        if self.damping == "levenberg-marquardt":
            residual = image - iterate
            return self._levenberg_marquardt_step(system, iterate, image, residual, predecessor, state, active)
        if state.terms is not None:
            solver = linear_recurrence if state.recurrence == "scan" else linear_recurrence_sequential
            newton = solver(*state.terms, predecessor)
        else:
            newton = self.newton_iterate(system, iterate, image, predecessor, state.chunk, state.recurrence)
        if self.damping == "backtracking":
            residual = image - iterate
            newton, accepted = self._backtrack(system, iterate, image, newton, residual, predecessor, state, active)
        else:
            # A row maximum is NaN or inf exactly when the sample's iterate is not finite.
            accepted = newton.abs().amax(dim=(0, 2)) < float("inf")  # (B,)
            size = (image - iterate).abs().amax(dim=(0, 2)) if largest is None else largest  # (B,)
            if state.last_residual is not None:
                # Growth from a residual at rounding level (a converged sample) is not divergence.
                _, atol = self.tolerances(image.dtype)
                accepted &= (size <= self.max_residual_growth * state.last_residual) | (size <= atol)
            state.last_residual = size
            newton = torch.where(accepted[None, :, None], newton, image)
        state.newton_steps += counted(accepted, active)
        state.safe_steps += counted(~accepted, active)
        return newton, state

    def newton_iterate(
        self,
        system: SequenceSystem,
        iterate: Tensor,
        image: Tensor,
        predecessor: Tensor,
        chunk: int | None,
        recurrence: Literal["scan", "sequential"] = "scan",
    ) -> Tensor:
        """The (quasi-)Newton point ``Y`` of the linearisation at ``X``: ``(n, B, S)``."""
        window = iterate.shape[0]
        previous, inputs, jacobian, structure = self._linearization(system, iterate, predecessor)
        size = chunk or window
        if recurrence == "sequential" and self.jacobian == "full":
            return _newton_point_matrix_free(system, iterate, image, previous, inputs, size)
        solver = linear_recurrence if recurrence == "scan" else linear_recurrence_sequential
        pieces = []
        start_state = predecessor
        for start in range(0, window, size):
            part = slice(start, start + size)
            transitions = jacobian(previous[part], inputs[part])
            values = image[part] - apply_transitions(transitions, previous[part], structure)
            piece = solver(transitions, values, start_state)
            del transitions, values
            pieces.append(piece)
            start_state = piece[-1]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _linearization(
        self, system: SequenceSystem, iterate: Tensor, predecessor: Tensor
    ) -> tuple[Tensor, Tensor, Callable[[Tensor, Tensor], Tensor], Structure]:
        """What a step linearises: the states the window's positions read ``(n, B, S)``, their
        projected inputs, the Jacobian this solver uses (full or per unit) and its scan structure."""
        previous = system.previous_states(iterate, predecessor)
        inputs = system.projected_inputs[system.seq_len - iterate.shape[0] :]
        if self.jacobian == "full":
            return previous, inputs, system.cell.jacobian, "dense"
        return previous, inputs, system.cell.unit_jacobian, system.cell.unit_structure

    def _backtrack(
        self,
        system: SequenceSystem,
        iterate: Tensor,
        image: Tensor,
        newton: Tensor,
        residual: Tensor,
        predecessor: Tensor,
        state: NewtonState,
        active: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Per-sample Armijo backtracking: the next iterate and the ``(B,)`` mask of samples that
        found a step (the others take the Picard step)."""
        rtol, atol = self.tolerances(iterate.dtype)
        merit = 0.5 * residual.square().sum(dim=(0, 2))  # (B,)
        direction = newton - iterate
        pending = torch.ones_like(merit, dtype=torch.bool)
        alpha = torch.ones_like(merit)
        for halvings in range(self.max_backtracks + 1):
            trial = iterate + alpha[None, :, None] * direction
            trial_image = system.apply_window(trial, predecessor)
            trial_residual = trial_image - trial
            trial_merit = 0.5 * trial_residual.square().sum(dim=(0, 2))
            within = (trial_residual.abs() < atol + rtol * trial_image.abs()).flatten(2).all(2).all(0)
            decreased = trial_merit <= (1 - 2 * ARMIJO * alpha) * merit
            ok = pending & torch.isfinite(trial_merit) & (decreased | within)
            newton = torch.where(ok[None, :, None], trial, newton)
            state.backtracks += counted(ok, active) * halvings
            pending &= ~ok
            if not bool(pending.any()):
                break
            alpha = torch.where(pending, alpha / 2, alpha)
        return torch.where(pending[None, :, None], image, newton), ~pending

    def _levenberg_marquardt_step(
        self, system: SequenceSystem, iterate: Tensor, image: Tensor, residual: Tensor, predecessor: Tensor,
        state: NewtonState, active: Tensor | None,
    ) -> tuple[Tensor, NewtonState]:
        """Per sample, the regularised step that lowers the merit (module docstring); a sample
        for which none does within ``max_backtracks`` increases of ``λ`` keeps ``X``."""
        rtol, atol = self.tolerances(iterate.dtype)
        previous, inputs, jacobian, structure = self._linearization(system, iterate, predecessor)
        transitions = state.terms[0] if state.terms is not None else jacobian(previous, inputs)
        merit = 0.5 * residual.square().sum(dim=(0, 2))  # (B,)
        smoother = regularized_recurrence if state.recurrence == "scan" else regularized_recurrence_sequential
        regularization = state.regularization.clone()
        chosen = iterate.clone()
        pending = torch.ones_like(merit, dtype=torch.bool)
        for attempt in range(self.max_backtracks + 1):
            step = smoother(transitions, residual, regularization)
            trial = iterate + step
            trial_image = system.apply_window(trial, predecessor)
            trial_residual = trial_image - trial
            trial_merit = 0.5 * trial_residual.square().sum(dim=(0, 2))
            carried = apply_transitions(transitions, torch.cat((step.new_zeros(1, *step.shape[1:]), step[:-1])), structure)
            predicted = merit - 0.5 * (step - carried - residual).square().sum(dim=(0, 2))
            within = (trial_residual.abs() < atol + rtol * trial_image.abs()).flatten(2).all(2).all(0)
            ok = pending & torch.isfinite(trial_merit) & ((trial_merit < merit) | within)
            chosen = torch.where(ok[None, :, None], trial, chosen)
            ratio = (merit - trial_merit) / predicted.clamp(min=torch.finfo(merit.dtype).tiny)
            updated = torch.where(ratio > 0.75, regularization / 3, torch.where(ratio < 0.25, 2 * regularization, regularization))
            taken = ok if active is None else ok & active  # no update after the driver's stop
            state.regularization = torch.where(taken, torch.where(updated < 1e-8, 0.0, updated), state.regularization)
            state.backtracks += counted(ok, active) * attempt
            pending &= ~ok
            if not bool(pending.any()):
                break
            regularization = torch.where(pending, (4 * regularization).clamp(min=self.regularization), regularization)
        refused = pending if active is None else pending & active
        state.regularization = torch.where(refused, regularization, state.regularization)
        state.newton_steps += counted(~pending, active)
        state.kept += counted(pending, active)
        return chosen, state

    def statistics(self, state: NewtonState) -> dict[str, Any]:
        stats = {
            "newton_steps": state.newton_steps.tolist(),
            "safe_steps": state.safe_steps.tolist(),
            "chunk": state.chunk,
            "recurrence": state.recurrence,
        }
        if self.damping == "backtracking":
            stats["backtracks"] = state.backtracks.tolist()
        if self.damping == "levenberg-marquardt":
            stats["increases"] = state.backtracks.tolist()
            stats["kept"] = state.kept.tolist()
            stats["regularization"] = state.regularization.tolist()
        return stats


def _newton_point_matrix_free(
    system: SequenceSystem, iterate: Tensor, image: Tensor, previous: Tensor, inputs: Tensor, chunk: int
) -> Tensor:
    """The full-Jacobian Newton point ``Y = X + δ`` with ``δ_t = J_t δ_{t−1} + (G_t − X_t)``, the
    tangent recurrence of the residual (:meth:`~fixedpoint.cells.Cell.tangent_recurrence`, as the
    forward-error estimate runs it): no ``S×S`` matrix is formed.  ``chunk`` positions' factors
    are formed at once.  At the window's first position ``Y = X`` before it (the exact
    predecessor), so ``δ`` starts from 0."""
    cell = system.cell
    residual = image - iterate
    offset = torch.empty_like(image)  # δ = Y − X
    last = torch.zeros_like(image[0])
    for start in range(0, image.shape[0], chunk):
        part = slice(start, start + chunk)
        last = cell.tangent_recurrence(cell.linearization(previous[part], inputs[part]), residual[part], last, offset[part])
    return iterate + offset


def plan_dense_chunk(
    system: SequenceSystem, chunk: int | None, memory_limit: int | None, *, what: str, advice: str
) -> int | None:
    """Positions per chunk of a computation that holds dense Jacobians ``(n, B, S, S)`` and
    scans them (``None``: all ``T`` at once), or raise :class:`InputError` before allocating.

    The budget is ``memory_limit`` bytes, or ``MEMORY_FRACTION`` of the device's free memory;
    a given ``chunk`` is kept if it fits.  Below ``MIN_CHUNK`` positions the refusal names
    ``advice``, the cheaper alternative.
    """
    steps, batch, size = system.state_shape
    per_position = DENSE_MEMORY_FACTOR * batch * size * size * system.inputs.element_size()
    device = system.inputs.device
    budget = memory_limit if memory_limit is not None else int(MEMORY_FRACTION * free_memory(device))
    fits = budget // per_position
    if chunk is not None:
        if chunk * per_position <= budget:
            return chunk
        needed = chunk * per_position
    elif fits >= steps:
        return None
    elif fits >= MIN_CHUNK:
        return int(fits)
    else:
        needed = min(steps, MIN_CHUNK) * per_position
    raise InputError(
        f"{what} needs about {_gib(needed)} for its Jacobians (B·S² = {batch}·{size}² per "
        f"position) but the budget is {_gib(budget)} on {device}; {advice}, a smaller chunk, "
        f"or raise memory_limit"
    )


def _gib(size: float) -> str:
    return f"{size / 2**30:.3g} GiB" if size >= 2**20 else f"{size / 2**10:.3g} KiB"


def QuasiNewton(**options: Any) -> Newton:  # noqa: N802 — reads as a solver class at call sites
    """``Newton(jacobian="diagonal", …)``: quasi-DEER, per-unit Jacobians."""
    return Newton(jacobian="diagonal", **options)


