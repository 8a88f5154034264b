"""Drop-in ``torch.nn.RNN``, ``GRU`` and ``LSTM`` whose every layer is solved as ``S = F(S)``.

Each class subclasses its ``torch.nn`` counterpart: the same constructor arguments, parameters,
``state_dict`` keys, initialisation and ``forward(input, hx)``, so a ``torch.nn`` ``state_dict``
loads unchanged and the other way round.  Three keyword arguments are added:

- ``solver``: a :class:`~fixedpoint.solvers.Solver` or one of the names of
  :data:`fixedpoint.solvers.SOLVERS` (default ``"auto"``);
- ``max_steps``: most iterations per layer and direction (default ``T``, which always suffices);
- ``adjoint``: how the backward pass runs the adjoint recurrence (:mod:`fixedpoint.adjoint`).

The forward pass solves each layer and direction exactly; a solve that does not converge raises
:class:`~fixedpoint.errors.NoConvergence` instead of handing an unconverged state to an
optimiser.  The backward pass is the adjoint recurrence at the solution plus one batched
vector–Jacobian product, never a pass back through the solver's iterations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as functional
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.utils.rnn import PackedSequence

from fixedpoint.adjoint import AdjointMethod, adjoint_states, check_adjoint_method, solution_gradients
from fixedpoint.cells import CELL_TYPES, Cell
from fixedpoint.errors import InputError
from fixedpoint.network import TORCH_MODULES
from fixedpoint.solve import solve
from fixedpoint.solvers import SOLVERS, Solver
from fixedpoint.solvers.base import check_integer
from fixedpoint.system import SequenceSystem


@dataclass(frozen=True)
class LayerOptions:
    """What one layer-direction solve needs besides its tensors."""

    kind: str
    nonlinearity: str | None
    solver: Solver
    max_steps: int | None
    adjoint: AdjointMethod

    def cell(self, weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor | None, bias_hh: Tensor | None) -> Cell:
        extra = {} if self.nonlinearity is None else {"nonlinearity": self.nonlinearity}
        return CELL_TYPES[self.kind](weight_ih, weight_hh, bias_ih, bias_hh, **extra)


class SolvedLayer(torch.autograd.Function):
    """One layer, one direction: ``(options, record, x (T, B, I), s_0 (B, S), weights…) → (h (T, B, H), s_T (B, S))``.

    Forward: the solve.  Backward: the adjoint recurrence at the saved solution ``S*`` and one
    vector–Jacobian product of ``F``; only ``S*``, the inputs and the weights are saved.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        options: LayerOptions,
        record: bool,
        inputs: Tensor,
        initial_state: Tensor,
        weight_ih: Tensor,
        weight_hh: Tensor,
        bias_ih: Tensor | None,
        bias_hh: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        cell = options.cell(weight_ih, weight_hh, bias_ih, bias_hh)
        system = SequenceSystem.build(cell, inputs, initial_state)
        solution = solve(system, options.solver, max_steps=options.max_steps)
        ctx.options = options
        # ``record``: whether autograd was on at the call (inside forward it is always off).
        if record and any(ctx.needs_input_grad):
            ctx.save_for_backward(inputs, initial_state, solution.value, weight_ih, weight_hh, bias_ih, bias_hh)
        # A fresh final state: it must not be a view of the saved solution.
        return solution.hidden, solution.final_state.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, hidden_gradient: Tensor, final_gradient: Tensor) -> tuple[Tensor | None, ...]:
        inputs, initial_state, states, weight_ih, weight_hh, bias_ih, bias_hh = ctx.saved_tensors
        options: LayerOptions = ctx.options
        cell = options.cell(weight_ih, weight_hh, bias_ih, bias_hh)
        system = SequenceSystem(cell, inputs, initial_state)
        state_gradients = torch.zeros_like(states)
        state_gradients[..., : cell.hidden_size] = hidden_gradient
        state_gradients[-1] += final_gradient
        adjoint = adjoint_states(system, states, state_gradients, method=options.adjoint)
        return (None, None, *solution_gradients(system, states, adjoint, ctx.needs_input_grad[2:]))


def resolve_solver(solver: Solver | str | None) -> Solver:
    """A solver configuration from an instance, a name of :data:`SOLVERS`, or ``None`` (auto)."""
    if solver is None:
        return SOLVERS["auto"]()
    if isinstance(solver, str):
        if solver not in SOLVERS:
            raise InputError(f"solver must be a Solver or one of {', '.join(SOLVERS)}, got {solver!r}")
        return SOLVERS[solver]()
    if not isinstance(solver, Solver):
        raise InputError(f"solver must be a Solver configuration such as Picard(), got {solver!r}")
    return solver


class _Solved:
    """What the three modules share: the options and the layer-by-layer forward pass."""

    _kind: str

    def _configure(self, solver: Solver | str | None, max_steps: int | None, adjoint: AdjointMethod) -> None:
        check_integer("max_steps", max_steps, allow_none=True)
        check_adjoint_method(adjoint)
        self.solver = resolve_solver(solver)
        self.max_steps = max_steps
        self.adjoint = adjoint

    def _layer_options(self) -> LayerOptions:
        nonlinearity = getattr(self, "nonlinearity", None) if self._kind == "elman" else None
        return LayerOptions(self._kind, nonlinearity, self.solver, self.max_steps, self.adjoint)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, solver={self.solver.name}, adjoint={self.adjoint!r}"  # type: ignore[misc]

    def to_torch(self) -> nn.RNNBase:
        """The ``torch.nn`` module with the same configuration and a copy of the parameters."""
        configuration = dict(
            num_layers=self.num_layers, bias=self.bias, batch_first=self.batch_first,  # type: ignore[attr-defined]
            dropout=self.dropout, bidirectional=self.bidirectional,  # type: ignore[attr-defined]
            device=self.weight_hh_l0.device, dtype=self.weight_hh_l0.dtype,  # type: ignore[attr-defined]
        )
        if self._kind == "elman":
            configuration["nonlinearity"] = self.nonlinearity  # type: ignore[attr-defined]
        module = TORCH_MODULES[self._kind](self.input_size, self.hidden_size, **configuration)  # type: ignore[attr-defined]
        module.load_state_dict(self.state_dict())  # type: ignore[attr-defined]
        return module.train(self.training)  # type: ignore[attr-defined]

    def _initial_state(self, input: Tensor, hx: Any, batched: bool) -> Tensor:
        """``hx`` checked as ``torch.nn`` checks it (same messages), as one ``(L·D, B, S)`` tensor."""
        lstm = self._kind == "lstm"
        batch = input.shape[0 if self.batch_first else 1]  # type: ignore[attr-defined]
        count = self.num_layers * (2 if self.bidirectional else 1)  # type: ignore[attr-defined]
        if hx is None:
            zeros = torch.zeros(count, batch, self.hidden_size, dtype=input.dtype, device=input.device)  # type: ignore[attr-defined]
            parts: tuple[Tensor, ...] = (zeros, zeros) if lstm else (zeros,)
        else:
            if lstm != isinstance(hx, tuple) or (lstm and len(hx) != 2):
                wanted_type = "a tuple (h_0, c_0)" if lstm else "a tensor h_0, not a tuple"
                raise TypeError(f"{type(self).__name__}: hx must be {wanted_type}")
            parts = hx if lstm else (hx,)
            wanted = 3 if batched else 2
            if any(part.dim() != wanted for part in parts):
                kind = "batched 3-D" if batched else "unbatched 2-D"
                found = ", ".join(f"{part.dim()}-D" for part in parts)
                raise RuntimeError(
                    f"For {kind} input, hx and cx should also be {wanted}-D but got ({found}) tensors"
                    if lstm
                    else f"For {kind} input, hx should also be {wanted}-D but got {found} tensor"
                )
            if not batched:
                parts = tuple(part.unsqueeze(1) for part in parts)
        self.check_forward_args(input, parts if lstm else parts[0], None)  # type: ignore[attr-defined]
        return torch.cat(parts, dim=-1)

    def forward(self, input: Tensor, hx: Any = None) -> tuple[Tensor, Any]:
        """``torch.nn``'s forward: ``input (T, B, I)`` (``(B, T, I)`` with ``batch_first``, or
        unbatched ``(T, I)``) and ``hx`` → ``(output, h_n)``, for LSTM ``(output, (h_n, c_n))``."""
        name = type(self).__name__
        if isinstance(input, PackedSequence):
            raise TypeError(f"{name}: PackedSequence input is not supported; pass a padded tensor")
        if not isinstance(input, Tensor):
            raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead")
        batched = input.dim() == 3
        if not batched:
            input = input.unsqueeze(0 if self.batch_first else 1)  # type: ignore[attr-defined]
        initial = self._initial_state(input, hx, batched)  # (L·D, B, S)
        options = self._layer_options()
        directions = 2 if self.bidirectional else 1  # type: ignore[attr-defined]
        layer_input = input.transpose(0, 1) if self.batch_first else input  # type: ignore[attr-defined]
        finals = []
        for layer in range(self.num_layers):  # type: ignore[attr-defined]
            outputs = []
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                weights = [getattr(self, f"{kind}{suffix}", None) for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
                sequence = layer_input.flip(0) if direction else layer_input
                hidden, final = SolvedLayer.apply(
                    options, torch.is_grad_enabled(), sequence, initial[layer * directions + direction], *weights
                )
                outputs.append(hidden.flip(0) if direction else hidden)
                finals.append(final)
            layer_input = torch.cat(outputs, dim=-1) if directions == 2 else outputs[0]
            if self.dropout and self.training and layer + 1 < self.num_layers:  # type: ignore[attr-defined]
                layer_input = functional.dropout(layer_input, self.dropout, training=True)  # type: ignore[attr-defined]
        output = layer_input.transpose(0, 1) if self.batch_first else layer_input  # type: ignore[attr-defined]
        final_states = torch.stack(finals)  # (L·D, B, S)
        if not batched:
            output = output.squeeze(0 if self.batch_first else 1)  # type: ignore[attr-defined]
            final_states = final_states.squeeze(1)
        h_n = final_states[..., : self.hidden_size]  # type: ignore[attr-defined]
        if self._kind == "lstm":
            return output, (h_n, final_states[..., self.hidden_size :])  # type: ignore[attr-defined]
        return output, h_n


def _from_torch(cls: type, module: nn.RNNBase, **options: Any) -> Any:
    """``cls`` with ``module``'s configuration and a copy of its parameters."""
    if getattr(module, "proj_size", 0):
        raise InputError("LSTM with proj_size > 0 is not supported")
    configuration = dict(
        num_layers=module.num_layers,
        bias=module.bias,
        batch_first=module.batch_first,
        dropout=module.dropout,
        bidirectional=module.bidirectional,
        device=module.weight_hh_l0.device,
        dtype=module.weight_hh_l0.dtype,
    )
    if isinstance(module, nn.RNN):
        configuration["nonlinearity"] = module.nonlinearity
    solved = cls(module.input_size, module.hidden_size, **configuration, **options)
    solved.load_state_dict(module.state_dict())
    solved.train(module.training)
    return solved


class RNN(_Solved, nn.RNN):
    """``torch.nn.RNN`` (Elman, tanh or relu) solved as a fixed point; see the module docstring."""

    _kind = "elman"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        solver: Solver | str | None = None,
        max_steps: int | None = None,
        adjoint: AdjointMethod = "auto",
    ) -> None:
        nn.RNN.__init__(
            self, input_size, hidden_size, num_layers, nonlinearity, bias, batch_first, dropout, bidirectional,
            device=device, dtype=dtype,
        )
        self._configure(solver, max_steps, adjoint)

    @classmethod
    def from_torch(cls, module: nn.RNN, **options: Any) -> "RNN":
        """From a ``torch.nn.RNN`` (parameters copied); ``options``: solver, max_steps, adjoint."""
        if not isinstance(module, nn.RNN):
            raise InputError(f"expected a torch.nn.RNN, got {type(module).__name__}")
        return _from_torch(cls, module, **options)


class GRU(_Solved, nn.GRU):
    """``torch.nn.GRU`` solved as a fixed point; see the module docstring."""

    _kind = "gru"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        solver: Solver | str | None = None,
        max_steps: int | None = None,
        adjoint: AdjointMethod = "auto",
    ) -> None:
        nn.GRU.__init__(
            self, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            device=device, dtype=dtype,
        )
        self._configure(solver, max_steps, adjoint)

    @classmethod
    def from_torch(cls, module: nn.GRU, **options: Any) -> "GRU":
        """From a ``torch.nn.GRU`` (parameters copied); ``options``: solver, max_steps, adjoint."""
        if not isinstance(module, nn.GRU):
            raise InputError(f"expected a torch.nn.GRU, got {type(module).__name__}")
        return _from_torch(cls, module, **options)


class LSTM(_Solved, nn.LSTM):
    """``torch.nn.LSTM`` solved as a fixed point (``proj_size = 0`` only); see the module docstring."""

    _kind = "lstm"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        solver: Solver | str | None = None,
        max_steps: int | None = None,
        adjoint: AdjointMethod = "auto",
    ) -> None:
        if proj_size != 0:
            raise InputError("LSTM with proj_size > 0 is not supported: its state is not (h, c) of one size")
        nn.LSTM.__init__(
            self, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size,
            device=device, dtype=dtype,
        )
        self._configure(solver, max_steps, adjoint)

    @classmethod
    def from_torch(cls, module: nn.LSTM, **options: Any) -> "LSTM":
        """From a ``torch.nn.LSTM`` (parameters copied); ``options``: solver, max_steps, adjoint."""
        if not isinstance(module, nn.LSTM):
            raise InputError(f"expected a torch.nn.LSTM, got {type(module).__name__}")
        return _from_torch(cls, module, **options)
