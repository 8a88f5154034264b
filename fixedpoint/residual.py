"""The driver's measurement of an iterate: what the termination test and the statistics read.

For ``G = F(X)`` and ``X`` on a window ``(n, B, S)``: which positions of ``G`` are finite, and per
sample the scaled residual ``ρ_b = max_{t,j} |G − X| / (atol + rtol·|G|)`` and the largest
``|G − X|``.  :func:`measure` is the torch reference; on CUDA one Triton kernel
(:mod:`fixedpoint.kernels.residual`) reads ``G`` and ``X`` once and writes only ``(n,)`` and
``(B,)`` numbers, where the reference issues about ten element-wise operations over ``(n, B, S)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fixedpoint.kernels import use_kernels


def measure(image: Tensor, iterate: Tensor, rtol: float, atol: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(finite (n,) bool, scaled (B,), largest (B,))`` of ``image`` against ``iterate``, both
    ``(n, B, S)``.  A tolerance of 0 (``atol = 0``, ``G = 0``) is floored at the dtype's smallest
    normal number, so ``0/0`` reads 0 and ``x/0`` reads huge.  Non-finite entries make their
    position not finite; their scaled and absolute values are then meaningless."""
    if use_kernels(image, iterate):
        from fixedpoint.kernels.residual import measure as fused  # imports Triton

        return fused(image, iterate, rtol, atol)
    return measure_torch(image, iterate, rtol, atol)


def measure_torch(image: Tensor, iterate: Tensor, rtol: float, atol: float) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`measure` in torch operations (the reference, and the CPU path)."""
    finite = torch.isfinite(image).flatten(1).all(1)
    # In place, two temporaries: large CPU allocations cost page faults on every iteration.
    difference = torch.sub(image, iterate).abs_()
    tolerance = image.abs().mul_(rtol).add_(atol)
    scaled = torch.div(difference, tolerance.clamp_(min=torch.finfo(image.dtype).tiny), out=tolerance)
    return finite, scaled.amax(dim=(0, 2)), difference.amax(dim=(0, 2))
