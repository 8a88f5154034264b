"""The models StarSaber is compared with: a Transformer encoder and ReZero.

Both take StarSaber's interface — ``(input_size, hidden_size, num_layers, num_heads, causal,
max_len, batch_first)`` and ``forward(inputs) → (output, layers)`` with ``(T, B, H)`` states
(``(B, T, H)`` with ``batch_first``) — so that a trainer can swap them.  The input is mapped to
width ``H`` by a linear layer plus a learned absolute position embedding (StarSaber has its
direct input path and relative positions instead).

- :class:`Transformer`: pre-LayerNorm encoder layers, multi-head self-attention and a
  feed-forward block of width ``4H`` (``torch.nn.TransformerEncoderLayer``, ``norm_first``).
- :class:`ReZero`: the same sublayers without LayerNorm, each residual branch scaled by a
  learned scalar that starts at 0 (Bachlechner et al., 2020): ``x ← x + α·f(x)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fixedpoint.errors import InputError
from fixedpoint.starsaber import check_key_padding_mask, check_model_sizes, check_sequence_inputs


class _Encoder(nn.Module):
    """Input embedding, the layer stack and the shared forward; subclasses name their block."""

    _block: type[nn.Module]

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        *,
        num_heads: int = 1,
        causal: bool = True,
        max_len: int = 512,
        dropout: float = 0.0,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        check_model_sizes(input_size, hidden_size, num_layers, num_heads, max_len)
        self.input_size, self.hidden_size, self.causal = input_size, hidden_size, causal
        self.max_len, self.batch_first = max_len, batch_first
        self.embed = nn.Linear(input_size, hidden_size)
        self.position = nn.Parameter(torch.zeros(max_len, hidden_size))
        nn.init.normal_(self.position, std=0.02)
        self.blocks = nn.ModuleList(self._block(hidden_size, num_heads, dropout) for _ in range(num_layers))

    def forward(self, inputs: Tensor, key_padding_mask: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """``inputs (T, B, I)`` (``(B, T, I)`` with ``batch_first``) → ``(output, layers)``;
        ``key_padding_mask (B, T)``: ``True`` at positions no query attends to."""
        check_sequence_inputs(inputs, self.input_size)
        states = inputs if self.batch_first else inputs.transpose(0, 1)  # (B, T, I)
        batch, steps = states.shape[:2]
        if steps > self.max_len:
            raise InputError(f"sequence length {steps} exceeds max_len {self.max_len}")
        if key_padding_mask is not None:
            check_key_padding_mask(key_padding_mask, batch, steps)
        states = self.embed(states) + self.position[:steps]
        # True: not attended; boolean like key_padding_mask (torch deprecates mixing the two kinds)
        mask = torch.ones(steps, steps, dtype=torch.bool, device=states.device).triu(1) if self.causal else None
        layers = []
        for block in self.blocks:
            states = block(states, mask, key_padding_mask)
            layers.append(states if self.batch_first else states.transpose(0, 1))
        return layers[-1], layers


class _TransformerBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            hidden_size, num_heads, 4 * hidden_size, dropout, batch_first=True, norm_first=True
        )

    def forward(self, states: Tensor, mask: Tensor | None, key_padding_mask: Tensor | None) -> Tensor:
        return self.layer(states, src_mask=mask, src_key_padding_mask=key_padding_mask, is_causal=mask is not None)


class Transformer(_Encoder):
    """Pre-LayerNorm Transformer encoder with a ``4H`` feed-forward block; see the module docstring."""

    _block = _TransformerBlock


class _ReZeroBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(hidden_size, num_heads, dropout=dropout, batch_first=True)
        self.feed_forward = nn.Sequential(
            nn.Linear(hidden_size, 4 * hidden_size), nn.ReLU(), nn.Dropout(dropout), nn.Linear(4 * hidden_size, hidden_size)
        )
        self.alpha = nn.Parameter(torch.zeros(()))  # ReZero: every block starts as the identity

    def forward(self, states: Tensor, mask: Tensor | None, key_padding_mask: Tensor | None) -> Tensor:
        attended, _ = self.attention(
            states, states, states, attn_mask=mask, key_padding_mask=key_padding_mask, need_weights=False
        )
        states = states + self.alpha * attended
        return states + self.alpha * self.feed_forward(states)


class ReZero(_Encoder):
    """Transformer sublayers without LayerNorm, residuals scaled by a zero-initialised ``α``."""

    _block = _ReZeroBlock
