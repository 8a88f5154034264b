"""Process-wide settings for the package's own programs (the CLI, benchmarks, analysis).

Never applied on import: a library must not change its host process.
"""

from __future__ import annotations

import ctypes
import sys

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
