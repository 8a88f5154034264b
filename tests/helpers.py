"""Helpers shared by the test suite, imported as ``helpers`` (``tests/`` is on the path).

Every random tensor comes from an explicit ``torch.Generator``; float64 unless a test says
otherwise.  The reference for every solve is ``torch.nn`` itself (``network.to_torch()``).
pytest's hooks (options, profiles, fixtures) live in ``conftest.py``, which imports this module.
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st
from torch import Tensor

from fixedpoint import Anderson, Network, NetworkSolution, Newton, Picard, QuasiNewton, Sequential, SequenceSystem
from fixedpoint.compare import run_reference
from fixedpoint.conditioning import (
    output_order,
    permute_hidden_units,
    permute_initial_state,
    restore_unit_order,
    unit_permutation,
)

#: ``(kind, nonlinearity)`` for every supported cell.
CELLS = [("elman", "tanh"), ("elman", "relu"), ("gru", "tanh"), ("lstm", "tanh")]
CELL_IDS = ["elman-tanh", "elman-relu", "gru", "lstm"]

#: Largest accepted max |diff| against torch.nn per dtype.
BOUNDS = {torch.float64: 1e-10, torch.float32: 1e-5}


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Standard normal draws from an explicit generator (drawn in float64, then cast)."""
    return torch.randn(*shape, generator=generator(seed), dtype=torch.float64).to(dtype)


def make_hx(network: Network, batch: int, *, seed: int, scale: float = 0.5) -> Tensor | tuple[Tensor, Tensor]:
    """A non-zero ``hx`` in ``torch.nn``'s layout: ``h_0`` or ``(h_0, c_0)`` for LSTM."""
    count = network.num_layers * network.num_directions
    h0 = scale * randn(count, batch, network.output_size, seed=seed, dtype=network.dtype)
    if network.kind == "lstm":  # c_0 has H units, h_0 P with a projection
        return h0, scale * randn(count, batch, network.hidden_size, seed=seed + 1, dtype=network.dtype)
    return h0


def reference(network_or_module: Any, inputs: Tensor, hx: Any = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run ``torch.nn`` (``network.to_torch()`` or a given module): ``(output, h_n, c_n or None)``.

    With ``--permuted-reference`` a network runs with its hidden units permuted
    (:func:`use_permuted_reference`), as another machine would round it.
    """
    if isinstance(network_or_module, Network):
        if PERMUTED_REFERENCE:
            return _permuted_reference(network_or_module, inputs, hx)
        return run_reference(network_or_module.to_torch(), inputs, hx)
    return run_reference(network_or_module, inputs, hx)


def random_network(
    kind: str,
    nonlinearity: str = "tanh",
    *,
    input_size: int = 3,
    hidden_size: int = 4,
    seed: int = 1,
    dtype: torch.dtype = torch.float64,
    **options: Any,
) -> Network:
    """The suite's one network builder: ``Network.random`` (torch.nn's default initialisation
    from ``seed``) with small default sizes; ``options`` go to it (layers, scale, proj_size, …)."""
    return Network.random(kind, input_size, hidden_size, nonlinearity=nonlinearity, seed=seed, dtype=dtype, **options)


# -- another machine's rounding, on this one (docs/testing.md §3) --------------------------------
#: Set by ``--permuted-reference``: every reference runs on a copy of the network with its hidden
#: units permuted.
PERMUTED_REFERENCE = False


def use_permuted_reference() -> None:
    """Compute every reference (torch.nn and the sequential loop) with the hidden units permuted:
    the same mathematics summed in another order, as another CPU's GEMM rounds it."""
    global PERMUTED_REFERENCE
    PERMUTED_REFERENCE = True
    loop = SequenceSystem.sequential

    def permuted_sequential(self: SequenceSystem) -> Tensor:
        if getattr(self.cell, "weight_hr", None) is not None:  # projected LSTM: not permuted here
            return loop(self)
        order = _unit_order(self.cell.hidden_size)
        states = output_order(order, self.cell.state_size // self.cell.hidden_size)  # LSTM: (h, c) alike
        cell = permute_hidden_units(Network(((self.cell,),)), order).cells[0][0]
        other = SequenceSystem(cell, self.inputs, self.initial_state[:, states])
        return loop(other)[..., torch.argsort(states)]

    SequenceSystem.sequential = permuted_sequential  # type: ignore[method-assign]


def _unit_order(hidden: int) -> Tensor:
    return unit_permutation(hidden, seed=7919 + hidden)


def _permuted_reference(network: Network, inputs: Tensor, hx: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    if network.proj_size:  # projected LSTM: not permuted here
        return run_reference(network.to_torch(), inputs, hx)
    order = _unit_order(network.hidden_size)
    permuted = permute_hidden_units(network, order).to_torch()
    output, h_n, c_n = run_reference(permuted, inputs, permute_initial_state(hx, order))
    return restore_unit_order(output, h_n, c_n, order, network.num_directions)


def max_diff(solution: NetworkSolution, expected: tuple[Tensor, Tensor, Tensor | None]) -> float:
    """Largest ``|solution − torch.nn|`` over output, ``h_n`` and ``c_n``; shapes must agree."""
    output, h_n, c_n = expected
    assert solution.output.shape == output.shape, (solution.output.shape, output.shape)
    assert solution.h_n.shape == h_n.shape, (solution.h_n.shape, h_n.shape)
    assert solution.output.dtype == output.dtype
    pairs = [(solution.output, output), (solution.h_n, h_n)]
    if c_n is None:
        assert solution.c_n is None
    else:
        assert solution.c_n is not None and solution.c_n.shape == c_n.shape
        pairs.append((solution.c_n, c_n))
    for got, want in pairs:
        assert bool(torch.isfinite(want).all()), "the torch.nn reference itself is not finite"
        assert bool(torch.isfinite(got).all())
    return max(float((got - want).abs().max()) for got, want in pairs)


# -- hypothesis strategies and solver choices shared by several test files -----------------------
SOLVER_CHOICES = {
    "sequential": lambda: Sequential(),
    "picard": lambda: Picard(),
    "picard-damped": lambda: Picard(damping=0.5),
    "anderson": lambda: Anderson(),
    "newton": lambda: Newton(),
    "quasi-newton": lambda: QuasiNewton(),
    "damped-newton": lambda: Newton(damping="backtracking"),
    "anderson-m2-mix": lambda: Anderson(memory=2, mixing=0.7),
}


@st.composite
def solver_systems(draw, *, min_scale=0.5, max_scale=3.0, min_len=1, max_len=40, dtypes=(torch.float64,)):
    """A random :class:`SequenceSystem` (with a random non-zero s_0 half of the time)."""
    kind, nonlinearity = draw(st.sampled_from(CELLS))
    hidden = draw(st.integers(2, 8))
    inputs_size = draw(st.integers(1, 4))
    scale = draw(st.floats(min_scale, max_scale))
    steps = draw(st.integers(min_len, max_len))
    batch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = draw(st.sampled_from(dtypes))
    if nonlinearity == "relu" and dtype == torch.float32:
        dtype = torch.float64  # an expanding relu network may overflow float32 honestly
    network = Network.random(kind, inputs_size, hidden, nonlinearity=nonlinearity, scale=scale, seed=seed, dtype=dtype)
    cell = network.cells[0][0]
    inputs = randn(steps, batch, inputs_size, seed=seed + 1, dtype=dtype)
    initial = None
    if draw(st.booleans()):
        initial = 0.5 * randn(batch, cell.state_size, seed=seed + 2, dtype=dtype)
    return SequenceSystem.build(cell, inputs, initial)
