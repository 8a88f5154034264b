"""The driver's measurement of an iterate: what the termination test and the statistics read.

For ``G = F(X)`` and ``X`` on a window ``(n, B, S)``: which positions of ``G`` are finite, and per
sample the scaled residual ``ρ_b = max_{t,j} |G − X| / (atol + rtol·|G|)`` and the largest
``|G − X|``.  The window's first ``exact`` rows are known exact: ``G`` is replaced by ``X`` there
(equal but for rounding), so they measure 0.  :func:`measure_window` is the torch path and the
reference; on CUDA the cell kernels measure in the pass that evaluates ``F``
(:mod:`fixedpoint.kernels.cells`), reading ``X`` once more and writing one number per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor



@dataclass(frozen=True)
class StopTest:
    """The termination test ``|G − X| < atol + rtol·|G|`` on a window whose first ``exact`` rows
    are known exact."""

    rtol: float
    atol: float
    exact: int = 0


class Measurement(NamedTuple):
    """``finite (n,)`` bool per position, ``scaled (B,)`` and ``largest (B,)`` residuals per sample."""

    finite: Tensor
    scaled: Tensor
    largest: Tensor


def measure_window(image: Tensor, iterate: Tensor, test: StopTest) -> Measurement:
    """Write ``X`` into ``image``'s first ``test.exact`` rows, then :func:`measure` it."""
    image[: test.exact] = iterate[: test.exact]
    return measure(image, iterate, test.rtol, test.atol)


def measure(image: Tensor, iterate: Tensor, rtol: float, atol: float) -> Measurement:
    """``(finite (n,) bool, scaled (B,), largest (B,))`` of ``image`` against ``iterate``, both
    ``(n, B, S)``.  A tolerance of 0 (``atol = 0``, ``G = 0``) is floored at the dtype's smallest
    normal number, so ``0/0`` reads 0 and ``x/0`` reads huge.  Non-finite entries make their
    position not finite; their scaled and absolute values are then meaningless."""
    # In place, two temporaries: large CPU allocations cost page faults on every iteration.
    difference = torch.sub(image, iterate).abs_()
    tolerance = image.abs()
    finite = tolerance.amax(dim=(1, 2)) < float("inf")  # a row's maximum is NaN or inf iff one entry is
    tolerance.mul_(rtol).add_(atol)
    scaled = torch.div(difference, tolerance.clamp_(min=torch.finfo(image.dtype).tiny), out=tolerance)
    return Measurement(finite, scaled.amax(dim=(0, 2)), difference.amax(dim=(0, 2)))
