"""Variable-length batches: each sample's system ends at its own length.

A batch padded at the end to ``T`` positions, with ``lengths (B,)`` real positions per sample, is
solved as the padded systems: positions are causal, so a sample's real positions never read its
padding.  What changes is where a sample ends — its final state is its state at position
``lengths[b]`` (:func:`last_states`) — and how the reverse direction runs: over each sample's own
positions backwards, its padding left at the end (:func:`reversed_within`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from fixedpoint.errors import InputError


def check_lengths(lengths: Tensor | Sequence[int], steps: int, batch: int, device: torch.device) -> Tensor:
    """``lengths`` as a ``(B,)`` int64 tensor on ``device``, each in ``1 … T``, or :class:`InputError`."""
    values = torch.as_tensor(lengths)
    if values.dim() != 1 or values.shape[0] != batch:
        raise InputError(f"lengths must have one entry per sample, ({batch},), got shape {tuple(values.shape)}")
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise InputError(f"lengths must be integers, got {values.dtype}")
    if batch and (int(values.min()) < 1 or int(values.max()) > steps):
        raise InputError(f"lengths must lie in 1 … T = {steps}, got {values.tolist()}")
    return values.to(device=device, dtype=torch.long)


def reversal_within(lengths: Tensor, steps: int) -> Tensor:
    """``(T, B)`` positions that run each sample's first ``lengths[b]`` positions backwards and
    leave its padding in place (an involution: applying it twice is the identity)."""
    positions = torch.arange(steps, device=lengths.device).unsqueeze(1)
    return torch.where(positions < lengths, lengths - 1 - positions, positions)


def reversed_within(sequence: Tensor, order: Tensor | None) -> Tensor:
    """``sequence (T, B, F)`` in reverse time: whole (``order`` None) or within each sample's
    length (``order`` from :func:`reversal_within`)."""
    if order is None:
        return sequence.flip(0)
    return sequence.gather(0, order.unsqueeze(-1).expand_as(sequence))


def last_states(states: Tensor, lengths: Tensor) -> Tensor:
    """``(B, S)``: each sample's state at its last real position, from ``states (T, B, S)``."""
    return states[lengths - 1, torch.arange(lengths.shape[0], device=lengths.device)]


def padding_mask(lengths: Tensor, steps: int) -> Tensor:
    """``(T, B, 1)`` bool: ``True`` at real positions, ``False`` at padding."""
    return (torch.arange(steps, device=lengths.device).unsqueeze(1) < lengths).unsqueeze(-1)
