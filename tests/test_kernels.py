"""Every Triton kernel against its torch reference and the sequential loop.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``,
set by conftest), at small sizes because the interpreter is slow; with CUDA the same tests run on
the device (marked ``cuda``) at the sizes the kernels are built for.
"""

from __future__ import annotations

import os

import pytest
import torch

from helpers import randn
from fixedpoint.scan import linear_recurrence_sequential, linear_recurrence_torch

pytest.importorskip("triton", reason="needs the gpu extra (triton)")
from fixedpoint.kernels import scan as triton_scan  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRETED:
    DEVICE = pytest.param("cpu", id="interpreter")
else:
    DEVICE = pytest.param(
        "cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
    )
SHAPES = {"diagonal": lambda t, b, s: (t, b, s), "block2": lambda t, b, s: (t, b, s // 2, 2, 2)}
#: Relative agreement: the chunked kernel and the loop associate products differently.
RTOL = {torch.float64: 1e-12, torch.float32: 2e-6}


def _problem(structure, steps, batch, size, dtype, device, seed):
    scale = 0.95 if structure == "diagonal" else 0.6
    transitions = scale * (2 * torch.rand(*SHAPES[structure](steps, batch, size), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) - 1)
    values = randn(steps, batch, size, seed=seed + 1)
    initial = randn(batch, size, seed=seed + 2)
    return tuple(t.to(dtype=dtype, device=device) for t in (transitions, values, initial))


@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("structure", sorted(SHAPES))
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("steps,block_steps", [(1, 4), (2, 4), (7, 4), (37, 4), (70, 4)])
def test_scan_kernel_matches_reference_and_loop(device, dtype, structure, reverse, steps, block_steps):
    # block_steps = 4 makes T = 37 three levels of chunks (37 → 10 → 3), T = 70 three as well.
    if not INTERPRETED:
        steps, block_steps = steps * 97, triton_scan.CHUNK  # odd lengths, several levels at the real chunk
    transitions, values, initial = _problem(structure, steps, 3, 6, dtype, device, seed=steps)
    fast = triton_scan.linear_recurrence(transitions, values, initial, reverse=reverse, block_steps=block_steps)
    assert fast.dtype == dtype and fast.shape == values.shape and fast.device == values.device
    loop = linear_recurrence_sequential(transitions, values, initial, reverse=reverse)
    reference = linear_recurrence_torch(transitions, values, initial, reverse=reverse)
    scale = 1 + float(loop.abs().max())
    assert float((fast - loop).abs().max()) <= RTOL[dtype] * scale * steps ** 0.5
    assert float((fast - reference).abs().max()) <= RTOL[dtype] * scale * steps ** 0.5


@pytest.mark.parametrize("device", [DEVICE])
def test_scan_kernel_is_exact_on_a_pure_delay(device):
    # A = 1, b = e_t: y_t counts the ones so far, exactly representable: no rounding at all.
    steps = 23 if INTERPRETED else 4099
    transitions = torch.ones(steps, 2, 4, dtype=torch.float32, device=device)
    values = torch.ones(steps, 2, 4, dtype=torch.float32, device=device)
    initial = torch.full((2, 4), 5.0, dtype=torch.float32, device=device)
    out = triton_scan.linear_recurrence(transitions, values, initial, block_steps=4 if INTERPRETED else 64)
    expected = 5 + torch.arange(1, steps + 1, dtype=torch.float32, device=device)[:, None, None].expand(-1, 2, 4)
    assert torch.equal(out, expected)
    back = triton_scan.linear_recurrence(transitions, values, initial, reverse=True, block_steps=4 if INTERPRETED else 64)
    assert torch.equal(back, expected.flip(0))


def test_scan_kernel_refuses_what_it_does_not_compute():
    values = torch.zeros(3, 1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="diagonal and 2×2-block"):
        triton_scan.linear_recurrence(torch.zeros(3, 1, 4, 4, dtype=torch.float64), values, values[0])
    with pytest.raises(ValueError, match="float32 or float64"):
        triton_scan.linear_recurrence(values.half(), values.half(), values[0].half())


# -- fused cell kernels -------------------------------------------------------------------------
from fixedpoint import Network  # noqa: E402
from fixedpoint.kernels import cells as triton_cells  # noqa: E402
from fixedpoint.kernels import use_kernels  # noqa: E402

CELL_KINDS = [("elman", "tanh"), ("elman", "relu"), ("gru", "tanh"), ("lstm", "tanh")]
CELL_RTOL = {torch.float64: 1e-13, torch.float32: 2e-6}


@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind,nonlinearity", CELL_KINDS, ids=["elman-tanh", "elman-relu", "gru", "lstm"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("steps,batch,hidden", [(1, 1, 1), (5, 3, 7)])
def test_cell_kernels_match_the_torch_terms(device, dtype, kind, nonlinearity, bias, steps, batch, hidden):
    if not INTERPRETED:
        steps, batch, hidden = steps * 257, batch * 4, hidden * 9  # many programs, ragged last block
    cell = Network.random(kind, 3, hidden, seed=steps + hidden, nonlinearity=nonlinearity, scale=2.0, bias=bias,
                          dtype=dtype).cells[0][0].to(device=device)
    state = randn(steps, batch, cell.state_size, seed=1, dtype=dtype).to(device)
    projected = cell.input_projection(randn(steps, batch, 3, seed=2, dtype=dtype).to(device))
    fused = triton_cells.quasi_newton_terms(cell, state, projected)
    reference = cell.quasi_newton_terms_torch(state, projected)
    for got, expected in zip(fused, reference):
        assert got.dtype == dtype and got.shape == expected.shape and got.device == expected.device
        assert float((got - expected).abs().max()) <= CELL_RTOL[dtype] * (1 + float(expected.abs().max()))
    image = triton_cells.step(cell, state, projected)
    assert float((image - cell.step(state, projected)).abs().max()) <= CELL_RTOL[dtype] * (1 + float(image.abs().max()))
    # The step's right-hand side closes the linearisation: b = F − A s.
    image, transitions, values = fused
    structure = "block2" if kind == "lstm" else "diagonal"
    from fixedpoint.scan import apply_transitions

    assert float((values + apply_transitions(transitions, state, structure) - image).abs().max()) <= 4 * CELL_RTOL[dtype]



@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind,nonlinearity", CELL_KINDS, ids=["elman-tanh", "elman-relu", "gru", "lstm"])
@pytest.mark.parametrize("steps,batch,hidden,exact", [(1, 1, 1, 0), (6, 3, 7, 2), (9, 2, 40, 9)])
def test_measured_cell_kernels_match_the_torch_measurement(device, dtype, kind, nonlinearity, steps, batch, hidden, exact):
    # F, A, b and the driver's measurement in one kernel, against the torch terms and
    # measure_window: exact rows take X and measure 0; a NaN marks its position only.
    from fixedpoint.residual import StopTest, measure_window

    if not INTERPRETED:
        steps, batch, hidden, exact = steps * 257, batch * 4, hidden * 3, exact * 100
    cell = Network.random(kind, 3, hidden, seed=steps + hidden, nonlinearity=nonlinearity, scale=2.0,
                          dtype=dtype).cells[0][0].to(device=device)
    state = randn(steps, batch, cell.state_size, seed=1, dtype=dtype).to(device)
    projected = cell.input_projection(randn(steps, batch, 3, seed=2, dtype=dtype).to(device))
    iterate = cell.step(state, projected) + 1e-4 * randn(steps, batch, cell.state_size, seed=3, dtype=dtype).to(device)
    if steps > 4:
        projected[4, batch - 1, 0] = float("nan")  # position 4 not finite
    test = StopTest(1e-6, 1e-8, exact)
    for fused in (triton_cells.measured_quasi_newton_terms(cell, state, projected, iterate, test),
                  triton_cells.measured_step(cell, state, projected, iterate, test)):
        *values, measurement = fused
        terms = cell.quasi_newton_terms_torch(state, projected)
        expected = measure_window(terms[0], iterate, test)
        finite = torch.isfinite
        for got, want in zip(values, terms):
            both = finite(want)
            assert torch.equal(finite(got), both)
            assert float((got - want)[both].abs().max()) <= CELL_RTOL[dtype] * (1 + float(want[both].abs().max()))
        assert torch.equal(measurement.finite, expected.finite)
        assert bool(measurement.finite.all()) == (steps <= 4 or exact > 4)
        # Non-finite entries are not measured: the reference reads X (residual 0) there.
        reference = measure_window(torch.where(finite(terms[0]), terms[0], iterate), iterate, test)
        for got, want in zip(measurement[1:], reference[1:]):
            assert got.shape == (batch,) and got.dtype == dtype
            assert float((got - want).abs().max()) <= 1e3 * CELL_RTOL[dtype] * float(want.abs().max())
        if exact == steps:
            assert float(measurement.scaled.abs().max()) == 0.0 and torch.equal(values[0], iterate)


def test_kernels_serve_only_cuda_and_never_under_autograd(monkeypatch):
    cpu = torch.zeros(3)
    monkeypatch.delenv("FIXEDPOINT_KERNELS", raising=False)
    assert not use_kernels(cpu)
    weights = torch.zeros(3, requires_grad=True)
    with torch.no_grad():
        assert not use_kernels(cpu, weights)
    if torch.cuda.is_available():
        on_device = torch.zeros(3, device="cuda")
        assert use_kernels(on_device)
        assert not use_kernels(on_device, weights.cuda())  # recorded: the torch path
        with torch.no_grad():
            assert use_kernels(on_device, weights.cuda())
        monkeypatch.setenv("FIXEDPOINT_KERNELS", "torch")
        assert not use_kernels(on_device)
    # Forced: every device, under the interpreter on a CPU; still never under autograd.
    monkeypatch.setenv("FIXEDPOINT_KERNELS", "triton")
    assert not use_kernels(cpu, weights)
    if INTERPRETED:
        assert use_kernels(cpu)
    else:
        with pytest.raises(InputError, match="TRITON_INTERPRET=1"):
            use_kernels(cpu)
    monkeypatch.setenv("FIXEDPOINT_KERNELS", "cuda")
    with pytest.raises(InputError, match="FIXEDPOINT_KERNELS must be one of auto, torch, triton"):
        use_kernels(cpu)


# -- whole solves on the kernel path ----------------------------------------------------------------
from fixedpoint import Anderson, Picard, QuasiNewton, SequenceSystem, solve  # noqa: E402
from fixedpoint.errors import InputError  # noqa: E402
from fixedpoint.forward_error import correction_and_residual  # noqa: E402
from fixedpoint.profiling import OperationCounter  # noqa: E402

SOLVERS = {"picard": Picard, "quasi-newton": QuasiNewton, "damped-quasi-newton": lambda: QuasiNewton(damping="backtracking"),
           "anderson": Anderson}


def _kernel_path_problem(kind, nonlinearity, dtype, device):
    network = Network.random(kind, 5, 5, nonlinearity=nonlinearity, seed=11, dtype=dtype, device=device)
    inputs = randn(23 if INTERPRETED else 2311, 3, 5, seed=12, dtype=dtype).to(device)
    initial = 0.3 * randn(3, network.cells[0][0].state_size, seed=13, dtype=dtype).to(device)
    return network, SequenceSystem.build(network.cells[0][0], inputs, initial)


@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("kind,nonlinearity", [("elman", "tanh"), ("elman", "relu"), ("gru", "tanh"), ("lstm", "tanh")],
                         ids=["elman-tanh", "elman-relu", "gru", "lstm"])
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_whole_solves_on_the_kernel_path_match_the_torch_path(monkeypatch, device, kind, nonlinearity, solver):
    # The CUDA code path end to end (dispatch, driver, kernels), on a CPU in Triton's interpreter:
    # the same answer as the torch path, to rounding, and the same iterations where no
    # rounding-level difference can flip the stop test (float64, far from the tolerance).
    network, system = _kernel_path_problem(kind, nonlinearity, torch.float64, device)
    monkeypatch.setenv("FIXEDPOINT_KERNELS", "torch")
    reference = solve(system, SOLVERS[solver]())
    monkeypatch.setenv("FIXEDPOINT_KERNELS", "triton")
    with OperationCounter() as counter:
        fused = solve(system, SOLVERS[solver]())
    assert counter.kernel_launches[f"_{kind}_kernel"] >= fused.stats.iterations  # the kernels ran
    if solver in ("quasi-newton", "damped-quasi-newton"):
        scan = "_block2_kernel" if kind == "lstm" else "_diagonal_kernel"
        assert counter.kernel_launches[scan] >= fused.stats.iterations - 1
    assert fused.converged and reference.converged
    assert abs(fused.stats.iterations - reference.stats.iterations) <= 1
    assert float((fused.value - reference.value).abs().max()) <= 1e-12
    loop = system.sequential()
    assert float((fused.value - loop).abs().max()) <= 1e-10


@pytest.mark.parametrize("device", [DEVICE])
@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_parallel_forward_error_on_the_kernel_path_matches_the_torch_path(monkeypatch, device, kind):
    network, system = _kernel_path_problem(kind, "tanh", torch.float64, device)
    states = system.sequential() + 1e-6 * randn(*system.state_shape, seed=14).to(device)
    monkeypatch.setenv("FIXEDPOINT_KERNELS", "torch")
    reference = correction_and_residual(system, states, method="parallel")
    monkeypatch.setenv("FIXEDPOINT_KERNELS", "triton")
    fused = correction_and_residual(system, states, method="parallel")
    for got, expected in zip(fused, reference):
        assert float((got - expected).abs().max()) <= 1e-12 * (1 + float(expected.abs().max()))


@pytest.mark.parametrize("device", [DEVICE])
def test_a_projected_lstm_takes_the_torch_cell_and_the_diagonal_scan(monkeypatch, device):
    # No fused cell kernel has W_hr: the cell runs in torch, its diagonal quasi-Newton step in the
    # Triton scan, and the answer is the torch path's.
    network = Network.random("lstm", 5, 6, proj_size=3, seed=11, dtype=torch.float64, device=device)
    inputs = randn(23 if INTERPRETED else 2311, 3, 5, seed=12, dtype=torch.float64).to(device)
    system = SequenceSystem.build(network.cells[0][0], inputs)
    monkeypatch.setenv("FIXEDPOINT_KERNELS", "torch")
    reference = solve(system, QuasiNewton())
    monkeypatch.setenv("FIXEDPOINT_KERNELS", "triton")
    with OperationCounter() as counter:
        fused = solve(system, QuasiNewton())
    assert counter.kernel_launches["_lstm_kernel"] == 0
    assert counter.kernel_launches["_diagonal_kernel"] >= fused.stats.iterations - 1
    assert fused.converged and float((fused.value - reference.value).abs().max()) <= 1e-12
