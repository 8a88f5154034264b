"""Properties of the system F and of the driver loop, checked on random cells with hypothesis.

Random cells: kind ∈ {elman tanh, elman relu, gru, lstm}, H ∈ [2, 8], W_hh scaled by
``scale`` (the contraction knob), inputs and weights from explicit generators seeded by
hypothesis-drawn integers.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from helpers import CELLS, SOLVER_CHOICES, randn, solver_systems
from fixedpoint import Anderson, Network, Newton, Picard, QuasiNewton, Result, Sequential, SequenceSystem, solve, solve_network
from fixedpoint.forward_error import correction_and_residual

# max_examples, deadline and health checks come from the profile loaded in conftest.py.
SETTINGS = settings()

def close(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest ``|a − e| / max(1, |e|)``: absolute for O(1) states, relative for large relu states."""
    return float(((actual - expected).abs() / expected.abs().clamp(min=1.0)).max()) if actual.numel() else 0.0


def scaled_residual(system: SequenceSystem, value: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    """``|F(S) − S| / (atol + rtol·|F(S)|)`` elementwise, ``(T, B, S)``."""
    image = system.apply(value)
    return (image - value).abs() / (atol + rtol * image.abs())


def term_magnitudes(system: SequenceSystem, value: torch.Tensor) -> torch.Tensor:
    """``(T, B, S)``: per unit, the largest sum of absolute terms that evaluating ``f`` adds,
    ``|W_ih||x_t| + |W_hh||h_{t−1}| + |b_ih| + |b_hh|`` over the unit's gates (and ``|c_{t−1}|`` for
    an LSTM's memory), at least 1: the scale of the rounding of ``F(S)``."""
    cell = system.cell
    previous = torch.cat((system.initial_state.unsqueeze(0), value[:-1]), dim=0)
    hidden = cell.hidden_of(previous).abs()
    terms = system.inputs.abs() @ cell.weight_ih.abs().T + hidden @ cell.weight_hh.abs().T
    if cell.bias_ih is not None:
        terms = terms + cell.bias_ih.abs() + cell.bias_hh.abs()
    per_unit = terms.view(*terms.shape[:2], -1, cell.hidden_size).amax(2)
    if cell.kind == "lstm":
        per_unit = torch.cat((per_unit, per_unit + previous[..., cell.hidden_size :].abs()), dim=-1)
    return per_unit.clamp(min=1.0)


def lipschitz_rows(system: SequenceSystem, value: torch.Tensor) -> torch.Tensor:
    """Row sums ``K_{t,b,j}`` with ``|f(s)_j − f(s')_j| ≤ K_{t,b,j}·‖s − s'‖_∞`` near ``s = S_{t−1}``.

    Elman: ``φ`` is 1-Lipschitz, so ``K = Σ_i |W_hh|_{j,i}`` everywhere.  GRU/LSTM: the row
    sums of ``|∂f/∂s|`` at the previous state (the solve's iterate is within ~1e-12 of it).
    """
    cell = system.cell
    previous = torch.cat((system.initial_state.unsqueeze(0), value[:-1]), dim=0)
    if cell.kind == "elman":
        rows = cell.weight_hh.abs().sum(-1)  # (H,)
        return rows.expand(previous.shape)
    flat_state = previous.reshape(-1, previous.shape[-1])
    flat_input = system.projected_inputs.reshape(-1, system.projected_inputs.shape[-1])
    jacobian = torch.func.vmap(torch.func.jacrev(cell.step))(flat_state, flat_input)  # (N, S, S)
    return jacobian.abs().sum(-1).reshape(previous.shape)


# -- (a) finite termination ----------------------------------------------------------------------
@SETTINGS
@given(system=solver_systems(), data=st.data())
def test_finite_termination(system, data):
    """After k Jacobi sweeps from S⁰ = 0 the first k positions are exact, whatever the weights."""
    steps = system.seq_len
    k = data.draw(st.integers(0, steps), label="k")
    exact = system.sequential()
    iterate = torch.zeros(system.state_shape, dtype=exact.dtype)
    for _ in range(k):
        iterate = system.apply(iterate)
    assert close(iterate[:k], exact[:k]) <= 1e-12
    # The driver's Picard with max_steps = k lands on the same sweep F^k(0).
    if k >= 1:
        solution = solve(system, Picard(), max_steps=k, throw=False)
        event(solution.result.name)
        prefix = min(solution.stats.exact_prefix, k)
        assert close(solution.value[:prefix], exact[:prefix]) <= 1e-12
        # Positions past the exact prefix of a solve that stopped by its tolerance are within the
        # tolerance (the driver's forward-error check refines them otherwise), up to its estimate's slack.
        rest = (solution.value[prefix:k] - exact[prefix:k]).abs()
        assert bool((rest <= 2 * (1e-12 + 1e-12 * exact[prefix:k].abs()) + 1e-15).all())
        if solution.result is Result.max_steps_reached:
            assert solution.stats.iterations == k
            assert solution.stats.exact_prefix == k
            assert close(solution.value, iterate) <= 1e-12
        else:  # converged by tolerance at some j ≤ k, or all T positions exact
            assert solution.result is Result.successful
            assert solution.stats.iterations <= k


@SETTINGS
@given(system=solver_systems(max_len=20))
def test_t_sweeps_are_exact_for_any_scale(system):
    """F^T(0) is the sequential solution: every position, including the last."""
    iterate = torch.zeros(system.state_shape, dtype=system.initial_state.dtype)
    for _ in range(system.seq_len):
        iterate = system.apply(iterate)
    assert close(iterate, system.sequential()) <= 1e-12
    # ... and it is a fixed point: one more sweep changes nothing beyond rounding.
    assert close(system.apply(iterate), iterate) <= 1e-12


# -- (b) every solver terminates in ≤ T iterations and converges ---------------------------------
@SETTINGS
@given(
    system=solver_systems(min_scale=0.5, max_scale=4.0, max_len=48, dtypes=(torch.float64, torch.float32)),
    name=st.sampled_from(sorted(SOLVER_CHOICES)),
)
def test_every_solver_terminates_within_t(system, name):
    solution = solve(system, SOLVER_CHOICES[name]())
    assert solution.converged and solution.result is Result.successful
    assert (0 if name == "sequential" else 1) <= solution.stats.iterations <= system.seq_len
    if name == "sequential":  # direct: no evaluation of F, the whole sequence exact
        assert solution.stats.iterations == 0 and solution.stats.exact_prefix == system.seq_len
    assert solution.value.shape == system.state_shape
    assert bool(torch.isfinite(solution.value).all())


@pytest.mark.parametrize("solver_name", sorted(SOLVER_CHOICES))
@pytest.mark.parametrize("kind,nonlinearity", CELLS, ids=["elman-tanh", "elman-relu", "gru", "lstm"])
def test_large_scale_still_terminates_at_t(kind, nonlinearity, solver_name):
    """scale 4, T = 300: Picard is slow here, yet every solver stops within T iterations."""
    network = Network.random(kind, 3, 6, nonlinearity=nonlinearity, scale=4.0, seed=5)
    system = SequenceSystem.build(network.cells[0][0], randn(300, 2, 3, seed=6))
    solution = solve(system, SOLVER_CHOICES[solver_name]())
    assert solution.converged
    assert solution.stats.iterations <= 300
    exact = system.sequential()
    assert close(solution.value, exact) <= 1e-9


def test_picard_is_slow_but_bounded_at_scale_4():
    """A case where Picard needs (nearly) all T sweeps: the bound T is what stops it."""
    network = Network.random("elman", 3, 6, scale=4.0, seed=3)
    system = SequenceSystem.build(network.cells[0][0], randn(64, 3, 3, seed=1))
    solution = solve(system, Picard())
    assert solution.converged
    assert solution.stats.iterations == 64 and solution.stats.exact_prefix == 64
    assert torch.equal(solution.stats.residual, torch.zeros(3, dtype=torch.float64))
    assert float((solution.value - system.sequential()).abs().max()) <= 1e-12


# -- (c) residual history --------------------------------------------------------------------------
@SETTINGS
@given(system=solver_systems(max_scale=3.0), name=st.sampled_from(sorted(SOLVER_CHOICES)))
def test_residual_history(system, name):
    if name == "sequential":  # direct solves have no residual history (tested separately)
        assert solve(system, Sequential()).stats.residual_history.shape == (0, system.batch)
        return
    solution = solve(system, SOLVER_CHOICES[name]())
    stats = solution.stats
    steps, batch = system.seq_len, system.batch
    assert solution.converged
    assert stats.residual_history.shape == (stats.iterations, batch)
    assert stats.max_abs_residual_history.shape == (stats.iterations, batch)
    assert stats.residual.shape == (batch,)
    assert bool((stats.residual < 1).all())
    assert bool(torch.isfinite(stats.residual_history).all())
    assert bool((stats.residual_history >= 0).all()) and bool((stats.max_abs_residual_history >= 0).all())
    # The loop stopped at the first iteration where every sample passed, not before.
    for row in stats.residual_history[:-1]:
        assert float(row.max()) >= 1
    # One position becomes exact per iteration; Σ (T − p) positions were evaluated.
    assert stats.exact_prefix in (stats.iterations - 1, stats.iterations)
    assert stats.positions_evaluated == sum(steps - p for p in range(stats.iterations))
    if stats.exact_prefix == steps:
        assert torch.equal(stats.residual, torch.zeros_like(stats.residual))
    else:  # stopped by the tolerance test
        assert bool((stats.residual_history[-1] < 1).all())
        if stats.refinements == 0:
            assert torch.equal(stats.residual, stats.residual_history[-1])
        else:  # refined: the residual is the returned answer's own, evaluated in float64
            own = correction_and_residual(system, solution.value, tolerances=(stats.rtol, stats.atol)).residual_size
            torch.testing.assert_close(stats.residual, own, rtol=1e-12, atol=0.0)
    assert (stats.rtol, stats.atol) == (1e-12, 1e-12)


# -- (d) the returned value satisfies the tolerance ------------------------------------------------
TOLERANCES = [(None, None), (1e-6, 1e-6), (1e-8, 1e-10), (1e-4, 1e-9)]


@SETTINGS
@given(
    system=solver_systems(max_scale=2.0, min_len=30, max_len=150),
    name=st.sampled_from(["picard", "picard-damped", "anderson", "anderson-m2-mix"]),
    tolerances=st.sampled_from(TOLERANCES),
)
def test_converged_value_satisfies_tolerance(system, name, tolerances):
    """The driver tests |G − X| ≤ atol + rtol·|G| and returns G = F(X).  Then
    |F(G)_t − G_t|_j = |f(G_{t−1})_j − f(X_{t−1})_j| ≤ K_{t,j}·max_i(atol + rtol·|G_{t−1,i}|),
    so the scaled residual of G exceeds 1 by at most that (Lipschitz × scale-ratio) factor."""
    rtol, atol = tolerances
    base = SOLVER_CHOICES[name]()
    solver = type(base)(**{**base.__dict__, "rtol": rtol, "atol": atol})
    solution = solve(system, solver)
    assert solution.converged
    event("exact prefix" if solution.stats.exact_prefix == system.seq_len else "stopped by tolerance")
    rtol, atol = solution.stats.rtol, solution.stats.atol
    value = solution.value
    image = system.apply(value)
    excess = (image - value).abs()
    previous = torch.cat((system.initial_state.unsqueeze(0), value[:-1]), dim=0)
    slack = (atol + rtol * previous.abs()).amax(-1, keepdim=True)  # (T, B, 1)
    bound = 1.01 * lipschitz_rows(system, value) * slack
    rounding = 1e-13 * (1 + image.abs())
    assert bool((excess <= bound + rounding).all()), float((excess - bound - rounding).max())
    # The exact prefix is exact: its residual is rounding only, that of evaluating f twice in
    # differently shaped products: a few units of rounding of the terms |W||s| + |W||x| + |b|,
    # which on an expanding relu network can be far larger than the state they cancel to.
    prefix = solution.stats.exact_prefix
    scaled = scaled_residual(system, value, rtol, atol)
    if prefix:
        terms = term_magnitudes(system, value)
        assert bool((excess[:prefix] <= 64 * torch.finfo(value.dtype).eps * terms[:prefix]).all())
    # Overall: "≤ tolerance up to a small factor".
    factor = 1.01 * float(lipschitz_rows(system, value).max()) * (1 + rtol / atol * float(value.abs().max()))
    assert float(scaled.max()) <= factor + 1e-2


@pytest.mark.parametrize("kind,nonlinearity", CELLS, ids=["elman-tanh", "elman-relu", "gru", "lstm"])
def test_loose_tolerance_is_honoured_and_not_exceeded_much(kind, nonlinearity):
    """A loose rtol/atol is really used: the solve stops early (not by exact prefix), sooner
    than with the default tolerance, with an error to the exact solution of the loose
    tolerance's order (≤ 1e-4), while the default gets within 1e-10."""
    network = Network.random(kind, 3, 6, nonlinearity=nonlinearity, scale=0.7, seed=8)
    system = SequenceSystem.build(network.cells[0][0], randn(200, 2, 3, seed=9))
    solution = solve(system, Picard(rtol=1e-5, atol=1e-5))
    assert solution.stats.exact_prefix < 200
    assert (solution.stats.rtol, solution.stats.atol) == (1e-5, 1e-5)
    tight = solve(system, Picard())
    assert tight.stats.iterations > solution.stats.iterations
    error = float((solution.value - system.sequential()).abs().max())
    assert error <= 1e-4
    assert float((tight.value - system.sequential()).abs().max()) <= 1e-10


# -- (e) callback ------------------------------------------------------------------------------------
@SETTINGS
@given(system=solver_systems(max_scale=3.0), name=st.sampled_from(sorted(SOLVER_CHOICES)))
def test_callback_once_per_iteration(system, name):
    calls = []

    def callback(iteration, iterate, image):
        # The image handed over is F of the iterate handed over, on the active window.
        window = image.shape[0]
        expected = system.apply(iterate.clone())[system.seq_len - window :]
        calls.append((iteration, tuple(iterate.shape), window, float((image - expected).abs().max())))

    solution = solve(system, SOLVER_CHOICES[name](), callback=callback)
    assert len(calls) == solution.stats.iterations
    assert [c[0] for c in calls] == list(range(1, solution.stats.iterations + 1))
    for iteration, shape, window, difference in calls:
        assert shape == system.state_shape
        assert window == system.seq_len - (iteration - 1)  # the window shrinks by one each time
        assert difference <= 1e-12 * max(1.0, float(solution.value.abs().max()))


def test_network_callback_per_layer_and_direction():
    network = Network.random("gru", 3, 4, num_layers=2, bidirectional=True, seed=2)
    inputs = randn(15, 2, 3, seed=3)
    seen: dict[tuple[int, int], list[int]] = {}
    solution = solve_network(network, inputs, None, Picard(),
                             callback=lambda l, d, k, x, g: seen.setdefault((l, d), []).append(k))
    assert sorted(seen) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for (layer, direction), iterations in seen.items():
        expected = solution.layers[layer][direction].stats.iterations
        assert iterations == list(range(1, expected + 1))
    assert solution.iterations == sum(len(v) for v in seen.values())


# -- (f) Anderson's safeguard counters ------------------------------------------------------------
@SETTINGS
@given(
    system=solver_systems(max_scale=4.0, max_len=60),
    memory=st.integers(1, 6),
    mixing=st.sampled_from([1.0, 0.5]),
    growth=st.sampled_from([1.0, 2.0, 1e6]),
)
def test_anderson_step_counts(system, memory, mixing, growth):
    """``step`` runs once per iteration except the last (converged, or max_steps = T reached,
    where the driver returns F(X) instead); each iteration moves the exact prefix by one unless
    it converged.  The first run has no history and takes a plain step without counting it;
    every later run counts one plain *or* accelerated step per sample."""
    solver = Anderson(memory=memory, mixing=mixing, max_residual_growth=growth)
    solution = solve(system, solver)
    stats = solution.stats
    assert solution.converged
    plain, accelerated = stats.solver["plain_steps"], stats.solver["accelerated_steps"]
    assert len(plain) == len(accelerated) == system.batch
    event("accelerated" if max(accelerated) > 0 else "no accelerated step")
    event("some plain step" if max(plain) > 0 else "no plain step")
    step_calls = stats.iterations - 1
    finite_termination = stats.exact_prefix == system.seq_len
    assert stats.exact_prefix == (stats.iterations if finite_termination else step_calls)
    for p, a in zip(plain, accelerated):
        assert p >= 0 and a >= 0
        assert p + a == max(step_calls - 1, 0)


def test_anderson_accelerates_on_a_slow_gru():
    """On a slowly contracting GRU Anderson's accelerated steps are accepted (counted), and it
    needs no more iterations than Picard.  (On sequence systems the error travels as a
    wavefront, so no large speed-up is claimed here.)"""
    network = Network.random("gru", 3, 6, scale=3.0, seed=3)
    system = SequenceSystem.build(network.cells[0][0], randn(400, 2, 3, seed=1))
    anderson = solve(system, Anderson())
    picard = solve(system, Picard())
    assert min(anderson.stats.solver["accelerated_steps"]) >= 1
    assert anderson.stats.iterations <= picard.stats.iterations < 400
    assert float((anderson.value - system.sequential()).abs().max()) <= 1e-10


# -- a few exact driver facts ----------------------------------------------------------------------
@pytest.mark.parametrize("kind,nonlinearity", CELLS, ids=["elman-tanh", "elman-relu", "gru", "lstm"])
def test_sequential_solver_is_the_loop(kind, nonlinearity):
    network = Network.random(kind, 3, 5, nonlinearity=nonlinearity, seed=4)
    system = SequenceSystem.build(network.cells[0][0], randn(50, 3, 3, seed=5))
    solution = solve(system, Sequential())
    assert solution.stats.iterations == 0
    assert float((solution.value - system.sequential()).abs().max()) <= 1e-14


@pytest.mark.parametrize("name", ["picard", "picard-damped", "anderson"])
def test_exact_initial_guess_stops_at_once(name):
    network = Network.random("lstm", 3, 5, seed=6)
    system = SequenceSystem.build(network.cells[0][0], randn(80, 2, 3, seed=7))
    guess = system.sequential()
    kept = guess.clone()
    solution = solve(system, SOLVER_CHOICES[name](), initial_guess=guess)
    assert solution.stats.iterations == 1 and solution.converged
    assert torch.equal(guess, kept)  # not modified
    assert float((solution.value - kept).abs().max()) <= 1e-14


# -- tolerance edge: atol = 0 is a valid configuration -------------------------------------------
@pytest.mark.parametrize("solver", [Picard(rtol=1e-8, atol=0.0), Anderson(rtol=1e-8, atol=0.0)], ids=["picard", "anderson"])
def test_atol_zero_with_exact_zeros(solver):
    """rtol > 0, atol = 0 is accepted (only both 0 is refused).  A relu network's solution has
    exact zeros; there |F(S) − S| = 0 ≤ 0 holds, so those entries must pass the test, not turn
    the scaled residual into 0/0 = NaN that never passes."""
    network = Network.random("elman", 3, 6, nonlinearity="relu", scale=0.5, seed=3)
    system = SequenceSystem.build(network.cells[0][0], randn(100, 2, 3, seed=1))
    exact = system.sequential()
    assert int((exact == 0).sum()) > 100  # the premise: many exact zeros
    reference_solve = solve(system, type(solver)(rtol=1e-8, atol=1e-300))
    assert reference_solve.stats.exact_prefix < 50  # a tiny atol stops early
    solution = solve(system, solver)
    assert solution.converged
    nan_entries = int(torch.isnan(solution.stats.residual_history).sum())
    assert nan_entries == 0, f"{nan_entries} NaN entries in residual_history (0/0 where F(S) = S = 0)"
    assert solution.stats.iterations <= reference_solve.stats.iterations + 1, (
        f"{solution.stats.iterations} iterations with atol=0 vs {reference_solve.stats.iterations} with atol=1e-300")
    # ... so a max_steps well below T is enough, as it is with atol = 1e-300.
    assert solve(system, solver, max_steps=50, throw=False).converged


# -- the observed rate ---------------------------------------------------------------------------------
@SETTINGS
@given(system=solver_systems(min_scale=0.5, max_scale=1.5, min_len=20, max_len=80))
def test_observed_rate(system):
    """``rate`` is the geometric mean of the last ≤ 5 ratios of the batch-wide max |F(X) − X|."""
    solution = solve(system, Picard())
    norms = solution.stats.max_abs_residual_history.amax(dim=1)
    if norms.shape[0] < 2:
        assert solution.stats.rate is None
        return
    recent = norms[-6:]
    if float(recent[0]) <= 0 or float(recent[-1]) <= 0:
        assert solution.stats.rate is None
        return
    expected = (float(recent[-1]) / float(recent[0])) ** (1 / (recent.shape[0] - 1))
    assert solution.stats.rate == pytest.approx(expected, rel=1e-12)
    assert 0 < solution.stats.rate
