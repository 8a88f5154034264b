"""A chunked linear-recurrence scan in Triton: ``y_t = A_t y_{t−1} + b_t`` for diagonal and 2×2-block ``A``.

The same signature and result as :func:`fixedpoint.scan.linear_recurrence` (its reference), for
the ``"diagonal"`` and ``"block2"`` structures.  Parallel over channels and over time: time is cut
into chunks of ``CHUNK`` positions, and

1. one program per (chunk, block of channels) composes its chunk into one affine map
   ``y ↦ P y + v`` (reading ``A`` and ``b`` once);
2. the chunks' maps form a recurrence ``CHUNK`` times shorter, scanned by this same function
   (recursively, until one chunk remains);
3. each program runs its chunk again from the exact state entering it and writes ``y``.

Memory traffic: ``A`` and ``b`` read twice, ``y`` written once (5 of the ``(T, B, S)`` tensors for
a diagonal ``A``), no temporaries beyond the chunks' maps.  Loops have compile-time bounds (the
chunk length), so one compiled kernel serves every ``T``.  ``reverse=True`` maps positions
``t → T−1−t`` in the index arithmetic: nothing is flipped or copied.  Offsets are 64-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fixedpoint.scan import _check

#: Positions per chunk: long enough that the chunk maps are a small fraction of the traffic,
#: short enough that T = 32768 gives hundreds of programs per block of channels.
CHUNK = 64
#: Channels per program (a power of two).
BLOCK = 128


@triton.jit
def _position(chunk, i, steps, CHUNK: tl.constexpr, REVERSE: tl.constexpr):
    t = chunk.to(tl.int64) * CHUNK + i
    if REVERSE:
        t = steps - 1 - t
    return t


@triton.jit
def _diagonal_kernel(
    a_ptr, b_ptr, out_ptr, maps_a_ptr, maps_b_ptr, carry_ptr, steps, channels,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, REVERSE: tl.constexpr, SUMMARISE: tl.constexpr,
):
    chunk = tl.program_id(0)
    lanes = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = lanes < channels
    if SUMMARISE:
        # The chunk's map y ↦ P y + v, composed in order; past the end A = 1, b = 0.
        product = tl.full((BLOCK,), 1.0, dtype=a_ptr.dtype.element_ty)
        offset = tl.zeros((BLOCK,), dtype=a_ptr.dtype.element_ty)
        for i in range(CHUNK):
            t = _position(chunk, i, steps, CHUNK, REVERSE)
            mask = in_range & (chunk.to(tl.int64) * CHUNK + i < steps)
            a = tl.load(a_ptr + t * channels + lanes, mask=mask, other=1.0)
            b = tl.load(b_ptr + t * channels + lanes, mask=mask, other=0.0)
            product = a * product
            offset = a * offset + b
        tl.store(maps_a_ptr + chunk.to(tl.int64) * channels + lanes, product, mask=in_range)
        tl.store(maps_b_ptr + chunk.to(tl.int64) * channels + lanes, offset, mask=in_range)
    else:
        # carry_ptr holds the state entering each chunk: (chunks, channels).
        state = tl.load(carry_ptr + chunk.to(tl.int64) * channels + lanes, mask=in_range, other=0.0)
        for i in range(CHUNK):
            t = _position(chunk, i, steps, CHUNK, REVERSE)
            mask = in_range & (chunk.to(tl.int64) * CHUNK + i < steps)
            a = tl.load(a_ptr + t * channels + lanes, mask=mask, other=1.0)
            b = tl.load(b_ptr + t * channels + lanes, mask=mask, other=0.0)
            state = a * state + b
            tl.store(out_ptr + t * channels + lanes, state, mask=mask)


@triton.jit
def _load_block2(a_ptr, b_ptr, t, lanes, pairs, size, first, second, mask):
    """``A_t``'s 2×2 blocks and ``b_t``'s pairs for the lanes; past the end ``A = I``, ``b = 0``."""
    block = a_ptr + (t * pairs + lanes) * 4
    a00 = tl.load(block, mask=mask, other=1.0)
    a01 = tl.load(block + 1, mask=mask, other=0.0)
    a10 = tl.load(block + 2, mask=mask, other=0.0)
    a11 = tl.load(block + 3, mask=mask, other=1.0)
    b0 = tl.load(b_ptr + t * size + first, mask=mask, other=0.0)
    b1 = tl.load(b_ptr + t * size + second, mask=mask, other=0.0)
    return a00, a01, a10, a11, b0, b1


@triton.jit
def _block2_kernel(
    a_ptr, b_ptr, out_ptr, maps_a_ptr, maps_b_ptr, carry_ptr, steps, pairs, half,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, REVERSE: tl.constexpr, SUMMARISE: tl.constexpr,
):
    # Pair p = (sample, unit j) couples y[sample, j] and y[sample, j + half]; A[t, p] is 2×2.
    chunk = tl.program_id(0)
    lanes = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = lanes < pairs
    first = (lanes // half) * (2 * half) + lanes % half  # offset of y[sample, j] in (B, S)
    second = first + half
    size = 2 * pairs  # B·S
    if SUMMARISE:
        p00 = tl.full((BLOCK,), 1.0, dtype=a_ptr.dtype.element_ty)
        p01 = tl.zeros((BLOCK,), dtype=a_ptr.dtype.element_ty)
        p10 = tl.zeros((BLOCK,), dtype=a_ptr.dtype.element_ty)
        p11 = tl.full((BLOCK,), 1.0, dtype=a_ptr.dtype.element_ty)
        v0 = tl.zeros((BLOCK,), dtype=a_ptr.dtype.element_ty)
        v1 = tl.zeros((BLOCK,), dtype=a_ptr.dtype.element_ty)
        for i in range(CHUNK):
            t = _position(chunk, i, steps, CHUNK, REVERSE)
            mask = in_range & (chunk.to(tl.int64) * CHUNK + i < steps)
            a00, a01, a10, a11, b0, b1 = _load_block2(a_ptr, b_ptr, t, lanes, pairs, size, first, second, mask)
            p00, p01, p10, p11 = a00 * p00 + a01 * p10, a00 * p01 + a01 * p11, a10 * p00 + a11 * p10, a10 * p01 + a11 * p11
            v0, v1 = a00 * v0 + a01 * v1 + b0, a10 * v0 + a11 * v1 + b1
        maps = maps_a_ptr + (chunk.to(tl.int64) * pairs + lanes) * 4
        tl.store(maps, p00, mask=in_range)
        tl.store(maps + 1, p01, mask=in_range)
        tl.store(maps + 2, p10, mask=in_range)
        tl.store(maps + 3, p11, mask=in_range)
        tl.store(maps_b_ptr + chunk.to(tl.int64) * size + first, v0, mask=in_range)
        tl.store(maps_b_ptr + chunk.to(tl.int64) * size + second, v1, mask=in_range)
    else:
        y0 = tl.load(carry_ptr + chunk.to(tl.int64) * size + first, mask=in_range, other=0.0)
        y1 = tl.load(carry_ptr + chunk.to(tl.int64) * size + second, mask=in_range, other=0.0)
        for i in range(CHUNK):
            t = _position(chunk, i, steps, CHUNK, REVERSE)
            mask = in_range & (chunk.to(tl.int64) * CHUNK + i < steps)
            a00, a01, a10, a11, b0, b1 = _load_block2(a_ptr, b_ptr, t, lanes, pairs, size, first, second, mask)
            y0, y1 = a00 * y0 + a01 * y1 + b0, a10 * y0 + a11 * y1 + b1
            tl.store(out_ptr + t * size + first, y0, mask=mask)
            tl.store(out_ptr + t * size + second, y1, mask=mask)


def linear_recurrence(
    transitions: Tensor, values: Tensor, initial: Tensor, *, reverse: bool = False, chunk: int | None = None,
    block_steps: int = CHUNK,
) -> Tensor:
    """``y_t = A_t y_{t−1} + b_t`` (``y_0 = initial``) by the chunked Triton scan; ``(T, B, S)``.

    Arguments as :func:`fixedpoint.scan.linear_recurrence` (``chunk``, a memory bound there, is
    not needed here: the scan keeps only one map per ``block_steps`` positions).  ``A`` is
    diagonal ``(T, B, S)`` or 2×2 blocks ``(T, B, S/2, 2, 2)``; float32 or float64, kept.
    """
    structure = _check(transitions, values, initial)
    del chunk
    if structure == "dense":
        raise ValueError("the Triton scan takes diagonal and 2×2-block transitions; dense ones use fixedpoint.scan")
    if values.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the Triton scan computes in float32 or float64, got {values.dtype}")
    transitions, values, initial = transitions.contiguous(), values.contiguous(), initial.contiguous()
    steps, batch, size = values.shape
    out = torch.empty_like(values)
    if steps == 0 or batch * size == 0:
        return out
    chunks = triton.cdiv(steps, block_steps)
    lanes = batch * size if structure == "diagonal" else batch * size // 2
    grid = (chunks, triton.cdiv(lanes, BLOCK))
    kernel = _diagonal_kernel if structure == "diagonal" else _block2_kernel
    shape_args = (steps, lanes) if structure == "diagonal" else (steps, lanes, size // 2)
    if chunks == 1:
        carry = initial.unsqueeze(0)
    else:
        maps_a = torch.empty((chunks, *transitions.shape[1:]), dtype=values.dtype, device=values.device)
        maps_b = torch.empty((chunks, batch, size), dtype=values.dtype, device=values.device)
        kernel[grid](transitions, values, out, maps_a, maps_b, maps_b, *shape_args,
                     CHUNK=block_steps, BLOCK=BLOCK, REVERSE=reverse, SUMMARISE=True)
        # The state entering chunk c is the state after chunks 0 … c−1 (in processing order).
        after = linear_recurrence(maps_a[:-1], maps_b[:-1], initial, block_steps=block_steps)
        carry = torch.cat((initial.unsqueeze(0), after))
    kernel[grid](transitions, values, out, out, out, carry, *shape_args,
                 CHUNK=block_steps, BLOCK=BLOCK, REVERSE=reverse, SUMMARISE=False)
    return out
