"""fixedpoint.conditioning: the propagation bound, the linearised correction, the unit permutation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import CELL_IDS, CELLS, generator, make_hx, randn
from fixedpoint import InputError, Network, Picard, SequenceSystem, solve, solve_network
from fixedpoint.conditioning import (
    output_order,
    permute_hidden_units,
    position_errors,
    propagated_bound,
    rounding_local,
    tolerance_local,
    unit_permutation,
)
from fixedpoint.solvers import Sequential


def system_of(kind: str, nonlinearity: str, scale: float, seed: int, steps: int = 30, batch: int = 2) -> SequenceSystem:
    network = Network.random(kind, 3, 4, nonlinearity=nonlinearity, scale=scale, seed=seed)
    return SequenceSystem.build(network.cells[0][0], randn(steps, batch, 3, seed=seed + 1))


@settings(max_examples=25, deadline=None)
@given(cell=st.sampled_from(CELLS), scale=st.floats(0.25, 4.0), seed=st.integers(0, 10_000))
def test_propagated_bound_holds_for_every_error_sequence(cell, scale, seed):
    """e_t = J_t e_{t−1} + δ_t with ‖δ_k‖₂ = local_k, for random directions δ: ‖e_t‖₂ ≤ the bound
    (exactly, since e is the linear recurrence the bound is about), and the Frobenius variant is
    no smaller."""
    system = system_of(*cell, scale, seed)
    states = system.sequential()
    previous = torch.cat((system.initial_state.unsqueeze(0), states[:-1]))
    jacobians = system.cell.jacobian(previous, system.projected_inputs)
    local = torch.rand(states.shape[:2], generator=generator(seed), dtype=torch.float64)
    bound = propagated_bound(system, states, local)
    assert bool((propagated_bound(system, states, local, "fro") >= bound * (1 - 1e-12)).all())
    for trial in range(3):
        directions = torch.randn(states.shape, generator=generator(seed + 10 + trial), dtype=torch.float64)
        deltas = directions / directions.norm(dim=-1, keepdim=True) * local.unsqueeze(-1)
        error = torch.zeros_like(states[0])
        for t in range(states.shape[0]):
            error = (jacobians[t] @ error.unsqueeze(-1)).squeeze(-1) + deltas[t]
            assert bool((error.norm(dim=-1) <= bound[t] * (1 + 1e-10) + 1e-300).all())


def test_rounding_and_tolerance_locals():
    system = system_of("lstm", "tanh", 1.0, seed=2)
    states = system.sequential()
    double = rounding_local(system, states)
    single = rounding_local(system, states, torch.float32)
    assert double.shape == states.shape[:2] and bool((double > 0).all())
    torch.testing.assert_close(single / double, torch.full_like(double, 2.0**29))
    tolerance = tolerance_local(states, 1e-6, 1e-8)
    one = states[3, 1]  # the definition, at one position: ‖atol + rtol·|s_t|‖₂
    assert abs(float(tolerance[3, 1]) - sum((1e-8 + 1e-6 * abs(float(v))) ** 2 for v in one) ** 0.5) <= 1e-20
    assert float(position_errors(states, states).abs().max()) == 0.0


def test_bad_shapes_are_input_errors():
    system = system_of("elman", "tanh", 1.0, seed=1)
    states = system.sequential()
    with pytest.raises(InputError, match="states must have shape"):
        propagated_bound(system, states[:-1], torch.ones(29, 2))
    with pytest.raises(InputError, match="local must have shape"):
        propagated_bound(system, states, torch.ones(30, 3))
    with pytest.raises(InputError, match="norm"):
        propagated_bound(system, states, torch.ones(30, 2), "inf")
    with pytest.raises(InputError, match="dtype"):
        rounding_local(system, states, torch.float16)


@pytest.mark.parametrize("kind,nonlinearity", CELLS, ids=CELL_IDS)
def test_permuted_network_is_the_same_mathematics(kind, nonlinearity):
    """Two layers, both directions, an initial state: the permuted network's loop, put back in the
    original order, equals the original's to rounding (torch-default weights: well conditioned)."""
    network = Network.random(kind, 3, 5, nonlinearity=nonlinearity, num_layers=2, bidirectional=True, seed=4)
    inputs = randn(25, 2, 3, seed=5)
    hx = make_hx(network, 2, seed=6)
    order = unit_permutation(5, seed=11)
    assert not torch.equal(order, torch.arange(5)) and sorted(order.tolist()) == list(range(5))
    permuted_hx = tuple(part[..., order] for part in hx) if isinstance(hx, tuple) else hx[..., order]
    original = solve_network(network, inputs, hx, Sequential())
    permuted = solve_network(permute_hidden_units(network, order), inputs, permuted_hx, Sequential())
    back = torch.argsort(order)
    torch.testing.assert_close(permuted.output[..., torch.argsort(output_order(order, 2))], original.output,
                               rtol=0, atol=1e-13)
    torch.testing.assert_close(permuted.h_n[..., back], original.h_n, rtol=0, atol=1e-13)
    assert unit_permutation(1, seed=3).tolist() == [0]
