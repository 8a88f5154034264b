"""Contraction study: how loose the certified bounds are, and how they predict Picard.

Runs the package, writes every number to ``<out>/contraction.json`` (with the metadata needed
to reproduce it), prints the looseness table as Markdown (pasted into docs/contraction.md),
then draws from the JSON:

- ``contraction_rate.png``: for each cell, sweeping the ``W_hh`` scale, the observed Picard
  rate against the certified data-conditional ``L`` (2- and ∞-norm) and the estimated
  ``max_t ‖J_t‖`` along the solution; below, the observed Picard iterations beside the
  certified a-priori count ``predicted_iterations`` (both norms).
- ``contraction_looseness.png``: certified ÷ worst sampled ratio and certified ÷ estimated,
  per cell, scale, hidden size and norm.

Looseness.  For one system (cell, ``H``, scale; inputs ``N(0, 1)``) and one norm:

- *certified*: ``max_{t ≥ 2, b} L_t`` from :func:`fixedpoint.contraction.certified_step_bounds`
  (1-based ``t``: the first step's predecessor is the given ``s_0``);
- *sampled*: the largest ratio ``‖f(s, x_t) − f(s', x_t)‖ / ‖s − s'‖`` found for pairs
  ``s, s'`` in the box of the predecessor state (the box the certificate holds on, recomputed
  here from the module docstring of ``fixedpoint.contraction``) at a set of positions: the ones
  with the largest certified ``L_t``, the largest estimated ``‖J_t‖`` and random ones.  Pairs
  start far apart (uniform, or two vertices of the box) or close (``10⁻³`` of the box width,
  around uniform points and around the solution), then take signed-gradient ascent steps on
  ``log`` of the ratio, each coordinate moving by ``η·‖s − s'‖_∞`` (``η`` decaying
  geometrically), projected back onto the box.  Every pair evaluated is in the box, so every
  ratio is a lower bound on the true Lipschitz constant there; the maximum over pairs, steps and
  positions is reported.  A ratio above the certified ``L_t`` at its position would disprove the
  certificate and is counted (``violations``);
- *estimated*: ``max_{t ≥ 2, b} ‖J_t‖`` along the solution
  (:func:`fixedpoint.contraction.estimated_step_norms`);
- *rate*: ``Stats.rate`` of a Picard solve from zero (default tolerances), the observed
  geometric-mean residual ratio over the last iterations.

Usage (from the repository root)::

    .venv/bin/python analysis/contraction.py            # full size, writes figures/
    .venv/bin/python analysis/contraction.py --quick    # tiny smoke test, writes to a temp dir
"""

from __future__ import annotations

import argparse
import math
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

import torch
from torch import Tensor

from fixedpoint import Picard, SequenceSystem, solve
from fixedpoint import plotting
from fixedpoint.cells import Cell, ElmanCell, LSTMCell
from fixedpoint.contraction import (
    analyze,
    certified_global_bound,
    certified_step_bounds,
    estimated_step_norms,
    predicted_picard_iterations,
    state_norms,
)

NORMS = ("2", "inf")
#: ``(id, kind, nonlinearity, title)`` for every cell studied.
CELLS = (
    ("elman-tanh", "elman", "tanh", "Elman (tanh)"),
    ("elman-relu", "elman", "relu", "Elman (relu)"),
    ("gru", "gru", "tanh", "GRU"),
    ("lstm", "lstm", "tanh", "LSTM"),
)
SAMPLE_SEED = 2
#: Near pairs start this fraction of the box width apart.
NEAR_FRACTION = 1e-3
#: Signed-gradient step ``η·‖s − s'‖_∞``: ``η`` goes geometrically from the first to the second.
ASCENT_ETA = (0.3, 0.02)
#: A sampled ratio counts as a violation above ``L_t·(1 + rel) + abs``.
VIOLATION_TOLERANCE = (1e-9, 1e-12)

FULL = {
    "rate": {"seq_len": 256, "batch": 8, "hidden_size": 32, "input_size": 32,
             "scales": [0.25 * 2 ** (k / 2) for k in range(9)]},
    "looseness": {"seq_len": 128, "batch": 4, "hidden_sizes": [16, 64], "input_size": 16,
                  "scales": [0.5, 1.0, 2.0, 4.0], "positions": 16, "pairs_per_position": 128,
                  "ascent_steps": 25},
}
QUICK = {
    "rate": {"seq_len": 24, "batch": 2, "hidden_size": 6, "input_size": 6, "scales": [0.25, 1.0, 4.0]},
    "looseness": {"seq_len": 16, "batch": 2, "hidden_sizes": [4], "input_size": 4, "scales": [1.0, 4.0],
                  "positions": 4, "pairs_per_position": 16, "ascent_steps": 3},
}


# -- systems ---------------------------------------------------------------------------------------
def build_system(kind: str, nonlinearity: str, hidden: int, input_size: int, seq_len: int, batch: int,
                 scale: float) -> SequenceSystem:
    return random_system(kind, input_size, hidden, seq_len, batch, scale, nonlinearity)


def predecessor_boxes(system: SequenceSystem) -> tuple[Tensor, Tensor]:
    """``(lo, hi)``, each ``(T, B, S)``: entry ``t`` is the box of the predecessor of position ``t``
    (0-based) on which the certified ``L_t`` holds — recomputed from the module docstring of
    :mod:`fixedpoint.contraction`, not taken from its internals."""
    cell = system.cell
    p = system.projected_inputs
    s0 = system.initial_state
    steps, batch, size = system.state_shape
    rho = torch.clamp(cell.hidden_of(s0).abs().amax(-1), min=1.0)[None, :, None]  # (1, B, 1)
    if isinstance(cell, ElmanCell) and cell.nonlinearity == "relu":
        positive, negative = cell.weight_hh.clamp(min=0), cell.weight_hh.clamp(max=0)
        lo, hi = [s0], [s0]
        low, high = s0, s0
        for t in range(steps - 1):
            upper = p[t] + high @ positive.T + low @ negative.T
            low, high = torch.zeros_like(upper), upper.clamp(min=0)
            lo.append(low)
            hi.append(high)
        return torch.stack(lo), torch.stack(hi)
    if isinstance(cell, LSTMCell):
        hidden = cell.hidden_size
        gates = []
        for k, weight in enumerate(cell.gate_weights()):
            reach = rho * weight.abs().sum(-1)
            gates.append(p[..., k * hidden : (k + 1) * hidden] + reach)  # upper ends
        i_hi, f_hi = torch.sigmoid(gates[0]), torch.sigmoid(gates[1])
        g_lo = p[..., 2 * hidden : 3 * hidden] - rho * cell.gate_weights()[2].abs().sum(-1)
        g_abs = torch.maximum(torch.tanh(gates[2]).abs(), torch.tanh(g_lo).abs())
        bound = cell.cell_of(s0).abs()
        c_bounds = []
        for t in range(steps):
            c_bounds.append(bound)
            bound = f_hi[t] * bound + i_hi[t] * g_abs[t]
        c = torch.stack(c_bounds)
        h = rho.expand(steps, batch, hidden)
        hi = torch.cat((h, c), -1)
        return -hi, hi
    hi = rho.expand(steps, batch, size).clone()
    return -hi, hi


def pair_norm(cell: Cell, values: Tensor, norm: str) -> Tensor:
    """The state norm (LSTM: ``max(‖h‖, ‖c‖)``) of ``(..., S)`` → ``(...)``, differentiable."""
    return state_norms(cell, values, norm)


# -- sampling the Lipschitz ratio --------------------------------------------------------------------
def sampled_ratios(system: SequenceSystem, solution: Tensor, norm: str, positions: list[tuple[int, int]],
                   pairs: int, ascent_steps: int, generator: torch.Generator) -> Tensor:
    """Largest ratio ``‖f(s) − f(s')‖/‖s − s'‖`` found in the box at each ``(t, b)``: ``(P,)``."""
    cell = system.cell
    lo_all, hi_all = predecessor_boxes(system)
    t_index = torch.tensor([t for t, _ in positions])
    b_index = torch.tensor([b for _, b in positions])
    lo, hi = lo_all[t_index, b_index][:, None], hi_all[t_index, b_index][:, None]  # (P, 1, S)
    width = hi - lo
    count, size = len(positions), lo.shape[-1]
    projected = system.projected_inputs[t_index, b_index][:, None].expand(count, pairs, -1).contiguous()
    previous = torch.cat((system.initial_state[None], solution[:-1]))[t_index, b_index][:, None]

    def uniform() -> Tensor:
        return lo + width * torch.rand(count, pairs, size, generator=generator, dtype=DTYPE)

    def vertex() -> Tensor:
        return lo + width * (torch.rand(count, pairs, size, generator=generator, dtype=DTYPE) < 0.5)

    def clip(values: Tensor) -> Tensor:
        return torch.minimum(torch.maximum(values, lo), hi)

    def near(values: Tensor, steer: bool) -> Tensor:
        """A partner ``10⁻³`` of the box width away: in a random direction, or (``steer``) in the
        direction that ``J`` stretches most in this norm (the maximising row's signs for ∞, the top
        right singular vector for 2); clipped to the box either way."""
        if steer:
            with torch.no_grad():
                jacobian = cell.jacobian(values, projected[:, : values.shape[1]])
            if norm == "inf":
                row = jacobian.abs().sum(-1).argmax(-1)  # (P, n)
                direction = torch.gather(jacobian, -2, row[..., None, None].expand(*row.shape, 1, size))[..., 0, :].sign()
            else:
                direction = torch.linalg.svd(jacobian).Vh[..., 0, :]
        else:
            direction = 2 * torch.rand(values.shape, generator=generator, dtype=DTYPE) - 1
        direction = direction * (width > 0)
        return clip(values + NEAR_FRACTION * width.amax(-1, keepdim=True) * direction)

    # Near pairs start from points pulled 2·10⁻³ of the widest side inside the box, so that the
    # partner fits without clipping (relu states sit on the face h = 0).
    margin = torch.minimum(2 * NEAR_FRACTION * width.amax(-1, keepdim=True), width / 2)

    def inside(values: Tensor) -> Tensor:
        return torch.minimum(torch.maximum(values, lo + margin), hi - margin)

    quarter = pairs // 4
    jitter = NEAR_FRACTION * width * (2 * torch.rand(count, pairs, size, generator=generator, dtype=DTYPE) - 1)
    groups = [  # (first, second) of each group of pairs
        (uniform(), uniform()),  # far, uniform
        (vertex(), vertex()),  # far, vertices
        (inside(uniform()), None),  # near, uniform
        (inside(previous + jitter), None),  # near, around the solution
    ]
    firsts, seconds = [], []
    for k, (first, second) in enumerate(groups):
        size_k = quarter if k < 3 else pairs - 3 * quarter
        first = first[:, :size_k]
        firsts.append(first)
        if second is None:  # half steered, half random
            half = size_k // 2
            seconds.append(torch.cat((near(first[:, :half], True), near(first[:, half:], False)), 1))
        else:
            seconds.append(second[:, :size_k])
    s, s2 = torch.cat(firsts, 1), torch.cat(seconds, 1)
    best = torch.zeros(count, pairs, dtype=DTYPE)
    decay = (ASCENT_ETA[1] / ASCENT_ETA[0]) ** (1 / max(1, ascent_steps - 1))
    for step in range(ascent_steps + 1):
        s = s.detach().requires_grad_(True)
        s2 = s2.detach().requires_grad_(True)
        gap = pair_norm(cell, s - s2, norm)
        ok = gap > 0
        ratio = pair_norm(cell, cell.step(s, projected) - cell.step(s2, projected), norm) / gap.clamp(min=1e-300)
        ratio = torch.where(ok, ratio, torch.zeros_like(ratio))
        best = torch.maximum(best, ratio.detach())
        if step == ascent_steps:
            break
        objective = torch.where(ok, torch.log(ratio.clamp(min=1e-300)), torch.zeros_like(ratio)).sum()
        grad_s, grad_s2 = torch.autograd.grad(objective, (s, s2))
        with torch.no_grad():
            eta = ASCENT_ETA[0] * decay**step
            separation = (s - s2).abs().amax(-1, keepdim=True)
            s = clip(s + eta * separation * grad_s.sign())
            s2 = clip(s2 + eta * separation * grad_s2.sign())
    return best.amax(-1)


def choose_positions(certified: Tensor, estimated: Tensor, count: int, generator: torch.Generator) -> list[tuple[int, int]]:
    """``(t, b)`` with ``t ≥ 1`` (0-based): the top quarter by certified ``L_t``, the top quarter by
    estimated ``‖J_t‖``, the rest at random; distinct."""
    steps, batch = certified.shape
    chosen: list[tuple[int, int]] = []

    def add(flat_indices: list[int], limit: int) -> None:
        added = 0
        for flat in flat_indices:
            pair = (1 + flat // batch, flat % batch)
            if pair not in chosen and added < limit:
                chosen.append(pair)
                added += 1

    add(certified[1:].flatten().argsort(descending=True).tolist(), max(1, count // 4))
    add(estimated[1:].flatten().argsort(descending=True).tolist(), max(1, count // 4))
    order = torch.randperm((steps - 1) * batch, generator=generator).tolist()
    add(order, count - len(chosen))
    return chosen


# -- studies ---------------------------------------------------------------------------------------
def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def rate_study(sizes: dict[str, Any], log: Any = print) -> dict[str, Any]:
    """Observed Picard rate and iterations against certified and estimated ``L``, per scale."""
    panels = []
    for cell_id, kind, nonlinearity, title in CELLS:
        record: dict[str, Any] = {
            "cell": cell_id, "title": title, "scales": list(sizes["scales"]), "observed_rate": [],
            "iterations": [], "result": [], "certified": {n: [] for n in NORMS},
            "estimated": {n: [] for n in NORMS}, "global": {n: [] for n in NORMS},
            "predicted_iterations": {n: [] for n in NORMS},
        }
        for scale in sizes["scales"]:
            system = build_system(kind, nonlinearity, sizes["hidden_size"], sizes["input_size"],
                                  sizes["seq_len"], sizes["batch"], scale)
            solution = solve(system, Picard(), throw=False)
            stats = solution.stats
            record["observed_rate"].append(_finite(stats.rate))
            record["iterations"].append(stats.iterations)
            record["result"].append(solution.result.name)
            for norm in NORMS:
                report = analyze(system, norm, atol=stats.atol, states=solution.value)
                record["certified"][norm].append(report.conditional_bound)
                record["estimated"][norm].append(report.estimated)
                record["global"][norm].append(report.global_bound)
                record["predicted_iterations"][norm].append(int(report.predicted_iterations.max()))
            log(
                f"  {cell_id:10s} ×{scale:<6.3g} {stats.iterations:4d} it (predicted 2: "
                f"{record['predicted_iterations']['2'][-1]:4d}, ∞: {record['predicted_iterations']['inf'][-1]:4d}), "
                f"rate {_fmt(stats.rate)}, L cert 2 {record['certified']['2'][-1]:.3g} ∞ "
                f"{record['certified']['inf'][-1]:.3g}, est 2 {record['estimated']['2'][-1]:.3g}"
            )
        panels.append(record)
    config = {
        "seq_len": sizes["seq_len"], "batch": sizes["batch"], "hidden_size": sizes["hidden_size"],
        "input_size": sizes["input_size"], "dtype": "float64", "scales": list(sizes["scales"]),
        "rtol": stats.rtol, "atol": stats.atol, "weight_seed": WEIGHT_SEED, "input_seed": INPUT_SEED,
    }
    return {"config": config, "panels": panels}


def looseness_study(sizes: dict[str, Any], log: Any = print) -> dict[str, Any]:
    """Certified ÷ sampled and certified ÷ estimated for every cell, ``H``, scale and norm."""
    generator = torch.Generator().manual_seed(SAMPLE_SEED)
    rows = []
    for cell_id, kind, nonlinearity, title in CELLS:
        for hidden in sizes["hidden_sizes"]:
            for scale in sizes["scales"]:
                system = build_system(kind, nonlinearity, hidden, sizes["input_size"], sizes["seq_len"],
                                      sizes["batch"], scale)
                solution = solve(system, Picard(), throw=False)
                stats = solution.stats
                row: dict[str, Any] = {
                    "cell": cell_id, "title": title, "hidden_size": hidden, "scale": scale,
                    "iterations": stats.iterations, "result": solution.result.name,
                    "observed_rate": _finite(stats.rate), "norms": {},
                }
                for norm in NORMS:
                    bounds = certified_step_bounds(system, norm)
                    certified = bounds.lipschitz
                    estimated = estimated_step_norms(system, solution.value, norm)
                    predicted = predicted_picard_iterations(bounds, stats.atol)
                    positions = choose_positions(certified, estimated, sizes["positions"], generator)
                    sampled = sampled_ratios(system, solution.value, norm, positions, sizes["pairs_per_position"],
                                             sizes["ascent_steps"], generator)
                    at = certified[[t for t, _ in positions], [b for _, b in positions]]
                    rel, abs_ = VIOLATION_TOLERANCE
                    violations = int((sampled > at * (1 + rel) + abs_).sum())
                    certified_max = float(certified[1:].max())
                    estimated_max = float(estimated[1:].max())
                    sampled_max = float(sampled.max())
                    row["norms"][norm] = {
                        "certified": certified_max,
                        "global": certified_global_bound(system.cell, norm, seq_len=system.seq_len),
                        "estimated": estimated_max,
                        "sampled": sampled_max,
                        "certified_over_sampled": certified_max / sampled_max if sampled_max > 0 else None,
                        "certified_over_estimated": certified_max / estimated_max if estimated_max > 0 else None,
                        "per_position_median_certified_over_sampled": float((at / sampled).median()),
                        "positions": [list(p) for p in positions],
                        "certified_at_positions": at.tolist(),
                        "sampled_at_positions": sampled.tolist(),
                        "violations": violations,
                        "predicted_iterations": int(predicted.max()),
                    }
                    if violations:
                        log(f"  !! {cell_id} H={hidden} ×{scale:g} {norm}: "
                            f"{violations} sampled ratio(s) above the certified L_t")
                two, inf = row["norms"]["2"], row["norms"]["inf"]
                log(
                    f"  {cell_id:10s} H={hidden:<3d} ×{scale:<4g} rate {_fmt(stats.rate)} | 2: cert {two['certified']:.3g} "
                    f"sampled {two['sampled']:.3g} est {two['estimated']:.3g} | ∞: cert {inf['certified']:.3g} "
                    f"sampled {inf['sampled']:.3g} est {inf['estimated']:.3g}"
                )
                rows.append(row)
    config = {
        "seq_len": sizes["seq_len"], "batch": sizes["batch"], "hidden_sizes": list(sizes["hidden_sizes"]),
        "input_size": sizes["input_size"], "dtype": "float64", "scales": list(sizes["scales"]),
        "positions": sizes["positions"], "pairs_per_position": sizes["pairs_per_position"],
        "ascent_steps": sizes["ascent_steps"], "ascent_eta": list(ASCENT_ETA), "near_fraction": NEAR_FRACTION,
        "weight_seed": WEIGHT_SEED, "input_seed": INPUT_SEED, "sample_seed": SAMPLE_SEED,
    }
    return {"config": config, "rows": rows}


# -- output ----------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def markdown_table(looseness: dict[str, Any], stamp: str) -> str:
    """The looseness table as Markdown, one row per (cell, H, scale)."""
    config = looseness["config"]
    lines = [
        f"Measured {stamp}, CPU, float64, T = {config['seq_len']}, B = {config['batch']}, inputs N(0, 1) "
        f"(seed {config['input_seed']}), torch-default weights (seed {config['weight_seed']}) with W_hh × scale; "
        f"{config['positions']} positions × {config['pairs_per_position']} pairs × {config['ascent_steps']} ascent steps "
        f"(seed {config['sample_seed']}).",
        "",
        "| cell | H | W_hh × | Picard rate | iterations | L cert 2 | cert ÷ sampled 2 | cert ÷ est 2 "
        "| L cert ∞ | cert ÷ sampled ∞ | cert ÷ est ∞ |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in looseness["rows"]:
        two, inf = row["norms"]["2"], row["norms"]["inf"]
        iterations = f"{row['iterations']} / {min(two['predicted_iterations'], inf['predicted_iterations'])}"
        dagger = " †" if row["iterations"] >= config["seq_len"] else ""
        cells = [row["title"], str(row["hidden_size"]), f"{row['scale']:g}", _fmt(row["observed_rate"], 2) + dagger,
                 iterations]
        for norm in (two, inf):
            cells += [f"{norm['certified']:.3g}", _fmt(norm["certified_over_sampled"], 3),
                      _fmt(norm["certified_over_estimated"], 3)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"iterations: observed Picard / certified a-priori prediction (the smaller of the two norms; "
        f"T = {config['seq_len']} is finite termination). † the solve ran to T: it ended by finite termination "
        f"and its rate is that of the last, shrinking window, not an asymptotic one."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_output_arguments(parser)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    out = output_directory(args, "fixedpoint-contraction-")
    torch.set_num_threads(max(1, args.threads))
    sizes = QUICK if args.quick else FULL

    started = time.perf_counter()
    rate_sizes = sizes["rate"]
    print(f"rate sweep: T={rate_sizes['seq_len']}, B={rate_sizes['batch']}, H={rate_sizes['hidden_size']}, float64")
    rate = rate_study(rate_sizes)
    rate_seconds = time.perf_counter() - started
    loose_sizes = sizes["looseness"]
    print(f"looseness: T={loose_sizes['seq_len']}, B={loose_sizes['batch']}, H in {loose_sizes['hidden_sizes']}, float64")
    looseness = looseness_study(loose_sizes)
    compute_seconds = time.perf_counter() - started

    meta = metadata(
        "analysis/contraction.py",
        args.quick,
        sizes,
        sample_seed=SAMPLE_SEED,
        tolerances="Picard defaults for the dtype (fixedpoint.solvers.base.DEFAULT_TOLERANCES)",
    )
    meta["seconds"] = {"rate_study": round(rate_seconds, 2), "total_compute": round(compute_seconds, 2)}
    data = {"metadata": meta, "rate": rate, "looseness": looseness}
    json_path = out / "contraction.json"
    stored = write_and_reload(json_path, data)
    plotting.plot_contraction_rate(stored["rate"], out / "contraction_rate.png")
    plotting.plot_contraction_looseness(stored["looseness"], out / "contraction_looseness.png")
    print()
    print(markdown_table(stored["looseness"], stored["metadata"]["date"][:10]))
    print()
    total = time.perf_counter() - started
    print(f"wrote {json_path}, {out / 'contraction_rate.png'}, {out / 'contraction_looseness.png'} ({total:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
