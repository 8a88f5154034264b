"""Fused Triton kernels for CUDA (the ``gpu`` extra), each beside its torch reference.

Nothing here imports Triton until a kernel is asked for, so the CPU path never needs it.  Every
kernel has the signature of the torch function it replaces, and a test compares the two (on a
CPU under ``TRITON_INTERPRET=1``, on CUDA for real).

``FIXEDPOINT_KERNELS`` chooses the path: unset (or ``auto``), the kernels on CUDA; ``torch``, the
torch reference everywhere (to compare the two on one GPU); ``triton``, the kernels on every
device, which on a CPU means Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is
first imported): the whole CUDA code path of a solve, run and tested without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from fixedpoint.errors import InputError

CHOICES = ("auto", "torch", "triton")


def triton_available() -> bool:
    """Whether Triton is installed (it is imported only when a kernel runs)."""
    return importlib.util.find_spec("triton") is not None


def kernel_choice() -> str:
    """``FIXEDPOINT_KERNELS``, validated: ``"auto"`` (the default), ``"torch"`` or ``"triton"``."""
    choice = os.environ.get("FIXEDPOINT_KERNELS", "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise InputError(f"FIXEDPOINT_KERNELS must be one of {', '.join(CHOICES)}, got {choice!r}")
    return choice


def use_kernels(tensor: torch.Tensor, *operands: torch.Tensor | None) -> bool:
    """Whether the fused kernels serve a computation on ``tensor`` (and ``operands``): on CUDA
    when Triton is installed (everywhere with ``FIXEDPOINT_KERNELS=triton``), unless autograd
    records it (the kernels have no backward) or ``FIXEDPOINT_KERNELS=torch``."""
    choice = kernel_choice()
    if choice == "torch":
        return False
    recorded = (tensor, *(t for t in operands if t is not None))
    if torch.is_grad_enabled() and any(t.requires_grad for t in recorded):
        return False
    if choice == "triton":
        if not triton_available():
            raise InputError("FIXEDPOINT_KERNELS=triton needs Triton: install the gpu extra")
        if tensor.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise InputError(
                f"FIXEDPOINT_KERNELS=triton on {tensor.device.type} tensors runs Triton's interpreter: "
                "set TRITON_INTERPRET=1 before Triton is first imported, or unset FIXEDPOINT_KERNELS"
            )
        return True
    return tensor.device.type == "cuda" and triton_available()
