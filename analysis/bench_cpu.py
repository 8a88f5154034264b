"""Benchmark: solver time ÷ torch.nn time, GRU, B = 16, H = 64, T ∈ {512, 8192}.

Each solve runs beside ``torch.nn.GRU`` on the same weights and inputs, in this process,
alternating, after a warm-up; the times are medians (DESIGN §5).  Writes
``docs/benchmarks_cpu.json`` and prints a Markdown table with the device and date.

    python analysis/bench_cpu.py [--repeats 5] [--seq-lens 512 8192] [--out docs]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch

from fixedpoint.compare import compare_with_torch
from fixedpoint.data import gaussian_inputs
from fixedpoint.network import Network
from fixedpoint.runtime import keep_freed_memory
from fixedpoint.solvers import Anderson, Picard, Sequential

SOLVERS = {"sequential": Sequential(), "picard": Picard(), "anderson": Anderson(memory=5)}


def measure(seq_lens: list[int], dtypes: list[torch.dtype], repeats: int, batch: int, hidden: int) -> list[dict]:
    rows = []
    for dtype in dtypes:
        network = Network.random("gru", hidden, hidden, seed=0, dtype=dtype)
        for seq_len in seq_lens:
            inputs = gaussian_inputs(seq_len, batch, hidden, seed=1, dtype=dtype)
            for name, solver in SOLVERS.items():
                comparison = compare_with_torch(network, inputs, solver, repeats=repeats)
                row = {
                    "cell": "gru",
                    "dtype": str(dtype).removeprefix("torch."),
                    "seq_len": seq_len,
                    "batch": batch,
                    "hidden": hidden,
                    "solver": name,
                    "iterations": comparison.solution.iterations,
                    "converged": comparison.solution.converged,
                    "max_abs_diff": comparison.max_abs_diff,
                    "solver_seconds": comparison.solver_seconds,
                    "reference_seconds": comparison.reference_seconds,
                    "ratio": comparison.time_ratio,
                    "repeats": repeats,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| dtype | T | solver | iterations | max \\|diff\\| vs torch.nn | solver s | torch.nn s | ratio |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['dtype']} | {row['seq_len']} | {row['solver']} | {row['iterations']} | "
            f"{row['max_abs_diff']:.1e} | {row['solver_seconds']:.4f} | {row['reference_seconds']:.4f} | "
            f"{row['ratio']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 8192])
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=["float32", "float64"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    keep_freed_memory()  # for torch.nn and the solvers alike: both run in this process
    dtypes = [getattr(torch, name) for name in args.dtypes]
    rows = measure(args.seq_lens, dtypes, args.repeats, args.batch, args.hidden)
    device = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    date = datetime.date.today().isoformat()
    header = f"GRU, B = {args.batch}, H = {args.hidden}, CPU ({device}), {date}; ratio = solver / torch.nn (< 1 is faster)"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmarks_cpu.json").write_text(json.dumps({"device": device, "date": date, "rows": rows}, indent=1))
    print(markdown(rows, header))


if __name__ == "__main__":
    main()
