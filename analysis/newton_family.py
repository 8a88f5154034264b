"""The Newton family beside Picard and Anderson: convergence per cell, and solve time against T.

1. ``figures/newton_convergence.png`` (+ JSON): ``max_b max|F(X_k) − X_k|`` per iteration for
   every solver, for each cell, on torch.nn's default weights and on "trained-like" weights
   whose ``W_hh`` is scaled up until Jacobi is slow (T = 512, B = 4, H = 16, float64).
2. ``figures/solve_time.png`` (+ JSON): seconds per solve against T for GRU (B = 16, H = 16,
   float32, this CPU), torch.nn beside every method, medians of 3.

    python analysis/newton_family.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import add_output_arguments, metadata, output_directory, random_system, write_and_reload
from fixedpoint import Anderson, Auto, Network, Newton, Picard, QuasiNewton, solve, solve_network
from fixedpoint.compare import run_reference
from fixedpoint.data import gaussian_inputs
from fixedpoint.plotting import plot_solver_convergence, plot_solve_time
from fixedpoint.runtime import keep_freed_memory

SOLVERS = {
    "picard": Picard(),
    "anderson": Anderson(),
    "quasi-newton": QuasiNewton(),
    "newton": Newton(),
    "damped newton": Newton(damping="backtracking"),
}
#: W_hh scale per cell at which Picard needs a large part of T = 512 sweeps.
TRAINED_LIKE = {"elman": 2.0, "gru": 5.0, "lstm": 4.0}


def convergence(seq_len: int, batch: int, hidden: int) -> dict:
    panels = []
    for cell in ("elman", "gru", "lstm"):
        for scale in (1.0, TRAINED_LIKE[cell]):
            system = random_system(cell, hidden, hidden, seq_len, batch, scale)
            exact = system.sequential()
            runs = []
            for label, solver in SOLVERS.items():
                solution = solve(system, solver, throw=False)
                runs.append({
                    "label": label,
                    "iterations": solution.stats.iterations,
                    "result": solution.result.name,
                    "max_abs_error": float((solution.value - exact).abs().max()),
                    "safe_steps": sum(solution.stats.solver.get("safe_steps", [0])),
                    "residual_max_over_batch": solution.stats.max_abs_residual_history.amax(dim=1).tolist(),
                })
                print(f"{cell} ×{scale}: {label} {solution.stats.iterations} iterations", flush=True)
            panels.append({"cell": cell, "scale": scale, "seq_len": seq_len, "runs": runs})
    return {"panels": panels}


def solve_time(seq_lens: list[int], batch: int, hidden: int, repeats: int) -> dict:
    dtype = torch.float32
    network = Network.random("gru", hidden, hidden, seed=0, dtype=dtype)
    module = network.to_torch()
    methods = {"auto (fused sequential)": Auto(), "picard": Picard(), "quasi-newton": QuasiNewton(), "newton": Newton()}
    series: dict[str, list[float]] = {"torch.nn": [], **{name: [] for name in methods}}
    for seq_len in seq_lens:
        inputs = gaussian_inputs(seq_len, batch, hidden, seed=1, dtype=dtype)
        run_reference(module, inputs[:8])
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            run_reference(module, inputs)
            times.append(time.perf_counter() - started)
        series["torch.nn"].append(statistics.median(times))
        for name, solver in methods.items():
            solve_network(network, inputs[:8], None, solver)
            series[name].append(statistics.median(solve_network(network, inputs, None, solver).wall_time for _ in range(repeats)))
        print(f"T={seq_len}: " + ", ".join(f"{k} {v[-1]:.4f}s" for k, v in series.items()), flush=True)
    return {"seq_lens": seq_lens, "batch": batch, "hidden": hidden, "dtype": "float32", "seconds": series}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_arguments(parser)
    args = parser.parse_args()
    keep_freed_memory()
    out = output_directory(args, "newton-family-")
    seq_len, batch, hidden = (64, 2, 6) if args.quick else (512, 4, 16)
    data = convergence(seq_len, batch, hidden)
    data["metadata"] = metadata("analysis/newton_family.py", args.quick, {"seq_len": seq_len, "batch": batch, "hidden": hidden},
                                trained_like_scales=TRAINED_LIKE)
    data = write_and_reload(out / "newton_convergence.json", data)
    plot_solver_convergence(data, out / "newton_convergence.png")
    seq_lens = [64, 256] if args.quick else [256, 1024, 4096, 16384]
    timing = solve_time(seq_lens, 16, 16, 1 if args.quick else 3)
    timing["metadata"] = metadata("analysis/newton_family.py", args.quick, {"seq_lens": seq_lens}, dtype_override="float32")
    timing = write_and_reload(out / "solve_time.json", timing)
    plot_solve_time(timing, out / "solve_time.png")
    print(f"wrote {out / 'newton_convergence.png'} and {out / 'solve_time.png'}")


if __name__ == "__main__":
    main()
