"""Bad input is refused with InputError (a ValueError) and failed solves are reported honestly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from helpers import CELLS, CELL_IDS, make_hx, randn, random_network, reference
from fixedpoint import (
    Anderson,
    ElmanCell,
    GRUCell,
    InputError,
    LSTMCell,
    Network,
    Newton,
    NoConvergence,
    Picard,
    Result,
    QuasiNewton,
    Sequential,
    SequenceSystem,
    load_network,
    solve,
    solve_network,
)
from fixedpoint.conditioning import position_errors, propagated_bound, rounding_local, tolerance_local

BAD_VALUES = [float("nan"), float("inf"), -float("inf")]
BAD_IDS = ["nan", "inf", "-inf"]
ALL_SOLVERS = [
    Sequential(), Sequential(kernel="fused"), Picard(), Picard(damping=0.5), Anderson(), Newton(), QuasiNewton(),
    Newton(damping="backtracking"),
]
SOLVER_IDS = ["sequential", "sequential-fused", "picard", "picard-damped", "anderson", "newton", "quasi-newton", "damped"]


def test_input_error_is_a_value_error():
    assert issubclass(InputError, ValueError)
    assert issubclass(NoConvergence, RuntimeError)


# -- non-finite values --------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", BAD_VALUES, ids=BAD_IDS)
@pytest.mark.parametrize("kind,nonlinearity", CELLS, ids=CELL_IDS)
def test_nonfinite_inputs(kind, nonlinearity, bad):
    network = random_network(kind, nonlinearity)
    inputs = randn(6, 2, 3, seed=2)
    inputs[4, 1, 2] = bad
    with pytest.raises(InputError, match="NaN/Inf"):
        solve_network(network, inputs)
    with pytest.raises(InputError, match="NaN/Inf"):
        SequenceSystem.build(network.cells[0][0], inputs)


CELL_CLASSES = {"elman": ElmanCell, "gru": GRUCell, "lstm": LSTMCell}


@pytest.mark.parametrize("which", ["weight_ih", "weight_hh", "bias_ih", "bias_hh"])
@pytest.mark.parametrize("bad", BAD_VALUES, ids=BAD_IDS)
@pytest.mark.parametrize("kind", ["elman", "gru", "lstm"])
def test_nonfinite_weights(kind, bad, which):
    good = random_network(kind).cells[0][0]
    tensors = {name: getattr(good, name).clone() for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    tensors[which].view(-1)[3] = bad
    with pytest.raises(InputError, match=which):
        CELL_CLASSES[kind](**tensors)
    with pytest.raises(InputError, match=which):
        good.with_tensors(**{which: tensors[which]})
    # The same through torch.nn modules and state_dicts.
    module = random_network(kind).to_torch()
    with torch.no_grad():
        getattr(module, f"{which}_l0").view(-1)[3] = bad
    with pytest.raises(InputError):
        Network.from_torch(module)
    with pytest.raises(InputError):
        Network.from_state_dict(module.state_dict())


@pytest.mark.parametrize("bad", BAD_VALUES, ids=BAD_IDS)
@pytest.mark.parametrize("kind,nonlinearity", CELLS, ids=CELL_IDS)
def test_nonfinite_hx(kind, nonlinearity, bad):
    network = random_network(kind, nonlinearity, num_layers=2)
    inputs = randn(5, 2, 3, seed=3)
    hx = make_hx(network, 2, seed=4)
    if kind == "lstm":
        h0, c0 = hx
        for which in (0, 1):
            parts = [h0.clone(), c0.clone()]
            parts[which][1, 0, 2] = bad
            with pytest.raises(InputError, match="NaN/Inf"):
                solve_network(network, inputs, tuple(parts))
    else:
        hx = hx.clone()
        hx[1, 1, 0] = bad
        with pytest.raises(InputError, match="NaN/Inf"):
            solve_network(network, inputs, hx)
    state = torch.zeros(2, network.cells[0][0].state_size, dtype=torch.float64)
    state[0, 0] = bad
    with pytest.raises(InputError, match="NaN/Inf"):
        SequenceSystem.build(network.cells[0][0], inputs, state)


def test_nonfinite_initial_guess():
    system = SequenceSystem.build(random_network("gru").cells[0][0], randn(5, 2, 3, seed=5))
    guess = torch.zeros(system.state_shape, dtype=torch.float64)
    guess[2, 1, 1] = float("nan")
    with pytest.raises(InputError, match="NaN/Inf"):
        solve(system, Picard(), initial_guess=guess)


# -- shapes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(6, 3), (6, 2, 3, 1), (6, 2, 4), (6, 2, 2), (0, 2, 3), (6, 0, 3)],
                         ids=["2d", "4d", "features+1", "features-1", "T=0", "B=0"])
@pytest.mark.parametrize("kind,nonlinearity", CELLS, ids=CELL_IDS)
def test_wrong_input_shape(kind, nonlinearity, shape):
    network = random_network(kind, nonlinearity)
    inputs = torch.zeros(shape, dtype=torch.float64)
    with pytest.raises(InputError):
        solve_network(network, inputs)
    with pytest.raises(InputError):
        SequenceSystem.build(network.cells[0][0], inputs)


def test_wrong_input_shape_batch_first():
    network = Network(random_network("gru").cells, batch_first=True)
    with pytest.raises(InputError, match="features"):
        solve_network(network, torch.zeros(2, 6, 4, dtype=torch.float64))  # (B, T, I+1)


@pytest.mark.parametrize("kind,nonlinearity", CELLS, ids=CELL_IDS)
def test_wrong_hx_shape(kind, nonlinearity):
    network = random_network(kind, nonlinearity, num_layers=2)
    inputs = randn(5, 2, 3, seed=6)
    for shape in [(2, 3, 4), (1, 2, 4), (3, 2, 4), (2, 2, 5), (2, 4), (2, 2, 4, 1)]:
        part = torch.zeros(shape, dtype=torch.float64)
        good = torch.zeros(2, 2, 4, dtype=torch.float64)
        hx = (part, good) if kind == "lstm" else part
        with pytest.raises(InputError, match="shape"):
            solve_network(network, inputs, hx)
        if kind == "lstm":
            with pytest.raises(InputError, match="shape"):
                solve_network(network, inputs, (good, part))
    with pytest.raises(InputError, match="shape"):
        SequenceSystem.build(network.cells[0][0], inputs, torch.zeros(3, network.cells[0][0].state_size,
                                                                      dtype=torch.float64))


def test_lstm_needs_a_pair():
    network = random_network("lstm")
    inputs = randn(5, 2, 3, seed=7)
    h0 = torch.zeros(1, 2, 4, dtype=torch.float64)
    for hx in (h0, (h0,), (h0, h0, h0)):
        with pytest.raises(InputError, match=r"\(h_0, c_0\)"):
            solve_network(network, inputs, hx)


@pytest.mark.parametrize("kind,nonlinearity", CELLS[:3], ids=CELL_IDS[:3])
def test_single_state_cells_refuse_a_pair(kind, nonlinearity):
    network = random_network(kind, nonlinearity)
    h0 = torch.zeros(1, 2, 4, dtype=torch.float64)
    with pytest.raises(InputError, match="single tensor"):
        solve_network(network, randn(5, 2, 3, seed=8), (h0, h0))


def test_wrong_initial_guess_shape():
    system = SequenceSystem.build(random_network("lstm").cells[0][0], randn(5, 2, 3, seed=9))
    with pytest.raises(InputError, match="initial_guess"):
        solve(system, Picard(), initial_guess=torch.zeros(5, 2, 4, dtype=torch.float64))


# -- dtypes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float16, torch.bfloat16, torch.complex128, torch.bool])
@pytest.mark.parametrize("kind,nonlinearity", CELLS, ids=CELL_IDS)
def test_unsupported_input_dtype(kind, nonlinearity, dtype):
    network = random_network(kind, nonlinearity)
    inputs = torch.ones(5, 2, 3, dtype=dtype)
    with pytest.raises(InputError, match="dtype"):
        solve_network(network, inputs)
    with pytest.raises(InputError, match="dtype"):
        SequenceSystem.build(network.cells[0][0], inputs)


@pytest.mark.parametrize("kind,nonlinearity", CELLS, ids=CELL_IDS)
def test_mixed_dtypes(kind, nonlinearity):
    network = random_network(kind, nonlinearity)  # float64
    with pytest.raises(InputError):
        solve_network(network, randn(5, 2, 3, seed=10, dtype=torch.float32))
    hx = make_hx(network.to(torch.float32), 2, seed=11)  # float32 hx for float64 weights
    with pytest.raises(InputError):
        solve_network(network, randn(5, 2, 3, seed=10), hx)
    hx_int = torch.zeros(1, 2, 4, dtype=torch.int64)
    with pytest.raises(InputError, match="dtype"):
        solve_network(network, randn(5, 2, 3, seed=10), (hx_int, hx_int) if kind == "lstm" else hx_int)


def test_not_a_tensor():
    with pytest.raises(InputError, match="torch.Tensor"):
        solve_network(random_network("gru"), [[[0.0, 0.0, 0.0]]])


def test_cell_weight_shapes_of_another_cell_type():
    gru = random_network("gru").cells[0][0]
    with pytest.raises(InputError, match="another cell type"):
        LSTMCell(gru.weight_ih, gru.weight_hh, gru.bias_ih, gru.bias_hh)
    with pytest.raises(InputError, match="another cell type"):
        ElmanCell(gru.weight_ih, gru.weight_hh, gru.bias_ih, gru.bias_hh)
    with pytest.raises(InputError, match="both biases"):
        GRUCell(gru.weight_ih, gru.weight_hh, gru.bias_ih, None)


@pytest.mark.parametrize(
    "kwargs",
    [dict(kind="lstmx"), dict(hidden_size=0), dict(num_layers=0), dict(scale=-1.0), dict(scale=float("nan")),
     dict(dtype=torch.float16), dict(nonlinearity="sigmoid")],
    ids=["kind", "hidden", "layers", "scale<0", "scale-nan", "float16", "nonlinearity"],
)
def test_network_random_bad_options(kwargs):
    options = dict(kind="elman", input_size=3, hidden_size=4)
    options.update(kwargs)
    kind, input_size, hidden = options.pop("kind"), options.pop("input_size"), options.pop("hidden_size")
    with pytest.raises(InputError):
        Network.random(kind, input_size, hidden, **options)


# -- weights files ----------------------------------------------------------------------------------------
def test_weights_of_another_cell_type(tmp_path):
    gru = random_network("gru", num_layers=2)
    path = tmp_path / "gru.pt"
    torch.save(gru.to_torch().state_dict(), path)
    loaded = load_network(path)
    assert loaded.kind == "gru"
    with pytest.raises(InputError, match="gru"):
        Network.from_state_dict(torch.load(path, weights_only=True), kind="lstm")
    with pytest.raises(InputError, match="gru"):
        Network.from_state_dict(loaded.state_dict(), kind="elman")
    # Used as an LSTM (with an LSTM's hx), the loaded GRU refuses.
    h0 = torch.zeros(2, 2, 4, dtype=torch.float64)
    with pytest.raises(InputError):
        solve_network(loaded, randn(5, 2, 3, seed=12), (h0, h0))


def test_module_nonlinearity_mismatch(tmp_path):
    module = random_network("elman", "tanh").to_torch()
    torch.save(module, tmp_path / "tanh.pt")
    with pytest.raises(InputError, match="nonlinearity"):
        load_network(tmp_path / "tanh.pt", nonlinearity="relu")


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_network(tmp_path / "does-not-exist.pt")
    with pytest.raises(InputError, match="not found"):
        load_network(tmp_path)  # a directory


@pytest.mark.parametrize(
    "content",
    [b"", b"this is not a torch file", bytes(range(256)) * 4, b"PK\x03\x04" + b"\x00" * 100],
    ids=["empty", "text", "binary", "fake-zip"],
)
def test_corrupt_file(tmp_path, content):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(content)
    with pytest.raises(InputError, match="cannot read"):
        load_network(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(random_network("lstm").to_torch().state_dict(), path)
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError):
        load_network(tmp_path / "cut.pt")


def test_file_with_other_content(tmp_path):
    cases = {
        "list.pt": [torch.zeros(3)],
        "tensor.pt": torch.zeros(4, 4),
        "linear.pt": nn.Linear(3, 4).state_dict(),
        "extra.pt": {**random_network("gru").state_dict(), "weight_hh_l7_extra": torch.zeros(1)},
        "no-ih.pt": {k: v for k, v in random_network("gru").state_dict().items() if k != "weight_ih_l0"},
    }
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(InputError):
            load_network(tmp_path / name)
    # A whole module of another class is refused too (weights_only allows only RNN/GRU/LSTM).
    torch.save(nn.Linear(3, 4), tmp_path / "linear-module.pt")
    with pytest.raises(InputError):
        load_network(tmp_path / "linear-module.pt")


def test_from_torch_refuses_other_modules():
    with pytest.raises(InputError, match="RNN, GRU or LSTM"):
        Network.from_torch(nn.Linear(3, 4))



def test_a_projection_must_have_torch_nn_s_layout():
    weights = Network.random("lstm", 3, 4, proj_size=2, seed=0).state_dict()
    for bad in (weights["weight_hr_l0"].T, weights["weight_hr_l0"][:1]):
        with pytest.raises(InputError, match="weight_hr"):
            Network.from_state_dict({**weights, "weight_hr_l0": bad})
    with pytest.raises(InputError, match="proj_size argument is only supported for LSTM"):
        Network.random("gru", 3, 4, proj_size=2)
    with pytest.raises(InputError, match="proj_size has to be smaller"):
        Network.random("lstm", 3, 4, proj_size=4)


# -- solver configurations ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        lambda: Picard(damping=1),
        lambda: Picard(damping=1.5),
        lambda: Picard(damping=-0.1),
        lambda: Picard(damping=float("nan")),
        lambda: Picard(damping="0.5"),
        lambda: Picard(rtol=-1),
        lambda: Picard(atol=-1e-9),
        lambda: Picard(rtol=float("inf")),
        lambda: Picard(rtol=0, atol=0),
        lambda: Picard(rtol=True),
        lambda: Anderson(memory=0),
        lambda: Anderson(memory=-3),
        lambda: Anderson(memory=2.0),
        lambda: Anderson(memory=True),
        lambda: Anderson(mixing=0),
        lambda: Anderson(mixing=1.01),
        lambda: Anderson(mixing=-0.5),
        lambda: Anderson(regularization=-1e-3),
        lambda: Anderson(max_condition=1),
        lambda: Anderson(max_condition=0.5),
        lambda: Anderson(max_residual_growth=0.5),
        lambda: Anderson(rtol=0, atol=0),
        lambda: Sequential(rtol=-1),
    ],
    ids=[
        "picard-damping=1", "picard-damping=1.5", "picard-damping<0", "picard-damping-nan", "picard-damping-str",
        "picard-rtol<0", "picard-atol<0", "picard-rtol-inf", "picard-tol-both-0", "picard-rtol-bool",
        "anderson-memory=0", "anderson-memory<0", "anderson-memory-float", "anderson-memory-bool",
        "anderson-mixing=0", "anderson-mixing>1", "anderson-mixing<0", "anderson-reg<0",
        "anderson-cond=1", "anderson-cond<1", "anderson-growth<1", "anderson-tol-both-0", "sequential-rtol<0",
    ],
)
def test_bad_solver_options(make):
    with pytest.raises(InputError):
        make()


def test_good_solver_edges_are_accepted():
    assert Picard(damping=0.0).damping == 0.0
    assert Picard(damping=0.999).damping == 0.999
    assert Anderson(mixing=1.0, memory=1, regularization=0.0, max_residual_growth=1.0).mixing == 1.0
    assert Picard(rtol=0, atol=1e-9).tolerances(torch.float64) == (0.0, 1e-9)
    assert Picard().tolerances(torch.float32) == (1e-6, 1e-6)
    assert Picard().tolerances(torch.float64) == (1e-12, 1e-12)


@pytest.mark.parametrize(
    "make",
    [lambda: Picard(dampnig=0.1), lambda: Anderson(memroy=3), lambda: Anderson(damping=0.5),
     lambda: Sequential(damping=0.5), lambda: Picard(0.1, 0.1, 0.1, 0.1)],
    ids=["picard-dampnig", "anderson-memroy", "anderson-damping", "sequential-damping", "too-many-positional"],
)
def test_misspelt_solver_option_is_a_type_error(make):
    with pytest.raises(TypeError):
        make()


def test_solver_configs_are_frozen():
    solver = Picard(damping=0.3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        solver.damping = 0.9  # type: ignore[misc]


def test_bad_solve_arguments():
    system = SequenceSystem.build(random_network("gru").cells[0][0], randn(5, 2, 3, seed=13))
    with pytest.raises(InputError, match="Solver"):
        solve(system, "picard")  # type: ignore[arg-type]
    for max_steps in (0, -1, 2.5, True):
        with pytest.raises(InputError, match="max_steps"):
            solve(system, Picard(), max_steps=max_steps)


# -- failed solves -------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", [Picard(), Picard(damping=0.5), Anderson()], ids=["picard", "damped", "anderson"])
@pytest.mark.parametrize("kind,nonlinearity", CELLS, ids=CELL_IDS)
def test_max_steps_reached(kind, nonlinearity, solver):
    network = random_network(kind, nonlinearity, scale=2.0)
    system = SequenceSystem.build(network.cells[0][0], randn(60, 2, 3, seed=14))
    with pytest.raises(NoConvergence) as caught:
        solve(system, solver, max_steps=3)
    solution = caught.value.solution
    assert solution.result is Result.max_steps_reached
    assert not solution.converged
    assert str(caught.value) == Result.max_steps_reached.message
    assert solution.stats.iterations == 3
    assert solution.stats.exact_prefix == 3
    assert solution.stats.residual_history.shape == (3, 2)
    assert float(solution.stats.residual.max()) >= 1
    # The carried value is the last iterate: its first 3 positions are exact, the rest is not yet.
    exact = system.sequential()
    assert float((solution.value[:3] - exact[:3]).abs().max()) <= 1e-12
    assert float((solution.value - exact).abs().max()) > 1e-6
    # throw=False returns the same outcome instead of raising.
    returned = solve(system, solver, max_steps=3, throw=False)
    assert returned.result is Result.max_steps_reached and not returned.converged
    assert torch.equal(returned.value, solution.value)


def test_max_steps_reached_whole_network():
    network = random_network("lstm", num_layers=2, bidirectional=True)
    inputs = randn(40, 2, 3, seed=15)
    with pytest.raises(NoConvergence) as caught:
        solve_network(network, inputs, None, Picard(), max_steps=2)
    assert caught.value.solution.result is Result.max_steps_reached
    returned = solve_network(network, inputs, None, Picard(), max_steps=2, throw=False)
    assert returned.result is Result.max_steps_reached and not returned.converged
    assert all(s.result is Result.max_steps_reached for s in returned.solutions)
    assert returned.iterations == 4 * 2
    # ... whereas the default max_steps (T) always suffices.
    assert solve_network(network, inputs, None, Picard()).converged


@pytest.mark.parametrize("solver", ALL_SOLVERS, ids=SOLVER_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_overflowing_relu_is_reported_nonfinite(dtype, solver):
    """relu Elman, W_hh × 50, T = 2000: the true (sequential, torch.nn) solution overflows.
    The honest outcome is Result.nonfinite — never an exception from inside a solver, never
    NaN/Inf reported as converged."""
    network = Network.random("elman", 3, 8, nonlinearity="relu", scale=50.0, seed=1, dtype=dtype)
    inputs = randn(2000, 2, 3, seed=0, dtype=dtype)
    with torch.no_grad():
        output, _ = network.to_torch()(inputs)
    overflow = (~torch.isfinite(output)).flatten(1).any(1)
    assert bool(overflow.any()), "the premise: torch.nn overflows on this network"
    first_bad = int(overflow.nonzero()[0])
    assert first_bad < 2000

    solution = solve_network(network, inputs, None, solver, throw=False)
    assert solution.result is Result.nonfinite
    assert not solution.converged
    part = solution.layers[0][0]
    assert part.result is Result.nonfinite and not part.converged
    assert part.stats.nonfinite_at is not None
    iteration, position = part.stats.nonfinite_at
    assert iteration == part.stats.iterations
    assert 0 <= position < 2000
    assert part.stats.iterations <= 2000
    if isinstance(solver, Sequential):
        assert position == first_bad  # the loop overflows exactly where torch.nn does
    with pytest.raises(NoConvergence) as caught:
        solve_network(network, inputs, None, solver)
    assert caught.value.solution.result is Result.nonfinite


@pytest.mark.parametrize("solver", ALL_SOLVERS, ids=SOLVER_IDS)
def test_large_but_finite_relu_solution_converges(solver):
    """The counterpart: relu × 8 grows to ~1e40 over T = 200 but stays finite in float64, and
    every solver finds it, as closely as the problem's conditioning allows.

    An expanding map amplifies rounding: the solvers' batched recurrent product rounds
    differently from the loop's per-step one (and one CPU's GEMM from another's), and the two
    differ by up to 1e-9 relative here.  What holds on every IEEE machine is the first-order
    bound ``‖value_t − loop_t‖₂ ≤ 2·Σ_k ‖J_t⋯J_{k+1}‖₂·ρ_k (+ the same sum over the tolerance when
    the solve stopped by it)``, with ``ρ_k`` the rounding of one step (fixedpoint.conditioning, docs/testing.md §1–2).
    Here that allows 5e-8 relative; the errors measured on three GEMM code paths were ≤ 6e-11."""
    network = Network.random("elman", 3, 6, nonlinearity="relu", scale=8.0, seed=3)
    inputs = randn(200, 3, 3, seed=1)
    expected, _, _ = reference(network, inputs)
    assert float(expected.abs().max()) > 1e30 and bool(torch.isfinite(expected).all())
    solution = solve_network(network, inputs, None, solver)
    assert solution.converged
    part = solution.layers[0][0]
    exact = part.system.sequential()
    if isinstance(solver, Sequential) and solver.kernel == "fused":
        exact = expected  # torch's own kernel: compared with torch.nn, not with the Python loop
    assert_within_conditioning(part, exact)


def assert_within_conditioning(part, exact: torch.Tensor) -> None:
    """``part.value`` is within what rounding and (if it stopped by it) the tolerance allow of ``exact``."""
    system, stats = part.system, part.stats
    allowed = 2 * propagated_bound(system, exact, rounding_local(system, exact))
    if stats.exact_prefix < system.seq_len:  # stopped by the tolerance, not by finite termination
        allowed += propagated_bound(system, exact, tolerance_local(exact, stats.rtol, stats.atol))
    errors = position_errors(part.value, exact)
    assert bool((errors <= allowed).all()), float((errors / allowed).max())


def test_anderson_survives_huge_but_finite_states():
    """relu × 8, T = 100, float32: the true solution peaks near 2e18 — finite, and Sequential and
    Picard both solve it.  Anderson's normal matrix ΔRᵀΔR then overflows float32; its docstring
    promises a plain step for a sample whose normal matrix "is not finite", so Anderson must
    solve it too (plain steps keep finite termination), not raise from inside the solver, and
    as closely to the loop as the conditioning allows (see the test above)."""
    network = Network.random("elman", 3, 6, nonlinearity="relu", scale=8.0, seed=3, dtype=torch.float32)
    inputs = randn(100, 2, 3, seed=1, dtype=torch.float32)
    expected, _, _ = reference(network, inputs)
    assert bool(torch.isfinite(expected).all()) and float(expected.abs().max()) > 1e17
    for solver in (Sequential(), Picard()):
        assert solve_network(network, inputs, None, solver).converged
    solution = solve_network(network, inputs, None, Anderson(), throw=False)
    assert solution.converged, solution.result
    part = solution.layers[0][0]
    assert_within_conditioning(part, part.system.sequential())
    plain = part.stats.solver["plain_steps"]
    assert min(plain) >= 1  # the overflowing normal matrices were rejected, and counted


@pytest.mark.parametrize(
    "state_dict",
    [
        {"weight_hh_l0": torch.tensor(1.0)},
        {"weight_hh_l0": [[1.0, 0.0], [0.0, 1.0]]},
        {"weight_hh_l0": torch.zeros(4), "weight_ih_l0": torch.zeros(4)},
        {"weight_hh_l0": "not a tensor"},
    ],
    ids=["0-d", "list", "1-d", "string"],
)
def test_malformed_state_dict(tmp_path, state_dict):
    """A file holding a state_dict with a malformed weight_hh_l0 is bad input: InputError, not
    an IndexError/AttributeError from inside the loader."""
    with pytest.raises(InputError):
        Network.from_state_dict(state_dict)
    path = tmp_path / "malformed.pt"
    torch.save(state_dict, path)
    with pytest.raises(InputError):
        load_network(path)
