"""A slice of the fuzz harness (analysis/fuzz.py, `make fuzz`): 50 solve cases, a few module
cases and the fast command-line cases, each asserted to be no real miss.

The cases are the harness's own (each replays with ``python analysis/fuzz.py --seed N``), judged
by its rule, which measures how far rounding alone moves the answer on the case itself instead
of asserting one machine's rounding.  A case that exposes a known, unfixed bug is marked
``xfail(strict=True)``: the mark must go when the bug is fixed.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_harness():
    """analysis/fuzz.py as a module (analysis/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("analysis_fuzz", ROOT / "analysis" / "fuzz.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


fuzz = load_harness()

def slice_seeds(count: int = 50, per_solver: int = 6, seconds: float = 2.0) -> list[int]:
    """The slice, chosen by size alone: per solver the first ``per_solver`` seeds whose predicted
    worst case (``fuzz.worst_case_seconds``) is at most ``seconds``, then the next such seeds up
    to ``count``."""
    chosen: list[int] = []
    taken = dict.fromkeys(fuzz.SOLVER_NAMES, 0)
    seed = 0
    while len(chosen) < count:
        case = fuzz.draw_solve_case(seed)
        quotas_met = len(chosen) >= per_solver * len(taken)
        if fuzz.worst_case_seconds(case) <= seconds and (quotas_met or taken[case.solver] < per_solver):
            chosen.append(seed)
            taken[case.solver] += 1
        seed += 1
    return chosen


SOLVE_SEEDS = slice_seeds()
MODULE_SEEDS = range(8)
#: Command-line cases that allocate nothing large: each is one interpreter start (~2 s).
FAST_CLI = [
    "unknown-option",
    "seq-len-negative",
    "damping-without-picard",
    "weights-missing",
    "inputs-text-file",
    "weights-pickle-with-code",
    "json-to-dev-full",
    "json-to-closed-pipe",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """The harness's default: one torch thread (a replay rounds alike on any machine)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def explain(outcome) -> str:
    return f"replay: python analysis/fuzz.py --seed {outcome.name}: {outcome.klass}: {outcome.detail}"


@pytest.mark.parametrize("seed", SOLVE_SEEDS)
def test_solve_case_is_no_real_miss(seed: int) -> None:
    outcome = fuzz.run_solve_case(fuzz.draw_solve_case(seed))
    assert outcome.klass not in fuzz.MISSES, explain(outcome)


def test_regression_anderson_relu_816() -> None:
    """Anderson stopped with a residual within the tolerance and an error of 1.4 tolerances at one
    element (800× the loop's): the residual propagated along the relu network's expanding runs.
    The driver's forward-error estimate sees it and its refinement removes it: exact."""
    outcome = fuzz.run_solve_case(fuzz.REGRESSIONS["anderson-relu-816"])
    assert outcome.klass == fuzz.EXACT, explain(outcome)


@pytest.mark.parametrize("seed", MODULE_SEEDS)
def test_module_case_is_no_real_miss(seed: int) -> None:
    outcome = fuzz.run_module_case(fuzz.draw_module_case(seed))
    assert outcome.klass not in fuzz.MISSES, explain(outcome)


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return fuzz.write_cli_files(tmp_path_factory.mktemp("cli"))


@pytest.mark.parametrize("name", FAST_CLI)
def test_bad_command_line_exits_2_with_one_line(name: str, cli_files: dict[str, str]) -> None:
    """Exit 2, one line on stderr, no traceback, no hang; not timed (machines differ)."""
    case = next(case for case in fuzz.cli_cases() if case.name == name)
    assert case.fast
    outcome = fuzz.run_cli_case(case, cli_files, startup=math.inf, timeout=60, memory_bytes=8 * 2**30, threads=1)
    assert outcome.klass == fuzz.CLI_OK, explain(outcome)


# -- the rule itself, on made-up answers ------------------------------------------------------------
def judge(answer: list[float], reference: list[float], loop: list[float], dtype=torch.float64):
    as_tensor = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    return fuzz.judge(as_tensor(answer), as_tensor(reference), as_tensor(loop), rtol=1e-12, atol=1e-12,
                      dtype=dtype, state_size=4)


def test_rule_exact_within_the_tolerance() -> None:
    assert judge([1.0 + 1e-13, 2.0], [1.0, 2.0], [1.0, 2.0]).klass == fuzz.EXACT


def test_rule_ill_conditioned_when_the_loop_is_as_far() -> None:
    verdict = judge([1.0 + 5e-9, 2.0], [1.0, 2.0], [1.0 + 1e-9, 2.0])
    assert verdict.klass == fuzz.ILL_CONDITIONED and verdict.conditioning > 1


def test_rule_silent_beyond_tolerance_where_the_loop_is_at_rounding() -> None:
    verdict = judge([1.0 + 1e-11, 2.0], [1.0, 2.0], [1.0, 2.0])
    assert verdict.klass == fuzz.SILENT and verdict.tolerance_ratio > 1


def test_rule_non_finite_success_and_overflowing_loop() -> None:
    assert judge([math.nan, 2.0], [1.0, 2.0], [1.0, 2.0]).klass == fuzz.NONFINITE
    assert judge([1.0, 2.0], [math.inf, 2.0], [math.inf, 2.0]).klass == fuzz.SILENT
    # at the edge of the range, whether the loop's sums overflow depends on their order
    assert judge([1e308, 2.0], [math.inf, 2.0], [math.inf, 2.0]).klass == fuzz.ILL_CONDITIONED


def test_report_keeps_text_outside_the_generated_part(tmp_path: Path) -> None:
    report = tmp_path / "reliability.md"
    fuzz.write_report(report, "first\n")
    report.write_text("preface\n" + report.read_text(encoding="utf-8") + "appendix\n", encoding="utf-8")
    fuzz.write_report(report, "second\n")
    text = report.read_text(encoding="utf-8")
    assert text.startswith("preface\n") and text.endswith("appendix\n")
    assert "second" in text and "first" not in text
