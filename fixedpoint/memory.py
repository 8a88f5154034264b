"""How much memory a piece of work needs, how much the device has, and a refusal before allocating.

Every estimate here is computed from sizes alone, before any tensor exists, so that an
impossible request (``T = 10⁹``, ``H = 10⁶``) is refused at once with the estimate instead of
failing deep inside torch's allocator after minutes.  The estimates count the large tensors of
each piece of work (sequences ``(T, B, ·)``, weights, attention maps) with the number of live
copies the code keeps, and are rounded up: they are meant to be within a small factor of the
peak, not exact.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from fixedpoint.errors import InputError

#: Gates per cell: rows of ``W_hh`` per hidden unit.
GATES = {"elman": 1, "gru": 3, "lstm": 4}

#: Live ``(T, B, S)`` buffers of each solver's working set, beside the projected inputs
#: ``(T, B, G·H)`` and the cell's gate temporaries (counted separately): the iterate, its image,
#: the difference and the tolerance of the termination test, plus the solver's own.
_SOLVER_STATE_BUFFERS = {
    "sequential": 2,
    "picard": 5,
    "auto": 8,  # quasi-Newton on CUDA, the fused kernel on a CPU: the larger of the two
    "anderson": 5 + 4 * 5,  # images and residuals of memory 5, and their differences
    "newton": 8,  # plus the dense Jacobians, which the solver itself chunks to fit (its memory guard)
    "quasi-newton": 8 + 4,  # the per-unit Jacobians (LSTM: 2×2 blocks) and the scan's pairs
    "damped": 10,
}


class MemoryEstimateError(InputError):
    """The work would need more memory than the device has (an :class:`InputError`).

    Attributes:
        needed: estimated bytes.
        available: bytes the device has free.
    """

    def __init__(self, what: str, needed: int, available: int) -> None:
        self.needed = needed
        self.available = available
        super().__init__(f"{what} needs about {format_bytes(needed)} of memory, and {format_bytes(available)} are available")


def format_bytes(count: int | float) -> str:
    """``1536 → '1.5 KiB'``; exact for small counts, three significant digits above."""
    if count < 1024:
        return f"{int(count)} B"
    exponent = min(int(math.log(count, 1024)), 6)
    return f"{count / 1024**exponent:.3g} {'KMGTPE'[exponent - 1]}iB"


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory the process can still allocate on ``device``, or ``None`` when unknown.

    CPU: the kernel's ``MemAvailable`` and, inside a container, what its cgroup limit leaves;
    CUDA: the free memory the driver reports.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    limits = [value for value in (_meminfo_available(), _cgroup_available()) if value is not None]
    if not limits:
        try:
            limits.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return min(limits)


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as lines:
            for line in lines:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available() -> int | None:
    """cgroup v2 ``memory.max − memory.current`` of this process's group, if limited."""
    try:
        with open("/sys/fs/cgroup/memory.max") as limit_file:
            limit = limit_file.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as current_file:
            current = int(current_file.read().strip())
        return max(int(limit) - current, 0)
    except (OSError, ValueError):
        return None


def check_fits(what: str, needed: int, device: torch.device | str = "cpu") -> None:
    """Raise :class:`MemoryEstimateError` when ``needed`` bytes exceed what ``device`` has free."""
    available = available_bytes(device)
    if available is not None and needed > available:
        raise MemoryEstimateError(what, needed, available)


@dataclass(frozen=True)
class NetworkShape:
    """The sizes of a stacked recurrent network, before it exists."""

    kind: str
    input_size: int
    hidden_size: int
    num_layers: int = 1
    num_directions: int = 1

    @property
    def parameters(self) -> int:
        """Weights and biases of every layer and direction, as ``torch.nn`` holds them."""
        rows = GATES[self.kind] * self.hidden_size
        total = 0
        for layer in range(self.num_layers):
            inputs = self.input_size if layer == 0 else self.num_directions * self.hidden_size
            total += self.num_directions * rows * (inputs + self.hidden_size + 2)
        return total

    @property
    def state_size(self) -> int:
        return (2 if self.kind == "lstm" else 1) * self.hidden_size


def solve_bytes(shape: NetworkShape, seq_len: int, batch: int, itemsize: int, solver: str = "auto") -> int:
    """Peak bytes of solving ``shape`` on ``(T, B, I)`` inputs and running ``torch.nn`` beside it.

    Two copies of the weights (the network and the ``torch.nn`` module), the inputs, the outputs
    of the last two layers for both sides, and one (layer, direction) solve's working set: the
    projected inputs, the gate temporaries and the solver's buffers (``_SOLVER_STATE_BUFFERS``);
    then the forward-error estimate's float64 correction, float64 copies of the states and the
    layer input, and the copy a refinement keeps to undo itself.
    """
    positions = seq_len * batch
    gate_width = GATES[shape.kind] * shape.hidden_size
    output_width = shape.num_directions * shape.hidden_size
    working = positions * (3 * gate_width + _SOLVER_STATE_BUFFERS.get(solver, 10) * shape.state_size)
    elements = (
        2 * shape.parameters
        + positions * shape.input_size
        + 4 * positions * output_width  # layer input and output, for the solve and for torch.nn
        + working
    )
    layer_input = max(shape.input_size, output_width)
    forward_error = positions * (8 * (2 * shape.state_size + layer_input) + itemsize * shape.state_size)
    return elements * itemsize + forward_error


def approx_bytes(
    kind: str, input_size: int, hidden_size: int, seq_len: int, samples: int, max_depth: int, num_heads: int
) -> int:
    """Peak bytes of :func:`fixedpoint.approx.run_approx` (float64): the teacher's exact solutions,
    ``K`` Jacobi sweeps, and the larger student's training: parameters with Adam's two moments,
    per layer activations and attention maps ``(B, heads, T, T)`` kept for the backward pass."""
    positions = seq_len * samples
    gates = GATES[kind]
    teacher = gates * hidden_size * (input_size + hidden_size + 2)
    student_parameters = max_depth * (4 * hidden_size * hidden_size + 2 * hidden_size * input_size)
    activations = max_depth * (positions * (8 * hidden_size + input_size) + 3 * samples * num_heads * seq_len * seq_len)
    sequences = positions * (input_size + (max_depth + 6) * gates * hidden_size)
    return 8 * (teacher + 2 * 4 * student_parameters + activations + sequences)


def train_bytes(
    input_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    seq_len: int,
    batch_size: int,
    samples: int,
    vocab_size: int | None,
) -> int:
    """Peak bytes of :func:`fixedpoint.train.fit` (float32): parameters with their gradient and
    AdamW's two moments, the data set, and one mini-batch's activations and attention maps."""
    embedding = 0 if vocab_size is None else vocab_size * input_size
    parameters = embedding + num_layers * 12 * hidden_size * (hidden_size + input_size)
    batch = min(batch_size, samples)
    activations = num_layers * (batch * seq_len * 16 * hidden_size + 3 * batch * num_heads * seq_len * seq_len)
    data = samples * seq_len * max(input_size if vocab_size is None else 1, 1)
    return 4 * (4 * parameters + activations + data)
