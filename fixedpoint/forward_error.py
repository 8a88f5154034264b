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

from fixedpoint.errors import InputError
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
    system: SequenceSystem, states: Tensor, *, chunk: int = CHUNK, tolerances: tuple[float, float] | None = None
) -> tuple[Tensor, Tensor]:
    """``δ (T, B, S)`` as :func:`linearized_correction`, and the residual's size per sample
    ``(B,)``: ``max |r|`` or, with ``tolerances = (rtol, atol)``, the scaled
    ``max |r| / (atol + rtol·|F(states)|)`` of the driver's termination test."""
    if tuple(states.shape) != system.state_shape:
        raise InputError(f"states must have shape {system.state_shape}, got {tuple(states.shape)}")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise InputError(f"chunk must be a positive integer, got {chunk!r}")
    with torch.no_grad():
        cell = system.cell.to(dtype=ESTIMATE_DTYPE)
        wide = states.detach().to(ESTIMATE_DTYPE)
        inputs = system.inputs.detach().to(ESTIMATE_DTYPE)
        steps, batch, size = wide.shape
        correction = torch.empty_like(wide)
        residual_size = wide.new_zeros(batch)
        delta = wide.new_zeros(batch, size)
        previous_last = system.initial_state.detach().to(ESTIMATE_DTYPE)
        for start in range(0, steps, chunk):
            block = wide[start : start + chunk]
            previous = torch.cat((previous_last.unsqueeze(0), block[:-1]))
            projected = cell.input_projection(inputs[start : start + chunk])
            image = cell.step(previous, projected)
            residual = image - block
            size_here = residual.abs()
            if tolerances is not None:
                rtol, atol = tolerances
                size_here = size_here / (atol + rtol * image.abs()).clamp_(min=torch.finfo(ESTIMATE_DTYPE).tiny)
            residual_size = torch.maximum(residual_size, size_here.amax(dim=(0, 2)))
            factors = cell.linearization(previous, projected)
            for t in range(block.shape[0]):
                delta = cell.jacobian_product(tuple(f[t] for f in factors), delta) + residual[t]
                correction[start + t] = delta
            previous_last = block[-1]
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
