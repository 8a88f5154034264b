"""fixedpoint.forward_error and the driver's use of it: the estimate against true errors, the
refinement, and what every mode promises."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import CELL_IDS, CELLS, randn
from fixedpoint import InputError, Network, Picard, SequenceSystem, solve, solve_network
from fixedpoint.forward_error import correction_and_residual, forward_error_estimate, linearized_correction
from fixedpoint.scan import linear_recurrence_sequential
from fixedpoint.solvers import Anderson, Newton, QuasiNewton, Sequential


def system_of(
    kind: str, nonlinearity: str, scale: float, seed: int, steps: int = 30, batch: int = 2,
    hidden: int = 4, dtype: torch.dtype = torch.float64,
) -> SequenceSystem:
    network = Network.random(kind, 3, hidden, nonlinearity=nonlinearity, scale=scale, seed=seed, dtype=dtype)
    return SequenceSystem.build(network.cells[0][0], randn(steps, batch, 3, seed=seed + 1, dtype=dtype))


@settings(max_examples=30, deadline=None)
@given(cell=st.sampled_from(CELLS), scale=st.floats(0.25, 1.5), seed=st.integers(0, 10_000),
       steps=st.integers(1, 60), exact_prefix=st.integers(0, 5))
def test_parallel_correction_equals_the_loop(cell, scale, seed, steps, exact_prefix):
    """The CUDA path's quasi-Newton iterations solve the same recurrence as the loop: to
    PARALLEL_RTOL (times the convergence factor) where they converge, exactly where they give way."""
    import fixedpoint.forward_error as forward_error

    system = system_of(*cell, scale, seed, steps=steps)
    states = system.sequential() + 1e-3 * randn(*system.state_shape, seed=seed + 2)
    options = {"tolerances": (1e-8, 1e-10), "exact_prefix": exact_prefix}
    loop, loop_size, loop_estimate = correction_and_residual(system, states, method="sequential", **options)
    parallel, parallel_size, parallel_estimate = correction_and_residual(system, states, method="parallel", **options)
    assert torch.equal(parallel_size, loop_size)
    assert float((parallel - loop).abs().max()) <= 1e-4 * float(loop.abs().max()) + 1e-15
    assert bool((parallel[:exact_prefix] == 0).all())
    # The estimate propagates the prefix's residual too: the correction without a prefix.
    whole_loop = correction_and_residual(system, states, method="sequential", tolerances=options["tolerances"]).delta
    torch.testing.assert_close(loop_estimate, whole_loop.abs().amax(dim=(0, 2)), rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(parallel_estimate, loop_estimate, rtol=1e-4, atol=1e-15)
    whole = forward_error.Trajectory.of(system, states)
    residual = whole.image() - whole.states
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(forward_error, "PARALLEL_ITERATIONS", 0)  # never converged: the loop
        assert forward_error.parallel_correction(whole, residual) is None or steps == 1
        fallback, _, _ = correction_and_residual(system, states, method="parallel", **options)
    assert torch.equal(fallback, loop) or steps == 1


def test_correction_method_is_validated():
    system = system_of("gru", "tanh", 1.0, 0, steps=3)
    with pytest.raises(InputError, match="method"):
        correction_and_residual(system, system.sequential(), method="scan")


@settings(max_examples=20, deadline=None)
@given(cell=st.sampled_from(CELLS), scale=st.floats(0.25, 3.0), seed=st.integers(0, 10_000),
       steps=st.integers(1, 40), chunk=st.integers(1, 50))
def test_correction_is_the_linear_recurrence_with_dense_jacobians(cell, scale, seed, steps, chunk):
    """δ_t = J_t δ_{t−1} + r_t, matrix-free and chunked, equals the same recurrence run with the
    dense Jacobians (the definition), for any chunk length."""
    system = system_of(*cell, scale, seed, steps=steps)
    states = system.sequential() + 1e-3 * randn(*system.state_shape, seed=seed + 2)
    previous = torch.cat((system.initial_state.unsqueeze(0), states[:-1]))
    jacobians = system.cell.jacobian(previous, system.projected_inputs)
    residual = system.cell.step(previous, system.projected_inputs) - states
    expected = linear_recurrence_sequential(jacobians, residual, torch.zeros_like(residual[0]))
    got = linearized_correction(system, states, chunk=chunk)
    # The two evaluations round differently (r = F(S) − S to a unit of |F(S)| + |S|, each step
    # to a unit of its terms), and an expanding J amplifies that rounding: bound it by the
    # recurrence of the terms' magnitudes, |δ|_t ≤ |J_t| |δ|_{t−1} + |r_t| + |F(S)_t| + |S_t|.
    terms = residual.abs() + (residual + states).abs() + states.abs()
    magnitude = linear_recurrence_sequential(jacobians.abs(), terms, torch.zeros_like(residual[0]))
    unit = torch.finfo(torch.float64).eps * (system.cell.state_size + 8)
    assert bool(((got - expected).abs() <= 4 * unit * magnitude + 1e-300).all())


@pytest.mark.parametrize("kind,nonlinearity", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_correction_is_one_newton_step(kind, nonlinearity, scale):
    """Perturb the exact solution by ε: states + δ recovers it to O(ε²); at the solution itself
    there is nothing to correct beyond rounding."""
    system = system_of(kind, nonlinearity, scale, seed=3)
    exact = system.sequential()
    perturbed = exact + 1e-6 * randn(*exact.shape, seed=9)
    correction = linearized_correction(system, perturbed)
    before = float((perturbed - exact).abs().max())
    after = float((perturbed + correction - exact).abs().max())
    assert before > 1e-7
    assert after <= 1e-3 * before  # second order: ~ε² times the curvature, far below ε
    assert float(linearized_correction(system, exact).abs().max()) <= 1e-12 * max(1.0, float(exact.abs().max()))


def test_residual_size_is_the_termination_test_s():
    system = system_of("gru", "tanh", 1.0, seed=4, steps=20)
    states = system.sequential() + 1e-5 * randn(*system.state_shape, seed=5)
    image = system.apply(states)
    absolute = correction_and_residual(system, states).residual_size
    scaled = correction_and_residual(system, states, tolerances=(1e-3, 1e-6)).residual_size
    torch.testing.assert_close(absolute, (image - states).abs().amax(dim=(0, 2)))
    torch.testing.assert_close(scaled, ((image - states).abs() / (1e-6 + 1e-3 * image.abs())).amax(dim=(0, 2)))


def within_ten(estimate: torch.Tensor, error: torch.Tensor) -> bool:
    return bool(((estimate <= 10 * error) & (error <= 10 * estimate)).all())


@pytest.mark.parametrize("kind,nonlinearity", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("solver", [Picard(), Anderson(), QuasiNewton(), Newton(), Sequential(kernel="fused")],
                         ids=lambda s: s.name)
def test_float32_estimate_is_within_ten_of_the_true_error(kind, nonlinearity, solver):
    """A float32 answer — a parallel solver's or torch.nn's own kernel's — against the float64
    loop (an exact reference at float32's scale): estimate and error within 10× per sample, on a
    well-conditioned problem (torch's initialisation)."""
    system = system_of(kind, nonlinearity, 1.0, seed=11, steps=60, batch=3, hidden=16, dtype=torch.float32)
    wide = SequenceSystem.build(system.cell.to(dtype=torch.float64), system.inputs.double())
    solution = solve(system, solver, forward_error="estimate")
    error = (solution.value.double() - wide.sequential()).abs().amax(dim=(0, 2))
    assert bool((error > 0).all())
    assert within_ten(solution.stats.forward_error_estimate.double(), error), (solution.stats.forward_error_estimate, error)


@pytest.mark.parametrize("kind,nonlinearity", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("solver", [Picard, Anderson, QuasiNewton], ids=lambda s: s.__name__.lower())
def test_float64_estimate_of_a_loose_solve_is_within_ten_of_the_true_error(kind, nonlinearity, solver):
    """A float64 solve stopped at 1e-7: its error (≫ rounding, so the float64 loop is an exact
    reference) against the estimate, within 10× per sample."""
    system = system_of(kind, nonlinearity, 1.0, seed=12, steps=60, batch=3, hidden=16)
    solution = solve(system, solver(rtol=1e-7, atol=1e-7), forward_error="estimate")
    assert solution.stats.exact_prefix < system.seq_len  # stopped by the tolerance
    error = (solution.value - system.sequential()).abs().amax(dim=(0, 2))
    assert within_ten(solution.stats.forward_error_estimate, error), (solution.stats.forward_error_estimate, error)


@pytest.mark.parametrize(
    "kind,nonlinearity,scale,solver",
    [("elman", "tanh", 1.5, Anderson), ("elman", "tanh", 1.5, QuasiNewton), ("gru", "tanh", 2.0, Anderson),
     ("gru", "tanh", 2.0, Picard)],
    ids=["elman-anderson", "elman-quasi-newton", "gru-anderson", "gru-picard"],
)
def test_refinement_brings_the_error_within_the_tolerance(kind, nonlinearity, scale, solver):
    """Expanding weights amplify the residual a solve leaves: the refined answer's error meets
    the tolerance elementwise, whatever the unrefined one did, and is never larger."""
    rtol = atol = 1e-6
    network = Network.random(kind, 4, 16, nonlinearity=nonlinearity, scale=scale, seed=3)
    system = SequenceSystem.build(network.cells[0][0], randn(200, 3, 4, seed=4))
    exact = system.sequential()
    refined = solve(system, solver(rtol=rtol, atol=atol))
    estimated = solve(system, solver(rtol=rtol, atol=atol), forward_error="estimate")
    assert estimated.stats.refinements == 0
    refined_error = (refined.value - exact).abs()
    assert float((refined_error / (atol + rtol * exact.abs())).max()) < 1
    assert float(refined_error.max()) <= float((estimated.value - exact).abs().max())
    # the statistics describe the returned answer: its estimate, and its own residual
    assert within_ten(refined.stats.forward_error_estimate, refined_error.amax(dim=(0, 2)).clamp(min=1e-15))
    assert bool((refined.stats.residual < 1).all())


def test_anderson_regression_is_as_accurate_as_its_tolerance():
    """The relu network whose Anderson answer was 800× less accurate than the loop (states near
    3000): with the default refinement, every element is within atol + rtol·|s| of torch.nn."""
    network = Network.random("elman", 20, 1, bidirectional=True, nonlinearity="relu",
                             scale=1.2028917090154603, seed=816)
    generator = torch.Generator().manual_seed(817)
    inputs = torch.randn(676, 8, 20, generator=generator, dtype=torch.float64) * 100
    hx = torch.randn(2, 8, 1, generator=generator, dtype=torch.float64) * 5
    solution = solve_network(network, inputs, hx, Anderson(), throw=False)
    with torch.no_grad():
        output, h_n = network.to_torch()(inputs, hx)
    assert solution.converged
    rtol, atol = 1e-12, 1e-12
    for got, expected in ((solution.output, output), (solution.h_n, h_n)):
        assert float(((got - expected).abs() / (atol + rtol * expected.abs())).max()) <= 1


def test_direct_solves_estimate_only_when_asked_and_never_change_the_answer():
    system = system_of("lstm", "tanh", 1.0, seed=6, steps=40, dtype=torch.float32)
    plain = solve(system, Sequential(kernel="fused"))
    assert plain.stats.forward_error_estimate is None and plain.stats.refinements == 0
    for mode in ("estimate", "refine"):
        asked = solve(system, Sequential(kernel="fused"), forward_error=mode)
        assert torch.equal(asked.hidden, plain.hidden)
        assert asked.stats.refinements == 0 and asked.stats.forward_error_estimate.shape == (2,)
        assert float(asked.stats.forward_error_estimate.max()) > 0  # float32 rounding, seen in float64


def test_off_and_estimate_leave_the_answer_as_the_iteration_ended():
    system = system_of("gru", "tanh", 2.0, seed=3, steps=100)
    off = solve(system, Anderson(rtol=1e-6, atol=1e-6), forward_error="off")
    estimated = solve(system, Anderson(rtol=1e-6, atol=1e-6), forward_error="estimate")
    assert off.stats.forward_error_estimate is None
    assert torch.equal(off.value, estimated.value)
    torch.testing.assert_close(estimated.stats.forward_error_estimate, forward_error_estimate(system, estimated.value))


def test_a_nonfinite_solve_has_no_estimate():
    """relu Elman, W_hh × 50, T = 2000: the solution overflows; reported nonfinite, nothing estimated."""
    network = Network.random("elman", 3, 8, nonlinearity="relu", scale=50.0, seed=1)
    solution = solve(SequenceSystem.build(network.cells[0][0], randn(2000, 2, 3, seed=0)), Picard(), throw=False)
    assert solution.result.name == "nonfinite" and solution.stats.forward_error_estimate is None


def test_bad_mode_and_bad_chunk_are_refused():
    system = system_of("gru", "tanh", 1.0, seed=1, steps=5)
    with pytest.raises(InputError, match="forward_error must be"):
        solve(system, Picard(), forward_error="exact")
    with pytest.raises(InputError, match="chunk must be"):
        linearized_correction(system, system.sequential(), chunk=0)
    with pytest.raises(InputError, match="states must have shape"):
        linearized_correction(system, system.sequential()[:-1])


@pytest.mark.parametrize("kind", ["elman", "gru", "lstm"])
def test_an_answer_exact_in_every_position_still_estimates_the_loops_rounding(kind):
    # Picard run to finite termination (tolerances no residual meets) returns the float32
    # sequential loop's values in every position; their error against the exact solution is the
    # loop's rounding, which the estimate must show as it does for torch.nn's own output.
    system = system_of(kind, "tanh", 1.5, seed=4, steps=60, dtype=torch.float32)
    solution = solve(system, Picard(rtol=1e-30, atol=1e-30), forward_error="estimate")
    assert solution.converged and solution.stats.exact_prefix > system.seq_len // 2  # or a residual of exactly 0
    wide = SequenceSystem.build(system.cell.to(dtype=torch.float64), system.inputs.double(), system.initial_state.double())
    exact = wide.sequential()
    true_error = float((solution.value.double() - exact).abs().max())
    estimate = float(solution.stats.forward_error_estimate.max())
    assert true_error > 0
    assert true_error / 10 <= estimate <= 10 * true_error
