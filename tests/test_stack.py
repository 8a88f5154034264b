"""fixedpoint.stack: the layer-by-direction loop around each solve, against its definition."""

from __future__ import annotations

import torch

from fixedpoint.lengths import reversal_within
from fixedpoint.stack import parameter_suffix, run_stack


def test_run_stack_orders_reverses_and_concatenates_as_torch_nn():
    steps, batch = 5, 2
    inputs = torch.arange(steps * batch, dtype=torch.float64).view(steps, batch, 1)
    lengths = torch.tensor([5, 3])
    order = reversal_within(lengths, steps)
    calls, seen = [], {}

    def solve_layer(layer, direction, layer_input, state):
        calls.append((layer, direction))
        seen[layer, direction] = layer_input.clone()
        hidden = layer_input[..., :1] + 10 * layer + 100 * direction + state
        return hidden, hidden[-1]

    between = []
    initial = [torch.full((batch, 1), float(k)) for k in range(4)]
    output, finals = run_stack(2, 2, inputs, initial, solve_layer, reverse_order=order,
                               between_layers=lambda x: between.append(x.clone()) or -x)
    assert calls == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # The reverse direction reads each sample's own positions backwards, its padding left in place.
    assert torch.equal(seen[0, 1][:, 0, 0], inputs[:, 0, 0].flip(0))
    assert torch.equal(seen[0, 1][:, 1, 0], torch.cat((inputs[:3, 1, 0].flip(0), inputs[3:, 1, 0])))
    # Layer 1 reads both directions of layer 0, concatenated, through between_layers, once.
    assert len(between) == 1 and between[0].shape == (steps, batch, 2)
    forward0 = inputs + 0.0
    backward0 = inputs + 100.0 + 1.0  # (reversed, shifted, reversed back)
    assert torch.equal(between[0], torch.cat((forward0, backward0), dim=-1))
    assert torch.equal(seen[1, 0], -between[0])
    assert output.shape == (steps, batch, 2) and finals.shape == (4, batch, 1)
    # Final states in torch.nn's order (layer, direction); each direction's own last row.
    assert torch.equal(finals[0], forward0[-1] + 0.0)
    assert torch.equal(finals[1], seen[0, 1][-1] + 101.0)


def test_parameter_suffix_is_torch_nn_naming():
    module = torch.nn.GRU(2, 3, num_layers=2, bidirectional=True)
    names = {name for name, _ in module.named_parameters()}
    for layer in range(2):
        for direction in range(2):
            assert f"weight_hh{parameter_suffix(layer, direction)}" in names
