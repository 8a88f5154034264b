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

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from fixedpoint.errors import InputError

SUPPORTED_DTYPES = (torch.float32, torch.float64)


def check_floating(name: str, tensor: Tensor) -> None:
    """Raise :class:`InputError` unless ``tensor`` is a finite float32/float64 tensor."""
    if not isinstance(tensor, Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise InputError(
            f"{name} has dtype {tensor.dtype}; use float32 or float64 (convert with .double())"
        )
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise InputError(f"{name} contains {bad} NaN/Inf value(s); the system is undefined there")


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

    def __post_init__(self) -> None:
        check_floating("weight_hh", self.weight_hh)
        check_floating("weight_ih", self.weight_ih)
        if self.weight_hh.dim() != 2 or self.weight_ih.dim() != 2:
            raise InputError("weight_ih and weight_hh must be matrices")
        rows, hidden = self.weight_hh.shape
        if rows != self.gate_count * hidden:
            raise InputError(
                f"{self.kind} weight_hh has shape {tuple(self.weight_hh.shape)}; expected "
                f"({self.gate_count}·H, H) — is this the weight of another cell type?"
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
        return self.weight_hh.shape[1]

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

    def hidden_of(self, state: Tensor) -> Tensor:
        """The output part ``h`` of a state ``(..., S) → (..., H)``."""
        return state

    def gate_weights(self) -> tuple[Tensor, ...]:
        """The ``G`` recurrent blocks ``(H, H)`` of ``W_hh`` in ``torch.nn``'s gate order."""
        return tuple(self.weight_hh.split(self.hidden_size, dim=0))

    def with_tensors(self, **changes: Tensor | None) -> "Cell":
        """A copy with some tensors replaced (same cell type and options)."""
        fields = {k: getattr(self, k) for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        fields.update(changes)
        return self._rebuild(**fields)

    def _rebuild(self, **fields: Tensor | None) -> "Cell":
        return type(self)(**fields)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "Cell":
        """Convert every tensor to ``dtype`` / ``device``."""
        return self.with_tensors(
            **{
                k: None if getattr(self, k) is None else getattr(self, k).to(dtype=dtype, device=device)
                for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
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
        pre = self.preactivation(state, projected_input)
        slope = 1 - torch.tanh(pre) ** 2 if self.nonlinearity == "tanh" else (pre > 0).to(pre.dtype)
        return slope.unsqueeze(-1) * self.weight_hh


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
        # J = diag(z) + diag((1−z)(1−n²)r) W_hn + diag((1−z)(1−n²) q r(1−r)) W_hr + diag((h−n) z(1−z)) W_hz
        r, z, q, n = self.gates(state, projected_input)
        w_r, w_z, w_n = self.gate_weights()
        through_n = (1 - z) * (1 - n**2)
        return (
            torch.diag_embed(z)
            + (through_n * r).unsqueeze(-1) * w_n
            + (through_n * q * r * (1 - r)).unsqueeze(-1) * w_r
            + ((state - n) * z * (1 - z)).unsqueeze(-1) * w_z
        )


@dataclass(frozen=True, eq=False)
class LSTMCell(Cell):
    """``torch.nn.LSTM``: gates ``(i, f, g, o)``; state ``(h, c)`` stored as ``[h, c]``."""

    gate_count: ClassVar[int] = 4
    kind: ClassVar[str] = "lstm"

    @property
    def state_size(self) -> int:
        return 2 * self.hidden_size

    def hidden_of(self, state: Tensor) -> Tensor:
        return state[..., : self.hidden_size]

    def cell_of(self, state: Tensor) -> Tensor:
        """The memory part ``c`` of a state ``(..., 2H) → (..., H)``."""
        return state[..., self.hidden_size :]

    def step(self, state: Tensor, projected_input: Tensor) -> Tensor:
        hidden = self.hidden_size
        h, c = state[..., :hidden], state[..., hidden:]
        gates = self.preactivation(h, projected_input)
        i, f, g, o = gates.chunk(4, dim=-1)
        c_next = torch.addcmul(torch.sigmoid(f) * c, torch.sigmoid(i), torch.tanh(g))
        h_next = torch.sigmoid(o) * torch.tanh(c_next)
        return torch.cat((h_next, c_next), dim=-1)

    def jacobian(self, state: Tensor, projected_input: Tensor) -> Tensor:
        # Blocks, rows (h', c'), columns (h, c):
        #   ∂c'/∂h = diag(c f(1−f)) W_hf + diag(g i(1−i)) W_hi + diag(i(1−g²)) W_hg,  ∂c'/∂c = diag(f)
        #   ∂h'/∂h = diag(tanh(c') o(1−o)) W_ho + diag(o(1−tanh²c')) ∂c'/∂h,     ∂h'/∂c = diag(o(1−tanh²c') f)
        hidden = self.hidden_size
        h, c = state[..., :hidden], state[..., hidden:]
        i, f, g, o = self.preactivation(h, projected_input).chunk(4, dim=-1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        tanh_c = torch.tanh(f * c + i * g)
        w_i, w_f, w_g, w_o = self.gate_weights()
        dc_dh = (
            (c * f * (1 - f)).unsqueeze(-1) * w_f
            + (g * i * (1 - i)).unsqueeze(-1) * w_i
            + (i * (1 - g**2)).unsqueeze(-1) * w_g
        )
        through_c = o * (1 - tanh_c**2)
        dh_dh = (tanh_c * o * (1 - o)).unsqueeze(-1) * w_o + through_c.unsqueeze(-1) * dc_dh
        top = torch.cat((dh_dh, torch.diag_embed(through_c * f)), dim=-1)
        bottom = torch.cat((dc_dh, torch.diag_embed(f)), dim=-1)
        return torch.cat((top, bottom), dim=-2)


CELL_TYPES: dict[str, type[Cell]] = {"elman": ElmanCell, "gru": GRUCell, "lstm": LSTMCell}
