"""fixedpoint.approx and `fixedpoint approx`: invariants of the depth study, the CLI and its errors."""

from __future__ import annotations

import json

import pytest
import torch

from fixedpoint import InputError, Network
from fixedpoint.approx import ApproxSettings, distill, relative_error, run_approx, teacher_step_flops, train_student
from fixedpoint.cli import main
from fixedpoint.starsaber import StarSaber
from fixedpoint.system import SequenceSystem

TINY = ApproxSettings(depths=(1, 2, 6), seq_len=6, train_samples=8, test_samples=4, steps=2)
KEYS = {"depth", "starsaber_rel_error", "starsaber_random_init_rel_error", "jacobi_rel_error", "anderson_rel_error",
        "newton_rel_error", "banach_bound"}


@pytest.mark.parametrize("kind", ["elman", "gru"])
def test_depth_study_invariants(kind):
    cell = Network.random(kind, 3, 4, seed=1, scale=0.5).cells[0][0]
    result = run_approx(cell, TINY)
    rows = result["results"]
    assert [row["depth"] for row in rows] == [1, 2, 6] and KEYS <= set(rows[0])
    # T = 6 sweeps are exact (finite termination); so are 6 Anderson or Newton steps
    assert rows[-1]["jacobi_rel_error"] <= 1e-12
    assert rows[-1]["newton_rel_error"] <= 1e-12 and rows[-1]["anderson_rel_error"] <= 1e-12
    lipschitz = result["teacher"]["lipschitz_certified"]
    if kind == "elman":  # ‖0.5·W_hh‖ < 1: certified, and the bound must hold at every depth
        assert lipschitz is not None and lipschitz < 1
    for row in rows:
        if row["banach_bound"] is not None:
            assert row["jacobi_rel_error"] <= row["banach_bound"] * (1 + 1e-12)
        assert row["jacobi_flops_per_token"] == row["depth"] * teacher_step_flops(cell)
        assert row["starsaber_parameters"] > 0 and row["starsaber_flops_per_token"] > 0


def test_bridge_student_starts_at_the_jacobi_sweeps():
    # one Adam step with a vanishing learning rate leaves the bridge initialisation in place: its
    # error is that of K Jacobi sweeps, up to the e^−20 the softmax keeps off the shift
    cell = Network.random("gru", 3, 4, seed=2).cells[0][0]
    settings = ApproxSettings(depths=(1, 3), seq_len=10, train_samples=4, test_samples=4, steps=1, learning_rate=1e-300)
    for row in run_approx(cell, settings)["results"]:
        assert abs(row["starsaber_rel_error"] - row["jacobi_rel_error"]) <= 1e-6


def test_relative_error_is_the_max_norm_ratio():
    exact = torch.zeros(3, 2, 2, dtype=torch.float64)
    exact[1, 0] = torch.tensor([3.0, 4.0])  # largest state norm 5
    approximation = exact.clone()
    approximation[2, 1, 0] = 1.0
    assert relative_error(approximation, exact) == pytest.approx(0.2)


def test_bad_settings_and_teachers_are_refused():
    with pytest.raises(InputError, match="depths"):
        ApproxSettings(depths=())
    with pytest.raises(InputError, match="depth"):
        ApproxSettings(depths=(0, 1))
    with pytest.raises(InputError, match="learning_rate"):
        ApproxSettings(learning_rate=0.0)
    with pytest.raises(InputError, match="Elman or GRU"):
        run_approx(Network.random("lstm", 3, 4).cells[0][0], TINY)


def test_cli_json_has_one_entry_per_depth(capsys):
    code = main(["approx", "--cell", "gru", "--hidden", "4", "--depths", "1,2", "--seq-len", "5", "--train-samples", "4",
                 "--test-samples", "3", "--steps", "2", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert [row["depth"] for row in data["results"]] == [1, 2]
    assert KEYS <= set(data["results"][0])
    assert data["teacher"]["cell"] == "gru"


def test_cli_table_and_errors(capsys, tmp_path):
    code = main(["approx", "--cell", "elman", "--hidden", "4", "--depths", "1", "--seq-len", "4", "--train-samples", "4",
                 "--test-samples", "2", "--steps", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "StarSaber" in out and "Banach bound" in out
    assert main(["approx", "--cell", "lstm"]) == 2
    assert main(["approx", "--cell", "gru", "--depths", "0,1"]) == 2
    assert main(["approx"]) == 2
    assert "choose a teacher" in capsys.readouterr().err
    torch.save(torch.nn.GRU(3, 4, num_layers=2).state_dict(), tmp_path / "two.pt")
    assert main(["approx", "--weights", str(tmp_path / "two.pt"), "--depths", "1"]) == 2
    assert "one layer, one direction" in capsys.readouterr().err
    torch.save(torch.nn.LSTM(3, 4).state_dict(), tmp_path / "lstm.pt")
    assert main(["approx", "--weights", str(tmp_path / "lstm.pt"), "--depths", "1"]) == 2
    assert "LSTM teacher" in capsys.readouterr().err


def test_distill_trains_a_users_student_towards_the_teacher():
    cell = Network.random("elman", 3, 4, seed=2, dtype=torch.float64).cells[0][0]
    inputs = torch.randn(6, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    state = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))  # float32: moved to the teacher's dtype
    exact = SequenceSystem.build(cell, inputs, state.double()).sequential()
    torch.manual_seed(0)
    student = StarSaber(3, 4, 2, max_len=6)  # float32 and random: distill moves it to float64
    with torch.no_grad():
        before = relative_error(student.double()(inputs, state.double())[0], exact)
    after = distill(cell, student, inputs, ApproxSettings(steps=60, learning_rate=1e-2), initial_state=state)
    assert after < 0.5 * before
    with torch.no_grad():
        assert relative_error(student(inputs, state.double())[0], exact) == pytest.approx(after, rel=1e-12)


def test_mismatched_teacher_and_student_sizes_are_clear_errors():
    cell = Network.random("gru", 3, 4, seed=2, dtype=torch.float64).cells[0][0]
    inputs = torch.zeros(5, 2, 3, dtype=torch.float64)
    with pytest.raises(InputError, match="teacher and student sizes differ: the gru teacher has hidden_size=4, the student 6"):
        distill(cell, StarSaber(3, 6, 1, variant="gated"), inputs)
    with pytest.raises(InputError, match="input_size=3, the student 2"):
        distill(cell, StarSaber(2, 4, 1), inputs)
    with pytest.raises(InputError, match="time-major"):
        distill(cell, StarSaber(3, 4, 1, batch_first=True), inputs)
    with pytest.raises(InputError, match="must be a fixedpoint.starsaber.StarSaber"):
        distill(cell, torch.nn.GRU(3, 4), inputs)
    with pytest.raises(InputError, match="must be an Elman or GRU cell"):
        distill(Network.random("lstm", 3, 4).cells[0][0], StarSaber(3, 4, 1), inputs)
    with pytest.raises(InputError, match="initial_state must have shape"):
        distill(cell, StarSaber(3, 4, 1, variant="gated"), inputs, initial_state=torch.zeros(3, 4))
    with pytest.raises(InputError, match="this model takes input_size=3"):
        distill(cell, StarSaber(3, 4, 1), torch.zeros(5, 2, 7, dtype=torch.float64))
    student = StarSaber(3, 4, 1).double()
    with pytest.raises(InputError, match=r"target must have shape \(T, B, H\) = \(5, 2, 4\)"):
        train_student(student, inputs, torch.zeros(5, 2, 6, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64),
                      ApproxSettings(steps=1))
    with pytest.raises(InputError, match="initial_state must have shape"):
        train_student(student, inputs, torch.zeros(5, 2, 4, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64),
                      ApproxSettings(steps=1))
