"""The equation system ``S = F(S)`` of one recurrent layer over a whole sequence.

With ``s_t = f(s_{t−1}, x_t)`` and ``s_0`` given, the unknowns are ``S = (s_1 … s_T)`` and
``F(S)_t = f(s_{t−1}, x_t)``.  The sequential solution is the unique fixed point.  Arrays are
indexed from 0 here: ``S[t]`` is ``s_{t+1}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from fixedpoint.cells import SUPPORTED_DTYPES, Cell, check_floating
from fixedpoint.errors import InputError
from fixedpoint.kernels import use_kernels
from fixedpoint.residual import Measurement, StopTest, measure_window


@dataclass(frozen=True, eq=False)
class SequenceSystem:
    """``F`` for one cell, one input sequence and one initial state.

    Attributes:
        cell: the recurrent cell.
        inputs: ``(T, B, I)``, the input sequence.
        initial_state: ``(B, S)``, the given ``s_0``.
    """

    cell: Cell
    inputs: Tensor
    initial_state: Tensor

    @cached_property
    def projected_inputs(self) -> Tensor:
        """``(T, B, G·H)``: ``W_ih x_t`` plus the foldable biases, one product for all ``t``,
        computed on first use (the fused sequential kernel does not need it)."""
        return self.cell.input_projection(self.inputs)

    @classmethod
    def build(
        cls, cell: Cell, inputs: Tensor, initial_state: Tensor | None = None, *, check_finite: bool = True
    ) -> "SequenceSystem":
        """Validate ``inputs (T, B, I)`` and ``initial_state (B, S)`` (zeros when ``None``).

        ``check_finite=False`` skips the pass over ``inputs`` that rejects NaN/Inf, for callers
        that have made it already (:func:`fixedpoint.solve.solve_network` checks once).
        """
        if check_finite:
            check_floating("inputs", inputs)
        elif not isinstance(inputs, Tensor) or inputs.dtype not in SUPPORTED_DTYPES:
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
        return cls(cell, inputs, initial_state)

    # -- sizes -------------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self.inputs.shape[0]

    @property
    def batch(self) -> int:
        return self.inputs.shape[1]

    @property
    def state_shape(self) -> tuple[int, int, int]:
        """``(T, B, S)``, the shape of ``S``."""
        return (self.seq_len, self.batch, self.cell.state_size)

    # -- evaluation --------------------------------------------------------------------------
    def apply(self, states: Tensor, start: int = 0) -> Tensor:
        """``F(S)`` at positions ``start … T−1`` at once: ``(T, B, S) → (T − start, B, S)``.

        Positions before ``start`` are not recomputed; a solver passes its exact prefix there.
        """
        return self._step(self._previous(states, start), self.projected_inputs[start:])

    def _step(self, previous: Tensor, projected_inputs: Tensor) -> Tensor:
        """:meth:`Cell.step` on every position at once: on CUDA one fused kernel after the product."""
        cell = self.cell
        if cell.fused_kernel and use_kernels(previous, projected_inputs, cell.weight_hh, cell.bias_hh):
            from fixedpoint.kernels.cells import step  # imports Triton

            return step(cell, previous, projected_inputs)
        return cell.step(previous, projected_inputs)

    def apply_measured(self, states: Tensor, start: int, test: StopTest) -> tuple[Tensor, Measurement]:
        """:meth:`apply` and the driver's measurement of it against ``states[start:]``
        (:func:`~fixedpoint.residual.measure_window`: the first ``test.exact`` rows of the image
        are the iterate's).  On CUDA one fused kernel does both after the product with ``W_hh``."""
        previous = self._previous(states, start)
        cell, window = self.cell, states[start:]
        if cell.fused_kernel and use_kernels(previous, self.projected_inputs, cell.weight_hh, cell.bias_hh):
            from fixedpoint.kernels.cells import measured_step  # imports Triton

            return measured_step(cell, previous, self.projected_inputs[start:], window, test)
        image = cell.step(previous, self.projected_inputs[start:])
        return image, measure_window(image, window, test)

    def _previous(self, states: Tensor, start: int) -> Tensor:
        """The states ``s_{t−1}`` that positions ``start … T−1`` read: ``(T − start, B, S)``."""
        if start == 0:
            return torch.cat((self.initial_state.unsqueeze(0), states[:-1]), dim=0)
        return states[start - 1 : -1]

    def previous_states(self, window: Tensor, predecessor: Tensor) -> Tensor:
        """The states ``s_{t−1}`` that the last ``n`` positions read: ``(n, B, S)``.

        ``window (n, B, S)`` holds positions ``T − n … T − 1``; ``predecessor (B, S)`` is the state
        just before them.
        """
        return torch.cat((predecessor.unsqueeze(0), window[:-1]), dim=0)

    def apply_window(self, window: Tensor, predecessor: Tensor) -> Tensor:
        """``F`` on the last ``n`` positions only: ``(n, B, S) → (n, B, S)``."""
        return self._step(self.previous_states(window, predecessor), self.projected_inputs[self.seq_len - window.shape[0] :])

    def states_from_hidden(self, hidden: Tensor) -> Tensor:
        """The solution's states ``(T, B, S)`` from its outputs ``h_t (T, B, H)``."""
        return self.cell.states_from_hidden(hidden, self.inputs, self.initial_state)

    def sequential(self) -> Tensor:
        """The exact solution by the sequential loop ``s_t = f(s_{t−1}, x_t)``: ``(T, B, S)``,
        :meth:`Cell.step` run in Python (``Sequential(kernel="fused")`` runs ``torch.nn``'s kernel)."""
        out = torch.empty(self.state_shape, dtype=self.inputs.dtype, device=self.inputs.device)
        state = self.initial_state
        for t in range(self.seq_len):
            state = self.cell.step(state, self.projected_inputs[t])
            out[t] = state
        return out
