"""The driver's deferred check: the stop is decided on the device every iteration and read back
every ``check_every`` iterations, and nothing the solution or its statistics promise changes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fixedpoint import InputError, Network, Newton, Picard, QuasiNewton, SequenceSystem, solve
from fixedpoint.data import gaussian_inputs
from fixedpoint.profiling import OperationCounter
from helpers import SOLVER_CHOICES, solver_systems

ITERATIVE = sorted(set(SOLVER_CHOICES) - {"sequential"}) + ["lm-quasi-newton"]


def _solver(name):
    if name == "lm-quasi-newton":
        return Newton(jacobian="diagonal", damping="levenberg-marquardt")
    return SOLVER_CHOICES[name]()


#: Solvers whose decisions do not hinge on comparisons at rounding level.  Anderson's "did the
#: residual grow at all" and the damped solvers' sufficient-decrease tests can flip when the
#: windows' shapes change the rounding, and then legitimately take another path.
ROBUST_PATH = {"picard", "picard-damped", "quasi-newton", "newton"}


@settings(max_examples=60, deadline=None)
@given(
    system=solver_systems(max_scale=3.0, max_len=30),
    name=st.sampled_from(ITERATIVE),
    every=st.integers(2, 5),
    max_steps=st.one_of(st.none(), st.integers(1, 12)),
)
def test_deferred_check_changes_nothing_but_speed(system, name, every, max_steps):
    # Checking every k iterations evaluates windows of other shapes (the exact rows are kept by
    # writing, not slicing), so values agree to rounding, not bitwise; every decision agrees.
    solver = _solver(name)
    now = solve(system, solver, max_steps=max_steps, throw=False, forward_error="off", check_every=1)
    later = solve(system, solver, max_steps=max_steps, throw=False, forward_error="off", check_every=every)
    a, b = now.stats, later.stats
    assert (a.check_every, a.speculative_iterations, b.check_every) == (1, 0, every)
    assert 0 <= b.speculative_iterations <= every - 1
    assert b.residual_history.shape == (b.iterations, system.batch)
    assert b.exact_prefix == (b.iterations - 1 if later.result.name != "max_steps_reached" else b.iterations) or (
        b.exact_prefix == system.seq_len
    )
    if name not in ROBUST_PATH:
        return
    assert later.result is now.result
    assert (b.iterations, b.exact_prefix, b.nonfinite_at) == (a.iterations, a.exact_prefix, a.nonfinite_at)
    assert b.positions_evaluated >= a.positions_evaluated
    assert b.solver == a.solver  # no step after the stop is counted
    if now.converged:
        # Both answers meet the tolerance; they are F of iterates that agree to rounding.
        tolerance = b.atol + b.rtol * now.value.abs()
        assert bool(((later.value - now.value).abs() <= 2 * tolerance).all())
    assert torch.equal(torch.isfinite(later.value), torch.isfinite(now.value))


def test_stop_in_the_middle_of_a_block_freezes_the_answer():
    # A relu network that overflows: the NaN appears between two checks; the answer is the last
    # finite iterate, as if the driver had looked at once.
    network = Network.random("elman", 2, 6, nonlinearity="relu", scale=100.0, seed=3)
    system = SequenceSystem.build(network.cells[0][0], 30.0 * gaussian_inputs(300, 2, 2, seed=4))
    now = solve(system, Picard(), throw=False, check_every=1)
    later = solve(system, Picard(), throw=False, check_every=7)
    assert now.result.name == later.result.name == "nonfinite"
    assert now.stats.iterations % 7  # the stop falls between two checks
    assert later.stats.nonfinite_at == now.stats.nonfinite_at
    assert later.stats.speculative_iterations == 7 - now.stats.iterations % 7
    assert torch.isfinite(later.value).all() and torch.isfinite(now.value).all()
    # Picard's path has no decision to flip: the answers agree to the rounding of larger windows.
    assert bool(((later.value - now.value).abs() <= 1e-12 * now.value.abs()).all())


@pytest.mark.parametrize("kind", ["elman", "gru", "lstm"])
@pytest.mark.parametrize("solver", [Picard(), QuasiNewton()], ids=["picard", "quasi-newton"])
@pytest.mark.parametrize("every", [1, 4])
def test_host_synchronisations_per_solve(kind, solver, every):
    # One read-back per check, plus a constant (the rate estimate at the end): counted with a
    # dispatch mode on the CPU, where a read-back is an aten::_local_scalar_dense.
    network = Network.random(kind, 8, 8, seed=0, dtype=torch.float32)
    system = SequenceSystem.build(network.cells[0][0], gaussian_inputs(256, 2, 8, seed=1, dtype=torch.float32))
    with OperationCounter() as counter:
        solution = solve(system, solver, forward_error="off", check_every=every)
    assert solution.converged
    ran = solution.stats.iterations + solution.stats.speculative_iterations
    assert counter.host_syncs <= math.ceil(ran / every) + 3
    assert counter.operations["_local_scalar_dense"] >= math.ceil(ran / every)  # it does look


@pytest.mark.parametrize("kind,budget", [("elman", 120), ("gru", 120), ("lstm", 280)])
def test_aten_operations_per_quasi_newton_iteration(kind, budget):
    # Each aten operation is at least one kernel launch on a GPU. The budget of 120 per
    # quasi-Newton iteration (H = 16, T = 1024, B = 4, float32, check_every = 4) holds the
    # diagonal cells to it; the LSTM's 2×2-block scan composes entry by entry, about 20
    # operations per level of its 10 (docs/gpu.md), so its bound only guards against regressions.
    network = Network.random(kind, 16, 16, seed=0, dtype=torch.float32)
    system = SequenceSystem.build(network.cells[0][0], gaussian_inputs(1024, 4, 16, seed=1, dtype=torch.float32))
    with OperationCounter() as counter:
        solution = solve(system, QuasiNewton(), forward_error="off", check_every=4)
    assert solution.converged
    ran = solution.stats.iterations + solution.stats.speculative_iterations
    assert counter.total_operations / ran <= budget


def test_check_every_is_validated():
    system = SequenceSystem.build(Network.random("gru", 2, 3, seed=0).cells[0][0], gaussian_inputs(5, 1, 2, seed=1))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="check_every"):
            solve(system, Picard(), check_every=bad)
