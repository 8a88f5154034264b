"""Kernel-level measurements for ``make gpu-check``: bandwidth of the fused kernels against a copy
measured in the same run, the cost of one quasi-Newton iteration per cell, the driver's
``check_every`` and the forward-error pass, all on one device.

Writes ``<out>/gpu_probe.json`` and ``<out>/gpu_probe.md`` (device, date, torch and Triton
versions).  On a CPU (``--device cpu --quick``) it runs the same code at small sizes, which is
how it is checked without a GPU; the numbers it prints there are not GPU numbers.

    python analysis/gpu_probe.py [--device cuda] [--quick] [--out docs]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fixedpoint import Network, QuasiNewton, SequenceSystem, solve  # noqa: E402
from fixedpoint.data import gaussian_inputs  # noqa: E402
from fixedpoint.scan import linear_recurrence, linear_recurrence_torch  # noqa: E402
from fixedpoint.residual import StopTest  # noqa: E402
from fixedpoint.runtime import timed  # noqa: E402


def seconds(device: torch.device, function, repeats: int = 10) -> float:  # type: ignore[no-untyped-def]
    """Median wall time of ``function`` after one warm-up call, synchronised on CUDA."""
    return timed(function, device, repeats, warm=True)[1]


def copy_bandwidth(device: torch.device, size: int) -> float:
    """GB/s of copying ``size`` bytes (read + write counted)."""
    source = torch.ones(size // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    return 2 * size / seconds(device, lambda: target.copy_(source)) / 1e9


def scan_rows(device: torch.device, steps: int, batch: int, hidden: int) -> list[dict]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(steps, batch, hidden, generator=generator).to(device)
    initial = torch.zeros(batch, hidden, device=device)
    for structure, shape in (("diagonal", (steps, batch, hidden)), ("block2", (steps, batch, hidden // 2, 2, 2))):
        transitions = (0.9 * torch.rand(*shape, generator=generator)).to(device)
        # The least a scan must move: read A and b, write y.
        moved = (transitions.numel() + 2 * values.numel()) * values.element_size()
        for name, function in (("fused" if device.type == "cuda" else "dispatch", linear_recurrence),
                               ("torch", linear_recurrence_torch)):
            spent = seconds(device, lambda: function(transitions, values, initial))
            rows.append({"structure": structure, "path": name, "seconds": spent, "gb_per_s": moved / spent / 1e9})
    return rows


def iteration_rows(device: torch.device, steps: int, batch: int, hidden: int) -> list[dict]:
    """One Picard sweep (F over all positions) and one quasi-Newton iteration (F, A, b and the
    scan) per cell, float32, torch.nn's initialisation."""
    rows = []
    for kind in ("elman", "gru", "lstm"):
        network = Network.random(kind, hidden, hidden, seed=0, dtype=torch.float32).to(device=device)
        system = SequenceSystem.build(network.cells[0][0], gaussian_inputs(steps, batch, hidden, seed=1, dtype=torch.float32).to(device))
        states = torch.zeros(system.state_shape, dtype=torch.float32, device=device)
        sweep = seconds(device, lambda: system.apply(states))
        element = states.numel() * 4
        # A sweep reads S and the projected inputs and writes F(S): its least traffic.
        moved = 2 * element + system.projected_inputs.numel() * 4
        solver = QuasiNewton()
        _, state = solver.init(system, states)

        def quasi_newton_iteration() -> None:
            image, _ = solver.evaluate(system, states, 0, state, StopTest(*solver.tolerances(states.dtype)))
            solver.step(system, states, image, state, system.initial_state)

        iteration = seconds(device, quasi_newton_iteration)
        rows.append({"cell": kind, "sweep_seconds": sweep, "sweep_gb_per_s": moved / sweep / 1e9,
                     "quasi_newton_iteration_seconds": iteration, "E_bytes": element})
    return rows


def driver_rows(device: torch.device, steps: int, batch: int, hidden: int) -> list[dict]:
    """A GRU quasi-Newton solve by ``check_every``, and with and without the forward-error pass."""
    network = Network.random("gru", hidden, hidden, seed=0, dtype=torch.float32).to(device=device)
    system = SequenceSystem.build(network.cells[0][0], gaussian_inputs(steps, batch, hidden, seed=1, dtype=torch.float32).to(device))
    rows = []
    for every in (1, 2, 4, 8):
        for forward_error in ("off", "refine"):
            if forward_error == "refine" and every != 1:
                continue
            solution = solve(system, QuasiNewton(), check_every=every, forward_error=forward_error)
            spent = seconds(device, lambda: solve(system, QuasiNewton(), check_every=every, forward_error=forward_error), 3)
            rows.append({"check_every": every, "forward_error": forward_error, "seconds": spent,
                         "iterations": solution.stats.iterations,
                         "speculative_iterations": solution.stats.speculative_iterations})
    return rows


def markdown(result: dict) -> str:
    lines = [
        f"### Kernels and driver on {result['device_name']} — {result['date']}",
        "",
        f"torch {result['torch']}, Triton {result['triton']}, float32, TF32 off. Copy bandwidth measured in "
        f"the same run: {result['copy_gb_per_s']:.0f} GB/s (read + write). Scan and sweep: "
        f"T = {result['scan_problem'][0]}, B = {result['scan_problem'][1]}, H = {result['scan_problem'][2]}; "
        "GB/s counts the least traffic (scan: read A and b, write y; sweep: read S and the projected "
        "inputs, write F).",
        "",
        "| scan | path | ms | GB/s | of copy |",
        "|---|---|---:|---:|---:|",
    ]
    for row in result["scans"]:
        lines.append(f"| {row['structure']} | {row['path']} | {1e3 * row['seconds']:.3f} | {row['gb_per_s']:.0f} | "
                     f"{row['gb_per_s'] / result['copy_gb_per_s']:.0%} |")
    lines += ["", "| cell | sweep ms | sweep GB/s | of copy | quasi-Newton iteration ms |", "|---|---:|---:|---:|---:|"]
    for row in result["iterations"]:
        lines.append(f"| {row['cell']} | {1e3 * row['sweep_seconds']:.3f} | {row['sweep_gb_per_s']:.0f} | "
                     f"{row['sweep_gb_per_s'] / result['copy_gb_per_s']:.0%} | {1e3 * row['quasi_newton_iteration_seconds']:.3f} |")
    lines += ["", "GRU quasi-Newton solve by the driver's `check_every` (and with the forward-error pass):", "",
              "| check_every | forward error | seconds | iterations | speculative |", "|---:|---|---:|---:|---:|"]
    for row in result["driver"]:
        lines.append(f"| {row['check_every']} | {row['forward_error']} | {row['seconds']:.4f} | {row['iterations']} | "
                     f"{row['speculative_iterations']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="small sizes (a check of the script itself)")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    problem = (1024, 4, 16) if args.quick else (32768, 16, 64)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    result = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU",
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton_version,
        "scan_problem": problem,
        "copy_gb_per_s": copy_bandwidth(device, (64 if args.quick else 1024) * 2**20),
    }
    for name, measure in (("scans", scan_rows), ("iterations", iteration_rows), ("driver", driver_rows)):
        result[name] = measure(device, *problem)
        print(f"{name}: done", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_probe.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "gpu_probe.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
