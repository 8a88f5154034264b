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

from typing import Literal, NamedTuple

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
    return correction_and_residual(system, states, chunk=chunk).delta


class Correction(NamedTuple):
    """What :func:`correction_and_residual` returns.

    Attributes:
        delta: ``(T, B, S)`` float64, the first-order correction, 0 on the exact prefix.
        residual_size: ``(B,)``, ``max |r|`` or the scaled residual of the termination test.
        estimate: ``(B,)``, the forward-error estimate ``max |δ|`` of the whole answer: with the
            exact prefix's residual propagated as well, since an exact prefix is the sequential
            loop's value, which carries the loop's own rounding (``delta``'s maximum without a prefix).
    """

    delta: Tensor
    residual_size: Tensor
    estimate: Tensor


def correction_and_residual(
    system: SequenceSystem,
    states: Tensor,
    *,
    chunk: int = CHUNK,
    tolerances: tuple[float, float] | None = None,
    exact_prefix: int = 0,
    method: Method = "auto",
) -> Correction:
    """``δ (T, B, S)`` as :func:`linearized_correction`, the residual's size per sample ``(B,)``
    (``max |r|`` or, with ``tolerances = (rtol, atol)``, the scaled ``max |r| / (atol + rtol·|F(states)|)``
    of the driver's termination test) and the forward-error estimate ``(B,)``.

    The first ``exact_prefix`` positions are taken as exact (the recurrence's own values, as a
    solve's exact prefix is): ``δ`` leaves their residual, rounding only, out, so it is 0 there
    and a refinement leaves them as the sequential loop computes them.  The estimate keeps it:
    the loop's own rounding is part of the answer's error.  Both come from one pass, the
    recurrence run on the samples twice over (with and without the prefix's residual).

    ``method``: ``"sequential"`` (the loop over positions), ``"parallel"`` (quasi-Newton
    iterations on the linear recurrence, :func:`parallel_correction`, falling back to the loop
    if they have not converged), or ``"auto"``: parallel on CUDA, where a loop over ``T`` is
    ``T`` kernel launches, sequential elsewhere, where it is the cheapest."""
    if method not in ("auto", "sequential", "parallel"):
        raise InputError(f"method must be 'auto', 'sequential' or 'parallel', got {method!r}")
    batch = states.shape[1]
    paired = exact_prefix > 0
    if method == "parallel" or (method == "auto" and states.device.type == "cuda"):
        with torch.no_grad():
            whole = Trajectory.of(system, states)
            residual, residual_size = _residual(whole, tolerances)
            if paired:
                residual = _with_and_without_prefix(residual, exact_prefix)
                whole = _twice(whole)
            both = parallel_correction(whole, residual)
        if both is not None:
            return _split(both, batch, residual_size)
    rows = 2 * batch if paired else batch
    with torch.no_grad():
        # Time-major (T, B or 2B, S): the first B samples δ, the others (paired) δ with the prefix.
        both = states.new_empty((states.shape[0], rows, states.shape[2]), dtype=ESTIMATE_DTYPE)
        residual_size = both.new_zeros(batch)
        delta = both.new_zeros(both.shape[1:])
        for start, piece in Trajectory.chunks(system, states, chunk):
            residual, size_here = _residual(piece, tolerances)
            residual_size = torch.maximum(residual_size, size_here)
            if paired:
                residual = _with_and_without_prefix(residual, exact_prefix - start)
                piece = _twice(piece)
            rows_here = slice(start, start + piece.states.shape[0])
            delta = piece.cell.tangent_recurrence(piece.factors(), residual, delta, both[rows_here])
    return _split(both, batch, residual_size)


def _split(both: Tensor, batch: int, residual_size: Tensor) -> Correction:
    """The :class:`Correction` of ``both (T, B or 2B, S)``: ``δ`` is the first ``B`` samples, the
    estimate the last ``B`` (the same ones when nothing was paired)."""
    return Correction(both[:, :batch], residual_size, both[:, both.shape[1] - batch :].abs().amax(dim=(0, 2)))


def _with_and_without_prefix(residual: Tensor, prefix: int) -> Tensor:
    """``(n, 2B, S)``: the residual with its first ``prefix`` rows zeroed (none when
    ``prefix ≤ 0``), then as it is."""
    masked = residual.clone()
    masked[: min(max(prefix, 0), residual.shape[0])] = 0
    return torch.cat((masked, residual), dim=1)


def _twice(piece: Trajectory) -> Trajectory:
    """The trajectory with its samples repeated, ``B → 2B``, so that one pass propagates two residuals."""
    return Trajectory(piece.cell, *(torch.cat((part, part), dim=1) for part in (piece.states, piece.previous, piece.projected)))


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
    structure = cell.unit_structure
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
