"""The equation system ``S = F(S)`` of one recurrent layer over a whole sequence.

With ``s_t = f(s_{t−1}, x_t)`` and ``s_0`` given, the unknowns are ``S = (s_1 … s_T)`` and
``F(S)_t = f(s_{t−1}, x_t)``.  The sequential solution is the unique fixed point.  Arrays are
indexed from 0 here: ``S[t]`` is ``s_{t+1}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fixedpoint.cells import Cell, check_floating
from fixedpoint.errors import InputError


@dataclass(frozen=True, eq=False)
class SequenceSystem:
    """``F`` for one cell, one input sequence and one initial state.

    Attributes:
        cell: the recurrent cell.
        projected_inputs: ``(T, B, G·H)``, ``W_ih x_t + b_ih`` computed once for all ``t``.
        initial_state: ``(B, S)``, the given ``s_0``.
    """

    cell: Cell
    projected_inputs: Tensor
    initial_state: Tensor

    @classmethod
    def build(cls, cell: Cell, inputs: Tensor, initial_state: Tensor | None = None) -> "SequenceSystem":
        """Validate ``inputs (T, B, I)`` and ``initial_state (B, S)`` (zeros when ``None``)."""
        check_floating("inputs", inputs)
        if inputs.dim() != 3:
            raise InputError(
                f"inputs must have shape (T, B, input_size), got {tuple(inputs.shape)}"
            )
        steps, batch, features = inputs.shape
        if steps < 1 or batch < 1:
            raise InputError(f"inputs must have T ≥ 1 and B ≥ 1, got shape {tuple(inputs.shape)}")
        if features != cell.input_size:
            raise InputError(
                f"inputs have {features} features but the cell expects input_size={cell.input_size}"
            )
        if inputs.dtype != cell.dtype or inputs.device != cell.device:
            raise InputError(
                f"inputs are {inputs.dtype} on {inputs.device} but the weights are {cell.dtype} on "
                f"{cell.device}; convert one of them explicitly"
            )
        if initial_state is None:
            initial_state = inputs.new_zeros(batch, cell.state_size)
        else:
            check_floating("initial_state", initial_state)
            if tuple(initial_state.shape) != (batch, cell.state_size):
                raise InputError(
                    f"initial_state must have shape (B, S) = ({batch}, {cell.state_size}), "
                    f"got {tuple(initial_state.shape)}"
                )
            if initial_state.dtype != cell.dtype or initial_state.device != cell.device:
                raise InputError("initial_state must have the dtype and device of the weights")
        return cls(cell, cell.input_projection(inputs), initial_state)

    # -- sizes -------------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self.projected_inputs.shape[0]

    @property
    def batch(self) -> int:
        return self.projected_inputs.shape[1]

    @property
    def state_shape(self) -> tuple[int, int, int]:
        """``(T, B, S)``, the shape of ``S``."""
        return (self.seq_len, self.batch, self.cell.state_size)

    # -- evaluation --------------------------------------------------------------------------
    def apply(self, states: Tensor, start: int = 0) -> Tensor:
        """``F(S)`` at positions ``start … T−1`` at once: ``(T, B, S) → (T − start, B, S)``.

        Positions before ``start`` are not recomputed; a solver passes its exact prefix there.
        """
        if start == 0:
            previous = torch.cat((self.initial_state.unsqueeze(0), states[:-1]), dim=0)
        else:
            previous = states[start - 1 : -1]
        return self.cell.step(previous, self.projected_inputs[start:])

    def residual(self, states: Tensor) -> Tensor:
        """``F(S) − S``, shape ``(T, B, S)``."""
        return self.apply(states) - states

    def sequential(self) -> Tensor:
        """The exact solution by the sequential loop ``s_t = f(s_{t−1}, x_t)``: ``(T, B, S)``."""
        out = torch.empty(self.state_shape, dtype=self.projected_inputs.dtype, device=self.projected_inputs.device)
        state = self.initial_state
        for t in range(self.seq_len):
            state = self.cell.step(state, self.projected_inputs[t])
            out[t] = state
        return out
