"""Gradients of a solved system without differentiating through the solver.

At the solution ``S* = F(S*)`` of :class:`~fixedpoint.system.SequenceSystem` a loss ``L(S*)``
with ``g_t = ∂L/∂s_t`` has the adjoint ``λ``, the solution of the reverse linear recurrence

    ``λ_T = g_T,   λ_t = g_t + J_{t+1}ᵀ λ_{t+1}``,   ``J_{t+1} = ∂f/∂s (s*_t, x_{t+1})``,

and every other gradient is one vector–Jacobian product of ``F`` at ``S*`` (all positions at
once): ``∂L/∂θ = λᵀ ∂F/∂θ`` for the weights and the inputs, and ``∂L/∂s_0 = J_1ᵀ λ_1``.  This is
backpropagation through time, reordered; docs/adjoint.md derives it.  Only ``S*`` is needed, so
the memory of a backward pass does not depend on how many iterations the forward solve took.

Three ways to run the recurrence, the same numbers:

- ``"sequential"``: ``T`` steps of ``λ_t = g_t + J_{t+1}ᵀ λ_{t+1}``, each one product with ``W_hh``
  through :meth:`~fixedpoint.cells.Cell.transposed_jacobian_product`, no ``S×S`` matrix;
- ``"scan"``: the dense ``J_tᵀ`` and one parallel reverse scan (:func:`fixedpoint.scan.linear_recurrence`),
  ``O(log T)`` depth, ``O(T·B·S³)`` work, in chunks that the memory guard of dense Newton plans;
- ``"quasi-newton"``: iterations that scan only the per-unit part of ``Jᵀ`` (diagonal; LSTM 2×2
  blocks) and apply the rest as one batched product, ``O(T·B·S)`` memory and work each; exact
  after at most ``T`` iterations (finite termination), stopped one iteration after an update
  first changes ``λ`` by less than the dtype's default ``rtol`` times ``max |λ|`` per sample.

``"auto"`` takes ``"sequential"`` on a CPU (measured fastest there: docs/adjoint.md) and
``"quasi-newton"`` on CUDA, where ``T`` sequential steps are ``T`` kernel launches and the dense
scan's work grows as ``S³``; there its scans run on the fused Triton kernel, and a quasi-Newton
adjoint that has not settled after its iterations finishes by dense scans when they fit in
memory, so that no loop over ``T`` runs on CUDA unless memory forces it.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from fixedpoint.errors import InputError
from fixedpoint.scan import apply_transitions, linear_recurrence
from fixedpoint.solvers.base import DEFAULT_TOLERANCES, check_integer
from fixedpoint.solvers.newton import plan_dense_chunk
from fixedpoint.system import SequenceSystem

AdjointMethod = Literal["auto", "scan", "quasi-newton", "sequential"]
ADJOINT_METHODS = ("auto", "scan", "quasi-newton", "sequential")
#: Positions whose Jacobian factors the sequential recurrence computes at once (bounds memory).
SEQUENTIAL_CHUNK = 1024
#: Iterations of the quasi-Newton adjoint before the positions not yet exact are finished by the
#: sequential recurrence (where Jᵀ expands the iteration needs up to T scans: a T² cost).
QUASI_NEWTON_MAX_ITERATIONS = 64
#: Quasi-Newton adjoint iterations after the residual test first passes.  The test bounds the
#: residual ``|image − λ|``, and a residual that size leaves an error of up to ``L/(1 − L)`` times
#: it (``L`` the rate of the Picard image ``g + Jᵀλ``); one more iteration divides that error by
#: the quasi-Newton rate instead.  Measured on the fuzz cases that missed (docs/reliability.md:
#: GRU and LSTM, float64): gradient errors of 0.50–1.8 tolerances fell to 0.16–0.17.
SETTLING_ITERATIONS = 1
#: Gate entries ``positions·B·G·H`` per chunk of the parameter VJP (bounds its autograd graph).
VJP_ELEMENTS = 2**22


def check_adjoint_method(method: object) -> None:
    if method not in ADJOINT_METHODS:
        raise InputError(f"adjoint must be one of {', '.join(map(repr, ADJOINT_METHODS))}, got {method!r}")


def resolve_adjoint_method(method: AdjointMethod, device: torch.device) -> Literal["scan", "quasi-newton", "sequential"]:
    """The method ``"auto"`` stands for on ``device``."""
    check_adjoint_method(method)
    if method != "auto":
        return method
    return "quasi-newton" if device.type == "cuda" else "sequential"


def adjoint_states(
    system: SequenceSystem,
    states: Tensor,
    state_gradients: Tensor,
    *,
    method: AdjointMethod = "auto",
    chunk: int | None = None,
    memory_limit: int | None = None,
) -> Tensor:
    """The adjoint ``λ (T, B, S)`` of the solution ``states (T, B, S)`` for ``g = state_gradients``.

    Args:
        system: the system that ``states`` solves.
        states: ``S*``, the exact solution.
        state_gradients: ``g_t = ∂L/∂s_t``, ``(T, B, S)``.
        method: ``"auto"``, ``"sequential"``, ``"scan"`` or ``"quasi-newton"`` (module docstring).
        chunk, memory_limit: for ``"scan"``: positions per chunk and the byte budget of the dense
            Jacobians, as for :class:`~fixedpoint.solvers.Newton`.
    """
    if tuple(states.shape) != system.state_shape or tuple(state_gradients.shape) != system.state_shape:
        raise InputError(
            f"states and their gradients must have shape {system.state_shape}, got "
            f"{tuple(states.shape)} and {tuple(state_gradients.shape)}"
        )
    check_integer("chunk", chunk, allow_none=True)
    check_integer("memory_limit", memory_limit, allow_none=True)
    resolved = resolve_adjoint_method(method, system.inputs.device)
    if resolved == "scan":
        size = plan_dense_chunk(
            system, chunk, memory_limit, what="the scanned adjoint",
            advice="use adjoint='quasi-newton' or 'sequential' (no S×S matrices)",
        )
        return _adjoint_by_scan(system, states, state_gradients, size)
    if resolved == "quasi-newton":
        return _adjoint_by_quasi_newton(system, states, state_gradients)
    return _adjoint_sequentially(system, states, state_gradients)


def _adjoint_by_scan(
    system: SequenceSystem, states: Tensor, gradients: Tensor, chunk: int | None,
    adjoint: Tensor | None = None, exact_from: int | None = None,
) -> Tensor:
    """The recurrence by dense reverse scans.  With ``adjoint`` exact at positions
    ``≥ exact_from``, fills in the positions before, in place, from ``λ_{exact_from}``."""
    # Chunks from the end: chunk [a, b) needs J_{t+1}ᵀ for t ∈ [a, b) (none exists for t = T − 1,
    # where the carried λ_T+1 is zero anyway) and starts from λ_b of the chunk after it.
    cell, projected = system.cell, system.projected_inputs
    steps = system.seq_len if exact_from is None else exact_from
    size = chunk or max(steps, 1)
    if adjoint is None:
        adjoint = torch.empty_like(gradients)
        carry = torch.zeros_like(gradients[0])
    else:
        carry = adjoint[steps]
    for end in range(steps, 0, -size):
        start = max(0, end - size)
        stop = min(end, system.seq_len - 1)
        transposed = cell.jacobian(states[start:stop], projected[start + 1 : stop + 1]).mT
        if stop < end:  # the last position: no successor
            transposed = torch.cat((transposed, transposed.new_zeros(1, *transposed.shape[1:])))
        adjoint[start:end] = linear_recurrence(transposed, gradients[start:end], carry, reverse=True)
        del transposed
        carry = adjoint[start]
    return adjoint


def _adjoint_by_quasi_newton(system: SequenceSystem, states: Tensor, gradients: Tensor) -> Tensor:
    # Split J = D + R with D the per-unit part (diagonal; LSTM 2×2 blocks).  Each iteration solves
    # λ⁺_t = g_t + D_{t+1}ᵀ λ⁺_{t+1} + R_{t+1}ᵀ λ_{t+1} by a cheap reverse scan; R's product is one
    # batched Jᵀ product minus Dᵀ.  The system is triangular: after k iterations the last k + 1
    # positions are exact (finite termination).
    cell, projected = system.cell, system.projected_inputs
    steps = system.seq_len
    structure = cell.unit_structure
    factors = cell.linearization(states[:-1], projected[1:])
    unit = cell.unit_jacobian(states[:-1], projected[1:])
    unit = unit.mT if structure == "block2" else unit
    transitions = torch.cat((unit, unit.new_zeros(1, *unit.shape[1:])))  # λ_{T+1} = 0: any A_T works
    rtol = DEFAULT_TOLERANCES[gradients.dtype][0]
    tiny = torch.finfo(gradients.dtype).tiny
    zero = torch.zeros_like(gradients[0])
    adjoint = gradients.clone()  # λ⁰ = g: exact at t = T
    passed = 0
    for iteration in range(QUASI_NEWTON_MAX_ITERATIONS + 1):
        # The image g_t + J_{t+1}ᵀ λ_{t+1} is one exact position ahead of λ (a Picard step).  Stop
        # when, at every position of every sample, it differs from λ by less than rtol times the
        # size of the terms there: a test relative to the largest entry of the whole sequence
        # would accept tiny components that an expanding Jᵀ later amplifies.
        coupling = cell.transposed_jacobian_product(factors, adjoint[1:])
        image = gradients.clone()
        image[:-1] += coupling
        size = gradients.abs() + adjoint.abs()
        size[:-1] += coupling.abs()
        if bool(((image - adjoint).abs().amax(-1) <= rtol * size.amax(-1) + tiny).all()):
            passed += 1
            if passed > SETTLING_ITERATIONS:
                return image
        if iteration == QUASI_NEWTON_MAX_ITERATIONS:
            break
        image[:-1] -= apply_transitions(unit, adjoint[1:], structure)
        adjoint = linear_recurrence(transitions, image, zero, reverse=True)
    # Not settled (an expanding Jᵀ moves one position per iteration): finish the positions that
    # are not yet exact from the last image's exact suffix.
    return _finish_adjoint(system, states, gradients, image, max(0, steps - 2 - QUASI_NEWTON_MAX_ITERATIONS))


def _finish_adjoint(system: SequenceSystem, states: Tensor, gradients: Tensor, adjoint: Tensor, exact_from: int) -> Tensor:
    """Positions ``< exact_from`` of ``adjoint`` from its exact suffix: by dense reverse scans on
    CUDA when their Jacobians fit the memory budget (no loop of ``T`` launches), otherwise (and on
    a CPU, where it is the fastest) by the sequential recurrence."""
    if states.device.type == "cuda" and exact_from > 0:
        try:
            size = plan_dense_chunk(system, None, None, what="the adjoint's dense finish", advice="")
        except InputError:
            size = 0
        if size != 0:
            return _adjoint_by_scan(system, states, gradients, size, adjoint=adjoint, exact_from=exact_from)
    return _adjoint_sequentially(system, states, gradients, adjoint, exact_from=exact_from)


def _adjoint_sequentially(
    system: SequenceSystem, states: Tensor, gradients: Tensor, adjoint: Tensor | None = None, exact_from: int | None = None
) -> Tensor:
    """The recurrence step by step.  With ``adjoint`` exact at positions ``≥ exact_from`` (default:
    only the last, ``λ_T = g_T``), fills in the positions before, in place."""
    cell, projected = system.cell, system.projected_inputs
    steps = system.seq_len
    if adjoint is None:
        adjoint = torch.empty_like(gradients)
        adjoint[-1] = gradients[-1]
    exact_from = steps - 1 if exact_from is None else exact_from
    current = adjoint[exact_from]
    # Positions t = exact_from − 1 … 0, in chunks; factors[k] linearises f at position start + k + 1.
    for end in range(exact_from, 0, -SEQUENTIAL_CHUNK):
        start = max(0, end - SEQUENTIAL_CHUNK)
        factors = cell.linearization(states[start:end], projected[start + 1 : end + 1])
        # One unbind per factor instead of an indexing op per step: the loop is overhead-bound.
        per_step = list(zip(*(factor.unbind(0) for factor in factors)))
        rows = adjoint[start:end].unbind(0)
        inputs = gradients[start:end].unbind(0)
        for k in range(end - start - 1, -1, -1):
            current = torch.add(inputs[k], cell.transposed_jacobian_product(per_step[k], current), out=rows[k])
    return adjoint


def solution_gradients(
    system: SequenceSystem, states: Tensor, adjoint: Tensor, needs: tuple[bool, ...]
) -> tuple[Tensor | None, ...]:
    """``λᵀ ∂F/∂(x, s_0, W_ih, W_hh, b_ih, b_hh[, W_hr])`` at ``S*``: a vector–Jacobian product of
    ``F`` over all positions, batched in chunks of about ``VJP_ELEMENTS`` gate entries so that its
    autograd graph stays bounded; weight gradients are summed over the chunks.

    ``needs`` says which gradients to compute (the others are ``None``), one flag per entry of
    the result: ``(inputs (T, B, I), initial_state (B, S))`` and the cell's tensors in
    :attr:`~fixedpoint.cells.Cell.tensor_names` order (an LSTM's ``weight_hr`` last).
    """
    cell = system.cell
    names = cell.tensor_names
    originals = (system.inputs, system.initial_state, *(getattr(cell, name) for name in names))
    if len(needs) != len(originals):
        raise InputError(f"needs must have {len(originals)} entries, got {len(needs)}")
    inputs_wanted, initial_wanted, *weights_wanted = (t is not None and bool(n) for t, n in zip(originals, needs))
    steps, batch, _ = system.state_shape
    size = max(1, VJP_ELEMENTS // (batch * cell.weight_hh.shape[0]))
    input_gradient = torch.empty_like(system.inputs) if inputs_wanted else None
    initial_gradient: Tensor | None = None
    weight_gradients: list[Tensor | None] = [None] * len(names)
    detached = states.detach()
    with torch.enable_grad():
        weights = [None if t is None else t.detach().requires_grad_(w) for t, w in zip(originals[2:], weights_wanted)]
        differentiable = cell.with_tensors(**dict(zip(names, weights)))
        initial = system.initial_state.detach().requires_grad_(initial_wanted)
        for begin in range(0, steps, size):
            end = min(steps, begin + size)
            inputs = system.inputs[begin:end].detach().requires_grad_(inputs_wanted)
            first = initial if begin == 0 else detached[begin - 1]
            previous = torch.cat((first.unsqueeze(0), detached[begin : end - 1]))
            image = differentiable.step(previous, differentiable.input_projection(inputs))
            asks_initial = initial_wanted and begin == 0
            leaves = [inputs] * inputs_wanted + [initial] * asks_initial + [w for w in weights if w is not None and w.requires_grad]
            found = list(torch.autograd.grad(image, leaves, adjoint[begin:end], allow_unused=True)) if leaves else []
            # A leaf with no path to F (e.g. W_ih when I = 0 rows) gets a true zero.
            found = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, found)]
            if inputs_wanted:
                input_gradient[begin:end] = found.pop(0)
            if asks_initial:
                initial_gradient = found.pop(0)
            for index, weight in enumerate(weights):
                if weight is not None and weight.requires_grad:
                    gradient = found.pop(0)
                    weight_gradients[index] = gradient if weight_gradients[index] is None else weight_gradients[index] + gradient
    return (input_gradient, initial_gradient, *weight_gradients)
