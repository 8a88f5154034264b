"""StarSaber: the exactness bridge to Jacobi sweeps of its teacher cell, and the model's options."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fixedpoint import InputError, Network
from fixedpoint.baselines import ReZero, Transformer
from fixedpoint.starsaber import StarSaber
from fixedpoint.system import SequenceSystem
from helpers import randn

TEACHERS = [("elman", "tanh"), ("elman", "relu"), ("gru", "tanh")]


def jacobi_sweeps(system: SequenceSystem, count: int) -> list[torch.Tensor]:
    """``S^1 … S^count`` of ``S^k = F(S^{k−1})`` from ``S^0 = 0``, each ``(T, B, H)``."""
    states = torch.zeros(system.state_shape, dtype=system.inputs.dtype)
    sweeps = []
    for _ in range(count):
        states = system.apply(states)
        sweeps.append(states)
    return sweeps


@given(
    teacher=st.sampled_from(TEACHERS),
    steps=st.integers(1, 12),
    batch=st.integers(1, 3),
    heads=st.sampled_from([1, 2]),
    causal=st.booleans(),
    with_h0=st.booleans(),
    scale=st.sampled_from([1.0, 3.0]),
)
def test_shift_starsaber_equals_jacobi_sweeps(teacher, steps, batch, heads, causal, with_h0, scale):
    kind, nonlinearity = teacher
    network = Network.random(kind, 3, 4, nonlinearity=nonlinearity, seed=steps + 7 * batch, scale=scale)
    cell = network.cells[0][0]
    inputs = randn(steps, batch, 3, seed=1)
    h0 = 0.5 * randn(batch, 4, seed=2) if with_h0 else None
    system = SequenceSystem.build(cell, inputs, h0)
    expected = jacobi_sweeps(system, steps + 1)
    model = StarSaber.from_cell(cell, steps + 1, num_heads=heads, causal=causal)
    _, layers = model(inputs, h0)
    for depth, (got, want) in enumerate(zip(layers, expected), 1):
        assert (got - want).abs().max().item() <= 1e-12, f"layer {depth}"
    exact = system.sequential()
    assert (layers[steps - 1] - exact).abs().max().item() <= 1e-12  # T sweeps: the exact solution


@pytest.mark.parametrize("teacher", TEACHERS, ids=["elman-tanh", "elman-relu", "gru"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_softmax_bridge_initialisation_is_close_to_the_sweeps(teacher, causal):
    kind, nonlinearity = teacher
    cell = Network.random(kind, 3, 4, nonlinearity=nonlinearity, seed=3).cells[0][0]
    inputs = randn(40, 2, 3, seed=4)
    expected = jacobi_sweeps(SequenceSystem.build(cell, inputs), 4)
    _, layers = StarSaber.from_cell(cell, 4, num_heads=2, causal=causal, attention="softmax", max_len=64)(inputs)
    for got, want in zip(layers, expected):
        assert (got - want).abs().max().item() <= 1e-6


def test_batch_first_and_ablations():
    torch.manual_seed(0)
    model = StarSaber(3, 8, 3, num_heads=2, causal=False, shared_position_matrix=True, input_every_layer=False, batch_first=True).double()
    x = randn(2, 7, 3, seed=1)
    output, layers = model(x)
    assert output.shape == (2, 7, 8) and len(layers) == 3
    assert all(layer.after is None for layer in model.layers)  # one shared position matrix
    assert model.layers[0].after_matrix is model.layers[0].before
    assert model.layers[0].input_weight is not None and model.layers[1].input_weight is None
    # causal: changing a later input leaves earlier outputs alone
    causal = StarSaber(3, 8, 2, num_heads=2, causal=True).double()
    inputs = randn(6, 2, 3, seed=2)
    changed = inputs.clone()
    changed[4:] += 1.0
    first, _ = causal(inputs)
    second, _ = causal(changed)
    assert torch.equal(first[:4], second[:4]) and not torch.equal(first[4:], second[4:])


def test_bad_options_are_refused():
    with pytest.raises(InputError, match="divisible"):
        StarSaber(3, 6, num_heads=4)
    with pytest.raises(InputError, match="variant"):
        StarSaber(3, 4, variant="lstm")
    with pytest.raises(InputError, match="num_layers"):
        StarSaber(3, 4, 0)
    with pytest.raises(InputError, match="input_size=3"):
        StarSaber(3, 4)(torch.zeros(5, 2, 4))
    with pytest.raises(InputError, match="max_len"):
        StarSaber(3, 4, max_len=4)(torch.zeros(5, 2, 3))
    with pytest.raises(InputError, match="Elman and GRU"):
        StarSaber.from_cell(Network.random("lstm", 3, 4).cells[0][0], 2)


# -- the baselines ------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", [Transformer, ReZero])
@pytest.mark.parametrize("batch_first", [False, True])
def test_baselines_share_the_interface_and_respect_causality(model_type, batch_first):
    torch.manual_seed(0)
    model = model_type(3, 8, 2, num_heads=2, causal=True, max_len=16, batch_first=batch_first).double()
    if model_type is ReZero:  # at α = 0 every block is the identity; move off it to test causality
        for block in model.blocks:
            torch.nn.init.constant_(block.alpha, 0.5)
    inputs = randn(2, 6, 3, seed=1) if batch_first else randn(6, 2, 3, seed=1)
    output, layers = model(inputs)
    assert output.shape == inputs.shape[:2] + (8,) and len(layers) == 2
    changed = inputs.clone()
    later = (slice(None), slice(4, None)) if batch_first else (slice(4, None),)
    changed[later] += 1.0
    second, _ = model(changed)
    earlier = (slice(None), slice(0, 4)) if batch_first else (slice(0, 4),)
    assert (output[earlier] - second[earlier]).abs().max().item() <= 1e-12
    assert (output[later] - second[later]).abs().max().item() > 1e-3


def test_rezero_starts_as_the_identity_and_bidirectional_sees_the_future():
    torch.manual_seed(0)
    model = ReZero(3, 8, 3, num_heads=2, causal=False, max_len=16).double()
    inputs = randn(5, 2, 3, seed=1)
    output, _ = model(inputs)
    embedded = model.embed(inputs.transpose(0, 1)) + model.position[:5]
    assert torch.equal(output, embedded.transpose(0, 1))
    transformer = Transformer(3, 8, 1, num_heads=2, causal=False, max_len=16).double()
    changed = inputs.clone()
    changed[-1] += 1.0
    assert (transformer(inputs)[0][0] - transformer(changed)[0][0]).abs().max().item() > 1e-6


@pytest.mark.parametrize("model_type", [StarSaber, Transformer, ReZero])
def test_models_refuse_bad_sizes_alike(model_type):
    with pytest.raises(InputError, match="divisible"):
        model_type(3, 6, num_heads=4)
    with pytest.raises(InputError, match="num_layers"):
        model_type(3, 4, 0)
    with pytest.raises(InputError, match="max_len"):
        model_type(3, 4, max_len=4)(torch.zeros(5, 2, 3))
