"""Benchmark: every method against torch.nn, per cell, B = 16, H ∈ {8, 64, 256}, T ∈ {512, 4096, 32768}.

Each (problem, method) runs in its own process, so that its peak memory is its own: on a CPU
the growth of the resident set over the process's baseline after the inputs are built, on
CUDA ``torch.cuda.max_memory_allocated`` above the allocation before the run.  In that process
the method runs beside ``torch.nn`` on the same weights and inputs, alternating, after a
warm-up; times are medians and the ratio is method ÷ torch.nn (< 1 is faster).  The
``auto`` process also times one parallel sweep ``F(S)`` and reports its memory traffic in GB/s
beside the device's measured copy bandwidth.

The training pass (``--pass train``) times forward + backward of :mod:`fixedpoint.nn`'s module
against the ``torch.nn`` module (cuDNN on CUDA) on the same sizes, in float32 and (on a CPU) in
float64: ``loss = Σ w ⊙ output`` with fixed weights ``w``, gradients for the inputs and every
parameter; max |diff| is over those gradients.

Writes ``docs/benchmarks.json`` (results of earlier runs on other devices or passes are kept)
and ``docs/benchmarks.md``.

    python analysis/bench.py [--device cpu|cuda] [--pass forward|train|all] [--quick] [--out docs]
                             [--cells gru,lstm] [--hiddens 8,64] [--seq-lens 512,32768] [--dtypes float64]

A subset (``--cells``, ``--hiddens``, ``--seq-lens``, ``--dtypes``) replaces its own rows and keeps the other rows
of that section, so a long run can be split into shorter ones; it refuses a section measured on
another device or plan (``--quick``).  The section's date spans the runs.  The files are rewritten
after every job: a run cut short keeps what it measured beside the earlier rows it has not reached.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fixedpoint.compare import compare_with_torch, run_reference  # noqa: E402
from fixedpoint.data import gaussian_inputs  # noqa: E402
from fixedpoint.network import Network  # noqa: E402
from fixedpoint.nn import GRU, LSTM, RNN  # noqa: E402
from fixedpoint.runtime import keep_freed_memory, timed  # noqa: E402
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


#: What fixedpoint.nn runs per training-pass method: (solver, adjoint).
TRAIN_METHODS = {"nn-auto": ("auto", "auto"), "nn-quasi-newton": ("quasi-newton", "auto")}
SOLVED_MODULES = {"elman": RNN, "gru": GRU, "lstm": LSTM}


def plan_train(device: str, quick: bool) -> list[dict]:
    """The (cell, H, T, method) jobs of the training pass."""
    hiddens = (8, 64) if quick else (8, 64, 256)
    seq_lens = (512, 4096) if quick else (512, 4096, 32768)
    if device == "cuda" and not quick:
        seq_lens += (131072,)
    methods = ["torch.nn", "nn-auto"] + (["nn-quasi-newton"] if device == "cuda" else [])
    # float64 on a CPU, where the adjoint's default is chosen per dtype by these rows (docs/adjoint.md §5)
    dtypes = ("float32",) if device == "cuda" else ("float32", "float64")
    return [
        {"cell": cell, "hidden": hidden, "seq_len": seq_len, "method": method, "device": device, "pass": "train",
         "dtype": dtype}
        for dtype in dtypes
        for cell in CELLS
        for hidden in hiddens
        for seq_len in seq_lens
        for method in methods
    ]


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
    return timed(function, device, repeats)[1]


def copy_bandwidth(device: torch.device) -> float:
    """Measured GB/s of copying a 512 MiB buffer (read + write counted)."""
    source = torch.empty(64 * 2**20, dtype=torch.float64, device=device).fill_(1.0)
    target = torch.empty_like(source)
    seconds = _median_seconds(device, lambda: target.copy_(source), 5)
    return 2 * source.numel() * source.element_size() / seconds / 1e9


def run_train(job: dict) -> dict:
    """One training-pass job, in this process: peak memory of the method alone first, then
    alternating timed runs of the method and torch.nn."""
    keep_freed_memory()
    device = torch.device(job["device"])
    dtype = getattr(torch, job["dtype"])
    torch.manual_seed(0)
    reference = Network.random(job["cell"], job["hidden"], job["hidden"], seed=0, dtype=dtype).to(device=device)
    reference = reference.to_torch()
    inputs = gaussian_inputs(job["seq_len"], BATCH, job["hidden"], seed=1, dtype=dtype).to(device)
    weights = torch.linspace(-1.0, 1.0, inputs.numel() // job["hidden"] * job["hidden"], device=device).view_as(inputs)
    repeats = 5 if job["seq_len"] <= 4096 else 3
    row = dict(job, batch=BATCH, repeats=repeats)

    def gradients(module: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.detach().requires_grad_()
        output, _ = module(x)
        loss = (output * weights[: x.shape[0]].to(x.dtype)).sum()
        return list(torch.autograd.grad(loss, [x, *module.parameters()]))

    if job["method"] == "torch.nn":
        gradients(reference, inputs[:8])
        row["peak_mib"] = _peak_bytes(device, lambda: gradients(reference, inputs)) / 2**20
        row["seconds"] = _median_seconds(device, lambda: gradients(reference, inputs), repeats)
        return row
    solver, adjoint = TRAIN_METHODS[job["method"]]
    module = SOLVED_MODULES[job["cell"]].from_torch(reference, solver=solver, adjoint=adjoint)
    gradients(module, inputs[:8])
    row["peak_mib"] = _peak_bytes(device, lambda: gradients(module, inputs)) / 2**20
    row["backward"] = module.backward_method(inputs)
    ours, theirs = [], []
    for _ in range(repeats):  # alternating, as compare_with_torch does for the forward pass
        ours.append(_median_seconds(device, lambda: gradients(module, inputs), 1))
        theirs.append(_median_seconds(device, lambda: gradients(reference, inputs), 1))
    # Gradients are sums over T·B terms: compare relative to each gradient's largest entry.
    difference = max(
        float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
        for a, b in zip(gradients(module, inputs), gradients(reference, inputs))
    )
    row.update(
        seconds=statistics.median(ours),
        reference_seconds=statistics.median(theirs),
        ratio=statistics.median(ours) / statistics.median(theirs),
        max_rel_diff=difference,
    )
    if job["seq_len"] <= 4096 and dtype == torch.float32:  # both float32 results against float64 torch.nn
        exact = gradients(_float64(reference), inputs.double())
        row["rel_error"] = _relative_error(gradients(module, inputs), exact)
        row["reference_rel_error"] = _relative_error(gradients(reference, inputs), exact)
    return row


def _float64(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).double()


def _relative_error(got: list[torch.Tensor], exact: list[torch.Tensor]) -> float:
    return max(float((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-300)) for a, b in zip(got, exact))


def run_one(job: dict) -> dict:
    """One job, in this process."""
    if job.get("pass") == "train":
        return run_train(job)
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


def markdown_train(result: dict) -> str:
    lines = [
        f"### Training pass (forward + backward): {result['device_name']} — {result['date']}",
        "",
        f"B = {BATCH}, torch.nn default initialisation, TF32 off; gradients of Σ w ⊙ output for the inputs and "
        f"every parameter. Ratio = fixedpoint.nn ÷ torch.nn in the same process, alternating (< 1 is faster); "
        f"rel diff = max over the gradients of max |diff| ÷ max |torch.nn's gradient|; rel error: the same "
        f"against torch.nn in float64 (T ≤ 4096), for both float32 results; peak = memory the pass adds "
        f"({'allocated' if result['device'] == 'cuda' else 'resident'}). `nn-auto`: solver and adjoint chosen "
        f"by `auto`; `nn-quasi-newton`: quasi-Newton forward; backward: what ran (`fused`: torch.nn's own "
        f"backward through its kernel; otherwise the adjoint recurrence's method).",
        "",
        "| dtype | cell | H | T | method | backward | rel diff | rel error | torch.nn rel error | seconds | torch.nn s | ratio | peak MiB | torch.nn MiB |",
        "|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    reference = {job_key(dict(r, method="")): r for r in result["rows"] if r["method"] == "torch.nn"}
    for row in result["rows"]:
        if row["method"] == "torch.nn":
            continue
        base = reference.get(job_key(dict(row, method="")), {})
        lines.append(
            f"| {_dtype(row)} | {row['cell']} | {row['hidden']} | {row['seq_len']} | {row['method']} | {row.get('backward', '')} | "
            f"{row['max_rel_diff']:.1e} | "
            f"{_maybe(row.get('rel_error'))} | {_maybe(row.get('reference_rel_error'))} | {row['seconds']:.4f} | {row['reference_seconds']:.4f} | {row['ratio']:.2f} | {row['peak_mib']:.1f} | "
            f"{base.get('peak_mib', float('nan')):.1f} |"
        )
    return "\n".join(lines)


def _maybe(value: float | None) -> str:
    return "" if value is None else f"{value:.1e}"


def run_job(job: dict) -> dict:
    """One job in its own process (so that its peak memory is its own)."""
    done = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        raise SystemExit(f"job {job} failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def job_key(job: dict) -> tuple:
    return _dtype(job), job["cell"], job["hidden"], job["seq_len"], job["method"]


def _dtype(job: dict) -> str:
    """A job's dtype; rows written before the plan had float64 were float32."""
    return job.get("dtype", "float32")


def selected(job: dict, args: argparse.Namespace) -> bool:
    """Whether ``job`` is in the subset that ``--cells``, ``--hiddens``, ``--seq-lens``, ``--dtypes``
    and ``--methods`` name."""
    return (
        (args.dtypes is None or _dtype(job) in args.dtypes)
        and (args.methods is None or job["method"] in args.methods)
        and (args.cells is None or job["cell"] in args.cells)
        and (args.hiddens is None or job["hidden"] in args.hiddens)
        and (args.seq_lens is None or job["seq_len"] in args.seq_lens)
    )


def merged_rows(previous: dict | None, rows: list[dict], full_plan: list[dict]) -> list[dict]:
    """``rows`` with the rows of the section ``previous`` (same device and plan) that they do not
    replace, in the order of the full plan."""
    if previous is None:
        return list(rows)
    ran = {job_key(row) for row in rows}
    first_date = previous["date"].split(" to ")[0]  # for rows of files written before rows had dates
    kept = [dict(row, date=row.get("date", first_date)) for row in previous["rows"] if job_key(row) not in ran]
    order = {job_key(job): index for index, job in enumerate(full_plan)}
    return sorted(kept + rows, key=lambda row: order.get(job_key(row), len(order)))


def _date_span(rows: list[dict]) -> str:
    dates = sorted({row["date"] for row in rows})
    return dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"


def _integers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _dtypes(text: str) -> tuple[str, ...]:
    dtypes = tuple(text.split(","))
    unknown = [dtype for dtype in dtypes if dtype not in ("float32", "float64")]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown dtype {unknown[0]!r}: choose from float32, float64")
    return dtypes


def _cells(text: str) -> tuple[str, ...]:
    cells = tuple(text.split(","))
    unknown = [cell for cell in cells if cell not in CELLS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown cell {unknown[0]!r}: choose from {', '.join(CELLS)}")
    return cells


def _methods(text: str) -> tuple[str, ...]:
    methods = tuple(text.split(","))
    known = {"torch.nn", "auto", "picard", "quasi-newton", "newton", "damped", *TRAIN_METHODS}
    unknown = [method for method in methods if method not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method {unknown[0]!r}: choose from {', '.join(sorted(known))}")
    return methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--pass", dest="passes", choices=["forward", "train", "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="H ∈ {8, 64}, T ∈ {512, 4096}")
    parser.add_argument("--cells", type=_cells, help="run only these cells (comma-separated); adds to the section")
    parser.add_argument("--hiddens", type=_integers, help="run only these H (comma-separated); adds to the section")
    parser.add_argument("--seq-lens", type=_integers, help="run only these T (comma-separated); adds to the section")
    parser.add_argument("--dtypes", type=_dtypes, help="run only these dtypes (float32,float64); adds to the section")
    parser.add_argument("--methods", type=_methods,
                        help="run only these methods (e.g. auto; each row's ratio is to torch.nn in its own process); "
                        "adds to the section")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a job as JSON, run in this process
    args = parser.parse_args()
    if args.one:
        # Every row, torch.nn's included, in true float32: TF32 off for matmuls and cuDNN.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        print(json.dumps(run_one(json.loads(args.one))))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    device_name = describe(args.device)
    today = datetime.date.today().isoformat()
    path = args.out / "benchmarks.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("forward", "train") if args.passes == "all" else (args.passes,):
        full_plan = plan(args.device, args.quick) if name == "forward" else plan_train(args.device, args.quick)
        jobs = [job for job in full_plan if selected(job, args)]
        if not jobs:
            parser.error(f"--cells/--hiddens/--seq-lens select none of the {name} pass's {len(full_plan)} jobs")
        # forward results keep the key of earlier files (the device); the training pass is "<device> train"
        key = args.device if name == "forward" else f"{args.device} train"
        previous = results.get(key)
        subset = len(jobs) < len(full_plan)
        if previous is not None and (previous.get("device_name"), previous.get("quick")) != (device_name, args.quick):
            if subset:  # merging would mix two machines (or plans) in one table
                parser.error(
                    f"the {key!r} section of {path} was measured on {previous.get('device_name')} "
                    f"(quick={previous.get('quick')}); a subset run adds to it only on the same device and plan: "
                    "run the whole plan to replace it, or write elsewhere with --out"
                )
            previous = None
        result = {"device": args.device, "pass": name, "device_name": device_name, "quick": args.quick}
        if name == "forward":
            result["copy_gb_per_s"] = copy_bandwidth(device)
        rows: list[dict] = []
        for number, job in enumerate(jobs, 1):
            row = dict(run_job(job), date=today)
            rows.append(row)
            print(f"[{number}/{len(jobs)}] {name} {_dtype(job)} {job['cell']} H={job['hidden']} T={job['seq_len']} "
                  f"{job['method']}: {row['seconds']:.4f} s" + (f", ratio {row['ratio']:.2f}" if "ratio" in row else ""),
                  flush=True)
            # Written after every job, so that a run cut short keeps what it measured and, until
            # it is overwritten, what the earlier run measured.
            result["rows"] = merged_rows(previous, rows, full_plan)
            write(results, key, result, path, args.out)
        if not subset:  # a whole run replaces the section, rows the plan no longer has included
            result["rows"] = rows
            write(results, key, result, path, args.out)
        print(render(result))


def write(results: dict, key: str, result: dict, path: Path, out: Path) -> None:
    result["date"] = _date_span(result["rows"])
    results[key] = result
    path.write_text(json.dumps(results, indent=1))
    sections = [render(results[section]) for section in sorted(results)]
    (out / "benchmarks.md").write_text(HEADER + "\n\n".join(sections) + "\n")


def render(result: dict) -> str:
    return markdown_train(result) if result.get("pass") == "train" else markdown(result)


HEADER = """# Benchmarks

Generated by `make bench` (`analysis/bench.py`); the numbers are in `benchmarks.json`.  One
section per device and pass (forward; training = forward + backward), each with its date.
`auto` is the CLI default; `ran` says what it chose.

"""


if __name__ == "__main__":
    main()
