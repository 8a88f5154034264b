"""A stack of recurrent layers, each in one or two directions: what ``solve_network`` and the
``fixedpoint.nn`` modules run around each layer-direction solve, written once.

``torch.nn``'s conventions: layer ``l + 1`` reads the outputs of layer ``l``, both directions
concatenated on the feature axis; the reverse direction reads its input reversed in time (within
each sample's length when the batch has variable lengths) and its outputs are reversed back; the
final states are ordered ``(layer, direction)``, ``L·D`` of them; the parameters of layer ``l``
are named with the suffix ``_l{l}``, the reverse direction's with ``_l{l}_reverse``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from fixedpoint.lengths import reversed_within

#: ``(layer, direction, inputs (T, B, I_l), initial state (B, S) or None) → (outputs h (T, B, H),
#: final state (B, S))``: one layer-direction solve, on its inputs already in its own time order.
LayerSolve = Callable[[int, int, Tensor, "Tensor | None"], "tuple[Tensor, Tensor]"]


def parameter_suffix(layer: int, direction: int) -> str:
    """``torch.nn``'s suffix of a layer-direction's parameter names: ``_l{layer}`` or ``_l{layer}_reverse``."""
    return f"_l{layer}" + ("_reverse" if direction else "")


def run_stack(
    num_layers: int,
    num_directions: int,
    inputs: Tensor,
    initial_states: Sequence[Tensor | None],
    solve_layer: LayerSolve,
    *,
    reverse_order: Tensor | None = None,
    between_layers: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Run ``solve_layer`` over the stack: ``(outputs (T, B, D·H), final states (L·D, B, S))``.

    ``inputs (T, B, I)``; ``initial_states``: one per layer-direction in ``torch.nn``'s order;
    ``reverse_order (T, B)``: the per-sample time reversal of variable-length batches
    (:func:`~fixedpoint.lengths.reversal_within`; ``None``: the whole sequence reversed);
    ``between_layers``: applied to each layer's outputs before the next layer reads them (as
    ``torch.nn``'s dropout), not after the last.
    """
    layer_input = inputs
    finals = []
    for layer in range(num_layers):
        outputs = []
        for direction in range(num_directions):
            sequence = reversed_within(layer_input, reverse_order) if direction else layer_input
            hidden, final = solve_layer(layer, direction, sequence, initial_states[layer * num_directions + direction])
            outputs.append(reversed_within(hidden, reverse_order) if direction else hidden)
            finals.append(final)
        layer_input = torch.cat(outputs, dim=-1) if num_directions == 2 else outputs[0]
        if between_layers is not None and layer + 1 < num_layers:
            layer_input = between_layers(layer_input)
    return layer_input, torch.stack(finals)
