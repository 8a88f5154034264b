"""Damping of the Newton family on networks where undamped Newton misbehaves: backtracking against
Levenberg–Marquardt, for dense and per-unit Jacobians.

Each case: torch.nn's default initialisation with ``W_hh`` scaled up, T = 256, B = 4, H = I = 16,
float64, N(0, 1) inputs, the dtype's default tolerance.  Per solver: iterations, result, seconds,
and how often the merit ``½Σ‖F(X) − X‖²`` at the start of an iteration exceeded the previous
one's (the driver's exact-prefix write between steps included).  Prints a markdown table and
writes ``figures/damping.json``.

    python analysis/damping.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import add_output_arguments, metadata, output_directory, write_and_reload
from fixedpoint import Network, Newton, SequenceSystem, solve
from fixedpoint.data import gaussian_inputs

CASES = [("elman", "tanh", 3.0), ("elman", "relu", 2.0), ("gru", "tanh", 3.0), ("gru", "tanh", 5.0),
         ("lstm", "tanh", 3.0), ("lstm", "tanh", 4.0)]
SOLVERS = {
    "newton": Newton(),
    "backtracking newton": Newton(damping="backtracking"),
    "lm newton": Newton(damping="levenberg-marquardt"),
    "quasi-newton": Newton(jacobian="diagonal"),
    "backtracking quasi-newton": Newton(jacobian="diagonal", damping="backtracking"),
    "lm quasi-newton": Newton(jacobian="diagonal", damping="levenberg-marquardt"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output_arguments(parser)
    args = parser.parse_args()
    out = output_directory(args, "damping-")
    seq_len = 48 if args.quick else 256
    rows = []
    for kind, nonlinearity, scale in CASES[:2] if args.quick else CASES:
        network = Network.random(kind, 16, 16, nonlinearity=nonlinearity, scale=scale, seed=0)
        system = SequenceSystem.build(network.cells[0][0], gaussian_inputs(seq_len, 4, 16, seed=1))
        row = {"cell": kind if kind != "elman" else f"elman-{nonlinearity}", "scale": scale, "runs": {}}
        for name, solver in SOLVERS.items():
            merits: list[float] = []

            def record(iteration, iterate, image, merits=merits):  # type: ignore[no-untyped-def]
                merits.append(float(0.5 * (image - iterate[iterate.shape[0] - image.shape[0]:]).square().sum()))

            started = time.perf_counter()
            solution = solve(system, solver, throw=False, callback=record, forward_error="off")
            row["runs"][name] = {
                "iterations": solution.stats.iterations, "result": solution.result.name,
                "seconds": time.perf_counter() - started,
                "merit_rises": sum(1 for a, b in zip(merits, merits[1:]) if b > a),
                "largest_merit": max(merits),
            }
        rows.append(row)
        print(row["cell"], scale, {n: (r["iterations"], round(r["seconds"], 2)) for n, r in row["runs"].items()}, flush=True)
    data = write_and_reload(out / "damping.json", {
        "meta": metadata("analysis/damping.py", args.quick, {"seq_len": seq_len, "batch": 4, "hidden": 16}), "rows": rows})
    print("| case | " + " | ".join(SOLVERS) + " |")
    print("|---|" + "---|" * len(SOLVERS))
    for row in data["rows"]:
        cells = []
        for name in SOLVERS:
            run = row["runs"][name]
            mark = "" if run["result"] == "successful" else " (not converged)"
            cells.append(f"{run['iterations']}{mark}, {run['seconds']:.1f} s, {run['merit_rises']} rises, "
                         f"max {run['largest_merit']:.0e}")
        print(f"| {row['cell']} ×{row['scale']:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
