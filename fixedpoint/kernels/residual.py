"""The driver's measurement of an iterate in one pass: the fused form of
:func:`fixedpoint.residual.measure_torch` (its reference, same signature and result).

One program per (block of positions, sample) reads its ``(rows, S)`` tile of ``G`` and ``X`` once
and writes the tile's largest scaled and absolute residual and its rows' finiteness; a maximum
over the few row blocks finishes the ``(B,)`` results.  No atomics: the result is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

#: Positions per program.
ROWS = 16


@triton.jit
def _measure_kernel(image_ptr, iterate_ptr, scaled_ptr, largest_ptr, finite_ptr, steps, batch, size, rtol, atol, tiny,
                    ROWS: tl.constexpr, COLUMNS: tl.constexpr):
    block = tl.program_id(0)
    sample = tl.program_id(1)
    rows = block.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    columns = tl.arange(0, COLUMNS)
    mask = (rows[:, None] < steps) & (columns[None, :] < size)
    offsets = (rows[:, None] * batch + sample) * size + columns[None, :]
    image = tl.load(image_ptr + offsets, mask=mask, other=0.0)
    iterate = tl.load(iterate_ptr + offsets, mask=mask, other=0.0)
    finite = (image == image) & (tl.abs(image) < float("inf"))
    counted = mask & finite  # a NaN or Inf makes its row not finite; its value is not measured
    difference = tl.where(counted, tl.abs(image - iterate), 0.0)
    tolerance = tl.where(counted, tl.maximum(atol + rtol * tl.abs(image), tiny), 1.0)
    scaled = difference / tolerance
    out = block.to(tl.int64) * batch + sample
    tl.store(scaled_ptr + out, tl.max(tl.max(scaled, axis=1), axis=0))
    tl.store(largest_ptr + out, tl.max(tl.max(difference, axis=1), axis=0))
    row_finite = tl.min(tl.where(mask, finite.to(tl.int32), 1), axis=1)
    tl.store(finite_ptr + rows * batch + sample, row_finite.to(tl.int8), mask=rows < steps)


def measure(image: Tensor, iterate: Tensor, rtol: float, atol: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(finite (n,), scaled (B,), largest (B,))`` as :func:`fixedpoint.residual.measure_torch`."""
    image, iterate = image.contiguous(), iterate.contiguous()
    steps, batch, size = image.shape
    blocks = max(1, triton.cdiv(steps, ROWS))
    scaled = image.new_zeros(blocks, batch)
    largest = image.new_zeros(blocks, batch)
    finite = torch.ones(steps, batch, dtype=torch.int8, device=image.device)
    if steps and batch and size:
        _measure_kernel[(blocks, batch)](
            image, iterate, scaled, largest, finite, steps, batch, size, float(rtol), float(atol),
            float(torch.finfo(image.dtype).tiny), ROWS=ROWS, COLUMNS=triton.next_power_of_2(size),
        )
    return finite.bool().all(1), scaled.amax(0), largest.amax(0)
