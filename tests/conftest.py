"""Shared helpers for the fixedpoint test suite.

Every random tensor comes from an explicit ``torch.Generator``; float64 unless a test says
otherwise.  The reference for every solve is ``torch.nn`` itself (``network.to_torch()``).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

# Without a CUDA device the Triton kernels run in Triton's interpreter (on CPU tensors); the
# variable must be set before Triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings
from torch import Tensor

from fixedpoint import Network, NetworkSolution, SequenceSystem
from fixedpoint.compare import run_reference
from fixedpoint.conditioning import (
    output_order,
    permute_hidden_units,
    permute_initial_state,
    restore_unit_order,
    unit_permutation,
)

# Hypothesis profiles: "default" keeps the suite fast; HYPOTHESIS_PROFILE=thorough searches longer.
settings.register_profile("default", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

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

    With ``--permuted-reference`` a network runs with its hidden units permuted (see
    :func:`pytest_configure`), as another machine would round it.
    """
    if isinstance(network_or_module, Network):
        if _PERMUTED_REFERENCE:
            return _permuted_reference(network_or_module, inputs, hx)
        return run_reference(network_or_module.to_torch(), inputs, hx)
    return run_reference(network_or_module, inputs, hx)


# -- another machine's rounding, on this one (docs/testing.md §3) --------------------------------
_PERMUTED_REFERENCE = False


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--permuted-reference", action="store_true",
        help="compute every reference (torch.nn and the sequential loop) on a copy of the network with "
        "its hidden units permuted: the same mathematics summed in another order, as another CPU's GEMM "
        "rounds it; a test that then fails asserted one machine's rounding",
    )


def pytest_configure(config: pytest.Config) -> None:
    global _PERMUTED_REFERENCE
    if not config.getoption("--permuted-reference", default=False):
        return
    _PERMUTED_REFERENCE = True
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


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh, seeded generator for tests that draw their own tensors."""
    return generator(1234)

