"""Linear recurrences ``y_t = A_t y_{t−1} + b_t``: a sequential reference and a parallel scan.

Both functions take the same arguments and return the same ``(T, B, S)`` tensor.  ``A`` comes in
three structures, told apart by its shape:

- ``"diagonal"``: ``A (T, B, S)``, ``A_t y = A_t ⊙ y``;
- ``"block2"``: ``A (T, B, S/2, 2, 2)``: 2×2 blocks on the pairs ``(y_j, y_{j + S/2})`` — the
  per-unit ``(h_j, c_j)`` blocks of an LSTM state ``[h, c]``;
- ``"dense"``: ``A (T, B, S, S)``.

The parallel version is a Hillis–Steele scan over the pairs ``(A, b)`` with the associative
composition ``(A_2, b_2) ∘ (A_1, b_1) = (A_2 A_1, A_2 b_1 + b_2)``: ``⌈log₂ T⌉`` rounds of
batched products, any ``T``.  ``reverse=True`` runs ``y_t = A_t y_{t+1} + b_t`` from the end
(``y_{T+1} = y0``), the form of an adjoint recurrence.  ``chunk`` bounds memory: the sequence is
scanned in chunks of that length, each started from the last state of the one before.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from fixedpoint.errors import InputError

Structure = Literal["diagonal", "block2", "dense"]


def structure_of(transitions: Tensor, values: Tensor) -> Structure:
    """The structure of ``A`` from the shapes of ``A`` and ``b (T, B, S)``."""
    if values.dim() != 3:
        raise InputError(f"b must have shape (T, B, S), got {tuple(values.shape)}")
    steps, batch, size = values.shape
    shape = tuple(transitions.shape)
    if shape == (steps, batch, size):
        return "diagonal"
    if shape == (steps, batch, size, size):
        return "dense"
    if size % 2 == 0 and shape == (steps, batch, size // 2, 2, 2):
        return "block2"
    raise InputError(
        f"A has shape {shape}; with b of shape {tuple(values.shape)} expected (T, B, S) diagonal, "
        f"(T, B, S/2, 2, 2) 2×2 blocks or (T, B, S, S) dense"
    )


def apply_transitions(transitions: Tensor, vectors: Tensor, structure: Structure) -> Tensor:
    """``A y`` for matching leading shapes: ``(..., [S | S/2,2,2 | S,S])`` and ``(..., S)``."""
    if structure == "diagonal":
        return transitions * vectors
    if structure == "dense":
        return (transitions @ vectors.unsqueeze(-1)).squeeze(-1)
    # 2×2 blocks written out: batched 2×2 matmuls are many times slower than four products.
    half = vectors.shape[-1] // 2
    first, second = vectors[..., :half], vectors[..., half:]
    a = transitions
    return torch.cat(
        (a[..., 0, 0] * first + a[..., 0, 1] * second, a[..., 1, 0] * first + a[..., 1, 1] * second), dim=-1
    )


def _compose(later: Tensor, earlier: Tensor, structure: Structure) -> Tensor:
    """``A_later · A_earlier``."""
    if structure == "diagonal":
        return later * earlier
    if structure == "dense":
        return later @ earlier
    l00, l01, l10, l11 = later[..., 0, 0], later[..., 0, 1], later[..., 1, 0], later[..., 1, 1]
    e00, e01, e10, e11 = earlier[..., 0, 0], earlier[..., 0, 1], earlier[..., 1, 0], earlier[..., 1, 1]
    top = torch.stack((l00 * e00 + l01 * e10, l00 * e01 + l01 * e11), dim=-1)
    bottom = torch.stack((l10 * e00 + l11 * e10, l10 * e01 + l11 * e11), dim=-1)
    return torch.stack((top, bottom), dim=-2)


def _check(transitions: Tensor, values: Tensor, initial: Tensor) -> Structure:
    structure = structure_of(transitions, values)
    if tuple(initial.shape) != tuple(values.shape[1:]):
        raise InputError(f"y0 must have shape (B, S) = {tuple(values.shape[1:])}, got {tuple(initial.shape)}")
    if not (transitions.dtype == values.dtype == initial.dtype):
        raise InputError("A, b and y0 must share one dtype")
    return structure


def linear_recurrence_sequential(
    transitions: Tensor, values: Tensor, initial: Tensor, *, reverse: bool = False, chunk: int | None = None
) -> Tensor:
    """Reference: ``y_t = A_t y_{t−1} + b_t`` one step after another; ``(T, B, S)``."""
    structure = _check(transitions, values, initial)
    del chunk  # same signature as the parallel version; the loop needs no chunking
    order = range(values.shape[0] - 1, -1, -1) if reverse else range(values.shape[0])
    out = torch.empty_like(values)
    state = initial
    for t in order:
        state = apply_transitions(transitions[t], state, structure) + values[t]
        out[t] = state
    return out


def linear_recurrence(
    transitions: Tensor, values: Tensor, initial: Tensor, *, reverse: bool = False, chunk: int | None = None
) -> Tensor:
    """Parallel scan for ``y_t = A_t y_{t−1} + b_t`` (``y_0 = initial``); ``(T, B, S)``.

    Args:
        transitions: ``A``, diagonal ``(T, B, S)``, 2×2 blocks ``(T, B, S/2, 2, 2)`` or dense
            ``(T, B, S, S)``.
        values: ``b (T, B, S)``.
        initial: ``y_0 (B, S)``.
        reverse: run from ``t = T`` down to 1 with ``y_{T+1} = initial``.
        chunk: scan at most this many positions at a time (memory ``O(chunk)``, not ``O(T)``).
    """
    structure = _check(transitions, values, initial)
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise InputError(f"chunk must be a positive integer or None, got {chunk!r}")
    if reverse:
        return linear_recurrence(transitions.flip(0), values.flip(0), initial, chunk=chunk).flip(0)
    steps = values.shape[0]
    size = chunk or steps
    pieces = []
    state = initial
    for start in range(0, steps, size):
        piece = _scan(transitions[start : start + size], values[start : start + size], state, structure)
        pieces.append(piece)
        state = piece[-1]
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _scan(transitions: Tensor, values: Tensor, initial: Tensor, structure: Structure) -> Tensor:
    # Fold y_0 into the first value, then every prefix composition gives y_t = (A…A, b…)·[y_0]
    # with only the b-part needed: y_t = B_t where (A_t…A_1, B_t) is the composed pair.
    values = values.clone()
    values[0] = apply_transitions(transitions[0], initial, structure) + values[0]
    transitions = transitions.clone()
    offset = 1
    steps = values.shape[0]
    while offset < steps:
        # Right-hand sides are evaluated into new tensors before the in-place writes.
        new_b = apply_transitions(transitions[offset:], values[:-offset], structure) + values[offset:]
        if offset * 2 < steps:  # the last round needs no transitions
            transitions[offset:] = _compose(transitions[offset:], transitions[:-offset], structure)
        values[offset:] = new_b
        offset *= 2
    return values
