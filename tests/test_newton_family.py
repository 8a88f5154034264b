"""Quasi-Newton's per-unit Jacobians, damping, the memory guard, the fused kernel and Auto."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import CELL_IDS, CELLS, randn
from fixedpoint import (
    Auto, ElmanCell, InputError, Network, Newton, Picard, QuasiNewton, Sequential, SequenceSystem, solve, solve_network,
)
from fixedpoint.solvers.newton import SEQUENTIAL_FROM, SMOOTHER_FROM


def per_unit_part(full: torch.Tensor, kind: str) -> torch.Tensor:
    """The diagonal ``(..., S)`` of ``(..., S, S)``, or for LSTM the 2×2 ``(h_j, c_j)`` blocks."""
    if kind != "lstm":
        return full.diagonal(dim1=-2, dim2=-1)
    hidden = full.shape[-1] // 2
    d = lambda rows, cols: full[..., rows, cols].diagonal(dim1=-2, dim2=-1)  # noqa: E731
    top = torch.stack((d(slice(0, hidden), slice(0, hidden)), d(slice(0, hidden), slice(hidden, None))), -1)
    bottom = torch.stack((d(slice(hidden, None), slice(0, hidden)), d(slice(hidden, None), slice(hidden, None))), -1)
    return torch.stack((top, bottom), -2)


@settings(max_examples=40, deadline=None)
@given(cell_index=st.integers(0, len(CELLS) - 1), scale=st.floats(0.25, 4.0), seed=st.integers(0, 10_000))
def test_unit_jacobian_is_the_per_unit_part_of_autograd(cell_index, scale, seed):
    kind, nonlinearity = CELLS[cell_index]
    cell = Network.random(kind, 3, 4, nonlinearity=nonlinearity, scale=scale, seed=seed).cells[0][0]
    states = randn(6, cell.state_size, seed=seed + 1)
    projected = cell.input_projection(randn(6, 3, seed=seed + 2))
    autograd = torch.stack([
        torch.func.jacrev(cell.step)(states[i], projected[i]) for i in range(states.shape[0])
    ])  # (6, S, S), one jacrev per sample, no batching
    unit = cell.unit_jacobian(states, projected)
    expected_shape = (6, 4, 2, 2) if kind == "lstm" else (6, 4)
    assert unit.shape == expected_shape
    assert float((unit - per_unit_part(autograd, kind)).abs().max()) <= 1e-12
    assert float((unit - per_unit_part(cell.jacobian(states, projected), kind)).abs().max()) <= 1e-13


def test_quasi_newton_is_exact_in_one_step_on_a_diagonal_linear_cell():
    # relu with non-negative inputs, weights and biases and a diagonal W_hh: F is affine and its
    # Jacobian is diagonal, so the quasi-Newton linearisation is F itself.
    generator = torch.Generator().manual_seed(0)
    hidden, steps = 6, 300
    cell = ElmanCell(
        torch.rand(hidden, 3, generator=generator, dtype=torch.float64),
        torch.diag(torch.rand(hidden, generator=generator, dtype=torch.float64) * 0.9),
        torch.rand(hidden, generator=generator, dtype=torch.float64),
        torch.rand(hidden, generator=generator, dtype=torch.float64),
        nonlinearity="relu",
    )
    system = SequenceSystem.build(cell, torch.rand(steps, 2, 3, generator=generator, dtype=torch.float64))
    solution = solve(system, QuasiNewton())
    assert solution.stats.iterations == 2  # one step, one confirming evaluation
    exact = system.sequential()
    assert float((solution.value - exact).abs().max()) <= 1e-12 * float(exact.abs().max())
    assert solve(system, Picard()).stats.iterations > 20


@pytest.mark.parametrize("seed", [0, 2])
def test_damping_rescues_newton_on_strongly_expanding_gru_weights(seed):
    # GRU with weights × 5 (Picard needs 213–323 of 300–400 sweeps): measured undamped Newton 40
    # and 78 iterations, Newton with backtracking 12 and 12.
    steps = 300 if seed == 0 else 400
    network = Network.random("gru", 4, 8, scale=5.0, seed=seed)
    system = SequenceSystem.build(network.cells[0][0], randn(steps, 2, 4, seed=1))
    undamped = solve(system, Newton())
    damped = solve(system, Newton(damping="backtracking"))
    assert damped.stats.iterations * 2 < undamped.stats.iterations
    counts = damped.stats.solver
    assert [a + b for a, b in zip(counts["newton_steps"], counts["safe_steps"])] == [damped.stats.iterations - 1] * 2
    assert sum(counts["backtracks"]) >= 1  # the line search did shorten steps, and says so
    exact = system.sequential()
    for solution in (undamped, damped):
        assert float((solution.value - exact).abs().max()) <= 1e-10


def test_failed_line_search_takes_a_counted_picard_step():
    # Zero halvings allowed on a chaotic Elman (× 3): some full steps fail the Armijo test; they
    # must be replaced by Picard steps and counted, and the solve still ends exact.
    network = Network.random("elman", 4, 8, scale=3.0, seed=0)
    system = SequenceSystem.build(network.cells[0][0], randn(200, 2, 4, seed=1))
    solution = solve(system, Newton(damping="backtracking", max_backtracks=0))
    assert sum(solution.stats.solver["safe_steps"]) >= 1
    assert float((solution.value - system.sequential()).abs().max()) <= 1e-10


def test_memory_guard_chunks_or_refuses():
    network = Network.random("gru", 3, 6, seed=1)
    system = SequenceSystem.build(network.cells[0][0], randn(200, 2, 3, seed=2))
    per_position = 4 * 2 * 6 * 6 * 8  # factor · B · S² · itemsize
    whole = solve(system, Newton(recurrence="scan"))
    assert whole.stats.solver["chunk"] is None
    chunked = solve(system, Newton(recurrence="scan", memory_limit=50 * per_position))
    assert chunked.stats.solver["chunk"] == 50
    assert chunked.stats.iterations == whole.stats.iterations
    assert float((chunked.value - whole.value).abs().max()) <= 1e-13
    with pytest.raises(InputError, match=r"quasi-Newton \(Newton\(jacobian='diagonal'\)"):
        solve(system, Newton(recurrence="scan", memory_limit=10 * per_position))
    with pytest.raises(InputError, match="dense Newton needs"):
        solve(system, Newton(recurrence="scan", chunk=100, memory_limit=50 * per_position))
    # quasi-Newton and the matrix-free loop form no S×S matrix: no Jacobian memory guard
    assert solve(system, QuasiNewton(memory_limit=1)).converged
    assert solve(system, Newton(recurrence="sequential", memory_limit=1)).converged


@pytest.mark.parametrize("kind,nonlinearity", CELLS, ids=CELL_IDS)
def test_fused_kernel_equals_the_loop(kind, nonlinearity):
    network = Network.random(kind, 3, 5, nonlinearity=nonlinearity, seed=3)
    cell = network.cells[0][0]
    system = SequenceSystem.build(cell, randn(40, 3, 3, seed=4), randn(3, cell.state_size, seed=5))
    solution = solve(system, Sequential(kernel="fused"))
    assert solution.stats.iterations == 0 and solution.stats.solver["method"] == "sequential-fused"
    loop = system.sequential()
    # hidden and final state come from the kernel; the LSTM memory sequence is rebuilt on access
    assert float((solution.hidden - cell.hidden_of(loop)).abs().max()) <= 1e-13
    assert float((solution.final_state - loop[-1]).abs().max()) <= 1e-13
    assert float((solution.value - loop).abs().max()) <= 1e-13


def test_auto_runs_the_fused_kernel_on_a_cpu_and_validates():
    network = Network.random("lstm", 3, 5, num_layers=2, seed=3)
    solution = solve_network(network, randn(30, 2, 3, seed=4), None, Auto())
    assert {s.stats.solver["method"] for s in solution.solutions} == {"sequential-fused"}
    for bad in ({"calibration_steps": 0}, {"expected_iterations": 1.5}):
        with pytest.raises(InputError, match="must be an integer"):
            Auto(**bad)
    for bad, message in (({"jacobian": "dense"}, "jacobian must be"), ({"damping": "lm"}, "damping must be"),
                         ({"max_backtracks": -1}, "max_backtracks must be"), ({"chunk": 0}, "chunk must be")):
        with pytest.raises(InputError, match=message):
            Newton(**bad)
    with pytest.raises(InputError, match="kernel must be"):
        Sequential(kernel="cudnn")


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize(("timings", "expected"), [((1.0, 1e-4), "quasi-newton"), ((1e-4, 1.0), "sequential-fused")])
def test_auto_calibration_path_runs_and_decides_on_a_cpu(kind, timings, expected, monkeypatch):
    """The CUDA-only path of Auto, run on a CPU: the real calibration calls happen (so a changed
    signature fails here, not first on a GPU), with the timer's answers fixed to force each choice."""
    import fixedpoint.solvers.auto as auto_module

    answers = iter(timings)  # the fused kernel on the prefix, then one quasi-Newton iteration

    def timed(function, device, repeats=1, *, warm=False):  # type: ignore[no-untyped-def]
        return function(), next(answers)

    monkeypatch.setattr(auto_module, "_calibrates", lambda system: True)
    monkeypatch.setattr(auto_module, "timed", timed)
    network = Network.random(kind, 4, 8, seed=5)
    inputs = randn(600, 2, 4, seed=6)  # T above calibration_steps
    solution = solve_network(network, inputs, None, Auto())
    assert [s.stats.solver["method"] for s in solution.solutions] == [expected]
    reference = solve_network(network, inputs, None, Sequential())
    assert float((solution.output - reference.output).abs().max()) <= 1e-10


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize(("margin", "expected"), [(2.0, "quasi-newton"), (0.5, "sequential-fused")])
def test_auto_weighs_the_predicted_iterations(kind, margin, expected, monkeypatch):
    """With expected_iterations=None, Auto's cost model uses the quasi-Newton count predicted from
    the calibration prefix: one iteration timed at (sequential time) / (margin · predicted) picks
    quasi-Newton when margin > 1 and the fused kernel when margin < 1."""
    import fixedpoint.solvers.auto as auto_module
    from fixedpoint.predictability import predictability

    network = Network.random(kind, 4, 8, seed=5)
    inputs = randn(600, 2, 4, seed=6)
    system = SequenceSystem.build(network.cells[0][0], inputs)
    head = SequenceSystem(system.cell, inputs[:256], system.initial_state)
    predicted = int(predictability(system, head.sequential(), rtol=1e-12, atol=1e-12)
                    .predicted_iterations["quasi-newton"].max())
    sequential = 1.0 * 600 / 256
    answers = iter((1.0, sequential / (margin * predicted)))

    def timed(function, device, repeats=1, *, warm=False):  # type: ignore[no-untyped-def]
        return function(), next(answers)

    monkeypatch.setattr(auto_module, "_calibrates", lambda system: True)
    monkeypatch.setattr(auto_module, "timed", timed)
    assert solve(system, Auto()).stats.solver["method"] == expected


def test_auto_caches_its_choice_per_shape_and_weights(monkeypatch):
    import fixedpoint.solvers.auto as auto_module

    calls = []

    def timed(function, device, repeats=1, *, warm=False):  # type: ignore[no-untyped-def]
        calls.append(1)
        return function(), 1.0 if len(calls) % 2 else 1e-4  # prefix slow, iteration fast: quasi-Newton

    monkeypatch.setattr(auto_module, "_calibrates", lambda system: True)
    monkeypatch.setattr(auto_module, "timed", timed)
    auto_module.clear_cache()
    network = Network.random("gru", 4, 8, seed=5)
    system = SequenceSystem.build(network.cells[0][0], randn(600, 2, 4, seed=6))
    assert solve(system, Auto()).stats.solver["method"] == "quasi-newton"
    assert len(calls) == 2  # the prefix and one iteration
    # Same weights, same shape, T in the same power-of-two bucket (513 … 1024): no calibration.
    longer = SequenceSystem.build(network.cells[0][0], randn(1000, 2, 4, seed=7))
    assert solve(longer, Auto()).stats.solver["method"] == "quasi-newton"
    assert len(calls) == 2
    # Another bucket, another batch size, other weights of the same shape, or a cleared cache: calibrate.
    solve(SequenceSystem.build(network.cells[0][0], randn(1100, 2, 4, seed=8)), Auto())
    assert len(calls) == 4
    solve(SequenceSystem.build(network.cells[0][0], randn(600, 3, 4, seed=9)), Auto())
    assert len(calls) == 6
    other = Network.random("gru", 4, 8, seed=6)
    solve(SequenceSystem.build(other.cells[0][0], randn(600, 2, 4, seed=6)), Auto())
    assert len(calls) == 8
    auto_module.clear_cache()
    solve(system, Auto())
    assert len(calls) == 10
    auto_module.clear_cache()


@pytest.mark.parametrize("steps", [1, 2, 37])
def test_lstm_memory_by_scan_equals_the_loop(steps):
    network = Network.random("lstm", 3, 5, seed=7)
    cell = network.cells[0][0]
    inputs, initial = randn(steps, 2, 3, seed=8), randn(2, 10, seed=9)
    hidden, _ = cell.fused_sequence(inputs, initial)
    by_scan = cell.states_from_hidden(hidden, inputs, initial, scan=True)
    by_loop = cell.states_from_hidden(hidden, inputs, initial, scan=False)
    assert float((by_scan - by_loop).abs().max()) <= 1e-12
    assert float((by_loop - SequenceSystem.build(cell, inputs, initial).sequential()).abs().max()) <= 1e-12


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_auto_calibrates_on_cuda_and_stays_exact(kind):
    # T above calibration_steps: Auto times the fused kernel and one quasi-Newton iteration.
    network = Network.random(kind, 4, 8, seed=5).to(device="cuda")
    inputs = randn(2048, 2, 4, seed=6).cuda()
    solution = solve_network(network, inputs, None, Auto())
    assert {s.stats.solver["method"] for s in solution.solutions} <= {"sequential-fused", "quasi-newton"}
    expected = solve_network(network, inputs, None, Sequential())
    assert float((solution.output - expected.output).abs().max()) <= 1e-10


@settings(max_examples=30, deadline=None)
@given(cell_index=st.integers(0, len(CELLS)), jacobian=st.sampled_from(["full", "diagonal"]),
       steps=st.integers(1, 12), chunk=st.one_of(st.none(), st.integers(1, 5)), seed=st.integers(0, 10_000))
def test_the_sequential_and_the_scanned_recurrence_give_the_same_newton_point(cell_index, jacobian, steps, chunk, seed):
    # At an arbitrary iterate (not the solution), both ways of solving the step's recurrence, and
    # the dense recurrence solved from the formed Jacobians one position at a time, agree.
    if cell_index == len(CELLS):  # the projected LSTM: S = P + H
        network = Network.random("lstm", 3, 5, proj_size=2, scale=2.0, seed=seed)
    else:
        kind, nonlinearity = CELLS[cell_index]
        network = Network.random(kind, 3, 4, nonlinearity=nonlinearity, scale=2.0, seed=seed)
    system = SequenceSystem.build(network.cells[0][0], randn(steps, 2, 3, seed=seed + 1))
    iterate = randn(*system.state_shape, seed=seed + 2)
    predecessor = system.initial_state
    image = system.apply_window(iterate, predecessor)
    solver = Newton(jacobian=jacobian)
    scanned = solver.newton_iterate(system, iterate, image, predecessor, chunk, "scan")
    looped = solver.newton_iterate(system, iterate, image, predecessor, chunk, "sequential")
    size = float(scanned.abs().max())
    assert float((looped - scanned).abs().max()) <= 1e-12 * max(size, 1.0)
    if jacobian == "full":  # the definition: y_t = G_t + J_t (y_{t−1} − X_{t−1}), y_0 = G_0
        previous = system.previous_states(iterate, predecessor)
        jacobians = system.cell.jacobian(previous, system.projected_inputs)
        expected, point = [], predecessor
        for t in range(steps):
            point = image[t] + (jacobians[t] @ (point - previous[t]).unsqueeze(-1)).squeeze(-1)
            expected.append(point)
        assert float((looped - torch.stack(expected)).abs().max()) <= 1e-12 * max(size, 1.0)


def test_recurrence_auto_is_the_matrix_free_loop_for_large_full_jacobians_on_a_cpu_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert Newton().resolved_recurrence(cpu, SEQUENTIAL_FROM) == "sequential"
    assert Newton().resolved_recurrence(cpu, SEQUENTIAL_FROM - 1) == "scan"
    assert Newton().resolved_recurrence(cuda, 4096) == "scan"
    assert QuasiNewton().resolved_recurrence(cpu, 4096) == "scan"
    assert Newton(recurrence="scan").resolved_recurrence(cpu, 4096) == "scan"
    assert QuasiNewton(recurrence="sequential").resolved_recurrence(cuda, 2) == "sequential"
    assert QuasiNewton(damping="levenberg-marquardt").resolved_recurrence(cpu, 4096) == "scan"  # cyclic reduction
    assert Newton(damping="levenberg-marquardt").resolved_recurrence(cpu, SMOOTHER_FROM - 1) == "scan"
    assert Newton(damping="levenberg-marquardt").resolved_recurrence(cpu, SMOOTHER_FROM) == "sequential"  # Kalman
    assert Newton(damping="levenberg-marquardt").resolved_recurrence(cuda, 4096) == "scan"
    assert Newton(damping="levenberg-marquardt", recurrence="sequential").resolved_recurrence(cpu, 4) == "sequential"
    network = Network.random("gru", 3, SEQUENTIAL_FROM, scale=2.0, seed=3)
    system = SequenceSystem.build(network.cells[0][0], randn(60, 2, 3, seed=4))
    exact = system.sequential()
    for solver in (Newton(), Newton(recurrence="scan"), Newton(damping="backtracking"), QuasiNewton(recurrence="sequential")):
        solution = solve(system, solver)
        assert solution.stats.solver["recurrence"] == solver.resolved_recurrence(system.inputs.device, SEQUENTIAL_FROM)
        assert float((solution.value - exact).abs().max()) <= 1e-12
    with pytest.raises(InputError, match="recurrence must be 'auto', 'scan' or 'sequential', got 'parallel'"):
        Newton(recurrence="parallel")
