"""The parallel scan against its sequential reference, and Newton's defining properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import randn
from fixedpoint import ElmanCell, InputError, Network, Newton, Picard, SequenceSystem, solve
from fixedpoint.scan import (
    linear_recurrence,
    linear_recurrence_sequential,
    regularized_recurrence,
    regularized_recurrence_sequential,
)

SHAPES = {
    "diagonal": lambda t, b, s: (t, b, s),
    "block2": lambda t, b, s: (t, b, s // 2, 2, 2),
    "dense": lambda t, b, s: (t, b, s, s),
}


@settings(max_examples=150, deadline=None)
@given(
    steps=st.integers(1, 70),
    batch=st.integers(1, 3),
    half=st.integers(1, 4),
    structure=st.sampled_from(sorted(SHAPES)),
    reverse=st.booleans(),
    chunk=st.one_of(st.none(), st.integers(1, 9)),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**31 - 1),
)
def test_parallel_scan_equals_sequential(steps, batch, half, structure, reverse, chunk, dtype, seed):
    size = 2 * half
    transitions = 0.5 * randn(*SHAPES[structure](steps, batch, size), seed=seed, dtype=dtype)
    values = randn(steps, batch, size, seed=seed + 1, dtype=dtype)
    initial = randn(batch, size, seed=seed + 2, dtype=dtype)
    fast = linear_recurrence(transitions, values, initial, reverse=reverse, chunk=chunk)
    reference = linear_recurrence_sequential(transitions, values, initial, reverse=reverse, chunk=chunk)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert fast.shape == reference.shape == values.shape
    assert float((fast - reference).abs().max()) <= tolerance * (1 + float(reference.abs().max()))


@pytest.mark.parametrize("structure", sorted(SHAPES))
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_scan_is_differentiable_and_agrees_with_its_in_place_form(structure, steps):
    # Under autograd the scan runs out of place; both forms compute the same numbers.
    transitions = 0.5 * randn(*SHAPES[structure](steps, 2, 4), seed=steps, dtype=torch.float64)
    values = randn(steps, 2, 4, seed=steps + 1, dtype=torch.float64)
    initial = randn(2, 4, seed=steps + 2, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (transitions, values, initial)]
    for reverse in (False, True):
        recorded = linear_recurrence(*leaves, reverse=reverse)
        assert recorded.requires_grad
        assert torch.allclose(recorded.detach(), linear_recurrence(transitions, values, initial, reverse=reverse),
                              rtol=0, atol=1e-13)
        assert torch.autograd.gradcheck(lambda a, b, y: linear_recurrence(a, b, y, reverse=reverse, chunk=3), leaves)


@pytest.mark.parametrize("structure", ["diagonal", "block2"])
def test_scan_is_work_efficient(structure):
    # O(T) work: the new tensors of one scan total a few (T, B, S) tensors, where a Hillis–Steele
    # scan allocates about 2·log₂ T of them (44 at T = 32768); and the operation count grows
    # with log T, not T.
    from fixedpoint.profiling import OperationCounter

    counts = []
    for steps in (1024, 4096):
        transitions = 0.9 * torch.rand(*SHAPES[structure](steps, 4, 8), dtype=torch.float64)
        values = torch.randn(steps, 4, 8, dtype=torch.float64)
        with OperationCounter() as counter:
            linear_recurrence(transitions, values, torch.zeros(4, 8, dtype=torch.float64))
        assert counter.allocated_bytes <= 8 * values.untyped_storage().nbytes()
        assert counter.host_syncs == 0
        counts.append(counter.total_operations)
    operations_per_level = counts[1] - counts[0]  # two more levels
    assert 0 < operations_per_level <= 2 * 30  # 2×2 blocks: 20 operations a level, diagonal 4


def test_scan_rejects_mismatched_shapes():
    values = torch.zeros(5, 2, 4, dtype=torch.float64)
    with pytest.raises(InputError, match="A has shape"):
        linear_recurrence(torch.zeros(5, 2, 3, dtype=torch.float64), values, torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(InputError, match="y0 must have shape"):
        linear_recurrence(torch.zeros(5, 2, 4, dtype=torch.float64), values, torch.zeros(3, 4, dtype=torch.float64))


def test_newton_is_exact_in_one_step_on_a_linear_cell():
    # relu Elman with non-negative weights, inputs and biases never leaves the linear regime:
    # F is affine, so the first Newton step lands on the solution and the second check confirms it.
    generator = torch.Generator().manual_seed(0)
    hidden, steps = 5, 200
    cell = ElmanCell(
        torch.rand(hidden, 3, generator=generator, dtype=torch.float64),
        torch.rand(hidden, hidden, generator=generator, dtype=torch.float64) * 0.15,
        torch.rand(hidden, generator=generator, dtype=torch.float64),
        torch.rand(hidden, generator=generator, dtype=torch.float64),
        nonlinearity="relu",
    )
    system = SequenceSystem.build(cell, torch.rand(steps, 2, 3, generator=generator, dtype=torch.float64))
    solution = solve(system, Newton())
    assert solution.stats.iterations == 2  # one Newton step, one confirming evaluation
    exact = system.sequential()
    assert float((solution.value - exact).abs().max()) <= 1e-12 * float(exact.abs().max())
    assert solve(system, Picard()).stats.iterations > 10


@pytest.mark.parametrize("kind,scale", [("elman", 1.0), ("elman", 2.0), ("gru", 2.0), ("lstm", 2.0)])
def test_newton_needs_far_fewer_iterations_than_picard(kind, scale):
    # Measured: Newton 5–6 iterations where Picard needs 52–78; on the expanding Elman (×2, where
    # Picard runs to T = 300) undamped Newton needs 17 — the case a damped variant is for.
    network = Network.random(kind, 4, 8, scale=scale, seed=3)
    system = SequenceSystem.build(network.cells[0][0], randn(300, 2, 4, seed=4))
    newton, picard = solve(system, Newton()), solve(system, Picard())
    assert newton.stats.iterations <= (20 if picard.stats.iterations == 300 else 8)
    assert newton.stats.iterations * 3 < picard.stats.iterations
    counts = newton.stats.solver
    assert [a + b for a, b in zip(counts["newton_steps"], counts["safe_steps"])] == [newton.stats.iterations - 1] * 2
    assert float((newton.value - system.sequential()).abs().max()) <= 1e-10


def _block_matrix(transitions: torch.Tensor, structure: str, t: int, b: int, size: int) -> torch.Tensor:
    """``A_t`` of sample ``b`` as a dense ``S × S`` matrix."""
    if structure == "dense":
        return transitions[t, b]
    if structure == "diagonal":
        return torch.diag(transitions[t, b])
    half = size // 2
    blocks = transitions[t, b]
    matrix = torch.zeros(size, size, dtype=transitions.dtype)
    index = torch.arange(half)
    matrix[index, index], matrix[index, index + half] = blocks[:, 0, 0], blocks[:, 0, 1]
    matrix[index + half, index], matrix[index + half, index + half] = blocks[:, 1, 0], blocks[:, 1, 1]
    return matrix


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(1, 17), batch=st.integers(1, 3), half=st.integers(1, 3),
       structure=st.sampled_from(sorted(SHAPES)), seed=st.integers(0, 2**31 - 1),
       parallel=st.booleans())
def test_regularized_recurrence_solves_the_regularized_least_squares_problem(steps, batch, half, structure, seed, parallel):
    """Cyclic reduction and its reference, the Kalman smoother, against the normal equations
    (JᵀJ + λI) y = Jᵀb of the stacked problem, J the block-bidiagonal I − shift(A), for λ from 0
    (then y is the recurrence) to 10."""
    size = 2 * half
    transitions = 0.5 * randn(*SHAPES[structure](steps, batch, size), seed=seed)
    values = randn(steps, batch, size, seed=seed + 1)
    regularization = torch.tensor([0.0, 0.3, 10.0][:batch], dtype=torch.float64)
    method = regularized_recurrence if parallel else regularized_recurrence_sequential
    got = method(transitions, values, regularization)
    for b in range(batch):
        stacked = torch.eye(steps * size, dtype=torch.float64)
        for t in range(1, steps):
            stacked[t * size : (t + 1) * size, (t - 1) * size : t * size] = -_block_matrix(transitions, structure, t, b, size)
        normal = stacked.T @ stacked + regularization[b] * torch.eye(steps * size, dtype=torch.float64)
        expected = torch.linalg.solve(normal, stacked.T @ values[:, b].reshape(-1)).reshape(steps, size)
        assert float((got[:, b] - expected).abs().max()) <= 1e-9 * (1 + float(expected.abs().max()))
    exact = linear_recurrence_sequential(transitions, values, torch.zeros_like(values[0]))
    assert float((got[:, 0] - exact[:, 0]).abs().max()) <= 1e-10 * (1 + float(exact.abs().max()))
    with pytest.raises(InputError, match="regularization must have shape"):
        method(transitions, values, torch.zeros(batch + 1, dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(steps=st.integers(1, 70), structure=st.sampled_from(sorted(SHAPES)), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([0.5, 1.0, 2.0]))
def test_cyclic_reduction_agrees_with_the_kalman_smoother(steps, structure, seed, scale):
    # Longer sequences than the dense check above, transitions up to expanding (|A| ≈ 2), λ > 0:
    # several levels of the reduction, odd and even lengths.
    size = 4
    transitions = scale * randn(*SHAPES[structure](steps, 2, size), seed=seed) / (size if structure == "dense" else 1)
    values = randn(steps, 2, size, seed=seed + 1)
    regularization = torch.tensor([1e-3, 1.0], dtype=torch.float64)
    fast = regularized_recurrence(transitions, values, regularization)
    reference = regularized_recurrence_sequential(transitions, values, regularization)
    assert float((fast - reference).abs().max()) <= 1e-8 * (1 + float(reference.abs().max()))


@pytest.mark.parametrize("recurrence", ["scan", "sequential"])
@pytest.mark.parametrize("jacobian", ["full", "diagonal"])
@pytest.mark.parametrize(("kind", "nonlinearity", "scale"), [("elman", "relu", 2.0), ("gru", "tanh", 5.0), ("lstm", "tanh", 4.0)])
def test_levenberg_marquardt_never_raises_the_merit_of_its_window_and_is_exact(jacobian, kind, nonlinearity, scale, recurrence):
    """Twelve steps on the whole window from zero (no exact-prefix writes in between): the merit
    ½Σ‖F(Z) − Z‖² of each sample never grows — a sample keeps its iterate rather than take a worse
    one — unless the step meets the tolerance.  Then the driver's solve with it is the sequential
    solution."""
    network = Network.random(kind, 4, 6, nonlinearity=nonlinearity, scale=scale, seed=0)
    system = SequenceSystem.build(network.cells[0][0], randn(60, 3, 4, seed=1))
    # recurrence: the step by cyclic reduction or by its reference, the Kalman smoother
    solver = Newton(jacobian=jacobian, damping="levenberg-marquardt", recurrence=recurrence)
    iterate, state = solver.init(system, torch.zeros(system.state_shape, dtype=torch.float64))
    predecessor = system.initial_state

    def merit(window: torch.Tensor) -> torch.Tensor:
        return 0.5 * (system.apply_window(window, predecessor) - window).square().sum(dim=(0, 2))

    for _ in range(12):
        before = merit(iterate)
        iterate, state = solver.step(system, iterate, system.apply_window(iterate, predecessor), state, predecessor)
        image = system.apply_window(iterate, predecessor)
        # a step that meets the tolerance is taken whatever its merit (rounding, once converged)
        within = ((image - iterate).abs() < 1e-12 + 1e-12 * image.abs()).flatten(2).all(2).all(0)
        assert bool(((merit(iterate) <= before) | within).all())
    solution = solve(system, solver)
    exact = system.sequential()
    assert float((solution.value - exact).abs().max()) <= 1e-10 * (1 + float(exact.abs().max()))
    counters = solution.stats.solver
    assert counters["method"] == ("lm-newton" if jacobian == "full" else "lm-quasi-newton")
    assert len(counters["kept"]) == len(counters["increases"]) == len(counters["regularization"]) == 3
