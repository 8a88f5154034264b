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
about the cost of the sequential Python loop.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fixedpoint.conditioning import Trajectory
from fixedpoint.system import SequenceSystem

#: The dtype in which the residual and the correction are evaluated.
ESTIMATE_DTYPE = torch.float64

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
) -> tuple[Tensor, Tensor]:
    """``δ (T, B, S)`` as :func:`linearized_correction`, and the residual's size per sample
    ``(B,)``: ``max |r|`` or, with ``tolerances = (rtol, atol)``, the scaled
    ``max |r| / (atol + rtol·|F(states)|)`` of the driver's termination test.

    The first ``exact_prefix`` positions are taken as exact (the recurrence's own values, as a
    solve's exact prefix is): their residual, rounding only, is not propagated, so ``δ`` is 0
    there and a refinement leaves them as the sequential loop computes them."""
    with torch.no_grad():
        correction = states.new_empty(states.shape, dtype=ESTIMATE_DTYPE)
        residual_size = correction.new_zeros(states.shape[1])
        delta = correction.new_zeros(states.shape[1:])
        for start, piece in Trajectory.chunks(system, states, chunk):
            image = piece.image()
            residual = image - piece.states
            size_here = residual.abs()
            if tolerances is not None:
                rtol, atol = tolerances
                size_here = size_here / (atol + rtol * image.abs()).clamp_(min=torch.finfo(ESTIMATE_DTYPE).tiny)
            residual_size = torch.maximum(residual_size, size_here.amax(dim=(0, 2)))
            residual[: max(0, exact_prefix - start)] = 0
            factors = piece.factors()
            for t in range(piece.states.shape[0]):
                delta = piece.cell.jacobian_product(tuple(f[t] for f in factors), delta) + residual[t]
                correction[start + t] = delta
    return correction, residual_size


def forward_error_estimate(system: SequenceSystem, states: Tensor) -> Tensor:
    """``(B,)``: the estimated forward error ``max_{t, j} |s*_{t,j} − states_{t,j}|`` per sample,
    from :func:`linearized_correction`.  An estimate (first order), named so wherever it is shown."""
    return linearized_correction(system, states).abs().amax(dim=(0, 2))


def scaled_size(correction: Tensor, states: Tensor, rtol: float, atol: float) -> Tensor:
    """``(B,)``: ``max |δ| / (atol + rtol·|states|)``, the correction measured in tolerances
    (``< 1``: the estimated error meets the termination test's tolerance)."""
    tolerance = (atol + rtol * states.detach().to(correction.dtype).abs()).clamp_(min=torch.finfo(correction.dtype).tiny)
    return (correction.abs() / tolerance).amax(dim=(0, 2))
