"""Recurrent cells with ``torch.nn``'s exact parameterisation.

A cell maps a previous state ``s`` and an input projection ``p = W_ih x + b_ih`` to the next
state, ``s' = f(s, x)``.  Every cell works on any leading shape, so the same ``step`` serves the
sequential reference (shape ``(B, S)``) and the all-positions-at-once evaluation of the system
``F`` (shape ``(T, B, S)``).

State layout: Elman and GRU carry ``h`` (``S = H``); LSTM carries ``(h, c)`` concatenated along
the last axis (``S = 2H``, ``h`` first).  Gate order and both biases follow ``torch.nn``:
GRU rows are ``(r, z, n)``, LSTM rows ``(i, f, g, o)``.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Literal

import torch
from torch import Tensor

from fixedpoint.errors import InputError
from fixedpoint.kernels import use_kernels
from fixedpoint.residual import Measurement, StopTest, measure_window
from fixedpoint.scan import Structure, apply_transitions, linear_recurrence

SUPPORTED_DTYPES = (torch.float32, torch.float64)


def check_floating(name: str, tensor: Tensor) -> None:
    """Raise :class:`InputError` unless ``tensor`` is a finite float32/float64 tensor."""
    if not isinstance(tensor, Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise InputError(
            f"{name} has dtype {tensor.dtype}; use float32 or float64 (convert with .double())"
        )
    if not all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise InputError(f"{name} contains {bad} NaN/Inf value(s); the system is undefined there")


def all_finite(tensor: Tensor) -> bool:
    """Whether every entry is finite, in one reduction: a NaN or Inf makes the sum non-finite; a
    finite sum that overflows is re-checked entry by entry."""
    if tensor.numel() == 0 or bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


@dataclass(frozen=True, eq=False)
class Cell(ABC):
    """Parameters of one recurrent cell (one layer, one direction).

    Attributes:
        weight_ih: ``(G·H, I)`` input weights, gates stacked as ``torch.nn`` stacks them.
        weight_hh: ``(G·H, H)`` recurrent weights.
        bias_ih: ``(G·H,)`` or ``None`` (``bias=False``).
        bias_hh: ``(G·H,)`` or ``None``.
    """

    weight_ih: Tensor
    weight_hh: Tensor
    bias_ih: Tensor | None
    bias_hh: Tensor | None

    gate_count: ClassVar[int] = 1
    kind: ClassVar[str] = "cell"
    #: The cell's tensors, as ``torch.nn`` names them (without the ``_l{k}`` suffix).
    tensor_names: ClassVar[tuple[str, ...]] = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")

    def __post_init__(self) -> None:
        check_floating("weight_hh", self.weight_hh)
        check_floating("weight_ih", self.weight_ih)
        if self.weight_hh.dim() != 2 or self.weight_ih.dim() != 2:
            raise InputError("weight_ih and weight_hh must be matrices")
        rows, columns = self.weight_hh.shape
        if rows != self.gate_count * self.hidden_size or columns != self.output_size:
            recurrent = "P" if self.output_size != self.hidden_size else "H"
            raise InputError(
                f"{self.kind} weight_hh has shape {tuple(self.weight_hh.shape)}; expected "
                f"({self.gate_count}·H, {recurrent}) — is this the weight of another cell type?"
            )
        if self.weight_ih.shape[0] != rows:
            raise InputError(
                f"weight_ih has {self.weight_ih.shape[0]} rows, weight_hh has {rows}; they must match"
            )
        for name in ("weight_ih", "bias_ih", "bias_hh"):
            value = getattr(self, name)
            if value is None:
                continue
            check_floating(name, value)
            if value.dtype != self.weight_hh.dtype or value.device != self.weight_hh.device:
                raise InputError(f"{name} must have the dtype and device of weight_hh")
            if name.startswith("bias") and tuple(value.shape) != (rows,):
                raise InputError(f"{name} has shape {tuple(value.shape)}; expected ({rows},)")
        if (self.bias_ih is None) != (self.bias_hh is None):
            raise InputError("give both biases or neither (torch.nn's bias=False)")

    # -- sizes -------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        """``H``: the units of each gate (``torch.nn``'s ``hidden_size``)."""
        return self.weight_hh.shape[1]

    @property
    def output_size(self) -> int:
        """The size of the output ``h``: ``H``, or an LSTM's ``proj_size`` ``P``."""
        return self.hidden_size

    @property
    def unit_structure(self) -> Structure:
        """The scan structure of :meth:`unit_jacobian`: ``"diagonal"``, or ``"block2"`` for an
        LSTM's per-unit ``(h_j, c_j)`` blocks."""
        return "diagonal"

    @property
    def fused_kernel(self) -> bool:
        """Whether :mod:`fixedpoint.kernels.cells` has a fused kernel for this cell (on CUDA)."""
        return True

    @property
    def input_size(self) -> int:
        return self.weight_ih.shape[1]

    @property
    def state_size(self) -> int:
        """Length of the state vector ``s`` (``H``; ``2H`` for LSTM)."""
        return self.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return self.weight_hh.dtype

    @property
    def bounded(self) -> bool:
        """Whether every state reachable from a finite ``s_0`` stays finite: true for tanh Elman
        (``|h| ≤ 1``), GRU (``|h_t| ≤ max(1, ‖h_0‖∞)``) and LSTM (``|h| ≤ 1``, ``|c_t| ≤ |c_0| + t``);
        false for relu Elman, which can overflow."""
        return getattr(self, "nonlinearity", "tanh") != "relu"

    @property
    def device(self) -> torch.device:
        return self.weight_hh.device

    # -- evaluation --------------------------------------------------------------------------
    def folded_bias(self) -> Tensor | None:
        """The part of ``b_ih + b_hh`` that can be added once with the input projection.

        Both biases enter every gate additively, except GRU's ``b_hn``, which sits inside
        ``r ⊙ (W_hn h + b_hn)``; GRU overrides this.
        """
        return None if self.bias_ih is None else self.bias_ih + self.bias_hh

    def input_projection(self, inputs: Tensor) -> Tensor:
        """``W_ih x + (folded biases)`` for all positions at once: ``(T, B, I) → (T, B, G·H)``."""
        bias = self.folded_bias()
        flat = inputs.reshape(-1, inputs.shape[-1])
        out = flat @ self.weight_ih.T if bias is None else torch.addmm(bias, flat, self.weight_ih.T)
        return out.view(*inputs.shape[:-1], -1)

    def preactivation(self, hidden: Tensor, projected_input: Tensor) -> Tensor:
        """``projected_input + W_hh h`` in one fused product: ``(..., H), (..., G·H) → (..., G·H)``."""
        flat = torch.addmm(
            projected_input.reshape(-1, projected_input.shape[-1]),
            hidden.reshape(-1, hidden.shape[-1]),
            self.weight_hh.T,
        )
        return flat.view(projected_input.shape)

    @abstractmethod
    def step(self, state: Tensor, projected_input: Tensor) -> Tensor:
        """``f(s, x)``: ``(..., S)`` and ``(..., G·H)`` → ``(..., S)``."""

    @abstractmethod
    def jacobian(self, state: Tensor, projected_input: Tensor) -> Tensor:
        """``∂f/∂s`` at ``(s, x)``, analytic: ``(..., S)``, ``(..., G·H)`` → ``(..., S, S)``.

        Formulas: docs/contraction.md; tests check them against ``torch.func`` and ``sympy``.
        """

    @abstractmethod
    def unit_jacobian(self, state: Tensor, projected_input: Tensor) -> Tensor:
        """The part of ``∂f/∂s`` that couples each unit with itself, for quasi-Newton.

        Elman and GRU: the diagonal, ``(..., H)``.  LSTM: per unit ``j`` the 2×2 block of
        ``(h'_j, c'_j)`` with respect to ``(h_j, c_j)``, ``(..., H, 2, 2)``, the layout of
        :func:`fixedpoint.scan.linear_recurrence`'s ``"block2"`` structure.  Equal to the
        corresponding entries of :meth:`jacobian` without forming the ``S×S`` matrices.
        """

    def quasi_newton_terms(self, state: Tensor, projected_input: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Everything a quasi-Newton step needs at ``s_{t−1} = state``, from one product with
        ``W_hh``: ``(F, A, b)`` with ``F = f(s, x)`` ``(..., S)``, ``A`` = :meth:`unit_jacobian`
        and ``b = F − A s`` ``(..., S)``, the right-hand side of the step's linear recurrence
        ``y_t = A_t y_{t−1} + b_t``.  On CUDA with Triton, one fused kernel computes them after
        the product (:mod:`fixedpoint.kernels.cells`); this is its reference."""
        if self.fused_kernel and use_kernels(state, projected_input, self.weight_hh, self.bias_hh):
            from fixedpoint.kernels.cells import quasi_newton_terms  # imports Triton

            return quasi_newton_terms(self, state, projected_input)
        return self.quasi_newton_terms_torch(state, projected_input)

    def measured_quasi_newton_terms(
        self, state: Tensor, projected_input: Tensor, iterate: Tensor, test: StopTest
    ) -> tuple[Tensor, Tensor, Tensor, Measurement]:
        """:meth:`quasi_newton_terms` and the driver's measurement of ``F`` against the iterate
        window ``iterate (..., S)`` whose states ``state`` reads (``F``'s first ``test.exact``
        rows become the iterate's; ``b`` is formed before, from ``F``): one kernel on CUDA."""
        if self.fused_kernel and use_kernels(state, projected_input, self.weight_hh, self.bias_hh):
            from fixedpoint.kernels.cells import measured_quasi_newton_terms  # imports Triton

            return measured_quasi_newton_terms(self, state, projected_input, iterate, test)
        image, transitions, values = self.quasi_newton_terms_torch(state, projected_input)
        return image, transitions, values, measure_window(image, iterate, test)

    def quasi_newton_terms_torch(self, state: Tensor, projected_input: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`quasi_newton_terms` in torch operations on any device: the reference."""
        image, transitions = self._image_and_unit_jacobian(state, projected_input)
        return image, transitions, image - apply_transitions(transitions, state, self.unit_structure)

    def _image_and_unit_jacobian(self, state: Tensor, projected_input: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`step` and :meth:`unit_jacobian` together; cells override it to share the product."""
        return self.step(state, projected_input), self.unit_jacobian(state, projected_input)

    @abstractmethod
    def linearization(self, state: Tensor, projected_input: Tensor) -> tuple[Tensor, ...]:
        """Per-position factors of ``∂f/∂s`` at ``(s, x)``, each ``(..., k·H)``, from which
        :meth:`transposed_jacobian_product` applies ``Jᵀ`` without forming the ``S×S`` matrix."""

    @abstractmethod
    def transposed_jacobian_product(self, factors: tuple[Tensor, ...], vector: Tensor) -> Tensor:
        """``Jᵀ v`` for ``factors`` from :meth:`linearization` and ``v (..., S)``, with matching
        leading shapes: one product with ``W_hh`` (``O(G·H²)``), the step of an adjoint recurrence."""

    @abstractmethod
    def jacobian_product(self, factors: tuple[Tensor, ...], vector: Tensor) -> Tensor:
        """``J v`` for ``factors`` from :meth:`linearization` and ``v (..., S)``: the forward
        counterpart of :meth:`transposed_jacobian_product`, one product with ``W_hhᵀ``, the step
        of a linearised (tangent) recurrence such as the forward-error estimate's."""

    def tangent_recurrence(self, factors: tuple[Tensor, ...], values: Tensor, initial: Tensor, out: Tensor) -> Tensor:
        """``y_t = J_t y_{t−1} + b_t`` for the ``n`` positions of ``factors`` (from
        :meth:`linearization`) and ``values b (n, B, S)``, from ``y_{−1} = initial (B, S)``, one
        position after another with one :meth:`jacobian_product` each (no ``S×S`` matrix): the
        loop of the forward-error estimate and of a matrix-free Newton step.  Writes ``y`` into
        ``out (n, B, S)`` and returns its last row."""
        state = initial
        for t in range(values.shape[0]):
            state = self.jacobian_product(tuple(f[t] for f in factors), state) + values[t]
            out[t] = state
        return state

    def hidden_of(self, state: Tensor) -> Tensor:
        """The output part ``h`` of a state ``(..., S) → (..., H)``."""
        return state

    def fused_sequence(self, inputs: Tensor, initial_state: Tensor, *, train: bool = False) -> tuple[Tensor, Tensor]:
        """The sequential solution by ``torch.nn``'s own compiled kernel (cuDNN on CUDA).

        ``inputs (T, B, I)``, ``initial_state (B, S)`` → the outputs ``h_t (T, B, H)`` and the
        final state ``s_T (B, S)``.  The same recurrence as :meth:`step` applied ``T`` times, without
        Python between the steps.  LSTM's kernel returns no ``c_t`` before the last: see
        :meth:`states_from_hidden`.  Differentiable when the tensors require gradients; ``train``
        must then be true on CUDA, where cuDNN keeps what its backward needs only in training mode
        (no dropout either way: one layer).
        """
        hidden = self.output_size
        h0 = initial_state[..., :hidden].unsqueeze(0).contiguous()
        # tensor_names is torch.nn's flat-weight order; a projection is read from P ≠ H in hx.
        weights = [getattr(self, name) for name in self.tensor_names if getattr(self, name) is not None]
        # torch._VF is what torch.nn.RNN/GRU/LSTM.forward call; the arguments after the weights
        # are has_biases, num_layers, dropout, train, bidirectional, batch_first.
        options = (self.bias_ih is not None, 1, 0.0, train, False, False)
        if self.kind == "lstm":
            c0 = initial_state[..., hidden:].unsqueeze(0).contiguous()
            if hidden == self.hidden_size:
                output, h_n, c_n = torch._VF.lstm(inputs, (h0, c0), weights, *options)  # type: ignore[attr-defined]
            else:
                with warnings.catch_warnings():  # torch's note that oneDNN skips projections; it falls back itself
                    warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")
                    output, h_n, c_n = torch._VF.lstm(inputs, (h0, c0), weights, *options)  # type: ignore[attr-defined]
            return output, torch.cat((h_n[0], c_n[0]), dim=-1)
        kernel = torch._VF.gru if self.kind == "gru" else getattr(torch._VF, f"rnn_{self.nonlinearity}")  # type: ignore[attr-defined]
        output, h_n = kernel(inputs, h0, weights, *options)
        return output, h_n[0]

    def states_from_hidden(
        self, hidden: Tensor, inputs: Tensor, initial_state: Tensor, *, scan: bool | None = None
    ) -> Tensor:
        """The full states ``(T, B, S)`` of the solution whose outputs are ``hidden (T, B, H)``.

        The state is ``h`` itself except for LSTM, which overrides this; ``scan`` is LSTM's choice
        of how to run its memory recurrence (default: a scan on CUDA, a loop elsewhere).
        """
        return hidden

    def gate_weights(self) -> tuple[Tensor, ...]:
        """The ``G`` recurrent blocks ``(H, H)`` of ``W_hh`` in ``torch.nn``'s gate order."""
        return tuple(self.weight_hh.split(self.hidden_size, dim=0))

    def with_tensors(self, **changes: Tensor | None) -> "Cell":
        """A copy with some tensors replaced (same cell type and options)."""
        fields = {k: getattr(self, k) for k in self.tensor_names}
        fields.update(changes)
        return self._rebuild(**fields)

    def _rebuild(self, **fields: Tensor | None) -> "Cell":
        return type(self)(**fields)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "Cell":
        """Convert every tensor to ``dtype`` / ``device``."""
        return self.with_tensors(
            **{
                k: None if getattr(self, k) is None else getattr(self, k).to(dtype=dtype, device=device)
                for k in self.tensor_names
            }
        )


@dataclass(frozen=True, eq=False)
class ElmanCell(Cell):
    """``h' = φ(W_ih x + b_ih + W_hh h + b_hh)`` with ``φ ∈ {tanh, relu}`` (``torch.nn.RNN``)."""

    nonlinearity: Literal["tanh", "relu"] = "tanh"

    gate_count: ClassVar[int] = 1
    kind: ClassVar[str] = "elman"

    def __post_init__(self) -> None:
        if self.nonlinearity not in ("tanh", "relu"):
            raise InputError(f"nonlinearity must be 'tanh' or 'relu', got {self.nonlinearity!r}")
        super().__post_init__()

    def _rebuild(self, **fields: Tensor | None) -> "Cell":
        return ElmanCell(**fields, nonlinearity=self.nonlinearity)

    def step(self, state: Tensor, projected_input: Tensor) -> Tensor:
        pre = self.preactivation(state, projected_input)
        return torch.tanh(pre) if self.nonlinearity == "tanh" else torch.relu(pre)

    def jacobian(self, state: Tensor, projected_input: Tensor) -> Tensor:
        return self._slope(state, projected_input).unsqueeze(-1) * self.weight_hh

    def unit_jacobian(self, state: Tensor, projected_input: Tensor) -> Tensor:
        return self._slope(state, projected_input) * self.weight_hh.diagonal()

    def linearization(self, state: Tensor, projected_input: Tensor) -> tuple[Tensor, ...]:
        return (self._slope(state, projected_input),)

    def _image_and_unit_jacobian(self, state: Tensor, projected_input: Tensor) -> tuple[Tensor, Tensor]:
        pre = self.preactivation(state, projected_input)
        if self.nonlinearity == "tanh":
            image = torch.tanh(pre)
            slope = 1 - image**2
        else:
            image = torch.relu(pre)
            slope = (pre > 0).to(pre.dtype)
        return image, slope * self.weight_hh.diagonal()

    def transposed_jacobian_product(self, factors: tuple[Tensor, ...], vector: Tensor) -> Tensor:
        (slope,) = factors  # J = diag(φ') W_hh, so Jᵀv = W_hhᵀ (φ' ⊙ v)
        return (slope * vector) @ self.weight_hh

    def jacobian_product(self, factors: tuple[Tensor, ...], vector: Tensor) -> Tensor:
        (slope,) = factors
        return slope * (vector @ self.weight_hh.T)

    def _slope(self, state: Tensor, projected_input: Tensor) -> Tensor:
        """``φ'`` at the pre-activation, ``(..., H)``."""
        pre = self.preactivation(state, projected_input)
        return 1 - torch.tanh(pre) ** 2 if self.nonlinearity == "tanh" else (pre > 0).to(pre.dtype)


@dataclass(frozen=True, eq=False)
class GRUCell(Cell):
    """``torch.nn.GRU``: gates ``(r, z, n)``; ``n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))``."""

    gate_count: ClassVar[int] = 3
    kind: ClassVar[str] = "gru"

    def folded_bias(self) -> Tensor | None:
        if self.bias_ih is None:
            return None
        hidden = self.hidden_size
        return torch.cat((self.bias_ih[: 2 * hidden] + self.bias_hh[: 2 * hidden], self.bias_ih[2 * hidden :]))

    def step(self, state: Tensor, projected_input: Tensor) -> Tensor:
        _, z, _, n = self.gates(state, projected_input)
        return n + z * (state - n)  # (1 − z) ⊙ n + z ⊙ h

    def gates(self, state: Tensor, projected_input: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(r, z, q, n)`` with ``q = W_hn h + b_hn``, each ``(..., H)``."""
        hidden = self.hidden_size
        recurrent = state @ self.weight_hh.T
        r, z = torch.sigmoid(projected_input[..., : 2 * hidden] + recurrent[..., : 2 * hidden]).split(hidden, -1)
        q = recurrent[..., 2 * hidden :]
        if self.bias_hh is not None:
            q = q + self.bias_hh[2 * hidden :]
        n = torch.tanh(torch.addcmul(projected_input[..., 2 * hidden :], r, q))
        return r, z, q, n

    def jacobian(self, state: Tensor, projected_input: Tensor) -> Tensor:
        z, terms = self._terms(state, projected_input)
        return torch.diag_embed(z) + sum(v.unsqueeze(-1) * w for v, w in zip(terms, self.gate_weights()))

    def unit_jacobian(self, state: Tensor, projected_input: Tensor) -> Tensor:
        z, terms = self._terms(state, projected_input)
        return z + sum(v * w.diagonal() for v, w in zip(terms, self.gate_weights()))

    def linearization(self, state: Tensor, projected_input: Tensor) -> tuple[Tensor, ...]:
        z, terms = self._terms(state, projected_input)
        return z, torch.cat(terms, dim=-1)

    def _image_and_unit_jacobian(self, state: Tensor, projected_input: Tensor) -> tuple[Tensor, Tensor]:
        r, z, q, n = self.gates(state, projected_input)
        _, terms = self._terms_of_gates(state, r, z, q, n)
        jacobian = z.clone()
        for v, w in zip(terms, self.gate_weights()):
            jacobian.addcmul_(v, w.diagonal())
        return n + z * (state - n), jacobian

    def transposed_jacobian_product(self, factors: tuple[Tensor, ...], vector: Tensor) -> Tensor:
        # Jᵀv = z ⊙ v + Σ_k W_kᵀ (u_k ⊙ v) = z ⊙ v + W_hhᵀ [u_r ⊙ v; u_z ⊙ v; u_n ⊙ v]
        z, scalings = factors
        scaled = scalings * torch.cat((vector, vector, vector), dim=-1)
        return torch.addcmul(scaled @ self.weight_hh, z, vector)

    def jacobian_product(self, factors: tuple[Tensor, ...], vector: Tensor) -> Tensor:
        # Jv = z ⊙ v + Σ_k u_k ⊙ (W_k v): the three gate rows of W_hh v, scaled and summed.
        z, scalings = factors
        r_part, z_part, n_part = (scalings * (vector @ self.weight_hh.T)).chunk(3, dim=-1)
        return torch.addcmul(r_part + z_part + n_part, z, vector)

    def _terms(self, state: Tensor, projected_input: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """``z`` and the row scalings of ``(W_hr, W_hz, W_hn)`` in
        ``J = diag(z) + diag((1−z)(1−n²) q r(1−r)) W_hr + diag((h−n) z(1−z)) W_hz + diag((1−z)(1−n²)r) W_hn``."""
        return self._terms_of_gates(state, *self.gates(state, projected_input))

    @staticmethod
    def _terms_of_gates(
        state: Tensor, r: Tensor, z: Tensor, q: Tensor, n: Tensor
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        through_n = (1 - z) * (1 - n**2)
        return z, (through_n * q * r * (1 - r), (state - n) * z * (1 - z), through_n * r)


@dataclass(frozen=True, eq=False)
class LSTMCell(Cell):
    """``torch.nn.LSTM``: gates ``(i, f, g, o)``; state ``(h, c)`` stored as ``[h, c]``.

    With ``weight_hr (P, H)`` (``torch.nn.LSTM(proj_size=P)``, ``0 < P < H``) the output is
    projected, ``h' = W_hr (o ⊙ tanh c')`` of size ``P``, and ``W_hh`` is ``(4H, P)``: the state is
    ``[h (P), c (H)]``.  Its per-unit Jacobian is then the diagonal of ``∂f/∂s`` (``h_j`` and
    ``c_j`` are no longer one unit's pair), and the fused kernels do not serve it.
    """

    weight_hr: Tensor | None = None

    gate_count: ClassVar[int] = 4
    kind: ClassVar[str] = "lstm"
    tensor_names: ClassVar[tuple[str, ...]] = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")

    def __post_init__(self) -> None:
        if self.weight_hr is not None:
            check_floating("weight_hr", self.weight_hr)
            if self.weight_hr.dim() != 2 or self.weight_hh.dim() != 2:
                raise InputError("weight_hr and weight_hh must be matrices")
            if self.weight_hr.dtype != self.weight_hh.dtype or self.weight_hr.device != self.weight_hh.device:
                raise InputError("weight_hr must have the dtype and device of weight_hh")
            rows, projected = self.weight_hh.shape
            if rows % 4 or tuple(self.weight_hr.shape) != (projected, rows // 4):
                raise InputError(
                    f"weight_hr has shape {tuple(self.weight_hr.shape)} and weight_hh {tuple(self.weight_hh.shape)}; "
                    "expected (P, H) and (4·H, P), torch.nn.LSTM's layout with proj_size = P"
                )
            if not 0 < projected < rows // 4:
                raise InputError(f"proj_size must be between 0 and hidden_size, got {projected} for H = {rows // 4}")
        super().__post_init__()

    def _rebuild(self, **fields: Tensor | None) -> "Cell":
        return LSTMCell(**fields)

    @property
    def hidden_size(self) -> int:
        return self.weight_hh.shape[0] // 4 if self.weight_hr is not None else self.weight_hh.shape[1]

    @property
    def output_size(self) -> int:
        return self.weight_hh.shape[1]

    @property
    def proj_size(self) -> int:
        """``torch.nn.LSTM``'s ``proj_size``: ``P``, or 0 without a projection."""
        return 0 if self.weight_hr is None else self.output_size

    @property
    def state_size(self) -> int:
        return self.output_size + self.hidden_size

    @property
    def unit_structure(self) -> Structure:
        return "block2" if self.weight_hr is None else "diagonal"

    @property
    def fused_kernel(self) -> bool:
        return self.weight_hr is None

    def hidden_of(self, state: Tensor) -> Tensor:
        return state[..., : self.output_size]

    def cell_of(self, state: Tensor) -> Tensor:
        """The memory part ``c`` of a state ``(..., P + H) → (..., H)``."""
        return state[..., self.output_size :]

    def _project(self, gated: Tensor) -> Tensor:
        """``W_hr v`` for ``v (..., H)``; ``v`` itself without a projection."""
        return gated if self.weight_hr is None else gated @ self.weight_hr.T

    def states_from_hidden(
        self, hidden: Tensor, inputs: Tensor, initial_state: Tensor, *, scan: bool | None = None
    ) -> Tensor:
        # With every h_{t−1} known, the gates i, f, g follow from one batched product over
        # [x_t, h_{t−1}], and c_t = f_t ⊙ c_{t−1} + i_t ⊙ g_t is a diagonal linear recurrence: a
        # scan on CUDA, a loop of one fused op per step on a CPU.
        size, output = self.hidden_size, self.output_size
        h0, c0 = initial_state[..., :output], initial_state[..., output:]
        previous_h = torch.cat((h0.unsqueeze(0), hidden[:-1]))
        rows = slice(0, 3 * size)  # (i, f, g); o is not needed
        weight = torch.cat((self.weight_ih[rows], self.weight_hh[rows]), dim=1)
        joined = torch.cat((inputs, previous_h), dim=-1).view(-1, weight.shape[1])
        if self.bias_ih is None:
            pre = joined @ weight.T
        else:
            pre = torch.addmm(self.bias_ih[rows] + self.bias_hh[rows], joined, weight.T)
        i, f, g = pre.view(*hidden.shape[:2], 3 * size).chunk(3, dim=-1)
        forget = torch.sigmoid(f)
        update = torch.sigmoid(i).mul_(torch.tanh(g))
        if hidden.device.type == "cuda" if scan is None else scan:
            memory = linear_recurrence(forget, update, c0)
        else:
            memory = torch.empty_like(update)
            state = c0
            for t in range(update.shape[0]):
                state = torch.addcmul(update[t], forget[t], state, out=memory[t])
        return torch.cat((hidden, memory), dim=-1)

    def step(self, state: Tensor, projected_input: Tensor) -> Tensor:
        output = self.output_size
        h, c = state[..., :output], state[..., output:]
        gates = self.preactivation(h, projected_input)
        i, f, g, o = gates.chunk(4, dim=-1)
        c_next = torch.addcmul(torch.sigmoid(f) * c, torch.sigmoid(i), torch.tanh(g))
        h_next = self._project(torch.sigmoid(o) * torch.tanh(c_next))
        return torch.cat((h_next, c_next), dim=-1)

    def jacobian(self, state: Tensor, projected_input: Tensor) -> Tensor:
        # Rows of m = o ⊙ tanh(c') (the output before the projection), then h' = W_hr m.
        dm_dh, dm_dc, dc_dh, dc_dc = self._blocks(
            state, projected_input, self.gate_weights(), lambda v, w: v.unsqueeze(-1) * w
        )
        top = torch.cat((dm_dh, torch.diag_embed(dm_dc)), dim=-1)
        bottom = torch.cat((dc_dh, torch.diag_embed(dc_dc)), dim=-1)
        if self.weight_hr is not None:
            top = self.weight_hr @ top
        return torch.cat((top, bottom), dim=-2)

    def unit_jacobian(self, state: Tensor, projected_input: Tensor) -> Tensor:
        if self.weight_hr is not None:
            return self._projected_diagonal(*self._factors(state, projected_input))
        # The diagonals of the four blocks of jacobian(), stacked per unit as [[hh, hc], [ch, cc]].
        weights = tuple(w.diagonal() for w in self.gate_weights())
        dh_dh, dh_dc, dc_dh, dc_dc = self._blocks(state, projected_input, weights, lambda v, w: v * w)
        top = torch.stack((dh_dh, dh_dc), dim=-1)
        bottom = torch.stack((dc_dh, dc_dc), dim=-1)
        return torch.stack((top, bottom), dim=-2)

    def _projected_diagonal(
        self, u_i: Tensor, u_f: Tensor, u_g: Tensor, u_o: Tensor, through_c: Tensor, f: Tensor
    ) -> Tensor:
        """The diagonal of a projected cell's ``∂f/∂s``, ``(..., P + H)``, without the matrices:
        ``(W_hr ∂m/∂h)_jj = Σ_k W_hr[j, k] (∂m/∂h)[k, j]`` with ``∂m/∂h = Σ_gates diag(coefficient) W_gate``,
        one product of the coefficients ``(..., 4H)`` with ``W_hh ⊙ [W_hrᵀ; W_hrᵀ; W_hrᵀ; W_hrᵀ]``; then ``f``."""
        coefficients = torch.cat((through_c * u_i, through_c * u_f, through_c * u_g, u_o), dim=-1)
        mixing = self.weight_hh * self.weight_hr.T.repeat(4, 1)
        return torch.cat((coefficients @ mixing, f), dim=-1)

    def linearization(self, state: Tensor, projected_input: Tensor) -> tuple[Tensor, ...]:
        *scalings, through_c, f = self._factors(state, projected_input)
        return torch.cat(scalings, dim=-1), through_c, f

    def transposed_jacobian_product(self, factors: tuple[Tensor, ...], vector: Tensor) -> Tensor:
        # With v_m = W_hrᵀ v_h (v_h without a projection) and m = o(1−tanh²c') ⊙ v_m + v_c (what
        # reaches c'), from the blocks of _blocks:
        # (Jᵀv)_h = W_hᵀ [u_i ⊙ m; u_f ⊙ m; u_g ⊙ m; u_o ⊙ v_m],  (Jᵀv)_c = f ⊙ m.
        scalings, through_c, f = factors
        output = self.output_size
        v_h, v_c = vector[..., :output], vector[..., output:]
        v_m = v_h if self.weight_hr is None else v_h @ self.weight_hr
        reaching_c = torch.addcmul(v_c, through_c, v_m)
        multipliers = torch.stack((reaching_c, reaching_c, reaching_c, v_m), dim=-2).flatten(-2)
        return torch.cat(((scalings * multipliers) @ self.weight_hh, f * reaching_c), dim=-1)

    def jacobian_product(self, factors: tuple[Tensor, ...], vector: Tensor) -> Tensor:
        # (Jv)_c = Σ_{k∈i,f,g} u_k ⊙ (W_hk v_h) + f ⊙ v_c,  (Jv)_h = W_hr [u_o ⊙ (W_ho v_h) + o(1−tanh²c') ⊙ (Jv)_c].
        scalings, through_c, f = factors
        output = self.output_size
        v_h, v_c = vector[..., :output], vector[..., output:]
        i_part, f_part, g_part, o_part = (scalings * (v_h @ self.weight_hh.T)).chunk(4, dim=-1)
        c_part = torch.addcmul(i_part + f_part + g_part, f, v_c)
        return torch.cat((self._project(torch.addcmul(o_part, through_c, c_part)), c_part), dim=-1)

    def _factors(self, state: Tensor, projected_input: Tensor) -> tuple[Tensor, ...]:
        """``(u_i, u_f, u_g, u_o, o(1−tanh²c'), f)``: the row scalings of the gate blocks of
        ``W_hh`` in ``∂c'/∂h = Σ_{k∈i,f,g} diag(u_k) W_hk`` and ``∂m/∂h``'s ``diag(u_o) W_ho``
        (``m = o ⊙ tanh c'``, the output before any projection), the factor through which ``c'``
        reaches ``m``, and the forget gate."""
        c = self.cell_of(state)
        i, f, g, o = self._activated_gates(state, projected_input)
        return self._factors_of_gates(c, i, f, g, o, torch.tanh(f * c + i * g))

    def _activated_gates(self, state: Tensor, projected_input: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(σ(i), σ(f), tanh(g), σ(o))`` at ``(s, x)``, from one product with ``W_hh``."""
        i, f, g, o = self.preactivation(self.hidden_of(state), projected_input).chunk(4, dim=-1)
        return torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)

    @staticmethod
    def _factors_of_gates(c: Tensor, i: Tensor, f: Tensor, g: Tensor, o: Tensor, tanh_c: Tensor) -> tuple[Tensor, ...]:
        return g * i * (1 - i), c * f * (1 - f), i * (1 - g**2), tanh_c * o * (1 - o), o * (1 - tanh_c**2), f

    def _image_and_unit_jacobian(self, state: Tensor, projected_input: Tensor) -> tuple[Tensor, Tensor]:
        c = self.cell_of(state)
        i, f, g, o = self._activated_gates(state, projected_input)
        c_next = torch.addcmul(f * c, i, g)
        tanh_c = torch.tanh(c_next)
        u_i, u_f, u_g, u_o, through_c, f = self._factors_of_gates(c, i, f, g, o, tanh_c)
        if self.weight_hr is not None:
            image = torch.cat((self._project(o * tanh_c), c_next), dim=-1)
            return image, self._projected_diagonal(u_i, u_f, u_g, u_o, through_c, f)
        w_i, w_f, w_g, w_o = (w.diagonal() for w in self.gate_weights())
        dc_dh = torch.addcmul(torch.mul(u_f, w_f).addcmul_(u_i, w_i), u_g, w_g)
        dh_dh = torch.addcmul(u_o * w_o, through_c, dc_dh)
        blocks = torch.stack((torch.stack((dh_dh, through_c * f), -1), torch.stack((dc_dh, f), -1)), -2)
        return torch.cat((o * tanh_c, c_next), dim=-1), blocks

    def _blocks(
        self, state: Tensor, projected_input: Tensor, weights: tuple[Tensor, ...], scale: Callable[[Tensor, Tensor], Tensor]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(∂m/∂h, diag ∂m/∂c, ∂c'/∂h, diag ∂c'/∂c)`` for ``m = o ⊙ tanh c'`` (``h' = m``, or
        ``W_hr m`` with a projection); ``scale(v, W)`` is ``diag(v) W`` for the full Jacobian and
        ``v ⊙ diag(W)`` for its per-unit part, given the matching ``weights``.

        ∂c'/∂h = diag(c f(1−f)) W_hf + diag(g i(1−i)) W_hi + diag(i(1−g²)) W_hg,  ∂c'/∂c = diag(f)
        ∂m/∂h = diag(tanh(c') o(1−o)) W_ho + diag(o(1−tanh²c')) ∂c'/∂h,  ∂m/∂c = diag(o(1−tanh²c') f)
        """
        u_i, u_f, u_g, u_o, through_c, f = self._factors(state, projected_input)
        w_i, w_f, w_g, w_o = weights
        dc_dh = scale(u_f, w_f) + scale(u_i, w_i) + scale(u_g, w_g)
        dh_dh = scale(u_o, w_o) + scale(through_c, dc_dh)
        return dh_dh, through_c * f, dc_dh, f


CELL_TYPES: dict[str, type[Cell]] = {"elman": ElmanCell, "gru": GRUCell, "lstm": LSTMCell}
