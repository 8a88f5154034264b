"""Seeded fuzzing of every solver, the drop-in modules and the command line; writes docs/reliability.md.

Three parts, each case replayable from its seed (``python analysis/fuzz.py --seed N``):

1. **Solve cases** (``--seed N``): a random network (cell, ``W_hh`` scale, sizes, layers,
   directions, dtype), random inputs and initial states, and one solver (``N mod 8`` picks it
   from ``sequential, sequential-fused, picard, anderson, newton, quasi-newton, damped, auto``),
   solved with ``solve_network(..., throw=False)`` beside ``torch.nn`` (``network.to_torch()``)
   and the sequential Python loop (``Sequential()``: the ground truth, with the solvers' rounding
   model).  Named regressions replay with ``--seed regression:NAME``.
2. **Module cases** (``--seed nn:N``): ``fixedpoint.nn.RNN/GRU/LSTM`` built from a ``torch.nn``
   module, forward and (float64) backward against ``torch.nn``'s outputs and gradients.
3. **Command-line cases** (``--seed cli:NAME``): ``python -m fixedpoint`` on bad input, in a
   subprocess.

Classes of a solve or module case:

- ``exact``: successful, and as close to ``torch.nn`` as the rule below allows; labelled
  ``exact (ill-conditioned: …)`` when only the rule's conditioning allowance admits it;
- ``reported failure``: the result code was not ``successful`` (``max_steps_reached``,
  ``nonfinite``) or a documented error was raised (``InputError``, ``NoConvergence``);
- ``silent``: reported success, but the answer is further from ``torch.nn`` than the rule allows;
- ``non-finite``: reported success with NaN or Inf in the answer;
- ``crash``: any other exception.

The rule ("silent" accounts for the conditioning).  With ``ref`` the ``torch.nn`` answer (the
output, ``h_n`` and ``c_n`` of a solve; for a module case the outputs, and separately every
gradient, whose tolerance takes its tensor's largest entry in place of ``|ref_i|``: each entry is a
sum of ``T·B`` terms that may cancel), ``sol`` the solver's, ``loop`` the Python loop's (for a
module case: the same module with ``solver="sequential", adjoint="sequential"``), ``u`` the unit roundoff of the dtype
(2⁻⁵³, 2⁻²⁴), ``M = max(|ref|, 1)``, ``S`` the state size (``H``; ``2H`` for LSTM) and
``rtol, atol`` the tolerances the solve used (``solution.stats.rtol/atol``):

- ``loop_diff = max|loop − ref|``, ``solver_diff = max|sol − ref|``, ``solver_vs_loop = max|sol − loop|``;
- ``permuted_diff = max|loop' − loop|`` with ``loop'`` the loop on the network with its hidden
  units permuted (solve cases only): the same mathematics summed in another order, as another
  CPU's GEMM may round it, so the rule does not rest on this machine's loop and ``torch.nn``
  happening to round alike;
- ``wider_diff = max|loop64 − loop|`` for a float32 solve case, ``loop64`` the loop on the same
  numbers in float64: how far float32 rounding moves the loop (and ``torch.nn``) from the exact
  solution, which the driver's refinement approaches more closely;
- ``spread = max(loop_diff, permuted_diff, wider_diff)``: how far rounding alone moves the answer;
- ``tolerance_ratio = max_i |sol_i − ref_i| / (atol + rtol·|ref_i|)`` (elementwise);
- ``conditioning κ = max(1, spread / ((S + 8)·u·M))``: how many single-step rounding bounds (a
  length-``S`` dot product and the gate arithmetic, ``(S + 8)·u·M``) the spread spans.  ``κ > 1``
  means the problem amplified rounding by about ``κ``; a residual of the size of the tolerance
  is then allowed to grow by as much.

The case is *explained* when ``solver_diff ≤ 10·max(spread, u·M)`` (within 10× of what the loop
itself does, floored at one unit of the largest value) or ``tolerance_ratio ≤ κ`` (within the
requested tolerance amplified by the conditioning).  An explained case is ``exact`` when
``tolerance_ratio ≤ 1`` or ``solver_diff ≤ 10·u·M``, otherwise ``exact (ill-conditioned: the loop
itself is moved by rounding as much)``.  An unexplained one is ``silent``: a real miss.

A successful solve that the rule above does not explain gets one more look.  The driver stops
when ``|F(X) − X| < atol + rtol·|F(X)|``; a residual that size can leave an error up to
``L/(1 − L)`` tolerances at a contraction rate ``L`` (``Σ_k ‖J_t ⋯ J_{k+1}‖`` of them in
general), so it then estimates the answer's error by linearised propagation of the residual and
refines the answer while the estimate exceeds the tolerance (:mod:`fixedpoint.forward_error`, at
most :data:`~fixedpoint.solve.MAX_REFINEMENTS` corrections, each kept only if it shrinks the next).  The case is
``residual-bound`` when every (layer, direction) that stopped by the test kept its residual
promise on its own inputs and its error is that residual propagated through the problem, checked
to first order with the exact Jacobians (:func:`within_residual_contract`): the refinement
stopped short of the tolerance, and the error is still the problem's amplification of a residual,
not a broken promise.  Only what fails this too is ``silent``: a real miss.

When the loop overflows (NaN/Inf) and the solver returns a finite success, the case is
``silent`` unless the answer comes within ``2¹⁶`` of the dtype's largest value: there whether a
sum overflows depends on its order, and the case counts as ill-conditioned.

The tables print ``tolerance_ratio`` and ``κ`` so the margin of every case is visible.

Command-line cases expect exit status 2, exactly one line on stderr, no ``Traceback`` and a
finish within 1 s of wall time beyond the interpreter's start (the median time of
``fixedpoint solve --seq-len 0``, measured first: importing torch alone takes seconds on a small
machine); a closed stdout pipe may also end quietly (nothing on stderr).  Classes: ``ok``,
``traceback``, ``wrong exit``, ``multi-line``, ``slow`` (> 1 s beyond start, twice in a row), ``hang`` (killed
at ``--cli-timeout``).  Each runs under an address-space limit (``--cli-memory-gb``), so a case
that would allocate without bound fails fast instead of taking the machine down.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

import fixedpoint.nn as fnn  # noqa: E402
from fixedpoint import InputError, Network, NoConvergence, Sequential, solve_network  # noqa: E402
from fixedpoint.compare import run_reference  # noqa: E402
from fixedpoint.conditioning import (  # noqa: E402
    UNIT_ROUNDOFF,
    Trajectory,
    permute_hidden_units,
    permute_initial_state,
    restore_unit_order,
    unit_permutation,
)
from fixedpoint.contraction import estimated_step_norms  # noqa: E402
from fixedpoint.forward_error import linearized_correction  # noqa: E402
from fixedpoint.solve import NetworkSolution  # noqa: E402
from fixedpoint.solvers import DEFAULT_TOLERANCES, SOLVERS, Solver  # noqa: E402

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}

#: Every solver the fuzz runs; ``seed mod 8`` picks one, so each gets an eighth of the cases.
SOLVER_NAMES: tuple[str, ...] = (
    "sequential", "sequential-fused", "picard", "anderson", "newton", "quasi-newton", "damped", "auto",
)
#: ``(kind, nonlinearity)`` of each cell the fuzz draws, by label.
CELLS: dict[str, tuple[str, str]] = {
    "elman-tanh": ("elman", "tanh"),
    "elman-relu": ("elman", "relu"),
    "gru": ("gru", "tanh"),
    "lstm": ("lstm", "tanh"),
}
#: Full-Jacobian Newton costs O(T·B·S³) per iteration: its hidden size stays small.
FULL_JACOBIAN_SOLVERS = ("newton", "damped")

EXACT = "exact"
ILL_CONDITIONED = "exact (ill-conditioned: the loop itself is moved by rounding as much)"
#: Not exact, not a miss of what the driver promises: the residual met the tolerance and the error
#: beyond it is that residual propagated through the problem (:func:`within_residual_contract`).
RESIDUAL_AMPLIFIED = "residual-bound (the residual met the tolerance, the error did not)"
REPORTED = "reported failure"
SILENT = "silent"
CRASH = "crash"
NONFINITE = "non-finite"
SOLVE_CLASSES = (EXACT, ILL_CONDITIONED, RESIDUAL_AMPLIFIED, REPORTED, SILENT, NONFINITE, CRASH)
#: Classes that are real misses: a wrong answer reported as right, or an unexpected exception.
MISSES = (SILENT, NONFINITE, CRASH)


# -- the rule --------------------------------------------------------------------------------------
@dataclass
class Verdict:
    """How one answer compares with ``torch.nn`` and the loop (the rule of the module docstring)."""

    klass: str
    solver_diff: float
    loop_diff: float
    solver_vs_loop: float
    tolerance_ratio: float
    conditioning: float
    reason: str = ""
    permuted_diff: float = math.nan
    wider_diff: float = math.nan

    @property
    def spread(self) -> float:
        """How far rounding alone moves the answer (the rule's ``spread``)."""
        return max([self.loop_diff, *(d for d in (self.permuted_diff, self.wider_diff) if not math.isnan(d))])


#: A finite answer within this factor of the dtype's largest value, where the loop overflows, is
#: at the edge of the range: a sum of a few such terms overflows or not by its order of summation.
OVERFLOW_EDGE = 2.0**-16


def flatten(tensors: Iterable[Tensor | None]) -> Tensor:
    """One float64 vector of every given tensor's values (``None`` entries skipped)."""
    parts = [t.detach().reshape(-1).double() for t in tensors if t is not None]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def judge(
    answer: Tensor,
    reference: Tensor,
    loop: Tensor,
    *,
    rtol: float,
    atol: float,
    dtype: torch.dtype,
    state_size: int,
    permuted: Tensor | None = None,
    scale: Tensor | None = None,
    wider: Tensor | None = None,
) -> Verdict:
    """Classify a successful ``answer`` against ``reference`` (``torch.nn``) and ``loop``.

    ``scale`` (optional, same length) replaces ``|reference|`` in the tolerance ``atol + rtol·|·|``:
    gradients are judged per tensor, relative to its largest entry (:func:`gradient_scale`).
    All are flat float64 vectors of one length (:func:`flatten`); ``permuted`` (optional) is the
    loop on the network with its hidden units permuted (:func:`permuted_loop`); ``wider``
    (optional) the loop in float64 for a float32 problem (:func:`wider_loop`); ``dtype`` is the
    dtype the problem was solved in.  Returns ``exact``, ``exact (ill-conditioned …)``,
    ``silent`` or ``non-finite``.
    """
    finite = bool(torch.isfinite(answer).all())
    if not finite:
        return Verdict(NONFINITE, math.inf, math.nan, math.inf, math.inf, math.nan, "NaN/Inf returned as success")
    if answer.numel() == 0:
        return Verdict(EXACT, 0.0, 0.0, 0.0, 0.0, 1.0)
    reference_finite = bool(torch.isfinite(reference).all())
    loop_finite = bool(torch.isfinite(loop).all())
    if not loop_finite:
        largest = float(answer.abs().max())
        if largest >= torch.finfo(dtype).max * OVERFLOW_EDGE:
            # An answer this close to the largest float: whether a sum overflows on the way
            # depends on its order, so neither side is the solution's proof.
            return Verdict(ILL_CONDITIONED, math.inf, math.inf, math.inf, math.inf, math.nan,
                           f"the loop overflows; the solver's finite answer reaches {largest:.3g}, "
                           "at the edge of the range")
        # The recurrence overflows in this dtype: a finite "solution" far from the edge is not the solution.
        return Verdict(SILENT, math.inf, math.inf, math.inf, math.inf, math.nan,
                       f"the loop overflows, but the solver reports a finite success (largest value {largest:.3g})")
    if not reference_finite:
        # torch.nn overflows where the loop does not (rounding at the edge of the range): the loop decides.
        reference = loop
    unit = UNIT_ROUNDOFF[dtype]
    magnitude = max(float(reference.abs().max()), 1.0)
    solver_diff = float((answer - reference).abs().max())
    loop_diff = float((loop - reference).abs().max())
    permuted_diff = math.nan
    if permuted is not None and bool(torch.isfinite(permuted).all()):
        permuted_diff = float((permuted - loop).abs().max())
    wider_diff = math.nan
    if wider is not None and bool(torch.isfinite(wider).all()):
        wider_diff = float((wider - loop).abs().max())
    # What rounding alone moves: another order of summation, and (float32) the exact solution itself.
    spread = max([loop_diff, *(d for d in (permuted_diff, wider_diff) if not math.isnan(d))])
    solver_vs_loop = float((answer - loop).abs().max())
    size = reference.abs() if scale is None else scale
    tolerance = size.mul(rtol).add(atol).clamp(min=torch.finfo(torch.float64).tiny)
    tolerance_ratio = float(((answer - reference).abs() / tolerance).max())
    conditioning = max(1.0, spread / ((state_size + 8) * unit * magnitude))
    like_loop = solver_diff <= 10 * max(spread, unit * magnitude)
    within_tolerance = tolerance_ratio <= conditioning
    values = dict(solver_diff=solver_diff, loop_diff=loop_diff, solver_vs_loop=solver_vs_loop,
                  tolerance_ratio=tolerance_ratio, conditioning=conditioning, permuted_diff=permuted_diff,
                  wider_diff=wider_diff)
    if not (like_loop or within_tolerance):
        return Verdict(SILENT, **values, reason=(
            f"max|diff| {solver_diff:.3g} > 10× the rounding spread {spread:.3g}, and {tolerance_ratio:.3g}× the "
            f"tolerance > κ = {conditioning:.3g}"))
    if tolerance_ratio <= 1 or solver_diff <= 10 * unit * magnitude:
        return Verdict(EXACT, **values)
    return Verdict(ILL_CONDITIONED, **values)


# -- solve cases -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SolveCase:
    """One network, input and solver.  Weights: ``Network.random(seed=weight_seed, scale=scale)``;
    inputs ``(T, B, I)`` and then ``h_0`` (and ``c_0``) ``(L·D, B, H)``: standard normal draws from
    ``torch.Generator().manual_seed(input_seed)`` times ``input_scale`` and ``hx_scale``."""

    name: str
    solver: str
    cell: str
    dtype: str
    seq_len: int
    batch: int
    input_size: int
    hidden: int
    layers: int
    bidirectional: bool
    scale: float
    weight_seed: int
    input_seed: int
    input_scale: float
    hx_scale: float | None
    max_steps: int | None

    @property
    def state_size(self) -> int:
        return 2 * self.hidden if self.cell == "lstm" else self.hidden

    def network(self) -> Network:
        kind, nonlinearity = CELLS[self.cell]
        return Network.random(
            kind, self.input_size, self.hidden, num_layers=self.layers, bidirectional=self.bidirectional,
            nonlinearity=nonlinearity, scale=self.scale, seed=self.weight_seed, dtype=DTYPES[self.dtype],
        )

    def tensors(self) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor] | None]:
        """``inputs (T, B, I)`` and ``hx`` in ``torch.nn``'s layout (``None``: zeros)."""
        dtype = DTYPES[self.dtype]
        generator = torch.Generator().manual_seed(self.input_seed)
        inputs = torch.randn(self.seq_len, self.batch, self.input_size, generator=generator, dtype=dtype)
        inputs = inputs * self.input_scale
        if self.hx_scale is None:
            return inputs, None
        shape = (self.layers * (2 if self.bidirectional else 1), self.batch, self.hidden)
        h_0 = torch.randn(*shape, generator=generator, dtype=dtype) * self.hx_scale
        if self.cell != "lstm":
            return inputs, h_0
        c_0 = torch.randn(*shape, generator=generator, dtype=dtype) * self.hx_scale
        return inputs, (h_0, c_0)

    def build_solver(self) -> Solver:
        if self.solver == "sequential-fused":
            return Sequential(kernel="fused")
        return SOLVERS[self.solver]()


def log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def log_uniform_int(rng: random.Random, low: int, high: int) -> int:
    return min(high, int(log_uniform(rng, low, high + 1)))


#: ``(seconds per iteration, seconds per multiply-add)`` of each iterative solver: a cost model
#: fitted on a 2-core CPU (expanding weights, where every one of the ``T`` iterations runs), used
#: only to keep the worst case of a drawn problem within :data:`SECONDS_LIMIT`.
ITERATION_COST: dict[str, tuple[float, float]] = {
    "picard": (1e-3, 1.5e-8),
    "anderson": (25e-3, 5e-8),
    "quasi-newton": (3e-3, 4e-8),
    "newton": (40e-3, 6e-8),
    "damped": (40e-3, 6e-8),
}
#: Most seconds a drawn case may take (by :func:`worst_case_seconds`) when its solver needs all
#: ``T`` iterations; the sequence is shortened until it fits.
SECONDS_LIMIT = 16.0


def worst_case_seconds(case: SolveCase) -> float:
    """Predicted seconds of a solve that needs every one of its ``T`` iterations per (layer,
    direction): each costs a fixed overhead plus ``T/2`` positions on average of ``B·G·H·(H + I)``
    multiply-adds (the cell), with ``4·S³`` more per position for full Newton's Jacobian products.
    Direct solvers (and the loop every case runs) cost one cell step per position."""
    gates = {"elman-tanh": 1, "elman-relu": 1, "gru": 3, "lstm": 4}[case.cell]
    width = max(case.input_size, (2 if case.bidirectional else 1) * case.hidden)
    per_position = gates * case.hidden * (case.hidden + width)
    solves = case.layers * (2 if case.bidirectional else 1)
    loop = solves * case.seq_len * (30e-6 + 1e-8 * case.batch * per_position)
    if case.solver not in ITERATION_COST:
        return loop
    if case.solver in FULL_JACOBIAN_SOLVERS:
        per_position += 4 * case.state_size**3
    overhead, per_multiply_add = ITERATION_COST[case.solver]
    per_iteration = overhead + per_multiply_add * case.seq_len / 2 * case.batch * per_position
    return loop + solves * case.seq_len * per_iteration


def draw_solve_case(seed: int) -> SolveCase:
    """The case of ``seed``: every parameter from ``random.Random(seed)``; then ``T`` shrinks
    until :func:`worst_case_seconds` fits :data:`SECONDS_LIMIT`."""
    rng = random.Random(seed)
    solver = SOLVER_NAMES[seed % len(SOLVER_NAMES)]
    cell = rng.choice(list(CELLS))
    dtype = rng.choice(list(DTYPES))
    scale = log_uniform(rng, 0.1, 6.0)
    seq_len = rng.randint(1, 1500) if rng.random() < 0.25 else log_uniform_int(rng, 1, 1500)
    batch = rng.choice((1, 1, 2, 3, 4, 8))
    hidden = log_uniform_int(rng, 1, 8 if solver in FULL_JACOBIAN_SOLVERS else 32)
    input_size = log_uniform_int(rng, 1, 32)
    layers = rng.choice((1, 1, 1, 2, 3))
    bidirectional = rng.random() < 0.3
    input_scale = log_uniform(rng, 0.01, 100.0)
    hx_scale = log_uniform(rng, 0.1, 5.0) if rng.random() < 0.5 else None
    max_steps = rng.randint(1, max(1, seq_len // 4)) if rng.random() < 0.15 else None
    weight_seed = rng.randrange(2**31)
    case = SolveCase(
        name=str(seed), solver=solver, cell=cell, dtype=dtype, seq_len=seq_len, batch=batch,
        input_size=input_size, hidden=hidden, layers=layers, bidirectional=bidirectional, scale=scale,
        weight_seed=weight_seed, input_seed=weight_seed + 1, input_scale=input_scale, hx_scale=hx_scale,
        max_steps=max_steps,
    )
    while worst_case_seconds(case) > SECONDS_LIMIT and case.seq_len > 1:
        case = dataclasses.replace(case, seq_len=max(1, case.seq_len * 3 // 4))
    if case.max_steps is not None:
        case = dataclasses.replace(case, max_steps=min(case.max_steps, case.seq_len))
    return case


#: Named solve cases that once exposed a miss; replay with ``--seed regression:NAME``.
REGRESSIONS: dict[str, SolveCase] = {
    # Anderson, float64, relu Elman H = 1, bidirectional, inputs × 100: reported successful with
    # max |diff| 4.1e-10 against torch.nn where the loop reaches 5e-13.
    "anderson-relu-816": SolveCase(
        name="regression:anderson-relu-816", solver="anderson", cell="elman-relu", dtype="float64",
        seq_len=676, batch=8, input_size=20, hidden=1, layers=1, bidirectional=True,
        scale=1.2028917090154603, weight_seed=816, input_seed=817, input_scale=100.0, hx_scale=5.0,
        max_steps=None,
    ),
}


@dataclass
class Outcome:
    """One case's parameters, measurements and class."""

    part: str  # "solve", "nn" or "cli"
    name: str  # what --seed replays: "17", "nn:3", "cli:NAME", "regression:NAME"
    klass: str
    params: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    detail: str = ""
    seconds: float = 0.0

    @property
    def miss(self) -> bool:
        return self.klass in MISSES if self.part != "cli" else self.klass != "ok"


def permuted_loop(network: Network, inputs: Tensor, hx: Any) -> Tensor | None:
    """The loop's answer (flat, as :func:`flatten` of output, ``h_n``, ``c_n``) computed on
    :func:`~fixedpoint.conditioning.permute_hidden_units` and put back in the original order; ``None`` if it overflows."""
    order = unit_permutation(network.hidden_size, seed=7919 + network.hidden_size)
    permuted = permute_hidden_units(network, order)
    solution = solve_network(permuted, inputs, permute_initial_state(hx, order), Sequential(), throw=False)
    if not solution.converged:
        return None
    return flatten(restore_unit_order(solution.output, solution.h_n, solution.c_n, order, network.num_directions))


def wider_loop(network: Network, inputs: Tensor, hx: Any) -> Tensor | None:
    """For a float32 problem, the loop on the same numbers in float64 (flat, as :func:`flatten`):
    the exact solution at float32's scale, which the float32 loop and ``torch.nn`` miss by what
    float32 rounding amplifies (saturated gates round to exactly 0 or 1, say).  ``None`` for a
    float64 problem (no wider type) or when it overflows."""
    if network.dtype != torch.float32:
        return None
    if hx is not None:
        hx = tuple(part.double() for part in hx) if isinstance(hx, tuple) else hx.double()
    solution = solve_network(network.to(dtype=torch.float64), inputs.double(), hx, Sequential(), throw=False)
    if not solution.converged:
        return None
    return flatten((solution.output, solution.h_n, solution.c_n))


def exception_summary(error: BaseException) -> str:
    """``Type: first line`` and the innermost frame, for a crash report."""
    text = str(error).strip().splitlines()
    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(error).__name__}: {text[0] if text else ''}{where}"


def run_solve_case(case: SolveCase) -> Outcome:
    """Solve ``case`` with its solver, the loop and ``torch.nn``; classify by the rule."""
    started = time.perf_counter()
    params = dataclasses.asdict(case)
    params.pop("name")
    outcome = Outcome("solve", case.name, CRASH, params)
    try:
        network = case.network()
        inputs, hx = case.tensors()
        reference = flatten(run_reference(network.to_torch(), inputs, hx))
        loop = solve_network(network, inputs, hx, Sequential(), throw=False)
        permuted = permuted_loop(network, inputs, hx)
        wider = wider_loop(network, inputs, hx)
    except Exception as error:  # the problem or its ground truth could not be built: a crash of the harness's inputs
        outcome.detail = "building the problem or the loop failed: " + exception_summary(error)
        outcome.seconds = time.perf_counter() - started
        return outcome
    loop_vector = flatten((loop.output, loop.h_n, loop.c_n))
    try:
        solution = solve_network(network, inputs, hx, case.build_solver(), max_steps=case.max_steps, throw=False)
    except (InputError, NoConvergence) as error:
        outcome.klass, outcome.detail = REPORTED, exception_summary(error)
    except Exception as error:
        outcome.klass, outcome.detail = CRASH, exception_summary(error)
    else:
        outcome.metrics = {
            "result": solution.result.name,
            "iterations": solution.iterations,
            "loop_result": loop.result.name,
            "solver_seconds": solution.wall_time,
        }
        if not solution.converged:
            outcome.klass = REPORTED
            overflow = "the loop overflows too" if not loop.converged else "the loop is finite"
            outcome.detail = solution.result.name + (f" ({overflow})" if solution.result.name == "nonfinite" else "")
        else:
            stats = solution.solutions[0].stats
            verdict = judge(
                flatten((solution.output, solution.h_n, solution.c_n)), reference, loop_vector,
                rtol=stats.rtol, atol=stats.atol, dtype=DTYPES[case.dtype], state_size=case.state_size,
                permuted=permuted, wider=wider,
            )
            outcome.klass, outcome.detail = verdict.klass, verdict.reason
            outcome.metrics.update(verdict_metrics(verdict), rtol=stats.rtol, atol=stats.atol)
            if verdict.klass == SILENT and loop.converged:
                outcome.metrics.update(diagnose(solution, loop))
                outcome.detail += (
                    f"; final residual {outcome.metrics['final_residual']:.2g} of the tolerance, median ‖J_t‖₂ "
                    f"{outcome.metrics['median_jacobian_norm']:.3g} along the solution"
                )
                kept, why = within_residual_contract(solution, verdict.spread)
                outcome.metrics["residual_contract"] = why
                if kept:
                    outcome.klass, outcome.detail = RESIDUAL_AMPLIFIED, why
    outcome.seconds = time.perf_counter() - started
    return outcome


#: Largest share of a solve's error that the first-order model may leave unexplained (second-order
#: terms and the loop's own rounding aside): the rest must be the propagated residual.
UNEXPLAINED_SHARE = 0.1


def within_residual_contract(solution: NetworkSolution, spread: float) -> tuple[bool, str]:
    """Whether a successful solve that misses the elementwise tolerance kept its contract: the
    driver tests the residual, ``|F(X) − X| < atol + rtol·|F(X)|``, and returns ``G = F(X)`` or,
    refined, ``G`` plus corrections that only shrank its residual.

    For every (layer, direction) that stopped by that test, on its own inputs:

    (a) ``G`` is one exact step from such an ``X``: ``|F(G) − G|_{t,j} ≤ 1.01·Σ_i |J_t|_{ji}·
        max_i(atol + rtol·|G_{t−1,i}|)`` plus one step's rounding
        (:func:`~fixedpoint.conditioning.rounding_local`, elementwise);
    (b) its error against the loop on the same inputs is that residual propagated through the
        problem: with ``δ = (I − ∂F)⁻¹(F(G) − G)``
        (:func:`~fixedpoint.forward_error.linearized_correction`),
        ``max|G + δ − loop| ≤ UNEXPLAINED_SHARE·max|G − loop| + 10·spread``.

    Then the error beyond the tolerance is the residual the test admits, amplified by the
    problem's conditioning (up to ``L/(1 − L)`` at a contraction rate ``L``) and not removed by
    the driver's refinement: such a case is ``residual-bound``, listed apart, neither exact nor
    silent.  Returns the verdict
    and a one-line reason.
    """
    worst_residual = worst_unexplained = 0.0
    for index, part in enumerate(solution.solutions):
        system, stats = part.system, part.stats
        if stats.exact_prefix >= system.seq_len:
            continue  # exact by finite termination: no residual was admitted
        value = part.value.detach()
        trajectory = Trajectory.of(system, value)
        wide, previous = trajectory.states, trajectory.previous
        jacobians = trajectory.jacobians().abs()  # (T, B, S, S)
        residual = trajectory.residual().abs()
        slack = (stats.atol + stats.rtol * previous.abs()).amax(-1, keepdim=True)  # (T, B, 1)
        unit = UNIT_ROUNDOFF[value.dtype] * (value.shape[-1] + 8)
        rounding = unit * ((jacobians @ previous.abs().unsqueeze(-1)).squeeze(-1) + wide.abs() + 1.0)
        allowed = 1.01 * jacobians.sum(-1) * slack + rounding
        worst_residual = max(worst_residual, float((residual / allowed).max()))
        error = wide - system.sequential().double()
        unexplained = float((error + linearized_correction(system, value)).abs().max())
        scale = UNEXPLAINED_SHARE * float(error.abs().max()) + 10 * spread
        worst_unexplained = max(worst_unexplained, unexplained / scale if scale > 0 else math.inf)
        if worst_residual > 1 or worst_unexplained > 1:
            return False, (f"layer-direction {index}: residual at {worst_residual:.3g}× what the test admits, "
                           f"error {worst_unexplained:.3g}× beyond the propagated residual")
    return True, (f"the residual met the test (≤ {worst_residual:.2g}× what it admits) and the error is that residual "
                  f"propagated through the problem (unexplained part ≤ {worst_unexplained:.2g}× the allowance)")


def diagnose(solution: NetworkSolution, loop: NetworkSolution) -> dict[str, float]:
    """For a silent solve: the largest final scaled residual ``ρ`` over layers and directions
    (``< 1`` when the solve stopped by the tolerance test, 0 when by finite termination) and the
    median ``‖J_t‖₂`` along the loop's solution (an estimate; the largest median over layers and
    directions): at contraction rate ``L`` a residual ``ρ`` leaves an error of up to
    ``L/(1 − L)·ρ`` tolerances."""
    residual = max(float(part.stats.residual.max()) for part in solution.solutions)
    norms = [estimated_step_norms(part.system, part.value) for part in loop.solutions]  # (T, B) each
    return {
        "final_residual": residual,
        "median_jacobian_norm": max(float(n.median()) for n in norms),
        "max_jacobian_norm": max(float(n.max()) for n in norms),
    }


def verdict_metrics(verdict: Verdict) -> dict[str, float]:
    return {
        "solver_diff": verdict.solver_diff,
        "loop_diff": verdict.loop_diff,
        "permuted_diff": verdict.permuted_diff,
        "wider_diff": verdict.wider_diff,
        "solver_vs_loop": verdict.solver_vs_loop,
        "tolerance_ratio": verdict.tolerance_ratio,
        "conditioning": verdict.conditioning,
    }


# -- module cases ------------------------------------------------------------------------------------
MODULES: dict[str, tuple[str, str, type]] = {
    "RNN-tanh": ("elman", "tanh", fnn.RNN),
    "RNN-relu": ("elman", "relu", fnn.RNN),
    "GRU": ("gru", "tanh", fnn.GRU),
    "LSTM": ("lstm", "tanh", fnn.LSTM),
}


@dataclass(frozen=True)
class ModuleCase:
    """A ``fixedpoint.nn`` module made by ``from_torch`` from ``Network.random(...).to_torch()``.

    Inputs ``(T, B, I)`` (``(B, T, I)`` with ``batch_first``; ``(T, I)`` when ``unbatched``),
    then ``hx``, then the loss weights (one per output tensor): standard normal draws from
    ``torch.Generator().manual_seed(input_seed)``.  The loss is ``Σ weight·output`` over the
    output, ``h_n`` (and ``c_n``); float64 cases compare its gradients too.
    """

    name: str
    module: str
    dtype: str
    solver: str
    adjoint: str
    seq_len: int
    batch: int
    input_size: int
    hidden: int
    layers: int
    bidirectional: bool
    batch_first: bool
    bias: bool
    unbatched: bool
    with_hx: bool
    scale: float
    weight_seed: int
    input_seed: int
    max_steps: int | None

    @property
    def state_size(self) -> int:
        return 2 * self.hidden if self.module == "LSTM" else self.hidden

    @property
    def gradients(self) -> bool:
        return self.dtype == "float64"

    def reference(self) -> torch.nn.RNNBase:
        kind, nonlinearity, _ = MODULES[self.module]
        network = Network.random(
            kind, self.input_size, self.hidden, num_layers=self.layers, bidirectional=self.bidirectional,
            bias=self.bias, nonlinearity=nonlinearity, scale=self.scale, seed=self.weight_seed,
            dtype=DTYPES[self.dtype],
        )
        return Network(network.cells, batch_first=self.batch_first).to_torch()

    def solved(self, reference: torch.nn.RNNBase, solver: str, adjoint: str, max_steps: int | None) -> torch.nn.RNNBase:
        chosen: Solver | str = Sequential(kernel="fused") if solver == "sequential-fused" else solver
        return MODULES[self.module][2].from_torch(reference, solver=chosen, adjoint=adjoint, max_steps=max_steps)

    def tensors(self) -> tuple[Tensor, Any, list[Tensor]]:
        """``input``, ``hx`` (or ``None``) and the loss weights ``[output, h_n(, c_n)]``."""
        dtype = DTYPES[self.dtype]
        generator = torch.Generator().manual_seed(self.input_seed)

        def draw(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=generator, dtype=dtype)

        directions = 2 if self.bidirectional else 1
        if self.unbatched:
            input_shape: tuple[int, ...] = (self.seq_len, self.input_size)
            output_shape: tuple[int, ...] = (self.seq_len, directions * self.hidden)
            state_shape: tuple[int, ...] = (self.layers * directions, self.hidden)
        else:
            outer = (self.batch, self.seq_len) if self.batch_first else (self.seq_len, self.batch)
            input_shape, output_shape = (*outer, self.input_size), (*outer, directions * self.hidden)
            state_shape = (self.layers * directions, self.batch, self.hidden)
        inputs = draw(*input_shape)
        hx: Any = None
        if self.with_hx:
            hx = (draw(*state_shape), draw(*state_shape)) if self.module == "LSTM" else draw(*state_shape)
        weights = [draw(*output_shape)] + [draw(*state_shape) for _ in range(2 if self.module == "LSTM" else 1)]
        return inputs, hx, weights


def draw_module_case(seed: int) -> ModuleCase:
    """The module case of ``nn:seed``, every parameter from ``random.Random(seed)``."""
    rng = random.Random(f"nn:{seed}")
    module = rng.choice(list(MODULES))
    solver = rng.choice(SOLVER_NAMES)
    adjoint = rng.choice(fnn.MODULE_ADJOINTS)
    if adjoint == "fused" and solver not in ("auto", "sequential-fused"):
        adjoint = "auto"  # "fused" needs a forward through torch.nn's kernel: a documented refusal otherwise
    weight_seed = rng.randrange(2**31)
    return ModuleCase(
        name=f"nn:{seed}", module=module, dtype="float64" if rng.random() < 0.8 else "float32",
        solver=solver, adjoint=adjoint, seq_len=log_uniform_int(rng, 1, 200), batch=rng.choice((1, 2, 3, 4)),
        input_size=log_uniform_int(rng, 1, 16),
        hidden=log_uniform_int(rng, 1, 8 if solver in FULL_JACOBIAN_SOLVERS else 16),
        layers=rng.choice((1, 1, 2)), bidirectional=rng.random() < 0.3, batch_first=rng.random() < 0.5,
        bias=rng.random() < 0.8, unbatched=rng.random() < 0.15, with_hx=rng.random() < 0.5,
        scale=log_uniform(rng, 0.1, 3.0), weight_seed=weight_seed, input_seed=weight_seed + 1,
        max_steps=rng.randint(1, 4) if rng.random() < 0.1 else None,
    )


def gradient_scale(gradients: Sequence[Tensor]) -> Tensor:
    """Flat, as :func:`flatten`: each gradient tensor's entries replaced by its largest ``|entry|``.

    A gradient entry is a sum over ``T·B`` terms that may cancel, and the adjoint recurrence's own
    test is relative to ``max |λ|`` per sample: its accuracy is relative to the tensor's scale, not
    to each (possibly cancelled) entry."""
    return flatten([torch.full_like(g, float(g.abs().max()) if g.numel() else 0.0) for g in gradients])


def module_pass(module: torch.nn.RNNBase, case: ModuleCase) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Forward (and for float64 backward) of ``module`` on ``case``'s tensors: the flat outputs
    ``[output, h_n(, c_n)]``, the flat gradients ``[input, hx…, parameters…]`` and their
    :func:`gradient_scale` (both ``None`` without gradients)."""
    inputs, hx, weights = case.tensors()
    inputs.requires_grad_(case.gradients)
    states = [] if hx is None else list(hx) if isinstance(hx, tuple) else [hx]
    for state in states:
        state.requires_grad_(case.gradients)
    given = None if hx is None else tuple(states) if case.module == "LSTM" else states[0]
    with torch.set_grad_enabled(case.gradients):
        output, final = module(inputs, given)
        outputs = [output, *(final if isinstance(final, tuple) else (final,))]
        if not case.gradients:
            return flatten(outputs), None, None
        loss = sum((weight * value).sum() for weight, value in zip(weights, outputs))
        leaves = [inputs, *states, *(parameter for _, parameter in module.named_parameters())]
        gradients = torch.autograd.grad(loss, leaves, allow_unused=True)
    gradients = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, gradients)]
    return flatten(outputs), flatten(gradients), gradient_scale(gradients)


def run_module_case(case: ModuleCase) -> Outcome:
    """``case``'s module against ``torch.nn`` and against the loop module (sequential solve and
    adjoint), outputs and gradients each by the rule with the dtype's default tolerances."""
    started = time.perf_counter()
    params = dataclasses.asdict(case)
    params.pop("name")
    outcome = Outcome("nn", case.name, CRASH, params)
    try:
        reference = case.reference()
        expected = module_pass(reference, case)
        loop = module_pass(case.solved(reference, "sequential", "sequential", None), case)
    except Exception as error:
        outcome.detail = "building the case, torch.nn or the loop module failed: " + exception_summary(error)
        outcome.seconds = time.perf_counter() - started
        return outcome
    try:
        actual = module_pass(case.solved(reference, case.solver, case.adjoint, case.max_steps), case)
    except (InputError, NoConvergence) as error:
        outcome.klass, outcome.detail = REPORTED, exception_summary(error)
    except Exception as error:
        outcome.klass, outcome.detail = CRASH, exception_summary(error)
    else:
        dtype = DTYPES[case.dtype]
        rtol, atol = DEFAULT_TOLERANCES[dtype]
        parts = [("forward", 0)] + ([("gradient", 1)] if case.gradients else [])
        verdicts = {
            label: judge(actual[index], expected[index], loop[index], rtol=rtol, atol=atol, dtype=dtype,
                         state_size=case.state_size, scale=expected[2] if label == "gradient" else None)
            for label, index in parts
        }
        if verdicts["forward"].klass == SILENT:
            _recheck_module_forward(case, reference, expected[0], loop[0], actual[0], verdicts["forward"])
        if "gradient" in verdicts and verdicts["gradient"].klass == SILENT and verdicts["forward"].klass != SILENT:
            # The gradient is taken at the forward's answer: judge the adjoint against the exact
            # (sequential) adjoint at that same answer; the rest is the forward's, judged above.
            same_forward = module_pass(case.solved(reference, case.solver, "sequential", case.max_steps), case)
            again = judge(actual[1], same_forward[1], same_forward[1], rtol=rtol, atol=atol, dtype=dtype,
                          state_size=case.state_size, scale=same_forward[2])
            if again.klass in (EXACT, ILL_CONDITIONED):
                verdicts["gradient"].klass = RESIDUAL_AMPLIFIED
                verdicts["gradient"].reason = (
                    f"the gradient is the exact adjoint's at the forward's answer ({again.tolerance_ratio:.2g}× the "
                    "tolerance from it); its distance from torch.nn is the forward's residual, amplified")
            else:
                verdicts["gradient"].reason += (
                    f"; against the exact adjoint at the forward's answer: {again.tolerance_ratio:.3g}× the tolerance")
        order = (NONFINITE, SILENT, RESIDUAL_AMPLIFIED, ILL_CONDITIONED, EXACT)
        worst_label = min(verdicts, key=lambda label: order.index(verdicts[label].klass))
        worst = verdicts[worst_label]
        outcome.klass = worst.klass
        outcome.detail = f"{worst_label}: {worst.reason}" if worst.reason else ""
        for label, verdict in verdicts.items():
            outcome.metrics.update({f"{label}_{key}": value for key, value in verdict_metrics(verdict).items()})
        outcome.metrics.update(verdict_metrics(worst))
    outcome.seconds = time.perf_counter() - started
    return outcome


def _recheck_module_forward(
    case: ModuleCase, reference: torch.nn.RNNBase, expected: Tensor, loop: Tensor, actual: Tensor, verdict: Verdict
) -> None:
    """A module's forward that the rule flags: solve the same network, inputs and solver with
    :func:`solve_network` (the solve the module runs), and if that reproduces the module's output,
    apply :func:`within_residual_contract` to its (layer, direction) solutions; ``verdict`` is
    updated in place."""
    inputs, hx, _ = case.tensors()
    sequence = inputs.unsqueeze(1) if case.unbatched else inputs.transpose(0, 1) if case.batch_first else inputs
    if hx is not None and case.unbatched:
        hx = tuple(part.unsqueeze(1) for part in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)
    network = Network(Network.from_torch(reference).cells, batch_first=False)
    solver = Sequential(kernel="fused") if case.solver == "sequential-fused" else SOLVERS[case.solver]()
    solution = solve_network(network, sequence, hx, solver, max_steps=case.max_steps, throw=False)
    output = solution.output.squeeze(1) if case.unbatched else solution.output.transpose(0, 1) if case.batch_first else solution.output
    finals = [solution.h_n, solution.c_n] if solution.c_n is not None else [solution.h_n]
    if case.unbatched:
        finals = [final.squeeze(1) for final in finals]
    if not solution.converged or not torch.equal(flatten([output, *finals]), actual):
        return  # not the module's solve: the verdict stands
    spread = max(verdict.loop_diff, float((loop - expected).abs().max()))
    kept, why = within_residual_contract(solution, spread)
    if kept:
        verdict.klass, verdict.reason = RESIDUAL_AMPLIFIED, why
    else:
        verdict.reason += f"; {why}"


# -- command-line cases --------------------------------------------------------------------------------
CLI_OK = "ok"
CLI_CLASSES = (CLI_OK, "traceback", "wrong exit", "multi-line", "slow", "hang")
#: A small solve that succeeds: the output-channel cases write its report.
SMALL_SOLVE = ["solve", "--cell", "gru", "--seq-len", "8", "--batch", "2", "--hidden", "4"]


@dataclass(frozen=True)
class CliCase:
    """``fixedpoint ARGV`` with stdout to ``stdout``: ``"pipe"`` (read back), ``"full"``
    (``/dev/full``: every write fails) or ``"closed"`` (a pipe whose reading end is closed).
    ``{name}`` in an argument is a file of :func:`write_cli_files`.  ``fast``: no large
    allocation or long run, so the test slice may take it."""

    name: str
    argv: tuple[str, ...]
    stdout: str = "pipe"
    fast: bool = True


def cli_cases() -> list[CliCase]:
    """The bad-input matrix: each case must exit 2 with one line on stderr, at once."""
    def case(name: str, *argv: str, stdout: str = "pipe", fast: bool = True) -> CliCase:
        return CliCase(name, tuple(argv), stdout, fast)

    return [
        # sizes that cannot be allocated or run
        case("solve-seq-len-1e9-no-cell", "solve", "--seq-len", "1000000000", fast=False),
        case("solve-seq-len-1e9", "solve", "--cell", "gru", "--seq-len", "1000000000", fast=False),
        case("solve-hidden-1e6", "solve", "--cell", "gru", "--hidden", "1000000", fast=False),
        case("solve-batch-1e9", "solve", "--cell", "gru", "--batch", "1000000000", fast=False),
        case("solve-seq-len-int64-max", "solve", "--cell", "gru", "--seq-len", "9223372036854775807", fast=False),
        case("solve-layers-1e6", "solve", "--cell", "elman", "--layers", "1000000", "--hidden", "8", "--seq-len", "4",
             fast=False),
        case("check-hidden-1e6", "check", "--cell", "gru", "--hidden", "1000000", fast=False),
        case("approx-hidden-1e6", "approx", "--cell", "gru", "--hidden", "1000000", fast=False),
        case("train-hidden-1e6", "train", "--model", "starsaber", "--task", "first", "--hidden", "1000000", fast=False),
        case("train-batch-size-1e9", "train", "--model", "starsaber", "--task", "first", "--batch-size", "1000000000",
             fast=False),
        # output channels that fail
        case("json-to-dev-full", *SMALL_SOLVE, "--json", stdout="full"),
        case("text-to-dev-full", *SMALL_SOLVE, stdout="full"),
        case("json-to-closed-pipe", *SMALL_SOLVE, "--json", stdout="closed"),
        case("text-to-closed-pipe", *SMALL_SOLVE, stdout="closed"),
        # files
        case("weights-pickle-with-code", "solve", "--weights", "{code_pickle}"),
        case("inputs-pickle-with-code", "solve", "--cell", "gru", "--inputs", "{code_pickle}"),
        case("weights-text-file", "solve", "--weights", "{text}"),
        case("inputs-text-file", "solve", "--cell", "gru", "--inputs", "{text}"),
        case("weights-missing", "solve", "--weights", "{missing}"),
        case("inputs-missing", "solve", "--cell", "gru", "--inputs", "{missing}"),
        case("weights-directory", "solve", "--weights", "{directory}"),
        case("weights-holding-a-tensor", "solve", "--weights", "{tensor}"),
        case("inputs-holding-weights", "solve", "--cell", "gru", "--inputs", "{gru}"),
        case("inputs-wrong-features", "solve", "--weights", "{gru}", "--inputs", "{wide_tensor}"),
        # numbers
        case("seq-len-negative", "solve", "--cell", "gru", "--seq-len", "-5"),
        case("batch-zero", "solve", "--cell", "gru", "--batch", "0"),
        case("hidden-not-a-number", "solve", "--cell", "gru", "--hidden", "abc"),
        case("scale-negative", "solve", "--cell", "gru", "--scale", "-1"),
        case("rtol-nan", "solve", "--cell", "gru", "--rtol", "nan"),
        case("max-iter-zero", "solve", "--cell", "gru", "--max-iter", "0"),
        case("damping-out-of-range", "solve", "--cell", "gru", "--solver", "picard", "--damping", "1.5"),
        case("damping-nan", "solve", "--cell", "gru", "--solver", "picard", "--damping", "nan"),
        case("seed-negative", "solve", "--cell", "gru", "--seed", "-1"),
        case("seed-too-large", "solve", "--cell", "gru", "--seed", "9223372036854775807"),
        case("check-seq-len-zero", "check", "--cell", "gru", "--seq-len", "0"),
        case("approx-depths-zero", "approx", "--cell", "gru", "--depths", "0"),
        case("train-epochs-zero", "train", "--model", "starsaber", "--task", "first", "--epochs", "0"),
        case("train-lr-negative", "train", "--model", "starsaber", "--task", "first", "--lr", "-1"),
        # unknown and conflicting options
        case("unknown-option", "solve", "--cell", "gru", "--frobnicate"),
        case("unknown-command", "frobnicate"),
        case("no-command"),
        case("unknown-dtype", "solve", "--cell", "gru", "--dtype", "float16"),
        case("damping-without-picard", "solve", "--cell", "gru", "--solver", "anderson", "--damping", "0.5"),
        case("memory-without-anderson", "solve", "--cell", "gru", "--solver", "picard", "--memory", "3"),
        case("nonlinearity-with-gru", "solve", "--cell", "gru", "--nonlinearity", "relu"),
        case("weights-with-scale", "solve", "--weights", "{gru}", "--scale", "2"),
        case("weights-with-other-cell", "solve", "--weights", "{gru}", "--cell", "lstm"),
        case("weights-with-other-hidden", "solve", "--weights", "{gru}", "--hidden", "5"),
        case("inputs-with-other-seq-len", "solve", "--cell", "gru", "--hidden", "4", "--inputs", "{tensor}",
             "--seq-len", "9"),
    ] + ([] if torch.cuda.is_available() else [case("cuda-without-cuda", *SMALL_SOLVE, "--device", "cuda")])


class CodeCarrier:
    """Unpickling this runs ``os.system("true")`` (harmless): a checkpoint that carries code."""

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return os.system, ("true",)


def write_cli_files(folder: Path) -> dict[str, str]:
    """The files the command-line cases name, written into ``folder``."""
    generator = torch.Generator().manual_seed(0)
    files = {
        "code_pickle": folder / "code.pt",
        "text": folder / "notes.txt",
        "missing": folder / "missing.pt",
        "directory": folder / "a-directory.pt",
        "tensor": folder / "tensor.pt",
        "wide_tensor": folder / "wide-tensor.pt",
        "gru": folder / "gru.pt",
    }
    torch.save(CodeCarrier(), files["code_pickle"])
    files["text"].write_text("not a checkpoint\n", encoding="utf-8")
    files["directory"].mkdir(exist_ok=True)
    torch.save(torch.randn(7, 2, 3, generator=generator, dtype=torch.float64), files["tensor"])  # (T, B, I) for gru.pt
    torch.save(torch.randn(7, 2, 5, generator=generator, dtype=torch.float64), files["wide_tensor"])
    torch.save(Network.random("gru", 3, 4, seed=0).to_torch().state_dict(), files["gru"])
    return {name: str(path) for name, path in files.items()}


def cli_environment(threads: int) -> dict[str, str]:
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    environment.pop("PYTHONWARNINGS", None)
    return environment


def run_cli(
    argv: Sequence[str], stdout: str, *, timeout: float, memory_bytes: int, threads: int
) -> tuple[int | None, str, float]:
    """``python -m fixedpoint ARGV``: ``(exit status or None on a timeout, stderr, wall seconds)``."""

    def limit_memory() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    command = [sys.executable, "-m", "fixedpoint", *argv]
    reader = writer = None
    if stdout == "full":
        target: Any = open(os.devnull if not Path("/dev/full").exists() else "/dev/full", "wb")
    elif stdout == "closed":
        reader, writer = os.pipe()
        os.close(reader)
        target = writer
    else:
        target = subprocess.PIPE
    started = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=target, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=ROOT,
        env=cli_environment(threads), preexec_fn=limit_memory if memory_bytes else None,
    )
    if writer is not None:
        os.close(writer)
    elif stdout == "full":
        target.close()
    try:
        _, error = process.communicate(timeout=timeout)
        status: int | None = process.returncode
    except subprocess.TimeoutExpired:
        process.kill()
        _, error = process.communicate()
        status = None
    seconds = time.perf_counter() - started
    return status, error.decode("utf-8", "replace"), seconds


def classify_cli(case: CliCase, status: int | None, stderr: str, seconds: float, startup: float) -> tuple[str, str]:
    """The class of one command-line run and a one-line detail."""
    lines = stderr.strip().splitlines()
    last = lines[-1][:160] if lines else ""
    if status is None:
        return "hang", f"killed after {seconds:.0f} s; stderr: {last}"
    if "Traceback" in stderr:
        return "traceback", f"exit {status}; {last}"
    quiet_pipe = case.stdout == "closed" and not lines
    if status != 2 and not quiet_pipe:
        return "wrong exit", f"exit {status}; stderr {len(lines)} lines: {last}"
    if len(lines) != 1 and not quiet_pipe:
        return "multi-line", f"{len(lines)} lines on stderr: {last}"
    if seconds > startup + 1.0:
        return "slow", f"{seconds:.1f} s, {seconds - startup:.1f} s beyond the start; {last}"
    return CLI_OK, (f"quiet, exit {status}" if quiet_pipe else last)


def measure_startup(threads: int, memory_bytes: int, runs: int = 3) -> float:
    """Median wall time of a command that fails at once (``solve --seq-len 0``): the interpreter,
    torch and the package starting, which no bad input can avoid."""
    times = [run_cli(["solve", "--seq-len", "0"], "pipe", timeout=60, memory_bytes=memory_bytes, threads=threads)[2]
             for _ in range(runs)]
    return statistics.median(times)


def run_cli_case(
    case: CliCase, files: dict[str, str], *, startup: float, timeout: float, memory_bytes: int, threads: int
) -> Outcome:
    argv = [argument.format(**files) if "{" in argument else argument for argument in case.argv]
    attempts = 0
    while True:
        attempts += 1
        status, stderr, seconds = run_cli(argv, case.stdout, timeout=timeout, memory_bytes=memory_bytes, threads=threads)
        # The report names the case's files by their folder's placeholder, not this machine's paths.
        stderr = stderr.replace(os.path.dirname(files["text"]), "FILES").replace(str(ROOT), ".")
        klass, detail = classify_cli(case, status, stderr, seconds, startup)
        # One more try for "slow" alone: the interpreter's start (importing torch) varies by a
        # second on a busy machine, and a case is slow only if it is slow twice.
        if klass != "slow" or attempts == 2:
            break
    params = {"argv": " ".join(case.argv), "stdout": case.stdout}
    metrics = {"exit": status, "stderr_lines": len(stderr.strip().splitlines()), "wall": seconds, "startup": startup,
               "attempts": attempts}
    return Outcome("cli", f"cli:{case.name}", klass, params, metrics, detail, seconds)


# -- report ----------------------------------------------------------------------------------------
REPORT = ROOT / "docs" / "reliability.md"
#: The generated part of the report lies between these lines; text outside them is kept.
BEGIN_MARK = "<!-- generated by analysis/fuzz.py: everything up to the end mark is rewritten -->"
END_MARK = "<!-- end of the generated part -->"


def machine() -> dict[str, Any]:
    """Where the run happened: date, platform, CPU model, torch and its thread count."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def number(value: Any) -> str:
    """A short rendering of a measurement for the tables."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "−inf"
        return f"{value:.3g}"
    return str(value)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    escaped = [cell.replace("|", "\\|") for cell in header]
    lines = ["| " + " | ".join(escaped) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def count_table(
    outcomes: Sequence[Outcome], key: Callable[[Outcome], str], keys: Sequence[str], classes: Sequence[str], title: str
) -> list[str]:
    """Cases per ``key`` (rows, in ``keys`` order) and class (columns)."""
    rows = []
    for name in keys:
        chosen = [o for o in outcomes if key(o) == name]
        if chosen:
            rows.append([name, *(sum(o.klass == klass for o in chosen) or "" for klass in classes), len(chosen)])
    return table([title, *(SHORT_NAMES.get(klass, klass) for klass in classes), "cases"], rows)


SHORT_NAMES = {ILL_CONDITIONED: "exact (ill-conditioned)", RESIDUAL_AMPLIFIED: "residual-bound"}


def describe_solve(params: dict[str, Any]) -> list[str]:
    """Columns that identify a solve case: cell, dtype, ``T×B×I→H``, ``L``, directions, scales."""
    sizes = f"{params['seq_len']}×{params['batch']}×{params['input_size']}→{params['hidden']}"
    directions = "bi" if params["bidirectional"] else "uni"
    hx = "–" if params["hx_scale"] is None else number(params["hx_scale"])
    return [params["solver"], params["cell"], params["dtype"], sizes, f"{params['layers']} {directions}",
            number(params["scale"]), number(params["input_scale"]), hx, number(params["max_steps"])]


SOLVE_HEADER = ["seed", "class", "solver", "cell", "dtype", "T×B×I→H", "layers", "W_hh ×", "x ×", "hx ×", "max_steps"]


def solve_rows(outcomes: Sequence[Outcome]) -> list[list[Any]]:
    rows = []
    for o in outcomes:
        metrics = o.metrics
        rows.append([f"`{o.name}`", SHORT_NAMES.get(o.klass, o.klass), *describe_solve(o.params),
                     number(metrics.get("solver_diff")), number(metrics.get("loop_diff")),
                     number(metrics.get("tolerance_ratio")), number(metrics.get("conditioning")), o.detail])
    return rows


def module_rows(outcomes: Sequence[Outcome]) -> list[list[Any]]:
    rows = []
    for o in outcomes:
        p, m = o.params, o.metrics
        layout = ("batch_first" if p["batch_first"] else "(T, B, I)") if not p["unbatched"] else "unbatched"
        directions = "bi" if p["bidirectional"] else "uni"
        sizes = f"{p['seq_len']}×{p['batch']}×{p['input_size']}→{p['hidden']}, {p['layers']} {directions}"
        rows.append([f"`{o.name}`", SHORT_NAMES.get(o.klass, o.klass), p["module"], p["dtype"], p["solver"], p["adjoint"],
                     sizes, layout, number(m.get("forward_solver_diff")), number(m.get("gradient_solver_diff")),
                     number(m.get("tolerance_ratio")), number(m.get("conditioning")), o.detail])
    return rows


MODULE_HEADER = ["seed", "class", "module", "dtype", "solver", "adjoint", "T×B×I→H", "layout",
                 "output max|diff|", "gradient max|diff|", "tol. ratio", "κ", "detail"]


def markdown(outcomes: Sequence[Outcome], info: dict[str, Any], settings: dict[str, Any]) -> str:
    """The generated part of docs/reliability.md."""
    solves = [o for o in outcomes if o.part == "solve"]
    modules = [o for o in outcomes if o.part == "nn"]
    commands = [o for o in outcomes if o.part == "cli"]
    invocation = " ".join(["python analysis/fuzz.py", settings["command"]]).strip()
    lines = [
        "# Reliability: seeded fuzzing against torch.nn", "",
        f"Generated by `make fuzz` (`{invocation}`) on {info['date']}: "
        f"{info['platform']}, {info['cpu']} ({info['cores']} cores), Python {info['python']}, torch {info['torch']} "
        f"with {info['torch_threads']} thread(s); wall time {settings['wall']:.0f} s "
        f"(solve {settings['solve_wall']:.0f} s, modules {settings['nn_wall']:.0f} s, "
        f"command line {settings['cli_wall']:.0f} s).",
        "",
        "Every case replays alone: `python analysis/fuzz.py --seed N` (a solve case), `--seed nn:N`, "
        "`--seed cli:NAME` or `--seed regression:NAME` prints its parameters, measurements and class.",
        "",
        "## 1. The rule",
        "",
        "Each solve case runs one solver on a random network and input (`python analysis/fuzz.py --help`, "
        "`draw_solve_case`) beside `torch.nn` (`network.to_torch()`) and the sequential Python loop "
        "(`Sequential()`, the ground truth with the solvers' rounding model).  With `ref` the `torch.nn` answer "
        "(output, `h_n`, `c_n`), `sol` the solver's, `loop` the loop's, `u` the unit roundoff (2⁻⁵³, 2⁻²⁴), "
        "`M = max(|ref|, 1)`, `S` the state size (`H`, LSTM `2H`) and `rtol`, `atol` the tolerances of the solve "
        "(`solution.stats`):",
        "",
        "- `loop_diff = max|loop − ref|`, `solver_diff = max|sol − ref|`;",
        "- `permuted_diff = max|loop′ − loop|`, `loop′` the loop on the network with its hidden units permuted: "
        "the same mathematics summed in another order, as another CPU's GEMM may round it (docs/testing.md), so "
        "the rule does not rest on this machine's loop and `torch.nn` happening to round alike;",
        "- `wider_diff = max|loop64 − loop|` for a float32 solve case, `loop64` the loop on the same numbers in "
        "float64: how far float32 rounding moves the loop (and `torch.nn`) from the exact solution, which the "
        "driver's refinement approaches more closely (docs/forward_error.md);",
        "- `spread = max(loop_diff, permuted_diff, wider_diff)`: how far rounding alone moves the answer;",
        "- tolerance ratio `max_i |sol_i − ref_i| / (atol + rtol·|ref_i|)`;",
        "- conditioning `κ = max(1, spread / ((S + 8)·u·M))`: how many single-step rounding bounds (a length-`S` "
        "dot product and the gate arithmetic) the spread spans; `κ > 1` means the problem amplified rounding by "
        "about `κ`.",
        "",
        "A successful solve is **explained** when `solver_diff ≤ 10·max(spread, u·M)` (within 10× of the loop) "
        "or the tolerance ratio is `≤ κ` (within the requested tolerance amplified by the conditioning).  An "
        "explained case is **exact** when its tolerance ratio is `≤ 1` or `solver_diff ≤ 10·u·M`, otherwise "
        "**exact (ill-conditioned: the loop itself is moved by rounding as much)**.  An unexplained one is "
        "**silent**, a real miss; so are **non-finite** (NaN/Inf returned as success) and **crash** (an "
        "exception other than `InputError`/`NoConvergence`).  **Reported failure**: the result was not "
        "`successful`, or a documented error was raised.",
        "",
        "When the loop overflows and the solver reports a finite success, the case is silent unless the answer "
        "comes within 2¹⁶ of the dtype's largest value, where whether a sum overflows depends on its order "
        "(then: ill-conditioned).",
        "",
        "A success the rule does not explain gets one more look.  The driver stops when "
        "`|F(X) − X| < atol + rtol·|F(X)|`; a residual that size can leave an error of up to `L/(1 − L)` "
        "tolerances at contraction rate `L` (`Σ_k ‖J_t ⋯ J_{k+1}‖` of them in general), so the driver then "
        "estimates the answer's error by linearised propagation of the residual and adds that correction while "
        "the estimate exceeds the tolerance (`fixedpoint.forward_error`; at most three corrections, each kept "
        "only if it shrinks the next).  The case is **residual-bound** "
        "when every (layer, direction) that stopped by the test kept that promise on its own inputs (the "
        "residual of the returned value is at most one exact step from the tolerance) and its error against "
        "the loop is that residual propagated through the problem: with the linearised correction "
        "`δ = (I − ∂F)⁻¹(F(G) − G)` (`fixedpoint.forward_error.linearized_correction`, exact Jacobians, "
        "float64), `max|G + δ − loop| ≤ 0.1·max|G − loop| + 10·spread`.  Such a case is not exact — its error "
        "exceeds the tolerance: the refinement stopped short — and not a broken promise.  Only what fails this "
        "too is "
        "**silent**.  Module cases apply "
        "the rule to the outputs and, in float64, to all gradients (input, `hx`, parameters; `loop` is the "
        "module with `solver=\"sequential\", adjoint=\"sequential\"`, tolerances the dtype's defaults, no "
        "permuted loop); a gradient's tolerance is `atol + rtol·max|ref|` over its tensor, since each entry is "
        "a sum of `T·B` terms that may cancel and the adjoint recurrence's own test is relative to `max|λ|`.",
        "",
        "Command-line cases (`python -m fixedpoint` in a subprocess, address space limited to "
        f"{settings['cli_memory_gb']:g} GiB, killed after {settings['cli_timeout']:g} s) expect exit status 2, one "
        "line on stderr, no `Traceback`, and an end within 1 s beyond the start of the interpreter (the median "
        "time of `fixedpoint solve --seq-len 0`"
        + (f", here {settings['startup']:.2f} s" if "startup" in settings else "")
        + ": importing torch alone can take longer than 1 s; a case over the limit runs once more, and is slow only "
        "if it is slow twice, since that start varies by a second on a busy machine); a closed stdout pipe may also "
        "end quietly.",
        "",
    ]
    lines += ["## 2. Summary", ""]
    summary_rows = []
    parts = (("solve", solves, SOLVE_CLASSES), ("nn", modules, SOLVE_CLASSES), ("command line", commands, CLI_CLASSES))
    for part, chosen, classes in parts:
        if chosen:
            counts = ", ".join(
                f"{SHORT_NAMES.get(k, k)} {n}" for k in classes if (n := sum(o.klass == k for o in chosen))
            )
            summary_rows.append([part, len(chosen), counts, sum(o.miss for o in chosen)])
    lines += table(["part", "cases", "per class", "real misses"], summary_rows) + [""]
    if REGRESSIONS and solves:
        names = ", ".join(f"`regression:{name}`" for name in REGRESSIONS)
        lines += [f"The solve cases include {len(REGRESSIONS)} named regression(s) ({names}) besides the seeded ones.", ""]
    if solves:
        seconds = [o.seconds for o in solves]
        lines += [f"Solve cases took {statistics.mean(seconds):.2f} s on average "
                  f"(median {statistics.median(seconds):.2f} s, "
                  f"longest {max(seconds):.1f} s).", ""]
        lines += ["## 3. Solve cases", "", "Per solver:", ""]
        lines += count_table(solves, lambda o: o.params["solver"], SOLVER_NAMES, SOLVE_CLASSES, "solver") + [""]
        lines += ["Per cell:", ""]
        lines += count_table(solves, lambda o: o.params["cell"], list(CELLS), SOLVE_CLASSES, "cell") + [""]
        lines += ["Per dtype:", ""]
        lines += count_table(solves, lambda o: o.params["dtype"], list(DTYPES), SOLVE_CLASSES, "dtype") + [""]
    if modules:
        lines += ["## 4. Module cases (`fixedpoint.nn`)", ""]
        lines += count_table(modules, lambda o: o.params["module"], list(MODULES), SOLVE_CLASSES, "module") + [""]
    if commands:
        lines += ["## 5. Command line", ""]
        lines += table(["case", "class", "arguments", "stdout", "exit", "seconds", "detail"], [
            [f"`{o.name}`", o.klass, f"`{o.params['argv']}`", o.params["stdout"], number(o.metrics["exit"]),
             f"{o.seconds:.1f}", o.detail] for o in commands]) + [""]
    lines += ["## 6. Every case that is not exact", ""]
    solve_misses = [o for o in solves if o.miss]
    module_misses = [o for o in modules if o.miss]
    columns = [*SOLVE_HEADER, "max|diff|", "loop_diff", "tol. ratio", "κ", "detail"]
    lines += [f"### Real misses: {len(solve_misses)} solve, {len(module_misses)} module, "
              f"{sum(o.miss for o in commands)} command-line (in the command-line table above)", ""]
    if solve_misses:
        lines += table(columns, solve_rows(solve_misses)) + [""]
        lines += miss_summary(solve_misses)
    if module_misses:
        lines += table(MODULE_HEADER, module_rows(module_misses)) + [""]
    if not (solve_misses or module_misses):
        lines += ["None.", ""]
    reported = [o for o in solves if o.klass == REPORTED]
    reported_modules = [o for o in modules if o.klass == REPORTED]
    lines += [f"### Reported failures: {len(reported)} solve, {len(reported_modules)} module", ""]
    if reported:
        lines += table(columns, solve_rows(reported)) + [""]
    if reported_modules:
        lines += table(MODULE_HEADER, module_rows(reported_modules)) + [""]
    for klass, title in ((ILL_CONDITIONED, "Exact, ill-conditioned"),
                         (RESIDUAL_AMPLIFIED, "Residual-bound: the residual met the tolerance, the error did not "
                                              "(cause verified case by case: the refinement stopped short)")):
        chosen = [o for o in solves if o.klass == klass]
        chosen_modules = [o for o in modules if o.klass == klass]
        lines += [f"### {title}: {len(chosen)} solve, {len(chosen_modules)} module", ""]
        if chosen:
            lines += table(columns, solve_rows(chosen)) + [""]
        if chosen_modules:
            lines += table(MODULE_HEADER, module_rows(chosen_modules)) + [""]
    return "\n".join(lines).rstrip() + "\n"


def miss_summary(misses: Sequence[Outcome]) -> list[str]:
    """What the silent solve cases have in common, from their measurements."""
    silent = [o for o in misses if o.klass == SILENT and "final_residual" in o.metrics]
    if not silent:
        return []

    def span(key: str) -> str:
        values = [o.metrics[key] for o in silent]
        return f"{min(values):.3g}–{max(values):.3g}"

    stopped = sum(0 < o.metrics["final_residual"] < 1 for o in silent)
    return [
        f"Of the {len(silent)} silent solve cases, {stopped} stopped on the termination test (final scaled residual "
        f"below 1; range {span('final_residual')}), with tolerance ratios {span('tolerance_ratio')} and median "
        f"‖J_t‖₂ {span('median_jacobian_norm')} along the solution.  The test bounds the residual "
        "`|F(X) − X|`, not the error: at contraction rate `L` a residual `ρ` tolerances leaves an error of up to "
        "`L/(1 − L)·ρ` tolerances.",
        "",
    ]


def write_report(path: Path, generated: str) -> None:
    """Write ``generated`` between the marks of ``path``, keeping any text outside them."""
    before, after = "", ""
    if path.exists():
        text = path.read_text(encoding="utf-8")
        if BEGIN_MARK in text and END_MARK in text:
            before = text[: text.index(BEGIN_MARK)]
            after = text[text.index(END_MARK) + len(END_MARK):]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{before}{BEGIN_MARK}\n{generated}{END_MARK}{after or chr(10)}", encoding="utf-8")


def json_safe(value: Any) -> Any:
    """Non-finite floats as strings, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


# -- running -----------------------------------------------------------------------------------------
class Progress:
    """One line on stderr, rewritten in place, when stderr is a terminal."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()

    def show(self, part: str, done: int, total: int, outcomes: Sequence[Outcome]) -> None:
        if not self.enabled:
            return
        misses = sum(o.miss for o in outcomes)
        sys.stderr.write(f"\r{part} {done}/{total}: {misses} real misses so far\033[K")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def replay(name: str, args: argparse.Namespace) -> Outcome:
    """Run the one case ``name`` names: ``N``, ``nn:N``, ``cli:NAME`` or ``regression:NAME``."""
    if name.startswith("regression:"):
        key = name.split(":", 1)[1]
        if key not in REGRESSIONS:
            raise SystemExit(f"fuzz: no regression {key!r}; known: {', '.join(REGRESSIONS)}")
        return run_solve_case(REGRESSIONS[key])
    if name.startswith("nn:"):
        return run_module_case(draw_module_case(parse_seed(name.split(":", 1)[1])))
    if name.startswith("cli:"):
        key = name.split(":", 1)[1]
        cases = {case.name: case for case in cli_cases()}
        if key not in cases:
            raise SystemExit(f"fuzz: no command-line case {key!r}; known: {', '.join(cases)}")
        memory = int(args.cli_memory_gb * 2**30)
        startup = measure_startup(args.threads, memory)
        with tempfile.TemporaryDirectory() as folder:
            files = write_cli_files(Path(folder))
            return run_cli_case(cases[key], files, startup=startup, timeout=args.cli_timeout, memory_bytes=memory,
                                threads=args.threads)
    return run_solve_case(draw_solve_case(parse_seed(name)))


def parse_seed(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if seed < 0:
        raise SystemExit(f"fuzz: a seed is an integer ≥ 0 (or nn:N, cli:NAME, regression:NAME), got {text!r}")
    return seed


def print_outcome(outcome: Outcome) -> None:
    print(f"case {outcome.name} ({outcome.part}): {outcome.klass}")
    if outcome.detail:
        print(f"  detail: {outcome.detail}")
    for title, values in (("parameters", outcome.params), ("measurements", outcome.metrics)):
        print(f"  {title}:")
        for key, value in values.items():  # parameters in full, so they can be typed back in
            print(f"    {key}: {number(value) if title == 'measurements' else repr(value)}")
    print(f"  seconds: {outcome.seconds:.2f}")


def run_all(args: argparse.Namespace) -> tuple[list[Outcome], dict[str, float]]:
    """Every solve case, the regressions, the module cases and the command-line matrix."""
    progress = Progress()
    outcomes: list[Outcome] = []
    walls: dict[str, float] = {}
    started = time.perf_counter()
    solve_names = [draw_solve_case(seed) for seed in range(args.start_seed, args.start_seed + args.cases)]
    solve_names += list(REGRESSIONS.values())
    for index, case in enumerate(solve_names):
        outcomes.append(run_solve_case(case))
        progress.show("solve", index + 1, len(solve_names), outcomes)
    walls["solve_wall"] = time.perf_counter() - started
    started = time.perf_counter()
    for index, seed in enumerate(range(args.start_seed, args.start_seed + args.nn_cases)):
        outcomes.append(run_module_case(draw_module_case(seed)))
        progress.show("nn", index + 1, args.nn_cases, outcomes)
    walls["nn_wall"] = time.perf_counter() - started
    started = time.perf_counter()
    if not args.no_cli:
        memory = int(args.cli_memory_gb * 2**30)
        walls["startup"] = measure_startup(args.threads, memory)
        cases = cli_cases()
        with tempfile.TemporaryDirectory() as folder:
            files = write_cli_files(Path(folder))
            for index, case in enumerate(cases):
                outcomes.append(run_cli_case(case, files, startup=walls["startup"], timeout=args.cli_timeout,
                                             memory_bytes=memory, threads=args.threads))
                progress.show("command line", index + 1, len(cases), outcomes)
    walls["cli_wall"] = time.perf_counter() - started
    progress.close()
    return outcomes, walls


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000, help="solve cases (default 1000)")
    parser.add_argument("--nn-cases", type=int, default=200, help="fixedpoint.nn cases (default 200)")
    parser.add_argument("--start-seed", type=int, default=0, help="first seed of both (default 0)")
    parser.add_argument("--seed", help="replay one case and print it: N, nn:N, cli:NAME or regression:NAME")
    parser.add_argument("--no-cli", action="store_true", help="skip the command-line matrix")
    parser.add_argument("--cli-timeout", type=float, default=20.0,
                        help="seconds before a command counts as a hang (default 20)")
    parser.add_argument("--cli-memory-gb", type=float, default=8.0,
                        help="address-space limit of each command (default 8 GiB)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: a replay rounds alike on any machine, "
                        "and no thread waits for a busy core)")
    parser.add_argument("--json", metavar="PATH", help="also write every case's parameters and measurements as JSON")
    parser.add_argument("--report", default=str(REPORT), help=f"the Markdown report (default {REPORT.relative_to(ROOT)})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cases < 0 or args.nn_cases < 0 or args.start_seed < 0 or args.threads < 1:
        raise SystemExit("fuzz: --cases, --nn-cases and --start-seed must be ≥ 0, --threads ≥ 1")
    torch.set_num_threads(args.threads)
    if args.seed is not None:
        outcome = replay(args.seed, args)
        print_outcome(outcome)
        return 0
    started = time.perf_counter()
    outcomes, walls = run_all(args)
    command = " ".join(sys.argv[1:]) if argv is None else " ".join(argv)
    settings = {"command": command, "wall": time.perf_counter() - started, "cli_timeout": args.cli_timeout,
                "cli_memory_gb": args.cli_memory_gb, **walls}
    info = machine()
    write_report(Path(args.report), markdown(outcomes, info, settings))
    if args.json:
        data = {"machine": info, "settings": settings,
                "outcomes": [dataclasses.asdict(o) | {"miss": o.miss} for o in outcomes]}
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(json_safe(data), handle, indent=1, allow_nan=False)
            handle.write("\n")
    for part in ("solve", "nn", "cli"):
        chosen = [o for o in outcomes if o.part == part]
        if chosen:
            counts = {k: sum(o.klass == k for o in chosen) for k in dict.fromkeys(o.klass for o in chosen)}
            listed = ", ".join(f"{SHORT_NAMES.get(k, k)} {n}" for k, n in counts.items())
            print(f"{part}: {len(chosen)} cases: {listed}")
    for o in outcomes:
        if o.miss:
            print(f"  miss {o.name}: {o.klass}: {o.detail}")
    print(f"report: {args.report}; {settings['wall']:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # the reader went away (``… | head``): end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
