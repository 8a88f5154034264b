"""`fixedpoint solve`: exit codes, JSON contract, files, and one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fixedpoint.cli import main

REQUIRED_KEYS = {
    "cell", "seq_len", "batch", "hidden", "layers", "dtype", "device", "solver", "converged",
    "iterations", "residual", "max_abs_diff", "solver_seconds", "reference_seconds", "residual_history",
    "forward_error_estimate", "torch_forward_error_estimate", "refinements",
}


def run_json(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, dict]:
    code = main(["solve", *argv, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


def run_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    code = main(["solve", *argv])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.mark.parametrize("cell", ["elman", "gru", "lstm"])
@pytest.mark.parametrize("solver", ["auto", "sequential", "picard", "anderson", "newton", "quasi-newton", "damped"])
def test_json_contract_and_exactness(capsys, cell, solver):
    code, report = run_json(
        capsys, "--cell", cell, "--seq-len", "37", "--batch", "3", "--hidden", "8", "--layers", "2",
        "--solver", solver, "--device", "cpu",
    )
    assert code == 0
    assert REQUIRED_KEYS <= set(report)
    assert report["converged"] is True
    assert (report["cell"], report["seq_len"], report["batch"], report["hidden"], report["layers"]) == (cell, 37, 3, 8, 2)
    assert report["dtype"] == "float64" and report["device"] == "cpu" and report["solver"] == solver
    assert report["max_abs_diff"] <= 1e-10
    assert report["residual"] < 1
    assert 0 <= report["forward_error_estimate"] <= 1e-10 and 0 <= report["torch_forward_error_estimate"] <= 1e-10
    per_solve = report["predictability"]["per_solve"]
    assert len(per_solve) == 2 and all(p["lyapunov_exponent"] < 0 for p in per_solve)
    direct = solver in ("sequential", "auto")  # auto runs the fused sequential kernel on a CPU
    assert (0 if direct else 2) <= report["iterations"] <= 2 * 37
    assert len(report["residual_history"]) == 2
    # A direct (sequential) solve evaluates no residual; iterative ones one per iteration.
    expected = [0, 0] if direct else report["iterations_per_solve"]
    assert [len(h) for h in report["residual_history"]] == expected
    assert report["solver_seconds"] > 0 and report["reference_seconds"] > 0


def test_float32_and_bidirectional(capsys):
    code, report = run_json(
        capsys, "--cell", "gru", "--seq-len", "64", "--batch", "2", "--hidden", "6",
        "--bidirectional", "--dtype", "float32", "--device", "cpu",
    )
    assert code == 0 and report["dtype"] == "float32" and report["bidirectional"] is True
    assert report["max_abs_diff"] <= 1e-5
    assert len(report["iterations_per_solve"]) == 2
    # float32 rounding, seen in float64: both answers' errors, which between them explain the difference
    solver_error, torch_error = report["forward_error_estimate"], report["torch_forward_error_estimate"]
    assert 1e-9 <= solver_error <= 1e-5 and 1e-9 <= torch_error <= 1e-5
    assert report["max_abs_diff"] <= 10 * (solver_error + torch_error)


def test_not_converged_exits_1_and_says_so(capsys):
    code, report = run_json(capsys, "--cell", "gru", "--seq-len", "100", "--hidden", "8", "--max-iter", "3", "--solver", "picard")
    assert code == 1
    assert report["converged"] is False and report["result"] == "max_steps_reached"
    assert report["iterations"] == 3
    assert report["max_abs_diff"] > 1e-6  # honestly inexact
    assert report["residual"] >= 1


def test_human_table(capsys):
    code = main(["solve", "--cell", "lstm", "--seq-len", "20", "--batch", "2", "--hidden", "4"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"^converged\s+yes$", out, re.MULTILINE) and "against torch.nn.LSTM" in out
    assert re.search(r"^contraction\s+not computed \(--certify", out, re.MULTILINE)
    code = main(["solve", "--cell", "lstm", "--seq-len", "20", "--batch", "2", "--hidden", "4", "--certify"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"^contraction\s+.*predicted Picard iterations \d+ \(2-norm\)$", out, re.MULTILINE)


def test_weights_and_inputs_files(capsys, tmp_path):
    generator = torch.Generator().manual_seed(3)
    module = torch.nn.LSTM(5, 7, num_layers=2, bidirectional=True, dtype=torch.float64)
    module_path, state_path, inputs_path = tmp_path / "m.pt", tmp_path / "sd.pt", tmp_path / "x.pt"
    torch.save(module, module_path)
    torch.save(module.state_dict(), state_path)
    inputs = torch.randn(23, 4, 5, generator=generator, dtype=torch.float64)
    torch.save(inputs, inputs_path)
    with torch.no_grad():
        expected, _ = module(inputs)
    for path in (module_path, state_path):
        code, report = run_json(capsys, "--weights", str(path), "--inputs", str(inputs_path))
        assert code == 0
        assert (report["cell"], report["hidden"], report["input_size"], report["layers"]) == ("lstm", 7, 5, 2)
        assert (report["seq_len"], report["batch"], report["bidirectional"]) == (23, 4, True)
        assert report["dtype"] == "float64" and report["dtype_source"] == "the files"
        assert report["max_abs_diff"] <= 1e-10
    # The same flags, agreeing with the files, are accepted.
    code, _ = run_json(capsys, "--weights", str(state_path), "--inputs", str(inputs_path), "--cell", "lstm",
                       "--hidden", "7", "--layers", "2", "--seq-len", "23")
    assert code == 0
    assert expected.shape == (23, 4, 14)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--cell", "gru", "--seq-lne", "5"], "did you mean --seq-len"),
        (["--cell", "gur"], "invalid choice"),
        (["--cell", "gru", "--hidden", "0"], "expected an integer ≥ 1"),
        (["--cell", "gru", "--rtol", "nan"], "expected a finite number"),
        (["--seq-len", "5"], "choose a cell"),
        (["--cell", "gru", "--nonlinearity", "relu"], "applies to --cell elman only"),
        (["--cell", "gru", "--damping", "0.5", "--solver", "anderson"], "--damping applies to --solver picard"),
        (["--cell", "gru", "--solver", "picard", "--damping", "1.0"], "damping must be"),
        (["--cell", "gru", "--inputs", "/nonexistent/x.pt"], "inputs file not found"),
        (["--weights", "/nonexistent/w.pt"], "weights file not found"),
    ],
)
def test_usage_errors_are_one_line(capsys, argv, fragment):
    assert fragment in run_error(capsys, *argv)


def test_cuda_absent_is_a_usage_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert "CUDA is not available" in run_error(capsys, "--cell", "gru", "--device", "cuda")


def test_conflicting_files_are_errors(capsys, tmp_path):
    gru = torch.nn.GRU(4, 6, dtype=torch.float64)
    weights = tmp_path / "gru.pt"
    torch.save(gru.state_dict(), weights)
    assert "--cell lstm conflicts" in run_error(capsys, "--weights", str(weights), "--cell", "lstm")
    assert "--hidden 8 conflicts" in run_error(capsys, "--weights", str(weights), "--hidden", "8")
    assert "--layers 2 conflicts" in run_error(capsys, "--weights", str(weights), "--layers", "2")
    assert "--scale" in run_error(capsys, "--weights", str(weights), "--scale", "2")

    bad_inputs = tmp_path / "x.pt"
    torch.save(torch.randn(9, 2, 5, dtype=torch.float64), bad_inputs)
    assert "input" in run_error(capsys, "--weights", str(weights), "--inputs", str(bad_inputs))

    float32_inputs = tmp_path / "x32.pt"
    torch.save(torch.randn(9, 2, 4), float32_inputs)
    assert "choose one with --dtype" in run_error(capsys, "--weights", str(weights), "--inputs", str(float32_inputs))
    code, report = run_json(capsys, "--weights", str(weights), "--inputs", str(float32_inputs), "--dtype", "float64")
    assert code == 0 and report["dtype"] == "float64"

    nan_inputs = tmp_path / "nan.pt"
    x = torch.randn(9, 2, 4, dtype=torch.float64)
    x[3, 1, 2] = float("nan")
    torch.save(x, nan_inputs)
    assert "NaN/Inf" in run_error(capsys, "--weights", str(weights), "--inputs", str(nan_inputs))

    nan_weights = tmp_path / "nan_gru.pt"
    state = gru.state_dict()
    state["weight_hh_l0"][0, 0] = float("inf")
    torch.save(state, nan_weights)
    assert "NaN/Inf" in run_error(capsys, "--weights", str(nan_weights))

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    assert "cannot read" in run_error(capsys, "--weights", str(garbage))


def test_python_dash_m_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "fixedpoint", "solve", "--cell", "elman", "--nonlinearity", "relu",
         "--seq-len", "9", "--batch", "2", "--hidden", "3", "--json"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["nonlinearity"] == "relu" and report["max_abs_diff"] <= 1e-10


def test_json_stays_strict_when_the_reference_overflows(capsys):
    # relu Elman × 50: torch.nn itself overflows; the report says so with null, not NaN.
    code = main(["solve", "--cell", "elman", "--nonlinearity", "relu", "--scale", "50", "--seq-len", "400",
                 "--batch", "2", "--hidden", "8", "--dtype", "float32", "--json"])
    out = capsys.readouterr().out
    def reject(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token}")

    report = json.loads(out, parse_constant=reject)  # NaN, Infinity, -Infinity would fail
    assert code == 1 and report["converged"] is False and report["result"] == "nonfinite"
    assert report["residual"] is None


def test_more_usage_errors(capsys, tmp_path):
    gru = tmp_path / "gru.pt"
    torch.save(torch.nn.GRU(3, 4, dtype=torch.float64).state_dict(), gru)
    assert "no nonlinearity option" in run_error(capsys, "--weights", str(gru), "--nonlinearity", "relu")
    assert "expected an integer in [0" in run_error(capsys, "--cell", "gru", "--seed", "-1")
    assert "expected an integer in [0" in run_error(capsys, "--cell", "gru", "--seed", str(2**64))
    mixed = tmp_path / "mixed.pt"
    state = torch.nn.GRU(3, 4, num_layers=2, dtype=torch.float64).state_dict()
    del state["bias_ih_l1"], state["bias_hh_l1"]
    torch.save(state, mixed)
    assert "biases" in run_error(capsys, "--weights", str(mixed))


def test_half_precision_weights_convert_with_dtype(capsys, tmp_path):
    path = tmp_path / "half.pt"
    torch.save(torch.nn.GRU(3, 4).half().state_dict(), path)
    assert "float16" in run_error(capsys, "--weights", str(path))
    code, report = run_json(capsys, "--weights", str(path), "--dtype", "float64", "--seq-len", "12", "--batch", "2")
    assert code == 0 and report["dtype"] == "float64" and report["max_abs_diff"] <= 1e-10


def test_one_tolerance_keeps_the_other_default(capsys):
    code, report = run_json(capsys, "--cell", "gru", "--seq-len", "20", "--batch", "2", "--hidden", "4", "--atol", "1e-9")
    assert code == 0 and report["atol"] == 1e-9 and report["rtol"] == 1e-12


@pytest.mark.parametrize("cell", ["elman", "gru", "lstm"])
@pytest.mark.parametrize("norm", ["2", "inf"])
def test_check_json_contract(capsys, cell, norm):
    code = main(["check", "--cell", cell, "--seq-len", "40", "--batch", "2", "--hidden", "6", "--norm", norm, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert {"cell", "norm", "global_bound", "conditional_bound", "estimated", "predicted_iterations", "verdict"} <= set(report)
    assert report["cell"] == cell and report["norm"] == norm
    # Certified bounds are upper bounds of the estimate along the solution.
    assert report["estimated"] <= report["conditional_bound"] * (1 + 1e-9)
    assert report["conditional_bound"] <= report["global_bound"] * (1 + 1e-9)
    assert 1 <= report["predicted_iterations"] <= 40
    if cell != "elman":
        assert report["global_bound"] >= 1  # no uniform contraction for gated cells
    # Estimates beside the certificates: torch's initialisation is predictable (λ < 0).
    predicted = report["predictability"]
    assert predicted["lyapunov_exponent"] < 0 and predicted["memory_length"] > 0
    assert set(predicted["predicted_iterations"]) == {"picard", "quasi-newton", "newton"}
    assert all(1 <= count <= 40 for count in predicted["predicted_iterations"].values())


@pytest.mark.parametrize("norm", ["2", "inf"])
def test_solve_reports_certificates_when_asked(capsys, norm):
    problem = ["--cell", "elman", "--scale", "0.5", "--seq-len", "60", "--batch", "3", "--hidden", "8"]
    code, report = run_json(capsys, *problem, "--certify", norm)
    assert code == 0 and report["norm"] == norm
    assert report["lipschitz_certified"] is not None and report["lipschitz_certified"] < 1
    assert report["lipschitz_estimated"] <= report["lipschitz_certified"]
    assert report["iterations"] <= report["predicted_iterations"]
    assert report["max_abs_diff"] <= report["error_bound"] + 1e-15  # the certified bound holds
    code, report = run_json(capsys, "--cell", "lstm", "--seq-len", "30", "--batch", "2", "--hidden", "4", "--certify", norm)
    assert report["lipschitz_certified"] is None and report["error_bound"] is None
    assert report["predicted_iterations"] >= 1 and report["lipschitz_estimated"] is not None


def test_certificates_are_off_by_default(capsys):
    code, report = run_json(capsys, "--cell", "elman", "--scale", "0.5", "--seq-len", "60", "--batch", "3", "--hidden", "8")
    assert code == 0
    for key in ("norm", "lipschitz_certified", "lipschitz_estimated", "predicted_iterations", "error_bound"):
        assert report[key] is None, key
    assert "invalid choice" in run_error(capsys, "--cell", "gru", "--certify", "1")


# -- inputs that must never reach the allocator, and outputs that cannot be written -------------------
def run_command_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """``main(argv)`` exits 2 with one line on stderr, nothing on stdout, within a second."""
    started = time.perf_counter()
    code = main(list(argv))
    seconds = time.perf_counter() - started
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert seconds < 1.0, seconds
    return lines[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["solve", "--cell", "gru", "--seq-len", "1000000000"],
        ["solve", "--cell", "gru", "--hidden", "1000000"],
        ["solve", "--cell", "gru", "--batch", "1000000000"],
        ["solve", "--cell", "lstm", "--seq-len", str(2**63 - 1)],
        ["solve", "--cell", "elman", "--input-size", "1000000000"],
        ["check", "--cell", "gru", "--hidden", "1000000"],
        ["approx", "--cell", "gru", "--hidden", "1000000"],
        ["approx", "--cell", "elman", "--seq-len", "1000000"],
        ["train", "--model", "starsaber", "--task", "first", "--hidden", "1000000"],
        ["train", "--model", "transformer", "--task", "parity", "--train-samples", "1000000000000"],
    ],
    ids=["solve-T", "solve-H", "solve-B", "solve-T-max", "solve-I", "check-H", "approx-H", "approx-T", "train-H",
         "train-samples"],
)
def test_impossible_sizes_are_refused_before_allocating(capsys, argv):
    """The estimate refuses them at once, naming what it needs and what to lower."""
    line = run_command_error(capsys, *argv)
    assert re.search(r"needs about [\d.e+]+ [KMGTPE]iB of memory, and [\d.]+ [KMGTPE]?i?B are available; lower --", line), line


def test_layer_count_is_bounded(capsys):
    line = run_command_error(capsys, "solve", "--cell", "elman", "--layers", "1000000", "--hidden", "8", "--seq-len", "4")
    assert "--layers" in line and "[1, 1000]" in line


def test_batch_size_larger_than_the_data_is_refused(capsys):
    line = run_command_error(capsys, "train", "--model", "starsaber", "--task", "first", "--batch-size", "1000000000",
                             "--train-samples", "64", "--test-samples", "16")
    assert "--batch-size 1000000000 exceeds the 64 training samples" in line


@pytest.mark.parametrize(
    "message",
    [
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 8192000000000 bytes. Error code 12 (Cannot allocate memory)",
        "Storage size calculation overflowed with sizes=[9223372036854775807, 16, 64]",
        "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79 GiB\nmore lines",
    ],
    ids=["cpu-allocator", "overflow", "cuda"],
)
def test_allocation_failures_past_the_estimate_are_one_line(capsys, monkeypatch, message):
    """Work the estimate lets through can still fail to allocate (other processes took the
    memory): every allocator's failure is one line that says what to lower."""
    def fail(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr("fixedpoint.cli.compare_with_torch", fail)
    line = run_command_error(capsys, "solve", "--cell", "gru", "--seq-len", "8", "--hidden", "4")
    assert line.startswith("fixedpoint: error: out of memory") and "lower --seq-len" in line
    if "8192000000000" in message:
        assert "an allocation of 7.45 TiB failed" in line


def test_a_defect_keeps_its_traceback(monkeypatch):
    """A RuntimeError that is not an allocation failure is a bug, not bad input: it propagates."""
    def fail(*args, **kwargs):
        raise RuntimeError("shape mismatch inside the solver")

    monkeypatch.setattr("fixedpoint.cli.compare_with_torch", fail)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["solve", "--cell", "gru", "--seq-len", "8", "--hidden", "4"])


class _ExecutesCode:
    def __reduce__(self):
        return (os.getpid, ())  # harmless, but code all the same


def test_files_that_are_not_weights(capsys, tmp_path):
    pickle_with_code = tmp_path / "code.pt"
    torch.save({"weight_hh_l0": _ExecutesCode()}, pickle_with_code)
    line = run_command_error(capsys, "solve", "--weights", str(pickle_with_code))
    assert re.search(r"refers to Python objects other than tensors \((posix|nt)\.getpid\)", line) and "refused" in line
    text = tmp_path / "notes.pt"
    text.write_text("hello\n")
    assert "is not a torch.save file; expected an RNN/GRU/LSTM" in run_command_error(capsys, "solve", "--weights", str(text))
    assert "is not a torch.save file; expected a (T, B, input_size) tensor" in run_command_error(
        capsys, "solve", "--cell", "gru", "--inputs", str(text)
    )


def _run_cli(argv: list[str], **options) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fixedpoint", *argv], capture_output=True, text=True, timeout=120,
                          **options)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_full_disk_is_one_line():
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "fixedpoint", "solve", "--cell", "gru", "--seq-len", "8", "--hidden", "4", "--json"],
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=120,
        )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["fixedpoint: error: cannot write the report to stdout: No space left on device"]


def test_closed_pipe_is_quiet():
    reader, writer = os.pipe()
    os.close(reader)  # nobody reads: the first write meets EPIPE, as under `fixedpoint ... | head -0`
    try:
        result = subprocess.run(
            [sys.executable, "-m", "fixedpoint", "solve", "--cell", "gru", "--seq-len", "8", "--hidden", "4", "--json"],
            stdout=writer, stderr=subprocess.PIPE, text=True, timeout=120,
        )
    finally:
        os.close(writer)
    assert result.returncode == 2 and result.stderr == ""


def test_status_line_waits_before_it_shows(monkeypatch):
    """Progress appears only for work that runs past the delay, and is erased when done."""
    import io

    from fixedpoint import cli

    stream = io.StringIO()
    monkeypatch.setattr(cli.sys, "stderr", stream)
    monkeypatch.setattr(cli._StatusLine, "DELAY", 0.2)
    quick = cli._Progress(10)
    quick.phase("solving")
    quick.close()
    assert stream.getvalue() == ""
    slow = cli._Progress(10)
    slow.phase("certifying layer 0 direction 0")  # one long stage: the timer shows it
    time.sleep(0.5)
    assert "certifying layer 0 direction 0" in stream.getvalue()
    slow(0, 0, 3, None, None)
    assert "iteration 3/10" in stream.getvalue()
    slow.close()
    assert stream.getvalue().endswith("\r\033[K") or stream.getvalue().endswith("\r \033[K")


def test_check_states_the_prediction_when_nothing_is_certified(capsys):
    code = main(["check", "--cell", "gru", "--scale", "3", "--seq-len", "200", "--batch", "2", "--hidden", "16"])
    out = capsys.readouterr().out
    verdict = next(line for line in out.splitlines() if line.startswith("verdict"))
    assert code == 0
    assert "not certified" in verdict and "estimated: predictable (λ -" in verdict
    assert "Picard about" in verdict and "of at most 200" in verdict


def test_check_observes_picard_unless_told_not_to(capsys):
    problem = ["check", "--cell", "gru", "--seq-len", "50", "--batch", "2", "--hidden", "6"]
    assert main([*problem, "--json"]) == 0
    assert 1 <= json.loads(capsys.readouterr().out)["observed_iterations"] <= 50
    assert main([*problem, "--json", "--no-observe"]) == 0
    assert json.loads(capsys.readouterr().out)["observed_iterations"] is None
    assert main([*problem, "--no-observe"]) == 0
    assert "not run (--no-observe)" in capsys.readouterr().out


@pytest.mark.parametrize("solver", ["picard", "quasi-newton", "auto"])
def test_solve_with_variable_lengths_matches_packed_torch_nn(capsys, solver):
    code, report = run_json(capsys, "--cell", "lstm", "--hidden", "6", "--seq-len", "30", "--batch", "3",
                            "--layers", "2", "--bidirectional", "--lengths", "30,11,2", "--solver", solver)
    assert code == 0 and report["converged"]
    assert report["lengths"] == [30, 11, 2]
    assert report["max_abs_diff"] <= 1e-10


@pytest.mark.parametrize(("lengths", "message"), [("30,11", "one entry per sample"), ("31,11,2", "1 … T = 30"),
                                                 ("30,0,2", "positive integers"), ("3,a,2", "positive integers")])
def test_solve_refuses_lengths_that_do_not_fit(capsys, lengths, message):
    line = run_error(capsys, "--cell", "gru", "--hidden", "4", "--seq-len", "30", "--batch", "3", "--lengths", lengths)
    assert message in line


def test_solve_and_check_take_a_projected_lstm(capsys, tmp_path):
    # --proj-size as torch.nn.LSTM's proj_size, and a projected checkpoint read as it is.
    code, report = run_json(capsys, "--cell", "lstm", "--hidden", "6", "--proj-size", "2", "--seq-len", "40",
                            "--batch", "2", "--layers", "2", "--solver", "quasi-newton")
    assert code == 0 and report["converged"] and report["proj_size"] == 2
    assert report["max_abs_diff"] <= 1e-10
    torch.save(torch.nn.LSTM(3, 5, proj_size=2).state_dict(), tmp_path / "projected.pt")
    code, report = run_json(capsys, "--weights", str(tmp_path / "projected.pt"), "--seq-len", "30", "--batch", "2")
    assert code == 0 and report["proj_size"] == 2 and report["max_abs_diff"] <= 1e-5
    assert main(["check", "--weights", str(tmp_path / "projected.pt"), "--seq-len", "30", "--batch", "2"]) == 0
    assert "P=2" in capsys.readouterr().out
    assert main(["solve", "--cell", "gru", "--proj-size", "2", "--seq-len", "5"]) == 2
    assert "only supported for LSTM" in capsys.readouterr().err
