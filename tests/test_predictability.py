"""fixedpoint.predictability: the Lyapunov exponent against cases whose answer is known, and the
Picard prediction against observed iteration counts."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import CELL_IDS, CELLS, randn
from fixedpoint import InputError, Network, Picard, SequenceSystem, solve
from fixedpoint.cells import ElmanCell
from fixedpoint import compare
from fixedpoint.compare import check_network
from fixedpoint.predictability import MODEL, growth_rates, predictability


def diagonal_relu_system(rate: float, steps: int, batch: int = 2, hidden: int = 3) -> SequenceSystem:
    """relu Elman with W_hh = rate·I and positive drive: every state stays positive, so J_t = rate·I
    at every step and λ = log(rate) exactly."""
    cell = ElmanCell(torch.eye(hidden, dtype=torch.float64), rate * torch.eye(hidden, dtype=torch.float64),
                     None, None, nonlinearity="relu")
    inputs = 1.0 + randn(steps, batch, hidden, seed=1).abs()
    return SequenceSystem.build(cell, inputs)


@pytest.mark.parametrize("rate", [0.3, 0.9, 1.2])
def test_lyapunov_exponent_of_a_constant_jacobian_is_its_log(rate):
    system = diagonal_relu_system(rate, steps=80)
    found = predictability(system, system.sequential(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(found.growth, torch.full_like(found.growth, math.log(rate)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(found.lyapunov, torch.full((2,), math.log(rate), dtype=torch.float64))
    torch.testing.assert_close(found.memory_length, torch.full((2,), 1 / abs(math.log(rate)), dtype=torch.float64))
    torch.testing.assert_close(found.max_window_growth, torch.full((2,), rate**50, dtype=torch.float64))


@pytest.mark.parametrize("kind,nonlinearity", CELLS, ids=CELL_IDS)
def test_growth_is_the_renormalised_product_of_dense_jacobians(kind, nonlinearity):
    network = Network.random(kind, 3, 5, nonlinearity=nonlinearity, scale=2.0, seed=4)
    system = SequenceSystem.build(network.cells[0][0], randn(30, 2, 3, seed=5))
    states = system.sequential()
    previous = torch.cat((system.initial_state.unsqueeze(0), states[:-1]))
    jacobians = system.cell.jacobian(previous, system.projected_inputs)
    vector = torch.randn(2, system.cell.state_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    vector = vector / vector.norm(dim=-1, keepdim=True)
    expected = []
    for t in range(30):
        vector = (jacobians[t] @ vector.unsqueeze(-1)).squeeze(-1)
        expected.append(torch.log(vector.norm(dim=-1)))
        vector = vector / vector.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(growth_rates(system, states, seed=0, chunk=7), torch.stack(expected))


@pytest.mark.parametrize("rate", [0.3, 0.6, 0.9])
def test_picard_prediction_of_a_constant_jacobian(rate):
    """J = rate·I: k sweeps leave an error of exactly rate^k·|s*|, and the prediction is when that
    meets the tolerance.  The driver stops on the step |X^{k+1} − X^k| = rate^k·|x| instead, which
    is smaller by about (1 − rate): up to log(1/(1 − rate))/|log rate| iterations earlier."""
    system = diagonal_relu_system(rate, steps=400)
    observed = solve(system, Picard(), forward_error="off").stats.iterations
    found = predictability(system, system.sequential(), rtol=1e-12, atol=1e-12)
    slack = math.log(1 / (1 - rate)) / abs(math.log(rate))
    assert observed - 1 <= int(found.picard.max()) <= observed + slack + 1


@pytest.mark.parametrize("kind,nonlinearity", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_picard_prediction_is_within_two_of_the_observed_count(kind, nonlinearity, scale):
    """From the solved trajectory and from a 64-step prefix before solving (T = 400)."""
    network = Network.random(kind, 6, 12, nonlinearity=nonlinearity, scale=scale, seed=2)
    system = SequenceSystem.build(network.cells[0][0], randn(400, 3, 6, seed=3))
    solution = solve(system, Picard(), forward_error="off")
    observed = solution.stats.iterations
    after = predictability(system, solution.value, rtol=1e-12, atol=1e-12)
    before = predictability(system, rtol=1e-12, atol=1e-12, prefix=64)
    assert before.measured_steps == 64 and after.measured_steps == 400
    for found in (after, before):
        predicted = int(found.picard.max())
        assert observed / 2 <= predicted <= 2 * observed, (predicted, observed)
        assert int(found.predicted_iterations["picard"].max()) == predicted


def test_model_covers_every_cell_and_clamps_to_t():
    for kind in ("elman", "gru", "lstm"):
        predicted = MODEL.predict(torch.tensor([1, 10, 10_000]), 100, kind)
        assert set(predicted) == {"picard", "quasi-newton", "newton"}
        for counts in predicted.values():
            assert bool(((counts >= 1) & (counts <= 100)).all())
    with pytest.raises(InputError, match="no iteration model"):
        MODEL.predict(torch.tensor([3]), 10, "mingru")


def test_bad_arguments_are_refused():
    system = diagonal_relu_system(0.5, steps=10)
    with pytest.raises(InputError, match="prefix"):
        predictability(system, rtol=1e-12, atol=1e-12, prefix=0)
    with pytest.raises(InputError, match="states must have shape"):
        growth_rates(system, system.sequential()[:-1])


def test_the_calibration_study_runs_and_its_figure_shows_what_its_json_holds(tmp_path):
    """analysis/predictability.py --quick: every case has both predictions and the observed counts."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "analysis" / "predictability.py"
    subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path)], check=True, capture_output=True)
    data = json.loads((tmp_path / "predictability.json").read_text())
    assert (tmp_path / "predictability.png").stat().st_size > 0
    assert len(data["cases"]) == 16
    for case in data["cases"]:
        assert set(case["predicted"]) == set(case["predicted_prefix"]) == {"picard", "quasi-newton", "newton"}
        assert 1 <= case["predicted"]["picard"] <= case["seq_len"]


def test_a_given_prefix_of_states_is_the_same_as_solving_the_prefix():
    network = Network.random("gru", 4, 6, seed=3)
    system = SequenceSystem.build(network.cells[0][0], randn(300, 2, 4, seed=4))
    head = SequenceSystem(system.cell, system.inputs[:64], system.initial_state)
    given = predictability(system, head.sequential(), rtol=1e-12, atol=1e-12)
    solved = predictability(system, rtol=1e-12, atol=1e-12, prefix=64)
    assert given.measured_steps == solved.measured_steps == 64 and given.seq_len == 300
    torch.testing.assert_close(given.growth, solved.growth)
    assert torch.equal(given.picard, solved.picard)
    with pytest.raises(InputError, match="P ≤ T"):
        predictability(system, torch.zeros(301, 2, 6, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_a_step_that_kills_every_perturbation_restarts_the_direction():
    """relu with W_hh = 0.9·I and positive drive, except one step driven far below zero: there every
    unit is off, J_t = 0, g_t = −inf; the steps after it grow by log 0.9 again (a fresh direction,
    not a zero vector), and the exponent and predictions stay finite."""
    system = diagonal_relu_system(0.9, steps=80)
    inputs = system.inputs.clone()
    inputs[40] = -100.0
    system = SequenceSystem.build(system.cell, inputs)
    found = predictability(system, system.sequential(), rtol=1e-12, atol=1e-12)
    assert bool(torch.isneginf(found.growth[40]).all())
    others = torch.cat((found.growth[:40], found.growth[41:]))
    torch.testing.assert_close(others, torch.full_like(others, math.log(0.9)), rtol=1e-12, atol=1e-12)
    assert bool(torch.isfinite(found.lyapunov).all()) and bool((found.lyapunov < math.log(0.9)).all())
    assert bool(((found.picard >= 1) & (found.picard <= 80)).all())


def test_an_overflowed_trajectory_is_refused():
    system = diagonal_relu_system(0.5, steps=10)
    states = system.sequential()
    states[3, 0, 0] = float("inf")
    with pytest.raises(InputError, match="states must be finite"):
        predictability(system, states, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_check_observes_picard_only_when_it_is_predicted_to_stop_early(scale, monkeypatch):
    # Elman ×1 is predicted to stop early: the observation runs and is the count solve() gives
    # on the exact layer inputs.  Elman ×3 is predicted to need all T sweeps: on a T longer than
    # OBSERVE_UP_TO it is skipped, and observe=True runs it anyway.
    monkeypatch.setattr(compare, "OBSERVE_UP_TO", 100)
    network = Network.random("elman", 8, 8, scale=scale, seed=0, dtype=torch.float64)
    inputs = randn(120, 2, 8, seed=0)
    (check,) = check_network(network, inputs)
    predicted_early = int(check.predictability.picard.max()) < 120
    assert predicted_early == (scale == 1.0)
    system = SequenceSystem.build(network.cells[0][0], inputs)
    observed = solve(system, Picard(rtol=0.0, atol=1e-12))  # check's default float64 atol
    if predicted_early:
        assert check.picard_iterations == observed.stats.iterations < 120
    else:
        assert check.picard_iterations is None and check.observed_rate is None
        (forced,) = check_network(network, inputs, observe=True)
        assert forced.picard_iterations == observed.stats.iterations
    (skipped,) = check_network(network, inputs, observe=False)
    assert skipped.picard_iterations is None
    # The estimates are taken along the exact solution either way.
    torch.testing.assert_close(skipped.predictability.growth, check.predictability.growth, rtol=0, atol=0)
