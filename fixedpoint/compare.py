"""Solve a network and run ``torch.nn``'s own module on the same weights and inputs.

This is the measurement behind ``fixedpoint solve`` and the benchmarks: the largest absolute
difference to ``torch.nn`` (outputs and final states) and both times, taken in the same
process, alternating, each after a warm-up, as medians.
"""

from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fixedpoint.lengths import check_lengths
from fixedpoint.network import Network
from fixedpoint.solve import NetworkSolution, solve, solve_network
from fixedpoint.contraction import ContractionReport, Norm, analyze, estimated_step_norms
from fixedpoint.forward_error import forward_error_estimate
from fixedpoint.predictability import Predictability, predictability
from fixedpoint.runtime import timed, true_float32
from fixedpoint.solvers import DEFAULT_TOLERANCES, Picard, Sequential, Solver


@dataclass
class Comparison:
    """A solve beside ``torch.nn``.

    Attributes:
        solution: the last :class:`NetworkSolution` (from the last repetition).
        max_abs_diff: ``max |·|`` over output, ``h_n`` (and ``c_n``) against ``torch.nn``.
        solver_seconds: median wall time of :func:`solve_network` over the repetitions.
        reference_seconds: median wall time of the ``torch.nn`` module's forward.
        repeats: timed repetitions of each.
        lipschitz_estimated: with ``certify``, ``max ‖J_t‖`` along every solved layer (estimate).
        forward_error: estimated ``max |output − exact|`` of the solve over every layer, direction
            and sample, each layer given its inputs (:mod:`fixedpoint.forward_error`; an estimate),
            ``None`` when the solve did not succeed.
        reference_forward_error: the same estimate for ``torch.nn``'s own kernel on these inputs:
            how accurate ``torch.nn`` itself is here.
        predictability: per (layer, direction), the Lyapunov exponent and predicted iterations
            along the solution (:mod:`fixedpoint.predictability`; estimates); empty when the
            solve did not succeed.
    """

    solution: NetworkSolution
    max_abs_diff: float
    solver_seconds: float
    reference_seconds: float
    repeats: int
    lipschitz_estimated: float | None = None
    norm: str | None = None
    forward_error: float | None = None
    reference_forward_error: float | None = None
    predictability: list[Predictability] = field(default_factory=list)

    @property
    def time_ratio(self) -> float:
        """``solver_seconds / reference_seconds`` (< 1: faster than ``torch.nn``)."""
        return self.solver_seconds / self.reference_seconds


def run_reference(
    module: torch.nn.Module, inputs: Tensor, hx: Any = None, lengths: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``torch.nn`` forward without autograd: ``(output, h_n, c_n or None)``; with ``lengths``
    the padded ``inputs`` go in as a ``PackedSequence`` and the output comes back padded (zeros
    past each sample's end)."""
    with torch.no_grad():
        if lengths is None:
            output, final = module(inputs, hx)
        else:
            batch_first = getattr(module, "batch_first", False)
            packed = pack_padded_sequence(inputs, lengths.cpu(), batch_first=batch_first, enforce_sorted=False)
            output, final = module(packed, hx)
            output, _ = pad_packed_sequence(output, batch_first=batch_first, total_length=inputs.shape[1 if batch_first else 0])
    if isinstance(final, tuple):
        return output, final[0], final[1]
    return output, final, None


def max_abs_difference(solution: NetworkSolution, reference: tuple[Tensor, Tensor, Tensor | None]) -> float:
    """Largest ``|solution − reference|`` over output, ``h_n`` and ``c_n``."""
    output, h_n, c_n = reference
    pairs = [(solution.output, output), (solution.h_n, h_n)]
    if c_n is not None:
        pairs.append((solution.c_n, c_n))
    return max(float((a - b).abs().max()) for a, b in pairs)


def compare_with_torch(
    network: Network,
    inputs: Tensor,
    solver: Solver,
    *,
    hx: Any = None,
    repeats: int = 1,
    max_steps: int | None = None,
    callback: Callable[..., None] | None = None,
    certify: Norm | None = None,
    phase: Phase | None = None,
    lengths: Tensor | None = None,
) -> Comparison:
    """Solve ``network`` on ``inputs`` and compare with ``network.to_torch()``.

    Both run once on a short prefix of the inputs first (warm-up), then ``repeats`` times each,
    alternating.  Times are medians.  The solve does not raise on non-convergence: the
    returned solution's ``result`` says how it ended.  On CUDA, TF32 is switched off for the
    duration (matmul and cuDNN), so that float32 means float32 on both sides.  ``certify``
    attaches certificates to the last repetition's solve only (their time is not the solve's);
    ``phase`` hears what runs next, for a progress display.  ``lengths (B,)``: variable-length
    sequences (:func:`~fixedpoint.solve.solve_network`'s), fed to ``torch.nn`` packed.
    """
    if lengths is not None:
        steps = inputs.shape[1 if network.batch_first else 0]
        lengths = check_lengths(lengths, steps, inputs.shape[0 if network.batch_first else 1], inputs.device)
    with true_float32():
        return _compare(network, inputs, solver, hx, repeats, max_steps, callback, certify, phase or _silent, lengths)


#: ``phase(description)``: called when a stage of a longer measurement starts.
Phase = Callable[[str], None]


def _silent(description: str) -> None:
    """The default :data:`Phase`: no display."""


def _compare(
    network: Network,
    inputs: Tensor,
    solver: Solver,
    hx: Any,
    repeats: int,
    max_steps: int | None,
    callback: Callable[..., None] | None,
    certify: Norm | None,
    phase: Phase,
    lengths: Tensor | None,
) -> Comparison:
    # Long on purpose: the warm-up, the timed repeats of both sides and the certificates share the
    # network, inputs and reference module.
    phase("warming up")
    module = network.to_torch()
    warm_length = min(inputs.shape[1 if network.batch_first else 0], 8)
    warm_inputs = inputs[:, :warm_length] if network.batch_first else inputs[:warm_length]
    warm_lengths = None if lengths is None else lengths.clamp(max=warm_length)
    solve_network(network, warm_inputs, hx, solver, throw=False, lengths=warm_lengths)
    run_reference(module, warm_inputs, hx, warm_lengths)

    solver_times: list[float] = []
    reference_times: list[float] = []
    solution = None
    reference = None
    for repeat in range(repeats):
        # Release the previous results first, so both sides draw on the same freed memory
        # instead of one of them paying fresh page faults for its (T, B, H) output.
        solution = reference = None
        last = repeat == repeats - 1
        counter = f" (repetition {repeat + 1} of {repeats})" if repeats > 1 else ""
        phase(f"{'certifying and solving' if last and certify else 'solving'}{counter}")
        solution = solve_network(
            network, inputs, hx, solver, max_steps=max_steps, throw=False, callback=callback,
            certify=certify if last else None, lengths=lengths,
        )
        solver_times.append(solution.wall_time)
        phase(f"running torch.nn{counter}")
        reference, seconds = timed(lambda: run_reference(module, inputs, hx, lengths), inputs.device)
        reference_times.append(seconds)
    estimated = None
    if certify is not None and solution.converged:
        phase("estimating ‖J_t‖ along the solution")
        norms = [
            estimated_step_norms(s.system, s.value, certify)[1:] for s in solution.solutions if s.system.seq_len > 1
        ]
        estimated = max((float(n.max()) for n in norms), default=None)
    phase("estimating predictability and forward errors")
    along = [_predictability(single) for single in solution.solutions] if solution.converged else []
    forward_error = _forward_error(solution) if solution.converged else None
    # torch.nn's kernel layer by layer (what the module runs), each layer's error given its inputs.
    kernel = solve_network(network, inputs, hx, Sequential(kernel="fused"), throw=False, forward_error="estimate",
                           lengths=lengths)
    return Comparison(
        forward_error=forward_error,
        predictability=along,
        reference_forward_error=_forward_error(kernel) if kernel.converged else None,
        lipschitz_estimated=estimated,
        norm=certify,
        solution=solution,
        max_abs_diff=max_abs_difference(solution, reference),
        solver_seconds=statistics.median(solver_times),
        reference_seconds=statistics.median(reference_times),
        repeats=repeats,
    )


def _predictability(single: Any) -> Predictability:
    """Predictability along one solved (layer, direction), for its own tolerance."""
    return predictability(single.system, single.value, rtol=single.stats.rtol, atol=single.stats.atol)


def _forward_error(solution: NetworkSolution) -> float:
    """The largest forward-error estimate over the solves of ``solution``, estimating it now for
    a solve that did not (a direct solver's, by default)."""
    estimates = []
    for single in solution.solutions:
        estimate = single.stats.forward_error_estimate
        if estimate is None:
            estimate = forward_error_estimate(single.system, single.value)
        estimates.append(float(estimate.max()))
    return max(estimates)


#: Sequence length up to which ``check_network`` observes Picard even when it is predicted to need
#: every sweep (its ``T²/2`` steps then cost about as much as the rest of the check).
OBSERVE_UP_TO = 128


@dataclass
class LayerCheck:
    """The contraction report of one (layer, direction) system, on its actual inputs, with the
    predictability estimate and, when Picard was run, its observed rate (an estimate) and
    iteration count beside it (``None`` when it was not run)."""

    layer: int
    direction: int
    report: ContractionReport
    observed_rate: float | None
    picard_iterations: int | None
    predictability: Predictability | None = None


def check_network(
    network: Network,
    inputs: Tensor,
    norm: Norm = "2",
    *,
    atol: float | None = None,
    hx: Any = None,
    observe: bool | None = None,
    callback: Callable[..., None] | None = None,
    phase: Phase | None = None,
) -> list[LayerCheck]:
    """Contraction reports for every layer and direction of ``network`` on ``inputs (T, B, I)``.

    The network is solved by the sequential loop (exact, and as cheap as ``torch.nn``); layer
    ``l + 1`` is analysed on the outputs of layer ``l``, and the estimates are taken along that
    solution.  Then each system is solved by Picard to ``atol`` (default: the dtype's;
    ``rtol = 0``) to observe its rate and iteration count.  Picard costs about ``k·T`` steps for
    ``k`` sweeps, up to ``T²/2``: with ``observe=None`` it runs when ``T ≤`` :data:`OBSERVE_UP_TO`
    or the predictability estimate expects every system to converge in fewer than ``T`` sweeps
    (else the count is ``None``); ``True`` always runs it, ``False`` never.  ``callback`` is the Picard solves'
    (:func:`~fixedpoint.solve.solve_network`'s signature); ``phase`` hears what runs next.
    """
    phase = phase or _silent
    if atol is None:
        atol = DEFAULT_TOLERANCES[network.dtype][1]
    phase("solving sequentially")
    solution = solve_network(network, inputs, hx, Sequential())
    rtol, _ = Picard().tolerances(network.dtype)  # the predictions are for a default solve's tolerance
    analysed = []
    for layer_index, layer in enumerate(solution.layers):
        for direction, single in enumerate(layer):
            phase(f"certifying layer {layer_index} direction {direction}")
            report = analyze(single.system, norm, atol=atol, states=single.value)
            phase(f"estimating predictability of layer {layer_index} direction {direction}")
            along = predictability(single.system, single.value, rtol=rtol, atol=atol)
            analysed.append((layer_index, direction, single.system, report, along))
    if observe is None:
        # A run of T sweeps is quadratic in T: skip it when it is expected and T is long.
        observe = all(int(along.picard.max()) < system.seq_len or system.seq_len <= OBSERVE_UP_TO
                      for *_, system, _, along in analysed)
    checks = []
    for layer_index, direction, system, report, along in analysed:
        rate, iterations = None, None
        if observe:
            phase(f"solving layer {layer_index} direction {direction} by Picard iteration")
            heard = None if callback is None else functools.partial(callback, layer_index, direction)
            observed = solve(system, Picard(rtol=0.0, atol=atol), callback=heard)
            rate, iterations = observed.stats.rate, observed.stats.iterations
        checks.append(LayerCheck(layer_index, direction, report, rate, iterations, along))
    return checks
