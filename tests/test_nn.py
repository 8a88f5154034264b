"""The drop-in modules of fixedpoint.nn against torch.nn: outputs, every gradient, training, errors.

Gradients come from the adjoint recurrence (fixedpoint.adjoint); torch.nn's come from
backpropagation through time.  They agree to rounding in float64.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

import fixedpoint.nn as fnn
from fixedpoint import InputError, NoConvergence, Picard, QuasiNewton, Sequential, solve
from fixedpoint.adjoint import adjoint_states, solution_gradients
from fixedpoint.network import Network
from fixedpoint.scan import linear_recurrence_sequential
from fixedpoint.solvers import SOLVERS
from fixedpoint.system import SequenceSystem
from helpers import BOUNDS, CELL_IDS, CELLS, randn

MODULES = {"elman": (nn.RNN, fnn.RNN), "gru": (nn.GRU, fnn.GRU), "lstm": (nn.LSTM, fnn.LSTM)}


def make_pair(
    kind: str,
    nonlinearity: str = "tanh",
    *,
    input_size: int = 3,
    hidden_size: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    **options,
) -> tuple[nn.RNNBase, nn.RNNBase]:
    """A torch.nn module at its default initialisation and the fixedpoint module with its weights."""
    reference_type, solved_type = MODULES[kind]
    structure = {k: options.pop(k) for k in ("num_layers", "bias", "batch_first", "bidirectional", "dropout") if k in options}
    if kind == "elman":
        structure["nonlinearity"] = nonlinearity
    torch.manual_seed(seed)
    reference = reference_type(input_size, hidden_size, dtype=dtype, **structure)
    return reference, solved_type.from_torch(reference, **options)


def torch_hx(reference: nn.RNNBase, batch: int, seed: int) -> Tensor | tuple[Tensor, Tensor]:
    shape = (reference.num_layers * (2 if reference.bidirectional else 1), batch, reference.hidden_size)
    dtype = reference.weight_hh_l0.dtype
    h0 = (0.5 * randn(*shape, seed=seed, dtype=dtype)).requires_grad_()
    if isinstance(reference, nn.LSTM):
        return h0, (0.5 * randn(*shape, seed=seed + 1, dtype=dtype)).requires_grad_()
    return h0


def outputs_of(result: tuple[Tensor, Tensor | tuple[Tensor, Tensor]]) -> list[Tensor]:
    output, final = result
    return [output, *(final if isinstance(final, tuple) else (final,))]


def weighted_loss(tensors: list[Tensor]) -> Tensor:
    """A loss that weights every entry differently, so that no gradient is symmetric by accident."""
    return sum((t * torch.linspace(-1.0, 1.5, t.numel(), dtype=t.dtype).view_as(t)).sum() for t in tensors)


def forward_and_gradients(module: nn.RNNBase, inputs: Tensor, hx) -> tuple[list[Tensor], list[Tensor]]:
    states = () if hx is None else hx if isinstance(hx, tuple) else (hx,)
    leaves = [inputs, *states, *module.parameters()]
    outputs = outputs_of(module(inputs, hx))
    return outputs, list(torch.autograd.grad(weighted_loss(outputs), leaves))


def assert_matches_torch(
    reference: nn.RNNBase, solved: nn.RNNBase, steps: int, batch: int = 3, *, seed: int = 7, with_hx: bool = True
) -> None:
    dtype = reference.weight_hh_l0.dtype
    shape = (batch, steps, reference.input_size) if reference.batch_first else (steps, batch, reference.input_size)
    inputs = randn(*shape, seed=seed, dtype=dtype).requires_grad_()
    hx = torch_hx(reference, batch, seed + 1) if with_hx else None
    expected_out, expected_grads = forward_and_gradients(reference, inputs, hx)
    got_out, got_grads = forward_and_gradients(solved, inputs, hx)
    bound = BOUNDS[dtype]
    names = ["input", "h0", "c0"][: 1 + (len(hx) if isinstance(hx, tuple) else 1)] if with_hx else ["input"]
    names += [name for name, _ in solved.named_parameters()]
    for got, expected in zip(got_out, expected_out):
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= bound
    for name, got, expected in zip(names, got_grads, expected_grads):
        assert got.shape == expected.shape, name
        error = (got - expected).abs().max().item()
        assert error <= bound * max(1.0, expected.abs().max().item()), f"gradient of {name}: {error:.2e}"


# -- outputs and gradients equal torch.nn's -----------------------------------------------------
@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["TB", "BT"])
@pytest.mark.parametrize("adjoint", ["scan", "quasi-newton", "sequential", "fused"])
def test_every_structure_matches_torch_float64(cell, num_layers, bidirectional, batch_first, adjoint):
    kind, nonlinearity = cell
    reference, solved = make_pair(
        kind, nonlinearity, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first,
        solver="auto", adjoint=adjoint,
    )
    assert_matches_torch(reference, solved, steps=7)


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("solver", ["sequential", "picard", "anderson", "newton", "quasi-newton", "damped"])
@pytest.mark.parametrize("adjoint", ["scan", "quasi-newton", "sequential"])
def test_every_solver_gives_torch_gradients(cell, solver, adjoint):
    kind, nonlinearity = cell
    reference, solved = make_pair(kind, nonlinearity, num_layers=2, bidirectional=True, solver=solver, adjoint=adjoint)
    assert_matches_torch(reference, solved, steps=9, seed=11)


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("steps", [1, 2, 13])
def test_no_bias_no_hx_and_short_sequences(cell, steps):
    kind, nonlinearity = cell
    reference, solved = make_pair(kind, nonlinearity, num_layers=2, bias=False, solver="quasi-newton")
    assert_matches_torch(reference, solved, steps=steps, with_hx=False)


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_float32_matches_torch(cell):
    kind, nonlinearity = cell
    reference, solved = make_pair(kind, nonlinearity, num_layers=2, bidirectional=True, dtype=torch.float32, solver="picard")
    assert_matches_torch(reference, solved, steps=11)


@pytest.mark.parametrize("kind", ["elman", "gru", "lstm"])
def test_unbatched_input_as_torch(kind):
    reference, solved = make_pair(kind, num_layers=2, bidirectional=True, solver="newton")
    inputs = randn(6, 3, seed=2).requires_grad_()
    hx = torch_hx(reference, 1, 3)
    hx = tuple(h[:, 0].detach().requires_grad_() for h in hx) if isinstance(hx, tuple) else hx[:, 0].detach().requires_grad_()
    expected_out, expected_grads = forward_and_gradients(reference, inputs, hx)
    got_out, got_grads = forward_and_gradients(solved, inputs, hx)
    for got, expected in zip(got_out + got_grads, expected_out + expected_grads):
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["elman", "gru", "lstm"])
def test_dropout_between_layers_draws_as_torch(kind):
    # On a CPU torch.nn draws its inter-layer dropout masks from the global generator in the
    # same order and shape (T, B, D·H) as this module; with one seed the outputs are equal.
    reference, solved = make_pair(kind, num_layers=3, bidirectional=True, batch_first=True, dropout=0.5)
    inputs = randn(3, 6, 3, seed=4)
    torch.manual_seed(5)
    expected = reference(inputs)[0]
    torch.manual_seed(5)
    got = solved(inputs)[0]
    assert (got - expected).abs().max().item() <= 1e-12
    solved.eval()
    reference.eval()
    assert (solved(inputs)[0] - reference(inputs)[0]).abs().max().item() <= 1e-12


# -- gradcheck and training -------------------------------------------------------------------------
@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("adjoint", ["scan", "quasi-newton", "sequential"])
def test_gradcheck_layer(cell, adjoint):
    kind, nonlinearity = cell
    network = Network.random(kind, 2, 3, nonlinearity=nonlinearity, seed=3)
    cell_ = network.cells[0][0]
    options = fnn.LayerOptions(kind, nonlinearity if kind == "elman" else None, Picard(), None, adjoint)
    tensors = [
        randn(5, 2, 2, seed=1),
        0.3 * randn(2, cell_.state_size, seed=2),
        cell_.weight_ih.clone(), cell_.weight_hh.clone(), cell_.bias_ih.clone(), cell_.bias_hh.clone(),
    ]
    tensors = [t.requires_grad_() for t in tensors]
    if nonlinearity == "relu":  # keep pre-activations away from relu's kink, where φ' jumps
        tensors[0] = (tensors[0].detach() + 3.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda *args: fnn.SolvedLayer.apply(options, True, None, *args), tensors)


@pytest.mark.parametrize("adjoint", ["scan", "quasi-newton", "sequential"])
def test_gradcheck_projected_lstm_layer(adjoint):
    # proj_size: h' = W_hr (o ⊙ tanh c'), the state [h (P), c (H)]; W_hr gets its gradient too.
    cell_ = Network.random("lstm", 2, 4, proj_size=2, seed=3).cells[0][0]
    options = fnn.LayerOptions("lstm", None, QuasiNewton(), None, adjoint)
    tensors = [randn(5, 2, 2, seed=1), 0.3 * randn(2, cell_.state_size, seed=2)]
    tensors += [getattr(cell_, name).clone() for name in cell_.tensor_names]
    tensors = [t.requires_grad_() for t in tensors]
    assert torch.autograd.gradcheck(lambda *args: fnn.SolvedLayer.apply(options, True, None, *args), tensors)
    assert torch.autograd.gradgradcheck(lambda *args: fnn.SolvedLayer.apply(options, True, None, *args), tensors)


@pytest.mark.parametrize("kind", ["elman", "gru", "lstm"])
def test_gradcheck_module(kind):
    _, solved = make_pair(kind, num_layers=2, bidirectional=True, batch_first=True, hidden_size=3, solver="quasi-newton")
    inputs = randn(2, 4, 3, seed=5).requires_grad_()
    hx = torch_hx(solved, 2, 6)

    def run(x, *states):
        return tuple(outputs_of(solved(x, states if kind == "lstm" else states[0])))

    assert torch.autograd.gradcheck(run, (inputs, *(hx if isinstance(hx, tuple) else (hx,))))


def training_losses(module: nn.RNNBase, steps: int = 15) -> list[float]:
    """Sequence regression with SGD on a fixed seed: the loss after each step."""
    torch.manual_seed(21)
    head = nn.Linear(module.hidden_size, 1, dtype=torch.float64)
    optimizer = torch.optim.SGD([*module.parameters(), *head.parameters()], lr=0.1)
    inputs = randn(12, 5, module.input_size, seed=22)
    targets = randn(12, 5, 1, seed=23).tanh()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        output, _ = module(inputs)
        loss = (head(output) - targets).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("solver", ["auto", "quasi-newton"])
def test_training_follows_torch_loss_curve(cell, solver):
    kind, nonlinearity = cell
    reference, solved = make_pair(kind, nonlinearity, num_layers=2, solver=solver)
    expected = training_losses(reference)
    got = training_losses(solved)
    assert expected[-1] < expected[0]  # it is training
    assert max(abs(a - b) for a, b in zip(got, expected)) <= 1e-8
    for (name, p), q in zip(solved.named_parameters(), reference.parameters()):
        assert (p - q).abs().max().item() <= 1e-8, name


# -- memory of the backward pass --------------------------------------------------------------
def saved_bytes(module: nn.RNNBase, inputs: Tensor) -> tuple[int, Tensor]:
    """Bytes autograd keeps for the backward pass, and the input gradient."""
    total = 0

    def pack(tensor: Tensor) -> Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    inputs = inputs.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output, _ = module(inputs)
    output.square().sum().backward()
    return total, inputs.grad


@pytest.mark.parametrize("kind", ["elman", "gru", "lstm"])
def test_backward_memory_does_not_grow_with_iterations(kind):
    # Picard needs many iterations here, the sequential kernel none; both keep exactly the
    # solution, the inputs, s_0 and the weights for the backward pass.
    torch.manual_seed(0)
    reference = MODULES[kind][0](4, 6, dtype=torch.float64)
    with torch.no_grad():
        reference.weight_hh_l0.mul_(3.0)  # slow contraction: many Picard iterations
    inputs = randn(40, 2, 4, seed=9)
    picard = MODULES[kind][1].from_torch(reference, solver=Picard())
    direct = MODULES[kind][1].from_torch(reference, solver=Sequential())
    system = SequenceSystem.build(Network.from_torch(reference).cells[0][0], inputs)
    assert solve(system, Picard()).stats.iterations >= 10
    picard_bytes, picard_grad = saved_bytes(picard, inputs)
    direct_bytes, direct_grad = saved_bytes(direct, inputs)
    assert picard_bytes == direct_bytes
    state_size = system.cell.state_size
    solution = 40 * 2 * state_size * 8
    weights = sum(p.numel() for p in reference.parameters()) * 8
    assert picard_bytes == inputs.numel() * 8 + 2 * state_size * 8 + solution + weights
    assert (picard_grad - direct_grad).abs().max().item() <= 1e-10


# -- the adjoint recurrence itself ------------------------------------------------------------
@given(
    cell=st.sampled_from(CELLS),
    steps=st.integers(1, 17),
    batch=st.integers(1, 3),
    hidden=st.integers(1, 4),
    chunk=st.one_of(st.none(), st.integers(1, 6)),
    scale=st.sampled_from([1.0, 4.0]),
)
def test_adjoint_methods_equal_the_sequential_reference(cell, steps, batch, hidden, chunk, scale):
    # scale 4: expanding recurrent weights, where the iterative adjoint needs up to T iterations
    kind, nonlinearity = cell
    network = Network.random(kind, 2, hidden, nonlinearity=nonlinearity, seed=steps, scale=scale)
    system = SequenceSystem.build(network.cells[0][0], randn(steps, batch, 2, seed=1), 0.3 * randn(batch, network.cells[0][0].state_size, seed=2))
    states = system.sequential()
    gradients = randn(*system.state_shape, seed=3)
    # reference: λ_t = g_t + J_{t+1}ᵀ λ_{t+1} with dense Jacobians, one step after another
    jacobians = system.cell.jacobian(states[:-1], system.projected_inputs[1:]).mT
    transitions = torch.cat((jacobians, jacobians.new_zeros(1, *jacobians.shape[1:])))
    expected = linear_recurrence_sequential(transitions, gradients, torch.zeros_like(gradients[0]), reverse=True)
    for method in ("scan", "quasi-newton", "sequential"):
        got = adjoint_states(system, states, gradients, method=method, chunk=chunk if method == "scan" else None)
        assert (got - expected).abs().max().item() <= 1e-12 * max(1.0, expected.abs().max().item())


@given(
    cell=st.sampled_from(CELLS),
    steps=st.integers(2, 17),
    exact=st.integers(0, 16),
    chunk=st.one_of(st.none(), st.integers(1, 6)),
)
def test_adjoint_finishes_from_an_exact_suffix_by_scans_or_steps(cell, steps, exact, chunk):
    # How an unsettled quasi-Newton adjoint finishes: from λ exact at positions ≥ k, dense
    # reverse scans (CUDA) and the sequential recurrence (CPU) fill in the same positions < k.
    from fixedpoint.adjoint import _adjoint_by_scan, _adjoint_sequentially

    kind, nonlinearity = cell
    network = Network.random(kind, 2, 3, nonlinearity=nonlinearity, seed=steps, scale=4.0)
    system = SequenceSystem.build(network.cells[0][0], randn(steps, 2, 2, seed=1))
    states = system.sequential()
    gradients = randn(*system.state_shape, seed=3)
    expected = _adjoint_sequentially(system, states, gradients)
    exact_from = min(exact, steps - 1)
    partial = expected.clone()
    partial[:exact_from] = float("nan")  # nothing before the exact suffix may be read
    by_scan = _adjoint_by_scan(system, states, gradients, chunk, adjoint=partial.clone(), exact_from=exact_from)
    by_steps = _adjoint_sequentially(system, states, gradients, partial.clone(), exact_from=exact_from)
    for got in (by_scan, by_steps):
        assert (got - expected).abs().max().item() <= 1e-12 * max(1.0, expected.abs().max().item())


@given(cell=st.sampled_from(CELLS), hidden=st.integers(1, 5), batch=st.integers(1, 3), transposed=st.booleans())
def test_jacobian_products_are_the_jacobian_and_its_transpose(cell, hidden, batch, transposed):
    """``J v`` (the forward-error and Lyapunov recurrences) and ``Jᵀ v`` (the adjoint) from the
    linearisation factors, against the dense Jacobian."""
    kind, nonlinearity = cell
    network = Network.random(kind, 3, hidden, nonlinearity=nonlinearity, seed=hidden)
    unit = network.cells[0][0]
    state = randn(4, batch, unit.state_size, seed=1)
    projected = unit.input_projection(randn(4, batch, 3, seed=2))
    vector = randn(4, batch, unit.state_size, seed=3)
    jacobian = unit.jacobian(state, projected)
    factors = unit.linearization(state, projected)
    if transposed:
        expected = (jacobian.mT @ vector.unsqueeze(-1)).squeeze(-1)
        got = unit.transposed_jacobian_product(factors, vector)
    else:
        expected = (jacobian @ vector.unsqueeze(-1)).squeeze(-1)
        got = unit.jacobian_product(factors, vector)
    assert (got - expected).abs().max().item() <= 1e-13


def test_solution_gradients_need_only_what_is_asked():
    network = Network.random("gru", 2, 3, seed=1)
    system = SequenceSystem.build(network.cells[0][0], randn(5, 2, 2, seed=1))
    states = system.sequential()
    adjoint = randn(5, 2, 3, seed=2)
    gradients = solution_gradients(system, states, adjoint, (False, True, False, True, False, False))
    assert [g is not None for g in gradients] == [False, True, False, True, False, False]
    with pytest.raises(InputError, match="6 entries"):
        solution_gradients(system, states, adjoint, (True,))


def test_scanned_adjoint_refuses_when_jacobians_do_not_fit():
    network = Network.random("gru", 2, 8, seed=1)
    system = SequenceSystem.build(network.cells[0][0], randn(64, 2, 2, seed=1))
    states = system.sequential()
    with pytest.raises(InputError, match="adjoint='quasi-newton' or 'sequential'"):
        adjoint_states(system, states, torch.ones_like(states), method="scan", memory_limit=1000)
    with pytest.raises(InputError, match="adjoint must be one of"):
        adjoint_states(system, states, torch.ones_like(states), method="backprop")
    with pytest.raises(InputError, match="shape"):
        adjoint_states(system, states[1:], torch.ones_like(states[1:]))


# -- state_dict both ways, module identity ----------------------------------------------------
@pytest.mark.parametrize("kind", ["elman", "gru", "lstm"])
def test_state_dicts_load_both_ways(kind):
    reference_type, solved_type = MODULES[kind]
    torch.manual_seed(1)
    reference = reference_type(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    solved = solved_type(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    assert isinstance(solved, reference_type)
    assert solved.state_dict().keys() == reference.state_dict().keys()
    solved.load_state_dict(reference.state_dict())
    inputs = randn(5, 2, 3, seed=1)
    # auto on a CPU runs torch's own kernel, one layer and direction at a time
    assert (solved(inputs)[0] - reference(inputs)[0]).abs().max().item() <= 1e-12
    other = reference_type(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    other.load_state_dict(solved.state_dict())
    back = solved.to_torch()
    assert type(back) is reference_type
    for module in (other, back):
        assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), solved.state_dict().values()))


def test_constructor_matches_torch_arguments():
    torch.manual_seed(3)
    reference = nn.RNN(3, 4, 2, "relu", False, True, 0.0, True, dtype=torch.float64)
    torch.manual_seed(3)
    solved = fnn.RNN(3, 4, 2, "relu", False, True, 0.0, True, dtype=torch.float64, solver="picard")
    assert solved.nonlinearity == "relu" and not solved.bias and solved.batch_first and solved.bidirectional
    assert all(torch.equal(a, b) for a, b in zip(solved.parameters(), reference.parameters()))  # same init draws
    assert "solver=picard" in repr(solved)
    assert isinstance(fnn.GRU(3, 4).solver, SOLVERS["auto"])


# -- bad input as torch.nn rejects it ---------------------------------------------------------
def raised(function) -> BaseException:
    try:
        function()
    except BaseException as error:  # noqa: BLE001 — we compare what was raised
        return error
    raise AssertionError("nothing was raised")


@pytest.mark.parametrize("kind", ["elman", "gru", "lstm"])
@pytest.mark.parametrize(
    "case", ["input_size", "input_dim", "hx_shape", "hx_dim", "hx_batch", "dtype"]
)
def test_bad_input_is_rejected_as_torch_rejects_it(kind, case):
    reference, solved = make_pair(kind, num_layers=2)
    inputs = randn(5, 3, 3, seed=1)
    hx = torch_hx(reference, 3, 2)
    lstm = kind == "lstm"

    def reshape(function):
        return tuple(function(h) for h in hx) if lstm else function(hx)

    arguments = {
        "input_size": (randn(5, 3, 4, seed=1), hx),
        "input_dim": (randn(2, 5, 3, 3, seed=1), hx),
        "hx_shape": (inputs, reshape(lambda h: h[:1])),
        "hx_dim": (inputs, reshape(lambda h: h[0])),
        "hx_batch": (inputs, reshape(lambda h: h[:, :2])),
        "dtype": (inputs.float(), hx),
    }[case]
    expected = raised(lambda: reference(*arguments))
    got = raised(lambda: solved(*arguments))
    assert type(got) is type(expected)
    if case != "input_dim":
        assert str(got) == str(expected)
    else:  # torch.nn words this one differently per class
        assert "Expected input to be 2D or 3D, got 4D" in str(got) and "got 4D" in str(expected)


def test_no_convergence_raises_instead_of_returning_garbage():
    reference, solved = make_pair("gru", solver=Picard(), max_steps=2)
    inputs = randn(30, 2, 3, seed=1).requires_grad_()
    with pytest.raises(NoConvergence, match="max_steps"):
        solved(inputs)


def graph_nodes(tensor: Tensor) -> set[str]:
    """The names of every autograd node behind ``tensor``."""
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize(
    ("kind", "dtype", "solver", "hidden", "expected"),
    [
        ("lstm", torch.float32, "auto", 4, True),  # oneDNN's fused LSTM backward: measured faster on a CPU
        ("lstm", torch.float32, "picard", 4, False),  # a parallel forward keeps the adjoint recurrence
        # elsewhere the recurrence up to RECURRENCE_UP_TO_HIDDEN, the fused backward above it
        ("lstm", torch.float64, "auto", 32, False),
        ("lstm", torch.float64, "auto", 33, True),
        ("gru", torch.float32, "auto", 192, False),
        ("gru", torch.float32, "auto", 193, True),
        ("elman", torch.float32, "auto", 4, False),
        ("elman", torch.float64, "auto", 128, False),
        ("elman", torch.float64, "auto", 129, True),
        ("gru", torch.float64, "auto", 129, True),
    ],
)
@pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled), reason="needs oneDNN, enabled"
)
def test_auto_adjoint_backpropagates_the_fused_kernel_only_where_measured_faster(kind, dtype, solver, hidden, expected):
    reference, solved = make_pair(kind, dtype=dtype, solver=solver, hidden_size=hidden)
    inputs = randn(6, 2, 3, seed=1, dtype=dtype).requires_grad_()
    output, _ = solved(inputs)
    assert ("SolvedLayerBackward" not in graph_nodes(output)) is expected
    assert solved.backward_method(inputs) == ("fused" if expected else "sequential")
    with torch.no_grad():  # nothing to differentiate: the solver's forward, without a graph
        assert solved(inputs)[0].grad_fn is None
    output.sum().backward()
    expected_gradient = torch.autograd.grad(reference(inputs)[0].sum(), inputs)[0]
    assert (inputs.grad - expected_gradient).abs().max().item() <= BOUNDS[dtype]


@pytest.mark.parametrize(("kind", "adjoint"), [("lstm", "auto"), ("gru", "fused")])
def test_fused_path_validates_its_input_as_a_solve_does(kind, adjoint):
    _, solved = make_pair(kind, dtype=torch.float32, adjoint=adjoint)
    bad = torch.zeros(4, 2, 3)
    bad[2, 1, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        solved(bad.requires_grad_())
    output, _ = solved(torch.zeros(4, 0, 3, requires_grad=True))  # an empty batch: as torch.nn
    assert output.shape == (4, 0, solved.hidden_size)


# -- variable lengths: PackedSequence --------------------------------------------------------------------
def _packed_run(module, inputs, lengths, enforce_sorted, hx):
    """Output, final states and the gradients of inputs, hx and parameters for a packed batch."""
    inputs = inputs.clone().requires_grad_()
    hx = None if hx is None else tuple(h.clone().requires_grad_() for h in hx)
    packed = pack_padded_sequence(inputs, lengths, enforce_sorted=enforce_sorted)
    output, final = module(packed, None if hx is None else (hx if len(hx) == 2 else hx[0]))
    finals = final if isinstance(final, tuple) else (final,)
    weights = torch.linspace(-1, 1, output.data.numel(), dtype=output.data.dtype).view_as(output.data)
    loss = (output.data * weights).sum() + sum(0.3 * (k + 1) * f.sum() for k, f in enumerate(finals))
    leaves = [inputs, *(hx or ()), *module.parameters()]
    return output, finals, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("solver,adjoint", [("picard", "sequential"), ("quasi-newton", "quasi-newton"),
                                            ("newton", "scan"), ("sequential", "auto")])
@pytest.mark.parametrize("with_hx", [False, True], ids=["no-hx", "hx"])
def test_packed_sequences_give_torch_nn_s_outputs_states_and_gradients(cell, bidirectional, enforce_sorted,
                                                                        solver, adjoint, with_hx):
    # Each sample's system ends at its own length: outputs packed as they came, h_n (and c_n) at
    # each sample's last real step (the reverse direction starting there), gradients through all.
    kind, nonlinearity = cell
    reference, solved = make_pair(kind, nonlinearity, num_layers=2, bidirectional=bidirectional,
                                  solver=solver, adjoint=adjoint)
    lengths = torch.tensor([7, 5, 5, 2]) if enforce_sorted else torch.tensor([2, 7, 5, 1])
    inputs = randn(7, 4, 3, seed=11)
    hx = None
    if with_hx:
        shape = (2 * (2 if bidirectional else 1), 4, reference.hidden_size)
        hx = (0.5 * randn(*shape, seed=12),) + ((0.5 * randn(*shape, seed=13),) if kind == "lstm" else ())
    expected_output, expected_finals, expected_gradients = _packed_run(reference, inputs, lengths, enforce_sorted, hx)
    output, finals, gradients = _packed_run(solved, inputs, lengths, enforce_sorted, hx)
    assert torch.equal(output.batch_sizes, expected_output.batch_sizes)
    for got, expected in ((output.sorted_indices, expected_output.sorted_indices),
                          (output.unsorted_indices, expected_output.unsorted_indices)):
        assert (got is None and expected is None) or torch.equal(got, expected)
    assert (output.data - expected_output.data).abs().max().item() <= BOUNDS[torch.float64]
    for got, expected in zip((*finals, *gradients), (*expected_finals, *expected_gradients)):
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= BOUNDS[torch.float64] * max(1.0, expected.abs().max().item())


def test_packed_input_checks_hx_as_torch_nn_does():
    reference, solved = make_pair("gru", num_layers=1)
    packed = pack_padded_sequence(randn(5, 3, 3, seed=1), [5, 4, 2])
    errors = []
    for module in (reference, solved):
        with pytest.raises(RuntimeError) as caught:
            module(packed, torch.zeros(1, 2, reference.hidden_size, dtype=torch.float64))  # batch 2, not 3
        errors.append(str(caught.value))
    assert errors[0] == errors[1]


# -- empty inputs and constructor arguments, as torch.nn treats them ------------------------------------
MODULE_PAIRS = [(fnn.RNN, nn.RNN), (fnn.GRU, nn.GRU), (fnn.LSTM, nn.LSTM)]


@pytest.mark.parametrize("ours,theirs", MODULE_PAIRS, ids=["rnn", "gru", "lstm"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_empty_batch_gives_torch_nn_s_empty_outputs_and_backward(ours, theirs, batch_first):
    solved = ours(3, 4, num_layers=2, bidirectional=True, batch_first=batch_first, dtype=torch.float64)
    reference = theirs(3, 4, num_layers=2, bidirectional=True, batch_first=batch_first, dtype=torch.float64)
    reference.load_state_dict(solved.state_dict())
    shape = (0, 5, 3) if batch_first else (5, 0, 3)
    results = []
    for module in (solved, reference):
        inputs = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
        output, final = module(inputs)
        finals = final if isinstance(final, tuple) else (final,)
        (output.sum() + sum(f.sum() for f in finals)).backward()
        results.append((output.shape, [f.shape for f in finals], inputs.grad.shape,
                        [p.grad for p in module.parameters()]))
    (shapes, final_shapes, grad_shape, grads), (shapes_t, final_shapes_t, grad_shape_t, grads_t) = results
    assert (shapes, final_shapes, grad_shape) == (shapes_t, final_shapes_t, grad_shape_t)
    assert all(g is not None and torch.equal(g, gt) for g, gt in zip(grads, grads_t))  # zeros, as torch.nn's


@pytest.mark.parametrize("ours,theirs", MODULE_PAIRS, ids=["rnn", "gru", "lstm"])
@pytest.mark.parametrize("shape", [(0, 2, 3), (0, 3)], ids=["batched", "unbatched"])
def test_empty_sequence_raises_what_torch_nn_raises(ours, theirs, shape):
    errors = []
    for module in (ours(3, 4), theirs(3, 4)):
        with pytest.raises(Exception) as caught:
            module(torch.zeros(shape))
        errors.append((type(caught.value), str(caught.value)))
    assert errors[0] == errors[1]
    assert errors[0][0] is RuntimeError and "sequence length" in errors[0][1]


@pytest.mark.parametrize(
    "ours,theirs,options",
    [(fnn.RNN, nn.RNN, {"proj_size": 10}), (fnn.GRU, nn.GRU, {"proj_size": 10})]
    + [(ours, theirs, {"unknown_option": 1}) for ours, theirs in MODULE_PAIRS],
    ids=["rnn-proj_size", "gru-proj_size", "rnn-unknown", "gru-unknown", "lstm-unknown"],
)
def test_constructor_rejects_what_torch_nn_rejects(ours, theirs, options):
    errors = []
    for module_type in (ours, theirs):
        with pytest.raises(Exception) as caught:
            module_type(3, 4, **options)
        errors.append((type(caught.value), str(caught.value)))
    assert errors[0] == errors[1]


def test_fused_double_backward_is_torch_nn_s_own():
    reference, solved = make_pair("lstm", dtype=torch.float64, adjoint="fused")
    inputs = randn(6, 2, 3, seed=1).requires_grad_()

    def penalty(module: nn.RNNBase) -> list[Tensor]:
        (gradient,) = torch.autograd.grad(module(inputs)[0].square().sum(), inputs, create_graph=True)
        return list(torch.autograd.grad(gradient.square().sum(), [inputs, *module.parameters()]))

    for got, expected in zip(penalty(solved), penalty(reference)):
        assert (got - expected).abs().max().item() <= 1e-10 * max(1.0, expected.abs().max().item())


def test_adjoint_is_checked_again_when_reassigned():
    solved = fnn.GRU(3, 4, adjoint="fused")
    solved.solver = Picard()
    with pytest.raises(InputError, match="solver='auto' or Sequential"):
        solved(torch.zeros(2, 1, 3))


def test_fused_adjoint_needs_the_fused_forward():
    with pytest.raises(InputError, match="solver='auto' or Sequential"):
        fnn.GRU(3, 4, solver="picard", adjoint="fused")
    with pytest.raises(InputError, match="not 'sequential'"):
        fnn.LSTM(3, 4, solver=Sequential(), adjoint="fused")
    assert fnn.RNN(3, 4, solver=Sequential(kernel="fused"), adjoint="fused").adjoint == "fused"


def test_bad_options_are_refused():
    with pytest.raises(InputError, match="solver must be"):
        fnn.GRU(3, 4, solver="bisection")
    with pytest.raises(InputError, match="solver must be"):
        fnn.GRU(3, 4, solver=object())
    with pytest.raises(InputError, match="adjoint must be"):
        fnn.LSTM(3, 4, adjoint="unrolled")
    with pytest.raises(InputError, match="max_steps"):
        fnn.RNN(3, 4, max_steps=0)
    with pytest.raises(InputError, match="expected a torch.nn.GRU"):
        fnn.GRU.from_torch(nn.LSTM(3, 4))
    with pytest.raises(InputError, match="NaN"):
        fnn.GRU(3, 4, dtype=torch.float64)(torch.full((3, 1, 3), float("nan"), dtype=torch.float64))


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_chunked_parameter_products_equal_one_batch(cell, monkeypatch):
    kind, nonlinearity = cell
    network = Network.random(kind, 2, 3, nonlinearity=nonlinearity, seed=4)
    system = SequenceSystem.build(network.cells[0][0], randn(11, 2, 2, seed=1), 0.3 * randn(2, network.cells[0][0].state_size, seed=5))
    states = system.sequential()
    adjoint = randn(*system.state_shape, seed=2)
    wanted = (True,) * (2 + len(system.cell.tensor_names))
    whole = solution_gradients(system, states, adjoint, wanted)
    monkeypatch.setattr("fixedpoint.adjoint.VJP_ELEMENTS", 2 * network.cells[0][0].weight_hh.shape[0] * 3)  # 3 positions
    chunked = solution_gradients(system, states, adjoint, wanted)
    for a, b in zip(whole, chunked):
        if a is None:  # an LSTM without a projection has no weight_hr
            assert b is None and system.cell.kind == "lstm"
            continue
        assert (a - b).abs().max().item() <= 1e-13


# -- what a torch.nn user relies on --------------------------------------------------------------
@pytest.mark.parametrize("kind", ["elman", "gru", "lstm"])
@pytest.mark.parametrize("solver", ["auto", "picard"])
def test_output_may_be_modified_in_place_before_backward(kind, solver):
    reference, solved = make_pair(kind, solver=solver)
    inputs = randn(6, 2, 3, seed=1)
    gradients = []
    for module in (reference, solved):
        x = inputs.clone().requires_grad_()
        output, _ = module(x)
        output.mul_(2.0).sum().backward()
        gradients.append(x.grad)
    assert (gradients[0] - gradients[1]).abs().max().item() <= 1e-12


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("adjoint", ["auto", "sequential", "quasi-newton"])
def test_double_backward_matches_torch_nn(cell, adjoint):
    # A gradient penalty: the gradient of ‖∂L/∂x‖² with respect to the inputs and every
    # parameter, through the backward pass (create_graph=True), as torch.nn computes it.
    kind, nonlinearity = cell
    reference, solved = make_pair(kind, nonlinearity, num_layers=2, bidirectional=True, solver="picard",
                                  adjoint=adjoint)
    inputs = randn(6, 2, 3, seed=1)
    results = []
    for module in (reference, solved):
        x = inputs.clone().requires_grad_()
        output, _ = module(x)
        (gradient,) = torch.autograd.grad((output * torch.linspace(-1, 1, output.numel(), dtype=output.dtype)
                                           .view_as(output)).sum(), x, create_graph=True)
        penalty = gradient.square().sum()
        results.append(torch.autograd.grad(penalty, [x, *module.parameters()]))
    for expected, got in zip(*results):
        assert (expected - got).abs().max().item() <= 1e-10 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_gradgradcheck_of_a_layer(kind):
    # torch.autograd.gradgradcheck on the default module (adjoint="auto"), float64.
    _, solved = make_pair(kind, hidden_size=2, solver="quasi-newton")
    inputs = randn(4, 2, 3, seed=2).requires_grad_()
    hx = 0.3 * randn(1, 2, 2, seed=3)
    hx = (hx.requires_grad_(), (0.3 * randn(1, 2, 2, seed=4)).requires_grad_()) if kind == "lstm" else hx.requires_grad_()

    def layer(x, *states):
        output, _ = solved(x, states if kind == "lstm" else states[0])
        return output

    states = hx if kind == "lstm" else (hx,)
    assert torch.autograd.gradgradcheck(layer, (inputs, *states))


def test_autocast_does_not_change_the_solve():
    reference, solved = make_pair("lstm", dtype=torch.float32)
    x = randn(6, 2, 3, seed=1, dtype=torch.float32)
    expected = reference(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = solved(x)[0]
    assert got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= 1e-6


def test_final_states_are_contiguous_and_lstm_takes_a_list():
    reference, solved = make_pair("lstm", num_layers=2)
    x = randn(5, 2, 3, seed=1)
    hx = torch_hx(reference, 2, 2)
    _, (h_n, c_n) = solved(x, list(hx))
    _, (h_ref, c_ref) = reference(x, list(hx))
    assert h_n.is_contiguous() and c_n.is_contiguous()
    assert (h_n.view(-1) - h_ref.view(-1)).abs().max().item() <= 1e-12
    assert (c_n - c_ref).abs().max().item() <= 1e-12


def test_conversions_keep_frozen_parameters_frozen():
    reference = nn.GRU(3, 4)
    reference.weight_ih_l0.requires_grad_(False)
    solved = fnn.GRU.from_torch(reference)
    assert not solved.weight_ih_l0.requires_grad and solved.weight_hh_l0.requires_grad
    assert not solved.to_torch().weight_ih_l0.requires_grad
    assert "max_steps=None" in repr(solved)


@pytest.mark.parametrize("adjoint", ["scan", "quasi-newton", "sequential"])
def test_adjoint_finds_tiny_components_that_expanding_weights_amplify(adjoint):
    # W_hh = 3·swap: the gradient's 1e-13 component at the last step grows by 3 per step back and
    # decides dL/dx_0.  A stopping test relative to the largest entry would stop at once with 0.
    torch.manual_seed(0)
    reference = nn.RNN(1, 2, dtype=torch.float64)
    with torch.no_grad():
        reference.weight_hh_l0.copy_(3 * torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        reference.weight_ih_l0.copy_(torch.tensor([[1.0], [0.0]]))
        reference.bias_ih_l0.zero_()
        reference.bias_hh_l0.zero_()
    solved = fnn.RNN.from_torch(reference, adjoint=adjoint)
    inputs = torch.zeros(30, 1, 1, dtype=torch.float64)
    inputs[-1] = 40.0  # unit 0 saturates at the last step
    weights = torch.tensor([1.0, 1e-13], dtype=torch.float64)
    gradients = []
    for module in (reference, solved):
        x = inputs.clone().requires_grad_()
        output, _ = module(x)
        (output[-1, 0] * weights).sum().backward()
        gradients.append(x.grad[0].item())
    assert abs(gradients[0]) > 1.0
    assert abs(gradients[1] - gradients[0]) <= 1e-10 * abs(gradients[0])


# -- CUDA (skipped without a device) ------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("adjoint", ["auto", "scan", "quasi-newton", "sequential", "fused"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_gradients_match_torch_on_cuda(cell, adjoint, dtype):
    """Against cuDNN's backward, TF32 off; auto's forward calibrates there."""
    kind, nonlinearity = cell
    torch.backends.cuda.matmul.allow_tf32 = False
    torch._C._set_cudnn_allow_tf32(False)  # (torch's test utilities freeze plain assignment)
    reference, solved = make_pair(
        kind, nonlinearity, num_layers=2, bidirectional=True, dtype=dtype, solver="auto", adjoint=adjoint
    )
    reference, solved = reference.cuda(), solved.cuda()
    steps = 300 if dtype == torch.float64 else 64  # float32 rounding grows with T
    inputs = randn(steps, 3, 3, seed=7, dtype=dtype).cuda().requires_grad_()
    expected_out, expected_grads = forward_and_gradients(reference, inputs, None)
    got_out, got_grads = forward_and_gradients(solved, inputs, None)
    bound = BOUNDS[dtype]
    for got, expected in zip(got_out, expected_out):
        assert (got - expected).abs().max().item() <= bound
    for got, expected in zip(got_grads, expected_grads):
        assert (got - expected).abs().max().item() <= bound * max(1.0, expected.abs().max().item())


def test_projected_lstm_checks_its_arguments_as_torch_nn_does():
    # h_0 has proj_size entries, c_0 hidden_size: wrong shapes and sizes raise torch.nn's errors.
    torch.manual_seed(0)
    inputs = randn(6, 3, 4, seed=1)
    for h_shape, c_shape in [((1, 3, 2), (1, 3, 5)), ((1, 3, 5), (1, 3, 5)), ((1, 3, 2), (1, 3, 2)), ((2, 3, 2), (1, 3, 5))]:
        hx = (randn(*h_shape, seed=2), randn(*c_shape, seed=3))
        results = []
        for module_type in (nn.LSTM, fnn.LSTM):
            module = module_type(4, 5, proj_size=2, dtype=torch.float64)
            try:
                output, (h_n, c_n) = module(inputs, hx)
                results.append(("ok", output.shape, h_n.shape, c_n.shape))
            except Exception as error:  # noqa: BLE001 - the point is to compare whatever is raised
                results.append((type(error), str(error)))
        assert results[0] == results[1]
    for bad in (-1, 5, 7):
        errors = []
        for module_type in (nn.LSTM, fnn.LSTM):
            with pytest.raises(ValueError) as caught:
                module_type(4, 5, proj_size=bad)
            errors.append(str(caught.value))
        assert errors[0] == errors[1]


def test_adjoint_strategy_is_resolved_once_per_configuration(monkeypatch):
    calls = []
    resolve = fnn.adjoint_strategy
    monkeypatch.setattr(fnn, "adjoint_strategy", lambda *args: calls.append(args) or resolve(*args))
    solved = fnn.GRU(3, 4, adjoint="fused")
    assert isinstance(solved._adjoint_strategy(), fnn.FusedKernelAdjoint)
    inputs = randn(5, 2, 3, seed=3, dtype=torch.float32)
    for _ in range(3):
        solved(inputs)
    assert len(calls) == 1  # at construction; the forwards reuse it
    solved.adjoint = "sequential"
    solved(inputs)
    assert len(calls) == 2
    strategy = solved._adjoint_strategy()
    assert strategy == fnn.AdjointRecurrence("sequential", fused_forward=True)
    assert not strategy.through_fused_kernel("gru", inputs, 4)
    assert solved.backward_method(inputs) == "sequential"
