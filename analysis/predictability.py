"""Predicted against observed iteration counts on a synthetic suite (issue: predict before solving).

For every case (cell × W_hh scale × T × dtype × seed; B = 4, H = I = 16, N(0, 1) inputs, zero
initial state) it measures the largest Lyapunov exponent and the predicted iterations of
:mod:`fixedpoint.predictability` twice — from a 128-step prefix before solving, and from the
solved trajectory — and the iterations Picard, quasi-Newton and (undamped) Newton actually took.
Seed 0 is the fitting half, seed 1 the held-out half: the script fits ``log(observed) = log a +
b·log(P)`` per (cell, method) on seed 0 and prints the coefficients, but every accuracy number
it reports is that of the model shipped in ``fixedpoint.predictability.MODEL``.

Writes ``figures/predictability.json``, ``figures/predictability.png`` and the generated part of
``docs/predictability.md``.

    python analysis/predictability.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from _common import add_output_arguments, metadata, output_directory, write_and_reload, write_generated_section
from fixedpoint import Network, Newton, Picard, QuasiNewton, SequenceSystem, solve
from fixedpoint.data import gaussian_inputs
from fixedpoint.plotting import plot_predictability
from fixedpoint.predictability import MODEL, predictability

METHODS = {"picard": Picard, "quasi-newton": QuasiNewton, "newton": Newton}
CELLS = [("elman", "tanh"), ("elman", "relu"), ("gru", "tanh"), ("lstm", "tanh")]
SCALES = [0.5, 1.0, 2.0, 3.0]
SEQ_LENS = [64, 256, 1024]
DTYPES = {"float64": torch.float64, "float32": torch.float32}
PREFIX = 128
HIDDEN = 16
BATCH = 4


def run_case(kind: str, nonlinearity: str, scale: float, seq_len: int, dtype: str, seed: int) -> dict:
    network = Network.random(kind, HIDDEN, HIDDEN, nonlinearity=nonlinearity, scale=scale, seed=seed,
                             dtype=DTYPES[dtype])
    inputs = gaussian_inputs(seq_len, BATCH, HIDDEN, seed=seed + 100).to(DTYPES[dtype])
    system = SequenceSystem.build(network.cells[0][0], inputs)
    rtol, atol = Picard().tolerances(DTYPES[dtype])
    started = time.perf_counter()
    before = predictability(system, rtol=rtol, atol=atol, prefix=PREFIX)
    prefix_seconds = time.perf_counter() - started
    observed = {}
    after = None
    for method, solver in METHODS.items():
        solution = solve(system, solver(), throw=False, forward_error="off")
        observed[method] = solution.stats.iterations if solution.converged else None
        if method == "picard":
            started = time.perf_counter()
            after = predictability(system, solution.value, rtol=rtol, atol=atol)
            trajectory_seconds = time.perf_counter() - started
    label = kind if kind != "elman" else f"elman-{nonlinearity}"
    return {
        "cell": label, "kind": kind, "scale": scale, "seq_len": seq_len, "dtype": dtype, "seed": seed,
        "lyapunov": float(after.lyapunov.max()), "lyapunov_prefix": float(before.lyapunov.max()),
        "picard_prediction": int(after.picard.max()), "picard_prediction_prefix": int(before.picard.max()),
        "predicted": {m: int(v.max()) for m, v in after.predicted_iterations.items()},
        "predicted_prefix": {m: int(v.max()) for m, v in before.predicted_iterations.items()},
        "observed": observed,
        "prefix_seconds": prefix_seconds, "trajectory_seconds": trajectory_seconds,
    }


def fit(cases: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Least squares in log space per (cell kind, method), on the fitting half (seed 0)."""
    fitted: dict[str, dict[str, list[float]]] = {}
    for kind in ("elman", "gru", "lstm"):
        for method in METHODS:
            # Predictable cases only: where P reaches T the model does not use the fit.
            rows = [c for c in cases if c["kind"] == kind and c["seed"] == 0 and c["observed"][method] is not None
                    and c["picard_prediction"] < c["seq_len"]]
            if len(rows) < 3:
                continue
            x = np.log([max(c["picard_prediction"], 1) for c in rows])
            y = np.log([c["observed"][method] for c in rows])
            slope, intercept = np.polyfit(x, y, 1)
            fitted.setdefault(kind, {})[method] = [round(float(math.exp(intercept)), 4), round(float(slope), 3)]
    return fitted


def accuracy(cases: list[dict], key: str) -> dict[str, dict[str, object]]:
    """Per method and half: the share of converged cases predicted within 2×, and the misses."""
    out: dict[str, dict[str, object]] = {}
    for method in METHODS:
        for seed, half in ((0, "fit"), (1, "held-out")):
            rows = [c for c in cases if c["seed"] == seed and c["observed"][method] is not None]
            ratios = [c[key][method] / c["observed"][method] for c in rows]
            within = sum(1 for r in ratios if 0.5 <= r <= 2.0)
            misses = [f"{c['cell']} ×{c['scale']} T={c['seq_len']} {c['dtype']}: predicted {c[key][method]}, "
                      f"observed {c['observed'][method]}" for c, r in zip(rows, ratios) if not 0.5 <= r <= 2.0]
            out.setdefault(method, {})[half] = {"cases": len(rows), "within_2x": within, "misses": misses}
    return out


def write_doc(data: dict) -> None:
    meta = data["meta"]
    lines = [f"## Measured: the synthetic suite ({meta['date'][:10]})", "",
             f"{len(data['cases'])} cases on {meta['platform']}, torch {meta['torch']}, {meta['torch_threads']} "
             f"thread(s): cells {', '.join(f'{k}-{n}' if k == 'elman' else k for k, n in CELLS)}; "
             f"`W_hh` × {', '.join(map(str, SCALES))}; T = {', '.join(map(str, SEQ_LENS))}; float64 and (T ≤ 256) "
             f"float32 with their default tolerances; B = {BATCH}, H = I = {HIDDEN}; seed 0 (fit) and seed 1 (held out).", "",
             "Share of converged cases whose prediction is within 2× of the observed count (shipped model):", "",
             "| method | from the solved trajectory: fit | held out | from a 128-step prefix: fit | held out |",
             "|---|---|---|---|---|"]
    for method in METHODS:
        cells = []
        for key in ("accuracy", "accuracy_prefix"):
            for half in ("fit", "held-out"):
                entry = data[key][method][half]
                share = entry["within_2x"] / entry["cases"] if entry["cases"] else float("nan")
                cells.append(f"{entry['within_2x']}/{entry['cases']} ({share:.0%})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Coefficients `(a, b)` fitted on seed 0 in this run (the shipped model's are in "
              "`fixedpoint/predictability.py`):", ""]
    for kind, methods in data["fitted"].items():
        lines.append(f"- {kind}: " + ", ".join(f"{m} a = {a:g}, b = {b:g}" for m, (a, b) in methods.items()))
    lines += ["", "Misses (prediction from the solved trajectory, off by more than 2×):", ""]
    any_miss = False
    for method in METHODS:
        for half in ("fit", "held-out"):
            for miss in data["accuracy"][method][half]["misses"]:
                lines.append(f"- {method} ({half}): {miss}")
                any_miss = True
    if not any_miss:
        lines.append("- none")
    unconverged = [f"{c['cell']} ×{c['scale']} T={c['seq_len']} {c['dtype']} seed {c['seed']}: {m}"
                   for c in data["cases"] for m, v in c["observed"].items() if v is None]
    lines += ["", f"Not converged (left out of the shares above): {len(unconverged)}.", ""]
    lines += [f"- {u}" for u in unconverged]
    seconds = [c["prefix_seconds"] for c in data["cases"]]
    lines += ["", f"Estimating from the prefix took {np.median(seconds) * 1e3:.0f} ms (median; longest "
              f"{max(seconds) * 1e3:.0f} ms) per case. Figure: `figures/predictability.png`.", ""]
    write_generated_section("predictability.md", "analysis/predictability.py", lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output_arguments(parser)
    args = parser.parse_args()
    out = output_directory(args, "predictability-")
    cells = CELLS[:2] if args.quick else CELLS
    scales = [1.0, 3.0] if args.quick else SCALES
    seq_lens = [64] if args.quick else SEQ_LENS
    cases = []
    for kind, nonlinearity in cells:
        for scale in scales:
            for seq_len in seq_lens:
                for dtype in DTYPES:
                    if dtype == "float32" and seq_len > 256:
                        continue  # the suite's time goes to dense Newton at long T; float64 covers it
                    for seed in (0, 1):
                        case = run_case(kind, nonlinearity, scale, seq_len, dtype, seed)
                        cases.append(case)
                        print(f"{case['cell']} ×{scale} T={seq_len} {dtype} seed {seed}: λ {case['lyapunov']:+.3f}, "
                              f"predicted {case['predicted']}, observed {case['observed']}", flush=True)
    data = {
        "meta": metadata("analysis/predictability.py", args.quick, {"hidden": HIDDEN, "batch": BATCH, "prefix": PREFIX},
                         model={k: {m: list(c) for m, c in v.items()} for k, v in MODEL.coefficients.items()}),
        "cases": cases,
        "fitted": fit(cases),
        "accuracy": accuracy(cases, "predicted"),
        "accuracy_prefix": accuracy(cases, "predicted_prefix"),
    }
    data = write_and_reload(out / "predictability.json", data)
    plot_predictability(data, out / "predictability.png")
    print("fitted on seed 0:", data["fitted"])
    if not args.quick and args.out is None:
        write_doc(data)


if __name__ == "__main__":
    main()
