"""Fused per-position kernels for the quasi-Newton step of Elman, GRU and LSTM cells.

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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

#: Elements (row, unit) per program.
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
def _elman_kernel(pre_ptr, state_ptr, diag_ptr, image_ptr, a_ptr, b_ptr, total, hidden,
                  RELU: tl.constexpr, TERMS: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < total
    unit = offsets % hidden
    pre = tl.load(pre_ptr + offsets, mask=mask, other=0.0)
    state = tl.load(state_ptr + offsets, mask=mask, other=0.0)
    diagonal = tl.load(diag_ptr + unit, mask=mask, other=0.0)
    if RELU:
        image = tl.maximum(pre, 0.0)
        slope = tl.where(pre > 0, 1.0, 0.0).to(pre.dtype)
    else:
        image = _tanh(pre)
        slope = 1.0 - image * image
    tl.store(image_ptr + offsets, image, mask=mask)
    if TERMS:
        a = slope * diagonal
        tl.store(a_ptr + offsets, a, mask=mask)
        tl.store(b_ptr + offsets, image - a * state, mask=mask)


@triton.jit
def _gru_kernel(projected_ptr, recurrent_ptr, bias_n_ptr, state_ptr, diag_ptr, image_ptr, a_ptr, b_ptr,
                total, hidden, TERMS: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < total
    row = offsets // hidden
    unit = offsets % hidden
    gates = row * (3 * hidden) + unit  # gate r of (row, unit); z and n follow H and 2H later
    r = _sigmoid(tl.load(projected_ptr + gates, mask=mask, other=0.0) + tl.load(recurrent_ptr + gates, mask=mask, other=0.0))
    z = _sigmoid(tl.load(projected_ptr + gates + hidden, mask=mask, other=0.0)
                 + tl.load(recurrent_ptr + gates + hidden, mask=mask, other=0.0))
    q = tl.load(recurrent_ptr + gates + 2 * hidden, mask=mask, other=0.0) + tl.load(bias_n_ptr + unit, mask=mask, other=0.0)
    n = _tanh(tl.load(projected_ptr + gates + 2 * hidden, mask=mask, other=0.0) + r * q)
    state = tl.load(state_ptr + offsets, mask=mask, other=0.0)
    image = n + z * (state - n)
    tl.store(image_ptr + offsets, image, mask=mask)
    if TERMS:
        # ∂h'/∂h_j: z + (1−z)(1−n²) q r(1−r) W_r,jj + (h−n) z(1−z) W_z,jj + (1−z)(1−n²) r W_n,jj
        through_n = (1.0 - z) * (1.0 - n * n)
        w_r = tl.load(diag_ptr + unit, mask=mask, other=0.0)
        w_z = tl.load(diag_ptr + hidden + unit, mask=mask, other=0.0)
        w_n = tl.load(diag_ptr + 2 * hidden + unit, mask=mask, other=0.0)
        a = z + through_n * q * r * (1.0 - r) * w_r + (state - n) * z * (1.0 - z) * w_z + through_n * r * w_n
        tl.store(a_ptr + offsets, a, mask=mask)
        tl.store(b_ptr + offsets, image - a * state, mask=mask)


@triton.jit
def _lstm_kernel(pre_ptr, state_ptr, diag_ptr, image_ptr, a_ptr, b_ptr, total, hidden,
                 TERMS: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < total
    row = offsets // hidden
    unit = offsets % hidden
    gates = row * (4 * hidden) + unit  # (i, f, g, o), H apart
    i = _sigmoid(tl.load(pre_ptr + gates, mask=mask, other=0.0))
    f = _sigmoid(tl.load(pre_ptr + gates + hidden, mask=mask, other=0.0))
    g = _tanh(tl.load(pre_ptr + gates + 2 * hidden, mask=mask, other=0.0))
    o = _sigmoid(tl.load(pre_ptr + gates + 3 * hidden, mask=mask, other=0.0))
    h_at = row * (2 * hidden) + unit  # h_j in the state [h, c]; c_j is H later
    h = tl.load(state_ptr + h_at, mask=mask, other=0.0)
    c = tl.load(state_ptr + h_at + hidden, mask=mask, other=0.0)
    c_next = f * c + i * g
    tanh_c = _tanh(c_next)
    h_next = o * tanh_c
    tl.store(image_ptr + h_at, h_next, mask=mask)
    tl.store(image_ptr + h_at + hidden, c_next, mask=mask)
    if TERMS:
        through_c = o * (1.0 - tanh_c * tanh_c)
        w_i = tl.load(diag_ptr + unit, mask=mask, other=0.0)
        w_f = tl.load(diag_ptr + hidden + unit, mask=mask, other=0.0)
        w_g = tl.load(diag_ptr + 2 * hidden + unit, mask=mask, other=0.0)
        w_o = tl.load(diag_ptr + 3 * hidden + unit, mask=mask, other=0.0)
        dc_dh = c * f * (1.0 - f) * w_f + g * i * (1.0 - i) * w_i + i * (1.0 - g * g) * w_g
        dh_dh = tanh_c * o * (1.0 - o) * w_o + through_c * dc_dh
        dh_dc = through_c * f
        block = a_ptr + offsets * 4  # (row, unit, 2, 2): [[hh, hc], [ch, cc]]
        tl.store(block, dh_dh, mask=mask)
        tl.store(block + 1, dh_dc, mask=mask)
        tl.store(block + 2, dc_dh, mask=mask)
        tl.store(block + 3, f, mask=mask)
        tl.store(b_ptr + h_at, h_next - dh_dh * h - dh_dc * c, mask=mask)
        tl.store(b_ptr + h_at + hidden, c_next - dc_dh * h - f * c, mask=mask)


def quasi_newton_terms(cell, state: Tensor, projected_input: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # noqa: ANN001
    """``(F, A, b)`` of :meth:`fixedpoint.cells.Cell.quasi_newton_terms_torch` by one product
    and one fused kernel: ``state (..., S)``, ``projected_input (..., G·H)``."""
    return _launch(cell, state, projected_input, terms=True)


def step(cell, state: Tensor, projected_input: Tensor) -> Tensor:  # noqa: ANN001
    """``F = f(s, x)`` of :meth:`fixedpoint.cells.Cell.step` (a Picard sweep) by one product and
    one fused kernel."""
    return _launch(cell, state, projected_input, terms=False)[0]


def _launch(cell, state: Tensor, projected_input: Tensor, *, terms: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:  # noqa: ANN001
    if state.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the fused cell kernels compute in float32 or float64, got {state.dtype}")
    hidden = cell.hidden_size
    state = state.contiguous()
    rows = state[..., :1].numel()
    total = rows * hidden
    image = torch.empty_like(state)
    values = torch.empty_like(state) if terms else image  # unused pointers when not terms
    diagonal = cell.weight_hh.view(cell.gate_count, hidden, hidden).diagonal(dim1=1, dim2=2).contiguous()
    if cell.kind == "lstm":
        transitions = state.new_empty(*state.shape[:-1], hidden, 2, 2) if terms else image
    else:
        transitions = torch.empty_like(state) if terms else image
    if total:
        grid = (triton.cdiv(total, BLOCK),)
        if cell.kind == "gru":
            recurrent = (state.reshape(rows, hidden) @ cell.weight_hh.T).contiguous()
            bias_n = cell.bias_hh[2 * hidden :] if cell.bias_hh is not None else state.new_zeros(hidden)
            _gru_kernel[grid](projected_input.contiguous(), recurrent, bias_n.contiguous(), state, diagonal,
                              image, transitions, values, total, hidden, TERMS=terms, BLOCK=BLOCK)
        else:
            pre = cell.preactivation(state[..., :hidden], projected_input).contiguous()
            if cell.kind == "lstm":
                _lstm_kernel[grid](pre, state, diagonal, image, transitions, values, total, hidden,
                                   TERMS=terms, BLOCK=BLOCK)
            else:
                _elman_kernel[grid](pre, state, diagonal, image, transitions, values, total, hidden,
                                    RELU=cell.nonlinearity == "relu", TERMS=terms, BLOCK=BLOCK)
    return (image, transitions, values) if terms else (image, None, None)
