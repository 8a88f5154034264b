"""Every solver reproduces torch.nn's RNN/GRU/LSTM on the same weights and inputs.

Bounds: max |diff| over output, h_n (and c_n) ≤ 1e-10 in float64, ≤ 1e-5 in float32.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from helpers import BOUNDS, CELLS, CELL_IDS, generator, make_hx, max_diff, randn, random_network, reference
from fixedpoint import (
    Anderson, Auto, InputError, Network, Newton, Picard, QuasiNewton, SequenceSystem, Sequential, load_network, solve,
    solve_network,
)

SOLVERS = [
    Sequential(), Sequential(kernel="fused"), Auto(), Picard(), Picard(damping=0.5), Anderson(), Newton(),
    Newton(chunk=3), QuasiNewton(), Newton(damping="backtracking"), QuasiNewton(damping="backtracking"),
]
SOLVER_IDS = [
    "sequential", "sequential-fused", "auto", "picard", "picard-damped", "anderson", "newton",
    "newton-chunked", "quasi-newton", "damped-newton", "damped-quasi-newton",
]
DTYPES = [torch.float64, torch.float32]
DTYPE_IDS = ["f64", "f32"]
INPUT_SIZE = 3
HIDDEN = 5
BATCH = 2


def check_against_torch(network: Network, inputs, hx=None, solver=None, module=None):
    """Solve, compare with torch.nn, and return the NetworkSolution."""
    expected = reference(network if module is None else module, inputs, hx)
    solution = solve_network(network, inputs, hx, solver)
    assert solution.converged
    for layer in solution.layers:
        assert len(layer) == network.num_directions
        for part in layer:
            assert part.stats.iterations <= part.system.seq_len
    diff = max_diff(solution, expected)
    assert diff <= BOUNDS[network.dtype], f"max |diff| to torch.nn = {diff:.3e}"
    return solution


# -- the main grid: cell × layers × T × solver × dtype ----------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("solver", SOLVERS, ids=SOLVER_IDS)
@pytest.mark.parametrize("seq_len", [1, 2, 7, 512])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("kind,nonlinearity", CELLS, ids=CELL_IDS)
def test_matches_torch(kind, nonlinearity, num_layers, seq_len, solver, dtype):
    seed = 100 * num_layers + seq_len + 7 * CELLS.index((kind, nonlinearity))
    network = random_network(kind, nonlinearity, hidden_size=HIDDEN, seed=seed, dtype=dtype, num_layers=num_layers)
    inputs = randn(seq_len, BATCH, INPUT_SIZE, seed=seed + 1, dtype=dtype)
    solution = check_against_torch(network, inputs, solver=solver)
    assert solution.output.shape == (seq_len, BATCH, HIDDEN)
    assert solution.h_n.shape == (num_layers, BATCH, HIDDEN)
    # The last output is the top layer's final hidden state.
    assert torch.equal(solution.output[-1], solution.h_n[-1])


# -- torch.nn options ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("solver", SOLVERS, ids=SOLVER_IDS)
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("kind,nonlinearity", CELLS, ids=CELL_IDS)
def test_bidirectional(kind, nonlinearity, num_layers, solver, dtype):
    network = random_network(kind, nonlinearity, hidden_size=HIDDEN, seed=11 + num_layers, dtype=dtype,
                             num_layers=num_layers, bidirectional=True)
    assert network.bidirectional and network.to_torch().bidirectional
    inputs = randn(37, BATCH, INPUT_SIZE, seed=12, dtype=dtype)
    solution = check_against_torch(network, inputs, solver=solver)
    assert solution.output.shape == (37, BATCH, 2 * HIDDEN)
    assert solution.h_n.shape == (2 * num_layers, BATCH, HIDDEN)
    # Reverse direction: its final state is its output at time 0.
    assert torch.equal(solution.output[0, :, HIDDEN:], solution.h_n[-1])


@pytest.mark.parametrize("solver", SOLVERS, ids=SOLVER_IDS)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind,nonlinearity", CELLS, ids=CELL_IDS)
def test_batch_first(kind, nonlinearity, bidirectional, solver):
    base = random_network(kind, nonlinearity, hidden_size=HIDDEN, seed=21, num_layers=2, bidirectional=bidirectional)
    network = Network(base.cells, batch_first=True)
    module = network.to_torch()
    assert module.batch_first
    inputs = randn(3, 19, INPUT_SIZE, seed=22)  # (B, T, I)
    solution = check_against_torch(network, inputs, solver=solver)
    directions = 2 if bidirectional else 1
    assert solution.output.shape == (3, 19, directions * HIDDEN)
    # Same numbers as the time-major network on the transposed input.
    time_major = solve_network(base, inputs.transpose(0, 1).contiguous(), None, solver)
    assert float((time_major.output.transpose(0, 1) - solution.output).abs().max()) <= 1e-12


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("solver", SOLVERS, ids=SOLVER_IDS)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind,nonlinearity", CELLS, ids=CELL_IDS)
def test_nonzero_hx(kind, nonlinearity, bidirectional, solver, dtype):
    network = random_network(kind, nonlinearity, hidden_size=HIDDEN, seed=31, dtype=dtype, num_layers=2, bidirectional=bidirectional)
    inputs = randn(23, BATCH, INPUT_SIZE, seed=32, dtype=dtype)
    hx = make_hx(network, BATCH, seed=33)
    solution = check_against_torch(network, inputs, hx=hx, solver=solver)
    # hx really matters: the zero-state solution is measurably different at t = 0.
    zero = solve_network(network, inputs, None, solver)
    assert float((zero.output[0] - solution.output[0]).abs().max()) > 1e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("solver", SOLVERS, ids=SOLVER_IDS)
@pytest.mark.parametrize("kind,nonlinearity", CELLS, ids=CELL_IDS)
def test_no_bias(kind, nonlinearity, solver, dtype):
    network = random_network(kind, nonlinearity, hidden_size=HIDDEN, seed=41, dtype=dtype, num_layers=2, bias=False)
    assert not network.has_bias
    module = network.to_torch()
    assert module.bias is False and "bias_ih_l0" not in module.state_dict()
    inputs = randn(29, BATCH, INPUT_SIZE, seed=42, dtype=dtype)
    check_against_torch(network, inputs, hx=make_hx(network, BATCH, seed=43), solver=solver, module=module)


# -- from_torch / to_torch / load_network ----------------------------------------------------------
TORCH_MODULES = {"elman": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


def fresh_module(kind, nonlinearity, *, seed, dtype=torch.float64, **options) -> nn.RNNBase:
    """A freshly constructed torch.nn module whose parameters are redrawn from a seeded generator
    (torch.nn's own init would use the global RNG)."""
    extra = {"nonlinearity": nonlinearity} if kind == "elman" else {}
    module = TORCH_MODULES[kind](dtype=dtype, **extra, **options)
    gen = generator(seed)
    bound = 1 / math.sqrt(module.hidden_size)
    with torch.no_grad():
        for parameter in module.parameters():
            draw = torch.rand(parameter.shape, generator=gen, dtype=torch.float64) * 2 * bound - bound
            parameter.copy_(draw.to(dtype))
    return module


MODULE_CONFIGS = [
    dict(input_size=3, hidden_size=4, num_layers=1),
    dict(input_size=2, hidden_size=6, num_layers=2, bidirectional=True),
    dict(input_size=4, hidden_size=5, num_layers=3, batch_first=True),
    dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True, batch_first=True, bias=False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("config", MODULE_CONFIGS, ids=["1l", "2l-bi", "3l-bf", "2l-bi-bf-nobias"])
@pytest.mark.parametrize("kind,nonlinearity", CELLS, ids=CELL_IDS)
def test_from_torch_module(kind, nonlinearity, config, dtype):
    module = fresh_module(kind, nonlinearity, seed=51, dtype=dtype, **config)
    network = Network.from_torch(module)
    assert network.kind == kind and network.dtype == dtype
    assert network.num_layers == config["num_layers"]
    assert network.bidirectional == config.get("bidirectional", False)
    assert network.batch_first == config.get("batch_first", False)
    assert network.has_bias == config.get("bias", True)
    if kind == "elman":
        assert network.nonlinearity == nonlinearity
    batch, steps = 3, 17
    shape = (batch, steps) if network.batch_first else (steps, batch)
    inputs = randn(*shape, config["input_size"], seed=52, dtype=dtype)
    for solver in SOLVERS:
        check_against_torch(network, inputs, hx=make_hx(network, batch, seed=53), solver=solver, module=module)


@pytest.mark.parametrize("config", MODULE_CONFIGS, ids=["1l", "2l-bi", "3l-bf", "2l-bi-bf-nobias"])
@pytest.mark.parametrize("kind,nonlinearity", CELLS, ids=CELL_IDS)
def test_round_trip_state_dict(kind, nonlinearity, config):
    module = fresh_module(kind, nonlinearity, seed=61, dtype=torch.float32, **config)
    again = Network.from_torch(module).to_torch()
    assert type(again) is type(module)
    for option in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "bidirectional"):
        assert getattr(again, option) == getattr(module, option), option
    if kind == "elman":
        assert again.nonlinearity == module.nonlinearity
    original, copied = module.state_dict(), again.state_dict()
    assert list(original) == list(copied)
    for name in original:
        assert copied[name].dtype == original[name].dtype
        assert torch.equal(copied[name], original[name]), name
    # The copy owns its tensors: changing the module afterwards does not change the network.
    network = Network.from_torch(module)
    with torch.no_grad():
        module.weight_hh_l0.add_(1.0)
    assert not torch.equal(network.cells[0][0].weight_hh, module.weight_hh_l0.detach())


@pytest.mark.parametrize("what", ["module", "state_dict"])
@pytest.mark.parametrize("kind,nonlinearity", CELLS, ids=CELL_IDS)
def test_load_network(kind, nonlinearity, what, tmp_path):
    module = fresh_module(kind, nonlinearity, seed=71, input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    path = tmp_path / f"{kind}-{what}.pt"
    torch.save(module if what == "module" else module.state_dict(), path)
    # A state_dict does not record an Elman network's nonlinearity: pass it.
    network = load_network(path, nonlinearity=nonlinearity if kind == "elman" else None)
    assert network.kind == kind and network.num_layers == 2 and network.bidirectional
    assert network.nonlinearity == (nonlinearity if kind == "elman" else None)
    for name, value in module.state_dict().items():
        assert torch.equal(network.state_dict()[name], value), name
    inputs = randn(13, BATCH, 3, seed=72)
    for solver in SOLVERS:
        check_against_torch(network, inputs, hx=make_hx(network, BATCH, seed=73), solver=solver, module=module)


def test_load_network_elman_state_dict_default_is_tanh(tmp_path):
    module = fresh_module("elman", "relu", seed=81, input_size=3, hidden_size=4)
    torch.save(module.state_dict(), tmp_path / "relu.pt")
    assert load_network(tmp_path / "relu.pt").nonlinearity == "tanh"  # documented default
    relu = load_network(tmp_path / "relu.pt", nonlinearity="relu")
    assert relu.nonlinearity == "relu"
    torch.save(module, tmp_path / "relu-module.pt")
    assert load_network(tmp_path / "relu-module.pt").nonlinearity == "relu"  # a module records it
    inputs = randn(11, BATCH, 3, seed=82)
    check_against_torch(relu, inputs, module=module)


def test_solves_and_modules_compute_in_true_float32_whatever_the_process_chose():
    # TF32 flags are process-wide; a solve and a module's passes switch them off for their own
    # duration (float32 exactness claims need it) and restore the caller's choice afterwards.
    from fixedpoint.nn import GRU

    network = random_network("gru", "tanh", hidden_size=HIDDEN, seed=5, dtype=torch.float32)
    system = SequenceSystem.build(network.cells[0][0], randn(6, BATCH, INPUT_SIZE, seed=6, dtype=torch.float32))
    seen = []
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    # (torch._C's setter: torch's test utilities, imported by another test file, freeze the
    # cudnn flags against plain assignment.)
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch._C._set_cudnn_allow_tf32(True)
        solve(system, Picard(), callback=lambda *_: seen.append(
            (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)))
        assert seen and set(seen) == {(False, False)}
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
        GRU(INPUT_SIZE, 4)(randn(5, 2, INPUT_SIZE, seed=7, dtype=torch.float32))
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved[0]
        torch._C._set_cudnn_allow_tf32(saved[1])



def test_timed_drains_the_queue_around_each_run_and_returns_the_median(monkeypatch):
    # Every timing in the package and its benchmarks goes through runtime.timed: the clock is read
    # around each run only, the warm-up run is not timed, and the median is what comes back.
    from fixedpoint import runtime

    ticks = iter([0.0, 5.0, 10.0, 11.0, 20.0, 23.0])  # runs of 5, 1 and 3 seconds
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: next(ticks))
    drained = []
    monkeypatch.setattr(runtime, "synchronize", lambda device: drained.append(device))
    calls = []
    value, seconds = runtime.timed(lambda: calls.append(len(calls)) or len(calls), torch.device("cpu"), 3, warm=True)
    assert (value, seconds) == (4, 3.0) and len(calls) == 4
    assert len(drained) == 6  # before and after each timed run
    with pytest.raises(ValueError, match="repeats must be ≥ 1"):
        runtime.timed(lambda: None, torch.device("cpu"), 0)


# -- variable lengths ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,nonlinearity", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("solver", [Picard(), QuasiNewton(), Newton(), Anderson(), Sequential()],
                         ids=["picard", "quasi-newton", "newton", "anderson", "sequential"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_variable_lengths_match_packed_torch_nn(kind, nonlinearity, solver, batch_first):
    # lengths: each sample's system ends at its own length, as torch.nn's PackedSequence path.
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    network = random_network(kind, nonlinearity, hidden_size=HIDDEN, seed=31, num_layers=2, bidirectional=True)
    network = Network(network.cells, batch_first=batch_first)
    lengths = torch.tensor([3, 9, 1, 6])
    inputs = randn(9, 4, INPUT_SIZE, seed=32)
    inputs = inputs.transpose(0, 1) if batch_first else inputs
    hx = make_hx(network, 4, seed=33)
    solution = solve_network(network, inputs, hx, solver, lengths=lengths)
    module = network.to_torch()
    with torch.no_grad():
        output, final = module(pack_padded_sequence(inputs, lengths, batch_first=batch_first, enforce_sorted=False), hx)
    output, _ = pad_packed_sequence(output, batch_first=batch_first, total_length=9)
    h_n, c_n = final if isinstance(final, tuple) else (final, None)
    assert solution.converged
    assert max_diff(solution, (output, h_n, c_n)) <= BOUNDS[torch.float64]


def test_variable_lengths_are_validated():
    network = random_network("gru", "tanh", hidden_size=HIDDEN, seed=1)
    inputs = randn(5, 3, INPUT_SIZE, seed=2)
    for lengths, message in (([5, 4], "one entry per sample"), ([5, 6, 1], "1 … T"), ([5, 0, 1], "1 … T"),
                             (torch.tensor([5.0, 4.0, 1.0]), "integers")):
        with pytest.raises(InputError, match=message):
            solve_network(network, inputs, lengths=lengths)


# -- CUDA (skipped without a device) ------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind,nonlinearity", CELLS, ids=CELL_IDS)
def test_matches_torch_on_cuda(kind, nonlinearity, dtype):
    """Same bounds on CUDA against torch.nn's cuDNN path (TF32 off: it is not float32)."""
    network = random_network(kind, nonlinearity, hidden_size=HIDDEN, seed=91, dtype=dtype, num_layers=2, bidirectional=True).to(
        device="cuda"
    )
    assert network.device.type == "cuda"
    inputs = randn(256, BATCH, INPUT_SIZE, seed=92, dtype=dtype).cuda()
    hx = make_hx(network.to(device="cpu"), BATCH, seed=93)
    hx = tuple(t.cuda() for t in hx) if isinstance(hx, tuple) else hx.cuda()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for solver in SOLVERS:
            solution = check_against_torch(network, inputs, hx=hx, solver=solver)
            assert solution.output.device.type == "cuda"


# -- LSTM with proj_size: h' = W_hr (o ⊙ tanh c'), state [h (P), c (H)] -------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("solver", SOLVERS, ids=SOLVER_IDS)
@pytest.mark.parametrize("config", [dict(num_layers=1), dict(num_layers=2, bidirectional=True)], ids=["1l", "2l-bi"])
@pytest.mark.parametrize("seq_len", [1, 7, 300])
def test_projected_lstm_matches_torch(seq_len, config, solver, dtype):
    network = random_network("lstm", "tanh", hidden_size=HIDDEN, seed=61 + seq_len, dtype=dtype, proj_size=2, **config)
    assert network.proj_size == 2 and network.output_size == 2 and network.hidden_size == HIDDEN
    inputs = randn(seq_len, BATCH, INPUT_SIZE, seed=62, dtype=dtype)
    hx = make_hx(network, BATCH, seed=63)
    solution = check_against_torch(network, inputs, hx, solver=solver)
    directions = network.num_directions
    assert solution.output.shape == (seq_len, BATCH, 2 * directions)
    assert solution.c_n.shape == (config["num_layers"] * directions, BATCH, HIDDEN)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_projected_lstm_round_trips_through_torch_nn_and_files(dtype, tmp_path):
    module = fresh_module("lstm", "tanh", seed=64, dtype=dtype, input_size=3, hidden_size=5, num_layers=2,
                          proj_size=3, batch_first=True)
    network = Network.from_torch(module)
    assert network.proj_size == 3 and network.batch_first
    for name, value in network.to_torch().state_dict().items():
        assert torch.equal(value, module.state_dict()[name])
    torch.save(module.state_dict(), tmp_path / "projected.pt")
    loaded = load_network(tmp_path / "projected.pt")
    assert loaded.proj_size == 3
    inputs = randn(4, 11, 3, seed=65, dtype=dtype)
    check_against_torch(Network(loaded.cells, batch_first=True), inputs, module=module)
