"""Contraction of ``F``: certified Lipschitz bounds, kept apart from estimates.

Certified numbers are evaluated in float64 whatever the model's dtype (the weights and inputs
are converted exactly), then rounded outward: multiplied by :func:`outward` ``1 + 16·n·u`` with
``n = T + G·H·S + 64`` (more than the operations on any path of the bound's arithmetic, the
SVD's ``O(S·u)`` error included) and moved to the next float up.  They hold for every state the
exact solution *and every Picard iterate from zero* can take.  Estimates carry no guarantee.  The
derivations are in ``docs/contraction.md``.

Norms: ``"2"`` or ``"inf"`` on each position's state; for LSTM the state norm is
``max(‖h‖, ‖c‖)``.  Over a sequence, the sup-over-time norm ``max_t ‖s_t‖``.

Boxes.  Elman-tanh and GRU outputs lie in ``[−ρ, ρ]`` with ``ρ = max(1, ‖h_0‖_∞)`` (a tanh, or a
convex combination of a tanh and the previous state).  LSTM's ``h = o·tanh(c)`` lies in
``(−1, 1)`` and its cell state in ``|c_t| ≤ C_t`` with ``C_t = f̄_t C_{t−1} + (ī ḡ)_t``,
``C_0 = |c_0|``.  Elman-relu outputs lie in ``[0, U_t]`` with ``U_t`` propagated by interval
arithmetic.  Each box is mapped into itself by ``F`` and contains zero, so it holds every
Picard iterate (damped or not) as well as the solution.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fixedpoint.cells import Cell, ElmanCell, GRUCell, LSTMCell
from fixedpoint.errors import InputError
from fixedpoint.system import SequenceSystem

Norm = Literal["2", "inf"]
NORMS = ("2", "inf")


def check_norm(norm: object) -> Norm:
    """``2``/``"2"`` or ``"inf"``/``math.inf``; anything else is an :class:`InputError`."""
    if norm in (2, "2"):
        return "2"
    if norm in ("inf", math.inf):
        return "inf"
    raise InputError(f"norm must be '2' or 'inf', got {norm!r}")


# -- interval helpers: an interval is a pair (lo, hi) of same-shaped tensors --------------------
def _sup_abs(lo: Tensor, hi: Tensor) -> Tensor:
    return torch.maximum(lo.abs(), hi.abs())


def _distance_from_zero(lo: Tensor, hi: Tensor) -> Tensor:
    return torch.where(lo > 0, lo, torch.where(hi < 0, -hi, torch.zeros_like(lo)))


def _sup_tanh_slope(lo: Tensor, hi: Tensor) -> Tensor:
    """``sup (1 − tanh²)`` over ``[lo, hi]``: at the point nearest zero."""
    return 1 - torch.tanh(_distance_from_zero(lo, hi)) ** 2


def _sup_sigmoid_slope(lo: Tensor, hi: Tensor) -> Tensor:
    """``sup σ(1 − σ)`` over ``[lo, hi]``: at the point nearest zero."""
    s = torch.sigmoid(_distance_from_zero(lo, hi))
    return s * (1 - s)


def _product(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    corners = torch.stack((a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]))
    return corners.amin(0), corners.amax(0)


#: Exact ``‖diag(d̄) W‖_2`` (one SVD per position and sample) while ``count · H³`` stays below
#: this; beyond it the cheaper, looser ``max(d̄)·‖W‖_2``, also certified.
EXACT_SCALED_NORM_BUDGET = 2**30


def _scaled_norm(scale: Tensor, matrix: Tensor, norm: Norm) -> Tensor:
    """A bound on ``‖diag(d) W‖`` for all ``|d| ≤ scale`` (``scale (..., H) ≥ 0``).

    ∞-norm: the row sums ``scale_j Σ_k |W_jk|`` (the caller takes the max over rows).
    2-norm: ``‖diag(scale) W‖_2`` exactly, or ``max(scale)·‖W‖_2`` past the budget above.
    """
    if norm == "inf":
        return scale * matrix.abs().sum(-1)
    if scale[..., 0].numel() * matrix.shape[-1] ** 3 <= EXACT_SCALED_NORM_BUDGET:
        return torch.linalg.matrix_norm(scale.unsqueeze(-1) * matrix, ord=2)
    return scale.amax(-1) * torch.linalg.matrix_norm(matrix, ord=2)


def _rows_max(values: Tensor, norm: Norm) -> Tensor:
    return values.amax(-1) if norm == "inf" else values


# -- per-cell certified bounds -------------------------------------------------------------------
@dataclass(frozen=True)
class StepBounds:
    """Certified per-step Lipschitz bounds and the box they hold on.

    Attributes:
        lipschitz: ``(T, B)``; entry ``t`` bounds ``‖∂f(·, x_t)/∂s‖`` over the box of ``s_{t−1}``.
            Entry 0 is reported but plays no role: ``s_0`` is given, not unknown.
        state_norm: ``(T, B)`` bound on ``‖s_t‖`` (the initial error of Picard from zero).
    """

    lipschitz: Tensor
    state_norm: Tensor


def outward(values: Tensor, operations: int) -> Tensor:
    """``values ≥ 0`` computed in float64 by at most ``operations`` dependent roundings, made an
    upper bound of the exact result: ``× (1 + 16·(operations + 64)·2⁻⁵³)``, then the next float up."""
    factor = 1 + 16 * (operations + 64) * 2.0**-53
    inflated = values.to(torch.float64) * factor
    return torch.nextafter(inflated, torch.full_like(inflated, math.inf))


def _operations(cell: Cell, steps: int) -> int:
    """A count above the dependent roundings of any bound of ``cell`` over ``steps`` positions."""
    return steps + cell.gate_count * cell.hidden_size * cell.state_size


def certified_step_bounds(system: SequenceSystem, norm: Norm = "2", chunk: int = 256) -> StepBounds:
    """Data-conditional certified bounds ``L_t`` for this input sequence (see module docstring),
    evaluated in float64 and rounded outward whatever the system's dtype."""
    cell = system.cell.to(dtype=torch.float64)
    p = cell.input_projection(system.inputs.to(torch.float64))
    bounds = _step_bounds(cell, (p, p), system.initial_state.to(torch.float64), check_norm(norm), chunk)
    operations = _operations(cell, system.seq_len)
    return StepBounds(outward(bounds.lipschitz, operations), outward(bounds.state_norm, operations))


def _step_bounds(
    cell: Cell, projected: tuple[Tensor, Tensor], initial_state: Tensor, norm: Norm, chunk: int = 256
) -> StepBounds:
    """Bounds for input projections anywhere in ``[lo, hi]`` (``(T, B, G·H)`` each; ``±inf`` allowed)."""
    if isinstance(cell, ElmanCell):
        return _elman_bounds(cell, projected, initial_state, norm, chunk)
    if isinstance(cell, GRUCell):
        return _gru_bounds(cell, projected, initial_state, norm, chunk)
    if isinstance(cell, LSTMCell):
        return _lstm_bounds(cell, projected, initial_state, norm, chunk)
    raise InputError(f"no contraction analysis for {type(cell).__name__}")


def _box_radius(cell: Cell, initial_state: Tensor) -> Tensor:
    """``ρ_b = max(1, ‖h_0‖_∞)`` per sample, shaped ``(1, B, 1)`` to broadcast over ``(T, B, H)``;
    for a projected LSTM ``max(‖W_hr‖_∞, ‖h_0‖_∞)``, since ``|h_t| = |W_hr (o ⊙ tanh c_t)| ≤ Σ_k |W_hr[j, k]|``."""
    reach = _projection_reach(cell)
    least = 1.0 if reach is None else float(reach.max())
    return torch.clamp(cell.hidden_of(initial_state).abs().amax(-1), min=least)[None, :, None]


def _projection_reach(cell: Cell) -> Tensor | None:
    """``Σ_k |W_hr[j, k]|`` per output ``j`` ``(P,)``: the bound on ``|h_j|`` of a projected LSTM
    (``None`` without a projection, where ``|h_j| ≤ 1``)."""
    weight = getattr(cell, "weight_hr", None)
    return None if weight is None else weight.abs().sum(-1)


def _gate_intervals(cell: Cell, p_lo: Tensor, p_hi: Tensor, rho: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per gate, the interval of ``p + W_h· h`` over ``|h| ≤ ρ``: ``p ± ρ·Σ_k |W_jk|``, each ``(..., H)``."""
    hidden = cell.hidden_size
    return [
        (p_lo[..., k * hidden : (k + 1) * hidden] - rho * w.abs().sum(-1),
         p_hi[..., k * hidden : (k + 1) * hidden] + rho * w.abs().sum(-1))
        for k, w in enumerate(cell.gate_weights())
    ]


def _vector_norm(values: Tensor, norm: Norm) -> Tensor:
    return values.abs().amax(-1) if norm == "inf" else values.norm(dim=-1)


def state_norms(cell: Cell, states: Tensor, norm: Norm) -> Tensor:
    """``‖s‖`` per state ``(..., S) → (...)``; for LSTM ``max(‖h‖, ‖c‖)``."""
    if isinstance(cell, LSTMCell):
        return torch.maximum(_vector_norm(cell.hidden_of(states), norm), _vector_norm(cell.cell_of(states), norm))
    return _vector_norm(states, norm)


def _elman_bounds(
    cell: ElmanCell, projected: tuple[Tensor, Tensor], initial_state: Tensor, norm: Norm, chunk: int
) -> StepBounds:
    p_lo, p_hi = projected  # (T, B, H), biases folded in
    w = cell.weight_hh
    steps = p_lo.shape[0]
    if cell.nonlinearity == "tanh":
        rho = _box_radius(cell, initial_state)
        reach = rho * w.abs().sum(-1)  # |W h| ≤ ρ·Σ_k |W_jk|
        slope = _sup_tanh_slope(p_lo - reach, p_hi + reach)
        state_norm = _vector_norm(torch.ones_like(p_lo), norm)  # tanh outputs: |h_t| ≤ 1
    else:
        # relu: propagate 0 ≤ h_t ≤ U_t; h_0 enters as the point box [h_0, h_0].
        positive, negative = w.clamp(min=0), w.clamp(max=0)
        lo = hi = initial_state
        slopes, uppers = [], []
        for t in range(steps):
            pre_hi = p_hi[t] + hi @ positive.T + lo @ negative.T
            slopes.append((pre_hi > 0).to(p_hi.dtype))
            lo, hi = torch.zeros_like(pre_hi), pre_hi.clamp(min=0)
            uppers.append(hi)
        slope = torch.stack(slopes)
        state_norm = _vector_norm(torch.stack(uppers), norm)
    lipschitz = torch.cat([_rows_max(_scaled_norm(slope[i : i + chunk], w, norm), norm) for i in range(0, steps, chunk)])
    return StepBounds(lipschitz, state_norm)


def _gru_coefficients(cell: GRUCell, p_lo: Tensor, p_hi: Tensor, rho: Tensor) -> dict[str, Tensor]:
    """Sups of the Jacobian's diagonal coefficients over the box ``|h| ≤ ρ`` (each ``(..., H)``).

    ``J = diag(z) + diag(α) W_hn + diag(β) W_hr + diag(γ) W_hz`` with ``α = (1−z)(1−n²) r``,
    ``β = (1−z)(1−n²) q r(1−r)``, ``γ = (h−n) z(1−z)`` (docs/contraction.md).
    """
    hidden = cell.hidden_size
    w_n = cell.gate_weights()[2]
    zero = torch.zeros(hidden, dtype=p_lo.dtype, device=p_lo.device)
    b_n = cell.bias_hh[2 * hidden :] if cell.bias_hh is not None else zero
    r_pre, z_pre, _ = _gate_intervals(cell, p_lo, p_hi, rho)  # n's pre-activation holds r ⊙ q
    r_hi = torch.sigmoid(r_pre[1])
    q = (b_n - rho * w_n.abs().sum(-1), b_n + rho * w_n.abs().sum(-1))  # q = W_hn h + b_hn
    rq = _product((torch.sigmoid(r_pre[0]), r_hi), q)
    n_pre = (p_lo[..., 2 * hidden :] + rq[0], p_hi[..., 2 * hidden :] + rq[1])
    tanh_slope = _sup_tanh_slope(*n_pre)
    n_abs = _sup_abs(torch.tanh(n_pre[0]), torch.tanh(n_pre[1]))
    return {
        "z_lo": torch.sigmoid(z_pre[0]),
        "z_hi": torch.sigmoid(z_pre[1]),
        "a_n": tanh_slope * r_hi,  # |α| ≤ (1 − z)·a_n
        "a_r": tanh_slope * _sup_abs(*q) * _sup_sigmoid_slope(*r_pre),  # |β| ≤ (1 − z)·a_r
        "a_z": rho + n_abs,  # |γ| ≤ z(1 − z)·a_z
        "z_slope": _sup_sigmoid_slope(*z_pre),
    }


def _max_quadratic(a: Tensor, b: Tensor, c: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """``max_{z ∈ [lo, hi]} a + b z + c z²`` elementwise."""
    candidates = [a + b * lo + c * lo**2, a + b * hi + c * hi**2]
    vertex = torch.where(c != 0, -b / (2 * c), lo).clamp(min=lo, max=hi)
    candidates.append(a + b * vertex + c * vertex**2)
    return torch.stack(candidates).amax(0)


def _gru_bounds(
    cell: GRUCell, projected: tuple[Tensor, Tensor], initial_state: Tensor, norm: Norm, chunk: int
) -> StepBounds:
    rho = _box_radius(cell, initial_state)
    w_r, w_z, w_n = cell.gate_weights()
    p_lo, p_hi = projected
    pieces = []
    for i in range(0, p_lo.shape[0], chunk):
        k = _gru_coefficients(cell, p_lo[i : i + chunk], p_hi[i : i + chunk], rho)
        if norm == "inf":
            # Row j: z + (1 − z)(a_n R_n + a_r R_r) + z(1 − z) a_z R_z, maximised over z exactly.
            coupled = k["a_n"] * w_n.abs().sum(-1) + k["a_r"] * w_r.abs().sum(-1)
            tilt = k["a_z"] * w_z.abs().sum(-1)
            rows = _max_quadratic(coupled, 1 - coupled + tilt, -tilt, k["z_lo"], k["z_hi"])
            pieces.append(rows.amax(-1))
        else:
            one_minus_z = 1 - k["z_lo"]
            pieces.append(
                k["z_hi"].amax(-1)
                + _scaled_norm(one_minus_z * k["a_n"], w_n, norm)
                + _scaled_norm(one_minus_z * k["a_r"], w_r, norm)
                + _scaled_norm(k["z_slope"] * k["a_z"], w_z, norm)
            )
    box = rho.expand(p_lo.shape[0], -1, cell.hidden_size)
    return StepBounds(torch.cat(pieces), _vector_norm(box, norm))


def _lstm_bounds(
    cell: LSTMCell, projected: tuple[Tensor, Tensor], initial_state: Tensor, norm: Norm, chunk: int
) -> StepBounds:
    p_lo, p_hi = projected
    steps = p_lo.shape[0]
    rho = _box_radius(cell, initial_state)
    w_i, w_f, w_g, w_o = cell.gate_weights()
    intervals = dict(zip("ifgo", _gate_intervals(cell, p_lo, p_hi, rho)))
    i_hi = torch.sigmoid(intervals["i"][1])
    f_hi = torch.sigmoid(intervals["f"][1])
    g_abs = _sup_abs(torch.tanh(intervals["g"][0]), torch.tanh(intervals["g"][1]))
    o_hi = torch.sigmoid(intervals["o"][1])
    # Cell-state range |c_t| ≤ C_t (per unit), C_t = f̄ C_{t−1} + ī ḡ, C_0 = |c_0|.
    c_bound = []
    c_prev = cell.cell_of(initial_state).abs()
    for t in range(steps):
        c_bound.append(c_prev)  # the range of the predecessor state c_{t−1}
        c_prev = f_hi[t] * c_prev + i_hi[t] * g_abs[t]
    c_in = torch.stack(c_bound)  # (T, B, H): bound on |c_{t−1}|
    c_out = torch.cat((c_in[1:], c_prev.unsqueeze(0)))  # bound on |c_t|
    # |c'| ≤ C_t: the symmetric interval contains 0, so this sup is 1 (an interval for
    # c' = f c + i g that excludes 0 would tighten it; docs/contraction.md §14).
    tanh_c_slope = _sup_tanh_slope(-c_out, c_out)
    tanh_c_abs = torch.tanh(c_out)
    coef_f = c_in * _sup_sigmoid_slope(*intervals["f"])
    coef_i = g_abs * _sup_sigmoid_slope(*intervals["i"])
    coef_g = i_hi * _sup_tanh_slope(*intervals["g"])
    through_c = o_hi * tanh_c_slope
    coef_o = tanh_c_abs * _sup_sigmoid_slope(*intervals["o"])
    pieces = []
    for a in range(0, steps, chunk):
        s = slice(a, a + chunk)
        dc_dh = _scaled_norm(coef_f[s], w_f, norm) + _scaled_norm(coef_i[s], w_i, norm) + _scaled_norm(coef_g[s], w_g, norm)
        dh_dh = (
            _scaled_norm(coef_o[s], w_o, norm)
            + _scaled_norm(through_c[s] * coef_f[s], w_f, norm)
            + _scaled_norm(through_c[s] * coef_i[s], w_i, norm)
            + _scaled_norm(through_c[s] * coef_g[s], w_g, norm)
        )
        dh_dc = (through_c[s] * f_hi[s]).amax(-1)  # diagonal blocks: norm = max entry
        dc_dc = f_hi[s].amax(-1)
        # With a projection the h rows are W_hr times the rows of m = o ⊙ tanh c' bounded above:
        # row sums through |W_hr| (∞-norm), or a factor ‖W_hr‖₂ (2-norm).
        if norm == "inf":  # row sums per unit, then the max over units
            h_rows = dh_dh + through_c[s] * f_hi[s]
            if cell.weight_hr is not None:
                h_rows = h_rows @ cell.weight_hr.abs().T
            pieces.append(torch.maximum(h_rows.amax(-1), (dc_dh + f_hi[s]).amax(-1)))
        else:
            h_rows = dh_dh + dh_dc
            if cell.weight_hr is not None:
                h_rows = h_rows * torch.linalg.matrix_norm(cell.weight_hr, ord=2)
            pieces.append(torch.maximum(h_rows, dc_dh + dc_dc))
    reach = _projection_reach(cell)
    h_bound = torch.ones_like(c_out) if reach is None else reach.expand(*c_out.shape[:-1], -1)
    return StepBounds(torch.cat(pieces), torch.maximum(_vector_norm(h_bound, norm), _vector_norm(c_out, norm)))


# -- certified global bounds ---------------------------------------------------------------------
def certified_global_bound(cell: Cell, norm: Norm = "2", seq_len: int | None = None) -> float:
    """A bound on ``‖∂f/∂s‖`` that holds for every input (and states in the cell's box).

    Elman: ``‖W_hh‖·sup|φ'|`` with ``sup tanh' = sup relu' = 1``.  GRU and LSTM have no uniform
    strict contraction (``z → 1`` or ``f → 1`` makes the cell the identity), so their bound is
    ≥ 1; it is the data-conditional bound with every input pre-activation unbounded, for
    ``s_0 = 0``.  LSTM's cell-state range then grows with ``t`` (``|c_t| ≤ t``), so it needs
    ``seq_len``.
    """
    norm = check_norm(norm)
    if not isinstance(cell, (ElmanCell, GRUCell, LSTMCell)):
        raise InputError(f"no contraction analysis for {type(cell).__name__}")
    if isinstance(cell, LSTMCell) and seq_len is None:
        raise InputError("an LSTM's global bound depends on the sequence length: pass seq_len")
    wide = cell.to(dtype=torch.float64)
    operations = _operations(wide, seq_len or 1)
    if isinstance(wide, ElmanCell):
        w = wide.weight_hh
        value = w.abs().sum(-1).max() if norm == "inf" else torch.linalg.matrix_norm(w, ord=2)
        return float(outward(value, operations))
    # GRU/LSTM: the step bound with every input pre-activation in (−∞, ∞).  It is ≥ 1 in exact
    # arithmetic (z → 1, f → 1 give the identity); the clamp keeps rounding from saying otherwise.
    steps = 1 if isinstance(wide, GRUCell) else seq_len
    bound = torch.tensor(_unbounded_input_bound(wide, norm, seq_len=steps), dtype=torch.float64)
    return max(1.0, float(outward(bound, operations)))


def global_bound_applies(system: SequenceSystem) -> bool:
    """Whether :func:`certified_global_bound` bounds every step of ``system``: always for Elman;
    for GRU when ``s_0`` lies in the box ``[−1, 1]`` the bound assumes; for LSTM when ``s_0 = 0``,
    from which its cell-state range is derived."""
    cell, initial = system.cell, system.initial_state
    if isinstance(cell, ElmanCell):
        return True
    if isinstance(cell, GRUCell):
        return bool((initial.abs() <= 1).all())
    return bool((initial == 0).all())


def _unbounded_input_bound(cell: Cell, norm: Norm, seq_len: int) -> float:
    """The step bound with every input projection in ``(−inf, inf)`` and ``s_0 = 0``: the
    worst case over all inputs, for states in the cell's box.

    Only one step is evaluated.  With unbounded inputs every gate interval is the same at every
    ``t``; only LSTM's cell-state range grows (``|c_{t−1}| ≤ t − 1``), and every term of the bound
    grows with it, so the largest is the last step's: the step from ``c_0 = seq_len − 1``.
    """
    shape = (1, 1, cell.gate_count * cell.hidden_size)
    lo = torch.full(shape, -math.inf, dtype=cell.dtype, device=cell.device)
    initial_state = torch.zeros(1, cell.state_size, dtype=cell.dtype, device=cell.device)
    if isinstance(cell, LSTMCell):
        initial_state[:, cell.output_size :] = seq_len - 1
    bounds = _step_bounds(cell, (lo, -lo), initial_state, norm)
    return float(bounds.lipschitz.max())


# -- estimates -------------------------------------------------------------------------------------
#: Power iteration for ``‖J‖_2`` stops when the estimate changes by less than this, relatively.
POWER_ITERATION_RTOL = 1e-6
#: … or after this many products with ``JᵀJ``.
POWER_ITERATION_MAX_STEPS = 100
#: Hidden sizes up to this use an exact SVD for the 2-norm; larger ones use power iteration.
EXACT_SVD_MAX_STATE = 256


def operator_norms(jacobians: Tensor, norm: Norm, lstm_hidden: int | None = None) -> Tensor:
    """``‖J‖`` of a batch of Jacobians ``(..., S, S)`` → ``(...)``.

    For LSTM (``lstm_hidden = H``) the norm on states is ``max(‖h‖, ‖c‖)``: in the ∞-norm that is
    ``‖s‖_∞`` and the result is exact; in the 2-norm it is ``max(‖J_hh‖ + ‖J_hc‖, ‖J_ch‖ + ‖J_cc‖)``,
    an upper estimate of the operator norm.
    """
    if norm == "inf":  # max(‖h‖∞, ‖c‖∞) is ‖s‖∞: the full row sums, LSTM included
        return jacobians.abs().sum(-1).amax(-1)
    if lstm_hidden is not None:
        h = lstm_hidden
        blocks = [[jacobians[..., :h, :h], jacobians[..., :h, h:]], [jacobians[..., h:, :h], jacobians[..., h:, h:]]]
        rows = [operator_norms(a, norm) + operator_norms(b, norm) for a, b in blocks]
        return torch.maximum(*rows)
    if norm == "inf":
        return jacobians.abs().sum(-1).amax(-1)
    if jacobians.shape[-1] <= EXACT_SVD_MAX_STATE:
        return torch.linalg.matrix_norm(jacobians, ord=2)
    return _power_iteration(jacobians)


def _power_iteration(jacobians: Tensor) -> Tensor:
    """Largest singular value by power iteration on ``JᵀJ`` (stopping rule above); an estimate
    from below that converges to ``‖J‖_2``."""
    generator = torch.Generator(device=jacobians.device).manual_seed(0)
    vector = torch.randn(*jacobians.shape[:-1], 1, generator=generator, dtype=jacobians.dtype, device=jacobians.device)
    estimate = torch.zeros(jacobians.shape[:-2], dtype=jacobians.dtype, device=jacobians.device)
    for _ in range(POWER_ITERATION_MAX_STEPS):
        vector = vector / vector.norm(dim=-2, keepdim=True).clamp(min=torch.finfo(vector.dtype).tiny)
        image = jacobians @ vector
        new = image.norm(dim=(-2, -1))
        vector = jacobians.transpose(-2, -1) @ image
        done = bool(((new - estimate).abs() <= POWER_ITERATION_RTOL * new).all())
        estimate = new
        if done:
            break
    return estimate


def estimated_step_norms(system: SequenceSystem, states: Tensor, norm: Norm = "2", chunk: int = 128) -> Tensor:
    """``‖J_t‖`` along a trajectory ``states (T, B, S)`` (the solution): ``(T, B)``; an estimate.

    Entry ``t`` is the Jacobian at ``(s_{t−1}, x_t)``; entry 0 is taken at ``s_0``.
    """
    norm = check_norm(norm)
    cell = system.cell
    previous = torch.cat((system.initial_state.unsqueeze(0), states[:-1]))
    lstm_hidden = cell.output_size if isinstance(cell, LSTMCell) else None
    pieces = []
    for i in range(0, system.seq_len, chunk):
        jacobians = cell.jacobian(previous[i : i + chunk], system.projected_inputs[i : i + chunk])
        if lstm_hidden is not None and norm == "2":
            pieces.append(_lstm_operator_norms(jacobians, lstm_hidden, projected=cell.weight_hr is not None))
        else:
            pieces.append(operator_norms(jacobians, norm, lstm_hidden))
    return torch.cat(pieces)


#: Above this state size the largest 2-norm is found among candidates ranked matrix-free.
RANKED_NORM_MIN_STATE = 128
#: Power-iteration sweeps that rank the steps, and how many of the largest get an exact SVD.
RANKING_SWEEPS = 8
RANKED_CANDIDATES = 32


def estimated_largest_step_norm(system: SequenceSystem, states: Tensor, norm: Norm = "2") -> float:
    """``max_{t ≥ 1, b} ‖J_t‖`` along ``states (T, B, S)``, as :func:`estimated_step_norms`' maximum
    over ``t ≥ 1`` (entry 0 is taken at ``s_0``, not on the trajectory); an estimate.

    For the 2-norm of a large Elman or GRU state (``S > RANKED_NORM_MIN_STATE``) the ``T·B``
    exact SVDs dominate a check (9 s of 13 for a 256-unit GRU at T = 500, B = 4, on 2 cores), so
    the steps are ranked first by a few matrix-free power-iteration sweeps on ``JᵀJ`` (products
    ``J v``, ``Jᵀ v`` from :meth:`~fixedpoint.cells.Cell.linearization`, one product with ``W_hh``
    each) and only the ``RANKED_CANDIDATES`` largest get an exact SVD: the answer is exact when
    the largest norm is among them (a sweep's value never exceeds the norm it approaches).
    """
    norm = check_norm(norm)
    cell = system.cell
    if system.seq_len < 2:
        raise InputError("the largest step norm along a trajectory needs T ≥ 2 (entry 0 is at s_0)")
    if norm != "2" or isinstance(cell, LSTMCell) or cell.state_size <= RANKED_NORM_MIN_STATE:
        return float(estimated_step_norms(system, states, norm)[1:].max())
    previous = states[:-1].detach()
    projected = system.projected_inputs[1:]
    factors = cell.linearization(previous, projected)
    generator = torch.Generator(device=states.device).manual_seed(0)
    vector = torch.randn(previous.shape, generator=generator, dtype=states.dtype, device=states.device)
    for _ in range(RANKING_SWEEPS):
        vector = cell.transposed_jacobian_product(factors, cell.jacobian_product(factors, vector))
        vector = vector / vector.norm(dim=-1, keepdim=True).clamp(min=torch.finfo(vector.dtype).tiny)
    ranking = cell.jacobian_product(factors, vector).norm(dim=-1).flatten()  # (T−1)·B lower estimates
    chosen = ranking.topk(min(RANKED_CANDIDATES, ranking.numel())).indices
    steps, samples = chosen // previous.shape[1], chosen % previous.shape[1]
    jacobians = cell.jacobian(previous[steps, samples], projected[steps, samples])
    return float(torch.linalg.matrix_norm(jacobians, ord=2).max())


def _lstm_operator_norms(jacobians: Tensor, hidden: int, projected: bool = False) -> Tensor:
    """:func:`operator_norms` of LSTM cell Jacobians in the 2-norm of ``max(‖h‖, ‖c‖)``, using
    their structure: ``∂h'/∂c`` and ``∂c'/∂c`` are diagonal, so their norms are their largest
    entries, and only the two ``∂·/∂h`` blocks need an SVD."""
    def diagonal_norm(block: Tensor) -> Tensor:
        return block.diagonal(dim1=-2, dim2=-1).abs().amax(-1)

    h = hidden
    through_c = operator_norms(jacobians[..., :h, h:], "2") if projected else diagonal_norm(jacobians[..., :h, h:])
    top = operator_norms(jacobians[..., :h, :h], "2") + through_c
    bottom = operator_norms(jacobians[..., h:, :h], "2") + diagonal_norm(jacobians[..., h:, h:])
    return torch.maximum(top, bottom)


# -- predictions and certificates ----------------------------------------------------------------
def predicted_picard_iterations(bounds: StepBounds, atol: float, max_steps: int | None = None) -> Tensor:
    """Iterations after which Picard from ``S^0 = 0`` must have stopped, per sample ``(B,)``.

    The error at position ``t`` after ``k`` sweeps obeys ``‖e^k_t‖ ≤ (Π_{u=t−k+1..t} L_u)·‖s*_{t−k}‖``
    (0 for ``t < k``).  The driver's ``m``-th iteration tests ``|S^m − S^{m−1}| < atol + rtol·|S^m|``,
    which holds once ``max_t E_m(t) + max_t E_{m−1}(t) < atol`` (a norm bound bounds each
    entry; summing the two maxima is slightly conservative).  The answer is the smallest such ``m``, and at most ``T`` (finite termination).
    """
    lipschitz, state_norm = bounds.lipschitz, bounds.state_norm  # (T, B)
    steps = lipschitz.shape[0]
    limit = steps if max_steps is None else min(steps, max_steps)
    log_l = torch.log(lipschitz.clamp(min=torch.finfo(lipschitz.dtype).tiny))
    cumulative = torch.cat((torch.zeros_like(log_l[:1]), log_l.cumsum(0)))  # (T + 1, B)
    log_e0 = torch.log(state_norm.clamp(min=torch.finfo(state_norm.dtype).tiny))

    def worst_error(k: int) -> Tensor:  # max_t E_k(t), (B,)
        if k == 0:
            return state_norm.amax(0)
        if k >= steps:
            return torch.zeros_like(state_norm[0])
        window = cumulative[k + 1 :] - cumulative[1 : steps - k + 1]  # Σ_{u=t−k+1..t} log L_u, t ≥ k
        return torch.exp(window + log_e0[: steps - k]).amax(0)

    predicted = torch.full_like(state_norm[0], float(limit), dtype=torch.float64).long()
    pending = torch.ones_like(predicted, dtype=torch.bool)
    previous = worst_error(0)
    for m in range(1, limit + 1):
        current = worst_error(m)
        done = pending & (current + previous < atol)
        predicted[done] = m
        pending &= ~done
        if not bool(pending.any()):
            break
        previous = current
    return predicted


def certification(system: SequenceSystem, norm: Norm | None, atol: float) -> tuple[ContractionReport | None, float]:
    """A solve's certification pass: :func:`analyze` in ``norm`` (``None``: no pass) and the
    seconds it took, which a solve reports apart from its own wall time."""
    started = time.perf_counter()
    report = None if norm is None else analyze(system, check_norm(norm), atol=atol)
    return report, time.perf_counter() - started


def a_posteriori_error_bound(lipschitz: float, step: Tensor) -> Tensor | None:
    """``L/(1−L)·‖G − X‖`` bounds ``‖G − S*‖`` when ``L < 1`` holds on a set holding ``X``; else None."""
    if not lipschitz < 1:
        return None
    return lipschitz / (1 - lipschitz) * step


@dataclass(frozen=True)
class ContractionReport:
    """What is certified and what is estimated about one system, in one norm.

    Attributes:
        norm: ``"2"`` or ``"inf"`` (LSTM: of ``max(‖h‖, ‖c‖)``).
        global_bound: certified for every input (GRU/LSTM: ≥ 1, no uniform contraction).
        conditional_bound: certified for this input sequence, ``max_{t ≥ 2, b} L_t``.
        conditional_steps: ``(T, B)`` certified ``L_t``: each step's data-conditional bound, or the
            global bound where that is smaller and applies (:func:`global_bound_applies`).
        estimated: ``max_{t ≥ 2, b} ‖J_t‖`` along the given trajectory, or None without one.
        predicted_iterations: ``(B,)`` a-priori Picard iterations to ``atol`` (certified).
        verdict: ``contractive``, ``contractive on these inputs`` or
            ``not certified (finite termination at T only)``.
    """

    norm: Norm
    global_bound: float
    conditional_bound: float
    conditional_steps: Tensor
    estimated: float | None
    predicted_iterations: Tensor
    verdict: str

    @property
    def certified(self) -> float | None:
        """The smallest certified ``L`` if it is below 1, else None."""
        best = min(self.global_bound, self.conditional_bound)
        return best if best < 1 else None


def analyze(system: SequenceSystem, norm: Norm = "2", *, atol: float, states: Tensor | None = None) -> ContractionReport:
    """The contraction report of ``system``; ``states (T, B, S)`` (e.g. the solution) adds estimates."""
    norm = check_norm(norm)
    bounds = certified_step_bounds(system, norm)
    global_bound = certified_global_bound(system.cell, norm, seq_len=system.seq_len)
    if global_bound_applies(system):
        # Both bound every step's L_t for these inputs: the smaller one is the better certificate
        # (interval arithmetic on narrow input ranges can come out looser than on unbounded ones).
        bounds = StepBounds(bounds.lipschitz.clamp(max=global_bound), bounds.state_norm)
    relevant = bounds.lipschitz[1:] if system.seq_len > 1 else bounds.lipschitz[:0]
    conditional = float(relevant.max()) if relevant.numel() else 0.0
    estimated = None
    if states is not None and system.seq_len > 1:
        estimated = estimated_largest_step_norm(system, states, norm)
    if global_bound < 1:
        verdict = "contractive"
    elif conditional < 1:
        verdict = "contractive on these inputs"
    else:
        verdict = "not certified (finite termination at T only)"
    return ContractionReport(
        norm=norm,
        global_bound=global_bound,
        conditional_bound=conditional,
        conditional_steps=bounds.lipschitz,
        estimated=estimated,
        predicted_iterations=predicted_picard_iterations(bounds, atol),
        verdict=verdict,
    )


# -- spectral normalisation ----------------------------------------------------------------------
def scale_to_certified_bound(
    cell: Cell,
    target: float,
    norm: Norm = "2",
    *,
    inputs: Tensor | None = None,
    initial_state: Tensor | None = None,
    bisection_steps: int = 60,
) -> tuple[Cell, float]:
    """Multiply ``W_hh`` by the largest factor whose certified bound is ``≤ target``.

    Without ``inputs`` the bound is the global one; with ``inputs (T, B, I)`` it is the
    data-conditional bound on them (``max_{t ≥ 2}``).  Elman's global bound is linear in the
    factor and solved exactly; otherwise the factor is found by bisection (the interval bounds
    grow with the factor) and the returned cell's bound is checked to be ``≤ target``.

    Returns:
        The rescaled cell and the factor applied.
    """
    norm = check_norm(norm)
    if not isinstance(target, (int, float)) or not math.isfinite(target) or target <= 0:
        raise InputError(f"target must be a finite number > 0, got {target!r}")

    def bound(factor: float) -> float:
        scaled = cell.with_tensors(weight_hh=cell.weight_hh * factor)
        if inputs is None:
            return certified_global_bound(scaled, norm, seq_len=1)
        system = SequenceSystem.build(scaled, inputs, initial_state)
        steps = certified_step_bounds(system, norm).lipschitz
        return float((steps[1:] if steps.shape[0] > 1 else steps).max())

    if isinstance(cell, ElmanCell) and inputs is None:
        current = bound(1.0)
        factor = target / current if current > 0 else 1.0
        return cell.with_tensors(weight_hh=cell.weight_hh * factor), factor
    floor = bound(0.0)
    if floor > target:
        where = "for every input" if inputs is None else "on these inputs"
        raise InputError(
            f"no scaling of W_hh reaches a certified bound of {target:g} {where}: even W_hh = 0 gives "
            f"{floor:.4g}" + ("; pass inputs for the data-conditional bound" if inputs is None else "")
        )
    low, high = 0.0, 1.0
    while bound(high) <= target:
        low, high = high, 2 * high
        if high > 1e12:
            raise InputError("the certified bound does not grow with W_hh; nothing to rescale")
    for _ in range(bisection_steps):
        middle = (low + high) / 2
        low, high = (middle, high) if bound(middle) <= target else (low, middle)
    return cell.with_tensors(weight_hh=cell.weight_hh * low), low
