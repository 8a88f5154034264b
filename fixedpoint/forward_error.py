"""How far an approximate solution is from the exact one, and how to close the gap.

A residual test says how well ``S = F(S)`` holds, not how far ``S`` is from the exact solution
``S*``: a residual ``r`` leaves an error up to ``Σ_k ‖J_t ⋯ J_{k+1}‖·‖r_k‖``, which on a
contracting cell is a few residuals and on an expanding, chaotic or barely predictable one is
many.  With ``r = F(S) − S`` and ``S* = F(S*)``, linearising ``F`` at ``S`` gives
``(I − ∂F) δ = r`` for ``δ = S* − S`` (to second order in ``δ``), and since ``∂F`` is block
lower-bidiagonal that is the linear recurrence

    ``δ_t = J_t δ_{t−1} + r_t``,  ``δ_0 = 0``

with ``J_t = ∂f/∂s`` at ``(s_{t−1}, x_t)`` (docs/forward_error.md).  ``δ`` is one Newton step
from ``S``; its size is the **forward-error estimate** (an estimate, not a bound: it is first
order, and it cannot see rounding below that of evaluating ``r``).

Precision.  ``r`` and the recurrence are evaluated in float64 whatever the dtype of ``S``: for a
float32 solve that is higher precision, so ``δ`` measures the float32 answer's true error; for a
float64 solve it is the same precision, so ``δ`` resolves errors down to about the rounding of
one step propagated through the problem — the accuracy the sequential loop itself has.

Refinement.  Adding ``δ`` to ``S`` is mixed-precision iterative refinement: it removes the part
of the error that the residual left, up to the rounding of the residual's evaluation.  The driver
(:func:`fixedpoint.solve.solve`) does that when the estimate exceeds the tolerance.

Cost: one evaluation of ``F`` and of the Jacobian factors over all positions (parallel), then
``T`` sequential Jacobian–vector products (one ``W_hh`` product each, no ``S×S`` matrices),
about the cost of the sequential Python loop.  On CUDA, where that loop is ``T`` kernel launches,
the recurrence is solved instead by quasi-Newton iterations over all positions at once
(:func:`parallel_correction`), each one scan and one batched product.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from fixedpoint.conditioning import Trajectory
from fixedpoint.errors import InputError
from fixedpoint.scan import apply_transitions, linear_recurrence
from fixedpoint.system import SequenceSystem

#: The dtype in which the residual and the correction are evaluated.
ESTIMATE_DTYPE = torch.float64

#: How :func:`correction_and_residual` solves the correction's recurrence.
Method = Literal["auto", "sequential", "parallel"]
#: Most iterations of :func:`parallel_correction` before it gives way to the loop.
PARALLEL_ITERATIONS = 32
#: Relative change of ``δ`` per iteration below which :func:`parallel_correction` stops: the
#: correction is then accurate to about this fraction of itself (a refinement that adds it
#: removes all but that fraction of the error it estimates).
PARALLEL_RTOL = 1e-6

#: Positions whose Jacobian factors are formed at once: bounds the float64 temporaries
#: (``G·H`` numbers per position and sample) independently of ``T``.
CHUNK = 1024


def linearized_correction(system: SequenceSystem, states: Tensor, *, chunk: int = CHUNK) -> Tensor:
    """``(T, B, S)`` float64: the first-order correction ``δ`` with ``S* ≈ states + δ``.

    Solves ``δ_t = J_t δ_{t−1} + r_t`` (``δ_0 = 0``, ``r = F(states) − states``) one position
    after another with matrix-free products ``J_t v`` (:meth:`~fixedpoint.cells.Cell.jacobian_product`),
    all in float64.
    """
    correction, _ = correction_and_residual(system, states, chunk=chunk)
    return correction


def correction_and_residual(
    system: SequenceSystem,
    states: Tensor,
    *,
    chunk: int = CHUNK,
    tolerances: tuple[float, float] | None = None,
    exact_prefix: int = 0,
    method: Method = "auto",
) -> tuple[Tensor, Tensor]:
    """``δ (T, B, S)`` as :func:`linearized_correction`, and the residual's size per sample
    ``(B,)``: ``max |r|`` or, with ``tolerances = (rtol, atol)``, the scaled
    ``max |r| / (atol + rtol·|F(states)|)`` of the driver's termination test.

    The first ``exact_prefix`` positions are taken as exact (the recurrence's own values, as a
    solve's exact prefix is): their residual, rounding only, is not propagated, so ``δ`` is 0
    there and a refinement leaves them as the sequential loop computes them.

    ``method``: ``"sequential"`` (the loop over positions), ``"parallel"`` (quasi-Newton
    iterations on the linear recurrence, :func:`parallel_correction`, falling back to the loop
    if they have not converged), or ``"auto"``: parallel on CUDA, where a loop over ``T`` is
    ``T`` kernel launches, sequential elsewhere, where it is the cheapest."""
    if method not in ("auto", "sequential", "parallel"):
        raise InputError(f"method must be 'auto', 'sequential' or 'parallel', got {method!r}")
    if method == "parallel" or (method == "auto" and states.device.type == "cuda"):
        with torch.no_grad():
            whole = Trajectory.of(system, states)
            residual, residual_size = _residual(whole, tolerances)
            residual[:exact_prefix] = 0
            correction = parallel_correction(whole, residual)
        if correction is not None:
            return correction, residual_size
    with torch.no_grad():
        correction = states.new_empty(states.shape, dtype=ESTIMATE_DTYPE)
        residual_size = correction.new_zeros(states.shape[1])
        delta = correction.new_zeros(states.shape[1:])
        for start, piece in Trajectory.chunks(system, states, chunk):
            residual, size_here = _residual(piece, tolerances)
            residual_size = torch.maximum(residual_size, size_here)
            residual[: max(0, exact_prefix - start)] = 0
            factors = piece.factors()
            for t in range(piece.states.shape[0]):
                delta = piece.cell.jacobian_product(tuple(f[t] for f in factors), delta) + residual[t]
                correction[start + t] = delta
    return correction, residual_size


def _residual(piece: Trajectory, tolerances: tuple[float, float] | None) -> tuple[Tensor, Tensor]:
    """``r = F(S) − S`` on a piece ``(n, B, S)`` and its size per sample ``(B,)`` (scaled by the
    tolerances when given)."""
    image = piece.image()
    residual = image - piece.states
    size = residual.abs()
    if tolerances is not None:
        rtol, atol = tolerances
        size = size / (atol + rtol * image.abs()).clamp_(min=torch.finfo(ESTIMATE_DTYPE).tiny)
    return residual, size.amax(dim=(0, 2))


def parallel_correction(trajectory: Trajectory, residual: Tensor) -> Tensor | None:
    """``δ_t = J_t δ_{t−1} + r_t`` (``δ_0 = 0``) by quasi-Newton iterations, all positions at once:
    ``J = D + R`` with ``D`` the per-unit part (diagonal; the LSTM's 2×2 blocks), each iteration
    one scan ``δ⁺_t = D_t δ⁺_{t−1} + r_t + R_t δ_{t−1}`` and one batched product ``J v``.  Exact
    after ``T`` iterations (finite termination); returns ``δ`` once an iteration changes it by at
    most :data:`PARALLEL_RTOL` of its size in every sample, or ``None`` after
    :data:`PARALLEL_ITERATIONS` (where ``J`` expands, the caller's loop is cheaper)."""
    cell = trajectory.cell
    structure = "block2" if cell.kind == "lstm" else "diagonal"
    factors = trajectory.factors()
    unit = cell.unit_jacobian(trajectory.previous, trajectory.projected)
    zero = residual.new_zeros(residual.shape[1:])
    delta = linear_recurrence(unit, residual, zero)
    for _ in range(PARALLEL_ITERATIONS):
        shifted = torch.cat((zero.unsqueeze(0), delta[:-1]))
        coupling = cell.jacobian_product(factors, shifted) - apply_transitions(unit, shifted, structure)
        updated = linear_recurrence(unit, residual + coupling, zero)
        change = (updated - delta).abs().amax(dim=(0, 2))
        delta = updated
        if bool((change <= PARALLEL_RTOL * delta.abs().amax(dim=(0, 2))).all()):
            return delta
    return None


def forward_error_estimate(system: SequenceSystem, states: Tensor) -> Tensor:
    """``(B,)``: the estimated forward error ``max_{t, j} |s*_{t,j} − states_{t,j}|`` per sample,
    from :func:`linearized_correction`.  An estimate (first order), named so wherever it is shown."""
    return linearized_correction(system, states).abs().amax(dim=(0, 2))


def scaled_size(correction: Tensor, states: Tensor, rtol: float, atol: float) -> Tensor:
    """``(B,)``: ``max |δ| / (atol + rtol·|states|)``, the correction measured in tolerances
    (``< 1``: the estimated error meets the termination test's tolerance)."""
    tolerance = (atol + rtol * states.detach().to(correction.dtype).abs()).clamp_(min=torch.finfo(correction.dtype).tiny)
    return (correction.abs() / tolerance).amax(dim=(0, 2))
