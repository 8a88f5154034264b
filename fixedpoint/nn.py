"""Drop-in ``torch.nn.RNN``, ``GRU`` and ``LSTM`` whose every layer is solved as ``S = F(S)``.

Each class subclasses its ``torch.nn`` counterpart: the same constructor arguments, parameters,
``state_dict`` keys, initialisation and ``forward(input, hx)``, so a ``torch.nn`` ``state_dict``
loads unchanged and the other way round.  Three keyword arguments are added:

- ``solver``: a :class:`~fixedpoint.solvers.Solver` or one of the names of
  :data:`fixedpoint.solvers.SOLVERS` (default ``"auto"``);
- ``max_steps``: most iterations per layer and direction (default ``T``, which always suffices);
- ``adjoint``: how the backward pass runs the adjoint recurrence (:mod:`fixedpoint.adjoint`),
  or ``"fused"``: ``torch.nn``'s own backward through its fused sequential kernel.

The forward pass solves each layer and direction exactly; a solve that does not converge raises
:class:`~fixedpoint.errors.NoConvergence` instead of handing an unconverged state to an
optimiser.  The backward pass is the adjoint recurrence at the solution plus one batched
vector–Jacobian product, never a pass back through the solver's iterations.  The exception is
``"fused"``, where a forward pass that records gradients runs ``torch.nn``'s kernel under
autograd (backpropagation through time by ``torch.nn`` itself, no iterations to pass back
through); ``"auto"`` takes it on a CPU where it was measured faster, per cell, dtype and
hidden size (:class:`AdjointRecurrence`).

Variable lengths.  A ``PackedSequence`` input is solved as its padded batch with each sample's
system ending at its own length: positions are causal, so a sample's real positions never read
its padding; its final state is taken at its last real position, and the reverse direction runs
each sample's own positions backwards (padding stays at the end).  The output is packed with the
input's batch sizes and sorting.  The padded positions are evaluated (and discarded) like any
other; where ``"fused"`` backpropagation runs, ``torch.nn``'s own packed kernel does.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as functional
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from fixedpoint.adjoint import ADJOINT_METHODS, AdjointMethod, adjoint_states, resolve_adjoint_method, solution_gradients
from fixedpoint.cells import CELL_TYPES, Cell
from fixedpoint.errors import InputError
from fixedpoint.lengths import last_states, reversal_within
from fixedpoint.stack import parameter_suffix, run_stack
from fixedpoint.runtime import true_float32
from fixedpoint.solve import solve
from fixedpoint.solvers import SOLVERS, Auto, Sequential, Solver
from fixedpoint.solvers.base import check_integer
from fixedpoint.system import SequenceSystem


#: The modules' ``adjoint=``: a method of the adjoint recurrence, or ``"fused"`` (module docstring).
ModuleAdjoint = Literal["auto", "scan", "quasi-newton", "sequential", "fused"]
MODULE_ADJOINTS: tuple[str, ...] = (*ADJOINT_METHODS, "fused")


def runs_fused_kernel(solver: Solver) -> bool:
    """Whether ``solver``'s forward on a CPU is ``torch.nn``'s fused kernel."""
    return isinstance(solver, Auto) or (isinstance(solver, Sequential) and solver.kernel == "fused")


#: Largest hidden size at which ``adjoint="auto"`` keeps the adjoint recurrence on a CPU, per
#: (cell, dtype); above it the backward is ``torch.nn``'s own through its fused kernel.  Measured
#: on a 2-core x86-64 CPU (docs/adjoint.md §5): forward + backward against ``torch.nn``, B = 16,
#: T = 512 and 4096, the recurrence took 0.25–1.00× ``torch.nn``'s time up to these sizes and
#: 0.94–1.33× above them, where the fused backward took 0.88–1.06×.  The float32 LSTM with
#: oneDNN is not listed: its fused backward wins at every size (the recurrence took 2.6–6.1×).
RECURRENCE_UP_TO_HIDDEN: dict[tuple[str, torch.dtype], int] = {
    ("elman", torch.float32): 192,
    ("gru", torch.float32): 192,
    ("elman", torch.float64): 128,
    ("gru", torch.float64): 128,
    ("lstm", torch.float64): 32,
}


def _fused_backward_is_faster(kind: str, inputs: Tensor, hidden_size: int) -> bool:
    """Whether ``torch.nn``'s backward through its fused kernel was measured faster than the
    adjoint recurrence on a CPU for this cell, dtype and hidden size: for the float32 LSTM when
    oneDNN is available and enabled (torch runs its forward and backward in oneDNN's fused
    kernel), and otherwise above :data:`RECURRENCE_UP_TO_HIDDEN` (the recurrence's reverse step
    is a few small tensor operations whose fixed cost wins at small ``H`` and loses at large).  A
    float32 LSTM without oneDNN runs ATen's generic kernel, as float64 does, and takes float64's
    size."""
    onednn = torch.backends.mkldnn.is_available() and bool(torch.backends.mkldnn.enabled)
    if kind == "lstm" and inputs.dtype == torch.float32:
        if onednn:
            return True
        return hidden_size > RECURRENCE_UP_TO_HIDDEN[("lstm", torch.float64)]
    limit = RECURRENCE_UP_TO_HIDDEN.get((kind, inputs.dtype))
    return limit is not None and hidden_size > limit


class AdjointStrategy(ABC):
    """How a module's backward pass runs, resolved once from its ``adjoint=`` and ``solver``
    (:func:`adjoint_strategy`): the adjoint recurrence at the solution, or ``torch.nn``'s own
    backward through its fused kernel."""

    #: The method of the adjoint recurrence (:mod:`fixedpoint.adjoint`) when it runs.
    method: AdjointMethod

    @abstractmethod
    def through_fused_kernel(self, kind: str, inputs: Tensor, hidden_size: int) -> bool:
        """Whether a forward pass that records gradients runs ``torch.nn``'s fused kernel under
        autograd, so that the backward is ``torch.nn``'s own, instead of solving and keeping
        ``S*`` for the adjoint recurrence."""


@dataclass(frozen=True)
class AdjointRecurrence(AdjointStrategy):
    """The adjoint recurrence by ``method``.  ``"auto"`` hands the backward to ``torch.nn``'s fused
    kernel on a CPU where that was measured faster (:func:`_fused_backward_is_faster`) and the
    forward is that kernel anyway (``fused_forward``: solver ``"auto"`` or
    ``Sequential(kernel="fused")``).  On CUDA the recurrence stays (unmeasured: docs/adjoint.md §5)."""

    method: AdjointMethod
    fused_forward: bool

    def through_fused_kernel(self, kind: str, inputs: Tensor, hidden_size: int) -> bool:
        if self.method != "auto" or inputs.device.type != "cpu" or not self.fused_forward:
            return False
        return _fused_backward_is_faster(kind, inputs, hidden_size)


@dataclass(frozen=True)
class FusedKernelAdjoint(AdjointStrategy):
    """``adjoint="fused"``: ``torch.nn``'s backward through its fused kernel, always.  Its forward
    must be that kernel (checked when resolved)."""

    method: AdjointMethod = "auto"  # no recurrence runs: without gradients there is no backward

    def through_fused_kernel(self, kind: str, inputs: Tensor, hidden_size: int) -> bool:
        return True


def adjoint_strategy(adjoint: object, solver: Solver) -> AdjointStrategy:
    """The strategy ``adjoint=`` stands for with ``solver``, or :class:`InputError`."""
    if adjoint not in MODULE_ADJOINTS:
        raise InputError(f"adjoint must be one of {', '.join(map(repr, MODULE_ADJOINTS))}, got {adjoint!r}")
    fused_forward = runs_fused_kernel(solver)
    if adjoint != "fused":
        return AdjointRecurrence(adjoint, fused_forward)  # type: ignore[arg-type]
    if not fused_forward:
        raise InputError(
            "adjoint='fused' backpropagates through torch.nn's fused kernel, so the forward pass must "
            f"run that kernel: use solver='auto' or Sequential(kernel='fused'), not {solver.name!r}"
        )
    return FusedKernelAdjoint()


@dataclass(frozen=True)
class LayerOptions:
    """What one layer-direction solve needs besides its tensors."""

    kind: str
    nonlinearity: str | None
    solver: Solver
    max_steps: int | None
    adjoint: AdjointMethod

    def cell(self, *weights: Tensor | None) -> Cell:
        """The cell of ``weights`` in :attr:`tensor_names`' order (an LSTM's ``weight_hr`` last, or ``None``)."""
        extra = {} if self.nonlinearity is None else {"nonlinearity": self.nonlinearity}
        return CELL_TYPES[self.kind](*weights, **extra)

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """The weights a layer takes, as ``torch.nn`` names them (without ``_l{k}``)."""
        return CELL_TYPES[self.kind].tensor_names


class SolvedLayer(torch.autograd.Function):
    """One layer, one direction: ``(options, grad_enabled, lengths, x (T, B, I), s_0 (B, S),
    weights…) → (h (T, B, H), s_T (B, S))``; with ``lengths (B,)`` (variable-length sequences,
    padded at the end) the final state of sample ``b`` is its state at position ``lengths[b]``.

    Forward: the solve.  Backward: the adjoint recurrence at the saved solution ``S*`` and one
    vector–Jacobian product of ``F``; only ``S*``, the inputs and the weights are saved.  Both run
    in the weights' dtype (autocast off).  With ``create_graph=True`` (double backward) the
    backward is the recurrence rerun under autograd instead (:func:`_differentiable_backward`).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        options: LayerOptions,
        grad_enabled: bool,
        lengths: Tensor | None,
        inputs: Tensor,
        initial_state: Tensor,
        *weights: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        with _in_weights_dtype(inputs):
            cell = options.cell(*weights)
            system = SequenceSystem.build(cell, inputs, initial_state)
            solution = solve(system, options.solver, max_steps=options.max_steps)
        ctx.options = options
        ctx.lengths = lengths
        hidden, final = solution.hidden, solution.final_state
        if lengths is not None:  # each sample's last real position; what follows is padding
            final = last_states(solution.value, lengths)
        # Inside forward autograd is always off: ``grad_enabled`` says whether it was on at the call.
        if grad_enabled and any(ctx.needs_input_grad):
            states = solution.value
            ctx.save_for_backward(inputs, initial_state, states, *weights)
            if hidden.untyped_storage().data_ptr() == states.untyped_storage().data_ptr():
                hidden = hidden.clone()  # the caller may modify its output in place, as torch.nn allows
        # The final state must not share memory with the output or the saved solution either.
        return hidden, final.clone()

    @staticmethod
    def backward(ctx: Any, hidden_gradient: Tensor, final_gradient: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: the backward must itself be differentiable
            return (None, None, None, *_differentiable_backward(ctx, hidden_gradient, final_gradient))
        inputs, initial_state, states, *weights = ctx.saved_tensors
        options: LayerOptions = ctx.options
        with _in_weights_dtype(inputs):
            cell = options.cell(*weights)
            system = SequenceSystem(cell, inputs, initial_state)
            state_gradients = torch.zeros_like(states)
            state_gradients[..., : cell.output_size] = hidden_gradient
            if ctx.lengths is None:
                state_gradients[-1] += final_gradient
            else:
                lengths = ctx.lengths
                last = (lengths - 1, torch.arange(lengths.shape[0], device=lengths.device))
                state_gradients.index_put_(last, final_gradient, accumulate=True)
            adjoint = adjoint_states(system, states, state_gradients, method=options.adjoint)
            # An LSTM layer may be given no weight_hr at all: it needs no gradient.
            given = ctx.needs_input_grad[3:]
            needs = (*given, *(False,) * (2 + len(cell.tensor_names) - len(given)))
            gradients = solution_gradients(system, states, adjoint, needs)[: len(given)]
        return (None, None, None, *gradients)


def _differentiable_backward(ctx: Any, hidden_gradient: Tensor, final_gradient: Tensor) -> list[Tensor | None]:
    """The layer's gradients as a differentiable function of its inputs and weights, for double
    backward (``create_graph=True``: gradient penalties, Hessian–vector products): the recurrence
    is run again step by step under autograd from the saved inputs — its states are the solution,
    to the solve's tolerance — and differentiated with ``create_graph=True``.  The adjoint
    recurrence is not differentiable; this costs a sequential pass, only when asked for."""
    inputs, initial_state, _, *weights = ctx.saved_tensors
    leaves = (inputs, initial_state, *weights)
    wanted = [i for i, (leaf, need) in enumerate(zip(leaves, ctx.needs_input_grad[3:])) if need and leaf is not None]
    with _in_weights_dtype(inputs):
        cell = ctx.options.cell(*weights)
        projected = cell.input_projection(inputs)
        state, states = initial_state, []
        for t in range(inputs.shape[0]):
            state = cell.step(state, projected[t])
            states.append(state)
        trajectory = torch.stack(states)
        final = trajectory[-1] if ctx.lengths is None else last_states(trajectory, ctx.lengths)
        found = torch.autograd.grad(
            (cell.hidden_of(trajectory), final), [leaves[i] for i in wanted], (hidden_gradient, final_gradient),
            create_graph=True, allow_unused=True,
        )
    gradients: list[Tensor | None] = [None] * len(leaves)
    for i, gradient in zip(wanted, found):
        gradients[i] = torch.zeros_like(leaves[i]) if gradient is None else gradient
    return gradients


def _fused_layer(
    options: LayerOptions, inputs: Tensor, initial_state: Tensor, weights: list[Tensor | None]
) -> tuple[Tensor, Tensor]:
    """One layer, one direction by ``torch.nn``'s fused kernel under autograd (``adjoint="fused"``):
    ``x (T, B, I)``, ``s_0 (B, S)`` → ``(h (T, B, H), s_T (B, S))``, differentiable as ``torch.nn``.
    The inputs are validated as for a solve (NaN/Inf), whichever path runs (empty inputs never
    reach a layer: the module's forward hands them to ``torch.nn``'s)."""
    with _in_weights_dtype(inputs):
        system = SequenceSystem.build(options.cell(*weights), inputs, initial_state)  # validation only
        return system.cell.fused_sequence(system.inputs, system.initial_state, train=True)


@contextlib.contextmanager
def _in_weights_dtype(tensor: Tensor) -> Iterator[None]:
    """Solve and differentiate in the weights' dtype even inside ``torch.autocast``, and in true
    float32 (no TF32) whichever path runs, cuDNN's or the parallel one."""
    with torch.autocast(device_type=tensor.device.type, enabled=False), true_float32():
        yield


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
    """What the three modules share: the options, the conversions and the layer-by-layer forward.

    Mixed in before the ``torch.nn`` class, whose attributes it reads (declared here for type
    checkers).
    """

    _kind: str
    _torch_type: type[nn.RNNBase]
    input_size: int
    hidden_size: int
    num_layers: int
    bias: bool
    batch_first: bool
    dropout: float
    bidirectional: bool
    training: bool
    weight_hh_l0: Tensor
    check_forward_args: Any
    state_dict: Any
    load_state_dict: Any
    named_parameters: Any

    @property
    def _output_size(self) -> int:
        """The size of ``h``: ``hidden_size``, or an LSTM's ``proj_size`` when it is set."""
        return getattr(self, "proj_size", 0) or self.hidden_size

    def _configure(self, solver: Solver | str | None, max_steps: int | None, adjoint: ModuleAdjoint) -> None:
        check_integer("max_steps", max_steps, allow_none=True)
        resolved = resolve_solver(solver)
        self._resolved_adjoint = ((adjoint, resolved), adjoint_strategy(adjoint, resolved))
        self.solver = resolved
        self.max_steps = max_steps
        self.adjoint = adjoint

    def _adjoint_strategy(self) -> AdjointStrategy:
        """The strategy of the current ``adjoint`` and ``solver``, resolved again only when one of
        them was reassigned since (a user may set either attribute between calls)."""
        key = (self.adjoint, self.solver)
        resolved = self.__dict__.get("_resolved_adjoint")  # absent in a module pickled before it existed
        if resolved is None or resolved[0] != key:
            resolved = self._resolved_adjoint = (key, adjoint_strategy(self.adjoint, self.solver))
        return resolved[1]

    def _layer_options(self, strategy: AdjointStrategy) -> LayerOptions:
        nonlinearity = getattr(self, "nonlinearity", None) if self._kind == "elman" else None
        return LayerOptions(self._kind, nonlinearity, self.solver, self.max_steps, strategy.method)

    def backward_method(self, input: Tensor) -> str:
        """What the backward of a forward on ``input`` runs: ``"fused"`` (``torch.nn``'s own) or
        the method of the adjoint recurrence that ``adjoint`` stands for on ``input``'s device."""
        strategy = self._adjoint_strategy()
        if strategy.through_fused_kernel(self._kind, input, self.hidden_size):
            return "fused"
        return resolve_adjoint_method(strategy.method, input.device)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, solver={self.solver.name}, max_steps={self.max_steps}, "  # type: ignore[misc]
            f"adjoint={self.adjoint!r}"
        )

    # -- conversions -------------------------------------------------------------------------------
    @classmethod
    def from_torch(cls, module: nn.RNNBase, **options: Any) -> Any:
        """The module with ``module``'s configuration and a copy of its parameters (frozen ones
        stay frozen); ``options``: ``solver``, ``max_steps``, ``adjoint``."""
        if not isinstance(module, cls._torch_type):
            raise InputError(f"expected a torch.nn.{cls._torch_type.__name__}, got {type(module).__name__}")
        solved = cls(module.input_size, module.hidden_size, **_configuration(module), **options)
        _copy_parameters(module, solved)
        return solved

    def to_torch(self) -> nn.RNNBase:
        """The ``torch.nn`` module with the same configuration and a copy of the parameters."""
        module = self._torch_type(self.input_size, self.hidden_size, **_configuration(self))  # type: ignore[arg-type]
        _copy_parameters(self, module)  # type: ignore[arg-type]
        return module

    # -- forward -------------------------------------------------------------------------------------
    def _initial_state(self, input: Tensor, hx: Any, batched: bool, packed: PackedSequence | None = None) -> Tensor:
        """``hx`` checked as ``torch.nn`` checks it (same messages), as one ``(L·D, B, S)`` tensor
        (for a packed ``input``, ``hx`` is in the caller's batch order, as ``torch.nn`` takes it)."""
        lstm = self._kind == "lstm"
        batch = int(packed.batch_sizes[0]) if packed is not None else input.shape[0 if self.batch_first else 1]
        count = self.num_layers * (2 if self.bidirectional else 1)
        if hx is None:
            zeros = torch.zeros(count, batch, self._output_size, dtype=input.dtype, device=input.device)
            memory = torch.zeros(count, batch, self.hidden_size, dtype=input.dtype, device=input.device)
            parts: tuple[Tensor, ...] = (zeros, memory) if lstm else (zeros,)
        else:
            pair = isinstance(hx, (tuple, list))
            if lstm != pair or (lstm and len(hx) != 2):
                wanted_type = "a tuple (h_0, c_0)" if lstm else "a tensor h_0, not a tuple"
                raise TypeError(f"{type(self).__name__}: hx must be {wanted_type}")
            parts = tuple(hx) if lstm else (hx,)
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
        if packed is not None:
            self.check_forward_args(packed.data, parts if lstm else parts[0], packed.batch_sizes)
        else:
            self.check_forward_args(input, parts if lstm else parts[0], None)
        return torch.cat(parts, dim=-1)

    def forward(self, input: Tensor, hx: Any = None) -> tuple[Tensor, Any]:
        """``torch.nn``'s forward: ``input (T, B, I)`` (``(B, T, I)`` with ``batch_first``, or
        unbatched ``(T, I)``) and ``hx`` → ``(output, h_n)``, for LSTM ``(output, (h_n, c_n))``."""
        name = type(self).__name__
        if isinstance(input, Tensor) and input.numel() == 0:
            # No equation to solve: torch.nn's own forward gives its results and its errors for an
            # empty batch (empty outputs, a backward of zero gradients) or an empty sequence.
            return self._torch_type.forward(self, input, hx)  # type: ignore[arg-type]
        packed = input if isinstance(input, PackedSequence) else None
        lengths = None
        if packed is not None:
            # Each sample's system ends at its own length: the padded batch, solved with each
            # sample's final state taken at its last real position (the reverse direction runs
            # each sample's own positions backwards); outputs are packed again as they came.
            input, lengths = pad_packed_sequence(packed)  # (T, B, I), batch in the caller's order
            lengths = lengths.to(input.device)
        elif not isinstance(input, Tensor):
            raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead")
        batched = input.dim() == 3
        batch_first = self.batch_first and packed is None
        batch_axis = 0 if batch_first else 1
        if not batched:
            input = input.unsqueeze(batch_axis)
        initial = self._initial_state(input, hx, batched, packed)
        strategy = self._adjoint_strategy()  # resolved again if the attributes were reassigned
        options = self._layer_options(strategy)
        through_kernel = torch.is_grad_enabled() and strategy.through_fused_kernel(self._kind, input, self.hidden_size)
        if packed is not None and through_kernel:  # torch.nn's kernel and backward: its own packed path
            return self._torch_type.forward(self, packed, hx)  # type: ignore[arg-type]
        sequence = input.transpose(0, 1) if batch_first else input  # (T, B, ·)
        reverse_order = None if lengths is None else reversal_within(lengths, sequence.shape[0])

        def solve_layer(layer: int, direction: int, layer_input: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
            suffix = parameter_suffix(layer, direction)
            weights = [getattr(self, f"{name}{suffix}", None) for name in options.tensor_names]
            if through_kernel:
                return _fused_layer(options, layer_input, state, weights)
            return SolvedLayer.apply(options, torch.is_grad_enabled(), lengths, layer_input, state, *weights)

        between = None
        if self.dropout and self.training:  # as torch.nn: between layers, drawn from the global generator
            between = lambda outputs: functional.dropout(outputs, self.dropout, training=True)  # noqa: E731
        layer_output, final_states = run_stack(
            self.num_layers, 2 if self.bidirectional else 1, sequence, initial, solve_layer,
            reverse_order=reverse_order, between_layers=between,
        )  # (T, B, D·H), (L·D, B, S)
        output = layer_output.transpose(0, 1) if batch_first else layer_output
        if packed is not None:
            output = _packed_like(packed, output)
        if not batched:
            output = output.squeeze(batch_axis)
            final_states = final_states.squeeze(1)
        h_n = final_states[..., : self._output_size].contiguous()
        if self._kind == "lstm":
            return output, (h_n, final_states[..., self._output_size :].contiguous())
        return output, h_n


def _packed_like(packed: PackedSequence, padded: Tensor) -> PackedSequence:
    """``padded (T, B, F)`` (batch in the caller's order) packed with ``packed``'s own batch sizes
    and sorting, so that its rows line up with the input's."""
    order = packed.sorted_indices
    if order is None:
        order = torch.arange(padded.shape[1], device=padded.device)
    sizes = packed.batch_sizes.tolist()
    times = torch.repeat_interleave(torch.arange(len(sizes)), packed.batch_sizes).to(padded.device)
    samples = torch.cat([order[:size] for size in sizes])
    return PackedSequence(padded[times, samples], packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)


def _configuration(module: nn.RNNBase) -> dict[str, Any]:
    """The constructor arguments after ``input_size, hidden_size`` that rebuild ``module``."""
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
    if isinstance(module, nn.LSTM):
        configuration["proj_size"] = module.proj_size
    return configuration


def _copy_parameters(source: nn.RNNBase, target: nn.RNNBase) -> None:
    """Values, ``requires_grad`` flags and the training mode of ``source`` onto ``target``."""
    target.load_state_dict(source.state_dict())
    flags = {name: parameter.requires_grad for name, parameter in source.named_parameters()}
    for name, parameter in target.named_parameters():
        parameter.requires_grad_(flags[name])
    target.train(source.training)


class RNN(_Solved, nn.RNN):
    """``torch.nn.RNN`` (Elman, tanh or relu) solved as a fixed point; see the module docstring."""

    _kind = "elman"
    _torch_type = nn.RNN

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
        adjoint: ModuleAdjoint = "auto",
        **torch_options: Any,
    ) -> None:
        nn.RNN.__init__(
            self, input_size, hidden_size, num_layers, nonlinearity, bias, batch_first, dropout, bidirectional,
            device=device, dtype=dtype, **torch_options,
        )
        self._configure(solver, max_steps, adjoint)


class GRU(_Solved, nn.GRU):
    """``torch.nn.GRU`` solved as a fixed point; see the module docstring."""

    _kind = "gru"
    _torch_type = nn.GRU

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
        adjoint: ModuleAdjoint = "auto",
        **torch_options: Any,
    ) -> None:
        nn.GRU.__init__(
            self, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
            device=device, dtype=dtype, **torch_options,
        )
        self._configure(solver, max_steps, adjoint)


class LSTM(_Solved, nn.LSTM):
    """``torch.nn.LSTM`` solved as a fixed point, ``proj_size`` included; see the module docstring."""

    _kind = "lstm"
    _torch_type = nn.LSTM

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
        adjoint: ModuleAdjoint = "auto",
        **torch_options: Any,
    ) -> None:
        nn.LSTM.__init__(
            self, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size,
            device=device, dtype=dtype, **torch_options,
        )
        self._configure(solver, max_steps, adjoint)
