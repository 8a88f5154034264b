"""Shared helpers for the fixedpoint test suite.

Every random tensor comes from an explicit ``torch.Generator``; float64 unless a test says
otherwise.  The reference for every solve is ``torch.nn`` itself (``network.to_torch()``).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import Tensor

from fixedpoint import Network, NetworkSolution, SequenceSystem
from fixedpoint.compare import run_reference

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
    shape = (network.num_layers * network.num_directions, batch, network.hidden_size)
    h0 = scale * randn(*shape, seed=seed, dtype=network.dtype)
    if network.kind == "lstm":
        return h0, scale * randn(*shape, seed=seed + 1, dtype=network.dtype)
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

    def permuted_sequential(self: SequenceSystem, kernel: str = "loop") -> Tensor:
        order = _state_order(self.cell)
        other = SequenceSystem(_permuted_cell(self.cell), self.inputs, self.initial_state[:, order])
        return loop(other, kernel)[..., torch.argsort(order)]

    SequenceSystem.sequential = permuted_sequential  # type: ignore[method-assign]


def _unit_order(hidden: int) -> Tensor:
    return torch.randperm(hidden, generator=generator(7919 + hidden))


def _state_order(cell: Any) -> Tensor:
    order = _unit_order(cell.hidden_size)
    return torch.cat((order, order + cell.hidden_size)) if cell.state_size > cell.hidden_size else order


def _permuted_cell(cell: Any, input_order: Tensor | None = None) -> Any:
    """The same cell with its hidden units (every gate's rows, ``W_hh``'s columns) reordered."""
    hidden = cell.hidden_size
    order = _unit_order(hidden)
    rows = torch.cat([order + gate * hidden for gate in range(cell.weight_hh.shape[0] // hidden)])
    weight_ih = cell.weight_ih[rows] if input_order is None else cell.weight_ih[rows][:, input_order]
    changes = {"weight_ih": weight_ih, "weight_hh": cell.weight_hh[rows][:, order]}
    if cell.bias_ih is not None:
        changes.update(bias_ih=cell.bias_ih[rows], bias_hh=cell.bias_hh[rows])
    return cell.with_tensors(**changes)


def _permuted_reference(network: Network, inputs: Tensor, hx: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    hidden, directions = network.hidden_size, network.num_directions
    order = _unit_order(hidden)
    layer_input_order = None
    cells = []
    for layer in network.cells:  # layer l + 1 reads layer l's permuted outputs
        cells.append([_permuted_cell(cell, layer_input_order) for cell in layer])
        layer_input_order = torch.cat([order + d * hidden for d in range(directions)])
    if hx is not None:
        hx = tuple(part[..., order] for part in hx) if isinstance(hx, tuple) else hx[..., order]
    output, h_n, c_n = run_reference(Network(cells, batch_first=network.batch_first).to_torch(), inputs, hx)
    inverse = torch.argsort(order)
    output_inverse = torch.cat([inverse + d * hidden for d in range(directions)])
    return output[..., output_inverse], h_n[..., inverse], None if c_n is None else c_n[..., inverse]


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


# -- what the problem's conditioning allows (derivation: docs/testing.md §1) -----------------
#: Unit roundoff ``u`` per dtype.
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24}


def propagated_bound(system: Any, states: Tensor, local: Tensor) -> Tensor:
    """``(T, B)``: ``Σ_{k ≤ t} ‖J_t ⋯ J_{k+1}‖₂ · local_k``.

    To first order this bounds ``‖e_t‖₂`` for any ``e_t = J_t e_{t−1} + δ_t`` with ``e_0 = 0`` and
    ``‖δ_k‖₂ ≤ local_k``, ``J_t`` the Jacobian of ``f`` along ``states (T, B, S)``: how far
    per-step errors (rounding, a residual) can move the solution.  The products are formed
    exactly (``O(T²)`` small matrix products, in float64), not as products of norms: on expanding
    or chaotic cells the per-step norms multiply to vacuous numbers while the products do not.
    """
    wide = states.double()
    cell = system.cell.to(dtype=torch.float64)
    previous = torch.cat((system.initial_state.double().unsqueeze(0), wide[:-1]))
    jacobians = cell.jacobian(previous, cell.input_projection(system.inputs.double()))  # (T, B, S, S)
    steps, batch, size = wide.shape
    identity = torch.eye(size, dtype=torch.float64).expand(1, batch, size, size)
    products = wide.new_zeros(0, batch, size, size)  # J_{t}⋯J_{k+1} for k = 0 … t
    bound = wide.new_empty(steps, batch)
    local = local.double()
    for t in range(steps):
        products = torch.cat((jacobians[t] @ products, identity))
        bound[t] = (torch.linalg.matrix_norm(products, ord=2) * local[: t + 1]).sum(0)
    return bound


def rounding_local(system: Any, states: Tensor) -> Tensor:
    """``(T, B)``: a first-order bound on the rounding of one step ``s_t = f(s_{t−1}, x_t)`` in
    the states' dtype, ``c·u·(‖|J_t|·|s_{t−1}|‖₂ + ‖s_t‖₂ + ‖p_t‖₂)`` with ``c = S + 8``.

    The recurrent product ``W_hh s`` of length ``S`` rounds by at most ``γ_S·|W_hh||s|``, which the
    cell's derivative maps to ``|J||s|`` (exactly so for Elman; for the gated cells a model);
    adding the projected input ``p_t`` and the elementwise gate arithmetic (at most 8 operations
    per unit, the LSTM's) round by a few ``u`` of ``|p_t|`` and ``|s_t|``.  Two evaluations that differ only in
    rounding (a batched product against a per-step one, one CPU's GEMM against another's) each
    stay within :func:`propagated_bound` of this from the exact solution.
    """
    wide = states.double()
    cell = system.cell.to(dtype=torch.float64)
    projected = cell.input_projection(system.inputs.double())
    previous = torch.cat((system.initial_state.double().unsqueeze(0), wide[:-1]))
    jacobians = cell.jacobian(previous, projected)
    recurrent = (jacobians.abs() @ previous.abs().unsqueeze(-1)).squeeze(-1)
    size = states.shape[-1]
    magnitude = recurrent.norm(dim=-1) + wide.norm(dim=-1) + projected.norm(dim=-1)
    return (size + 8) * UNIT_ROUNDOFF[states.dtype] * magnitude


def tolerance_local(states: Tensor, rtol: float, atol: float) -> Tensor:
    """``(T, B)``: ``‖atol + rtol·|s_t|‖₂``, the most a converged solve's residual may leave at ``t``."""
    return (atol + rtol * states.double().abs()).norm(dim=-1)


def position_errors(actual: Tensor, expected: Tensor) -> Tensor:
    """``(T, B)``: ``‖actual_t − expected_t‖₂`` per position and sample, in float64."""
    return (actual.double() - expected.double()).norm(dim=-1)
