"""StarSaber: attention layers derived from the fixed-point equations of a recurrent network.

The recurrence ``h_i = φ(W_hh h_{i−1} + W_ih x_i + b)`` is the special case
``α_ij = 1[j = i − 1]`` of

    ``h_i = φ( Σ_{j<i} α_ij W_b h_j + Σ_{j>i} α_ij W_a h_j + U x_i + c )``,

where position 0 is a virtual position holding ``h_0`` and ``α_i·`` is a softmax over ``j ≠ i``
(``j < i`` when causal).  Jacobi (Picard) iteration on this system from ``H⁰ = 0`` is a stack of
layers; untying the weights per layer and stopping after ``K`` layers gives StarSaber: attention
whose values use ``W_b`` ("before") for earlier and ``W_a`` ("after") for later positions, a
direct path ``U x_i`` from the input into every layer, then ``φ``; no feed-forward block.  The
gated variant puts the attention aggregates where the GRU has ``h_{i−1}``.  docs/starsaber.md
writes down every choice the paper's abstract leaves open.

With ``attention="shift"`` and the weights of a cell tied into every layer
(:meth:`StarSaber.from_cell`), ``K`` layers are exactly ``K`` Jacobi sweeps of that cell.

Shapes: ``(T, B, ·)``, or ``(B, T, ·)`` with ``batch_first``, as ``torch.nn``'s recurrent modules.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as functional
from torch import Tensor, nn

from fixedpoint.cells import Cell, ElmanCell, GRUCell
from fixedpoint.errors import InputError
from fixedpoint.solvers.base import check_integer

Variant = Literal["elman", "gated"]
Attention = Literal["softmax", "shift"]
#: Logit given to every offset but −1 by the bridge initialisation with softmax attention:
#: ``e^{−20} ≈ 2·10⁻⁹`` of the weight stays off the shift.
SHIFT_LOGIT_GAP = 20.0


def check_model_sizes(input_size: int, hidden_size: int, num_layers: int, num_heads: int, max_len: int) -> None:
    """Raise :class:`InputError` unless the sizes of a sequence model are usable."""
    for name, value in (
        ("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers),
        ("num_heads", num_heads), ("max_len", max_len),
    ):
        check_integer(name, value)
    if hidden_size % num_heads:
        raise InputError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")


def check_sequence_inputs(inputs: object, input_size: int) -> None:
    """Raise :class:`InputError` unless ``inputs`` is a 3-D tensor with ``input_size`` features."""
    if not isinstance(inputs, Tensor) or inputs.dim() != 3:
        raise InputError(f"inputs must be a 3-D tensor (T, B, I) or (B, T, I), got {getattr(inputs, 'shape', inputs)}")
    if inputs.shape[-1] != input_size:
        raise InputError(f"inputs have {inputs.shape[-1]} features; this model takes input_size={input_size}")


def check_key_padding_mask(mask: object, batch: int, steps: int) -> None:
    """Raise :class:`InputError` unless ``mask`` is a boolean ``(B, T)`` tensor (``True``: padding)."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (batch, steps):
        raise InputError(
            f"key_padding_mask must be a bool tensor (B, T) = ({batch}, {steps}) with True at padding, "
            f"got {getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}"
        )


class StarSaberLayer(nn.Module):
    """One layer: attention over the previous layer's states (and ``h_0``), the direct input path,
    and the Elman or GRU nonlinearity.

    Args:
        input_size, hidden_size: ``I`` and ``H``.
        num_heads: attention heads; head ``m`` owns the units ``m·H/heads … (m+1)·H/heads − 1``.
        variant: ``"elman"`` (``φ``) or ``"gated"`` (GRU gates, ``W_b, W_a ∈ R^{3H×H}``).
        causal: attend to earlier positions only (then there is no ``W_a``).
        shared_position_matrix: ablation: one matrix for before and after (``W_a = W_b``).
        input_path: whether ``U x_i`` enters this layer (ablation: the first layer only).
        nonlinearity: ``φ`` of the Elman variant, ``"tanh"`` or ``"relu"``.
        attention: ``"softmax"`` (learned) or ``"shift"`` (``α_ij = 1[j = i − 1]``, the recurrence).
        max_len: longest sequence (size of the relative-position bias table).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        num_heads: int = 1,
        variant: Variant = "elman",
        causal: bool = True,
        shared_position_matrix: bool = False,
        input_path: bool = True,
        nonlinearity: str = "tanh",
        attention: Attention = "softmax",
        max_len: int = 512,
    ) -> None:
        super().__init__()
        check_model_sizes(input_size, hidden_size, 1, num_heads, max_len)
        if variant not in ("elman", "gated"):
            raise InputError(f"variant must be 'elman' or 'gated', got {variant!r}")
        if attention not in ("softmax", "shift"):
            raise InputError(f"attention must be 'softmax' or 'shift', got {attention!r}")
        if nonlinearity not in ("tanh", "relu") or (variant == "gated" and nonlinearity != "tanh"):
            raise InputError(f"nonlinearity must be 'tanh' or 'relu' (gated: 'tanh'), got {nonlinearity!r}")
        self.input_size, self.hidden_size, self.num_heads = input_size, hidden_size, num_heads
        self.variant, self.causal, self.attention, self.max_len = variant, causal, attention, max_len
        self.shared_position_matrix, self.input_path, self.nonlinearity = shared_position_matrix, input_path, nonlinearity
        gates = 3 if variant == "gated" else 1
        bound = 1 / math.sqrt(hidden_size)

        def uniform(*shape: int) -> nn.Parameter:  # torch.nn's recurrent initialisation
            return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))

        self.before = uniform(gates * hidden_size, hidden_size)  # W_b
        self.after = None if causal or shared_position_matrix else uniform(gates * hidden_size, hidden_size)  # W_a
        self.input_weight = uniform(gates * hidden_size, input_size) if input_path else None  # U
        self.bias = uniform(gates * hidden_size)  # c (gated: the b_i of the three gates)
        # gated: GRU's b_h; b_hn stays inside r ⊙ (W_hn h + b_hn)
        self.recurrent_bias = uniform(gates * hidden_size) if variant == "gated" else None
        if attention == "softmax":
            # queries and keys read the previous state and the input: the first layer sees H⁰ = 0
            self.query = nn.Linear(hidden_size + input_size, hidden_size, bias=False)
            self.key = nn.Linear(hidden_size + input_size, hidden_size, bias=False)
            self.position_bias = nn.Parameter(torch.zeros(num_heads, 2 * max_len + 1))  # offsets −L … L
        else:
            self.query = self.key = None
            self.position_bias = None

    @property
    def after_matrix(self) -> Tensor | None:
        """``W_a``: its own matrix, ``W_b`` when shared, ``None`` when causal."""
        if self.causal:
            return None
        return self.before if self.shared_position_matrix else self.after

    def weights(self, previous: Tensor, inputs: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``α (B, heads, T, T + 1)``: query positions ``1 … T`` over key positions ``0 … T``.

        ``previous (B, T + 1, H)`` holds ``h_0`` and the previous layer's states; ``inputs
        (B, T, I)``.  Keys at position 0 read the input as zero.  ``key_padding_mask (B, T)``:
        positions that no query attends to (``h_0`` always stays, so no row is empty).
        """
        batch, positions, _ = previous.shape
        steps = positions - 1
        query_position = torch.arange(1, positions, device=previous.device)[:, None]  # (T, 1)
        key_position = torch.arange(positions, device=previous.device)[None, :]  # (1, T + 1)
        if self.attention == "shift":
            alpha = (key_position == query_position - 1).to(previous.dtype)
            return alpha.expand(batch, self.num_heads, steps, positions)
        if steps > self.max_len:
            raise InputError(f"sequence length {steps} exceeds max_len {self.max_len}")
        padded = torch.cat((inputs.new_zeros(batch, 1, inputs.shape[-1]), inputs), dim=1)
        features = torch.cat((previous, padded), dim=-1)  # (B, T + 1, H + I)
        head = self.hidden_size // self.num_heads
        queries = self.query(features[:, 1:]).view(batch, steps, self.num_heads, head).transpose(1, 2)
        keys = self.key(features).view(batch, positions, self.num_heads, head).transpose(1, 2)
        logits = queries @ keys.transpose(-1, -2) / math.sqrt(head)  # (B, heads, T, T + 1)
        offsets = (key_position - query_position + self.max_len).clamp(0, 2 * self.max_len)
        logits = logits + self.position_bias[:, offsets]
        excluded = key_position >= query_position if self.causal else key_position == query_position
        if key_padding_mask is not None:  # (B, 1, 1, T + 1): h_0 at key position 0 is never padding
            padded_keys = torch.cat((key_padding_mask.new_zeros(batch, 1), key_padding_mask), dim=1)
            excluded = excluded | padded_keys[:, None, None, :]
        return torch.softmax(logits.masked_fill(excluded, float("-inf")), dim=-1)

    def forward(self, previous: Tensor, inputs: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """``previous (B, T + 1, H)`` (``h_0`` first), ``inputs (B, T, I)`` → ``(B, T, H)``;
        ``key_padding_mask (B, T)`` as in :meth:`weights`."""
        batch, positions, hidden = previous.shape
        steps = positions - 1
        heads, head = self.num_heads, hidden // self.num_heads
        alpha = self.weights(previous, inputs, key_padding_mask)
        query_position = torch.arange(1, positions, device=previous.device)[:, None]
        key_position = torch.arange(positions, device=previous.device)[None, :]

        def aggregate(weights: Tensor, matrix: Tensor) -> Tensor:
            """``Σ_j α_ij (M h_j)``, each head over its own units: ``(B, T, rows)``."""
            values = (previous @ matrix.T).view(batch, positions, -1, heads, head)  # (B, T+1, G, heads, d)
            out = torch.einsum("bmqk,bkgmd->bqgmd", weights, values)
            return out.reshape(batch, steps, -1)

        before = alpha * (key_position < query_position)
        recurrent = aggregate(before, self.before)
        after_matrix = self.after_matrix
        if after_matrix is not None:
            recurrent = recurrent + aggregate(alpha * (key_position > query_position), after_matrix)
        direct = self.bias if self.input_weight is None else functional.linear(inputs, self.input_weight, self.bias)
        if self.variant == "elman":
            pre = recurrent + direct
            return torch.tanh(pre) if self.nonlinearity == "tanh" else torch.relu(pre)
        # gated: GRU with h_{i−1} replaced by the aggregates (W_hh h → recurrent, h → its average)
        carried = torch.einsum(
            "bmqk,bkmd->bqmd", alpha, previous.view(batch, positions, heads, head)
        ).reshape(batch, steps, hidden)
        recurrent = recurrent + self.recurrent_bias
        r, z = torch.sigmoid(direct[..., : 2 * hidden] + recurrent[..., : 2 * hidden]).chunk(2, dim=-1)
        n = torch.tanh(direct[..., 2 * hidden :] + r * recurrent[..., 2 * hidden :])
        return n + z * (carried - n)


class StarSaber(nn.Module):
    """``num_layers`` StarSaber layers; see :class:`StarSaberLayer` for the options.

    ``forward(inputs, h0=None, key_padding_mask=None)`` → ``(output, layers)``: the last layer's
    states and the list of every layer's states, each ``(T, B, H)`` (``(B, T, H)`` with
    ``batch_first``).  ``h0 (B, H)`` is the virtual position 0 (zeros when ``None``).
    ``key_padding_mask (B, T)`` (``True``: padding) keeps softmax attention off padded positions,
    as in ``torch.nn.MultiheadAttention``; shift attention looks one position back only and
    ignores it.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        *,
        num_heads: int = 1,
        variant: Variant = "elman",
        causal: bool = True,
        shared_position_matrix: bool = False,
        input_every_layer: bool = True,
        nonlinearity: str = "tanh",
        attention: Attention = "softmax",
        max_len: int = 512,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        check_integer("num_layers", num_layers)
        self.batch_first = batch_first
        self.layers = nn.ModuleList(
            StarSaberLayer(
                input_size, hidden_size, num_heads=num_heads, variant=variant, causal=causal,
                shared_position_matrix=shared_position_matrix, input_path=input_every_layer or index == 0,
                nonlinearity=nonlinearity, attention=attention, max_len=max_len,
            )
            for index in range(num_layers)
        )

    @property
    def hidden_size(self) -> int:
        return self.layers[0].hidden_size

    @property
    def input_size(self) -> int:
        return self.layers[0].input_size

    def forward(
        self, inputs: Tensor, h0: Tensor | None = None, key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        check_sequence_inputs(inputs, self.input_size)
        batch_major = inputs if self.batch_first else inputs.transpose(0, 1)  # (B, T, I)
        batch, steps, _ = batch_major.shape
        if h0 is None:
            h0 = batch_major.new_zeros(batch, self.hidden_size)
        elif tuple(h0.shape) != (batch, self.hidden_size):
            raise InputError(f"h0 must have shape (B, H) = ({batch}, {self.hidden_size}), got {tuple(h0.shape)}")
        if key_padding_mask is not None:
            check_key_padding_mask(key_padding_mask, batch, steps)
        states = batch_major.new_zeros(batch, steps, self.hidden_size)  # H⁰ = 0, as Jacobi starts
        layers = []
        for layer in self.layers:
            states = layer(torch.cat((h0.unsqueeze(1), states), dim=1), batch_major, key_padding_mask)
            layers.append(states if self.batch_first else states.transpose(0, 1))
        return layers[-1], layers

    @classmethod
    def from_cell(
        cls,
        cell: Cell,
        num_layers: int,
        *,
        num_heads: int = 1,
        causal: bool = True,
        attention: Attention = "shift",
        max_len: int = 512,
        batch_first: bool = False,
    ) -> "StarSaber":
        """The bridge: ``cell``'s weights tied into every layer (Elman → ``"elman"``, GRU →
        ``"gated"``), ``W_a = 0``.  With ``attention="shift"`` the model equals ``num_layers``
        Jacobi sweeps of the cell; with ``"softmax"`` the position bias puts all but
        ``e^{−20}`` of the weight on the previous position: the initialisation for training."""
        if isinstance(cell, ElmanCell):
            variant, nonlinearity = "elman", cell.nonlinearity
        elif isinstance(cell, GRUCell):
            variant, nonlinearity = "gated", "tanh"
        else:
            raise InputError(f"the bridge exists for Elman and GRU cells, not {cell.kind}")
        model = cls(
            cell.input_size, cell.hidden_size, num_layers, num_heads=num_heads, variant=variant, causal=causal,
            nonlinearity=nonlinearity, attention=attention, max_len=max_len, batch_first=batch_first,
        ).to(dtype=cell.dtype, device=cell.device)
        with torch.no_grad():
            for layer in model.layers:
                layer.before.copy_(cell.weight_hh)
                if layer.after is not None:
                    layer.after.zero_()
                layer.input_weight.copy_(cell.weight_ih)
                bias_ih = torch.zeros_like(layer.bias) if cell.bias_ih is None else cell.bias_ih
                bias_hh = torch.zeros_like(layer.bias) if cell.bias_hh is None else cell.bias_hh
                if variant == "elman":
                    layer.bias.copy_(bias_ih + bias_hh)
                else:
                    layer.bias.copy_(bias_ih)
                    layer.recurrent_bias.copy_(bias_hh)
                if layer.position_bias is not None:
                    layer.query.weight.zero_()
                    layer.key.weight.zero_()
                    layer.position_bias.fill_(-SHIFT_LOGIT_GAP)
                    layer.position_bias[:, layer.max_len - 1] = 0.0  # offset −1: the previous position
        return model
