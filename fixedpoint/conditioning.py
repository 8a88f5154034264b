"""How far per-step errors can move a solution: first-order propagation through Jacobian products.

A solve's per-step errors — the rounding of each step, or the residual ``F(X) − X`` it leaves
when it stops by its tolerance — reach the solution through the products ``J_t ⋯ J_{k+1}`` of the
cell Jacobians along the trajectory (derivation: docs/testing.md §1–2).  These functions bound
that, to first order, from the products themselves (formed exactly, in float64), not from
products of per-step norms, which on expanding, chaotic or trained cells multiply to vacuous
numbers while the products do not.  They are first-order bounds around the given trajectory,
not certificates: :mod:`fixedpoint.contraction` holds those.  The estimate of one answer's
error (rather than a bound for every error of a given size) is :mod:`fixedpoint.forward_error`.

Cost: ``O(T²)`` products of ``S × S`` matrices per sample; meant for tests, the fuzz harness and
small studies, not for every solve.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from torch import Tensor

from fixedpoint.cells import Cell
from fixedpoint.errors import InputError
from fixedpoint.network import Network
from fixedpoint.system import SequenceSystem

#: Unit roundoff ``u`` per dtype.
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24}


@dataclass(frozen=True)
class Trajectory:
    """A trajectory ``states (T, B, S)`` of ``system`` and what its steps read, all in float64.

    Attributes:
        cell: the system's cell in float64.
        states: ``s_1 … s_T``, ``(T, B, S)``.
        previous: ``s_0 … s_{T−1}``, ``(T, B, S)``.
        projected: the projected inputs ``p_t``, ``(T, B, G·H)``.
    """

    cell: Cell
    states: Tensor
    previous: Tensor
    projected: Tensor

    @classmethod
    def of(cls, system: SequenceSystem, states: Tensor) -> "Trajectory":
        _, whole = next(cls.chunks(system, states, max(system.seq_len, 1)))
        return whole

    @classmethod
    def chunks(cls, system: SequenceSystem, states: Tensor, size: int) -> Iterator[tuple[int, "Trajectory"]]:
        """The trajectory in pieces of at most ``size`` positions, as ``(first position, piece)``:
        float64 temporaries bounded by ``size`` whatever ``T``; each piece's ``previous`` starts
        with the last state of the piece before (``s_0`` for the first)."""
        if tuple(states.shape) != system.state_shape:
            raise InputError(f"states must have shape {system.state_shape}, got {tuple(states.shape)}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise InputError(f"chunk must be a positive integer, got {size!r}")
        cell = system.cell.to(dtype=torch.float64)
        wide = states.detach().double()
        inputs = system.inputs.detach().double()
        last = system.initial_state.detach().double()
        for start in range(0, system.seq_len, size):
            block = wide[start : start + size]
            previous = torch.cat((last.unsqueeze(0), block[:-1]))
            yield start, cls(cell, block, previous, cell.input_projection(inputs[start : start + size]))
            last = block[-1]

    def jacobians(self) -> Tensor:
        """``J_t`` at every step, ``(T, B, S, S)``."""
        return self.cell.jacobian(self.previous, self.projected)

    def factors(self) -> tuple[Tensor, ...]:
        """The cell's :meth:`~fixedpoint.cells.Cell.linearization` at every step: ``J_t v`` and
        ``J_tᵀ v`` without the ``S × S`` matrices."""
        return self.cell.linearization(self.previous, self.projected)

    def image(self) -> Tensor:
        """``F(S)``, ``(T, B, S)``."""
        return self.cell.step(self.previous, self.projected)

    def residual(self) -> Tensor:
        """``F(S) − S``, ``(T, B, S)``."""
        return self.image() - self.states


def propagated_bound(
    system: SequenceSystem, states: Tensor, local: Tensor, norm: Literal["2", "fro"] = "2"
) -> Tensor:
    """``(T, B)``: ``Σ_{k ≤ t} ‖J_t ⋯ J_{k+1}‖ · local_k`` along ``states (T, B, S)``.

    To first order this bounds ``‖e_t‖₂`` for every ``e_t = J_t e_{t−1} + δ_t`` with ``e_0 = 0``
    and ``‖δ_k‖₂ ≤ local_k (T, B)``.  ``norm="2"`` takes each product's spectral norm (an SVD per
    product); ``"fro"`` its Frobenius norm, a cheaper upper bound (at most ``√S`` larger).
    """
    if norm not in ("2", "fro"):
        raise InputError(f"norm must be '2' or 'fro', got {norm!r}")
    trajectory = Trajectory.of(system, states)
    jacobians, previous = trajectory.jacobians(), trajectory.previous
    steps, batch, size = previous.shape
    if tuple(local.shape) != (steps, batch):
        raise InputError(f"local must have shape {(steps, batch)}, got {tuple(local.shape)}")
    local = local.detach().double()
    identity = torch.eye(size, dtype=torch.float64, device=previous.device).expand(1, batch, size, size)
    products = previous.new_zeros(0, batch, size, size)  # J_t ⋯ J_{k+1} for k = 0 … t
    bound = previous.new_empty(steps, batch)
    order = 2 if norm == "2" else "fro"
    for t in range(steps):
        products = torch.cat((jacobians[t] @ products, identity))
        bound[t] = (torch.linalg.matrix_norm(products, ord=order) * local[: t + 1]).sum(0)
    return bound


def rounding_local(system: SequenceSystem, states: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``(T, B)``: a first-order bound on the rounding of one step ``s_t = f(s_{t−1}, x_t)`` in
    ``dtype`` (default the states'): ``(S + 8)·u·(‖|J_t|·|s_{t−1}|‖₂ + ‖s_t‖₂ + ‖p_t‖₂)``.

    The recurrent product ``W_hh s`` of length ``S`` rounds by at most ``γ_S |W_hh||s|``, which
    the cell's slope maps to ``|J_t||s_{t−1}|`` (exactly so for Elman; a model for the gated
    cells); adding the projected input ``p_t`` and a step's elementwise arithmetic (at most 8
    operations per unit, the LSTM's) round by a few ``u`` of ``|p_t|`` and ``|s_t|``.
    """
    dtype = states.dtype if dtype is None else dtype
    if dtype not in UNIT_ROUNDOFF:
        raise InputError(f"dtype must be float32 or float64, got {dtype}")
    trajectory = Trajectory.of(system, states)
    recurrent = (trajectory.jacobians().abs() @ trajectory.previous.abs().unsqueeze(-1)).squeeze(-1)
    magnitude = recurrent.norm(dim=-1) + trajectory.states.norm(dim=-1) + trajectory.projected.norm(dim=-1)
    return (states.shape[-1] + 8) * UNIT_ROUNDOFF[dtype] * magnitude


def tolerance_local(states: Tensor, rtol: float, atol: float) -> Tensor:
    """``(T, B)``: ``‖atol + rtol·|s_t|‖₂``, the most residual a converged solve may leave at ``t``."""
    return (atol + rtol * states.detach().double().abs()).norm(dim=-1)


def position_errors(actual: Tensor, expected: Tensor) -> Tensor:
    """``(T, B)``: ``‖actual_t − expected_t‖₂`` per position and sample, in float64."""
    return (actual.detach().double() - expected.detach().double()).norm(dim=-1)


# -- the same mathematics, rounded in another order ------------------------------------------------
def unit_permutation(hidden: int, seed: int) -> Tensor:
    """A fixed permutation of ``hidden`` units from ``seed``; never the identity when ``hidden > 1``."""
    order = torch.randperm(hidden, generator=torch.Generator().manual_seed(seed))
    return order.roll(1) if hidden > 1 and bool((order == torch.arange(hidden)).all()) else order


def permute_hidden_units(network: Network, order: Tensor) -> Network:
    """The same network with the hidden units of every layer listed in ``order``: every gate's
    rows and ``W_hh``'s columns, and the next layer's input columns.

    The same mathematics summed in another order, so rounded as another machine's GEMM may round
    it: how far its answer moves from the original's is what rounding alone does on a problem.
    Its outputs ``(…, D·H)`` and states come back in the original order by indexing with
    :func:`output_order` and ``argsort(order)``.
    """
    hidden = network.hidden_size
    between = output_order(order, network.num_directions)  # a layer's output columns
    layers = []
    for index, layer in enumerate(network.cells):
        cells = []
        for cell in layer:
            rows = torch.cat([order + gate * hidden for gate in range(cell.weight_hh.shape[0] // hidden)])
            weight_ih = cell.weight_ih[rows] if index == 0 else cell.weight_ih[rows][:, between]
            changes = {"weight_ih": weight_ih, "weight_hh": cell.weight_hh[rows][:, order]}
            if cell.bias_ih is not None:
                changes.update(bias_ih=cell.bias_ih[rows], bias_hh=cell.bias_hh[rows])
            cells.append(cell.with_tensors(**changes))
        layers.append(tuple(cells))
    return Network(tuple(layers), batch_first=network.batch_first)


def output_order(order: Tensor, num_directions: int) -> Tensor:
    """The permutation of a layer's ``D·H`` output columns that ``order`` of the units induces."""
    hidden = order.numel()
    return torch.cat([order + direction * hidden for direction in range(num_directions)])


def permute_initial_state(hx: Tensor | tuple[Tensor, Tensor] | None, order: Tensor) -> Tensor | tuple[Tensor, Tensor] | None:
    """``hx`` in ``torch.nn``'s layout (``h_0`` or ``(h_0, c_0)``) for :func:`permute_hidden_units`."""
    if hx is None:
        return None
    return tuple(part[..., order] for part in hx) if isinstance(hx, tuple) else hx[..., order]


def restore_unit_order(
    output: Tensor, h_n: Tensor, c_n: Tensor | None, order: Tensor, num_directions: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """A permuted network's ``(output, h_n, c_n)`` put back in the original order of the units."""
    inverse = torch.argsort(order)
    output_inverse = torch.argsort(output_order(order, num_directions))
    return output[..., output_inverse], h_n[..., inverse], None if c_n is None else c_n[..., inverse]
