"""Contraction certificates (fixedpoint.contraction) checked against what they claim.

The claims (DESIGN.md §2 and the module docstring):

- entry ``t`` of ``certified_step_bounds(system, norm).lipschitz`` bounds
  ``‖f(s, x_t) − f(s', x_t)‖ / ‖s − s'‖`` for every pair of predecessor states in the cell's
  box (entry 0 is taken at the given ``s_0``);
- ``certified_global_bound`` bounds every conditional entry (Elman: exactly ``‖W_hh‖``;
  GRU/LSTM: ≥ 1, no uniform contraction);
- the a-posteriori bound ``L/(1−L)·‖F(X) − X‖`` attached by ``solve(..., certify=norm)`` bounds
  the true error of the returned value at every Picard iteration;
- ``predicted_iterations`` is never below the observed Picard count;
- the analytic Jacobians are ``∂f/∂s`` (checked against ``torch.func`` and ``sympy``);
- the estimates along the solution never exceed the certified bounds.

Boxes are recomputed here from the module docstring, independently of the implementation:
Elman-tanh and GRU ``|h| ≤ ρ = max(1, ‖h_0‖_∞)``; LSTM ``|h| ≤ ρ`` and
``|c_t| ≤ C_t = f̄_t C_{t−1} + (ī ḡ)_t`` with ``C_0 = |c_0|``; Elman-relu ``0 ≤ h_t ≤ U_t``
by interval propagation from the point ``h_0``.

Norms: ``"2"``/``"inf"`` per position; LSTM ``max(‖h‖, ‖c‖)``.  All float64, explicit generators.
"""

from __future__ import annotations

import math

import pytest
import sympy
import torch
from hypothesis import HealthCheck, assume, event, given, note, settings, target
from hypothesis import strategies as st
from torch import Tensor

from helpers import CELL_IDS, CELLS, generator, randn
from fixedpoint import ElmanCell, InputError, Network, Picard, SequenceSystem, solve
from fixedpoint.cells import CELL_TYPES, Cell
from fixedpoint.contraction import (
    analyze,
    certified_global_bound,
    certified_step_bounds,
    estimated_step_norms,
    global_bound_applies,
    outward,
    predicted_picard_iterations,
    scale_to_certified_bound,
)

F64 = torch.float64
NORMS = ("2", "inf")
SEEDS = st.integers(0, 2**31 - 1)


def fast(n: int) -> settings:
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- construction ----------------------------------------------------------------------------------
def make_cell(
    kind: str,
    nonlinearity: str,
    hidden: int,
    input_size: int,
    *,
    scale: float,
    seed: int,
    bias: bool = True,
    bias_scale: float = 1.0,
    proj_size: int = 0,
) -> Cell:
    """torch.nn's default init ``U(−1/√H, 1/√H)`` from an explicit generator; ``W_hh`` × ``scale``;
    an LSTM with ``proj_size = P > 0`` gets ``W_hr (P, H)``, drawn last."""
    gen = generator(seed)
    rows = CELL_TYPES[kind].gate_count * hidden
    bound = 1.0 / math.sqrt(hidden)

    def uniform(*shape: int) -> Tensor:
        return (torch.rand(*shape, generator=gen, dtype=F64) * 2 - 1) * bound

    weight_ih = uniform(rows, input_size)
    weight_hh = uniform(rows, proj_size or hidden) * scale
    biases = (uniform(rows) * bias_scale, uniform(rows) * bias_scale) if bias else (None, None)
    if kind == "elman":
        return ElmanCell(weight_ih, weight_hh, *biases, nonlinearity=nonlinearity)
    if proj_size:
        return CELL_TYPES[kind](weight_ih, weight_hh, *biases, weight_hr=uniform(proj_size, hidden))
    return CELL_TYPES[kind](weight_ih, weight_hh, *biases)


def uniform_in(lo: Tensor | float, hi: Tensor | float, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=F64)


@st.composite
def small_systems(
    draw,
    *,
    kinds=tuple(CELLS),
    min_scale: float = 0.25,
    max_scale: float = 4.0,
    min_len: int = 2,
    max_len: int = 8,
    max_batch: int = 2,
    max_hidden: int = 6,
    initial: str = "zero",
) -> SequenceSystem:
    """A random system.  ``initial``: ``zero`` (s_0 = 0); ``unit`` (h_0 ∈ [−1, 1], c_0 = 0);
    ``any`` (zero half of the time, else h_0 and c_0 uniform in [−1.5, 1.5])."""
    kind, nonlinearity = draw(st.sampled_from(kinds), label="cell")
    hidden = draw(st.integers(1, max_hidden), label="H")
    input_size = draw(st.integers(1, 3), label="I")
    scale = draw(st.floats(min_scale, max_scale), label="scale")
    input_scale = draw(st.sampled_from([0.1, 1.0, 3.0]), label="input scale")
    bias_scale = draw(st.sampled_from([0.0, 1.0, 3.0]), label="bias scale")
    steps = draw(st.integers(min_len, max_len), label="T")
    batch = draw(st.integers(1, max_batch), label="B")
    seed = draw(SEEDS, label="seed")
    # An LSTM is projected (torch.nn's proj_size, 0 < P < H) a third of the time.
    proj_size = draw(st.sampled_from([0, 0, hidden - 1]), label="P") if kind == "lstm" else 0
    cell = make_cell(kind, nonlinearity, hidden, input_size, scale=scale, seed=seed, bias_scale=bias_scale,
                     proj_size=proj_size)
    gen = generator(seed + 1)
    inputs = input_scale * torch.randn(steps, batch, input_size, generator=gen, dtype=F64)
    state = torch.zeros(batch, cell.state_size, dtype=F64)
    if initial == "unit":
        output = cell.output_size
        state[:, :output] = uniform_in(-1.0, 1.0, (batch, output), gen)
    elif initial == "any" and draw(st.booleans(), label="nonzero s0"):
        state = uniform_in(-1.5, 1.5, (batch, cell.state_size), gen)
    elif initial not in ("zero", "any"):
        raise ValueError(initial)
    return SequenceSystem.build(cell, inputs, state)


# -- norms and boxes, written from the docstring -------------------------------------------------
def is_lstm(cell: Cell) -> bool:
    return cell.kind == "lstm"


def norm_of(cell: Cell, values: Tensor, norm: str) -> Tensor:
    """``‖v‖`` per state ``(..., S) → (...)``; LSTM ``max(‖h‖, ‖c‖)``."""

    def vector(x: Tensor) -> Tensor:
        return x.abs().amax(-1) if norm == "inf" else torch.linalg.vector_norm(x, dim=-1)

    if is_lstm(cell):
        output = cell.output_size
        return torch.maximum(vector(values[..., :output]), vector(values[..., output:]))
    return vector(values)


def operator_norm(cell: Cell, jacobians: Tensor, norm: str) -> Tensor | None:
    """The exact induced norm of ``J (..., S, S)``, where it is cheap: any non-LSTM cell, and
    LSTM in ∞ (``max(‖h‖_∞, ‖c‖_∞) = ‖s‖_∞``).  None for LSTM in 2."""
    if norm == "inf":
        return jacobians.abs().sum(-1).amax(-1)
    if is_lstm(cell):
        return None
    return torch.linalg.matrix_norm(jacobians, ord=2)


def predecessor_box(system: SequenceSystem) -> tuple[Tensor, Tensor]:
    """``(lo, hi)``, each ``(T, B, S)``: the box of the predecessor state of entry ``t``
    (``s_0`` for ``t = 0``, ``S[t − 1]`` after), as the module docstring states it."""
    cell = system.cell
    p = system.projected_inputs
    s0 = system.initial_state
    steps, batch, size = system.state_shape
    hidden = cell.hidden_size
    if cell.kind == "elman" and cell.nonlinearity == "relu":
        positive, negative = cell.weight_hh.clamp(min=0), cell.weight_hh.clamp(max=0)
        lo = hi = s0
        los, his = [], []
        for t in range(steps):
            los.append(lo)
            his.append(hi)
            pre_hi = p[t] + hi @ positive.T + lo @ negative.T
            lo, hi = torch.zeros_like(pre_hi), pre_hi.clamp(min=0)
        return torch.stack(los), torch.stack(his)
    output = cell.output_size
    # |h| ≤ 1, or with a projection |h_j| ≤ Σ_k |W_hr[j, k]| (|o ⊙ tanh c| ≤ 1).
    least = 1.0 if getattr(cell, "weight_hr", None) is None else float(cell.weight_hr.abs().sum(-1).max())
    rho = s0[:, :output].abs().amax(-1).clamp(min=least)[None, :, None]  # (1, B, 1)
    h_hi = rho.expand(steps, batch, output)
    if not is_lstm(cell):
        return -h_hi, h_hi
    reach = rho * cell.weight_hh.abs().sum(-1)  # (1, B, 4H)
    pre_lo, pre_hi = p - reach, p + reach
    i_hi = torch.sigmoid(pre_hi[..., :hidden])
    f_hi = torch.sigmoid(pre_hi[..., hidden : 2 * hidden])
    g_abs = torch.maximum(
        torch.tanh(pre_lo[..., 2 * hidden : 3 * hidden]).abs(), torch.tanh(pre_hi[..., 2 * hidden : 3 * hidden]).abs()
    )
    c_range = s0[:, output:].abs()
    ranges = []
    for t in range(steps):
        ranges.append(c_range)
        c_range = f_hi[t] * c_range + i_hi[t] * g_abs[t]
    c_hi = torch.stack(ranges)
    return torch.cat((-h_hi, -c_hi), -1), torch.cat((h_hi, c_hi), -1)


def previous_states(system: SequenceSystem, states: Tensor) -> Tensor:
    return torch.cat((system.initial_state.unsqueeze(0), states[:-1]))


def within(bound: Tensor, value: Tensor, rel: float = 1e-10, abs_: float = 1e-12) -> Tensor:
    """``value ≤ bound`` up to rounding of the bound's arithmetic."""
    return value <= bound * (1 + rel) + abs_


# -- (a) sampled Lipschitz ratios never exceed the certified bound ---------------------------------
def _ratios(cell: Cell, s: Tensor, s2: Tensor, p: Tensor, norm: str) -> tuple[Tensor, Tensor, Tensor]:
    """Numerator, denominator, and the size of the rounding error of the numerator."""
    image, image2 = cell.step(s, p), cell.step(s2, p)
    numerator = norm_of(cell, image - image2, norm)
    rounding = 64 * torch.finfo(F64).eps * (
        norm_of(cell, image, norm) + norm_of(cell, image2, norm) + norm_of(cell, s, norm) + norm_of(cell, s2, norm)
    )
    return numerator, norm_of(cell, s - s2, norm), rounding.detach()


PAIRS = 8
ASCENT_STEPS = 10


@fast(50)
@given(system=small_systems(initial="any"), norm=st.sampled_from(NORMS), seed=SEEDS)
def test_sampled_ratios_never_exceed_certified_bound(system, norm, seed):
    """No pair ``s, s'`` in the box (uniform pairs, near pairs, and both pushed to the worst case
    by projected gradient ascent on the ratio) beats ``L_t``; nor does ``‖J(s)‖`` at any sample."""
    cell = system.cell
    steps, batch, size = system.state_shape
    lipschitz = certified_step_bounds(system, norm).lipschitz
    assert lipschitz.shape == (steps, batch)
    assert bool(torch.isfinite(lipschitz).all()) and bool((lipschitz >= 0).all())
    lo, hi = predecessor_box(system)

    # The box is the module's claim; the exact solution must lie in it (else the test is moot).
    previous = previous_states(system, system.sequential())
    assert bool((previous >= lo - 1e-12).all()) and bool((previous <= hi + 1e-12).all())

    # Entry 0: at the given s_0.
    at_s0 = operator_norm(cell, cell.jacobian(system.initial_state, system.projected_inputs[0]), norm)
    if at_s0 is not None:
        assert bool(within(lipschitz[0], at_s0).all()), (at_s0, lipschitz[0])

    # Entries t ≥ 1: pairs in the box of s_{t−1}.
    gen = generator(seed)
    lo, hi = lo[1:].expand(2 * PAIRS, -1, -1, -1), hi[1:].expand(2 * PAIRS, -1, -1, -1)
    bound = lipschitz[1:].expand(2 * PAIRS, -1, -1)  # (N, T − 1, B)
    projected = system.projected_inputs[1:].expand(2 * PAIRS, -1, -1, -1)
    width = hi - lo
    s = lo + width * torch.rand(lo.shape, generator=gen, dtype=F64)
    far = lo + width * torch.rand(lo.shape, generator=gen, dtype=F64)
    near = s + 1e-3 * width * torch.randn(lo.shape, generator=gen, dtype=F64)
    s2 = torch.cat((far[:PAIRS], near[PAIRS:])).clamp(min=lo, max=hi)

    worst = 0.0
    for k in range(ASCENT_STEPS + 1):
        s = s.detach().requires_grad_(True)
        s2 = s2.detach().requires_grad_(True)
        numerator, denominator, rounding = _ratios(cell, s, s2, projected, norm)
        ok = denominator > 1e-9
        ratio = torch.where(ok, numerator / denominator.clamp(min=1e-300), torch.zeros_like(numerator)).detach()
        # Slack: rounding of f(s) − f(s') relative to ‖s − s'‖ (near pairs), and of the bound.
        slack = bound * 1e-9 + rounding / denominator.detach().clamp(min=1e-300)
        excess = torch.where(ok, ratio - bound - slack, torch.zeros_like(ratio))
        if bool((excess > 0).any()):
            index = tuple(int(i) for i in (excess == excess.max()).nonzero()[0])
            raise AssertionError(
                f"ascent step {k}: ratio {float(ratio[index]):.6g} > certified L_t = {float(bound[index]):.6g} "
                f"at (pair, t, b) = ({index[0]}, {index[1] + 1}, {index[2]}); "
                f"s = {s[index].tolist()}, s' = {s2[index].tolist()}"
            )
        positive = bound > 0
        if bool((ok & positive).any()):
            worst = max(worst, float((ratio / bound.clamp(min=1e-300))[ok & positive].max()))
        # Analytic ‖J(s)‖ at every sample, where the induced norm is exact.
        for sample in (s, s2):
            jnorm = operator_norm(cell, cell.jacobian(sample.detach(), projected), norm)
            if jnorm is not None:
                assert bool(within(bound, jnorm, rel=1e-9).all()), float((jnorm - bound).max())
        if k == ASCENT_STEPS:
            break
        objective = torch.where(
            ok, torch.log(numerator.clamp(min=1e-300)) - torch.log(denominator.clamp(min=1e-300)), torch.zeros_like(ratio)
        ).sum()
        grad_s, grad_s2 = torch.autograd.grad(objective, (s, s2))
        # Normalised steps proportional to the pair's distance, so near pairs stay near.
        distance = (s - s2).detach().abs().amax(-1, keepdim=True)
        rate = 0.3 * 0.85**k * distance

        def move(x: Tensor, grad: Tensor) -> Tensor:
            direction = grad / grad.abs().amax(-1, keepdim=True).clamp(min=1e-300)
            return (x.detach() + rate * direction).clamp(min=lo, max=hi)

        s, s2 = move(s, grad_s), move(s2, grad_s2)
    note(f"worst ratio / L_t = {worst:.4f}")
    target(worst, label="worst ratio / L_t")


@fast(100)
@given(system=small_systems(initial="unit", max_len=10, max_batch=3, max_hidden=8), norm=st.sampled_from(NORMS))
def test_global_bound_dominates_every_conditional_entry(system, norm):
    """``certified_global_bound`` ≥ every entry of the data-conditional bound (states in the
    box of ``h_0 ∈ [−1, 1]``, ``c_0 = 0``); Elman: ``‖W_hh‖`` exactly; GRU/LSTM ≥ 1."""
    cell = system.cell
    global_bound = certified_global_bound(cell, norm, seq_len=system.seq_len)
    conditional = certified_step_bounds(system, norm).lipschitz
    assert math.isfinite(global_bound)
    assert bool(within(torch.tensor(global_bound, dtype=F64), conditional, rel=1e-12).all()), (
        global_bound,
        float(conditional.max()),
    )
    if cell.kind == "elman":
        w = cell.weight_hh
        expected = float(w.abs().sum(-1).max()) if norm == "inf" else float(torch.linalg.matrix_norm(w, ord=2))
        # exactly ‖W_hh‖, rounded outward: never below it, above it by the outward factor only
        assert expected <= global_bound <= expected * (1 + 1e-10)
    else:
        assert global_bound >= 1.0
    report = analyze(system, norm, atol=1e-12)
    assert report.global_bound == global_bound


def test_gru_global_bound_is_never_below_one_by_rounding():
    """Regression: the ∞-norm GRU bound maximises ``coupled + (1 − coupled + tilt)·z − tilt·z²``
    over ``z ∈ [0, 1]``; at ``z = 1`` that is 1 in exact arithmetic but can round to ``1 − 2ulp``.
    A global bound below 1 makes ``analyze`` call a GRU "contractive" for every input."""
    cell = make_cell("gru", "tanh", 1, 2, scale=1.0, seed=32)
    bound = certified_global_bound(cell, "inf")
    assert bound >= 1.0, repr(bound)
    system = SequenceSystem.build(cell, torch.randn(6, 1, 2, generator=generator(1), dtype=F64))
    assert analyze(system, "inf", atol=1e-12).verdict != "contractive"


def test_lstm_global_bound_needs_seq_len_and_grows_with_it():
    cell = make_cell("lstm", "tanh", 4, 2, scale=1.0, seed=3)
    with pytest.raises(InputError):
        certified_global_bound(cell, "2")
    for norm in NORMS:
        values = [certified_global_bound(cell, norm, seq_len=n) for n in (1, 2, 5, 20)]
        assert all(v >= 1 for v in values)
        assert values == sorted(values)


# -- (b) the a-posteriori bound holds at every Picard iteration ------------------------------------
@st.composite
def contractive_systems(draw):
    kind = draw(st.sampled_from([("elman", "tanh"), ("elman", "relu"), ("gru", "tanh")]), label="cell")
    low, high = (0.3, 0.8) if kind[0] == "elman" else (0.1, 0.6)
    return draw(small_systems(kinds=(kind,), min_scale=low, max_scale=high, min_len=4, max_len=20, max_batch=3,
                        max_hidden=8, initial="unit"))


@fast(50)
@given(system=contractive_systems(), norm=st.sampled_from(NORMS))
def test_a_posteriori_bound_holds_at_every_picard_iteration(system, norm):
    cell = system.cell
    exact = system.sequential()
    for k in range(1, system.seq_len + 1):
        solution = solve(system, Picard(), max_steps=k, throw=False, certify=norm)
        stats = solution.stats
        if stats.lipschitz_certified is None:
            event("not certified")
            assert stats.error_bound is None
            return
        assert 0 <= stats.lipschitz_certified < 1
        assert stats.error_bound is not None and stats.error_bound.shape == (system.batch,)
        error = norm_of(cell, solution.value - exact, norm).amax(0)  # (B,)
        assert bool((error <= stats.error_bound + 1e-12).all()), (k, error.tolist(), stats.error_bound.tolist())
        if solution.converged:
            event(f"certified, converged at k = {k} ≤ T = {system.seq_len}")
            return


def test_a_posteriori_bound_example_is_certified_and_tight_enough():
    """A deterministic case that is certified, so the property above is never vacuous."""
    cell = make_cell("elman", "tanh", 4, 2, scale=0.5, seed=11)
    inputs = torch.randn(12, 2, 2, generator=generator(12), dtype=F64)
    system = SequenceSystem.build(cell, inputs)
    exact = system.sequential()
    for norm in NORMS:
        for k in range(1, 6):
            stats = solve(system, Picard(), max_steps=k, throw=False, certify=norm).stats
            assert stats.lipschitz_certified is not None and stats.error_bound is not None
            error = norm_of(cell, solve(system, Picard(), max_steps=k, throw=False).value - exact, norm).amax(0)
            assert bool((error <= stats.error_bound + 1e-12).all())
            assert bool((stats.error_bound > 0).all())


# -- (c) observed Picard iterations ≤ predicted --------------------------------------------------------
def wavefront_bound(lipschitz: Tensor, state_norm: Tensor, k: int) -> Tensor:
    """``E_k(t) = (Π_{u=t−k+1..t} L_u)·‖s*_{t−k}‖`` (0 for ``t < k``): ``‖S^k_t − s*_t‖`` after ``k``
    sweeps from zero (DESIGN §1), with 0-based positions, ``(T, B)``."""
    steps = lipschitz.shape[0]
    if k == 0:
        return state_norm.clone()
    bound = torch.zeros_like(state_norm)
    if k < steps:
        windows = lipschitz.unfold(0, k, 1)  # (T − k + 1, B, k): window j holds L_j … L_{j+k−1}
        bound[k:] = windows[1:].prod(-1) * state_norm[: steps - k]
    return bound


@fast(70)
@given(
    system=st.one_of(  # any scale in [0.25, 4], and often a small one, where the prediction bites
        small_systems(min_len=1, max_len=40, max_batch=3, max_hidden=8, initial="any"),
        small_systems(max_scale=0.8, min_len=1, max_len=40, max_batch=3, max_hidden=8, initial="any"),
    ),
    norm=st.sampled_from(NORMS),
    atol=st.sampled_from([None, 1e-6]),
)
def test_observed_picard_iterations_never_exceed_predicted(system, norm, atol):
    cell = system.cell
    steps, batch, _ = system.state_shape
    exact = system.sequential()
    bounds = certified_step_bounds(system, norm)
    # state_norm bounds the exact states (the initial error of Picard from zero).
    assert bool(within(bounds.state_norm, norm_of(cell, exact, norm)).all())
    magnitude = 1 + float(norm_of(cell, exact, norm).max())
    violations: list[str] = []

    def check_wavefront(iteration: int, iterate: Tensor, image: Tensor) -> None:
        bound = wavefront_bound(bounds.lipschitz, bounds.state_norm, iteration - 1)
        error = norm_of(cell, iterate - exact, norm)
        bad = ~(error <= bound * (1 + 1e-9) + 1e-12 * magnitude)
        if bool(bad.any()):
            t, b = (int(i) for i in bad.nonzero()[0])
            violations.append(f"iterate {iteration - 1}, t={t}, b={b}: error {float(error[t, b]):.3g} > {float(bound[t, b]):.3g}")

    solver = Picard(atol=atol)
    solution = solve(system, solver, throw=False, certify=norm, callback=check_wavefront)
    assert not violations, violations[:3]
    assert solution.converged
    stats = solution.stats
    predicted = stats.predicted_iterations
    assert predicted is not None and predicted.shape == (batch,)
    assert bool((predicted >= 1).all()) and bool((predicted <= steps).all())
    rtol, used_atol = solver.tolerances(F64)
    assert torch.equal(predicted, predicted_picard_iterations(bounds, used_atol))
    event(f"predicted − observed: {int(predicted.max()) - stats.iterations}")
    assert stats.iterations <= int(predicted.max()), (stats.iterations, predicted.tolist())
    # Per sample: the first iteration at which sample b passed the test (else the end).
    passed = stats.residual_history < 1  # (k, B)
    for b in range(batch):
        hits = passed[:, b].nonzero()
        first = int(hits[0]) + 1 if hits.numel() else stats.iterations
        assert first <= int(predicted[b]), (b, first, predicted.tolist())


# -- (d) analytic Jacobians ---------------------------------------------------------------------------
def random_states(cell: Cell, count: int, gen: torch.Generator) -> Tensor:
    """Any states (the Jacobian identity does not need the box): h ∈ [−2, 2], LSTM c ∈ [−3, 3]."""
    states = uniform_in(-2.0, 2.0, (count, cell.state_size), gen)
    if is_lstm(cell):
        states[:, cell.hidden_size :] *= 1.5
    return states


@fast(80)
@given(
    cell_kind=st.sampled_from(CELLS),
    hidden=st.integers(1, 8),
    input_size=st.integers(1, 3),
    scale=st.floats(0.25, 4.0),
    bias=st.booleans(),
    seed=SEEDS,
)
def test_jacobian_matches_torch_func(cell_kind, hidden, input_size, scale, bias, seed):
    cell = make_cell(*cell_kind, hidden, input_size, scale=scale, seed=seed, bias=bias)
    gen = generator(seed + 1)
    states = random_states(cell, 6, gen)
    projected = cell.input_projection(2 * torch.randn(6, input_size, generator=gen, dtype=F64))
    if cell_kind[1] == "relu":  # keep away from the kink
        assume(bool((cell.preactivation(states, projected).abs() > 1e-6).all()))
    analytic = cell.jacobian(states, projected)
    automatic = torch.func.vmap(torch.func.jacrev(cell.step))(states, projected)
    assert analytic.shape == automatic.shape == (6, cell.state_size, cell.state_size)
    difference = float((analytic - automatic).abs().max())
    assert difference <= 1e-12 * max(1.0, float(automatic.abs().max())), difference
    # Any leading shape: (T, B, S) → (T, B, S, S), the same numbers.
    shaped = cell.jacobian(states.view(2, 3, -1), projected.view(2, 3, -1))
    assert shaped.shape == (2, 3, cell.state_size, cell.state_size)
    assert float((shaped.reshape(analytic.shape) - analytic).abs().max()) <= 1e-14 * max(1.0, float(analytic.abs().max()))


def _sympy_cell(cell: Cell, x_value: Tensor) -> tuple[list, list]:
    """torch.nn's equations (DESIGN §1) written in sympy for ``H = 2``, ``I = 1``, from the raw
    weights and biases: ``(outputs, state symbols)``."""

    def number(v) -> sympy.Float:
        return sympy.Float(float(v), 30)

    hidden = cell.hidden_size
    rows = cell.weight_hh.shape[0]
    w_ih = [[number(cell.weight_ih[i, j]) for j in range(cell.input_size)] for i in range(rows)]
    w_hh = [[number(cell.weight_hh[i, j]) for j in range(hidden)] for i in range(rows)]
    b_ih = [number(v) for v in cell.bias_ih] if cell.bias_ih is not None else [0] * rows
    b_hh = [number(v) for v in cell.bias_hh] if cell.bias_hh is not None else [0] * rows
    x = [number(v) for v in x_value]
    h = list(sympy.symbols(f"h0:{hidden}", real=True))
    c = list(sympy.symbols(f"c0:{hidden}", real=True))
    from_input = [sum(w_ih[i][j] * x[j] for j in range(len(x))) + b_ih[i] for i in range(rows)]
    from_hidden = [sum(w_hh[i][j] * h[j] for j in range(hidden)) + b_hh[i] for i in range(rows)]

    def sigmoid(a):
        return 1 / (1 + sympy.exp(-a))

    def gate(k: int) -> list:  # W_i· x + b_i· + W_h· h + b_h· of gate block k
        return [from_input[k * hidden + j] + from_hidden[k * hidden + j] for j in range(hidden)]

    if cell.kind == "elman":
        pre = gate(0)
        phi = sympy.tanh if cell.nonlinearity == "tanh" else (lambda a: sympy.Max(0, a))
        return [phi(a) for a in pre], h
    if cell.kind == "gru":
        r = [sigmoid(a) for a in gate(0)]
        z = [sigmoid(a) for a in gate(1)]
        n = [
            sympy.tanh(from_input[2 * hidden + j] + r[j] * from_hidden[2 * hidden + j]) for j in range(hidden)
        ]
        return [(1 - z[j]) * n[j] + z[j] * h[j] for j in range(hidden)], h
    i, f, g, o = (
        [sigmoid(a) for a in gate(0)],
        [sigmoid(a) for a in gate(1)],
        [sympy.tanh(a) for a in gate(2)],
        [sigmoid(a) for a in gate(3)],
    )
    c_next = [f[j] * c[j] + i[j] * g[j] for j in range(hidden)]
    h_next = [o[j] * sympy.tanh(c_next[j]) for j in range(hidden)]
    return h_next + c_next, h + c


@pytest.mark.parametrize("cell_kind", CELLS, ids=CELL_IDS)
@fast(6)
@given(scale=st.floats(0.25, 4.0), bias=st.booleans(), seed=SEEDS)
def test_jacobian_matches_sympy(cell_kind, scale, bias, seed):
    cell = make_cell(*cell_kind, 2, 1, scale=scale, seed=seed, bias=bias)
    gen = generator(seed + 1)
    state = random_states(cell, 1, gen)[0]
    x = 2 * torch.randn(1, generator=gen, dtype=F64)
    projected = cell.input_projection(x.view(1, 1))[0]
    if cell_kind[1] == "relu":
        assume(bool((cell.preactivation(state.view(1, -1), projected.view(1, -1)).abs() > 1e-3).all()))
    outputs, symbols = _sympy_cell(cell, x)
    values = {sym: sympy.Float(float(v), 30) for sym, v in zip(symbols, state)}
    expected_step = torch.tensor([float(e.subs(values).evalf(30)) for e in outputs], dtype=F64)
    jacobian = sympy.Matrix(outputs).jacobian(symbols)
    expected = torch.tensor(
        [[float(jacobian[i, j].subs(values).evalf(30)) for j in range(len(symbols))] for i in range(len(outputs))],
        dtype=F64,
    )
    assert float((cell.step(state, projected) - expected_step).abs().max()) <= 1e-12
    analytic = cell.jacobian(state.view(1, -1), projected.view(1, -1))[0]
    assert float((analytic - expected).abs().max()) <= 1e-12 * max(1.0, float(expected.abs().max())), (
        analytic,
        expected,
    )


# -- (e) estimates along the solution never exceed the certified bounds -----------------------------
def test_lstm_inf_estimate_is_the_induced_norm():
    """Regression: for LSTM in ∞, ``max(‖h‖_∞, ‖c‖_∞) = ‖s‖_∞``, so ``‖J‖`` is the largest row sum
    of the full ``J``.  The estimate instead adds the block norms ``‖J_hh‖_∞ + ‖J_hc‖_∞`` (maxima
    over different rows), which exceeds both the induced norm and the certified bound."""
    cell = make_cell("lstm", "tanh", 2, 3, scale=2.0, seed=18)
    system = SequenceSystem.build(cell, 1.5 * torch.randn(6, 3, 3, generator=generator(19), dtype=F64))
    exact = system.sequential()
    estimated = estimated_step_norms(system, exact, "inf")
    induced = cell.jacobian(previous_states(system, exact), system.projected_inputs).abs().sum(-1).amax(-1)
    certified = certified_step_bounds(system, "inf").lipschitz
    assert bool(within(certified, induced).all())  # the certified bound itself is fine
    torch.testing.assert_close(estimated, induced, rtol=1e-12, atol=1e-15)
    assert bool(within(certified, estimated).all())


@fast(70)
@given(system=small_systems(min_len=1, max_len=20, max_batch=3, max_hidden=8, initial="any"), norm=st.sampled_from(NORMS))
def test_estimated_step_norms_below_certified_bounds(system, norm):
    cell = system.cell
    steps, batch, _ = system.state_shape
    exact = system.sequential()
    estimated = estimated_step_norms(system, exact, norm)
    certified = certified_step_bounds(system, norm).lipschitz
    assert estimated.shape == certified.shape == (steps, batch)
    # t ≥ 1 (the claim); entry 0 is at s_0 for both, so it must hold there as well.
    assert bool(within(certified[1:], estimated[1:], rel=1e-12).all()), float((estimated - certified)[1:].max())
    assert bool(within(certified[:1], estimated[:1], rel=1e-12).all())
    jacobians = cell.jacobian(previous_states(system, exact), system.projected_inputs)
    direct = operator_norm(cell, jacobians, norm)
    if not is_lstm(cell):
        assert direct is not None
        torch.testing.assert_close(estimated, direct, rtol=1e-12, atol=1e-15)
    elif direct is not None:  # LSTM in ∞: the block form bounds the induced norm from above
        assert bool(within(estimated, direct, rel=1e-12).all())
    report = analyze(system, norm, atol=1e-12, states=exact)
    if steps > 1:
        assert report.estimated == pytest.approx(float(estimated[1:].max()), rel=1e-14)
        assert report.conditional_bound == pytest.approx(float(certified[1:].max()), rel=1e-14)
    else:
        assert report.estimated is None


# -- spectral normalisation ------------------------------------------------------------------------
@pytest.mark.parametrize("kind,nonlinearity", [("elman", "tanh"), ("elman", "relu"), ("gru", "tanh"), ("lstm", "tanh")])
@pytest.mark.parametrize("norm", ["2", "inf"])
def test_scale_to_certified_bound_on_inputs(kind, nonlinearity, norm):
    cell = Network.random(kind, 3, 6, nonlinearity=nonlinearity, scale=3.0, seed=4).cells[0][0]
    inputs = randn(30, 2, 3, seed=5)
    target = 0.9
    try:
        scaled, factor = scale_to_certified_bound(cell, target, norm, inputs=inputs)
    except InputError as error:  # honest refusal: even W_hh = 0 is above the target
        assert "even W_hh = 0" in str(error)
        return
    bound = float(certified_step_bounds(SequenceSystem.build(scaled, inputs), norm).lipschitz[1:].max())
    assert bound <= target
    assert bound >= target * (1 - 1e-6) or factor == 0
    torch.testing.assert_close(scaled.weight_hh, cell.weight_hh * factor, rtol=0, atol=0)


def test_scale_to_certified_bound_global():
    elman = Network.random("elman", 3, 6, scale=3.0, seed=4).cells[0][0]
    scaled, _ = scale_to_certified_bound(elman, 0.5, "2")
    assert abs(certified_global_bound(scaled, "2") - 0.5) < 1e-12
    gru = Network.random("gru", 3, 6, seed=4).cells[0][0]
    with pytest.raises(InputError, match="data-conditional"):
        scale_to_certified_bound(gru, 0.5, "2")


@settings(max_examples=20, deadline=None)
@given(cell=st.sampled_from(["elman", "gru", "lstm"]), scale=st.floats(0.5, 4.0), input_scale=st.floats(0.1, 10.0),
       initial=st.sampled_from([0.0, 0.5, 2.0]), seed=st.integers(0, 1000))
def test_report_takes_the_smaller_certified_bound_where_the_global_one_applies(cell, scale, input_scale, initial, seed):
    """Per step, the report's L_t is min(data-conditional L_t, global bound) when the global bound
    covers this s_0 (Elman always; GRU for |s_0| ≤ 1; LSTM for s_0 = 0), else the conditional
    L_t unchanged: so the bound for the given inputs never exceeds the bound for every input."""
    network = Network.random(cell, 3, 5, scale=scale, seed=seed)
    unit = network.cells[0][0]
    inputs = input_scale * torch.randn(20, 2, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    system = SequenceSystem.build(unit, inputs, torch.full((2, unit.state_size), initial, dtype=torch.float64))
    raw = certified_step_bounds(system, "2").lipschitz
    global_bound = certified_global_bound(unit, "2", seq_len=20)
    report = analyze(system, "2", atol=1e-12)
    applies = cell == "elman" or (cell == "gru" and initial <= 1) or (cell == "lstm" and initial == 0)
    assert global_bound_applies(system) == applies
    expected = raw.clamp(max=global_bound) if applies else raw
    assert torch.equal(report.conditional_steps, expected)
    if applies:
        assert report.conditional_bound <= global_bound


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("seq_len", [1, 2, 9, 40])
def test_global_bound_from_one_step_is_the_largest_over_all_steps(kind, norm, seq_len):
    """With unbounded inputs the last step's bound is the largest (LSTM's c range grows with t;
    nothing else changes): the one-step evaluation equals the maximum over every step."""
    from fixedpoint.contraction import _step_bounds

    cell = Network.random(kind, 3, 5, scale=2.0, seed=seq_len).cells[0][0]
    wide = cell.to(dtype=F64)  # certified bounds are evaluated in float64 whatever the model's dtype
    steps = seq_len if kind == "lstm" else 1
    lo = torch.full((steps, 1, cell.gate_count * cell.hidden_size), -math.inf, dtype=F64)
    every_step = _step_bounds(wide, (lo, -lo), torch.zeros(1, cell.state_size, dtype=F64), norm).lipschitz
    operations = seq_len + cell.gate_count * cell.hidden_size * cell.state_size
    expected = max(1.0, float(outward(every_step.max(), operations)))
    # Equal up to the rounding of the norms themselves: a batch of matrices and a single one may
    # take different LAPACK paths (the 2-norm's SVD differs in the last bits between machines).
    assert math.isclose(certified_global_bound(cell, norm, seq_len=seq_len), expected, rel_tol=1e-12)


@pytest.mark.parametrize("norm", NORMS)
def test_lstm_step_norm_estimates_use_the_diagonal_blocks_exactly(norm):
    network = Network.random("lstm", 3, 6, scale=2.0, seed=1)
    system = SequenceSystem.build(network.cells[0][0], randn(20, 2, 3, seed=2))
    states = system.sequential()
    previous = torch.cat((system.initial_state.unsqueeze(0), states[:-1]))
    jacobians = system.cell.jacobian(previous, system.projected_inputs)
    from fixedpoint.contraction import operator_norms

    torch.testing.assert_close(estimated_step_norms(system, states, norm), operator_norms(jacobians, norm, 6))


@pytest.mark.parametrize("kind", ["elman", "gru", "lstm"])
@pytest.mark.parametrize("norm", NORMS)
def test_certified_bounds_of_a_float32_model_are_evaluated_in_float64_and_rounded_outward(kind, norm):
    """A float32 model's bounds are those of its exact float64 copy (float32 → float64 is exact),
    rounded outward: above the float64 evaluation by no more than the outward factor."""
    network = Network.random(kind, 3, 6, scale=1.5, seed=4, dtype=torch.float32)
    single = SequenceSystem.build(network.cells[0][0], randn(12, 2, 3, seed=5, dtype=torch.float32))
    wide = SequenceSystem.build(network.cells[0][0].to(dtype=F64), single.inputs.double())
    torch.testing.assert_close(certified_step_bounds(single, norm).lipschitz, certified_step_bounds(wide, norm).lipschitz,
                               rtol=0, atol=0)
    assert certified_step_bounds(single, norm).lipschitz.dtype == F64
    assert certified_global_bound(network.cells[0][0], norm, seq_len=12) == certified_global_bound(
        wide.cell, norm, seq_len=12)
    if kind == "elman":
        w = wide.cell.weight_hh
        exact = float(w.abs().sum(-1).max() if norm == "inf" else torch.linalg.matrix_norm(w, ord=2))
        assert exact < certified_global_bound(network.cells[0][0], norm) <= exact * (1 + 1e-10)


@pytest.mark.parametrize("kind", ["elman", "gru"])
def test_largest_step_norm_ranked_matrix_free_is_the_exact_maximum(kind, monkeypatch):
    # Large states rank the steps by matrix-free power sweeps and take exact SVDs of the best:
    # with every step a candidate it is the exact maximum; with few, never above it.
    import fixedpoint.contraction as contraction

    network = Network.random(kind, 3, 12, scale=2.0, seed=5)
    system = SequenceSystem.build(network.cells[0][0], 2.0 * torch.randn(25, 3, 3, generator=generator(6), dtype=F64))
    states = system.sequential()
    exact = float(estimated_step_norms(system, states, "2")[1:].max())
    monkeypatch.setattr(contraction, "RANKED_NORM_MIN_STATE", 4)
    monkeypatch.setattr(contraction, "RANKED_CANDIDATES", 24 * 3)
    assert contraction.estimated_largest_step_norm(system, states, "2") == pytest.approx(exact, rel=1e-12)
    monkeypatch.setattr(contraction, "RANKED_CANDIDATES", 3)
    assert contraction.estimated_largest_step_norm(system, states, "2") <= exact * (1 + 1e-12)
    with pytest.raises(InputError, match="T ≥ 2"):
        contraction.estimated_largest_step_norm(SequenceSystem.build(system.cell, system.inputs[:1]), states[:1])
