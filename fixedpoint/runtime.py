"""Process-wide settings for the package's own programs (the CLI, benchmarks, analysis), the
one setting the library itself scopes to its own calls (:func:`true_float32`), and the one way
everything here times work on a device (:func:`timed`).

Never applied on import: a library must not change its host process.
"""

from __future__ import annotations

import contextlib
import ctypes
import statistics
import sys
import time
from typing import Any, Callable, Iterator

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Ask glibc to keep large freed blocks for reuse instead of returning them to the OS.

    A parallel-in-time solve allocates temporaries of ``T·B·H`` elements every iteration; by
    default glibc maps each one fresh (``mmap``) and unmaps it on free, so every iteration pays
    page faults for memory it just released: at T = 8192, B = 16, H = 64 in float64 on a CPU
    that was 40 % of the solve.  Returns whether the setting took effect (glibc on Linux only).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))


@contextlib.contextmanager
def true_float32() -> Iterator[None]:
    """Within the block, float32 matrix products and cuDNN's recurrent kernels compute in float32,
    not TF32 (10-bit mantissa), whatever the process chose; restored afterwards.

    Torch lets CUDA float32 convolutions and cuDNN RNNs use TF32 by default (and matmuls when a
    program asks for it): an exactness claim in float32 and a benchmark against cuDNN both need
    both sides in true float32.  A no-op on a CPU.
    """
    saved = (torch.backends.cuda.matmul.allow_tf32, torch._C._get_cudnn_allow_tf32())
    torch.backends.cuda.matmul.allow_tf32 = False
    # Through torch._C, not torch.backends.cudnn.allow_tf32: a test harness may have frozen the
    # cudnn flags (torch.backends.cudnn.disable_global_flags, as torch's own test utilities do),
    # and this scoped switch, restored below, is what that freeze permits with flags().
    torch._C._set_cudnn_allow_tf32(False)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved[0]
        torch._C._set_cudnn_allow_tf32(saved[1])


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (a no-op on a CPU, whose work is done when a call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], Any], device: torch.device, repeats: int = 1, *, warm: bool = False) -> tuple[Any, float]:
    """``(value, seconds)``: the last value of ``function()`` and the median wall time of ``repeats``
    runs, each with ``device``'s queue drained before and after (CUDA runs asynchronously; without
    that a timer measures the launch, not the work).  ``warm``: one untimed run first (it compiles
    kernels, plans cuBLAS and fills the allocator's cache)."""
    if repeats < 1:
        raise ValueError(f"repeats must be ≥ 1, got {repeats}")
    if warm:
        function()
    times, value = [], None
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        value = function()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return value, statistics.median(times)
