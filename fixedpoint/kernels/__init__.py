"""Fused Triton kernels for CUDA (the ``gpu`` extra), each beside its torch reference.

Nothing here imports Triton until a kernel is asked for, so the CPU path never needs it.  Every
kernel has the signature of the torch function it replaces, and a test compares the two (on a
CPU under ``TRITON_INTERPRET=1``, on CUDA for real).
"""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_available() -> bool:
    """Whether Triton is installed (it is imported only when a kernel runs)."""
    return importlib.util.find_spec("triton") is not None


def use_kernels(tensor: torch.Tensor, *operands: torch.Tensor | None) -> bool:
    """Whether the fused kernels serve a computation on ``tensor`` (and ``operands``): on CUDA
    when Triton is installed, unless autograd records it (the kernels have no backward) or
    ``FIXEDPOINT_KERNELS=torch`` asks for the torch reference everywhere."""
    if os.environ.get("FIXEDPOINT_KERNELS", "").lower() == "torch":
        return False
    if tensor.device.type != "cuda" or not triton_available():
        return False
    recorded = (tensor, *(t for t in operands if t is not None))
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in recorded))
