"""Fused per-position kernels for the Picard sweep and the quasi-Newton step of Elman, GRU and
LSTM cells, with the driver's measurement in the same pass.

:func:`quasi_newton_terms` has the signature and result of
:meth:`fixedpoint.cells.Cell.quasi_newton_terms_torch` (its reference): from the states read
``s_{t−1} (n, B, S)`` and the projected inputs ``(n, B, G·H)`` it returns ``F = f(s, x)``, the
per-unit Jacobian ``A`` (diagonal ``(n, B, H)``; the LSTM's 2×2 ``(h, c)`` blocks
``(n, B, H, 2, 2)``) and the right-hand side ``b = F − A s``.  The product with ``W_hh`` stays in
cuBLAS (one per call); everything after it — gates, activations, image, Jacobian and ``b`` — is
one kernel that reads the product and the state once and writes ``F``, ``A`` and ``b`` once,
where the torch reference issues about thirty element-wise operations.  The input dtype is kept.
``tanh`` is computed from ``exp`` (``(1 − e^{−2|x|}) / (1 + e^{−2|x|})`` with the sign of ``x``):
within a few units of rounding of torch's, absolutely.

The ``measured_`` forms also read the iterate window ``X`` and measure ``F`` against it as
:func:`fixedpoint.residual.measure_window` does (its reference): the first ``exact`` rows of the
image are ``X``'s, and each program writes, per row ``(t, b)`` of its tile, the largest scaled and
absolute residual and whether the row is finite; a maximum over ``t`` finishes the ``(B,)``
results.  One pass where a separate measurement would read ``F`` and ``X`` again.

A program's tile is ``ROWS`` rows ``(t, b)`` by all ``H`` units (padded to a power of two).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fixedpoint.residual import Measurement, StopTest

#: Elements (row, unit) per program, at least one whole row.
BLOCK = 256


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    t = tl.exp(-2.0 * tl.abs(x))
    magnitude = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -magnitude, magnitude)


@triton.jit
def _tile(total_rows, hidden, ROWS: tl.constexpr, UNITS: tl.constexpr):
    """This program's rows ``(ROWS,)``, units ``(1, UNITS)`` and mask ``(ROWS, UNITS)``."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    units = tl.arange(0, UNITS)[None, :]
    mask = (rows[:, None] < total_rows) & (units < hidden)
    return rows, units, mask


@triton.jit
def _measure_part(image, iterate, mask, rtol, atol, tiny):
    """Per row: the largest scaled and absolute residual of one ``(ROWS, UNITS)`` part, and
    whether the part is finite (non-finite entries are not measured)."""
    finite = (image == image) & (tl.abs(image) < float("inf"))
    counted = mask & finite
    difference = tl.where(counted, tl.abs(image - iterate), 0.0)
    tolerance = tl.where(counted, tl.maximum(atol + rtol * tl.abs(image), tiny), 1.0)
    row_finite = tl.min(tl.where(mask, finite.to(tl.int32), 1), axis=1)
    return tl.max(difference / tolerance, axis=1), tl.max(difference, axis=1), row_finite


@triton.jit
def _store_measurement(rows, total_rows, scaled, largest, finite, scaled_ptr, largest_ptr, finite_ptr):
    within = rows < total_rows
    tl.store(scaled_ptr + rows, scaled, mask=within)
    tl.store(largest_ptr + rows, largest, mask=within)
    tl.store(finite_ptr + rows, finite.to(tl.int8), mask=within)


@triton.jit
def _elman_kernel(pre_ptr, state_ptr, diag_ptr, image_ptr, a_ptr, b_ptr,
                  iterate_ptr, scaled_ptr, largest_ptr, finite_ptr, exact_rows, rtol, atol, tiny,
                  total_rows, hidden, RELU: tl.constexpr, TERMS: tl.constexpr, MEASURE: tl.constexpr,
                  ROWS: tl.constexpr, UNITS: tl.constexpr):
    rows, units, mask = _tile(total_rows, hidden, ROWS, UNITS)
    offsets = rows[:, None] * hidden + units
    pre = tl.load(pre_ptr + offsets, mask=mask, other=0.0)
    if RELU:
        image = tl.maximum(pre, 0.0)
        slope = tl.where(pre > 0, 1.0, 0.0).to(pre.dtype)
    else:
        image = _tanh(pre)
        slope = 1.0 - image * image
    if TERMS:
        state = tl.load(state_ptr + offsets, mask=mask, other=0.0)
        a = slope * tl.load(diag_ptr + units, mask=units < hidden, other=0.0)
        tl.store(a_ptr + offsets, a, mask=mask)
        tl.store(b_ptr + offsets, image - a * state, mask=mask)
    if MEASURE:
        iterate = tl.load(iterate_ptr + offsets, mask=mask, other=0.0)
        image = tl.where(rows[:, None] < exact_rows, iterate, image)  # known exact: keep X
        scaled, largest, finite = _measure_part(image, iterate, mask, rtol, atol, tiny)
        _store_measurement(rows, total_rows, scaled, largest, finite, scaled_ptr, largest_ptr, finite_ptr)
    tl.store(image_ptr + offsets, image, mask=mask)


@triton.jit
def _gru_kernel(projected_ptr, recurrent_ptr, bias_n_ptr, state_ptr, diag_ptr, image_ptr, a_ptr, b_ptr,
                iterate_ptr, scaled_ptr, largest_ptr, finite_ptr, exact_rows, rtol, atol, tiny,
                total_rows, hidden, TERMS: tl.constexpr, MEASURE: tl.constexpr,
                ROWS: tl.constexpr, UNITS: tl.constexpr):
    rows, units, mask = _tile(total_rows, hidden, ROWS, UNITS)
    offsets = rows[:, None] * hidden + units
    gates = rows[:, None] * (3 * hidden) + units  # gate r of (row, unit); z and n follow H and 2H later
    unit_mask = units < hidden
    r = _sigmoid(tl.load(projected_ptr + gates, mask=mask, other=0.0) + tl.load(recurrent_ptr + gates, mask=mask, other=0.0))
    z = _sigmoid(tl.load(projected_ptr + gates + hidden, mask=mask, other=0.0)
                 + tl.load(recurrent_ptr + gates + hidden, mask=mask, other=0.0))
    q = tl.load(recurrent_ptr + gates + 2 * hidden, mask=mask, other=0.0) + tl.load(bias_n_ptr + units, mask=unit_mask, other=0.0)
    n = _tanh(tl.load(projected_ptr + gates + 2 * hidden, mask=mask, other=0.0) + r * q)
    state = tl.load(state_ptr + offsets, mask=mask, other=0.0)
    image = n + z * (state - n)
    if TERMS:
        # ∂h'/∂h_j: z + (1−z)(1−n²) q r(1−r) W_r,jj + (h−n) z(1−z) W_z,jj + (1−z)(1−n²) r W_n,jj
        through_n = (1.0 - z) * (1.0 - n * n)
        w_r = tl.load(diag_ptr + units, mask=unit_mask, other=0.0)
        w_z = tl.load(diag_ptr + hidden + units, mask=unit_mask, other=0.0)
        w_n = tl.load(diag_ptr + 2 * hidden + units, mask=unit_mask, other=0.0)
        a = z + through_n * q * r * (1.0 - r) * w_r + (state - n) * z * (1.0 - z) * w_z + through_n * r * w_n
        tl.store(a_ptr + offsets, a, mask=mask)
        tl.store(b_ptr + offsets, image - a * state, mask=mask)
    if MEASURE:
        iterate = tl.load(iterate_ptr + offsets, mask=mask, other=0.0)
        image = tl.where(rows[:, None] < exact_rows, iterate, image)  # known exact: keep X
        scaled, largest, finite = _measure_part(image, iterate, mask, rtol, atol, tiny)
        _store_measurement(rows, total_rows, scaled, largest, finite, scaled_ptr, largest_ptr, finite_ptr)
    tl.store(image_ptr + offsets, image, mask=mask)


@triton.jit
def _lstm_kernel(pre_ptr, state_ptr, diag_ptr, image_ptr, a_ptr, b_ptr,
                 iterate_ptr, scaled_ptr, largest_ptr, finite_ptr, exact_rows, rtol, atol, tiny,
                 total_rows, hidden, TERMS: tl.constexpr, MEASURE: tl.constexpr,
                 ROWS: tl.constexpr, UNITS: tl.constexpr):
    rows, units, mask = _tile(total_rows, hidden, ROWS, UNITS)
    unit_mask = units < hidden
    gates = rows[:, None] * (4 * hidden) + units  # (i, f, g, o), H apart
    i = _sigmoid(tl.load(pre_ptr + gates, mask=mask, other=0.0))
    f = _sigmoid(tl.load(pre_ptr + gates + hidden, mask=mask, other=0.0))
    g = _tanh(tl.load(pre_ptr + gates + 2 * hidden, mask=mask, other=0.0))
    o = _sigmoid(tl.load(pre_ptr + gates + 3 * hidden, mask=mask, other=0.0))
    h_at = rows[:, None] * (2 * hidden) + units  # h_j in the state [h, c]; c_j is H later
    c = tl.load(state_ptr + h_at + hidden, mask=mask, other=0.0)
    c_next = f * c + i * g
    tanh_c = _tanh(c_next)
    h_next = o * tanh_c
    if TERMS:
        h = tl.load(state_ptr + h_at, mask=mask, other=0.0)
        through_c = o * (1.0 - tanh_c * tanh_c)
        w_i = tl.load(diag_ptr + units, mask=unit_mask, other=0.0)
        w_f = tl.load(diag_ptr + hidden + units, mask=unit_mask, other=0.0)
        w_g = tl.load(diag_ptr + 2 * hidden + units, mask=unit_mask, other=0.0)
        w_o = tl.load(diag_ptr + 3 * hidden + units, mask=unit_mask, other=0.0)
        dc_dh = c * f * (1.0 - f) * w_f + g * i * (1.0 - i) * w_i + i * (1.0 - g * g) * w_g
        dh_dh = tanh_c * o * (1.0 - o) * w_o + through_c * dc_dh
        dh_dc = through_c * f
        block = a_ptr + (rows[:, None] * hidden + units) * 4  # (row, unit, 2, 2): [[hh, hc], [ch, cc]]
        tl.store(block, dh_dh, mask=mask)
        tl.store(block + 1, dh_dc, mask=mask)
        tl.store(block + 2, dc_dh, mask=mask)
        tl.store(block + 3, f, mask=mask)
        tl.store(b_ptr + h_at, h_next - dh_dh * h - dh_dc * c, mask=mask)
        tl.store(b_ptr + h_at + hidden, c_next - dc_dh * h - f * c, mask=mask)
    if MEASURE:
        known = rows[:, None] < exact_rows  # known exact: keep X
        iterate_h = tl.load(iterate_ptr + h_at, mask=mask, other=0.0)
        iterate_c = tl.load(iterate_ptr + h_at + hidden, mask=mask, other=0.0)
        h_next = tl.where(known, iterate_h, h_next)
        c_next = tl.where(known, iterate_c, c_next)
        scaled_h, largest_h, finite_h = _measure_part(h_next, iterate_h, mask, rtol, atol, tiny)
        scaled_c, largest_c, finite_c = _measure_part(c_next, iterate_c, mask, rtol, atol, tiny)
        _store_measurement(rows, total_rows, tl.maximum(scaled_h, scaled_c), tl.maximum(largest_h, largest_c),
                           tl.minimum(finite_h, finite_c), scaled_ptr, largest_ptr, finite_ptr)
    tl.store(image_ptr + h_at, h_next, mask=mask)
    tl.store(image_ptr + h_at + hidden, c_next, mask=mask)


def quasi_newton_terms(cell, state: Tensor, projected_input: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # noqa: ANN001
    """``(F, A, b)`` of :meth:`fixedpoint.cells.Cell.quasi_newton_terms_torch` by one product
    and one fused kernel: ``state (..., S)``, ``projected_input (..., G·H)``."""
    image, transitions, values, _ = _launch(cell, state, projected_input, terms=True)
    return image, transitions, values


def measured_quasi_newton_terms(
    cell, state: Tensor, projected_input: Tensor, iterate: Tensor, test: StopTest  # noqa: ANN001
) -> tuple[Tensor, Tensor, Tensor, Measurement]:
    """:func:`quasi_newton_terms` and the measurement of ``F`` against ``iterate (n, B, S)``, as
    :meth:`fixedpoint.cells.Cell.measured_quasi_newton_terms` (its reference), in one kernel."""
    return _launch(cell, state, projected_input, terms=True, iterate=iterate, test=test)


def step(cell, state: Tensor, projected_input: Tensor) -> Tensor:  # noqa: ANN001
    """``F = f(s, x)`` of :meth:`fixedpoint.cells.Cell.step` (a Picard sweep) by one product and
    one fused kernel."""
    return _launch(cell, state, projected_input, terms=False)[0]


def measured_step(
    cell, state: Tensor, projected_input: Tensor, iterate: Tensor, test: StopTest  # noqa: ANN001
) -> tuple[Tensor, Measurement]:
    """:func:`step` and the measurement of ``F`` against ``iterate (n, B, S)``, as
    :meth:`fixedpoint.system.SequenceSystem.apply_measured` (its reference), in one kernel."""
    image, _, _, measurement = _launch(cell, state, projected_input, terms=False, iterate=iterate, test=test)
    return image, measurement


def _launch(
    cell, state: Tensor, projected_input: Tensor, *, terms: bool,  # noqa: ANN001
    iterate: Tensor | None = None, test: StopTest | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Measurement | None]:
    if state.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the fused cell kernels compute in float32 or float64, got {state.dtype}")
    hidden = cell.hidden_size
    state = state.contiguous()
    rows = state[..., :1].numel()  # rows (t, b)
    image = torch.empty_like(state)
    values = torch.empty_like(state) if terms else image  # unused pointers when not terms
    diagonal = cell.weight_hh.view(cell.gate_count, hidden, hidden).diagonal(dim1=1, dim2=2).contiguous()
    if cell.kind == "lstm":
        transitions = state.new_empty(*state.shape[:-1], hidden, 2, 2) if terms else image
    else:
        transitions = torch.empty_like(state) if terms else image
    measure = test is not None
    if measure:
        if state.dim() != 3 or iterate is None or iterate.shape != state.shape:
            raise ValueError("a measured evaluation takes states and an iterate window of one shape (n, B, S)")
        iterate = iterate.contiguous()
        scaled, largest = state.new_empty(rows), state.new_empty(rows)
        finite = torch.empty(rows, dtype=torch.int8, device=state.device)
        exact_rows = test.exact * state.shape[1]  # rows (t, b) of the exact positions t < exact
        tolerances = (float(test.rtol), float(test.atol), float(torch.finfo(state.dtype).tiny))
    else:
        iterate, scaled, largest, finite, exact_rows = image, image, image, image, 0
        tolerances = (0.0, 0.0, 0.0)
    units = triton.next_power_of_2(hidden)
    tile_rows = max(1, BLOCK // units)
    options = dict(TERMS=terms, MEASURE=measure, ROWS=tile_rows, UNITS=units)
    measured = (iterate, scaled, largest, finite, exact_rows, *tolerances, rows, hidden)
    if rows and hidden:
        grid = (triton.cdiv(rows, tile_rows),)
        if cell.kind == "gru":
            recurrent = (state.reshape(rows, hidden) @ cell.weight_hh.T).contiguous()
            bias_n = cell.bias_hh[2 * hidden :] if cell.bias_hh is not None else state.new_zeros(hidden)
            _gru_kernel[grid](projected_input.contiguous(), recurrent, bias_n.contiguous(), state, diagonal,
                              image, transitions, values, *measured, **options)
        else:
            pre = cell.preactivation(state[..., :hidden], projected_input).contiguous()
            if cell.kind == "lstm":
                _lstm_kernel[grid](pre, state, diagonal, image, transitions, values, *measured, **options)
            else:
                _elman_kernel[grid](pre, state, diagonal, image, transitions, values, *measured,
                                    RELU=cell.nonlinearity == "relu", **options)
    if not measure:
        return (image, transitions, values, None) if terms else (image, None, None, None)
    steps, batch = state.shape[:2]
    if not (rows and hidden):
        scaled.zero_(), largest.zero_(), finite.fill_(1)
    measurement = Measurement(
        finite.view(steps, batch).bool().all(1), scaled.view(steps, batch).amax(0), largest.view(steps, batch).amax(0)
    )
    return (image, transitions, values, measurement) if terms else (image, None, None, measurement)
