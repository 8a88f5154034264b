"""Benchmark: every method against torch.nn, per cell, B = 16, H ∈ {8, 64, 256}, T ∈ {512, 4096, 32768}.

Each (problem, method) runs in its own process, so that its peak memory is its own: on a CPU
the growth of the resident set over the process's baseline after the inputs are built, on
CUDA ``torch.cuda.max_memory_allocated`` above the allocation before the run.  In that process
the method runs beside ``torch.nn`` on the same weights and inputs, alternating, after a
warm-up; times are medians (DESIGN §5) and the ratio is method ÷ torch.nn (< 1 is faster).  The
``auto`` process also times one parallel sweep ``F(S)`` and reports its memory traffic in GB/s
beside the device's measured copy bandwidth.

Writes ``docs/benchmarks.json`` (results of earlier runs on other devices are kept) and
``docs/benchmarks.md``.

    python analysis/bench.py [--device cpu|cuda] [--quick] [--out docs]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fixedpoint.compare import compare_with_torch, run_reference  # noqa: E402
from fixedpoint.data import gaussian_inputs  # noqa: E402
from fixedpoint.network import Network  # noqa: E402
from fixedpoint.runtime import keep_freed_memory  # noqa: E402
from fixedpoint.solve import solve_network  # noqa: E402
from fixedpoint.solvers import SOLVERS  # noqa: E402
from fixedpoint.system import SequenceSystem  # noqa: E402

CELLS = ("elman", "gru", "lstm")
BATCH = 16


def plan(device: str, quick: bool) -> list[dict]:
    """The (cell, H, T, method) jobs.  Methods whose cost is known to be far above torch.nn on
    this device run on the smaller problems only (the JSON lists exactly what ran)."""
    hiddens = (8, 64) if quick else (8, 64, 256)
    seq_lens = (512, 4096) if quick else (512, 4096, 32768)
    if device == "cuda" and not quick:
        seq_lens += (131072,)
    jobs = []
    for cell in CELLS:
        for hidden in hiddens:
            for seq_len in seq_lens:
                methods = ["torch.nn", "auto"]
                small = seq_len <= 4096 and hidden <= 64
                if device == "cuda" or small:
                    methods += ["picard", "quasi-newton"]
                if hidden <= 8 and (device == "cuda" or seq_len <= 4096):
                    methods += ["newton", "damped"]
                for method in methods:
                    jobs.append({"cell": cell, "hidden": hidden, "seq_len": seq_len, "method": method, "device": device})
    return jobs


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes(device: torch.device, function) -> int:  # type: ignore[no-untyped-def]
    """Peak memory that ``function`` adds (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        function()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    before = _rss_bytes()
    function()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def _median_seconds(device: torch.device, function, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Measured GB/s of copying a 512 MiB buffer (read + write counted)."""
    source = torch.empty(64 * 2**20, dtype=torch.float64, device=device).fill_(1.0)
    target = torch.empty_like(source)
    seconds = _median_seconds(device, lambda: target.copy_(source), 5)
    return 2 * source.numel() * source.element_size() / seconds / 1e9


def run_one(job: dict) -> dict:
    """One job, in this process."""
    keep_freed_memory()
    device = torch.device(job["device"])
    dtype = torch.float32
    network = Network.random(job["cell"], job["hidden"], job["hidden"], seed=0, dtype=dtype).to(device=device)
    inputs = gaussian_inputs(job["seq_len"], BATCH, job["hidden"], seed=1, dtype=dtype).to(device)
    repeats = 5 if job["seq_len"] <= 4096 else 3
    row = dict(job, dtype="float32", batch=BATCH, repeats=repeats)
    # warm-up on a prefix, then the peak-memory run on the whole problem
    module = network.to_torch()
    if job["method"] == "torch.nn":
        run_reference(module, inputs[:8])
        row["peak_mib"] = _peak_bytes(device, lambda: run_reference(module, inputs)) / 2**20
        row["seconds"] = _median_seconds(device, lambda: run_reference(module, inputs), repeats)
        return row
    solver = SOLVERS[job["method"]]()
    solve_network(network, inputs[:8], None, solver, throw=False)
    row["peak_mib"] = _peak_bytes(device, lambda: solve_network(network, inputs, None, solver, throw=False)) / 2**20
    comparison = compare_with_torch(network, inputs, solver, repeats=repeats)
    solutions = comparison.solution.solutions
    row.update(
        ran=sorted({s.stats.solver["method"] for s in solutions}),
        iterations=comparison.solution.iterations,
        converged=comparison.solution.converged,
        max_abs_diff=comparison.max_abs_diff,
        seconds=comparison.solver_seconds,
        reference_seconds=comparison.reference_seconds,
        ratio=comparison.time_ratio,
        safe_steps=sum(sum(s.stats.solver.get("safe_steps", [0])) for s in solutions),
    )
    if job["method"] == "auto":
        system = SequenceSystem.build(network.cells[0][0], inputs)
        states = torch.zeros(system.state_shape, dtype=dtype, device=device)
        system.apply(states)
        sweep = _median_seconds(device, lambda: system.apply(states), 5)
        steps, batch, size = system.state_shape
        # read S and the projected inputs, write F(S); the weights are read once
        moved = (2 * steps * batch * size + system.projected_inputs.numel() + network.cells[0][0].weight_hh.numel())
        row["sweep_seconds"] = sweep
        row["sweep_gb_per_s"] = moved * inputs.element_size() / sweep / 1e9
    return row


def describe(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def markdown(result: dict) -> str:
    lines = [
        f"### {result['device_name']} — {result['date']}",
        "",
        f"float32, B = {BATCH}, torch.nn default initialisation (weights seed 0, inputs seed 1), TF32 off. "
        f"Ratio = method ÷ torch.nn in the same process (< 1 is faster); peak = memory the method adds "
        f"({'allocated' if result['device'] == 'cuda' else 'resident'}); measured copy bandwidth "
        f"{result['copy_gb_per_s']:.1f} GB/s.",
        "",
        "| cell | H | T | method | ran | iterations | max \\|diff\\| | seconds | torch.nn s | ratio | peak MiB | torch.nn MiB | sweep GB/s |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    reference = {(r["cell"], r["hidden"], r["seq_len"]): r for r in result["rows"] if r["method"] == "torch.nn"}
    for row in result["rows"]:
        if row["method"] == "torch.nn":
            continue
        base = reference.get((row["cell"], row["hidden"], row["seq_len"]), {})
        sweep = f"{row['sweep_gb_per_s']:.1f}" if "sweep_gb_per_s" in row else ""
        lines.append(
            f"| {row['cell']} | {row['hidden']} | {row['seq_len']} | {row['method']} | {', '.join(row['ran'])} | "
            f"{row['iterations']} | {row['max_abs_diff']:.1e} | {row['seconds']:.4f} | {row['reference_seconds']:.4f} | "
            f"{row['ratio']:.2f} | {row['peak_mib']:.1f} | {base.get('peak_mib', float('nan')):.1f} | {sweep} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="H ∈ {8, 64}, T ∈ {512, 4096}")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a job as JSON, run in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    jobs = plan(args.device, args.quick)
    rows = []
    for number, job in enumerate(jobs, 1):
        done = subprocess.run(
            [sys.executable, __file__, "--one", json.dumps(job)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            raise SystemExit(f"job {job} failed")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        print(f"[{number}/{len(jobs)}] {job['cell']} H={job['hidden']} T={job['seq_len']} {job['method']}: "
              f"{row['seconds']:.4f} s" + (f", ratio {row['ratio']:.2f}" if "ratio" in row else ""), flush=True)
    device = torch.device(args.device)
    result = {
        "device": args.device,
        "device_name": describe(args.device),
        "date": datetime.date.today().isoformat(),
        "quick": args.quick,
        "copy_gb_per_s": copy_bandwidth(device),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "benchmarks.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[args.device] = result
    path.write_text(json.dumps(results, indent=1))
    sections = [markdown(results[key]) for key in sorted(results)]
    (args.out / "benchmarks.md").write_text(HEADER + "\n\n".join(sections) + "\n")
    print(markdown(result))


HEADER = """# Benchmarks

Generated by `make bench` (`analysis/bench.py`); the numbers are in `benchmarks.json`.  One
section per device, each with its date.  `auto` is the CLI default; `ran` says what it chose.

"""


if __name__ == "__main__":
    main()
