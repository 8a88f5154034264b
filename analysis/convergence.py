"""Convergence study: Picard and Anderson on Elman/GRU/LSTM systems, and the Jacobi wavefront.

Runs the package, writes every number the figures are drawn from to ``<out>/convergence.json``
(with the metadata needed to reproduce it), then draws from that data:

- ``convergence_residual.png``: ``max |F(X_k) − X_k|`` per iteration for Picard and
  Anderson(memory=5) on each cell, with the exact error ``max |X_k − S*|`` of Picard (dashed),
  where ``S*`` is the sequential solution.
- ``picard_wavefront.png``: ``max_{b,j} |X_k[t] − S*[t]|`` per position ``t`` and iteration
  ``k`` for the GRU, Picard and Anderson, at torch's default recurrent scale and scaled up.

Iterates are indexed as in the driver: ``X_0`` is the initial guess (zeros) and the ``k``-th
evaluation of ``F`` (``k = 1 … n``) is at ``X_{k−1}``.  The residual series has ``n`` entries
(``k = 0 … n−1``); the error series have ``n + 1``, the last being the returned solution.

Usage (from the repository root)::

    .venv/bin/python analysis/convergence.py            # full size, writes figures/
    .venv/bin/python analysis/convergence.py --quick    # tiny smoke test, writes to a temp dir
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from _common import (
    DTYPE,
    INPUT_SEED,
    WEIGHT_SEED,
    add_output_arguments,
    metadata,
    output_directory,
    random_system,
    write_and_reload,
)

import numpy as np
import torch

from fixedpoint import Anderson, Picard, SequenceSystem, Solver, solve
from fixedpoint import plotting

CELLS = (("elman", "Elman (tanh)"), ("gru", "GRU"), ("lstm", "LSTM"))
WAVEFRONT_CELL = "gru"
WAVEFRONT_SCALES = (1.0, 3.0)
CLIP_FLOOR = 1e-16

FULL = {"seq_len": 512, "batch": 16, "hidden_size": 64, "input_size": 64, "wavefront_seq_len": 256}
QUICK = {"seq_len": 32, "batch": 2, "hidden_size": 8, "input_size": 8, "wavefront_seq_len": 24}


def _solvers() -> list[tuple[str, str, Solver]]:
    """``(name, label, solver)`` for every solver compared, default tolerances."""
    return [("picard", "Picard", Picard()), ("anderson", "Anderson (memory 5)", Anderson(memory=5))]


def _system(kind: str, sizes: dict[str, int], seq_len: int, scale: float) -> SequenceSystem:
    return random_system(kind, sizes["input_size"], sizes["hidden_size"], seq_len, sizes["batch"], scale)


def _traced_solve(system: SequenceSystem, solver: Solver, exact: torch.Tensor) -> dict[str, Any]:
    """Solve with a callback recording ``max_{b,j} |X_k[t] − S*[t]|`` for every iterate."""
    per_position: list[torch.Tensor] = []

    def record(iteration: int, iterate: torch.Tensor, image: torch.Tensor) -> None:
        # `iterate` is the driver's live buffer (updated in place later): reduce it now.
        per_position.append((iterate - exact).abs().amax(dim=(1, 2)))

    solution = solve(system, solver, throw=False, callback=record)
    per_position.append((solution.value - exact).abs().amax(dim=(1, 2)))  # the returned value
    errors = torch.stack(per_position)  # (n + 1, T)
    stats = solution.stats
    # Finite termination: after k evaluations the first k positions of X_k are exact.
    left_of_front = max(
        (float(errors[k, :k].max()) for k in range(1, min(errors.shape[0], errors.shape[1] + 1))),
        default=0.0,
    )
    return {
        "solution": solution,
        "errors": errors,
        "summary": {
            "iterations": stats.iterations,
            "result": solution.result.name,
            "exact_prefix": stats.exact_prefix,
            "rtol": stats.rtol,
            "atol": stats.atol,
            "rate": stats.rate,
            "solver_stats": stats.solver,
            "final_error": float(errors[-1].max()),
            "max_error_left_of_front": left_of_front,
        },
    }


def _rounded(array: np.ndarray, digits: int = 4) -> list:
    """Nested lists of floats with ``digits`` significant digits (keeps the JSON small)."""
    return [[float(f"{value:.{digits}g}") for value in row] for row in array.tolist()]


def _format(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def residual_study(sizes: dict[str, int], log: Any = print) -> dict[str, Any]:
    """Picard vs Anderson on each cell at torch-default weights; data for ``plot_residuals``."""
    config = _config(sizes, sizes["seq_len"], scale=1.0)
    panels = []
    for kind, title in CELLS:
        system = _system(kind, sizes, sizes["seq_len"], 1.0)
        exact = system.sequential()
        runs = []
        for name, label, solver in _solvers():
            traced = _traced_solve(system, solver, exact)
            stats = traced["solution"].stats
            summary = traced["summary"]
            runs.append(
                {
                    "solver": name,
                    "label": label,
                    **summary,
                    "residual_max_over_batch": stats.max_abs_residual_history.amax(dim=1).tolist(),
                    "residual_per_sample": stats.max_abs_residual_history.tolist(),
                    "scaled_residual_max_over_batch": stats.residual_history.amax(dim=1).tolist(),
                    "error_max": traced["errors"].amax(dim=1).tolist(),
                    "draw_error": name == "picard",
                }
            )
            log(
                f"  {kind:5s} {name:8s} {summary['iterations']:4d} iterations, {summary['result']}, "
                f"final max|S − S*| = {summary['final_error']:.2e}, rate {_format(summary['rate'])}"
            )
        panels.append({"cell": kind, "title": title, "atol": runs[0]["atol"], "runs": runs})
    return {"config": config, "panels": panels}


def _config(sizes: dict[str, int], seq_len: int, **extra: Any) -> dict[str, Any]:
    """The sizes and seeds of one study, beside its numbers (the figures' titles read them)."""
    return {
        "seq_len": seq_len,
        "batch": sizes["batch"],
        "hidden_size": sizes["hidden_size"],
        "input_size": sizes["input_size"],
        "dtype": str(DTYPE).replace("torch.", ""),
        **extra,
        "weight_seed": WEIGHT_SEED,
        "input_seed": INPUT_SEED,
        "inputs": "standard normal, torch.randn with torch.Generator().manual_seed(input_seed)",
        "initial_state": "zeros",
        "initial_guess": "zeros",
    }


def wavefront_study(sizes: dict[str, int], log: Any = print) -> dict[str, Any]:
    """Per-position error of every iterate for the GRU at two scales; data for ``plot_wavefront``."""
    seq_len = sizes["wavefront_seq_len"]
    config = _config(sizes, seq_len, scales=list(WAVEFRONT_SCALES))
    panels = []
    for name, label, solver in _solvers():
        for scale in WAVEFRONT_SCALES:
            system = _system(WAVEFRONT_CELL, sizes, seq_len, scale)
            traced = _traced_solve(system, solver, system.sequential())
            summary = traced["summary"]
            panels.append(
                {
                    "cell": WAVEFRONT_CELL,
                    "solver": name,
                    "solver_label": label,
                    "scale": scale,
                    **summary,
                    "error_per_position": _rounded(traced["errors"].numpy()),
                }
            )
            log(
                f"  {WAVEFRONT_CELL} ×{scale:g} {name:8s} {summary['iterations']:4d} iterations, "
                f"{summary['result']}, max error left of t = k: {summary['max_error_left_of_front']:.1e}"
            )
    return {"config": config, "clip_floor": CLIP_FLOOR, "panels": panels}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    out = output_directory(args, "fixedpoint-convergence-")
    sizes = dict(QUICK if args.quick else FULL)

    started = time.perf_counter()
    print(f"residuals: T={sizes['seq_len']}, B={sizes['batch']}, H={sizes['hidden_size']}, {DTYPE}")
    residuals = residual_study(sizes)
    residual_seconds = time.perf_counter() - started
    print(f"wavefront: {WAVEFRONT_CELL}, T={sizes['wavefront_seq_len']}, scales {WAVEFRONT_SCALES}")
    wavefront = wavefront_study(sizes)
    compute_seconds = time.perf_counter() - started

    data = {
        "metadata": {
            **metadata(
                "analysis/convergence.py",
                args.quick,
                sizes,
                tolerances="solver defaults for the dtype (fixedpoint.solvers.base.DEFAULT_TOLERANCES)",
            ),
            "seconds": {"residual_study": round(residual_seconds, 2), "total_compute": round(compute_seconds, 2)},
        },
        "residuals": residuals,
        "wavefront": wavefront,
    }
    json_path = out / "convergence.json"
    stored = write_and_reload(json_path, data)
    plotting.plot_residuals(stored["residuals"], out / "convergence_residual.png")
    plotting.plot_wavefront(stored["wavefront"], out / "picard_wavefront.png")
    total = time.perf_counter() - started
    print(f"wrote {json_path}, {out / 'convergence_residual.png'}, {out / 'picard_wavefront.png'} ({total:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
