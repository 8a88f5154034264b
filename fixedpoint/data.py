"""Input sequences for experiments."""

from __future__ import annotations

import torch
from torch import Tensor

from fixedpoint.network import check_seed


def gaussian_inputs(
    seq_len: int,
    batch: int,
    input_size: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Tensor:
    """``N(0, 1)`` inputs ``(T, B, I)``, drawn in float64 on the CPU so a seed means the same
    sequence on every device and dtype."""
    check_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(seq_len, batch, input_size, generator=generator, dtype=torch.float64)
    return sample.to(dtype=dtype, device=device)
